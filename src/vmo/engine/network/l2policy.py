"""MultiNetworkPolicy on layer-2 (bridge) networks: the policies compiled to one nftables table.

How frames are caught. The host's bridges carry the VMs' frames from tap to tap. nftables'
``bridge`` family would see the ports, but this kernel has no bridge conntrack
(``nf_conntrack_bridge``), and a policy must be stateful: the replies of an allowed
connection pass, as upstream's implementations let them. So the rules live in an ``inet``
table whose ``forward`` hook sees bridged IPv4/IPv6 packets through br_netfilter
(``net.bridge.bridge-nf-call-iptables`` and ``-ip6tables`` = 1, which Kubernetes requires of
bridge CNIs anyway, and which ``apply`` sets), with conntrack. There the bridge port is not
visible, so a VM is known by its interface's MAC: frames *to* it (``ether daddr``) are its
ingress, frames *from* it (``ether saddr``) its egress. A VM could claim another's MAC, so a
network with policies needs ``macspoofchk`` on its ports (the NAD's setting; the docs say so).
ARP is not IP and is never filtered, as on a real switch port.

What one node writes. ``compile_table`` (pure) takes every member of the policies' networks
(a VM's interface: namespace, labels, network, MAC, IPs, named ports), the namespaces' labels
and the policies, and renders the table for the members whose taps are on this node:

- per (policy, rule, direction), one named set of the peers' addresses (the peer VMs' IPs on
  the policy's networks, and ipBlock CIDRs with their ``except`` cut out), one per family;
- per isolated member and direction, a chain: one ``accept`` line per rule and protocol
  (peers' set, ports and port ranges; no ``from``/``to`` means any peer, no ``ports`` any port),
  then ``drop``. Several policies add up, as upstream's do.

``apply`` loads it in one ``nft -f`` transaction that deletes and re-creates the table, so a
restarted agent ends with exactly the expected ruleset and nothing left over; with nothing to
isolate the table is deleted. Rules are written by hand because no library renders nftables'
language; the text goes to ``nft`` on stdin (argv only, no shell).
"""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmo.api.netpol import isolates, peer_selects, policy_for, selects

__all__ = [
    "BR_NETFILTER",
    "Member",
    "NftError",
    "Table",
    "apply",
    "compile_table",
    "table_name",
    "unavailable",
]

BR_NETFILTER = (
    Path("/proc/sys/net/bridge/bridge-nf-call-iptables"),
    Path("/proc/sys/net/bridge/bridge-nf-call-ip6tables"),
)
_NFT_TIMEOUT = 30.0
_PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class NftError(Exception):
    """nft is missing, br_netfilter cannot be enabled, or nft refused the ruleset."""


