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
import fcntl
import json
import logging
import lzma
import os
import re
import shutil
import uuid
import zlib
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
)
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmo.engine.storage import qemu_img

log = logging.getLogger(__name__)

Progress = Callable[[float], None]
"""Receives the percentage done, 0.0 to 100.0."""

# A volume's name is a link to its top layer; layers (qcow2, backing files named relative to
# their own directory) and snapshot records live beside the volumes.
LAYERS = ".layers"
SNAPSHOTS = ".snapshots"
_LOCK = ".lock"
_LOCK_POLL = 0.01
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


class SnapshotNotFound(PoolError):
    pass


class SnapshotExists(PoolError):
    pass


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
class SnapshotRecord:
    """A volume snapshot: a read-only layer of ``volume``'s chain, as it was at ``created``."""

    namespace: str
    name: str
    volume: str
    layer: str
    virtual_size: int
    created: str
    owner_uid: str = ""


@dataclass(frozen=True)
class LayerInfo:
    """One file of the pool's layer graph, for reports (``vmo storage``)."""

    name: str
    backing: str | None
    real_size: int
    virtual_size: int
    volumes: tuple[str, ...]  # "<ns>/<name>" of volumes whose top this is
    snapshots: tuple[str, ...]  # "<ns>/<name>" of snapshots this layer holds
    children: tuple[str, ...]  # layers standing on this one


def qcow2_header(path: Path) -> tuple[int, str | None]:
    """(virtual size, backing file name or None) from a qcow2 header, without qemu-img."""
    with path.open("rb") as fh:
        head = fh.read(32)
        if len(head) < 32 or head[:4] != b"QFI\xfb":
            raise ImageError(f"{path.name} is not a qcow2 image")
        offset = int.from_bytes(head[8:16], "big")
        length = int.from_bytes(head[16:20], "big")
        size = int.from_bytes(head[24:32], "big")
        if not offset or not length:
            return size, None
        fh.seek(offset)
        return size, fh.read(length).decode(errors="replace")


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


