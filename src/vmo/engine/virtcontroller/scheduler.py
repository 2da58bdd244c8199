"""The embedded engine's scheduler (kube-scheduler's role for virt-launcher pods): it watches VMIs
and Nodes and writes each waiting VMI's placement, decided by vmo.api.scheduling's ``place()``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from vmo.api.annotations import STORAGE_NODE
from vmo.api.scheduling import (
    CPU_ALLOCATION_RATIO,
    HOSTNAME_LABEL,
    MEMORY_OVERHEAD_BYTES,
    NODE_NAME_LABEL,
    InvalidRequest,
    Placement,
    ResourceRequest,
    Scheduled,
    Unschedulable,
    feasible_nodes,
    place,
    vmi_request,
)
from vmo.api.storage import SELECTED_NODE
from vmo.client import (
    CONFIGMAP,
    DATAVOLUME,
    NODE,
    PVC,
    TRANSIENT_ERRORS,
    VMI,
    ApiStatusError,
    Client,
    Conflict,
    NotFound,
)
from vmo.engine.storage.importer import is_shared
from vmo.engine.virtcontroller.extenders import (
    CONFIGMAP_NAME,
    CONFIGMAP_NAMESPACE,
    Extender,
    ExtenderError,
    parse_extenders,
    prioritize,
)
from vmo.runtime import Controller, EventRecorder, Result, Watch

__all__ = [
    "CPU_ALLOCATION_RATIO",
    "HOSTNAME_LABEL",
    "MEMORY_OVERHEAD_BYTES",
    "InvalidRequest",
    "Placement",
    "ResourceRequest",
    "Scheduled",
    "SchedulerController",
    "Unschedulable",
    "local_volume_nodes",
    "place",
    "scheduled_vmi",
    "unschedulable_vmi",
    "vmi_request",
]

log = logging.getLogger(__name__)

JSON = dict[str, Any]
UNSCHEDULED_PHASES = ("", "Pending", "Scheduling")

# --- VMI status updates ----------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _with_phase(status: JSON, phase: str, stamp: str) -> JSON:
    new = dict(status)
    if new.get("phase") != phase:
        transitions = list(new.get("phaseTransitionTimestamps") or [])
        transitions.append({"phase": phase, "phaseTransitionTimestamp": stamp})
        new["phaseTransitionTimestamps"] = transitions
    new["phase"] = phase
    return new


def _with_pod_scheduled(status: JSON, cond: JSON, stamp: str) -> JSON:
    conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
    old: JSON = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {}
    )
    same = old.get("status") == cond["status"]
    cond = {
        "type": "PodScheduled",
        "lastProbeTime": None,
        "lastTransitionTime": old.get("lastTransitionTime") if same else stamp,
        **cond,
    }
    return {**status, "conditions": [*conditions, cond]}


def scheduled_vmi(vmi: JSON, node: str, stamp: str) -> JSON:
    """The VMI bound to ``node``: phase Scheduled, status.nodeName, label kubevirt.io/nodeName."""
    status = _with_phase(vmi.get("status") or {}, "Scheduled", stamp)
    status["nodeName"] = node
    status = _with_pod_scheduled(status, {"status": "True"}, stamp)
    md = dict(vmi["metadata"])
    md["labels"] = {**(md.get("labels") or {}), NODE_NAME_LABEL: node}
    return {**vmi, "metadata": md, "status": status}


def unschedulable_vmi(
    vmi: JSON, message: str, stamp: str, *, reason: str = "Unschedulable"
) -> JSON:
    """The VMI waiting in phase Scheduling with PodScheduled=False (reason Unschedulable)."""
    status = _with_phase(vmi.get("status") or {}, "Scheduling", stamp)
    cond = {"status": "False", "reason": reason, "message": message}
    return {**vmi, "status": _with_pod_scheduled(status, cond, stamp)}


def needs_scheduling(vmi: JSON) -> bool:
    status = vmi.get("status") or {}
    return (
        not status.get("nodeName")
        and status.get("phase", "") in UNSCHEDULED_PHASES
        and not vmi.get("metadata", {}).get("deletionTimestamp")
    )


def _creation_order(vmi: JSON) -> tuple[str, str, str]:
    md = vmi.get("metadata", {})
    return (md.get("creationTimestamp", ""), md.get("namespace", ""), md.get("name", ""))


# --- the shell -------------------------------------------------------------------------------------


# Failures of the API rather than of one VMI's data.
_API_FAILURES: tuple[type[Exception], ...] = (ApiStatusError, *TRANSIENT_ERRORS)

PASS_KEY = "pending"
"""The scheduler's one work-queue key: a pass looks at every waiting VMI."""

REASON_INVALID = "InvalidRequest"


