"""End to end on real guests: `vmo up`'s engine runs KubeVirt VMs with QEMU (TCG) on this host.

One engine and a handful of guests are shared by the tests of this module; each test uses its
own objects. The guest is built from Debian packages (vmo.testing.guest) and served to CDI-style
DataVolume imports over HTTP, as a user's image server would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Api, Kubectl
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import boot_vm, http_datavolume
from vmo.testing.console import console as shared_console
from vmo.testing.guest import GuestImage
from vmo.testing.processes import qemus_under

NS = "virtual-machines"
BOOT_TIMEOUT = 180.0


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (OSError, KeyError, IndexError, ValueError, AssertionError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def engine_cluster(home: Path, *, nodes: int = 1) -> Iterator[ThreadedServer]:
    """An embedded engine for one e2e module; afterwards every VM is deleted, the engine
    stopped, and a QEMU still running under its home is killed and fails the module."""
    server = ThreadedServer(home, engine=True, nodes=nodes).start()
    try:
        yield server
    finally:
        _stop_all_vms(server)
        server.stop()
        leaked = qemus_under(server.home)
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        assert not leaked, f"QEMU processes left running: {leaked}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-engine"))


def _stop_all_vms(server: ThreadedServer) -> None:
    """Deleting the VMs makes the agent power their guests down, as a user's delete would."""
    api = Api(server.url, server.ca, server.admin_token)
    api.delete(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines")
    base = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances"
    wait_for(lambda: not api.get(base).json()["items"], 120, "every VMI to be gone")


def datavolume(name: str, url: str) -> dict[str, Any]:
    return http_datavolume(name, url, namespace=NS)


def vm(
    name: str,
    *,
    disk: str,
    labels: dict[str, str] | None = None,
    nets: list[dict[str, Any]] | None = None,
    user_data: str = "",
    network_data: str | None = None,
) -> dict[str, Any]:
    interfaces = [{"name": "default", "masquerade": {}}]
    networks: list[dict[str, Any]] = [{"name": "default", "pod": {}}]
    for net in nets or []:
        iface: dict[str, Any] = {"name": net["name"], "bridge": {}}
        if net.get("mac"):
            iface["macAddress"] = net["mac"]
        interfaces.append(iface)
        networks.append({"name": net["name"], "multus": {"networkName": net["nad"]}})
    nocloud: dict[str, Any] = {"userData": user_data or "#cloud-config\n"}
    if network_data is not None:
        nocloud["networkData"] = network_data
    return boot_vm(
        name,
        namespace=NS,
        disk=disk,
        interfaces=interfaces,
        networks=networks,
        labels=labels,
        cloud_init=nocloud,
    )


def vmi_of(capi: Api, name: str) -> dict[str, Any] | None:
    r = capi.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/{name}")
    return r.json() if r.ok else None


def wait_running(capi: Api, name: str) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        vmi = vmi_of(capi, name)
        return vmi if vmi and vmi.get("status", {}).get("phase") == "Running" else None

    return wait_for(running, BOOT_TIMEOUT, f"VMI {name} Running")


def tcp_line(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.settimeout(5)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode()


@pytest.fixture(scope="module")
def db(k: Kubectl, capi: Api, image_server: str) -> dict[str, Any]:
    """The seed example's database VM on the pod network, published by a Service."""
    k.apply(datavolume("db-root", f"{image_server}/disk.qcow2"))
    k.apply(vm("db", disk="db-root", labels={"app": "db"}))
    k.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db", "namespace": NS},
            "spec": {
                "type": "NodePort",
                "selector": {"app": "db"},
                "ports": [{"name": "pg", "port": 5432, "targetPort": 5432, "protocol": "TCP"}],
            },
        }
    )
    wait_running(capi, "db")
    svc = capi.get(f"/api/v1/namespaces/{NS}/services/db").json()
    return svc


