"""networking.k8s.io/v1 NetworkPolicy and k8s.cni.cncf.io/v1beta1 MultiNetworkPolicy.

Both kinds carry the same spec (the multi-networkpolicy project mirrors NetworkPolicySpec); a
MultiNetworkPolicy names the secondary networks it applies to in the annotation
``k8s.v1.cni.cncf.io/policy-for`` (``[namespace/]name``, comma-separated).

Admission follows kube-apiserver's NetworkPolicy validation, with its field paths:

- a peer names at least one of podSelector, namespaceSelector and ipBlock, and an ipBlock
  stands alone;
- an ipBlock's ``cidr`` is a valid CIDR, and each ``except`` entry is a valid CIDR strictly
  inside it, of the same family;
- a port's protocol is TCP, UDP or SCTP; ``port`` is 1..65535 or an IANA service name (what a
  named port may be called); ``endPort`` needs a numeric ``port``, is at least ``port`` and at
  most 65535;
- ``policyTypes`` holds Ingress and/or Egress, each at most once;
- label selectors are well formed (In/NotIn with values, Exists/DoesNotExist without).

Defaults are upstream's: a port's protocol is TCP, and ``policyTypes`` is Ingress, plus Egress
when the policy has egress rules. Enforcement lives in the node agents (the engine); this module
is the API's model only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmo.api.core import (
    array,
    int_or_string,
    integer,
    label_selector,
    obj,
    resource,
    string,
    strings,
)
from vmo.api.selectors import selector_matches
from vmo.api.types import JSON, Cause, PrinterColumn, ResourceType

__all__ = [
    "POLICY_FOR",
    "PROTOCOLS",
    "Endpoint",
    "Verdict",
    "default_policy",
    "endpoint_of",
    "explain",
    "isolates",
    "multi_network_policy",
    "netpol_resource_types",
    "network_policy",
    "peer_selects",
    "policy_for",
    "selects",
    "validate_policy",
]

POLICY_FOR = "k8s.v1.cni.cncf.io/policy-for"
PROTOCOLS = ("TCP", "UDP", "SCTP")
POLICY_TYPES = ("Ingress", "Egress")
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# IANA_SVC_NAME, as Kubernetes checks a named port: 1-15 lowercase letters, digits and '-',
# at least one letter, no '-' at either end and no '--'
_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
_NETWORK_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------- schema


def _peer() -> JSON:
    return obj(
        {
            "podSelector": label_selector("Selects VMs (their template's labels)."),
            "namespaceSelector": label_selector("Selects namespaces by their labels."),
            "ipBlock": obj(
                {
                    "cidr": string("A CIDR, such as 192.168.1.0/24 or 2001:db8::/64."),
                    "except": strings("CIDRs inside cidr that the peer leaves out."),
                },
                "A range of addresses.",
                required=("cidr",),
            ),
        },
        "One side of an allowed flow.",
    )


def _port() -> JSON:
    return obj(
        {
            "protocol": string("TCP, UDP or SCTP (default TCP).", enum=PROTOCOLS),
            "port": int_or_string("A port number or a named port."),
            "endPort": integer("The last port of a range that starts at port."),
        },
        "A port or a range of ports.",
    )


def policy_spec() -> JSON:
    """The spec both kinds share."""
    return obj(
        {
            "podSelector": label_selector("The VMs the policy applies to; {} selects all."),
            "ingress": array(
                obj({"from": array(_peer()), "ports": array(_port())}),
                "Traffic allowed in; several rules add up.",
            ),
            "egress": array(
                obj({"to": array(_peer()), "ports": array(_port())}),
                "Traffic allowed out; several rules add up.",
            ),
            "policyTypes": array(string(enum=POLICY_TYPES), "The directions the policy isolates."),
        },
        "What the policy selects and allows.",
    )


def _columns() -> tuple[PrinterColumn, ...]:
    return (
        PrinterColumn("Pod-Selector", "string", ".spec.podSelector"),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp"),
    )


def network_policy() -> ResourceType:
    return ResourceType(
        group="networking.k8s.io",
        version="v1",
        kind="NetworkPolicy",
        plural="networkpolicies",
        singular="networkpolicy",
        namespaced=True,
        short_names=("netpol",),
        printer_columns=_columns(),
        schema=resource(
            "NetworkPolicy says which traffic VMs on the pod network may send and receive.",
            {"spec": policy_spec()},
        ),
        validate=lambda new, old: validate_policy(new),
        default=default_policy,
    )


def multi_network_policy() -> ResourceType:
    return ResourceType(
        group="k8s.cni.cncf.io",
        version="v1beta1",
        kind="MultiNetworkPolicy",
        plural="multi-networkpolicies",
        singular="multi-networkpolicy",
        namespaced=True,
        short_names=("multi-policy",),
        printer_columns=_columns(),
        schema=resource(
            "MultiNetworkPolicy is a NetworkPolicy for the secondary networks named in its "
            f"{POLICY_FOR} annotation.",
            {"spec": policy_spec()},
        ),
        validate=lambda new, old: validate_policy(new, multi=True),
        default=default_policy,
        warn=_warn_multi,
    )


def netpol_resource_types() -> list[ResourceType]:
    return [network_policy(), multi_network_policy()]


# --------------------------------------------------------------------------- defaults


def default_policy(new: JSON) -> None:
    """Upstream's defaults: TCP ports, and policyTypes from the rules present."""
    spec = new.setdefault("spec", {})
    spec.setdefault("podSelector", {})
    for direction in ("ingress", "egress"):
        for rule in spec.get(direction) or []:
            if not isinstance(rule, dict):
                continue
            for port in rule.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
    if not spec.get("policyTypes"):
        spec["policyTypes"] = ["Ingress"] + (["Egress"] if spec.get("egress") else [])


