"""NetworkPolicy on the embedded pod network: per-VM cgroups, one nftables table per node for
egress, and the checks VMO's Service forwarders make for both directions.

Why not frames. The embedded pod network is QEMU's user networking: a guest's connection
leaves as a socket of its QEMU process on the host, and comes in through a ``hostfwd`` port
that QEMU listens on. There is no bridge to filter, so the policy is enforced where those
sockets are:

- **Egress, by cgroup.** Each VM's QEMU runs in a cgroup of its own,
  ``vmo/<node>/<namespace>/<vmi>`` under the host's cgroup2 mount (``Cgroups``). The node's
  ``inet vmo_np_<hash>`` table (``compile_pod_table``) sends the output of each egress-isolated
  VM's sockets (nftables' ``socket cgroupv2``) to a chain of its own: replies of established
  flows pass; so do connections to a Service's ClusterIP port or a NodePort, which VMO's
  forwarder then checks against the backend it picks (a policy sees the backend, as it does
  behind kube-proxy's DNAT); then one ``accept`` line per rule and protocol (``ipBlock``
  destinations, in one set per policy, rule and family); then ``reject``. A pod selector names
  no address here (VMs are not addressable on this network but through Services), so it
  allows nothing at this layer, only through the forwarders.
- **No way around the forwarders.** A VM could reach another's hostfwd port on the host's
  loopback directly. Connections that VMs' sockets open get a conntrack mark on the way out,
  and a new marked connection into the sockets of a VM that a policy isolates for ingress is
  refused on the way in (the proxy's own connections carry no mark).
- **Live migration.** A migration's memory and disk streams go from the source QEMU to the
  target QEMU on the host's loopback, to ports of ``MIGRATION_PORTS`` only: both chains let
  them through first, so a VM that policy isolates still migrates.
- **Ingress, at the forwarders.** VMO's Service proxy asks ``PodPolicyGate`` before it
  connects a client to a backend VM: the backend's ingress and, when the client is a VM, the
  client's egress (``vmo.api.netpol.explain``). A client is known to be a VM by its socket's
  cgroup (``peer_vm``: the kernel's socket diagnostics, through ``ss``); any other client is
  an address, which only ``ipBlock`` peers match. A connection that policy denies is reset.

Port-forward (``virtctl port-forward``) is not subject to NetworkPolicy, as upstream's is not
(it reaches the pod's own loopback): the subresource's RBAC guards it.

The ruleset text is written by hand because no library renders nftables' language; it goes to
``nft`` on stdin (argv only, no shell), loaded atomically as ``l2policy`` loads its table.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmo.api.netpol import Endpoint, Verdict, endpoint_of, explain, isolates, selects
from vmo.engine.network.l2policy import Net, NftError, Table, _block, _nft, _ports, _set_block
from vmo.engine.network.services import Backend
from vmo.engine.qemu.migration import MIGRATION_PORTS

log = logging.getLogger(__name__)

__all__ = [
    "Cgroups",
    "PodMember",
    "PodPolicyGate",
    "apply_pod_table",
    "compile_pod_table",
    "peer_vm",
    "pod_table_name",
]

JSON = dict[str, Any]
CGROUP_BASE = "vmo"
NFT_CGROUP_ROOT = Path("/sys/fs/cgroup")  # nft resolves `socket cgroupv2` paths under it
_SS_TIMEOUT = 5.0
# a live migration's streams, QEMU to QEMU on the loopback, are no guest's traffic
_MIGRATION = f"ip daddr 127.0.0.1 tcp dport {MIGRATION_PORTS.start}-{MIGRATION_PORTS.stop - 1}"
# the conntrack mark bit of connections a VM's socket opened (the guard's input chain reads it)
VM_MARK = 0x20000000
_PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


# --------------------------------------------------------------------------- cgroups


def _cgroup2_mount(mountinfo: str) -> tuple[Path, str] | None:
    """(mount point, the root of the hierarchy it shows) of the first cgroup2 mount."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep or not right.startswith("cgroup2 "):
            continue
        fields = left.split()
        return Path(fields[4]), fields[3]
    return None


