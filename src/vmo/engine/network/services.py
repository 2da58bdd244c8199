"""kube-proxy's role on an embedded host: Service ports forwarded to VMI guest ports.

``ServiceProxy.sync(services, endpoints)`` makes the listeners match the Services: each port on
``ClusterIP:port`` and, for NodePort Services, on ``0.0.0.0:nodePort``; TCP by asyncio streams, UDP
by a datagram endpoint with one upstream socket per client flow. A backend is a (VMI, guest port)
from the Endpoints' ``targetRef``; the node agent turns it into a QEMU hostfwd port on 127.0.0.1
through ``PortOpener``, asked afresh per connection, so traffic follows a VMI that restarts.

ClusterIPs are made local by adding each as a /32 to ``vmo-svc0``: a dummy device, or, on kernels
without the dummy driver (like this one), a bridge with no port, which serves the same purpose. If
neither can be made (no CAP_NET_ADMIN), ClusterIP ports are bound on 127.0.0.1 instead.
Run one proxy per host: listeners bind host-wide, and the opener must reach every agent's VMIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import socket
import struct
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

log = logging.getLogger(__name__)

__all__ = [
    "SERVICE_DEVICE",
    "AddressMode",
    "Backend",
    "ListenKey",
    "PortOpener",
    "ServiceAddresses",
    "ServiceProxy",
    "desired_listeners",
]

JSON = dict[str, Any]
SERVICE_DEVICE = "vmo-svc0"
UDP_FLOW_IDLE = 60.0  # seconds a UDP flow without traffic keeps its upstream socket
UDP_REFUSED_HOLD = 2.0  # seconds a refused UDP client's datagrams are dropped unasked
_COPY_CHUNK = 65536


class PortOpener(Protocol):
    """The node agent's side: the 127.0.0.1 port that reaches ``guest_port`` of a VMI, or None."""

    async def host_port(
        self, namespace: str, vmi: str, proto: str, guest_port: int
    ) -> int | None: ...


class Gate(Protocol):
    """Network policy's say on a connection (``podpolicy.PodPolicyGate``): may the client at
    ``peer``, which reached ``local``, be joined to ``backend``'s port?"""

    async def allowed(
        self, proto: str, backend: Backend, peer: tuple[str, int], local: tuple[str, int]
    ) -> bool: ...


@dataclass(frozen=True)
class Backend:
    namespace: str
    vmi: str
    guest_port: int


@dataclass(frozen=True)
class ListenKey:
    proto: str  # "TCP" | "UDP"
    host: str
    port: int


# --- desired state (pure) -------------------------------------------------------------------------


def _backends(endpoints: JSON | None, port: JSON) -> tuple[Backend, ...]:
    """Backends of one Service port: Endpoints ports are matched by name, as kube-proxy does."""
    found: list[Backend] = []
    for subset in (endpoints or {}).get("subsets") or []:
        target = next(
            (
                p
                for p in subset.get("ports") or []
                if (p.get("name") or "") == (port.get("name") or "")
            ),
            None,
        )
        if target is None:
            continue
        for address in subset.get("addresses") or []:
            ref = address.get("targetRef") or {}
            if ref.get("kind") == "VirtualMachineInstance" and ref.get("name"):
                found.append(
                    Backend(str(ref.get("namespace", "")), str(ref["name"]), int(target["port"]))
                )
    return tuple(found)


def desired_listeners(
    services: Iterable[JSON], endpoints: Iterable[JSON], *, cluster_host: str | None = None
) -> dict[ListenKey, tuple[Backend, ...]]:
    """Listener -> backends. ``cluster_host`` replaces every ClusterIP (the loopback fallback)."""
    by_key = {(e["metadata"].get("namespace", ""), e["metadata"]["name"]): e for e in endpoints}
    wanted: dict[ListenKey, tuple[Backend, ...]] = {}
    for svc in services:
        md, spec = svc["metadata"], svc.get("spec") or {}
        eps = by_key.get((md.get("namespace", ""), md["name"]))
        cluster_ip = spec.get("clusterIP") or ""
        for port in spec.get("ports") or []:
            proto = str(port.get("protocol") or "TCP")
            if proto not in ("TCP", "UDP"):
                continue  # SCTP is not proxied
            backends = _backends(eps, port)
            if cluster_ip and cluster_ip != "None":
                wanted[ListenKey(proto, cluster_host or cluster_ip, int(port["port"]))] = backends
            if spec.get("type") in ("NodePort", "LoadBalancer") and port.get("nodePort"):
                wanted[ListenKey(proto, "0.0.0.0", int(port["nodePort"]))] = backends
    return wanted


# --- ClusterIP addresses --------------------------------------------------------------------------


class AddressMode(enum.Enum):
    DUMMY = "dummy"
    BRIDGE = "bridge"  # a port-less bridge stands in for a dummy device
    LOOPBACK = "loopback"  # no device: ClusterIP ports bind 127.0.0.1


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


