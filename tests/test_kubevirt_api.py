"""The subresources.kubevirt.io actions, as virt-api performs them (no node agent needed)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api, make_user
from vmo.testing.apiserver import ThreadedServer

SUB = "/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachines/{name}/{action}"


def vm(name: str, strategy: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "runStrategy": strategy,
            "template": {"spec": {"domain": {"devices": {}, "memory": {"guest": "128Mi"}}}},
        },
    }


@pytest.fixture
def ns(api: Api, unique: str) -> str:
    api.post("/api/v1/namespaces", {"metadata": {"name": unique}})
    return unique


def _vm_url(ns: str, name: str) -> str:
    return f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines/{name}"


def test_discovery_lists_the_subresources(api: Api) -> None:
    groups = [g["name"] for g in api.get("/apis").json()["groups"]]
    assert "subresources.kubevirt.io" in groups
    names = {r["name"] for r in api.get("/apis/subresources.kubevirt.io/v1").json()["resources"]}
    assert {
        "virtualmachines/start",
        "virtualmachineinstances/console",
        "virtualmachineinstances/vnc",
    } <= names


def test_start_and_stop_flip_the_run_strategy(api: Api, ns: str) -> None:
    api.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", vm("s", "Halted"))
    assert api.put(SUB.format(ns=ns, name="s", action="start")).status_code == 202
    assert api.get(_vm_url(ns, "s")).json()["spec"]["runStrategy"] == "Always"
    r = api.put(SUB.format(ns=ns, name="s", action="start"))
    assert (
        r.status_code == 409
        and "Always does not support manual start requests" in r.json()["message"]
    )
    assert api.put(SUB.format(ns=ns, name="s", action="stop")).status_code == 202
    assert api.get(_vm_url(ns, "s")).json()["spec"]["runStrategy"] == "Halted"


def test_start_paused_of_a_halted_vm_is_a_request_for_the_controller(api: Api, ns: str) -> None:
    api.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", vm("p", "Halted"))
    assert api.put(SUB.format(ns=ns, name="p", action="start"), {"paused": True}).status_code == 202
    got = api.get(_vm_url(ns, "p")).json()
    # upstream's virt-api leaves the run strategy to virt-controller, which starts the VMI paused
    assert got["spec"]["runStrategy"] == "Halted"
    assert got["status"]["stateChangeRequests"] == [{"action": "Start", "data": {"paused": "true"}}]


def test_manual_start_is_a_state_change_request(api: Api, ns: str) -> None:
    api.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", vm("m", "Manual"))
    assert api.put(SUB.format(ns=ns, name="m", action="start")).status_code == 202
    got = api.get(_vm_url(ns, "m")).json()
    assert got["spec"]["runStrategy"] == "Manual"
    assert got["status"]["stateChangeRequests"] == [{"action": "Start"}]


def test_stop_and_restart_of_a_vm_that_is_not_running_conflict(api: Api, ns: str) -> None:
    api.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", vm("h", "Manual"))
    r = api.put(SUB.format(ns=ns, name="h", action="stop"))
    assert r.status_code == 409 and "VM is not running" in r.json()["message"]
    r = api.put(SUB.format(ns=ns, name="h", action="restart"))
    assert r.status_code == 409
    assert api.put(SUB.format(ns=ns, name="absent", action="start")).status_code == 404


def test_rbac_covers_the_subresources(apiserver: ThreadedServer, api: Api, ns: str) -> None:
    api.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", vm("r", "Halted"))
    token, _ = make_user(apiserver, f"op-{ns}")
    op = Api(apiserver.url, apiserver.ca, token)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "viewers"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "kubevirt.io:view",
        },
        "subjects": [{"kind": "User", "name": f"op-{ns}", "apiGroup": "rbac.authorization.k8s.io"}],
    }
    api.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", binding)
    r = op.put(SUB.format(ns=ns, name="r", action="start"))
    assert r.status_code == 403
    assert (
        'cannot update resource "virtualmachines/start" in API group "subresources.kubevirt.io"'
        in r.json()["message"]
    )
    binding["metadata"]["name"] = "editors"
    binding["roleRef"]["name"] = "kubevirt.io:edit"
    api.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", binding)
    assert op.put(SUB.format(ns=ns, name="r", action="start")).status_code == 202


def test_edit_users_may_import_and_upload_disks(
    apiserver: ThreadedServer, api: Api, ns: str
) -> None:
    token, _ = make_user(apiserver, f"editor-{ns}")
    editor = Api(apiserver.url, apiserver.ca, token)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "editors"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [
            {"kind": "User", "name": f"editor-{ns}", "apiGroup": "rbac.authorization.k8s.io"}
        ],
    }
    api.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", binding)
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {
            "resourceAttributes": {
                "namespace": ns,
                "verb": "create",
                "group": "upload.cdi.kubevirt.io",
                "resource": "uploadtokenrequests",
            }
        },
    }
    assert (
        editor.post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review).json()[
            "status"
        ]["allowed"]
        is True
    )
    dv = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": "disk"},
        "spec": {
            "source": {"blank": {}},
            "storage": {"resources": {"requests": {"storage": "1Gi"}}},
        },
    }
    # dry run: proves the grant without leaving a DataVolume for other tests' importers to claim
    url = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{ns}/datavolumes?dryRun=All"
    assert editor.post(url, dv).status_code == 201