@dataclass(frozen=True)
class Cgroups:
    """Where VMs' cgroups live: ``mount`` is the host's cgroup2 mount, ``depth`` the level of
    its root in the whole hierarchy (0 unless this runs in a cgroup namespace's subtree)."""

    mount: Path
    depth: int = 0

    @classmethod
    def detect(cls, mountinfo: Path = Path("/proc/self/mountinfo")) -> Cgroups | None:
        """The host's cgroup2 hierarchy, when it is mounted under /sys/fs/cgroup (where nft
        looks for the paths it matches) and writable; None otherwise."""
        try:
            found = _cgroup2_mount(mountinfo.read_text())
        except OSError:
            return None
        if found is None:
            return None
        mount, root = found
        if mount != NFT_CGROUP_ROOT and NFT_CGROUP_ROOT not in mount.parents:
            return None
        if not os.access(mount, os.W_OK):
            return None
        depth = len([p for p in root.split("/") if p])
        return cls(mount, depth)

    def relative(self, node: str, namespace: str, name: str) -> str:
        """The VM's cgroup below the mount; each part is a Kubernetes name, never a path."""
        parts = (CGROUP_BASE, node, namespace, name)
        for part in parts:
            if not part or "/" in part or part in (".", ".."):
                raise ValueError(f"not a cgroup name: {part!r}")
        return "/".join(parts)

    def path(self, node: str, namespace: str, name: str) -> Path:
        return self.mount / self.relative(node, namespace, name)

    def nft_match(self, node: str, namespace: str, name: str) -> str:
        """``socket cgroupv2 level N "path"`` for the VM's cgroup: the path as nft reads it
        (below /sys/fs/cgroup), the level counted from the hierarchy's own root."""
        below = self.mount.relative_to(NFT_CGROUP_ROOT)
        relative = self.relative(node, namespace, name)
        text = f"{below}/{relative}" if str(below) != "." else relative
        level = self.depth + 4
        return f'socket cgroupv2 level {level} "{text}"'

    def nft_base_match(self) -> str:
        """The match for every VM's sockets (the ``vmo`` cgroup and all below it)."""
        below = self.mount.relative_to(NFT_CGROUP_ROOT)
        text = f"{below}/{CGROUP_BASE}" if str(below) != "." else CGROUP_BASE
        return f'socket cgroupv2 level {self.depth + 1} "{text}"'

    def create(self, node: str, namespace: str, name: str) -> Path:
        path = self.path(node, namespace, name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def place(self, path: Path, pid: int) -> None:
        """Moves the process (all its threads) into ``path``."""
        (path / "cgroup.procs").write_text(f"{pid}\n")

    def remove(self, node: str, namespace: str, name: str) -> None:
        """The VM's cgroup, then its namespace's, node's and ``vmo`` when empty (best effort: a
        cgroup with a process left in it stays, and the next start reuses it)."""
        path = self.path(node, namespace, name)
        for each in (path, path.parent, path.parent.parent, path.parent.parent.parent):
            try:
                each.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break

    def owner(self, cgroup: str) -> tuple[str, str, str] | None:
        """(node, namespace, VMI) of a cgroup path as the kernel reports it (``/vmo/...``)."""
        parts = [p for p in cgroup.split("/") if p]
        below = self.mount.relative_to(NFT_CGROUP_ROOT)
        if str(below) != "." and parts[: len(below.parts)] == list(below.parts):
            parts = parts[len(below.parts) :]
        if len(parts) != 4 or parts[0] != CGROUP_BASE:
            return None
        return parts[1], parts[2], parts[3]


# --------------------------------------------------------------------------- the egress table


@dataclass(frozen=True)
class PodMember:
    """A VM whose QEMU runs on this node, as the pod network's policies see it."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    match: str  # its cgroup, as an nft match (``Cgroups.nft_match``)


@dataclass(frozen=True)
class ServicePorts:
    """Where a VM may always connect, leaving the decision to the forwarder: each ClusterIP
    port, and the NodePorts on any of the host's own addresses."""

    cluster: tuple[tuple[str, str, int], ...] = ()  # (ip, protocol, port)
    node: tuple[tuple[str, int], ...] = ()  # (protocol, port)

    @classmethod
    def of(cls, services: Iterable[Mapping[str, Any]]) -> ServicePorts:
        cluster: set[tuple[str, str, int]] = set()
        node: set[tuple[str, int]] = set()
        for svc in services:
            spec = svc.get("spec") or {}
            ip = str(spec.get("clusterIP") or "")
            for port in spec.get("ports") or []:
                proto = str(port.get("protocol") or "TCP")
                if proto not in ("TCP", "UDP"):
                    continue
                with contextlib.suppress(ValueError):
                    if ip and ip != "None" and ipaddress.ip_address(ip).version == 4:
                        cluster.add((ip, proto, int(port["port"])))
                if port.get("nodePort"):
                    node.add((proto, int(port["nodePort"])))
        return cls(tuple(sorted(cluster)), tuple(sorted(node)))


def pod_table_name(node: str) -> str:
    return "vmo_np_" + hashlib.sha256(node.encode()).hexdigest()[:10]


def _blocks(peers: Sequence[Mapping[str, Any]] | None) -> list[Net] | None:
    """The ipBlock destinations of a rule (None: any destination)."""
    if not peers:
        return None
    nets: list[Net] = []
    for peer in peers:
        if peer.get("ipBlock") is not None:
            nets.extend(_block(peer["ipBlock"]))
    v4 = ipaddress.collapse_addresses([n for n in nets if n.version == 4])
    v6 = ipaddress.collapse_addresses([n for n in nets if n.version == 6])
    return [*v4, *v6]


def compile_pod_table(
    node: str,
    members: Iterable[PodMember],
    policies: Iterable[Mapping[str, Any]],
    services: ServicePorts | None = None,
    *,
    every_vm: str = "",
) -> Table:
    """The table for this node's VMs: see the module's docstring. ``every_vm`` matches every
    VM's sockets (``Cgroups.nft_base_match``): with it, a connection one VM opens straight to
    another's sockets (the host side of QEMU's hostfwd ports, bypassing the forwarders) is
    refused when the receiving VM is isolated for ingress."""
    ordered = sorted(
        policies,
        key=lambda p: ((p.get("metadata") or {}).get("namespace", ""), p["metadata"]["name"]),
    )
    name = pod_table_name(node)
    services = services or ServicePorts()
    sets: list[str] = []
    jumps: list[str] = []
    chains: list[str] = []
    rules = isolated = 0
    made: dict[tuple[int, int], str] = {}

    def peer_set(pi: int, ri: int, nets: list[Net]) -> str:
        if (pi, ri) not in made:
            base = made[(pi, ri)] = f"p{pi}_e{ri}"
            sets.append(_set_block(f"{base}_v4", nets, 4))
            sets.append(_set_block(f"{base}_v6", nets, 6))
        return made[(pi, ri)]

    guards: list[str] = []
    everyone = sorted(members, key=lambda m: (m.namespace, m.name))
    for member in everyone:
        if every_vm and any(
            selects(p, member.namespace, member.labels) and isolates(p, "Ingress") for p in ordered
        ):
            guards += [
                f"    {member.match} meta l4proto tcp reject with tcp reset\n",
                f"    {member.match} reject with icmpx admin-prohibited\n",
            ]
    for member in everyone:
        applying = [
            (pi, p)
            for pi, p in enumerate(ordered)
            if selects(p, member.namespace, member.labels) and isolates(p, "Egress")
        ]
        if not applying:
            continue
        isolated += 1
        chain = (
            "out_" + hashlib.sha256(f"{member.namespace}/{member.name}".encode()).hexdigest()[:12]
        )
        jumps.append(f"    {member.match} jump {chain}\n")
        lines = [
            "    ct state established,related accept\n",
            "    ip daddr . meta l4proto . th dport @services accept\n",
            "    fib daddr type local meta l4proto . th dport @nodeports accept\n",
        ]
        for pi, policy in applying:
            for ri, rule in enumerate((policy.get("spec") or {}).get("egress") or []):
                nets = _blocks(rule.get("to"))
                # named ports name the destination VM's ports: ipBlock destinations have none
                ports = _ports(rule.get("ports"), [])
                if nets is not None and not nets:
                    continue  # it names VMs only: the forwarders decide those
                matches = [""] if nets is None else []
                if nets is not None:
                    base = peer_set(pi, ri, nets)
                    matches = [f"ip daddr @{base}_v4 ", f"ip6 daddr @{base}_v6 "]
                for match in matches:
                    if ports is None:
                        lines.append(f"    {match}accept\n")
                        rules += 1
                        continue
                    for protocol, values in sorted(ports.items()):
                        if values:
                            proto = _PROTOCOLS[protocol]
                            lines.append(
                                f"    {match}{proto} dport {{ {', '.join(values)} }} accept\n"
                            )
                            rules += 1
        lines += [
            "    meta l4proto tcp reject with tcp reset\n",
            "    reject with icmpx admin-prohibited\n",
        ]
        chains.append(f"  chain {chain} {{\n{''.join(lines)}  }}\n")
    if not isolated and not guards:
        return Table(name, "", 0, 0, 0)
    cluster = ", ".join(f"{ip} . {_PROTOCOLS[p]} . {port}" for ip, p, port in services.cluster)
    nodeports = ", ".join(f"{_PROTOCOLS[p]} . {port}" for p, port in services.node)
    sets.append(
        "  set services { type ipv4_addr . inet_proto . inet_service;"
        + (f" elements = {{ {cluster} }};" if cluster else "")
        + " }\n"
    )
    sets.append(
        "  set nodeports { type inet_proto . inet_service;"
        + (f" elements = {{ {nodeports} }};" if nodeports else "")
        + " }\n"
    )
    mark = f"    {every_vm} ct mark set ct mark or {VM_MARK:#x}\n" if guards else ""
    # established flows leave at once: every decision is made on a connection's first packet
    output = (
        "  chain output {\n"
        "    type filter hook output priority filter; policy accept;\n"
        "    ct state established,related accept\n"
        f"    {_MIGRATION} accept\n"
        f"{mark}{''.join(jumps)}"
        "  }\n"
    )
    if guards:
        output += (
            "  chain input {\n"
            "    type filter hook input priority filter; policy accept;\n"
            "    ct state established,related accept\n"
            f"    {_MIGRATION} accept\n"
            f"    ct state new ct mark and {VM_MARK:#x} == {VM_MARK:#x} jump from_vm\n"
            "  }\n"
            f"  chain from_vm {{\n{''.join(guards)}  }}\n"
        )
    body = "".join(sets) + output + "".join(chains)
    script = f"table inet {name} {{\n}}\ndelete table inet {name}\ntable inet {name} {{\n{body}}}\n"
    return Table(name, script, isolated, rules, len(sets))


def apply_pod_table(table: Table, *, check_only: bool = False) -> None:
    """Loads ``table`` atomically (deleting the old one); an empty table deletes it."""
    if shutil.which("nft") is None:
        raise NftError("nft is not installed (Debian's nftables package)")
    if not table.script:
        _nft(f"table inet {table.name} {{\n}}\ndelete table inet {table.name}\n", check=check_only)
        return
    _nft(table.script, check=check_only)


# --------------------------------------------------------------------------- the forwarders


_SS_CGROUP = re.compile(r"cgroup:(\S+)")


def peer_cgroup(proto: str, peer: tuple[str, int], local: tuple[str, int]) -> str | None:
    """The cgroup of the local socket at ``peer`` whose other end is ``local`` (the kernel's
    socket diagnostics, through ``ss``); None when no local socket is at ``peer``."""
    flag = "-t" if proto == "TCP" else "-u"
    argv = ["ss", "-H", "-n", flag, "--cgroup", "src", f"{peer[0]}:{peer[1]}"]
    argv += ["dst", f"{local[0]}:{local[1]}"] if proto == "TCP" else []
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_SS_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("ss failed: %s", exc)
        return None
    for line in done.stdout.splitlines():
        found = _SS_CGROUP.search(line)
        if found:
            return found.group(1)
    return None


def peer_vm(
    cgroups: Cgroups | None, proto: str, peer: tuple[str, int], local: tuple[str, int]
) -> tuple[str, str] | None:
    """(namespace, VMI) whose QEMU holds the client socket at ``peer``; None for any other
    client (a host process, or a remote address)."""
    if cgroups is None:
        return None
    cgroup = peer_cgroup(proto, peer, local)
    owner = cgroups.owner(cgroup) if cgroup else None
    return None if owner is None else (owner[1], owner[2])


@dataclass
class PodPolicyGate:
    """What the Service forwarders ask before they join a client to a backend VM, from the
    caches of a controller's informers: ``policies()`` the NetworkPolicies, ``vmi(namespace,
    name)`` a VMI, ``namespaces()`` each namespace's labels."""

    policies: Callable[[], list[JSON]]
    vmi: Callable[[str, str], JSON | None]
    namespaces: Callable[[], dict[str, dict[str, str]]]
    cgroups: Cgroups | None = field(default_factory=Cgroups.detect)

    async def allowed(
        self, proto: str, backend: Backend, peer: tuple[str, int], local: tuple[str, int]
    ) -> bool:
        policies = self.policies()
        if not policies:
            return True  # nothing isolates anyone: no need to know the client
        source = await asyncio.to_thread(peer_vm, self.cgroups, proto, peer, local)
        target = (backend.namespace, backend.vmi, backend.guest_port)
        return self.verdict(policies, proto, target, peer, source).allowed

    def verdict(
        self,
        policies: list[JSON],
        proto: str,
        backend: tuple[str, str, int],
        peer: tuple[str, int],
        source_vm: tuple[str, str] | None,
    ) -> Verdict:
        namespace, name, port = backend
        destination = self._endpoint(namespace, name) or Endpoint(namespace, name)
        source = self._endpoint(*source_vm) if source_vm else None
        if source is None:
            source = Endpoint("", peer[0], ips=(peer[0],), external=True)
        return explain(
            policies, source, destination, port, protocol=proto, namespaces=self.namespaces()
        )

    def _endpoint(self, namespace: str, name: str) -> Endpoint | None:
        vmi = self.vmi(namespace, name)
        return None if vmi is None else endpoint_of(vmi, None)
