"""Traces, the simulator and the peers it compares VMO's balancer with."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from vmo.controllers.balance.model import Node, Settings
from vmo.controllers.balance.peers import (
    KubeVirtRelieveAndMigrate,
    LowNodeUtilization,
    MigrationHistory,
)
from vmo.controllers.balance.simulator import ClusterState, UsageTable, VmoBalancer, replay
from vmo.controllers.balance.trace import (
    GENERATORS,
    Trace,
    TraceError,
    TraceVm,
    Usage,
    diurnal,
    dump,
    load,
    parse,
    to_json,
)

GIB = 1024**3


def minimal() -> dict[str, Any]:
    return {
        "version": 1,
        "stepSeconds": 60,
        "steps": 10,
        "nodes": [{"name": "n1", "cpu": 8, "memory": 16 * GIB}],
        "series": {"flat": [1.0]},
        "vms": [
            {
                "name": "ns/a",
                "requests": {"cpu": 2, "memory": 4 * GIB},
                "arrive": 0,
                "depart": None,
                "usage": {"cpu": {"base": 1, "series": "flat"}, "memory": 2 * GIB},
            }
        ],
    }


def test_a_minimal_trace_loads_and_round_trips(tmp_path: Path) -> None:
    trace = parse(minimal())
    assert trace.usage(trace.vms[0], 3) == (1.0, 2.0 * GIB)
    path = tmp_path / "t.json"
    dump(trace, path)
    assert to_json(load(path)) == to_json(trace)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.pop("stepSeconds"), "stepSeconds"),
        (lambda d: d["nodes"][0].update(cpu="eight"), "nodes[0].cpu"),
        (lambda d: d["vms"][0]["requests"].pop("memory"), "vms[0].requests.memory"),
        (lambda d: d["vms"][0].update(depart=0), "vms[0].depart"),
        (lambda d: d["vms"][0].update(node="n9"), "vms[0].node"),
        (lambda d: d["vms"][0]["usage"]["cpu"].update(series="x"), "vms[0].usage.cpu.series"),
        (lambda d: d["vms"][0]["usage"].update(memory=[1, -1]), "vms[0].usage.memory[1]"),
    ],
)
def test_trace_errors_name_the_field(change: Any, field: str) -> None:
    data = minimal()
    change(data)
    with pytest.raises(TraceError) as caught:
        parse(data)
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ":")


def test_a_file_that_is_not_json_is_a_trace_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{nope")
    with pytest.raises(TraceError, match="not JSON"):
        load(path)


def test_usage_forms_explicit_compact_and_bursts() -> None:
    series = {"s": (1.0, 2.0)}
    assert Usage(values=(1.0, 3.0)).at(7, 5, series) == 3.0
    assert Usage(values=(1.0, 3.0)).at(9, 5, series) == 3.0
    assert Usage(base=2.0, series="s", shift=1).at(0, 0, series) == 4.0
    assert Usage(base=2.0, bursts=((3, 5, 3.0),)).at(4, 0, series) == 6.0
    assert Usage(base=2.0, bursts=((3, 5, 3.0),)).at(5, 0, series) == 2.0


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_deterministic_for_a_seed(name: str) -> None:
    make = GENERATORS[name]
    one, again, other = make(3, vms=40), make(3, vms=40), make(4, vms=40)
    assert to_json(one) == to_json(again)
    assert to_json(one) != to_json(other)
    assert any(vm.arrive > 0 for vm in one.vms) and any(vm.depart for vm in one.vms)
    parse(json.loads(json.dumps(to_json(one))))  # what they make is a valid trace


def static_trace(*, steps: int = 600) -> Trace:
    """Six VMs packed on one of three nodes, with constant usage: one static imbalance."""
    nodes = tuple(Node(f"n{i}", 16, 64 * GIB) for i in range(3))
    vms = tuple(
        TraceVm(f"ns/v{i}", 2, 4 * GIB, 4 * GIB, 0, None, Usage(1.5 + i / 10), Usage(3 * GIB), "n0")
        for i in range(6)
    )
    return Trace(60, steps, nodes, vms, {}, "static")


def test_vmo_balances_a_static_trace_without_oscillating() -> None:
    trace = static_trace()
    result = replay(trace, VmoBalancer(Settings(threshold=5)))
    assert result.migrations >= 2
    assert max(result.moves_per_vm.values()) <= 2
    assert result.imbalance_converged < result.imbalance_per_step[0] / 3
    # after it settles nothing moves: the last half of the trace has a constant imbalance
    late = result.imbalance_per_step[len(result.imbalance_per_step) // 2 :]
    assert max(late) - min(late) < 1e-12


def test_vmo_places_arrivals_where_the_load_is_lowest() -> None:
    trace = static_trace(steps=5)
    late = TraceVm("ns/late", 2, 4 * GIB, 4 * GIB, 2, None, Usage(1.0), Usage(GIB))
    trace = Trace(60, 5, trace.nodes, (*trace.vms, late), {}, "arrival")
    state = ClusterState(trace, UsageTable(trace))
    for vm in trace.vms[:-1]:
        state.placement[vm.name] = "n0"
        state.history[vm.name] = deque([(1.0, 1.0 * GIB)])
    assert VmoBalancer().initial_node(late, state) in {"n1", "n2"}


def requests_trace(loads: dict[str, int], *, usage: float = 0.5) -> Trace:
    """Nodes of 10 cores; ``loads[node]`` one-core VMs on each."""
    nodes = tuple(Node(name, 10, 100 * GIB) for name in loads)
    vms = tuple(
        TraceVm(f"ns/{name}-{i}", 1, GIB, GIB, 0, None, Usage(usage), Usage(0.5 * GIB), name)
        for name, count in loads.items()
        for i in range(count)
    )
    return Trace(60, 20, nodes, vms, {}, "requests")


def state_of(trace: Trace, step: int = 1) -> ClusterState:
    table = UsageTable(trace)
    state = ClusterState(trace, table)
    for vm in trace.vms:
        if vm.node is not None:
            state.placement[vm.name] = vm.node
            state.history[vm.name] = deque([table.at[0][vm.name]])
    state.step = step
    return state


def test_lnu_does_nothing_when_no_node_is_underutilized() -> None:
    state = state_of(requests_trace({"a": 9, "b": 3, "c": 3}))
    assert LowNodeUtilization().cycle(state, 60.0) == []


def test_lnu_evicts_from_an_overutilized_node_to_the_underutilized_one() -> None:
    state = state_of(requests_trace({"a": 9, "b": 4, "c": 0}))
    moves = LowNodeUtilization().cycle(state, 60.0)
    # a is at 90 % of CPU requests: it sheds until it is at or below 50 %
    assert len(moves) == 4
    assert {m.source for m in moves} == {"a"} and {m.target for m in moves} == {"c"}


def test_relieve_and_migrate_respects_2_per_node_and_5_per_cycle() -> None:
    loads = {"a": 9, "b": 9, "c": 9, "d": 1, "e": 1, "f": 1}
    trace = requests_trace(loads, usage=0.9)
    peer = KubeVirtRelieveAndMigrate()
    moves = peer.cycle(state_of(trace), 60.0)
    assert len(moves) == 5
    per_source: dict[str, int] = {}
    for move in moves:
        per_source[move.source] = per_source.get(move.source, 0) + 1
    assert max(per_source.values()) == 2


def test_relieve_and_migrate_does_nothing_within_10_points_of_the_mean() -> None:
    state = state_of(requests_trace({"a": 5, "b": 5, "c": 4}))
    assert KubeVirtRelieveAndMigrate().cycle(state, 60.0) == []


def test_migration_aware_cooldown_doubles_per_recent_migration() -> None:
    history = MigrationHistory()
    history.record("ns/v", 0.0)
    assert not history.allows("ns/v", 899.0) and history.allows("ns/v", 900.0)
    history.record("ns/v", 900.0)
    assert not history.allows("ns/v", 900.0 + 1799) and history.allows("ns/v", 900.0 + 1800)


def test_a_day_of_diurnal_load_replays_for_every_balancer() -> None:
    trace = diurnal(1, nodes=6, vms=60, steps=240)
    table = UsageTable(trace)
    for balancer in (VmoBalancer(), LowNodeUtilization(), KubeVirtRelieveAndMigrate()):
        result = replay(trace, balancer, table=table)
        assert len(result.imbalance_per_step) == 240
        assert 0 <= result.imbalance < 0.5 and result.worst_converged >= 0
        assert result.bytes_moved >= 0 and result.refused == 0