class ServiceAddresses:
    """Keeps the ClusterIPs as /32s on ``vmo-svc0``."""

    def __init__(self, device: str = SERVICE_DEVICE) -> None:
        self.device = device
        self.mode: AddressMode | None = None
        self.addresses: set[str] = set()

    def setup(self) -> AddressMode:
        if self.mode is None:
            self.mode = self._make_device()
            log.info("service addresses on %s: %s", self.device, self.mode.value)
        return self.mode

    def _make_device(self) -> AddressMode:
        for kind, mode in (("dummy", AddressMode.DUMMY), ("bridge", AddressMode.BRIDGE)):
            made = _ip("link", "add", "name", self.device, "type", kind)
            created = made.returncode == 0 or "File exists" in made.stderr
            if created and _ip("link", "set", "dev", self.device, "up").returncode == 0:
                return mode
            log.debug("ip link add %s type %s: %s", self.device, kind, made.stderr.strip())
        log.warning("cannot create %s: ClusterIP ports fall back to 127.0.0.1", self.device)
        return AddressMode.LOOPBACK

    def ensure(self, ips: set[str]) -> None:
        if self.setup() is AddressMode.LOOPBACK:
            return
        for ip in sorted(ips - self.addresses):
            result = _ip("addr", "replace", f"{ip}/32", "dev", self.device)
            if result.returncode != 0:
                log.warning("cannot add %s to %s: %s", ip, self.device, result.stderr.strip())
                continue
            self.addresses.add(ip)
        for ip in sorted(self.addresses - ips):
            _ip("addr", "del", f"{ip}/32", "dev", self.device)
            self.addresses.discard(ip)

    def teardown(self) -> None:
        if self.mode in (AddressMode.DUMMY, AddressMode.BRIDGE):
            _ip("link", "del", "dev", self.device)
        self.mode, self.addresses = None, set()


# --- the proxy ------------------------------------------------------------------------------------


@dataclass
class _Listener:
    key: ListenKey
    backends: tuple[Backend, ...]
    server: asyncio.AbstractServer | None = None
    udp: _UdpFront | None = None
    turn: itertools.count[int] = field(default_factory=itertools.count)

    def rotation(self) -> list[Backend]:
        """Backends in round-robin order for the next connection."""
        if not self.backends:
            return []
        start = next(self.turn) % len(self.backends)
        return [*self.backends[start:], *self.backends[:start]]


