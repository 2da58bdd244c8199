"""Backing up one disk into a repository, and restoring it, chunk by chunk.

A disk is cut into the repository's fixed-size chunks. A full backup reads every chunk the
source does not already know to be zero; an incremental one reads only the chunks that the
changed ranges (a QEMU dirty bitmap's extents) touch, and copies every other chunk's id from the
backup before it, so that unchanged data is neither read nor hashed, and each backup's index
still lists the whole disk. A chunk whose id the repository already has is not sent again,
whichever disk or VM it came from.

Reading, hashing, compressing and sealing run on a few worker threads (hashlib, zstd and AES
release the GIL), and uploads overlap them; the index is kept in memory (32 bytes per chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import mmap
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vmo.controllers.backup.repository import ZERO, DiskIndex, Repository, RepositoryError
from vmo.controllers.backup.stores import early_writeback

WORKERS = 4
# a local restore's threads mostly wait for the disk: more of them keep it busier
RESTORE_WORKERS = 8
DIRECT_ALIGN = 4096  # O_DIRECT's offset and length alignment (the logical block size at most)
Extent = tuple[int, int]  # (offset, length) in bytes
Progress = Callable[[int], None]  # bytes of the disk done since the last call


class Source(Protocol):
    """What a backup reads a disk from (a file, an NBD export of a running guest's disk)."""

    size: int

    async def read(self, offset: int, length: int) -> bytes: ...

    async def zero_extents(self) -> list[Extent]:
        """Ranges known to read as zeros (unallocated), which need not be read; may be []."""
        ...


class Target(Protocol):
    size: int

    async def write(self, offset: int, data: bytes) -> None: ...

    async def write_zeros(self, offset: int, length: int) -> None: ...


class FileSource:
    """A raw disk image file (or block device)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(os.pread, self.fd, length, offset)

    def read_blocking(self, offset: int, length: int) -> bytes:
        """For a worker thread that hashes what it read without going back to the loop."""
        return os.pread(self.fd, length, offset)

    async def zero_extents(self) -> list[Extent]:
        """The file's holes (SEEK_HOLE / SEEK_DATA): a sparse image's unwritten ranges."""
        holes: list[Extent] = []
        offset = 0
        with contextlib.suppress(OSError):
            while offset < self.size:
                hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
                if hole >= self.size:
                    break
                try:
                    data = os.lseek(self.fd, hole, os.SEEK_DATA)
                except OSError:  # ENXIO: a hole to the end
                    data = self.size
                holes.append((hole, data - hole))
                offset = data
        return holes

    def close(self) -> None:
        os.close(self.fd)


class FileTarget:
    """A raw file restored into: created sparse at the disk's size, or overwritten in place.

    Whole aligned chunks are written with ``O_DIRECT`` where the filesystem allows it (copied
    first into a page-aligned buffer of the target's own): the data goes to the disk without
    passing through the page cache, which on this machine costs a third of a restore's CPU and
    leaves the final fsync nothing to wait for. A chunk that is not aligned (the last one of an
    odd-sized disk) and every write on a filesystem without ``O_DIRECT`` (tmpfs) go through the
    page cache, written out as they come (``early_writeback``)."""

    def __init__(self, path: Path, size: int, *, fresh: bool) -> None:
        self.path, self.size = path, size
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if fresh else 0)
        self.fd = os.open(path, flags, 0o600)
        self.fresh = fresh
        self.direct: int | None = None
        try:
            os.ftruncate(self.fd, size)
            with contextlib.suppress(OSError):  # EINVAL: the filesystem has no O_DIRECT
                self.direct = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        except BaseException:
            os.close(self.fd)
            raise
        self._buffers: list[mmap.mmap] = []
        self._lock = threading.Lock()

    async def write(self, offset: int, data: bytes) -> None:
        await asyncio.to_thread(self.write_blocking, offset, data)

    def write_blocking(self, offset: int, data: bytes) -> None:
        length = len(data)
        if self.direct is None or offset % DIRECT_ALIGN or length % DIRECT_ALIGN:
            os.pwrite(self.fd, data, offset)
            return
        with self._lock:
            buffer = self._buffers.pop() if self._buffers else None
        if buffer is None or len(buffer) < length:
            if buffer is not None:
                buffer.close()
            buffer = mmap.mmap(-1, length)  # anonymous: page-aligned, as O_DIRECT needs
        try:
            buffer[:length] = data
            with memoryview(buffer) as view:
                os.pwrite(self.direct, view[:length], offset)
        finally:
            with self._lock:
                self._buffers.append(buffer)

    async def write_zeros(self, offset: int, length: int) -> None:
        if not self.fresh:  # a fresh file reads zeros there already (a hole)
            await asyncio.to_thread(os.pwrite, self.fd, bytes(length), offset)

    def writeback(self) -> contextlib.AbstractAsyncContextManager[None]:
        """While the restore writes: what goes through the page cache goes to the disk as it
        comes (with O_DIRECT, only an unaligned tail does: the final fsync takes it)."""
        if self.direct is not None:
            return contextlib.nullcontext()
        return early_writeback(lambda: os.fdatasync(self.fd))

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            if self.direct is not None:
                os.close(self.direct)
            for buffer in self._buffers:
                buffer.close()
            self._buffers.clear()


@dataclass
class DiskStats:
    size: int = 0
    chunks: int = 0
    read: int = 0  # bytes read from the source
    zero: int = 0  # chunks found (or known) to be zeros
    reused: int = 0  # chunks copied from the previous index without reading
    deduplicated: int = 0  # read, but the repository had them already
    sent: int = 0  # chunks uploaded
    sent_bytes: int = 0  # their sealed size
    seconds: float = 0.0
    reason: str = ""  # why an incremental backup read everything

    def to_json(self) -> dict[str, int | float | str]:
        return {k: v for k, v in self.__dict__.items() if v or k in ("sent_bytes", "read")}


@functools.cache
def _zeros(length: int) -> bytes:
    return bytes(length)


def _covering(extents: Sequence[Extent], chunk: int, count: int, size: int) -> set[int]:
    """Indexes of the chunks that ``extents`` touch."""
    touched: set[int] = set()
    for offset, length in extents:
        if length <= 0:
            continue
        first, last = offset // chunk, min(count - 1, (min(offset + length, size) - 1) // chunk)
        touched.update(range(first, last + 1))
    return touched


def _inside(extents: Sequence[Extent], chunk: int, count: int, size: int) -> set[int]:
    """Indexes of the chunks wholly inside ``extents`` (known zeros)."""
    inside: set[int] = set()
    for offset, length in extents:
        first = -(-offset // chunk)
        end = offset + length
        for i in range(first, count):
            if min((i + 1) * chunk, size) > end:
                break
            inside.add(i)
    return inside


@dataclass
class _Run:
    repo: Repository
    source: Source
    digests: list[bytes]
    stats: DiskStats
    progress: Progress | None
    known: set[bytes] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _hash(self, data: bytes) -> bytes:
        if data == _zeros(len(data)):
            return ZERO
        return self.repo.codec.chunk_id(data)

    def _whole_chunk(self, offset: int, length: int) -> tuple[bytes, int]:
        """In a worker thread, for a file source and a local repository: reads, hashes, seals
        and stores one chunk; (its id, sealed bytes written: 0 when zero, known or there)."""
        read = getattr(self.source, "read_blocking")  # noqa: B009 - checked by the caller
        data = read(offset, length)
        if len(data) != length:
            raise RepositoryError(f"short read at {offset}: {len(data)} of {length} bytes")
        digest = self._hash(data)
        if digest == ZERO:
            return digest, 0
        with self.lock:
            seen = digest in self.known
            self.known.add(digest)
        if seen:
            return digest, -1
        return digest, self.repo.store_chunk_blocking(digest, data)

    async def chunk(self, index: int) -> None:
        cs = self.repo.chunk_size
        length = min(cs, self.source.size - index * cs)
        if self.repo.local and hasattr(self.source, "read_blocking"):
            digest, written = await asyncio.to_thread(self._whole_chunk, index * cs, length)
            self.digests[index] = digest
            self.stats.read += length
            if digest == ZERO:
                self.stats.zero += 1
            elif written > 0:
                self.stats.sent += 1
                self.stats.sent_bytes += written
            else:
                self.stats.deduplicated += 1
            if self.progress is not None:
                self.progress(length)
            return
        data = await self.source.read(index * cs, length)
        if len(data) != length:
            raise RepositoryError(f"short read at chunk {index}: {len(data)} of {length} bytes")
        self.stats.read += length
        digest = await asyncio.to_thread(self._hash, data)
        self.digests[index] = digest
        if digest == ZERO:
            self.stats.zero += 1
        elif digest in self.known:
            self.stats.deduplicated += 1
        else:
            self.known.add(digest)
            if await self.repo.has_chunk(digest):
                self.stats.deduplicated += 1
            else:
                sealed = await asyncio.to_thread(self.repo.seal_chunk, digest, data)
                if await self.repo.put_chunk(digest, sealed):
                    self.stats.sent += 1
                    self.stats.sent_bytes += len(sealed)
                else:
                    self.stats.deduplicated += 1  # another writer stored it meanwhile
        if self.progress is not None:
            self.progress(length)


async def _each(queue: list[int], work: Callable[[int], Awaitable[None]], workers: int) -> None:
    """``work`` on every chunk index of ``queue`` (popped from its end), ``workers`` at a time;
    the first failure cancels the others and is raised."""

    async def worker() -> None:
        while queue:
            await work(queue.pop())

    tasks = [asyncio.ensure_future(worker()) for _ in range(max(1, workers))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def backup_disk(
    repo: Repository,
    name: str,
    source: Source,
    *,
    parent: DiskIndex | None = None,
    changed: Sequence[Extent] | None = None,
    workers: int = WORKERS,
    progress: Progress | None = None,
) -> tuple[DiskIndex, DiskStats]:
    """The disk's index in ``repo`` and what it took. Incremental when ``parent`` (the previous
    backup's index of this disk) and ``changed`` (everything written since it) are both given;
    otherwise full, and ``DiskStats.reason`` says why when a parent was given."""
    start = time.monotonic()
    cs, size = repo.chunk_size, source.size
    count = -(-size // cs)
    stats = DiskStats(size=size, chunks=count)
    digests = [ZERO] * count
    incremental = parent is not None and changed is not None
    if parent is not None and changed is None:
        stats.reason = "no changed-block information since the previous backup"
    elif parent is not None and (parent.size != size or parent.chunk_size != cs):
        stats.reason = f"the disk changed size ({parent.size} -> {size} bytes)"
        incremental = False
    if incremental:
        assert parent is not None and changed is not None
        todo = _covering(changed, cs, count, size)
        for i in range(count):
            if i not in todo:
                digests[i] = parent.digests[i]
        stats.reused = count - len(todo)
    else:
        zeros = _inside(await source.zero_extents(), cs, count, size)
        stats.zero = len(zeros)
        todo = set(range(count)) - zeros
        if progress is not None and zeros:
            progress(sum(min(cs, size - i * cs) for i in zeros))
    run = _Run(repo, source, digests, stats, progress)
    if parent is not None:
        run.known = parent.chunks()
    queue = sorted(todo, reverse=True)
    async with repo.writeback():
        await _each(queue, run.chunk, workers)
    stats.seconds = time.monotonic() - start
    return DiskIndex(name, size, cs, digests), stats


async def restore_disk(
    repo: Repository,
    index: DiskIndex,
    target: Target,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> DiskStats:
    """Writes every chunk of ``index`` to ``target``; a damaged chunk stops it (DamagedChunk):
    nothing is ever restored silently wrong."""
    start = time.monotonic()
    stats = DiskStats(size=index.size, chunks=len(index.digests))
    cs = index.chunk_size
    queue = list(reversed(range(len(index.digests))))
    # a local repository and a file: one worker-thread hop per chunk reads, checks and writes it
    fast = repo.local and hasattr(target, "write_blocking")
    if workers is None:
        workers = RESTORE_WORKERS if fast else WORKERS

    async def one(i: int) -> None:
        length = min(cs, index.size - i * cs)
        digest = index.digests[i]
        if digest == ZERO:
            await target.write_zeros(i * cs, length)
            stats.zero += 1
        elif fast:
            await asyncio.to_thread(_restore_blocking, repo, target, digest, i * cs, length)
            stats.read += length
        else:
            data = await repo.get_chunk(digest)
            if len(data) != length:
                raise RepositoryError(f"chunk {i} holds {len(data)} bytes, not {length}")
            await target.write(i * cs, data)
            stats.read += length
        if progress is not None:
            progress(length)

    writeback = getattr(target, "writeback", None)
    async with writeback() if writeback is not None else contextlib.nullcontext():
        await _each(queue, one, workers)
    stats.seconds = time.monotonic() - start
    return stats


def _restore_blocking(
    repo: Repository, target: Target, digest: bytes, offset: int, length: int
) -> None:
    data = repo.load_chunk_blocking(digest)
    if len(data) != length:
        raise RepositoryError(f"the chunk at {offset} holds {len(data)} bytes, not {length}")
    getattr(target, "write_blocking")(offset, data)  # noqa: B009 - checked by the caller


__all__ = [
    "DiskStats",
    "FileSource",
    "FileTarget",
    "Source",
    "Target",
    "backup_disk",
    "restore_disk",
]
