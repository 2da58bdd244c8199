"""The controller runtime's own metrics, in prometheus_client's process-wide ``REGISTRY`` (the one
the process's ``/metrics`` serves): each controller's queue depth, and what its reconciles did
and how long they took.

The ``controller`` label is the controller's ``name``. Controllers that run once per node carry
their node in it (``virt-handler-node-1``), so the label is bounded by what the process runs and
distinct per instance. A reconcile's ``result``:

- ``success``: it returned, and asked for no later pass;
- ``requeue``: it returned ``Result.after(...)``, or raised ``TemporaryError`` (not done yet);
- ``error``: it raised ``PermanentError`` or anything unexpected (also counted by
  ``vmo_controller_reconcile_errors_total``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

SUCCESS, REQUEUE, ERROR = "success", "requeue", "error"
RESULTS = (SUCCESS, REQUEUE, ERROR)

# From a cache-only pass (a millisecond) to one that waits on a slow API (a minute).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)  # fmt: skip

QUEUE_DEPTH = "vmo_controller_queue_depth"

RECONCILES = Counter(
    "vmo_controller_reconcile_total",
    "Reconciles by result (success, error, requeue)",
    ["controller", "result"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "vmo_controller_reconcile_errors_total",
    "Reconciles that failed (a permanent error or an unexpected exception)",
    ["controller"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "vmo_controller_reconcile_duration_seconds",
    "How long one reconcile took",
    ["controller"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)


@dataclass(frozen=True)
class ReconcileMetrics:
    """One controller's series, bound once (each ``labels()`` look-up takes a lock)."""

    controller: str
    reconciles: dict[str, Counter]
    errors: Counter
    duration: Histogram

    @classmethod
    def of(cls, controller: str) -> ReconcileMetrics:
        return cls(
            controller,
            {result: RECONCILES.labels(controller, result) for result in RESULTS},
            RECONCILE_ERRORS.labels(controller),
            RECONCILE_DURATION.labels(controller),
        )

    def observe(self, result: str, seconds: float) -> None:
        self.duration.observe(seconds)
        self.reconciles[result].inc()
        if result == ERROR:
            self.errors.inc()


class Queued(Protocol):
    """What the depth collector reads of a running controller."""

    @property
    def name(self) -> str: ...

    @property
    def queue(self) -> Sized: ...


class QueueDepths(Collector):
    """``vmo_controller_queue_depth``: the keys ready to be handed out (client-go's depth: not
    those a worker holds, nor those whose delay has not run out), read from the queues of the
    running controllers at scrape time, so the loop itself pays nothing for it."""

    def __init__(self) -> None:
        # by id: a controller need not be hashable (a dataclass's may not be)
        self._running: weakref.WeakValueDictionary[int, Queued] = weakref.WeakValueDictionary()

    def add(self, controller: Queued) -> None:
        self._running[id(controller)] = controller

    def discard(self, controller: Queued) -> None:
        self._running.pop(id(controller), None)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depths: dict[str, int] = {}
        for controller in list(self._running.values()):
            depths[controller.name] = depths.get(controller.name, 0) + len(controller.queue)
        family = self._family()
        for name, depth in sorted(depths.items()):
            family.add_metric([name], depth)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            QUEUE_DEPTH, "Keys waiting in the controller's work queue", labels=["controller"]
        )


QUEUE_DEPTHS = QueueDepths()
REGISTRY.register(QUEUE_DEPTHS)
