"""The VirtualMachine controller: VM -> VMI per runStrategy, with KubeVirt's VM status.

``decide()`` is the pure core: from a VM, its VMI (if any), its DataVolumes and its
instancetype/preference it returns what to do (create or delete the VMI, create DataVolumes) and
the VM's new status (printableStatus, ready, created, conditions, startFailure...).
``VMController`` is the thin shell that reads fresh state, applies a decision and records Events.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vmo.api.annotations import BACKUP_LOCK
from vmo.client import (
    CLUSTER_INSTANCETYPE,
    CLUSTER_PREFERENCE,
    DATAVOLUME,
    INSTANCETYPE,
    PREFERENCE,
    VM,
    VMBACKUP,
    VMI,
    ApiStatusError,
    Client,
    Conflict,
    NotFound,
    Resource,
)
from vmo.engine.virtcontroller.datavolumes import (
    data_volume_error,
    data_volume_provisioning,
    data_volumes_ready,
    missing_data_volumes,
    referenced_data_volumes,
    template_claim_names,
    template_data_volume_names,
)
from vmo.engine.virtcontroller.startfailure import (
    RESTARTING_STRATEGIES,
    backoff_left,
    sync_start_failure,
)
from vmo.engine.virtcontroller.vmi_template import (
    GENERATION_ANNOTATION,
    TEMPLATE_HASH_ANNOTATION,
    build_vmi,
    template_hash,
)
from vmo.engine.virtcontroller.vmstate import (
    JSON,
    STARTING_PHASES,
    condition,
    deleting,
    format_time,
    has_condition,
    has_start_paused_request,
    has_start_request,
    has_stop_request_for,
    is_final,
    phase,
    run_strategy,
    state_change_requests,
)
from vmo.runtime import Controller, EventRecorder, Result, Watch, split_key

log = logging.getLogger(__name__)


# VMI conditions the VM does not copy: it computes these itself.
_OWN_CONDITIONS = ("Ready", "Failure", "RestartRequired")
RESTART_REQUIRED_MESSAGE = "a non-live-updatable field was changed in the template spec"


class VMIAction(enum.Enum):
    NONE = "none"
    CREATE = "create"
    DELETE = "delete"


@dataclass(frozen=True)
class VMEvent:
    """An Event to record on the VM (core v1 Event reason, message and type)."""

    reason: str
    message: str
    type: str = "Normal"


@dataclass(frozen=True)
class VMDecision:
    """What the shell must do for one VM, and the status to write afterwards."""

    action: VMIAction
    status: JSON
    vmi: JSON | None = None  # the VMI to create
    delete_uid: str = ""  # the VMI to delete
    data_volumes: tuple[JSON, ...] = ()  # DataVolumes to create
    vm_patch: JSON | None = None  # a spec change (Halted + start request)
    vmi_annotations: JSON | None = None  # annotations to set on the running VMI
    events: tuple[VMEvent, ...] = ()
    requeue_after: float | None = None  # seconds, while a start backs off


@dataclass
class _Plan:
    """The mutable working state of one decide() call."""

    vm: JSON
    vmi: JSON | None
    strategy: str
    status: JSON
    now: datetime
    action: VMIAction = VMIAction.NONE
    new_vmi: JSON | None = None
    vm_patch: JSON | None = None
    events: list[VMEvent] = field(default_factory=list)
    requeue_after: float | None = None
    failure: tuple[str, str] | None = None  # (reason, message) for the Failure condition


# --- small readers -------------------------------------------------------------------------------


# --- run strategies --------------------------------------------------------------------------------


def _start(plan: _Plan, ctx: _Inputs) -> None:
    """Creates the VMI unless DataVolumes, references, a restore or snapshot of the VM, or the
    crash-loop backoff say wait."""
    if not ctx.dvs_ready:
        return
    if plan.status.get("restoreInProgress") or plan.status.get("snapshotInProgress"):
        return  # started once its volumes are whole again
    if ctx.backup:
        plan.requeue_after = 2.0  # started once the backup ends and lets go of its disks
        return
    if ctx.missing_ref:
        plan.failure = ("FailedCreate", ctx.missing_ref)
        plan.events.append(
            VMEvent(
                "FailedCreate",
                f"Error creating virtual machine instance: {ctx.missing_ref}",
                "Warning",
            )
        )
        return
    plan.action = VMIAction.CREATE
    plan.new_vmi = build_vmi(
        plan.vm,
        instancetype=ctx.instancetype,
        preference=ctx.preference,
        start_paused=has_start_paused_request(plan.status),
    )
    name = plan.vm["metadata"]["name"]
    plan.events.append(
        VMEvent(
            "SuccessfulCreate",
            f"Started the virtual machine by creating the new virtual machine instance {name}",
        )
    )


def _start_after_backoff(plan: _Plan, ctx: _Inputs) -> None:
    left = backoff_left(plan.status, plan.now)
    if left > 0:
        plan.requeue_after = left
        return
    _start(plan, ctx)


def _stop(plan: _Plan) -> None:
    vmi = plan.vmi
    if vmi is None or deleting(vmi):
        return  # nothing to do, or already on its way out
    plan.action = VMIAction.DELETE
    plan.events.append(
        VMEvent(
            "SuccessfulDelete",
            "Stopped the virtual machine by deleting the virtual machine instance "
            f"{vmi['metadata'].get('uid', '')}",
        )
    )


def _always(plan: _Plan, ctx: _Inputs) -> None:
    if plan.vmi is not None:
        if has_stop_request_for(plan.status, plan.vmi) or is_final(plan.vmi):
            _stop(plan)
        return
    _start_after_backoff(plan, ctx)


def _rerun_on_failure(plan: _Plan, ctx: _Inputs) -> None:
    vmi = plan.vmi
    if vmi is not None:
        stop = has_stop_request_for(plan.status, vmi)
        if not deleting(vmi) and (stop or is_final(vmi)):
            _stop(plan)
            if phase(vmi) == "Failed" and not has_start_request(plan.status):
                plan.status["stateChangeRequests"] = [
                    *state_change_requests(plan.status),
                    {"action": "Start"},
                ]
        return
    # a VM just switched to RerunOnFailure starts; afterwards only a start request starts it
    if not has_start_request(plan.status) and plan.status.get("runStrategy") == plan.strategy:
        return
    _start_after_backoff(plan, ctx)


def _manual(plan: _Plan, ctx: _Inputs) -> None:
    if plan.vmi is not None:
        if has_stop_request_for(plan.status, plan.vmi):
            _stop(plan)
    elif has_start_request(plan.status):
        _start(plan, ctx)


def _halted(plan: _Plan, ctx: _Inputs) -> None:
    if plan.vmi is not None:
        _stop(plan)
    elif has_start_request(plan.status):
        # a start request on a Halted VM (start paused) turns it into an Always VM
        uses_running = "running" in (plan.vm.get("spec") or {}) and not plan.vm["spec"].get(
            "runStrategy"
        )
        plan.vm_patch = (
            {"spec": {"running": True}} if uses_running else {"spec": {"runStrategy": "Always"}}
        )


def _once(plan: _Plan, ctx: _Inputs) -> None:
    if plan.vmi is None:
        _start_after_backoff(plan, ctx)


_STRATEGIES = {
    "Always": _always,
    "RerunOnFailure": _rerun_on_failure,
    "Manual": _manual,
    "Halted": _halted,
    "Once": _once,
}


# --- status ----------------------------------------------------------------------------------------


def trim_state_change_requests(status: JSON, vmi: JSON | None) -> None:
    """Drops the first request once it is done (KubeVirt acts on one request at a time)."""
    requests = state_change_requests(status)
    if not requests:
        return
    first = requests[0]
    done = False
    if first.get("action") == "Stop":
        done = vmi is None or not first.get("uid") or first["uid"] != vmi["metadata"].get("uid")
    elif first.get("action") == "Start":
        done = vmi is not None and not deleting(vmi) and not is_final(vmi)
    if done:
        requests = requests[1:]
    if requests:
        status["stateChangeRequests"] = requests
    else:
        status.pop("stateChangeRequests", None)


def _set_condition(status: JSON, cond: JSON, now: datetime) -> None:
    conditions = [c for c in status.get("conditions") or [] if c.get("type") != cond["type"]]
    old = next((c for c in status.get("conditions") or [] if c.get("type") == cond["type"]), None)
    stamp = format_time(now)
    if old is not None and old.get("status") == cond.get("status"):
        stamp = old.get("lastTransitionTime") or stamp
    new = {"lastProbeTime": None, "lastTransitionTime": stamp, **cond}
    status["conditions"] = [*conditions, new]


def _remove_condition(status: JSON, ctype: str) -> None:
    status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != ctype]


def _sync_ready_condition(status: JSON, vmi: JSON | None, now: datetime) -> None:
    ready = condition(vmi, "Ready")
    if vmi is None:
        cond: JSON = {
            "type": "Ready",
            "status": "False",
            "reason": "VMINotExists",
            "message": "VMI does not exist",
        }
    elif ready is None:
        cond = {
            "type": "Ready",
            "status": "False",
            "reason": "VMIConditionMissing",
            "message": "VMI is missing the Ready condition",
        }
    else:
        cond = {k: v for k, v in ready.items() if k in ("type", "status", "reason", "message")}
    _set_condition(status, cond, now)


def _sync_vmi_conditions(status: JSON, vmi: JSON | None) -> None:
    """Mirrors the VMI's conditions (Paused, PodScheduled, ...) except those the VM computes."""
    conditions = (vmi or {}).get("status", {}).get("conditions") or []
    copied = [dict(c) for c in conditions if c.get("type") not in _OWN_CONDITIONS]
    own = [c for c in status.get("conditions") or [] if c.get("type") in _OWN_CONDITIONS]
    status["conditions"] = own + copied


