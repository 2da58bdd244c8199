"""The balance controller against an embedded API server with no engine (the test writes the
Nodes and the Running VMIs, with their status) and a real Prometheus scraping a synthetic
exporter of KubeVirt's metric names, so that the usage the controller reads is known: each
cycle's recommendations, their execution as migrations and their outcome, and what it says
when it cannot decide (Prometheus unreachable, a bad spec, two policies for one VM)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmo.client import NAMESPACE, NODE, VMI, VMIM, ApiStatusError, Client
from vmo.client.prometheus import PrometheusConfig
from vmo.controllers.balance.controller import (
    POLICY_LABEL,
    RECOMMENDATION_LABEL,
    BalanceController,
)
from vmo.controllers.balance.crds import BALANCE_POLICY, BALANCE_RECOMMENDATION
from vmo.controllers.manager import ensure_crds
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.prometheus import PrometheusServer, ScrapeJob, SyntheticExporter

JSON = dict[str, Any]
NS = "balance"
GI = 2**30
MEASUREMENT = {"window": "20s", "step": "2s", "rateInterval": "6s", "percentile": 95}


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exporter() -> Iterator[SyntheticExporter]:
    with SyntheticExporter() as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, exporter: SyntheticExporter
) -> Iterator[PrometheusServer]:
    job = ScrapeJob("vmo-node-agent", [exporter.target])
    with PrometheusServer(
        tmp_path_factory.mktemp("prom"), jobs=[job], scrape_interval="1s"
    ) as server:
        yield server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThreadedServer]:
    with ThreadedServer(home=tmp_path / "home") as running:
        yield running


@pytest.fixture
async def client(server: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(server.kubeconfig) as c:
        await ensure_crds(c)
        await c.create(NAMESPACE, {"metadata": {"name": NS}})
        yield c
    await asyncio.sleep(0.1)


Start = Callable[..., Awaitable[BalanceController]]


@pytest.fixture
async def start(client: Client, prometheus: PrometheusServer) -> AsyncIterator[Start]:
    made: list[BalanceController] = []

    async def make(config: PrometheusConfig | None = None) -> BalanceController:
        chosen = config or prometheus.config
        controller = BalanceController(client, lambda: chosen)
        await controller.start()
        await asyncio.wait_for(controller.wait_synced(), 10)
        made.append(controller)
        return controller

    yield make
    for controller in made:
        await controller.stop()


async def eventually(probe: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = probe()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.2)


# --- builders -----------------------------------------------------------------------------------


async def node(client: Client, name: str, cpus: int = 4, memory_gi: int = 16) -> None:
    await client.create(NODE, {"metadata": {"name": name, "labels": {
        "kubernetes.io/hostname": name, "kubevirt.io/schedulable": "true"}}})  # fmt: skip
    stamp = "2026-01-01T00:00:00Z"
    await client.patch_status(NODE, name, {
        "allocatable": {"cpu": str(cpus), "memory": f"{memory_gi}Gi", "pods": "110"},
        "capacity": {"cpu": str(cpus), "memory": f"{memory_gi}Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}],
    })  # fmt: skip


async def vmi(
    client: Client,
    exporter: SyntheticExporter,
    name: str,
    on: str,
    cores: float,
    *,
    labels: dict[str, str] | None = None,
    memory_gi: float = 1,
) -> None:
    """A Running, LiveMigratable VMI on ``on`` whose QEMU uses ``cores`` and ``memory_gi``."""
    body: JSON = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "spec": {
            "domain": {
                "cpu": {"cores": 1},
                "memory": {"guest": "1Gi"},
                "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
            },
            "volumes": [{"name": "root", "containerDisk": {"image": "example/disk:1"}}],
        },
    }
    created = await client.create(VMI, body, NS)
    stamp = "2026-01-01T00:00:00Z"
    created = copy.deepcopy(created)
    created["status"] = {
        "phase": "Running",
        "nodeName": on,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": stamp},
                       {"type": "LiveMigratable", "status": "True",
                        "lastTransitionTime": stamp}],
    }  # fmt: skip
    await client.replace(VMI, created)
    where = {"namespace": NS, "name": name, "node": on}
    exporter.counter("kubevirt_vmi_cpu_usage_seconds_total", where, rate=cores)
    exporter.gauge("kubevirt_vmi_memory_resident_bytes", where, memory_gi * GI)


def policy(name: str, **spec: Any) -> JSON:
    return {
        "apiVersion": "vmo.dev/v1alpha1",
        "kind": "BalancePolicy",
        "metadata": {"name": name},
        "spec": {"measurement": MEASUREMENT, "interval": "1h", **spec},
    }


async def hot_and_cold(client: Client, exporter: SyntheticExporter, prefix: str) -> None:
    """node-a runs four busy VMIs (3.2 of 4 cores), node-b one light one, node-c nothing."""
    for n in ("node-a", "node-b", "node-c"):
        await node(client, n)
    for i in range(4):
        await vmi(client, exporter, f"{prefix}-hot{i}", "node-a", 0.8, labels={"app": prefix})
    await vmi(client, exporter, f"{prefix}-cool", "node-b", 0.2, labels={"app": prefix})


async def measured(prometheus: PrometheusServer, prefix: str, count: int) -> None:
    """Waits until Prometheus has a window of each of the VMIs' rates."""
    from vmo.client.prometheus import PrometheusClient

    expr = f'count(rate(kubevirt_vmi_cpu_usage_seconds_total{{name=~"{prefix}-.*"}}[6s]) > 0)'
    async with PrometheusClient(prometheus.config) as prom:

        async def ready() -> bool:
            found = await prom.query(expr)
            return bool(found) and found[0].value >= count

        await eventually(ready, 60)
    await asyncio.sleep(6)  # a few points of the window


