"""Claims and volumes on a real guest, made the way a KubeVirt tutorial makes them: a DataVolume
(whose claim the VM names), a standalone PersistentVolumeClaim, then a VM naming both claims.
One VM boots once; the tests read what it left, then delete it and check nothing is left."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import kubernetes
import kubernetes_validate
import pytest

from tests.conftest import Api, Kubectl
from tests.test_vm_e2e import BOOT_TIMEOUT, NS, console, engine_cluster, vm, wait_for, wait_running
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import http_datavolume

PVCS = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
DATA_SIZE = 48 << 20  # the standalone claim: 48Mi


def k8s_valid(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, "1.30", strict=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-claims"))


def claim(name: str, size: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": size}},
            **spec,
        },
    }


def claim_vm() -> dict[str, Any]:
    manifest = vm("claimer", disk="claimer-root")
    spec = manifest["spec"]["template"]["spec"]
    # the root disk by its claim, as on a KubeVirt cluster, and a second disk from a plain claim
    spec["volumes"][0] = {"name": "root", "persistentVolumeClaim": {"claimName": "claimer-root"}}
    spec["domain"]["devices"]["disks"].append({"name": "data", "disk": {"bus": "virtio"}})
    spec["volumes"].append({"name": "data", "persistentVolumeClaim": {"claimName": "claimer-data"}})
    return manifest


def pvc(capi: Api, name: str) -> dict[str, Any]:
    response = capi.get(f"{PVCS}/{name}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def bound(capi: Api, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        got = capi.get(f"{PVCS}/{name}").json()
        if got.get("kind") != "PersistentVolumeClaim":
            return None  # not (or no longer) there: a Status
        return got if (got.get("status") or {}).get("phase") == "Bound" else None

    found: dict[str, Any] = wait_for(check, BOOT_TIMEOUT, f"claim {name} to be Bound")
    return found


@pytest.fixture(scope="module")
def client(cluster: ThreadedServer) -> Iterator[kubernetes.client.ApiClient]:
    """The official Kubernetes Python client, from the cluster's kubeconfig; closed before the
    cluster stops, so that no kept-alive connection outlives the server's loop."""
    api_client = kubernetes.config.new_client_from_config(str(cluster.kubeconfig))
    try:
        yield api_client
    finally:
        api_client.close()


@pytest.fixture(scope="module")
def booted(
    k: Kubectl, capi: Api, client: kubernetes.client.ApiClient, image_server: str
) -> dict[str, Any]:
    """As a tutorial does it: the DataVolume with kubectl, the claim with CoreV1Api, the VM
    with CustomObjectsApi."""
    k.apply(
        http_datavolume("claimer-root", f"{image_server}/disk.qcow2", namespace=NS, size="64Mi")
    )
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespaced_persistent_volume_claim(NS, claim("claimer-data", "48Mi"))
    custom = kubernetes.client.CustomObjectsApi(client)
    custom.create_namespaced_custom_object("kubevirt.io", "v1", NS, "virtualmachines", claim_vm())
    return wait_running(capi, "claimer")


def test_the_python_client_reads_claims_volumes_and_classes(
    client: kubernetes.client.ApiClient, booted: dict[str, Any]
) -> None:
    core = kubernetes.client.CoreV1Api(client)
    wait_for(
        lambda: (
            core.read_namespaced_persistent_volume_claim("claimer-data", NS).status.phase == "Bound"
        ),
        BOOT_TIMEOUT,
        "claimer-data Bound",
    )
    data = core.read_namespaced_persistent_volume_claim("claimer-data", NS)
    assert data.spec.storage_class_name == "vmo-local"
    assert data.status.capacity == {"storage": "48Mi"}
    pv = core.read_persistent_volume(data.spec.volume_name)
    assert pv.spec.claim_ref.name == "claimer-data" and pv.status.phase == "Bound"
    classes = kubernetes.client.StorageV1Api(client).list_storage_class().items
    assert {"vmo-local", "vmo-shared"} <= {c.metadata.name for c in classes}
    vm = kubernetes.client.CustomObjectsApi(client).get_namespaced_custom_object(
        "kubevirt.io", "v1", NS, "virtualmachines", "claimer"
    )
    assert vm["status"]["printableStatus"] == "Running"


