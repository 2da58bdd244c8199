"""A node's storage pool: one directory of thin qcow2 volumes, one per claim, each with a sidecar.

A volume is ``<namespace>--<claim>.qcow2`` beside ``<namespace>--<claim>.json`` (virtual size,
format, source, creation time). Every write goes to a ``.part-`` file in the pool first and is
renamed into place only when complete, so a volume that exists is always whole; whatever fails
removes its partial files, and ``discard_partials()`` sweeps those a crash left behind.

Images from outside (files, downloads, uploads) are detected with ``qemu-img info`` (qcow2, raw,
vmdk, vdi; an ISO is raw), may be gzip- or xz-compressed (detected by magic bytes, decompressed
while streaming) and are always converted to a fresh qcow2, so nothing from the source (backing
files, external extents) survives into the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import lzma
import os
import re
import shutil
import uuid
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Progress = Callable[[float], None]
"""Receives the percentage done, 0.0 to 100.0."""

QEMU_IMG = "qemu-img"
SOURCE_FORMATS = frozenset({"qcow2", "raw", "vmdk", "vdi"})
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
# Decompressed output is bounded per step so a compression bomb cannot fill memory.
_MAX_STEP_OUTPUT = 4 << 20
_CHUNK = 1 << 20
# Metadata a fresh qcow2 needs whatever its virtual size (header, L1, refcount tables).
_QCOW2_OVERHEAD = 1 << 20
# Share of a streamed import's progress given to the transfer; conversion gets the rest.
_TRANSFER_SHARE = 90.0
_WATCH_INTERVAL = 0.1
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


class PoolError(Exception):
    """Base of the pool's errors."""


class InvalidVolumeName(PoolError):
    """A namespace or claim name that is not a DNS-1123 name, or that escapes the pool."""


class VolumeNotFound(PoolError):
    pass


class VolumeExists(PoolError):
    pass


class PoolFull(PoolError):
    """The pool's capacity or the disk under it cannot hold the volume; nothing was left behind."""

    def __init__(self, volume: str, needed: int, free: int) -> None:
        self.volume, self.needed, self.free = volume, needed, free
        super().__init__(
            f"storage pool full: volume {volume} needs {needed} bytes, {max(free, 0)} bytes free"
        )


class ImageError(PoolError):
    """qemu-img refused the image (corrupt, unsupported format, unsafe references)."""


@dataclass(frozen=True)
class VolumeInfo:
    real_size: int
    virtual_size: int
    format: str


@dataclass(frozen=True)
class VolumeRecord:
    """The sidecar: what the pool knows about a volume besides the image itself."""

    namespace: str
    name: str
    virtual_size: int
    format: str
    source: str
    created: str
    owner_uid: str = ""


@dataclass(frozen=True)
class SourceImage:
    """A source image as ``qemu-img info`` sees it."""

    format: str
    virtual_size: int
    actual_size: int


def volume_stem(namespace: str, name: str) -> str:
    """``<namespace>--<name>``, after checking both are DNS-1123 names (so no ``/`` or ``..``)."""
    for what, value in (("namespace", namespace), ("name", name)):
        if not _NAME.fullmatch(value) or ".." in value:
            raise InvalidVolumeName(f"invalid volume {what} {value!r}: must be a DNS-1123 name")
    return f"{namespace}--{name}"


