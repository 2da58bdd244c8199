"""The migration controller (virt-controller's part of live migration), per docs/migration.md.

``decide()`` is pure: from a VirtualMachineInstanceMigration, its VMI, the Nodes, every VMI and
every migration, and the resolved migration configuration, it returns the migration's next
status, the JSON merge patch to apply to the VMI (``metadata.labels`` and
``status.migrationState`` keys only), finalizer changes, Events and when to look again.
``MigrationController`` is the shell that reads fresh state, applies a decision and records
Events. The node agents do the moving; everything between them and this controller goes
through the VMI's ``status.migrationState``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vmo.client import (
    KUBEVIRT,
    NAMESPACE,
    NODE,
    VMI,
    VMIM,
    Client,
    NotFound,
)
from vmo.engine.virtcontroller.migrationconfig import (
    MIGRATIONPOLICY,
    MigrationConfig,
    MigrationConfigError,
    active_kubevirt,
    resolve_migration_config,
)
from vmo.engine.virtcontroller.scheduler import HOSTNAME_LABEL, Unschedulable, place
from vmo.engine.virtcontroller.vmstate import deleting, format_time, parse_time
from vmo.runtime import DELETED, Controller, EventRecorder, Result, Watch, split_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]

FINALIZER = "kubevirt.io/migrationJobFinalize"
TARGET_NODE_LABEL = "kubevirt.io/migrationTargetNodeName"
UNSCHEDULABLE_TIMEOUT_ANNOTATION = "kubevirt.io/migrationUnschedulablePodTimeoutSeconds"
PENDING_TIMEOUT_ANNOTATION = "kubevirt.io/migrationPendingPodTimeoutSeconds"
DEFAULT_UNSCHEDULABLE_TIMEOUT_SECONDS = 300
DEFAULT_PENDING_TIMEOUT_SECONDS = 900
CAPACITY_RETRY_SECONDS = 5.0

# Event reasons and VMIM condition types, as upstream names them.
REASON_SUCCEEDED = "SuccessfulMigration"
REASON_FAILED = "FailedMigration"
REASON_ABORT = "SuccessfulAbortMigration"
REASON_UNSCHEDULABLE = "migrationTargetPodUnschedulable"
CONDITION_ABORT_REQUESTED = "migrationAbortRequested"
# VMO's own: no target pod exists to carry these, so the migration does.
CONDITION_SCHEDULED = "PodScheduled"
CONDITION_FAILED = "Failed"

# The characters Kubernetes' generateName suffixes are drawn from.
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class MigrationPhase(enum.StrEnum):
    PENDING = "Pending"
    SCHEDULING = "Scheduling"
    SCHEDULED = "Scheduled"
    PREPARING_TARGET = "PreparingTarget"
    TARGET_READY = "TargetReady"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


P = MigrationPhase
IN_FLIGHT = (P.SCHEDULING, P.SCHEDULED, P.PREPARING_TARGET, P.TARGET_READY, P.RUNNING)
FINAL = (P.SUCCEEDED, P.FAILED)


@dataclass(frozen=True)
class MigrationEvent:
    """An Event to record on the migration."""

    reason: str
    message: str
    type: str = "Normal"


@dataclass(frozen=True)
class MigrationDecision:
    """What the shell writes for one migration, in this order: the VMI patch, the status, the
    finalizer."""

    status: JSON
    vmi_patch: JSON | None = None  # JSON merge patch: metadata.labels / status.migrationState keys
    guard_vmi: bool = False  # send the VMI's resourceVersion with the patch (a new handoff)
    add_finalizer: bool = False
    remove_finalizer: bool = False
    events: tuple[MigrationEvent, ...] = ()
    requeue_after: float | None = None


@dataclass
class _Plan:
    vmim: JSON
    vmi: JSON | None
    status: JSON
    now: datetime
    state: JSON | None  # the VMI's migrationState, when it belongs to this migration
    labels: JSON = field(default_factory=dict)
    state_patch: JSON = field(default_factory=dict)
    guard: bool = False
    events: list[MigrationEvent] = field(default_factory=list)
    requeue_after: float | None = None

    @property
    def phase(self) -> str:
        return str(self.status.get("phase") or "")

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.requeue_after = (
            seconds if self.requeue_after is None else min(self.requeue_after, seconds)
        )


@dataclass(frozen=True)
class ClusterState:
    """What placement and parallelism are decided against."""

    nodes: Sequence[JSON]
    vmis: Sequence[JSON]
    vmims: Sequence[JSON]


# --- small readers ---------------------------------------------------------------------------------


def _md(obj: JSON | None) -> JSON:
    return dict((obj or {}).get("metadata") or {})


def migration_phase(vmim: JSON) -> str:
    return str((vmim.get("status") or {}).get("phase") or "")


def is_final(vmim: JSON) -> bool:
    return migration_phase(vmim) in FINAL


def migration_state(vmi: JSON | None) -> JSON:
    return dict(((vmi or {}).get("status") or {}).get("migrationState") or {})


def owned_state(vmim: JSON, vmi: JSON | None) -> JSON | None:
    """The VMI's migrationState when it carries this migration's uid."""
    state = migration_state(vmi)
    uid = _md(vmim).get("uid")
    return state if uid and state.get("migrationUid") == uid else None


def _state_final(state: JSON) -> bool:
    return bool(state.get("completed") or state.get("failed"))


def _same(a: JSON, b: JSON) -> bool:
    ma, mb = _md(a), _md(b)
    if ma.get("uid") and mb.get("uid"):
        return bool(ma["uid"] == mb["uid"])
    return (ma.get("namespace"), ma.get("name")) == (mb.get("namespace"), mb.get("name"))


def _creation_order(obj: JSON) -> tuple[str, str, str]:
    md = _md(obj)
    return (
        str(md.get("creationTimestamp", "")),
        str(md.get("namespace", "")),
        str(md.get("name", "")),
    )


def _annotation_seconds(vmim: JSON, key: str, default: int) -> int:
    raw = (_md(vmim).get("annotations") or {}).get(key)
    try:
        return int(str(raw)) if raw is not None else default
    except ValueError:
        log.warning(
            "migration %s: annotation %s=%r is not an integer", _md(vmim).get("name"), key, raw
        )
        return default


def _entered(status: JSON, phase: str, fallback: str) -> datetime:
    """When the migration last entered ``phase`` (its creation when never recorded)."""
    stamps = [
        t.get("phaseTransitionTimestamp")
        for t in status.get("phaseTransitionTimestamps") or []
        if t.get("phase") == phase and t.get("phaseTransitionTimestamp")
    ]
    return parse_time(str(stamps[-1] if stamps else fallback))


def target_pod_name(vmi_name: str, migration_uid: str) -> str:
    """``virt-launcher-<vmi>-<5 chars>``, derived from the migration so a retry names it again."""
    digest = hashlib.sha256(migration_uid.encode()).digest()
    suffix = "".join(_NAME_ALPHABET[b % len(_NAME_ALPHABET)] for b in digest[:5])
    return f"virt-launcher-{vmi_name}-{suffix}"


# --- status edits ----------------------------------------------------------------------------------


def _set_phase(plan: _Plan, phase: MigrationPhase) -> None:
    if plan.status.get("phase") == phase:
        return
    transitions = list(plan.status.get("phaseTransitionTimestamps") or [])
    transitions.append({"phase": str(phase), "phaseTransitionTimestamp": format_time(plan.now)})
    plan.status["phaseTransitionTimestamps"] = transitions
    plan.status["phase"] = str(phase)


def _set_condition(plan: _Plan, cond: JSON) -> bool:
    """Sets a condition; returns whether its status, reason or message changed."""
    conditions = list(plan.status.get("conditions") or [])
    old = next((c for c in conditions if c.get("type") == cond["type"]), None)
    stamp = format_time(plan.now)
    if old is not None and old.get("status") == cond.get("status"):
        stamp = old.get("lastTransitionTime") or stamp
    new = {"lastProbeTime": None, "lastTransitionTime": stamp, **cond}
    plan.status["conditions"] = [c for c in conditions if c.get("type") != cond["type"]] + [new]
    keys = ("status", "reason", "message")
    return old is None or any(old.get(k) != new.get(k) for k in keys)


def _remove_condition(plan: _Plan, ctype: str) -> None:
    conditions = [c for c in plan.status.get("conditions") or [] if c.get("type") != ctype]
    if conditions:
        plan.status["conditions"] = conditions
    else:
        plan.status.pop("conditions", None)


def _fail(plan: _Plan, message: str) -> None:
    """Fails the migration: phase, a condition carrying why, and a FailedMigration Event."""
    _set_phase(plan, P.FAILED)
    _set_condition(
        plan,
        {
            "type": CONDITION_FAILED,
            "status": "True",
            "reason": REASON_FAILED,
            "message": message,
        },
    )
    plan.events.append(MigrationEvent(REASON_FAILED, message, "Warning"))


def _fail_on_vmi(plan: _Plan, reason: str) -> None:
    """Marks this migration failed in the VMI's migrationState too (nobody else will)."""
    if plan.state is not None and not _state_final(plan.state):
        plan.state_patch.update(
            {"failed": True, "failureReason": reason, "endTimestamp": format_time(plan.now)}
        )
    _fail(plan, reason)


