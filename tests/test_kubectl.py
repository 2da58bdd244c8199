"""The preinstalled kubectl works against the embedded server with no special flags."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.conftest import Kubectl, make_user
from vmo.testing.apiserver import ThreadedServer

VM_YAML = """
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
  namespace: {ns}
  labels:
    app: db
spec:
  runStrategy: Halted
  template:
    metadata:
      labels:
        app: db
    spec:
      domain:
        cpu:
          cores: 1
        memory:
          guest: 256Mi
        devices:
          interfaces:
            - name: default
              masquerade: {{}}
      networks:
        - name: default
          pod: {{}}
"""

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      additionalPrinterColumns:
        - {name: Size, type: integer, jsonPath: .spec.size}
        - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer, minimum: 1, default: 3}
                color: {type: string, enum: [red, blue]}
            status:
              type: object
              properties:
                conditions:
                  type: array
                  items:
                    type: object
                    properties:
                      type: {type: string}
                      status: {type: string}
"""


@pytest.fixture
def ns(kubectl: Kubectl, unique: str) -> str:
    kubectl("create", "namespace", unique)  # a protobuf request body
    return unique


def test_get_namespaces_lists_the_boot_namespaces(kubectl: Kubectl) -> None:
    out = kubectl("get", "namespaces").stdout
    assert out.splitlines()[0].split() == ["NAME", "STATUS", "AGE"]
    for name in ("default", "kube-system", "virtual-machines"):
        assert name in out


def test_apply_get_describe_a_vm_with_kubevirt_columns(kubectl: Kubectl, ns: str) -> None:
    out = kubectl.apply(VM_YAML.format(name="db", ns=ns)).stdout
    assert "virtualmachine.kubevirt.io/db created" in out
    header = kubectl("get", "vm", "-n", ns).stdout.splitlines()[0].split()
    assert header == ["NAME", "AGE", "STATUS", "READY"]
    described = kubectl("describe", "vm", "db", "-n", ns).stdout
    assert "Run Strategy:  Halted" in described
    before = kubectl.json("get", "vm", "db", "-n", ns)
    kubectl.apply(VM_YAML.format(name="db", ns=ns))
    after = kubectl.json("get", "vm", "db", "-n", ns)
    # re-applying the same manifest changes nothing: the MAC the pool assigned stays, as
    # KubeMacPool keeps it, and the generation does not move
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    mac = after["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]["macAddress"]
    assert (
        mac
        == before["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]["macAddress"]
    )


def test_patch_label_and_delete(kubectl: Kubectl, ns: str) -> None:
    kubectl.apply(VM_YAML.format(name="p", ns=ns))
    kubectl("label", "vm", "p", "-n", ns, "tier=gold")
    kubectl("patch", "vm", "p", "-n", ns, "--type=merge", "-p", '{"spec":{"runStrategy":"Manual"}}')
    vm = kubectl.json("get", "vm", "p", "-n", ns)
    assert vm["metadata"]["labels"]["tier"] == "gold" and vm["spec"]["runStrategy"] == "Manual"
    assert (
        kubectl("get", "vm", "-n", ns, "-l", "tier in (gold,silver)", "-o", "name").stdout.strip()
        == "virtualmachine.kubevirt.io/p"
    )
    kubectl("delete", "vm", "p", "-n", ns)
    assert kubectl("get", "vm", "p", "-n", ns, check=False).returncode != 0


def test_apply_refuses_an_invalid_vm_with_the_field_path(kubectl: Kubectl, ns: str) -> None:
    bad = VM_YAML.format(name="bad", ns=ns).replace("runStrategy: Halted", "runStrategy: Sometimes")
    proc = kubectl("apply", "-f", "-", input=bad, check=False)
    assert proc.returncode != 0
    assert "spec.runStrategy" in proc.stderr


def test_crd_is_served_with_validation_defaults_and_columns(kubectl: Kubectl, ns: str) -> None:
    kubectl.apply(WIDGET_CRD)
    kubectl("wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=20s")
    kubectl.apply(
        {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "w", "namespace": ns},
            "spec": {"color": "red"},
        }
    )
    assert kubectl.json("get", "wdg", "w", "-n", ns)["spec"]["size"] == 3
    header = kubectl("get", "widgets", "-n", ns).stdout.splitlines()[0].split()
    assert header == ["NAME", "SIZE", "AGE"]
    bad = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "b", "namespace": ns},
        "spec": {"color": "green"},
    }
    proc = kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert proc.returncode != 0 and "spec.color" in proc.stderr


