"""Layer-2 networks: a CNI ``bridge`` NetworkAttachmentDefinition becomes a host bridge and taps.

``parse_bridge_conf`` reads a NAD's ``spec.config``; ``bridge_plan`` (pure) names the host bridge.
This kernel has neither 802.1Q nor bridge VLAN filtering, so each (bridge, vlan) pair gets a bridge
of its own: frames of one VLAN id can never reach another. The bridge name depends only on
(bridge, vlan), not on the node, so agents sharing this host meet on one segment, as nodes on a
real trunk would. Without a VLAN the CNI bridge name is used as is (CNI's own behaviour: it may be
an existing host bridge, which VMO then joins and never deletes).

The ``ip`` calls are synchronous (milliseconds); an async caller runs them with
``asyncio.to_thread``. Bridges VMO creates carry the ifalias ``vmo:...`` so any agent on the host
can tell them from the host's own and delete them once no port is left; each agent tracks the taps
it made in ``network.json`` in its state dir, so ``cleanup_orphans`` removes leftovers after a crash.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BRIDGE",
    "IFNAMSIZ",
    "BridgeNetConf",
    "BridgePlan",
    "HostLocalIpam",
    "LinkError",
    "NetConfError",
    "NetworkState",
    "Route",
    "apply_bridge",
    "apply_macspoofchk",
    "attach_tap",
    "bridge_plan",
    "cleanup_orphans",
    "create_tap",
    "delete_tap",
    "detach_tap",
    "link_exists",
    "macspoof_argv",
    "parse_bridge_conf",
    "remove_bridge",
    "remove_macspoofchk",
    "tap_name",
    "taps_of",
]

DEFAULT_BRIDGE = "cni0"
IFNAMSIZ = 15  # usable characters of a Linux interface name
VMO_ALIAS = "vmo:"
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_IP_TIMEOUT = 10.0


class NetConfError(ValueError):
    """A NAD's CNI configuration VMO cannot realise; ``field`` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class LinkError(RuntimeError):
    """An ``ip`` (or ``nft``) command failed; carries the argv and what it printed."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(argv)} exited {returncode}: {self.stderr}")


# --- CNI configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network
    gw: ipaddress.IPv4Address | None = None


@dataclass(frozen=True)
class HostLocalIpam:
    """host-local IPAM: addresses of ``subnet`` from ``range_start`` to ``range_end``."""

    subnet: ipaddress.IPv4Network
    range_start: ipaddress.IPv4Address
    range_end: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address | None
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True)
class BridgeNetConf:
    """The parts of a CNI ``bridge`` configuration the embedded engine honours."""

    name: str
    bridge: str = DEFAULT_BRIDGE
    vlan: int | None = None
    mtu: int | None = None
    macspoofchk: bool = False
    ipam: HostLocalIpam | None = None  # None: pure layer 2, the guest configures itself


def parse_bridge_conf(config: str | dict[str, Any], *, field: str = "spec.config") -> BridgeNetConf:
    """Parses a CNI config (a JSON string or object; a ``plugins`` list takes its bridge entry)."""
    raw = _load(config, field)
    if "plugins" in raw:
        raw = _bridge_plugin(raw, field)
    if raw.get("type") != "bridge":
        raise NetConfError(
            f"{field}.type", f"CNI type {raw.get('type')!r} is not supported; only 'bridge' is"
        )
    bridge = raw.get("bridge", DEFAULT_BRIDGE)
    if not isinstance(bridge, str) or not _IFNAME.match(bridge):
        raise NetConfError(
            f"{field}.bridge", f"{bridge!r} is not an interface name (1-15 characters)"
        )
    return BridgeNetConf(
        name=str(raw.get("name", "")),
        bridge=bridge,
        vlan=_optional_int(raw, "vlan", field, 0, 4094) or None,  # vlan 0 means untagged in CNI
        mtu=_optional_int(raw, "mtu", field, 68, 65535),
        macspoofchk=bool(raw.get("macspoofchk", False)),
        ipam=_parse_ipam(raw.get("ipam"), f"{field}.ipam"),
    )


def _load(config: str | dict[str, Any], field: str) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    try:
        raw = json.loads(config)
    except ValueError as error:
        raise NetConfError(field, f"not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise NetConfError(field, "a CNI configuration is a JSON object")
    return raw


def _bridge_plugin(raw: dict[str, Any], field: str) -> dict[str, Any]:
    plugins = raw.get("plugins") or []
    for plugin in plugins:
        if isinstance(plugin, dict) and plugin.get("type") == "bridge":
            return {"name": raw.get("name", ""), **plugin}
    raise NetConfError(f"{field}.plugins", "no plugin of type 'bridge' in the list")


def _optional_int(raw: dict[str, Any], key: str, field: str, low: int, high: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise NetConfError(f"{field}.{key}", f"{value!r} must be an integer in {low}-{high}")
    return value


def _parse_ipam(ipam: Any, field: str) -> HostLocalIpam | None:
    if not ipam:
        return None
    if not isinstance(ipam, dict):
        raise NetConfError(field, "must be an object")
    kind = ipam.get("type")
    if kind not in ("host-local", "whereabouts"):
        raise NetConfError(f"{field}.type", f"IPAM type {kind!r} is not supported; use host-local")
    spec = _first_range(ipam, field)
    subnet = _network(spec.get("subnet") or spec.get("range"), f"{field}.subnet")
    gateway = (
        _address(spec.get("gateway"), f"{field}.gateway", subnet)
        if spec.get("gateway")
        else subnet[1]
    )
    start = _address(
        spec.get("rangeStart") or spec.get("range_start"), f"{field}.rangeStart", subnet
    )
    end = _address(spec.get("rangeEnd") or spec.get("range_end"), f"{field}.rangeEnd", subnet)
    return HostLocalIpam(
        subnet=subnet,
        range_start=start or subnet[1],
        range_end=end or subnet[-2],
        gateway=gateway,
        routes=tuple(
            _route(r, f"{field}.routes[{i}]") for i, r in enumerate(ipam.get("routes") or [])
        ),
    )


def _first_range(ipam: dict[str, Any], field: str) -> dict[str, Any]:
    """host-local's ``ranges`` (a list of range sets) or its older flat form."""
    ranges = ipam.get("ranges")
    if ranges:
        if not isinstance(ranges[0], list) or not ranges[0] or not isinstance(ranges[0][0], dict):
            raise NetConfError(f"{field}.ranges", "must be a list of lists of ranges")
        return ranges[0][0]
    return ipam


