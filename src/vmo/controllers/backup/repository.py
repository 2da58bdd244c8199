"""A backup repository: content-addressed chunks and backup manifests in an object store.

The store is a local directory or an S3 bucket (``stores``: plain files, or ``obstore``; both
with create-only writes). Layout, every key under the repository's prefix:

- ``config``: the repository's id, chunk size and, when encrypted, how its keys are derived
  (never a key itself);
- ``chunks/<2 hex>/<64 hex>``: one sealed chunk per id (see ``codec``); written only with a
  conditional create, so several writers that store the same data never clash;
- ``backups/<namespace>/<vm>/<id>``: one sealed manifest per backup. Each is logically a full
  backup: its disks' indexes list every chunk, the unchanged ones copied from the backup before;
- ``locks/<kind>/<id>``: who is writing (``backup``) or collecting garbage (``gc``), and until
  when the claim holds unless renewed; ``locks/vm/<namespace>--<vm>`` keeps two backups of one VM
  from running at once.

Append-only, so an interrupted backup leaves no torn state: its chunks are in the store, its
manifest is not, and the next run finds the chunks there and does not send them again. Garbage
collection and writers exclude each other by lock objects (each writes its own, then looks for
the other's: at least one of two that start together sees the other), so a collection never
deletes a chunk a running backup has just found present.

The chunk store is VMO's own because incremental backups need the previous backup's chunk
index (which chunks a dirty bitmap says did not change) and neither restic's nor borg's
repository formats are libraries.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from vmo.controllers.backup.codec import Codec, CodecError
from vmo.controllers.backup.stores import (
    Store,
    StoreFailed,
    StoreMissing,
    local_store,
    s3_store,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 1 << 20
ZERO = bytes(32)  # the index entry of an all-zero chunk: stored nowhere, restored as a hole
LOCK_TTL = timedelta(minutes=10)
ID_TIME = "%Y%m%dT%H%M%S%fZ"
VERIFY_CONCURRENCY = 8


class RepositoryError(Exception):
    """The store failed (unreachable, full, refused); nothing half-written is visible."""


class RepositoryBusy(RepositoryError):
    """Another writer or a garbage collection holds the repository (or the VM)."""


class NotFound(RepositoryError):
    pass


class DamagedChunk(RepositoryError):
    """A chunk that is missing, does not open, or whose content no longer has its id."""

    def __init__(self, digest: bytes, reason: str) -> None:
        super().__init__(f"chunk {digest.hex()} is damaged: {reason}")
        self.digest = digest
        self.reason = reason


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _wrap(exc: Exception, what: str) -> RepositoryError:
    if isinstance(exc, StoreMissing | FileNotFoundError):
        return NotFound(f"{what}: not found")
    if isinstance(exc, StoreFailed):
        return RepositoryError(f"{what}: {exc}")
    text = str(exc).split("\n", 1)[0]
    return RepositoryError(f"{what}: {type(exc).__name__}: {text}")


STORE_ERRORS = (StoreMissing, StoreFailed, OSError)


# --- what the store holds ---------------------------------------------------------------------


@dataclass
class DiskIndex:
    """One disk of a backup: its size and the id of every chunk, in order (``ZERO`` for zeros)."""

    name: str
    size: int
    chunk_size: int
    digests: list[bytes]

    def to_json(self) -> JSON:
        packed = b"".join(self.digests)
        return {
            "name": self.name,
            "size": self.size,
            "chunkSize": self.chunk_size,
            "index": base64.b64encode(packed).decode(),
        }

    @classmethod
    def from_json(cls, data: JSON) -> DiskIndex:
        packed = base64.b64decode(data["index"])
        digests = [packed[i : i + 32] for i in range(0, len(packed), 32)]
        return cls(str(data["name"]), int(data["size"]), int(data["chunkSize"]), digests)

    def chunks(self) -> set[bytes]:
        return {d for d in self.digests if d != ZERO}


@dataclass(frozen=True)
class BackupRef:
    namespace: str
    vm: str
    id: str

    @property
    def key(self) -> str:
        return f"backups/{self.namespace}/{self.vm}/{self.id}"

    @property
    def created(self) -> datetime:
        return datetime.strptime(self.id.split("-", 1)[0], ID_TIME).replace(tzinfo=UTC)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.vm}/{self.id}"


@dataclass
class Manifest:
    """A backup: the VM it is of, its disks' indexes, and the objects that rebuild the VM."""

    ref: BackupRef
    created: str
    kind: str  # Full or Incremental
    disks: list[DiskIndex]
    parent: str | None = None
    vm_uid: str = ""
    objects: list[JSON] = field(default_factory=list)  # the VM, its DataVolumes and PVCs
    stats: JSON = field(default_factory=dict)
    reason: str = ""  # why a backup asked to be incremental is full

    def to_json(self) -> JSON:
        return {
            "version": FORMAT_VERSION,
            "namespace": self.ref.namespace,
            "vm": self.ref.vm,
            "id": self.ref.id,
            "vmUID": self.vm_uid,
            "created": self.created,
            "kind": self.kind,
            "parent": self.parent,
            "reason": self.reason,
            "disks": [d.to_json() for d in self.disks],
            "objects": self.objects,
            "stats": self.stats,
        }

    @classmethod
    def from_json(cls, data: JSON) -> Manifest:
        return cls(
            ref=BackupRef(str(data["namespace"]), str(data["vm"]), str(data["id"])),
            created=str(data["created"]),
            kind=str(data["kind"]),
            disks=[DiskIndex.from_json(d) for d in data.get("disks") or []],
            parent=data.get("parent"),
            vm_uid=str(data.get("vmUID") or ""),
            objects=list(data.get("objects") or []),
            stats=dict(data.get("stats") or {}),
            reason=str(data.get("reason") or ""),
        )

    def disk(self, name: str) -> DiskIndex | None:
        return next((d for d in self.disks if d.name == name), None)

    def chunks(self) -> set[bytes]:
        found: set[bytes] = set()
        for disk in self.disks:
            found |= disk.chunks()
        return found


