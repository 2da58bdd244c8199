"""Initial placement through the embedded scheduler's extender: the engine's own scheduler (no
node agents: the test writes the Nodes, and the VMIs already running with their status) asks
the balancer's extender, which the controller serves and announces, and a new VMI lands where a
Partial policy's score is best, not where the scheduler's least-allocated score alone puts it."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_balance_controller import (
    MEASUREMENT,
    NS,
    eventually,
    exporter,
    measured,
    node,
    policy,
    prometheus,
    vmi,
)
from vmo.client import CONFIGMAP, VMI, Client
from vmo.client.prometheus import PrometheusConfig
from vmo.controllers.balance.controller import BalanceController
from vmo.controllers.balance.crds import BALANCE_POLICY
from vmo.controllers.balance.extender import CONFIGMAP_NAME, MUTATE_PATH, PlacementExtender
from vmo.controllers.balance.extender import NAMESPACE as EXT_NS
from vmo.controllers.manager import ensure_crds
from vmo.home import StateDir
from vmo.runtime import ensure_namespace
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.prometheus import PrometheusServer, SyntheticExporter

JSON = dict[str, Any]
__all__ = ["MEASUREMENT", "exporter", "prometheus"]  # fixtures shared with the controller's tests


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[ThreadedServer]:
    """The engine's controllers (its scheduler among them) and no node agent."""
    with ThreadedServer(home=tmp_path / "home", engine=True, nodes=0) as running:
        yield running


@pytest.fixture
async def client(engine: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(engine.kubeconfig) as c:
        await ensure_crds(c)
        await ensure_namespace(c, NS)
        await ensure_namespace(c, EXT_NS)
        yield c
    await asyncio.sleep(0.1)


def new_vmi(name: str) -> JSON:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "placed"}},
        "spec": {
            "domain": {
                "cpu": {"cores": 1},
                "memory": {"guest": "1Gi"},
                "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
            },
            "volumes": [{"name": "root", "containerDisk": {"image": "example/disk:1"}}],
        },
    }


async def placed_on(client: Client, name: str) -> str:
    async def where() -> str:
        found = await client.find(VMI, name, NS)
        return str(((found or {}).get("status") or {}).get("nodeName") or "")

    return str(await eventually(where, 30))


async def test_a_partial_policy_places_a_new_vmi_where_its_score_is_best(
    engine: ThreadedServer,
    client: Client,
    exporter: SyntheticExporter,
    prometheus: PrometheusServer,
) -> None:
    # node-big has most room by requests (the scheduler alone prefers it), but its VMIs use
    # 75 % of its CPU and half its memory; node-small is idle
    await node(client, "node-big", cpus=16, memory_gi=64)
    await node(client, "node-small", cpus=4, memory_gi=8)
    for i in range(4):
        await vmi(client, exporter, f"busy-{i}", "node-big", 3.0, memory_gi=8)
    await measured(prometheus, "busy", 4)

    # no policy: the scheduler's least-allocated score alone
    await client.create(VMI, new_vmi("alone"), NS)
    assert await placed_on(client, "alone") == "node-big"

    state = StateDir(engine.home)
    controller = BalanceController(client, lambda: prometheus.config)
    extender = PlacementExtender(
        client, controller, cert=state.metrics_cert, key=state.metrics_key, ca=state.pki / "ca.crt"
    )
    await controller.start()
    await asyncio.wait_for(controller.wait_synced(), 10)
    stop = asyncio.Event()
    serving = asyncio.get_running_loop().create_task(extender.run(stop))
    try:
        await eventually(lambda: extender.url)
        await asyncio.sleep(3)
        assert await client.find(CONFIGMAP, CONFIGMAP_NAME, EXT_NS) is None, "no policy places"
        await client.create(BALANCE_POLICY, policy("placement", automationLevel="Partial"))
        announced = await eventually(lambda: client.find(CONFIGMAP, CONFIGMAP_NAME, EXT_NS))
        assert extender.url in announced["data"]["extenders.yaml"]
        await controller.cycle("placement", force=True)  # measures: placement weighs usage
        await client.create(VMI, new_vmi("steered"), NS)
        await eventually(lambda: controller.informer(VMI).cache.get(f"{NS}/steered"))
        assert await placed_on(client, "steered") == "node-small"

        # cluster mode: the same choice as a mutation of the VMI's create
        review = await mutate(engine, extender, new_vmi("hinted"))
        response = review["response"]
        assert response["allowed"] is True and response["patchType"] == "JSONPatch"
        patch = json.loads(base64.b64decode(response["patch"]))
        assert patch == [{"op": "add", "path": "/spec/affinity", "value": {"nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": {
                "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                                      "values": ["node-small"]}]}}]}}}]  # fmt: skip
        own = new_vmi("own")
        own["spec"]["affinity"] = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 5, "preference": {"matchExpressions": [
                {"key": "disk", "operator": "In", "values": ["ssd"]}]}}]}}  # fmt: skip
        response = (await mutate(engine, extender, own))["response"]
        assert response == {"uid": "u-1", "allowed": True}, "a preference of its own stands"

        # Manual: the policy does not place; the scheduler alone again
        await client.patch(BALANCE_POLICY, "placement", {"spec": {"automationLevel": "Manual"}})
        await eventually(
            lambda: controller.informer(BALANCE_POLICY).cache["placement"]["spec"][
                "automationLevel"
            ] == "Manual"
        )  # fmt: skip

        async def withdrawn() -> bool:
            return await client.find(CONFIGMAP, CONFIGMAP_NAME, EXT_NS) is None

        await eventually(withdrawn)
        await client.create(VMI, new_vmi("manual"), NS)
        assert await placed_on(client, "manual") == "node-big"
    finally:
        stop.set()
        await serving
        await controller.stop()
    assert await client.find(CONFIGMAP, CONFIGMAP_NAME, EXT_NS) is None, "withdrawn on stop"


