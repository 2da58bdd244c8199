"""snapshot.storage.k8s.io/v1: VolumeSnapshot, VolumeSnapshotContent and VolumeSnapshotClass.

API level (the shared server, no engine): what the API accepts validates against the upstream
CRDs (external-snapshotter, ``../shared/schemas/snapshot-storage-v1``); bad input is refused
naming the field. End to end (one engine, one booted guest; the tests run in order and share the
VM): a VM snapshot is made of one VolumeSnapshot per volume, each bound to its content and
ready; a claim snapshots on its own once no VMI writes it; restore still works; deleting the
snapshots deletes their objects and their pool snapshots.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import SCHEMAS, Api, Kubectl
from tests.test_kubevirt_models import strict
from tests.test_snapshot_e2e import (
    READ_SUM,
    WRITE,
    assert_no_orphans,
    blank_dv,
    data_vm,
    pool_dir,
    restore,
    set_running,
    snapshot,
)
from tests.test_vm_e2e import BOOT_TIMEOUT, NS, console, engine_cluster, wait_for, wait_running
from vmo.api.volumesnapshot import volume_snapshot_types
from vmo.engine.storage.pool import Pool
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import http_datavolume

GROUP = "/apis/snapshot.storage.k8s.io/v1"
FILES = {
    "VolumeSnapshot": "volumesnapshots.yaml",
    "VolumeSnapshotContent": "volumesnapshotcontents.yaml",
    "VolumeSnapshotClass": "volumesnapshotclasses.yaml",
}
SNAP = f"/apis/snapshot.kubevirt.io/v1beta1/namespaces/{NS}"
KV = f"/apis/kubevirt.io/v1/namespaces/{NS}"
CDI = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}"


@functools.cache
def upstream_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((SCHEMAS / "snapshot-storage-v1" / FILES[kind]).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = v1["schema"]["openAPIV3Schema"]
    return schema


def upstream_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(strict(upstream_schema(obj["kind"])))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


def assert_valid(obj: dict[str, Any]) -> None:
    """The upstream CRD schema accepts the object as VMO serves it (unknown fields refused)."""
    assert upstream_errors(obj) == [], obj


def volume_snapshot(name: str, ns: str, claim: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"source": {"persistentVolumeClaimName": claim}, **spec},
    }


def content(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotContent",
        "metadata": {"name": name},
        "spec": {
            "deletionPolicy": "Delete",
            "driver": "example.com/csi",
            "source": {"volumeHandle": "vol-1"},
            "volumeSnapshotRef": {"name": name, "namespace": "default"},
            **spec,
        },
    }


def snapshot_class(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotClass",
        "metadata": {"name": name},
        "driver": "example.com/csi",
        "deletionPolicy": "Retain",
        **fields,
    }


def causes(response: Any) -> list[str]:
    return [c.get("field") for c in (response.json().get("details") or {}).get("causes") or []]


# ---------------------------------------------------------------- API level


@pytest.fixture(scope="module")
def ns(api: Api) -> Iterator[str]:
    name = "volume-snapshots"
    assert api.post("/api/v1/namespaces", {"metadata": {"name": name}}).status_code == 201
    yield name
    api.delete(f"/api/v1/namespaces/{name}")


def test_the_three_kinds_are_served_as_upstream_names_them(api: Api) -> None:
    resources = {r["name"]: r for r in api.get(GROUP).json()["resources"]}
    assert resources["volumesnapshots"]["namespaced"] is True
    assert resources["volumesnapshots"]["shortNames"] == ["vs"]
    assert resources["volumesnapshotcontents"]["namespaced"] is False
    assert resources["volumesnapshotcontents"]["shortNames"] == ["vsc", "vscs"]
    assert resources["volumesnapshotclasses"]["namespaced"] is False
    assert "volumesnapshots/status" in resources and "volumesnapshotcontents/status" in resources


def test_every_field_vmo_models_exists_upstream() -> None:
    def walk(ours: dict[str, Any], theirs: dict[str, Any], path: str) -> list[str]:
        missing = []
        for key, child in (ours.get("properties") or {}).items():
            if key not in (theirs.get("properties") or {}):
                missing.append(f"{path}.{key}")
            else:
                missing += walk(child, theirs["properties"][key], f"{path}.{key}")
        return missing

    for rt in volume_snapshot_types():
        assert rt.schema is not None
        assert walk(rt.schema, upstream_schema(rt.kind), rt.kind) == []


def test_accepted_objects_validate_against_upstream(api: Api, ns: str, unique: str) -> None:
    made = [
        api.post(f"{GROUP}/volumesnapshotclasses", snapshot_class(unique)),
        api.post(
            f"{GROUP}/namespaces/{ns}/volumesnapshots",
            volume_snapshot(unique, ns, "data", volumeSnapshotClassName=unique),
        ),
        api.post(f"{GROUP}/volumesnapshotcontents", content(unique)),
    ]
    for response in made:
        assert response.status_code == 201, response.text
        assert_valid(response.json())
    status = {"readyToUse": True, "restoreSize": "1Gi", "creationTime": "2026-12-02T10:00:00Z"}
    r = api.patch(
        f"{GROUP}/namespaces/{ns}/volumesnapshots/{unique}/status",
        {"status": {**status, "boundVolumeSnapshotContentName": unique}},
        "application/merge-patch+json",
    )
    assert r.status_code == 200, r.text
    assert_valid(r.json())
    r = api.patch(
        f"{GROUP}/volumesnapshotcontents/{unique}/status",
        {
            "status": {
                "readyToUse": True,
                "restoreSize": 1 << 30,
                "creationTime": 1,
                "snapshotHandle": "h",
            }
        },
        "application/merge-patch+json",
    )
    assert r.status_code == 200, r.text
    assert_valid(r.json())
    for path in (
        f"{GROUP}/volumesnapshotclasses/{unique}",
        f"{GROUP}/namespaces/{ns}/volumesnapshots/{unique}",
        f"{GROUP}/volumesnapshotcontents/{unique}",
    ):
        api.delete(path)


BAD_SNAPSHOTS = {
    "both sources": (
        {"source": {"persistentVolumeClaimName": "a", "volumeSnapshotContentName": "b"}},
        "spec.source.volumeSnapshotContentName",
    ),
    "no source": ({"source": {}}, "spec.source"),
    "pre-provisioned": (
        {"source": {"volumeSnapshotContentName": "b"}},
        "spec.source.volumeSnapshotContentName",
    ),
    "empty class": (
        {"source": {"persistentVolumeClaimName": "a"}, "volumeSnapshotClassName": ""},
        "spec.volumeSnapshotClassName",
    ),
    "claim not a string": (
        {"source": {"persistentVolumeClaimName": 3}},
        "spec.source.persistentVolumeClaimName",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SNAPSHOTS))
def test_a_bad_volume_snapshot_is_refused_naming_the_field(
    api: Api, ns: str, unique: str, case: str
) -> None:
    spec, field = BAD_SNAPSHOTS[case]
    body = {**volume_snapshot(unique, ns, "x"), "spec": spec}
    r = api.post(f"{GROUP}/namespaces/{ns}/volumesnapshots", body)
    assert r.status_code == 422, r.text
    assert r.json()["kind"] == "Status" and field in causes(r), r.text
    assert api.get(f"{GROUP}/namespaces/{ns}/volumesnapshots/{unique}").status_code == 404


def test_a_volume_snapshot_without_spec_or_with_unknown_fields_is_refused(
    api: Api, ns: str, unique: str
) -> None:
    body = volume_snapshot(unique, ns, "x")
    r = api.post(f"{GROUP}/namespaces/{ns}/volumesnapshots", {**body, "spec": None})
    assert r.status_code == 422 and "spec" in causes(r), r.text
    body["spec"]["sourcePVC"] = "x"
    r = api.post(f"{GROUP}/namespaces/{ns}/volumesnapshots?fieldValidation=Strict", body)
    assert r.status_code == 400, r.text
    assert 'unknown field "spec.sourcePVC"' in r.json()["message"]


def test_a_volume_snapshot_source_never_changes(api: Api, ns: str, unique: str) -> None:
    path = f"{GROUP}/namespaces/{ns}/volumesnapshots"
    assert api.post(path, volume_snapshot(unique, ns, "a")).status_code == 201
    r = api.patch(
        f"{path}/{unique}",
        {"spec": {"source": {"persistentVolumeClaimName": "b"}}},
        "application/merge-patch+json",
    )
    assert r.status_code == 422, r.text
    assert "spec.source.persistentVolumeClaimName" in causes(r)
    api.delete(f"{path}/{unique}")


BAD_CONTENTS = {
    "no driver": ({"driver": None}, "spec.driver"),
    "bad policy": ({"deletionPolicy": "Keep"}, "spec.deletionPolicy"),
    "pre-provisioned": ({"source": {"snapshotHandle": "h"}}, "spec.source.snapshotHandle"),
    "no source": ({"source": {}}, "spec.source"),
    "ref without namespace": ({"volumeSnapshotRef": {"name": "a"}}, "spec.volumeSnapshotRef"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENTS))
def test_a_bad_volume_snapshot_content_is_refused_naming_the_field(
    api: Api, unique: str, case: str
) -> None:
    change, field = BAD_CONTENTS[case]
    body = content(unique)
    body["spec"] = {k: v for k, v in {**body["spec"], **change}.items() if v is not None}
    r = api.post(f"{GROUP}/volumesnapshotcontents", body)
    assert r.status_code == 422, r.text
    assert field in causes(r), r.text


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"driver": None}, "driver"), ({"deletionPolicy": "Keep"}, "deletionPolicy")],
    ids=["no driver", "bad policy"],
)
def test_a_bad_volume_snapshot_class_is_refused_naming_the_field(
    api: Api, unique: str, fields: dict[str, Any], field: str
) -> None:
    body = {k: v for k, v in snapshot_class(unique, **fields).items() if v is not None}
    r = api.post(f"{GROUP}/volumesnapshotclasses", body)
    assert r.status_code == 422, r.text
    assert field in causes(r), r.text


def test_namespace_roles_aggregate_volume_snapshots(api: Api) -> None:
    def rules(role: str) -> list[dict[str, Any]]:
        found = api.get(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{role}").json()
        return [
            r
            for r in found["rules"]
            if "snapshot.storage.k8s.io" in r.get("apiGroups", [])
            and "volumesnapshots" in r.get("resources", [])
        ]

    assert {"create", "delete"} <= {v for r in rules("edit") for v in r["verbs"]}
    assert {"create", "delete"} <= {v for r in rules("admin") for v in r["verbs"]}
    assert {v for r in rules("view") for v in r["verbs"]} == {"get", "list", "watch"}


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-vs"))


def get(capi: Api, path: str) -> dict[str, Any] | None:
    r = capi.get(path)
    return r.json() if r.ok else None


def guest_sum(cluster: ThreadedServer, name: str) -> str:
    return console(cluster, name, READ_SUM).split()[0]


@pytest.fixture(scope="module")
def vm(k: Kubectl, capi: Api, cluster: ThreadedServer, image_server: str) -> dict[str, str]:
    """VM ``vs`` running, with known data (checksum ``a``) on its data disk."""
    k.apply(http_datavolume("vs-root", f"{image_server}/disk.qcow2", namespace=NS))
    k.apply(blank_dv("vs-data"))
    k.apply(data_vm("vs", "vs-root", "vs-data"))
    wait_running(capi, "vs")
    wait_for(lambda: "vmo-guest" in console(cluster, "vs", "echo vmo-guest"), BOOT_TIMEOUT, "guest")
    console(cluster, "vs", WRITE)
    return {"a": guest_sum(cluster, "vs")}


def wait_vs(capi: Api, name: str, timeout: float = 60) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        vs = get(capi, f"{GROUP}/namespaces/{NS}/volumesnapshots/{name}")
        return vs if ((vs or {}).get("status") or {}).get("readyToUse") else None

    return wait_for(ready, timeout, f"VolumeSnapshot {name} ready")


def assert_bound(capi: Api, vs: dict[str, Any], claim: str) -> dict[str, Any]:
    """The snapshot and its content point at each other, as the external-snapshotter binds
    them; both are ready and valid upstream objects. Returns the content."""
    status = vs["status"]
    assert status["readyToUse"] is True and status["creationTime"]
    assert status["restoreSize"] in ("64Mi", "1Gi"), status
    assert vs["spec"]["source"] == {"persistentVolumeClaimName": claim}
    assert vs["spec"]["volumeSnapshotClassName"] == "vmo-local"
    assert (
        "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection"
        in vs["metadata"]["finalizers"]
    )
    vsc = get(capi, f"{GROUP}/volumesnapshotcontents/{status['boundVolumeSnapshotContentName']}")
    assert vsc is not None
    assert vsc["metadata"]["name"] == f"snapcontent-{vs['metadata']['uid']}"
    spec = vsc["spec"]
    assert spec["driver"] == "local.storage.vmo.dev" and spec["deletionPolicy"] == "Delete"
    assert spec["source"] == {"volumeHandle": f"{NS}/{claim}"}
    assert spec["volumeSnapshotClassName"] == "vmo-local"
    ref = spec["volumeSnapshotRef"]
    assert (ref["name"], ref["namespace"], ref["uid"]) == (
        vs["metadata"]["name"],
        NS,
        vs["metadata"]["uid"],
    )
    cstatus = vsc["status"]
    assert cstatus["readyToUse"] is True and cstatus["snapshotHandle"]
    assert cstatus["restoreSize"] in (64 << 20, 1 << 30) and cstatus["creationTime"] > 0
    assert_valid(vs)
    assert_valid(vsc)
    return vsc


def test_the_engine_makes_a_default_snapshot_class_per_driver(capi: Api) -> None:
    classes = {
        c["metadata"]["name"]: c for c in capi.get(f"{GROUP}/volumesnapshotclasses").json()["items"]
    }
    for name, driver in (
        ("vmo-local", "local.storage.vmo.dev"),
        ("vmo-shared", "shared.storage.vmo.dev"),
    ):
        vsclass = classes[name]
        assert vsclass["driver"] == driver and vsclass["deletionPolicy"] == "Delete"
        default = "snapshot.storage.kubernetes.io/is-default-class"
        assert vsclass["metadata"]["annotations"][default] == "true"
        assert_valid(vsclass)
    storage = capi.get("/apis/storage.k8s.io/v1/storageclasses")
    if storage.ok:  # a class per StorageClass provisioner, as KubeVirt picks them
        assert {c["provisioner"] for c in storage.json()["items"]} <= {
            c["driver"] for c in classes.values()
        }


def test_a_vm_snapshot_names_one_ready_volume_snapshot_per_volume(
    cluster: ThreadedServer, k: Kubectl, capi: Api, vm: dict[str, str]
) -> None:
    k.apply(snapshot("vs-snap", "vs"))

    def done() -> dict[str, Any] | None:
        snap = get(capi, f"{SNAP}/virtualmachinesnapshots/vs-snap")
        st = (snap or {}).get("status") or {}
        assert st.get("phase") != "Failed", st
        return snap if st.get("readyToUse") else None

    snap = wait_for(done, 60, "VM snapshot ready")
    vmsc = get(
        capi,
        f"{SNAP}/virtualmachinesnapshotcontents/{snap['status']['virtualMachineSnapshotContentName']}",
    )
    assert vmsc is not None
    backups = {b["volumeName"]: b for b in vmsc["spec"]["volumeBackups"]}
    assert set(backups) == {"root", "data"}
    statuses = {s["volumeSnapshotName"]: s for s in vmsc["status"]["volumeSnapshotStatus"]}
    pool = Pool(pool_dir(cluster))
    for volume, claim in (("root", "vs-root"), ("data", "vs-data")):
        name = backups[volume]["volumeSnapshotName"]
        vs = get(capi, f"{GROUP}/namespaces/{NS}/volumesnapshots/{name}")
        assert vs is not None, f"no VolumeSnapshot {name}"
        (owner,) = vs["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "snapshot.kubevirt.io/v1beta1",
            "kind": "VirtualMachineSnapshotContent",
            "name": vmsc["metadata"]["name"],
            "uid": vmsc["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert_bound(capi, vs, claim)
        assert statuses[name]["readyToUse"] is True
        assert statuses[name]["creationTime"] == vs["status"]["creationTime"]
        assert pool.has_snapshot(NS, name)
    listed = k("get", "volumesnapshot", "-n", NS).stdout
    assert "READYTOUSE" in listed and "vs-root" in listed
    vmobj = get(capi, f"{KV}/virtualmachines/vs")
    assert vmobj is not None
    assert {v["name"]: v["enabled"] for v in vmobj["status"]["volumeSnapshotStatuses"]} == {
        "root": True,
        "cloudinit": False,
        "data": True,
    }
    assert guest_sum(cluster, "vs") == vm["a"]  # the guest runs on, on its new overlays
    console(cluster, "vs", WRITE)
    vm["b"] = guest_sum(cluster, "vs")


def test_a_claim_a_running_vm_writes_is_not_snapshotted_alone(
    k: Kubectl, capi: Api, vm: dict[str, str]
) -> None:
    k.apply(volume_snapshot("data-busy", NS, "vs-data"))

    def refused() -> dict[str, Any] | None:
        vs = get(capi, f"{GROUP}/namespaces/{NS}/volumesnapshots/data-busy")
        return vs if ((vs or {}).get("status") or {}).get("error") else None

    vs = wait_for(refused, 30, "the busy claim's snapshot refused")
    assert vs["status"]["readyToUse"] is False
    assert "in use by the running VirtualMachineInstance vs" in vs["status"]["error"]["message"]
    assert_valid(vs)
    k("delete", "volumesnapshot", "data-busy", "-n", NS, "--wait=true", "--timeout=30s")


def test_a_stopped_vm_claim_snapshots_alone_and_goes_with_its_content(
    cluster: ThreadedServer, k: Kubectl, capi: Api, vm: dict[str, str]
) -> None:
    set_running(k, capi, "vs", False)
    k.apply(volume_snapshot("data-alone", NS, "vs-data"))
    vs = wait_vs(capi, "data-alone")
    vsc = assert_bound(capi, vs, "vs-data")
    pool = Pool(pool_dir(cluster))
    assert pool.has_snapshot(NS, "data-alone")
    # a bound content stays (Terminating) until its snapshot goes
    name = vsc["metadata"]["name"]
    k("delete", "volumesnapshotcontent", name, "--wait=false")
    stays = get(capi, f"{GROUP}/volumesnapshotcontents/{name}")
    assert stays is not None and stays["metadata"].get("deletionTimestamp")
    assert pool.has_snapshot(NS, "data-alone")
    k("delete", "volumesnapshot", "data-alone", "-n", NS, "--wait=true", "--timeout=30s")
    wait_for(
        lambda: get(capi, f"{GROUP}/volumesnapshotcontents/{name}") is None, 30, "content gone"
    )
    assert not pool.has_snapshot(NS, "data-alone")


def test_restore_from_the_vm_snapshot_still_works(
    cluster: ThreadedServer, k: Kubectl, capi: Api, vm: dict[str, str]
) -> None:
    k.apply(restore("vs-back", "vs", "vs-snap"))

    def complete() -> dict[str, Any] | None:
        r = get(capi, f"{SNAP}/virtualmachinerestores/vs-back")
        return r if ((r or {}).get("status") or {}).get("complete") else None

    wait_for(complete, 90, "restore complete")
    set_running(k, capi, "vs", True)
    wait_for(lambda: "ok" in console(cluster, "vs", "echo ok"), BOOT_TIMEOUT, "console")
    assert guest_sum(cluster, "vs") == vm["a"]


def test_deleting_the_vm_snapshot_deletes_its_volume_snapshots(
    cluster: ThreadedServer, k: Kubectl, capi: Api, vm: dict[str, str]
) -> None:
    vmsc_name = get(capi, f"{SNAP}/virtualmachinesnapshots/vs-snap")["status"][  # type: ignore[index]
        "virtualMachineSnapshotContentName"
    ]
    vmsc = get(capi, f"{SNAP}/virtualmachinesnapshotcontents/{vmsc_name}")
    assert vmsc is not None
    names = [b["volumeSnapshotName"] for b in vmsc["spec"]["volumeBackups"]]
    contents = [
        get(capi, f"{GROUP}/namespaces/{NS}/volumesnapshots/{n}")["status"][  # type: ignore[index]
            "boundVolumeSnapshotContentName"
        ]
        for n in names
    ]
    k("delete", "virtualmachinesnapshot", "vs-snap", "-n", NS, "--wait=true", "--timeout=60s")

    def gone() -> bool:
        return all(
            get(capi, f"{GROUP}/namespaces/{NS}/volumesnapshots/{n}") is None for n in names
        ) and all(get(capi, f"{GROUP}/volumesnapshotcontents/{c}") is None for c in contents)

    wait_for(gone, 60, "the volume snapshots and their contents gone")
    pool = Pool(pool_dir(cluster))
    assert not [n for n in names if pool.has_snapshot(NS, n)]
    assert get(capi, f"{SNAP}/virtualmachinesnapshotcontents/{vmsc_name}") is None
    assert_no_orphans(pool_dir(cluster))
