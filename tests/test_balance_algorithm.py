"""The balancer's decision engine: what it moves, what it refuses to, and why."""

from __future__ import annotations

import random

import pytest

from vmo.controllers.balance.algorithm import (
    COOLDOWN_MAX,
    COOLDOWN_MIN,
    Cooldowns,
    imbalance,
    rank_placement,
    recommend,
    smoothed,
    target_imbalance,
)
from vmo.controllers.balance.model import Node, Settings, Vm

GIB = 1024.0**3


def node(name: str, *, cpu: float = 16, memory: float = 64 * GIB, **kw: object) -> Node:
    return Node(name, cpu, memory, **kw)  # type: ignore[arg-type]


def vm(key: str, on: str, *, cpu: float = 2.0, memory: float = 4 * GIB, **kw: object) -> Vm:
    fields: dict[str, object] = {
        "cpu_request": cpu,
        "memory_request": memory,
        "memory_to_copy": memory,
    }
    fields.update(kw)
    return Vm(key, on, cpu, memory, **fields)  # type: ignore[arg-type]


def hot_and_cold(count: int = 6) -> tuple[list[Node], list[Vm]]:
    """Two nodes: ``a`` holds ``count`` busy VMs, ``b`` is empty."""
    return [node("a"), node("b")], [vm(f"ns/v{i}", "a") for i in range(count)]


def test_a_hot_node_sheds_load_to_a_cold_one() -> None:
    nodes, vms = hot_and_cold()
    plan = recommend(nodes, vms, Settings())
    assert plan.recommendations
    assert all(r.source == "a" and r.target == "b" for r in plan.recommendations)
    assert plan.imbalance_after < plan.imbalance
    first = plan.recommendations[0]
    assert first.rule == "LoadBalance" and 2 <= first.priority <= 3
    assert first.memory_bytes == 4 * GIB
    assert first.seconds == pytest.approx(4 * GIB / 100e6)
    assert "a is at" in first.reason and "b" in first.reason


def test_moves_respect_the_per_node_limit_counting_source_and_target() -> None:
    nodes, vms = hot_and_cold(10)
    plan = recommend(nodes, vms, Settings(max_per_node=2, max_total=5))
    assert len(plan.recommendations) == 2


def test_moves_respect_the_total_limit() -> None:
    nodes = [node("a", cpu=64, memory=256 * GIB)] + [node(f"b{i}") for i in range(6)]
    vms = [vm(f"ns/v{i}", "a") for i in range(20)]
    plan = recommend(nodes, vms, Settings(max_per_node=10, max_total=3))
    assert len(plan.recommendations) == 3


def test_requests_must_fit_the_targets_allocatable() -> None:
    # b's usage is low but its requests are full: nothing may land there
    nodes = [node("a"), node("b")]
    idle = vm("ns/idle", "b", cpu=0.0, memory=0.0, cpu_request=16.0, memory_request=8 * GIB)
    vms = [vm(f"ns/v{i}", "a") for i in range(6)] + [idle]
    assert recommend(nodes, vms, Settings()).recommendations == ()


def test_usage_must_stay_under_the_headroom() -> None:
    nodes = [node("a"), node("b")]
    vms = [vm("ns/big", "a", cpu=12.0), vm("ns/other", "a", cpu=3.0)]
    # moving the big VM would put b at 75 % CPU, above a 70 % headroom; the small one fits
    plan = recommend(nodes, vms, Settings(headroom=0.7))
    assert [r.vm for r in plan.recommendations] == ["ns/other"]


def test_a_vm_moves_only_to_nodes_it_is_allowed_on() -> None:
    nodes = [node("a"), node("b"), node("c")]
    vms = [vm(f"ns/v{i}", "a", allowed=frozenset({"a", "c"})) for i in range(6)]
    plan = recommend(nodes, vms, Settings())
    assert plan.recommendations
    assert {r.target for r in plan.recommendations} == {"c"}