async def recs(client: Client) -> list[JSON]:
    items, _ = await client.list(BALANCE_RECOMMENDATION, NS)
    return items


def conditions(obj: JSON) -> dict[str, JSON]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


async def synced(controller: BalanceController, count: int) -> None:
    await eventually(lambda: len(controller.informer(VMI).items()) == count)
    await eventually(lambda: all(
        (v.get("status") or {}).get("phase") == "Running"
        for v in controller.informer(VMI).items()))  # fmt: skip


# --- the tests ----------------------------------------------------------------------------------


async def test_a_manual_policy_recommends_moves_off_the_hot_node_and_apply_carries_one_out(
    client: Client, start: Start, exporter: SyntheticExporter, prometheus: PrometheusServer
) -> None:
    await hot_and_cold(client, exporter, "man")
    await measured(prometheus, "man", 5)
    await client.create(BALANCE_POLICY, policy("manual", automationLevel="Manual"))
    controller = await start()
    await synced(controller, 5)
    await eventually(lambda: controller.informer(BALANCE_POLICY).items())
    await controller.cycle("manual", force=True)
    found = await recs(client)
    assert found, "a hot node beside an empty one: a move is recommended"
    for rec in found:
        spec = rec["spec"]
        assert spec["source"] == "node-a" and spec["target"] in ("node-b", "node-c")
        assert spec["virtualMachineInstance"].startswith("man-hot")
        assert spec["imbalanceAfter"] < spec["imbalanceBefore"]
        assert spec["rule"] == "LoadBalance" and spec["reason"]
        assert 0.9 * GI <= spec["memoryBytes"] <= 1.1 * GI  # the resident memory measured
        assert spec["bandwidth"]["source"] == "assumed"  # no migration measured yet
        assert spec["expectedSeconds"] == pytest.approx(spec["memoryBytes"] / 2**26, rel=0.01)
        assert rec["metadata"]["labels"][POLICY_LABEL] == "manual"
        assert rec["status"]["phase"] == "Pending"
    migrations, _ = await client.list(VMIM, NS)
    assert not migrations, "Manual: nothing migrates by itself"
    status = (await client.get(BALANCE_POLICY, "manual"))["status"]
    assert conditions({"status": status})["Ready"]["reason"] == "Recommended"
    assert status["recommendations"] == len(found)
    assert status["imbalance"] > status["targetImbalance"]
    assert status["nodes"] == 3 and status["virtualMachines"] == 5
    # a second cycle with the same usage repeats the same IDs (vmo balance apply ID holds)
    await controller.cycle("manual", force=True)
    again = await recs(client)
    assert {r["metadata"]["name"] for r in again} == {r["metadata"]["name"] for r in found}

    chosen = found[0]
    name = chosen["metadata"]["name"]
    await client.patch(BALANCE_RECOMMENDATION, name, {"spec": {"approved": True}}, NS)
    await eventually(lambda: (controller.informer(BALANCE_RECOMMENDATION).cache.get(f"{NS}/{name}")
                              or {}).get("spec", {}).get("approved"))  # fmt: skip
    await controller.follow(NS, name)
    rec = await client.get(BALANCE_RECOMMENDATION, name, NS)
    assert rec["status"]["phase"] == "Migrating", rec["status"]
    migration = await client.get(VMIM, rec["status"]["migration"], NS)
    assert migration["spec"] == {
        "vmiName": chosen["spec"]["virtualMachineInstance"],
        "addedNodeSelector": {"kubernetes.io/hostname": chosen["spec"]["target"]},
    }
    assert migration["metadata"]["labels"][RECOMMENDATION_LABEL] == name
    cooled = (await client.get(BALANCE_POLICY, "manual"))["status"]["cooldowns"]
    vm_key = f"{NS}/{chosen['spec']['virtualMachineInstance']}"
    assert [c["vm"] for c in cooled] == [vm_key] and cooled[0]["seconds"] == 900
    # the migration ends: the recommendation records how
    await client.patch_status(VMIM, migration["metadata"]["name"], {"phase": "Succeeded"}, NS)
    await controller.follow(NS, name)
    assert (await client.get(BALANCE_RECOMMENDATION, name, NS))["status"]["phase"] == "Succeeded"


