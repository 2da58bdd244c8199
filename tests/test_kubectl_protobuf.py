"""Every kubectl (v1.32) command that sends a protobuf body, run for real against VMO.

kubectl's typed clients send ``application/vnd.kubernetes.protobuf``. Found by running each
kubectl command that writes against a recording server (``tests/kubectl_capture.py``) and
reading the Content-Type of every request body:

- ``create namespace``, ``create secret generic|docker-registry|tls``, ``create configmap``,
  ``create serviceaccount``, ``create role``, ``create clusterrole``, ``create rolebinding``,
  ``create clusterrolebinding``, ``create service clusterip|nodeport|loadbalancer|externalname``,
  ``create token`` (TokenRequest), ``auth can-i`` (SelfSubjectAccessReview), ``auth can-i
  --list`` (SelfSubjectRulesReview), ``auth whoami`` (SelfSubjectReview), ``auth reconcile``
  (Namespace, then Role/ClusterRole/RoleBinding/ClusterRoleBinding created or updated): VMO
  serves these kinds, and each is tested here.
- ``create quota``, ``create priorityclass``, ``create deployment``, ``create job``, ``create
  cronjob``, ``create ingress``, ``create poddisruptionbudget``, ``autoscale``
  (HorizontalPodAutoscaler), ``certificate approve|deny`` (CertificateSigningRequest), ``drain``
  (Eviction of Pods), ``debug`` (Pod): VMO does not serve these kinds. The generators and
  ``autoscale`` are tested to get a plain NotFound; the others stop before any body, at a read
  of a kind VMO does not serve (``drain`` lists pods: NotFound), and are not repeated here.
- JSON only: ``apply``, ``create -f``, ``replace``, ``run``, ``expose``; patches (``label``,
  ``annotate``, ``patch``, ``cordon``, ``taint``, ``scale``, ``set``, ``rollout``); ``delete``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Kubectl, make_user
from vmo.apiserver import pki
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]


@pytest.fixture
def ns(kubectl: Kubectl, unique: str) -> str:
    kubectl("create", "namespace", unique)
    return unique


def subset(obj: Any, expected: Any) -> bool:
    """Whether ``expected`` is ``obj`` with some keys left out, at every depth."""
    if isinstance(expected, dict):
        return isinstance(obj, dict) and all(subset(obj.get(k), v) for k, v in expected.items())
    if isinstance(expected, list):
        return (
            isinstance(obj, list)
            and len(obj) == len(expected)
            and all(subset(o, e) for o, e in zip(obj, expected, strict=True))
        )
    return bool(obj == expected)


def test_create_namespace_makes_an_active_namespace(kubectl: Kubectl, unique: str) -> None:
    assert kubectl("create", "namespace", unique).stdout.strip() == f"namespace/{unique} created"
    namespace = kubectl.json("get", "namespace", unique)
    assert namespace["status"] == {"phase": "Active"}


# (command after `kubectl -n <ns>`, resource to read back, fields it must have)
GENERATED: list[tuple[list[str], str, JSON]] = [
    (
        ["create", "secret", "generic", "s", "--from-literal=a=b"],
        "secret/s",
        {"type": "Opaque", "data": {"a": "Yg=="}},
    ),
    (
        [
            *("create", "secret", "docker-registry", "pull", "--docker-server=r.example.com"),
            *("--docker-username=u", "--docker-password=p"),
        ],
        "secret/pull",
        {"type": "kubernetes.io/dockerconfigjson"},
    ),
    (
        ["create", "configmap", "c", "--from-literal=color=blue"],
        "configmap/c",
        {"data": {"color": "blue"}},
    ),
    (["create", "serviceaccount", "robot"], "serviceaccount/robot", {"kind": "ServiceAccount"}),
    (
        ["create", "role", "reader", "--verb=get,list", "--resource=configmaps,vms.kubevirt.io"],
        "role/reader",
        {
            "rules": [
                {"verbs": ["get", "list"], "apiGroups": [""], "resources": ["configmaps"]},
                {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"]},
            ]
        },
    ),
    (
        ["create", "rolebinding", "readers", "--role=reader", "--serviceaccount=NS:robot"],
        "rolebinding/readers",
        {"roleRef": {"kind": "Role", "name": "reader"}},
    ),
    (
        ["create", "service", "clusterip", "web", "--tcp=80:8080"],
        "service/web",
        {"spec": {"type": "ClusterIP", "ports": [{"port": 80, "targetPort": 8080}]}},
    ),
    (
        ["create", "service", "nodeport", "edge", "--tcp=80:8080"],
        "service/edge",
        {"spec": {"type": "NodePort"}},
    ),
]


@pytest.mark.parametrize(
    ("command", "resource", "expected"), GENERATED, ids=[g[1] for g in GENERATED]
)
def test_namespaced_generator_creates_the_object(
    kubectl: Kubectl, ns: str, command: list[str], resource: str, expected: JSON
) -> None:
    args = [arg.replace("NS:", f"{ns}:") for arg in command]
    out = kubectl("-n", ns, *args)
    assert "created" in out.stdout
    obj = kubectl.json("-n", ns, "get", resource)
    assert subset(obj, expected), obj


def test_create_secret_tls_stores_the_pair(kubectl: Kubectl, ns: str, tmp_path: Path) -> None:
    pair = pki.ensure_ca(tmp_path)
    kubectl("-n", ns, "create", "secret", "tls", "site", f"--cert={pair.cert}", f"--key={pair.key}")
    secret = kubectl.json("-n", ns, "get", "secret", "site")
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key"}


def test_cluster_generators_create_role_and_binding(kubectl: Kubectl, unique: str) -> None:
    kubectl("create", "clusterrole", unique, "--verb=get", "--resource=virtualmachines.kubevirt.io")
    kubectl("create", "clusterrolebinding", unique, f"--clusterrole={unique}", "--group=devs")
    role = kubectl.json("get", "clusterrole", unique)
    assert role["rules"] == [
        {"verbs": ["get"], "apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"]}
    ]
    binding = kubectl.json("get", "clusterrolebinding", unique)
    assert binding["subjects"] == [
        {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "devs"}
    ]


@pytest.mark.parametrize("kind", ["loadbalancer", "externalname"])
def test_service_types_vmo_lacks_are_refused_by_admission(
    kubectl: Kubectl, ns: str, kind: str
) -> None:
    """The body is read; the refusal names the field, as upstream's validation does."""
    extra = ["--external-name=db.example.com"] if kind == "externalname" else ["--tcp=80:80"]
    out = kubectl("-n", ns, "create", "service", kind, "svc", *extra, check=False)
    assert out.returncode != 0
    assert "spec.type: Unsupported value" in out.stderr
    assert "protobuf" not in out.stderr


