"""The node lifecycle controller (kube-controller-manager's role in the engine): its pure
decision, then the real loop against the embedded API server with no engine and no VMs (the
test plays the node agent: it registers the Node, renews its Lease and posts Ready)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vmo.client import LEASE, NAMESPACE, NODE, Client, Conflict
from vmo.engine.virtcontroller.nodelifecycle import (
    NOT_READY,
    STATUS_UNKNOWN,
    STATUS_UNKNOWN_MESSAGE,
    UNREACHABLE,
    NodeLifecycleController,
    NodeMonitorSettings,
    condition_taints,
    node_health,
)
from vmo.runtime import micro_timestamp, timestamp
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
LEASES = "kube-node-lease"
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = NodeMonitorSettings(grace_period=40.0, monitor_period=5.0)


def ready(status: str = "True", *, heartbeat: datetime = NOW) -> JSON:
    return {"type": "Ready", "status": status, "reason": "KubeletReady",
            "lastHeartbeatTime": timestamp(heartbeat),
            "lastTransitionTime": "2025-03-01T00:00:00Z"}  # fmt: skip


def node(*conditions: JSON, taints: list[JSON] | None = None) -> JSON:
    return {
        "metadata": {"name": "n", "creationTimestamp": "2025-03-01T00:00:00Z"},
        "spec": {"taints": taints} if taints else {},
        "status": {"conditions": list(conditions)},
    }


def lease(renewed: datetime) -> JSON:
    return {"spec": {"holderIdentity": "n", "renewTime": micro_timestamp(renewed)}}


def keys(taints: list[JSON]) -> set[tuple[str, str]]:
    return {(t["key"], t["effect"]) for t in taints}


# --- the pure decision -------------------------------------------------------------------------


def test_a_node_heard_within_the_grace_period_keeps_its_conditions_and_gets_no_taint() -> None:
    n = node(ready(heartbeat=NOW - timedelta(seconds=35)))
    health = node_health(n, lease(NOW - timedelta(seconds=5)), NOW, SETTINGS)
    assert health.conditions == n["status"]["conditions"]
    assert health.taints == []
    assert health.recheck_after == pytest.approx(35.05)


def test_a_silent_node_goes_unknown_as_upstream_says_it() -> None:
    old = NOW - timedelta(seconds=41)
    pressure = {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"}
    health = node_health(node(ready(heartbeat=old), pressure), lease(old), NOW, SETTINGS)
    by_type = {c["type"]: c for c in health.conditions}
    assert by_type["Ready"]["status"] == "Unknown"
    assert by_type["Ready"]["reason"] == STATUS_UNKNOWN
    assert by_type["Ready"]["message"] == STATUS_UNKNOWN_MESSAGE
    assert by_type["Ready"]["lastTransitionTime"] == timestamp(NOW)
    assert by_type["Ready"]["lastHeartbeatTime"] == timestamp(old)  # kept: the agent's last word
    assert by_type["MemoryPressure"]["status"] == "Unknown"
    assert keys(health.taints) == {(UNREACHABLE, "NoSchedule"), (UNREACHABLE, "NoExecute")}
    no_execute = next(t for t in health.taints if t["effect"] == "NoExecute")
    assert no_execute["timeAdded"] == timestamp(NOW)
    assert health.recheck_after is None


def test_a_fresh_lease_alone_keeps_the_node_ready() -> None:
    n = node(ready(heartbeat=NOW - timedelta(minutes=5)))
    assert node_health(n, lease(NOW - timedelta(seconds=1)), NOW, SETTINGS).taints == []


def test_a_node_never_heard_from_is_unknown_once_the_grace_period_after_its_creation_ends() -> None:
    health = node_health(node(), None, NOW, SETTINGS)
    ready_cond = next(c for c in health.conditions if c["type"] == "Ready")
    assert (ready_cond["status"], ready_cond["reason"]) == ("Unknown", "NodeStatusNeverUpdated")


def test_the_taints_follow_ready_and_leave_others_alone() -> None:
    mine = {"key": "example.com/dedicated", "value": "db", "effect": "NoSchedule"}
    unknown = condition_taints([mine], "Unknown", "t1")
    assert keys(unknown) == {(mine["key"], "NoSchedule"), (UNREACHABLE, "NoSchedule"),
                             (UNREACHABLE, "NoExecute")}  # fmt: skip
    assert condition_taints(unknown, "Unknown", "t2") == unknown  # timeAdded kept
    assert keys(condition_taints(unknown, "False", "t3")) == {
        (mine["key"], "NoSchedule"), (NOT_READY, "NoSchedule"), (NOT_READY, "NoExecute")}  # fmt: skip
    assert condition_taints(unknown, "True", "t4") == [mine]


# --- against the API server --------------------------------------------------------------------


@pytest.fixture
async def client(apiserver: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(apiserver.kubeconfig) as c:
        with contextlib.suppress(Conflict):
            await c.create(NAMESPACE, {"metadata": {"name": LEASES}})
        yield c
    await asyncio.sleep(0.1)


async def post_ready(client: Client, name: str) -> None:
    """What the agent's heartbeat does: renew the Lease, post Ready=True."""
    spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro_timestamp()}
    if await client.find(LEASE, name, LEASES) is None:
        await client.create(LEASE, {"metadata": {"name": name, "namespace": LEASES}, "spec": spec})
    else:
        await client.patch(LEASE, name, {"spec": spec}, LEASES)
    cond = {"type": "Ready", "status": "True", "reason": "KubeletReady",
            "lastHeartbeatTime": timestamp(), "lastTransitionTime": timestamp()}  # fmt: skip
    await client.patch_status(NODE, name, {"conditions": [cond]})


async def state(client: Client, name: str) -> tuple[str, set[tuple[str, str]]]:
    n = await client.get(NODE, name)
    status = next(c["status"] for c in n["status"]["conditions"] if c["type"] == "Ready")
    return status, keys((n.get("spec") or {}).get("taints") or [])


async def until(probe: Any, want: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await probe()) != want:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"wanted {want!r}, still {got!r}")
        await asyncio.sleep(0.05)


async def test_a_node_that_stops_renewing_its_lease_is_unknown_and_tainted_until_it_returns(
    client: Client, unique: str
) -> None:
    name = f"lifecycle-{unique}"
    await client.create(NODE, {"metadata": {"name": name}, "spec": {}})
    await post_ready(client, name)
    stop = asyncio.Event()
    settings = NodeMonitorSettings(grace_period=1.5, monitor_period=0.2)
    controller = NodeLifecycleController(client, settings)
    task = asyncio.create_task(controller.run(stop))
    try:
        for _ in range(4):  # heard from every 0.5 s: it stays Ready, untainted
            await asyncio.sleep(0.5)
            assert await state(client, name) == ("True", set())
            await post_ready(client, name)
        tainted = {(UNREACHABLE, "NoSchedule"), (UNREACHABLE, "NoExecute")}
        await until(lambda: state(client, name), ("Unknown", tainted), timeout=5)
        await post_ready(client, name)
        await until(lambda: state(client, name), ("True", set()), timeout=5)
        assert controller.stats.failures == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.delete(NODE, name)