def test_datavolume_import_reports_success(capi: Api, db: dict[str, Any]) -> None:
    dv = capi.get(f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes/db-root").json()
    assert dv["status"]["phase"] == "Succeeded"
    assert dv["status"]["progress"] == "100.0%"


def test_service_reaches_the_database_vm(capi: Api, db: dict[str, Any]) -> None:
    node_port = db["spec"]["ports"][0]["nodePort"]
    answer = wait_for(
        lambda: tcp_line("127.0.0.1", node_port),
        BOOT_TIMEOUT,
        "the guest's service through the NodePort",
    )
    assert answer.startswith("vmo-guest db counter=")
    cluster_ip = db["spec"]["clusterIP"]
    assert tcp_line(cluster_ip, 5432).startswith("vmo-guest db")
    endpoints = capi.get(f"/api/v1/namespaces/{NS}/endpoints/db").json()
    assert endpoints["subsets"][0]["addresses"][0]["targetRef"]["name"] == "db"


def test_vm_status_follows_kubevirt(k: Kubectl, capi: Api, db: dict[str, Any]) -> None:
    vm_obj = k.json("get", "vm", "db", "-n", NS)
    assert vm_obj["status"]["printableStatus"] == "Running" and vm_obj["status"]["ready"] is True
    vmi = vmi_of(capi, "db")
    assert vmi is not None and vmi["status"]["nodeName"] == "node-1"
    assert vmi["status"]["interfaces"][0]["ipAddress"] == "10.0.2.2"
    owner = vmi["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "VirtualMachine" and owner["name"] == "db"


def test_always_vm_comes_back_after_its_qemu_is_killed(
    cluster: ThreadedServer, capi: Api, db: dict[str, Any]
) -> None:
    before = vmi_of(capi, "db")
    assert before is not None
    pidfiles = list((cluster.home / "nodes" / "node-1" / "vms").glob("db-*/qemu.pid"))
    assert len(pidfiles) == 1
    os.kill(int(pidfiles[0].read_text()), signal.SIGKILL)

    def replaced() -> bool:
        vmi = vmi_of(capi, "db")
        return bool(
            vmi
            and vmi["metadata"]["uid"] != before["metadata"]["uid"]
            and vmi["status"].get("phase") == "Running"
        )

    wait_for(replaced, BOOT_TIMEOUT, "a new Running VMI for db")
    node_port = db["spec"]["ports"][0]["nodePort"]
    assert wait_for(
        lambda: tcp_line("127.0.0.1", node_port), BOOT_TIMEOUT, "service after restart"
    ).startswith("vmo-guest db")


def test_an_imported_vmdk_boots(k: Kubectl, capi: Api, image_server: str) -> None:
    k.apply(datavolume("vmdk-root", f"{image_server}/disk.vmdk"))
    k.apply(vm("from-vmdk", disk="vmdk-root"))
    vmi = wait_running(capi, "from-vmdk")
    assert vmi["status"]["phase"] == "Running"
    k("delete", "vm", "from-vmdk", "-n", NS, "--wait=true", "--timeout=60s")
    # the VMI goes after its guest is stopped (terminationGracePeriodSeconds)
    wait_for(lambda: vmi_of(capi, "from-vmdk") is None, 60, "the VMI to go with its VM")


def test_impossible_specs_are_refused_with_field_paths(k: Kubectl) -> None:
    bad = vm("bad", disk="x")
    bad["spec"]["template"]["spec"]["domain"]["devices"]["disks"].append(
        {"name": "orphan", "disk": {}}
    )
    proc = k("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert proc.returncode != 0 and "spec.template.spec.domain.devices.disks[2].name" in proc.stderr
    bad = vm("bad", disk="x")
    bad["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]["macAddress"] = (
        "03:00:00:00:00:01"
    )
    proc = k("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert proc.returncode != 0 and "macAddress" in proc.stderr


def nad(name: str, vlan: int, first: int, *, macspoofchk: bool = False) -> dict[str, Any]:
    config = {
        "cniVersion": "0.3.1",
        "name": name,
        "type": "bridge",
        "bridge": "br-vmo-e2e",
        "vlan": vlan,
        "macspoofchk": macspoofchk,
        "ipam": {
            "type": "host-local",
            "subnet": "192.168.50.0/24",
            "rangeStart": f"192.168.50.{first}",
            "rangeEnd": f"192.168.50.{first + 9}",
        },
    }
    return {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"config": json.dumps(config)},
    }


def l2_vm(name: str, network: str, mac: str | None = None) -> dict[str, Any]:
    iface: dict[str, Any] = {"name": "lan", "bridge": {}}
    if mac:
        iface["macAddress"] = mac
    obj = vm(name, disk=f"{name}-root", labels={"l2": name})
    spec = obj["spec"]["template"]["spec"]
    spec["domain"]["devices"]["interfaces"] = [iface]
    spec["networks"] = [{"name": "lan", "multus": {"networkName": network}}]
    return obj


def console(server: ThreadedServer, vmi: str, command: str) -> str:
    return shared_console(server, NS, vmi, command)


VSPHERE_MAC = "00:50:56:aa:bb:01"


@pytest.fixture(scope="module")
def l2(cluster: ThreadedServer, k: Kubectl, capi: Api, image_server: str) -> dict[str, str]:
    k.apply(nad("vlan10", 10, 10, macspoofchk=True))
    k.apply(nad("vlan20", 20, 20))
    for name, network, mac in (
        ("l2-a", "vlan10", VSPHERE_MAC),
        ("l2-b", "vlan10", None),
        ("l2-c", "vlan20", None),
    ):
        k.apply(datavolume(f"{name}-root", f"{image_server}/disk.qcow2"))
        k.apply(l2_vm(name, network, mac))
    ips = {}
    for name in ("l2-a", "l2-b", "l2-c"):
        vmi = wait_running(capi, name)
        ips[name] = vmi["status"]["interfaces"][0]["ipAddress"]
    for name in ips:
        wait_for(
            lambda n=name: "ready" in console(cluster, n, "echo ready"),
            BOOT_TIMEOUT,
            f"{name} booted",
        )
    return ips


def test_two_vms_on_one_vlan_reach_each_other_and_not_across(
    cluster: ThreadedServer, l2: dict[str, str]
) -> None:
    same = console(cluster, "l2-a", f"nc -w 3 {l2['l2-b']} 5432")
    assert "vmo-guest l2-b" in same
    across = console(cluster, "l2-a", f"nc -w 3 {l2['l2-c']} 5432 || echo UNREACHABLE")
    assert "vmo-guest" not in across and "UNREACHABLE" in across


def test_a_multi_network_policy_lets_only_the_named_client_in(
    cluster: ThreadedServer, k: Kubectl, l2: dict[str, str]
) -> None:
    """l2-b is the database: a MultiNetworkPolicy on vlan10 opens its port 5432 to one client;
    what it does not name is dropped, and deleting it opens the path again."""
    db = l2["l2-b"]
    policy: dict[str, Any] = {
        "apiVersion": "k8s.cni.cncf.io/v1beta1",
        "kind": "MultiNetworkPolicy",
        "metadata": {
            "name": "db-clients",
            "namespace": NS,
            "annotations": {"k8s.v1.cni.cncf.io/policy-for": "vlan10"},
        },
        "spec": {
            "podSelector": {"matchLabels": {"l2": "l2-b"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"l2": "someone-else"}}}],
                    "ports": [{"port": 5432}],
                }
            ],
        },
    }

    def from_a(command: str) -> str:
        return console(cluster, "l2-a", f"{command} || echo UNREACHABLE")

    try:
        k.apply(policy)
        wait_for(lambda: "UNREACHABLE" in from_a(f"nc -w 2 {db} 5432"), 30, "l2-a to be refused")
        policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] = {"l2": "l2-a"}
        k.apply(policy)
        wait_for(lambda: "vmo-guest l2-b" in from_a(f"nc -w 2 {db} 5432"), 30, "l2-a to be let in")
        # only the port the rule names: the echo port stays closed
        assert "UNREACHABLE" in from_a(f"echo hi | nc -w 2 {db} 7")
        # l2-a is not isolated: the database still reaches it
        assert "vmo-guest l2-a" in console(cluster, "l2-b", f"nc -w 3 {l2['l2-a']} 5432")
    finally:
        k("delete", "multi-networkpolicies.k8s.cni.cncf.io", "db-clients", "-n", NS, check=False)
    wait_for(lambda: "hi" in from_a(f"echo hi | nc -w 2 {db} 7"), 30, "the path to open")


