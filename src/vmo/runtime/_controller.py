"""The reconcile loop every VMO controller runs: informers -> keys -> work queue -> workers.

A controller names what it watches (``Watch``: a kind, and how an event maps to the keys to
reconcile) and implements ``reconcile(key)``. The base runs the loop: level-based (a key says
*what* to look at, never *what happened*), one worker per key at a time, failures retried with
per-key backoff, a periodic resync if asked, and a graceful stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmo.client import TRANSIENT_ERRORS, ApiStatusError, Client, Resource
from vmo.runtime._clock import Clock
from vmo.runtime._informer import Informer, Informers, Selector, object_key
from vmo.runtime._metrics import ERROR, QUEUE_DEPTHS, REQUEUE, SUCCESS, ReconcileMetrics
from vmo.runtime._queue import Backoff, RateLimitedQueue
from vmo.runtime._result import PermanentError, Result, TemporaryError

log = logging.getLogger(__name__)

JSON = dict[str, Any]

# How long a stopping controller lets a reconcile in flight finish its writes.
SHUTDOWN_GRACE_SECONDS = 5.0

KeysOf = Callable[[str, JSON], Iterable[str]]

# Failures logged without a traceback: the API refused, or the connection failed.
_EXPECTED: tuple[type[Exception], ...] = (ApiStatusError, *TRANSIENT_ERRORS)


def own_key(_etype: str, obj: JSON) -> list[str]:
    return [object_key(obj)]


@dataclass(frozen=True)
class Watch:
    """Watch ``selector``; each event queues the keys ``keys(event type, object)`` returns."""

    selector: Selector | Resource
    keys: KeysOf = own_key

    @property
    def full_selector(self) -> Selector:
        sel = self.selector
        return sel if isinstance(sel, Selector) else Selector(sel)


def split_key(key: str) -> tuple[str, str]:
    """``namespace/name`` -> (namespace, name); a cluster-scoped ``name`` -> ("", name)."""
    namespace, _, name = key.rpartition("/")
    return namespace, name


@dataclass
class Stats:
    """What the loop did, for tests and metrics."""

    reconciles: int = 0
    failures: int = 0
    permanent_failures: int = 0
    last_errors: dict[str, str] = field(default_factory=dict)


class Controller(ABC):
    """Subclasses set ``name`` and implement ``watches()`` and ``reconcile()``."""

    name = "controller"
    workers = 2
    resync_seconds: float | None = None
    _metrics: ReconcileMetrics | None = None  # bound on first use: subclasses set name late

    def __init__(
        self,
        client: Client,
        *,
        informers: Informers | None = None,
        clock: Clock | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.client = client
        self.informers = informers or Informers.of(client)
        self.clock = clock or self.informers.clock
        self._backoff = backoff
        self.queue = RateLimitedQueue(clock=self.clock, backoff=backoff)
        self.stats = Stats()
        self._subscriptions: list[tuple[Informer, int]] = []

    @abstractmethod
    def watches(self) -> Sequence[Watch]:
        """The kinds this controller follows; the first is its primary kind."""

    @abstractmethod
    async def reconcile(self, key: str) -> Result | None:
        """One level-based pass over ``key``: read fresh state, act, write status."""

    # --- helpers for subclasses -----------------------------------------------------------------

    def informer(self, selector: Selector | Resource) -> Informer:
        """The shared informer of that kind (its cache is filled while this controller runs)."""
        return self.informers.get(
            selector if isinstance(selector, Selector) else Selector(selector)
        )

    def enqueue(self, key: str, *, after: float = 0.0) -> None:
        self.queue.add_after(key, after)

    def resync_keys(self) -> Iterable[str]:
        """Keys a periodic resync queues: by default every object of the primary kind."""
        primary = self.watches()[0].full_selector
        return list(self.informer(primary).cache)

    # --- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Runs until ``stop`` is set, then lets reconciles in flight finish (within a grace)."""
        await self.start()
        workers = [
            asyncio.get_running_loop().create_task(self._work_loop(), name=f"{self.name}-worker")
            for _ in range(self.workers)
        ]
        resync = asyncio.get_running_loop().create_task(self._resync_loop(stop))
        try:
            await stop.wait()
            self.queue.shut_down()
            await asyncio.wait(workers, timeout=SHUTDOWN_GRACE_SECONDS)
        finally:
            self.queue.shut_down()
            for task in [*workers, resync]:
                task.cancel()
            await asyncio.gather(*workers, resync, return_exceptions=True)
            await self.stop()

    async def start(self) -> None:
        """Subscribes to the informers (called by ``run``). A controller run again (after a
        crash, or on winning its Lease back) gets a fresh queue: the last run shut its own."""
        if self.queue.shut:
            self.queue = RateLimitedQueue(clock=self.clock, backoff=self._backoff)
        for watch in self.watches():
            informer = self.informer(watch.full_selector)
            handle = informer.add_handler(self._queue_keys(watch.keys))
            self._subscriptions.append((informer, handle))
        QUEUE_DEPTHS.add(self)

    async def stop(self) -> None:
        QUEUE_DEPTHS.discard(self)
        for informer, handle in self._subscriptions:
            await informer.remove_handler(handle)
        self._subscriptions.clear()

    async def wait_synced(self) -> None:
        for informer, _ in self._subscriptions:
            await informer.wait_synced()

    def _queue_keys(self, keys: KeysOf) -> Callable[[str, JSON], None]:
        def handle(etype: str, obj: JSON) -> None:
            for key in keys(etype, obj) or ():
                self.queue.add(key)

        return handle

    async def _resync_loop(self, stop: asyncio.Event) -> None:
        if self.resync_seconds is None:
            return
        while not stop.is_set():
            await self.clock.sleep(self.resync_seconds)
            for key in self.resync_keys():
                self.queue.add(key)

    async def _work_loop(self) -> None:
        while (key := await self.queue.get()) is not None:
            try:
                await self.process(key)
            finally:
                self.queue.done(key)

    async def process(self, key: str) -> None:
        """Reconciles ``key`` once and decides, from how that went, when it comes back."""
        self.stats.reconciles += 1
        started = time.perf_counter()
        try:
            result = await self.reconcile(key)
        except asyncio.CancelledError:
            raise
        except TemporaryError as exc:
            self._observe(REQUEUE, started)
            self._note_failure(key, exc)
            log.info("%s: %s not done yet: %s", self.name, key, exc)
            if exc.delay is None:
                self.queue.add_rate_limited(key)
            else:
                self.queue.add_after(key, exc.delay)
            return
        except PermanentError as exc:
            self._observe(ERROR, started)
            self.stats.permanent_failures += 1
            self.stats.last_errors[key] = str(exc)
            log.warning("%s: %s failed for good (until it changes): %s", self.name, key, exc)
            self.queue.forget(key)
            return
        except Exception as exc:  # an outage or a bug: level-based reconcile is safe to retry
            self._observe(ERROR, started)
            self._note_failure(key, exc)
            delay = self.queue.add_rate_limited(key)
            log.warning(
                "%s: reconcile of %s failed (%s: %s); retrying in %.2fs",
                self.name,
                key,
                type(exc).__name__,
                exc,
                delay,
                exc_info=not isinstance(exc, _EXPECTED),
            )
            return
        requeue = result is not None and result.requeue_after is not None
        self._observe(REQUEUE if requeue else SUCCESS, started)
        self.queue.forget(key)
        self.stats.last_errors.pop(key, None)
        if result is not None and result.requeue_after is not None:
            self.queue.add_after(key, result.requeue_after)

    def _observe(self, result: str, started: float) -> None:
        metrics = self._metrics
        if metrics is None or metrics.controller != self.name:
            metrics = self._metrics = ReconcileMetrics.of(self.name)
        metrics.observe(result, time.perf_counter() - started)

    def _note_failure(self, key: str, exc: BaseException) -> None:
        self.stats.failures += 1
        self.stats.last_errors[key] = str(exc)
