"""Placement of VMIs on Nodes, with kube-scheduler's filters and messages (pure: no I/O).

``place()`` picks a node for a VMI, given the Nodes and the VMIs already placed, or says why none
fits, in the words kube-scheduler uses ("0/2 nodes are available: 1 Insufficient memory, 1
node(s) didn't match Pod's node affinity/selector."), so that what ``kubectl`` shows here is what
it shows on a KubeVirt cluster, where the VMI's virt-launcher pod is what gets scheduled.
``feasible_nodes()`` says which nodes a VMI could run on (a live migration's target included).
The embedded engine's scheduler (vmo.engine.virtcontroller.scheduler) writes the results; VMO's
balancer weighs moves with the same filters.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmo.api.kubevirt.migratable import vmi_claim_names
from vmo.api.quantity import QuantityError, parse_quantity

log = logging.getLogger(__name__)

JSON = dict[str, Any]

SCHEDULABLE_LABEL = "kubevirt.io/schedulable"
NODE_NAME_LABEL = "kubevirt.io/nodeName"
HOSTNAME_LABEL = "kubernetes.io/hostname"
# KubeVirt requests 1/cpuAllocationRatio of a CPU per vCPU unless the VMI asks for more.
CPU_ALLOCATION_RATIO = 10
# What the QEMU process needs beyond guest memory (KubeVirt computes ~200Mi for its launcher pod;
# VMO's QEMU with no libvirt in between needs far less).
MEMORY_OVERHEAD_BYTES = 32 * 2**20
FINAL_PHASES = ("Succeeded", "Failed")
# What a node lifecycle controller taints a node with when its Ready condition is not True.
NOT_READY_TAINT = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
UNREACHABLE_TAINT = {"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")
PREFER_NO_SCHEDULE_PENALTY = 50

# kube-scheduler's reasons, word for word.
REASON_UNSCHEDULABLE = "node(s) were unschedulable"
REASON_SELECTOR = "node(s) didn't match Pod's node affinity/selector"
REASON_AFFINITY = "node(s) didn't match pod affinity rules"
REASON_ANTI_AFFINITY = "node(s) didn't match pod anti-affinity rules"
REASON_EXISTING_ANTI_AFFINITY = "node(s) didn't satisfy existing pods anti-affinity rules"
REASON_VOLUME_NODE = "node(s) had volume node affinity conflict"
NO_NODES = "no nodes available to schedule pods"


@dataclass(frozen=True)
class Scheduled:
    node: str


@dataclass(frozen=True)
class Unschedulable:
    message: str


Placement = Scheduled | Unschedulable


@dataclass(frozen=True)
class ResourceRequest:
    cpu_millis: int
    memory_bytes: int


# --- requests and capacity -------------------------------------------------------------------------


def _quantity(value: object, default: int = 0) -> float:
    if value is None or value == "":
        return float(default)
    try:
        return float(parse_quantity(value if isinstance(value, int) else str(value)))
    except QuantityError:
        return float(default)


def vcpus(vmi: JSON) -> int:
    cpu = vmi.get("spec", {}).get("domain", {}).get("cpu") or {}
    return max(
        int(cpu.get("sockets") or 1) * int(cpu.get("cores") or 1) * int(cpu.get("threads") or 1), 1
    )


class InvalidRequest(ValueError):
    """A VMI's CPU or memory request cannot be read: it cannot be placed (or counted)."""


def _requested(value: object, field: str) -> float:
    try:
        amount = float(parse_quantity(value if isinstance(value, int) else str(value)))
    except (QuantityError, ArithmeticError, ValueError) as exc:
        raise InvalidRequest(f"{field}: {exc}") from exc
    if not math.isfinite(amount) or amount < 0:
        raise InvalidRequest(f"{field}: {value!r} is not a finite, non-negative quantity")
    return amount


