"""The durable object store: SQLite in WAL mode, one global resourceVersion, a bounded event history.

Objects are kept as their final JSON bytes (resourceVersion included), keyed
``<group>/<plural>/<namespace>/<name>`` so that a list is one range scan and its response can be
assembled without parsing. Every write appends to ``events`` in the same transaction; watches
replay from there, and compaction trims it so the database stays bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JSON = dict[str, Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    key  TEXT PRIMARY KEY,
    rv   INTEGER NOT NULL,
    data BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    rv   INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    key  TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_key ON events(key, rv);
CREATE TABLE IF NOT EXISTS meta (
    k TEXT PRIMARY KEY,
    v INTEGER NOT NULL
);
"""


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


class StoreError(Exception):
    """Base of the store's errors; each carries the key it concerns."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class Conflict(StoreError):
    """The object changed since the resourceVersion the caller based its write on."""


class Compacted(StoreError):
    """The requested resourceVersion is older than the retained history."""


@dataclass(frozen=True)
class Event:
    type: EventType
    rv: int
    key: str
    data: bytes  # the object's JSON as stored (for DELETED: its last state, at the delete's rv)


@dataclass(frozen=True)
class Row:
    key: str
    rv: int
    data: bytes

    def obj(self) -> JSON:
        loaded: JSON = json.loads(self.data)
        return loaded


def prefix_end(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def dumps(obj: JSON) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _make_private(db: Path) -> None:
    """The database file is its owner's alone (0600), whatever the umask or an older VMO made it.

    SQLite gives its WAL and shared-memory files the database file's mode, so they follow.
    """
    os.close(os.open(db, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o600)


class Store:
    """Synchronous SQLite store. One instance owns the database; callers serialise writes."""

    def __init__(self, path: Path, *, durable: bool = False) -> None:
        self.path = path
        _make_private(Path(path))
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a crash of this process (kill -9): a commit is in the WAL
        # before it returns. FULL adds an fsync per commit, for power loss.
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._rv = self._meta("rv")
        self._compacted = self._meta("compacted")

    def close(self) -> None:
        self._db.close()

    def _meta(self, name: str) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def revision(self) -> int:
        return self._rv

    @property
    def compacted_revision(self) -> int:
        return self._compacted

    # --- reads -------------------------------------------------------------------------------

    def get(self, key: str) -> Row:
        row = self._db.execute("SELECT rv, data FROM objects WHERE key=?", (key,)).fetchone()
        if row is None:
            raise NotFound(key, f"{key} not found")
        return Row(key, int(row[0]), bytes(row[1]))

    def find(self, key: str) -> Row | None:
        try:
            return self.get(key)
        except NotFound:
            return None

    def scan(self, prefix: str, *, start_after: str = "", limit: int = 0) -> list[Row]:
        """Rows whose key starts with ``prefix``, in key order, after ``start_after``."""
        lower = max(prefix, start_after + "\x00") if start_after else prefix
        sql = "SELECT key, rv, data FROM objects WHERE key >= ? AND key < ? ORDER BY key"
        args: tuple[Any, ...] = (lower, prefix_end(prefix))
        if limit:
            sql += " LIMIT ?"
            args += (limit,)
        return [Row(k, int(rv), bytes(d)) for k, rv, d in self._db.execute(sql, args)]

    def count(self, prefix: str) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM objects WHERE key >= ? AND key < ?", (prefix, prefix_end(prefix))
        ).fetchone()
        return int(row[0])

    def events_since(self, rv: int, prefix: str = "", *, limit: int = 0) -> list[Event]:
        """Events after ``rv`` under ``prefix`` (the first ``limit`` when given); raises
        Compacted when that history is gone."""
        if rv < self._compacted:
            raise Compacted("", f"too old resource version: {rv} ({self._compacted})")
        sql = "SELECT rv, type, key, data FROM events WHERE rv > ?"
        args: tuple[Any, ...] = (rv,)
        if prefix:
            sql += " AND key >= ? AND key < ?"
            args += (prefix, prefix_end(prefix))
        sql += " ORDER BY rv"
        if limit:
            sql += " LIMIT ?"
            args += (limit,)
        cur = self._db.execute(sql, args)
        return [Event(EventType(t), int(r), k, bytes(d)) for r, t, k, d in cur]

    def previous_state(self, key: str, before_rv: int) -> bytes | None:
        """The object's stored bytes just before ``before_rv``, if history still has them."""
        row = self._db.execute(
            "SELECT type, data FROM events WHERE key = ? AND rv < ? ORDER BY rv DESC LIMIT 1",
            (key, before_rv),
        ).fetchone()
        if row is None or row[0] == EventType.DELETED.value:
            return None
        return bytes(row[1])

    # --- writes ------------------------------------------------------------------------------

    def create(self, key: str, obj: JSON) -> tuple[int, bytes]:
        """Stores a new object, stamping its resourceVersion; returns (rv, stored bytes)."""
        return self._write(key, obj, expect_rv=None, create=True)

    def update(self, key: str, obj: JSON, *, expect_rv: int | None) -> tuple[int, bytes]:
        """Replaces an object; with ``expect_rv`` the write fails with Conflict if it moved on."""
        return self._write(key, obj, expect_rv=expect_rv, create=False)

    def delete(self, key: str, *, expect_rv: int | None = None) -> tuple[int, bytes]:
        """Removes an object; returns the delete's rv and the last state stamped with it."""
        with self._transaction():
            current = self._current_rv(key)
            if current is None:
                raise NotFound(key, f"{key} not found")
            if expect_rv is not None and current != expect_rv:
                raise Conflict(key, f"{key} has resourceVersion {current}, not {expect_rv}")
            obj = self.get(key).obj()
            rv = self._rv + 1
            obj.setdefault("metadata", {})["resourceVersion"] = str(rv)
            data = dumps(obj)
            self._db.execute("DELETE FROM objects WHERE key=?", (key,))
            self._append(rv, EventType.DELETED, key, data)
        self._rv = rv
        return rv, data

    def _current_rv(self, key: str) -> int | None:
        row = self._db.execute("SELECT rv FROM objects WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else None

    def _write(
        self, key: str, obj: JSON, *, expect_rv: int | None, create: bool
    ) -> tuple[int, bytes]:
        with self._transaction():
            current = self._current_rv(key)
            if create and current is not None:
                raise AlreadyExists(key, f"{key} already exists")
            if not create and current is None:
                raise NotFound(key, f"{key} not found")
            if expect_rv is not None and current != expect_rv:
                raise Conflict(key, f"{key} has resourceVersion {current}, not {expect_rv}")
            rv = self._rv + 1
            obj.setdefault("metadata", {})["resourceVersion"] = str(rv)
            data = dumps(obj)
            self._db.execute(
                "INSERT OR REPLACE INTO objects(key, rv, data) VALUES (?, ?, ?)", (key, rv, data)
            )
            self._append(rv, EventType.ADDED if create else EventType.MODIFIED, key, data)
        self._rv = rv
        return rv, data

    def _append(self, rv: int, etype: EventType, key: str, data: bytes) -> None:
        self._db.execute(
            "INSERT INTO events(rv, type, key, data) VALUES (?, ?, ?, ?)",
            (rv, etype.value, key, data),
        )
        self._db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES ('rv', ?)", (rv,))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # --- maintenance -------------------------------------------------------------------------

    def compact(self, *, keep: int) -> int:
        """Drops events older than the last ``keep`` revisions; returns the new compacted rv."""
        floor = self._rv - keep
        if floor <= self._compacted:
            return self._compacted
        with self._transaction():
            self._db.execute("DELETE FROM events WHERE rv <= ?", (floor,))
            self._db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES ('compacted', ?)", (floor,))
        self._compacted = floor
        log.debug("compacted history up to rv %d", floor)
        return floor

    def checkpoint(self) -> None:
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