@dataclass(frozen=True)
class Member:
    """A VM's interface on a secondary network."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    network: tuple[str, str]  # the NetworkAttachmentDefinition's (namespace, name)
    mac: str
    ips: tuple[str, ...] = ()
    # named ports the VM declares (KubeVirt interface ports): name -> (protocol, port)
    named_ports: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    local: bool = True  # its tap is on this node: this node enforces its rules


@dataclass(frozen=True)
class Table:
    """A compiled table: its nft script, and counts for status."""

    name: str
    script: str
    members: int  # isolated members on this node
    rules: int  # accept lines
    sets: int


def table_name(node: str) -> str:
    """One table per node agent (agents sharing a host must not overwrite each other)."""
    return "vmo_mnp_" + hashlib.sha256(node.encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- selection


def _networks(policy: Mapping[str, Any]) -> set[tuple[str, str]]:
    return set(policy_for(policy) or [])


def _selects(policy: Mapping[str, Any], member: Member) -> bool:
    return selects(policy, member.namespace, member.labels, member.network)


def _peer_members(
    peer: Mapping[str, Any],
    policy: Mapping[str, Any],
    members: Sequence[Member],
    namespaces: Mapping[str, Mapping[str, str]],
) -> list[Member]:
    networks = _networks(policy)
    return [
        m
        for m in members
        if m.network in networks
        and peer_selects(peer, policy, m.namespace, m.labels, namespaces.get(m.namespace, {}))
    ]


def _block(block: Mapping[str, Any]) -> list[Net]:
    whole = ipaddress.ip_network(str(block["cidr"]), strict=False)
    pieces: list[Net] = [whole]
    for text in block.get("except") or []:
        cut = ipaddress.ip_network(str(text), strict=False)
        next_pieces: list[Net] = []
        for piece in pieces:
            if piece.version == cut.version and cut.subnet_of(piece):  # type: ignore[arg-type]
                next_pieces.extend(piece.address_exclude(cut))  # type: ignore[arg-type]
            else:
                next_pieces.append(piece)
        pieces = next_pieces
    return pieces


def _peers(
    peers: Sequence[Mapping[str, Any]] | None,
    policy: Mapping[str, Any],
    members: Sequence[Member],
    namespaces: Mapping[str, Mapping[str, str]],
) -> list[Net] | None:
    """The peers' addresses; None when the rule names no peers (anyone)."""
    if not peers:
        return None
    nets: list[Net] = []
    for peer in peers:
        if peer.get("ipBlock") is not None:
            nets.extend(_block(peer["ipBlock"]))
            continue
        for m in _peer_members(peer, policy, members, namespaces):
            nets.extend(ipaddress.ip_network(ip) for ip in m.ips)
    return list(ipaddress.collapse_addresses([n for n in nets if n.version == 4])) + list(
        ipaddress.collapse_addresses([n for n in nets if n.version == 6])
    )


def _ports(
    ports: Sequence[Mapping[str, Any]] | None, owners: Sequence[Member]
) -> dict[str, list[str]] | None:
    """protocol -> port expressions; None when the rule names no ports (any port). A named
    port resolves on ``owners`` (the selected VM for ingress, the peers for egress)."""
    if not ports:
        return None
    out: dict[str, list[str]] = {}
    for port in ports:
        protocol = str(port.get("protocol") or "TCP")
        value, end = port.get("port"), port.get("endPort")
        if value is None:
            out.setdefault(protocol, []).append("1-65535")
        elif isinstance(value, int):
            out.setdefault(protocol, []).append(f"{value}-{end}" if end else str(value))
        else:
            for owner in owners:
                named = owner.named_ports.get(str(value))
                if named is not None and named[0] == protocol:
                    out.setdefault(protocol, []).append(str(named[1]))
            out.setdefault(protocol, [])  # unresolved: the protocol matches nothing
    return {p: sorted(set(v), key=_port_key) for p, v in out.items()}


