"""Live migration end to end: two node agents on this host, real guests moved between them.

The guests boot from DataVolumes held in node-local pools (their disks are copied during the
migration) and sit on the pod network behind a Service and on a VLAN bridge network with a
vSphere-style MAC and an IPAM address; the tests check that the guest keeps counting (no
reboot), keeps its MAC and IP, stays reachable, and that every failure leaves the source running.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, Kubectl
from tests.test_vm_e2e import (
    BOOT_TIMEOUT,
    NS,
    console,
    engine_cluster,
    tcp_line,
    vm,
    vmi_of,
    wait_for,
    wait_running,
)
from vmo.api.annotations import HOST_FORWARDS
from vmo.controllers.backup.disk import FileTarget, restore_disk
from vmo.controllers.backup.repository import Repository, local_store
from vmo.engine.network.l2policy import table_name
from vmo.engine.network.podpolicy import pod_table_name
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import http_datavolume
from vmo.testing.processes import qemus_under

VMIM = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstancemigrations"
POLICIES = "/apis/migrations.kubevirt.io/v1alpha1/migrationpolicies"
MIGRATION_TIMEOUT = 120.0
VLAN_NAD = "mig-vlan"
SLOW_LABEL = {"mig-test": "slow"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-mig"), nodes=2)


@pytest.fixture(scope="module")
def slow_policy(capi: Api) -> Iterator[None]:
    """VMs labelled mig-test=slow migrate at 12 MiB/s: a window for the fault tests. Their
    completion timeout is 600 s per GiB (upstream's default 150 gives this guest 44 s, which a
    loaded CI machine's crawling copy can exceed: that failure is not what these tests test)."""
    policy = {
        "apiVersion": "migrations.kubevirt.io/v1alpha1",
        "kind": "MigrationPolicy",
        "metadata": {"name": "mig-test-slow"},
        "spec": {
            "selectors": {"virtualMachineInstanceSelector": SLOW_LABEL},
            "bandwidthPerMigration": "12Mi",
            "completionTimeoutPerGiB": 600,
        },
    }
    assert capi.post(POLICIES, policy).status_code == 201
    yield
    capi.delete(f"{POLICIES}/mig-test-slow")


def vlan_nad() -> dict[str, Any]:
    config = (
        '{"cniVersion":"0.3.1","type":"bridge","bridge":"vmo-mig","vlan":31,'
        '"ipam":{"type":"host-local","subnet":"192.168.31.0/24"}}'
    )
    return {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": VLAN_NAD, "namespace": NS},
        "spec": {"config": config},
    }


def start_vm(
    k: Kubectl,
    capi: Api,
    image_server: str,
    name: str,
    *,
    labels: dict[str, str] | None = None,
    size: str = "1Gi",
) -> dict[str, Any]:
    k.apply(http_datavolume(f"{name}-root", f"{image_server}/disk.qcow2", namespace=NS, size=size))
    nets = [{"name": "vlan", "nad": VLAN_NAD, "mac": "00:50:56:a1:00:" + f"{len(name):02x}"}]
    manifest = vm(name, disk=f"{name}-root", labels={"app": name, **(labels or {})}, nets=nets)
    manifest["spec"]["template"]["spec"]["evictionStrategy"] = "LiveMigrate"
    k.apply(manifest)
    return wait_running(capi, name)


def guest_counter(port: int) -> int:
    line = wait_for(lambda: tcp_line("127.0.0.1", port), BOOT_TIMEOUT, "the guest's service")
    return int(line.split("counter=")[1].split()[0])


def service(k: Kubectl, capi: Api, name: str) -> int:
    k.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "type": "NodePort",
                "selector": {"app": name},
                "ports": [{"name": "info", "port": 5432, "targetPort": 5432}],
            },
        }
    )
    svc = capi.get(f"/api/v1/namespaces/{NS}/services/{name}").json()
    return int(svc["spec"]["ports"][0]["nodePort"])