# --- target placement ------------------------------------------------------------------------------


def target_candidate(vmi: JSON, vmim: JSON) -> JSON:
    """A copy of ``vmi`` as its migration target must be placed: the migration's
    ``addedNodeSelector`` merged under the VMI's own nodeSelector, and every required
    node-affinity term (or a new one) refusing the source node."""
    source = str((vmi.get("status") or {}).get("nodeName") or "")
    candidate = copy.deepcopy(vmi)
    spec = candidate.setdefault("spec", {})
    added = (vmim.get("spec") or {}).get("addedNodeSelector") or {}
    spec["nodeSelector"] = {**added, **(spec.get("nodeSelector") or {})}
    not_source_label = {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": [source]}
    not_source_name = {"key": "metadata.name", "operator": "NotIn", "values": [source]}
    affinity = spec.setdefault("affinity", {}) or {}
    spec["affinity"] = affinity
    node_affinity = affinity.setdefault("nodeAffinity", {}) or {}
    affinity["nodeAffinity"] = node_affinity
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = list(required.get("nodeSelectorTerms") or []) or [{}]
    new_terms = []
    for term in terms:
        term = dict(term)
        term["matchExpressions"] = [*(term.get("matchExpressions") or []), not_source_label]
        term["matchFields"] = [*(term.get("matchFields") or []), not_source_name]
        new_terms.append(term)
    node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
        **required,
        "nodeSelectorTerms": new_terms,
    }
    return candidate