def test_anti_affinity_keeps_a_group_apart() -> None:
    nodes = [node("a"), node("b")]
    group = frozenset({"web"})
    vms = [vm(f"ns/v{i}", "a") for i in range(5)] + [vm("ns/peer", "b", anti_affinity=group)]
    vms.append(vm("ns/web", "a", cpu=4.0, anti_affinity=group))
    plan = recommend(nodes, vms, Settings())
    assert plan.recommendations
    assert "ns/web" not in {r.vm for r in plan.recommendations}


def test_unschedulable_nodes_take_nothing_and_are_evacuated_at_threshold_1() -> None:
    nodes = [node("a", schedulable=False), node("b"), node("c")]
    vms = [vm("ns/v0", "a"), vm("ns/v1", "b")]
    plan = recommend(nodes, vms, Settings(threshold=1))
    assert [(r.vm, r.target, r.rule, r.priority) for r in plan.recommendations] == [
        ("ns/v0", "c", "Evacuate", 1)
    ]


def test_a_constraint_violation_is_a_priority_1_move() -> None:
    nodes = [node("a"), node("b")]
    vms = [vm("ns/v0", "a", allowed=frozenset({"b"}))]
    plan = recommend(nodes, vms, Settings(threshold=1))
    (rec,) = plan.recommendations
    assert (rec.target, rec.rule, rec.priority) == ("b", "Constraint", 1)
    assert "not allowed on a" in rec.reason


def test_threshold_1_makes_no_load_balancing_moves() -> None:
    nodes, vms = hot_and_cold()
    plan = recommend(nodes, vms, Settings(threshold=1))
    assert plan.recommendations == ()
    assert "only mandatory" in plan.reason


def test_a_balanced_cluster_gets_an_empty_plan_with_a_reason() -> None:
    nodes = [node("a"), node("b")]
    vms = [vm("ns/v0", "a"), vm("ns/v1", "b")]
    plan = recommend(nodes, vms, Settings())
    assert plan.recommendations == ()
    assert plan.reason.startswith("balanced: imbalance 0.000")


def test_a_cluster_where_no_move_helps_gets_an_empty_plan_saying_so() -> None:
    # one huge VM per node, unequal: moving either only swaps which node is loaded
    nodes = [node("a"), node("b")]
    vms = [vm("ns/big", "a", cpu=12.0, memory=40 * GIB), vm("ns/small", "b", cpu=6.0)]
    plan = recommend(nodes, vms, Settings(threshold=5))
    assert plan.recommendations == ()
    assert plan.reason.startswith("no move lowers the imbalance")


def test_every_candidate_in_cooldown_is_the_reason() -> None:
    nodes, vms = hot_and_cold()
    cooldown = Cooldowns()
    for v in vms:
        cooldown.moved(v.key, 0.0, "b")
    plan = recommend(nodes, vms, Settings(), cooldown=cooldown, now=60.0)
    assert plan.recommendations == ()
    assert plan.reason.startswith("every candidate VM is in cooldown")


def test_a_vm_never_returns_to_the_node_it_just_left() -> None:
    # v0 left b a minute ago for a, which is now draining: it goes on to c, not back to b
    nodes = [node("a", schedulable=False), node("b"), node("c")]
    cooldown = Cooldowns()
    cooldown.moved("ns/v0", 0.0, "b")
    plan = recommend(nodes, [vm("ns/v0", "a")], Settings(), cooldown=cooldown, now=60.0)
    assert [r.target for r in plan.recommendations] == ["c"]


def test_invalid_settings_give_no_migrations_and_name_the_field() -> None:
    assert Settings(threshold=0).validate()[0][0] == "spec.migrationThreshold"
    assert Settings(threshold=6).validate()[0][0] == "spec.migrationThreshold"
    fields = {f for f, _ in Settings(resources=("cpu", "disk"), max_total=-1).validate()}
    assert fields == {"spec.resources[1]", "spec.limits.total"}
    assert Settings().validate() == []
    nodes, vms = hot_and_cold()
    plan = recommend(nodes, vms, Settings(threshold=7))
    assert plan.recommendations == ()
    assert "spec.migrationThreshold" in plan.reason