async def test_a_full_policy_migrates_within_its_limits_and_cools_the_vms_down(
    client: Client, start: Start, exporter: SyntheticExporter, prometheus: PrometheusServer
) -> None:
    await hot_and_cold(client, exporter, "full")
    await measured(prometheus, "full", 5)
    await client.create(BALANCE_POLICY, policy("full", automationLevel="Full",
                                                limits={"perNode": 1, "total": 5}))  # fmt: skip
    controller = await start()
    await synced(controller, 5)
    await eventually(lambda: controller.informer(BALANCE_POLICY).items())
    await controller.cycle("full", force=True)
    migrations, _ = await client.list(VMIM, NS)
    assert len(migrations) == 1, "perNode 1: node-a sends one VM this cycle"
    status = (await client.get(BALANCE_POLICY, "full"))["status"]
    assert status["migrationsStarted"] == 1
    assert len(status["cooldowns"]) == 1
    moved = migrations[0]["spec"]["vmiName"]
    assert status["cooldowns"][0]["vm"] == f"{NS}/{moved}"
    rec = next(r for r in await recs(client) if r["status"]["phase"] == "Migrating")
    assert rec["spec"]["virtualMachineInstance"] == moved


async def test_unreachable_prometheus_decides_nothing_and_says_why(
    client: Client, start: Start, exporter: SyntheticExporter
) -> None:
    await hot_and_cold(client, exporter, "dark")
    await client.create(BALANCE_POLICY, policy("dark", automationLevel="Full"))
    closed = PrometheusConfig(url="https://127.0.0.1:9", timeout=2)
    controller = await start(closed)
    await synced(controller, 5)
    await eventually(lambda: controller.informer(BALANCE_POLICY).items())
    await controller.cycle("dark", force=True)
    status = (await client.get(BALANCE_POLICY, "dark"))["status"]
    found = conditions({"status": status})
    assert found["MeasurementsAvailable"]["status"] == "False"
    assert found["MeasurementsAvailable"]["reason"] == "PrometheusUnavailable"
    assert "127.0.0.1:9" in found["MeasurementsAvailable"]["message"]
    assert found["Ready"]["status"] == "False"
    assert not await recs(client)
    assert not (await client.list(VMIM, NS))[0]