def test_macspoofchk_cuts_off_a_guest_that_changes_its_mac(
    cluster: ThreadedServer, l2: dict[str, str]
) -> None:
    """vlan10 has macspoofchk: once l2-a's guest takes another MAC, its frames (its ARP replies
    included) are dropped at its tap; with its own MAC back, it talks again. (Without the
    setting nothing is dropped: tests/test_l2_filter.py shows it on the same kernel.)"""
    b = l2["l2-b"]

    def a_reaches_b() -> bool:
        # fresh neighbour entries on both sides: the answer must come from ARP as it is now
        console(cluster, "l2-b", "ip neigh flush all")
        out = console(cluster, "l2-a", f"ip neigh flush all; nc -w 2 {b} 5432 || echo UNREACHABLE")
        return "vmo-guest l2-b" in out

    assert a_reaches_b()
    try:
        console(cluster, "l2-a", "ip link set eth0 address 00:50:56:aa:bb:99")
        assert not a_reaches_b()
    finally:
        console(cluster, "l2-a", f"ip link set eth0 address {VSPHERE_MAC}")
    wait_for(a_reaches_b, 30, "l2-a to talk again with its own MAC")


@pytest.fixture(scope="module")
def pod_clients(
    cluster: ThreadedServer, k: Kubectl, capi: Api, image_server: str, db: dict[str, Any]
) -> tuple[str, str]:
    """Two client VMs on the pod network beside the database, with different labels."""
    names = ("pod-a", "pod-b")
    for name, role in zip(names, ("client-a", "client-b"), strict=True):
        k.apply(datavolume(f"{name}-root", f"{image_server}/disk.qcow2"))
        k.apply(vm(name, disk=f"{name}-root", labels={"role": role}))
    for name in names:
        wait_running(capi, name)
        wait_for(
            lambda n=name: "ready" in console(cluster, n, "echo ready"),
            BOOT_TIMEOUT,
            f"{name} booted",
        )
    return names