def test_network_is_weighed_only_where_measured() -> None:
    nodes, vms = hot_and_cold()
    plan = recommend(nodes, vms, Settings(resources=("cpu", "memory", "network")))
    assert plan.notes and "network is not weighed" in plan.notes[0]
    assert plan.recommendations


def test_the_target_follows_drs_shape() -> None:
    assert target_imbalance(1, 12) == float("inf")
    assert target_imbalance(2, 12) > target_imbalance(3, 12) > target_imbalance(4, 12)
    assert target_imbalance(3, 48) < target_imbalance(3, 12)


def test_a_higher_threshold_balances_at_least_as_far() -> None:
    rng = random.Random(7)
    nodes = [node(f"n{i}") for i in range(6)]
    vms = [
        vm(
            f"ns/v{i}",
            f"n{rng.randrange(3)}",
            cpu=rng.uniform(0.2, 2),
            memory=rng.uniform(1, 4) * GIB,
        )
        for i in range(30)
    ]
    afters = [
        recommend(nodes, vms, Settings(threshold=t, max_total=50, max_per_node=50)).imbalance_after
        for t in (2, 3, 4, 5)
    ]
    assert afters == sorted(afters, reverse=True)
    assert afters[-1] < imbalance(nodes, vms, Settings())


def test_cooldown_doubles_while_a_vm_keeps_moving_capped_at_6h() -> None:
    cooldown = Cooldowns()
    now, seen = 0.0, []
    for _ in range(8):
        assert cooldown.allows("ns/v", now)
        seconds = cooldown.moved("ns/v", now, "a")
        seen.append(seconds)
        assert not cooldown.allows("ns/v", now + seconds - 1)
        now += seconds  # moves again as soon as allowed: it keeps moving
    assert seen[:4] == [COOLDOWN_MIN, 2 * COOLDOWN_MIN, 4 * COOLDOWN_MIN, 8 * COOLDOWN_MIN]
    assert seen[-1] == COOLDOWN_MAX == 6 * 3600


def test_cooldown_resets_after_a_quiet_period() -> None:
    cooldown = Cooldowns()
    cooldown.moved("ns/v", 0.0)
    second = cooldown.moved("ns/v", COOLDOWN_MIN)
    assert second == 2 * COOLDOWN_MIN
    assert cooldown.moved("ns/v", COOLDOWN_MIN + 2 * second) == COOLDOWN_MIN


def test_cooldowns_round_trip_through_a_plain_dict() -> None:
    cooldown = Cooldowns()
    cooldown.moved("ns/v", 100.0, "a")
    again = Cooldowns.from_dict(cooldown.to_dict())
    assert again.to_dict() == cooldown.to_dict()
    assert not again.allows("ns/v", 200.0) and again.left("ns/v", 200.0) == "a"


def test_placement_ranks_the_emptiest_feasible_node_first() -> None:
    nodes = [node("a"), node("b"), node("c", schedulable=False)]
    vms = [vm("ns/v0", "a"), vm("ns/v1", "a"), vm("ns/v2", "b")]
    ranked = rank_placement(vm("ns/new", ""), nodes, vms, Settings())
    assert [name for name, _ in ranked] == ["b", "a"]
    assert ranked[0][1] <= ranked[1][1]


def test_placement_leaves_out_nodes_the_vm_cannot_use() -> None:
    nodes = [node("a"), node("b")]
    new = vm("ns/new", "", allowed=frozenset({"a"}))
    assert [name for name, _ in rank_placement(new, nodes, [], Settings())] == ["a"]
    huge = vm("ns/huge", "", cpu=32.0)
    assert rank_placement(huge, nodes, [], Settings()) == []


def test_smoothed_is_a_nearest_rank_percentile() -> None:
    assert smoothed([]) == 0.0
    assert smoothed([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 80) == 8
    assert smoothed([5.0], 80) == 5.0