def migrate(capi: Api, vmi: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": f"{vmi}-mig-", "namespace": NS},
        "spec": {"vmiName": vmi, **spec},
    }
    r = capi.post(VMIM, body)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def vmim(capi: Api, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = capi.get(f"{VMIM}/{name}").json()
    return obj


def wait_phase(capi: Api, name: str, *phases: str, timeout: float = MIGRATION_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = vmim(capi, name)
        if found.get("status", {}).get("phase") in phases:
            return found
        if time.monotonic() > deadline:
            vmi = vmi_of(capi, found.get("spec", {}).get("vmiName", ""))
            state = (vmi or {}).get("status", {}).get("migrationState")
            raise AssertionError(
                f"migration {name} not in {phases}: {found.get('status')}; VMI: {state}"
            )
        time.sleep(0.25)


def node_of(capi: Api, name: str) -> str:
    vmi = vmi_of(capi, name)
    assert vmi is not None
    return str(vmi["status"]["nodeName"])


@pytest.fixture(scope="module")
def moved(k: Kubectl, capi: Api, image_server: str) -> dict[str, Any]:
    """One guest migrated once, with what it looked like before."""
    k.apply(vlan_nad())
    before = start_vm(k, capi, image_server, "mover")
    port = service(k, capi, "mover")
    counter = guest_counter(port)
    mig = migrate(capi, "mover")
    done = wait_phase(capi, mig["metadata"]["name"], "Succeeded", "Failed")
    return {"before": before, "counter": counter, "port": port, "vmim": done}


def test_migration_succeeds_with_upstream_phases(capi: Api, moved: dict[str, Any]) -> None:
    status = moved["vmim"]["status"]
    assert status["phase"] == "Succeeded", status
    seen = [p["phase"] for p in status["phaseTransitionTimestamps"]]
    for phase in ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running"):
        assert phase in seen
    assert seen[-1] == "Succeeded"


def test_vmi_reports_the_move_as_upstream(capi: Api, moved: dict[str, Any]) -> None:
    vmi = vmi_of(capi, "mover")
    assert vmi is not None
    source = moved["before"]["status"]["nodeName"]
    state = vmi["status"]["migrationState"]
    assert state["sourceNode"] == source
    assert state["targetNode"] == vmi["status"]["nodeName"] != source
    assert state["completed"] is True and not state.get("failed")
    assert state["migrationUid"] == moved["vmim"]["metadata"]["uid"]
    assert state["mode"] == "PreCopy"
    assert state["startTimestamp"] <= state["endTimestamp"]
    assert vmi["status"]["migrationMethod"] == "BlockMigration"
    assert vmi["status"]["phase"] == "Running"
    assert "kubevirt.io/migrationTargetNodeName" not in vmi["metadata"].get("labels", {})


def test_guest_keeps_running_and_stays_reachable(capi: Api, moved: dict[str, Any]) -> None:
    after = guest_counter(moved["port"])
    # the counter is the guest's seconds since boot: a reboot would restart it from 0
    assert after >= moved["counter"]
    time.sleep(1.5)
    assert guest_counter(moved["port"]) > after


def test_bridge_network_identity_survives(capi: Api, moved: dict[str, Any]) -> None:
    vmi = vmi_of(capi, "mover")
    assert vmi is not None

    def vlan(status: dict[str, Any]) -> dict[str, Any]:
        return next(i for i in status["interfaces"] if i["name"] == "vlan")

    before, after = vlan(moved["before"]["status"]), vlan(vmi["status"])
    assert after["mac"] == before["mac"] == "00:50:56:a1:00:05"
    assert after["ipAddress"] == before["ipAddress"]
    line = tcp_line("127.0.0.1", moved["port"])
    assert "00:50:56:a1:00:05" in line


def test_node_local_disk_moved_with_the_guest(
    cluster: ThreadedServer, capi: Api, moved: dict[str, Any]
) -> None:
    source = moved["before"]["status"]["nodeName"]
    target = node_of(capi, "mover")
    pools = cluster.home / "nodes"
    assert not list((pools / source / "pool").glob(f"{NS}--mover-root.*"))
    assert (pools / target / "pool" / f"{NS}--mover-root.qcow2").is_file()
    assert not list((pools / target / "pool").glob(".migrating-*"))
    dv = capi.get(f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes/mover-root")
    assert dv.json()["metadata"]["annotations"]["vmo.dev/storage-node"] == target
    # the source's working directory (QEMU, seed) is gone
    assert not list((pools / source / "vms").glob("mover-*"))


def test_a_second_migration_moves_it_back(capi: Api, moved: dict[str, Any]) -> None:
    source = node_of(capi, "mover")
    mig = migrate(capi, "mover")
    done = wait_phase(capi, mig["metadata"]["name"], "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert node_of(capi, "mover") != source
    assert guest_counter(moved["port"]) > moved["counter"]


def test_a_backup_after_a_live_migration_stays_incremental(
    cluster: ThreadedServer, k: Kubectl, capi: Api, moved: dict[str, Any], tmp_path: Path
) -> None:
    """The tracker's checkpoint is a persistent bitmap on the node-local disk: it travels in the
    migration stream, so the next backup, on the other node, is incremental."""
    from tests.test_backup_e2e import TOKEN, backup, finish, pull, wait_reason

    objects = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bk-token", "namespace": NS},
         "stringData": {"token": TOKEN}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": "bk-target", "namespace": NS},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}},
        {"apiVersion": "backup.kubevirt.io/v1alpha1", "kind": "VirtualMachineBackupTracker",
         "metadata": {"name": "bk-tracker", "namespace": NS},
         "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "mover"}}},
    ]  # fmt: skip
    for obj in objects:
        k.apply(obj)
    repo = asyncio.run(Repository.init(local_store(tmp_path / "repo"), chunk_size=256 << 10))
    k.apply(backup("mig-bk-1"))
    first = wait_reason(capi, "mig-bk-1", "Progressing", "ExportReady")["status"]
    assert first["type"] == "Full"
    indexes = pull(first, repo, {})
    finish(capi, "mig-bk-1", first["checkpointName"])
    source = node_of(capi, "mover")
    mig = migrate(capi, "mover")
    done = wait_phase(capi, mig["metadata"]["name"], "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert node_of(capi, "mover") != source
    write = "dd if=/dev/urandom of=/dev/vda bs=64k count=8 seek=640 2>/dev/null; sync"
    read = "dd if=/dev/vda bs=64k count=8 skip=640 2>/dev/null | md5sum"
    written = console(cluster, "mover", f"{write}; {read}").split()[0]
    k.apply(backup("mig-bk-2"))
    second = wait_reason(capi, "mig-bk-2", "Progressing", "ExportReady")["status"]
    assert second["type"] == "Incremental", second  # not the full backup a lost checkpoint forces
    indexes = pull(second, repo, indexes)  # asserts the dirty map is a small part of the disk
    finish(capi, "mig-bk-2", second["checkpointName"])

    async def region() -> bytes:
        index = indexes["root"]
        target = FileTarget(tmp_path / "root.img", index.size, fresh=True)
        try:
            await restore_disk(repo, index, target)
        finally:
            target.close()
        with (tmp_path / "root.img").open("rb") as f:
            f.seek(640 * 65536)
            return f.read(8 * 65536)

    assert hashlib.md5(asyncio.run(region())).hexdigest() == written


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_agent_restart_keeps_the_service_reaching_the_guest(
    cluster: ThreadedServer, capi: Api, moved: dict[str, Any]
) -> None:
    """No migration: the node's agent restarts under a running guest. The forwards are read
    from QEMU, not from the VMI's annotation, which here names a port nothing listens on (as a
    migration's source can leave it)."""
    counter = guest_counter(moved["port"])
    stale = f"tcp:5432:{_closed_port()}"
    path = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/mover"
    patch = {"metadata": {"annotations": {HOST_FORWARDS: stale}}}
    assert capi.patch(path, patch, "application/merge-patch+json").ok
    cluster.restart_node(node_of(capi, "mover"))
    # the guest's seconds since boot go on counting (it answers, and it did not reboot)
    wait_for(lambda: guest_counter(moved["port"]) > counter, 30, "the counter to go on")
    vmi = vmi_of(capi, "mover")
    assert vmi is not None and vmi["metadata"]["annotations"][HOST_FORWARDS] != stale


def test_admission_refuses_what_cannot_migrate(
    k: Kubectl, capi: Api, moved: dict[str, Any]
) -> None:
    body = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": "nothing-", "namespace": NS},
        "spec": {"vmiName": "no-such-vmi"},
    }
    r = capi.post(VMIM, body)
    assert r.status_code == 400
    assert f'the VMI "{NS}/no-such-vmi" does not exist' in r.json()["message"]
    # a second migration while one is in flight
    first = migrate(capi, "mover")
    r = capi.post(VMIM, {**body, "spec": {"vmiName": "mover"}})
    assert r.status_code == 400 and "in-flight migration detected" in r.json()["message"]
    wait_phase(capi, first["metadata"]["name"], "Succeeded", "Failed")


def test_target_that_fits_nowhere_fails_and_changes_nothing(
    capi: Api, moved: dict[str, Any]
) -> None:
    node = node_of(capi, "mover")
    body = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {
            "generateName": "mover-nowhere-",
            "namespace": NS,
            "annotations": {"kubevirt.io/migrationUnschedulablePodTimeoutSeconds": "2"},
        },
        "spec": {"vmiName": "mover", "addedNodeSelector": {"kubernetes.io/hostname": "node-9"}},
    }
    r = capi.post(VMIM, body)
    assert r.status_code == 201, r.text
    done = wait_phase(capi, r.json()["metadata"]["name"], "Failed", "Succeeded", timeout=60)
    assert done["status"]["phase"] == "Failed"
    messages = " ".join(c.get("message", "") for c in done["status"].get("conditions") or [])
    assert "0/2 nodes are available" in messages
    assert node_of(capi, "mover") == node
    assert vmi_of(capi, "mover")["status"]["phase"] == "Running"  # type: ignore[index]


def _in_running(capi: Api, name: str) -> dict[str, Any]:
    return wait_phase(capi, name, "Running", "Succeeded", "Failed")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def slow(
    k: Kubectl, capi: Api, image_server: str, slow_policy: None, moved: dict[str, Any]
) -> dict[str, Any]:
    """A guest whose migrations crawl at 12 MiB/s (MigrationPolicy), for the fault tests.

    It makes one whole crawling migration first, the policy's happy path. Without it, the first
    migration to succeed was the retry after three failed ones, on a guest about 23 s old; in 3
    of some 15 runs here and in CI that guest's kernel oopsed the moment it ran on the target
    (a general protection fault in the timer code, a bad pointer in qemu-ga's write path), and
    rebooted (panic=-1). Not root-caused yet (TCG, QEMU 7.2); the later tests' counter checks
    would catch a guest that restarts again."""
    # a disk as small as the image: QEMU 7.2 charges a capped copy for the whole virtual size
    start_vm(k, capi, image_server, "crawler", labels=SLOW_LABEL, size="48Mi")
    port = service(k, capi, "crawler")
    first = guest_counter(port)
    source = node_of(capi, "crawler")
    mig = migrate(capi, "crawler")
    done = wait_phase(capi, mig["metadata"]["name"], "Succeeded", "Failed", timeout=180)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert node_of(capi, "crawler") != source
    counter = guest_counter(port)
    assert counter >= first, "the guest restarted during its first migration"
    return {"port": port, "counter": counter}


def assert_source_unchanged(capi: Api, name: str, node: str, port: int, counter: int) -> None:
    vmi = vmi_of(capi, name)
    assert vmi is not None
    assert vmi["status"]["nodeName"] == node
    assert vmi["status"]["phase"] == "Running"
    assert vmi["status"]["migrationState"]["failed"] is True
    assert guest_counter(port) >= counter


def test_policy_applies_and_killing_the_target_qemu_fails_safely(
    cluster: ThreadedServer, capi: Api, slow: dict[str, Any]
) -> None:
    node = node_of(capi, "crawler")
    mig = migrate(capi, "crawler")
    running = _in_running(capi, mig["metadata"]["name"])
    assert running["status"]["phase"] == "Running"
    vmi = vmi_of(capi, "crawler")
    assert vmi is not None
    state = vmi["status"]["migrationState"]
    assert state["migrationPolicyName"] == "mig-test-slow"
    assert state["migrationConfiguration"]["bandwidthPerMigration"] == "12Mi"
    target = state["targetNode"]
    pid = int(
        next((cluster.home / "nodes" / target / "vms").glob("crawler-*/qemu.pid")).read_text()
    )
    os.kill(pid, signal.SIGKILL)
    done = wait_phase(capi, mig["metadata"]["name"], "Failed", "Succeeded")
    assert done["status"]["phase"] == "Failed"
    assert_source_unchanged(capi, "crawler", node, slow["port"], slow["counter"])
    wait_for(
        lambda: not list((cluster.home / "nodes" / target / "vms").glob("crawler-*")),
        30,
        "the target's leftovers to go",
    )
    assert not list((cluster.home / "nodes" / target / "pool").glob(".migrating-*"))


def test_cutting_the_migration_stream_fails_safely(capi: Api, slow: dict[str, Any]) -> None:
    node = node_of(capi, "crawler")
    mig = migrate(capi, "crawler")
    _in_running(capi, mig["metadata"]["name"])
    vmi = vmi_of(capi, "crawler")
    assert vmi is not None
    # the memory stream and, while disks are still copied, the block stream
    for port in vmi["status"]["migrationState"]["targetDirectMigrationNodePorts"]:
        cut = subprocess.run(
            ["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert cut.returncode == 0, cut.stderr
    done = wait_phase(capi, mig["metadata"]["name"], "Failed", "Succeeded")
    assert done["status"]["phase"] == "Failed"
    assert_source_unchanged(capi, "crawler", node, slow["port"], slow["counter"])


def test_deleting_the_migration_cancels_it_and_a_retry_succeeds(
    capi: Api, slow: dict[str, Any]
) -> None:
    node = node_of(capi, "crawler")
    mig = migrate(capi, "crawler")
    name = mig["metadata"]["name"]
    _in_running(capi, name)
    assert capi.delete(f"{VMIM}/{name}").status_code == 200
    wait_for(lambda: capi.get(f"{VMIM}/{name}").status_code == 404, 60, "the migration to go")
    vmi = vmi_of(capi, "crawler")
    assert vmi is not None
    state = vmi["status"]["migrationState"]
    assert state["abortRequested"] is True and state["abortStatus"] == "Succeeded"
    assert_source_unchanged(capi, "crawler", node, slow["port"], slow["counter"])
    retry = migrate(capi, "crawler")
    done = wait_phase(capi, retry["metadata"]["name"], "Succeeded", "Failed", timeout=180)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert node_of(capi, "crawler") != node
    # the guest runs on: its seconds counter goes on from where it is (a guest throttled by the
    # crawling migrations may have counted little since the fixture read it)
    counter = guest_counter(slow["port"])
    assert counter >= slow["counter"]
    wait_for(lambda: guest_counter(slow["port"]) > counter, 30, "the counter to go on")


def _crawler_qemus(cluster: ThreadedServer) -> list[int]:
    return [
        pid
        for pid in qemus_under(cluster.home)
        if b"/crawler-" in open(f"/proc/{pid}/cmdline", "rb").read()
    ]


# The old agent is closed in-process (a real one would die with its sockets); the connections it
# drops are reported as unraisable ResourceWarnings, which are the harness's, not the guest's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("side", ["sourceNode", "targetNode"])
def test_agent_restarted_mid_migration_finishes_or_rolls_back(
    cluster: ThreadedServer, capi: Api, slow: dict[str, Any], side: str
) -> None:
    mig = migrate(capi, "crawler")
    name = mig["metadata"]["name"]
    _in_running(capi, name)
    vmi = vmi_of(capi, "crawler")
    assert vmi is not None
    cluster.restart_node(vmi["status"]["migrationState"][side])
    done = wait_phase(capi, name, "Succeeded", "Failed", timeout=180)
    final = vmi_of(capi, "crawler")
    assert final is not None and final["status"]["phase"] == "Running"
    state = final["status"]["migrationState"]
    if done["status"]["phase"] == "Succeeded":
        assert final["status"]["nodeName"] == state["targetNode"] and state["completed"]
    else:
        assert final["status"]["nodeName"] == state["sourceNode"] and state["failed"]
    # never two guests, never none: exactly one QEMU runs the VM once things settle
    wait_for(lambda: len(_crawler_qemus(cluster)) == 1, 60, "one QEMU for crawler")
    # and its Service reaches it, whichever agent owns it now (it answers, it did not reboot)
    assert guest_counter(slow["port"]) > slow["counter"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_hand_over_finished_by_a_restarted_target_agent_keeps_the_service(
    cluster: ThreadedServer, capi: Api, slow: dict[str, Any]
) -> None:
    """The target's agent is down while QEMU completes the migration; the next agent adopts
    the guest's QEMU and must reopen its Service forwards on the QEMU it did not start."""
    mig = migrate(capi, "crawler")
    name = mig["metadata"]["name"]
    _in_running(capi, name)
    vmi = vmi_of(capi, "crawler")
    assert vmi is not None
    target = vmi["status"]["migrationState"]["targetNode"]

    def completes_meanwhile() -> None:
        done = wait_phase(capi, name, "Succeeded", "Failed", timeout=180)
        assert done["status"]["phase"] == "Succeeded", done["status"]

    cluster.restart_node(target, between=completes_meanwhile)
    wait_for(lambda: len(_crawler_qemus(cluster)) == 1, 60, "one QEMU for crawler")
    assert node_of(capi, "crawler") == target
    assert guest_counter(slow["port"]) > slow["counter"]


def test_a_multi_network_policy_follows_the_vm_across_a_migration(
    cluster: ThreadedServer, k: Kubectl, capi: Api, slow: dict[str, Any], moved: dict[str, Any]
) -> None:
    """A policy closing the mover's port 5432 on the VLAN to everyone still holds once the
    mover runs on the other node (the target had the rules before the switch-over), the source
    node's table no longer names it, and deleting the policy opens the path again. A
    NetworkPolicy isolating the mover on the pod network both ways (nothing allowed) follows it
    too, and does not stop its own migration streams."""
    mover = vmi_of(capi, "mover")
    assert mover is not None
    vlan = next(i for i in mover["status"]["interfaces"] if i["name"] == "vlan")
    mover_ip, mover_mac = vlan["ipAddress"], vlan["mac"]
    policy = {
        "apiVersion": "k8s.cni.cncf.io/v1beta1",
        "kind": "MultiNetworkPolicy",
        "metadata": {
            "name": "mover-closed",
            "namespace": NS,
            "annotations": {"k8s.v1.cni.cncf.io/policy-for": VLAN_NAD},
        },
        "spec": {
            "podSelector": {"matchLabels": {"app": "mover"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "nobody"}}}],
                    "ports": [{"port": 5432}],
                }
            ],
        },
    }

    def crawler_reaches_mover() -> bool:
        out = console(cluster, "crawler", f"nc -w 2 {mover_ip} 5432 || echo UNREACHABLE")
        return "vmo-guest mover" in out

    closed = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "mover-pod-closed", "namespace": NS},
        "spec": {
            "podSelector": {"matchLabels": {"app": "mover"}},
            "policyTypes": ["Ingress", "Egress"],
        },
    }

    def pod_table(node: str) -> str:
        return subprocess.run(
            ["nft", "list", "table", "inet", pod_table_name(node)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout

    assert crawler_reaches_mover()
    try:
        k.apply(policy)
        k.apply(closed)
        wait_for(lambda: not crawler_reaches_mover(), 30, "the policy to close the port")
        source = node_of(capi, "mover")
        wait_for(lambda: f"vmo/{source}/{NS}/mover" in pod_table(source), 30, "the pod table")
        mig = migrate(capi, "mover")
        done = wait_phase(capi, mig["metadata"]["name"], "Succeeded", "Failed", timeout=180)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        target = node_of(capi, "mover")
        assert target != source
        assert not crawler_reaches_mover(), "the target node enforces the policy"
        listed = subprocess.run(
            ["nft", "list", "table", "inet", table_name(source)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert mover_mac not in listed.stdout, "the source node dropped the mover's rules"
        wait_for(
            lambda: (
                f"vmo/{target}/{NS}/mover" in pod_table(target)
                and f"/{NS}/mover" not in pod_table(source)
            ),
            30,
            "the pod network's rules on the target only",
        )
    finally:
        k("delete", "multi-networkpolicies.k8s.cni.cncf.io", "mover-closed", "-n", NS, check=False)
        k("delete", "networkpolicies.networking.k8s.io", "mover-pod-closed", "-n", NS, check=False)
    wait_for(crawler_reaches_mover, 30, "the path to open again")
