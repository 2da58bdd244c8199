"""The balancer's decision engine: cluster state in, a plan of live migrations out, each with
its reason, its cost and the rule that chose it. Pure: no I/O, no clock (``now`` is passed).

Imbalance. A node's utilisation of a resource is the sum of its VMs' (smoothed) usage over its
allocatable capacity; its *load* is the mean of its utilisations over the policy's resources
(network only where every node and VM report it; otherwise it is left out and the plan says
so). The cluster's *imbalance* is, on a 0..1 scale, the mean over those resources of the
population standard deviation of the schedulable nodes' utilisation of it. This follows vSphere
DRS's "current host load standard deviation" (each host's load is the sum of its VMs' expected
loads over its capacity; the standard deviation is taken across hosts), per resource: the
deviation of the mean load would let a CPU-hot, memory-cold node pass as balanced (in the
benchmark it read 1.0 point while CPU and memory each deviated by 2.5).

The migration threshold (1..5), as DRS defines it. DRS labels each recommendation with a
priority from 1 (mandatory: affinity rule violations, a host entering maintenance) to 5 (a
slight improvement), and a threshold t applies the recommendations of priority <= t: 1 applies
only mandatory moves, 3 (the default) those promising at least a good improvement, 5 even a
slight one (vSphere Resource Management guide, "DRS Migration Threshold"). The VMware KB
"Calculating the priority level of a VMware DRS migration recommendation" gives the priority
of a load-balancing recommendation as ``6 - ceil(imbalance / 0.1 * sqrt(hosts))``: a higher
imbalance earns a higher priority, and the acceptable imbalance shrinks with the square root
of the number of hosts. Solving that for the imbalance at which threshold t starts to act
gives the shape of VMO's *target imbalance*:

    target(t, n) = (5 - t) * TARGET_SCALE / sqrt(n)        (t = 2..5; at least 0.01; t = 1: none)

DRS's constant is 0.1, for DRS's own host load (entitlements: demand plus reservations and
overheads). VMO's loads are p80-smoothed usage, steadier, so VMO's constant is 0.03 (with 12
nodes: t = 2 -> 0.026, 3 -> 0.017, 4 -> 0.010, 5 -> 0.010, the floor near the smoothed-usage
noise); with DRS's 0.1, threshold 3 tolerated 5.8 points on 12 nodes in the benchmark. DRS also weighs each
move's benefit (its "goodness") against a minimum; VMO makes that explicit as a *minimum
improvement per move*: the move must lower the sum over nodes of squared load deviations from
the mean (``n * variance``, in points²) by ``MIN_GOODNESS[t]``: 40, 20, 10 and 5 points² for
t = 2..5 (20 points² is, e.g., 2 points of load moved across a 10-point gap). That measure does
not shrink as the cluster grows, unlike a move's effect on the standard deviation itself.
A load-balancing move's priority is the most conservative level p in 2..5 whose target the
cluster exceeds before the move and whose minimum improvement the move reaches; a threshold t
recommends the moves of priority <= t. Mandatory moves (a VM on a node it is not allowed on,
two VMs of an anti-affinity group on one node, a VM on an unschedulable node being drained)
are priority 1 and made at every threshold, still within the limits and capacity.

Cost. A move copies the VM's memory: ``seconds = memory_to_copy / bandwidth`` (the recent
measured migration bandwidth). The greedy search picks, each round, the (VM, target) pair with
the largest imbalance reduction per cost, ``gain / (1 + memory_to_copy / COST_BYTES)``, so of
two moves that buy the same balance the one with less memory to copy wins.

Limits and safety. At most ``max_per_node`` migrations leave a node per cycle (KubeVirt's
``parallelOutboundMigrationsPerNode`` counts outbound migrations) and ``max_total`` in all. A target must be schedulable,
allowed for the VM, free of its anti-affinity groups, have room for its requests within
allocatable, and stay under ``headroom`` of its capacity by usage for every resource weighed.

No oscillation. A move must lower the imbalance by more than ``HYSTERESIS`` (besides its
threshold's minimum). A VM that moved is in *cooldown*: at least 15 min, doubling while it
keeps moving (a move before its previous cooldown has doubly elapsed), capped at 6 h; no
load-balancing move touches it meanwhile, and no move at all takes it back to the node it left.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmo.controllers.balance.model import Node, Plan, Recommendation, Settings, Vm

GIB = 1024.0**3
COOLDOWN_MIN = 15 * 60.0
COOLDOWN_MAX = 6 * 3600.0
HYSTERESIS = 0.0001
# the least a move must lower the sum over nodes of squared load deviations, in points²
MIN_GOODNESS = {2: 40.0, 3: 20.0, 4: 10.0, 5: 5.0}
COST_BYTES = 4 * GIB
TARGET_FLOOR = 0.01
# DRS's KB formula uses 0.1 for its entitlement-based host load; VMO's usage-based loads are
# steadier, and 0.03 keeps the formula's shape at the smoothed-usage noise floor (~1 point)
TARGET_SCALE = 0.03
PRIORITIES = (2, 3, 4, 5)


def target_imbalance(threshold: int, nodes: int) -> float:
    """The imbalance above which threshold ``threshold`` balances (DRS's KB formula solved)."""
    if threshold <= 1:
        return math.inf
    return max(TARGET_FLOOR, (5 - threshold) * TARGET_SCALE / math.sqrt(max(nodes, 1)))


def smoothed(samples: Sequence[float], percentile: float = 80.0) -> float:
    """The nearest-rank ``percentile`` of a window of usage samples (0 when empty)."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = math.ceil(percentile / 100.0 * len(ordered))
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]


# --- cooldowns ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cooling:
    at: float
    seconds: float
    source: str


class Cooldowns:
    """Per-VM migration cooldowns; a plain dict round-trips through ``to_dict``/``from_dict``.
    ``minimum`` and ``maximum`` are a BalancePolicy's (15 min and 6 h by default)."""

    def __init__(self, minimum: float = COOLDOWN_MIN, maximum: float = COOLDOWN_MAX) -> None:
        self._by_vm: dict[str, _Cooling] = {}
        self.minimum = minimum
        self.maximum = max(maximum, minimum)

    def allows(self, vm: str, now: float) -> bool:
        """Whether ``vm`` may make a load-balancing move at ``now``."""
        entry = self._by_vm.get(vm)
        return entry is None or now >= entry.at + entry.seconds

    def left(self, vm: str, now: float) -> str | None:
        """The node ``vm`` just left, while its cooldown lasts."""
        entry = self._by_vm.get(vm)
        if entry is None or now >= entry.at + entry.seconds:
            return None
        return entry.source

    def moved(self, vm: str, now: float, source: str = "") -> float:
        """Record that ``vm`` left ``source`` at ``now``; returns its new cooldown in seconds."""
        previous = self._by_vm.get(vm)
        seconds = self.minimum
        if previous is not None and now - previous.at < 2 * previous.seconds:
            seconds = min(2 * previous.seconds, self.maximum)
        self._by_vm[vm] = _Cooling(now, seconds, source)
        return seconds

    def prune(self, now: float) -> None:
        """Forget the VMs quiet long enough that their next cooldown starts over."""
        self._by_vm = {vm: e for vm, e in self._by_vm.items() if now - e.at < 2 * e.seconds}

    def to_dict(self) -> dict[str, dict[str, float | str]]:
        return {
            vm: {"at": e.at, "seconds": e.seconds, "source": e.source}
            for vm, e in sorted(self._by_vm.items())
        }

    @classmethod
    def from_dict(
        cls,
        data: dict[str, dict[str, float | str]],
        minimum: float = COOLDOWN_MIN,
        maximum: float = COOLDOWN_MAX,
    ) -> Cooldowns:
        cooldowns = cls(minimum, maximum)
        for vm, entry in data.items():
            cooldowns._by_vm[vm] = _Cooling(
                float(entry["at"]), float(entry["seconds"]), str(entry.get("source", ""))
            )
        return cooldowns


# --- the cluster, with incremental per-node sums ----------------------------------------------


def active_resources(
    settings: Settings, nodes: Sequence[Node], vms: Iterable[Vm]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The resources weighed, and notes on any left out for want of measurements."""
    resources = tuple(settings.resources)
    if "network" not in resources:
        return resources, ()
    measured = all(n.network for n in nodes) and all(v.network is not None for v in vms)
    if measured:
        return resources, ()
    kept = tuple(r for r in resources if r != "network")
    return kept, ("network is not weighed: not every node and VM reports it",)


def _usage(vm: Vm, resource: str) -> float:
    if resource == "cpu":
        return vm.cpu
    if resource == "memory":
        return vm.memory
    return vm.network or 0.0


def _capacity(node: Node, resource: str) -> float:
    if resource == "cpu":
        return node.cpu
    if resource == "memory":
        return node.memory
    return node.network or 0.0


def _pad3(values: Sequence[float]) -> tuple[float, float, float]:
    padded = [*values, 0.0, 0.0, 0.0]
    return padded[0], padded[1], padded[2]


def _deviation(total: float, squares: float, n: int) -> float:
    mean = total / n
    return math.sqrt(max(0.0, squares / n - mean * mean))


class _Cluster:
    """Per-node sums of usage and requests, utilisations, and per resource the sums of the
    schedulable nodes' utilisations and of their squares, behind the imbalance."""

    def __init__(self, nodes: Sequence[Node], vms: Sequence[Vm], resources: Sequence[str]):
        self.nodes = list(nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.resources = tuple(resources)
        self.weight = 1.0 / len(self.resources)
        count = len(self.nodes)
        # a VM's utilisation of node i is usage_k * inv[i][k], padded to three resources
        self.inv = [
            _pad3([1.0 / c if (c := _capacity(n, r)) > 0 else 0.0 for r in self.resources])
            for n in self.nodes
        ]
        self.used = [[0.0, 0.0, 0.0] for _ in range(count)]
        self.req_cpu = [0.0] * count
        self.req_mem = [0.0] * count
        self.groups: list[Counter[str]] = [Counter() for _ in range(count)]
        self.vms_on: list[list[Vm]] = [[] for _ in range(count)]
        for vm in vms:
            i = self.index.get(vm.node)
            if i is not None:
                self._add(vm, i, 1.0)
        self.balanced = [i for i, n in enumerate(self.nodes) if n.schedulable]
        self.util = [self._util(i) for i in range(count)]
        self.sums = [sum(self.util[i][k] for i in self.balanced) for k in range(3)]
        self.squares = [sum(self.util[i][k] ** 2 for i in self.balanced) for k in range(3)]

    def _add(self, vm: Vm, i: int, sign: float) -> None:
        for k, amount in enumerate(self.usage3(vm)):
            self.used[i][k] += sign * amount
        self.req_cpu[i] += sign * vm.cpu_request
        self.req_mem[i] += sign * vm.memory_request
        for group in vm.anti_affinity:
            self.groups[i][group] += int(sign)
        if sign > 0:
            self.vms_on[i].append(vm)
        else:
            self.vms_on[i] = [v for v in self.vms_on[i] if v.key != vm.key]

    def _util(self, i: int) -> tuple[float, float, float]:
        used, inv = self.used[i], self.inv[i]
        return used[0] * inv[0], used[1] * inv[1], used[2] * inv[2]

    def usage3(self, vm: Vm) -> tuple[float, float, float]:
        """``vm``'s usage of the weighed resources, padded to three."""
        return _pad3([_usage(vm, r) for r in self.resources])

    def load(self, i: int) -> float:
        """Node i's load: the mean of its utilisations."""
        return sum(self.util[i]) * self.weight

    def mean_load(self) -> float:
        n = len(self.balanced)
        return sum(self.sums) * self.weight / n if n else 0.0

    def share(self, vm: Vm, i: int) -> float:
        """How much ``vm`` adds to node i's load."""
        inv = self.inv[i]
        return sum(u * a for u, a in zip(self.usage3(vm), inv, strict=True)) * self.weight

    def imbalance(self) -> float:
        n = len(self.balanced)
        if n == 0:
            return 0.0
        return self.weight * sum(
            _deviation(self.sums[k], self.squares[k], n) for k in range(len(self.resources))
        )

    def imbalance_after(self, vm: Vm, source: int | None, target: int) -> float:
        """The imbalance once ``vm`` leaves ``source`` (None: it is new) for ``target``."""
        n = len(self.balanced)
        usage = self.usage3(vm)
        out = 0.0
        for k in range(len(self.resources)):
            total, squares = self.sums[k], self.squares[k]
            if source is not None and self.nodes[source].schedulable:
                d = usage[k] * self.inv[source][k]
                total -= d
                squares += d * d - 2 * self.util[source][k] * d
            e = usage[k] * self.inv[target][k]
            total += e
            squares += e * e + 2 * self.util[target][k] * e
            out += _deviation(total, squares, n)
        return out * self.weight

    def fits(self, vm: Vm, i: int, headroom: float) -> bool:
        """Whether node i may take ``vm``: schedulable, allowed, anti-affinity, room."""
        node = self.nodes[i]
        if not node.schedulable or (vm.allowed is not None and node.name not in vm.allowed):
            return False
        if any(self.groups[i][g] > 0 for g in vm.anti_affinity):
            return False
        if self.req_cpu[i] + vm.cpu_request > node.cpu:
            return False
        if self.req_mem[i] + vm.memory_request > node.memory:
            return False
        usage = self.usage3(vm)
        for k, r in enumerate(self.resources):
            capacity = _capacity(node, r)
            if capacity > 0 and self.used[i][k] + usage[k] > headroom * capacity:
                return False
        return True

    def move(self, vm: Vm, source: int, target: int) -> None:
        for i, sign in ((source, -1.0), (target, 1.0)):
            live = self.nodes[i].schedulable
            before = self.util[i]
            self._add(vm, i, sign)
            self.util[i] = after = self._util(i)
            if live:
                for k in range(3):
                    self.sums[k] += after[k] - before[k]
                    self.squares[k] += after[k] ** 2 - before[k] ** 2


# --- the plan -----------------------------------------------------------------------------------


@dataclass
class _Search:
    """One cycle's mutable bookkeeping: moves so far, per-node counts, why candidates failed."""

    cluster: _Cluster
    settings: Settings
    cooldown: Cooldowns
    now: float
    bandwidth: float
    recommendations: list[Recommendation]
    per_node: Counter[int]
    moved: set[str]
    cooling: int = 0
    pinned: int = 0

    def room(self, i: int) -> bool:
        return self.per_node[i] < self.settings.max_per_node

    def full(self) -> bool:
        return len(self.recommendations) >= self.settings.max_total

    def apply(
        self, vm: Vm, source: int, target: int, *, priority: int, rule: str, why: str
    ) -> None:
        cluster = self.cluster
        before = cluster.imbalance()
        cluster.move(vm, source, target)
        after = cluster.imbalance()
        self.per_node[source] += 1
        # KubeVirt limits outbound migrations per node (parallelOutboundMigrationsPerNode)
        self.moved.add(vm.key)
        seconds = vm.memory_to_copy / self.bandwidth if self.bandwidth > 0 else math.inf
        self.recommendations.append(
            Recommendation(
                vm=vm.key,
                source=cluster.nodes[source].name,
                target=cluster.nodes[target].name,
                imbalance_before=before,
                imbalance_after=after,
                memory_bytes=vm.memory_to_copy,
                seconds=seconds,
                priority=priority,
                rule=rule,
                reason=why,
            )
        )


def _violation(cluster: _Cluster, vm: Vm, i: int) -> tuple[str, str] | None:
    """The mandatory rule ``vm`` breaks where it runs, and how, or None."""
    node = cluster.nodes[i]
    if not node.schedulable:
        return "Evacuate", f"{node.name} is unschedulable (draining)"
    if vm.allowed is not None and node.name not in vm.allowed:
        return "Constraint", f"{vm.key} is not allowed on {node.name} (selectors/affinity/taints)"
    for group in sorted(vm.anti_affinity):
        if cluster.groups[i][group] > 1:
            return "Constraint", f"{vm.key} shares {node.name} with its anti-affinity group {group}"
    return None


def _mandatory(search: _Search) -> None:
    cluster = search.cluster
    for i in range(len(cluster.nodes)):
        for vm in sorted(cluster.vms_on[i], key=lambda v: v.key):
            if search.full():
                return
            broken = _violation(cluster, vm, i)
            if broken is None or vm.key in search.moved:
                continue
            if not vm.movable or not search.room(i):
                search.pinned += 1
                continue
            back = search.cooldown.left(vm.key, search.now)
            best: tuple[float, int] | None = None
            for t in range(len(cluster.nodes)):
                if t == i or cluster.nodes[t].name == back or not search.room(t):
                    continue
                if cluster.fits(vm, t, search.settings.headroom):
                    after = cluster.imbalance_after(vm, i, t)
                    if best is None or after < best[0]:
                        best = (after, t)
            if best is None:
                search.pinned += 1
                continue
            rule, why = broken
            target = cluster.nodes[best[1]].name
            search.apply(vm, i, best[1], priority=1, rule=rule, why=f"{why}: move to {target}")


def goodness(before: float, after: float, nodes: int) -> float:
    """How much a move lowers the sum of squared load deviations, in points²."""
    return nodes * (before * before - after * after) * 1e4


def _priority(before: float, after: float, nodes: int) -> int:
    good = goodness(before, after, nodes)
    for p in PRIORITIES:
        if before > target_imbalance(p, nodes) and good >= MIN_GOODNESS[p]:
            return p
    return 6


def _best_balance_move(search: _Search) -> tuple[float, Vm, int, int] | None:
    """The (gain, VM, source, target) with the best gain per cost, or None."""
    cluster, settings = search.cluster, search.settings
    n = len(cluster.balanced)
    before = cluster.imbalance()
    if before <= HYSTERESIS:
        return None
    # a move is a candidate when the imbalance after it is below this: it beats both the
    # hysteresis and the threshold's minimum goodness
    least = MIN_GOODNESS[settings.threshold] / n / 1e4
    limit = min(before - HYSTERESIS, math.sqrt(max(0.0, before * before - least)))
    (s0, s1, s2), (q0, q1, q2) = cluster.sums, cluster.squares
    m0, m1, m2 = s0 / n, s1 / n, s2 / n
    w = cluster.weight
    # a source is above the mean in some resource, a target below it in some resource
    targets = [
        (t, *cluster.util[t], *cluster.inv[t])
        for t in cluster.balanced
        if search.room(t)
        and min(u - m for u, m in zip(cluster.util[t], (m0, m1, m2), strict=True)) < 0
    ]
    best: tuple[float, float, Vm, int, int] | None = None
    search.cooling = search.pinned = 0
    sqrt = math.sqrt
    for s in cluster.balanced:
        us0, us1, us2 = cluster.util[s]
        if not search.room(s) or max(us0 - m0, us1 - m1, us2 - m2) <= 0:
            continue
        i0, i1, i2 = cluster.inv[s]
        for vm in cluster.vms_on[s]:
            if vm.key in search.moved:
                continue
            if not vm.movable:
                search.pinned += 1
                continue
            if not search.cooldown.allows(vm.key, search.now):
                search.cooling += 1
                continue
            u0, u1, u2 = cluster.usage3(vm)
            d0, d1, d2 = u0 * i0, u1 * i1, u2 * i2
            b0, b1, b2 = s0 - d0, s1 - d1, s2 - d2
            c0 = q0 + d0 * d0 - 2 * us0 * d0
            c1 = q1 + d1 * d1 - 2 * us1 * d1
            c2 = q2 + d2 * d2 - 2 * us2 * d2
            cost = 1.0 + vm.memory_to_copy / COST_BYTES
            for t, ut0, ut1, ut2, a0, a1, a2 in targets:
                if t == s:
                    continue
                e0, e1, e2 = u0 * a0, u1 * a1, u2 * a2
                x0, x1, x2 = (b0 + e0) / n, (b1 + e1) / n, (b2 + e2) / n
                after = w * (
                    sqrt(max(0.0, (c0 + e0 * e0 + 2 * ut0 * e0) / n - x0 * x0))
                    + sqrt(max(0.0, (c1 + e1 * e1 + 2 * ut1 * e1) / n - x1 * x1))
                    + sqrt(max(0.0, (c2 + e2 * e2 + 2 * ut2 * e2) / n - x2 * x2))
                )
                if after >= limit:
                    continue
                gain = before - after
                score = gain / cost
                if (best is None or score > best[0]) and cluster.fits(vm, t, settings.headroom):
                    best = (score, gain, vm, s, t)
    if best is None:
        return None
    return best[1], best[2], best[3], best[4]


def _balance(search: _Search, target: float) -> str:
    """Greedy load-balancing moves until balanced or limited; why it stopped."""
    cluster, settings = search.cluster, search.settings
    nodes = len(cluster.balanced)
    while True:
        before = cluster.imbalance()
        if before <= target:
            return f"balanced: imbalance {before:.3f} <= target {target:.3f}"
        if search.full():
            return f"the limit of {settings.max_total} migrations per cycle is reached"
        found = _best_balance_move(search)
        if found is None:
            return _why_none(search, before)
        gain, vm, s, t = found
        after = before - gain
        source, dest = cluster.nodes[s], cluster.nodes[t]
        why = (
            f"{source.name} is at {cluster.load(s) * 100:.1f} % load "
            f"(mean {cluster.mean_load() * 100:.1f} %); moving {vm.key} to {dest.name} "
            f"({cluster.load(t) * 100:.1f} %) lowers the imbalance by "
            f"{gain * 100:.2f} points (goodness {goodness(before, after, nodes):.0f} points²) for "
            f"{vm.memory_to_copy / GIB:.1f} GiB copied"
        )
        priority = _priority(before, after, nodes)
        search.apply(vm, s, t, priority=priority, rule="LoadBalance", why=why)


def _why_none(search: _Search, before: float) -> str:
    if search.cooling and not search.pinned:
        return f"every candidate VM is in cooldown ({search.cooling})"
    least = MIN_GOODNESS[search.settings.threshold]
    return (
        f"no move lowers the imbalance ({before:.3f}) by a goodness of {least:.0f} points² "
        "within capacity, constraints and limits"
        + (f"; {search.cooling} candidates in cooldown" if search.cooling else "")
        + (f"; {search.pinned} not movable" if search.pinned else "")
    )


def recommend(
    nodes: Sequence[Node],
    vms: Sequence[Vm],
    settings: Settings,
    *,
    cooldown: Cooldowns | None = None,
    now: float = 0.0,
    bandwidth: float = 100e6,
) -> Plan:
    """This cycle's recommended migrations (mandatory ones first), best first, with reasons."""
    problems = settings.validate()
    if problems:
        text = "; ".join(f"{f}: {m}" for f, m in problems)
        return Plan((), 0.0, math.inf, f"invalid settings, no migrations: {text}")
    resources, notes = active_resources(settings, nodes, vms)
    cluster = _Cluster(nodes, vms, resources)
    target = target_imbalance(settings.threshold, len(cluster.balanced))
    imbalance = cluster.imbalance()
    if len(cluster.balanced) < 2:
        return Plan((), imbalance, target, "fewer than two schedulable nodes", notes)
    search = _Search(
        cluster, settings, cooldown or Cooldowns(), now, bandwidth, [], Counter(), set()
    )
    _mandatory(search)
    if settings.threshold == 1:
        why = f"threshold 1 applies only mandatory moves (imbalance {cluster.imbalance():.3f})"
    else:
        why = _balance(search, target)
    recs = tuple(search.recommendations)
    if recs:
        why = (
            f"{len(recs)} migration(s) take the imbalance from {imbalance:.3f} to "
            f"{cluster.imbalance():.3f} (target {target:.3f}); then {why}"
        )
    return Plan(recs, imbalance, target, why, notes)


def imbalance(nodes: Sequence[Node], vms: Sequence[Vm], settings: Settings) -> float:
    """The cluster's imbalance, as ``recommend`` measures it."""
    resources, _ = active_resources(settings, nodes, vms)
    return _Cluster(nodes, vms, resources).imbalance()


def rank_placement(
    vm: Vm, nodes: Sequence[Node], vms: Sequence[Vm], settings: Settings
) -> list[tuple[str, float]]:
    """Feasible nodes for a new VM, best first: lowest resulting imbalance, then node load."""
    resources, _ = active_resources(settings, nodes, [*vms, vm])
    cluster = _Cluster(nodes, vms, resources)
    scored: list[tuple[float, float, str]] = []
    for i, node in enumerate(cluster.nodes):
        if cluster.fits(vm, i, settings.headroom):
            after = cluster.imbalance_after(vm, None, i)
            scored.append((after, cluster.load(i) + cluster.share(vm, i), node.name))
    scored.sort()
    return [(name, after) for after, _, name in scored]
