"""``vmo migrate`` and ``vmo node cordon|uncordon|drain``: the drain plan, and the commands
against the real API server (no controller or node agent runs there: the tests play them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from tests.conftest import make_user
from vmo.cli import maintenance
from vmo.cli.main import main
from vmo.cli.maintenance import (
    DRAIN_LABEL,
    EvictionAction,
    StepKind,
    drain_step,
    failure_message,
    parse_node_selector,
    plan_eviction,
)
from vmo.client import NAMESPACE, NODE, VMI, VMIM, Client, Credentials, load_kubeconfig
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
FAST = 0.05  # poll interval of the commands under test
RBAC = "rbac.authorization.k8s.io"


# --- builders --------------------------------------------------------------------------------


def vmi(
    name: str = "vm-a",
    *,
    strategy: str | None = None,
    migratable: bool | None = None,
    reason: str = "",
    node: str = "node-1",
) -> JSON:
    spec: JSON = {"domain": {"devices": {}, "memory": {"guest": "128Mi"}}}
    if strategy is not None:
        spec["evictionStrategy"] = strategy
    status: JSON = {"phase": "Running", "nodeName": node, "conditions": []}
    if migratable is not None:
        cond = {"type": "LiveMigratable", "status": "True" if migratable else "False"}
        if reason:
            cond |= {"reason": "DisksNotLiveMigratable", "message": reason}
        status["conditions"].append(cond)
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": spec, "status": status}


def migration(phase: str | None, **status: Any) -> JSON:
    body: JSON = {"metadata": {"name": "m"}, "spec": {"vmiName": "vm-a"}, "status": status}
    if phase:
        body["status"]["phase"] = phase
    return body


# --- the drain plan (pure) -------------------------------------------------------------------


def test_eviction_strategy_defaults_to_none_which_stops_the_vmi() -> None:
    plan = plan_eviction(vmi(migratable=True))
    assert (plan.action, plan.strategy) == (EvictionAction.STOP, "None")


def test_the_cluster_default_applies_when_the_vmi_names_no_strategy() -> None:
    plan = plan_eviction(vmi(migratable=True), cluster_default="LiveMigrate")
    assert (plan.action, plan.strategy) == (EvictionAction.MIGRATE, "LiveMigrate")


def test_the_vmi_strategy_wins_over_the_cluster_default() -> None:
    plan = plan_eviction(vmi(strategy="None", migratable=True), cluster_default="LiveMigrate")
    assert plan.action is EvictionAction.STOP


def test_live_migrate_blocks_a_vmi_that_is_not_live_migratable() -> None:
    plan = plan_eviction(vmi(strategy="LiveMigrate", migratable=False, reason="hostDisk d"))
    assert plan.action is EvictionAction.BLOCKED
    assert plan.reason == "hostDisk d"


def test_live_migrate_leaves_an_unknown_migratability_to_the_api() -> None:
    assert plan_eviction(vmi(strategy="LiveMigrate")).action is EvictionAction.MIGRATE


def test_live_migrate_if_possible_migrates_a_migratable_vmi() -> None:
    plan = plan_eviction(vmi(strategy="LiveMigrateIfPossible", migratable=True))
    assert plan.action is EvictionAction.MIGRATE


def test_live_migrate_if_possible_stops_a_vmi_that_cannot_migrate() -> None:
    plan = plan_eviction(vmi(strategy="LiveMigrateIfPossible", migratable=False, reason="r"))
    assert (plan.action, plan.reason) == (EvictionAction.STOP, "r")


def test_external_leaves_the_vmi_to_another_controller() -> None:
    assert plan_eviction(vmi(strategy="External")).action is EvictionAction.EXTERNAL


def test_a_migration_in_flight_is_followed_whatever_the_strategy() -> None:
    v = vmi(strategy="None")
    step = drain_step(v, plan_eviction(v), in_flight=migration("Running"), failures=0)
    assert step is StepKind.FOLLOW


def test_a_vmi_being_deleted_is_waited_for() -> None:
    v = vmi(strategy="LiveMigrate", migratable=True)
    v["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert drain_step(v, plan_eviction(v), in_flight=None, failures=0) is StepKind.STOPPING


def test_failed_migrations_are_retried_three_times_then_given_up() -> None:
    v = vmi(strategy="LiveMigrate", migratable=True)
    plan = plan_eviction(v)
    assert drain_step(v, plan, in_flight=None, failures=3) is StepKind.MIGRATE
    assert drain_step(v, plan, in_flight=None, failures=4) is StepKind.GAVE_UP


def test_the_failure_message_comes_from_the_failure_condition() -> None:
    failed = migration(
        "Failed",
        conditions=[
            {"type": "Ready", "status": "True", "message": "irrelevant"},
            {"type": "migrationFailed", "status": "True", "message": "target never ready"},
        ],
    )
    assert failure_message(failed) == "target never ready"
    assert failure_message(migration("Failed", migrationState={"failureReason": "x"})) == "x"


def test_a_node_selector_item_needs_key_and_value() -> None:
    assert parse_node_selector(["a=b", "c="]) == {"a": "b", "c": ""}
    with pytest.raises(ValueError, match="'nokey': expected KEY=VALUE"):
        parse_node_selector(["nokey"])


# --- against the API server ------------------------------------------------------------------


@pytest.fixture
async def client(apiserver: ThreadedServer) -> AsyncIterator[Client]:
    async with Client(load_kubeconfig(apiserver.kubeconfig)) as c:
        yield c


@pytest.fixture
def ns(apiserver: ThreadedServer, unique: str) -> Iterator[str]:
    """A namespace of its own, emptied and deleted afterwards."""

    async def setup(c: Client) -> None:
        await c.create(NAMESPACE, {"metadata": {"name": unique}})

    async def teardown(c: Client) -> None:
        for res in (VMIM, VMI):
            items, _ = await c.list(res, unique)
            for item in items:
                await c.delete(res, item["metadata"]["name"], unique)
        await c.delete(NAMESPACE, unique)

    _admin(apiserver, setup)
    yield unique
    _admin(apiserver, teardown)


@pytest.fixture
def nodes(apiserver: ThreadedServer, unique: str) -> Iterator[tuple[str, str]]:
    """Two Nodes (no agent behind them), deleted afterwards."""
    names = (f"{unique}-n1", f"{unique}-n2")

    async def setup(c: Client) -> None:
        for name in names:
            await c.create(NODE, {"metadata": {"name": name}})

    async def teardown(c: Client) -> None:
        for name in names:
            await c.delete(NODE, name)

    _admin(apiserver, setup)
    yield names
    _admin(apiserver, teardown)


def _admin(apiserver: ThreadedServer, action: Callable[[Client], Awaitable[object]]) -> None:
    async def run() -> None:
        async with Client(load_kubeconfig(apiserver.kubeconfig)) as c:
            await action(c)

    asyncio.run(run())


async def put_vmi(client: Client, ns: str, name: str, node: str, **kw: Any) -> JSON:
    """A Running VMI on ``node``, as the scheduler and the node agent would leave it."""
    body = vmi(name, node=node, **kw)
    status = body.pop("status")
    body["metadata"]["namespace"] = ns
    await client.create(VMI, body, ns)
    # VMIs have no status subresource (as upstream): agents write status on the object
    patched: JSON = await client.patch(VMI, name, {"status": status}, ns)
    return patched


async def migrations_of(client: Client, ns: str, vmi_name: str) -> list[JSON]:
    items, _ = await client.list(VMIM, ns)
    return [m for m in items if m["spec"]["vmiName"] == vmi_name]


async def until(predicate: Callable[[], Awaitable[Any]], timeout: float = 10) -> Any:
    """Awaits a truthy ``predicate()``; fails the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not (result := await predicate()):
            await asyncio.sleep(FAST)
        return result


