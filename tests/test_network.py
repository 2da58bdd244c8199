"""Networking: MAC/ClusterIP/NodePort allocation, bridge plans, real bridges and taps, VLAN
isolation between network namespaces, the Service proxy and the Endpoints controller."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from vmo.api.kubevirt.macs import (
    apply_macs,
    mac_conflicts,
    mac_patch,
    macs_in_use,
    macs_to_assign,
    network_key,
)
from vmo.api.services import (
    AllocationError,
    addresses_in_use,
    allocate_cluster_ip,
    allocate_node_port,
    allocate_service,
    cluster_ip_causes,
    node_port_causes,
)
from vmo.client import ENDPOINTS, SERVICE, VMI, Client
from vmo.engine.network.bridge import (
    BridgeNetConf,
    NetConfError,
    NetworkState,
    apply_bridge,
    attach_tap,
    bridge_plan,
    cleanup_orphans,
    create_tap,
    delete_tap,
    detach_tap,
    macspoof_argv,
    parse_bridge_conf,
    remove_bridge,
    tap_name,
)
from vmo.engine.network.endpoints import EndpointsController, desired_subsets
from vmo.engine.network.ipam import (
    IpamExhausted,
    IpamStore,
    ipam_address,
    network_config,
    static_ethernet,
)
from vmo.engine.network.services import (
    AddressMode,
    Backend,
    ListenKey,
    ServiceAddresses,
    ServiceProxy,
    desired_listeners,
)
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
SUFFIX = f"{os.getpid() % 10000:04d}"


# --------------------------------------------------------------------------- builders


def vm(
    name: str = "db", *interfaces: JSON, networks: list[JSON] | None = None, ns: str = "apps"
) -> JSON:
    return {
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "template": {
                "spec": {
                    "domain": {"devices": {"interfaces": [dict(i) for i in interfaces]}},
                    "networks": networks
                    or [
                        {"name": "default", "pod": {}},
                        {"name": "vlan10", "multus": {"networkName": "vlan10"}},
                    ],
                }
            }
        },
    }


def iface(name: str, mac: str | None = None) -> JSON:
    return {"name": name, "bridge": {}} | ({"macAddress": mac} if mac else {})


def interfaces_of(obj: JSON) -> list[JSON]:
    interfaces: list[JSON] = obj["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"]
    return interfaces


# --------------------------------------------------------------------------- MACs


def test_generated_macs_are_locally_administered_unicast_for_every_interface() -> None:
    chosen = macs_to_assign(vm("db", iface("default"), iface("vlan10")), {}, rng=random.Random(1))
    assert set(chosen) == {"default", "vlan10"}
    for mac in chosen.values():
        assert mac.startswith("02:") and len(mac.split(":")) == 6


def test_an_interface_with_a_mac_keeps_it() -> None:
    chosen = macs_to_assign(
        vm("db", iface("default"), iface("vlan10", "00:50:56:aa:bb:cc")), {}, rng=random.Random(1)
    )
    assert set(chosen) == {"default"}


def test_generation_avoids_macs_in_use() -> None:
    taken = macs_to_assign(vm("x", iface("vlan10")), {}, rng=random.Random(7))["vlan10"]
    again = macs_to_assign(vm("y", iface("vlan10")), {"apps/vlan10": {taken}}, rng=random.Random(7))
    assert again["vlan10"] != taken


def test_update_without_mac_keeps_the_mac_the_vm_had() -> None:
    old = vm("db", iface("vlan10", "02:11:22:33:44:55"))
    chosen = macs_to_assign(vm("db", iface("vlan10")), {}, rng=random.Random(1), old=old)
    assert chosen == {"vlan10": "02:11:22:33:44:55"}


def test_apply_macs_and_patch_write_the_assignment() -> None:
    obj = vm("db", iface("default"), iface("vlan10", "02:00:00:00:00:01"))
    assert mac_patch(obj, {"default": "02:aa:00:00:00:01"}) == [
        {
            "op": "add",
            "path": "/spec/template/spec/domain/devices/interfaces/0/macAddress",
            "value": "02:aa:00:00:00:01",
        }
    ]
    apply_macs(obj, {"default": "02:aa:00:00:00:01"})
    assert interfaces_of(obj)[0]["macAddress"] == "02:aa:00:00:00:01"


def test_duplicate_mac_on_one_network_is_refused_with_its_field_path() -> None:
    others = [vm("other", iface("default"), iface("vlan10", "02:00:00:00:00:0A"))]
    used = macs_in_use(others)
    causes = mac_conflicts(vm("db", iface("default"), iface("vlan10", "02-00-00-00-00-0a")), used)
    assert [c.field for c in causes] == [
        "spec.template.spec.domain.devices.interfaces[1].macAddress"
    ]
    assert causes[0].reason == "FieldValueDuplicate"
    assert "apps/vlan10" in causes[0].message


def test_same_mac_on_another_network_or_namespace_is_allowed() -> None:
    used = macs_in_use([vm("other", iface("vlan10", "02:00:00:00:00:0a"), ns="elsewhere")])
    assert mac_conflicts(vm("db", iface("vlan10", "02:00:00:00:00:0a")), used) == []


def test_duplicate_mac_within_one_vm_on_one_network_is_refused() -> None:
    nets = [
        {"name": "a", "multus": {"networkName": "l2"}},
        {"name": "b", "multus": {"networkName": "apps/l2"}},
    ]
    causes = mac_conflicts(
        vm("db", iface("a", "02:00:00:00:00:01"), iface("b", "02:00:00:00:00:01"), networks=nets),
        {},
    )
    assert [c.field for c in causes] == [
        "spec.template.spec.domain.devices.interfaces[1].macAddress"
    ]


def test_macs_in_use_excludes_the_object_being_admitted_and_its_vmi() -> None:
    objs = [
        vm("db", iface("vlan10", "02:00:00:00:00:01")),
        vm("web", iface("vlan10", "02:00:00:00:00:02")),
    ]
    assert macs_in_use(objs, exclude=("apps", "db")) == {"apps/vlan10": {"02:00:00:00:00:02"}}


def test_vmi_interfaces_use_the_vmi_field_path() -> None:
    vmi = {
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "v", "namespace": "apps"},
        "spec": {
            "domain": {"devices": {"interfaces": [iface("default", "02:00:00:00:00:01")]}},
            "networks": [{"name": "default", "pod": {}}],
        },
    }
    causes = mac_conflicts(vmi, {"pod": {"02:00:00:00:00:01"}})
    assert [c.field for c in causes] == ["spec.domain.devices.interfaces[0].macAddress"]
    assert network_key(vmi, "default") == "pod"


# --------------------------------------------------------------------------- ClusterIP / NodePort


def test_first_cluster_ip_skips_the_address_reserved_for_kubernetes() -> None:
    assert allocate_cluster_ip(set()) == "10.96.0.2"
    assert allocate_cluster_ip({"10.96.0.2", "10.96.0.3"}) == "10.96.0.4"


def test_random_cluster_ip_stays_in_range_and_free() -> None:
    ip = allocate_cluster_ip({"10.96.0.2"}, "10.96.0.0/29", rng=random.Random(3))
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.96.0.0/29")
    assert ip not in {"10.96.0.0", "10.96.0.1", "10.96.0.2", "10.96.0.7"}


def test_a_full_service_range_raises() -> None:
    with pytest.raises(AllocationError):
        allocate_cluster_ip({"10.96.0.2"}, "10.96.0.0/30")


def test_explicit_cluster_ip_taken_or_out_of_range_is_refused_like_upstream() -> None:
    assert (
        "provided IP is already allocated"
        in cluster_ip_causes("10.96.0.9", {"10.96.0.9"})[0].message
    )
    assert "is not in the valid range" in cluster_ip_causes("10.200.0.1", set())[0].message
    assert cluster_ip_causes("10.96.0.9", set()) == []


def test_node_ports_allocate_in_range_and_refuse_taken_ones() -> None:
    assert allocate_node_port(set()) == 30000
    assert allocate_node_port({30000}) == 30001
    assert 30000 <= allocate_node_port(set(), rng=random.Random(1)) <= 32767
    causes = node_port_causes(30080, {30080}, field="spec.ports[0].nodePort")
    assert causes[0].field == "spec.ports[0].nodePort"
    assert "provided port is already allocated" in causes[0].message
    assert "not in the valid range" in node_port_causes(80, set(), field="f")[0].message


def service(
    name: str, *ports: JSON, svc_type: str = "ClusterIP", ns: str = "apps", **spec: Any
) -> JSON:
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": svc_type, "ports": list(ports), **spec},
    }


def test_allocate_service_fills_cluster_ip_and_node_ports() -> None:
    svc = service("db", {"port": 5432}, {"port": 53, "protocol": "UDP"}, svc_type="NodePort")
    assert allocate_service(svc, used_ips={"10.96.0.2"}, used_ports={30000}) == []
    assert svc["spec"]["clusterIP"] == "10.96.0.3" and svc["spec"]["clusterIPs"] == ["10.96.0.3"]
    assert [p["nodePort"] for p in svc["spec"]["ports"]] == [30001, 30002]


def test_allocate_service_keeps_headless_and_allows_one_node_port_for_tcp_and_udp() -> None:
    headless = service("h", {"port": 80}, clusterIP="None")
    assert allocate_service(headless, used_ips=set(), used_ports=set()) == []
    assert headless["spec"]["clusterIPs"] == ["None"]
    dns = service(
        "dns",
        {"port": 53, "nodePort": 30053},
        {"port": 53, "protocol": "UDP", "nodePort": 30053},
        svc_type="NodePort",
    )
    assert allocate_service(dns, used_ips=set(), used_ports=set()) == []


def test_allocate_service_refuses_a_taken_node_port_with_its_field() -> None:
    svc = service("db", {"port": 80}, {"port": 81, "nodePort": 30080}, svc_type="NodePort")
    causes = allocate_service(svc, used_ips=set(), used_ports={30080})
    assert [c.field for c in causes] == ["spec.ports[1].nodePort"]


def test_addresses_in_use_excludes_the_service_itself() -> None:
    a = service("a", {"port": 80, "nodePort": 30001}, clusterIP="10.96.0.5", svc_type="NodePort")
    b = service("b", {"port": 80}, clusterIP="10.96.0.6")
    assert addresses_in_use([a, b], exclude=("apps", "b")) == ({"10.96.0.5"}, {30001})


# --------------------------------------------------------------------------- CNI config and plans


def test_bridge_conf_defaults_to_cni0_pure_layer_2() -> None:
    conf = parse_bridge_conf('{"cniVersion": "0.3.1", "name": "l2", "type": "bridge"}')
    assert conf == BridgeNetConf(name="l2", bridge="cni0")


def test_bridge_conf_reads_vlan_mtu_macspoofchk_and_host_local_ranges() -> None:
    conf = parse_bridge_conf(
        json.dumps(
            {
                "cniVersion": "0.3.1",
                "name": "vlan10",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "br1",
                        "vlan": 10,
                        "mtu": 1400,
                        "macspoofchk": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [
                                [
                                    {
                                        "subnet": "192.168.10.0/24",
                                        "rangeStart": "192.168.10.50",
                                        "rangeEnd": "192.168.10.60",
                                    }
                                ]
                            ],
                            "routes": [{"dst": "0.0.0.0/0"}],
                        },
                    },
                    {"type": "tuning"},
                ],
            }
        )
    )
    assert (conf.bridge, conf.vlan, conf.mtu, conf.macspoofchk) == ("br1", 10, 1400, True)
    assert conf.ipam is not None
    assert (
        str(conf.ipam.range_start) == "192.168.10.50" and str(conf.ipam.gateway) == "192.168.10.1"
    )


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ('{"type": "macvlan"}', "spec.config.type"),
        ("{not json", "spec.config"),
        ('{"type": "bridge", "vlan": 5000}', "spec.config.vlan"),
        ('{"type": "bridge", "bridge": "a-name-longer-than-15"}', "spec.config.bridge"),
        ('{"type": "bridge", "ipam": {"type": "dhcp"}}', "spec.config.ipam.type"),
        (
            '{"type": "bridge", "ipam": {"type": "host-local", "subnet": "10.0.0.0/24", "gateway": "10.1.0.1"}}',
            "spec.config.ipam.gateway",
        ),
    ],
)
def test_unsupported_or_invalid_conf_names_the_field(config: str, field: str) -> None:
    with pytest.raises(NetConfError) as error:
        parse_bridge_conf(config)
    assert error.value.field == field


def test_bridge_plan_without_vlan_uses_the_cni_bridge() -> None:
    plan = bridge_plan(BridgeNetConf(name="l2", bridge="br-storage", mtu=9000), node="node-1")
    assert (plan.host_bridge, plan.mtu, plan.vlan) == ("br-storage", 9000, None)


def test_bridge_plan_gives_each_vlan_its_own_bridge_golden() -> None:
    ten = bridge_plan(BridgeNetConf(name="a", bridge="br1", vlan=10), node="node-1")
    twenty = bridge_plan(BridgeNetConf(name="b", bridge="br1", vlan=20), node="node-1")
    assert ten.host_bridge == "vb-fb193fd656"  # pinned: renaming would orphan existing bridges
    assert twenty.host_bridge != ten.host_bridge
    assert ten.alias == "vmo:bridge=br1,vlan=10"


def test_bridge_plan_is_the_same_on_every_node_of_the_host() -> None:
    conf = BridgeNetConf(name="a", bridge="br1", vlan=10)
    assert (
        bridge_plan(conf, node="node-1").host_bridge == bridge_plan(conf, node="node-2").host_bridge
    )


def test_long_bridge_names_hash_within_ifnamsiz() -> None:
    plan = bridge_plan(BridgeNetConf(name="a", bridge="bridge-fifteen", vlan=4094), node="n")
    assert plan.host_bridge == "vb-5190ef5f80"


def test_tap_names_are_short_stable_and_distinct() -> None:
    uid = "6f1c2a4e-0000-4000-8000-000000000001"
    assert tap_name(uid, "vlan10") == "vt-d0de41cad637"
    assert tap_name(uid, "vlan10") == tap_name(uid, "vlan10")
    assert len({tap_name(uid, "a"), tap_name(uid, "b"), tap_name(uid + "2", "a")}) == 3
    # a migration's source and target taps live side by side on one host
    assert tap_name(uid, "a", "node-1") != tap_name(uid, "a", "node-2")
    assert len(tap_name(uid, "a", "node-1")) <= 15


def test_macspoofchk_rules_golden() -> None:
    assert macspoof_argv("vt-abc", "02:AA:00:00:00:01")[-1] == [
        "nft", "add", "rule", "bridge", "vmo-vt-abc", "prerouting",
        "iifname", "vt-abc", "ether", "saddr", "!=", "02:aa:00:00:00:01", "drop",
    ]  # fmt: skip


# --------------------------------------------------------------------------- IPAM


def l2_conf(**ipam: Any) -> BridgeNetConf:
    return parse_bridge_conf(
        {"type": "bridge", "bridge": "br1", "vlan": 10, "ipam": {"type": "host-local", **ipam}}
    )


def vmi_obj(name: str, ns: str = "apps") -> JSON:
    return {"metadata": {"name": name, "namespace": ns}}


def test_ipam_leases_lowest_free_address_skipping_the_gateway(tmp_path: Path) -> None:
    store, conf = IpamStore(tmp_path), l2_conf(subnet="192.168.10.0/24")
    first = ipam_address(conf, vmi_obj("a"), iface="net1", store=store)
    second = ipam_address(conf, vmi_obj("b"), iface="net1", store=store)
    assert first is not None and second is not None
    assert (str(first.address), str(first.gateway)) == ("192.168.10.2/24", "192.168.10.1")
    assert str(second.address) == "192.168.10.3/24"


def test_ipam_gives_an_owner_its_address_back_until_released(tmp_path: Path) -> None:
    store, conf = IpamStore(tmp_path), l2_conf(subnet="192.168.10.0/24")
    first = ipam_address(conf, vmi_obj("a"), iface="net1", store=store)
    assert ipam_address(conf, vmi_obj("a"), iface="net1", store=store) == first
    store.release("apps/a/")
    assert store.leases() == {}


def test_ipam_release_except_frees_leases_of_vanished_vmis(tmp_path: Path) -> None:
    store, conf = IpamStore(tmp_path), l2_conf(subnet="192.168.10.0/24")
    ipam_address(conf, vmi_obj("a"), iface="net1", store=store)
    ipam_address(conf, vmi_obj("b"), iface="net1", store=store)
    assert store.release_except({"apps/a/net1"}) == ["apps/b/net1"]


def test_ipam_range_exhaustion_raises(tmp_path: Path) -> None:
    store = IpamStore(tmp_path)
    conf = l2_conf(subnet="10.5.0.0/24", rangeStart="10.5.0.10", rangeEnd="10.5.0.10")
    ipam_address(conf, vmi_obj("a"), iface="n", store=store)
    with pytest.raises(IpamExhausted):
        ipam_address(conf, vmi_obj("b"), iface="n", store=store)


def test_pure_l2_network_has_no_address_and_lease_becomes_network_config(tmp_path: Path) -> None:
    store = IpamStore(tmp_path)
    assert ipam_address(BridgeNetConf(name="l2"), vmi_obj("a"), iface="n", store=store) is None
    lease = ipam_address(l2_conf(subnet="10.5.0.0/24"), vmi_obj("a"), iface="n", store=store)
    assert lease is not None
    assert network_config({"net1": static_ethernet("02:AA:00:00:00:01", lease)}) == {
        "version": 2,
        "ethernets": {
            "net1": {
                "match": {"macaddress": "02:aa:00:00:00:01"},
                "addresses": ["10.5.0.2/24"],
                "dhcp4": False,
            }
        },
    }


# --------------------------------------------------------------------------- real links


def links() -> dict[str, JSON]:
    out = subprocess.run(
        ["ip", "-j", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def force_delete(*names: str) -> None:
    for name in names:
        subprocess.run(["ip", "link", "del", "dev", name], capture_output=True, check=False)


def test_bridge_and_two_taps_are_created_then_removed_without_trace(tmp_path: Path) -> None:
    plan = bridge_plan(
        BridgeNetConf(name="t", bridge=f"vmot{SUFFIX}", vlan=10, mtu=1400), node="n1"
    )
    state = NetworkState(tmp_path)
    taps = [tap_name(f"uid-{SUFFIX}", "a"), tap_name(f"uid-{SUFFIX}", "b")]
    try:
        for tap in taps:
            attach_tap(state, plan, tap, owner=f"apps/vm{SUFFIX}")
        now = links()
        assert now[plan.host_bridge]["ifalias"] == plan.alias
        assert all(now[t]["master"] == plan.host_bridge and now[t]["mtu"] == 1400 for t in taps)
        assert set(state.taps()) == set(taps)
        detach_tap(state, taps[0])
        assert taps[0] not in links() and plan.host_bridge in links()  # still has a port
        detach_tap(state, taps[1])
        assert not {plan.host_bridge, *taps} & set(links())
        assert state.taps() == {}
    finally:
        force_delete(*taps, plan.host_bridge)


def test_creating_links_twice_and_deleting_missing_ones_is_harmless() -> None:
    plan = bridge_plan(BridgeNetConf(name="t", bridge=f"vmoi{SUFFIX}"), node="n1")
    tap = tap_name(f"idem-{SUFFIX}", "a")
    try:
        assert apply_bridge(plan) is True
        assert apply_bridge(plan) is False
        create_tap(tap, plan.host_bridge)
        create_tap(tap, plan.host_bridge)
        delete_tap(tap)
        delete_tap(tap)
        assert remove_bridge(plan) is True
        assert remove_bridge(plan) is False
    finally:
        force_delete(tap, plan.host_bridge)


def test_a_host_bridge_vmo_did_not_create_is_never_removed() -> None:
    name = f"vmoh{SUFFIX}"
    try:
        subprocess.run(["ip", "link", "add", "name", name, "type", "bridge"], check=True)
        assert remove_bridge(name) is False
        assert name in links()
    finally:
        force_delete(name)


def test_cleanup_orphans_removes_recorded_taps_except_the_live_ones(tmp_path: Path) -> None:
    plan = bridge_plan(BridgeNetConf(name="t", bridge=f"vmoo{SUFFIX}", vlan=7), node="n1")
    state = NetworkState(tmp_path)
    live, dead = tap_name(f"o-{SUFFIX}", "live"), tap_name(f"o-{SUFFIX}", "dead")
    try:
        attach_tap(state, plan, live, owner="apps/a")
        attach_tap(state, plan, dead, owner="apps/b")
        # a fresh state object: what an agent restarting after a crash reads from disk
        assert cleanup_orphans(NetworkState(tmp_path), keep=[live]) == [dead]
        assert dead not in links() and live in links()
        assert cleanup_orphans(NetworkState(tmp_path)) == [live]
        assert not {plan.host_bridge, live} & set(links())
    finally:
        force_delete(live, dead, plan.host_bridge)


# --------------------------------------------------------------------------- VLAN isolation


LISTENER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7007)); s.listen(); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hi"); c.close()
"""
DIALER = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        c = socket.create_connection((sys.argv[1], 7007), timeout=0.5)
        sys.exit(0 if c.recv(2) == b"hi" else 2)
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.1)
"""


def netns_exec(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def plug(ns: str, bridge: str, address: str) -> str:
    """A namespace with one veth end (``eth0``, ``address``) whose peer is a port of ``bridge``."""
    host_end = f"vh{ns[-8:]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns],
        check=True,
    )
    subprocess.run(["ip", "link", "set", host_end, "master", bridge, "up"], check=True)
    subprocess.run(netns_exec(ns, "ip", "addr", "add", address, "dev", "eth0"), check=True)
    subprocess.run(netns_exec(ns, "ip", "link", "set", "eth0", "up"), check=True)
    subprocess.run(netns_exec(ns, "ip", "link", "set", "lo", "up"), check=True)
    return host_end


def reaches(src: str, ip: str, seconds: float) -> bool:
    proc = subprocess.run(
        netns_exec(src, sys.executable, "-c", DIALER, ip, str(seconds)), timeout=30, check=False
    )
    return proc.returncode == 0


def test_same_vlan_reaches_and_different_vlans_do_not() -> None:
    vlan10 = bridge_plan(BridgeNetConf(name="v10", bridge=f"vmov{SUFFIX}", vlan=10), node="node-1")
    vlan20 = bridge_plan(BridgeNetConf(name="v20", bridge=f"vmov{SUFFIX}", vlan=20), node="node-2")
    spaces = {
        f"vmo-a{SUFFIX}": (vlan10, "10.77.0.1/24"),
        f"vmo-b{SUFFIX}": (vlan10, "10.77.0.2/24"),
        f"vmo-c{SUFFIX}": (vlan20, "10.77.0.3/24"),
    }
    host_ends: list[str] = []
    listeners: list[subprocess.Popen[str]] = []
    try:
        apply_bridge(vlan10)
        apply_bridge(vlan20)
        for ns, (plan, address) in spaces.items():
            host_ends.append(plug(ns, plan.host_bridge, address))
        for ns in list(spaces)[1:]:
            proc = subprocess.Popen(
                netns_exec(ns, sys.executable, "-c", LISTENER), stdout=subprocess.PIPE, text=True
            )
            listeners.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        a = next(iter(spaces))
        assert reaches(a, "10.77.0.2", 5.0), "same VLAN must reach"
        assert not reaches(a, "10.77.0.3", 1.5), "another VLAN must not"
    finally:
        for proc in listeners:
            proc.kill()
            proc.communicate()
        for ns in spaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        force_delete(*host_ends)
        remove_bridge(vlan10)
        remove_bridge(vlan20)
        force_delete(vlan10.host_bridge, vlan20.host_bridge)
    assert not {vlan10.host_bridge, vlan20.host_bridge, *host_ends} & set(links())


# --------------------------------------------------------------------------- Service proxy


def test_desired_listeners_map_cluster_and_node_ports_to_vmi_backends() -> None:
    svc = service(
        "db",
        {"name": "pg", "port": 5432, "nodePort": 30432},
        svc_type="NodePort",
        clusterIP="10.96.0.9",
    )
    eps = {
        "metadata": {"name": "db", "namespace": "apps"},
        "subsets": [
            {
                "addresses": [
                    {
                        "ip": "10.0.2.2",
                        "targetRef": {
                            "kind": "VirtualMachineInstance",
                            "namespace": "apps",
                            "name": "db-0",
                        },
                    }
                ],
                "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}],
            }
        ],
    }
    wanted = desired_listeners([svc], [eps])
    backends = (Backend("apps", "db-0", 15432),)
    assert wanted == {
        ListenKey("TCP", "10.96.0.9", 5432): backends,
        ListenKey("TCP", "0.0.0.0", 30432): backends,
    }
    loopback = desired_listeners([svc], [eps], cluster_host="127.0.0.1")
    assert ListenKey("TCP", "127.0.0.1", 5432) in loopback


class FakeOpener:
    """Maps (vmi, guest port) to a host port, as the agent's hostfwd table would."""

    def __init__(self) -> None:
        self.ports: dict[tuple[str, str, int], int] = {}
        self.calls: list[tuple[str, str, str, int]] = []

    async def host_port(self, namespace: str, vmi: str, proto: str, guest_port: int) -> int | None:
        self.calls.append((namespace, vmi, proto, guest_port))
        return self.ports.get((vmi, proto, guest_port))