def test_a_datavolume_owns_a_bound_claim_of_its_name(capi: Api, booted: dict[str, Any]) -> None:
    root = bound(capi, "claimer-root")
    owner = root["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == (
        "DataVolume",
        "claimer-root",
        True,
    )
    annotations = root["metadata"]["annotations"]
    assert annotations["cdi.kubevirt.io/storage.contentType"] == "kubevirt"
    assert annotations["cdi.kubevirt.io/storage.import.source"] == "http"
    assert annotations["cdi.kubevirt.io/storage.pod.phase"] == "Succeeded"
    assert annotations["cdi.kubevirt.io/storage.import.endpoint"].endswith("/disk.qcow2")
    assert root["spec"]["storageClassName"] == "vmo-local"
    assert root["status"]["capacity"]["storage"] == "64Mi"
    dv = capi.get(f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes/claimer-root")
    assert dv.json()["status"]["claimName"] == "claimer-root"
    k8s_valid(root)


def test_a_standalone_claim_is_provisioned_on_its_first_consumer_s_node(
    capi: Api, booted: dict[str, Any]
) -> None:
    data = bound(capi, "claimer-data")
    node = booted["status"]["nodeName"]
    assert data["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == node
    pv = capi.get(f"/api/v1/persistentvolumes/{data['spec']['volumeName']}").json()
    assert pv["status"]["phase"] == "Bound"
    assert pv["spec"]["claimRef"]["uid"] == data["metadata"]["uid"]
    assert pv["spec"]["capacity"]["storage"] == "48Mi"
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == [node]
    assert pv["metadata"]["finalizers"] == ["kubernetes.io/pv-protection"]
    k8s_valid(data)
    k8s_valid(pv)


def test_the_guest_sees_the_claims_size(cluster: ThreadedServer, booted: dict[str, Any]) -> None:
    sectors = DATA_SIZE // 512
    out = wait_for(
        lambda: (
            (o := console(cluster, "claimer", "cat /sys/block/vd*/size"))
            and str(sectors) in o.split()
            and o
        ),
        BOOT_TIMEOUT,
        "a 48Mi disk in the guest",
    )
    assert str(sectors) in out.split()


def test_a_claim_larger_than_its_pool_stays_pending_with_an_event(
    k: Kubectl, capi: Api, booted: dict[str, Any]
) -> None:
    huge = claim("huge", "64Pi", storageClassName="vmo-shared", accessModes=["ReadWriteMany"])
    k.apply(huge)

    def event() -> dict[str, Any] | None:
        events = capi.get(f"/api/v1/namespaces/{NS}/events").json()["items"]
        return next(
            (
                e
                for e in events
                if e["involvedObject"].get("name") == "huge" and e["reason"] == "ProvisioningFailed"
            ),
            None,
        )

    found = wait_for(event, 60, "a ProvisioningFailed Event")
    assert found["type"] == "Warning" and "64Pi" in found["message"], found
    assert pvc(capi, "huge")["status"]["phase"] == "Pending"
    assert capi.delete(f"{PVCS}/huge").status_code == 200
    wait_for(lambda: capi.get(f"{PVCS}/huge").status_code == 404, 30, "huge to go")


def test_a_claim_annotated_for_import_imports_as_older_cdi_did(
    cluster: ThreadedServer, k: Kubectl, capi: Api, image_server: str, booted: dict[str, Any]
) -> None:
    legacy = claim("legacy", "64Mi")
    endpoint = f"{image_server}/disk.qcow2"
    legacy["metadata"]["annotations"] = {"cdi.kubevirt.io/storage.import.endpoint": endpoint}
    k.apply(legacy)
    done = bound(capi, "legacy")
    assert done["metadata"]["annotations"]["cdi.kubevirt.io/storage.pod.phase"] == "Succeeded"
    node = done["metadata"]["annotations"]["volume.kubernetes.io/selected-node"]
    volume = cluster.home / "nodes" / node / "pool" / f"{NS}--legacy.qcow2"
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(volume)],
        capture_output=True,
        text=True,
        check=True,
    )
    image = json.loads(info.stdout)
    assert image["format"] == "qcow2" and image["virtual-size"] >= 64 << 20
    assert image["actual-size"] > 1 << 20  # the image's data, not a blank volume


def test_kubectl_shows_claims_volumes_and_classes(k: Kubectl, booted: dict[str, Any]) -> None:
    out = k("get", "pvc,pv,sc", "-A").stdout
    assert "persistentvolumeclaim/claimer-data" in out and "Bound" in out
    assert "storageclass.storage.k8s.io/vmo-local (default)" in out
    assert "persistentvolume/pvc-" in out


def grow(capi: Api, name: str, size: str) -> None:
    patch = {"spec": {"resources": {"requests": {"storage": size}}}}
    response = capi.patch(f"{PVCS}/{name}", patch, "application/merge-patch+json")
    assert response.status_code == 200, response.text
    wait_for(
        lambda: pvc(capi, name)["status"]["capacity"]["storage"] == size,
        60,
        f"{name} to reach {size}",
    )


