"""NetworkPolicy on the embedded pod network, on the real kernel: VMs' cgroups, the egress
table matched by ``socket cgroupv2``, the kernel's answer to "whose socket is this", and the
Service proxy's gate. The stand-ins for QEMUs are real processes placed in real cgroups; their
sockets are what a QEMU's user networking opens."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_network import (
    FakeOpener,
    LoopbackAddresses,
    UdpEcho,
    endpoints_for,
    free_port,
    service,
    tcp_echo,
    tcp_request,
)
from vmo.engine.agent.runtime import migration_port
from vmo.engine.network.podpolicy import (
    Cgroups,
    PodMember,
    PodPolicyGate,
    ServicePorts,
    _cgroup2_mount,
    apply_pod_table,
    compile_pod_table,
    peer_vm,
    pod_table_name,
)
from vmo.engine.network.services import ServiceProxy

CGROUPS = Cgroups.detect()
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or CGROUPS is None, reason="cgroups and nft need root and a cgroup2 mount"
)
NODE = f"podpol-{os.getpid()}"
NS = "apps"

# a process that connects where it is told, once it has been placed in its cgroup
CLIENT = """
import socket, sys
sys.stdin.readline()
host, port = sys.argv[1], int(sys.argv[2])
try:
    with socket.create_connection((host, port), timeout=3) as s:
        print("CONNECTED", flush=True)
        if len(sys.argv) > 3:
            s.recv(100)  # held open until the server has looked at it
except OSError as e:
    print("REFUSED", type(e).__name__, flush=True)
"""


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": NS}, "spec": spec}


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    assert CGROUPS is not None
    yield CGROUPS
    for name in ("a", "b"):
        CGROUPS.remove(NODE, NS, name)
    assert not (CGROUPS.mount / "vmo" / NODE).exists()  # (and vmo itself, unless in use)


@pytest.fixture
def table() -> Iterator[str]:
    name = pod_table_name(NODE)
    yield name
    subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True, check=False)


def run_in(cgroup: Path, host: str, port: int) -> str:
    """Runs the client in ``cgroup`` (placed before it connects) and returns its verdict."""
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT, host, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert CGROUPS is not None and child.stdin is not None
    try:
        CGROUPS.place(cgroup, child.pid)
        out, _ = child.communicate("go\n", timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    return out.strip()


def test_mountinfo_gives_the_cgroup2_mount_and_its_root() -> None:
    hybrid = (
        "30 24 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n"
        "31 24 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    )
    assert _cgroup2_mount(hybrid) == (Path("/sys/fs/cgroup/unified"), "/")
    pure = "25 1 0:22 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert _cgroup2_mount(pure) == (Path("/sys/fs/cgroup"), "/kubepods/pod1")
    assert _cgroup2_mount("31 24 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n") is None
    nested = Cgroups(Path("/sys/fs/cgroup"), depth=2)
    assert nested.nft_match("n1", "ns", "vm") == 'socket cgroupv2 level 6 "vmo/n1/ns/vm"'
    assert nested.owner("/vmo/n1/ns/vm") == ("n1", "ns", "vm")
    assert nested.owner("/system.slice/ssh.service") is None
    with pytest.raises(ValueError):
        nested.relative("n1", "ns", "../etc")


def test_egress_follows_the_rules_and_services_stay_reachable(cgroups: Cgroups, table: str) -> None:
    """VM a may reach 127.0.0.0/8 on one port only, and the Service's ClusterIP port (the
    forwarder decides that one); VM b is not isolated. Deleting the table opens a again."""
    open_port, closed_port, service_port = free_port(), free_port(), free_port()
    migration = migration_port()  # where a migration target's QEMU listens
    listeners = []
    for port in (open_port, closed_port, service_port, migration):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))  # on 127.0.0.2 too
        sock.listen()
        listeners.append(sock)
    a, b = cgroups.create(NODE, NS, "a"), cgroups.create(NODE, NS, "b")
    members = [
        PodMember(NS, "a", {"app": "a"}, cgroups.nft_match(NODE, NS, "a")),
        PodMember(NS, "b", {"app": "b"}, cgroups.nft_match(NODE, NS, "b")),
    ]
    rules = policy(
        "a-out",
        {
            "podSelector": {"matchLabels": {"app": "a"}},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [{"ipBlock": {"cidr": "127.0.0.0/8", "except": ["127.0.0.2/32"]}}],
                    "ports": [{"port": open_port}],
                },
                {"to": [{"podSelector": {}}]},  # VMs only: the forwarders' business
            ],
        },
    )
    svc = {"spec": {"clusterIP": "127.0.0.1", "ports": [{"port": service_port}]}}
    compiled = compile_pod_table(NODE, members, [rules], ServicePorts.of([svc]))
    assert (compiled.members, compiled.rules) == (1, 2)  # a's v4 and v6 lines for the port
    try:
        apply_pod_table(compiled)
        listed = subprocess.run(
            ["nft", "list", "table", "inet", table], capture_output=True, text=True, check=True
        ).stdout
        assert "socket cgroupv2" in listed and f"vmo/{NODE}/{NS}/a" in listed
        assert run_in(a, "127.0.0.1", open_port) == "CONNECTED"
        assert run_in(a, "127.0.0.1", closed_port) == "REFUSED ConnectionRefusedError"  # reset
        assert run_in(a, "127.0.0.2", open_port).startswith("REFUSED")  # the except
        assert run_in(b, "127.0.0.2", open_port) == "CONNECTED"
        assert run_in(a, "127.0.0.1", service_port) == "CONNECTED"
        assert run_in(b, "127.0.0.1", closed_port) == "CONNECTED"  # b is not isolated
        assert run_in(a, "127.0.0.1", migration) == "CONNECTED"  # a's QEMU may still migrate
        apply_pod_table(compile_pod_table(NODE, members, []))  # no policy: the table goes
        gone = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True)
        assert gone.returncode != 0
        assert run_in(a, "127.0.0.1", closed_port) == "CONNECTED"
    finally:
        for sock in listeners:
            sock.close()


# a process that listens once it has been placed in its cgroup, and accepts until stdin closes
SERVER = """
import socket, sys, threading
sys.stdin.readline()
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True)
def serve():
    while True:
        c, _ = s.accept(); c.close()