# --------------------------------------------------------------------------- validation


def policy_for(obj_: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """The (namespace, network) pairs a MultiNetworkPolicy's annotation names (the policy's
    own namespace when a name has none), or None when the annotation is absent."""
    metadata = obj_.get("metadata") or {}
    text = (metadata.get("annotations") or {}).get(POLICY_FOR)
    if text is None:
        return None
    namespace = str(metadata.get("namespace") or "")
    out = []
    for item in str(text).split(","):
        name = item.strip()
        if not name:
            continue
        if "/" in name:
            ns, _, net = name.partition("/")
            out.append((ns, net))
        else:
            out.append((namespace, name))
    return out


def _warn_multi(new: JSON) -> list[str]:
    if policy_for(new) is None:
        return [f"metadata.annotations[{POLICY_FOR}] is not set: this policy applies to no network"]
    return []


def validate_policy(new: JSON, *, multi: bool = False) -> list[Cause]:
    """Every problem of a NetworkPolicy or MultiNetworkPolicy, each naming its field."""
    causes: list[Cause] = []
    spec = new.get("spec")
    if not isinstance(spec, dict):
        return [Cause("spec", "Required value", "FieldValueRequired")]
    causes += _selector(spec.get("podSelector"), "spec.podSelector")
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        rules = spec.get(direction) or []
        for i, rule in enumerate(rules):
            where = f"spec.{direction}[{i}]"
            if not isinstance(rule, dict):
                causes.append(Cause(where, "must be an object"))
                continue
            for j, port in enumerate(rule.get("ports") or []):
                causes += _port_causes(port, f"{where}.ports[{j}]")
            for j, peer in enumerate(rule.get(peers_key) or []):
                causes += _peer_causes(peer, f"{where}.{peers_key}[{j}]")
    types = spec.get("policyTypes") or []
    if len(types) > len(POLICY_TYPES):
        causes.append(
            Cause(
                "spec.policyTypes", "may not specify more than two policyTypes", "FieldValueInvalid"
            )
        )
    seen: set[str] = set()
    for i, kind in enumerate(types):
        if kind not in POLICY_TYPES:
            causes.append(
                Cause(
                    f"spec.policyTypes[{i}]",
                    f'Unsupported value: "{kind}": supported values: "Ingress", "Egress"',
                    "FieldValueNotSupported",
                )
            )
        elif kind in seen:
            causes.append(
                Cause(f"spec.policyTypes[{i}]", f'Duplicate value: "{kind}"', "FieldValueDuplicate")
            )
        seen.add(str(kind))
    if multi:
        causes += _policy_for_causes(new)
    return causes


def _policy_for_causes(new: JSON) -> list[Cause]:
    where = f"metadata.annotations[{POLICY_FOR}]"
    text = ((new.get("metadata") or {}).get("annotations") or {}).get(POLICY_FOR)
    if text is None:
        return []
    names = [n.strip() for n in str(text).split(",")]
    if not any(names):
        return [Cause(where, "must name at least one network ([namespace/]name)")]
    return [
        Cause(where, f'Invalid value: "{n}": a network is [namespace/]name, in DNS-1123 labels')
        for n in names
        if n and not _NETWORK_NAME.match(n)
    ]


def _selector(selector: Any, where: str) -> list[Cause]:
    if selector is None:
        return []
    if not isinstance(selector, dict):
        return [Cause(where, "must be a label selector")]
    causes = []
    for i, expr in enumerate(selector.get("matchExpressions") or []):
        at = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, dict):
            causes.append(Cause(at, "must be an object"))
            continue
        op, values = expr.get("operator"), expr.get("values") or []
        if not expr.get("key"):
            causes.append(Cause(f"{at}.key", "Required value", "FieldValueRequired"))
        if op not in _SELECTOR_OPERATORS:
            causes.append(
                Cause(
                    f"{at}.operator",
                    f'Unsupported value: "{op}": supported values: '
                    + ", ".join(f'"{o}"' for o in _SELECTOR_OPERATORS),
                    "FieldValueNotSupported",
                )
            )
        elif op in ("In", "NotIn") and not values:
            causes.append(
                Cause(f"{at}.values", "must be specified when `operator` is 'In' or 'NotIn'")
            )
        elif op in ("Exists", "DoesNotExist") and values:
            causes.append(
                Cause(
                    f"{at}.values",
                    "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    "FieldValueForbidden",
                )
            )
    return causes