def _port_key(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


# --------------------------------------------------------------------------- rendering


def _set_block(name: str, nets: Sequence[Net], version: int) -> str:
    kind = "ipv4_addr" if version == 4 else "ipv6_addr"
    chosen = [str(n) for n in nets if n.version == version]
    elements = f" elements = {{ {', '.join(chosen)} }};" if chosen else ""
    return f"  set {name} {{ type {kind}; flags interval;{elements} }}\n"


def _chain_id(member: Member) -> str:
    key = f"{member.namespace}/{member.name}/{member.network[0]}/{member.network[1]}/{member.mac}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def compile_table(
    node: str,
    members: Iterable[Member],
    policies: Iterable[Mapping[str, Any]],
    namespaces: Mapping[str, Mapping[str, str]] | None = None,
) -> Table:
    """The table for this node's members: see the module's docstring."""
    everyone = sorted(members, key=lambda m: (m.namespace, m.name, m.network, m.mac))
    spaces = namespaces or {}
    ordered = sorted(
        policies,
        key=lambda p: ((p.get("metadata") or {}).get("namespace", ""), p["metadata"]["name"]),
    )
    name = table_name(node)
    sets: list[str] = []
    jumps: list[str] = []
    chains: list[str] = []
    rules = isolated = 0
    set_names: dict[tuple[int, int, str], str] = {}

    def peer_sets(pi: int, ri: int, direction: str, nets: list[Net]) -> str:
        key = (pi, ri, direction)
        if key not in set_names:
            base = f"p{pi}_{direction[0]}{ri}"
            set_names[key] = base
            sets.append(_set_block(f"{base}_v4", nets, 4))
            sets.append(_set_block(f"{base}_v6", nets, 6))
        return set_names[key]

    for member in everyone:
        if not member.local:
            continue
        mine = [(pi, p) for pi, p in enumerate(ordered) if _selects(p, member)]
        for direction, side, peer_key, rules_key in (
            ("Ingress", "daddr", "from", "ingress"),
            ("Egress", "saddr", "to", "egress"),
        ):
            applying = [(pi, p) for pi, p in mine if isolates(p, direction)]
            if not applying:
                continue
            isolated += 1
            chain = f"{'in' if direction == 'Ingress' else 'out'}_{_chain_id(member)}"
            jumps.append(f"    ether {side} {member.mac.lower()} jump {chain}\n")
            lines: list[str] = []
            peer_field = "saddr" if direction == "Ingress" else "daddr"
            for pi, policy in applying:
                for ri, rule in enumerate((policy.get("spec") or {}).get(rules_key) or []):
                    peers = _peers(rule.get(peer_key), policy, everyone, spaces)
                    owners = (
                        [member]
                        if direction == "Ingress"
                        else _peer_members({"podSelector": {}}, policy, everyone, spaces)
                    )
                    ports = _ports(rule.get("ports"), owners)
                    matches: list[str] = []
                    if peers is None:
                        matches = [""]
                    else:
                        base = peer_sets(pi, ri, direction, peers)
                        matches = [
                            f"ip {peer_field} @{base}_v4 ",
                            f"ip6 {peer_field} @{base}_v6 ",
                        ]
                    for match in matches:
                        if ports is None:
                            lines.append(f"    {match}accept\n")
                            continue
                        for protocol, values in sorted(ports.items()):
                            if not values:
                                continue
                            proto = _PROTOCOLS[protocol]
                            lines.append(
                                f"    {match}{proto} dport {{ {', '.join(values)} }} accept\n"
                            )
            rules += len(lines)
            chains.append(f"  chain {chain} {{\n{''.join(lines)}    drop\n  }}\n")
    if not isolated:
        return Table(name, "", 0, 0, 0)
    forward = (
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        "    ct state established,related accept\n"
        f"{''.join(jumps)}"
        "  }\n"
    )
    body = "".join(sets) + forward + "".join(chains)
    script = f"table inet {name} {{\n}}\ndelete table inet {name}\ntable inet {name} {{\n{body}}}\n"
    return Table(name, script, isolated, rules, len(sets))


# --------------------------------------------------------------------------- I/O


def _nft(script: str, *, check: bool = False) -> None:
    argv = ["nft", *(["-c"] if check else []), "-f", "-"]
    proc = subprocess.run(
        argv, input=script, capture_output=True, text=True, timeout=_NFT_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise NftError(f"nft refused the ruleset: {proc.stderr.strip()}")


def _br_netfilter() -> None:
    for path in BR_NETFILTER:
        try:
            if path.read_text().strip() != "1":
                path.write_text("1\n")
        except OSError as exc:
            raise NftError(
                f"cannot enable br_netfilter ({path}): {exc}; bridged traffic would pass unfiltered"
            ) from exc


def unavailable() -> str | None:
    """Why this host cannot enforce the policies (no nft, no br_netfilter), or None."""
    if shutil.which("nft") is None:
        return "nft is not installed (Debian's nftables package)"
    missing = [str(path) for path in BR_NETFILTER if not path.exists()]
    if missing:
        return f"br_netfilter is not available ({', '.join(missing)} missing)"
    return None


def apply(table: Table, *, node: str | None = None, check_only: bool = False) -> None:
    """Loads ``table`` atomically (deleting the old one); an empty table deletes it."""
    if shutil.which("nft") is None:
        raise NftError("nft is not installed (Debian's nftables package)")
    name = table.name or table_name(node or "")
    if not table.script:
        _nft(f"table inet {name} {{\n}}\ndelete table inet {name}\n", check=check_only)
        return
    if not check_only:
        _br_netfilter()
    _nft(table.script, check=check_only)