def handoff_state(vmim: JSON, vmi: JSON, target: str, config: MigrationConfig) -> JSON:
    """The VMI's migrationState for a migration just handed to the node agents."""
    state: JSON = {
        "migrationUid": _md(vmim).get("uid", ""),
        "sourceNode": (vmi.get("status") or {}).get("nodeName", ""),
        "targetNode": target,
        "targetPod": target_pod_name(str(_md(vmi).get("name", "")), str(_md(vmim).get("uid", ""))),
        "migrationConfiguration": config.as_json(),
        "mode": "PreCopy",
    }
    if config.policy_name:
        state["migrationPolicyName"] = config.policy_name
    return state


# --- parallelism -----------------------------------------------------------------------------------


def _source_node(vmim: JSON, vmis_by_key: Mapping[tuple[str, str], JSON]) -> str:
    state = (vmim.get("status") or {}).get("migrationState") or {}
    if state.get("sourceNode"):
        return str(state["sourceNode"])
    key = (str(_md(vmim).get("namespace", "")), str((vmim.get("spec") or {}).get("vmiName", "")))
    return str(((vmis_by_key.get(key) or {}).get("status") or {}).get("nodeName") or "")


def admitted(vmim: JSON, cluster: ClusterState, config: MigrationConfig) -> bool:
    """Whether ``vmim`` may leave Pending now: the in-flight migrations plus the older pending
    ones that fit leave room for it, cluster-wide and on its source node."""
    vmis_by_key = {
        (str(_md(v).get("namespace", "")), str(_md(v).get("name", ""))): v for v in cluster.vmis
    }
    others = [m for m in cluster.vmims if not _same(m, vmim)]
    in_flight = [m for m in others if migration_phase(m) in IN_FLIGHT]
    total = len(in_flight)
    per_node = Counter(_source_node(m, vmis_by_key) for m in in_flight)
    waiting = [m for m in others if migration_phase(m) in ("", P.PENDING) and not deleting(m)]
    for m in sorted([*waiting, vmim], key=_creation_order):
        node = _source_node(m, vmis_by_key)
        fits = (
            total < config.parallel_migrations_per_cluster
            and per_node[node] < config.parallel_outbound_migrations_per_node
        )
        if m is vmim:
            return fits
        if fits:
            total += 1
            per_node[node] += 1
    return False


