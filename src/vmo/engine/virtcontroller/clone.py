"""VirtualMachineClone controller (clone.kubevirt.io/v1beta1): a snapshot (of the source VM, or
the given one), then a restore into a new VM with new identity (MACs, SMBIOS serial, firmware
UUID), filtered labels and annotations and the user's patches.

Volumes are linked clones (a copy-on-write layer on the snapshot's) unless the clone carries the
annotation ``vmo.dev/clone-mode: full``. Phases as upstream: SnapshotInProgress ->
CreatingTargetVM -> RestoreInProgress -> Succeeded (or Failed).
"""

from __future__ import annotations

import fnmatch
import json
import secrets
from typing import Any

from vmo.api.annotations import CLONE_MODE
from vmo.client import VM, VMCLONE, VMRESTORE, VMSNAPSHOT, VMSNAPSHOTCONTENT, Client, Conflict
from vmo.engine.virtcontroller.snapshots import (
    COMPLETE,
    Loop,
    condition,
    content_name,
    owner,
)
from vmo.runtime import Watch

JSON = dict[str, Any]
API_VERSION = "clone.kubevirt.io/v1beta1"


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def keep_key(key: str, filters: list[str] | None) -> bool:
    """Upstream's filter rule: patterns in order, ``!`` excludes; the last match decides."""
    if not filters:
        return True
    keep = False
    for pattern in filters:
        negate = pattern.startswith("!")
        if fnmatch.fnmatchcase(key, pattern.lstrip("!")):
            keep = not negate
    return keep


def identity_patches(clone: JSON, source_vm: JSON, target: str) -> list[str]:
    """JSON patches (one op per string, as VirtualMachineRestore wants them) giving the new VM
    its name, new MACs and serial, no firmware UUID, and only the filtered labels/annotations."""
    spec = clone.get("spec") or {}
    ops: list[JSON] = [{"op": "replace", "path": "/metadata/name", "value": target}]
    tspec = ((source_vm.get("spec") or {}).get("template") or {}).get("spec") or {}
    macs = spec.get("newMacAddresses") or {}
    for index, iface in enumerate(
        ((tspec.get("domain") or {}).get("devices") or {}).get("interfaces") or []
    ):
        path = f"/spec/template/spec/domain/devices/interfaces/{index}/macAddress"
        if iface.get("name") in macs:
            ops.append({"op": "add", "path": path, "value": macs[iface["name"]]})
        elif iface.get("macAddress"):
            ops.append({"op": "remove", "path": path})  # a fresh one is assigned
    firmware = (tspec.get("domain") or {}).get("firmware")
    serial = spec.get("newSMBiosSerial") or secrets.token_hex(8)
    if firmware is None:
        ops.append(
            {
                "op": "add",
                "path": "/spec/template/spec/domain/firmware",
                "value": {"serial": serial},
            }
        )
    else:
        ops.append(
            {"op": "add", "path": "/spec/template/spec/domain/firmware/serial", "value": serial}
        )
        if firmware.get("uuid"):
            ops.append({"op": "remove", "path": "/spec/template/spec/domain/firmware/uuid"})
    md = source_vm.get("metadata") or {}
    tmd = ((source_vm.get("spec") or {}).get("template") or {}).get("metadata") or {}
    template = spec.get("template") or {}
    for where, meta, filters in (
        ("/metadata/labels", md.get("labels"), spec.get("labelFilters")),
        ("/metadata/annotations", md.get("annotations"), spec.get("annotationFilters")),
        ("/spec/template/metadata/labels", tmd.get("labels"), template.get("labelFilters")),
        (
            "/spec/template/metadata/annotations",
            tmd.get("annotations"),
            template.get("annotationFilters"),
        ),
    ):
        for key in sorted(meta or {}):
            if not keep_key(key, filters):
                ops.append({"op": "remove", "path": f"{where}/{_escape(key)}"})
    return [json.dumps(op) for op in ops] + [str(p) for p in spec.get("patches") or []]


def _phase(clone: JSON) -> str:
    return str((clone.get("status") or {}).get("phase") or "")


