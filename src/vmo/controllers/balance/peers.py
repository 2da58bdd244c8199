"""Faithful re-implementations of what KubeVirt users balance with today, for the simulator.

``LowNodeUtilization`` is the kubernetes-sigs/descheduler plugin as its Helm chart configures
it (``pkg/framework/plugins/nodeutilization/lownodeutilization.go`` and ``nodeutilization.go``,
``charts/descheduler/values.yaml``):

- utilisation is by *requests* (the plugin's default usage client: "CPU/Memory requests are
  used to calculate nodes' utilization and not the actual resource usage"), per resource, in
  percent of allocatable, for cpu, memory and pods (a VM is one virt-launcher pod; kubelet's
  default ``maxPods`` is 110);
- the chart's thresholds are cpu/memory/pods 20 and targetThresholds 50; a node is
  *underutilized* when it is schedulable and every resource is at or below ``thresholds``,
  *overutilized* when any resource is above ``targetThresholds``;
- nothing happens when no node is underutilized, when all are, or when none is overutilized;
- overutilized nodes are taken in descending order of the sum of their usage quantities (CPU
  in millicores plus memory in bytes plus pods, as ``sortNodesByUsage`` adds them); their pods
  in ascending priority then QoS class (all the traces' VMs share both, so the pod list's order
  decides: here by name); each eviction subtracts the pod's requests from its node and from the
  underutilized nodes' total headroom up to ``targetThresholds``, and eviction from the node
  stops once it is no longer above ``targetThresholds`` or any resource's headroom is used up;
- the chart sets no eviction limits.

``KubeVirtRelieveAndMigrate`` is the OpenShift kube-descheduler-operator profile
(``pkg/operator/target_config_reconciler.go``: ``kubeVirtRelieveAndMigrateProfile``,
``setEvictionsLimits``; ``bindata/assets/kube-descheduler/prometheusrule.yaml``):

- LowNodeUtilization with ``useDeviationThresholds`` and thresholds low 0 / high 10 (the
  operator's defaults, "AsymmetricLow"): a node is underutilized at or below the mean, and
  overutilized above the mean plus 10 points (both clamped to 0..100);
- utilisation is *actual*, one Prometheus metric per node (``PrometheusCPUMemoryCombined
  Profile``: ``descheduler:node:linear_amplified_ideal_point_positive_distance:k3:avg1m``):
  ``min(1, 3 * sqrt(sum of squared positive deviations from the workers' mean))`` over CPU and
  memory utilisation and CPU and memory pressure (PSI). The traces carry no PSI, and the rules
  zero pressure below 70 % utilisation anyway, so pressure counts as 0 here;
- a metric says nothing of a pod's share of it, so evictions are "unconstrained": the plugin
  checks a node once, then evicts up to its per-node limit without re-measuring;
- limits: 2 evictions per node and 5 in total per cycle (``MaxNoOfPodsToEvictPerNode`` and
  ``MaxNoOfPodsToEvictTotal`` from KubeVirt's ``parallelOutboundMigrationsPerNode`` 2 and
  ``parallelMigrationsPerCluster`` 5);
- the ``KubevirtMigrationAware`` evictor plugin (openshift/descheduler#591) skips a VM that
  migrated recently: a cooldown of ``max(15 min, migration duration) * 2^(count - 1)``, count
  being its migrations in the last 24 h, capped at 6 h.

Both peers' evictions become live migrations (KubeVirt's eviction webhook turns an eviction
into a VirtualMachineInstanceMigration), whose target pod kube-scheduler places: here a
``NodeResourcesFit`` LeastAllocated scorer by requests, over nodes that are schedulable, that
the VM may use, and that can hold its requests, excluding the node it leaves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vmo.controllers.balance.model import Node
from vmo.controllers.balance.simulator import ClusterState, Move
from vmo.controllers.balance.trace import TraceVm

MAX_PODS = 110
RESOURCES = ("cpu", "memory", "pods")


@dataclass
class _Requests:
    """Per-node requested cpu, memory and pods, updated as a cycle moves VMs."""

    nodes: dict[str, Node]
    cpu: dict[str, float]
    memory: dict[str, float]
    pods: dict[str, int]
    on: dict[str, list[TraceVm]] = field(default_factory=dict)

    @classmethod
    def of(cls, state: ClusterState) -> _Requests:
        nodes = {n.name: n for n in state.nodes}
        out = cls(
            nodes, dict.fromkeys(nodes, 0.0), dict.fromkeys(nodes, 0.0), dict.fromkeys(nodes, 0)
        )
        out.on = {n: [] for n in nodes}
        for vm in state.running():
            out.add(vm, state.placement[vm.name], 1)
        return out

    def add(self, vm: TraceVm, node: str, sign: int) -> None:
        self.cpu[node] += sign * vm.cpu_request
        self.memory[node] += sign * vm.memory_request
        self.pods[node] += sign
        if sign > 0:
            self.on[node].append(vm)
        else:
            self.on[node] = [v for v in self.on[node] if v.name != vm.name]

    def percent(self, node: str) -> dict[str, float]:
        n = self.nodes[node]
        return {
            "cpu": 100 * self.cpu[node] / n.cpu,
            "memory": 100 * self.memory[node] / n.memory,
            "pods": 100 * self.pods[node] / MAX_PODS,
        }

    def fits(self, vm: TraceVm, node: str) -> bool:
        n = self.nodes[node]
        if not n.schedulable or (vm.allowed is not None and node not in vm.allowed):
            return False
        if vm.anti_affinity and any(vm.anti_affinity & v.anti_affinity for v in self.on[node]):
            return False
        return (
            self.cpu[node] + vm.cpu_request <= n.cpu
            and self.memory[node] + vm.memory_request <= n.memory
            and self.pods[node] < MAX_PODS
        )


def least_allocated(vm: TraceVm, requests: _Requests, *, exclude: str | None = None) -> str | None:
    """kube-scheduler's choice for ``vm``: the feasible node with the most unrequested share
    of cpu and memory (NodeResourcesFit, LeastAllocated, equal weights); ties by name."""
    best: tuple[float, str] | None = None
    for name, node in sorted(requests.nodes.items()):
        if name == exclude or not requests.fits(vm, name):
            continue
        free_cpu = (node.cpu - requests.cpu[name] - vm.cpu_request) / node.cpu
        free_mem = (node.memory - requests.memory[name] - vm.memory_request) / node.memory
        score = (free_cpu + free_mem) / 2
        if best is None or score > best[0]:
            best = (score, name)
    return None if best is None else best[1]


class _SchedulerPlacement:
    """New VMs land where kube-scheduler puts a pod: least allocated by requests."""

    def initial_node(self, vm: TraceVm, state: ClusterState) -> str | None:
        return least_allocated(vm, _Requests.of(state))


def _evict(vm: TraceVm, source: str, requests: _Requests, moves: list[Move]) -> bool:
    """Evict ``vm``: KubeVirt live-migrates it where the scheduler puts the target pod."""
    target = least_allocated(vm, requests, exclude=source)
    if target is None:
        return False
    requests.add(vm, source, -1)
    requests.add(vm, target, 1)
    moves.append(Move(vm.name, source, target))
    return True


def _sum_of_quantities(requests: _Requests, node: str) -> float:
    # sortNodesByUsage adds CPU millicores, memory bytes and the pod count as plain numbers
    return requests.cpu[node] * 1000 + requests.memory[node] + requests.pods[node]


class LowNodeUtilization(_SchedulerPlacement):
    """The descheduler's LowNodeUtilization by requests, with the chart's 20/50 thresholds."""

    def __init__(self, thresholds: float = 20.0, target: float = 50.0) -> None:
        self.thresholds = dict.fromkeys(RESOURCES, thresholds)
        self.targets = dict.fromkeys(RESOURCES, target)
        self.name = f"LowNodeUtilization {thresholds:g}/{target:g}"

    def cycle(self, state: ClusterState, now: float) -> list[Move]:
        requests = _Requests.of(state)
        names = sorted(requests.nodes)
        low = [
            n for n in names
            if requests.nodes[n].schedulable
            and all(requests.percent(n)[r] <= self.thresholds[r] for r in RESOURCES)
        ]  # fmt: skip
        high = [
            n for n in names if any(requests.percent(n)[r] > self.targets[r] for r in RESOURCES)
        ]
        if not low or len(low) == len(names) or not high:
            return []
        available = {r: sum(self._room(requests, n, r) for n in low) for r in RESOURCES}
        moves: list[Move] = []
        for node in sorted(high, key=lambda n: -_sum_of_quantities(requests, n)):
            for vm in sorted(requests.on[node], key=lambda v: v.name):
                if not self._keep_evicting(requests, node, available):
                    break
                if _evict(vm, node, requests, moves):
                    available["cpu"] -= vm.cpu_request
                    available["memory"] -= vm.memory_request
                    available["pods"] -= 1
        return moves

    def _room(self, requests: _Requests, node: str, resource: str) -> float:
        n = requests.nodes[node]
        share = self.targets[resource] / 100
        if resource == "cpu":
            return n.cpu * share - requests.cpu[node]
        if resource == "memory":
            return n.memory * share - requests.memory[node]
        return MAX_PODS * share - requests.pods[node]

    def _keep_evicting(self, requests: _Requests, node: str, available: dict[str, float]) -> bool:
        above = any(requests.percent(node)[r] > self.targets[r] for r in RESOURCES)
        return above and all(v > 0 for v in available.values())


@dataclass
class MigrationHistory:
    """KubevirtMigrationAware's view of a VM's recent migrations."""

    base: float = 15 * 60.0
    cap: float = 6 * 3600.0
    window: float = 24 * 3600.0
    times: dict[str, list[float]] = field(default_factory=dict)

    def record(self, vm: str, now: float) -> None:
        self.times.setdefault(vm, []).append(now)

    def allows(self, vm: str, now: float) -> bool:
        recent = [t for t in self.times.get(vm, []) if now - t < self.window]
        if not recent:
            return True
        cooldown: float = min(self.base * 2.0 ** (len(recent) - 1), self.cap)
        return now - max(recent) >= cooldown


def combined_metric(
    nodes: Sequence[Node], cpu: dict[str, float], memory: dict[str, float]
) -> dict[str, float]:
    """PrometheusCPUMemoryCombinedProfile per node, in percent: 3x the Euclidean norm of the
    positive deviations of CPU and memory utilisation from the workers' mean, capped at 100."""
    util_cpu = {n.name: cpu[n.name] / n.cpu for n in nodes}
    util_mem = {n.name: memory[n.name] / n.memory for n in nodes}
    mean_cpu = sum(util_cpu.values()) / len(nodes)
    mean_mem = sum(util_mem.values()) / len(nodes)
    out = {}
    for n in nodes:
        dc = max(0.0, util_cpu[n.name] - mean_cpu)
        dm = max(0.0, util_mem[n.name] - mean_mem)
        out[n.name] = 100 * min(1.0, 3 * math.sqrt(dc * dc + dm * dm))
    return out