def vmi_request(vmi: JSON) -> ResourceRequest:
    """CPU and memory the VMI takes from its node, as its virt-launcher pod would request."""
    domain = vmi.get("spec", {}).get("domain") or {}
    requests = (domain.get("resources") or {}).get("requests") or {}
    if requests.get("cpu") not in (None, ""):
        cpu = math.ceil(_requested(requests["cpu"], "spec.domain.resources.requests.cpu") * 1000)
    elif (domain.get("cpu") or {}).get("dedicatedCpuPlacement"):
        cpu = vcpus(vmi) * 1000
    else:
        cpu = math.ceil(vcpus(vmi) * 1000 / CPU_ALLOCATION_RATIO)
    if requests.get("memory") not in (None, ""):
        memory = _requested(requests["memory"], "spec.domain.resources.requests.memory")
    elif (domain.get("memory") or {}).get("guest") not in (None, ""):
        memory = _requested(domain["memory"]["guest"], "spec.domain.memory.guest")
    else:
        memory = 0.0
    return ResourceRequest(cpu, int(memory) + MEMORY_OVERHEAD_BYTES)


def allocatable(node: JSON) -> ResourceRequest:
    alloc = node.get("status", {}).get("allocatable") or {}
    return ResourceRequest(
        math.floor(_quantity(alloc.get("cpu")) * 1000), int(_quantity(alloc.get("memory")))
    )


def holds_resources(vmi: JSON) -> bool:
    status = vmi.get("status") or {}
    return bool(status.get("nodeName")) and status.get("phase") not in FINAL_PHASES


def _same(a: JSON, b: JSON) -> bool:
    ma, mb = a.get("metadata", {}), b.get("metadata", {})
    if ma.get("uid") and mb.get("uid"):
        return bool(ma["uid"] == mb["uid"])
    return (ma.get("namespace"), ma.get("name")) == (mb.get("namespace"), mb.get("name"))


# --- label selection -------------------------------------------------------------------------------


def _expression_matches(labels: dict[str, str], expr: JSON) -> bool:
    key, op = expr.get("key", ""), expr.get("operator", "")
    values = [str(v) for v in expr.get("values") or []]
    present = key in labels
    if op == "In":
        return present and labels[key] in values
    if op == "NotIn":
        return not present or labels[key] not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and values:
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def node_selector_term_matches(node: JSON, term: JSON) -> bool:
    """One nodeSelectorTerm: all its matchExpressions and matchFields hold."""
    labels = node.get("metadata", {}).get("labels") or {}
    fields = {"metadata.name": node.get("metadata", {}).get("name", "")}
    exprs, field_exprs = term.get("matchExpressions") or [], term.get("matchFields") or []
    if not exprs and not field_exprs:
        return False  # an empty term selects nothing
    return all(_expression_matches(labels, e) for e in exprs) and all(
        _expression_matches(fields, e) for e in field_exprs
    )


def label_selector_matches(labels: dict[str, str], selector: JSON | None) -> bool:
    """A metav1.LabelSelector; a missing selector selects nothing, an empty one everything."""
    if selector is None:
        return False
    match_labels = selector.get("matchLabels") or {}
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    return all(_expression_matches(labels, e) for e in selector.get("matchExpressions") or [])


# --- filters (each returns the reasons a node fails, empty when it fits) ---------------------------


def _labels(obj: JSON) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("labels") or {})


def node_ready(node: JSON) -> str:
    """The Ready condition's status: "True", "False" or "Unknown" (missing counts as Unknown)."""
    for cond in node.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status") or "Unknown")
    return "Unknown"


def effective_taints(node: JSON) -> list[JSON]:
    """The node's taints, plus the one a node lifecycle controller adds when it is not Ready."""
    taints = [dict(t) for t in node.get("spec", {}).get("taints") or []]
    ready = node_ready(node)
    if ready != "True":
        implied = NOT_READY_TAINT if ready == "False" else UNREACHABLE_TAINT
        if not any(t.get("key") == implied["key"] for t in taints):
            taints.append(dict(implied))
    return taints


