"""host-local IPAM for layer-2 networks, and the cloud-init network-config that carries it.

The guest has no DHCP server on a VMO bridge, so the address a NAD's ``ipam`` grants is handed to
it through NoCloud network-config (version 2). Leases live in one JSON file under ``flock``; pass
a directory shared by all agents on the host (e.g. ``$VMO_HOME/network``), since agents on one
host share one segment per (bridge, vlan) and must never hand out one address twice.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmo.engine.network.bridge import BridgeNetConf, HostLocalIpam, Route

__all__ = [
    "IpamExhausted",
    "IpamLease",
    "IpamStore",
    "dhcp_ethernet",
    "ipam_address",
    "network_config",
    "owner_key",
    "static_ethernet",
]


class IpamExhausted(Exception):
    """Every address of the range is leased."""


@dataclass(frozen=True)
class IpamLease:
    address: ipaddress.IPv4Interface  # ip/prefix
    gateway: ipaddress.IPv4Address | None
    routes: tuple[Route, ...] = ()


def owner_key(vmi: dict[str, Any], iface: str) -> str:
    """Leases follow ``<namespace>/<vmi name>/<interface>``: a restarted VM gets its address back."""
    md = vmi.get("metadata") or {}
    return f"{md.get('namespace', 'default')}/{md.get('name', '')}/{iface}"


def _pool_key(conf: BridgeNetConf, ipam: HostLocalIpam) -> str:
    # One pool per L2 segment and subnet: two NADs on one segment share addresses.
    return f"{conf.bridge}/{conf.vlan or 0}/{ipam.subnet}"


class IpamStore:
    """``leases.json``: pool key -> {address: owner}."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "ipam-leases.json"

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, str]]]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "ipam.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                pools: dict[str, dict[str, str]] = (
                    json.loads(self.path.read_text()) if self.path.exists() else {}
                )
                before = json.dumps(pools, sort_keys=True)
                yield pools
                if json.dumps(pools, sort_keys=True) != before:
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(pools, indent=1, sort_keys=True))
                    os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def lease(self, pool: str, ipam: HostLocalIpam, owner: str) -> ipaddress.IPv4Address:
        """The owner's address in ``pool``, leasing the lowest free one the first time."""
        with self._locked() as pools:
            leases = pools.setdefault(pool, {})
            for held, holder in leases.items():
                if holder == owner:
                    return ipaddress.IPv4Address(held)
            address = _first_free(ipam, set(leases))
            leases[str(address)] = owner
            return address

    def release(self, owner: str) -> None:
        """Frees every address ``owner`` holds (an owner prefix like ``ns/vmi/`` frees a VMI)."""
        self.release_where(lambda holder: holder == owner or holder.startswith(owner))

    def release_except(self, live_owners: Iterable[str]) -> list[str]:
        """Frees leases of owners not in ``live_owners`` (crash cleanup); returns the freed owners."""
        live = set(live_owners)
        freed: list[str] = []

        def gone(holder: str) -> bool:
            if holder in live:
                return False
            freed.append(holder)
            return True

        self.release_where(gone)
        return freed

    def release_where(self, predicate: Any) -> None:
        with self._locked() as pools:
            for pool, leases in list(pools.items()):
                kept = {a: h for a, h in leases.items() if not predicate(h)}
                if kept:
                    pools[pool] = kept
                else:
                    del pools[pool]

    def leases(self) -> dict[str, dict[str, str]]:
        with self._locked() as pools:
            return {k: dict(v) for k, v in pools.items()}


def _first_free(ipam: HostLocalIpam, taken: set[str]) -> ipaddress.IPv4Address:
    current = ipam.range_start
    while current <= ipam.range_end:
        if current != ipam.gateway and str(current) not in taken:
            return current
        current += 1
    raise IpamExhausted(f"no free address in {ipam.range_start}-{ipam.range_end}")


def ipam_address(
    conf: BridgeNetConf, vmi: dict[str, Any], *, iface: str, store: IpamStore
) -> IpamLease | None:
    """The address (ip/prefix) and gateway ``vmi``'s ``iface`` gets; None on a pure-L2 network."""
    if conf.ipam is None:
        return None
    address = store.lease(_pool_key(conf, conf.ipam), conf.ipam, owner_key(vmi, iface))
    return IpamLease(
        address=ipaddress.IPv4Interface(f"{address}/{conf.ipam.subnet.prefixlen}"),
        gateway=conf.ipam.gateway,
        routes=conf.ipam.routes,
    )


# --- NoCloud network-config v2 --------------------------------------------------------------------


def static_ethernet(mac: str, lease: IpamLease) -> dict[str, Any]:
    """A netplan ``ethernets`` entry giving the NIC with ``mac`` its leased address.

    No default route unless the NAD's ipam asks for one: a secondary network must not steal the
    pod network's default.
    """
    entry: dict[str, Any] = {
        "match": {"macaddress": mac.lower()},
        "addresses": [str(lease.address)],
        "dhcp4": False,
    }
    routes = [
        {"to": str(r.dst), "via": str(r.gw or lease.gateway)}
        for r in lease.routes
        if (r.gw or lease.gateway) is not None
    ]
    if routes:
        entry["routes"] = routes
    return entry


def dhcp_ethernet(mac: str) -> dict[str, Any]:
    """A netplan ``ethernets`` entry for a NIC on the pod network (QEMU's DHCP answers it)."""
    return {"match": {"macaddress": mac.lower()}, "dhcp4": True}


def network_config(ethernets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A NoCloud network-config v2 document (``{"version": 2, "ethernets": ...}``)."""
    return {"version": 2, "ethernets": ethernets}
