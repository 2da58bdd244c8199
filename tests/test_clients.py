"""Real clients against the embedded server: the official Python client, kopf, crash recovery."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import kubernetes
import pytest
import requests
import yaml

from tests.conftest import ROOT, Api, Kubectl
from tests.test_api_semantics import configmap, wait_for
from vmo.testing.apiserver import ThreadedServer

GREETING_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "greetings.demo.vmo.dev"},
    "spec": {
        "group": "demo.vmo.dev",
        "scope": "Namespaced",
        "names": {"plural": "greetings", "singular": "greeting", "kind": "Greeting"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"who": {"type": "string"}}},
                            "status": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            },
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def client(apiserver: ThreadedServer) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(str(apiserver.kubeconfig))


@pytest.fixture
def ns(api: Api, unique: str) -> str:
    api.post("/api/v1/namespaces", {"metadata": {"name": unique}})
    return unique


def test_python_client_lists(client: kubernetes.client.ApiClient, api: Api, ns: str) -> None:
    api.post(f"/api/v1/namespaces/{ns}/configmaps", configmap("listed", k="v"))
    core = kubernetes.client.CoreV1Api(client)
    assert "virtual-machines" in {n.metadata.name for n in core.list_namespace().items}
    items = core.list_namespaced_config_map(ns).items
    assert [(c.metadata.name, c.data) for c in items] == [("listed", {"k": "v"})]


def test_python_client_watches(client: kubernetes.client.ApiClient, api: Api, ns: str) -> None:
    core = kubernetes.client.CoreV1Api(client)
    rv = core.list_namespaced_config_map(ns).metadata.resource_version

    def writer() -> None:
        time.sleep(0.3)
        api.post(f"/api/v1/namespaces/{ns}/configmaps", configmap("watched"))
        api.patch(
            f"/api/v1/namespaces/{ns}/configmaps/watched",
            {"data": {"a": "b"}},
            "application/merge-patch+json",
        )
        api.delete(f"/api/v1/namespaces/{ns}/configmaps/watched")

    threading.Thread(target=writer).start()
    seen = []
    watch = kubernetes.watch.Watch()
    for event in watch.stream(
        core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=10
    ):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 3:
            watch.stop()
    assert seen == [("ADDED", "watched"), ("MODIFIED", "watched"), ("DELETED", "watched")]


def test_a_kopf_operator_reacts_to_its_crd(
    apiserver: ThreadedServer, kubectl: Kubectl, api: Api, ns: str
) -> None:
    kubectl.apply(GREETING_CRD)
    kubectl("wait", "--for=condition=Established", "crd/greetings.demo.vmo.dev", "--timeout=20s")
    env = {**os.environ, "KUBECONFIG": str(apiserver.kubeconfig)}
    operator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kopf",
            "run",
            "--standalone",
            "--namespace",
            ns,
            str(ROOT / "tests/operators/greeter.py"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        kubectl.apply(
            {
                "apiVersion": "demo.vmo.dev/v1",
                "kind": "Greeting",
                "metadata": {"name": "hi", "namespace": ns},
                "spec": {"who": "VMO"},
            }
        )
        cm = wait_for(
            lambda: (
                (r := api.get(f"/api/v1/namespaces/{ns}/configmaps/greeting-hi")).ok and r.json()
            ),
            timeout=30,
        )
        assert cm["data"]["message"] == "Hello, VMO!"
        assert cm["metadata"]["ownerReferences"][0]["kind"] == "Greeting"
        status = wait_for(
            lambda: (
                api.get(f"/apis/demo.vmo.dev/v1/namespaces/{ns}/greetings/hi")
                .json()
                .get("status", {})
                .get("greet")
            ),
            timeout=30,
        )
        assert status == {"configMap": "greeting-hi"}
    finally:
        operator.send_signal(signal.SIGINT)
        try:
            out, _ = operator.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            operator.kill()
            out, _ = operator.communicate()
    assert "Traceback" not in out, out


def _start(home: Path) -> tuple[subprocess.Popen[bytes], str, Api]:
    url_file = home / "apiserver.url"
    if url_file.exists():
        url_file.unlink()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmo.cli.main",
            "--home",
            str(home),
            "up",
            "--port",
            "0",
            "--no-engine",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(url_file.exists, timeout=30)
        url = url_file.read_text().strip()
        token = yaml.safe_load((home / "admin.kubeconfig").read_text())["users"][0]["user"]["token"]
    except (AssertionError, OSError):
        proc.kill()
        proc.wait()
        raise
    return proc, url, Api(url, home / "pki" / "ca.crt", token)


def test_writes_and_watches_survive_kill_9(tmp_path: Path) -> None:
    proc, _, api = _start(tmp_path)
    try:
        acked = [
            api.post("/api/v1/namespaces/default/configmaps", configmap(f"k{i}", i=str(i))).json()
            for i in range(20)
        ]
        middle = acked[9]["metadata"]["resourceVersion"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, _, api = _start(tmp_path)
    try:
        names = [
            i["metadata"]["name"]
            for i in api.get("/api/v1/namespaces/default/configmaps").json()["items"]
        ]
        assert sorted(names) == sorted(f"k{i}" for i in range(20))
        r = api.get(
            "/api/v1/namespaces/default/configmaps",
            params={"watch": "1", "resourceVersion": middle, "timeoutSeconds": "3"},
            stream=True,
        )
        replayed = [
            json.loads(line)["object"]["metadata"]["name"] for line in r.iter_lines() if line
        ]
        assert replayed == [f"k{i}" for i in range(10, 20)]
        after = api.post("/api/v1/namespaces/default/configmaps", configmap("after")).json()
        assert int(after["metadata"]["resourceVersion"]) > int(
            acked[-1]["metadata"]["resourceVersion"]
        )
    finally:
        proc.terminate()
        proc.wait(15)


def test_vmo_up_daemon_status_down(tmp_path: Path) -> None:
    vmo = [sys.executable, "-m", "vmo.cli.main", "--home", str(tmp_path)]
    up = subprocess.run(
        [*vmo, "up", "-d", "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert up.returncode == 0, up.stderr
    try:
        assert (tmp_path / "admin.kubeconfig").stat().st_mode & 0o777 == 0o600
        status = subprocess.run([*vmo, "status"], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "running" in status.stdout
        pid = int((tmp_path / "apiserver.pid").read_text())
        out = subprocess.run(
            [
                "kubectl",
                "--kubeconfig",
                str(tmp_path / "admin.kubeconfig"),
                "get",
                "ns",
                "virtual-machines",
                "-o",
                "name",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.stdout.strip() == "namespace/virtual-machines"
        user = subprocess.run(
            [*vmo, "user", "add", "alice", "--group", "devs"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        config = yaml.safe_load(user.stdout)
        token = config["users"][0]["user"]["token"]
        url = (tmp_path / "apiserver.url").read_text().strip()
        r = requests.get(
            f"{url}/apis/kubevirt.io/v1/namespaces/virtual-machines/virtualmachines",
            headers={"Authorization": f"Bearer {token}"},
            verify=str(tmp_path / "pki" / "ca.crt"),
            timeout=10,
        )
        assert (
            r.status_code == 403
            and 'User "alice" cannot list resource "virtualmachines"' in r.json()["message"]
        )
    finally:
        down = subprocess.run([*vmo, "down"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0
    # gone, or a zombie where init does not reap (as on these hosts): either way it has exited
    with contextlib.suppress(FileNotFoundError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "Z", f"pid {pid} still running ({state}) after vmo down"
    assert "not running" in subprocess.run([*vmo, "status"], capture_output=True, text=True).stdout