def test_wait_for_condition_on_status(kubectl: Kubectl, ns: str) -> None:
    kubectl.apply(WIDGET_CRD)
    kubectl("wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=20s")
    kubectl.apply(
        {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "ready", "namespace": ns},
            "spec": {},
        }
    )
    kubectl(
        "patch",
        "widget",
        "ready",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"conditions":[{"type":"Ready","status":"True"}]}}',
    )
    out = kubectl("wait", "--for=condition=Ready", "widget/ready", "-n", ns, "--timeout=20s").stdout
    assert "condition met" in out


def test_auth_can_i_and_rbac_for_a_restricted_user(
    apiserver: ThreadedServer, kubectl: Kubectl, ns: str
) -> None:
    _, config = make_user(apiserver, f"viewer-{ns}", "team")
    viewer = Kubectl(config)
    assert viewer("auth", "can-i", "get", "vm", "-n", ns, check=False).stdout.strip() == "no"
    kubectl(
        "create",
        "rolebinding",
        "view-vms",
        "--clusterrole=kubevirt.io:view",
        f"--user=viewer-{ns}",
        "-n",
        ns,
    )
    assert viewer("auth", "can-i", "get", "vm", "-n", ns).stdout.strip() == "yes"
    assert viewer("auth", "can-i", "delete", "vm", "-n", ns, check=False).stdout.strip() == "no"
    assert viewer("auth", "can-i", "get", "vm", "-n", "default", check=False).stdout.strip() == "no"
    denied = viewer("delete", "vm", "x", "-n", ns, check=False)
    assert denied.returncode != 0
    assert (
        f'User "viewer-{ns}" cannot delete resource "virtualmachines" in API group "kubevirt.io" in the namespace "{ns}"'
        in denied.stderr
    )


def test_explain_reads_the_openapi_documents(kubectl: Kubectl) -> None:
    out = kubectl("explain", "virtualmachine.spec.runStrategy").stdout
    assert "runStrategy" in out and "KIND:" in out and "VirtualMachine" in out
    assert "FIELDS" in kubectl("explain", "configmaps").stdout


def test_server_side_apply(kubectl: Kubectl, ns: str) -> None:
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "ssa", "namespace": ns},
        "data": {"a": "1"},
    }
    kubectl.apply(cm, "--server-side")
    assert kubectl.json("get", "cm", "ssa", "-n", ns)["data"] == {"a": "1"}


def _token_review(kubectl: Kubectl, token: str) -> Any:
    manifest = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview"}
    text = yaml.safe_dump({**manifest, "spec": {"token": token}})
    return json.loads(kubectl("create", "-f", "-", "-o", "json", input=text).stdout)


def test_token_review_names_the_user_of_a_token_and_is_not_stored(
    kubectl: Kubectl, ns: str
) -> None:
    kubectl("-n", ns, "create", "serviceaccount", "hook")
    token = kubectl("-n", ns, "create", "token", "hook").stdout.strip()
    review = _token_review(kubectl, token)
    assert review["status"]["authenticated"] is True
    assert review["status"]["user"]["username"] == f"system:serviceaccount:{ns}:hook"
    forged = _token_review(kubectl, token[:-4] + "AAAA")
    assert forged["status"] == {"authenticated": False}
    listed = kubectl("get", "tokenreviews", check=False)
    assert listed.returncode != 0 and "MethodNotAllowed" in listed.stderr
