"""Snapshots, restores and clones end to end on real guests and real disks.

One engine; a VM with a boot disk and a data disk (DataVolumes in the node's pool). The guest
writes random data to its data disk through its console; checksums of what the guest reads are
compared after an online snapshot, a restore and a clone. The tests run in order and share the
VM (each says what state it leaves).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, Kubectl
from tests.test_kubevirt_models import upstream_errors
from tests.test_vm_e2e import (
    BOOT_TIMEOUT,
    NS,
    console,
    engine_cluster,
    vmi_of,
    wait_for,
    wait_running,
)
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import boot_vm, http_datavolume

SNAP = f"/apis/snapshot.kubevirt.io/v1beta1/namespaces/{NS}"
CLONE = f"/apis/clone.kubevirt.io/v1beta1/namespaces/{NS}"
KV = f"/apis/kubevirt.io/v1/namespaces/{NS}"
CDI = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}"
DATA_SERIAL = "vmodata"
# the data disk's device, found by its serial; 1 MiB of it is what the tests write and compare
FIND_DATA = (
    'for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = '
    f"{DATA_SERIAL} ] && D=/dev/${{d##*/}}; done"
)
READ_SUM = f"{FIND_DATA}; sync; echo 3 > /proc/sys/vm/drop_caches; dd if=$D bs=64k count=16 2>/dev/null | md5sum"
WRITE = f"{FIND_DATA}; dd if=/dev/urandom of=$D bs=64k count=16 2>/dev/null; sync"


def assert_valid(obj: dict[str, Any]) -> None:
    """The upstream schema (KubeVirt v1.9.0) accepts the object as VMO serves it."""
    assert upstream_errors(obj) == [], obj


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-snap"))


def data_vm(name: str, root: str, data: str) -> dict[str, Any]:
    obj = boot_vm(
        name,
        namespace=NS,
        disk=root,
        interfaces=[{"name": "default", "masquerade": {}}],
        networks=[{"name": "default", "pod": {}}],
    )
    spec = obj["spec"]["template"]["spec"]
    spec["domain"]["devices"]["disks"].append(
        {"name": "data", "disk": {"bus": "virtio"}, "serial": DATA_SERIAL}
    )
    spec["volumes"].append({"name": "data", "dataVolume": {"name": data}})
    return obj


def blank_dv(name: str, size: str = "64Mi") -> dict[str, Any]:
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": {"blank": {}},
            "storage": {"resources": {"requests": {"storage": size}}},
        },
    }


def snapshot(name: str, vm: str) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineSnapshot",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm}},
    }


def get(capi: Api, path: str) -> dict[str, Any] | None:
    r = capi.get(path)
    return r.json() if r.ok else None


def wait_snapshot(capi: Api, name: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        snap = get(capi, f"{SNAP}/virtualmachinesnapshots/{name}")
        status = (snap or {}).get("status") or {}
        assert status.get("phase") != "Failed", status
        return snap if status.get("readyToUse") else None

    return wait_for(ready, 60, f"snapshot {name} ready")


def set_running(k: Kubectl, capi: Api, name: str, running: bool) -> None:
    strategy = "Always" if running else "Halted"
    k(
        "patch",
        "vm",
        name,
        "-n",
        NS,
        "--type=merge",
        "-p",
        f'{{"spec":{{"runStrategy":"{strategy}"}}}}',
    )
    if running:
        wait_running(capi, name)
    else:
        wait_for(lambda: vmi_of(capi, name) is None, 120, f"VMI {name} gone")


def guest_sum(cluster: ThreadedServer, name: str) -> str:
    return console(cluster, name, READ_SUM).split()[0]


def pool_dir(cluster: ThreadedServer) -> Path:
    pools = list(cluster.home.glob("**/pool"))
    assert pools, "no node pool found"
    return pools[0]


def assert_no_orphans(pool: Path) -> None:
    """Every layer is in the chain of a volume or a snapshot; no partial files."""
    from vmo.engine.storage.pool import Pool

    p = Pool(pool)
    needed: set[Path] = set()
    for link in pool.glob("*.qcow2"):
        needed.update(p.chain(link))
    for record in p.snapshots():
        needed.update(p.chain(p.snapshot_path(record.namespace, record.name)))
    layers = {x for x in p.layers_dir.iterdir() if x.name != ".lock"}
    assert layers == {x for x in needed if x.parent == p.layers_dir}
    assert not list(pool.glob(".part-*")) and not list(p.layers_dir.glob(".part-*"))


@pytest.fixture(scope="module")
def src(k: Kubectl, capi: Api, cluster: ThreadedServer, image_server: str) -> dict[str, str]:
    """VM ``src`` running, with known data (checksum ``a``) on its data disk."""
    k.apply(http_datavolume("src-root", f"{image_server}/disk.qcow2", namespace=NS))
    k.apply(blank_dv("src-data"))
    k.apply(data_vm("src", "src-root", "src-data"))
    wait_running(capi, "src")
    wait_for(
        lambda: "vmo-guest" in console(cluster, "src", "echo vmo-guest"), BOOT_TIMEOUT, "console"
    )
    console(cluster, "src", WRITE)
    return {"a": guest_sum(cluster, "src")}


def test_online_snapshot_keeps_the_data_the_guest_wrote(
    cluster: ThreadedServer, k: Kubectl, capi: Api, src: dict[str, str]
) -> None:
    # the guest's qemu-ga answers (through virt-api's guestosinfo) before the snapshot
    info_path = (
        f"/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/src/guestosinfo"
    )
    info = wait_for(
        lambda: (
            (capi.get(info_path).json() or {}).get("id") == "vmo-guest"
            and capi.get(info_path).json()
        ),
        60,
        "the guest agent",
    )
    assert info["kernelRelease"]
    k.apply(snapshot("snap-a", "src"))
    snap = wait_snapshot(capi, "snap-a")
    status = snap["status"]
    assert status["phase"] == "Succeeded" and status["creationTime"]
    indications = {i["indication"] for i in status["sourceIndications"]}
    # frozen through the agent (and thawed: the guest answers below)
    assert indications == {"Online", "GuestAgent"}
    assert status["snapshotVolumes"]["includedVolumes"] == ["root", "data"]
    assert status["snapshotVolumes"]["excludedVolumes"] == ["cloudinit"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Progressing": "False",
        "Ready": "True",
    }
    assert_valid(snap)
    content = get(
        capi, f"{SNAP}/virtualmachinesnapshotcontents/{status['virtualMachineSnapshotContentName']}"
    )
    assert content is not None and content["status"]["readyToUse"]
    assert_valid(content)
    vm = get(capi, f"{KV}/virtualmachines/src")
    assert vm is not None and not vm["status"].get("snapshotInProgress")
    assert {v["name"]: v["enabled"] for v in vm["status"]["volumeSnapshotStatuses"]} == {
        "root": True,
        "cloudinit": False,
        "data": True,
    }
    assert_valid(vm)
    assert "snapshot.kubevirt.io/snapshot-source-protection" not in vm["metadata"].get(
        "finalizers", []
    )
    # the guest kept running on its new overlays and sees its data; it now writes something else
    assert guest_sum(cluster, "src") == src["a"]
    console(cluster, "src", WRITE)
    src["b"] = guest_sum(cluster, "src")
    assert src["b"] != src["a"]
    assert_no_orphans(pool_dir(cluster))


def restore(name: str, vm: str, snap: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineRestore",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm},
            "virtualMachineSnapshotName": snap,
            **spec,
        },
    }


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def test_restore_onto_a_running_vm_fails_and_changes_nothing(
    k: Kubectl, capi: Api, src: dict[str, str]
) -> None:
    k.apply(restore("too-early", "src", "snap-a", targetReadinessPolicy="FailImmediate"))

    def failed() -> dict[str, Any] | None:
        r = get(capi, f"{SNAP}/virtualmachinerestores/too-early")
        return r if conditions(r or {}).get("Failure", {}).get("status") == "True" else None

    r = wait_for(failed, 30, "restore to fail")
    assert "is running" in conditions(r)["Failure"]["message"]
    assert not r["status"].get("complete")
    assert_valid(r)
    dvs = capi.get(f"{CDI}/datavolumes").json()["items"]
    assert not [
        d for d in dvs if "restore.kubevirt.io/name" in (d["metadata"].get("annotations") or {})
    ]
    assert vmi_of(capi, "src") is not None


def test_restore_brings_back_the_snapshot_data(
    cluster: ThreadedServer, k: Kubectl, capi: Api, src: dict[str, str]
) -> None:
    set_running(k, capi, "src", False)
    k.apply(restore("back-to-a", "src", "snap-a"))

    def complete() -> dict[str, Any] | None:
        r = get(capi, f"{SNAP}/virtualmachinerestores/back-to-a")
        assert conditions(r or {}).get("Failure", {}).get("status") != "True", r
        return r if (r or {}).get("status", {}).get("complete") else None

    r = wait_for(complete, 90, "restore to complete")
    assert r["status"]["restoreTime"]
    assert {x["volumeName"] for x in r["status"]["restores"]} == {"root", "data"}
    assert_valid(r)
    vm = get(capi, f"{KV}/virtualmachines/src")
    assert vm is not None
    claims = {
        v["name"]: (v.get("dataVolume") or {}).get("name")
        for v in vm["spec"]["template"]["spec"]["volumes"]
    }
    assert claims["data"].startswith("restore-") and claims["root"].startswith("restore-")
    assert not vm["status"].get("restoreInProgress")
    set_running(k, capi, "src", True)
    wait_for(lambda: "ok" in console(cluster, "src", "echo ok"), BOOT_TIMEOUT, "console")
    assert guest_sum(cluster, "src") == src["a"]


def test_a_linked_clone_sees_its_parent_data_and_writes_only_its_own(
    cluster: ThreadedServer, k: Kubectl, capi: Api, src: dict[str, str]
) -> None:
    # a snapshot of the running source first: the clone then stands on a layer the source's
    # QEMU was handed by descriptor, and still has open as a backing file
    k.apply(snapshot("before-clone", "src"))
    wait_snapshot(capi, "before-clone")
    k.apply(
        {
            "apiVersion": "clone.kubevirt.io/v1beta1",
            "kind": "VirtualMachineClone",
            "metadata": {"name": "copy-of-src", "namespace": NS},
            "spec": {
                "source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "src"},
                "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "copy"},
                "newSMBiosSerial": "vmo-copy-1",
            },
        }
    )

    def done() -> dict[str, Any] | None:
        c = get(capi, f"{CLONE}/virtualmachineclones/copy-of-src")
        phase = ((c or {}).get("status") or {}).get("phase")
        assert phase != "Failed", c
        return c if phase == "Succeeded" else None

    clone = wait_for(done, 120, "clone to succeed")
    assert clone["status"]["targetName"] == "copy"
    assert_valid(clone)
    # the temporary snapshot is gone again
    temporary = f"{SNAP}/virtualmachinesnapshots/{clone['status']['snapshotName']}"
    wait_for(lambda: get(capi, temporary) is None, 30, "the clone's snapshot to go")
    copy = get(capi, f"{KV}/virtualmachines/copy")
    assert copy is not None
    tspec = copy["spec"]["template"]["spec"]
    assert tspec["domain"]["firmware"]["serial"] == "vmo-copy-1"
    src_vm = get(capi, f"{KV}/virtualmachines/src")
    assert src_vm is not None
    src_macs = {
        i.get("macAddress")
        for i in src_vm["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"]
    }
    copy_macs = {i.get("macAddress") for i in tspec["domain"]["devices"]["interfaces"]}
    assert not (src_macs & copy_macs) - {None}
    wait_running(capi, "copy")
    wait_for(lambda: "ok" in console(cluster, "copy", "echo ok"), BOOT_TIMEOUT, "console")
    assert guest_sum(cluster, "copy") == src["a"]
    console(cluster, "copy", WRITE)
    src["c"] = guest_sum(cluster, "copy")
    assert src["c"] != src["a"]
    assert guest_sum(cluster, "src") == src["a"]
    assert_no_orphans(pool_dir(cluster))


def test_clone_to_an_existing_name_fails(k: Kubectl, capi: Api, src: dict[str, str]) -> None:
    k.apply(
        {
            "apiVersion": "clone.kubevirt.io/v1beta1",
            "kind": "VirtualMachineClone",
            "metadata": {"name": "onto-src", "namespace": NS},
            "spec": {
                "source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "src"},
                "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "copy"},
            },
        }
    )

    def failed() -> dict[str, Any] | None:
        c = get(capi, f"{CLONE}/virtualmachineclones/onto-src")
        return c if ((c or {}).get("status") or {}).get("phase") == "Failed" else None

    c = wait_for(failed, 30, "clone to fail")
    assert "already exists" in conditions(c)["Ready"]["message"]
    snaps = capi.get(f"{SNAP}/virtualmachinesnapshots").json()["items"]
    assert not [s for s in snaps if c["metadata"]["uid"] in s["metadata"]["name"]]


def test_snapshot_of_a_missing_vm_says_so(k: Kubectl, capi: Api) -> None:
    k.apply(snapshot("of-nothing", "no-such-vm"))

    def reported() -> dict[str, Any] | None:
        s = get(capi, f"{SNAP}/virtualmachinesnapshots/of-nothing")
        return (
            s
            if conditions(s or {}).get("Progressing", {}).get("reason") == "Source does not exist"
            else None
        )

    s = wait_for(reported, 30, "missing source reported")
    assert s["status"]["readyToUse"] is False
    assert_valid(s)
    assert (
        get(
            capi, f"{SNAP}/virtualmachinesnapshotcontents/vmsnapshot-content-{s['metadata']['uid']}"
        )
        is None
    )
    k("delete", "vmsnapshot", "of-nothing", "-n", NS, "--wait=true")


def test_deleting_a_snapshot_merges_its_layers_and_leaves_no_files(
    cluster: ThreadedServer, k: Kubectl, capi: Api, src: dict[str, str]
) -> None:
    pool = pool_dir(cluster)
    before = len(list((pool / ".layers").glob("*.qcow2")))
    snap = get(capi, f"{SNAP}/virtualmachinesnapshots/snap-a")
    assert snap is not None
    uid = snap["metadata"]["uid"]
    from vmo.engine.storage.pool import Pool

    assert [r for r in Pool(pool).snapshots() if uid in r.name]
    k("delete", "vmsnapshot", "snap-a", "-n", NS, "--wait=true")
    wait_for(
        lambda: get(capi, f"{SNAP}/virtualmachinesnapshots/snap-a") is None, 60, "snapshot gone"
    )
    contents = capi.get(f"{SNAP}/virtualmachinesnapshotcontents").json()["items"]
    assert not [c for c in contents if c["spec"]["virtualMachineSnapshotName"] == "snap-a"]
    assert not [r for r in Pool(pool).snapshots() if uid in r.name]
    assert_no_orphans(pool)
    # the restored and cloned volumes still stand on the snapshot's layers: those stay
    assert len(list((pool / ".layers").glob("*.qcow2"))) <= before
    # the running guests still read what they wrote
    assert guest_sum(cluster, "src") == src["a"]


def claim(capi: Api, vm: str, volume: str) -> str:
    obj = get(capi, f"{KV}/virtualmachines/{vm}")
    assert obj is not None
    volumes = obj["spec"]["template"]["spec"]["volumes"]
    return str(next(v["dataVolume"]["name"] for v in volumes if v["name"] == volume))


def test_vmo_storage_reports_sizes_chains_and_dependents(
    cluster: ThreadedServer, capi: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmo.cli.main import main

    assert main(["--home", str(cluster.home), "storage", "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    volumes = {v["volume"]: v for v in report["volumes"]}
    parent, child = f"{NS}/{claim(capi, 'src', 'data')}", f"{NS}/{claim(capi, 'copy', 'data')}"
    assert volumes[child]["virtual_size"] == 64 * 1024 * 1024
    assert volumes[child]["real_size"] > 0
    # the linked clone stands on the layer its parent's restore also stands on
    assert len(volumes[child]["chain"]) >= 2
    assert parent in volumes[child]["dependents"] and child in volumes[parent]["dependents"]
    assert main(["--home", str(cluster.home), "storage", "--layers"]) == 0
    table = capsys.readouterr().out
    assert child in table and "DEPENDENTS" in table


def test_a_snapshot_of_a_vm_being_deleted_fails_and_an_earlier_one_restores_a_new_vm(
    cluster: ThreadedServer, k: Kubectl, capi: Api, src: dict[str, str]
) -> None:
    from vmo.engine.storage.pool import Pool

    pool = Pool(pool_dir(cluster))
    set_running(k, capi, "copy", False)
    k.apply(snapshot("last-of-copy", "copy"))
    snap = wait_snapshot(capi, "last-of-copy")
    assert snap["status"]["phase"] == "Succeeded"
    assert not snap["status"].get("sourceIndications")  # offline: no Online indication
    # the VM is being deleted (a finalizer of the test's holds it) when the next snapshot comes
    hold = '{"metadata": {"finalizers": ["vmo.dev/test-hold"]}}'
    k("patch", "vm", "copy", "-n", NS, "--type=merge", "-p", hold)
    k("delete", "vm", "copy", "-n", NS, "--wait=false")
    before = len(pool.snapshots())
    k.apply(snapshot("too-late", "copy"))

    def failed() -> dict[str, Any] | None:
        s = get(capi, f"{SNAP}/virtualmachinesnapshots/too-late")
        return s if ((s or {}).get("status") or {}).get("phase") == "Failed" else None

    late = wait_for(failed, 30, "the snapshot of a VM being deleted to fail")
    assert "being deleted" in late["status"]["error"]["message"]
    assert_valid(late)
    assert (
        get(
            capi,
            f"{SNAP}/virtualmachinesnapshotcontents/vmsnapshot-content-{late['metadata']['uid']}",
        )
        is None
    )
    assert len(pool.snapshots()) == before
    k("patch", "vm", "copy", "-n", NS, "--type=merge", "-p", '{"metadata": {"finalizers": null}}')
    wait_for(lambda: get(capi, f"{KV}/virtualmachines/copy") is None, 60, "VM copy gone")
    # a restore into a new VM, with prefixed volume names and a patch
    k.apply(
        restore(
            "reborn",
            "reborn",
            "last-of-copy",
            volumeRestorePolicy="PrefixTargetName",
            patches=['{"op": "add", "path": "/metadata/labels", "value": {"reborn": "yes"}}'],
        )
    )

    def complete() -> dict[str, Any] | None:
        r = get(capi, f"{SNAP}/virtualmachinerestores/reborn")
        assert conditions(r or {}).get("Failure", {}).get("status") != "True", r
        return r if (r or {}).get("status", {}).get("complete") else None

    wait_for(complete, 90, "restore into a new VM")
    vm = get(capi, f"{KV}/virtualmachines/reborn")
    assert vm is not None and vm["metadata"]["labels"]["reborn"] == "yes"
    assert claim(capi, "reborn", "data") == "reborn-data"
    assert_valid(vm)
    set_running(k, capi, "reborn", True)
    wait_for(lambda: "ok" in console(cluster, "reborn", "echo ok"), BOOT_TIMEOUT, "console")
    assert guest_sum(cluster, "reborn") == src["c"]
    assert_no_orphans(pool_dir(cluster))


def test_deleting_a_running_vms_snapshot_merges_its_layer(
    cluster: ThreadedServer, k: Kubectl, capi: Api, src: dict[str, str]
) -> None:
    """The layer had one child, the running top: it is merged live when QEMU can (layers VMO
    passed it), else by the node's sweep once the VM stops (layers QEMU opened itself at start
    under cache=none); either way it goes and the data stays."""
    from vmo.engine.storage.pool import Pool

    pool = Pool(pool_dir(cluster))
    data = claim(capi, "reborn", "data")
    k.apply(snapshot("short-lived", "reborn"))
    wait_snapshot(capi, "short-lived")
    chain = pool.chain(pool.path(NS, data))
    snapshot_layer = chain[1]
    k("delete", "vmsnapshot", "short-lived", "-n", NS, "--wait=true")
    assert guest_sum(cluster, "reborn") == src["c"]
    set_running(k, capi, "reborn", False)
    wait_for(lambda: not snapshot_layer.exists(), 60, "the snapshot's layer to be merged away")
    assert pool.chain(pool.path(NS, data)) == [chain[0], *chain[2:]]
    set_running(k, capi, "reborn", True)
    wait_for(lambda: "ok" in console(cluster, "reborn", "echo ok"), BOOT_TIMEOUT, "console")
    assert guest_sum(cluster, "reborn") == src["c"]
    console(cluster, "reborn", WRITE)
    src["d"] = guest_sum(cluster, "reborn")
    assert src["d"] != src["c"]
    assert_no_orphans(pool.root)


def test_restore_in_place_keeps_the_volume_names(
    cluster: ThreadedServer, k: Kubectl, capi: Api, src: dict[str, str]
) -> None:
    k.apply(snapshot("reborn-d", "reborn"))
    wait_snapshot(capi, "reborn-d")
    console(cluster, "reborn", WRITE)
    assert guest_sum(cluster, "reborn") != src["d"]
    names = {v: claim(capi, "reborn", v) for v in ("root", "data")}
    set_running(k, capi, "reborn", False)
    k.apply(restore("in-place", "reborn", "reborn-d", volumeRestorePolicy="InPlace"))

    def complete() -> dict[str, Any] | None:
        r = get(capi, f"{SNAP}/virtualmachinerestores/in-place")
        assert conditions(r or {}).get("Failure", {}).get("status") != "True", r
        return r if (r or {}).get("status", {}).get("complete") else None

    r = wait_for(complete, 90, "in-place restore")
    assert {x["persistentVolumeClaim"] for x in r["status"]["restores"]} == set(names.values())
    assert {v: claim(capi, "reborn", v) for v in ("root", "data")} == names
    set_running(k, capi, "reborn", True)
    wait_for(lambda: "ok" in console(cluster, "reborn", "echo ok"), BOOT_TIMEOUT, "console")
    assert guest_sum(cluster, "reborn") == src["d"]
    assert_no_orphans(pool_dir(cluster))
