"""MultiNetworkPolicy compiled to nftables and enforced on a real Linux bridge.

Three "VMs" (network namespaces behind tap-named veths on one bridge): a database and two
clients with different labels. Connections are real TCP (OpenBSD nc). The compiled tables are
also checked by ``nft -c`` at 500 rules.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_l2_filter import Port, run
from vmo.api.netpol import POLICY_FOR, default_policy, validate_policy
from vmo.engine.network.l2policy import Member, apply, compile_table, table_name

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bridges and namespaces")

NS = "virtual-machines"
NET = (NS, "vlan-31")
NODE = "node-test"
_ids = itertools.count()


def policy(name: str, spec: dict[str, Any], networks: str = "vlan-31") -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "k8s.cni.cncf.io/v1beta1",
        "kind": "MultiNetworkPolicy",
        "metadata": {"name": name, "namespace": NS, "annotations": {POLICY_FOR: networks}},
        "spec": spec,
    }
    default_policy(obj)
    assert validate_policy(obj, multi=True) == []
    return obj


ONLY_CLIENT_A = {
    "podSelector": {"matchLabels": {"app": "db"}},
    "ingress": [
        {
            "from": [{"podSelector": {"matchLabels": {"role": "client-a"}}}],
            "ports": [{"port": 5432}],
        }
    ],
}


class Lab:
    def __init__(self, tag: str) -> None:
        self.bridge = f"vmotp{tag}"
        self.ports = {
            "db": Port(f"vt-pd{tag}", f"vmo-pd{tag}", "192.168.79.10", "02:79:00:00:00:10"),
            "client-a": Port(f"vt-pa{tag}", f"vmo-pa{tag}", "192.168.79.11", "02:79:00:00:00:11"),
            "client-b": Port(f"vt-pb{tag}", f"vmo-pb{tag}", "192.168.79.12", "02:79:00:00:00:12"),
        }
        self.listeners: list[subprocess.Popen[bytes]] = []

    def members(self) -> list[Member]:
        labels = {
            "db": {"app": "db"},
            "client-a": {"role": "client-a"},
            "client-b": {"role": "client-b"},
        }
        return [
            Member(NS, name, labels[name], NET, port.mac, (port.ip,))
            for name, port in self.ports.items()
        ]

    def connects(self, client: str, port: int, server: str = "db") -> bool:
        target = self.ports[server]
        done = self.ports[client].ns("nc", "-z", "-w", "2", target.ip, str(port), check=False)
        return done.returncode == 0

    def enforce(self, *policies: dict[str, Any]) -> Any:
        table = compile_table(NODE, self.members(), policies)
        apply(table, node=NODE)
        return table


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(f"{os.getpid() % 10000:04d}{next(_ids)}")
    try:
        run("ip", "link", "add", "name", lab.bridge, "type", "bridge")
        run("ip", "link", "set", "dev", lab.bridge, "up")
        for port in lab.ports.values():
            run("ip", "netns", "add", port.netns)
            run("ip", "link", "add", port.tap, "type", "veth", "peer", "name", f"{port.tap}p")
            run("ip", "link", "set", f"{port.tap}p", "netns", port.netns)
            port.ns("ip", "link", "set", f"{port.tap}p", "name", "eth0")
            port.ns("ip", "link", "set", "dev", "eth0", "address", port.mac)
            port.ns("ip", "addr", "add", f"{port.ip}/24", "dev", "eth0")
            port.ns("ip", "link", "set", "dev", "eth0", "up")
            port.ns("ip", "link", "set", "dev", "lo", "up")
            run("ip", "link", "set", "dev", port.tap, "master", lab.bridge, "up")
        for server in lab.ports:
            for number in (5432, 22):
                lab.listeners.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", lab.ports[server].netns, "nc", "-lk", str(number)],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        time.sleep(0.3)
        yield lab
    finally:
        apply(compile_table(NODE, [], []), node=NODE)
        for listener in lab.listeners:
            listener.kill()
            listener.wait()
        for port in lab.ports.values():
            run("ip", "link", "del", "dev", port.tap, check=False)
            run("ip", "netns", "del", port.netns, check=False)
        run("ip", "link", "del", "dev", lab.bridge, check=False)


def _tables() -> str:
    return run("nft", "list", "tables", "inet").stdout


def test_only_the_allowed_client_reaches_the_database_port(lab: Lab) -> None:
    assert lab.connects("client-a", 5432) and lab.connects("client-b", 5432)
    table = lab.enforce(policy("db-only-a", ONLY_CLIENT_A))
    assert table.members == 1 and table.rules == 2  # IPv4 and IPv6 lines of one rule
    assert lab.connects("client-a", 5432), "the allowed client connects (and gets its replies)"
    assert not lab.connects("client-b", 5432), "the other client is refused"
    assert not lab.connects("client-a", 22), "other ports of the selected VM are closed"
    # VMs the policy does not select are not isolated
    assert lab.connects("client-b", 5432, server="client-a")
    # deleting the policy opens the path again and leaves no table
    lab.enforce()
    assert table_name(NODE) not in _tables()
    assert lab.connects("client-b", 5432)


def test_policies_add_up_and_ip_blocks_cut_out_their_exceptions(lab: Lab) -> None:
    by_block = policy(
        "db-from-block",
        {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [
                {
                    "from": [
                        {"ipBlock": {"cidr": "192.168.79.0/24", "except": ["192.168.79.11/32"]}}
                    ],
                    "ports": [{"port": 22}],
                }
            ],
        },
    )
    lab.enforce(policy("db-only-a", ONLY_CLIENT_A), by_block)
    assert lab.connects("client-a", 5432) and not lab.connects("client-b", 5432)
    assert lab.connects("client-b", 22), "the block allows client-b on 22"
    assert not lab.connects("client-a", 22), "client-a is the block's exception"


def test_egress_isolation_and_a_policy_for_another_network(lab: Lab) -> None:
    egress = policy(
        "a-egress",
        {
            "podSelector": {"matchLabels": {"role": "client-a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
        },
    )
    elsewhere = policy("other-net", ONLY_CLIENT_A, networks="storage-net")
    lab.enforce(egress, elsewhere)
    assert lab.connects("client-a", 22), "egress to the db on any port"
    assert not lab.connects("client-a", 5432, server="client-b"), "but to nothing else"
    assert lab.connects("client-b", 5432), "the other network's policy does not apply here"
    assert lab.connects("client-b", 5432, server="client-a"), "client-a still accepts"


def test_five_hundred_rules_compile_and_load(lab: Lab) -> None:
    rules = [
        {
            "from": [{"ipBlock": {"cidr": f"10.{i // 250}.{i % 250}.0/24"}}],
            "ports": [{"port": 1000 + i}],
        }
        for i in range(250)
    ]
    big = policy("big", {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": rules})
    table = compile_table(NODE, lab.members(), [big])
    assert table.rules == 500 and table.sets == 500
    apply(table, node=NODE)
    listed = run("nft", "list", "table", "inet", table.name).stdout
    assert listed.count("accept") >= 500
    assert not lab.connects("client-a", 5432)