# --- the phases ------------------------------------------------------------------------------------


def _blocked_by_other(vmim: JSON, vmi: JSON, vmims: Sequence[JSON]) -> bool:
    """Whether the VMI's migrationState belongs to another migration still in flight."""
    state = migration_state(vmi)
    uid = state.get("migrationUid")
    if not uid or uid == _md(vmim).get("uid") or _state_final(state):
        return False
    return any(_md(m).get("uid") == uid and not is_final(m) for m in vmims)


def _schedule(plan: _Plan, vmi: JSON, cluster: ClusterState, config: MigrationConfig) -> None:
    if plan.state is not None:  # handed off in an earlier pass whose status write was lost
        _set_phase(plan, P.SCHEDULED)
        return
    if not (vmi.get("status") or {}).get("nodeName"):
        _fail(plan, "Migration failed because the VMI is not running on a node.")
        return
    placement = place(target_candidate(vmi, plan.vmim), cluster.nodes, cluster.vmis)
    if isinstance(placement, Unschedulable):
        _unschedulable(plan, vmi, placement.message)
        return
    state = handoff_state(plan.vmim, vmi, placement.node, config)
    old = migration_state(vmi)
    plan.state_patch = {**{k: None for k in old if k not in state}, **state}
    plan.labels[TARGET_NODE_LABEL] = placement.node
    plan.guard = True
    plan.state = {}
    _remove_condition(plan, CONDITION_SCHEDULED)
    _set_phase(plan, P.SCHEDULED)


def _unschedulable(plan: _Plan, vmi: JSON, message: str) -> None:
    cond = {
        "type": CONDITION_SCHEDULED,
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
    }
    md = _md(vmi)
    if _set_condition(plan, cond):
        plan.events.append(
            MigrationEvent(
                REASON_UNSCHEDULABLE,
                f"Migration target pod for VMI [{md.get('namespace')}/{md.get('name')}] "
                "is currently unschedulable.",
                "Warning",
            )
        )
    timeout = _annotation_seconds(
        plan.vmim, UNSCHEDULABLE_TIMEOUT_ANNOTATION, DEFAULT_UNSCHEDULABLE_TIMEOUT_SECONDS
    )
    since = _entered(
        plan.status, P.SCHEDULING, _md(plan.vmim).get("creationTimestamp") or format_time(plan.now)
    )
    waited = (plan.now - since).total_seconds()
    if waited >= timeout:
        _fail(
            plan,
            f"Migration target for VMI {md.get('namespace')}/{md.get('name')} stayed "
            f"unschedulable for {timeout}s: {message}",
        )
    else:
        plan.requeue(timeout - waited)


def _await_target(plan: _Plan) -> None:
    """Scheduled/PreparingTarget: fail when the target never reports ready in time."""
    timeout = _annotation_seconds(
        plan.vmim, PENDING_TIMEOUT_ANNOTATION, DEFAULT_PENDING_TIMEOUT_SECONDS
    )
    since = _entered(
        plan.status, P.SCHEDULING, _md(plan.vmim).get("creationTimestamp") or format_time(plan.now)
    )
    waited = (plan.now - since).total_seconds()
    if waited >= timeout:
        target = (plan.state or {}).get("targetNode", "")
        _fail_on_vmi(plan, f"target node {target} did not become ready within {timeout}s")
    else:
        plan.requeue(timeout - waited)


