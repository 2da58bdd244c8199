"""A small asyncio work queue of object keys, as client-go's rate-limited workqueue behaves.

A key is queued at most once, never handled by two workers at a time (a key added while it is
being handled is handled again afterwards), and retried with exponential backoff when its handler
raises.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# Per-key retry backoff after a failed reconcile: 50 ms doubling up to 30 s (client-go: 5 ms..1000 s).
RETRY_BASE_SECONDS = 0.05
RETRY_MAX_SECONDS = 30.0

Handler = Callable[[str], Awaitable[float | None]]


class WorkQueue:
    """Keys waiting to be reconciled; ``run_worker(handler)`` drains it."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._again: set[str] = set()
        self._failures: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closed = False

    def add(self, key: str) -> None:
        if self._closed:
            return
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: str, seconds: float) -> None:
        """Queues ``key`` after a delay (an earlier pending timer for it wins)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        when = loop.time() + seconds
        if timer is not None and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def __len__(self) -> int:
        return len(self._queued)

    def shut_down(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._queue.put_nowait(None)

    async def run_worker(self, handler: Handler) -> None:
        while True:
            key = await self._queue.get()
            if key is None:
                self._queue.put_nowait(None)  # wake the next worker so it stops too
                return
            self._queued.discard(key)
            self._active.add(key)
            try:
                await self._handle(key, handler)
            finally:
                self._active.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.add(key)

    async def _handle(self, key: str, handler: Handler) -> None:
        try:
            requeue = await handler(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure is retried: level-based reconcile is idempotent
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            delay = min(RETRY_BASE_SECONDS * 2 ** (failures - 1), RETRY_MAX_SECONDS)
            log.info("reconcile of %s failed (%s); retrying in %.2fs", key, exc, delay)
            self.add_after(key, delay)
            return
        self._failures.pop(key, None)
        if requeue is not None:
            self.add_after(key, requeue)