class KubeVirtRelieveAndMigrate(_SchedulerPlacement):
    """OpenShift's KubeVirtRelieveAndMigrate profile: deviation thresholds 0:10 on actual
    usage, 2 evictions per node and 5 per cycle, KubevirtMigrationAware's cooldown."""

    def __init__(
        self, low: float = 0.0, high: float = 10.0, per_node: int = 2, total: int = 5
    ) -> None:
        self.low, self.high = low, high
        self.per_node, self.total = per_node, total
        self.history = MigrationHistory()
        self.name = "KubeVirtRelieveAndMigrate"

    def cycle(self, state: ClusterState, now: float) -> list[Move]:
        requests = _Requests.of(state)
        metric = self._metric(state)
        average = sum(metric.values()) / len(metric)
        low_line = min(100.0, max(0.0, average - self.low))
        high_line = min(100.0, max(0.0, average + self.high))
        names = sorted(metric)
        low = [n for n in names if requests.nodes[n].schedulable and metric[n] <= low_line]
        high = [n for n in names if metric[n] > high_line]
        if not low or len(low) == len(names) or not high:
            return []
        available = sum(high_line - metric[n] for n in low)
        moves: list[Move] = []
        for node in sorted(high, key=lambda n: -metric[n]):
            if available <= 0:
                break
            evicted = 0
            for vm in sorted(requests.on[node], key=lambda v: v.name):
                if evicted >= self.per_node or len(moves) >= self.total:
                    break
                if not self.history.allows(vm.name, now):
                    continue
                if _evict(vm, node, requests, moves):
                    evicted += 1
                    self.history.record(vm.name, now)
            if len(moves) >= self.total:
                break
        return moves

    def _metric(self, state: ClusterState) -> dict[str, float]:
        cpu = {n.name: 0.0 for n in state.nodes}
        memory = {n.name: 0.0 for n in state.nodes}
        for vm in state.vms_now():
            cpu[vm.node] += vm.cpu
            memory[vm.node] += vm.memory
        return combined_metric(state.nodes, cpu, memory)


def peers() -> Iterable[LowNodeUtilization | KubeVirtRelieveAndMigrate]:
    """Fresh instances of the peers the benchmark compares with."""
    return (LowNodeUtilization(), KubeVirtRelieveAndMigrate())