async def finish(
    client: Client, m: JSON, phase: str, *, target: str = "", message: str = ""
) -> None:
    """Plays the migration controller and agents: ends migration ``m`` in ``phase``."""
    ns, name = m["metadata"]["namespace"], m["metadata"]["name"]
    source = (await client.get(VMI, m["spec"]["vmiName"], ns))["status"]["nodeName"]
    if phase == "Succeeded":
        # the source agent moves the VMI before the controller marks the migration Succeeded
        await client.patch(VMI, m["spec"]["vmiName"], {"status": {"nodeName": target}}, ns)
    status: JSON = {
        "phase": phase,
        "migrationState": {"sourceNode": source, "targetNode": target or "elsewhere"},
    }
    if message:
        status["conditions"] = [{"type": "migrationFailed", "status": "True", "message": message}]
    await client.patch_status(VMIM, name, status, ns)


def vmo(apiserver: ThreadedServer, *argv: str) -> int:
    code: int = main([*argv, "--kubeconfig", str(apiserver.kubeconfig)])
    return code


def test_cordon_and_uncordon_flip_spec_unschedulable(
    apiserver: ThreadedServer, nodes: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    node = nodes[0]
    assert vmo(apiserver, "node", "cordon", node) == 0
    assert _node(apiserver, node)["spec"]["unschedulable"] is True
    assert vmo(apiserver, "node", "cordon", node) == 0
    assert vmo(apiserver, "node", "uncordon", node) == 0
    assert not _node(apiserver, node).get("spec", {}).get("unschedulable")
    out = capsys.readouterr().out
    assert f"node/{node} cordoned\nnode/{node} already cordoned\nnode/{node} uncordoned" in out


def _node(apiserver: ThreadedServer, name: str) -> JSON:
    got: JSON = {}

    async def read(c: Client) -> None:
        got.update(await c.get(NODE, name))

    _admin(apiserver, read)
    return got


def test_cordon_of_a_missing_node_says_so(
    apiserver: ThreadedServer, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vmo(apiserver, "node", "cordon", f"{unique}-absent") == 1
    assert f'node "{unique}-absent" not found' in capsys.readouterr().out


async def test_drain_acts_by_eviction_strategy(
    client: Client, ns: str, nodes: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    node, other = nodes
    await put_vmi(client, ns, "mig", node, strategy="LiveMigrate", migratable=True)
    await put_vmi(client, ns, "stop", node, strategy="None", migratable=True)
    await put_vmi(
        client, ns, "pinned", node, strategy="LiveMigrate", migratable=False, reason="hostDisk d"
    )
    await put_vmi(client, ns, "ext", node, strategy="External")
    await put_vmi(client, ns, "elsewhere", other, strategy="None")

    code = await maintenance.drain(client, node, timeout=0.5, poll=FAST)

    assert code == 1
    assert (await client.get(NODE, node))["spec"]["unschedulable"] is True
    [created] = await migrations_of(client, ns, "mig")
    assert created["metadata"]["labels"][DRAIN_LABEL] == node
    assert await client.find(VMI, "stop", ns) is None
    assert await client.find(VMI, "elsewhere", ns) is not None
    assert await migrations_of(client, ns, "pinned") == []
    out = capsys.readouterr().out
    assert f"{ns}/stop: stopped (evictionStrategy None)" in out
    assert f"{ns}/pinned: cannot evict: not live migratable: hostDisk d" in out
    assert f"{ns}/ext: left on the node: an external controller must move it" in out
    assert f"{ns}/mig: migrating {node} -> ? (Pending)" in out
    assert f"node/{node} not drained (timed out): 3 VMI(s) left" in out
    assert f"vmo node drain {node}` resumes" in out


async def test_a_resumed_drain_creates_no_second_migration(
    client: Client, ns: str, nodes: tuple[str, str]
) -> None:
    node = nodes[0]
    await put_vmi(client, ns, "mig", node, strategy="LiveMigrate", migratable=True)
    assert await maintenance.drain(client, node, timeout=0.2, poll=FAST) == 1
    assert await maintenance.drain(client, node, timeout=0.2, poll=FAST) == 1
    assert len(await migrations_of(client, ns, "mig")) == 1


async def test_a_drain_with_only_blocked_vmis_ends_without_waiting(
    client: Client, ns: str, nodes: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    node = nodes[0]
    await put_vmi(client, ns, "pinned", node, strategy="LiveMigrate", migratable=False)
    async with asyncio.timeout(5):
        assert await maintenance.drain(client, node, poll=FAST) == 1
    assert "not drained (nothing more can move): 1 VMI(s) left: 1 blocked" in (
        capsys.readouterr().out
    )


async def test_a_drain_finishes_when_the_migrations_succeed(
    client: Client, ns: str, nodes: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    node, other = nodes
    await put_vmi(client, ns, "mig", node, strategy="LiveMigrateIfPossible", migratable=True)
    drain = asyncio.create_task(maintenance.drain(client, node, timeout=20, poll=FAST))
    [m] = await until(lambda: migrations_of(client, ns, "mig"))
    await finish(client, m, "Succeeded", target=other)
    assert await drain == 0
    out = capsys.readouterr().out
    assert f"{ns}/mig: migrated to {other}" in out
    assert f"node/{node} drained: 1 migrated" in out


async def test_a_failed_drain_migration_is_retried_with_a_new_one(
    client: Client, ns: str, nodes: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    node, other = nodes
    await put_vmi(client, ns, "mig", node, strategy="LiveMigrate", migratable=True)
    drain = asyncio.create_task(maintenance.drain(client, node, timeout=20, poll=FAST))
    [first] = await until(lambda: migrations_of(client, ns, "mig"))
    await finish(client, first, "Failed", message="target never became ready")

    async def second() -> JSON | None:
        found = await migrations_of(client, ns, "mig")
        fresh = [m for m in found if m["metadata"]["name"] != first["metadata"]["name"]]
        return fresh[0] if fresh else None

    await finish(client, await until(second), "Succeeded", target=other)
    assert await drain == 0
    assert len(await migrations_of(client, ns, "mig")) == 2
    assert "failed: target never became ready; retrying (1/3)" in capsys.readouterr().out


def test_drain_dry_run_prints_the_plan_and_changes_nothing(
    apiserver: ThreadedServer,
    ns: str,
    nodes: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    node = nodes[0]

    async def setup(c: Client) -> None:
        await put_vmi(c, ns, "mig", node, strategy="LiveMigrate", migratable=True)
        await put_vmi(c, ns, "stop", node, strategy="None")

    _admin(apiserver, setup)
    assert vmo(apiserver, "node", "drain", node, "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"{ns}/mig: would migrate (evictionStrategy LiveMigrate)" in out
    assert f"{ns}/stop: would stop (evictionStrategy None)" in out
    assert not _node(apiserver, node).get("spec", {}).get("unschedulable")

    async def check(c: Client) -> None:
        assert await migrations_of(c, ns, "mig") == []
        assert await c.find(VMI, "stop", ns) is not None

    _admin(apiserver, check)


def test_migrate_no_wait_creates_a_migration(
    apiserver: ThreadedServer,
    ns: str,
    nodes: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _admin(apiserver, lambda c: put_vmi(c, ns, "vm-a", nodes[0], strategy="LiveMigrate"))
    code = vmo(
        apiserver, "migrate", "vm/vm-a", "-n", ns, "--no-wait", "--added-node-selector", "z=a"
    )
    assert code == 0
    found: list[JSON] = []

    async def read(c: Client) -> None:
        found.extend(await migrations_of(c, ns, "vm-a"))

    _admin(apiserver, read)
    [m] = found
    assert m["metadata"]["name"].startswith("kubevirt-migrate-vm-")
    assert m["spec"]["addedNodeSelector"] == {"z": "a"}
    assert f"migration {ns}/{m['metadata']['name']} of VMI vm-a created" in capsys.readouterr().out


def test_migrate_prints_the_api_refusal(
    apiserver: ThreadedServer,
    ns: str,
    nodes: tuple[str, str],
    unique: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A user who may read the VMI but not migrate it (migrations are the admin's)."""
    user = f"viewer-{unique}"
    _, kubeconfig = make_user(apiserver, user)
    binding = {
        "metadata": {"name": user},
        "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": "kubevirt.io:view"},
        "subjects": [{"apiGroup": RBAC, "kind": "User", "name": user}],
    }

    async def setup(c: Client) -> None:
        await put_vmi(c, ns, "vm-a", nodes[0])
        await c.request("POST", f"/apis/{RBAC}/v1/namespaces/{ns}/rolebindings", binding)

    _admin(apiserver, setup)
    code = main(["migrate", "vm-a", "-n", ns, "--no-wait", "--kubeconfig", str(kubeconfig)])
    assert code == 2
    assert (
        f'vmo migrate: virtualmachineinstancemigrations.kubevirt.io is forbidden: User "{user}" '
        'cannot create resource "virtualmachineinstancemigrations"'
    ) in capsys.readouterr().out


def test_migrate_of_a_missing_vmi_is_refused(
    apiserver: ThreadedServer, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vmo(apiserver, "migrate", "ghost", "-n", ns) == 2
    assert f'VirtualMachineInstance "{ns}/ghost" not found' in capsys.readouterr().out


async def test_migrate_follows_the_phases_to_success(
    client: Client, ns: str, nodes: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    node, other = nodes
    await put_vmi(client, ns, "vm-a", node, strategy="LiveMigrate", migratable=True)
    follow = asyncio.create_task(maintenance.migrate(client, ns, "vm-a", timeout=20, poll=FAST))
    [m] = await until(lambda: migrations_of(client, ns, "vm-a"))
    state = {"sourceNode": node, "targetNode": other}
    await client.patch_status(VMIM, m["metadata"]["name"], {"phase": "Scheduling"}, ns)
    await asyncio.sleep(FAST * 4)  # so the follower sees this phase before the next
    running = {"phase": "Running", "migrationState": state}
    await client.patch_status(VMIM, m["metadata"]["name"], running, ns)
    await asyncio.sleep(FAST * 4)
    await finish(client, m, "Succeeded", target=other)
    assert await follow == 0
    out = capsys.readouterr().out
    assert "  Scheduling\n" in out
    assert f"  Running          {node} -> {other}\n" in out
    assert f"  Succeeded        {node} -> {other}\n" in out
    assert f"VMI vm-a migrated {node} -> {other} in " in out


async def test_migrate_reports_a_failure_and_exits_1(
    client: Client, ns: str, nodes: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    await put_vmi(client, ns, "vm-a", nodes[0], strategy="LiveMigrate", migratable=True)
    follow = asyncio.create_task(maintenance.migrate(client, ns, "vm-a", timeout=20, poll=FAST))
    [m] = await until(lambda: migrations_of(client, ns, "vm-a"))
    await finish(client, m, "Failed", message="migration timed out")
    assert await follow == 1
    assert "failed after" in (out := capsys.readouterr().out) and "migration timed out" in out


async def test_migrate_cancel_deletes_only_the_migrations_in_flight(
    client: Client, ns: str, nodes: tuple[str, str]
) -> None:
    await put_vmi(client, ns, "vm-a", nodes[0], strategy="LiveMigrate", migratable=True)
    body = maintenance.migration_body("vm-a")
    done = await client.create(VMIM, body, ns)
    await client.patch_status(VMIM, done["metadata"]["name"], {"phase": "Failed"}, ns)
    running = await client.create(VMIM, body, ns)
    assert await maintenance.cancel_migration(client, ns, "vm-a") == 0
    assert await client.find(VMIM, running["metadata"]["name"], ns) is None
    assert await client.find(VMIM, done["metadata"]["name"], ns) is not None
    assert await maintenance.cancel_migration(client, ns, "vm-a") == 1


def test_ctrl_c_says_the_drain_can_be_resumed_or_undone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def interrupted(_: Client) -> int:
        raise KeyboardInterrupt

    creds = Credentials(server="https://127.0.0.1:1")
    hint = maintenance.drain_interrupted("node-1")
    assert maintenance.run(creds, interrupted, on_interrupt=hint) == maintenance.INTERRUPTED
    out = capsys.readouterr().out
    assert "node/node-1 stays cordoned and migrations in flight continue" in out
    assert "`vmo node drain node-1` resumes, `vmo node uncordon node-1` undoes" in out


def test_a_refused_drain_prints_the_status_message(
    apiserver: ThreadedServer,
    nodes: tuple[str, str],
    unique: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, kubeconfig = make_user(apiserver, f"nobody-{unique}")
    code = main(["node", "drain", nodes[0], "--kubeconfig", str(kubeconfig)])
    assert code == 2
    assert f'vmo: nodes "{nodes[0]}" is forbidden: User "nobody-{unique}"' in (
        capsys.readouterr().out
    )