class ServiceProxy:
    """Listeners for Service ports, forwarding to VMI guest ports through a ``PortOpener``."""

    def __init__(
        self,
        opener: PortOpener,
        *,
        addresses: ServiceAddresses | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.opener = opener
        self.gate = gate
        self.addresses = addresses if addresses is not None else ServiceAddresses()
        self.listeners: dict[ListenKey, _Listener] = {}
        self._connections: set[asyncio.Task[Any]] = set()

    async def sync(self, services: Iterable[JSON], endpoints: Iterable[JSON]) -> None:
        """Opens, updates and closes listeners to match ``services`` and their ``endpoints``."""
        services = list(services)
        mode = await asyncio.to_thread(self.addresses.setup)
        loopback = "127.0.0.1" if mode is AddressMode.LOOPBACK else None
        wanted = desired_listeners(services, endpoints, cluster_host=loopback)
        cluster_ips = {k.host for k in wanted if k.host not in ("0.0.0.0", "127.0.0.1")}
        await asyncio.to_thread(self.addresses.ensure, cluster_ips)
        for key in [k for k in self.listeners if k not in wanted]:
            await self._close(self.listeners.pop(key))
        for key, backends in wanted.items():
            listener = self.listeners.get(key)
            if listener is not None:
                listener.backends = backends
                continue
            listener = _Listener(key, backends)
            try:
                await self._open(listener)
            except OSError as error:
                log.warning("cannot listen on %s %s:%d: %s", key.proto, key.host, key.port, error)
                continue
            self.listeners[key] = listener

    async def close(self) -> None:
        for listener in self.listeners.values():
            await self._close(listener)
        self.listeners.clear()
        # connections in flight end with the proxy (servers no longer own them once closed)
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self.addresses.teardown)

    async def _open(self, listener: _Listener) -> None:
        key = listener.key
        if key.proto == "TCP":

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                task = asyncio.current_task()
                assert task is not None
                self._connections.add(task)
                try:
                    await self._serve_tcp(listener, reader, writer)
                finally:
                    self._connections.discard(task)

            listener.server = await asyncio.start_server(handle, key.host, key.port)
        else:
            loop = asyncio.get_running_loop()
            front = _UdpFront(self, listener)
            await loop.create_datagram_endpoint(lambda: front, local_addr=(key.host, key.port))
            listener.udp = front

    async def _close(self, listener: _Listener) -> None:
        if listener.server is not None:
            listener.server.close()
            await listener.server.wait_closed()
        if listener.udp is not None:
            listener.udp.close()

    async def backend_port(
        self,
        listener: _Listener,
        proto: str,
        client: tuple[tuple[str, int], tuple[str, int]] | None = None,
    ) -> int | None:
        """The host port of the next backend that answers the opener, in round-robin order;
        None also when network policy denies ``client`` (peer, local address) the backend."""
        for backend in listener.rotation():
            if client is not None and self.gate is not None:
                allowed = await self.gate.allowed(proto, backend, *client)
                if not allowed:
                    log.info(
                        "%s %s:%d -> %s/%s:%d denied by network policy",
                        proto,
                        client[0][0],
                        client[0][1],
                        backend.namespace,
                        backend.vmi,
                        backend.guest_port,
                    )
                    continue  # another backend may admit it; none does: refused
            try:
                port = await self.opener.host_port(
                    backend.namespace, backend.vmi, proto, backend.guest_port
                )
            except Exception:  # an opener failure must not take the proxy down
                log.exception("port opener failed for %s", backend)
                continue
            if port is not None:
                return port
        return None

    async def _serve_tcp(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writers = [writer]
        try:
            peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
            client = (tuple(peer[:2]), tuple(local[:2])) if peer and local else None
            upstream = await self._connect_tcp(listener, client)
            if upstream is None:
                _reset(writer)
                return
            up_reader, up_writer = upstream
            writers.append(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for each in writers:
                each.close()
                with contextlib.suppress(OSError):
                    await each.wait_closed()

    async def _connect_tcp(
        self, listener: _Listener, client: Any = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(max(1, len(listener.backends))):
            port = await self.backend_port(listener, "TCP", client)
            if port is None:
                return None
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except OSError as error:
                log.info("backend 127.0.0.1:%d of %s refused: %s", port, listener.key, error)
        return None


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closing with a zero linger sends RST: the client learns at once that it was refused."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies until EOF, then half-closes the other side so request/response protocols finish."""
    try:
        while chunk := await reader.read(_COPY_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


class _UdpFront(asyncio.DatagramProtocol):
    """The Service-side UDP socket: one upstream flow per client address."""

    def __init__(self, proxy: ServiceProxy, listener: _Listener) -> None:
        self.proxy = proxy
        self.listener = listener
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: dict[tuple[str, int], _UdpFlow] = {}
        self.pending: set[asyncio.Task[None]] = set()
        # clients given no backend (none answers, or policy denies them): until when their
        # datagrams are dropped without asking again (a flood must not cost a lookup each)
        self.refused: dict[tuple[str, int], float] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # the selector loop's datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._expire()
        if self.refused.get(addr, 0.0) > time.monotonic():
            return
        flow = self.flows.get(addr)
        if flow is not None:
            flow.send(data)  # buffered by the flow while its socket is still being opened
            return
        task = asyncio.get_running_loop().create_task(self._open_flow(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _open_flow(self, data: bytes, addr: tuple[str, int]) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            flow = self.flows[addr] = _UdpFlow(self, addr)
            sockname = self.transport.get_extra_info("sockname") if self.transport else None
            client = (addr, tuple(sockname[:2])) if sockname else None
            port = await self.proxy.backend_port(self.listener, "UDP", client)
            if port is None:
                del self.flows[addr]
                self.refused[addr] = time.monotonic() + UDP_REFUSED_HOLD
                return
            await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: flow, remote_addr=("127.0.0.1", port)
            )
        flow.send(data)

    def reply(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def _expire(self) -> None:
        now = time.monotonic()
        for addr in [a for a, until in self.refused.items() if until <= now]:
            del self.refused[addr]
        for addr, flow in list(self.flows.items()):
            if flow.transport is not None and now - flow.last_seen > UDP_FLOW_IDLE:
                flow.transport.close()
                del self.flows[addr]

    def close(self) -> None:
        for task in self.pending:
            task.cancel()
        for flow in self.flows.values():
            if flow.transport is not None:
                flow.transport.close()
        self.flows.clear()
        if self.transport is not None:
            self.transport.close()


class _UdpFlow(asyncio.DatagramProtocol):
    """One client's connected socket towards the backend; replies go back through the front."""

    def __init__(self, front: _UdpFront, client: tuple[str, int]) -> None:
        self.front = front
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.backlog: list[bytes] = []
        self.last_seen = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # the selector loop's datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)
        for data in self.backlog:
            self.transport.sendto(data)
        self.backlog.clear()

    def send(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        if self.transport is None:
            self.backlog.append(data)  # datagrams that arrive while the flow is being opened
        else:
            self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.last_seen = time.monotonic()
        self.front.reply(data, self.client)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp flow %s: %s", self.client, exc)
