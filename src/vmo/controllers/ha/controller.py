"""The HA controller: a protected node whose Ready has not been True for longer than its
HAPolicy allows is fenced, and only once fencing is confirmed are its VMs restarted elsewhere.

One NodeRemediation per failed node (named after it) records the incident::

    Detected -> Fencing -> Fenced -> Restarting -> Completed
                   \\-> ManualRecoveryRequired (fencing failed or unconfirmed: nothing released)

Restarting releases, in descending priority and only while a healthy node has room for it
(``vmo.api.scheduling.place``: the scheduler's own filters), each VMI of the node whose VM
restarts by itself (runStrategy Always or RerunOnFailure): what Kubernetes and KubeVirt do after
the out-of-service taint. Its virt-launcher Pods are force-deleted (grace 0), the VMI is marked
Failed and loses the finalizer the dead node's handler would have removed; the VM controller
then starts a new VMI, which the scheduler places on a healthy node. A VM that does not fit
waits (and its entry says why) until capacity appears. A fenced node that returns gets none of
its old VMIs back; the incident closes and the taint this controller added goes.

The decisions are pure functions (``affected``, ``restart_order``, ``plan_releases``); the
controller reads the world, applies one step, and writes the NodeRemediation's status.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmo.api.scheduling import Scheduled, label_selector_matches, place
from vmo.client import NODE, VM, VMI, ApiStatusError, Client, Conflict, NotFound, Resource
from vmo.controllers.ha.crds import (
    DEFAULT_FENCE_TIMEOUT_SECONDS,
    DEFAULT_PRIORITY_ANNOTATION,
    DEFAULT_UNHEALTHY_SECONDS,
    HAPOLICY,
    NODEREMEDIATION,
    RemediationPhase,
    VMRecovery,
)
from vmo.controllers.ha.fencing import (
    FenceError,
    Fencer,
    OutOfServiceFencer,
    fencer_for,
    remove_out_of_service_taint,
)
from vmo.runtime import (
    Controller,
    EventRecorder,
    Result,
    Watch,
    merge_conditions,
    parse_timestamp,
    timestamp,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]

POD = Resource("", "v1", "pods", "Pod")
CREATED_BY = "kubevirt.io/created-by"
# the finalizers a node's handler removes once the guest is gone (virt-handler's, upstream's
# and the embedded agent's spelling); virt-controller's own it removes itself
HANDLER_FINALIZERS = (
    "foregroundDeleteVirtualMachine",
    "kubevirt.io/foregroundDeleteVirtualMachine",
)
RESTARTING_STRATEGIES = ("Always", "RerunOnFailure")
FINAL_PHASES = ("Succeeded", "Failed")
FENCE_POLL_SECONDS = 0.5
FENCE_RETRY_SECONDS = 10.0
WAITING_RECHECK_SECONDS = 5.0
RELEASE_REASON = "NodeFenced"
COMPONENT = "vmo-ha"

Phase = RemediationPhase
UNFENCED = (Phase.DETECTED, Phase.FENCING, Phase.MANUAL_RECOVERY_REQUIRED)
SETTLED = (VMRecovery.RESTARTED, VMRecovery.NOT_RESTARTED)


# --- pure decisions ------------------------------------------------------------------------------


def ready_status(node: JSON) -> tuple[str, datetime | None]:
    """Ready's status and since when (missing counts as Unknown, since the node's creation)."""
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status") or "Unknown"), _time(cond.get("lastTransitionTime"))
    return "Unknown", _time(node["metadata"].get("creationTimestamp"))


def _time(value: object) -> datetime | None:
    try:
        return parse_timestamp(str(value)) if value else None
    except ValueError:
        return None


def policy_for(node: JSON, policies: Iterable[JSON]) -> JSON | None:
    """The first HAPolicy (by name) whose nodeSelector selects ``node`` (empty: every node)."""
    labels = node["metadata"].get("labels") or {}
    for policy in sorted(policies, key=lambda p: str(p["metadata"]["name"])):
        selector = (policy.get("spec") or {}).get("nodeSelector")
        if label_selector_matches(labels, selector or {}):
            return policy
    return None


def priority(vm: JSON | None, annotation: str) -> int:
    value = ((vm or {}).get("metadata", {}).get("annotations") or {}).get(annotation)
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:
        return 0


def owner_vm(vmi: JSON) -> str | None:
    for ref in vmi["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "VirtualMachine" and ref.get("controller"):
            return str(ref["name"])
    return None


def run_strategy(vm: JSON) -> str:
    spec = vm.get("spec") or {}
    if spec.get("runStrategy"):
        return str(spec["runStrategy"])
    return "Always" if spec.get("running") else "Halted"


def _key(obj: JSON) -> tuple[str, str]:
    md = obj["metadata"]
    return str(md.get("namespace", "")), str(md["name"])


def affected(
    node: str, vmis: Iterable[JSON], vms: Mapping[tuple[str, str], JSON], annotation: str
) -> list[JSON]:
    """An entry per VMI the failed node holds (not yet final): its VM, priority and strategy."""
    entries = []
    for vmi in vmis:
        status = vmi.get("status") or {}
        if status.get("nodeName") != node or status.get("phase") in FINAL_PHASES:
            continue
        namespace, name = _key(vmi)
        owner = owner_vm(vmi)
        vm = vms.get((namespace, owner)) if owner else None
        strategy = run_strategy(vm) if vm else ""
        entries.append(
            {
                "namespace": namespace,
                "name": name,
                "priority": priority(vm, annotation),
                "runStrategy": strategy,
                "state": VMRecovery.PENDING.value,
                "previousUID": str(vmi["metadata"].get("uid", "")),
            }
        )
    return restart_order(entries)


def merge_affected(old: Sequence[JSON], new: Sequence[JSON]) -> list[JSON]:
    """The recorded entries, plus new VMIs of the node (recorded ones keep their state)."""
    known = {(e["namespace"], e["name"]) for e in old}
    return restart_order([*old, *(e for e in new if (e["namespace"], e["name"]) not in known)])


def restart_order(entries: Iterable[JSON]) -> list[JSON]:
    """Highest priority first; ties by namespace and name."""
    return sorted(entries, key=lambda e: (-int(e.get("priority") or 0), e["namespace"], e["name"]))


def restarts(entry: JSON) -> bool:
    return entry.get("runStrategy") in RESTARTING_STRATEGIES


def _placed(vmi: JSON, node: str) -> JSON:
    """A stand-in for the VMI once placed on ``node`` (what the scheduler will count)."""
    return {
        "metadata": dict(vmi["metadata"]),
        "spec": vmi.get("spec") or {},
        "status": {"nodeName": node, "phase": "Scheduled"},
    }


def _unplaced(vmi: JSON) -> JSON:
    return {"metadata": dict(vmi["metadata"]), "spec": vmi.get("spec") or {}, "status": {}}


@dataclass(frozen=True)
class Release:
    """One entry to release now, and the node the scheduler would put it on."""

    namespace: str
    name: str
    node: str


def plan_releases(
    entries: Sequence[JSON],
    old_vmis: Mapping[tuple[str, str], JSON],
    nodes: Sequence[JSON],
    vmis: Sequence[JSON],
) -> tuple[list[Release], dict[tuple[str, str], str]]:
    """Which waiting entries to release now, in order, each only if a healthy node has room
    for it after those before it (released earlier and still starting count as placed); and
    why each other one waits."""
    world = [v for v in vmis if (v.get("status") or {}).get("nodeName")]
    present = {_key(v): v for v in vmis}
    for entry in entries:
        key = (entry["namespace"], entry["name"])
        current = present.get(key)
        started = current is not None and current["metadata"].get("uid") != entry.get("previousUID")
        placed = started and bool(((current or {}).get("status") or {}).get("nodeName"))
        if entry["state"] == VMRecovery.RELEASED and not placed and key in old_vmis:
            world.append(_placed(old_vmis[key], str(entry.get("targetNode") or "")))
    releases: list[Release] = []
    waiting: dict[tuple[str, str], str] = {}
    for entry in entries:
        key = (entry["namespace"], entry["name"])
        if entry["state"] not in (VMRecovery.PENDING, VMRecovery.WAITING) or not restarts(entry):
            continue
        vmi = old_vmis.get(key)
        if vmi is None:
            releases.append(Release(*key, ""))  # gone already: nothing holds it back
            continue
        placement = place(_unplaced(vmi), nodes, world)
        if isinstance(placement, Scheduled):
            releases.append(Release(*key, placement.node))
            world.append(_placed(vmi, placement.node))
        else:
            waiting[key] = placement.message
    return releases, waiting


# --- the shell -------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _phase(rem: JSON | None) -> Phase | None:
    value = ((rem or {}).get("status") or {}).get("phase")
    try:
        return Phase(value) if value else None
    except ValueError:
        return None


def _closed(rem: JSON) -> bool:
    """An incident is over once its node returned (or was healthy again before fencing)."""
    status = rem.get("status") or {}
    return bool(status.get("nodeReturnedAt")) and _phase(rem) == Phase.COMPLETED


class HAController(Controller):
    """Keys are node names; each pass moves that node's NodeRemediation one step on."""

    name = "vmo-ha"
    workers = 4
    resync_seconds = 5.0

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.events = EventRecorder(client, component=COMPONENT, clock=self.clock)

    def watches(self) -> Sequence[Watch]:
        return [
            Watch(NODE),
            Watch(
                NODEREMEDIATION,
                lambda _e, r: [str((r.get("spec") or {}).get("nodeName") or r["metadata"]["name"])],
            ),
            Watch(HAPOLICY, self._every_node),
            Watch(VMI, self._nodes_of_vmi),
            Watch(VM, lambda _e, _vm: []),  # its cache: owners, strategies, priorities
        ]

    def _every_node(self, _etype: str, _obj: JSON) -> list[str]:
        return [str(n["metadata"]["name"]) for n in self.informer(NODE).items()]

    def _nodes_of_vmi(self, _etype: str, vmi: JSON) -> list[str]:
        """The VMI's node, and every node with an open incident (a new VMI may be one of its
        VMs restarting, or capacity freed for one that waits)."""
        keys = {str((vmi.get("status") or {}).get("nodeName") or "")}
        for rem in self.informer(NODEREMEDIATION).items():
            if not _closed(rem):
                keys.add(str(rem["metadata"]["name"]))
        return sorted(k for k in keys if k)

    def resync_keys(self) -> list[str]:
        return self._every_node("", {})

    async def reconcile(self, key: str) -> Result | None:
        policies = self.informer(HAPOLICY).items()
        if not policies:
            return None  # no HAPolicy: HA is off, whatever the nodes do
        node = await self.client.find(NODE, key)
        rem = await self.client.find(NODEREMEDIATION, key)
        if node is None:
            return None
        if rem is not None and not _closed(rem):
            policy = next(
                (p for p in policies if p["metadata"]["name"] == rem["spec"].get("policy")), None
            )
            policy = policy or policy_for(node, policies)
            if policy is None:
                return None
            return await self._advance(node, rem, policy)
        policy = policy_for(node, policies)
        return None if policy is None else await self._detect(node, rem, policy)

    # --- detection -----------------------------------------------------------------------------

    async def _detect(self, node: JSON, rem: JSON | None, policy: JSON) -> Result | None:
        status, since = ready_status(node)
        if status == "True":
            return None
        spec = policy.get("spec") or {}
        allowed = float(spec.get("unhealthySeconds", DEFAULT_UNHEALTHY_SECONDS))
        elapsed = (_now() - since).total_seconds() if since else allowed
        if elapsed < allowed:
            return Result.after(allowed - elapsed)
        name = node["metadata"]["name"]
        annotation = str(spec.get("restartPriorityAnnotation") or DEFAULT_PRIORITY_ANNOTATION)
        entries = affected(name, self.informer(VMI).items(), self._vms(), annotation)
        new_status: JSON = {
            "phase": Phase.DETECTED.value,
            "reason": "NodeUnhealthy",
            "message": f"Ready has been {status} for {elapsed:.0f}s (the policy allows {allowed:g}s)",
            "method": str((spec.get("fencing") or {}).get("method") or ""),
            "detectedAt": timestamp(),
            "virtualMachines": entries,
            "conditions": [],
        }
        spec_body = {"nodeName": name, "policy": policy["metadata"]["name"]}
        if rem is None:
            with contextlib.suppress(Conflict):
                rem = await self.client.create(
                    NODEREMEDIATION, {"metadata": {"name": name}, "spec": spec_body}
                )
        else:
            rem = await self.client.replace(NODEREMEDIATION, {**rem, "spec": spec_body})
        if rem is None:
            return Result.after(0.1)
        await self._write(rem, new_status)
        log.warning("node %s unhealthy (Ready=%s): remediation begins", name, status)
        await self.events.record(
            node,
            "NodeUnhealthy",
            f"{new_status['message']}: fencing it, then restarting its VMs",
            type_="Warning",
        )
        return Result.after(0)

    def _vms(self) -> dict[tuple[str, str], JSON]:
        return {_key(vm): vm for vm in self.informer(VM).items()}

    # --- one step of an open incident ------------------------------------------------------------

    async def _advance(self, node: JSON, rem: JSON, policy: JSON) -> Result | None:
        phase = _phase(rem) or Phase.DETECTED
        ready, _ = ready_status(node)
        if ready == "True" and phase in UNFENCED:
            return await self._recovered_unfenced(node, rem)
        if phase in UNFENCED:
            return await self._fence(node, rem, policy)
        if phase in (Phase.FENCED, Phase.RESTARTING):
            result = await self._restart(node, rem, policy)
            if (
                ready == "True"
                and _phase(await self.client.find(NODEREMEDIATION, node["metadata"]["name"]))
                == Phase.COMPLETED
            ):
                return await self._returned(node)
            return result
        if phase == Phase.COMPLETED and ready == "True":
            return await self._returned(node)
        return None

    async def _recovered_unfenced(self, node: JSON, rem: JSON) -> Result | None:
        """The node came back before it was fenced: its agent keeps its VMs, nothing moved."""
        status = dict(rem.get("status") or {})
        stamp = timestamp()
        for entry in status.get("virtualMachines") or []:
            entry["state"], entry["message"] = (
                VMRecovery.NOT_RESTARTED.value,
                "the node recovered before it was fenced",
            )
        status.update(
            phase=Phase.COMPLETED.value,
            reason="NodeRecovered",
            completedAt=stamp,
            nodeReturnedAt=stamp,
            message="the node is Ready again before it was fenced: its VMs stayed where they were",
        )
        await self._write(rem, status)
        await self.events.record(node, "NodeRecovered", status["message"])
        return None

    async def _fence(self, node: JSON, rem: JSON, policy: JSON) -> Result | None:
        name = node["metadata"]["name"]
        spec = policy.get("spec") or {}
        status = dict(rem.get("status") or {})
        timeout = float(spec.get("fenceTimeoutSeconds") or DEFAULT_FENCE_TIMEOUT_SECONDS)
        now = _now()
        requested = _time(status.get("fenceRequestedAt"))
        manual = _phase(rem) == Phase.MANUAL_RECOVERY_REQUIRED
        error = ""
        confirmed = bool((rem.get("spec") or {}).get("confirmedOff"))
        fencer: Fencer | None = None
        if not confirmed:
            try:
                fencer = await fencer_for(self.client, name, policy)
                if requested is None or (
                    manual and (now - requested).total_seconds() >= FENCE_RETRY_SECONDS
                ):
                    status["fenceRequestedAt"] = timestamp(now)
                    requested = now
                    await fencer.request_off()
                confirmed = await fencer.confirmed_off()
            except FenceError as exc:
                error = str(exc)
                log.warning("node %s: fencing: %s", name, error)
        if confirmed:
            return await self._fenced(
                node, rem, status, added=isinstance(fencer, OutOfServiceFencer) and fencer.added
            )
        if requested is None:
            status["fenceRequestedAt"] = timestamp(now)
            requested = now
        waited = (now - requested).total_seconds()
        if not manual and waited < timeout:
            status.update(
                phase=Phase.FENCING.value,
                reason="FencingInProgress",
                message=error or f"waiting for node {name} to be powered off",
            )
            await self._write(rem, status)
            return Result.after(FENCE_POLL_SECONDS)
        return await self._manual_recovery(node, rem, status, error, timeout, waited)

    async def _manual_recovery(
        self, node: JSON, rem: JSON, status: JSON, error: str, timeout: float, waited: float
    ) -> Result:
        name = node["metadata"]["name"]
        reason = "FencingFailed" if error else "FencingNotConfirmed"
        why = error or f"node {name} was not confirmed powered off within {timeout:g}s"
        message = (
            f"{why}; its VMs are not restarted elsewhere, so that no two copies write one "
            "disk: power the node off and set spec.confirmedOff, or bring it back"
        )
        first = _phase(rem) != Phase.MANUAL_RECOVERY_REQUIRED
        status.update(phase=Phase.MANUAL_RECOVERY_REQUIRED.value, reason=reason, message=message)
        await self._write(rem, status)
        if first:
            log.error("node %s: manual recovery required: %s", name, why)
            await self.events.record(rem, "ManualRecoveryRequired", message, type_="Warning")
            vms = self._vms()
            for entry in status.get("virtualMachines") or []:
                vm = vms.get((entry["namespace"], entry["name"]))
                if vm is not None:
                    await self.events.record(
                        vm,
                        "ManualRecoveryRequired",
                        f"node {name} failed and could not be fenced: {message}",
                        type_="Warning",
                    )
        return Result.after(FENCE_RETRY_SECONDS)

    async def _fenced(self, node: JSON, rem: JSON, status: JSON, *, added: bool) -> Result:
        name = node["metadata"]["name"]
        status.update(
            phase=Phase.FENCED.value,
            reason="PoweredOff",
            fencedAt=timestamp(),
            message=f"node {name} is confirmed powered off",
        )
        if added:
            status["taintAdded"] = True
        await self._write(rem, status)
        log.warning("node %s fenced", name)
        await self.events.record(node, "NodeFenced", status["message"])
        return Result.after(0)

    # --- restarts ----------------------------------------------------------------------------------

    async def _restart(self, node: JSON, rem: JSON, policy: JSON) -> Result | None:
        name = node["metadata"]["name"]
        spec = policy.get("spec") or {}
        status = dict(rem.get("status") or {})
        annotation = str(spec.get("restartPriorityAnnotation") or DEFAULT_PRIORITY_ANNOTATION)
        vmis = self.informer(VMI).items()
        entries = list(status.get("virtualMachines") or [])
        if ready_status(node)[0] != "True":
            # VMIs placed there before it was fenced (never those started after it returned)
            fenced = str(status.get("fencedAt") or timestamp())
            before = [
                v for v in vmis if str(v["metadata"].get("creationTimestamp") or "") <= fenced
            ]
            entries = merge_affected(entries, affected(name, before, self._vms(), annotation))
        present = {_key(v): v for v in vmis}
        old = {
            (e["namespace"], e["name"]): present[(e["namespace"], e["name"])]
            for e in entries
            if (e["namespace"], e["name"]) in present
            and present[(e["namespace"], e["name"])]["metadata"].get("uid") == e.get("previousUID")
        }
        self._follow(entries, present)
        releases, waiting = plan_releases(entries, old, self.informer(NODE).items(), vmis)
        by_key = {(e["namespace"], e["name"]): e for e in entries}
        for release in releases:
            entry = by_key[(release.namespace, release.name)]
            await self._release(old.get((release.namespace, release.name)), name, release.node)
            entry.update(
                state=VMRecovery.RELEASED.value,
                targetNode=release.node,
                releasedAt=timestamp(),
                message=f"released to restart on a healthy node (planned: {release.node or 'any'})",
            )
        for entry in entries:
            key = (entry["namespace"], entry["name"])
            if key in waiting:
                entry.update(
                    state=VMRecovery.WAITING.value,
                    message=f"no healthy node has room: {waiting[key]}",
                )
            elif entry["state"] == VMRecovery.PENDING and not restarts(entry):
                await self._release(old.get(key), name, "")
                why = (
                    f"runStrategy {entry['runStrategy']}"
                    if entry.get("runStrategy")
                    else "no VM owns it"
                )
                entry.update(state=VMRecovery.NOT_RESTARTED.value, message=f"not restarted: {why}")
        status["virtualMachines"] = entries
        done = all(e["state"] in SETTLED for e in entries)
        counts = {s: sum(e["state"] == s for e in entries) for s in VMRecovery}
        summary = ", ".join(f"{n} {s.value.lower()}" for s, n in counts.items() if n) or "no VMs"
        if done:
            status.update(
                phase=Phase.COMPLETED.value,
                reason="VMsRecovered",
                completedAt=timestamp(),
                message=f"node {name} fenced; its VMs: {summary}",
            )
        else:
            status.update(
                phase=Phase.RESTARTING.value,
                reason="RestartingVMs",
                message=f"restarting node {name}'s VMs: {summary}",
            )
        cond = {
            "type": "WaitingForCapacity",
            "status": "True" if waiting else "False",
            "reason": "NoRoom" if waiting else "Fits",
            "message": f"{len(waiting)} VM(s) wait for a healthy node with room"
            if waiting
            else "every VM fits",
        }
        status["conditions"] = merge_conditions(
            status.get("conditions"), [cond], timestamp(), keep_others=True
        )
        await self._write(rem, status)
        if done:
            await self.events.record(rem, "Completed", status["message"])
        return None if done else Result.after(WAITING_RECHECK_SECONDS if waiting else 1.0)

    @staticmethod
    def _follow(entries: list[JSON], present: Mapping[tuple[str, str], JSON]) -> None:
        """Released entries whose VM runs a new VMI are Restarted, with where."""
        for entry in entries:
            if entry["state"] != VMRecovery.RELEASED:
                continue
            vmi = present.get((entry["namespace"], entry["name"]))
            status = (vmi or {}).get("status") or {}
            if (
                vmi is not None
                and vmi["metadata"].get("uid") != entry.get("previousUID")
                and status.get("phase") == "Running"
            ):
                entry.update(
                    state=VMRecovery.RESTARTED.value,
                    node=str(status.get("nodeName") or ""),
                    restartedAt=timestamp(),
                    message=f"running again on {status.get('nodeName')}",
                )

    async def _release(self, vmi: JSON | None, node: str, target: str) -> None:
        """What upstream does once a node is out of service: the VMI's Pods force-deleted, the
        VMI Failed, without the finalizer the dead node's handler would have removed."""
        if vmi is None:
            return
        md = vmi["metadata"]
        namespace, name = md["namespace"], md["name"]
        finalizers = [f for f in md.get("finalizers") or [] if f not in HANDLER_FINALIZERS]
        patch: JSON = {
            "metadata": {
                "resourceVersion": md.get("resourceVersion"),
                "finalizers": finalizers or None,
            }
        }
        status = vmi.get("status") or {}
        if not md.get("deletionTimestamp") and status.get("phase") not in FINAL_PHASES:
            message = f"node {node} failed and was fenced: the guest is gone"
            transitions = [
                *(status.get("phaseTransitionTimestamps") or []),
                {"phase": "Failed", "phaseTransitionTimestamp": timestamp()},
            ]
            conditions = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
            conditions.append(
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": RELEASE_REASON,
                    "message": message,
                    "lastProbeTime": None,
                    "lastTransitionTime": timestamp(),
                }
            )
            patch["status"] = {
                "phase": "Failed",
                "reason": RELEASE_REASON,
                "conditions": conditions,
                "phaseTransitionTimestamps": transitions,
            }
        with contextlib.suppress(NotFound):
            await self.client.patch(VMI, name, patch, namespace)
        await self._force_delete_pods(namespace, str(md.get("uid", "")))
        log.info(
            "VMI %s/%s of fenced node %s released (planned node: %s)",
            namespace,
            name,
            node,
            target or "any",
        )
        owner = owner_vm(vmi)
        vm = self._vms().get((namespace, owner)) if owner else None
        if vm is not None:
            where = f"; it restarts on a healthy node ({target})" if target else ""
            await self.events.record(vm, "NodeFenced", f"node {node} failed and was fenced{where}")

    async def _force_delete_pods(self, namespace: str, uid: str) -> None:
        with contextlib.suppress(NotFound):
            pods, _ = await self.client.list(POD, namespace, label_selector=f"{CREATED_BY}={uid}")
            for pod in pods:
                pod_name = pod["metadata"]["name"]
                if pod["metadata"].get("finalizers"):
                    with contextlib.suppress(NotFound):
                        await self.client.patch(
                            POD, pod_name, {"metadata": {"finalizers": None}}, namespace
                        )
                with contextlib.suppress(NotFound):
                    await self.client.request(
                        "DELETE",
                        POD.path(namespace, pod_name),
                        {"propagationPolicy": "Background", "gracePeriodSeconds": 0},
                    )

    # --- the node returns ----------------------------------------------------------------------

    async def _returned(self, node: JSON) -> Result | None:
        """The fenced node is Ready again: none of its old VMIs is left to it (they were
        released); the taint this controller added goes, and the incident closes."""
        name = node["metadata"]["name"]
        rem = await self.client.find(NODEREMEDIATION, name)
        if rem is None or _closed(rem):
            return None
        status = dict(rem.get("status") or {})
        if status.get("taintAdded"):
            await remove_out_of_service_taint(self.client, node)
            status["taintAdded"] = False
        status["nodeReturnedAt"] = timestamp()
        await self._write(rem, status)
        await self.events.record(
            node,
            "NodeReturned",
            f"node {name} is Ready again after it was fenced; its old VMs stay where they were restarted",
        )
        return None

    async def _write(self, rem: JSON, status: JSON) -> None:
        status["observedGeneration"] = int(rem["metadata"].get("generation") or 1)
        if status == (rem.get("status") or {}):
            return
        try:
            fresh = await self.client.replace(
                NODEREMEDIATION, {**rem, "status": status}, subresource="status"
            )
        except (Conflict, NotFound):
            raise
        except ApiStatusError as exc:
            log.warning("NodeRemediation %s: status not written: %s", rem["metadata"]["name"], exc)
            raise
        rem["metadata"], rem["status"] = fresh["metadata"], fresh.get("status") or {}


__all__ = [
    "HANDLER_FINALIZERS",
    "HAController",
    "Release",
    "affected",
    "merge_affected",
    "plan_releases",
    "policy_for",
    "priority",
    "restart_order",
]