threading.Thread(target=serve, daemon=True).start()
sys.stdin.read()
"""


def test_a_vm_cannot_go_around_the_forwarders_to_an_isolated_vm(
    cgroups: Cgroups, table: str
) -> None:
    """b listens (as its QEMU's hostfwd port does); a's socket may not open a connection to it
    once a policy isolates b for ingress, while a host process (the forwarder) still may."""
    a, b = cgroups.create(NODE, NS, "a"), cgroups.create(NODE, NS, "b")
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdin is not None and server.stdout is not None
    members = [
        PodMember(NS, "a", {"app": "a"}, cgroups.nft_match(NODE, NS, "a")),
        PodMember(NS, "b", {"app": "b"}, cgroups.nft_match(NODE, NS, "b")),
    ]
    isolate_b = policy("b-in", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": []})
    try:
        cgroups.place(b, server.pid)
        server.stdin.write("go\n")
        server.stdin.flush()
        port = int(server.stdout.readline())
        assert run_in(a, "127.0.0.1", port) == "CONNECTED"  # no policy yet
        compiled = compile_pod_table(NODE, members, [isolate_b], every_vm=cgroups.nft_base_match())
        assert compiled.members == 0 and compiled.script  # no egress chain, but the guard
        apply_pod_table(compiled)
        assert run_in(a, "127.0.0.1", port).startswith("REFUSED")
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            pass  # this process is no VM: the forwarders reach b
        apply_pod_table(compile_pod_table(NODE, members, [], every_vm=cgroups.nft_base_match()))
        assert run_in(a, "127.0.0.1", port) == "CONNECTED"
    finally:
        server.kill()
        server.communicate()


def test_the_kernel_names_the_vm_behind_a_client_socket(cgroups: Cgroups) -> None:
    """``peer_vm`` reads the client socket's cgroup; a host process is no VM."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    a = cgroups.create(NODE, NS, "a")
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT, "127.0.0.1", str(port), "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        cgroups.place(a, child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        conn, peer = server.accept()
        local = conn.getsockname()
        assert peer_vm(cgroups, "TCP", peer, local) == (NS, "a")
        conn.sendall(b"ok")
        conn.close()
        child.wait(10)
        assert child.stdout.read().strip() == "CONNECTED"
        with socket.create_connection(("127.0.0.1", port)) as mine:
            conn, peer = server.accept()
            assert peer_vm(cgroups, "TCP", peer, conn.getsockname()) is None  # this process
            conn.close()
            mine.close()
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
        server.close()


def _vmi(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "networks": [{"name": "default", "pod": {}}],
            "domain": {
                "devices": {
                    "interfaces": [
                        {
                            "name": "default",
                            "masquerade": {},
                            "ports": [{"name": "pg", "port": 5432}],
                        }
                    ]
                }
            },
        },
        "status": {"interfaces": [{"name": "default", "ipAddress": "10.0.2.2"}]},
    }