def _sync_failure_condition(status: JSON, failure: tuple[str, str] | None, now: datetime) -> None:
    if failure is None:
        _remove_condition(status, "Failure")
        return
    reason, message = failure
    _set_condition(
        status, {"type": "Failure", "status": "True", "reason": reason, "message": message}, now
    )


def _restart_required(plan: _Plan) -> tuple[bool, JSON | None]:
    """(RestartRequired?, annotations to bump on the VMI when only non-template fields changed)."""
    vmi = plan.vmi
    if vmi is None or is_final(vmi) or plan.action is not VMIAction.NONE:
        return False, None
    annotations = vmi["metadata"].get("annotations") or {}
    generation = str(plan.vm["metadata"].get("generation", 1))
    if annotations.get(GENERATION_ANNOTATION) == generation:
        return False, None
    recorded = annotations.get(TEMPLATE_HASH_ANNOTATION)
    if recorded is not None and recorded == template_hash(plan.vm):
        return False, {**annotations, GENERATION_ANNOTATION: generation}
    return True, None


def _migrating(vmi: JSON | None) -> bool:
    state = (vmi or {}).get("status", {}).get("migrationState") or {}
    return (
        bool(state.get("startTimestamp"))
        and not state.get("endTimestamp")
        and not state.get("completed")
    )


