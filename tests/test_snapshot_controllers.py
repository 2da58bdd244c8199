"""The snapshot, restore and clone controllers' decisions, as pure functions and against the real
API server (no engine: the tests play the node's part where one is needed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import jsonpatch
import pytest

from tests.test_kubevirt_models import upstream_errors
from vmo.client import VM, VMI, VMRESTORE, VMSNAPSHOT, VMSNAPSHOTCONTENT, Client
from vmo.engine.virtcontroller.clone import identity_patches, keep_key
from vmo.engine.virtcontroller.snapshots import (
    PatchError,
    RestoreController,
    SnapshotController,
    content_name,
    failure_deadline,
    restored_claim,
    restored_vm,
)
from vmo.engine.virtcontroller.vm import volume_snapshot_statuses
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]


def source_vm() -> JSON:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": "web",
            "namespace": "ns",
            "labels": {"app": "web", "backup/tier": "gold"},
            "annotations": {"owner": "ops", "vmo.dev/secret": "x"},
        },
        "spec": {
            "runStrategy": "Always",
            "dataVolumeTemplates": [
                {
                    "metadata": {"name": "web-root"},
                    "spec": {"source": {"http": {"url": "http://x"}}},
                }
            ],
            "template": {
                "metadata": {"labels": {"app": "web", "kubevirt.io/domain": "web"}},
                "spec": {
                    "domain": {
                        "memory": {"guest": "64Mi"},
                        "firmware": {"uuid": "5d307ca9-b3ef-428c-8861-06e72d69f223"},
                        "devices": {
                            "interfaces": [
                                {
                                    "name": "default",
                                    "masquerade": {},
                                    "macAddress": "02:00:00:00:00:01",
                                },
                                {"name": "lan", "bridge": {}, "macAddress": "00:50:56:aa:bb:01"},
                            ]
                        },
                    },
                    "volumes": [
                        {"name": "root", "dataVolume": {"name": "web-root"}},
                        {"name": "data", "persistentVolumeClaim": {"claimName": "web-data"}},
                        {"name": "ci", "cloudInitNoCloud": {"userData": "#cloud-config"}},
                    ],
                },
            },
        },
    }


def test_filters_follow_the_last_matching_pattern() -> None:
    assert keep_key("anything", None)
    assert keep_key("app", ["*"])
    assert not keep_key("backup/tier", ["*", "!backup/*"])
    assert keep_key("backup/tier", ["!backup/*", "backup/tier"])
    assert not keep_key("app", ["owner"])


def test_clone_patches_give_a_new_identity_and_filter_metadata() -> None:
    clone = {
        "spec": {
            "newMacAddresses": {"lan": "00:50:56:aa:bb:99"},
            "newSMBiosSerial": "serial-2",
            "labelFilters": ["*", "!backup/*"],
            "annotationFilters": ["owner"],
            "template": {"labelFilters": ["!kubevirt.io/*", "*"]},
            "patches": ['{"op": "add", "path": "/metadata/labels/clone", "value": "yes"}'],
        }
    }
    ops = [json.loads(p) for p in identity_patches(clone, source_vm(), "web-2")]
    vm = jsonpatch.apply_patch(source_vm(), ops)
    assert vm["metadata"]["name"] == "web-2"
    assert vm["metadata"]["labels"] == {"app": "web", "clone": "yes"}
    assert vm["metadata"]["annotations"] == {"owner": "ops"}
    # template filters: "!kubevirt.io/*" then "*": the later "*" keeps everything
    assert vm["spec"]["template"]["metadata"]["labels"] == {
        "app": "web",
        "kubevirt.io/domain": "web",
    }
    domain = vm["spec"]["template"]["spec"]["domain"]
    ifaces = domain["devices"]["interfaces"]
    assert "macAddress" not in ifaces[0] and ifaces[1]["macAddress"] == "00:50:56:aa:bb:99"
    assert domain["firmware"] == {"serial": "serial-2"}


def test_clone_patches_make_a_serial_when_none_is_given() -> None:
    ops = [json.loads(p) for p in identity_patches({"spec": {}}, source_vm(), "t")]
    vm = jsonpatch.apply_patch(source_vm(), ops)
    assert len(vm["spec"]["template"]["spec"]["domain"]["firmware"]["serial"]) == 16


def test_restore_names_follow_the_volume_restore_policy() -> None:
    backup = {"volumeName": "data", "persistentVolumeClaim": {"metadata": {"name": "web-data"}}}
    restore = {"metadata": {"uid": "u1"}, "spec": {}}
    assert restored_claim(restore, backup, "web") == "restore-u1-data"
    restore["spec"]["volumeRestorePolicy"] = "InPlace"
    assert restored_claim(restore, backup, "web") == "web-data"
    restore["spec"]["volumeRestorePolicy"] = "PrefixTargetName"
    assert restored_claim(restore, backup, "other") == "other-data"


def test_a_restored_vm_points_at_the_restored_volumes() -> None:
    names = {"root": "restore-u1-root", "data": "restore-u1-data"}
    new = restored_vm(source_vm(), None, "copy", names, [])
    volumes = {v["name"]: v for v in new["spec"]["template"]["spec"]["volumes"]}
    assert volumes["root"]["dataVolume"]["name"] == "restore-u1-root"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "restore-u1-data"
    assert [t["metadata"]["name"] for t in new["spec"]["dataVolumeTemplates"]] == [
        "restore-u1-root"
    ]
    assert new["metadata"]["name"] == "copy" and upstream_errors(new) == []
    # onto the existing VM: its own run strategy stays
    target = {**source_vm(), "spec": {**source_vm()["spec"], "runStrategy": "Halted"}}
    assert restored_vm(source_vm(), target, "web", names, [])["spec"]["runStrategy"] == "Halted"
    with pytest.raises(PatchError, match=r"^spec.patches\[1\]: ") as caught:
        restored_vm(
            source_vm(),
            None,
            "copy",
            names,
            [
                '{"op": "test", "path": "/kind", "value": "VirtualMachine"}',
                '{"op": "remove", "path": "/nope"}',
            ],
        )
    assert "{" not in str(caught.value)


def test_the_vm_reports_which_volumes_a_snapshot_includes() -> None:
    statuses = volume_snapshot_statuses(source_vm())
    assert statuses[:2] == [{"name": "root", "enabled": True}, {"name": "data", "enabled": True}]
    assert statuses[2]["enabled"] is False and "[cloudInitNoCloud]" in statuses[2]["reason"]


def test_failure_deadline_parses_durations() -> None:
    assert failure_deadline({"spec": {}}) == timedelta(minutes=5)
    assert failure_deadline({"spec": {"failureDeadline": "1m30s"}}) == timedelta(seconds=90)
    assert failure_deadline({"spec": {"failureDeadline": "2h"}}) == timedelta(hours=2)
    assert failure_deadline({"spec": {"failureDeadline": "0s"}}) == timedelta(0)


# --- against the API server ------------------------------------------------------------------


@pytest.fixture
async def client(apiserver: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(apiserver.kubeconfig) as c:
        yield c


def vm_obj(name: str) -> JSON:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "runStrategy": "Halted",
            "template": {"spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}}},
        },
    }


def snap_obj(name: str, vm: str, **spec: Any) -> JSON:
    return {
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineSnapshot",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm},
            **spec,
        },
    }


async def test_a_snapshot_of_a_missing_vm_fails_at_its_deadline(
    client: Client, unique: str
) -> None:
    snap = await client.create(
        VMSNAPSHOT, snap_obj(unique, "nothing", failureDeadline="1s"), "default"
    )
    ctl = SnapshotController(client)
    await ctl.sync(snap)
    snap = await client.get(VMSNAPSHOT, unique, "default")
    progressing = {c["type"]: c for c in snap["status"]["conditions"]}["Progressing"]
    assert progressing["reason"] == "Source does not exist"
    assert snap["status"]["phase"] == "InProgress" and upstream_errors(snap) == []
    await asyncio.sleep(2.1)
    await ctl.sync(await client.get(VMSNAPSHOT, unique, "default"))
    snap = await client.get(VMSNAPSHOT, unique, "default")
    assert snap["status"]["phase"] == "Failed"
    assert snap["status"]["error"]["message"] == "snapshot deadline exceeded"
    assert await client.find(VMSNAPSHOTCONTENT, content_name(snap), "default") is None


async def test_a_snapshot_locks_its_vm_until_the_node_reports(client: Client, unique: str) -> None:
    vm = await client.create(VM, vm_obj(unique), "default")
    snap = await client.create(VMSNAPSHOT, snap_obj(unique, unique), "default")
    ctl = SnapshotController(client)
    assert await ctl.sync(snap) == 1.0
    vm = await client.get(VM, unique, "default")
    assert vm["status"]["snapshotInProgress"] == unique
    assert "snapshot.kubevirt.io/snapshot-source-protection" in vm["metadata"]["finalizers"]
    snap = await client.get(VMSNAPSHOT, unique, "default")
    content = await client.get(VMSNAPSHOTCONTENT, content_name(snap), "default")
    assert upstream_errors(content) == [] and upstream_errors(snap) == []
    assert content["spec"]["source"]["virtualMachine"]["metadata"]["name"] == unique
    # the node's part: it failed
    await client.patch_status(
        VMSNAPSHOTCONTENT,
        content_name(snap),
        {"readyToUse": False, "error": {"message": "disk on fire"}},
        "default",
    )
    await ctl.sync(await client.get(VMSNAPSHOT, unique, "default"))
    snap = await client.get(VMSNAPSHOT, unique, "default")
    assert (
        snap["status"]["phase"] == "Failed" and snap["status"]["error"]["message"] == "disk on fire"
    )
    vm = await client.get(VM, unique, "default")
    assert not vm["status"].get("snapshotInProgress")
    assert "snapshot.kubevirt.io/snapshot-source-protection" not in (
        vm["metadata"].get("finalizers") or []
    )


async def test_restore_onto_a_running_vm_fails_immediately_when_asked(
    client: Client, unique: str
) -> None:
    vm = await client.create(VM, vm_obj(unique), "default")
    vmi = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": unique, "namespace": "default"},
        "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}},
    }
    await client.create(VMI, vmi, "default")
    snap = await client.create(VMSNAPSHOT, snap_obj(unique, unique), "default")
    await client.patch_status(
        VMSNAPSHOT, unique, {"readyToUse": True, "phase": "Succeeded"}, "default"
    )
    content = {
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineSnapshotContent",
        "metadata": {"name": content_name(snap), "namespace": "default"},
        "spec": {"source": {"virtualMachine": vm}, "volumeBackups": []},
    }
    await client.create(VMSNAPSHOTCONTENT, content, "default")
    restore = {
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineRestore",
        "metadata": {"name": unique, "namespace": "default"},
        "spec": {
            "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": unique},
            "virtualMachineSnapshotName": unique,
            "targetReadinessPolicy": "FailImmediate",
        },
    }
    made = await client.create(VMRESTORE, restore, "default")
    assert await RestoreController(client).sync(made) is None
    status = (await client.get(VMRESTORE, unique, "default"))["status"]
    failure = {c["type"]: c for c in status["conditions"]}["Failure"]
    assert failure["status"] == "True" and "must be stopped" in failure["message"]
    assert status["complete"] is False
    assert (await client.get(VM, unique, "default")).get("status", {}).get(
        "restoreInProgress"
    ) is None


async def test_deleting_a_snapshot_waits_for_its_content_in_phase_deleting(
    client: Client, unique: str
) -> None:
    await client.create(VM, vm_obj(unique), "default")
    snap = await client.create(VMSNAPSHOT, snap_obj(unique, unique), "default")
    ctl = SnapshotController(client)
    await ctl.sync(snap)
    snap = await client.get(VMSNAPSHOT, unique, "default")
    name = content_name(snap)
    # the node's finalizer on the content: it goes once the node removed the volume snapshots
    await client.patch(
        VMSNAPSHOTCONTENT, name, {"metadata": {"finalizers": ["test/node"]}}, "default"
    )
    await client.delete(VMSNAPSHOT, unique, "default")
    assert await ctl.sync(await client.get(VMSNAPSHOT, unique, "default")) == 0.5
    snap = await client.get(VMSNAPSHOT, unique, "default")
    assert snap["status"]["phase"] == "Deleting" and upstream_errors(snap) == []
    content = await client.get(VMSNAPSHOTCONTENT, name, "default")
    assert content["metadata"]["deletionTimestamp"]
    await client.patch(VMSNAPSHOTCONTENT, name, {"metadata": {"finalizers": None}}, "default")
    assert await client.find(VMSNAPSHOTCONTENT, name, "default") is None
    assert await ctl.sync(await client.get(VMSNAPSHOT, unique, "default")) is None
    assert await client.find(VMSNAPSHOT, unique, "default") is None
    vm = await client.get(VM, unique, "default")
    assert not (vm.get("status") or {}).get("snapshotInProgress")
    assert "snapshot.kubevirt.io/snapshot-source-protection" not in (
        vm["metadata"].get("finalizers") or []
    )


async def test_a_full_clone_asks_for_independent_copies_of_its_volumes(
    client: Client, unique: str
) -> None:
    """``vmo.dev/clone-mode: full`` goes from the clone to its restore, and from the restore to
    the DataVolumes it makes (the node then copies instead of linking)."""
    from vmo.client import DATAVOLUME
    from vmo.engine.storage.importer import CLONE_MODE
    from vmo.engine.virtcontroller.clone import CloneController

    clone = {
        "metadata": {
            "name": unique,
            "namespace": "default",
            "uid": "u-" + unique,
            "annotations": {CLONE_MODE: "full"},
        },
        "spec": {"source": {"kind": "VirtualMachineSnapshot", "name": unique}},
    }
    restore = CloneController(client)._restore(clone, unique, unique, f"{unique}-copy", source_vm())
    assert restore["metadata"]["annotations"] == {CLONE_MODE: "full"}
    vm = vm_obj(unique)
    snap = await client.create(VMSNAPSHOT, snap_obj(unique, unique), "default")
    await client.patch_status(
        VMSNAPSHOT, unique, {"readyToUse": True, "phase": "Succeeded"}, "default"
    )
    backup = {
        "volumeName": "data",
        "persistentVolumeClaim": {
            "metadata": {"name": f"{unique}-data"},
            "spec": {"resources": {"requests": {"storage": "64Mi"}}},
        },
        "volumeSnapshotName": f"vs-{unique}",
    }
    content = {
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineSnapshotContent",
        "metadata": {"name": content_name(snap), "namespace": "default"},
        "spec": {"source": {"virtualMachine": vm}, "volumeBackups": [backup]},
    }
    await client.create(VMSNAPSHOTCONTENT, content, "default")
    restore["spec"].pop("patches")
    made = await client.create(VMRESTORE, restore, "default")
    assert await RestoreController(client).sync(made) == 1.0
    dv = await client.get(DATAVOLUME, f"restore-{made['metadata']['uid']}-data", "default")
    assert dv["metadata"]["annotations"][CLONE_MODE] == "full"
    assert dv["spec"]["source"] == {"snapshot": {"namespace": "default", "name": f"vs-{unique}"}}
    assert dv["spec"]["storage"]["resources"]["requests"]["storage"] == "64Mi"
    await client.delete(DATAVOLUME, dv["metadata"]["name"], "default")