def _step(plan: _Plan, vmi: JSON, cluster: ClusterState, config: MigrationConfig) -> None:
    """One phase forward, as far as the VMI's migrationState allows."""
    state = plan.state or {}
    phase = plan.phase
    if phase == "":
        if _blocked_by_other(plan.vmim, vmi, cluster.vmims):
            _fail(
                plan,
                "VMI is not eligible for migration because another migration job is in progress.",
            )
        else:
            _set_phase(plan, P.PENDING)
    elif phase == P.PENDING:
        if admitted(plan.vmim, cluster, config):
            _set_phase(plan, P.SCHEDULING)
        else:
            plan.requeue(CAPACITY_RETRY_SECONDS)
    elif phase == P.SCHEDULING:
        _schedule(plan, vmi, cluster, config)
    elif phase == P.SCHEDULED:
        _set_phase(plan, P.PREPARING_TARGET)
    elif phase == P.PREPARING_TARGET:
        if state.get("targetNode") and state.get("targetNodeAddress"):
            _set_phase(plan, P.TARGET_READY)
        else:
            _await_target(plan)
    elif phase == P.TARGET_READY:
        if state.get("startTimestamp"):
            _set_phase(plan, P.RUNNING)
    elif phase == P.RUNNING and state.get("completed") and not state.get("failed"):
        _set_phase(plan, P.SUCCEEDED)
        plan.events.append(
            MigrationEvent(REASON_SUCCEEDED, "Source node reported migration succeeded")
        )


def _interrupted(plan: _Plan, vmi: JSON | None) -> bool:
    """Fails the migration when something outside it ended it; returns whether it did."""
    state = plan.state
    handed_off = plan.phase in (P.SCHEDULED, P.PREPARING_TARGET, P.TARGET_READY, P.RUNNING)
    if vmi is None:
        _fail(plan, "Migration failed because vmi does not exist.")
    elif vmi_final(vmi) and not (state and state.get("completed") and not state.get("failed")):
        _fail(plan, "Migration failed vmi shutdown during migration.")
    elif deleting(plan.vmim) and state is None:
        _set_condition(plan, {"type": CONDITION_ABORT_REQUESTED, "status": "True"})
        _fail(plan, "Migration failed due to being canceled")
    elif handed_off and state is None:
        other = migration_state(vmi).get("migrationUid")
        _fail(
            plan,
            "VMI's migration state was taken over by another migration job during active migration."
            if other
            else "VMI's migration state was cleared during the active migration.",
        )
    elif state is not None and state.get("failed"):
        reason = str(state.get("failureReason") or "source node reported migration failed")
        _set_phase(plan, P.FAILED)
        _set_condition(
            plan,
            {
                "type": CONDITION_FAILED,
                "status": "True",
                "reason": REASON_FAILED,
                "message": reason,
            },
        )
        plan.events.append(
            MigrationEvent(REASON_FAILED, "source node reported migration failed", "Warning")
        )
    else:
        return False
    return True


def _request_abort(plan: _Plan) -> None:
    """A deleted migration the node agents already own: ask the source to cancel it."""
    state = plan.state or {}
    if state.get("abortRequested") or _state_final(state):
        return
    plan.state_patch["abortRequested"] = True
    _set_condition(plan, {"type": CONDITION_ABORT_REQUESTED, "status": "True"})
    plan.events.append(
        MigrationEvent(REASON_ABORT, "Migration is ready to be canceled by virt-handler.")
    )


def vmi_final(vmi: JSON) -> bool:
    return str((vmi.get("status") or {}).get("phase") or "") in FINAL


