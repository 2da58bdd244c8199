"""Replays a cluster trace through a balancer and measures how balanced the cluster stays.

Each step: departing VMs stop; arriving VMs are placed (at the node the trace records, else
where the balancer's ``initial_node`` says; a VM nothing can hold waits and is retried each
step); usage advances; every ``cycle_steps`` steps (5 min of one-minute steps by default, the
descheduler chart's ``deschedulingInterval``) the balancer's ``cycle`` returns moves, which are
applied at once (a move whose target cannot hold the VM's requests is refused, as the
scheduler would) and each counts the VM's memory size as bytes moved.

One metric for every balancer, whatever it weighs itself: per step, the *imbalance* is the mean
of the population standard deviations, across schedulable nodes, of CPU utilisation and of
memory utilisation (actual usage over allocatable); a node's *load* is the mean of its CPU and
memory utilisation. *After convergence* means the last 50 % of the trace; there the *worst
node above the mean* is the largest excess of a node's load over the mean load, each node's
load averaged over one cycle (a balancer acts once a cycle, so a spike shorter than that is
nobody's to prevent).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vmo.controllers.balance.algorithm import Cooldowns, rank_placement, recommend, smoothed
from vmo.controllers.balance.model import Node, Plan, Settings, Vm
from vmo.controllers.balance.trace import Trace, TraceVm

SMOOTHING_STEPS = 15
SMOOTHING_PERCENTILE = 80.0


@dataclass(frozen=True)
class Move:
    """A live migration a balancer asks for."""

    vm: str
    source: str
    target: str


class ClusterState:
    """What a balancer may look at: nodes, where VMs run, their usage now and recently."""

    def __init__(self, trace: Trace, table: UsageTable) -> None:
        self.trace = trace
        self.table = table
        self.nodes: tuple[Node, ...] = trace.nodes
        self.step = 0
        self.placement: dict[str, str] = {}
        self.specs: dict[str, TraceVm] = {vm.name: vm for vm in trace.vms}
        self.history: dict[str, deque[tuple[float, float]]] = {}

    @property
    def now(self) -> float:
        return self.step * self.trace.step_seconds

    def running(self) -> list[TraceVm]:
        return [self.specs[name] for name in sorted(self.placement)]

    def _vm(self, spec: TraceVm, cpu: float, memory: float, node: str) -> Vm:
        return Vm(
            key=spec.name,
            node=node,
            cpu=cpu,
            memory=memory,
            cpu_request=spec.cpu_request,
            memory_request=spec.memory_request,
            memory_to_copy=spec.memory_size,
            allowed=spec.allowed,
            anti_affinity=spec.anti_affinity,
        )

    def vms_now(self) -> list[Vm]:
        """The running VMs with this step's usage (a one-minute average, as Prometheus has)."""
        out = []
        for name in sorted(self.placement):
            cpu, memory = self.history[name][-1]
            out.append(self._vm(self.specs[name], cpu, memory, self.placement[name]))
        return out

    def vms_smoothed(
        self, window: int = SMOOTHING_STEPS, percentile: float = SMOOTHING_PERCENTILE
    ) -> list[Vm]:
        """The running VMs with the ``percentile`` of their usage over the last ``window``
        steps."""
        out = []
        for name in sorted(self.placement):
            samples = list(self.history[name])[-window:]
            cpu = smoothed([c for c, _ in samples], percentile)
            memory = smoothed([m for _, m in samples], percentile)
            out.append(self._vm(self.specs[name], cpu, memory, self.placement[name]))
        return out

    def arriving(self, spec: TraceVm) -> Vm:
        """A VM about to start: its usage is not known yet, so its requests stand for it."""
        return self._vm(spec, spec.cpu_request, spec.memory_request, "")

    def requests_fit(self, spec: TraceVm, node: str) -> bool:
        target = next(n for n in self.nodes if n.name == node)
        cpu = sum(self.specs[v].cpu_request for v, n in self.placement.items() if n == node)
        mem = sum(self.specs[v].memory_request for v, n in self.placement.items() if n == node)
        return (
            target.schedulable
            and cpu + spec.cpu_request <= target.cpu
            and mem + spec.memory_request <= target.memory
        )


