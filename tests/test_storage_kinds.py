"""PersistentVolumeClaims, PersistentVolumes and StorageClasses on the API server: admission as
kube-apiserver's storage plugins decide it, upstream's update rules, and objects that validate
against Kubernetes' own schemas (kubernetes-validate). The binding itself is in
test_storage_claims_e2e.py, on real guests."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tests.conftest import Api, Kubectl
from vmo.engine.storage.claims import LOCAL_CLASS, SHARED_CLASS, storage_classes

NS = "default"
PVCS = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
K8S_VERSION = "1.30"


def k8s_valid(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.fixture(scope="module", autouse=True)
def classes(api: Api) -> None:
    for sc in storage_classes():
        response = api.post("/apis/storage.k8s.io/v1/storageclasses", sc)
        assert response.status_code in (201, 409), response.text


def claim(name: str, size: str = "1Gi", **spec: Any) -> dict[str, Any]:
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


def causes(response: Any) -> list[tuple[str, str]]:
    body = response.json()
    return [(c["field"], c["message"]) for c in body["details"]["causes"]]


def test_a_claim_gets_the_default_class_protection_and_filesystem_mode(
    api: Api, unique: str
) -> None:
    created = api.post(PVCS, claim(f"plain-{unique}"))
    assert created.status_code == 201, created.text
    pvc = created.json()
    assert pvc["spec"]["storageClassName"] == LOCAL_CLASS
    assert pvc["spec"]["volumeMode"] == "Filesystem"
    assert pvc["metadata"]["finalizers"] == ["kubernetes.io/pvc-protection"]
    k8s_valid(pvc)


def test_the_classes_are_upstream_storage_classes(api: Api) -> None:
    items = api.get("/apis/storage.k8s.io/v1/storageclasses").json()["items"]
    by_name = {sc["metadata"]["name"]: sc for sc in items}
    local, shared = by_name[LOCAL_CLASS], by_name[SHARED_CLASS]
    assert local["volumeBindingMode"] == "WaitForFirstConsumer"
    assert shared["volumeBindingMode"] == "Immediate"
    annotation = "storageclass.kubernetes.io/is-default-class"
    assert local["metadata"]["annotations"][annotation] == "true"
    assert annotation not in (shared["metadata"].get("annotations") or {})
    for sc in (local, shared):
        assert sc["allowVolumeExpansion"] is True and sc["provisioner"].endswith(".vmo.dev")
        k8s_valid(sc)


def test_an_access_mode_the_class_cannot_give_is_refused_by_field(api: Api, unique: str) -> None:
    refused = api.post(PVCS, claim(f"rwx-{unique}", accessModes=["ReadWriteMany"]))
    assert refused.status_code == 422, refused.text
    [(field, message)] = causes(refused)
    assert field == "spec.accessModes[0]"
    assert '"ReadWriteMany"' in message and LOCAL_CLASS in message
    assert api.get(f"{PVCS}/rwx-{unique}").status_code == 404  # nothing half-made
    shared = claim(f"rwx-ok-{unique}", accessModes=["ReadWriteMany"], storageClassName=SHARED_CLASS)
    assert api.post(PVCS, shared).status_code == 201


def test_shrinking_a_claim_is_refused(api: Api, unique: str) -> None:
    name = f"shrink-{unique}"
    assert api.post(PVCS, claim(name, "2Gi")).status_code == 201
    patch = {"spec": {"resources": {"requests": {"storage": "1Gi"}}}}
    refused = api.patch(f"{PVCS}/{name}", patch, "application/merge-patch+json")
    assert refused.status_code == 422, refused.text
    assert (
        "spec.resources.requests.storage",
        "Forbidden: field can not be less than previous value",
    ) in causes(refused)


def test_growing_an_unbound_claim_is_refused(api: Api, unique: str) -> None:
    name = f"grow-{unique}"
    assert api.post(PVCS, claim(name, "1Gi")).status_code == 201
    patch = {"spec": {"resources": {"requests": {"storage": "2Gi"}}}}
    refused = api.patch(f"{PVCS}/{name}", patch, "application/merge-patch+json")
    assert refused.status_code == 422, refused.text
    [(field, message)] = causes(refused)
    assert field == "spec.resources.requests.storage" and "only bound" in message


def test_a_claims_spec_is_immutable_but_for_its_request(api: Api, unique: str) -> None:
    name = f"frozen-{unique}"
    assert api.post(PVCS, claim(name)).status_code == 201
    patch = {"spec": {"volumeMode": "Block"}}
    refused = api.patch(f"{PVCS}/{name}", patch, "application/merge-patch+json")
    assert refused.status_code == 422, refused.text
    [(field, message)] = causes(refused)
    assert field == "spec" and message.startswith("Forbidden: spec is immutable")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"accessModes": []}, "spec.accessModes"),
        ({"resources": {}}, "spec.resources[storage]"),
        ({"selector": {"matchLabels": {"a": "b"}}}, "spec.selector"),
        ({"dataSource": {"kind": "PersistentVolumeClaim", "name": "x"}}, "spec.dataSource"),
        ({"accessModes": ["ReadWriteSometimes"]}, "spec.accessModes[0]"),
    ],
)
def test_bad_claims_are_refused_naming_the_field(
    api: Api, unique: str, spec: dict[str, Any], field: str
) -> None:
    refused = api.post(PVCS, claim(f"bad-{unique}", **spec))
    assert refused.status_code == 422, refused.text
    assert field in [f for f, _ in causes(refused)], refused.text


def test_a_class_s_provisioner_never_changes(api: Api, unique: str) -> None:
    sc = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": f"sc-{unique}"},
        "provisioner": "example.com/one",
    }
    path = "/apis/storage.k8s.io/v1/storageclasses"
    assert api.post(path, sc).status_code == 201
    refused = api.patch(
        f"{path}/sc-{unique}", {"provisioner": "example.com/two"}, "application/merge-patch+json"
    )
    assert refused.status_code == 422, refused.text
    assert causes(refused)[0][0] == "provisioner"


def test_kubectl_lists_the_storage_kinds(kubectl: Kubectl, unique: str) -> None:
    kubectl.apply(claim(f"kubectl-{unique}"))
    out = kubectl("get", "pvc,pv,sc", "-A").stdout
    assert f"kubectl-{unique}" in out and "Pending" in out
    assert LOCAL_CLASS in out and "(default)" in out
    wide = kubectl("get", "pvc", f"kubectl-{unique}", "-n", NS, "-o", "wide").stdout
    assert "Filesystem" in wide.splitlines()[1]


def test_access_modes_print_as_kubectl_abbreviates_them(
    api: Api, kubectl: Kubectl, unique: str
) -> None:
    name = f"modes-{unique}"
    assert api.post(PVCS, claim(name)).status_code == 201
    status = {"status": {"phase": "Bound", "accessModes": ["ReadWriteOnce", "ReadWriteOncePod"]}}
    patched = api.patch(f"{PVCS}/{name}/status", status, "application/merge-patch+json")
    assert patched.status_code == 200, patched.text
    row = kubectl("get", "pvc", name, "-n", NS).stdout.splitlines()[1].split()
    assert "RWO,RWOP" in row, row