class CloneController(Loop):
    def __init__(self, client: Client) -> None:
        super().__init__(client, VMCLONE)
        self.related += [Watch(VMSNAPSHOT, self._owned), Watch(VMRESTORE, self._owned)]

    @staticmethod
    def _owned(_etype: str, obj: JSON) -> list[str]:
        return [
            f"{obj['metadata']['namespace']}/{ref['name']}"
            for ref in obj["metadata"].get("ownerReferences") or []
            if ref.get("kind") == "VirtualMachineClone"
        ]

    async def _status(
        self, clone: JSON, phase: str, progressing: bool, message: str, **extra: Any
    ) -> None:
        ready = phase == "Succeeded"
        await self.write_status(
            VMCLONE,
            clone,
            {
                "phase": phase,
                **extra,
                "conditions": [
                    condition("Progressing", progressing, message),
                    condition("Ready", ready, message),
                ],
            },
        )

    async def sync(self, clone: JSON) -> float | None:
        md = clone["metadata"]
        namespace, uid = md["namespace"], md["uid"]
        if _phase(clone) in ("Succeeded", "Failed") or md.get("deletionTimestamp"):
            return None
        spec = clone.get("spec") or {}
        source = spec.get("source") or {}
        status = clone.get("status") or {}
        target = str(
            (spec.get("target") or {}).get("name") or status.get("targetName") or f"clone-{uid[:8]}"
        )
        restore_name = f"tmp-restore-{uid}"
        restore = await self.client.find(VMRESTORE, restore_name, namespace)
        if restore is None and await self.client.find(VM, target, namespace) is not None:
            await self._status(
                clone,
                "Failed",
                False,
                f"target VirtualMachine {target} already exists",
                targetName=target,
            )
            await self.events.record(
                clone,
                "CloneFailed",
                f"target VirtualMachine {target} already exists",
                type_="Warning",
            )
            return None
        # the snapshot
        if source.get("kind") == "VirtualMachineSnapshot":
            snap_name = str(source.get("name", ""))
        else:
            snap_name = f"tmp-snapshot-{uid}"
            if (
                await self.client.find(VM, str(source.get("name", "")), namespace) is None
                and restore is None
            ):
                await self._status(
                    clone,
                    "",
                    False,
                    f"source VirtualMachine {source.get('name')} does not exist",
                    targetName=target,
                )
                return 2.0
            if restore is None and await self.client.find(VMSNAPSHOT, snap_name, namespace) is None:
                await self._create(VMSNAPSHOT, self._snapshot(clone, snap_name), namespace)
        snap = await self.client.find(VMSNAPSHOT, snap_name, namespace)
        if restore is None:
            if snap is None:
                await self._status(
                    clone,
                    "",
                    False,
                    f"source VirtualMachineSnapshot {snap_name} does not exist",
                    targetName=target,
                )
                return 2.0
            sstatus = snap.get("status") or {}
            if sstatus.get("phase") == "Failed":
                message = f"snapshot {snap_name} failed: {(sstatus.get('error') or {}).get('message', '')}"
                await self._status(
                    clone, "Failed", False, message, targetName=target, snapshotName=snap_name
                )
                return None
            if not sstatus.get("readyToUse"):
                await self._status(
                    clone,
                    "SnapshotInProgress",
                    True,
                    "snapshot in progress",
                    targetName=target,
                    snapshotName=snap_name,
                )
                return 1.0
            content = await self.client.find(VMSNAPSHOTCONTENT, content_name(snap), namespace)
            source_vm = ((content or {}).get("spec") or {}).get("source", {}).get(
                "virtualMachine"
            ) or {}
            await self._status(
                clone,
                "CreatingTargetVM",
                True,
                "creating the target VM",
                targetName=target,
                snapshotName=snap_name,
            )
            await self._create(
                VMRESTORE,
                self._restore(clone, restore_name, snap_name, target, source_vm),
                namespace,
            )
            return 1.0
        rstatus = restore.get("status") or {}
        failed = [
            c
            for c in rstatus.get("conditions") or []
            if c.get("type") == "Failure" and c.get("status") == "True"
        ]
        extra = {"targetName": target, "snapshotName": snap_name, "restoreName": restore_name}
        if failed:
            await self._status(
                clone, "Failed", False, f"restore failed: {failed[0].get('message', '')}", **extra
            )
            return None
        if not rstatus.get("complete"):
            await self._status(clone, "RestoreInProgress", True, "restore in progress", **extra)
            return 1.0
        if source.get("kind") != "VirtualMachineSnapshot" and snap is not None:
            await self.client.delete(VMSNAPSHOT, snap_name, namespace)
        await self._status(clone, "Succeeded", False, COMPLETE, **extra)
        await self.events.record(clone, "CloneSucceeded", f"VirtualMachine {target} cloned")
        return None

    async def _create(self, res: Any, obj: JSON, namespace: str) -> None:
        try:
            await self.client.create(res, obj, namespace)
        except Conflict as exc:
            if exc.reason != "AlreadyExists":
                raise

    @staticmethod
    def _annotations(clone: JSON) -> JSON:
        mode = (clone["metadata"].get("annotations") or {}).get(CLONE_MODE)
        return {CLONE_MODE: mode} if mode else {}

    def _snapshot(self, clone: JSON, name: str) -> JSON:
        return {
            "apiVersion": "snapshot.kubevirt.io/v1beta1",
            "kind": "VirtualMachineSnapshot",
            "metadata": {
                "name": name,
                "namespace": clone["metadata"]["namespace"],
                "ownerReferences": [owner(clone, "VirtualMachineClone", API_VERSION)],
            },
            "spec": {
                "source": {
                    "apiGroup": "kubevirt.io",
                    "kind": "VirtualMachine",
                    "name": clone["spec"]["source"]["name"],
                }
            },
        }

    def _restore(self, clone: JSON, name: str, snap: str, target: str, source_vm: JSON) -> JSON:
        policy = (clone.get("spec") or {}).get("volumeNamePolicy") or "RandomizeNames"
        return {
            "apiVersion": "snapshot.kubevirt.io/v1beta1",
            "kind": "VirtualMachineRestore",
            "metadata": {
                "name": name,
                "namespace": clone["metadata"]["namespace"],
                "ownerReferences": [owner(clone, "VirtualMachineClone", API_VERSION)],
                **({"annotations": self._annotations(clone)} if self._annotations(clone) else {}),
            },
            "spec": {
                "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": target},
                "virtualMachineSnapshotName": snap,
                "volumeRestorePolicy": policy,
                "patches": identity_patches(clone, source_vm, target),
            },
        }