class Balancer(Protocol):
    name: str

    def initial_node(self, vm: TraceVm, state: ClusterState) -> str | None: ...

    def cycle(self, state: ClusterState, now: float) -> list[Move]: ...


class UsageTable:
    """Every VM's usage at every step of a trace, computed once and shared by the replays."""

    def __init__(self, trace: Trace) -> None:
        self.at: list[dict[str, tuple[float, float]]] = []
        for step in range(trace.steps):
            self.at.append({vm.name: trace.usage(vm, step) for vm in trace.vms if vm.alive(step)})


@dataclass
class Result:
    """One replay's figures; imbalance and worst are on a 0..1 scale (x100 for points)."""

    balancer: str
    trace: str
    imbalance: float
    imbalance_converged: float
    worst_converged: float
    migrations: int
    bytes_moved: float
    refused: int
    pending_steps: int
    imbalance_per_step: list[float] = field(repr=False)
    moves_per_vm: Counter[str] = field(repr=False)


class VmoBalancer:
    """VMO's balancer as the controller runs it: smoothed usage, ``recommend`` each cycle,
    ``rank_placement`` for new VMs, cooldowns kept across cycles."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        bandwidth: float = 1.25e9,
        window: int = SMOOTHING_STEPS,
        percentile: float = SMOOTHING_PERCENTILE,
        name: str | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.bandwidth = bandwidth
        self.window = window
        self.percentile = percentile
        self.cooldowns = Cooldowns()
        self.name = name or f"VMO (threshold {self.settings.threshold})"
        self.plans: list[Plan] = []

    def initial_node(self, vm: TraceVm, state: ClusterState) -> str | None:
        vms = state.vms_smoothed(self.window, self.percentile)
        ranked = rank_placement(state.arriving(vm), state.nodes, vms, self.settings)
        return ranked[0][0] if ranked else None

    def cycle(self, state: ClusterState, now: float) -> list[Move]:
        vms = state.vms_smoothed(self.window, self.percentile)
        plan = recommend(
            state.nodes,
            vms,
            self.settings,
            cooldown=self.cooldowns,
            now=now,
            bandwidth=self.bandwidth,
        )
        self.plans.append(plan)
        for rec in plan.recommendations:
            self.cooldowns.moved(rec.vm, now, rec.source)
        self.cooldowns.prune(now)
        return [Move(r.vm, r.source, r.target) for r in plan.recommendations]


def node_utilisation(
    nodes: Sequence[Node], placement: dict[str, str], usage: dict[str, tuple[float, float]]
) -> tuple[list[float], list[float]]:
    """Per schedulable node, CPU and memory utilisation by actual usage."""
    cpu = {n.name: 0.0 for n in nodes}
    memory = {n.name: 0.0 for n in nodes}
    for vm, node in placement.items():
        c, m = usage.get(vm, (0.0, 0.0))
        cpu[node] += c
        memory[node] += m
    live = [n for n in nodes if n.schedulable]
    return [cpu[n.name] / n.cpu for n in live], [memory[n.name] / n.memory for n in live]


def imbalance_of(cpu: Sequence[float], memory: Sequence[float]) -> float:
    """The common metric: the mean of the CPU and memory utilisation standard deviations."""
    if len(cpu) < 2:
        return 0.0
    return (statistics.pstdev(cpu) + statistics.pstdev(memory)) / 2


def _worst_above_mean(loads: Iterable[list[float]], cycle_steps: int) -> float:
    rows = list(loads)
    worst = 0.0
    for start in range(0, len(rows), cycle_steps):
        window = rows[start : start + cycle_steps]
        averaged = [sum(col) / len(window) for col in zip(*window, strict=True)]
        if averaged:
            worst = max(worst, max(averaged) - sum(averaged) / len(averaged))
    return worst


class _Replay:
    def __init__(self, trace: Trace, balancer: Balancer, table: UsageTable, cycle_steps: int):
        self.trace = trace
        self.balancer = balancer
        self.cycle_steps = cycle_steps
        self.state = ClusterState(trace, table)
        self.pending: list[TraceVm] = []
        self.migrations = 0
        self.bytes_moved = 0.0
        self.refused = 0
        self.pending_steps = 0
        self.moves_per_vm: Counter[str] = Counter()
        self.arrivals: dict[int, list[TraceVm]] = {}
        self.departures: dict[int, list[str]] = {}
        for vm in trace.vms:
            self.arrivals.setdefault(vm.arrive, []).append(vm)
            if vm.depart is not None:
                self.departures.setdefault(vm.depart, []).append(vm.name)

    def _depart(self, step: int) -> None:
        for name in self.departures.get(step, []):
            self.state.placement.pop(name, None)
            self.state.history.pop(name, None)
        self.pending = [vm for vm in self.pending if vm.alive(step)]

    def _arrive(self, step: int) -> None:
        state = self.state
        waiting, self.pending = self.pending + self.arrivals.get(step, []), []
        for vm in waiting:
            node = vm.node if vm.node is not None and step == vm.arrive else None
            if node is None or not state.requests_fit(vm, node):
                node = self.balancer.initial_node(vm, state)
            if node is None or not state.requests_fit(vm, node):
                self.pending.append(vm)
                continue
            state.placement[vm.name] = node
            state.history[vm.name] = deque(maxlen=64)
        if self.pending:
            self.pending_steps += 1

    def _observe(self, step: int) -> None:
        usage = self.state.table.at[step]
        for name, samples in self.state.history.items():
            samples.append(usage.get(name, (0.0, 0.0)))

    def _apply(self, moves: list[Move]) -> None:
        state = self.state
        for move in moves:
            spec = state.specs.get(move.vm)
            if spec is None or state.placement.get(move.vm) != move.source:
                self.refused += 1
                continue
            if move.target == move.source or not state.requests_fit(spec, move.target):
                self.refused += 1
                continue
            state.placement[move.vm] = move.target
            self.migrations += 1
            self.bytes_moved += spec.memory_size
            self.moves_per_vm[move.vm] += 1

    def run(self) -> Result:
        trace, state = self.trace, self.state
        imbalances: list[float] = []
        loads: list[list[float]] = []
        converged_from = trace.steps // 2
        for step in range(trace.steps):
            state.step = step
            self._depart(step)
            self._arrive(step)
            self._observe(step)
            if step > 0 and step % self.cycle_steps == 0:
                self._apply(self.balancer.cycle(state, state.now))
            cpu, memory = node_utilisation(trace.nodes, state.placement, state.table.at[step])
            imbalances.append(imbalance_of(cpu, memory))
            if step >= converged_from:
                loads.append([(c + m) / 2 for c, m in zip(cpu, memory, strict=True)])
        late = imbalances[converged_from:]
        return Result(
            balancer=self.balancer.name,
            trace=trace.name,
            imbalance=sum(imbalances) / len(imbalances),
            imbalance_converged=sum(late) / len(late) if late else math.nan,
            worst_converged=_worst_above_mean(loads, self.cycle_steps),
            migrations=self.migrations,
            bytes_moved=self.bytes_moved,
            refused=self.refused,
            pending_steps=self.pending_steps,
            imbalance_per_step=imbalances,
            moves_per_vm=self.moves_per_vm,
        )


def replay(
    trace: Trace, balancer: Balancer, *, cycle_steps: int = 5, table: UsageTable | None = None
) -> Result:
    """Replay ``trace`` through ``balancer``; pass a shared ``table`` to replay it often."""
    return _Replay(trace, balancer, table or UsageTable(trace), cycle_steps).run()