def test_growing_a_claim_in_use_grows_the_guest_s_disk_online(
    cluster: ThreadedServer, capi: Api, booted: dict[str, Any]
) -> None:
    grow(capi, "claimer-data", "64Mi")
    sectors = str((64 << 20) // 512)
    wait_for(
        lambda: sectors in console(cluster, "claimer", "cat /sys/block/vd*/size").split(),
        60,
        "the guest to see 64Mi",
    )
    pv = capi.get(f"/api/v1/persistentvolumes/{pvc(capi, 'claimer-data')['spec']['volumeName']}")
    assert pv.json()["spec"]["capacity"]["storage"] == "64Mi"
    events = capi.get(f"/api/v1/namespaces/{NS}/events").json()["items"]
    assert any(
        e["reason"] == "VolumeResizeSuccessful" and "(online)" in e["message"] for e in events
    )


def test_growing_an_idle_claim_grows_its_volume_offline(
    cluster: ThreadedServer, k: Kubectl, capi: Api, booted: dict[str, Any]
) -> None:
    k.apply(claim("idle", "16Mi", storageClassName="vmo-shared"))  # Immediate: bound at once
    bound(capi, "idle")
    grow(capi, "idle", "32Mi")
    info = subprocess.run(
        [
            "qemu-img",
            "info",
            "-U",
            "--output=json",
            str(cluster.home / "shared-pool" / f"{NS}--idle.qcow2"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["virtual-size"] == 32 << 20
    shrink = {"spec": {"resources": {"requests": {"storage": "16Mi"}}}}
    refused = capi.patch(f"{PVCS}/idle", shrink, "application/merge-patch+json")
    assert refused.status_code == 422 and "less than previous" in refused.text


def test_a_claim_in_use_is_protected_and_released_with_its_volume(
    cluster: ThreadedServer, capi: Api, booted: dict[str, Any]
) -> None:
    data = pvc(capi, "claimer-data")
    pv_name = data["spec"]["volumeName"]
    pool = cluster.home / "nodes" / booted["status"]["nodeName"] / "pool"
    assert list(pool.glob(f"{NS}--claimer-data*"))
    assert capi.delete(f"{PVCS}/claimer-data").status_code == 200
    # the running VMI keeps it: Terminating, its volume and PV still there
    terminating = pvc(capi, "claimer-data")
    assert terminating["metadata"]["deletionTimestamp"]
    assert capi.get(f"/api/v1/persistentvolumes/{pv_name}").status_code == 200
    vms = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines"
    assert capi.delete(f"{vms}/claimer").status_code == 200
    wait_for(lambda: capi.get(f"{PVCS}/claimer-data").status_code == 404, 120, "the claim to go")
    wait_for(
        lambda: capi.get(f"/api/v1/persistentvolumes/{pv_name}").status_code == 404,
        30,
        "its PV to go",
    )
    assert not list(pool.glob(f"{NS}--claimer-data*"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_datavolume_without_its_claim_gets_it_back_with_its_volume_unchanged(
    cluster: ThreadedServer, k: Kubectl, capi: Api, booted: dict[str, Any]
) -> None:
    """What every DataVolume made before claims existed looks like: a volume in the pool and no
    claim. After the node agent restarts (an upgrade), the claim and its PV are there, bound,
    and the volume is the same file."""
    blank = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": "older", "namespace": NS},
        "spec": {
            "source": {"blank": {}},
            "storage": {"resources": {"requests": {"storage": "16Mi"}}},
        },
    }
    k.apply(blank)
    first = bound(capi, "older")
    node = first["metadata"]["annotations"]["volume.kubernetes.io/selected-node"]
    volume = cluster.home / "nodes" / node / "pool" / f"{NS}--older.qcow2"
    inode = volume.resolve().stat().st_ino
    assert capi.delete(f"{PVCS}/older").status_code == 200
    wait_for(lambda: capi.get(f"{PVCS}/older").status_code == 404, 30, "the claim to go")
    old_pv = first["spec"]["volumeName"]
    wait_for(
        lambda: capi.get(f"/api/v1/persistentvolumes/{old_pv}").status_code == 404, 30, "its PV"
    )
    assert volume.resolve().stat().st_ino == inode  # a DataVolume's volume stays with it
    cluster.restart_node(node)
    again = bound(capi, "older")
    assert again["metadata"]["uid"] != first["metadata"]["uid"]
    assert volume.resolve().stat().st_ino == inode
    pv = capi.get(f"/api/v1/persistentvolumes/{again['spec']['volumeName']}").json()
    assert pv["spec"]["claimRef"]["uid"] == again["metadata"]["uid"]


def test_deleting_a_storage_class_strands_no_claim(
    cluster: ThreadedServer, k: Kubectl, capi: Api, booted: dict[str, Any]
) -> None:
    """Last in the module: the class goes; its bound claim stays bound and is still released
    with its volume; a new claim naming the class waits, with an Event saying why."""
    sc = "/apis/storage.k8s.io/v1/storageclasses/vmo-shared"
    assert capi.delete(sc).status_code == 200
    assert pvc(capi, "idle")["status"]["phase"] == "Bound"
    k.apply(claim("orphan", "16Mi", storageClassName="vmo-shared", accessModes=["ReadWriteMany"]))

    def why() -> dict[str, Any] | None:
        events = capi.get(f"/api/v1/namespaces/{NS}/events").json()["items"]
        return next((e for e in events if e["involvedObject"].get("name") == "orphan"), None)

    event = wait_for(why, 30, "an Event for the orphan claim")
    assert 'storageclass.storage.k8s.io "vmo-shared" not found' in event["message"]
    assert pvc(capi, "orphan")["status"]["phase"] == "Pending"
    pv_name = pvc(capi, "idle")["spec"]["volumeName"]
    assert capi.delete(f"{PVCS}/idle").status_code == 200
    wait_for(
        lambda: capi.get(f"/api/v1/persistentvolumes/{pv_name}").status_code == 404, 30, "its PV"
    )
    assert not (cluster.home / "shared-pool" / f"{NS}--idle.qcow2").exists()