def _network(value: Any, field: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.ip_network(str(value), strict=False)
    except ValueError as error:
        raise NetConfError(field, f"{value!r} is not a subnet like 192.168.10.0/24") from error
    if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 30:
        raise NetConfError(field, f"{value!r}: an IPv4 subnet of /30 or larger is needed")
    return network


def _address(value: Any, field: str, subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address | None:
    if value is None:
        return None
    try:
        address = ipaddress.IPv4Address(str(value))
    except ValueError as error:
        raise NetConfError(field, f"{value!r} is not an IPv4 address") from error
    if address not in subnet:
        raise NetConfError(field, f"{address} is outside {subnet}")
    return address


def _route(value: Any, field: str) -> Route:
    if not isinstance(value, dict) or "dst" not in value:
        raise NetConfError(field, 'a route is {"dst": CIDR, "gw": address}')
    try:
        dst = ipaddress.IPv4Network(str(value["dst"]), strict=False)
        gw = ipaddress.IPv4Address(str(value["gw"])) if value.get("gw") else None
    except ValueError as error:
        raise NetConfError(field, str(error)) from error
    return Route(dst, gw)


# --- the plan (pure) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BridgePlan:
    """The host bridge a (bridge, vlan) network uses on this host."""

    host_bridge: str
    cni_bridge: str
    vlan: int | None
    mtu: int | None
    macspoofchk: bool
    node: str

    @property
    def alias(self) -> str:
        """The ifalias marking a bridge as VMO's (and saying what it stands for)."""
        return f"{VMO_ALIAS}bridge={self.cni_bridge},vlan={self.vlan or 0}"


def _digest(*parts: str, length: int) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def bridge_plan(conf: BridgeNetConf, *, node: str) -> BridgePlan:
    """Names the host bridge: the CNI bridge itself, or ``vb-<hash10>`` per (bridge, vlan)."""
    host = (
        conf.bridge
        if conf.vlan is None
        else f"vb-{_digest(conf.bridge, str(conf.vlan), length=10)}"
    )
    return BridgePlan(
        host_bridge=host,
        cni_bridge=conf.bridge,
        vlan=conf.vlan,
        mtu=conf.mtu,
        macspoofchk=conf.macspoofchk,
        node=node,
    )


def tap_name(vmi_uid: str, iface: str, node: str = "") -> str:
    """``vt-<hash12>``: 15 characters, stable for one VMI interface on one node, distinct across
    VMIs, and across nodes sharing a host (a migration's source and target taps coexist)."""
    parts = (vmi_uid, iface, node) if node else (vmi_uid, iface)
    return f"vt-{_digest(*parts, length=12)}"


def macspoof_argv(tap: str, mac: str) -> list[list[str]]:
    """nft commands that drop frames entering from ``tap`` with a source MAC other than ``mac``.

    One table per tap, so removal is a single ``delete table`` and never needs rule handles.
    """
    table = f"vmo-{tap}"
    chain = ["{", "type", "filter", "hook", "prerouting", "priority", "-300", ";", "}"]
    match = ["iifname", tap, "ether", "saddr", "!=", mac.lower(), "drop"]
    return [
        ["nft", "add", "table", "bridge", table],
        ["nft", "add", "chain", "bridge", table, "prerouting", *chain],
        ["nft", "add", "rule", "bridge", table, "prerouting", *match],
    ]


# --- I/O: ip(8) ----------------------------------------------------------------------------------


def _run(argv: list[str], *, ok_errors: tuple[str, ...] = ()) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False)
    if proc.returncode != 0:
        if any(marker in proc.stderr for marker in ok_errors):
            log.debug("%s: tolerated: %s", argv, proc.stderr.strip())
            return ""
        raise LinkError(argv, proc.returncode, proc.stderr)
    return proc.stdout


_EXISTS = ("File exists",)
_MISSING = ("Cannot find device", "does not exist", "No such device")


def _link(name: str) -> dict[str, Any] | None:
    out = _run(["ip", "-d", "-j", "link", "show", "dev", name], ok_errors=_MISSING)
    links = json.loads(out) if out.strip() else []
    return links[0] if links else None


def link_exists(name: str) -> bool:
    return _link(name) is not None


def _ports(bridge: str) -> list[str]:
    out = _run(["ip", "-j", "link", "show", "master", bridge], ok_errors=_MISSING)
    return [str(link["ifname"]) for link in (json.loads(out) if out.strip() else [])]


def _is_bridge(link: dict[str, Any]) -> bool:
    return (link.get("linkinfo") or {}).get("info_kind") == "bridge"


def apply_bridge(plan: BridgePlan) -> bool:
    """Creates the host bridge if missing and brings it up; True when this call created it."""
    link = _link(plan.host_bridge)
    if link is not None and not _is_bridge(link):
        raise NetConfError(
            "spec.config.bridge", f"host interface {plan.host_bridge} exists and is not a bridge"
        )
    created = link is None
    if created:
        _run(["ip", "link", "add", "name", plan.host_bridge, "type", "bridge"], ok_errors=_EXISTS)
        _run(["ip", "link", "set", "dev", plan.host_bridge, "alias", plan.alias])
    if plan.mtu is not None:
        _run(["ip", "link", "set", "dev", plan.host_bridge, "mtu", str(plan.mtu)])
    _run(["ip", "link", "set", "dev", plan.host_bridge, "up"])
    return created


def remove_bridge(plan: BridgePlan | str) -> bool:
    """Deletes a VMO-made bridge that has no port left; True when it was deleted.

    A bridge VMO did not create (no ``vmo:`` alias) or one still in use is left alone.
    """
    name = plan if isinstance(plan, str) else plan.host_bridge
    link = _link(name)
    if link is None or not str(link.get("ifalias", "")).startswith(VMO_ALIAS):
        return False
    if _ports(name):
        return False
    _run(["ip", "link", "del", "dev", name], ok_errors=_MISSING)
    return True


def create_tap(
    name: str, bridge: str, *, mtu: int | None = None, owner_uid: int | None = None
) -> None:
    """A persistent tap enslaved to ``bridge`` and up (QEMU opens it by name); idempotent."""
    if _link(name) is None:
        argv = ["ip", "tuntap", "add", "dev", name, "mode", "tap"]
        if owner_uid is not None:
            argv += ["user", str(owner_uid)]  # QEMU may run unprivileged and must open it
        _run(argv, ok_errors=_EXISTS)
        _run(["ip", "link", "set", "dev", name, "alias", f"{VMO_ALIAS}tap"])
    settings = ["master", bridge] + (["mtu", str(mtu)] if mtu is not None else [])
    _run(["ip", "link", "set", "dev", name, *settings, "up"])


def delete_tap(name: str) -> None:
    """Deletes the tap; a missing one is fine."""
    _run(["ip", "link", "del", "dev", name], ok_errors=_MISSING)


def apply_macspoofchk(tap: str, mac: str) -> bool:
    """Installs the MAC spoof filter; False (and a warning) when ``nft`` is not on this host."""
    if shutil.which("nft") is None:
        log.warning("macspoofchk requested for %s but nft is missing: not enforced", tap)
        return False
    remove_macspoofchk(tap)
    for argv in macspoof_argv(tap, mac):
        _run(argv)
    return True


def remove_macspoofchk(tap: str) -> None:
    if shutil.which("nft") is not None:
        _run(
            ["nft", "delete", "table", "bridge", f"vmo-{tap}"],
            ok_errors=("No such file", "does not exist"),
        )


# --- what this agent made ------------------------------------------------------------------------


class NetworkState:
    """``network.json`` in an agent's state dir: the taps it made and the bridge each is on."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "network.json"

    def taps(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        taps: dict[str, dict[str, Any]] = data.get("taps", {})
        return taps

    def _write(self, taps: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"taps": taps}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new file, never half

    def record(self, tap: str, *, bridge: str, owner: str) -> None:
        taps = self.taps()
        taps[tap] = {"bridge": bridge, "owner": owner}
        self._write(taps)

    def forget(self, tap: str) -> None:
        taps = self.taps()
        if taps.pop(tap, None) is not None:
            self._write(taps)


def attach_tap(
    state: NetworkState,
    plan: BridgePlan,
    tap: str,
    *,
    owner: str,
    mac: str | None = None,
    owner_uid: int | None = None,
) -> None:
    """Bridge and tap for one VMI interface, recorded before creation so a crash leaves a trace."""
    state.record(tap, bridge=plan.host_bridge, owner=owner)
    apply_bridge(plan)
    create_tap(tap, plan.host_bridge, mtu=plan.mtu, owner_uid=owner_uid)
    if plan.macspoofchk and mac:
        apply_macspoofchk(tap, mac)


def detach_tap(state: NetworkState, tap: str) -> None:
    """Removes the tap, its filter and, if it was the last port, the VMO-made bridge."""
    bridge = state.taps().get(tap, {}).get("bridge")
    remove_macspoofchk(tap)
    delete_tap(tap)
    if bridge:
        remove_bridge(str(bridge))
    state.forget(tap)


def taps_of(state: NetworkState, vmi_uid: str) -> list[str]:
    """The taps recorded for one VMI (owner ``<uid>/<network>``): a restarted agent, which did not
    make them itself, finds there what to release when that VMI goes."""
    prefix = f"{vmi_uid}/"
    return sorted(
        tap
        for tap, record in state.taps().items()
        if vmi_uid and str(record.get("owner", "")).startswith(prefix)
    )


def cleanup_orphans(state: NetworkState, *, keep: Iterable[str] = ()) -> list[str]:
    """Detaches every recorded tap not in ``keep`` (the taps of VMIs still running); returns them."""
    kept = set(keep)
    orphans = [tap for tap in state.taps() if tap not in kept]
    for tap in orphans:
        detach_tap(state, tap)
    return orphans
