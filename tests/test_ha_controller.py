"""VMO's HA controller without VMs: its pure decisions, then the real loop against the embedded
API server (no engine: the test writes the Nodes, VMs, VMIs and launcher Pods, and plays the
VM controller) with the real embedded BMC fencing a node made of two plain processes (its
"agent", holding the node's lock, and its "QEMU", naming the node's directory), and a small
Redfish server of the test's own for the failures: an unreachable BMC, and one whose
PowerState stays On. Each policy selects its own test's nodes only (the server is shared)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from vmo.client import EVENT, NODE, VM, VMI, Client
from vmo.controllers.ha.controller import (
    POD,
    HAController,
    affected,
    plan_releases,
    policy_for,
    restart_order,
)
from vmo.controllers.ha.crds import HAPOLICY, NODEREMEDIATION, ensure_crds
from vmo.engine.bmc import SECRET_NAME, Bmc, NodePower, PoweredOff, claim_node
from vmo.home import StateDir
from vmo.runtime import timestamp
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
NS = "default"
FINALIZER = "kubevirt.io/foregroundDeleteVirtualMachine"
SPEC: JSON = {
    "domain": {
        "cpu": {"cores": 1},
        "memory": {"guest": "256Mi"},
        "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
    },
    "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/example/disk:1"}}],
}


# --- builders ------------------------------------------------------------------------------------


def node_obj(name: str, *, ready: str = "True", memory: str = "8Gi", label: str = "") -> JSON:
    cond = {
        "type": "Ready",
        "status": ready,
        "reason": "KubeletReady",
        "lastHeartbeatTime": timestamp(),
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }
    return {
        "metadata": {"name": name, "labels": {"kubevirt.io/schedulable": "true", "ha-test": label}},
        "spec": {},
        "status": {"allocatable": {"cpu": "4", "memory": memory, "pods": "110"},
                   "conditions": [cond]},
    }  # fmt: skip


def vm_obj(name: str, *, strategy: str = "Always", prio: int | None = None) -> JSON:
    annotations = {} if prio is None else {"vmo.dev/restart-priority": str(prio)}
    return {"metadata": {"name": name, "namespace": NS, "annotations": annotations, "uid": f"vm-{name}"},
            "spec": {"runStrategy": strategy, "template": {"spec": SPEC}}}  # fmt: skip


def vmi_obj(vm: JSON, node: str, *, uid: str = "") -> JSON:
    md = vm["metadata"]
    owner = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "name": md["name"],
        "uid": md.get("uid", ""),
        "controller": True,
    }
    return {"metadata": {"name": md["name"], "namespace": NS, "uid": uid or f"uid-{md['name']}",
                         "ownerReferences": [owner]},
            "spec": SPEC, "status": {"phase": "Running", "nodeName": node}}  # fmt: skip


# --- pure decisions ------------------------------------------------------------------------------


def test_the_failed_nodes_vmis_are_its_affected_vms_with_their_priority_and_strategy() -> None:
    vms = {
        (NS, n): vm_obj(n, strategy=s, prio=p)
        for n, s, p in (
            ("db", "Always", 10),
            ("web", "RerunOnFailure", None),
            ("lab", "Manual", 99),
        )
    }
    vmis = [vmi_obj(vms[(NS, n)], "dead") for n in ("db", "web", "lab")]
    vmis.append(vmi_obj(vm_obj("elsewhere"), "alive"))
    finished = vmi_obj(vm_obj("done"), "dead")
    finished["status"]["phase"] = "Succeeded"
    entries = affected("dead", [*vmis, finished], vms, "vmo.dev/restart-priority")
    assert [(e["name"], e["priority"], e["runStrategy"]) for e in entries] == [
        ("lab", 99, "Manual"),
        ("db", 10, "Always"),
        ("web", 0, "RerunOnFailure"),
    ]
    assert {e["state"] for e in entries} == {"Pending"}
    assert entries[1]["previousUID"] == "uid-db"  # fmt: skip


def test_restarts_go_in_priority_order_and_only_while_a_healthy_node_has_room() -> None:
    # the healthy node takes two 256Mi guests (plus overhead), not three
    nodes = [node_obj("dead", ready="Unknown"), node_obj("spare", memory="700Mi")]
    vms = {n: vm_obj(n, prio=p) for n, p in (("low", 1), ("high", 9), ("mid", 5))}
    old = {(NS, n): vmi_obj(vm, "dead") for n, vm in vms.items()}
    entries = restart_order(
        {"namespace": NS, "name": n, "priority": p, "runStrategy": "Always", "state": "Pending",
         "previousUID": f"uid-{n}"} for n, p in (("low", 1), ("high", 9), ("mid", 5)))  # fmt: skip
    releases, waiting = plan_releases(entries, old, nodes, list(old.values()))
    assert [(r.name, r.node) for r in releases] == [("high", "spare"), ("mid", "spare")]
    assert set(waiting) == {(NS, "low")}
    assert "Insufficient memory" in waiting[(NS, "low")]
    # released ones that have not started yet still count as placed
    for entry in entries:
        if entry["name"] in ("high", "mid"):
            entry.update(state="Released", targetNode="spare")
    releases, waiting = plan_releases(entries, old, nodes, list(old.values()))
    assert releases == [] and set(waiting) == {(NS, "low")}


def test_a_policy_applies_to_the_nodes_its_selector_picks() -> None:
    a = {"metadata": {"name": "a"}, "spec": {"nodeSelector": {"matchLabels": {"ha-test": "x"}}}}
    b = {"metadata": {"name": "b"}, "spec": {"nodeSelector": {}}}
    assert policy_for(node_obj("n", label="x"), [b, a]) is a
    assert policy_for(node_obj("n", label="y"), [a, b]) is b
    assert policy_for(node_obj("n", label="y"), [a]) is None


# --- against the API server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bmc(apiserver: ThreadedServer) -> Iterator[Bmc]:
    """The real embedded BMC, over the shared server's home."""
    running = Bmc(StateDir(apiserver.home))
    apiserver.call(running.start())
    yield running
    apiserver.call(running.stop())