def new_backup_id(now: datetime | None = None) -> str:
    """Sortable by time (to the microsecond), unique among writers:
    ``20261203T101500123456Z-1a2b3c``."""
    return f"{(now or _now()).strftime(ID_TIME)}-{secrets.token_hex(3)}"


@dataclass
class VerifyReport:
    chunks: int = 0
    bytes: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # chunk hex -> why
    backups: dict[str, list[str]] = field(default_factory=dict)  # backup -> damaged chunks

    @property
    def ok(self) -> bool:
        return not self.damaged


@dataclass
class GcReport:
    removed: int = 0
    freed: int = 0
    kept: int = 0
    stale_locks: int = 0


# --- the store ------------------------------------------------------------------------------


class Repository:
    """An opened repository. Every method is safe to call from several tasks at once."""

    def __init__(self, store: Store, codec: Codec, config: JSON, *, name: str = "") -> None:
        self.store = store
        self.codec = codec
        self.config = config
        self.name = name or store.name

    @property
    def chunk_size(self) -> int:
        return int(self.config["chunkSize"])

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    async def init(
        cls,
        store: Store,
        *,
        secret: bytes | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        name: str = "",
    ) -> Repository:
        """A new repository in an empty store; refused where one already is."""
        if chunk_size < 64 << 10 or chunk_size > 64 << 20 or chunk_size & (chunk_size - 1):
            raise RepositoryError(f"chunk size {chunk_size} is not a power of two in 64Ki..64Mi")
        if secret is None:
            codec, encryption = Codec(), None
        else:
            codec, encryption = Codec.new_encryption(secret)
        config = {
            "version": FORMAT_VERSION,
            "id": str(uuid.uuid4()),
            "created": _stamp(_now()),
            "chunkSize": chunk_size,
            "hash": "SHA-256" if secret is None else "HMAC-SHA256",
            "compression": "zstd",
            "encryption": encryption,
        }
        name = name or store.name
        try:
            created = await store.put("config", json.dumps(config).encode(), create=True)
        except STORE_ERRORS as exc:
            raise _wrap(exc, f"repository {name}") from None
        if not created:
            raise RepositoryError(f"repository {name}: a repository is already there")
        return cls(store, codec, config, name=name)

    @classmethod
    async def open(cls, store: Store, *, secret: bytes | None = None, name: str = "") -> Repository:
        name = name or store.name
        try:
            raw = await store.get("config")
        except StoreMissing:
            raise NotFound(f"repository {name}: no repository there (no config)") from None
        except STORE_ERRORS as exc:
            raise _wrap(exc, f"repository {name}") from None
        config = json.loads(bytes(raw))
        if config.get("version") != FORMAT_VERSION:
            raise RepositoryError(f"repository {name}: format {config.get('version')} unknown")
        codec = await asyncio.to_thread(Codec.for_config, config.get("encryption"), secret)
        return cls(store, codec, config, name=name)

    @classmethod
    async def open_or_init(cls, store: Store, **kwargs: Any) -> Repository:
        try:
            return await cls.open(store, secret=kwargs.get("secret"), name=kwargs.get("name", ""))
        except NotFound:
            return await cls.init(store, **kwargs)

    # --- raw store access ---------------------------------------------------------------------

    async def _get(self, key: str) -> bytes:
        try:
            return await self.store.get(key)
        except STORE_ERRORS as exc:
            raise _wrap(exc, f"repository {self.name}: {key}") from None

    async def _put(self, key: str, data: bytes, *, create: bool) -> bool:
        """False when ``create`` and the key is already there."""
        try:
            return await self.store.put(key, data, create=create)
        except STORE_ERRORS as exc:
            raise _wrap(exc, f"repository {self.name}: writing {key}") from None

    async def _exists(self, key: str) -> bool:
        try:
            return await self.store.exists(key)
        except STORE_ERRORS as exc:
            raise _wrap(exc, f"repository {self.name}: {key}") from None

    async def _delete(self, key: str) -> None:
        try:
            await self.store.delete(key)
        except STORE_ERRORS as exc:
            raise _wrap(exc, f"repository {self.name}: deleting {key}") from None

    async def _list(self, prefix: str) -> AsyncIterator[JSON]:
        try:
            async for meta in self.store.list(prefix):
                yield meta
        except STORE_ERRORS as exc:
            raise _wrap(exc, f"repository {self.name}: listing {prefix}") from None

    @property
    def local(self) -> bool:
        """Whether the store's calls may be made blocking, from a worker thread."""
        return bool(getattr(self.store, "blocking", False))

    def writeback(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Around many chunk writes: the store's early writeback, where it has one."""
        found = getattr(self.store, "writeback", None)
        return found() if found is not None else contextlib.nullcontext()

    def store_chunk_blocking(self, digest: bytes, data: bytes) -> int:
        """From a worker thread of a local repository: seals and stores the chunk unless it is
        there; the sealed bytes written (0: it was there)."""
        store: Any = self.store
        key = self.chunk_key(digest)
        try:
            if store.exists_blocking(key):
                return 0
            sealed = self.seal_chunk(digest, data)
            return len(sealed) if store.put_blocking(key, sealed, create=True) else 0
        except STORE_ERRORS as exc:
            raise _wrap(exc, f"repository {self.name}: writing {key}") from None

    # --- chunks -------------------------------------------------------------------------------

    @staticmethod
    def chunk_key(digest: bytes) -> str:
        h = digest.hex()
        return f"chunks/{h[:2]}/{h}"

    async def has_chunk(self, digest: bytes) -> bool:
        return await self._exists(self.chunk_key(digest))

    async def put_chunk(self, digest: bytes, sealed: bytes) -> bool:
        """Stores a sealed chunk; False when it was already there (deduplicated)."""
        return await self._put(self.chunk_key(digest), sealed, create=True)

    def seal_chunk(self, digest: bytes, data: bytes | memoryview) -> bytes:
        return self.codec.seal(data, name=digest.hex())

    def open_chunk(self, digest: bytes, blob: bytes) -> bytes:
        """The chunk's plain bytes, checked against its id (raises DamagedChunk)."""
        try:
            data = self.codec.open(blob, name=digest.hex())
        except CodecError as exc:
            raise DamagedChunk(digest, str(exc)) from None
        if self.codec.chunk_id(data) != digest:
            raise DamagedChunk(digest, "its content no longer has its id")
        return data

    def load_chunk_blocking(self, digest: bytes) -> bytes:
        """From a worker thread of a local repository: the chunk's plain bytes, checked."""
        store: Any = self.store
        try:
            blob = store.get_blocking(self.chunk_key(digest))
        except StoreMissing:
            raise DamagedChunk(digest, "missing from the repository") from None
        except STORE_ERRORS as exc:
            raise _wrap(exc, f"repository {self.name}: {self.chunk_key(digest)}") from None
        return self.open_chunk(digest, blob)

    async def get_chunk(self, digest: bytes) -> bytes:
        try:
            blob = await self._get(self.chunk_key(digest))
        except NotFound:
            raise DamagedChunk(digest, "missing from the repository") from None
        return await asyncio.to_thread(self.open_chunk, digest, blob)

    # --- manifests ----------------------------------------------------------------------------

    async def write_manifest(self, manifest: Manifest) -> None:
        """The backup's last write: once it is in, the backup exists, whole."""
        key = manifest.ref.key
        sealed = self.codec.seal(json.dumps(manifest.to_json()).encode(), name=key)
        try:
            await self.store.sync()  # every chunk it names is on the disk before it is
        except STORE_ERRORS as exc:
            raise _wrap(exc, f"repository {self.name}: syncing") from None
        if not await self._put(key, sealed, create=True):
            raise RepositoryError(f"repository {self.name}: backup {manifest.ref} already exists")

    async def read_manifest(self, ref: BackupRef) -> Manifest:
        blob = await self._get(ref.key)
        try:
            data = json.loads(self.codec.open(blob, name=ref.key))
        except (CodecError, ValueError) as exc:
            raise RepositoryError(f"backup {ref}: manifest damaged: {exc}") from None
        return Manifest.from_json(data)

    async def backups(self, namespace: str | None = None, vm: str | None = None) -> list[BackupRef]:
        """Every backup (of one VM, or one namespace), oldest first."""
        prefix = "backups/"
        if namespace is not None:
            prefix += f"{namespace}/"
            if vm is not None:
                prefix += f"{vm}/"
        refs = []
        async for meta in self._list(prefix):
            parts = str(meta["path"]).split("/")
            if len(parts) == 4:
                refs.append(BackupRef(parts[1], parts[2], parts[3]))
        return sorted(refs, key=lambda r: (r.id, r.namespace, r.vm))

    async def latest(self, namespace: str, vm: str) -> Manifest | None:
        refs = await self.backups(namespace, vm)
        return await self.read_manifest(refs[-1]) if refs else None

    async def delete_backup(self, ref: BackupRef) -> None:
        """Forgets a backup; its chunks go at the next garbage collection if nothing else needs
        them."""
        await self._delete(ref.key)

    # --- locks --------------------------------------------------------------------------------

    async def _locks(self, kind: str) -> list[tuple[str, JSON]]:
        found = []
        async for meta in self._list(f"locks/{kind}/"):
            key = str(meta["path"])
            with contextlib.suppress(NotFound, ValueError):
                found.append((key, json.loads(await self._get(key))))
        return found

    @staticmethod
    def _live(lock: JSON, now: datetime) -> bool:
        with contextlib.suppress(KeyError, ValueError):
            return datetime.fromisoformat(lock["expires"]) > now
        return False

    def _lock_body(self, owner: str) -> bytes:
        body = {"owner": owner, "host": os.uname().nodename, "pid": os.getpid(),
                "expires": (_now() + LOCK_TTL).isoformat()}  # fmt: skip
        return json.dumps(body).encode()

    @contextlib.asynccontextmanager
    async def _claim(self, kind: str, owner: str, *, excludes: str) -> AsyncIterator[None]:
        key = f"locks/{kind}/{uuid.uuid4()}"
        await self._put(key, self._lock_body(owner), create=True)
        try:
            now = _now()
            others = [lock for _, lock in await self._locks(excludes) if self._live(lock, now)]
            if others:
                holder = others[0].get("owner", "?")
                raise RepositoryBusy(
                    f"repository {self.name}: busy ({excludes} by {holder} is running)"
                )
            renew = asyncio.get_running_loop().create_task(self._renew(key, owner))
            try:
                yield
            finally:
                renew.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renew
        finally:
            with contextlib.suppress(RepositoryError):
                await self._delete(key)

    async def _renew(self, key: str, owner: str) -> None:
        while True:
            await asyncio.sleep(LOCK_TTL.total_seconds() / 3)
            with contextlib.suppress(RepositoryError):
                await self._put(key, self._lock_body(owner), create=False)

    def writing(self, owner: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while a backup writes chunks: garbage collection waits for it to end."""
        return self._claim("backup", owner, excludes="gc")

    @contextlib.asynccontextmanager
    async def vm_lock(self, namespace: str, vm: str, owner: str) -> AsyncIterator[None]:
        """Only one backup of a VM at a time, whichever process runs it."""
        key = f"locks/vm/{namespace}--{vm}"
        for _ in range(2):
            if await self._put(key, self._lock_body(owner), create=True):
                break
            try:
                held = json.loads(await self._get(key))
            except (NotFound, ValueError):
                continue
            if self._live(held, _now()):
                raise RepositoryBusy(
                    f"a backup of VM {namespace}/{vm} is already running ({held.get('owner')})"
                )
            await self._delete(key)  # its holder died without letting go
        else:
            raise RepositoryBusy(f"a backup of VM {namespace}/{vm} is already running")
        try:
            yield
        finally:
            with contextlib.suppress(RepositoryError):
                await self._delete(key)

    # --- verify -------------------------------------------------------------------------------

    async def _needed(self, refs: Iterable[BackupRef]) -> dict[bytes, list[str]]:
        needs: dict[bytes, list[str]] = {}
        for ref in refs:
            for digest in (await self.read_manifest(ref)).chunks():
                needs.setdefault(digest, []).append(str(ref))
        return needs

    async def verify(
        self,
        refs: Iterable[BackupRef] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> VerifyReport:
        """Reads and re-hashes every chunk the backups need (all of them by default); names the
        damaged chunks and, for each backup, the damaged chunks it needs. ``progress`` gets
        (chunks done, chunks in all) after each chunk."""
        chosen = list(refs) if refs is not None else await self.backups()
        needs = await self._needed(chosen)
        report = VerifyReport()
        queue = list(needs)
        lock = asyncio.Lock()

        async def worker() -> None:
            while queue:
                digest = queue.pop()
                try:
                    blob = await self._get(self.chunk_key(digest))
                    await asyncio.to_thread(self.open_chunk, digest, blob)
                    reason = ""
                except NotFound:
                    blob, reason = b"", "missing from the repository"
                except DamagedChunk as exc:
                    blob, reason = b"", exc.reason
                async with lock:
                    report.chunks += 1
                    report.bytes += len(blob)
                    if progress is not None:
                        progress(report.chunks, len(needs))
                    if reason:
                        report.damaged[digest.hex()] = reason
                        for backup in needs[digest]:
                            report.backups.setdefault(backup, []).append(digest.hex())

        await asyncio.gather(*(worker() for _ in range(VERIFY_CONCURRENCY)))
        return report

    # --- garbage collection -------------------------------------------------------------------

    async def gc(self, *, grace: timedelta = timedelta(0), owner: str = "gc") -> GcReport:
        """Deletes the chunks no backup needs (older than ``grace``) and locks long expired;
        refused while a backup is writing."""
        report = GcReport()
        async with self._claim("gc", owner, excludes="backup"):
            start = _now()
            needed = set(await self._needed(await self.backups()))
            cutoff = start - grace
            async for meta in self._list("chunks/"):
                name = str(meta["path"]).rsplit("/", 1)[-1]
                try:
                    digest = bytes.fromhex(name)
                except ValueError:
                    continue
                if digest in needed or meta["last_modified"] > cutoff:
                    report.kept += 1
                    continue
                await self._delete(str(meta["path"]))
                report.removed += 1
                report.freed += int(meta["size"])
            for kind in ("backup", "gc", "vm"):
                for key, lock in await self._locks(kind):
                    if not self._live(lock, start - LOCK_TTL):
                        await self._delete(key)
                        report.stale_locks += 1
        return report

    async def stored_bytes(self) -> int:
        total = 0
        async for meta in self._list("chunks/"):
            total += int(meta["size"])
        return total


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ZERO",
    "BackupRef",
    "DamagedChunk",
    "DiskIndex",
    "GcReport",
    "Manifest",
    "NotFound",
    "Repository",
    "RepositoryBusy",
    "RepositoryError",
    "VerifyReport",
    "local_store",
    "new_backup_id",
    "s3_store",
]
