"""``metrics.k8s.io/v1beta1`` from the embedded API server: NodeMetrics and the virt-launcher
Pods' PodMetrics read from a real Prometheus (TLS, basic auth) that scrapes a synthetic
exporter, so ``kubectl top node`` and ``kubectl top pod`` print the usage the exporter implies;
503 ServiceUnavailable naming why without Prometheus; RBAC as for any resource."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import make_user
from tests.test_top_cli import NODES, NS, VMIS, synthetic_cluster, wait_for_history
from vmo.apiserver import pki
from vmo.apiserver.resource_metrics import cpu_quantity, memory_quantity
from vmo.client import NAMESPACE, NODE, Client
from vmo.client.prometheus import prometheus_file
from vmo.engine.virtcontroller.launcher_pods import POD, launcher_pod
from vmo.home import StateDir
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.prometheus import PrometheusServer, ScrapeJob, SyntheticExporter

WINDOW = 5.0
METRICS = "/apis/metrics.k8s.io/v1beta1"
JSON = dict[str, Any]


def pod_name(name: str) -> str:
    return f"virt-launcher-{name}-bcdfg"


async def _inventory(server: ThreadedServer) -> None:
    """The Nodes (with allocatable) and the VMIs' launcher Pods the exporter's series name."""
    state = StateDir(server.home)
    async with Client.from_kubeconfig(state.kubeconfig) as admin:
        await admin.create(NAMESPACE, {"metadata": {"name": "other"}})
        for node, v in NODES.items():
            await admin.create(NODE, {"metadata": {"name": node, "labels": {"rack": node}}})
            allocatable = {"cpu": str(int(v["cpus"])), "memory": f"{int(v['ram']) // 1024}Ki"}
            await admin.patch_status(
                NODE, node, {"capacity": allocatable, "allocatable": allocatable}
            )
    async with Client.from_kubeconfig(state.engine_kubeconfig) as engine:
        for (namespace, name), v in VMIS.items():
            vmi = {
                "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
                "status": {"phase": "Running", "nodeName": v["node"]},
            }
            await engine.create(POD, launcher_pod(vmi, name=pod_name(name), host_ip=None))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    home = tmp_path_factory.mktemp("metrics-home")
    with ThreadedServer(home=home) as api, SyntheticExporter() as exporter:
        assert api.server is not None
        api.server.resource_metrics.window = WINDOW
        synthetic_cluster(exporter)
        asyncio.run(_inventory(api))
        ca = pki.ensure_ca(StateDir(home).pki)
        job = ScrapeJob("vmo-node-agent", [exporter.target])
        with PrometheusServer(home / "prometheus", ca=ca, jobs=[job]) as prometheus:
            prometheus.write_home_file(StateDir(home))
            wait_for_history(prometheus, seconds=int(WINDOW))
            yield api


def get(server: ThreadedServer, path: str, token: str | None = "") -> requests.Response:
    token = server.admin_token if token == "" else token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(server.url + path, headers=headers, verify=server.ca, timeout=30)


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def cores(quantity: str) -> float:
    assert quantity.endswith("n"), quantity
    return int(quantity[:-1]) / 1e9


def size(quantity: str) -> int:
    return int(quantity[:-2]) * 1024 if quantity.endswith("Ki") else int(quantity)


def test_quantities_are_written_as_metrics_server_writes_them() -> None:
    assert cpu_quantity(1.5) == "1500000000n"
    assert cpu_quantity(-0.1) == "0n"
    assert memory_quantity(3 * 1024**3) == "3145728Ki"
    assert memory_quantity(1000) == "1000"


def test_discovery_lists_the_group_both_ways(server: ThreadedServer) -> None:
    groups = get(server, "/apis").json()["groups"]
    assert any(g["name"] == "metrics.k8s.io" for g in groups)
    v2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    body = requests.get(
        server.url + "/apis",
        headers={"Authorization": f"Bearer {server.admin_token}", "Accept": v2},
        verify=server.ca,
        timeout=30,
    ).json()
    entry = next(i for i in body["items"] if i["metadata"]["name"] == "metrics.k8s.io")
    resources = {r["resource"]: r for r in entry["versions"][0]["resources"]}
    assert resources["nodes"]["responseKind"]["kind"] == "NodeMetrics"
    assert resources["pods"]["scope"] == "Namespaced"
    assert not any(i["metadata"]["name"] == "subresources.kubevirt.io" for i in body["items"])
    listed = get(server, METRICS).json()
    assert {r["name"] for r in listed["resources"]} == {"nodes", "pods"}


def test_node_metrics_list_the_nodes_usage(server: ThreadedServer) -> None:
    body = get(server, f"{METRICS}/nodes").json()
    assert body["kind"] == "NodeMetricsList"
    items = {i["metadata"]["name"]: i for i in body["items"]}
    assert sorted(items) == sorted(NODES)
    for node, v in NODES.items():
        item = items[node]
        assert item["window"] == "5s"
        assert item["timestamp"].endswith("Z")
        assert cores(item["usage"]["cpu"]) == pytest.approx(v["cpu"], rel=1e-4)
        assert size(item["usage"]["memory"]) == v["memory"]


def test_node_metrics_get_one_and_select_by_label(server: ThreadedServer) -> None:
    one = get(server, f"{METRICS}/nodes/node-2").json()
    assert one["kind"] == "NodeMetrics" and one["metadata"]["name"] == "node-2"
    assert cores(one["usage"]["cpu"]) == pytest.approx(NODES["node-2"]["cpu"], rel=1e-4)
    selected = get(server, f"{METRICS}/nodes?labelSelector=rack%3Dnode-1").json()
    assert [i["metadata"]["name"] for i in selected["items"]] == ["node-1"]
    missing = get(server, f"{METRICS}/nodes/node-9")
    assert missing.status_code == 404
    assert missing.json()["message"] == 'nodes.metrics.k8s.io "node-9" not found'


def test_pod_metrics_of_a_namespace_are_its_launcher_pods(server: ThreadedServer) -> None:
    body = get(server, f"{METRICS}/namespaces/{NS}/pods").json()
    assert body["kind"] == "PodMetricsList"
    items = {i["metadata"]["name"]: i for i in body["items"]}
    assert sorted(items) == [pod_name("db"), pod_name("web")]
    for name in ("db", "web"):
        item = items[pod_name(name)]
        assert item["metadata"]["namespace"] == NS
        assert item["metadata"]["labels"]["vm.kubevirt.io/name"] == name
        [container] = item["containers"]
        assert container["name"] == "compute"
        assert cores(container["usage"]["cpu"]) == pytest.approx(VMIS[(NS, name)]["cpu"], rel=1e-4)
        assert size(container["usage"]["memory"]) == VMIS[(NS, name)]["memory"]
    everywhere = get(server, f"{METRICS}/pods").json()
    assert len(everywhere["items"]) == len(VMIS)
    one = get(server, f"{METRICS}/namespaces/other/pods/{pod_name('app')}").json()
    assert one["kind"] == "PodMetrics" and one["metadata"]["namespace"] == "other"


def test_writes_and_watches_are_refused(server: ThreadedServer) -> None:
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    posted = requests.post(
        f"{server.url}{METRICS}/nodes", json={}, headers=headers, verify=server.ca, timeout=30
    )
    assert posted.status_code == 405
    assert get(server, f"{METRICS}/nodes?watch=true").status_code == 405


def test_kubectl_top_node_prints_the_exporters_usage(server: ThreadedServer) -> None:
    done = kubectl(server.kubeconfig, "top", "node", "--no-headers")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    assert rows["node-1"] == ["1500m", "25%", "3072Mi", "25%"]
    assert rows["node-2"] == ["250m", "12%", "1024Mi", "25%"]


def test_kubectl_top_pod_prints_the_vms_usage(server: ThreadedServer) -> None:
    done = kubectl(server.kubeconfig, "top", "pod", "-n", NS, "--no-headers")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    assert rows == {pod_name("db"): ["1000m", "2048Mi"], pod_name("web"): ["500m", "1024Mi"]}
    containers = kubectl(server.kubeconfig, "top", "pod", "-n", "other", "--containers")
    assert containers.returncode == 0, containers.stderr
    assert "compute" in containers.stdout


def test_anonymous_requests_are_refused(server: ThreadedServer) -> None:
    assert get(server, f"{METRICS}/nodes", token=None).status_code == 401


def test_users_without_a_grant_are_forbidden(server: ThreadedServer) -> None:
    token, _ = make_user(server, "nobody-metrics")
    refused = get(server, f"{METRICS}/namespaces/{NS}/pods", token=token)
    assert refused.status_code == 403
    assert refused.json()["reason"] == "Forbidden"


def test_namespace_viewers_read_pod_metrics_through_the_aggregated_reader(
    server: ThreadedServer,
) -> None:
    token, kubeconfig = make_user(server, "viewer-metrics")
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "viewer-metrics", "namespace": NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "User", "name": "viewer-metrics",
                      "apiGroup": "rbac.authorization.k8s.io"}],
    }  # fmt: skip
    created = subprocess.run(
        ["kubectl", "--kubeconfig", str(server.kubeconfig), "apply", "-f", "-"],
        input=json.dumps(binding), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert get(server, f"{METRICS}/namespaces/{NS}/pods", token=token).status_code == 200
    assert get(server, f"{METRICS}/namespaces/other/pods", token=token).status_code == 403
    done = kubectl(kubeconfig, "top", "pod", "-n", NS, "--no-headers")
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    """A server whose home names no Prometheus."""
    with ThreadedServer(home=tmp_path_factory.mktemp("no-prometheus")) as api:
        yield api


def test_without_prometheus_the_group_is_unavailable_and_says_why(bare: ThreadedServer) -> None:
    answer = get(bare, f"{METRICS}/nodes")
    assert answer.status_code == 503
    status = answer.json()
    assert status["kind"] == "Status" and status["reason"] == "ServiceUnavailable"
    assert "prometheus.json" in status["message"] and "vmo up" in status["message"]
    done = kubectl(bare.kubeconfig, "top", "node")
    assert done.returncode != 0
    assert "ServiceUnavailable" in done.stderr or "unable to handle" in done.stderr


def test_an_unreachable_prometheus_is_unavailable_too(bare: ThreadedServer) -> None:
    path = prometheus_file(StateDir(bare.home))
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"url": "https://127.0.0.1:1", "ca_file": str(bare.ca)}))
    try:
        answer = get(bare, f"{METRICS}/namespaces/{NS}/pods")
        assert answer.status_code == 503
        assert "https://127.0.0.1:1 is unavailable" in answer.json()["message"]
    finally:
        path.unlink()
