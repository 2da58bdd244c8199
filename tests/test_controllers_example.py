"""The runtime's example controller (vmo.controllers.example), pure decisions and then the real
loop against the embedded API server (no engine: the test plays the VMI's node)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vmo.client import EVENT, VM, VMI, Client
from vmo.controllers.example import NODE_LABEL, NodeLabelController, label_patch, wanted_label
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]

SPEC: JSON = {
    "domain": {
        "memory": {"guest": "64Mi"},
        "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
    },
    "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/example/disk:1"}}],
}


def halted_vm(name: str) -> JSON:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"runStrategy": "Halted", "template": {"spec": copy.deepcopy(SPEC)}},
    }


def vmi(name: str) -> JSON:
    return {"metadata": {"name": name, "namespace": "default"}, "spec": copy.deepcopy(SPEC)}


def test_the_label_follows_the_vmis_node_and_goes_when_the_vmi_ends() -> None:
    running = {"metadata": {}, "status": {"phase": "Running", "nodeName": "node-2"}}
    assert wanted_label(running) == "node-2"
    assert wanted_label({"metadata": {}, "status": {"phase": "Pending"}}) is None
    assert wanted_label({**running, "status": {"phase": "Succeeded", "nodeName": "n"}}) is None
    assert (
        wanted_label({"metadata": {"deletionTimestamp": "x"}, "status": running["status"]}) is None
    )
    assert wanted_label(None) is None


def test_the_patch_is_guarded_and_only_made_when_the_label_differs() -> None:
    vm = {"metadata": {"resourceVersion": "7", "labels": {NODE_LABEL: "node-1"}}}
    assert label_patch(vm, "node-1") is None
    assert label_patch(vm, "node-2") == {
        "metadata": {"resourceVersion": "7", "labels": {NODE_LABEL: "node-2"}}
    }
    assert label_patch({"metadata": {"resourceVersion": "1"}}, None) is None


@pytest.fixture
async def client(apiserver: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(apiserver.kubeconfig) as c:
        yield c
    await asyncio.sleep(0.1)


async def label_of(client: Client, name: str) -> str | None:
    vm = await client.get(VM, name, "default")
    return (vm["metadata"].get("labels") or {}).get(NODE_LABEL)


async def until(probe: Any, want: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await probe()) != want:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"wanted {want!r}, still {got!r}")
        await asyncio.sleep(0.05)


async def test_the_controller_labels_a_vm_with_its_node_against_the_api(
    client: Client, unique: str
) -> None:
    await client.create(VM, halted_vm(unique))
    stop = asyncio.Event()
    controller = NodeLabelController(client)
    task = asyncio.create_task(controller.run(stop))
    try:
        await client.create(VMI, vmi(unique))
        await client.patch(
            VMI, unique, {"status": {"phase": "Running", "nodeName": "node-7"}}, "default"
        )
        await until(lambda: label_of(client, unique), "node-7")
        await client.patch(VMI, unique, {"status": {"nodeName": "node-8"}}, "default")
        await until(lambda: label_of(client, unique), "node-8")
        await client.delete(VMI, unique, "default")
        await until(lambda: label_of(client, unique), None)
        events, _ = await client.list(
            EVENT, "default", field_selector=f"involvedObject.name={unique}"
        )
        assert {e["reason"] for e in events} == {"NodeChanged"}
        assert controller.stats.failures == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
