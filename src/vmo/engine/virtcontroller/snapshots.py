"""VirtualMachineSnapshot and VirtualMachineRestore controllers (snapshot.kubevirt.io/v1beta1).

A snapshot locks its VM (finalizer + ``status.snapshotInProgress``), writes a
VirtualMachineSnapshotContent listing one volume snapshot per PVC/DataVolume volume, and waits
for the node to take them (engine/agent/snapshots.py). A restore makes one DataVolume per volume
from its volume snapshot (``source.snapshot``: a copy-on-write layer on the node), then points the
target VM at them (``volumeRestorePolicy``, ``patches``). Protocol: docs/snapshots.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonpatch

from vmo.api.annotations import CLONE_MODE
from vmo.api.annotations import SNAPSHOT_INDICATIONS as INDICATIONS
from vmo.api.duration import parse_duration
from vmo.api.quantity import QuantityError, parse_quantity
from vmo.client import (
    DATAVOLUME,
    VM,
    VMI,
    VMRESTORE,
    VMSNAPSHOT,
    VMSNAPSHOTCONTENT,
    ApiStatusError,
    Client,
    Conflict,
    NotFound,
    Resource,
)
from vmo.engine.virtcontroller.vmi_template import owner_reference
from vmo.runtime import (
    DONE,
    Controller,
    EventRecorder,
    Result,
    TemporaryError,
    Watch,
    merge_conditions,
    split_key,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]
SNAPSHOT_FINALIZER = "snapshot.kubevirt.io/vmsnapshot-protection"
SOURCE_FINALIZER = "snapshot.kubevirt.io/snapshot-source-protection"
RESTORE_NAME = "restore.kubevirt.io/name"
DEFAULT_FAILURE_DEADLINE = timedelta(minutes=5)
TARGET_GRACE = timedelta(minutes=5)
COMPLETE = "Operation complete"
NOT_READY = "Not ready"
INDICATION_MESSAGES = {
    "Online": "The snapshot was taken while the VM was running",
    "GuestAgent": "The guest's filesystems were frozen through the guest agent",
    "NoGuestAgent": "No guest agent answered: the snapshot is crash-consistent",
    "QuiesceTimeout": "Freezing the guest's filesystems timed out: the snapshot is "
    "crash-consistent",
    "Paused": "The VM was paused when the snapshot was taken",
}


def now() -> datetime:
    return datetime.now(UTC)


def stamp(when: datetime | None = None) -> str:
    return (when or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def condition(ctype: str, status: bool, reason: str, message: str = "") -> JSON:
    return {
        "type": ctype,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message or reason,
        "lastProbeTime": None,
        "lastTransitionTime": stamp(),
    }


def owner(obj: JSON, kind: str, api_version: str) -> JSON:
    md = obj["metadata"]
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": md["name"],
        "uid": md.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def claim_of(volume: JSON) -> str | None:
    if "dataVolume" in volume:
        return str((volume["dataVolume"] or {}).get("name") or "") or None
    if "persistentVolumeClaim" in volume:
        return str((volume["persistentVolumeClaim"] or {}).get("claimName") or "") or None
    return None


def vm_volumes(vm: JSON) -> list[JSON]:
    return list(
        (((vm.get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes") or []
    )


class Loop(Controller):
    """Watches kinds, queues primary keys, runs ``sync`` on the primary object (which may ask
    to be looked at again after some seconds)."""

    def __init__(self, client: Client, primary: Resource) -> None:
        super().__init__(client)
        self.primary = primary
        self.name = f"virt-controller-{primary.plural}"
        self.events = EventRecorder(client, component="virt-controller", clock=self.clock)
        self.related: list[Watch] = []

    def watches(self) -> Sequence[Watch]:
        return [Watch(self.primary), *self.related]

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        obj = await self.client.find(self.primary, name, namespace)
        if obj is None:
            return None
        try:
            return Result(await self.sync(obj))
        except Conflict as exc:
            raise TemporaryError(f"stale read: {exc}", delay=0.2) from exc

    async def sync(self, obj: JSON) -> float | None:
        """One pass over the primary object; seconds until the next one, if it needs one."""
        raise NotImplementedError

    async def write_status(self, res: Resource, obj: JSON, status: JSON) -> None:
        old = obj.get("status") or {}
        if "conditions" in status:
            status = {
                **status,
                "conditions": merge_conditions(
                    old.get("conditions"), status["conditions"], stamp()
                ),
            }
        if all(old.get(k) == v for k, v in status.items()):
            return
        md = obj["metadata"]
        with contextlib.suppress(NotFound):
            await self.client.patch_status(res, md["name"], status, md.get("namespace", ""))

    async def set_finalizers(self, res: Resource, obj: JSON, finalizers: list[str]) -> JSON:
        md = obj["metadata"]
        patch = {"metadata": {"resourceVersion": md["resourceVersion"], "finalizers": finalizers}}
        result: JSON = await self.client.patch(res, md["name"], patch, md.get("namespace", ""))
        return result


# --- VirtualMachineSnapshot ------------------------------------------------------------------------


def content_name(snapshot: JSON) -> str:
    return f"vmsnapshot-content-{snapshot['metadata']['uid']}"


def volume_snapshot_name(snapshot: JSON, volume: str) -> str:
    return f"vmsnapshot-{snapshot['metadata']['uid']}-volume-{volume}"


def failure_deadline(snapshot: JSON) -> timedelta:
    """``spec.failureDeadline`` (a Go duration; 0 means none), 5 minutes when absent or invalid."""
    raw = (snapshot.get("spec") or {}).get("failureDeadline")
    if not raw:
        return DEFAULT_FAILURE_DEADLINE
    try:
        return max(parse_duration(str(raw)), timedelta(0))
    except ValueError:
        return DEFAULT_FAILURE_DEADLINE


def build_content(
    snapshot: JSON, vm: JSON, dvs: dict[str, JSON]
) -> tuple[JSON, list[str], list[str]]:
    """The VirtualMachineSnapshotContent for ``vm`` (and the included / excluded volume names)."""
    md = vm["metadata"]
    backups, included, excluded = [], [], []
    for volume in vm_volumes(vm):
        claim = claim_of(volume)
        if claim is None:
            excluded.append(str(volume.get("name")))
            continue
        included.append(str(volume["name"]))
        dv_spec = (dvs.get(claim) or {}).get("spec") or {}
        storage = copy.deepcopy(dv_spec.get("storage") or dv_spec.get("pvc") or {})
        backups.append(
            {
                "volumeName": volume["name"],
                "persistentVolumeClaim": {
                    "metadata": {"name": claim, "namespace": md.get("namespace", "")},
                    "spec": {
                        "accessModes": storage.get("accessModes") or ["ReadWriteOnce"],
                        "resources": storage.get("resources") or {},
                    },
                },
                "volumeSnapshotName": volume_snapshot_name(snapshot, str(volume["name"])),
            }
        )
    source = {
        "metadata": {
            "name": md["name"],
            "namespace": md.get("namespace", ""),
            "uid": md.get("uid", ""),
            "generation": md.get("generation", 1),
            **({"labels": md["labels"]} if md.get("labels") else {}),
            **({"annotations": md["annotations"]} if md.get("annotations") else {}),
        },
        "spec": copy.deepcopy(vm.get("spec") or {}),
    }
    content = {
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineSnapshotContent",
        "metadata": {
            "name": content_name(snapshot),
            "namespace": snapshot["metadata"]["namespace"],
            "ownerReferences": [
                owner(snapshot, "VirtualMachineSnapshot", "snapshot.kubevirt.io/v1beta1")
            ],
        },
        "spec": {
            "virtualMachineSnapshotName": snapshot["metadata"]["name"],
            "source": {"virtualMachine": source},
            "volumeBackups": backups,
        },
    }
    return content, included, excluded


class SnapshotController(Loop):
    def __init__(self, client: Client) -> None:
        super().__init__(client, VMSNAPSHOT)
        self.related.append(Watch(VMSNAPSHOTCONTENT, self._content_keys))

    @staticmethod
    def _content_keys(_etype: str, content: JSON) -> list[str]:
        name = (content.get("spec") or {}).get("virtualMachineSnapshotName")
        return [f"{content['metadata']['namespace']}/{name}"] if name else []

    async def sync(self, snap: JSON) -> float | None:
        md = snap["metadata"]
        namespace, name = md["namespace"], md["name"]
        status = snap.get("status") or {}
        source_name = str(((snap.get("spec") or {}).get("source") or {}).get("name", ""))
        if md.get("deletionTimestamp"):
            return await self._delete(snap, source_name)
        if status.get("phase") in ("Succeeded", "Failed"):
            await self._unlock(namespace, source_name, name)
            return None
        if SNAPSHOT_FINALIZER not in (md.get("finalizers") or []):
            snap = await self.set_finalizers(
                VMSNAPSHOT, snap, [*(md.get("finalizers") or []), SNAPSHOT_FINALIZER]
            )
        vm = await self.client.find(VM, source_name, namespace)
        content = await self.client.find(VMSNAPSHOTCONTENT, content_name(snap), namespace)
        if content is None:
            return await self._begin(snap, vm)
        cstatus = content.get("status") or {}
        if cstatus.get("error"):
            return await self._fail(snap, source_name, str(cstatus["error"].get("message", "")))
        if cstatus.get("readyToUse"):
            indications = [
                i
                for i in (
                    (content["metadata"].get("annotations") or {}).get(INDICATIONS) or ""
                ).split(",")
                if i
            ]
            await self.write_status(
                VMSNAPSHOT,
                snap,
                {
                    "phase": "Succeeded",
                    "readyToUse": True,
                    "creationTime": cstatus.get("creationTime") or stamp(),
                    "indications": indications,
                    "sourceIndications": [
                        {"indication": i, "message": INDICATION_MESSAGES.get(i, i)}
                        for i in indications
                    ],
                    "conditions": [
                        condition("Progressing", False, COMPLETE),
                        condition("Ready", True, COMPLETE),
                    ],
                },
            )
            await self.events.record(
                snap,
                "SuccessfulVirtualMachineSnapshot",
                f"Successfully completed VirtualMachineSnapshot {name}",
            )
            await self._unlock(namespace, source_name, name)
            return None
        return await self._deadline(snap, source_name)

    async def _deadline(self, snap: JSON, source_name: str) -> float | None:
        deadline = failure_deadline(snap)
        created = parse_time(snap["metadata"]["creationTimestamp"])
        if deadline.total_seconds() > 0 and now() > created + deadline:
            await self.client.delete(
                VMSNAPSHOTCONTENT, content_name(snap), snap["metadata"]["namespace"]
            )
            return await self._fail(snap, source_name, "snapshot deadline exceeded")
        return 1.0

    async def _begin(self, snap: JSON, vm: JSON | None) -> float | None:
        namespace, name = snap["metadata"]["namespace"], snap["metadata"]["name"]
        source_name = str(snap["spec"]["source"].get("name", ""))
        if vm is None:
            await self.write_status(
                VMSNAPSHOT,
                snap,
                {
                    "phase": "InProgress",
                    "readyToUse": False,
                    "conditions": [
                        condition(
                            "Progressing",
                            False,
                            "Source does not exist",
                            f"VirtualMachine {source_name} does not exist",
                        ),
                        condition("Ready", False, NOT_READY),
                    ],
                },
            )
            return await self._deadline(snap, source_name)
        if vm["metadata"].get("deletionTimestamp") and SOURCE_FINALIZER not in (
            vm["metadata"].get("finalizers") or []
        ):
            return await self._fail(
                snap, source_name, f"source VirtualMachine {source_name} is being deleted"
            )
        busy = (vm.get("status") or {}).get("snapshotInProgress")
        if busy and busy != name:
            await self.write_status(
                VMSNAPSHOT,
                snap,
                {
                    "phase": "InProgress",
                    "readyToUse": False,
                    "conditions": [
                        condition(
                            "Progressing",
                            False,
                            "Source not locked",
                            f"snapshot {busy} of the VirtualMachine is in progress",
                        ),
                        condition("Ready", False, NOT_READY),
                    ],
                },
            )
            return 1.0
        if (vm.get("status") or {}).get("restoreInProgress"):
            return 1.0
        await self._lock(vm, name)
        dvs = {}
        for volume in vm_volumes(vm):
            claim = claim_of(volume)
            if claim:
                dv = await self.client.find(DATAVOLUME, claim, namespace)
                if dv is not None:
                    dvs[claim] = dv
        content, included, excluded = build_content(snap, vm, dvs)
        vmi = await self.client.find(VMI, source_name, namespace)
        online = vmi is not None and (vmi.get("status") or {}).get("phase") == "Running"
        try:
            await self.client.create(VMSNAPSHOTCONTENT, content, namespace)
        except Conflict as exc:
            if exc.reason != "AlreadyExists":
                raise
        indications = ["Online"] if online else []
        await self.write_status(
            VMSNAPSHOT,
            snap,
            {
                "phase": "InProgress",
                "readyToUse": False,
                "sourceUID": vm["metadata"].get("uid", ""),
                "virtualMachineSnapshotContentName": content_name(snap),
                "snapshotVolumes": {"includedVolumes": included, "excludedVolumes": excluded},
                "indications": indications,
                "sourceIndications": [
                    {"indication": i, "message": INDICATION_MESSAGES[i]} for i in indications
                ],
                "conditions": [
                    condition("Progressing", True, "Source locked and operation in progress"),
                    condition("Ready", False, NOT_READY),
                ],
            },
        )
        return 1.0

    async def _fail(self, snap: JSON, source_name: str, message: str) -> float | None:
        await self.write_status(
            VMSNAPSHOT,
            snap,
            {
                "phase": "Failed",
                "readyToUse": False,
                "error": {"message": message, "time": stamp()},
                "conditions": [
                    condition("Progressing", False, "Operation failed", message),
                    condition("Ready", False, NOT_READY, message),
                    condition("Failure", True, "Operation failed", message),
                ],
            },
        )
        await self.events.record(snap, "VirtualMachineSnapshotError", message, type_="Warning")
        await self._unlock(snap["metadata"]["namespace"], source_name, snap["metadata"]["name"])
        return None

    async def _lock(self, vm: JSON, name: str) -> None:
        md = vm["metadata"]
        if SOURCE_FINALIZER not in (md.get("finalizers") or []):
            await self.set_finalizers(VM, vm, [*(md.get("finalizers") or []), SOURCE_FINALIZER])
        if (vm.get("status") or {}).get("snapshotInProgress") != name:
            await self.client.patch_status(
                VM, md["name"], {"snapshotInProgress": name}, md["namespace"]
            )

    async def _unlock(self, namespace: str, vm_name: str, name: str) -> None:
        vm = await self.client.find(VM, vm_name, namespace)
        if vm is None or (vm.get("status") or {}).get("snapshotInProgress") not in (name, None):
            return
        if (vm.get("status") or {}).get("snapshotInProgress") == name:
            await self.client.patch_status(VM, vm_name, {"snapshotInProgress": None}, namespace)
            vm = await self.client.find(VM, vm_name, namespace)
        if vm is not None and SOURCE_FINALIZER in (vm["metadata"].get("finalizers") or []):
            rest = [f for f in vm["metadata"]["finalizers"] if f != SOURCE_FINALIZER]
            with contextlib.suppress(NotFound):
                await self.set_finalizers(VM, vm, rest)

    async def _delete(self, snap: JSON, source_name: str) -> float | None:
        md = snap["metadata"]
        await self._unlock(md["namespace"], source_name, md["name"])
        if SNAPSHOT_FINALIZER not in (md.get("finalizers") or []):
            return None
        if (snap.get("spec") or {}).get("deletionPolicy", "Delete") != "Retain":
            content = await self.client.find(VMSNAPSHOTCONTENT, content_name(snap), md["namespace"])
            if content is not None:
                if not content["metadata"].get("deletionTimestamp"):
                    await self.client.delete(VMSNAPSHOTCONTENT, content_name(snap), md["namespace"])
                await self.write_status(VMSNAPSHOT, snap, {"phase": "Deleting"})
                return 0.5  # the node removes the volume snapshots first
        else:
            content = await self.client.find(VMSNAPSHOTCONTENT, content_name(snap), md["namespace"])
            if content is not None and content["metadata"].get("ownerReferences"):
                await self.client.patch(
                    VMSNAPSHOTCONTENT,
                    content["metadata"]["name"],
                    {"metadata": {"ownerReferences": None}},
                    md["namespace"],
                )
        rest = [f for f in md.get("finalizers") or [] if f != SNAPSHOT_FINALIZER]
        await self.set_finalizers(VMSNAPSHOT, snap, rest)
        return None


# --- VirtualMachineRestore -------------------------------------------------------------------------


def restored_claim(restore: JSON, backup: JSON, target: str) -> str:
    policy = (restore.get("spec") or {}).get("volumeRestorePolicy") or "RandomizeNames"
    volume = str(backup["volumeName"])
    if policy == "InPlace":
        return str(backup["persistentVolumeClaim"]["metadata"]["name"])
    if policy == "PrefixTargetName":
        return f"{target}-{volume}"
    return f"restore-{restore['metadata']['uid']}-{volume}"


def restored_vm(
    source: JSON, target: JSON | None, target_name: str, names: dict[str, str], patches: list[str]
) -> JSON:
    """The target VM as the restore leaves it: the snapshot's spec, volumes renamed, patched."""
    spec = copy.deepcopy(source.get("spec") or {})
    for volume in ((spec.get("template") or {}).get("spec") or {}).get("volumes") or []:
        name = str(volume.get("name"))
        if name not in names:
            continue
        if "dataVolume" in volume:
            volume["dataVolume"]["name"] = names[name]
        elif "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"]["claimName"] = names[name]
    old_claims = {claim_of(v) for v in vm_volumes(source)}
    renamed = {
        claim_of(v): names[str(v.get("name"))]
        for v in vm_volumes(source)
        if str(v.get("name")) in names
    }
    templates = []
    for tpl in spec.get("dataVolumeTemplates") or []:
        tname = (tpl.get("metadata") or {}).get("name")
        if tname in renamed:
            tpl = {**tpl, "metadata": {**tpl["metadata"], "name": renamed[tname]}}
            tpl["spec"] = {k: v for k, v in (tpl.get("spec") or {}).items() if k != "source"}
            tpl["spec"]["source"] = {"blank": {}}
        if tname in old_claims or tname is None or tname in renamed:
            templates.append(tpl)
    if "dataVolumeTemplates" in spec:
        spec["dataVolumeTemplates"] = templates
    if target is not None:
        vm = copy.deepcopy(target)
        for key in ("running", "runStrategy"):
            spec.pop(key, None)
            if key in (target.get("spec") or {}):
                spec[key] = target["spec"][key]
        vm["spec"] = spec
        vm.pop("status", None)
    else:
        smd = source.get("metadata") or {}
        vm = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {
                "name": target_name,
                **({"labels": dict(smd["labels"])} if smd.get("labels") else {}),
                **({"annotations": dict(smd["annotations"])} if smd.get("annotations") else {}),
            },
            "spec": spec,
        }
    for index, text in enumerate(patches):
        try:
            vm = jsonpatch.apply_patch(vm, [json.loads(text)])
        except (ValueError, jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            # the library quotes the whole document: keep the reason only
            reason = str(exc).split(" in {", 1)[0]
            raise PatchError(f"spec.patches[{index}]: {reason}") from None
    return vm


class PatchError(ValueError):
    """A restore's patch that does not apply; the message names it."""


class RestoreController(Loop):
    def __init__(self, client: Client) -> None:
        super().__init__(client, VMRESTORE)
        self.related += [
            Watch(DATAVOLUME, self._dv_keys),
            Watch(VMSNAPSHOT, self._by_namespace),
            Watch(VMI, self._by_namespace),
        ]
        self._restores: dict[str, set[str]] = {}

    def _dv_keys(self, _etype: str, dv: JSON) -> list[str]:
        name = (dv["metadata"].get("annotations") or {}).get(RESTORE_NAME)
        return [f"{dv['metadata']['namespace']}/{name}"] if name else []

    def _by_namespace(self, _etype: str, obj: JSON) -> list[str]:
        return sorted(self._restores.get(obj["metadata"].get("namespace", ""), set()))

    async def sync(self, restore: JSON) -> float | None:
        md = restore["metadata"]
        namespace, name = md["namespace"], md["name"]
        status = restore.get("status") or {}
        if status.get("complete") or any(
            c.get("type") == "Failure" and c.get("status") == "True"
            for c in status.get("conditions") or []
        ):
            self._restores.get(namespace, set()).discard(name)
            return None
        self._restores.setdefault(namespace, set()).add(name)
        spec = restore.get("spec") or {}
        target_name = str((spec.get("target") or {}).get("name", ""))
        snap_name = str(spec.get("virtualMachineSnapshotName", ""))
        snap = await self.client.find(VMSNAPSHOT, snap_name, namespace)
        if snap is None or not (snap.get("status") or {}).get("readyToUse"):
            why = (
                f"VirtualMachineSnapshot {snap_name} does not exist"
                if snap is None
                else f"VirtualMachineSnapshot {snap_name} is not ready"
            )
            await self._progress(restore, False, why)
            return 2.0
        content = await self.client.find(VMSNAPSHOTCONTENT, content_name(snap), namespace)
        if content is None:
            await self._progress(
                restore, False, f"VirtualMachineSnapshotContent of {snap_name} does not exist"
            )
            return 2.0
        target = await self.client.find(VM, target_name, namespace)
        if target is not None:
            wait = await self._target_ready(restore, target)
            if wait is not None:
                return wait.requeue_after
        backups = (content.get("spec") or {}).get("volumeBackups") or []
        names: dict[str, str] = {}
        restores: list[JSON] = []
        pending = False
        for backup in backups:
            claim = restored_claim(restore, backup, target_name)
            names[str(backup["volumeName"])] = claim
            restores.append(
                {
                    "volumeName": backup["volumeName"],
                    "persistentVolumeClaim": claim,
                    "volumeSnapshotName": backup["volumeSnapshotName"],
                }
            )
            done = await self._ensure_volume(restore, backup, claim, namespace)
            if done is None:
                return 1.0  # a failed or still-deleting volume was reported
            pending = pending or not done
        if pending:
            await self._progress(restore, True, "Creating new PVCs", restores=restores)
            return 1.0
        source = ((content.get("spec") or {}).get("source") or {}).get("virtualMachine") or {}
        try:
            vm = restored_vm(source, target, target_name, names, list(spec.get("patches") or []))
        except PatchError as exc:
            await self._failed(restore, target, str(exc))
            return None
        deleted = await self._apply(restore, target, vm, names)
        if deleted is None:
            return 1.0
        await self.write_status(
            VMRESTORE,
            restore,
            {
                "complete": True,
                "restoreTime": stamp(),
                "restores": restores,
                "deletedDataVolumes": deleted,
                "conditions": [
                    condition("Progressing", False, COMPLETE),
                    condition("Ready", True, COMPLETE),
                ],
            },
        )
        await self.events.record(
            restore,
            "VirtualMachineRestoreComplete",
            f"Successfully completed VirtualMachineRestore {name}",
        )
        await self._unlock(namespace, target_name, name)
        return None

    async def _progress(self, restore: JSON, progressing: bool, message: str, **extra: Any) -> None:
        await self.write_status(
            VMRESTORE,
            restore,
            {
                "complete": False,
                **extra,
                "conditions": [
                    condition("Progressing", progressing, message),
                    condition("Ready", False, message),
                ],
            },
        )

    async def _failed(self, restore: JSON, target: JSON | None, message: str) -> None:
        await self.write_status(
            VMRESTORE,
            restore,
            {
                "complete": False,
                "conditions": [
                    condition("Progressing", False, "Operation failed", message),
                    condition("Ready", False, "Operation failed", message),
                    condition("Failure", True, "Operation failed", message),
                ],
            },
        )
        await self.events.record(restore, "VirtualMachineRestoreError", message, type_="Warning")
        if target is not None:
            await self._unlock(
                restore["metadata"]["namespace"],
                target["metadata"]["name"],
                restore["metadata"]["name"],
            )

    async def _target_ready(self, restore: JSON, target: JSON) -> Result | None:
        """None once the target VM is stopped (and locked for this restore); else when to look
        again (``DONE``: never, the restore failed), after acting on ``targetReadinessPolicy``."""
        md = target["metadata"]
        name = restore["metadata"]["name"]
        busy = (target.get("status") or {}).get("restoreInProgress")
        if busy and busy != name:
            await self._progress(
                restore, False, f"VirtualMachineRestore {busy} of the target is in progress"
            )
            return Result.after(2.0)
        vmi = await self.client.find(VMI, md["name"], md["namespace"])
        if vmi is not None:
            policy = (restore.get("spec") or {}).get("targetReadinessPolicy") or "WaitGracePeriod"
            message = f"Restore target VirtualMachine {md['name']} is running: it must be stopped"
            if policy == "FailImmediate":
                await self._failed(
                    restore, None, message + " (targetReadinessPolicy FailImmediate)"
                )
                return DONE
            if policy == "StopTarget":
                patch: JSON = {"spec": {"runStrategy": "Halted"}}
                if "running" in (target.get("spec") or {}):
                    patch = {"spec": {"running": False}}
                await self.client.patch(VM, md["name"], patch, md["namespace"])
            elif policy == "WaitGracePeriod":
                created = parse_time(restore["metadata"]["creationTimestamp"])
                if now() > created + TARGET_GRACE:
                    await self._failed(restore, None, message + " (grace period exceeded)")
                    return DONE
            await self._progress(restore, False, message)
            return Result.after(1.0)
        if busy != name:
            await self.client.patch_status(
                VM, md["name"], {"restoreInProgress": name}, md["namespace"]
            )
        return None

    async def _ensure_volume(
        self, restore: JSON, backup: JSON, claim: str, namespace: str
    ) -> bool | None:
        """True when the restored volume is ready, False while it is made; None after reporting
        a failure."""
        rname = restore["metadata"]["name"]
        dv = await self.client.find(DATAVOLUME, claim, namespace)
        if dv is not None and (dv["metadata"].get("annotations") or {}).get(RESTORE_NAME) != rname:
            policy = (restore.get("spec") or {}).get("volumeRestorePolicy") or "RandomizeNames"
            if policy != "InPlace":
                await self._failed(restore, None, f"a DataVolume named {claim} already exists")
                return None
            if not dv["metadata"].get("deletionTimestamp"):
                await self.client.delete(DATAVOLUME, claim, namespace)
            return False
        if dv is None:
            size = (
                (
                    ((backup.get("persistentVolumeClaim") or {}).get("spec") or {}).get("resources")
                    or {}
                )
                .get("requests", {})
                .get("storage")
            )
            storage: JSON = {
                "accessModes": (backup["persistentVolumeClaim"].get("spec") or {}).get(
                    "accessModes"
                )
                or ["ReadWriteOnce"]
            }
            if size:
                try:
                    parse_quantity(size)
                    storage["resources"] = {"requests": {"storage": size}}
                except QuantityError:
                    pass
            annotations = {RESTORE_NAME: rname}
            mode = (restore["metadata"].get("annotations") or {}).get(CLONE_MODE)
            if mode:
                annotations[CLONE_MODE] = mode
            new = {
                "apiVersion": "cdi.kubevirt.io/v1beta1",
                "kind": "DataVolume",
                "metadata": {"name": claim, "namespace": namespace, "annotations": annotations},
                "spec": {
                    "source": {
                        "snapshot": {"namespace": namespace, "name": backup["volumeSnapshotName"]}
                    },
                    "storage": storage,
                },
            }
            with contextlib.suppress(Conflict):
                await self.client.create(DATAVOLUME, new, namespace)
            return False
        phase = (dv.get("status") or {}).get("phase")
        if phase == "Failed":
            await self._failed(restore, None, f"restoring volume {claim} failed")
            return None
        return phase == "Succeeded"

    async def _apply(
        self, restore: JSON, target: JSON | None, vm: JSON, names: dict[str, str]
    ) -> list[str] | None:
        namespace = restore["metadata"]["namespace"]
        try:
            if target is None:
                vm["metadata"]["namespace"] = namespace
                vm["metadata"].setdefault("annotations", {})[RESTORE_NAME] = restore["metadata"][
                    "name"
                ]
                existing = await self.client.find(VM, vm["metadata"]["name"], namespace)
                if existing is None:
                    made = await self.client.create(VM, vm, namespace)
                elif (existing["metadata"].get("annotations") or {}).get(RESTORE_NAME) == restore[
                    "metadata"
                ]["name"]:
                    made = existing
                else:
                    await self._failed(
                        restore, None, f"VirtualMachine {vm['metadata']['name']} already exists"
                    )
                    return None
            else:
                made = await self.client.replace(VM, vm)
        except Conflict:
            raise  # a stale read of the target: the loop reconciles again with a fresh one
        except ApiStatusError as exc:
            await self._failed(
                restore,
                target,
                f"writing the target VirtualMachine failed: {exc.status.get('message', exc)}",
            )
            return None
        for claim in names.values():
            dv = await self.client.find(DATAVOLUME, claim, namespace)
            if dv is not None and not dv["metadata"].get("ownerReferences"):
                await self.client.patch(
                    DATAVOLUME,
                    claim,
                    {"metadata": {"ownerReferences": [owner_reference(made)]}},
                    namespace,
                )
        deleted: list[str] = []
        if target is not None:
            keep = set(names.values())
            for volume in vm_volumes(target):
                old = claim_of(volume)
                if old is None or old in keep:
                    continue
                dv = await self.client.find(DATAVOLUME, old, namespace)
                owners = (dv or {}).get("metadata", {}).get("ownerReferences") or []
                if dv is not None and any(
                    o.get("uid") == target["metadata"].get("uid") for o in owners
                ):
                    await self.client.delete(DATAVOLUME, old, namespace)
                    deleted.append(old)
        return deleted

    async def _unlock(self, namespace: str, vm_name: str, name: str) -> None:
        vm = await self.client.find(VM, vm_name, namespace)
        if vm is not None and (vm.get("status") or {}).get("restoreInProgress") == name:
            await self.client.patch_status(VM, vm_name, {"restoreInProgress": None}, namespace)