def tolerates(toleration: JSON, taint: JSON) -> bool:
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    if key and key != taint.get("key"):
        return False
    if (toleration.get("operator") or "Equal") == "Exists":
        return True
    return bool(key) and (toleration.get("value") or "") == (taint.get("value") or "")


def _untolerated(vmi: JSON, taints: Iterable[JSON], effects: Sequence[str]) -> list[JSON]:
    tolerations = vmi.get("spec", {}).get("tolerations") or []
    return [
        t
        for t in taints
        if t.get("effect") in effects and not any(tolerates(tol, t) for tol in tolerations)
    ]


def _check_unschedulable(vmi: JSON, node: JSON, ctx: _Context) -> list[str]:
    if not node.get("spec", {}).get("unschedulable"):
        return []
    taint = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    return [] if not _untolerated(vmi, [taint], BLOCKING_EFFECTS) else [REASON_UNSCHEDULABLE]


def _check_taints(vmi: JSON, node: JSON, ctx: _Context) -> list[str]:
    blocking = _untolerated(vmi, effective_taints(node), BLOCKING_EFFECTS)
    if not blocking:
        return []
    taint = blocking[0]
    return [f"node(s) had untolerated taint {{{taint.get('key', '')}: {taint.get('value', '')}}}"]


def _check_selector(vmi: JSON, node: JSON, ctx: _Context) -> list[str]:
    spec = vmi.get("spec") or {}
    labels = _labels(node)
    # KubeVirt puts kubevirt.io/schedulable=true in every virt-launcher pod's nodeSelector
    selector = {SCHEDULABLE_LABEL: "true", **(spec.get("nodeSelector") or {})}
    if any(labels.get(k) != str(v) for k, v in selector.items()):
        return [REASON_SELECTOR]
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or None
    if required is not None and not any(
        node_selector_term_matches(node, term) for term in required.get("nodeSelectorTerms") or []
    ):
        return [REASON_SELECTOR]
    return []


def _check_resources(vmi: JSON, node: JSON, ctx: _Context) -> list[str]:
    want = ctx.request
    have = allocatable(node)
    used = ctx.used.get(node["metadata"]["name"], ResourceRequest(0, 0))
    reasons = []
    if used.cpu_millis + want.cpu_millis > have.cpu_millis:
        reasons.append("Insufficient cpu")
    if used.memory_bytes + want.memory_bytes > have.memory_bytes:
        reasons.append("Insufficient memory")
    return reasons


def required_terms(vmi: JSON, kind: str) -> list[JSON]:
    affinity = (vmi.get("spec", {}).get("affinity") or {}).get(kind) or {}
    return list(affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or [])


def term_selects(term: JSON, owner: JSON, other: JSON) -> bool:
    """Whether a pod-affinity term of ``owner`` selects the VMI ``other`` (namespace and labels)."""
    namespaces = term.get("namespaces") or []
    other_ns = other.get("metadata", {}).get("namespace", "")
    if namespaces:
        in_scope = other_ns in namespaces
    elif term.get("namespaceSelector") == {}:
        in_scope = True  # an empty namespaceSelector means every namespace
    else:
        in_scope = other_ns == owner.get("metadata", {}).get("namespace", "")
    return in_scope and label_selector_matches(_labels(other), term.get("labelSelector"))


def _same_topology(ctx: _Context, node: JSON, other_node: str, key: str) -> bool:
    value = _labels(node).get(key)
    other = ctx.nodes.get(other_node)
    return value is not None and other is not None and _labels(other).get(key) == value