ENGINE_KUBECONFIG: list[Path] = []


@pytest.fixture
async def client(apiserver: ThreadedServer, bmc: Bmc) -> AsyncIterator[Client]:
    ENGINE_KUBECONFIG[:] = [StateDir(apiserver.home).engine_kubeconfig]
    async with Client.from_kubeconfig(apiserver.kubeconfig) as c:
        await ensure_crds(c)
        await bmc.publish(c)
        yield c
    await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running(client: Client) -> AsyncIterator[HAController]:
    stop = asyncio.Event()
    controller = HAController(client)
    task = asyncio.create_task(controller.run(stop))
    try:
        yield controller
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def until(probe: Any, timeout: float = 15.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (got := await probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out; last {got!r}")
        await asyncio.sleep(0.1)
    return got


def policy(name: str, label: str, fencing: JSON, *, fence_timeout: int = 30) -> JSON:
    return {"metadata": {"name": name},
            "spec": {"nodeSelector": {"matchLabels": {"ha-test": label}}, "unhealthySeconds": 0,
                     "fenceTimeoutSeconds": fence_timeout, "fencing": fencing}}  # fmt: skip


def redfish(address: str = "", secret: str = SECRET_NAME) -> JSON:
    spec: JSON = {"credentialsSecret": {"name": secret, "namespace": "vmo-system"}}
    if address:
        spec["address"] = address
    return {"method": "redfish", "redfish": spec}


async def world(client: Client, unique: str, *, label: str) -> tuple[str, str, JSON]:
    """A failed node with VM ``vm-<unique>`` on it (its VMI, finalizer and launcher Pod), and a
    healthy node beside it."""
    dead, spare = f"ha-dead-{unique}", f"ha-spare-{unique}"
    for name, ready in ((dead, "True"), (spare, "True")):
        obj = node_obj(name, ready=ready, label=label)
        await client.create(NODE, {k: v for k, v in obj.items() if k != "status"})
        await client.patch_status(NODE, name, obj["status"])
    spec = vm_obj(f"vm-{unique}")["spec"]
    vm = await client.create(
        VM, {"metadata": {"name": f"vm-{unique}", "namespace": NS}, "spec": spec}
    )
    vmi = vmi_obj(vm, dead)
    vmi["metadata"].pop("uid")
    vmi["metadata"]["finalizers"] = [FINALIZER]
    created = await client.create(VMI, vmi)
    await client.patch(VMI, created["metadata"]["name"], {"status": vmi["status"]}, NS)
    pod = {
        "metadata": {
            "name": f"virt-launcher-{unique}",
            "namespace": NS,
            "labels": {"kubevirt.io/created-by": created["metadata"]["uid"]},
        },
        "spec": {"containers": [{"name": "compute", "image": "x"}], "nodeName": dead},
    }
    async with Client.from_kubeconfig(
        ENGINE_KUBECONFIG[0]
    ) as engine:  # only the engine writes Pods
        await engine.create(POD, pod)
    return dead, spare, created  # fmt: skip


async def fail(client: Client, name: str) -> None:
    """What the node lifecycle controller writes once the node's Lease goes stale."""
    cond = {
        "type": "Ready",
        "status": "Unknown",
        "reason": "NodeStatusUnknown",
        "message": "Kubelet stopped posting node status.",
        "lastTransitionTime": timestamp(),
    }
    await client.patch_status(NODE, name, {"conditions": [cond]})  # fmt: skip


async def remediation(client: Client, node: str) -> JSON:
    return await client.get(NODEREMEDIATION, node)


async def phase_is(client: Client, node: str, *phases: str) -> JSON | None:
    found = await client.find(NODEREMEDIATION, node)
    return found if (found or {}).get("status", {}).get("phase") in phases else None


async def cleanup(client: Client, unique: str, *names: str) -> None:
    for res, name, ns in ((HAPOLICY, f"hap-{unique}", ""), (VM, f"vm-{unique}", NS)):
        await client.delete(res, name, ns)
    with contextlib.suppress(Exception):
        await client.patch(VMI, f"vm-{unique}", {"metadata": {"finalizers": None}}, NS)
    await client.delete(VMI, f"vm-{unique}", NS)
    for name in names:
        await client.delete(NODE, name)
        await client.delete(NODEREMEDIATION, name)


def fake_node_processes(directory: Path) -> list[subprocess.Popen[bytes]]:
    """An "agent" holding the node's lock (as `vmo node run` does) and a "QEMU" naming the
    node's directory in its argv."""
    agent_code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from vmo.engine.bmc import claim_node
        claim_node(Path({str(directory)!r}))
        print("claimed", flush=True)
        time.sleep(600)
    """)
    agent = subprocess.Popen([sys.executable, "-c", agent_code], stdout=subprocess.PIPE)
    assert agent.stdout is not None and agent.stdout.readline() == b"claimed\n"
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                             "-pidfile", str(directory / "vms" / "guest" / "qemu.pid")])  # fmt: skip
    return [agent, qemu]


async def test_a_failed_node_is_fenced_by_its_bmc_before_its_vm_is_released_and_it_returns_to_nothing(
    client: Client, apiserver: ThreadedServer, unique: str
) -> None:
    label = f"fence-{unique}"
    dead, spare, vmi = await world(client, unique, label=label)
    processes = fake_node_processes(apiserver.home / "nodes" / dead)
    try:
        await client.create(HAPOLICY, policy(f"hap-{unique}", label, redfish()))
        async with running(client) as controller:
            await asyncio.sleep(1.0)
            assert await client.find(NODEREMEDIATION, dead) is None  # Ready: nothing to do
            await fail(client, dead)
            restarting = await until(lambda: phase_is(client, dead, "Restarting", "Completed"))
            # fenced first: both processes were SIGKILLed, and the BMC says Off
            assert all(p.wait(5) == -9 for p in processes)
            assert NodePower(apiserver.home / "nodes" / dead).state().value == "Off"
            with pytest.raises(PoweredOff, match=f"node {dead} is powered off by its BMC"):
                claim_node(apiserver.home / "nodes" / dead)
            status = restarting["status"]
            assert status["fencedAt"] and status["method"] == "redfish"
            entry = status["virtualMachines"][0]
            assert (entry["name"], entry["state"], entry["targetNode"]) == (
                f"vm-{unique}",
                "Released",
                spare,
            )
            released = await client.get(VMI, vmi["metadata"]["name"], NS)
            assert released["status"]["phase"] == "Failed"
            assert released["status"]["reason"] == "NodeFenced"
            assert FINALIZER not in (released["metadata"].get("finalizers") or [])
            pods, _ = await client.list(
                POD, NS, label_selector=f"kubevirt.io/created-by={vmi['metadata']['uid']}"
            )
            assert pods == []
            # the VM controller's part: the failed VMI goes, a new one runs on the spare node
            await client.delete(VMI, vmi["metadata"]["name"], NS)
            fresh = vmi_obj(await client.get(VM, f"vm-{unique}", NS), spare)
            fresh["metadata"].pop("uid")
            created = await client.create(VMI, fresh)
            await client.patch(VMI, created["metadata"]["name"], {"status": fresh["status"]}, NS)
            done = await until(lambda: phase_is(client, dead, "Completed"))
            entry = done["status"]["virtualMachines"][0]
            assert (entry["state"], entry["node"]) == ("Restarted", spare)
            # the node returns: powered on, Ready again; the incident closes, nothing comes back
            NodePower(apiserver.home / "nodes" / dead).power_on()
            obj = node_obj(dead, label=label)
            obj["status"]["conditions"][0]["lastTransitionTime"] = timestamp()
            await client.patch_status(NODE, dead, obj["status"])
            closed = await until(lambda: _returned(client, dead))
            assert closed["status"]["phase"] == "Completed"
            now = await client.get(VMI, f"vm-{unique}", NS)
            assert now["status"]["nodeName"] == spare
            assert controller.stats.permanent_failures == 0
    finally:
        for proc in processes:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        await cleanup(client, unique, dead, spare)


async def _returned(client: Client, node: str) -> JSON | None:
    found = await client.find(NODEREMEDIATION, node)
    return found if (found or {}).get("status", {}).get("nodeReturnedAt") else None


async def assert_not_released(client: Client, vmi: JSON) -> None:
    now = await client.get(VMI, vmi["metadata"]["name"], NS)
    assert now["metadata"]["uid"] == vmi["metadata"]["uid"]
    assert now["status"]["phase"] == "Running"
    assert FINALIZER in now["metadata"]["finalizers"]
    pods, _ = await client.list(
        POD, NS, label_selector=f"kubevirt.io/created-by={vmi['metadata']['uid']}"
    )
    assert len(pods) == 1


async def vm_warnings(client: Client, name: str) -> set[str]:
    events, _ = await client.list(EVENT, NS, field_selector=f"involvedObject.name={name}")
    return {e["reason"] for e in events if e.get("type") == "Warning"}


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_bmc_means_manual_recovery_and_no_release(
    client: Client, unique: str
) -> None:
    label = f"unreachable-{unique}"
    dead, spare, vmi = await world(client, unique, label=label)
    address = f"https://127.0.0.1:{_closed_port()}/redfish/v1/Systems/{{node}}"
    try:
        await client.create(
            HAPOLICY, policy(f"hap-{unique}", label, redfish(address), fence_timeout=1)
        )
        async with running(client):
            await fail(client, dead)
            stuck = await until(lambda: phase_is(client, dead, "ManualRecoveryRequired"))
            assert stuck["status"]["reason"] == "FencingFailed"
            assert "ClientConnectorError" in stuck["status"]["message"]
            await asyncio.sleep(1.0)
            await assert_not_released(client, vmi)
            assert "ManualRecoveryRequired" in await until(
                lambda: vm_warnings(client, f"vm-{unique}")
            )
            # an administrator who powered it off says so: then, and only then, it is released
            await client.patch(NODEREMEDIATION, dead, {"spec": {"confirmedOff": True}})
            await until(lambda: phase_is(client, dead, "Restarting", "Completed"))
            released = await client.get(VMI, vmi["metadata"]["name"], NS)
            assert released["status"]["phase"] == "Failed"
    finally:
        await cleanup(client, unique, dead, spare)


@contextlib.asynccontextmanager
async def stubborn_bmc() -> AsyncIterator[str]:
    """A Redfish service (plain HTTP) that accepts ForceOff and keeps saying On."""

    async def system(request: web.Request) -> web.Response:
        return web.json_response({"Id": request.match_info["node"], "PowerState": "On"})

    async def reset(_request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/redfish/v1/Systems/{node}", system)
    app.router.add_post("/redfish/v1/Systems/{node}/Actions/ComputerSystem.Reset", reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/redfish/v1/Systems/{{node}}"
    finally:
        await runner.cleanup()


async def test_a_node_whose_power_stays_on_is_never_released(client: Client, unique: str) -> None:
    label = f"stubborn-{unique}"
    dead, spare, vmi = await world(client, unique, label=label)
    try:
        async with stubborn_bmc() as address, running(client):
            await client.create(
                HAPOLICY, policy(f"hap-{unique}", label, redfish(address), fence_timeout=1)
            )
            await fail(client, dead)
            fencing = await until(lambda: phase_is(client, dead, "Fencing"))
            assert fencing["status"]["fenceRequestedAt"]
            stuck = await until(lambda: phase_is(client, dead, "ManualRecoveryRequired"))
            assert stuck["status"]["reason"] == "FencingNotConfirmed"
            assert "not confirmed powered off within 1s" in stuck["status"]["message"]
            await assert_not_released(client, vmi)
    finally:
        await cleanup(client, unique, dead, spare)


async def test_without_a_policy_for_the_node_nothing_happens(client: Client, unique: str) -> None:
    dead, spare, vmi = await world(client, unique, label=f"unprotected-{unique}")
    try:
        async with running(client):
            await fail(client, dead)
            await asyncio.sleep(2.0)
            assert await client.find(NODEREMEDIATION, dead) is None
            await assert_not_released(client, vmi)
    finally:
        await cleanup(client, unique, dead, spare)


async def test_the_bmc_refuses_wrong_credentials_and_unknown_systems(
    bmc: Bmc, client: Client
) -> None:
    import ssl

    import aiohttp

    ctx = ssl.create_default_context(cafile=str(bmc.state.pki / "ca.crt"))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{bmc.url}/redfish/v1/Systems", ssl=ctx) as resp:
            assert resp.status == 401 and "Basic" in resp.headers["WWW-Authenticate"]
        token = base64.b64encode(f"{bmc.credentials.username}:{bmc.credentials.password}".encode())
        auth = {"Authorization": f"Basic {token.decode()}"}
        async with session.get(
            f"{bmc.url}/redfish/v1/Systems/nowhere", ssl=ctx, headers=auth
        ) as resp:
            assert resp.status == 404
        async with session.get(f"{bmc.url}/redfish/v1", ssl=ctx, headers=auth) as resp:
            assert (await resp.json())["Systems"] == {"@odata.id": "/redfish/v1/Systems"}


async def test_the_out_of_service_taint_confirms_the_fence_and_then_the_vm_is_released(
    client: Client, unique: str
) -> None:
    """Cluster-mode fencing: nothing is released while the node merely looks dead; once its
    remediation confirms (here: the annotation the policy names), the controller adds
    Kubernetes' out-of-service taint, then releases the VM; the taint goes when it returns."""
    label = f"oos-{unique}"
    dead, spare, vmi = await world(client, unique, label=label)
    confirm = "remediation.example.com/powered-off"
    fencing = {"method": "outOfServiceTaint",
               "outOfServiceTaint": {"confirmationAnnotation": confirm}}  # fmt: skip
    try:
        await client.create(HAPOLICY, policy(f"hap-{unique}", label, fencing, fence_timeout=300))
        async with running(client):
            await fail(client, dead)
            await until(lambda: phase_is(client, dead, "Fencing"))
            await asyncio.sleep(2.0)
            assert await phase_is(client, dead, "Fencing"), "not confirmed: still fencing"
            await assert_not_released(client, vmi)
            node = await client.get(NODE, dead)
            assert not any(t.get("key") == "node.kubernetes.io/out-of-service"
                           for t in (node.get("spec") or {}).get("taints") or [])  # fmt: skip
            # the remediation outside VMO powered the node off and says so
            await client.patch(NODE, dead, {"metadata": {"annotations": {confirm: "true"}}})
            done = await until(lambda: phase_is(client, dead, "Restarting", "Completed"), 30)
            assert done["status"]["method"] == "outOfServiceTaint"
            node = await client.get(NODE, dead)
            taints = {(t["key"], t["effect"]) for t in node["spec"].get("taints") or []}
            assert ("node.kubernetes.io/out-of-service", "NoExecute") in taints
            released = await client.get(VMI, vmi["metadata"]["name"], NS)
            assert released["status"]["phase"] == "Failed"
            assert released["status"]["reason"] == "NodeFenced"
            # the VM controller's part, as above: a new VMI on the spare node
            await client.delete(VMI, vmi["metadata"]["name"], NS)
            fresh = vmi_obj(await client.get(VM, f"vm-{unique}", NS), spare)
            fresh["metadata"].pop("uid")
            created = await client.create(VMI, fresh)
            await client.patch(VMI, created["metadata"]["name"], {"status": fresh["status"]}, NS)
            await until(lambda: phase_is(client, dead, "Completed"), 30)
            # back and Ready: the taint this controller added is taken off
            obj = node_obj(dead, label=label)
            obj["status"]["conditions"][0]["lastTransitionTime"] = timestamp()
            await client.patch_status(NODE, dead, obj["status"])
            await until(lambda: _returned(client, dead), 30)

            async def untainted() -> bool:
                found = await client.get(NODE, dead)
                return not any(t.get("key") == "node.kubernetes.io/out-of-service"
                               for t in (found.get("spec") or {}).get("taints") or [])  # fmt: skip

            await until(untainted)
    finally:
        await cleanup(client, unique, dead, spare)