async def mutate(engine: ThreadedServer, extender: PlacementExtender, vmi: JSON) -> JSON:
    import ssl

    import aiohttp

    ctx = ssl.create_default_context(cafile=str(StateDir(engine.home).pki / "ca.crt"))
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-1", "operation": "CREATE", "namespace": NS, "object": vmi,
        "kind": {"group": "kubevirt.io", "version": "v1", "kind": "VirtualMachineInstance"}}}  # fmt: skip
    headers = {"Authorization": f"Bearer {engine.admin_token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{extender.url}{MUTATE_PATH}", json=review, ssl=ctx, headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        answer: JSON = await r.json()
        return answer


def test_the_webhook_configuration_is_a_valid_kubernetes_object(tmp_path: Path) -> None:
    import subprocess
    import sys

    import kubernetes_validate
    import yaml

    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    argv = [sys.executable, "-m", "vmo.cli.main", "balance", "render-webhook",
            "--service", "vmo-system/vmo-controllers", "--ca-bundle", str(ca)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    body = yaml.safe_load(out.stdout)
    kubernetes_validate.validate(body, "1.32.0", strict=True)
    hook = body["webhooks"][0]
    assert hook["clientConfig"]["service"] == {"namespace": "vmo-system",
        "name": "vmo-controllers", "path": MUTATE_PATH, "port": 443}  # fmt: skip
    assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None"
    bad = subprocess.run([*argv[:5], "--url", "http://x", "--ca-bundle", str(ca)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 1 and "https" in bad.stderr and "Traceback" not in bad.stderr


async def test_the_extender_refuses_callers_without_a_token(
    engine: ThreadedServer, client: Client
) -> None:
    import ssl

    import aiohttp

    state = StateDir(engine.home)
    nowhere = PrometheusConfig(url="https://127.0.0.1:9")
    controller = BalanceController(client, lambda: nowhere)
    extender = PlacementExtender(
        client, controller, cert=state.metrics_cert, key=state.metrics_key, ca=state.pki / "ca.crt"
    )
    stop = asyncio.Event()
    serving = asyncio.get_running_loop().create_task(extender.run(stop))
    try:
        await eventually(lambda: extender.url)
        ctx = ssl.create_default_context(cafile=str(state.pki / "ca.crt"))
        body = {"Pod": {"metadata": {"namespace": NS}}, "NodeNames": ["a"]}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{extender.url}/prioritize", json=body, ssl=ctx) as r:
                assert r.status == 401
            headers = {"Authorization": "Bearer not-a-token"}
            async with session.post(
                f"{extender.url}/prioritize", json=body, ssl=ctx, headers=headers
            ) as r:
                assert r.status == 401
            headers = {"Authorization": f"Bearer {engine.admin_token}"}
            async with session.post(
                f"{extender.url}/prioritize", json=body, ssl=ctx, headers=headers
            ) as r:
                assert r.status == 200
                assert await r.json() == [{"Host": "a", "Score": 0}]  # no such VMI: neutral
    finally:
        stop.set()
        await serving
