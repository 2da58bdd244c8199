"""The cluster as the balancer's model sees it, built from API objects and measurements. Pure.

- A node that is not Ready is HA's business: it and its VMIs are left out. A Ready node takes
  VMs when it is not cordoned and carries ``kubevirt.io/schedulable=true`` (what KubeVirt's
  virt-launcher pods select); a cordoned one is evacuated, as DRS evacuates a host entering
  maintenance mode.
- Required node affinity is "IgnoredDuringExecution": a VMI's own node is always allowed to
  keep it; the filters judge only where it may go.
- A VMI is weighed when it is Running on a node, with its measured usage (a VMI Prometheus has
  no series for yet is weighed by its requests, and a note says so). It may move when KubeVirt
  says it is ``LiveMigratable``, no migration of it is in flight, and exactly one policy — this
  one — selects it.
- Where it may go comes from kube-scheduler's own filters (``vmo.api.scheduling``): node
  selector, required node affinity, taints and tolerations, capacity by requests, and pod
  (anti-)affinity against what runs now; a VMI's required anti-affinity terms also become
  anti-affinity groups, so that moves planned together never put two of a group on one node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmo.api.scheduling import (
    HOSTNAME_LABEL,
    SCHEDULABLE_LABEL,
    InvalidRequest,
    allocatable,
    feasible_nodes,
    node_ready,
    required_terms,
    term_selects,
    vmi_request,
)
from vmo.api.selectors import labels_of
from vmo.controllers.balance.measure import Measurements
from vmo.controllers.balance.model import Node, Vm
from vmo.controllers.balance.policy import PolicySpec

JSON = dict[str, Any]
NETWORK_ANNOTATION = "vmo.dev/network-bandwidth"  # a node's network capacity, bytes per second


@dataclass(frozen=True)
class Model:
    nodes: list[Node]
    vms: list[Vm]  # every running VMI (those of other policies too: they load their nodes)
    selected: frozenset[str]  # the VMIs this policy balances ("namespace/name")
    notes: tuple[str, ...] = field(default=())


def vmi_key(vmi: Mapping[str, Any]) -> str:
    md = vmi.get("metadata") or {}
    return f"{md.get('namespace', '')}/{md.get('name', '')}"


def _condition_true(obj: Mapping[str, Any], ctype: str) -> bool:
    return any(
        c.get("type") == ctype and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def schedulable(node: JSON) -> bool:
    return (
        node_ready(node) == "True"
        and not (node.get("spec") or {}).get("unschedulable")
        and labels_of(node).get(SCHEDULABLE_LABEL) == "true"
    )


def migrating(vmi: JSON) -> bool:
    state = (vmi.get("status") or {}).get("migrationState") or {}
    return bool(state) and not state.get("completed") and not state.get("failed")


def running(vmi: JSON) -> bool:
    status = vmi.get("status") or {}
    md = vmi.get("metadata") or {}
    return (
        status.get("phase") == "Running"
        and bool(status.get("nodeName"))
        and not md.get("deletionTimestamp")
    )


def _node(node: JSON) -> Node:
    have = allocatable(node)
    bandwidth = ((node.get("metadata") or {}).get("annotations") or {}).get(NETWORK_ANNOTATION)
    try:
        network = float(bandwidth) if bandwidth else None
    except ValueError:
        network = None
    return Node(
        name=str(node["metadata"]["name"]),
        cpu=have.cpu_millis / 1000,
        memory=float(have.memory_bytes),
        schedulable=schedulable(node),
        network=network,
    )


def _guest_memory(vmi: JSON) -> float:
    try:
        return float(vmi_request(vmi).memory_bytes)
    except InvalidRequest:
        return 0.0


def selection_labels(
    vmi: Mapping[str, Any], vms: Mapping[str, JSON], namespaces: Mapping[str, JSON]
) -> tuple[dict[str, str], dict[str, str]]:
    """What a policy's selectors see of a VMI: its VM's labels overlaid by its own, and its
    namespace's labels."""
    namespace = str((vmi.get("metadata") or {}).get("namespace") or "")
    labels = {**labels_of(vms.get(vmi_key(vmi)) or {}), **labels_of(vmi)}
    return labels, labels_of(namespaces.get(namespace) or {})