def _clean_up_label(plan: _Plan, vmi: JSON | None) -> None:
    """Drops the target-node label once no migration of the VMI is in flight."""
    if vmi is None or TARGET_NODE_LABEL not in (_md(vmi).get("labels") or {}):
        return
    state = migration_state(vmi)
    ours = state.get("migrationUid") == _md(plan.vmim).get("uid")
    if ours or not state.get("migrationUid") or _state_final(state):
        plan.labels[TARGET_NODE_LABEL] = None


# --- decide ----------------------------------------------------------------------------------------


def _vmi_patch(plan: _Plan) -> JSON | None:
    patch: JSON = {}
    if plan.labels:
        patch["metadata"] = {"labels": dict(plan.labels)}
    if plan.state_patch:
        patch["status"] = {"migrationState": dict(plan.state_patch)}
    return patch or None


def _mirror(plan: _Plan) -> None:
    """VMIM status.migrationState = the VMI's (with this pass's patch), while it is ours."""
    if plan.state is None:
        return
    merged = {**plan.state, **plan.state_patch}
    plan.status["migrationState"] = {k: v for k, v in merged.items() if v is not None}


def decide(
    vmim: JSON,
    vmi: JSON | None,
    *,
    nodes: Sequence[JSON],
    vmis: Sequence[JSON],
    vmims: Sequence[JSON],
    config: MigrationConfig,
    now: datetime,
) -> MigrationDecision:
    """What the migration controller does for ``vmim`` now (``vmi`` is None when it is gone)."""
    plan = _Plan(
        vmim=vmim,
        vmi=vmi,
        status=copy.deepcopy(vmim.get("status") or {}),
        now=now,
        state=owned_state(vmim, vmi),
    )
    cluster = ClusterState(nodes, vmis, vmims)
    if plan.phase not in FINAL and not _interrupted(plan, vmi):
        assert vmi is not None  # _interrupted fails a migration whose VMI is gone
        if deleting(vmim):
            _request_abort(plan)
        _step(plan, vmi, cluster, config)
    final = plan.phase in FINAL
    if final:
        _clean_up_label(plan, vmi)
    _mirror(plan)
    finalizers = _md(vmim).get("finalizers") or []
    return MigrationDecision(
        status=plan.status,
        vmi_patch=_vmi_patch(plan) if vmi is not None else None,
        guard_vmi=plan.guard,
        add_finalizer=not final and not deleting(vmim) and FINALIZER not in finalizers,
        remove_finalizer=final and FINALIZER in finalizers,
        events=tuple(plan.events),
        requeue_after=None if final else plan.requeue_after,
    )


# --- the shell -------------------------------------------------------------------------------------


def _key(obj: JSON) -> str:
    md = _md(obj)
    return f"{md.get('namespace', '')}/{md['name']}"


