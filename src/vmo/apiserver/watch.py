"""Fan-out of committed changes to watchers and in-process controllers.

The store commits on the event loop's thread, then publishes here; a subscriber registered in the
same loop step as a history replay therefore misses nothing and sees nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

log = logging.getLogger(__name__)

JSON = dict[str, Any]

# Events one watcher may lag behind before it is closed, like kube-apiserver's fixed-size
# per-watcher channel: its client re-watches from its last resourceVersion (or re-lists on 410).
WATCH_BUFFER = 1000


@dataclass(frozen=True)
class Change:
    """One committed change. ``prev`` is the object before it (None for ADDED)."""

    type: str  # ADDED | MODIFIED | DELETED
    rv: int
    key: str
    data: bytes
    prev: bytes | None = None

    @cached_property
    def obj(self) -> JSON:
        loaded: JSON = json.loads(self.data)
        return loaded

    @cached_property
    def prev_obj(self) -> JSON | None:
        if self.prev is None:
            return None
        loaded: JSON = json.loads(self.prev)
        return loaded


@dataclass(eq=False)
class Subscription:
    """One watcher's bounded buffer; ``None`` in it means the watch is over."""

    prefix: str
    queue: asyncio.Queue[Change | None]
    # called when the hub closes this watcher for falling behind
    on_overflow: Callable[[], None] | None = None
    overflowed: bool = False

    def close(self) -> None:
        """Ends the watch: queued events it will never send are dropped now, not when (if
        ever) its writer wakes, so a stalled client holds no history."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class Snapshot:
    """The objects under a prefix as ADDED changes, shared by every watcher that starts before
    the next change under that prefix: a thousand new watches hold one copy, not a thousand.
    It lives as long as some watcher is still sending it."""

    __slots__ = ("__weakref__", "changes")

    def __init__(self, changes: list[Change]) -> None:
        self.changes = changes


class WatchHub:
    def __init__(self, *, buffer: int = WATCH_BUFFER) -> None:
        self.buffer = buffer
        self._subs: set[Subscription] = set()
        self._listeners: list[Callable[[Change], None]] = []
        self._snapshots: weakref.WeakValueDictionary[str, Snapshot] = weakref.WeakValueDictionary()

    def snapshot(self, prefix: str, read: Callable[[], list[Change]]) -> Snapshot:
        """The current objects under ``prefix``: ``read()`` unless a watcher holds a snapshot
        taken since the last change there."""
        snap = self._snapshots.get(prefix)
        if snap is None:
            snap = Snapshot(read())
            self._snapshots[prefix] = snap
        return snap

    @property
    def watchers(self) -> int:
        """Live watch subscriptions: the per-watcher bookkeeping the hub holds."""
        return len(self._subs)

    def prefixes(self) -> list[str]:
        """The key prefix of every live subscription (what each watch streams)."""
        return [sub.prefix for sub in self._subs]

    def subscribe(self, prefix: str) -> Subscription:
        sub = Subscription(prefix, asyncio.Queue(maxsize=self.buffer))
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def listen(self, callback: Callable[[Change], None]) -> None:
        """In-process listeners (indexes, controllers) called synchronously on each change."""
        self._listeners.append(callback)

    def publish(self, change: Change) -> None:
        for prefix in [p for p in self._snapshots if change.key.startswith(p)]:
            self._snapshots.pop(prefix, None)
        for callback in self._listeners:
            callback(change)
        for sub in list(self._subs):
            if not change.key.startswith(sub.prefix):
                continue
            if sub.queue.full():
                self._close_slow(sub)
                continue
            sub.queue.put_nowait(change)

    def _close_slow(self, sub: Subscription) -> None:
        log.info("closing a watch on %s: it fell %d events behind", sub.prefix, sub.queue.maxsize)
        self._subs.discard(sub)
        sub.overflowed = True
        sub.close()
        if sub.on_overflow is not None:
            sub.on_overflow()

    def close_all(self) -> None:
        for sub in list(self._subs):
            sub.close()
        self._subs.clear()