@contextlib.asynccontextmanager
async def tcp_echo(tag: bytes) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1024)
        writer.write(tag + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # the selector loop's datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"udp:" + data, addr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def tcp_request(host: str, port: int, data: bytes) -> bytes:
    """The whole reply; b"" when the proxy closes (or resets) the connection without one."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def endpoints_for(
    name: str, port_name: str, guest_port: int, *vmis: str, proto: str = "TCP"
) -> JSON:
    return {
        "metadata": {"name": name, "namespace": "apps"},
        "subsets": [
            {
                "addresses": [
                    {
                        "ip": "10.0.2.2",
                        "targetRef": {
                            "kind": "VirtualMachineInstance",
                            "namespace": "apps",
                            "name": v,
                        },
                    }
                    for v in vmis
                ],
                "ports": [{"name": port_name, "port": guest_port, "protocol": proto}],
            }
        ],
    }


@pytest.fixture
def addresses() -> Iterator[ServiceAddresses]:
    addrs = ServiceAddresses(device=f"vmo-svt{SUFFIX}")
    try:
        yield addrs
    finally:
        addrs.teardown()
        force_delete(addrs.device)


async def test_proxy_forwards_tcp_on_cluster_ip_and_node_port_round_robin(
    addresses: ServiceAddresses,
) -> None:
    opener = FakeOpener()
    proxy = ServiceProxy(opener, addresses=addresses)
    node_port = free_port()
    svc = service(
        "db",
        {"name": "pg", "port": 5432, "nodePort": node_port},
        svc_type="NodePort",
        clusterIP=f"10.96.{int(SUFFIX) % 250}.9",
    )
    async with tcp_echo(b"a:") as port_a, tcp_echo(b"b:") as port_b:
        opener.ports = {("db-0", "TCP", 5432): port_a, ("db-1", "TCP", 5432): port_b}
        try:
            await proxy.sync([svc], [endpoints_for("db", "pg", 5432, "db-0", "db-1")])
            assert addresses.mode in (AddressMode.DUMMY, AddressMode.BRIDGE)
            cluster_ip = svc["spec"]["clusterIP"]
            replies = {await tcp_request(cluster_ip, 5432, b"hello") for _ in range(2)}
            assert replies == {b"a:hello", b"b:hello"}
            assert await tcp_request("127.0.0.1", node_port, b"np") in {b"a:np", b"b:np"}
        finally:
            await proxy.close()
    assert addresses.device not in links()


async def test_proxy_follows_an_endpoint_that_moves_and_drops_a_closed_service() -> None:
    opener = FakeOpener()
    proxy = ServiceProxy(opener, addresses=LoopbackAddresses())
    port = free_port()
    svc = service("web", {"name": "http", "port": port}, clusterIP="10.96.0.77")
    eps = endpoints_for("web", "http", 80, "web-0")
    try:
        async with tcp_echo(b"first:") as first:
            opener.ports = {("web-0", "TCP", 80): first}
            await proxy.sync([svc], [eps])
            assert await tcp_request("127.0.0.1", port, b"x") == b"first:x"
        async with tcp_echo(b"second:") as second:
            opener.ports = {("web-0", "TCP", 80): second}  # the VMI restarted: a new hostfwd port
            assert await tcp_request("127.0.0.1", port, b"x") == b"second:x"
        await proxy.sync([], [])
        with pytest.raises(OSError):
            await tcp_request("127.0.0.1", port, b"x")
    finally:
        await proxy.close()


class LoopbackAddresses(ServiceAddresses):
    """No device at all: what an agent without CAP_NET_ADMIN gets."""

    def _make_device(self) -> AddressMode:
        return AddressMode.LOOPBACK


async def test_proxy_forwards_udp_per_client_flow() -> None:
    opener = FakeOpener()
    proxy = ServiceProxy(opener, addresses=LoopbackAddresses())
    loop = asyncio.get_running_loop()
    backend, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    port = free_port()
    try:
        opener.ports = {("dns-0", "UDP", 53): backend.get_extra_info("sockname")[1]}
        svc = service(
            "dns", {"name": "dns", "port": port, "protocol": "UDP"}, clusterIP="10.96.0.10"
        )
        await proxy.sync([svc], [endpoints_for("dns", "dns", 53, "dns-0", proto="UDP")])
        for client_id in (b"one", b"two"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.setblocking(False)
                await loop.sock_sendto(client, client_id, ("127.0.0.1", port))
                reply = await asyncio.wait_for(loop.sock_recv(client, 100), 5)
                assert reply == b"udp:" + client_id
        assert opener.calls.count(("apps", "dns-0", "UDP", 53)) == 2  # one lookup per flow
    finally:
        await proxy.close()
        backend.close()


async def test_proxy_closes_a_connection_when_no_backend_answers() -> None:
    proxy = ServiceProxy(FakeOpener(), addresses=LoopbackAddresses())
    port = free_port()
    try:
        await proxy.sync(
            [service("none", {"port": port}, clusterIP="10.96.0.11")],
            [endpoints_for("none", "", 80, "gone")],
        )
        assert await tcp_request("127.0.0.1", port, b"x") == b""
    finally:
        await proxy.close()


# --------------------------------------------------------------------------- Endpoints controller


def running_vmi(
    name: str, labels: dict[str, str], *, ip: str | None = "10.0.2.2", ready: bool = True
) -> JSON:
    status: JSON = {"phase": "Running", "nodeName": "node-1"}
    if ip:
        status["interfaces"] = [{"name": "default", "ipAddress": ip}]
    if not ready:
        status["conditions"] = [{"type": "Ready", "status": "False"}]
    return {
        "metadata": {"name": name, "namespace": "apps", "labels": labels, "uid": f"uid-{name}"},
        "status": status,
    }


def test_desired_subsets_select_running_vmis_and_resolve_named_target_ports() -> None:
    svc = service(
        "db", {"name": "pg", "port": 5432, "targetPort": "postgres"}, selector={"app": "db"}
    )
    named = running_vmi("db-0", {"app": "db"})
    named["spec"] = {
        "domain": {
            "devices": {
                "interfaces": [{"name": "default", "ports": [{"name": "postgres", "port": 15432}]}]
            }
        }
    }
    stopped = running_vmi("db-1", {"app": "db"}) | {"status": {"phase": "Succeeded"}}
    other = running_vmi("web-0", {"app": "web"})
    unready = running_vmi("db-2", {"app": "db"}, ip=None, ready=False)
    unready["spec"] = named["spec"]
    subsets = desired_subsets(svc, [named, stopped, other, unready], {"node-1": "192.0.2.2"})
    assert subsets == [
        {
            "addresses": [
                {
                    "ip": "10.0.2.2",
                    "nodeName": "node-1",
                    "targetRef": {
                        "kind": "VirtualMachineInstance",
                        "namespace": "apps",
                        "name": "db-0",
                        "uid": "uid-db-0",
                    },
                }
            ],
            "notReadyAddresses": [
                {
                    "ip": "192.0.2.2",
                    "nodeName": "node-1",
                    "targetRef": {
                        "kind": "VirtualMachineInstance",
                        "namespace": "apps",
                        "name": "db-2",
                        "uid": "uid-db-2",
                    },
                }
            ],
            "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}],
        }
    ]


@pytest.fixture(scope="module")
def netserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    server = ThreadedServer(tmp_path_factory.mktemp("vmo-net")).start()
    try:
        yield server
    finally:
        server.stop()


async def wait_for_subsets(
    client: Client, name: str, ns: str, want: Any, timeout: float = 10.0
) -> JSON:
    """The Endpoints once ``want(subsets)`` holds ({} once they are gone: subsets None)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        eps = await client.find(ENDPOINTS, name, ns)
        got = None if eps is None else eps.get("subsets") or []
        if want(got):
            return eps or {}
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"endpoints {ns}/{name} never matched; last: {got}")
        await asyncio.sleep(0.1)