def printable_status(plan: _Plan, ctx: _Inputs) -> str:
    """KubeVirt's printableStatus: the first of these that holds, in this order."""
    vm, vmi = plan.vm, plan.vmi
    start_expected = plan.action is VMIAction.CREATE
    stop_expected = plan.action is VMIAction.DELETE
    running = phase(vmi) == "Running"
    paused = has_condition(vmi, "Paused")
    sync_false = condition(vmi, "Synchronized") or {}
    sync_reason = sync_false.get("reason") if sync_false.get("status") == "False" else None
    checks: list[tuple[str, bool]] = [
        ("Terminating", deleting(vm)),
        ("Stopping", vmi is not None and not is_final(vmi) and (deleting(vmi) or stop_expected)),
        ("Migrating", _migrating(vmi)),
        ("Paused", running and paused),
        ("Running", running and not paused),
        ("ErrorPvcNotFound", sync_reason == "FailedPvcNotFound"),
        ("DataVolumeError", data_volume_error(vm, ctx.dvs)),
        ("ErrorUnschedulable", has_condition(vmi, "PodScheduled", "False", "Unschedulable")),
        ("Provisioning", data_volume_provisioning(vm, ctx.dvs)),
        ("ErrImagePull", sync_reason == "ErrImagePull"),
        ("ImagePullBackOff", sync_reason == "ImagePullBackOff"),
        ("Starting", start_expected if vmi is None else phase(vmi) in STARTING_PHASES),
        (
            "CrashLoopBackOff",
            (vmi is None or is_final(vmi))
            and not start_expected
            and int((plan.status.get("startFailure") or {}).get("consecutiveFailCount") or 0) > 0
            and plan.strategy in RESTARTING_STRATEGIES,
        ),
        ("Stopped", is_final(vmi) if vmi is not None else not start_expected),
    ]
    return next((name for name, holds in checks if holds), "Unknown")


