"""The node agent's MultiNetworkPolicy enforcer against the real API server and the real nft.

It runs as the agent runs it (informers, one key, atomic loads) for a node of its own. One case
stands in for a host without nftables: its probe says so (nftables cannot be uninstalled
under a running suite); everything else is real.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import Api
from vmo.client import Client
from vmo.engine.agent.netpolicy import (
    CONDITION,
    STATUS_ANNOTATION,
    VMI_CONDITION,
    L2PolicyEnforcer,
)
from vmo.engine.network.l2policy import table_name
from vmo.runtime import Informers
from vmo.testing.apiserver import ThreadedServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="nft needs root")

NS = "default"
VMIS = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances"
MULTI = f"/apis/k8s.cni.cncf.io/v1beta1/namespaces/{NS}/multi-networkpolicies"


def vmi(api: Api, name: str, labels: dict[str, str], node: str, mac: str) -> dict[str, Any]:
    body = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "domain": {
                "devices": {"interfaces": [{"name": "lan", "bridge": {}, "macAddress": mac}]},
                "resources": {"requests": {"memory": "64Mi"}},
            },
            "networks": [{"name": "lan", "multus": {"networkName": "vlan10"}}],
        },
    }
    created = api.post(VMIS, body)
    assert created.status_code == 201, created.text
    obj: dict[str, Any] = created.json()
    obj["status"] = {
        "phase": "Running",
        "nodeName": node,
        "interfaces": [{"name": "lan", "mac": mac, "ipAddress": "192.168.50.77"}],
    }
    updated = api.put(f"{VMIS}/{name}", obj)
    assert updated.status_code == 200, updated.text
    return dict(updated.json())


def policy(api: Api, name: str, app: str) -> None:
    body = {
        "apiVersion": "k8s.cni.cncf.io/v1beta1",
        "kind": "MultiNetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": NS,
            "annotations": {"k8s.v1.cni.cncf.io/policy-for": "vlan10"},
        },
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "ingress": []},
    }
    assert api.post(MULTI, body).status_code == 201


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


def run_enforcer(
    server: ThreadedServer, node: str, probe: Callable[[], str | None] | None, body: Any
) -> None:
    async def main() -> None:
        async with Client.from_kubeconfig(server.kubeconfig) as client:
            kwargs = {} if probe is None else {"probe": probe}
            enforcer = L2PolicyEnforcer(client, node, **kwargs)
            stop = asyncio.Event()
            task = asyncio.create_task(enforcer.run(stop))
            try:
                await body(client, enforcer)
            finally:
                stop.set()
                await task
                for informer in Informers.of(client):  # every stream ends before the client
                    assert not informer.running, informer.selector
        # the client's TLS connections finish closing (aiohttp's advice for a loop about to
        # end) rather than be dropped, unclosed, with the loop
        await asyncio.sleep(0.25)

    asyncio.run(main())


def node_object(api: Api, name: str) -> dict[str, Any]:
    assert api.post(
        "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    ).ok
    return dict(api.get(f"/api/v1/nodes/{name}").json())


def condition(api: Api, node: str) -> dict[str, Any] | None:
    conditions = api.get(f"/api/v1/nodes/{node}").json().get("status", {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == CONDITION), None)


def test_a_node_without_nftables_says_so_and_holds_selected_vms_back(
    apiserver: ThreadedServer, api: Api, unique: str
) -> None:
    node = f"{unique}-node"
    node_object(api, node)
    selected = vmi(api, f"{unique}-db", {"app": f"{unique}-db"}, node, "02:55:00:00:00:01")
    other = vmi(api, f"{unique}-web", {"app": f"{unique}-web"}, node, "02:55:00:00:00:02")
    policy(api, unique, f"{unique}-db")

    async def body(_client: Client, enforcer: L2PolicyEnforcer) -> None:
        async def reported() -> bool:
            return (condition(api, node) or {}).get("status") == "False"

        await eventually(reported)
        cond = condition(api, node)
        assert cond is not None and cond["reason"] == "NetworkPolicyUnenforceable"
        assert "nft is not installed" in cond["message"]
        await enforcer.wait_synced()
        why = await enforcer.blocks(selected)
        assert why is not None and f"MultiNetworkPolicy {NS}/{unique}" in why
        assert await enforcer.blocks(other) is None  # no policy selects it: it may run

    try:
        run_enforcer(apiserver, node, lambda: "nft is not installed (test)", body)
    finally:
        api.delete(f"/api/v1/nodes/{node}")


def test_the_enforcer_loads_publishes_and_removes_its_table(
    apiserver: ThreadedServer, api: Api, unique: str
) -> None:
    node = f"{unique}-node"
    node_object(api, node)
    vmi(api, f"{unique}-db", {"app": f"{unique}-db"}, node, "02:55:00:00:01:01")
    table = table_name(node)

    def listed() -> str:
        done = subprocess.run(
            ["nft", "list", "table", "inet", table], capture_output=True, text=True, check=False
        )
        return done.stdout

    async def body(_client: Client, enforcer: L2PolicyEnforcer) -> None:
        async def ready() -> bool:
            return (condition(api, node) or {}).get("status") == "True"

        await eventually(ready)
        policy(api, unique, f"{unique}-db")

        async def loaded() -> bool:
            return "02:55:00:00:01:01" in listed()

        await eventually(loaded)

        def record() -> dict[str, Any]:
            annotations = api.get(f"/api/v1/nodes/{node}").json()["metadata"]["annotations"]
            return dict(json.loads(annotations[STATUS_ANNOTATION]))

        async def published() -> bool:  # written just after the load
            return record()["interfaces"] == 1

        await eventually(published)
        assert (record()["table"], record()["error"]) == (table, None)
        assert await enforcer.blocks({"metadata": {"name": "x"}}) is None  # enforceable here
        assert api.delete(f"{MULTI}/{unique}").ok

        async def removed() -> bool:
            return listed() == ""

        await eventually(removed)

    try:
        run_enforcer(apiserver, node, None, body)
    finally:
        api.delete(f"/api/v1/nodes/{node}")
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)


def vmi_condition(api: Api, name: str) -> dict[str, Any] | None:
    conditions = api.get(f"{VMIS}/{name}").json().get("status", {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == VMI_CONDITION), None)


def test_rules_that_cannot_be_loaded_show_in_the_vmi_condition_until_they_are(
    apiserver: ThreadedServer, api: Api, unique: str
) -> None:
    """A real load failure: another process owns a table of the enforcer's name (nftables'
    ``flags owner``), so the kernel refuses every change to it until that process exits."""
    node = f"{unique}-node"
    node_object(api, node)
    db = vmi(api, f"{unique}-db", {"app": f"{unique}-db"}, node, "02:55:00:00:02:01")
    web = vmi(api, f"{unique}-web", {"app": f"{unique}-web"}, node, "02:55:00:00:02:02")
    policy(api, unique, f"{unique}-db")
    table = table_name(node)
    owner = subprocess.Popen(
        ["nft", "-i"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    assert owner.stdin is not None
    owner.stdin.write(f"add table inet {table} {{ flags owner; }}\n")
    owner.stdin.flush()

    async def body(_client: Client, _enforcer: L2PolicyEnforcer) -> None:
        async def refused() -> bool:
            return (vmi_condition(api, db["metadata"]["name"]) or {}).get("status") == "False"

        await eventually(refused)
        cond = vmi_condition(api, db["metadata"]["name"])
        assert cond is not None and cond["reason"] == "RulesNotApplied"
        assert "Operation not permitted" in cond["message"], cond
        assert vmi_condition(api, web["metadata"]["name"]) is None  # no policy selects it
        record = json.loads(
            api.get(f"/api/v1/nodes/{node}").json()["metadata"]["annotations"][STATUS_ANNOTATION]
        )
        assert record["error"] and "Operation not permitted" in record["error"]
        assert owner.stdin is not None
        owner.stdin.close()  # the owner goes, its table with it: the retry loads
        await asyncio.to_thread(owner.wait, 10)

        async def applied() -> bool:
            return (vmi_condition(api, db["metadata"]["name"]) or {}).get("status") == "True"

        await eventually(applied, 30)
        assert vmi_condition(api, db["metadata"]["name"])["reason"] == "RulesApplied"  # type: ignore[index]
        assert api.delete(f"{MULTI}/{unique}").ok

        async def dropped() -> bool:
            return vmi_condition(api, db["metadata"]["name"]) is None

        await eventually(dropped)

    try:
        run_enforcer(apiserver, node, None, body)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        api.delete(f"/api/v1/nodes/{node}")
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)
