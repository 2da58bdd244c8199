"""Which hosts a DataVolume import may fetch from, decided after DNS resolution and on every redirect.

CDI's importer runs in a pod and cannot reach the host's loopback; VMO's importer runs on the
host, so without this policy anyone allowed to create a DataVolume could read services that
listen only on the host (and download what they served through a VirtualMachineExport). By
default an import is refused when its URL, or any redirect it takes, connects to a loopback,
link-local (cloud metadata at 169.254.169.254 included), unspecified, multicast or broadcast
address, or to any address of this host: every entry of the kernel's ``local`` routing tables,
which holds every address of every interface, so the API server's and the export server's
listening addresses too.

An administrator allows hosts in the ConfigMap ``vmo-import-policy`` of the namespace
``vmo-system``, key ``allowedHosts``: entries separated by commas or newlines (``#`` starts a
comment), each a host name, an IP address or a CIDR, a name or an address optionally followed
by ``:port`` (``[v6]:port`` for IPv6): ``127.0.0.1:8080``, ``mirror.lan``, ``10.0.0.0/8``. A host
name entry trusts whatever that name resolves to. The list is read at each import, so a change
applies to the next import without a restart; an entry that does not parse is ignored with a
warning, so a typo can only narrow what is allowed.

The decision (``refusal``) is a pure function of the destination, the allow-list and the host's
networks; resolving names, listing the host's networks and reading the ConfigMap are the I/O
at the edges. ``UrlGuard.admit`` checks one hop and pins its host name to the addresses it
checked: the connection goes to those addresses and nowhere else, so a name cannot resolve to
an allowed address for the check and to a forbidden one for the connection (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from vmo.client import CONFIGMAP, TRANSIENT_ERRORS, ApiStatusError, Client

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolve = Callable[[str, int], Awaitable[list[IPAddress]]]

POLICY_NAMESPACE = "vmo-system"
POLICY_CONFIGMAP = "vmo-import-policy"
ALLOWED_HOSTS_KEY = "allowedHosts"
SCHEMES = ("http", "https")

# what each range is, in a refusal's words; checked before the host's own addresses
_RESERVED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), what)
    for cidr, what in (
        ("127.0.0.0/8", "a loopback address"),
        ("::1/128", "a loopback address"),
        ("169.254.0.0/16", "a link-local address (cloud metadata services live there)"),
        ("fe80::/10", "a link-local address"),
        # Linux connects 0.0.0.0 (and ::) to the local host
        ("0.0.0.0/8", "an unspecified address"),
        ("::/128", "an unspecified address"),
        ("224.0.0.0/4", "a multicast address"),
        ("ff00::/8", "a multicast address"),
        ("255.255.255.255/32", "a broadcast address"),
    )
)
_OWN = "one of this host's own addresses"
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


class ImportRefused(Exception):
    """The import policy forbids a URL the import would fetch; retrying will not help."""

    def __init__(self, url: str, reason: str, *, allowable: bool = True) -> None:
        self.url, self.reason = url, reason
        hint = (
            f". An administrator can allow a host in ConfigMap {POLICY_NAMESPACE}/"
            f"{POLICY_CONFIGMAP}, key {ALLOWED_HOSTS_KEY}"
            if allowable
            else ""
        )
        super().__init__(f"Import refused: {reason}{hint}")


class PolicyUnavailable(Exception):
    """The policy could not be applied now (ConfigMap, host addresses, DNS); worth retrying."""


# --- the allow-list (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class AllowEntry:
    """One ``allowedHosts`` entry: a host name or a network, and a port or any port."""

    name: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def admits(self, host: str, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.name is not None:
            return canonical_host(host) == self.name
        return self.network is not None and address in self.network


@dataclass(frozen=True)
class AllowList:
    entries: tuple[AllowEntry, ...] = ()

    def admits(self, host: str, address: IPAddress, port: int) -> bool:
        return any(e.admits(host, address, port) for e in self.entries)


def canonical_host(host: str) -> str:
    return host.lower().rstrip(".")


def parse_allowed_hosts(text: str) -> tuple[AllowList, list[str]]:
    """The allow-list in ``text``, and a message for each entry that does not parse."""
    entries, errors = [], []
    for raw in _entries(text):
        try:
            entries.append(parse_entry(raw))
        except ValueError as exc:
            errors.append(f"{raw!r}: {exc}")
    return AllowList(tuple(entries)), errors


def _entries(text: str) -> Iterable[str]:
    for line in text.splitlines():
        for item in line.split("#", 1)[0].split(","):
            if item.strip():
                yield item.strip()


def parse_entry(raw: str) -> AllowEntry:
    """``name``, ``name:port``, ``address``, ``address:port``, ``[v6]:port`` or a CIDR."""
    if "/" in raw:
        return AllowEntry(network=ipaddress.ip_network(raw, strict=False))
    host, port = _split_port(raw)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = canonical_host(host)
        if not _HOSTNAME.fullmatch(name) or name.replace(".", "").isdigit():
            raise ValueError("not a host name, an IP address or a CIDR") from None
        return AllowEntry(name=name, port=port)
    return AllowEntry(network=ipaddress.ip_network(address), port=port)


def _split_port(raw: str) -> tuple[str, int | None]:
    if raw.startswith("["):
        host, bracket, rest = raw[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("an IPv6 address with a port is written [address]:port")
        return host, _port(rest[1:]) if rest else None
    if raw.count(":") == 1:
        host, port = raw.split(":")
        return host, _port(port)
    return raw, None  # a name, an IPv4 address or a bare IPv6 address


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


# --- the decision (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """Where one hop of an import connects: the URL's host name and port, one resolved address."""

    host: str
    port: int
    address: IPAddress