def _check_pod_affinity(vmi: JSON, node: JSON, ctx: _Context) -> list[str]:
    reasons: list[str] = []
    for existing in ctx.placed:
        for term in required_terms(existing, "podAntiAffinity"):
            key = term.get("topologyKey") or HOSTNAME_LABEL
            if term_selects(term, existing, vmi) and _same_topology(
                ctx, node, existing["status"]["nodeName"], key
            ):
                return [REASON_EXISTING_ANTI_AFFINITY]
    for term in required_terms(vmi, "podAffinity"):
        key = term.get("topologyKey") or HOSTNAME_LABEL
        matching = [e for e in ctx.placed if term_selects(term, vmi, e)]
        if not matching and term_selects(term, vmi, vmi):
            continue  # the first of a group may go anywhere
        if not any(_same_topology(ctx, node, e["status"]["nodeName"], key) for e in matching):
            reasons = [REASON_AFFINITY]
            break
    if reasons:
        return reasons
    for term in required_terms(vmi, "podAntiAffinity"):
        key = term.get("topologyKey") or HOSTNAME_LABEL
        if any(
            term_selects(term, vmi, e) and _same_topology(ctx, node, e["status"]["nodeName"], key)
            for e in ctx.placed
        ):
            return [REASON_ANTI_AFFINITY]
    return []


def _check_volumes(vmi: JSON, node: JSON, ctx: _Context) -> list[str]:
    """A node-local volume binds its VMI to the node holding it (a local PV's node affinity)."""
    namespace = str(vmi.get("metadata", {}).get("namespace", ""))
    for claim in vmi_claim_names(vmi):
        holder = ctx.volume_nodes.get((namespace, claim))
        if holder is not None and holder != node["metadata"]["name"]:
            return [REASON_VOLUME_NODE]
    return []


@dataclass(frozen=True)
class _Context:
    request: ResourceRequest
    nodes: dict[str, JSON]
    placed: list[JSON]  # other VMIs holding a node
    used: dict[str, ResourceRequest]
    # (namespace, claim) -> the node whose local pool holds it (shared volumes are absent)
    volume_nodes: Mapping[tuple[str, str], str] = field(default_factory=dict)


Filter = Callable[[JSON, JSON, _Context], list[str]]
# kube-scheduler's order; a node is reported under the first filter it fails.
FILTERS: tuple[Filter, ...] = (
    _check_unschedulable,
    _check_taints,
    _check_selector,
    _check_resources,
    _check_pod_affinity,
    _check_volumes,
)


# --- scoring ---------------------------------------------------------------------------------------


def _preferred_weight(vmi: JSON, node: JSON, ctx: _Context) -> int:
    affinity = vmi.get("spec", {}).get("affinity") or {}
    score = 0
    for pref in (affinity.get("nodeAffinity") or {}).get(
        "preferredDuringSchedulingIgnoredDuringExecution"
    ) or []:
        if node_selector_term_matches(node, pref.get("preference") or {}):
            score += int(pref.get("weight") or 0)
    for kind, sign in (("podAffinity", 1), ("podAntiAffinity", -1)):
        for pref in (affinity.get(kind) or {}).get(
            "preferredDuringSchedulingIgnoredDuringExecution"
        ) or []:
            term = pref.get("podAffinityTerm") or {}
            key = term.get("topologyKey") or HOSTNAME_LABEL
            if any(
                term_selects(term, vmi, e)
                and _same_topology(ctx, node, e["status"]["nodeName"], key)
                for e in ctx.placed
            ):
                score += sign * int(pref.get("weight") or 0)
    return score


def score(vmi: JSON, node: JSON, ctx: _Context) -> float:
    """Least-allocated share (0..100) plus preferred-affinity weights, minus soft-taint penalties."""
    have = allocatable(node)
    used = ctx.used.get(node["metadata"]["name"], ResourceRequest(0, 0))
    free_cpu = (have.cpu_millis - used.cpu_millis - ctx.request.cpu_millis) / max(
        have.cpu_millis, 1
    )
    free_mem = (have.memory_bytes - used.memory_bytes - ctx.request.memory_bytes) / max(
        have.memory_bytes, 1
    )
    soft = _untolerated(vmi, effective_taints(node), ("PreferNoSchedule",))
    return (
        (free_cpu + free_mem) * 50
        + _preferred_weight(vmi, node, ctx)
        - PREFER_NO_SCHEDULE_PENALTY * len(soft)
    )


# --- place -----------------------------------------------------------------------------------------


