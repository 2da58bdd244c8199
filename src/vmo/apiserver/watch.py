"""Fan-out of committed changes to watchers and in-process controllers.

The store commits on the event loop's thread, then publishes here; a subscriber registered in the
same loop step as a history replay therefore misses nothing and sees nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

log = logging.getLogger(__name__)

JSON = dict[str, Any]

QUEUE_LIMIT = 10_000


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
    prefix: str
    queue: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)
    overflowed: bool = False


class WatchHub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._listeners: list[Callable[[Change], None]] = []

    def subscribe(self, prefix: str) -> Subscription:
        sub = Subscription(prefix)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def listen(self, callback: Callable[[Change], None]) -> None:
        """In-process listeners (indexes, controllers) called synchronously on each change."""
        self._listeners.append(callback)

    def publish(self, change: Change) -> None:
        for callback in self._listeners:
            callback(change)
        for sub in list(self._subs):
            if not change.key.startswith(sub.prefix):
                continue
            if sub.queue.qsize() >= QUEUE_LIMIT:
                # A watcher this far behind is closed; its client re-lists, as with etcd.
                log.warning("closing slow watch on %s", sub.prefix)
                sub.overflowed = True
                self._subs.discard(sub)
                sub.queue.put_nowait(None)
                continue
            sub.queue.put_nowait(change)

    def close_all(self) -> None:
        for sub in list(self._subs):
            sub.queue.put_nowait(None)
        self._subs.clear()