def test_create_token_is_a_token_the_server_accepts(
    apiserver: ThreadedServer, kubectl: Kubectl, ns: str
) -> None:
    kubectl("-n", ns, "create", "serviceaccount", "robot")
    token = kubectl("-n", ns, "create", "token", "robot", "--duration=10m").stdout.strip()
    as_robot = kubectl("--token", token, "auth", "whoami", "-o", "json")
    user = json.loads(as_robot.stdout)["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{ns}:robot"
    assert f"system:serviceaccounts:{ns}" in user["groups"]


def test_auth_whoami_shows_the_admin(kubectl: Kubectl) -> None:
    rows = dict(line.split(None, 1) for line in kubectl("auth", "whoami").stdout.splitlines()[1:])
    assert rows["Username"] == "vmo-admin"
    assert rows["Groups"] == "[system:masters system:authenticated]"
    assert rows["UID"]


def test_auth_whoami_works_for_a_user_without_bindings(
    apiserver: ThreadedServer, unique: str
) -> None:
    """system:basic-user lets every authenticated user ask who they are, as upstream."""
    _, config = make_user(apiserver, f"nobody-{unique}", "team")
    review = json.loads(Kubectl(config)("auth", "whoami", "-o", "json").stdout)
    assert review["kind"] == "SelfSubjectReview"
    assert review["status"]["userInfo"]["username"] == f"nobody-{unique}"
    assert review["status"]["userInfo"]["groups"] == ["team", "system:authenticated"]


def test_auth_can_i_list_shows_the_namespace_rules(
    apiserver: ThreadedServer, kubectl: Kubectl, ns: str
) -> None:
    _, config = make_user(apiserver, f"lister-{ns}")
    kubectl("-n", ns, "create", "role", "vm-get", "--verb=get", "--resource=vms.kubevirt.io")
    kubectl("-n", ns, "create", "rolebinding", "vm-get", "--role=vm-get", f"--user=lister-{ns}")
    out = Kubectl(config)("auth", "can-i", "--list", "-n", ns).stdout
    (line,) = [row for row in out.splitlines() if row.startswith("virtualmachines.kubevirt.io")]
    assert line.split()[-1] == "[get]"


def _reconciled(ns: str, verbs: list[str]) -> str:
    rbac = "rbac.authorization.k8s.io"
    metadata = {"name": "r", "namespace": ns}
    role = {
        "apiVersion": f"{rbac}/v1",
        "kind": "Role",
        "metadata": metadata,
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": verbs}],
    }
    binding = {
        "apiVersion": f"{rbac}/v1",
        "kind": "RoleBinding",
        "metadata": metadata,
        "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "r"},
        "subjects": [{"kind": "User", "name": "bob", "apiGroup": rbac}],
    }
    return yaml.safe_dump_all([role, binding])


def test_auth_reconcile_creates_then_updates(kubectl: Kubectl, unique: str) -> None:
    """reconcile creates the namespace, then creates or updates the RBAC objects, in protobuf."""
    kubectl("auth", "reconcile", "-f", "-", input=_reconciled(unique, ["get"]))
    kubectl("auth", "reconcile", "-f", "-", input=_reconciled(unique, ["get", "list"]))
    role = kubectl.json("-n", unique, "get", "role", "r")
    # reconcile adds what is missing as a rule of its own, as against kube-apiserver
    assert [rule["verbs"] for rule in role["rules"]] == [["get"], ["list"]]
    binding = kubectl.json("-n", unique, "get", "rolebinding", "r")
    assert binding["subjects"][0]["name"] == "bob"


UNSERVED = [
    ["create", "quota", "q", "--hard=pods=2"],
    ["create", "priorityclass", "p", "--value=10"],
    ["create", "deployment", "d", "--image=example.com/app"],
    ["create", "job", "j", "--image=example.com/app"],
    ["create", "cronjob", "c", "--image=example.com/app", "--schedule=*/5 * * * *"],
    ["create", "ingress", "i", "--rule=a.example.com/=web:80"],
    ["create", "poddisruptionbudget", "p", "--selector=app=a", "--min-available=1"],
]


@pytest.mark.parametrize("command", UNSERVED, ids=[c[1] for c in UNSERVED])
def test_generators_of_kinds_vmo_does_not_serve_get_not_found(
    kubectl: Kubectl, ns: str, command: list[str]
) -> None:
    out = kubectl("-n", ns, *command, check=False)
    assert out.returncode != 0
    assert "the server could not find the requested resource" in out.stderr
    assert "protobuf" not in out.stderr


REPLICA_SET = """
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceReplicaSet
metadata: {name: pool}
spec:
  replicas: 0
  selector: {matchLabels: {app: pool}}
  template:
    metadata: {labels: {app: pool}}
    spec:
      domain: {memory: {guest: 128Mi}, devices: {}}
"""


def test_autoscale_gets_not_found_for_the_autoscaler(kubectl: Kubectl, ns: str) -> None:
    """kubectl reads the replica set, then POSTs a HorizontalPodAutoscaler VMO does not serve."""
    kubectl("-n", ns, "create", "-f", "-", input=REPLICA_SET)
    out = kubectl("-n", ns, "autoscale", "vmirs/pool", "--max=3", check=False)
    assert out.returncode != 0
    assert "the server could not find the requested resource" in out.stderr
    assert "protobuf" not in out.stderr