async def test_a_threshold_out_of_range_is_refused_naming_the_field(client: Client) -> None:
    with pytest.raises(ApiStatusError) as refused:
        await client.create(BALANCE_POLICY, policy("bad", migrationThreshold=7))
    assert refused.value.code == 422
    assert "spec.migrationThreshold" in str(refused.value)


async def test_a_spec_wrong_across_fields_gets_a_status_naming_the_field(
    client: Client, start: Start
) -> None:
    await client.create(BALANCE_POLICY, policy("short", cooldown={"minimum": "5m"}))
    controller = await start()
    await eventually(lambda: controller.informer(BALANCE_POLICY).items())
    await controller.cycle("short", force=True)
    status = (await client.get(BALANCE_POLICY, "short"))["status"]
    ready = conditions({"status": status})["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.cooldown.minimum" in ready["message"] and "15m" in ready["message"]


async def test_two_policies_selecting_one_vm_leave_it_alone_and_both_say_so(
    client: Client, start: Start, exporter: SyntheticExporter, prometheus: PrometheusServer
) -> None:
    await hot_and_cold(client, exporter, "dup")
    await measured(prometheus, "dup", 5)
    selector = {"matchLabels": {"app": "dup"}}
    await client.create(BALANCE_POLICY, policy("one", automationLevel="Full", vmSelector=selector))
    await client.create(BALANCE_POLICY, policy("two", automationLevel="Full", vmSelector=selector))
    controller = await start()
    await synced(controller, 5)
    await eventually(lambda: len(controller.informer(BALANCE_POLICY).items()) == 2)
    for name in ("one", "two"):
        await controller.cycle(name, force=True)
        status = (await client.get(BALANCE_POLICY, name))["status"]
        conflict = conditions({"status": status})["Conflict"]
        assert conflict["status"] == "True", status
        assert "one, two" in conflict["message"]
        assert status["recommendations"] == 0
    assert not await recs(client)
    assert not (await client.list(VMIM, NS))[0]


async def test_a_balanced_cluster_gets_no_recommendation_and_the_reason(
    client: Client, start: Start, exporter: SyntheticExporter, prometheus: PrometheusServer
) -> None:
    for n in ("node-a", "node-b"):
        await node(client, n)
    await vmi(client, exporter, "even-0", "node-a", 1.0)
    await vmi(client, exporter, "even-1", "node-b", 1.0)
    await measured(prometheus, "even", 2)
    await client.create(BALANCE_POLICY, policy("even", automationLevel="Full"))
    controller = await start()
    await synced(controller, 2)
    await eventually(lambda: controller.informer(BALANCE_POLICY).items())
    await controller.cycle("even", force=True)
    status = (await client.get(BALANCE_POLICY, "even"))["status"]
    ready = conditions({"status": status})["Ready"]
    assert ready["status"] == "True" and ready["reason"] == "NoRecommendation"
    assert "balanced" in ready["message"], ready
    assert status["recommendations"] == 0 and not await recs(client)


async def test_the_example_policy_is_accepted_and_parses(client: Client) -> None:
    import yaml

    from vmo.controllers.balance.policy import parse_policy

    example = Path(__file__).resolve().parent.parent / "examples" / "balance-policy.yaml"
    body = yaml.safe_load(example.read_text())
    stored = await client.create(BALANCE_POLICY, body)
    spec = parse_policy(stored)
    assert (spec.automation, spec.settings.threshold) == ("Manual", 3)
    assert (spec.cooldown_minimum, spec.cooldown_maximum) == (900, 6 * 3600)
    assert spec.selects({}, {"kubernetes.io/metadata.name": "virtual-machines"})
    assert not spec.selects(
        {"vmo.dev/balance": "off"}, {"kubernetes.io/metadata.name": "virtual-machines"}
    )
