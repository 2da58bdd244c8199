"""The migration controller: configuration resolution, every phase transition of decide(), and
the shell against the real API server with the node agents played by hand."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vmo.client import EVENT, NAMESPACE, NODE, VMI, VMIM, Client
from vmo.engine.virtcontroller.migration import (
    FINALIZER,
    PENDING_TIMEOUT_ANNOTATION,
    TARGET_NODE_LABEL,
    UNSCHEDULABLE_TIMEOUT_ANNOTATION,
    MigrationController,
    MigrationDecision,
    decide,
    target_candidate,
    target_pod_name,
)
from vmo.engine.virtcontroller.migrationconfig import (
    DEFAULT_CONFIG,
    DEFAULTS,
    MIGRATIONPOLICY,
    MigrationConfig,
    MigrationConfigError,
    match_policy,
    resolve_migration_config,
)
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
T0 = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
NOW = T0 + timedelta(seconds=10)


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- builders --------------------------------------------------------------------------------------


def a_node(name: str, *, memory: str = "4Gi", labels: JSON | None = None) -> JSON:
    return {
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubevirt.io/schedulable": "true",
                **(labels or {}),
            },
        },
        "spec": {},
        "status": {
            "allocatable": {"cpu": "4", "memory": memory},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def a_vmi(
    name: str = "db",
    *,
    node: str = "n1",
    memory: str = "1Gi",
    labels: JSON | None = None,
    state: JSON | None = None,
    **spec: Any,
) -> JSON:
    status: JSON = {"phase": "Running", "nodeName": node}
    if state is not None:
        status["migrationState"] = state
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "resourceVersion": "7",
            "labels": labels or {},
        },
        "spec": {"domain": {"cpu": {"cores": 1}, "memory": {"guest": memory}}, **spec},
        "status": status,
    }


def a_vmim(
    name: str = "mig",
    *,
    vmi: str = "db",
    phase: str | None = None,
    created: datetime = T0,
    annotations: JSON | None = None,
    added: JSON | None = None,
    finalizers: list[str] | None = None,
    deleting: bool = False,
    entered: JSON | None = None,
) -> JSON:
    md: JSON = {
        "name": name,
        "namespace": "ns",
        "uid": f"uid-{name}",
        "creationTimestamp": stamp(created),
        "annotations": annotations or {},
        "finalizers": [FINALIZER] if finalizers is None else finalizers,
    }
    if deleting:
        md["deletionTimestamp"] = stamp(NOW)
    spec: JSON = {"vmiName": vmi}
    if added:
        spec["addedNodeSelector"] = added
    status: JSON = {}
    if phase:
        status["phase"] = phase
        transitions = entered or {phase: created}
        status["phaseTransitionTimestamps"] = [
            {"phase": p, "phaseTransitionTimestamp": stamp(t)} for p, t in transitions.items()
        ]
    return {"metadata": md, "spec": spec, "status": status}


def handed_off(vmim: JSON, vmi: JSON, **extra: Any) -> JSON:
    """``vmi`` with ``vmim`` handed off to n2, plus what the agents wrote (``extra``)."""
    state = {
        "migrationUid": vmim["metadata"]["uid"],
        "sourceNode": vmi["status"]["nodeName"],
        "targetNode": "n2",
        "targetPod": "virt-launcher-db-abcde",
        "mode": "PreCopy",
        **extra,
    }
    labels = {**vmi["metadata"]["labels"], TARGET_NODE_LABEL: "n2"}
    return {
        **vmi,
        "metadata": {**vmi["metadata"], "labels": labels},
        "status": {**vmi["status"], "migrationState": state},
    }


NODES = [a_node("n1"), a_node("n2")]


def run(
    vmim: JSON,
    vmi: JSON | None,
    *,
    nodes: list[JSON] | None = None,
    vmis: list[JSON] | None = None,
    vmims: list[JSON] | None = None,
    config: MigrationConfig = DEFAULT_CONFIG,
    now: datetime = NOW,
) -> MigrationDecision:
    return decide(
        vmim,
        vmi,
        nodes=NODES if nodes is None else nodes,
        vmis=([vmi] if vmi else []) if vmis is None else vmis,
        vmims=[vmim] if vmims is None else vmims,
        config=config,
        now=now,
    )


def cond(status: JSON, ctype: str) -> JSON | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), None)


def reasons(decision: MigrationDecision) -> list[str]:
    return [e.reason for e in decision.events]


# --- configuration ---------------------------------------------------------------------------------


def a_policy(name: str, *, vmi: JSON | None = None, ns: JSON | None = None, **spec: Any) -> JSON:
    selectors: JSON = {}
    if vmi is not None:
        selectors["virtualMachineInstanceSelector"] = vmi
    if ns is not None:
        selectors["namespaceSelector"] = ns
    return {"metadata": {"name": name}, "spec": {"selectors": selectors, **spec}}


def test_defaults_without_a_kubevirt_cr_are_upstreams() -> None:
    config = resolve_migration_config(a_vmi(), kubevirt=None, policies=[], namespace_labels={})
    assert config.policy_name == ""
    assert config.configuration == DEFAULTS
    assert config.bandwidth_bytes_per_second == 0
    assert (
        config.parallel_migrations_per_cluster,
        config.parallel_outbound_migrations_per_node,
    ) == (5, 2)
    assert config.configuration["maxDowntimeMs"] == 300


def test_kubevirt_cr_overrides_the_defaults() -> None:
    kv = {
        "spec": {
            "configuration": {
                "migrations": {"bandwidthPerMigration": "64Mi", "parallelMigrationsPerCluster": 1}
            }
        }
    }
    config = resolve_migration_config(a_vmi(), kubevirt=kv, policies=[], namespace_labels={})
    assert config.configuration["parallelMigrationsPerCluster"] == 1
    assert config.bandwidth_bytes_per_second == 64 * 2**20
    assert config.configuration["completionTimeoutPerGiB"] == 150


def test_a_bad_quantity_names_its_field() -> None:
    kv = {"spec": {"configuration": {"migrations": {"bandwidthPerMigration": "fast"}}}}
    with pytest.raises(MigrationConfigError, match=r"migrations\.bandwidthPerMigration"):
        resolve_migration_config(a_vmi(), kubevirt=kv, policies=[], namespace_labels={})


def test_matching_policy_overrides_and_is_named() -> None:
    policy = a_policy(
        "fast", vmi={"tier": "gold"}, ns={"team": "a"}, allowAutoConverge=True, maxDowntimeMs=50
    )
    config = resolve_migration_config(
        a_vmi(labels={"tier": "gold"}),
        kubevirt=None,
        policies=[policy],
        namespace_labels={"team": "a"},
    )
    assert config.policy_name == "fast"
    assert config.configuration["allowAutoConverge"] is True
    assert config.configuration["maxDowntimeMs"] == 50


@pytest.mark.parametrize(
    ("vmi_labels", "ns_labels"),
    [({"tier": "silver"}, {"team": "a"}), ({"tier": "gold"}, {"team": "b"}), ({}, {"team": "a"})],
)
def test_every_selector_pair_must_match(vmi_labels: JSON, ns_labels: JSON) -> None:
    policy = a_policy("p", vmi={"tier": "gold"}, ns={"team": "a"})
    assert match_policy([policy], vmi_labels, ns_labels) is None


def test_the_policy_matching_most_labels_wins() -> None:
    policies = [
        a_policy("a-broad", vmi={"tier": "gold"}),
        a_policy("z-narrow", vmi={"tier": "gold"}, ns={"team": "a"}),
    ]
    best = match_policy(policies, {"tier": "gold"}, {"team": "a"})
    assert best is not None and best["metadata"]["name"] == "z-narrow"


def test_equal_totals_prefer_vmi_labels_then_name_order() -> None:
    by_ns = a_policy("a-ns", ns={"team": "a"})
    by_vmi = a_policy("b-vmi", vmi={"tier": "gold"})
    also_vmi = a_policy("a-vmi", vmi={"app": "db"})
    best = match_policy([by_ns, by_vmi], {"tier": "gold"}, {"team": "a"})
    assert best is not None and best["metadata"]["name"] == "b-vmi"
    best = match_policy([by_vmi, also_vmi], {"tier": "gold", "app": "db"}, {})
    assert best is not None and best["metadata"]["name"] == "a-vmi"


def test_empty_selectors_match_everything_with_the_lowest_priority() -> None:
    catch_all = a_policy("all")
    specific = a_policy("gold", vmi={"tier": "gold"})
    best = match_policy([catch_all, specific], {"tier": "gold"}, {})
    assert best is not None and best["metadata"]["name"] == "gold"
    best = match_policy([catch_all, specific], {}, {})
    assert best is not None and best["metadata"]["name"] == "all"


def test_post_copy_in_a_policy_implies_workload_disruption() -> None:
    policy = a_policy("pc", allowPostCopy=True)
    config = resolve_migration_config(
        a_vmi(), kubevirt=None, policies=[policy], namespace_labels={}
    )
    assert config.configuration["allowWorkloadDisruption"] is True


# --- Pending and parallelism -----------------------------------------------------------------------


def test_a_new_migration_goes_pending_and_gets_the_finalizer() -> None:
    decision = run(a_vmim(finalizers=[]), a_vmi())
    assert decision.status["phase"] == "Pending"
    assert decision.status["phaseTransitionTimestamps"] == [
        {"phase": "Pending", "phaseTransitionTimestamp": stamp(NOW)}
    ]
    assert decision.add_finalizer and not decision.remove_finalizer


def test_pending_moves_to_scheduling_when_there_is_room() -> None:
    decision = run(a_vmim(phase="Pending"), a_vmi())
    assert decision.status["phase"] == "Scheduling"
    assert [t["phase"] for t in decision.status["phaseTransitionTimestamps"]] == [
        "Pending",
        "Scheduling",
    ]


def in_flight(count: int, *, node: str) -> tuple[list[JSON], list[JSON]]:
    vmis = [a_vmi(f"busy{node}{i}", node=node) for i in range(count)]
    vmims = [a_vmim(f"m{node}{i}", vmi=f"busy{node}{i}", phase="Running") for i in range(count)]
    return vmis, vmims


def test_the_cluster_limit_keeps_a_migration_pending() -> None:
    config = MigrationConfig({**DEFAULTS, "parallelOutboundMigrationsPerNode": 10})
    vmis, vmims = in_flight(5, node="n3")
    mine = a_vmim(phase="Pending")
    decision = run(mine, a_vmi(), vmis=[*vmis, a_vmi()], vmims=[*vmims, mine], config=config)
    assert decision.status["phase"] == "Pending"
    assert decision.requeue_after == 5.0


def test_the_outbound_limit_counts_per_source_node() -> None:
    vmis, vmims = in_flight(2, node="n1")
    from_n1, from_n2 = (
        a_vmim("a", vmi="db", phase="Pending"),
        a_vmim("b", vmi="web", phase="Pending"),
    )
    everything = dict(
        vmis=[*vmis, a_vmi("db"), a_vmi("web", node="n2")], vmims=[*vmims, from_n1, from_n2]
    )
    assert run(from_n1, a_vmi("db"), **everything).status["phase"] == "Pending"
    assert run(from_n2, a_vmi("web", node="n2"), **everything).status["phase"] == "Scheduling"


def test_the_oldest_pending_migration_gets_the_last_slot() -> None:
    vmis, vmims = in_flight(4, node="n3")
    config = MigrationConfig({**DEFAULTS, "parallelOutboundMigrationsPerNode": 10})
    older = a_vmim("old", vmi="db", phase="Pending", created=T0)
    newer = a_vmim("new", vmi="web", phase="Pending", created=T0 + timedelta(seconds=1))
    everything = dict(
        vmis=[*vmis, a_vmi("db"), a_vmi("web")], vmims=[*vmims, newer, older], config=config
    )
    assert run(newer, a_vmi("web"), **everything).status["phase"] == "Pending"
    assert run(older, a_vmi("db"), **everything).status["phase"] == "Scheduling"


def test_a_vmi_another_migration_owns_refuses_a_second() -> None:
    other = a_vmim("other", phase="Running")
    vmi = handed_off(other, a_vmi())
    mine = a_vmim("mine", finalizers=[])
    decision = run(mine, vmi, vmims=[other, mine])
    assert decision.status["phase"] == "Failed"
    assert reasons(decision) == ["FailedMigration"]


# --- Scheduling ------------------------------------------------------------------------------------


def test_scheduling_hands_the_migration_to_the_vmi() -> None:
    config = MigrationConfig({**DEFAULTS, "allowAutoConverge": True}, "fast")
    vmim = a_vmim(phase="Scheduling")
    decision = run(vmim, a_vmi(), config=config)
    state = {
        "migrationUid": "uid-mig",
        "sourceNode": "n1",
        "targetNode": "n2",
        "targetPod": target_pod_name("db", "uid-mig"),
        "migrationConfiguration": {**DEFAULTS, "allowAutoConverge": True},
        "migrationPolicyName": "fast",
        "mode": "PreCopy",
    }
    assert decision.vmi_patch == {
        "metadata": {"labels": {TARGET_NODE_LABEL: "n2"}},
        "status": {"migrationState": state},
    }
    assert decision.guard_vmi
    assert decision.status["phase"] == "Scheduled"
    assert decision.status["migrationState"] == state


def test_target_pod_name_looks_generated_and_is_stable() -> None:
    name = target_pod_name("db", "uid-1")
    assert name == target_pod_name("db", "uid-1") != target_pod_name("db", "uid-2")
    assert name.startswith("virt-launcher-db-") and len(name) == len("virt-launcher-db-") + 5


def test_a_new_handoff_replaces_the_old_migration_state_whole() -> None:
    old = {"migrationUid": "uid-old", "completed": True, "targetNodeAddress": "127.0.0.1"}
    decision = run(a_vmim(phase="Scheduling"), a_vmi(state=old))
    assert decision.vmi_patch is not None
    patched = decision.vmi_patch["status"]["migrationState"]
    assert patched["completed"] is None and patched["targetNodeAddress"] is None
    assert patched["migrationUid"] == "uid-mig"
    assert "completed" not in decision.status["migrationState"]


def test_the_source_node_is_never_the_target() -> None:
    decision = run(a_vmim(phase="Scheduling"), a_vmi(), nodes=[a_node("n1")])
    assert decision.status["phase"] == "Scheduling"
    scheduled = cond(decision.status, "PodScheduled")
    assert scheduled is not None
    assert scheduled["message"] == (
        "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    )
    assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")
    assert reasons(decision) == ["migrationTargetPodUnschedulable"]
    assert decision.vmi_patch is None


def test_added_node_selector_is_honoured() -> None:
    nodes = [a_node("n1"), a_node("n2"), a_node("n3", labels={"rack": "b"})]
    vmim = a_vmim(phase="Scheduling", added={"rack": "b"})
    decision = run(vmim, a_vmi(), nodes=nodes)
    assert decision.status["migrationState"]["targetNode"] == "n3"


def test_existing_required_affinity_terms_each_refuse_the_source() -> None:
    term = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [term, copy.deepcopy(term)]
            }
        }
    }
    candidate = target_candidate(a_vmi(affinity=affinity), a_vmim(added={"rack": "b"}))
    terms = candidate["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert len(terms) == 2
    for t in terms:
        assert t["matchExpressions"][-1] == {
            "key": "kubernetes.io/hostname",
            "operator": "NotIn",
            "values": ["n1"],
        }
    assert candidate["spec"]["nodeSelector"] == {"rack": "b"}
    assert candidate["metadata"]["uid"] == "uid-db"


def test_the_migrating_vmi_counts_on_its_source_only() -> None:
    # 3Gi of guest fits n2 once; counted there as well as requested it would not
    vmi = a_vmi(memory="3Gi")
    decision = run(a_vmim(phase="Scheduling"), vmi)
    assert decision.status["migrationState"]["targetNode"] == "n2"


def test_other_migration_targets_hold_their_memory() -> None:
    other = a_vmim("other", vmi="web", phase="Running")
    web = handed_off(other, a_vmi("web", node="n3", memory="3Gi"))
    nodes = [a_node("n1"), a_node("n2")]
    decision = run(
        a_vmim(phase="Scheduling"),
        a_vmi(memory="2Gi"),
        nodes=nodes,
        vmis=[web, a_vmi(memory="2Gi")],
    )
    scheduled = cond(decision.status, "PodScheduled")
    assert scheduled is not None and "Insufficient memory" in scheduled["message"]


def test_unschedulable_migration_fails_after_its_timeout() -> None:
    vmim = a_vmim(phase="Scheduling", annotations={UNSCHEDULABLE_TIMEOUT_ANNOTATION: "60"})
    waiting = run(vmim, a_vmi(), nodes=[a_node("n1")], now=T0 + timedelta(seconds=59))
    assert waiting.status["phase"] == "Scheduling"
    assert waiting.requeue_after == pytest.approx(1.0)
    failed = run(vmim, a_vmi(), nodes=[a_node("n1")], now=T0 + timedelta(seconds=60))
    assert failed.status["phase"] == "Failed"
    failure = cond(failed.status, "Failed")
    assert failure is not None and "unschedulable for 60s" in failure["message"]
    assert failed.remove_finalizer


def test_unschedulable_timeout_defaults_to_five_minutes() -> None:
    vmim = a_vmim(phase="Scheduling")
    assert (
        run(vmim, a_vmi(), nodes=[a_node("n1")], now=T0 + timedelta(seconds=299)).status["phase"]
        == "Scheduling"
    )
    assert (
        run(vmim, a_vmi(), nodes=[a_node("n1")], now=T0 + timedelta(seconds=300)).status["phase"]
        == "Failed"
    )


def test_a_lost_status_write_after_handoff_does_not_place_again() -> None:
    vmim = a_vmim(phase="Scheduling")
    decision = run(vmim, handed_off(vmim, a_vmi()))
    assert decision.status["phase"] == "Scheduled"
    assert decision.vmi_patch is None


# --- after the handoff -----------------------------------------------------------------------------


def test_scheduled_moves_straight_to_preparing_target() -> None:
    vmim = a_vmim(phase="Scheduled")
    assert run(vmim, handed_off(vmim, a_vmi())).status["phase"] == "PreparingTarget"


def test_target_ready_once_the_target_agent_reports_its_address() -> None:
    vmim = a_vmim(phase="PreparingTarget")
    vmi = handed_off(vmim, a_vmi())
    assert run(vmim, vmi).status["phase"] == "PreparingTarget"
    ready = handed_off(vmim, a_vmi(), targetNodeAddress="127.0.0.1", targetNodeDomainDetected=True)
    decision = run(vmim, ready)
    assert decision.status["phase"] == "TargetReady"
    assert decision.status["migrationState"]["targetNodeAddress"] == "127.0.0.1"


def test_a_target_that_never_gets_ready_fails_the_migration_on_the_vmi_too() -> None:
    vmim = a_vmim(
        phase="PreparingTarget",
        annotations={PENDING_TIMEOUT_ANNOTATION: "30"},
        entered={"Scheduling": T0, "PreparingTarget": T0},
    )
    vmi = handed_off(vmim, a_vmi())
    waiting = run(vmim, vmi, now=T0 + timedelta(seconds=20))
    assert waiting.status["phase"] == "PreparingTarget"
    assert waiting.requeue_after == pytest.approx(10.0)
    failed = run(vmim, vmi, now=T0 + timedelta(seconds=30))
    assert failed.status["phase"] == "Failed"
    assert failed.vmi_patch is not None
    state = failed.vmi_patch["status"]["migrationState"]
    assert state["failed"] is True and "did not become ready within 30s" in state["failureReason"]
    assert state["endTimestamp"] == stamp(T0 + timedelta(seconds=30))
    assert failed.vmi_patch["metadata"]["labels"] == {TARGET_NODE_LABEL: None}
    assert failed.status["migrationState"]["failed"] is True


def test_pending_timeout_defaults_to_fifteen_minutes() -> None:
    vmim = a_vmim(phase="PreparingTarget", entered={"Scheduling": T0})
    vmi = handed_off(vmim, a_vmi())
    assert run(vmim, vmi, now=T0 + timedelta(seconds=899)).status["phase"] == "PreparingTarget"
    assert run(vmim, vmi, now=T0 + timedelta(seconds=900)).status["phase"] == "Failed"


def test_running_once_the_source_starts() -> None:
    vmim = a_vmim(phase="TargetReady")
    vmi = handed_off(vmim, a_vmi(), targetNodeAddress="127.0.0.1", startTimestamp=stamp(NOW))
    decision = run(vmim, vmi)
    assert decision.status["phase"] == "Running"
    assert decision.status["migrationState"]["startTimestamp"] == stamp(NOW)


def test_succeeded_when_the_vmi_says_completed() -> None:
    vmim = a_vmim(phase="Running")
    vmi = handed_off(
        vmim, a_vmi(), startTimestamp=stamp(T0), completed=True, endTimestamp=stamp(NOW)
    )
    vmi["status"]["nodeName"] = "n2"
    decision = run(vmim, vmi)
    assert decision.status["phase"] == "Succeeded"
    assert reasons(decision) == ["SuccessfulMigration"]
    assert decision.vmi_patch == {"metadata": {"labels": {TARGET_NODE_LABEL: None}}}
    assert decision.status["migrationState"]["completed"] is True
    assert decision.remove_finalizer and decision.requeue_after is None


def test_failed_copies_the_failure_reason() -> None:
    vmim = a_vmim(phase="Running")
    vmi = handed_off(vmim, a_vmi(), failed=True, failureReason="migration stream cut")
    decision = run(vmim, vmi)
    assert decision.status["phase"] == "Failed"
    failure = cond(decision.status, "Failed")
    assert failure is not None and failure["message"] == "migration stream cut"
    assert decision.status["migrationState"]["failureReason"] == "migration stream cut"
    assert reasons(decision) == ["FailedMigration"]
    assert decision.vmi_patch == {"metadata": {"labels": {TARGET_NODE_LABEL: None}}}


def test_phase_transitions_are_appended() -> None:
    vmim = a_vmim(phase="Running", entered={"Pending": T0, "Running": T0})
    vmi = handed_off(vmim, a_vmi(), completed=True)
    transitions = run(vmim, vmi).status["phaseTransitionTimestamps"]
    assert [t["phase"] for t in transitions] == ["Pending", "Running", "Succeeded"]


def test_a_vmi_gone_fails_the_migration() -> None:
    decision = run(a_vmim(phase="Running"), None)
    assert decision.status["phase"] == "Failed"
    assert decision.events[0].message == "Migration failed because vmi does not exist."
    assert decision.vmi_patch is None and decision.remove_finalizer


def test_a_final_migration_only_cleans_up() -> None:
    vmim = a_vmim(phase="Succeeded")
    vmi = handed_off(vmim, a_vmi(), completed=True)
    decision = run(vmim, vmi)
    assert decision.status["phase"] == "Succeeded" and not decision.events
    assert decision.vmi_patch == {"metadata": {"labels": {TARGET_NODE_LABEL: None}}}
    assert decision.remove_finalizer


# --- abort -----------------------------------------------------------------------------------------


def test_deleting_a_migration_not_handed_off_fails_it_at_once() -> None:
    decision = run(a_vmim(phase="Pending", deleting=True), a_vmi())
    assert decision.status["phase"] == "Failed"
    abort = cond(decision.status, "migrationAbortRequested")
    assert abort is not None and abort["status"] == "True"
    assert decision.remove_finalizer and decision.vmi_patch is None


def test_deleting_a_handed_off_migration_asks_the_source_to_abort() -> None:
    vmim = a_vmim(phase="Running", deleting=True)
    vmi = handed_off(vmim, a_vmi(), startTimestamp=stamp(T0))
    decision = run(vmim, vmi)
    assert decision.vmi_patch == {"status": {"migrationState": {"abortRequested": True}}}
    assert decision.status["phase"] == "Running"
    assert not decision.remove_finalizer and not decision.add_finalizer
    assert reasons(decision) == ["SuccessfulAbortMigration"]

    aborted = handed_off(vmim, a_vmi(), abortRequested=True, abortStatus="Succeeded", failed=True)
    decision = run(vmim, aborted)
    assert decision.status["phase"] == "Failed"
    assert decision.remove_finalizer


def test_abort_is_requested_once() -> None:
    vmim = a_vmim(phase="Running", deleting=True)
    vmi = handed_off(vmim, a_vmi(), abortRequested=True)
    decision = run(vmim, vmi)
    assert decision.vmi_patch is None and not decision.events


# --- the shell against the API server --------------------------------------------------------------


async def eventually(probe: Callable[[], Awaitable[Any]], *, timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.05)


@pytest.fixture
async def client(apiserver: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(apiserver.kubeconfig) as c:
        yield c
    await asyncio.sleep(0.25)


@pytest.fixture
async def controller(client: Client) -> AsyncIterator[MigrationController]:
    stop = asyncio.Event()
    ctl = MigrationController(client)
    task = asyncio.create_task(ctl.run(stop))
    try:
        yield ctl
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def make_nodes(client: Client, unique: str) -> list[str]:
    names = [f"src-{unique}", f"dst-{unique}"]
    for name in names:
        labels = {
            "kubernetes.io/hostname": name,
            "kubevirt.io/schedulable": "true",
            "vmo.dev/test": unique,
        }
        await client.create(NODE, {"metadata": {"name": name, "labels": labels}})
        status = {
            "allocatable": {"cpu": "2", "memory": "4Gi"},
            "conditions": [{"type": "Ready", "status": "True"}],
        }
        await client.patch_status(NODE, name, status)
    return names


async def make_running_vmi(client: Client, ns: str, node: str, unique: str) -> JSON:
    vmi = {
        "metadata": {"name": "db", "namespace": ns},
        "spec": {
            # only this test's nodes fit, whatever else the shared server holds
            "nodeSelector": {"vmo.dev/test": unique},
            "domain": {"cpu": {"cores": 1}, "memory": {"guest": "128Mi"}, "devices": {}},
        },
    }
    await client.create(VMI, vmi)
    status = {
        "phase": "Running",
        "nodeName": node,
        "conditions": [{"type": "LiveMigratable", "status": "True"}],
    }
    return await client.patch(VMI, "db", {"status": status}, ns)


async def cleanup(client: Client, ns: str, nodes: list[str]) -> None:
    migrations, _ = await client.list(VMIM, ns)
    for m in migrations:
        await client.patch(VMIM, m["metadata"]["name"], {"metadata": {"finalizers": []}}, ns)
        await client.delete(VMIM, m["metadata"]["name"], ns)
    await client.delete(VMI, "db", ns)
    for name in nodes:
        await client.delete(NODE, name)
    await client.delete(NAMESPACE, ns)


async def test_a_migration_runs_its_phases_against_the_api_server(
    client: Client, controller: MigrationController, unique: str
) -> None:
    ns = f"mig-{unique}"
    await client.create(NAMESPACE, {"metadata": {"name": ns}})
    src, dst = await make_nodes(client, unique)
    try:
        await make_running_vmi(client, ns, src, unique)
        created = await client.create(
            VMIM, {"metadata": {"name": "m1", "namespace": ns}, "spec": {"vmiName": "db"}}
        )
        uid = created["metadata"]["uid"]

        async def vmim_phase(name: str, phase: str) -> JSON | None:
            got = await client.find(VMIM, name, ns)
            return got if got and got.get("status", {}).get("phase") == phase else None

        vmim = await eventually(lambda: vmim_phase("m1", "PreparingTarget"))
        assert "Scheduled" in [t["phase"] for t in vmim["status"]["phaseTransitionTimestamps"]]
        assert FINALIZER in vmim["metadata"]["finalizers"]
        vmi = await client.get(VMI, "db", ns)
        state = vmi["status"]["migrationState"]
        assert (state["migrationUid"], state["sourceNode"], state["targetNode"]) == (uid, src, dst)
        assert state["mode"] == "PreCopy" and state["targetPod"].startswith("virt-launcher-db-")
        assert state["migrationConfiguration"]["parallelMigrationsPerCluster"] == 5
        assert vmi["metadata"]["labels"][TARGET_NODE_LABEL] == dst
        assert vmim["status"]["migrationState"] == state

        # the target agent, then the source agent, as docs/migration.md has them write
        ready = {"targetNodeAddress": "127.0.0.1", "targetNodeDomainDetected": True}
        await client.patch(VMI, "db", {"status": {"migrationState": ready}}, ns)
        await eventually(lambda: vmim_phase("m1", "TargetReady"))
        start = {"startTimestamp": stamp(datetime.now(UTC))}
        await client.patch(VMI, "db", {"status": {"migrationState": start}}, ns)
        await eventually(lambda: vmim_phase("m1", "Running"))
        done = {"completed": True, "endTimestamp": stamp(datetime.now(UTC))}
        await client.patch(VMI, "db", {"status": {"migrationState": done, "nodeName": dst}}, ns)
        succeeded = await eventually(lambda: vmim_phase("m1", "Succeeded"))
        assert succeeded["status"]["migrationState"]["completed"] is True

        async def finalizer_gone() -> bool:
            got = await client.get(VMIM, "m1", ns)
            return FINALIZER not in (got["metadata"].get("finalizers") or [])

        await eventually(finalizer_gone)
        vmi = await client.get(VMI, "db", ns)
        assert TARGET_NODE_LABEL not in (vmi["metadata"].get("labels") or {})
        assert vmi["status"]["phase"] == "Running"  # the agents' keys were left alone

        # back again, and this time the source reports a failure
        await client.create(
            VMIM, {"metadata": {"name": "m2", "namespace": ns}, "spec": {"vmiName": "db"}}
        )
        await eventually(lambda: vmim_phase("m2", "PreparingTarget"))
        vmi = await client.get(VMI, "db", ns)
        assert vmi["status"]["migrationState"]["targetNode"] == src
        assert "completed" not in vmi["status"]["migrationState"]
        failure = {"failed": True, "failureReason": "QEMU said no"}
        await client.patch(VMI, "db", {"status": {"migrationState": failure}}, ns)
        failed = await eventually(lambda: vmim_phase("m2", "Failed"))
        failed_cond = cond(failed["status"], "Failed")
        assert failed_cond is not None and failed_cond["message"] == "QEMU said no"

        # a deleted migration in flight is aborted through the VMI and held until it is final
        await client.create(
            VMIM, {"metadata": {"name": "m3", "namespace": ns}, "spec": {"vmiName": "db"}}
        )
        await eventually(lambda: vmim_phase("m3", "PreparingTarget"))
        await client.delete(VMIM, "m3", ns)

        async def abort_requested() -> bool:
            got = await client.get(VMI, "db", ns)
            return bool(got["status"]["migrationState"].get("abortRequested"))

        await eventually(abort_requested)
        assert await client.find(VMIM, "m3", ns) is not None
        aborted = {"abortStatus": "Succeeded", "failed": True, "failureReason": "aborted"}
        await client.patch(VMI, "db", {"status": {"migrationState": aborted}}, ns)

        async def m3_gone() -> bool:
            return await client.find(VMIM, "m3", ns) is None

        await eventually(m3_gone)

        events, _ = await client.list(EVENT, ns)
        seen = {(e["involvedObject"]["name"], e["reason"]) for e in events}
        assert {
            ("m1", "SuccessfulMigration"),
            ("m2", "FailedMigration"),
            ("m3", "SuccessfulAbortMigration"),
        } <= seen
    finally:
        await cleanup(client, ns, [src, dst])


async def test_a_matching_migration_policy_reaches_the_vmi(
    client: Client, controller: MigrationController, unique: str
) -> None:
    ns = f"mig-{unique}"
    await client.create(NAMESPACE, {"metadata": {"name": ns, "labels": {"mig-test": unique}}})
    policy = {
        "metadata": {"name": f"policy-{unique}"},
        "spec": {
            "selectors": {"namespaceSelector": {"mig-test": unique}},
            "bandwidthPerMigration": "32Mi",
        },
    }
    await client.create(MIGRATIONPOLICY, policy)
    src, dst = await make_nodes(client, unique)
    try:
        await make_running_vmi(client, ns, src, unique)
        await client.create(
            VMIM, {"metadata": {"name": "m1", "namespace": ns}, "spec": {"vmiName": "db"}}
        )

        async def handed_off_state() -> JSON | None:
            got = await client.get(VMI, "db", ns)
            return got["status"].get("migrationState")

        state = await eventually(handed_off_state)
        assert state["migrationPolicyName"] == f"policy-{unique}"
        assert state["migrationConfiguration"]["bandwidthPerMigration"] == "32Mi"
    finally:
        await client.delete(MIGRATIONPOLICY, f"policy-{unique}")
        await cleanup(client, ns, [src, dst])
