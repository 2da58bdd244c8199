"""Each VMI appears as its virt-launcher Pod, as on a KubeVirt cluster: `kubectl get pods -o wide`
shows where VMs run, `kubectl logs` reads the guest's serial console and QEMU's log, and only the
engine writes Pods. One engine and one real guest are shared by the end-to-end tests here.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import Api, Kubectl, make_user
from tests.test_vm_e2e import NS, datavolume, engine_cluster, vm, vmi_of, wait_for, wait_running
from vmo.api.pods import pod as pod_type
from vmo.apiserver.errors import ApiError
from vmo.apiserver.launcher_pods import log_params
from vmo.apiserver.table import to_table
from vmo.engine.agent.logs import tail_lines
from vmo.engine.virtcontroller.launcher_pods import launcher_pod, pod_name
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.guest import READY_MARKER

KUBERNETES = "1.32.0"  # the kubectl on these machines
BOOT_TIMEOUT = 180.0
LAUNCHER = "kubevirt.io=virt-launcher"
POD_TYPE = pod_type()


def validate(pod: dict[str, Any]) -> None:
    kubernetes_validate.validate(pod, KUBERNETES, strict=True)


# --------------------------------------------------------------------------- pure parts


def _vmi(phase: str, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": "web",
            "namespace": NS,
            "uid": "1234-abcd",
            "labels": {"app": "web", "kubevirt.io/vm": "web"},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "domain": {"cpu": {"cores": 2}, "memory": {"guest": "256Mi"}, "devices": {}},
            "networks": [{"name": "default", "pod": {}}],
        },
        "status": {"phase": phase, **status},
    }


RUNNING = {
    "nodeName": "node-1",
    "interfaces": [{"name": "default", "ipAddress": "10.0.2.2"}],
    "conditions": [{"type": "Ready", "status": "True"}],
    "phaseTransitionTimestamps": [
        {"phase": "Running", "phaseTransitionTimestamp": "2026-01-01T00:00:09Z"}
    ],
}


@pytest.mark.parametrize(
    ("phase", "status"),
    [("Pending", {}), ("Scheduled", {"nodeName": "node-1"}), ("Running", RUNNING)]
    + [(final, {"nodeName": "node-1"}) for final in ("Succeeded", "Failed")],
)
def test_every_phase_of_the_pod_validates_against_kubernetes(
    phase: str, status: dict[str, Any]
) -> None:
    validate(
        launcher_pod(_vmi(phase, **status), name="virt-launcher-web-abcde", host_ip="10.1.1.1")
    )


def test_pod_follows_its_vmi_as_upstream_labels_and_owns_it() -> None:
    pod = launcher_pod(_vmi("Running", **RUNNING), name="virt-launcher-web-abcde", host_ip=None)
    md = pod["metadata"]
    assert md["labels"] == {
        "app": "web",
        "kubevirt.io/vm": "web",
        "kubevirt.io": "virt-launcher",
        "kubevirt.io/created-by": "1234-abcd",
        "vm.kubevirt.io/name": "web",
    }
    assert md["annotations"]["kubevirt.io/domain"] == "web"
    assert md["ownerReferences"] == [
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "name": "web",
            "uid": "1234-abcd",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["compute", "guest-console-log"]
    assert pod["spec"]["nodeName"] == "node-1"
    assert pod["status"]["phase"] == "Running" and pod["status"]["podIP"] == "10.0.2.2"
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"]
    assert ready == "True"


def test_scheduled_vmi_has_a_pending_pod_and_a_pending_one_no_node() -> None:
    assert launcher_pod(_vmi("Scheduled"), name="p", host_ip=None)["status"]["phase"] == "Pending"
    assert "nodeName" not in launcher_pod(_vmi("Pending"), name="p", host_ip=None)["spec"]


@pytest.mark.parametrize(
    ("phase", "status", "cells"),
    [
        ("Pending", {}, ["0/2", "ContainerCreating", 0]),
        ("Running", RUNNING, ["2/2", "Running", 0]),
        ("Succeeded", {"nodeName": "node-1"}, ["0/2", "Completed", 0]),
        ("Failed", {"nodeName": "node-1"}, ["0/2", "Error", 0]),
    ],
)
def test_pods_table_reads_as_kubectls(phase: str, status: dict[str, Any], cells: list[Any]) -> None:
    pod = launcher_pod(_vmi(phase, **status), name="p", host_ip=None)
    rows = to_table([pod], POD_TYPE.printer_columns, resource_version="1")["rows"]
    assert rows[0]["cells"][1:4] == cells
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:10Z"
    terminating = to_table([pod], POD_TYPE.printer_columns, resource_version="1")["rows"]
    assert terminating[0]["cells"][2] == "Terminating"


def test_pod_names_are_upstreams_and_fit_a_generated_name() -> None:
    name = pod_name("web")
    assert name.startswith("virt-launcher-web-") and len(name) == len("virt-launcher-web-") + 5
    assert len(pod_name("x" * 200)) == 63


def test_tail_lines_counts_a_last_line_without_newline() -> None:
    assert tail_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert tail_lines(b"a\nb\nc", 2) == b"b\nc"
    assert tail_lines(b"a\n", 5) == b"a\n"
    assert tail_lines(b"a\nb\n", 0) == b""


def test_log_parameters_are_checked_by_name() -> None:
    pod = {"metadata": {"name": "p"}}
    assert log_params({}, pod) == {"container": "compute"}
    assert log_params({"container": "guest-console-log", "tailLines": "3"}, pod) == {
        "container": "guest-console-log",
        "tailLines": "3",
    }
    for query, words in [
        ({"container": "nope"}, "container nope is not valid for pod p"),
        ({"tailLines": "-1"}, "tailLines"),
        ({"timestamps": "true"}, "timestamps is not supported"),
        ({"previous": "true"}, "previous is not supported"),
    ]:
        with pytest.raises(ApiError) as caught:
            log_params(query, pod)
        assert caught.value.code == 400 and words in caught.value.message


# --------------------------------------------------------------------------- on a real guest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-pods"), nodes=2)


def pods_of(capi: Api, vmi_name: str) -> list[dict[str, Any]]:
    listed = capi.get(f"/api/v1/namespaces/{NS}/pods", params={"labelSelector": LAUNCHER})
    return [
        p
        for p in listed.json()["items"]
        if p["metadata"]["labels"].get("vm.kubevirt.io/name") == vmi_name
    ]


def running_pod(capi: Api, vmi: dict[str, Any]) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        pods = [
            p
            for p in pods_of(capi, vmi["metadata"]["name"])
            if p["metadata"]["labels"]["kubevirt.io/created-by"] == vmi["metadata"]["uid"]
        ]
        return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None

    pod: dict[str, Any] = wait_for(ready, 60, "a Running virt-launcher Pod")
    return pod


@pytest.fixture(scope="module")
def web(k: Kubectl, capi: Api, image_server: str) -> dict[str, Any]:
    """A VM on the pod network, Running; its VMI."""
    k.apply(datavolume("web-root", f"{image_server}/disk.qcow2"))
    k.apply(vm("web", disk="web-root", labels={"app": "web"}))
    return wait_running(capi, "web")


@pytest.fixture(scope="module")
def pod(capi: Api, web: dict[str, Any]) -> dict[str, Any]:
    return running_pod(capi, web)


def test_get_pods_wide_shows_node_and_ip(
    k: Kubectl, web: dict[str, Any], pod: dict[str, Any]
) -> None:
    out = k("get", "pods", "-n", NS, "-o", "wide").stdout.splitlines()
    header = out[0].split()
    assert header[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert header[5:] == ["IP", "NODE", "NOMINATED", "NODE", "READINESS", "GATES"]
    row = next(line.split() for line in out if line.startswith(pod["metadata"]["name"]))
    assert row[1:4] == ["2/2", "Running", "0"]
    assert row[5:7] == ["10.0.2.2", web["status"]["nodeName"]]


def test_pod_validates_and_names_its_vmi(
    k: Kubectl, web: dict[str, Any], pod: dict[str, Any]
) -> None:
    live = k.json("get", "pod", pod["metadata"]["name"], "-n", NS)
    validate(live)
    md = live["metadata"]
    assert md["name"].startswith("virt-launcher-web-")
    assert md["labels"]["kubevirt.io/created-by"] == web["metadata"]["uid"]
    assert md["labels"]["app"] == "web"
    owner = md["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == (
        "VirtualMachineInstance",
        "web",
        True,
    )
    node = web["status"]["nodeName"]
    assert live["spec"]["nodeName"] == node and live["status"]["hostIP"]
    assert vmi_of_web(k)["status"]["activePods"] == {md["uid"]: node}


def vmi_of_web(k: Kubectl) -> dict[str, Any]:
    vmi: dict[str, Any] = k.json("get", "vmi", "web", "-n", NS)
    return vmi


def test_guest_console_log_has_the_guests_boot_output(k: Kubectl, pod: dict[str, Any]) -> None:
    name = pod["metadata"]["name"]

    def booted() -> str | None:
        out = k("logs", name, "-n", NS, "-c", "guest-console-log").stdout
        return out if READY_MARKER in out else None

    out = wait_for(booted, BOOT_TIMEOUT, "the ready marker in the console log")
    assert "modules loaded" in out.split(READY_MARKER)[0]  # the guest's init, before the marker
    tail = k("logs", name, "-n", NS, "-c", "guest-console-log", "--tail=1").stdout
    # The guest may print more (its shell prompt) after the first read: the log only grows,
    # so the last line is a line of any read taken after it.
    later = k("logs", name, "-n", NS, "-c", "guest-console-log").stdout
    assert tail and tail.count("\n") <= 1 and tail in later and len(tail) < len(later)
    assert k("logs", name, "-n", NS, "-c", "guest-console-log", "--limit-bytes=7").stdout == out[:7]


def test_compute_is_the_default_container_and_has_qemus_log(
    k: Kubectl, pod: dict[str, Any]
) -> None:
    name = pod["metadata"]["name"]
    default = k("logs", name, "-n", NS)
    assert "--- vmo: launching QEMU" in default.stdout
    assert k("logs", name, "-n", NS, "-c", "compute").stdout == default.stdout


def test_follow_streams_until_the_client_stops(
    cluster: ThreadedServer, pod: dict[str, Any]
) -> None:
    argv = ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "logs", "-f"]
    argv += [pod["metadata"]["name"], "-n", NS, "-c", "guest-console-log"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        seen = ""
        while READY_MARKER not in seen:
            line = proc.stdout.readline()
            assert line, "the stream ended before the ready marker"
            seen += line
        assert proc.poll() is None, "follow ended while the VMI runs"
        proc.terminate()


def test_refusals_name_what_is_wrong(k: Kubectl, pod: dict[str, Any]) -> None:
    name = pod["metadata"]["name"]
    wrong = k("logs", name, "-n", NS, "-c", "sidecar", check=False)
    assert wrong.returncode != 0 and "container sidecar is not valid" in wrong.stderr
    stamped = k("logs", name, "-n", NS, "--timestamps", check=False)
    assert stamped.returncode != 0 and "timestamps is not supported" in stamped.stderr


def test_a_user_without_pods_log_is_refused(
    cluster: ThreadedServer, k: Kubectl, pod: dict[str, Any]
) -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "pod-reader", "namespace": NS},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "pod-reader", "namespace": NS},
        "subjects": [{"kind": "User", "name": "reader", "apiGroup": "rbac.authorization.k8s.io"}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
    }
    k.apply(yaml.safe_dump_all([role, binding]))
    token, kubeconfig = make_user(cluster, "reader")
    reader = Kubectl(kubeconfig)
    assert pod["metadata"]["name"] in reader("get", "pods", "-n", NS).stdout
    refused = reader("logs", pod["metadata"]["name"], "-n", NS, check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr
    assert 'cannot get resource "pods/log"' in refused.stderr
    raw = Api(cluster.url, cluster.ca, token).get(
        f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}/log"
    )
    assert raw.status_code == 403 and raw.json()["kind"] == "Status"


def test_users_cannot_create_or_change_pods(k: Kubectl, pod: dict[str, Any]) -> None:
    made = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mine", "namespace": NS},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    created = k("create", "-f", "-", input=json.dumps(made), check=False)
    assert created.returncode != 0
    assert "only its engine writes them" in created.stderr and "Forbidden" in created.stderr
    labelled = k("label", "pod", pod["metadata"]["name"], "-n", NS, "x=y", check=False)
    assert labelled.returncode != 0 and "cannot update pods" in labelled.stderr


def test_a_migrated_vmis_pod_moves_to_the_target_node(
    k: Kubectl, capi: Api, web: dict[str, Any], pod: dict[str, Any]
) -> None:
    source = web["status"]["nodeName"]
    body = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "web-move", "namespace": NS},
        "spec": {"vmiName": "web"},
    }
    k.apply(body)

    def done() -> str | None:
        migration = k.json("get", "vmim", "web-move", "-n", NS)
        phase = migration.get("status", {}).get("phase")
        assert phase != "Failed", migration["status"]
        return phase if phase == "Succeeded" else None

    wait_for(done, 120, "the migration to succeed")

    def moved() -> dict[str, Any] | None:
        live = k.json("get", "pod", pod["metadata"]["name"], "-n", NS)
        return live if live["spec"].get("nodeName") not in (None, source) else None

    live = wait_for(moved, 30, "the Pod's nodeName to follow the VMI")
    assert live["spec"]["nodeName"] == vmi_of_web(k)["status"]["nodeName"]
    assert live["status"]["phase"] == "Running"
    validate(live)
    logs = k("logs", pod["metadata"]["name"], "-n", NS, "-c", "guest-console-log", check=False)
    assert logs.returncode == 0, logs.stderr  # the target QEMU's console log, on the new node


def test_deleting_the_pod_stops_the_vmi_and_its_vm_starts_a_new_one(
    k: Kubectl, capi: Api, web: dict[str, Any], pod: dict[str, Any]
) -> None:
    k("delete", "pod", pod["metadata"]["name"], "-n", NS)

    def replaced() -> dict[str, Any] | None:
        vmi = vmi_of(capi, "web")
        fresh = vmi and vmi["metadata"]["uid"] != web["metadata"]["uid"]
        return vmi if fresh and vmi["status"].get("phase") == "Running" else None

    vmi = wait_for(replaced, BOOT_TIMEOUT, "a new Running VMI of web")
    new_pod = running_pod(capi, vmi)
    assert new_pod["metadata"]["name"] != pod["metadata"]["name"]
    assert [p["metadata"]["name"] for p in pods_of(capi, "web")] == [new_pod["metadata"]["name"]]


def test_deleting_the_vm_removes_its_pod(k: Kubectl, capi: Api, web: dict[str, Any]) -> None:
    assert pods_of(capi, "web")
    k("delete", "vm", "web", "-n", NS, "--wait=true", "--timeout=90s")
    wait_for(lambda: vmi_of(capi, "web") is None, 90, "the VMI to go with its VM")
    wait_for(lambda: not pods_of(capi, "web"), 30, "the Pod to go with its VMI")