def _finish_status(plan: _Plan, ctx: _Inputs) -> JSON | None:
    """Fills the status fields derived from the VM, the VMI and the decision; returns VMI annotations to bump."""
    status, vmi, now = plan.status, plan.vmi, plan.now
    restart, bump = _restart_required(plan)
    _sync_vmi_conditions(status, vmi)
    _sync_ready_condition(status, vmi, now)
    _sync_failure_condition(status, plan.failure, now)
    if restart:
        _set_condition(
            status,
            {
                "type": "RestartRequired",
                "status": "True",
                "reason": "",
                "message": RESTART_REQUIRED_MESSAGE,
            },
            now,
        )
    elif vmi is None or plan.action is not VMIAction.NONE or bump is not None:
        _remove_condition(status, "RestartRequired")
    trim_state_change_requests(status, vmi)
    status["created"] = vmi is not None
    status["ready"] = vmi is not None and not is_final(vmi) and has_condition(vmi, "Ready")
    status["runStrategy"] = plan.strategy
    generation = int(plan.vm["metadata"].get("generation", 1))
    status["desiredGeneration"] = generation
    observed = (vmi or {}).get("metadata", {}).get("annotations", {}).get(GENERATION_ANNOTATION)
    if bump is not None or vmi is None:
        # with no VMI (or an unchanged template) nothing lags behind the spec
        status["observedGeneration"] = generation
    elif observed is not None and str(observed).isdigit():
        status["observedGeneration"] = int(observed)
    status["printableStatus"] = printable_status(plan, ctx)
    status["volumeSnapshotStatuses"] = volume_snapshot_statuses(plan.vm)
    return bump


def volume_snapshot_statuses(vm: JSON) -> list[JSON]:
    """Which of the VM's volumes a snapshot includes: claims and DataVolumes (pool volumes,
    copy-on-write), as upstream reports them in ``status.volumeSnapshotStatuses``."""
    statuses = []
    template = (vm.get("spec") or {}).get("template") or {}
    for volume in (template.get("spec") or {}).get("volumes") or []:
        kinds = sorted(k for k in volume if k != "name")
        if {"dataVolume", "persistentVolumeClaim"} & set(kinds):
            statuses.append({"name": volume["name"], "enabled": True})
        else:
            statuses.append(
                {
                    "name": volume["name"],
                    "enabled": False,
                    "reason": "Snapshot is not supported for this volumeSource type "
                    f"[{kinds[0] if kinds else 'unknown'}]",
                }
            )
    return statuses


@dataclass(frozen=True)
class _Inputs:
    dvs: Mapping[str, JSON]
    dvs_ready: bool
    instancetype: JSON | None
    preference: JSON | None
    missing_ref: str
    backup: str = ""  # the backup of the stopped VM's disks that holds its start back


def _missing_ref(vm: JSON, instancetype: JSON | None, preference: JSON | None) -> str:
    spec = vm.get("spec") or {}
    for key, found in (("instancetype", instancetype), ("preference", preference)):
        matcher = spec.get(key) or {}
        if matcher.get("name") and found is None:
            kind = matcher.get("kind") or f"virtualmachinecluster{key}"
            return f"{kind} {matcher['name']} not found"
    return ""


def decide(
    vm: JSON,
    vmi: JSON | None,
    now: datetime,
    *,
    data_volumes: Mapping[str, JSON] | None = None,
    instancetype: JSON | None = None,
    preference: JSON | None = None,
    jitter: float = 0.0,
    backup: str = "",
) -> VMDecision:
    """What the VM controller does for ``vm`` now, and the VM status that results.

    ``data_volumes`` maps DataVolume names in the VM's namespace to their objects;
    ``instancetype``/``preference`` are the objects the VM references (None when absent);
    ``jitter`` in [0, 1) randomises the crash-loop backoff as KubeVirt does; ``backup`` names
    a VirtualMachineBackup reading the stopped VM's disks, which holds its start back.
    """
    dvs = data_volumes or {}
    strategy = run_strategy(vm)
    status = copy.deepcopy(vm.get("status") or {})
    plan = _Plan(vm=vm, vmi=vmi, strategy=strategy, status=status, now=now)
    ctx = _Inputs(
        dvs=dvs,
        dvs_ready=data_volumes_ready(vm, dvs),
        instancetype=instancetype,
        preference=preference,
        missing_ref=_missing_ref(vm, instancetype, preference),
        backup=backup,
    )
    sync_start_failure(status, vmi, strategy, now, jitter)
    if deleting(vm):
        _stop(plan)
    elif strategy in _STRATEGIES:
        _STRATEGIES[strategy](plan, ctx)
    else:
        plan.failure = ("FailedCreate", f"unknown runstrategy: {strategy}")
    # a restore replaces the VM's volumes: their templates must not bring the old ones back
    restoring = bool(status.get("restoreInProgress"))
    new_dvs = () if deleting(vm) or restoring else tuple(missing_data_volumes(vm, dvs))
    bump = _finish_status(plan, ctx)
    return VMDecision(
        action=plan.action,
        status=status,
        vmi=plan.new_vmi,
        delete_uid=(vmi or {}).get("metadata", {}).get("uid", "")
        if plan.action is VMIAction.DELETE
        else "",
        data_volumes=new_dvs,
        vm_patch=plan.vm_patch,
        vmi_annotations=bump,
        events=tuple(plan.events),
        requeue_after=plan.requeue_after,
    )