async def _run(argv: list[str]) -> bytes:
    """Runs a ``qemu_img`` argv; its output, or ImageError with qemu-img's message."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise ImageError(f"qemu-img {argv[1]} failed: {err.decode(errors='replace').strip()}")
    return out


async def _unwritten(layer: Path) -> bool:
    """True when the qcow2 ``layer`` holds no data of its own (everything reads from below)."""
    extents = json.loads(await _run(qemu_img.map_extents(layer)))
    return all(int(e.get("depth", 0)) > 0 for e in extents)


async def probe(path: Path, fmt: str | None = None) -> SourceImage:
    """Format and sizes of an image, refusing what would read files other than ``path``."""
    info: dict[str, Any] = json.loads(await _run(qemu_img.info(path, fmt=fmt or None)))
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
                # what follows the member: for gzip, unused_data already holds the unconsumed
                # tail too (adding it again would repeat bytes)
                data = self._z.unused_data if self.kind == "gzip" else self._z.unused_data + data
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
        self.layers_dir = self.root / LAYERS
        self.snapshots_dir = self.root / SNAPSHOTS
        self.layers_dir.mkdir(exist_ok=True)
        self.snapshots_dir.mkdir(exist_ok=True)

    # --- naming and bookkeeping ---------------------------------------------------------------

    def path(self, namespace: str, name: str) -> Path:
        return self._confined(volume_stem(namespace, name) + ".qcow2")

    def sidecar(self, namespace: str, name: str) -> Path:
        return self._confined(volume_stem(namespace, name) + ".json")

    def _confined(self, filename: str, directory: Path | None = None) -> Path:
        # normalised, not resolved: a volume's name is a link to its top layer
        parent = directory or self.root
        path = Path(os.path.normpath(parent / filename))
        if path.parent != parent:
            raise InvalidVolumeName(f"volume file {filename!r} escapes the pool")
        return path

    def exists(self, namespace: str, name: str) -> bool:
        return self.path(namespace, name).is_file()

    def top(self, namespace: str, name: str) -> Path:
        """The file a volume's writes go to (its top layer): what QEMU must be given, by this
        name, so that QEMU reopening a layer by name never lands on another one."""
        path = self.path(namespace, name)
        if not path.is_file():
            raise VolumeNotFound(f"volume {namespace}/{name} not found in the pool")
        return path.resolve()

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
        """Removes a volume and its sidecar; False when there was nothing to remove. Its layers
        go too, except those a snapshot or another volume (a linked clone) still stands on."""
        removed = False
        for path in (self.path(namespace, name), self.sidecar(namespace, name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed = True
        if removed:
            self.collect()
        return removed

    def discard_partials(self) -> list[Path]:
        """Removes the ``.part-`` files an interrupted write left, and the layers nothing holds
        any more (call at agent start); what it removed."""
        found = sorted(
            path
            for directory in (self.root, self.layers_dir, self.snapshots_dir)
            for path in directory.glob(".part-*")
        )
        for path in found:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return found + [self.layers_dir / name for name in self.collect()]

    def used_bytes(self) -> int:
        """Bytes allocated by the pool's files: each layer once (volume names are links to
        layers and are not followed; a file with two names counts once)."""
        seen: dict[tuple[int, int], int] = {}
        for directory in (self.root, self.layers_dir, self.snapshots_dir):
            with os.scandir(directory) as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):
                        if entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
        return sum(seen.values())

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
        return self.top(record.namespace, record.name)

    def _require_absent(self, namespace: str, name: str) -> None:
        if self.exists(namespace, name):
            raise VolumeExists(f"volume {namespace}/{name} already exists in the pool")

    def _commit(self, part: Path, record: VolumeRecord) -> None:
        """Makes a finished file the volume's only layer (replacing a volume of that name)."""
        self._write_sidecar(record)
        layer = self.new_layer_path()
        # The name points at the layer before the layer exists: a collection running meanwhile
        # (another process) never sees it unreferenced.
        replaced = self._point(record.namespace, record.name, layer)
        os.replace(part, layer)
        if replaced:
            self.collect()

    def _write_sidecar(self, record: VolumeRecord) -> None:
        sidecar = self.sidecar(record.namespace, record.name)
        tmp = sidecar.with_name(f".part-{sidecar.name}")
        tmp.write_text(json.dumps(asdict(record), indent=1))
        os.replace(tmp, sidecar)

    # --- operations ---------------------------------------------------------------------------

    async def info(self, namespace: str, name: str) -> VolumeInfo:
        path = self.path(namespace, name)
        if not path.is_file():
            raise VolumeNotFound(f"volume {namespace}/{name} not found in the pool")
        data = json.loads(await _run(qemu_img.info(path, fmt="qcow2")))
        return VolumeInfo(_allocated(path), int(data["virtual-size"]), str(data["format"]))

    async def resize(self, namespace: str, name: str, size: int, *, offline: bool) -> None:
        """Grows a volume to ``size`` bytes: its top layer with ``qemu-img resize`` when
        ``offline`` (no QEMU has it open), else only the record (QEMU's ``block_resize`` grew the
        image); never shrinks."""
        record = self.record(namespace, name)
        if size <= record.virtual_size:
            return
        if offline:
            async with self._locked():
                await _run(qemu_img.resize(self.top(namespace, name), size))
        self._write_sidecar(replace(record, virtual_size=size))

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
            await _run(qemu_img.create(part, size))
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
        top = self.top(*source)
        size = qcow2_header(top)[0]
        record = VolumeRecord(namespace, name, size, "qcow2", origin, _now(), owner_uid)
        # the source's whole chain, flattened (its layers have backing files of this pool)
        await self._flatten(top, record, progress)
        if progress is not None:
            progress(100.0)
        return await self.info(namespace, name)

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
                await _run(qemu_img.resize(part, min_size))
                size = min_size
            final = VolumeRecord(**{**asdict(record), "virtual_size": size})
            self._commit(part, final)
        if progress is not None:
            progress(100.0)
        return await self.info(record.namespace, record.name)

    async def _run_convert(
        self, src: Path, dest: Path, fmt: str, volume: str, progress: Progress | None
    ) -> None:
        argv = qemu_img.convert(src, dest, source_fmt=fmt, target_fmt="qcow2", progress=True)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
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

    # --- layers -------------------------------------------------------------------------------

    def new_layer_path(self) -> Path:
        return self.layers_dir / f"{uuid.uuid4().hex}.qcow2"

    def _point(self, namespace: str, name: str, layer: Path) -> bool:
        """Points the volume's name at ``layer`` (atomically); True when it replaced something."""
        link = self.path(namespace, name)
        existed = os.path.lexists(link)
        tmp = self._confined(f".part-link-{uuid.uuid4().hex[:8]}")
        os.symlink(f"{LAYERS}/{layer.name}", tmp)
        os.replace(tmp, link)
        return existed

    def _layer(self, name: str) -> Path:
        return self._confined(name, self.layers_dir)

    def backing_of(self, layer: Path) -> Path | None:
        """The file ``layer`` stands on (names are relative to the layer's directory)."""
        try:
            _, backing = qcow2_header(layer)
        except (OSError, ImageError):
            return None
        if backing is None:
            return None
        return Path(os.path.normpath(layer.parent / backing))

    def chain(self, path: Path) -> list[Path]:
        """``path`` (resolved) and every file under it, top first."""
        files: list[Path] = []
        current: Path | None = path.resolve()
        while current is not None and current not in files and current.is_file():
            files.append(current)
            current = self.backing_of(current)
        return files

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The pool's layer lock (flock: held across Pool objects and processes on this pool).
        Layers are collected before it is released: ``collect`` calls skipped meanwhile (it
        does not wait for the lock) are caught up."""
        fd = os.open(self.layers_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL)
            try:
                yield
            finally:
                self._collect_locked()
        finally:
            os.close(fd)

    def _layering(self, namespace: str, name: str) -> Path:
        """The volume's top layer; a plain-file volume becomes a one-layer volume first (a hard
        link, so a QEMU holding the file keeps writing to the same inode)."""
        link = self.path(namespace, name)
        if link.is_symlink() and link.is_file():
            return link.resolve()
        if not link.is_file():
            raise VolumeNotFound(f"volume {namespace}/{name} not found in the pool")
        layer = self.new_layer_path()
        os.link(link, layer)
        self._point(namespace, name, layer)
        return layer

    def _volume_tops(self) -> dict[str, list[str]]:
        """Layer file name -> the volumes (``ns/name``) whose top it is."""
        tops: dict[str, list[str]] = {}
        for entry in self.root.glob("*--*.qcow2"):
            if entry.is_symlink():
                target = entry.resolve()
                if target.parent == self.layers_dir:
                    ns, _, name = entry.stem.partition("--")
                    tops.setdefault(target.name, []).append(f"{ns}/{name}")
        return tops

    def _graph(self) -> tuple[dict[str, str | None], dict[str, list[str]]]:
        """(layer -> the layer under it, layer -> layers standing on it) for the pool's layers."""
        parent: dict[str, str | None] = {}
        for layer in self.layers_dir.glob("*.qcow2"):
            backing = self.backing_of(layer)
            inside = backing is not None and backing.parent == self.layers_dir
            parent[layer.name] = backing.name if inside and backing is not None else None
        children: dict[str, list[str]] = {name: [] for name in parent}
        for name, under in parent.items():
            if under is not None:
                children.setdefault(under, []).append(name)
        return parent, children

    def collect(self) -> list[str]:
        """Removes the layers nothing needs (no volume, snapshot or other layer on them);
        returns their names. Skipped (left to the next call) while another writer holds the
        layer lock."""
        fd = os.open(self.layers_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []
            return self._collect_locked()
        finally:
            os.close(fd)

    def _collect_locked(self) -> list[str]:
        removed: list[str] = []
        while True:
            parent, children = self._graph()
            held = self._held()
            loose = [n for n in parent if n not in held and not children.get(n)]
            if not loose:
                return removed
            for name in loose:
                with contextlib.suppress(FileNotFoundError):
                    self._layer(name).unlink()
                removed.append(name)

    def _held(self) -> set[str]:
        """Layers a volume or a snapshot holds by name."""
        return set(self._volume_tops()) | {r.layer for r in self.snapshots()}

    def merges(self, in_use: Collection[Path] = ()) -> list[tuple[Path, Path]]:
        """(layer, the one layer on it) pairs where the layer is no longer needed by itself (no
        volume or snapshot holds it) and can be merged into its child. ``in_use``: files a
        running QEMU has open; pairs touching those are merged live by the caller."""
        del in_use  # every pair is reported; the caller splits live from offline
        parent, children = self._graph()
        held = self._held()
        return [
            (self._layer(name), self._layer(children[name][0]))
            for name in parent
            if name not in held and len(children.get(name) or []) == 1
        ]

    def open_chains(self, tops: Collection[Path]) -> set[Path]:
        """Every file in the chains of ``tops`` (what running QEMUs have open)."""
        files: set[Path] = set()
        for top in tops:
            files.update(self.chain(top))
        return files

    async def merge_offline(self, in_use: Collection[Path] = ()) -> int:
        """Merges every mergeable layer whose chain no QEMU has open into the layer above it
        (``qemu-img rebase`` in safe mode copies what the child needs), then deletes it. Returns
        the number merged; chains stay as long as their snapshots, not their history."""
        merged = 0
        busy = self.open_chains(in_use)
        async with self._locked():
            while True:
                pairs = [(a, b) for a, b in self.merges() if a not in busy and b not in busy]
                if not pairs:
                    break
                layer, child = pairs[0]
                under = self.backing_of(layer)
                # safe mode: the child first gets every cluster that reading through the layer
                # gave it, then names the layer's backing file (relative, as the pool writes)
                if under is None:
                    argv = qemu_img.rebase(child, backing="")
                else:
                    backing = os.path.relpath(under, child.parent)
                    argv = qemu_img.rebase(child, backing=backing, backing_fmt="qcow2")
                await _run(argv)
                layer.unlink()
                merged += 1
        return merged

    # --- snapshots ----------------------------------------------------------------------------

    def _snapshot_file(self, namespace: str, name: str) -> Path:
        return self._confined(volume_stem(namespace, name) + ".json", self.snapshots_dir)

    def snapshots(self) -> list[SnapshotRecord]:
        records = []
        for path in sorted(self.snapshots_dir.glob("*--*.json")):
            with contextlib.suppress(ValueError, TypeError, OSError):
                records.append(SnapshotRecord(**json.loads(path.read_text())))
        return records

    def has_snapshot(self, namespace: str, name: str) -> bool:
        return self._snapshot_file(namespace, name).is_file()

    def snapshot_record(self, namespace: str, name: str) -> SnapshotRecord:
        try:
            data = json.loads(self._snapshot_file(namespace, name).read_text())
        except FileNotFoundError:
            raise SnapshotNotFound(f"volume snapshot {namespace}/{name} not found") from None
        return SnapshotRecord(**data)

    def snapshot_path(self, namespace: str, name: str) -> Path:
        """The snapshot's read-only layer (a qcow2 whose backing chain is in the pool)."""
        return self._layer(self.snapshot_record(namespace, name).layer)

    async def snapshot(
        self,
        namespace: str,
        volume: str,
        name: str,
        *,
        owner_uid: str = "",
        switch: Callable[[Path, Path], Awaitable[None]] | None = None,
    ) -> SnapshotRecord:
        """Freezes the volume's current top as snapshot ``name`` and gives the volume a fresh,
        empty top layer on it: constant time whatever the disk's size.

        ``switch(old_top, new_top)`` moves a running QEMU onto the new top before the volume's
        name does (a live snapshot); when it raises, nothing changed.
        """
        target = self._snapshot_file(namespace, name)
        async with self._locked():
            if target.exists():
                raise SnapshotExists(f"volume snapshot {namespace}/{name} already exists")
            current = self._layering(namespace, volume)
            size, _ = qcow2_header(current)
            under = self.backing_of(current)
            if (
                switch is None
                and under is not None
                and under.parent == self.layers_dir
                and qcow2_header(under)[0] == size
                and await _unwritten(current)
            ):
                # nothing written since the layer under the top was frozen: the snapshot is
                # that layer, and the chain does not grow (clones of an idle golden VM share it)
                return self._record_snapshot(
                    SnapshotRecord(namespace, name, volume, under.name, size, _now(), owner_uid)
                )
            new = await self._overlay_on(current, size)
            # The name moves first: should this process die after QEMU switched, the volume
            # names the layer QEMU writes (before it, the new top is empty and reads through).
            self._point(namespace, volume, new)
            try:
                if switch is not None:
                    await switch(current, new)
            except BaseException:
                self._point(namespace, volume, current)
                new.unlink(missing_ok=True)
                raise
            record = SnapshotRecord(namespace, name, volume, current.name, size, _now(), owner_uid)
            return self._record_snapshot(record)

    def _record_snapshot(self, record: SnapshotRecord) -> SnapshotRecord:
        target = self._snapshot_file(record.namespace, record.name)
        tmp = target.with_name(f".part-{target.name}")
        tmp.write_text(json.dumps(asdict(record), indent=1))
        os.replace(tmp, target)
        return record

    async def delete_snapshot(self, namespace: str, name: str) -> bool:
        """Forgets the snapshot; its layer stays while a volume or clone stands on it (merged
        away by ``merge_offline``/a live merge, or collected once nothing does)."""
        path = self._snapshot_file(namespace, name)
        async with self._locked():
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        return True

    async def restore(self, namespace: str, volume: str, snapshot: str) -> VolumeInfo:
        """Puts the volume back to the snapshot (of this pool): a fresh top on its layer; what
        was written since goes (unless another snapshot keeps it)."""
        record = self.snapshot_record(namespace, snapshot)
        if not self.exists(namespace, volume):
            raise VolumeNotFound(f"volume {namespace}/{volume} not found in the pool")
        async with self._locked():
            new = await self._overlay_on(self._layer(record.layer), record.virtual_size)
            self._point(namespace, volume, new)
        return await self.info(namespace, volume)

    async def _overlay_on(self, layer: Path, size: int) -> Path:
        """A new, empty layer on ``layer`` (call with the lock held: it is unreferenced)."""
        new = self.new_layer_path()
        try:
            size = max(size, qcow2_header(layer)[0])
            await _run(qemu_img.create(new, size, backing=layer.name, unsafe=True))
        except BaseException:
            new.unlink(missing_ok=True)
            raise
        return new

    async def volume_from_snapshot(
        self,
        source: Pool,
        snapshot: tuple[str, str],
        namespace: str,
        name: str,
        *,
        full: bool = False,
        min_size: int = 0,
        owner_uid: str = "",
        progress: Progress | None = None,
    ) -> VolumeInfo:
        """A new volume with the snapshot's content: a linked clone (an empty layer on the
        snapshot's, copy-on-write) when the snapshot is in this pool, else (or with ``full``) an
        independent copy."""
        record = source.snapshot_record(*snapshot)
        self._require_absent(namespace, name)
        origin = f"snapshot:{snapshot[0]}/{snapshot[1]}"
        size = max(record.virtual_size, min_size)
        volume = VolumeRecord(namespace, name, size, "qcow2", origin, _now(), owner_uid)
        if full or source.root != self.root:
            await self._flatten(source.snapshot_path(*snapshot), volume, progress)
        else:
            async with self._locked():
                self._require_absent(namespace, name)
                new = await self._overlay_on(self._layer(record.layer), size)
                self._write_sidecar(volume)
                self._point(namespace, name, new)
        if progress is not None:
            progress(100.0)
        return await self.info(namespace, name)

    async def _flatten(self, layer: Path, record: VolumeRecord, progress: Progress | None) -> None:
        """A new one-layer volume with what reading ``layer`` (a pool layer: its chain is the
        pool's own, so its backing file is trusted) gives."""
        volume = f"{record.namespace}/{record.name}"
        needed, free = sum(_allocated(f) for f in self.chain(layer)), self.free_bytes()
        if needed > free:
            raise PoolFull(volume, needed, free)
        with self.staging(record.namespace, record.name, ".qcow2") as part:
            await self._run_convert(layer, part, "qcow2", volume, progress)
            if record.virtual_size > qcow2_header(part)[0]:
                await _run(qemu_img.resize(part, record.virtual_size))
            self._commit(part, record)

    def layers(self) -> list[LayerInfo]:
        parent, children = self._graph()
        tops = self._volume_tops()
        snaps: dict[str, list[str]] = {}
        for record in self.snapshots():
            snaps.setdefault(record.layer, []).append(f"{record.namespace}/{record.name}")
        out = []
        for name in sorted(parent):
            path = self._layer(name)
            with contextlib.suppress(OSError, ImageError):
                size, _ = qcow2_header(path)
                out.append(
                    LayerInfo(
                        name, parent[name], _allocated(path), size, tuple(tops.get(name, ())),
                        tuple(snaps.get(name, ())), tuple(children.get(name, ())),
                    )
                )  # fmt: skip
        return out


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