def refusal(
    dest: Destination, *, allowed: AllowList, host_networks: Sequence[IPNetwork]
) -> str | None:
    """Why an import may not connect to ``dest`` (the address described), or None if it may."""
    # an IPv4-mapped IPv6 address reaches the IPv4 address it maps
    address = _unmapped(dest.address)
    if allowed.admits(dest.host, address, dest.port):
        return None
    for network, what in _RESERVED:
        if address in network:
            return what
    if any(address in network for network in host_networks):
        return _OWN
    return None


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def local_networks(routes: Iterable[dict[str, Any]]) -> tuple[IPNetwork, ...]:
    """The destinations of ``ip -j route show table local`` (local, broadcast, anycast...)."""
    found = []
    for route in routes:
        dst = str(route.get("dst", ""))
        try:
            found.append(ipaddress.ip_network(dst, strict=False))
        except ValueError:
            continue  # "default" or a name: not an address of this host
    return tuple(found)


# --- I/O at the edges --------------------------------------------------------------------------


async def host_networks() -> tuple[IPNetwork, ...]:
    """Every address this host answers on, from the kernel's local routing tables (IPv4, IPv6).

    Fails closed: an import whose destinations cannot be compared with the host's addresses
    is not made."""
    routes: list[dict[str, Any]] = []
    for family in ("-4", "-6"):
        routes += json.loads(await _ip(family, "-j", "route", "show", "table", "local") or "[]")
    return local_networks(routes)


async def _ip(*args: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    except (OSError, TimeoutError) as exc:
        raise PolicyUnavailable(f"cannot list this host's addresses: {exc}") from exc
    if proc.returncode != 0:
        raise PolicyUnavailable(f"cannot list this host's addresses: {err.decode().strip()}")
    return out.decode()


async def system_resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` resolves to (an IP literal is its own address)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise PolicyUnavailable(f"cannot resolve {host}: {exc}") from exc
    # getaddrinfo gives IPv6 scopes apart (sockaddr[3]): the address text alone is compared
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


# The policy cannot be read: the import waits (is retried) rather than guessing.
_UNREADABLE: tuple[type[Exception], ...] = (ApiStatusError, *TRANSIENT_ERRORS)


async def load_allowed_hosts(client: Client) -> AllowList:
    """The administrator's allow-list; empty when the ConfigMap does not exist."""
    try:
        cm = await client.find(CONFIGMAP, POLICY_CONFIGMAP, POLICY_NAMESPACE)
    except _UNREADABLE as exc:
        raise PolicyUnavailable(
            f"cannot read ConfigMap {POLICY_NAMESPACE}/{POLICY_CONFIGMAP}: {exc}"
        ) from exc
    text = str(((cm or {}).get("data") or {}).get(ALLOWED_HOSTS_KEY, ""))
    allowed, errors = parse_allowed_hosts(text)
    for error in errors:
        log.warning("%s/%s: ignoring entry %s", POLICY_NAMESPACE, POLICY_CONFIGMAP, error)
    return allowed


def policy_configmap(*entries: str) -> dict[str, Any]:
    """The ConfigMap an administrator writes to allow ``entries`` (as ``kubectl apply`` takes it)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": POLICY_CONFIGMAP, "namespace": POLICY_NAMESPACE},
        "data": {ALLOWED_HOSTS_KEY: "\n".join(entries)},
    }


# --- one hop: check, then pin ------------------------------------------------------------------


class PinnedResolver(AbstractResolver):
    """Answers only with the addresses a ``UrlGuard`` checked; it never asks DNS itself."""

    def __init__(self) -> None:
        self._pins: dict[tuple[str, int], list[IPAddress]] = {}

    def pin(self, host: str, port: int, addresses: list[IPAddress]) -> None:
        self._pins[(host, port)] = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[ResolveResult]:
        addresses = self._pins.get((host, port))
        if not addresses:
            raise OSError(f"{host}:{port} was not checked by the import policy")
        return [_result(host, port, a) for a in addresses]

    async def close(self) -> None:
        self._pins.clear()


def _result(host: str, port: int, address: IPAddress) -> ResolveResult:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return {
        "hostname": host,
        "host": str(address),
        "port": port,
        "family": family,
        "proto": 0,
        "flags": socket.AI_NUMERICHOST,
    }


def connect_name(url: URL) -> str:
    """The host name as aiohttp's connector resolves it (several trailing dots become one)."""
    host = url.raw_host or ""
    return host.rstrip(".") + "." if host.endswith("..") else host


@dataclass
class UrlGuard:
    """Admits the hops of one import, each after its own check, and pins what it admitted."""

    allowed: AllowList
    resolve: Resolve = system_resolve
    resolver: PinnedResolver = field(default_factory=PinnedResolver)
    _networks: tuple[IPNetwork, ...] | None = None

    async def admit(self, url: URL, *, via: str = "") -> None:
        """Raises ``ImportRefused`` naming ``url`` (and the URL that redirected to it)."""
        named = f"{via} redirected to {url}" if via else str(url)
        if url.scheme not in SCHEMES or not url.raw_host or url.port is None:
            reason = f"{named}: only http and https URLs with a host are fetched"
            raise ImportRefused(str(url), reason, allowable=False)
        host, port = connect_name(url), url.port
        addresses = await self.resolve(host, port)
        if not addresses:
            raise PolicyUnavailable(f"{host} resolves to no address")
        networks = await self._host_networks()
        for address in addresses:
            why = refusal(
                Destination(host, port, address), allowed=self.allowed, host_networks=networks
            )
            if why is not None:
                raise ImportRefused(str(url), f"{named} connects to {address}, {why}")
        self.resolver.pin(host, port, addresses)

    async def _host_networks(self) -> tuple[IPNetwork, ...]:
        if self._networks is None:
            self._networks = await host_networks()
        return self._networks
