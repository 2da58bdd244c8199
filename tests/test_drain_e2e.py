"""`vmo node drain` end to end: two node agents on this host, real guests on the drained node,
one per eviction strategy and migratability, moved or stopped as KubeVirt does.

Upstream's pod-eviction admitter (virt-api) decides what a drain does with each VMI:
LiveMigrate migrates, and refuses the eviction of a VMI that is not live migratable
("... is configured with an eviction strategy but is not live-migratable"), which blocks the
drain; LiveMigrateIfPossible migrates when it can and is evicted (shut down) when it cannot;
None is evicted. An evicted VM with runStrategy Always gets a new VMI, on another node since the
drained one is cordoned. One drain of one node, done once, is what every test here reads.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
)
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import http_datavolume

DRAINED, OTHER = "node-1", "node-2"
VMIM = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstancemigrations"
MARKER = "/tmp/drain-marker"  # the guest's tmpfs: a reboot loses it, a live migration keeps it
DRAIN_TIMEOUT = 600


@dataclass(frozen=True)
class Case:
    """One VM on the drained node: its eviction strategy, whether it can live-migrate, and
    whether its disk is on shared (ReadWriteMany) storage."""

    strategy: str
    migratable: bool
    shared: bool = False


CASES = {
    "lm": Case("LiveMigrate", migratable=True),
    "lmip": Case("LiveMigrateIfPossible", migratable=True, shared=True),
    # shared disks: a new VMI can start on the other node (one on a node-local disk would wait,
    # unschedulable, for the cordoned node that holds its volume, as with a local PV upstream)
    "lmip-pinned": Case("LiveMigrateIfPossible", migratable=False, shared=True),
    "evicted": Case("None", migratable=True, shared=True),
    "lm-pinned": Case("LiveMigrate", migratable=False),
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-drain"), nodes=2)


def vmo(cluster: ThreadedServer, *args: str) -> subprocess.CompletedProcess[str]:
    """The `vmo` command, as a user runs it against this cluster."""
    return subprocess.run(
        [sys.executable, "-m", "vmo.cli.main", *args, "--kubeconfig", str(cluster.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=DRAIN_TIMEOUT + 60,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def case_vm(name: str, case: Case) -> dict[str, Any]:
    manifest = vm(name, disk=f"{name}-root", labels={"app": name})
    spec = manifest["spec"]["template"]["spec"]
    spec["evictionStrategy"] = case.strategy
    if not case.migratable:
        # bridge on the pod network: upstream's InterfaceNotLiveMigratable
        spec["domain"]["devices"]["interfaces"] = [{"name": "default", "bridge": {}}]
    return manifest


def case_datavolume(name: str, case: Case, image_server: str) -> dict[str, Any]:
    dv = http_datavolume(f"{name}-root", f"{image_server}/disk.qcow2", namespace=NS, size="64Mi")
    if case.shared:
        dv["spec"]["storage"]["accessModes"] = ["ReadWriteMany"]
    return dv


def service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "type": "NodePort",
            "selector": {"app": name},
            "ports": [
                {"name": "info", "port": 5432, "targetPort": 5432},
                {"name": "echo", "port": 7, "targetPort": 7},
            ],
        },
    }


def node_port(capi: Api, name: str, port_name: str = "info") -> int:
    svc = capi.get(f"/api/v1/namespaces/{NS}/services/{name}").json()
    return next(int(p["nodePort"]) for p in svc["spec"]["ports"] if p["name"] == port_name)


def answer(capi: Api, name: str) -> str:
    """The guest's line through its Service's NodePort (waits for the guest to be there)."""
    port = node_port(capi, name)
    line: str = wait_for(lambda: tcp_line("127.0.0.1", port), BOOT_TIMEOUT, f"{name}'s Service")
    return line


def running_on(capi: Api, name: str, node: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        vmi = vmi_of(capi, name)
        status = (vmi or {}).get("status", {})
        return vmi if status.get("phase") == "Running" and status.get("nodeName") == node else None

    try:
        found: dict[str, Any] = wait_for(check, BOOT_TIMEOUT, f"VMI {name} Running on {node}")
    except AssertionError as exc:
        vm_status = capi.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/{name}")
        vmi_status = (vmi_of(capi, name) or {}).get("status")
        raise AssertionError(
            f"{exc}\nVMI: {vmi_status}\nVM: {vm_status.json().get('status')}"
        ) from None
    return found


@dataclass(frozen=True)
class Drain:
    before: dict[str, dict[str, Any]]  # VMI name -> the VMI as it was on the drained node
    node_before: dict[str, Any]  # the drained Node before the drain
    code: int
    output: str


@pytest.fixture(scope="module")
def drained(cluster: ThreadedServer, k: Kubectl, capi: Api, image_server: str) -> Drain:
    """Every case's VM started on node-1 (node-2 cordoned meanwhile), marked through its
    console, then `vmo node drain node-1`."""
    assert vmo(cluster, "node", "cordon", OTHER).returncode == 0
    for name, case in CASES.items():
        k.apply(case_datavolume(name, case, image_server))
        k.apply(case_vm(name, case))
        k.apply(service(name))
    before = {name: running_on(capi, name, DRAINED) for name in CASES}
    for name in CASES:
        answer(capi, name)
        console(cluster, name, f"echo kept-{name} > {MARKER}")
    assert vmo(cluster, "node", "uncordon", OTHER).returncode == 0
    node_before = capi.get(f"/api/v1/nodes/{DRAINED}").json()
    run = vmo(cluster, "node", "drain", DRAINED, "--timeout", str(DRAIN_TIMEOUT))
    return Drain(before, node_before, run.returncode, run.stdout + run.stderr)


def _line(drain: Drain, name: str, text: str) -> bool:
    return any(f"{NS}/{name}: " in line and text in line for line in drain.output.splitlines())


def test_the_drain_leaves_the_node_cordoned_and_names_what_blocks_it(
    capi: Api, drained: Drain
) -> None:
    assert drained.code == 1, drained.output
    assert f"node/{DRAINED} not drained (nothing more can move): 1 VMI(s) left: 1 blocked" in (
        drained.output
    )
    assert _line(drained, "lm-pinned", "cannot evict: not live migratable"), drained.output
    assert _line(drained, "lm-pinned", "(evictionStrategy LiveMigrate)"), drained.output
    node = capi.get(f"/api/v1/nodes/{DRAINED}").json()
    assert not drained.node_before["spec"].get("unschedulable")
    assert node["spec"]["unschedulable"] is True
    # like kubectl drain, it cordons and taints nothing (kube-controller-manager's
    # node.kubernetes.io/unschedulable taint has no counterpart in the embedded engine)
    assert node["spec"].get("taints") == drained.node_before["spec"].get("taints")
    assert not capi.get(f"/api/v1/nodes/{OTHER}").json()["spec"].get("unschedulable")


@pytest.mark.parametrize("name", ["lm", "lmip"])
def test_a_migratable_vm_moves_live_and_keeps_its_state(
    cluster: ThreadedServer, capi: Api, drained: Drain, name: str
) -> None:
    vmi = running_on(capi, name, OTHER)
    assert vmi["metadata"]["uid"] == drained.before[name]["metadata"]["uid"]  # the same VMI
    assert vmi["status"]["migrationState"]["completed"] is True
    assert vmi["status"]["migrationState"]["sourceNode"] == DRAINED
    method = "LiveMigration" if CASES[name].shared else "BlockMigration"
    assert vmi["status"]["migrationMethod"] == method
    assert _line(drained, name, f"migrated to {OTHER}"), drained.output
    assert f"kept-{name}" in console(cluster, name, f"cat {MARKER}")  # no reboot
    assert answer(capi, name).startswith(f"vmo-guest {name} ")
    migrations = capi.get(VMIM).json()["items"]
    ours = [m for m in migrations if m["spec"]["vmiName"] == name]
    assert [m["status"]["phase"] for m in ours] == ["Succeeded"]
    assert ours[0]["metadata"]["annotations"]["kubevirt.io/evacuationMigration"] == DRAINED


@pytest.mark.parametrize("name", ["lmip-pinned", "evicted"])
def test_a_vm_that_is_not_migrated_is_shut_down_and_its_vm_restarts_it_elsewhere(
    cluster: ThreadedServer, capi: Api, drained: Drain, name: str
) -> None:
    vmi = running_on(capi, name, OTHER)
    assert vmi["metadata"]["uid"] != drained.before[name]["metadata"]["uid"]  # a new VMI
    assert not vmi["status"].get("migrationState")
    strategy = CASES[name].strategy
    assert _line(drained, name, f"stopped (evictionStrategy {strategy})"), drained.output
    assert answer(capi, name).startswith(f"vmo-guest {name} ")  # (and done booting)
    assert "No such file" in console(cluster, name, f"cat {MARKER} 2>&1")  # a fresh boot
    assert not [m for m in capi.get(VMIM).json()["items"] if m["spec"]["vmiName"] == name]


def test_a_live_migrate_vm_that_cannot_migrate_stays_untouched(
    cluster: ThreadedServer, capi: Api, drained: Drain
) -> None:
    vmi = running_on(capi, "lm-pinned", DRAINED)
    assert vmi["metadata"]["uid"] == drained.before["lm-pinned"]["metadata"]["uid"]
    live = next(c for c in vmi["status"]["conditions"] if c["type"] == "LiveMigratable")
    assert live["status"] == "False" and live["reason"] == "InterfaceNotLiveMigratable"
    assert "kept-lm-pinned" in console(cluster, "lm-pinned", f"cat {MARKER}")
    assert not [m for m in capi.get(VMIM).json()["items"] if m["spec"]["vmiName"] == "lm-pinned"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_restarted_agent_opens_new_service_ports_for_a_pod_bridge_guest(
    cluster: ThreadedServer, capi: Api, drained: Drain
) -> None:
    """After its agent restarts, the guest left on the drained node (bridge binding on the pod
    network) is reached on a Service port never opened before: the restarted agent knows the
    QEMU's user network without having started it."""
    cluster.restart_node(DRAINED)
    assert answer(capi, "lm-pinned").startswith("vmo-guest lm-pinned ")
    port = node_port(capi, "lm-pinned", "echo")
    echoed = wait_for(lambda: echo("127.0.0.1", port, "ping\n"), 60, "the echo port")
    assert echoed == "ping\n"


def echo(host: str, port: int, text: str) -> str:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(text.encode())
        sock.shutdown(socket.SHUT_WR)
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (chunk := sock.recv(4096)):
            data += chunk
    return data.decode()