def test_the_gate_reads_ingress_of_the_backend_and_egress_of_a_vm_client() -> None:
    vmis = {
        ("apps", "db"): _vmi("db", {"app": "db"}),
        ("apps", "a"): _vmi("a", {"role": "client-a"}),
        ("apps", "b"): _vmi("b", {"role": "client-b"}),
    }
    policies = [
        policy(
            "db-in",
            {
                "podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"role": "client-a"}}}],
                        "ports": [{"port": "pg"}],
                    },
                    {"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]},
                    {"from": [{"namespaceSelector": {}}], "ports": [{"port": 7}]},
                ],
            },
        ),
        policy(
            "b-out",
            {
                "podSelector": {"matchLabels": {"role": "client-b"}},
                "policyTypes": ["Egress"],
                "egress": [],
            },
        ),
    ]
    gate = PodPolicyGate(
        policies=lambda: policies,
        vmi=lambda ns, name: vmis.get((ns, name)),
        namespaces=lambda: {"apps": {}},
        cgroups=None,
    )
    peer = ("127.0.0.1", 40000)

    def allowed(source: tuple[str, str] | None, port: int, address: str = "127.0.0.1") -> bool:
        return gate.verdict(policies, "TCP", ("apps", "db", port), (address, 1), source).allowed

    assert allowed(("apps", "a"), 5432)  # the named client, on the named port
    assert not allowed(("apps", "a"), 5433)
    assert not allowed(("apps", "b"), 5432)  # another VM
    assert not allowed(None, 5432)  # a host process: only an ipBlock names it
    assert allowed(None, 5432, "192.0.2.9")  # a remote client the ipBlock names
    assert not allowed(None, 7)  # namespaceSelector {} names every VM, not addresses
    assert allowed(("apps", "a"), 7)
    assert not allowed(("apps", "b"), 7)  # b's own egress is closed
    assert peer  # (the peer address reaches only ipBlock rules)


async def test_the_proxy_resets_a_client_that_policy_denies() -> None:
    """The Service proxy asks the gate before it joins a client to a backend: a denied client
    is reset without reaching the backend, an allowed one is forwarded."""
    opener = FakeOpener()
    verdicts: list[bool] = []

    class Gate:
        allow = False

        async def allowed(self, proto: str, backend: Any, peer: Any, local: Any) -> bool:
            verdicts.append(self.allow)
            assert (proto, backend.vmi, peer[0]) == ("TCP", "db-0", "127.0.0.1")
            return self.allow

    gate = Gate()
    proxy = ServiceProxy(opener, addresses=LoopbackAddresses(), gate=gate)
    port = free_port()
    svc = service("db", {"name": "pg", "port": port}, clusterIP="10.96.0.5")
    try:
        async with tcp_echo(b"db:") as backend:
            opener.ports = {("db-0", "TCP", 5432): backend}
            await proxy.sync([svc], [endpoints_for("db", "pg", 5432, "db-0")])
            assert await tcp_request("127.0.0.1", port, b"x") == b""
            assert opener.calls == []  # the backend was never asked for
            gate.allow = True
            assert await tcp_request("127.0.0.1", port, b"x") == b"db:x"
            assert verdicts == [False, True]
    finally:
        await proxy.close()
    await asyncio.sleep(0)


async def test_a_denied_udp_client_gets_nothing_and_costs_one_verdict() -> None:
    """A UDP client that policy denies gets no reply; its next datagrams within the hold are
    dropped without asking again; an allowed client is answered."""
    opener = FakeOpener()
    asked: list[tuple[str, int]] = []
    allowed_ports: set[int] = set()

    class Gate:
        async def allowed(self, proto: str, backend: Any, peer: Any, local: Any) -> bool:
            asked.append(peer)
            return int(peer[1]) in allowed_ports

    proxy = ServiceProxy(opener, addresses=LoopbackAddresses(), gate=Gate())
    loop = asyncio.get_running_loop()
    backend, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    port = free_port()
    denied = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    allowed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for sock in (denied, allowed):
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
        allowed_ports.add(allowed.getsockname()[1])
        opener.ports = {("dns-0", "UDP", 53): backend.get_extra_info("sockname")[1]}
        svc = service(
            "dns", {"name": "dns", "port": port, "protocol": "UDP"}, clusterIP="10.96.0.12"
        )
        await proxy.sync([svc], [endpoints_for("dns", "dns", 53, "dns-0", proto="UDP")])
        for _ in range(3):
            await loop.sock_sendto(denied, b"q", ("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.sock_recv(denied, 100), 1)
        assert len(asked) == 1  # three datagrams, one verdict
        await loop.sock_sendto(allowed, b"q", ("127.0.0.1", port))
        assert await asyncio.wait_for(loop.sock_recv(allowed, 100), 5) == b"udp:q"
        assert opener.calls == [("apps", "dns-0", "UDP", 53)]  # only the allowed one's lookup
    finally:
        denied.close()
        allowed.close()
        await proxy.close()
        backend.close()