class SchedulerController(Controller):
    """Watches VMIs and Nodes; places every VMI waiting for a node, oldest first.

    Watch events only wake it (they all queue the one key ``PASS_KEY``): each pass lists Nodes
    and VMIs afresh, so nothing stale is placed against. The VMI kind has no status subresource
    (as upstream), so the whole VMI is replaced, guarded by its resourceVersion: a VMI that
    changed meanwhile is looked at again. One VMI that cannot be placed (bad data included)
    gets PodScheduled=False saying why, and the pass goes on with the others.
    """

    name = "virt-controller-scheduler"
    workers = 1
    resync_seconds = 10.0

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.events = EventRecorder(client, component="virt-controller", clock=self.clock)
        self._extenders: list[Extender] = []

    def watches(self) -> Sequence[Watch]:
        return [Watch(NODE, _pass_key), Watch(VMI, _pass_key)]

    def resync_keys(self) -> list[str]:
        return [PASS_KEY]

    async def reconcile(self, key: str) -> Result | None:
        await self.schedule_pending()
        return None

    async def schedule_pending(self) -> int:
        """One pass over every VMI waiting for a node, oldest first; returns how many it placed."""
        nodes, _ = await self.client.list(NODE)
        vmis, _ = await self.client.list(VMI)
        waiting = sorted((v for v in vmis if needs_scheduling(v)), key=_creation_order)
        if not waiting:
            return 0
        volumes = await local_volume_nodes(self.client)
        self._extenders = parse_extenders(
            await self.client.find(CONFIGMAP, CONFIGMAP_NAME, CONFIGMAP_NAMESPACE)
        )
        placed = 0
        for vmi in waiting:
            fresh = await self._schedule_one(vmi, nodes, vmis, volumes)
            if fresh is not None and fresh.get("status", {}).get("nodeName"):
                # later VMIs of this pass see the capacity this one took
                vmis = [fresh if _vmi_key(v) == _vmi_key(fresh) else v for v in vmis]
                placed += 1
        return placed

    async def _schedule_one(
        self,
        vmi: JSON,
        nodes: list[JSON],
        vmis: list[JSON],
        volumes: Mapping[tuple[str, str], str],
    ) -> JSON | None:
        try:
            return await self.schedule(vmi, nodes, vmis, volumes)
        except _API_FAILURES:
            raise  # the API, not this VMI: the whole pass is retried
        except (InvalidRequest, ExtenderError) as exc:
            return await self._fail_alone(vmi, exc)
        except Exception as exc:  # malformed data, or a bug: it still fails this VMI alone
            log.exception("placing VMI %s failed", _vmi_key(vmi))
            return await self._fail_alone(vmi, exc)

    async def _fail_alone(self, vmi: JSON, exc: Exception) -> JSON | None:
        """PodScheduled=False saying why, and an Event (recorded once: it also reaches users
        whose VMI cannot be written at all)."""
        log.warning("VMI %s/%s cannot be scheduled: %s", *_vmi_key(vmi), exc)
        message = f"the VMI cannot be placed: {type(exc).__name__}: {exc}"
        updated = unschedulable_vmi(vmi, message, _now(), reason=REASON_INVALID)
        if updated["status"] == vmi.get("status"):
            return None  # already says so
        await self.events.record(vmi, "FailedScheduling", message, type_="Warning")
        return await self._write(updated)

    async def schedule(
        self,
        vmi: JSON,
        nodes: list[JSON],
        vmis: list[JSON],
        volume_nodes: Mapping[tuple[str, str], str] | None = None,
    ) -> JSON | None:
        """Places one VMI and writes the result; returns the VMI as stored (None if not written).
        The configured extenders weigh in on the nodes that pass the filters."""
        extra: dict[str, float] = {}
        if self._extenders:
            fits = [
                n for n, why in feasible_nodes(vmi, nodes, vmis, volume_nodes).items() if not why
            ]
            extra = await prioritize(self._extenders, vmi, fits, self.client.creds.token)
        placement = place(vmi, nodes, vmis, volume_nodes, extra)
        stamp = _now()
        if isinstance(placement, Unschedulable):
            updated = unschedulable_vmi(vmi, placement.message, stamp)
            return await self._write(updated) if updated["status"] != vmi.get("status") else None
        if vmi.get("status", {}).get("phase") != "Scheduling":
            # pass through Scheduling first, as a VMI does while its pod is created
            written = await self._write(_with_phase_vmi(vmi, "Scheduling", stamp))
            if written is None:
                return None
            vmi = written
        return await self._write(scheduled_vmi(vmi, placement.node, stamp))

    async def _write(self, vmi: JSON) -> JSON | None:
        md = vmi["metadata"]
        try:
            return await self.client.replace(VMI, vmi)
        except (Conflict, NotFound):
            return None  # changed or gone meanwhile: the watch wakes the next pass
        except ApiStatusError as exc:
            log.warning("VMI %s/%s not updated: %s", md.get("namespace"), md["name"], exc)
            return None


async def local_volume_nodes(client: Client) -> dict[tuple[str, str], str]:
    """(namespace, claim) -> node, for every DataVolume held in one node's local pool."""
    dvs, _ = await client.list(DATAVOLUME)
    found = {}
    for dv in dvs:
        md = dv["metadata"]
        holder = (md.get("annotations") or {}).get(STORAGE_NODE)
        if holder and not is_shared(dv):
            found[(str(md.get("namespace", "")), str(md["name"]))] = str(holder)
    # standalone claims bound to a node's own pool (their PV's node affinity)
    pvcs, _ = await client.list(PVC)
    for pvc in pvcs:
        md = pvc["metadata"]
        selected = (md.get("annotations") or {}).get(SELECTED_NODE)
        key = (str(md.get("namespace", "")), str(md["name"]))
        if selected and key not in found:
            found[key] = str(selected)
    return found


def _with_phase_vmi(vmi: JSON, phase: str, stamp: str) -> JSON:
    return {**vmi, "status": _with_phase(vmi.get("status") or {}, phase, stamp)}


def _pass_key(_etype: str, _obj: JSON) -> list[str]:
    return [PASS_KEY]


def _vmi_key(vmi: JSON) -> tuple[str, str]:
    md = vmi["metadata"]
    return (md.get("namespace", ""), md["name"])
