"""ClusterIP and NodePort allocation for core v1 Services, as the API server does on create.

Pure functions for an admission hook: ``allocate_service`` fills ``spec.clusterIP(s)`` and each
port's ``nodePort`` where they are missing, and refuses explicit requests that are out of range or
taken with upstream's messages. The caller gathers what is in use with ``addresses_in_use``.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable

from vmo.api.types import JSON, Cause

__all__ = [
    "DEFAULT_SERVICE_CIDR",
    "NODE_PORT_RANGE",
    "AllocationError",
    "addresses_in_use",
    "allocate_cluster_ip",
    "allocate_node_port",
    "allocate_service",
    "cluster_ip_causes",
    "kubernetes_service_ip",
    "node_port_causes",
]

DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
NODE_PORT_RANGE = (30000, 32767)
HEADLESS = "None"
_NODE_PORT_TYPES = ("NodePort", "LoadBalancer")


class AllocationError(Exception):
    """The range is full: no ClusterIP or NodePort is left."""


def kubernetes_service_ip(cidr: str = DEFAULT_SERVICE_CIDR) -> str:
    """The first address of the range, reserved for the ``kubernetes`` Service."""
    return str(ipaddress.ip_network(cidr)[1])


def allocate_cluster_ip(
    used: set[str], cidr: str = DEFAULT_SERVICE_CIDR, *, rng: random.Random | None = None
) -> str:
    """A free address of ``cidr``: never the network, broadcast or the reserved first address.

    Without ``rng`` the lowest free address (reproducible); with it a random one, as upstream.
    """
    network = ipaddress.ip_network(cidr)
    reserved = {network.network_address, network.broadcast_address, network[1]}
    taken = {ipaddress.ip_address(ip) for ip in used if _parses(ip)}
    size = network.num_addresses
    start = rng.randrange(size) if rng is not None else 0
    for offset in range(size):
        candidate = network[(start + offset) % size]
        if candidate not in reserved and candidate not in taken:
            return str(candidate)
    raise AllocationError(f"range {cidr} is full")


def _parses(ip: str) -> bool:
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


def allocate_node_port(
    used: set[int],
    *,
    rng: random.Random | None = None,
    port_range: tuple[int, int] = NODE_PORT_RANGE,
) -> int:
    """A free port of ``port_range`` (inclusive): the lowest, or a random one given ``rng``."""
    low, high = port_range
    size = high - low + 1
    start = rng.randrange(size) if rng is not None else 0
    for offset in range(size):
        candidate = low + (start + offset) % size
        if candidate not in used:
            return candidate
    raise AllocationError(f"no free node port in {low}-{high}")


def cluster_ip_causes(
    ip: str, used: set[str], cidr: str = DEFAULT_SERVICE_CIDR, *, field: str = "spec.clusterIPs"
) -> list[Cause]:
    """Why an explicitly requested ClusterIP cannot be had (empty: it can)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return [Cause(field, f"{ip!r}: must be a valid IP address")]
    network = ipaddress.ip_network(cidr)
    if address not in network or address in (network.network_address, network.broadcast_address):
        return [
            Cause(
                field,
                f"failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. "
                f"The range of valid IPs is {cidr}",
            )
        ]
    if ip in used:
        return [Cause(field, f"failed to allocate IP {ip}: provided IP is already allocated")]
    return []


def node_port_causes(
    port: int,
    used: set[int],
    *,
    field: str,
    port_range: tuple[int, int] = NODE_PORT_RANGE,
) -> list[Cause]:
    """Why an explicitly requested NodePort cannot be had (empty: it can)."""
    low, high = port_range
    if not low <= port <= high:
        return [
            Cause(
                field,
                f"{port}: provided port is not in the valid range. "
                f"The range of valid ports is {low}-{high}",
            )
        ]
    if port in used:
        return [Cause(field, f"{port}: provided port is already allocated")]
    return []


def addresses_in_use(
    services: Iterable[JSON], *, exclude: tuple[str, str] | None = None
) -> tuple[set[str], set[int]]:
    """ClusterIPs and NodePorts held by ``services``, except ``exclude`` = (namespace, name)."""
    ips: set[str] = set()
    ports: set[int] = set()
    for svc in services:
        md = svc.get("metadata") or {}
        if exclude is not None and (md.get("namespace"), md.get("name")) == exclude:
            continue
        spec = svc.get("spec") or {}
        ips |= {
            ip
            for ip in [spec.get("clusterIP"), *(spec.get("clusterIPs") or [])]
            if ip and ip != HEADLESS
        }
        ports |= {int(p["nodePort"]) for p in spec.get("ports") or [] if p.get("nodePort")}
    return ips, ports


def allocate_service(
    svc: JSON,
    *,
    used_ips: set[str],
    used_ports: set[int],
    cidr: str = DEFAULT_SERVICE_CIDR,
    rng: random.Random | None = None,
) -> list[Cause]:
    """Fills ``svc``'s missing ClusterIP and NodePorts in place; refuses taken explicit ones.

    ExternalName Services get neither; ``clusterIP: None`` (headless) is kept as is. On update the
    caller passes in-use sets without this Service's own addresses, so it keeps them.
    """
    spec = svc.setdefault("spec", {})
    if spec.get("type") == "ExternalName":
        return []
    causes = _assign_cluster_ip(spec, used_ips, cidr, rng)
    if spec.get("type") in _NODE_PORT_TYPES:
        causes += _assign_node_ports(spec, set(used_ports), rng)
    return causes


def _assign_cluster_ip(
    spec: JSON, used: set[str], cidr: str, rng: random.Random | None
) -> list[Cause]:
    requested = spec.get("clusterIP") or next(iter(spec.get("clusterIPs") or []), "")
    if requested == HEADLESS:
        spec["clusterIP"], spec["clusterIPs"] = HEADLESS, [HEADLESS]
        return []
    if requested:
        causes = cluster_ip_causes(requested, used, cidr)
        if causes:
            return causes
        ip = requested
    else:
        ip = allocate_cluster_ip(used, cidr, rng=rng)
    spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
    return []


def _assign_node_ports(spec: JSON, used: set[int], rng: random.Random | None) -> list[Cause]:
    causes: list[Cause] = []
    ports = spec.get("ports") or []
    own: dict[int, set[str]] = {}  # one nodePort may serve a TCP and a UDP port, as upstream
    for index, port in enumerate(ports):
        requested, protocol = port.get("nodePort"), str(port.get("protocol") or "TCP")
        if not requested:
            continue
        field = f"spec.ports[{index}].nodePort"
        if protocol in own.get(int(requested), set()):
            causes.append(Cause(field, f"{requested}: duplicate nodePort", "FieldValueDuplicate"))
        elif int(requested) not in own:
            causes += node_port_causes(int(requested), used, field=field)
        own.setdefault(int(requested), set()).add(protocol)
    used |= set(own)
    for port in ports:
        if not port.get("nodePort"):
            port["nodePort"] = allocate_node_port(used, rng=rng)
            used.add(port["nodePort"])
    return causes