def anti_affinity_groups(vmis: Sequence[JSON]) -> dict[str, set[str]]:
    """VMI key -> the groups it belongs to: each required podAntiAffinity term on the hostname
    topology is a group of its owner and the VMIs the term selects."""
    groups: dict[str, set[str]] = {}
    for owner in vmis:
        for i, term in enumerate(required_terms(owner, "podAntiAffinity")):
            if (term.get("topologyKey") or HOSTNAME_LABEL) != HOSTNAME_LABEL:
                continue
            group = f"{vmi_key(owner)}#{i}"
            groups.setdefault(vmi_key(owner), set()).add(group)
            for other in vmis:
                if other is not owner and term_selects(term, owner, other):
                    groups.setdefault(vmi_key(other), set()).add(group)
    return groups


def build(
    spec: PolicySpec,
    nodes: Sequence[JSON],
    vmis: Sequence[JSON],
    vms: Mapping[str, JSON],
    namespaces: Mapping[str, JSON],
    measured: Measurements,
    *,
    contested: Iterable[str] = (),
) -> Model:
    """The model of one cycle. ``vms``: VirtualMachines by key (their labels count with the
    VMI's); ``contested``: VMI keys another policy selects too (they stay put)."""
    contested = set(contested)
    placed = [v for v in vmis if running(v)]
    groups = anti_affinity_groups(placed)
    ready = [n for n in nodes if node_ready(n) == "True"]
    model_nodes = [_node(n) for n in ready]
    known = {n.name for n in model_nodes}
    notes: list[str] = []
    down = sorted(str(n["metadata"]["name"]) for n in nodes if node_ready(n) != "True")
    if down:
        notes.append(f"left out, not Ready (HA's business): {', '.join(down)}")
    unmeasured: list[str] = []
    out: list[Vm] = []
    selected: set[str] = set()
    for vmi in placed:
        key = vmi_key(vmi)
        namespace, name = key.split("/", 1)
        node = str(vmi["status"]["nodeName"])
        if node not in known:
            continue
        try:
            request = vmi_request(vmi)
        except InvalidRequest:
            continue
        picked = spec.selects(*selection_labels(vmi, vms, namespaces))
        usage = measured.usage.get((namespace, name))
        if usage is None:
            unmeasured.append(key)
        why_not = ""
        if not picked:
            why_not = "not selected by this policy"
        elif key in contested:
            why_not = "selected by more than one BalancePolicy"
        elif not _condition_true(vmi, "LiveMigratable"):
            why_not = "not LiveMigratable"
        elif migrating(vmi):
            why_not = "a migration of it is in flight"
        allowed = None
        if not why_not:
            reasons = feasible_nodes(vmi, ready, placed)
            allowed = frozenset(n for n, r in reasons.items() if not r or n == node)
        if picked and key not in contested:
            selected.add(key)
        memory = usage.memory if usage is not None else float(request.memory_bytes)
        out.append(
            Vm(
                key=key,
                node=node,
                cpu=usage.cpu if usage is not None else request.cpu_millis / 1000,
                memory=memory,
                cpu_request=request.cpu_millis / 1000,
                memory_request=float(request.memory_bytes),
                memory_to_copy=min(memory, _guest_memory(vmi)) or memory,
                network=usage.network if usage is not None else None,
                movable=not why_not,
                why_not_movable=why_not,
                allowed=allowed,
                anti_affinity=frozenset(groups.get(key, ())),
            )
        )
    if unmeasured:
        shown = ", ".join(sorted(unmeasured)[:5]) + (" …" if len(unmeasured) > 5 else "")
        notes.append(f"{len(unmeasured)} VMI(s) weighed by requests (no usage yet): {shown}")
    return Model(model_nodes, out, frozenset(selected), tuple(notes))


__all__ = [
    "Model",
    "anti_affinity_groups",
    "build",
    "migrating",
    "running",
    "schedulable",
    "selection_labels",
]
