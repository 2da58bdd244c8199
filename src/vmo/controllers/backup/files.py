"""Files out of a backup, without restoring its disk: partitions and filesystems read in place.

A backed-up disk is a list of chunk ids. ``ChunkFile`` is a read-only, seekable file over that
list that fetches (and checks, and caches a few of) only the chunks a read touches, so that
reading a guest's ``/etc/hosts`` costs a handful of chunks, not the disk. The partition tables
(MBR, GPT) and the filesystems (ext2/3/4, FAT12/16/32) are parsed by Fox-IT's ``dissect``
libraries (``dissect.volume``, ``dissect.extfs``, ``dissect.fat``), pure-Python readers that
take any file object; nothing is mounted and no kernel driver, loop device or FUSE is needed.
A damaged chunk fails the read (``DamagedChunk``): a file is never returned silently wrong.

dissect is synchronous; ``BackupFiles`` runs it in a worker thread, fetching chunks from the
repository's own event loop.
"""

from __future__ import annotations

import asyncio
import io
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, BinaryIO, Protocol, TypeVar

from dissect.extfs import ExtFS
from dissect.fat import FATFS
from dissect.volume import disk as dissect_disk

from vmo.controllers.backup.repository import (
    ZERO,
    DamagedChunk,
    DiskIndex,
    Repository,
    RepositoryError,
)

Fetch = Callable[[bytes], bytes]
T = TypeVar("T")
CACHE_CHUNKS = 16
# partition types that only hold other partitions (MBR extended containers)
_CONTAINERS = {0x05, 0x0F, 0x85}


class FileRestoreError(RepositoryError):
    """A path, partition or filesystem in a backup that cannot be read; the message names it."""


# errors that mean the backup is unreadable, never "not this filesystem"
_FATAL = (DamagedChunk, FileRestoreError)


class ChunkFile(io.RawIOBase):
    """The disk of ``index`` as a read-only file; reads fetch only the chunks they touch."""

    def __init__(self, index: DiskIndex, fetch: Fetch, *, cache: int = CACHE_CHUNKS) -> None:
        super().__init__()
        self.index = index
        self._fetch = fetch
        self._pos = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._limit = cache
        self._lock = threading.Lock()
        self.fetched = 0  # chunks fetched from the repository (zero chunks are not fetched)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.index.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def _chunk(self, i: int) -> bytes:
        with self._lock:
            hit = self._cache.get(i)
            if hit is not None:
                self._cache.move_to_end(i)
                return hit
        cs = self.index.chunk_size
        length = min(cs, self.index.size - i * cs)
        digest = self.index.digests[i]
        if digest == ZERO:
            return bytes(length)
        data = self._fetch(digest)
        if len(data) != length:
            raise FileRestoreError(f"chunk {i} of disk {self.index.name} holds {len(data)} bytes")
        with self._lock:
            self.fetched += 1
            self._cache[i] = data
            while len(self._cache) > self._limit:
                self._cache.popitem(last=False)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), max(self.index.size - self._pos, 0))
        done = 0
        cs = self.index.chunk_size
        while done < want:
            i, skip = divmod(self._pos, cs)
            data = self._chunk(i)
            n = min(len(data) - skip, want - done)
            view[done : done + n] = data[skip : skip + n]
            done += n
            self._pos += n
        return done


# --- filesystems ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One file or directory, as ``ls -l`` would show it."""

    name: str
    kind: str  # "file", "dir", "link" or "other"
    size: int
    mtime: datetime | None
    mode: int | None = None  # permission bits, where the filesystem keeps them
    target: str = ""  # a symbolic link's target


class Filesystem(Protocol):
    fstype: str
    label: str

    def stat(self, path: str) -> Entry: ...

    def listdir(self, path: str) -> list[Entry]: ...

    def open(self, path: str) -> BinaryIO: ...


def _missing(path: str) -> FileRestoreError:
    return FileRestoreError(f"{path}: no such file or directory in the backup")


class _Ext:
    fstype = "ext4"

    def __init__(self, fh: BinaryIO) -> None:
        self.fs = ExtFS(fh)
        self.label = str(getattr(self.fs, "volume_name", "") or "")

    def _node(self, path: str) -> Any:
        try:
            return self.fs.get(path)
        except (FileNotFoundError, NotADirectoryError):
            raise _missing(path) from None

    def _entry(self, name: str, node: Any) -> Entry:
        mode = int(node.inode.i_mode)
        kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link"}.get(
            stat.S_IFMT(mode), "other"
        )
        target = str(node.link) if kind == "link" else ""
        return Entry(name, kind, int(node.size), node.mtime, stat.S_IMODE(mode), target)

    def stat(self, path: str) -> Entry:
        return self._entry(PurePosixPath(path).name or "/", self._node(path))

    def listdir(self, path: str) -> list[Entry]:
        node = self._node(path)
        if self._entry("", node).kind != "dir":
            raise FileRestoreError(f"{path}: not a directory")
        items = node.listdir().items()
        return [self._entry(n, child) for n, child in sorted(items) if n not in (".", "..")]

    def open(self, path: str) -> BinaryIO:
        node = self._node(path)
        if self._entry("", node).kind != "file":
            raise FileRestoreError(f"{path}: not a regular file")
        return node.open()  # type: ignore[no-any-return]


