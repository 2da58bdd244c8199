"""End to end on real guests: `vmo up`'s engine runs KubeVirt VMs with QEMU (TCG) on this host.

One engine and a handful of guests are shared by the tests of this module; each test uses its
own objects. The guest is built from Debian packages (vmo.testing.guest) and served to CDI-style
DataVolume imports over HTTP, as a user's image server would.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import yaml

from tests.conftest import Api, Kubectl
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.guest import GuestImage, build_guest, default_cache_dir

NS = "virtual-machines"
BOOT_TIMEOUT = 180.0


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (OSError, KeyError, IndexError, ValueError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return build_guest(default_cache_dir())


@pytest.fixture(scope="module")
def image_server(guest: GuestImage) -> Iterator[str]:
    handler = partial(_QuietHandler, directory=str(guest.root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    server = ThreadedServer(tmp_path_factory.mktemp("vmo-engine"), engine=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def k(cluster: ThreadedServer) -> Kubectl:
    return Kubectl(cluster.kubeconfig)


@pytest.fixture(scope="module")
def capi(cluster: ThreadedServer) -> Api:
    return Api(cluster.url, cluster.ca, cluster.admin_token)


def datavolume(name: str, url: str) -> dict[str, Any]:
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": {"http": {"url": url}},
            "storage": {"resources": {"requests": {"storage": "1Gi"}}},
        },
    }


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
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "metadata": {"labels": labels or {}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "domain": {
                        "cpu": {"cores": 1},
                        "memory": {"guest": "256Mi"},
                        "devices": {
                            "disks": [
                                {"name": "root", "disk": {"bus": "virtio"}, "bootOrder": 1},
                                {"name": "cloudinit", "disk": {"bus": "virtio"}},
                            ],
                            "interfaces": interfaces,
                        },
                    },
                    "networks": networks,
                    "volumes": [
                        {"name": "root", "dataVolume": {"name": disk}},
                        {"name": "cloudinit", "cloudInitNoCloud": nocloud},
                    ],
                },
            },
        },
    }


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