class MigrationController(Controller):
    """Runs ``decide()`` for every migration whenever it, its VMI, a Node, the KubeVirt CR, a
    MigrationPolicy or a Namespace changes; requeues for capacity and timeouts."""

    name = "virt-controller-migration"
    resync_seconds = 30.0

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.events = EventRecorder(client, component="virt-controller", clock=self.clock)
        # admission and placement read the whole cluster: one decision of that kind at a time
        self._placing = asyncio.Lock()
        self._known: dict[str, tuple[str, str]] = {}  # VMIM key -> (namespace, vmiName)
        self._final: set[str] = set()

    def watches(self) -> Sequence[Watch]:
        return [
            Watch(VMIM, self._on_migration),
            Watch(VMI, self._on_vmi),
            *(Watch(res, self._on_cluster) for res in (NODE, KUBEVIRT, MIGRATIONPOLICY, NAMESPACE)),
        ]

    def resync_keys(self) -> list[str]:
        return self._unfinished()

    def _unfinished(self) -> list[str]:
        return [key for key in self._known if key not in self._final]

    def _on_migration(self, etype: str, vmim: JSON) -> list[str]:
        key = _key(vmim)
        if etype == DELETED:
            self._known.pop(key, None)
            self._final.discard(key)
            return self._unfinished()  # a slot may have freed
        md = _md(vmim)
        self._known[key] = (
            str(md.get("namespace", "")),
            str((vmim.get("spec") or {}).get("vmiName", "")),
        )
        was_final = key in self._final
        if is_final(vmim):
            self._final.add(key)
            if not was_final:
                return [key, *self._unfinished()]  # its slot is free for a pending one
        return [key]

    def _on_vmi(self, _etype: str, vmi: JSON) -> list[str]:
        md = _md(vmi)
        wanted = (str(md.get("namespace", "")), str(md.get("name", "")))
        return [key for key, target in self._known.items() if target == wanted]

    def _on_cluster(self, _etype: str, _obj: JSON) -> list[str]:
        return self._unfinished()

    async def reconcile(self, key: str) -> Result | None:
        """One level-based pass for the migration ``namespace/name``."""
        namespace, name = split_key(key)
        vmim = await self.client.find(VMIM, name, namespace)
        if vmim is None:
            return None
        if migration_phase(vmim) in ("", P.PENDING, P.SCHEDULING):
            async with self._placing:
                return await self._reconcile(vmim)
        return await self._reconcile(vmim)

    async def _reconcile(self, vmim: JSON) -> Result:
        namespace = _md(vmim).get("namespace", "")
        vmi_name = str((vmim.get("spec") or {}).get("vmiName", ""))
        vmi = await self.client.find(VMI, vmi_name, namespace)
        nodes, _ = await self.client.list(NODE)
        vmis, _ = await self.client.list(VMI)
        vmims, _ = await self.client.list(VMIM)
        try:
            config = await self._config(vmi)
        except MigrationConfigError as exc:
            await self.events.record(vmim, REASON_FAILED, str(exc), type_="Warning")
            raise
        decision = decide(
            vmim,
            vmi,
            nodes=nodes,
            vmis=vmis,
            vmims=vmims,
            config=config,
            now=datetime.now(UTC),
        )
        await self._apply(vmim, vmi, decision)
        return Result(decision.requeue_after)

    async def _config(self, vmi: JSON | None) -> MigrationConfig:
        if vmi is None:
            return MigrationConfig({})  # a migration without its VMI only fails
        kubevirts, _ = await self.client.list(KUBEVIRT)
        policies, _ = await self.client.list(MIGRATIONPOLICY)
        ns = await self.client.find(NAMESPACE, str(_md(vmi).get("namespace", "")))
        return resolve_migration_config(
            vmi,
            kubevirt=active_kubevirt(kubevirts),
            policies=policies,
            namespace_labels={str(k): str(v) for k, v in (_md(ns).get("labels") or {}).items()},
        )

    async def _apply(self, vmim: JSON, vmi: JSON | None, decision: MigrationDecision) -> None:
        """VMI patch, then finalizer and status (each guarded by resourceVersion), then Events.

        A Conflict or NotFound propagates: the work queue retries the key with fresh state."""
        md = _md(vmim)
        namespace = str(md.get("namespace", ""))
        if decision.vmi_patch is not None and vmi is not None:
            patch = copy.deepcopy(decision.vmi_patch)
            if decision.guard_vmi:
                patch.setdefault("metadata", {})["resourceVersion"] = _md(vmi)["resourceVersion"]
            await self.client.patch(VMI, str(_md(vmi)["name"]), patch, namespace)
        if decision.add_finalizer:
            vmim = await self._set_finalizers(vmim, [*(md.get("finalizers") or []), FINALIZER])
        if decision.status != (vmim.get("status") or {}):
            vmim = await self.client.replace(
                VMIM, {**vmim, "status": decision.status}, subresource="status"
            )
        for event in decision.events:
            await self.events.record(vmim, event.reason, event.message, type_=event.type)
        if decision.remove_finalizer:
            remaining = [f for f in _md(vmim).get("finalizers") or [] if f != FINALIZER]
            with contextlib.suppress(NotFound):
                await self._set_finalizers(vmim, remaining)

    async def _set_finalizers(self, vmim: JSON, finalizers: list[str]) -> JSON:
        md = _md(vmim)
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": md["resourceVersion"]}}
        return await self.client.patch(VMIM, str(md["name"]), patch, str(md.get("namespace", "")))