class _Fat:
    fstype = "fat"

    def __init__(self, fh: BinaryIO) -> None:
        self.fs = FATFS(fh)
        self.label = str(getattr(self.fs, "volume_label", "") or "").strip()

    def _node(self, path: str) -> Any:
        try:
            return self.fs.get(path)
        except (FileNotFoundError, NotADirectoryError):
            raise _missing(path) from None

    @staticmethod
    def _entry(name: str, node: Any) -> Entry:
        is_dir = node.is_directory()
        size = 0 if is_dir else int(node.size)
        return Entry(name, "dir" if is_dir else "file", size, getattr(node, "mtime", None))

    def stat(self, path: str) -> Entry:
        node = self._node(path)
        return self._entry(PurePosixPath(path).name or "/", node)

    def listdir(self, path: str) -> list[Entry]:
        node = self._node(path)
        if not node.is_directory():
            raise FileRestoreError(f"{path}: not a directory")
        children = [c for c in node.iterdir() if not c.is_volume_id()]  # the label is no file
        return sorted((self._entry(c.name, c) for c in children), key=lambda e: e.name)

    def open(self, path: str) -> BinaryIO:
        node = self._node(path)
        if node.is_directory():
            raise FileRestoreError(f"{path}: not a regular file")
        return node.open()  # type: ignore[no-any-return]


_READERS: tuple[Callable[[BinaryIO], Filesystem], ...] = (_Ext, _Fat)


def _filesystem(fh: BinaryIO) -> Filesystem | None:
    for reader in _READERS:
        try:
            fh.seek(0)
            return reader(fh)
        except _FATAL:
            raise
        except Exception:  # dissect raises its own errors for "not this fs"
            continue
    return None


@dataclass
class Volume:
    """A partition (``number`` from 1) or the whole disk (``number`` 0), and its filesystem."""

    number: int
    offset: int
    size: int
    fs: Filesystem | None

    @property
    def fstype(self) -> str:
        return self.fs.fstype if self.fs is not None else "unknown"


def volumes(fh: ChunkFile) -> list[Volume]:
    """The partitions of the disk (MBR or GPT) and their filesystems; the whole disk as volume 0
    when it has no partition table."""
    try:
        table = dissect_disk.Disk(fh)
        parts = [p for p in table.partitions if p.type not in _CONTAINERS and p.size > 0]
    except _FATAL:
        raise
    except Exception:  # "no partition scheme" is an exception in dissect
        parts = []
    if not parts:
        fh.seek(0)
        return [Volume(0, 0, fh.index.size, _filesystem(fh))]  # type: ignore[arg-type]
    out = []
    for p in parts:
        stream: Any = p.open()
        out.append(Volume(int(p.number), int(p.offset), int(p.size), _filesystem(stream)))
    return out


def pick(vols: list[Volume], path: str, number: int | None) -> Volume:
    """The volume ``number`` names, else the only readable one holding ``path``."""
    readable = [v for v in vols if v.fs is not None]
    if number is not None:
        for v in vols:
            if v.number == number:
                if v.fs is None:
                    raise FileRestoreError(
                        f"partition {number} holds no filesystem VMO reads (ext2/3/4, FAT)"
                    )
                return v
        raise FileRestoreError(
            f"partition {number} not found: the disk has {', '.join(str(v.number) for v in vols)}"
        )
    if not readable:
        raise FileRestoreError("the disk holds no filesystem VMO reads (ext2/3/4, FAT)")
    if len(readable) == 1:
        return readable[0]
    holding = []
    for v in readable:
        try:
            v.fs.stat(path)  # type: ignore[union-attr]
            holding.append(v)
        except FileRestoreError:
            continue
    if len(holding) == 1:
        return holding[0]
    if not holding:
        where = ", ".join(str(v.number) for v in readable)
        raise FileRestoreError(f"{path}: no such file or directory in partitions {where}")
    where = ", ".join(str(v.number) for v in holding)
    raise FileRestoreError(f"{path} is in partitions {where}: pass --partition")


def walk(fs: Filesystem, path: str) -> Iterator[tuple[str, Entry]]:
    """Every entry under ``path`` (itself first), depth first, with its path."""
    top = fs.stat(path)
    yield path, top
    if top.kind == "dir":
        for child in fs.listdir(path):
            yield from walk(fs, str(PurePosixPath(path) / child.name))


class BackupFiles:
    """A backed-up disk to browse from async code: ``await files.run(fn)`` calls ``fn(volumes)``
    in a worker thread, where reads fetch chunks through the repository."""

    def __init__(self, repo: Repository, index: DiskIndex) -> None:
        self.repo = repo
        self.index = index
        self.file: ChunkFile | None = None

    def _fetcher(self, loop: asyncio.AbstractEventLoop) -> Fetch:
        if self.repo.local:
            return self.repo.load_chunk_blocking

        def fetch(digest: bytes) -> bytes:
            return asyncio.run_coroutine_threadsafe(self.repo.get_chunk(digest), loop).result()

        return fetch

    async def run(self, fn: Callable[[list[Volume]], T]) -> T:
        self.file = ChunkFile(self.index, self._fetcher(asyncio.get_running_loop()))
        file = self.file

        def go() -> T:
            return fn(volumes(file))

        return await asyncio.to_thread(go)


__all__ = [
    "BackupFiles",
    "ChunkFile",
    "Entry",
    "FileRestoreError",
    "Filesystem",
    "Volume",
    "pick",
    "volumes",
    "walk",
]
