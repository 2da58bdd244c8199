"""Core v1 Events about the objects a controller manages, aggregated as client-go's recorder does.

A repeat of the same reason and message on the same object bumps ``count`` and
``lastTimestamp`` of the existing Event instead of creating another.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vmo.client import EVENT, TRANSIENT_ERRORS, ApiStatusError, Client
from vmo.runtime._clock import SYSTEM_CLOCK, Clock
from vmo.runtime._status import timestamp

log = logging.getLogger(__name__)

JSON = dict[str, Any]

# Failures that lose an Event, never the reconcile that made it.
_UNRECORDED: tuple[type[Exception], ...] = (ApiStatusError, *TRANSIENT_ERRORS)

# How many (object, reason, message) keys are remembered for aggregating repeats.
MAX_REMEMBERED = 4096


def involved_object(obj: JSON) -> JSON:
    md = obj["metadata"]
    ref = {
        "apiVersion": obj.get("apiVersion", ""),
        "kind": obj.get("kind", ""),
        "name": md["name"],
        "uid": md.get("uid", ""),
        "resourceVersion": md.get("resourceVersion", ""),
    }
    if md.get("namespace"):
        ref["namespace"] = md["namespace"]
    return ref


def event_object(
    obj: JSON, reason: str, message: str, *, type_: str, component: str, stamp: str
) -> JSON:
    """A new Event about ``obj`` (named ``<object>.<hex nanoseconds>`` like client-go's)."""
    md = obj["metadata"]
    return {
        "metadata": {
            "name": f"{md['name']}.{time.time_ns():x}",
            "namespace": md.get("namespace") or "default",
        },
        "involvedObject": involved_object(obj),
        "reason": reason,
        "message": message,
        "type": type_,
        "source": {"component": component},
        "reportingComponent": component,
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
    }


class EventRecorder:
    """Records Events; never raises (an Event is worth less than the reconcile that made it)."""

    def __init__(self, client: Client, *, component: str, clock: Clock = SYSTEM_CLOCK) -> None:
        self.client = client
        self.component = component
        self.clock = clock
        # (object uid, reason, message) -> (event namespace, event name, count)
        self._seen: dict[tuple[str, str, str], tuple[str, str, int]] = {}

    async def record(self, obj: JSON, reason: str, message: str, *, type_: str = "Normal") -> None:
        uid = obj["metadata"].get("uid", "")
        key = (uid, reason, message)
        try:
            if key in self._seen:
                namespace, name, count = self._seen[key]
                patch = {"count": count + 1, "lastTimestamp": timestamp(self.clock.now())}
                await self.client.patch(EVENT, name, patch, namespace)
                self._seen[key] = (namespace, name, count + 1)
                return
            if len(self._seen) >= MAX_REMEMBERED:
                self._seen.clear()  # only aggregation is lost, never an Event
            event = event_object(
                obj,
                reason,
                message,
                type_=type_,
                component=self.component,
                stamp=timestamp(self.clock.now()),
            )
            await self.client.create(EVENT, event)
            self._seen[key] = (event["metadata"]["namespace"], event["metadata"]["name"], 1)
        except _UNRECORDED as exc:
            self._seen.pop(key, None)
            log.info("event %s on %s not recorded: %s", reason, obj["metadata"]["name"], exc)
