"""macspoofchk on the real kernel: a Linux bridge, two ports, nftables' bridge family.

Each "VM" is a network namespace behind a veth pair whose bridge side is named like a VMO tap;
frames enter the bridge from that port exactly as a guest's frames enter from its tap. Traffic
is a real TCP connection (OpenBSD nc) across the bridge.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vmo.engine.network.bridge import apply_macspoofchk, remove_macspoofchk

# nftables comes from packages/apt.txt: a host without it fails here rather than skipping
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bridges and namespaces")

_ids = itertools.count()
PORT = 5432


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=check)


@dataclass
class Port:
    tap: str  # the bridge side, named like a VMO tap
    netns: str
    ip: str
    mac: str

    def ns(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.netns, *argv, check=check)

    def set_mac(self, mac: str) -> None:
        self.ns("ip", "link", "set", "dev", "eth0", "address", mac)

    def reaches(self, other: Port) -> bool:
        # fresh neighbour entries each time: a cached entry would hide what ARP now does
        self.ns("ip", "neigh", "flush", "all", check=False)
        other.ns("ip", "neigh", "flush", "all", check=False)
        done = self.ns("nc", "-z", "-w", "2", other.ip, str(PORT), check=False)
        return done.returncode == 0


@dataclass
class Segment:
    bridge: str
    a: Port
    b: Port


@pytest.fixture
def segment() -> Iterator[Segment]:
    n = next(_ids)
    tag = f"{os.getpid() % 10000:04d}{n}"
    bridge = f"vmotb{tag}"
    ports = [
        Port(f"vt-fa{tag}", f"vmo-fa{tag}", "192.168.77.1", "02:77:00:00:00:01"),
        Port(f"vt-fb{tag}", f"vmo-fb{tag}", "192.168.77.2", "02:77:00:00:00:02"),
    ]
    listener: subprocess.Popen[bytes] | None = None
    try:
        run("ip", "link", "add", "name", bridge, "type", "bridge")
        run("ip", "link", "set", "dev", bridge, "up")
        for port in ports:
            run("ip", "netns", "add", port.netns)
            run("ip", "link", "add", port.tap, "type", "veth", "peer", "name", f"{port.tap}p")
            run("ip", "link", "set", f"{port.tap}p", "netns", port.netns)
            port.ns("ip", "link", "set", f"{port.tap}p", "name", "eth0")
            port.ns("ip", "link", "set", "dev", "eth0", "address", port.mac)
            port.ns("ip", "addr", "add", f"{port.ip}/24", "dev", "eth0")
            port.ns("ip", "link", "set", "dev", "eth0", "up")
            port.ns("ip", "link", "set", "dev", "lo", "up")
            run("ip", "link", "set", "dev", port.tap, "master", bridge, "up")
        b = ports[1]
        listener = subprocess.Popen(
            ["ip", "netns", "exec", b.netns, "nc", "-lk", str(PORT)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)
        yield Segment(bridge, ports[0], ports[1])
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        for port in ports:
            remove_macspoofchk(port.tap)
            run("ip", "link", "del", "dev", port.tap, check=False)
            run("ip", "netns", "del", port.netns, check=False)
        run("ip", "link", "del", "dev", bridge, check=False)


def _tables() -> str:
    return run("nft", "list", "tables", "bridge").stdout


def test_without_macspoofchk_a_changed_mac_still_talks(segment: Segment) -> None:
    assert segment.a.reaches(segment.b)
    segment.a.set_mac("02:77:00:00:00:99")
    assert segment.a.reaches(segment.b)


def test_with_macspoofchk_a_changed_mac_is_cut_off_and_only_that_port(segment: Segment) -> None:
    a, b = segment.a, segment.b
    assert apply_macspoofchk(a.tap, a.mac.upper())  # the VM's MAC, however it is written
    assert f"vmo-{a.tap}" in _tables()
    assert a.reaches(b), "its own MAC passes"
    a.set_mac("02:77:00:00:00:99")
    assert not a.reaches(b), "a spoofed source MAC is dropped"
    # the other port has no filter: it may change its MAC and still talk (to a's old self)
    a.set_mac(a.mac)
    b.set_mac("02:77:00:00:00:98")
    assert a.reaches(b)
    # removing the filter opens the path again, and leaves no table behind
    a.set_mac("02:77:00:00:00:99")
    remove_macspoofchk(a.tap)
    assert f"vmo-{a.tap}" not in _tables()
    assert a.reaches(b)


def test_reapplying_replaces_the_rule_rather_than_stacking(segment: Segment) -> None:
    a, b = segment.a, segment.b
    assert apply_macspoofchk(a.tap, "02:77:00:00:00:55")
    assert not a.reaches(b)
    assert apply_macspoofchk(a.tap, a.mac)
    assert a.reaches(b)
    rules = run("nft", "list", "table", "bridge", f"vmo-{a.tap}").stdout
    assert rules.count("ether saddr !=") == 1, rules