def with_failure(
    decision: VMDecision, previous: JSON, reason: str, message: str, now: datetime
) -> JSON:
    """The status to write when applying ``decision`` failed: a Failure condition, and the old
    ``runStrategy`` kept so that the next attempt still sees a strategy change."""
    status = copy.deepcopy(decision.status)
    _set_condition(
        status, {"type": "Failure", "status": "True", "reason": reason, "message": message}, now
    )
    if previous.get("runStrategy"):
        status["runStrategy"] = previous["runStrategy"]
    else:
        status.pop("runStrategy", None)
    if decision.action is VMIAction.CREATE and status.get("printableStatus") == "Starting":
        status["printableStatus"] = "Stopped"
    return status


# --- the shell -------------------------------------------------------------------------------------


def _key(obj: JSON) -> str:
    md = obj["metadata"]
    return f"{md.get('namespace', '')}/{md['name']}"


def _owner_vm_key(obj: JSON) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "VirtualMachine" and ref.get("controller"):
            return f"{obj['metadata'].get('namespace', '')}/{ref['name']}"
    return None


def _ref_resource(matcher: JSON, key: str) -> Resource:
    kind = str(matcher.get("kind") or "").lower()
    namespaced = kind in ("virtualmachineinstancetype", "virtualmachinepreference")
    if key == "instancetype":
        return INSTANCETYPE if namespaced else CLUSTER_INSTANCETYPE
    return PREFERENCE if namespaced else CLUSTER_PREFERENCE