async def test_endpoints_controller_tracks_vmis_of_a_service(
    netserver: ThreadedServer, unique: str
) -> None:
    ns = "default"
    client = Client.from_kubeconfig(netserver.kubeconfig)
    controller = EndpointsController(client)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    vmi_spec = {"domain": {"devices": {}, "resources": {"requests": {"memory": "128Mi"}}}}
    running = {
        "phase": "Running",
        "nodeName": "node-1",
        "interfaces": [{"name": "default", "ipAddress": "10.0.2.2"}],
    }
    try:
        await client.create(
            SERVICE,
            {
                "metadata": {"name": unique, "namespace": ns},
                "spec": {
                    "selector": {"app": unique},
                    "ports": [{"name": "pg", "port": 5432, "targetPort": 15432}],
                },
            },
        )
        for vmi_name in (f"{unique}-a", f"{unique}-b"):
            await client.create(
                VMI,
                {
                    "metadata": {"name": vmi_name, "namespace": ns, "labels": {"app": unique}},
                    "spec": vmi_spec,
                },
            )
        # upstream's VMI has no status subresource: virt-handler patches the object itself
        await client.patch(VMI, f"{unique}-a", {"status": running}, ns)

        eps = await wait_for_subsets(
            client, unique, ns, lambda s: bool(s) and len(s[0].get("addresses", [])) == 1
        )
        address = eps["subsets"][0]["addresses"][0]
        assert address["targetRef"]["name"] == f"{unique}-a" and address["nodeName"] == "node-1"
        assert eps["subsets"][0]["ports"] == [{"name": "pg", "port": 15432, "protocol": "TCP"}]

        await client.patch(VMI, f"{unique}-b", {"status": running}, ns)
        both = await wait_for_subsets(
            client, unique, ns, lambda s: bool(s) and len(s[0].get("addresses", [])) == 2
        )
        names = {a["targetRef"]["name"] for a in both["subsets"][0]["addresses"]}
        assert names == {f"{unique}-a", f"{unique}-b"}

        await client.patch(VMI, f"{unique}-a", {"metadata": {"labels": {"app": "other"}}}, ns)
        await client.delete(VMI, f"{unique}-b", ns)
        await wait_for_subsets(client, unique, ns, lambda s: s == [])

        await client.delete(SERVICE, unique, ns)
        await wait_for_subsets(client, unique, ns, lambda s: s is None)
    finally:
        stop.set()
        await task
        for vmi_name in (f"{unique}-a", f"{unique}-b"):
            await client.delete(VMI, vmi_name, ns)
        await client.delete(SERVICE, unique, ns)
        await client.close()
