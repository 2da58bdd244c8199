"""A rate-limited work queue of object keys, with client-go's workqueue guarantees.

- A key waiting in the queue is there once: adding it again merges with the waiting entry.
- A key is never handed to two workers at once: one added while a worker holds it is handed
  out again after that worker calls ``done()``.
- ``add_rate_limited`` delays a key by per-key exponential backoff up to a cap; ``forget``
  resets it after a success.
- Delays run on a ``Clock``, so tests move time instead of sleeping.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from vmo.runtime._clock import SYSTEM_CLOCK, Clock, Timer


@dataclass(frozen=True)
class Backoff:
    """Per-key delays: ``base * 2**(failures - 1)``, capped at ``cap`` seconds."""

    base: float = 0.05
    cap: float = 30.0

    def delay(self, failures: int) -> float:
        return float(min(self.base * 2.0 ** max(failures - 1, 0), self.cap))


class RateLimitedQueue:
    """Keys waiting to be reconciled. ``get()`` returns None once the queue is shut down."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, backoff: Backoff | None = None) -> None:
        self.clock = clock
        self.backoff = backoff or Backoff()
        self._ready: deque[str] = deque()
        self._dirty: set[str] = set()  # waiting, or to be handed out again after done()
        self._processing: set[str] = set()
        self._failures: dict[str, int] = {}
        self._timers: dict[str, Timer] = {}
        self._getters: deque[asyncio.Future[None]] = deque()
        self._shutting_down = False

    # --- adding ---------------------------------------------------------------------------------

    def add(self, key: str) -> None:
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._ready.append(key)
            self._notify()

    def add_after(self, key: str, seconds: float) -> None:
        """Adds ``key`` after a delay; an earlier pending delay for it wins."""
        if self._shutting_down:
            return
        if seconds <= 0:
            self.add(key)
            return
        when = self.clock.monotonic() + seconds
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timers[key] = self.clock.call_later(seconds, lambda: self._fire(key))

    def add_rate_limited(self, key: str) -> float:
        """Adds ``key`` after its backoff delay; returns the delay."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = self.backoff.delay(failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        return self._failures.get(key, 0)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    # --- handing out ----------------------------------------------------------------------------

    async def get(self) -> str | None:
        """The next key (now held by the caller until ``done``), or None after shut-down."""
        while not self._ready and not self._shutting_down:
            waiter = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self._notify()  # pass on a wake-up this getter may have taken
                raise
        if self._shutting_down:
            return None
        key = self._ready.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty and not self._shutting_down:
            self._ready.append(key)
            self._notify()

    def _notify(self, *, everyone: bool = False) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    # --- state ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ready)

    @property
    def processing(self) -> frozenset[str]:
        return frozenset(self._processing)

    @property
    def waiting(self) -> frozenset[str]:
        """Keys whose delay has not run out yet."""
        return frozenset(self._timers)

    @property
    def shut(self) -> bool:
        return self._shutting_down

    def shut_down(self) -> None:
        """Stops handing out keys; pending delays are dropped."""
        self._shutting_down = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._notify(everyone=True)
