"""VMO's controller runtime: informers, a rate-limited work queue, the reconcile loop, status
helpers, Events, leader election and the controllers' metrics. It imports only ``vmo.client``
and ``vmo.api``, so the engine's KubeVirt-role controllers and VMO's own controllers share it,
in the embedded mode and against a real cluster alike."""

from vmo.runtime._clock import SYSTEM_CLOCK, Clock, FakeClock, SystemClock, Timer
from vmo.runtime._controller import (
    SHUTDOWN_GRACE_SECONDS,
    Controller,
    KeysOf,
    Stats,
    Watch,
    own_key,
    split_key,
)
from vmo.runtime._events import EventRecorder, event_object, involved_object
from vmo.runtime._informer import (
    ADDED,
    DELETED,
    MODIFIED,
    Informer,
    Informers,
    Selector,
    object_key,
)
from vmo.runtime._leader import LeaderElector, LeaseTiming, ensure_namespace
from vmo.runtime._manager import Manager, Runnable
from vmo.runtime._metrics import QUEUE_DEPTHS, QueueDepths, ReconcileMetrics
from vmo.runtime._queue import Backoff, RateLimitedQueue
from vmo.runtime._result import DONE, PermanentError, ReconcileError, Result, TemporaryError
from vmo.runtime._status import (
    condition,
    find_condition,
    merge_conditions,
    micro_timestamp,
    observed_generation,
    parse_timestamp,
    set_condition,
    timestamp,
)

__all__ = [
    "ADDED",
    "DELETED",
    "DONE",
    "MODIFIED",
    "QUEUE_DEPTHS",
    "SHUTDOWN_GRACE_SECONDS",
    "SYSTEM_CLOCK",
    "Backoff",
    "Clock",
    "Controller",
    "EventRecorder",
    "FakeClock",
    "Informer",
    "Informers",
    "KeysOf",
    "LeaderElector",
    "LeaseTiming",
    "Manager",
    "PermanentError",
    "QueueDepths",
    "RateLimitedQueue",
    "ReconcileError",
    "ReconcileMetrics",
    "Result",
    "Runnable",
    "Selector",
    "Stats",
    "SystemClock",
    "TemporaryError",
    "Timer",
    "Watch",
    "condition",
    "ensure_namespace",
    "event_object",
    "find_condition",
    "involved_object",
    "merge_conditions",
    "micro_timestamp",
    "object_key",
    "observed_generation",
    "own_key",
    "parse_timestamp",
    "set_condition",
    "split_key",
    "timestamp",
]
