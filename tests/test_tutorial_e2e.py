"""A KubeVirt tutorial's whole flow on one real guest, through the official Kubernetes Python
client as such a tutorial's reader would drive it: a PVC annotated for import (CoreV1Api), a VM
naming the claim (CustomObjectsApi), the root disk grown while the guest runs, a blank claim
hot-plugged (``vmo addvolume --persist``) that the guest writes and reads, a VM snapshot made
of one VolumeSnapshot per disk, the hot-plugged one included, and everything deleted again,
with nothing left in the node's pool.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest

from tests.conftest import Api
from tests.test_kubevirt_models import upstream_errors
from tests.test_snapshot_e2e import assert_no_orphans, snapshot
from tests.test_vm_e2e import BOOT_TIMEOUT, NS, console, engine_cluster, vm, wait_for, wait_running
from tests.test_volume_snapshots import upstream_errors as volume_snapshot_errors
from vmo.testing.apiserver import ThreadedServer

ROOT_SIZE, GROWN, DATA_SIZE = "64Mi", "96Mi", "16Mi"
MARKER = "vmo-tutorial-marker"
JSON = dict[str, Any]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-tutorial"))


@pytest.fixture(scope="module")
def client(cluster: ThreadedServer) -> Iterator[kubernetes.client.ApiClient]:
    api_client = kubernetes.config.new_client_from_config(str(cluster.kubeconfig))
    try:
        yield api_client
    finally:
        api_client.close()


def pvc_manifest(name: str, size: str, annotations: dict[str, str] | None = None) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations or {}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }


def tutorial_vm() -> JSON:
    manifest = vm("tut", disk="tut-root")
    spec = manifest["spec"]["template"]["spec"]
    spec["volumes"][0] = {"name": "root", "persistentVolumeClaim": {"claimName": "tut-root"}}
    return manifest


def sectors(size: str) -> str:
    return str((int(size.removesuffix("Mi")) << 20) // 512)


def guest(cluster: ThreadedServer, command: str) -> str:
    return console(cluster, "tut", command)


def vmo(cluster: ThreadedServer, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmo.cli.main", *args]
    argv += ["-n", NS, "--kubeconfig", str(cluster.kubeconfig)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def to_dict(client: kubernetes.client.ApiClient, obj: Any) -> JSON:
    found: JSON = client.sanitize_for_serialization(obj)
    return found


def test_a_tutorial_vm_boots_grows_hotplugs_snapshots_and_goes_without_a_trace(
    cluster: ThreadedServer, capi: Api, client: kubernetes.client.ApiClient, image_server: str
) -> None:
    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    endpoint = {"cdi.kubevirt.io/storage.import.endpoint": f"{image_server}/disk.qcow2"}
    core.create_namespaced_persistent_volume_claim(
        NS, pvc_manifest("tut-root", ROOT_SIZE, endpoint)
    )
    core.create_namespaced_persistent_volume_claim(NS, pvc_manifest("tut-data", DATA_SIZE))
    custom.create_namespaced_custom_object(
        "kubevirt.io", "v1", NS, "virtualmachines", tutorial_vm()
    )
    running = wait_running(capi, "tut")
    node = running["status"]["nodeName"]
    pool = cluster.home / "nodes" / node / "pool"
    wait_for(lambda: "ready" in guest(cluster, "echo ready"), BOOT_TIMEOUT, "the guest's shell")
    # the VMI waited for the claim's import (as a launcher pod waits for its claim) instead of
    # failing and being made again
    created = [
        e.count or 1
        for e in core.list_namespaced_event(NS).items
        if e.involved_object.name == "tut" and e.reason == "SuccessfulCreate"
    ]
    assert sum(created) == 1, created

    # the imported claim is Bound, its PV and claim valid as Kubernetes' own schemas say
    root = core.read_namespaced_persistent_volume_claim("tut-root", NS)
    assert root.status.phase == "Bound" and root.spec.volume_name
    pv = core.read_persistent_volume(root.spec.volume_name)
    kubernetes_validate.validate(to_dict(client, root), "1.30", strict=True)
    kubernetes_validate.validate(to_dict(client, pv), "1.30", strict=True)

    # grow the root disk while the guest runs: the guest sees the new size at once
    patch = {"spec": {"resources": {"requests": {"storage": GROWN}}}}
    core.patch_namespaced_persistent_volume_claim("tut-root", NS, patch)
    wait_for(
        lambda: sectors(GROWN) in guest(cluster, "cat /sys/block/vda/size").split(),
        60,
        "the guest to see the grown root disk",
    )
    wait_for(
        lambda: (
            core.read_namespaced_persistent_volume_claim("tut-root", NS).status.capacity["storage"]
            == GROWN
        ),
        60,
        "the claim's capacity",
    )

    # hot-plug the blank claim, persisted in the VM; the guest writes it and reads it back
    done = vmo(cluster, "addvolume", "tut", "--volume-name=tut-data", "--persist")
    assert done.returncode == 0, done.stderr
    wait_for(
        lambda: sectors(DATA_SIZE) in guest(cluster, "cat /sys/block/sd*/size 2>&1").split(),
        60,
        "the hot-plugged disk in the guest",
    )
    guest(cluster, f"echo {MARKER} | dd of=/dev/sda conv=fsync 2>/dev/null")
    read_back = guest(cluster, "dd if=/dev/sda bs=512 count=1 2>/dev/null | head -c 19; echo")
    assert MARKER in read_back

    # a VM snapshot of the running guest: one VolumeSnapshot per disk, the hot-plugged included
    custom.create_namespaced_custom_object(
        "snapshot.kubevirt.io",
        "v1beta1",
        NS,
        "virtualmachinesnapshots",
        snapshot("tut-snap", "tut"),
    )

    def ready() -> JSON | None:
        snap: JSON = custom.get_namespaced_custom_object(
            "snapshot.kubevirt.io", "v1beta1", NS, "virtualmachinesnapshots", "tut-snap"
        )
        status = snap.get("status") or {}
        assert status.get("phase") != "Failed", status
        return snap if status.get("readyToUse") else None

    snap = wait_for(ready, 90, "the VM snapshot")
    assert upstream_errors(snap) == []
    assert snap["status"]["snapshotVolumes"]["includedVolumes"] == ["root", "tut-data"]
    content: JSON = custom.get_namespaced_custom_object(
        "snapshot.kubevirt.io",
        "v1beta1",
        NS,
        "virtualmachinesnapshotcontents",
        snap["status"]["virtualMachineSnapshotContentName"],
    )
    assert upstream_errors(content) == []
    names = {b["volumeName"]: b["volumeSnapshotName"] for b in content["spec"]["volumeBackups"]}
    assert set(names) == {"root", "tut-data"}
    for name in names.values():
        vs: JSON = custom.get_namespaced_custom_object(
            "snapshot.storage.k8s.io", "v1", NS, "volumesnapshots", name
        )
        assert vs["status"]["readyToUse"] is True
        assert volume_snapshot_errors(vs) == []
    # the guest goes on writing to the hot-plugged disk after the snapshot, and the disk the
    # snapshot switched it onto still holds what it wrote before
    assert MARKER in guest(cluster, "dd if=/dev/sda bs=512 count=1 2>/dev/null | head -c 19; echo")
    guest(cluster, "echo after | dd of=/dev/sda bs=512 seek=1 conv=fsync 2>/dev/null")
    assert_no_orphans(pool)

    # unplug it again while the snapshot holds its old layer: QEMU lets go of the whole chain
    done = vmo(cluster, "removevolume", "tut", "--volume-name=tut-data", "--persist")
    assert done.returncode == 0, done.stderr
    wait_for(
        lambda: "sd" not in guest(cluster, "ls /sys/block; echo listed"),
        60,
        "the disk to leave the guest",
    )
    # its status entry goes only once every block node of the chain is deleted in QEMU
    vmis = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/tut"
    wait_for(
        lambda: (
            "tut-data"
            not in {v["name"] for v in capi.get(vmis).json()["status"].get("volumeStatus") or []}
        ),
        60,
        "the hot-plugged disk's status entry to go",
    )

    # delete it all, as the tutorial's last step does
    custom.delete_namespaced_custom_object(
        "snapshot.kubevirt.io", "v1beta1", NS, "virtualmachinesnapshots", "tut-snap"
    )
    custom.delete_namespaced_custom_object("kubevirt.io", "v1", NS, "virtualmachines", "tut")
    core.delete_namespaced_persistent_volume_claim("tut-root", NS)
    core.delete_namespaced_persistent_volume_claim("tut-data", NS)

    def gone() -> bool:
        claims = core.list_namespaced_persistent_volume_claim(NS).items
        volumes = core.list_persistent_volume().items
        snaps = custom.list_namespaced_custom_object(
            "snapshot.storage.k8s.io", "v1", NS, "volumesnapshots"
        )["items"]
        return not claims and not volumes and not snaps

    wait_for(gone, 120, "the claims, volumes and snapshots to go")
    wait_for(lambda: not leftovers(pool), 60, "the node's pool to be empty")
    assert not list((cluster.home / "nodes" / node / "vms").glob("tut-*"))


def leftovers(pool: Path) -> list[str]:
    """Files in the node's pool other than its own bookkeeping (locks, empty directories)."""
    return sorted(
        str(p.relative_to(pool)) for p in pool.rglob("*") if p.is_file() and p.name != ".lock"
    )
