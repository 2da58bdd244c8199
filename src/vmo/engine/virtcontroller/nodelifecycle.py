"""The node lifecycle controller (kube-controller-manager's role): a node whose agent stops
renewing its Lease is marked ``Ready=Unknown`` and tainted ``node.kubernetes.io/unreachable``.

``node_health()`` is the pure core: from a Node, its Lease and the time, the conditions and
taints the Node should carry. A node is heard from when its Lease is renewed or its Ready
condition's heartbeat moves; past the grace period without either, every condition the agent
posts turns Unknown ("Kubelet stopped posting node status.", as upstream), and the taints that
go with Ready's status (unreachable for Unknown, not-ready for False; NoSchedule and NoExecute)
are kept in ``spec.taints``. They go as the agent posts Ready=True again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmo.client import LEASE, NODE, Client, Conflict, NotFound
from vmo.runtime import Controller, Result, Selector, Watch, parse_timestamp, timestamp

log = logging.getLogger(__name__)

JSON = dict[str, Any]

LEASE_NAMESPACE = "kube-node-lease"
# kube-controller-manager's --node-monitor-grace-period (50 s since Kubernetes 1.32) and
# --node-monitor-period
DEFAULT_GRACE_PERIOD = 50.0
DEFAULT_MONITOR_PERIOD = 5.0
GRACE_ENV = "VMO_NODE_MONITOR_GRACE_PERIOD"
PERIOD_ENV = "VMO_NODE_MONITOR_PERIOD"

UNREACHABLE = "node.kubernetes.io/unreachable"
NOT_READY = "node.kubernetes.io/not-ready"
CONDITION_TAINTS = {"Unknown": UNREACHABLE, "False": NOT_READY}
EFFECTS = ("NoSchedule", "NoExecute")
STATUS_UNKNOWN = "NodeStatusUnknown"
STATUS_UNKNOWN_MESSAGE = "Kubelet stopped posting node status."
NEVER_UPDATED = "NodeStatusNeverUpdated"
NEVER_UPDATED_MESSAGE = "Kubelet never posted node status."
# the conditions a kubelet posts, which go Unknown with it
KUBELET_CONDITIONS = ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure")


@dataclass(frozen=True)
class NodeMonitorSettings:
    """How long a node may go unheard before it is Unknown, and how often that is checked."""

    grace_period: float = DEFAULT_GRACE_PERIOD
    monitor_period: float = DEFAULT_MONITOR_PERIOD

    @classmethod
    def from_environment(cls) -> NodeMonitorSettings:
        """The defaults, or seconds from ``$VMO_NODE_MONITOR_GRACE_PERIOD`` and
        ``$VMO_NODE_MONITOR_PERIOD`` (tests shorten them; a bad value is an error)."""
        return cls(
            grace_period=float(os.environ.get(GRACE_ENV) or DEFAULT_GRACE_PERIOD),
            monitor_period=float(os.environ.get(PERIOD_ENV) or DEFAULT_MONITOR_PERIOD),
        )


@dataclass(frozen=True)
class NodeHealth:
    """What the Node should carry now, and when to look again if nothing changes."""

    conditions: list[JSON]
    taints: list[JSON]
    recheck_after: float | None


def _time(value: object) -> datetime | None:
    try:
        return parse_timestamp(str(value)) if value else None
    except ValueError:
        return None


def last_heard(node: JSON, lease: JSON | None) -> datetime | None:
    """The newest of the Lease's renewTime, Ready's lastHeartbeatTime and (for a node never
    heard from) its creation."""
    conditions = (node.get("status") or {}).get("conditions") or []
    ready: JSON = next((c for c in conditions if c.get("type") == "Ready"), {})
    stamps = [
        _time(((lease or {}).get("spec") or {}).get("renewTime")),
        _time(ready.get("lastHeartbeatTime")),
        _time((node.get("metadata") or {}).get("creationTimestamp")),
    ]
    found = [s for s in stamps if s is not None]
    return max(found) if found else None


def _unknown_conditions(conditions: list[JSON], stamp: str) -> list[JSON]:
    out = []
    for cond in conditions:
        if cond.get("type") in KUBELET_CONDITIONS and cond.get("status") != "Unknown":
            cond = {**cond, "status": "Unknown", "reason": STATUS_UNKNOWN,
                    "message": STATUS_UNKNOWN_MESSAGE, "lastTransitionTime": stamp}  # fmt: skip
        out.append(cond)
    if not any(c.get("type") == "Ready" for c in out):
        out.append({"type": "Ready", "status": "Unknown", "reason": NEVER_UPDATED,
                    "message": NEVER_UPDATED_MESSAGE, "lastTransitionTime": stamp})  # fmt: skip
    return out


def ready_status(conditions: Iterable[JSON]) -> str:
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    return str((ready or {}).get("status") or "Unknown")


def condition_taints(taints: Sequence[JSON], ready: str, stamp: str) -> list[JSON]:
    """``taints`` with this controller's own (unreachable, not-ready) made to follow ``ready``;
    a taint already there keeps its timeAdded; other taints are left alone."""
    wanted = CONDITION_TAINTS.get(ready)
    kept = [t for t in taints if t.get("key") not in CONDITION_TAINTS.values() or
            t.get("key") == wanted]  # fmt: skip
    if wanted is None:
        return kept
    for effect in EFFECTS:
        if not any(t.get("key") == wanted and t.get("effect") == effect for t in kept):
            taint: JSON = {"key": wanted, "effect": effect}
            if effect == "NoExecute":
                taint["timeAdded"] = stamp
            kept.append(taint)
    return kept


def node_health(
    node: JSON, lease: JSON | None, now: datetime, settings: NodeMonitorSettings
) -> NodeHealth:
    """The conditions and taints ``node`` should carry at ``now``."""
    conditions = [dict(c) for c in (node.get("status") or {}).get("conditions") or []]
    stamp = timestamp(now)
    heard = last_heard(node, lease)
    silent = (now - heard).total_seconds() if heard is not None else float("inf")
    recheck: float | None = None
    if silent > settings.grace_period:
        conditions = _unknown_conditions(conditions, stamp)
    else:
        recheck = settings.grace_period - silent + 0.05
    taints = (node.get("spec") or {}).get("taints") or []
    taints = condition_taints(taints, ready_status(conditions), stamp)
    return NodeHealth(conditions, taints, recheck)


class NodeLifecycleController(Controller):
    """Keeps every Node's Ready condition and unreachable/not-ready taints true to its
    heartbeat; keys are node names. A pass every ``monitor_period`` looks at every node."""

    name = "node-lifecycle-controller"
    workers = 1

    def __init__(self, client: Client, settings: NodeMonitorSettings | None = None) -> None:
        super().__init__(client)
        self.settings = settings or NodeMonitorSettings.from_environment()
        self.resync_seconds = self.settings.monitor_period

    def watches(self) -> Sequence[Watch]:
        return [Watch(NODE), Watch(Selector(LEASE, namespace=LEASE_NAMESPACE), _lease_node)]

    async def reconcile(self, key: str) -> Result | None:
        node = await self.client.find(NODE, key)
        if node is None:
            return None
        lease = await self.client.find(LEASE, key, LEASE_NAMESPACE)
        health = node_health(node, lease, datetime.now(UTC), self.settings)
        try:
            await self._write(node, health)
        except (Conflict, NotFound):
            return Result.after(0.2)  # the agent wrote meanwhile: look again at the fresh Node
        return Result(health.recheck_after)

    async def _write(self, node: JSON, health: NodeHealth) -> None:
        md = node["metadata"]
        name, version = md["name"], md.get("resourceVersion")
        old_conditions = (node.get("status") or {}).get("conditions") or []
        if health.conditions != old_conditions:
            log.info("node %s: Ready=%s", name, ready_status(health.conditions))
            guard = {"resourceVersion": version}
            node = await self.client.patch(
                NODE, name, {"metadata": guard, "status": {"conditions": health.conditions}},
                subresource="status",
            )  # fmt: skip
            version = node["metadata"].get("resourceVersion")
        if health.taints != ((node.get("spec") or {}).get("taints") or []):
            with contextlib.suppress(NotFound):
                patch = {"metadata": {"resourceVersion": version},
                         "spec": {"taints": health.taints or None}}  # fmt: skip
                await self.client.patch(NODE, name, patch)


def _lease_node(_etype: str, lease: JSON) -> list[str]:
    return [str(lease["metadata"]["name"])]


__all__ = [
    "NOT_READY",
    "UNREACHABLE",
    "NodeHealth",
    "NodeLifecycleController",
    "NodeMonitorSettings",
    "condition_taints",
    "last_heard",
    "node_health",
]