@contextlib.contextmanager
def host_listener(answer: bytes) -> Iterator[int]:
    """A TCP server on the host's loopback (10.0.2.1, the gateway, to a guest) that answers every
    connection with ``answer``."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_a_network_policy_lets_only_the_named_client_reach_the_database(
    cluster: ThreadedServer,
    k: Kubectl,
    capi: Api,
    db: dict[str, Any],
    pod_clients: tuple[str, str],
) -> None:
    """On the pod network, through the db Service: a NetworkPolicy opens the database's 5432 to
    pod-a only (pod-b and the host's NodePort client are refused); an egress policy lets pod-b
    reach one host port and nothing else; deleting the policies opens every path again."""
    cluster_ip, node_port = db["spec"]["clusterIP"], db["spec"]["ports"][0]["nodePort"]
    netpols = "networkpolicies.networking.k8s.io"

    def reach(name: str, host: str, port: int) -> str:
        return console(cluster, name, f"nc -w 3 {host} {port} || echo UNREACHABLE")

    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "db-clients", "namespace": NS},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"role": "client-a"}}}],
                    "ports": [{"port": 5432}],
                }
            ],
        },
    }
    with host_listener(b"host-allowed\n") as allowed, host_listener(b"host-denied\n") as denied:
        egress = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "b-out", "namespace": NS},
            "spec": {
                "podSelector": {"matchLabels": {"role": "client-b"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"ipBlock": {"cidr": "127.0.0.1/32"}}], "ports": [{"port": allowed}]}
                ],
            },
        }
        for name in pod_clients:
            assert "vmo-guest db" in reach(name, cluster_ip, 5432), name
        assert "host-denied" in reach("pod-b", "10.0.2.1", denied)
        try:
            k.apply(ingress)
            wait_for(
                lambda: "vmo-guest db" not in reach("pod-b", cluster_ip, 5432), 30, "pod-b refused"
            )
            assert "vmo-guest db" in reach("pod-a", cluster_ip, 5432)
            with pytest.raises(OSError):  # the host is no VM, and no ipBlock names it
                if not tcp_line("127.0.0.1", node_port):
                    raise ConnectionResetError("closed without an answer")
            k.apply(egress)
            wait_for(
                lambda: "host-denied" not in reach("pod-b", "10.0.2.1", denied),
                30,
                "pod-b's egress to be closed",
            )
            assert "host-allowed" in reach("pod-b", "10.0.2.1", allowed)
            assert "host-denied" in reach("pod-a", "10.0.2.1", denied)  # a is not isolated

            def applied() -> bool:
                vmi = vmi_of(capi, "pod-b") or {}
                conditions = vmi.get("status", {}).get("conditions") or []
                return any(
                    c["type"] == "NetworkPolicyApplied" and c["status"] == "True"
                    for c in conditions
                )

            wait_for(applied, 30, "pod-b's NetworkPolicyApplied condition")
        finally:
            k("delete", netpols, "db-clients", "b-out", "-n", NS, check=False)
        wait_for(lambda: "vmo-guest db" in reach("pod-b", cluster_ip, 5432), 30, "the path to open")
        wait_for(lambda: "host-denied" in reach("pod-b", "10.0.2.1", denied), 30, "egress to open")
    assert tcp_line("127.0.0.1", node_port).startswith("vmo-guest db")


def test_the_guest_sees_the_mac_from_the_spec(
    cluster: ThreadedServer, capi: Api, l2: dict[str, str]
) -> None:
    seen = console(cluster, "l2-b", f"nc -w 3 {l2['l2-a']} 5432")
    assert VSPHERE_MAC in seen
    vm_obj = capi.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/l2-b").json()
    generated = vm_obj["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0][
        "macAddress"
    ]
    assert generated.startswith("02:")  # assigned once by the MAC pool, kept in the VM's spec


def test_image_upload_fills_a_datavolume(
    cluster: ThreadedServer, capi: Api, guest: GuestImage
) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmo.cli.main",
            "image-upload",
            "dv",
            "uploaded",
            "--size",
            "1Gi",
            "--image-path",
            str(guest.disk_vmdk),
            "-n",
            NS,
            "--kubeconfig",
            str(cluster.kubeconfig),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Succeeded" in proc.stdout and "100.0%" in proc.stdout
    dv = capi.get(f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes/uploaded").json()
    assert dv["status"]["phase"] == "Succeeded"