def compression_of(head: bytes) -> str:
    """``gzip``, ``xz`` or ``""`` from a file's first bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(XZ_MAGIC):
        return "xz"
    return ""


def parse_progress(output: bytes) -> list[float]:
    """Percentages in ``qemu-img convert -p`` output (``    (12.50/100%)\\r``)."""
    return [float(m) for m in _PROGRESS.findall(output)]


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- qemu-img ---------------------------------------------------------------------------------


async def _run(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        QEMU_IMG,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise ImageError(f"qemu-img {args[0]} failed: {err.decode(errors='replace').strip()}")
    return out


async def probe(path: Path, fmt: str | None = None) -> SourceImage:
    """Format and sizes of an image, refusing what would read files other than ``path``."""
    args = ["info", "--output=json", "-U", *(["-f", fmt] if fmt else []), str(path)]
    info: dict[str, Any] = json.loads(await _run(*args))
    detected = str(info.get("format", ""))
    if detected not in SOURCE_FORMATS:
        raise ImageError(
            f"unsupported image format {detected!r} (supported: qcow2, raw, vmdk, vdi, iso)"
        )
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageError("images with a backing file are not accepted; flatten it first")
    _check_extents(path, info)
    return SourceImage(detected, int(info["virtual-size"]), int(info.get("actual-size", 0)))


def _check_extents(path: Path, info: dict[str, Any]) -> None:
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise ImageError("qcow2 images with an external data file are not accepted")
    for extent in data.get("extents") or []:
        if Path(str(extent.get("filename", ""))).name != path.name:
            raise ImageError("multi-file vmdk images are not accepted; use a single-file vmdk")


# --- streaming decompression ------------------------------------------------------------------


class _Decompressor:
    """Turns a gzip, xz or plain byte stream into plain bytes, in bounded pieces.

    Concatenated gzip members and xz streams are legal and decoded one after the other.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._z: Any = self._fresh()
        self._started = False
        self._more = False

    def _fresh(self) -> Any:
        if self.kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return lzma.LZMADecompressor() if self.kind == "xz" else None

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not self.kind:
            yield data
            return
        try:
            yield from self._decode(data)
        except (zlib.error, lzma.LZMAError, EOFError) as exc:
            raise ImageError(f"corrupt {self.kind} stream: {exc}") from exc

    def _decode(self, data: bytes) -> Iterator[bytes]:
        while data or self._more:
            self._started = True
            out = self._z.decompress(data, _MAX_STEP_OUTPUT)
            if self.kind == "gzip":
                data, self._more = self._z.unconsumed_tail, len(out) == _MAX_STEP_OUTPUT
            else:
                data, self._more = b"", not self._z.needs_input
            yield out
            if self._z.eof:
                data = self._z.unused_data + data
                self._z, self._started, self._more = self._fresh(), False, False
                if self.kind == "xz":
                    data = data.lstrip(b"\x00")  # stream padding between xz streams

    def finish(self) -> None:
        """Raises when the stream ended inside a member (a truncated download)."""
        if self.kind and self._started:
            raise ImageError(f"truncated {self.kind} stream")


class _StagingSink:
    """Writes a (possibly compressed) stream to a sparse file, enforcing a byte budget."""

    def __init__(self, path: Path, budget: int, volume: str) -> None:
        self.path, self.budget, self.volume = path, budget, volume
        self.received = 0
        self._head = b""
        self._dec: _Decompressor | None = None
        self._fh = path.open("wb")

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self._dec is None:
            self._head += data
            if len(self._head) < len(XZ_MAGIC):
                return
            data, self._head = self._head, b""
            self._dec = _Decompressor(compression_of(data))
        for piece in self._dec.feed(data):
            self._write(piece)

    def _write(self, piece: bytes) -> None:
        if not piece:
            return
        if piece.count(0) == len(piece):
            # holes keep raw images thin in the pool while they wait for conversion
            self._fh.seek(len(piece), os.SEEK_CUR)
        else:
            self._fh.write(piece)
            if _allocated(self.path) > self.budget:
                raise PoolFull(self.volume, _allocated(self.path), self.budget)

    def close(self) -> None:
        if self._dec is None:
            self._dec = _Decompressor(compression_of(self._head))
            for piece in self._dec.feed(self._head):
                self._write(piece)
        self._fh.truncate()
        self._fh.close()
        self._dec.finish()

    def abort(self) -> None:
        self._fh.close()


# --- the pool ---------------------------------------------------------------------------------


