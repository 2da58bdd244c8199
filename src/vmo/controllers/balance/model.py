"""The balancer's inputs and outputs: nodes, VMs, settings, recommendations and plans.

Pure frozen dataclasses with no I/O: the controller fills them from the API and Prometheus,
the simulator fills them from a trace, and the decision engine (``algorithm``) reads them.
Units: CPU in cores, memory in bytes, network in bytes per second, time in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RESOURCES = ("cpu", "memory", "network")
RULES = ("LoadBalance", "Constraint", "Evacuate")


@dataclass(frozen=True)
class Node:
    """A node's allocatable capacity, as the balancer sees it."""

    name: str
    cpu: float
    memory: float
    schedulable: bool = True
    network: float | None = None


@dataclass(frozen=True)
class Vm:
    """A running VM: its smoothed usage, its requests, and what constrains where it may go."""

    key: str
    node: str
    cpu: float
    memory: float
    cpu_request: float
    memory_request: float
    memory_to_copy: float
    network: float | None = None
    movable: bool = True
    why_not_movable: str = ""
    # the nodes its node selector, affinity, tolerations and volumes allow; None: any
    allowed: frozenset[str] | None = None
    # two VMs sharing a group never share a node
    anti_affinity: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Settings:
    """A BalancePolicy's decision settings; ``validate()`` names each problem's field."""

    threshold: int = 3
    resources: tuple[str, ...] = ("cpu", "memory")
    max_per_node: int = 2
    max_total: int = 5
    # no move may take a node above this share of its capacity, by usage
    headroom: float = 0.9

    def validate(self) -> list[tuple[str, str]]:
        """The problems, as (field, message) pairs; empty when the settings are usable."""
        problems: list[tuple[str, str]] = []
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            problems.append(("spec.migrationThreshold", "must be an integer from 1 to 5"))
        elif not 1 <= self.threshold <= 5:
            problems.append(
                ("spec.migrationThreshold", f"must be from 1 to 5, not {self.threshold}")
            )
        if not self.resources:
            problems.append(("spec.resources", "must name at least one resource"))
        for i, name in enumerate(self.resources):
            if name not in RESOURCES:
                problems.append(
                    (f"spec.resources[{i}]", f"unknown resource {name!r}; one of {RESOURCES}")
                )
        if len(set(self.resources)) != len(self.resources):
            problems.append(("spec.resources", "names a resource twice"))
        if self.max_per_node < 0:
            problems.append(("spec.limits.perNode", f"must be >= 0, not {self.max_per_node}"))
        if self.max_total < 0:
            problems.append(("spec.limits.total", f"must be >= 0, not {self.max_total}"))
        if not 0 < self.headroom <= 1:
            problems.append(("spec.headroom", f"must be in (0, 1], not {self.headroom}"))
        return problems


@dataclass(frozen=True)
class Recommendation:
    """One live migration the balancer recommends, with what it buys, what it costs and why."""

    vm: str
    source: str
    target: str
    imbalance_before: float
    imbalance_after: float
    memory_bytes: float
    seconds: float
    priority: int
    rule: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """One cycle's recommendations, best first; ``reason`` says why when there are none."""

    recommendations: tuple[Recommendation, ...]
    imbalance: float
    target: float
    reason: str
    notes: tuple[str, ...] = field(default=())

    @property
    def imbalance_after(self) -> float:
        """The imbalance once every recommendation is applied."""
        if not self.recommendations:
            return self.imbalance
        return self.recommendations[-1].imbalance_after
