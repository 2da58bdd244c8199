"""Where a repository's objects live: a local directory, or an S3-compatible bucket.

Both give the same small interface (get, create-only or overwriting put, exists, delete, list),
each raising ``StoreMissing``/``StoreExists`` or ``OSError``-like errors the repository turns
into its own. S3 goes through ``obstore`` (conditional creates with If-None-Match, bounded
retries and timeouts). A local directory is plain files, handled with ``os`` calls: a
create-only put writes a temporary file and links it into place (the link fails if the name
exists, and nobody ever sees a half-written object); ``sync`` flushes them to the disk before a
backup's manifest is written. The local store also offers the same calls blocking, so that a
backup's worker thread reads, hashes, seals and stores a chunk without going back to the event
loop between the steps (measured: that is what a local backup's speed hangs on).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import os
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError
from obstore.store import S3Store

TMP_PREFIX = ".tmp-"
WRITEBACK_INTERVAL = 0.05  # seconds between the syncs that overlap a backup's disk writes
_LIBC = ctypes.CDLL(None, use_errno=True)


@contextlib.asynccontextmanager
async def early_writeback(flush: Callable[[], None]) -> AsyncIterator[None]:
    """While a large write runs: ``flush`` (a sync of what is written) every
    ``WRITEBACK_INTERVAL`` in a worker thread, so that the kernel writes the data out as it
    comes, overlapping the disk with the reads, hashing and compressing, and the final sync
    finds little left. Measured on this machine's disk: a full backup or a restore of 1 GiB
    takes about a third less time."""
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            await asyncio.to_thread(flush)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WRITEBACK_INTERVAL)

    task = asyncio.get_running_loop().create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


def syncfs(path: Path) -> None:
    """Writes out the filesystem that holds ``path`` (Linux ``syncfs(2)``; the stdlib has only
    ``os.sync``, which writes out every filesystem of the host, VM disks included)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


class StoreMissing(Exception):
    pass


class StoreFailed(Exception):
    """The store refused or could not be reached; the message says what it answered."""


class Store(Protocol):
    name: str

    async def get(self, key: str) -> bytes: ...

    async def put(self, key: str, data: bytes, *, create: bool) -> bool:
        """False when ``create`` and the key exists already."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        """Objects under the directory-like ``prefix``: ``path``, ``size``, ``last_modified``."""
        ...

    async def sync(self) -> None:
        """Everything put so far is durable."""
        ...


class LocalStore:
    """A repository in a local directory (every key a file under ``root``)."""

    blocking = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = str(root)
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or p.startswith(TMP_PREFIX) for p in parts):
            raise StoreFailed(f"invalid key {key!r}")
        return self.root.joinpath(*parts)

    # --- blocking ----------------------------------------------------------------------------

    def get_blocking(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StoreMissing(key) from None

    def exists_blocking(self, key: str) -> bool:
        return self._path(key).exists()

    def put_blocking(self, key: str, data: bytes, *, create: bool) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with tmp.open("xb") as fh:
                fh.write(data)
            if create:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def delete_blocking(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    # --- async -------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self.get_blocking, key)

    async def put(self, key: str, data: bytes, *, create: bool) -> bool:
        return await asyncio.to_thread(self.put_blocking, key, data, create=create)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.exists_blocking, key)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.delete_blocking, key)

    async def list(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        found = await asyncio.to_thread(self._walk, base)
        for item in found:
            yield item

    def _walk(self, base: Path) -> builtins.list[dict[str, Any]]:
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue
                path = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    out.append(
                        {
                            "path": str(path.relative_to(self.root)),
                            "size": st.st_size,
                            "last_modified": datetime.fromtimestamp(st.st_mtime, UTC),
                        }
                    )
        return out

    async def sync(self) -> None:
        await asyncio.to_thread(syncfs, self.root)

    def writeback(self) -> contextlib.AbstractAsyncContextManager[None]:
        """While many chunks are written: see ``early_writeback``."""
        return early_writeback(lambda: syncfs(self.root))


class ObjectStore:
    """A repository in an S3-compatible bucket (or any store obstore reaches)."""

    blocking = False

    def __init__(self, store: Any, name: str) -> None:
        self.store = store
        self.name = name

    @staticmethod
    def _failed(exc: Exception) -> StoreFailed:
        return StoreFailed(f"{type(exc).__name__}: {str(exc).split(chr(10), 1)[0]}")

    async def get(self, key: str) -> bytes:
        try:
            return bytes(await (await obstore.get_async(self.store, key)).bytes_async())
        except FileNotFoundError:
            raise StoreMissing(key) from None
        except (BaseError, OSError) as exc:
            raise self._failed(exc) from None

    async def put(self, key: str, data: bytes, *, create: bool) -> bool:
        try:
            await obstore.put_async(self.store, key, data, mode="create" if create else "overwrite")
        except AlreadyExistsError:
            return False
        except (BaseError, OSError) as exc:
            raise self._failed(exc) from None
        return True

    async def exists(self, key: str) -> bool:
        try:
            await obstore.head_async(self.store, key)
        except FileNotFoundError:
            return False
        except (BaseError, OSError) as exc:
            raise self._failed(exc) from None
        return True

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self.store, key)
        except FileNotFoundError:
            return
        except (BaseError, OSError) as exc:
            raise self._failed(exc) from None

    async def list(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        try:
            async for batch in obstore.list(self.store, prefix=prefix):
                for meta in batch:
                    yield dict(meta)
        except (BaseError, OSError) as exc:
            raise self._failed(exc) from None

    async def sync(self) -> None:
        return None  # a successful PUT is durable


def local_store(path: str | os.PathLike[str]) -> LocalStore:
    return LocalStore(Path(path))


def s3_store(
    bucket: str,
    *,
    endpoint: str,
    access_key: str,
    secret_key: str,
    region: str = "us-east-1",
    prefix: str = "",
    timeout: str = "30s",
    retries: int = 3,
) -> ObjectStore:
    """An S3-compatible bucket (path-style, as self-hosted servers serve it). ``retries`` and
    ``timeout`` bound how long an unreachable store holds a backup before it fails."""
    store = S3Store(
        bucket,
        prefix=prefix or None,
        endpoint=endpoint,
        access_key_id=access_key,
        secret_access_key=secret_key,
        region=region,
        virtual_hosted_style_request=False,
        client_options={
            "allow_http": endpoint.startswith("http://"),
            "timeout": timeout,
            "connect_timeout": "5s",
        },
        retry_config={
            "max_retries": retries,
            "retry_timeout": timedelta(seconds=30),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
                "base": 2,
            },
        },
    )
    return ObjectStore(store, f"s3 {endpoint}/{bucket}/{prefix}".rstrip("/"))


__all__ = [
    "LocalStore",
    "ObjectStore",
    "Store",
    "StoreFailed",
    "StoreMissing",
    "local_store",
    "s3_store",
]