def migration_target(vmi: JSON) -> str | None:
    """The target node of a VMI's migration in flight: its target holds resources too."""
    state = (vmi.get("status") or {}).get("migrationState") or {}
    if state.get("completed") or state.get("failed") or not state.get("targetNode"):
        return None
    target = str(state["targetNode"])
    return None if target == (vmi.get("status") or {}).get("nodeName") else target


def _placed_request(vmi: JSON) -> ResourceRequest:
    """What a VMI already on a node takes; one whose requests cannot be read (admitted before
    admission checked them) counts as nothing rather than stopping every placement."""
    try:
        return vmi_request(vmi)
    except (ArithmeticError, ValueError, TypeError) as exc:
        md = vmi.get("metadata") or {}
        log.warning(
            "requests of VMI %s/%s unreadable: %s", md.get("namespace"), md.get("name"), exc
        )
        return ResourceRequest(0, 0)


def _context(
    vmi: JSON,
    nodes: Sequence[JSON],
    vmis: Sequence[JSON],
    volume_nodes: Mapping[tuple[str, str], str] | None = None,
) -> _Context:
    placed = [v for v in vmis if holds_resources(v) and not _same(v, vmi)]
    used: dict[str, ResourceRequest] = {}
    for other in placed:
        req = _placed_request(other)
        for name in filter(None, (other["status"]["nodeName"], migration_target(other))):
            total = used.get(name, ResourceRequest(0, 0))
            used[name] = ResourceRequest(
                total.cpu_millis + req.cpu_millis, total.memory_bytes + req.memory_bytes
            )
    return _Context(
        request=vmi_request(vmi),
        nodes={n["metadata"]["name"]: n for n in nodes},
        placed=placed,
        used=used,
        volume_nodes=volume_nodes or {},
    )


def unschedulable_message(total: int, reasons: Counter[str]) -> str:
    """kube-scheduler's FitError text: reason counts, sorted as strings."""
    if total == 0:
        return NO_NODES
    parts = sorted(f"{count} {reason}" for reason, count in reasons.items())
    return f"0/{total} nodes are available: {', '.join(parts)}."


def place(
    vmi: JSON,
    nodes: Sequence[JSON],
    vmis: Sequence[JSON],
    volume_nodes: Mapping[tuple[str, str], str] | None = None,
    extra_scores: Mapping[str, float] | None = None,
) -> Placement:
    """The node ``vmi`` should run on, or why there is none. ``volume_nodes`` maps the
    node-local volumes (namespace, claim) to the node holding each; ``extra_scores`` (by node)
    are added to each feasible node's score, as kube-scheduler adds its extenders' weighted
    priorities."""
    ctx = _context(vmi, nodes, vmis, volume_nodes)
    reasons: Counter[str] = Counter()
    feasible: list[JSON] = []
    for node in nodes:
        failed = next((r for check in FILTERS if (r := check(vmi, node, ctx))), [])
        reasons.update(failed)
        if not failed:
            feasible.append(node)
    if not feasible:
        return Unschedulable(unschedulable_message(len(nodes), reasons))
    extra = extra_scores or {}
    best = max(
        feasible,
        key=lambda n: (
            score(vmi, n, ctx) + extra.get(n["metadata"]["name"], 0.0),
            _reverse_name(n),
        ),
    )
    return Scheduled(best["metadata"]["name"])


def _reverse_name(node: JSON) -> tuple[int, ...]:
    # ties go to the alphabetically first node, whatever the order nodes were listed in
    return tuple(-ord(c) for c in node["metadata"]["name"])


def feasible_nodes(
    vmi: JSON,
    nodes: Sequence[JSON],
    vmis: Sequence[JSON],
    volume_nodes: Mapping[tuple[str, str], str] | None = None,
) -> dict[str, list[str]]:
    """Every node's name, with the reasons it cannot take ``vmi`` (empty when it can)."""
    ctx = _context(vmi, nodes, vmis, volume_nodes)
    return {
        node["metadata"]["name"]: next((r for check in FILTERS if (r := check(vmi, node, ctx))), [])
        for node in nodes
    }