class Pool:
    """A directory of thin qcow2 volumes with an optional capacity in allocated bytes."""

    def __init__(self, root: Path, *, capacity_bytes: int | None = None) -> None:
        self.root = root.resolve()
        self.capacity_bytes = capacity_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    # --- naming and bookkeeping ---------------------------------------------------------------

    def path(self, namespace: str, name: str) -> Path:
        return self._confined(volume_stem(namespace, name) + ".qcow2")

    def sidecar(self, namespace: str, name: str) -> Path:
        return self._confined(volume_stem(namespace, name) + ".json")

    def _confined(self, filename: str) -> Path:
        path = (self.root / filename).resolve()
        if path.parent != self.root:
            raise InvalidVolumeName(f"volume file {filename!r} escapes the pool")
        return path

    def exists(self, namespace: str, name: str) -> bool:
        return self.path(namespace, name).is_file()

    def record(self, namespace: str, name: str) -> VolumeRecord:
        try:
            data = json.loads(self.sidecar(namespace, name).read_text())
        except FileNotFoundError:
            raise VolumeNotFound(f"volume {namespace}/{name} not found in the pool") from None
        return VolumeRecord(**data)

    def volumes(self) -> list[VolumeRecord]:
        records = []
        for sidecar in sorted(self.root.glob("*--*.json")):
            with contextlib.suppress(ValueError, TypeError, OSError):
                records.append(VolumeRecord(**json.loads(sidecar.read_text())))
        return records

    def delete(self, namespace: str, name: str) -> bool:
        """Removes a volume and its sidecar; False when there was nothing to remove."""
        removed = False
        for path in (self.path(namespace, name), self.sidecar(namespace, name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed = True
        return removed

    def discard_partials(self) -> list[Path]:
        """Removes the ``.part-`` files an interrupted write left (call at agent start)."""
        found = sorted(self.root.glob(".part-*"))
        for path in found:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return found

    def used_bytes(self) -> int:
        return sum(_allocated(p) for p in self.root.iterdir() if p.is_file())

    def free_bytes(self) -> int:
        """Bytes a new write may still allocate: the capacity left, bounded by the disk."""
        disk = shutil.disk_usage(self.root).free
        if self.capacity_bytes is None:
            return disk
        return max(0, min(disk, self.capacity_bytes - self.used_bytes()))

    @contextlib.contextmanager
    def staging(self, namespace: str, name: str, suffix: str = "") -> Iterator[Path]:
        """A temporary file in the pool (same filesystem, counted in use), removed on exit."""
        stem = volume_stem(namespace, name)
        path = self._confined(f".part-{stem}-{uuid.uuid4().hex[:8]}{suffix}")
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def incoming_path(self, namespace: str, name: str, tag: str) -> Path:
        """Where a live migration's copy of a volume grows before it belongs to this pool (not a
        ``.part-`` file: a running destination QEMU has it open across an agent restart)."""
        if not re.fullmatch(r"[a-z0-9]{1,16}", tag):
            raise InvalidVolumeName(f"invalid migration tag {tag!r}")
        return self._confined(f".migrating-{volume_stem(namespace, name)}-{tag}.qcow2")

    def incoming_files(self) -> list[Path]:
        return sorted(self.root.glob(".migrating-*"))

    def adopt_incoming(self, path: Path, record: VolumeRecord) -> Path:
        """Makes a migrated copy this pool's volume (replacing any stale one of that name)."""
        if path.parent != self.root or not path.name.startswith(".migrating-"):
            raise InvalidVolumeName(f"{path} is not a migration copy of this pool")
        self._commit(path, record)
        return self.path(record.namespace, record.name)

    def _require_absent(self, namespace: str, name: str) -> None:
        if self.exists(namespace, name):
            raise VolumeExists(f"volume {namespace}/{name} already exists in the pool")

    def _commit(self, part: Path, record: VolumeRecord) -> None:
        sidecar = self.sidecar(record.namespace, record.name)
        tmp = sidecar.with_name(f".part-{sidecar.name}")
        tmp.write_text(json.dumps(asdict(record), indent=1))
        os.replace(tmp, sidecar)
        os.replace(part, self.path(record.namespace, record.name))

    # --- operations ---------------------------------------------------------------------------

    async def info(self, namespace: str, name: str) -> VolumeInfo:
        path = self.path(namespace, name)
        if not path.is_file():
            raise VolumeNotFound(f"volume {namespace}/{name} not found in the pool")
        data = json.loads(await _run("info", "--output=json", "-U", "-f", "qcow2", str(path)))
        return VolumeInfo(_allocated(path), int(data["virtual-size"]), str(data["format"]))

    async def create_blank(
        self, namespace: str, name: str, size: int, *, owner_uid: str = ""
    ) -> VolumeInfo:
        """A thin qcow2 of ``size`` bytes (pools over-commit, but no volume outgrows the pool)."""
        self._require_absent(namespace, name)
        free = self.free_bytes()
        limit = self.capacity_bytes if self.capacity_bytes is not None else size
        if size > limit or free < _QCOW2_OVERHEAD:
            raise PoolFull(f"{namespace}/{name}", size, free)
        with self.staging(namespace, name, ".qcow2") as part:
            await _run("create", "-q", "-f", "qcow2", str(part), str(size))
            record = VolumeRecord(namespace, name, size, "qcow2", "blank", _now(), owner_uid)
            self._commit(part, record)
        return await self.info(namespace, name)

    async def import_file(
        self,
        namespace: str,
        name: str,
        src_path: Path,
        *,
        fmt: str | None = None,
        progress: Progress | None = None,
        source: str = "",
        min_size: int = 0,
        owner_uid: str = "",
    ) -> VolumeInfo:
        """Converts a local image (any supported format, maybe gz/xz) into a new volume."""
        self._require_absent(namespace, name)
        with src_path.open("rb") as fh:
            compressed = compression_of(fh.read(len(XZ_MAGIC)))
        if compressed:
            return await self.import_stream(
                namespace,
                name,
                _read_file(src_path),
                total=src_path.stat().st_size,
                progress=progress,
                source=source or str(src_path),
                min_size=min_size,
                owner_uid=owner_uid,
            )
        record = VolumeRecord(
            namespace, name, 0, "qcow2", source or str(src_path), _now(), owner_uid
        )
        return await self._convert(src_path, record, fmt=fmt, progress=progress, min_size=min_size)

    async def import_stream(
        self,
        namespace: str,
        name: str,
        chunks: AsyncIterable[bytes],
        *,
        total: int | None = None,
        progress: Progress | None = None,
        source: str = "",
        min_size: int = 0,
        owner_uid: str = "",
    ) -> VolumeInfo:
        """Stages a byte stream (decompressing it) in the pool, then converts it to a volume.

        Progress: the transfer counts for 90% when ``total`` is known, the conversion for the rest.
        """
        self._require_absent(namespace, name)
        volume = f"{namespace}/{name}"
        with self.staging(namespace, name, ".src") as staged:
            sink = _StagingSink(staged, self.free_bytes(), volume)
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(sink.feed, chunk)
                    if progress is not None and total:
                        progress(min(sink.received / total, 1.0) * _TRANSFER_SHARE)
                sink.close()
            except BaseException:
                sink.abort()
                raise
            share = _TRANSFER_SHARE if total else 0.0
            scaled = _scaled(progress, share) if progress is not None else None
            record = VolumeRecord(namespace, name, 0, "qcow2", source, _now(), owner_uid)
            return await self._convert(staged, record, progress=scaled, min_size=min_size)

    async def clone(
        self,
        source: tuple[str, str],
        namespace: str,
        name: str,
        *,
        progress: Progress | None = None,
        owner_uid: str = "",
    ) -> VolumeInfo:
        """A full copy of another pool volume (``source`` is its namespace and name)."""
        src = self.path(*source)
        if not src.is_file():
            raise VolumeNotFound(f"source volume {source[0]}/{source[1]} not found in the pool")
        self._require_absent(namespace, name)
        origin = f"pvc:{source[0]}/{source[1]}"
        record = VolumeRecord(namespace, name, 0, "qcow2", origin, _now(), owner_uid)
        return await self._convert(src, record, fmt="qcow2", progress=progress)

    async def _convert(
        self,
        src: Path,
        record: VolumeRecord,
        *,
        fmt: str | None = None,
        progress: Progress | None = None,
        min_size: int = 0,
    ) -> VolumeInfo:
        image = await probe(src, fmt)
        volume = f"{record.namespace}/{record.name}"
        needed, free = image.actual_size, self.free_bytes()
        if needed > free:
            raise PoolFull(volume, needed, free)
        with self.staging(record.namespace, record.name, ".qcow2") as part:
            await self._run_convert(src, part, image.format, volume, progress)
            size = image.virtual_size
            if min_size > size:
                await _run("resize", "-q", "-f", "qcow2", str(part), str(min_size))
                size = min_size
            final = VolumeRecord(**{**asdict(record), "virtual_size": size})
            self._commit(part, final)
        if progress is not None:
            progress(100.0)
        return await self.info(record.namespace, record.name)

    async def _run_convert(
        self, src: Path, dest: Path, fmt: str, volume: str, progress: Progress | None
    ) -> None:
        argv = ["convert", "-p", "-U", "-f", fmt, "-O", "qcow2", str(src), str(dest)]
        proc = await asyncio.create_subprocess_exec(
            QEMU_IMG, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stderr is not None
        watcher = asyncio.create_task(self._watch_capacity(proc, dest))
        try:
            stderr_task = asyncio.create_task(proc.stderr.read())
            async for percent in _progress_stream(proc.stdout):
                if progress is not None:
                    progress(percent)
            err = (await stderr_task).decode(errors="replace").strip()
            code = await proc.wait()
        finally:
            watcher.cancel()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        over = watcher.done() and not watcher.cancelled() and watcher.result()
        if over or "No space left on device" in err:
            raise PoolFull(volume, _allocated(dest), self.free_bytes())
        if code != 0:
            raise ImageError(f"qemu-img convert failed: {err}")

    async def _watch_capacity(self, proc: asyncio.subprocess.Process, dest: Path) -> bool:
        """Kills the conversion once the pool is over capacity; True when it did."""
        if self.capacity_bytes is None:
            return False
        while proc.returncode is None:
            if self.used_bytes() > self.capacity_bytes:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return True
            await asyncio.sleep(_WATCH_INTERVAL)
        return False


async def _progress_stream(stdout: asyncio.StreamReader) -> AsyncIterator[float]:
    pending = b""
    while chunk := await stdout.read(4096):
        # a report may straddle two reads: only complete ones (ended by \r) are parsed
        *done, pending = (pending + chunk).split(b"\r")
        for percent in parse_progress(b"\r".join(done)):
            yield percent
    for percent in parse_progress(pending):
        yield percent


def _scaled(progress: Progress, offset: float) -> Progress:
    """Maps a 0 to 100 progress onto ``offset`` to 100."""
    span = 100.0 - offset
    return lambda percent: progress(offset + percent * span / 100.0)


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, _CHUNK):
            yield chunk
