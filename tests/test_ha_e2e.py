"""HA restart after a node fails, on real guests over three embedded nodes.

The control plane (API server, engine controllers with a short node-monitor grace period, the
embedded BMC) runs in a thread; the nodes are `vmo node run` processes, so that a test can
SIGKILL one; VMO's HA controller runs on the server's loop under an HAPolicy fencing through the
BMC. One guest (shared ReadWriteMany disk, runStrategy Always) answers on its pod network:
- (a) its node's agent and QEMU are killed: the node is fenced, the VM restarts elsewhere;
- (b) only its node's agent is killed, its QEMU runs on: the node is fenced (that QEMU
  certainly gone) before the VM runs elsewhere;
- (c) the node fenced in (a) is refused while powered off, then powered on and back: it does
  not restart its old VM (one QEMU of it runs, on the node it went to).
(a) and (b) print the time from the failure to the guest answering again (``-s``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Api, Kubectl
from tests.test_vm_e2e import (
    BOOT_TIMEOUT,
    NS,
    _stop_all_vms,
    tcp_line,
    vm,
    vmi_of,
    wait_for,
    wait_running,
)
from vmo.client import Client
from vmo.controllers.ha.controller import HAController
from vmo.controllers.ha.crds import ensure_crds
from vmo.engine.bmc import SECRET_NAME, processes_naming
from vmo.engine.embedded import AgentPortOpener
from vmo.engine.virtcontroller.nodelifecycle import GRACE_ENV, PERIOD_ENV
from vmo.home import StateDir
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import http_datavolume
from vmo.testing.processes import qemus_under

JSON = dict[str, Any]
GRACE = 18.0  # the node-monitor grace period: the agents heartbeat every 10 s
NODES = ("ha-1", "ha-2", "ha-3")
POLICIES = "/apis/vmo.dev/v1alpha1/hapolicies"
REMEDIATIONS = "/apis/vmo.dev/v1alpha1/noderemediations"
RECOVERY_TIMEOUT = GRACE + 15 + BOOT_TIMEOUT
GUEST = "ha-guest"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    """The control plane with no node of its own, its BMC serving the nodes to come."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(GRACE_ENV, str(GRACE))
        mp.setenv(PERIOD_ENV, "1")
        server = ThreadedServer(tmp_path_factory.mktemp("vmo-ha"), engine=True, nodes=0, bmc=True)
        server.start()
    try:
        yield server
    finally:
        _stop_all_vms(server)
        server.stop()
        leaked = qemus_under(server.home)
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        assert not leaked, f"QEMU processes left running: {leaked}"