class VMController(Controller):
    """Runs ``decide()`` for every VirtualMachine whenever it, its VMI or a DataVolume changes."""

    name = "virt-controller-vm"

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.events = EventRecorder(client, component="virt-controller", clock=self.clock)
        # (namespace, DataVolume name) -> VMs whose volumes name it, so a DataVolume that
        # finishes importing wakes the standalone-DataVolume VMs waiting on it too
        self._dv_users: dict[tuple[str, str], set[str]] = {}

    def _vm_key_indexing_volumes(self, _etype: str, vm: JSON) -> list[str]:
        key = _key(vm)
        namespace = vm["metadata"].get("namespace", "")
        for users in self._dv_users.values():
            users.discard(key)
        volumes = (vm.get("spec", {}).get("template", {}).get("spec", {}) or {}).get(
            "volumes"
        ) or []
        for volume in volumes:
            name = (volume.get("dataVolume") or {}).get("name") or (
                volume.get("persistentVolumeClaim") or {}
            ).get("claimName")
            if name:
                self._dv_users.setdefault((namespace, name), set()).add(key)
        return [key]

    def _dv_keys(self, _etype: str, dv: JSON) -> list[str]:
        md = dv.get("metadata", {})
        keys = set(self._dv_users.get((md.get("namespace", ""), md.get("name", "")), set()))
        owner = _owner_vm_key(dv)
        if owner:
            keys.add(owner)
        return sorted(keys)

    def watches(self) -> Sequence[Watch]:
        return [
            Watch(VM, self._vm_key_indexing_volumes),
            Watch(VMI, lambda _etype, vmi: [k for k in [_vmi_key(vmi)] if k]),
            Watch(DATAVOLUME, self._dv_keys),
        ]

    async def reconcile(self, key: str) -> Result | None:
        """One level-based pass for the VM ``namespace/name``."""
        namespace, name = split_key(key)
        vm = await self.client.find(VM, name, namespace)
        if vm is None:
            return None
        vmi = await self.client.find(VMI, name, namespace)
        if vmi is not None and _vmi_key(vmi) != key:
            vmi = None  # a VMI of that name that this VM does not own is not its VMI
        decision = decide(
            vm,
            vmi,
            datetime.now(UTC),
            data_volumes=await self._data_volumes(vm),
            instancetype=await self._reference(vm, "instancetype"),
            preference=await self._reference(vm, "preference"),
            jitter=random.random(),
            backup=await self._backup_lock(vm) if vmi is None else "",
        )
        status = await self._apply(vm, decision)
        await self._write_status(vm, status)
        return Result(decision.requeue_after)

    async def _backup_lock(self, vm: JSON) -> str:
        """The backup that locked the stopped VM (``BACKUP_LOCK``), while it has not ended."""
        held = (vm["metadata"].get("annotations") or {}).get(BACKUP_LOCK, "")
        name = held.partition("@")[0]
        if not name:
            return ""
        backup = await self.client.find(VMBACKUP, name, vm["metadata"].get("namespace", ""))
        conditions = ((backup or {}).get("status") or {}).get("conditions") or []
        ended = any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in conditions
        )
        return "" if backup is None or ended else name

    async def _data_volumes(self, vm: JSON) -> dict[str, JSON]:
        namespace = vm["metadata"].get("namespace", "")
        names = set(template_data_volume_names(vm)) | set(referenced_data_volumes(vm))
        names |= set(template_claim_names(vm))  # a claim a DataVolume fills is awaited like one
        found: dict[str, JSON] = {}
        for name in sorted(names):
            dv = await self.client.find(DATAVOLUME, name, namespace)
            if dv is not None:
                found[name] = dv
        return found

    async def _reference(self, vm: JSON, key: str) -> JSON | None:
        matcher = vm.get("spec", {}).get(key) or {}
        if not matcher.get("name"):
            return None
        res = _ref_resource(matcher, key)
        namespace = vm["metadata"].get("namespace", "") if res.namespaced else ""
        return await self.client.find(res, str(matcher["name"]), namespace)

    async def _apply(self, vm: JSON, decision: VMDecision) -> JSON:
        """Carries out the decision; returns the status to write (with a Failure if it failed)."""
        now = datetime.now(UTC)
        namespace = vm["metadata"].get("namespace", "")
        try:
            for dv in decision.data_volumes:
                await self._create(DATAVOLUME, dv, namespace)
                await self.events.record(
                    vm, "SuccessfulDataVolumeCreate", f"Created DataVolume {dv['metadata']['name']}"
                )
            if decision.vm_patch is not None:
                await self.client.patch(VM, vm["metadata"]["name"], decision.vm_patch, namespace)
            if decision.action is VMIAction.CREATE and decision.vmi is not None:
                # no AlreadyExists tolerance here: a VMI of that name we did not see is not ours
                await self.client.create(VMI, decision.vmi, namespace)
            elif decision.action is VMIAction.DELETE:
                await self.client.delete(VMI, vm["metadata"]["name"], namespace)
            if decision.vmi_annotations is not None:
                patch = {"metadata": {"annotations": decision.vmi_annotations}}
                await self.client.patch(VMI, vm["metadata"]["name"], patch, namespace)
        except ApiStatusError as exc:
            reason = "FailedDelete" if decision.action is VMIAction.DELETE else "FailedCreate"
            await self.events.record(vm, reason, str(exc), type_="Warning")
            return with_failure(decision, vm.get("status") or {}, reason, str(exc), now)
        for event in decision.events:
            await self.events.record(vm, event.reason, event.message, type_=event.type)
        return decision.status

    async def _create(self, res: Resource, obj: JSON, namespace: str) -> None:
        """Creates ``obj``; one that already exists (created by an earlier pass) is fine."""
        try:
            await self.client.create(res, obj, namespace)
        except Conflict as exc:
            if exc.reason != "AlreadyExists":
                raise

    async def _write_status(self, vm: JSON, status: JSON) -> None:
        """Replaces the whole status (a merge patch could not drop fields), guarded by
        resourceVersion so a concurrent start/stop request is never lost."""
        if status == (vm.get("status") or {}):
            return
        with contextlib.suppress(NotFound):
            await self.client.replace(VM, {**vm, "status": status}, subresource="status")


def _vmi_key(vmi: JSON) -> str | None:
    return _owner_vm_key(vmi)