def _port_causes(port: Any, where: str) -> list[Cause]:
    if not isinstance(port, dict):
        return [Cause(where, "must be an object")]
    causes = []
    protocol = port.get("protocol", "TCP")
    if protocol not in PROTOCOLS:
        causes.append(
            Cause(
                f"{where}.protocol",
                f'Unsupported value: "{protocol}": supported values: "SCTP", "TCP", "UDP"',
                "FieldValueNotSupported",
            )
        )
    value, end = port.get("port"), port.get("endPort")
    number: int | None = value if isinstance(value, int) and not isinstance(value, bool) else None
    if number is not None:
        if not 1 <= number <= 65535:
            causes.append(
                Cause(
                    f"{where}.port",
                    f"Invalid value: {value}: must be between 1 and 65535, inclusive",
                )
            )
    elif isinstance(value, str):
        if (
            value.isdigit()
            or not _SERVICE_NAME.match(value)
            or "--" in value
            or not re.search("[a-z]", value)
        ):
            causes.append(
                Cause(
                    f"{where}.port",
                    f'Invalid value: "{value}": must be a port number or an IANA service name '
                    "(at most 15 lowercase letters, digits and '-', with at least one letter)",
                )
            )
    elif value is not None:
        causes.append(Cause(f"{where}.port", "must be an integer or a string"))
    if end is not None:
        if isinstance(end, bool) or not isinstance(end, int):
            causes.append(Cause(f"{where}.endPort", "must be an integer"))
        elif number is None:
            causes.append(
                Cause(
                    f"{where}.endPort",
                    "may not be specified when `port` is non-numeric"
                    if value is not None
                    else "may not be specified when `port` is not specified",
                    "FieldValueForbidden",
                )
            )
        elif end < number:
            causes.append(
                Cause(
                    f"{where}.endPort",
                    f"Invalid value: {end}: must be greater than or equal to `port`",
                )
            )
        elif end > 65535:
            causes.append(
                Cause(
                    f"{where}.endPort",
                    f"Invalid value: {end}: must be between 1 and 65535, inclusive",
                )
            )
    return causes


def _peer_causes(peer: Any, where: str) -> list[Cause]:
    if not isinstance(peer, dict):
        return [Cause(where, "must be an object")]
    given = [k for k in ("podSelector", "namespaceSelector", "ipBlock") if peer.get(k) is not None]
    if not given:
        return [Cause(where, "must specify a peer", "FieldValueRequired")]
    if "ipBlock" in given and len(given) > 1:
        return [
            Cause(where, "may not specify both ipBlock and another peer", "FieldValueForbidden")
        ]
    causes = _selector(peer.get("podSelector"), f"{where}.podSelector")
    causes += _selector(peer.get("namespaceSelector"), f"{where}.namespaceSelector")
    block = peer.get("ipBlock")
    if block is not None:
        causes += _ip_block(block, f"{where}.ipBlock")
    return causes