class Nodes:
    """The `vmo node run` processes, by node name."""

    def __init__(self, cluster: ThreadedServer) -> None:
        self.cluster = cluster
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def argv(self, name: str) -> list[str]:
        return [sys.executable, "-m", "vmo.cli.main", "--home", str(self.cluster.home),
                "node", "run", "--name", name]  # fmt: skip

    def start(self, name: str) -> None:
        with (self.cluster.home / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                self.argv(name), stdout=log, stderr=subprocess.STDOUT
            )

    def directory(self, name: str) -> Path:
        nodes: Path = StateDir(self.cluster.home).nodes
        return nodes / name

    def qemus(self, name: str) -> list[int]:
        needle = str(self.directory(name)) + os.sep
        return [p for p in processes_naming(needle) if b"qemu-system" in _cmdline(p)]

    def kill_agent(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _ready(capi: Api, name: str) -> bool:
    found = capi.get(f"/api/v1/nodes/{name}")
    conditions = found.json().get("status", {}).get("conditions") or [] if found.ok else []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def nodes(cluster: ThreadedServer, capi: Api) -> Iterator[Nodes]:
    running = Nodes(cluster)
    for name in NODES:
        running.start(name)
    try:
        for name in NODES:
            wait_for(partial(_ready, capi, name), 120, f"node {name} Ready")
        yield running
    finally:
        _stop_all_vms(cluster)
        running.stop_all()


async def _event() -> asyncio.Event:
    return asyncio.Event()


async def _run_ha(kubeconfig: Path, stop: asyncio.Event) -> None:
    async with Client.from_kubeconfig(kubeconfig) as client:
        await ensure_crds(client)
        await HAController(client).run(stop)


@pytest.fixture(scope="module")
def ha(cluster: ThreadedServer, capi: Api, nodes: Nodes) -> Iterator[None]:
    """VMO's HA controller on the server's loop, and a policy fencing every node by its BMC."""
    stop = cluster.call(_event())
    task: Future[None] = asyncio.run_coroutine_threadsafe(
        _run_ha(cluster.kubeconfig, stop), cluster._loop
    )
    wait_for(lambda: capi.get(POLICIES).status_code == 200, 30, "the HAPolicy kind")
    policy = {
        "apiVersion": "vmo.dev/v1alpha1", "kind": "HAPolicy", "metadata": {"name": "every-node"},
        "spec": {"nodeSelector": {}, "unhealthySeconds": 0, "fenceTimeoutSeconds": 30,
                 "fencing": {"method": "redfish", "redfish": {
                     "credentialsSecret": {"name": SECRET_NAME, "namespace": "vmo-system"}}}},
    }  # fmt: skip
    assert capi.post(POLICIES, policy).status_code == 201
    try:
        yield
    finally:
        capi.delete(f"{POLICIES}/every-node")
        cluster._loop.call_soon_threadsafe(stop.set)
        task.result(30)


@pytest.fixture(scope="module")
def guest_vm(
    cluster: ThreadedServer, k: Kubectl, capi: Api, image_server: str, ha: None
) -> dict[str, Any]:
    dv = http_datavolume(f"{GUEST}-root", f"{image_server}/disk.qcow2", namespace=NS, size="64Mi")
    dv["spec"]["storage"]["accessModes"] = ["ReadWriteMany"]  # every node opens it in place
    k.apply(dv)
    k.apply(vm(GUEST, disk=f"{GUEST}-root", labels={"app": GUEST}))
    vmi = wait_running(capi, GUEST)
    answers(cluster, BOOT_TIMEOUT)
    return vmi


async def _host_port(cluster: ThreadedServer) -> int | None:
    assert cluster.running_engine is not None and cluster.running_engine.client is not None
    opener = AgentPortOpener(cluster.running_engine.client, [])
    return await opener.host_port(NS, GUEST, "tcp", 5432)


def answers(cluster: ThreadedServer, timeout: float) -> str:
    """The guest's info line, through the host port its node's agent opens for it (what the
    Service proxy reaches; the proxy itself asks remote agents for "TCP", which their API
    refuses: see the report)."""

    def line() -> str:
        port = cluster.call(_host_port(cluster))
        text = tcp_line("127.0.0.1", port) if port else ""
        return text if "vmo-guest" in text else ""

    found: str = wait_for(line, timeout, "the guest answering")
    return found


def remediation(capi: Api, node: str) -> JSON:
    found: JSON = capi.get(f"{REMEDIATIONS}/{node}").json()
    return found


def restarted_elsewhere(capi: Api, old: JSON) -> JSON:
    """Waits for a new VMI of the guest Running on another node."""

    def check() -> JSON | None:
        vmi = vmi_of(capi, GUEST)
        status = (vmi or {}).get("status", {})
        moved = vmi and vmi["metadata"]["uid"] != old["metadata"]["uid"]
        return vmi if moved and status.get("phase") == "Running" else None

    found: JSON = wait_for(check, RECOVERY_TIMEOUT, "the guest running again elsewhere")
    assert found["status"]["nodeName"] != old["status"]["nodeName"]
    return found


def report(case: str, seconds: float) -> None:
    print(f"\nHA recovery ({case}): {seconds:.1f} s from the failure to the guest answering")


def test_a_node_killed_with_its_qemus_is_fenced_and_its_vm_restarts_elsewhere(
    cluster: ThreadedServer, capi: Api, nodes: Nodes, guest_vm: JSON
) -> None:
    old = vmi_of(capi, GUEST)
    assert old is not None
    failed = old["status"]["nodeName"]
    qemus = nodes.qemus(failed)
    assert qemus, f"no QEMU found under node {failed}"
    started = time.monotonic()
    nodes.kill_agent(failed)
    for pid in qemus:
        os.kill(pid, signal.SIGKILL)
    new = restarted_elsewhere(capi, old)
    answers(cluster, BOOT_TIMEOUT)
    took = time.monotonic() - started
    report("agent and QEMU killed", took)
    rem = remediation(capi, failed)
    assert rem["status"]["fencedAt"], rem["status"]
    assert rem["status"]["virtualMachines"][0]["name"] == GUEST
    wait_for(lambda: remediation(capi, failed)["status"]["phase"] == "Completed", 30, "Completed")
    entry = remediation(capi, failed)["status"]["virtualMachines"][0]
    assert (entry["state"], entry["node"]) == ("Restarted", new["status"]["nodeName"])


def test_a_node_whose_agent_alone_dies_is_fenced_before_its_vm_runs_elsewhere(
    cluster: ThreadedServer, capi: Api, nodes: Nodes, guest_vm: JSON
) -> None:
    old = vmi_of(capi, GUEST)
    assert old is not None and old["status"]["phase"] == "Running"
    failed = old["status"]["nodeName"]
    qemus = nodes.qemus(failed)
    assert len(qemus) == 1, qemus
    started = time.monotonic()
    nodes.kill_agent(failed)  # its QEMU runs on: the guest still answers
    assert _alive(qemus[0])
    dead_at: float | None = None
    running_at: float | None = None
    deadline = started + RECOVERY_TIMEOUT
    while running_at is None and time.monotonic() < deadline:
        if dead_at is None and not _alive(qemus[0]):
            dead_at = time.monotonic()
        vmi = vmi_of(capi, GUEST)
        moved = vmi is not None and vmi["metadata"]["uid"] != old["metadata"]["uid"]
        if moved and (vmi or {}).get("status", {}).get("phase") == "Running":
            running_at = time.monotonic()
            assert not _alive(qemus[0]), "the new VMI runs while the old QEMU is alive"
        time.sleep(0.1)
    assert running_at is not None, "the guest did not run again elsewhere"
    assert dead_at is not None and dead_at <= running_at
    new = vmi_of(capi, GUEST)
    assert new is not None and new["status"]["nodeName"] != failed
    answers(cluster, BOOT_TIMEOUT)
    took = time.monotonic() - started
    report("agent killed, QEMU fenced", took)
    print(f"  the old QEMU died {dead_at - started:.1f} s after the failure (fenced)")
    assert remediation(capi, failed)["status"]["fencedAt"]


def _bmc_reset(cluster: ThreadedServer, node: str, reset_type: str) -> requests.Response:
    secret = (
        Api(cluster.url, cluster.ca, cluster.admin_token)
        .get(f"/api/v1/namespaces/vmo-system/secrets/{SECRET_NAME}")
        .json()["data"]
    )
    value = {k: base64.b64decode(v).decode() for k, v in secret.items()}
    url = value["address"].replace("{node}", node) + "/Actions/ComputerSystem.Reset"
    session = requests.Session()
    session.trust_env = False
    return session.post(url, json={"ResetType": reset_type},
                        auth=(value["username"], value["password"]), verify=str(cluster.ca),
                        timeout=30)  # fmt: skip


def test_a_fenced_node_that_returns_does_not_restart_its_old_vm(
    cluster: ThreadedServer, capi: Api, nodes: Nodes, guest_vm: JSON
) -> None:
    fenced = [n for n in NODES if n not in nodes.procs]
    assert fenced, "no node was fenced by the tests before"
    name = fenced[0]
    refused = subprocess.run(nodes.argv(name), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert f"node {name} is powered off by its BMC" in refused.stderr
    assert _bmc_reset(cluster, name, "On").status_code == 204
    nodes.start(name)
    wait_for(lambda: _ready(capi, name), 120, f"node {name} Ready again")
    wait_for(lambda: remediation(capi, name)["status"].get("nodeReturnedAt"), 30, "returned")
    taints = capi.get(f"/api/v1/nodes/{name}").json()["spec"].get("taints") or []
    assert not [t for t in taints if t["key"] == "node.kubernetes.io/unreachable"]
    time.sleep(5)  # the returned agent has seen every VMI by now
    vmi = vmi_of(capi, GUEST)
    assert vmi is not None and vmi["status"]["nodeName"] != name
    assert nodes.qemus(name) == []
    everywhere = [p for n in NODES for p in nodes.qemus(n)]
    assert len(everywhere) == 1, everywhere
    answers(cluster, 30)