def _cidr(text: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if not isinstance(text, str) or "/" not in text:
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _ip_block(block: Any, where: str) -> list[Cause]:
    if not isinstance(block, dict):
        return [Cause(where, "must be an object")]
    text = block.get("cidr")
    if not text:
        return [Cause(f"{where}.cidr", "Required value", "FieldValueRequired")]
    network = _cidr(text)
    if network is None:
        return [
            Cause(
                f"{where}.cidr",
                f'Invalid value: "{text}": must be a valid CIDR value, '
                "(e.g. 10.9.8.0/24 or 2001:db8::/64)",
            )
        ]
    causes = []
    for i, item in enumerate(block.get("except") or []):
        at = f"{where}.except[{i}]"
        inner = _cidr(item)
        if inner is None:
            causes.append(
                Cause(
                    at,
                    f'Invalid value: "{item}": must be a valid CIDR value, '
                    "(e.g. 10.9.8.0/24 or 2001:db8::/64)",
                )
            )
        elif inner.version != network.version or not _strict_subnet(inner, network):
            causes.append(Cause(at, f'Invalid value: "{item}": must be a strict subset of `cidr`'))
    return causes


def _strict_subnet(
    inner: ipaddress.IPv4Network | ipaddress.IPv6Network,
    outer: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> bool:
    return inner.prefixlen > outer.prefixlen and int(inner.network_address) & int(
        outer.netmask
    ) == int(outer.network_address)


# --------------------------------------------------------------------------- semantics


def _kind(policy: Mapping[str, Any], network: tuple[str, str] | None) -> str:
    return str(policy.get("kind") or ("MultiNetworkPolicy" if network else "NetworkPolicy"))


def selects(
    policy: Mapping[str, Any],
    namespace: str,
    labels: Mapping[str, str],
    network: tuple[str, str] | None = None,
) -> bool:
    """Whether ``policy`` applies to a VM (its namespace and labels) on ``network``. With a
    network (a NAD's namespace and name), the policy is a MultiNetworkPolicy that must name it in
    policy-for; without one, a NetworkPolicy of the pod network. Callers pass the kind that
    fits (list responses do not carry each item's kind)."""
    md = policy.get("metadata") or {}
    if md.get("namespace") != namespace:
        return False
    if network is not None and network not in set(policy_for(policy) or []):
        return False
    return selector_matches(labels, (policy.get("spec") or {}).get("podSelector") or {})


def isolates(policy: Mapping[str, Any], direction: str) -> bool:
    """Whether the policy isolates its VMs for ``direction`` (Ingress or Egress)."""
    types = (policy.get("spec") or {}).get("policyTypes") or ["Ingress"]
    return direction in types


def peer_selects(
    peer: Mapping[str, Any],
    policy: Mapping[str, Any],
    namespace: str,
    labels: Mapping[str, str],
    namespace_labels: Mapping[str, str],
) -> bool:
    """Whether a selector peer (podSelector and/or namespaceSelector) names a VM; an ipBlock
    peer names addresses, not VMs (see ``block_contains``)."""
    if peer.get("ipBlock") is not None:
        return False
    own = str((policy.get("metadata") or {}).get("namespace") or "")
    pods, spaces = peer.get("podSelector"), peer.get("namespaceSelector")
    if spaces is None:
        if namespace != own:
            return False
    elif not selector_matches(namespace_labels, spaces):
        return False
    return pods is None or selector_matches(labels, pods)


def block_contains(block: Mapping[str, Any], address: str) -> bool:
    """Whether ``address`` is in the ipBlock's cidr and in none of its exceptions."""
    ip = ipaddress.ip_address(address)
    whole = ipaddress.ip_network(str(block["cidr"]), strict=False)
    if ip.version != whole.version or ip not in whole:
        return False
    for text in block.get("except") or []:
        cut = ipaddress.ip_network(str(text), strict=False)
        if ip.version == cut.version and ip in cut:
            return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """One side of a flow: a VM, as policies see it."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ips: tuple[str, ...] = ()
    named_ports: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    # not a VM: an address only (a host process, a remote client); only ipBlock peers name it
    external: bool = False


@dataclass(frozen=True)
class Verdict:
    """Whether a flow is allowed, and each policy's say in it, in order."""

    allowed: bool
    reasons: tuple[str, ...]


def _port_matches(
    ports: Sequence[Mapping[str, Any]] | None, port: int, protocol: str, owner: Endpoint
) -> bool:
    if not ports:
        return True
    for entry in ports:
        if str(entry.get("protocol") or "TCP") != protocol:
            continue
        value, end = entry.get("port"), entry.get("endPort")
        if value is None:
            return True
        if isinstance(value, int) and not isinstance(value, bool):
            if value <= port <= (end or value):
                return True
        elif owner.named_ports.get(str(value)) == (protocol, port):
            return True
    return False


def _rule_allows(
    rule: Mapping[str, Any],
    peers_key: str,
    policy: Mapping[str, Any],
    peer: Endpoint,
    peer_ns_labels: Mapping[str, str],
    port: int,
    protocol: str,
    port_owner: Endpoint,
) -> bool:
    if not _port_matches(rule.get("ports"), port, protocol, port_owner):
        return False
    peers = rule.get(peers_key)
    if not peers:
        return True
    for entry in peers:
        if entry.get("ipBlock") is not None:
            if any(block_contains(entry["ipBlock"], ip) for ip in peer.ips):
                return True
        elif not peer.external and peer_selects(
            entry, policy, peer.namespace, peer.labels, peer_ns_labels
        ):
            return True
    return False


def _side(
    direction: str,
    subject: Endpoint,
    peer: Endpoint,
    policies: Sequence[Mapping[str, Any]],
    namespaces: Mapping[str, Mapping[str, str]],
    network: tuple[str, str] | None,
    port: int,
    protocol: str,
    port_owner: Endpoint,
) -> tuple[bool, list[str]]:
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    applying = [
        p
        for p in policies
        if selects(p, subject.namespace, subject.labels, network) and isolates(p, direction)
    ]
    who = f"{subject.namespace}/{subject.name}"
    if not applying:
        return True, [f"{direction.lower()} of {who}: no policy isolates it, so it is open"]
    reasons = []
    allowed = False
    for policy in applying:
        md = policy["metadata"]
        name = f"{_kind(policy, network)} {md['namespace']}/{md['name']}"
        spec_rules = (policy.get("spec") or {}).get(rules_key) or []
        hits = [
            i
            for i, rule in enumerate(spec_rules)
            if _rule_allows(
                rule,
                peers_key,
                policy,
                peer,
                namespaces.get(peer.namespace, {}),
                port,
                protocol,
                port_owner,
            )
        ]
        if hits:
            allowed = True
            listed = ", ".join(f"{rules_key}[{i}]" for i in hits)
            reasons.append(f"{direction.lower()} of {who}: {name} allows it ({listed})")
        else:
            reasons.append(
                f"{direction.lower()} of {who}: {name} selects it and none of its "
                f"{len(spec_rules)} {rules_key} rules matches"
            )
    if not allowed:
        reasons.append(f"{direction.lower()} of {who}: denied (isolated, and no rule allows it)")
    return allowed, reasons


def explain(
    policies: Sequence[Mapping[str, Any]],
    source: Endpoint,
    destination: Endpoint,
    port: int,
    *,
    protocol: str = "TCP",
    namespaces: Mapping[str, Mapping[str, str]] | None = None,
    network: tuple[str, str] | None = None,
) -> Verdict:
    """Whether ``source`` may open a connection to ``destination``'s ``port`` on ``network``
    (None: the pod network): the source's egress and the destination's ingress must both allow
    it, as upstream's semantics say; replies of an allowed connection always pass."""
    spaces = namespaces or {}
    out_ok, out_why = _side(
        "Egress", source, destination, policies, spaces, network, port, protocol, destination
    )
    in_ok, in_why = _side(
        "Ingress", destination, source, policies, spaces, network, port, protocol, destination
    )
    return Verdict(out_ok and in_ok, (*out_why, *in_why))


def _split_ref(text: str, namespace: str) -> tuple[str, str]:
    ns, _, name = text.rpartition("/")
    return ns or namespace, name


def endpoint_of(vmi: Mapping[str, Any], network: tuple[str, str] | None) -> Endpoint:
    """A VMI as policies see it on ``network`` (None: the pod network): its labels, its
    addresses and named ports on the interfaces of that network."""
    md, spec, status = vmi["metadata"], vmi.get("spec") or {}, vmi.get("status") or {}
    networks = {n.get("name"): n for n in spec.get("networks") or []}
    wanted = set()
    for name, entry in networks.items():
        multus = entry.get("multus")
        if network is None and "pod" in entry:
            wanted.add(name)
        elif network is not None and multus:
            ns, nad = _split_ref(str(multus.get("networkName") or ""), str(md["namespace"]))
            if (ns, nad) == network:
                wanted.add(name)
    ips: list[str] = []
    for iface in status.get("interfaces") or []:
        if iface.get("name") in wanted:
            ips += [str(ip) for ip in iface.get("ipAddresses") or [iface.get("ipAddress")] if ip]
    ports: dict[str, tuple[str, int]] = {}
    for iface in ((spec.get("domain") or {}).get("devices") or {}).get("interfaces") or []:
        if iface.get("name") in wanted:
            for p in iface.get("ports") or []:
                if p.get("name") and p.get("port"):
                    ports[str(p["name"])] = (str(p.get("protocol") or "TCP"), int(p["port"]))
    return Endpoint(
        namespace=str(md["namespace"]),
        name=str(md["name"]),
        labels=dict(md.get("labels") or {}),
        ips=tuple(ips),
        named_ports=ports,
    )
