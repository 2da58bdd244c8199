"""Kubernetes API semantics over real HTTPS: verbs, versions, errors, metadata, deletion."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Api

CM = "/api/v1/namespaces/{ns}/configmaps"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Polls a condition the server reaches asynchronously (controllers), failing on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def configmap(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


@pytest.fixture
def ns(api: Api, unique: str) -> str:
    r = api.post(
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": unique}},
    )
    assert r.status_code == 201, r.text
    return unique


def test_boot_namespaces_exist(api: Api) -> None:
    names = {i["metadata"]["name"] for i in api.get("/api/v1/namespaces").json()["items"]}
    assert {"default", "kube-system", "virtual-machines"} <= names


def test_create_sets_server_fields(api: Api, ns: str) -> None:
    r = api.post(CM.format(ns=ns), configmap("a", k="v"))
    assert r.status_code == 201
    md = r.json()["metadata"]
    assert md["namespace"] == ns and md["uid"] and md["creationTimestamp"] and md["resourceVersion"]


def test_generate_name_makes_distinct_names(api: Api, ns: str) -> None:
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "gen-"}}
    names = {api.post(CM.format(ns=ns), body).json()["metadata"]["name"] for _ in range(3)}
    assert len(names) == 3 and all(n.startswith("gen-") and len(n) == 9 for n in names)


def test_stale_update_is_a_409_conflict(api: Api, ns: str) -> None:
    created = api.post(CM.format(ns=ns), configmap("c", k="1")).json()
    first = dict(created, data={"k": "2"})
    assert api.put(f"{CM.format(ns=ns)}/c", first).status_code == 200
    stale = dict(created, data={"k": "3"})
    r = api.put(f"{CM.format(ns=ns)}/c", stale)
    assert r.status_code == 409 and r.json()["reason"] == "Conflict"
    assert api.get(f"{CM.format(ns=ns)}/c").json()["data"] == {"k": "2"}


def test_duplicate_name_is_409_already_exists(api: Api, ns: str) -> None:
    api.post(CM.format(ns=ns), configmap("dup"))
    r = api.post(CM.format(ns=ns), configmap("dup"))
    assert r.status_code == 409 and r.json()["reason"] == "AlreadyExists"
    assert r.json()["details"] == {"name": "dup", "kind": "configmaps"}


def test_invalid_name_is_422_with_field_causes(api: Api, ns: str) -> None:
    r = api.post(CM.format(ns=ns), configmap("Not_Valid"))
    assert r.status_code == 422
    causes = r.json()["details"]["causes"]
    assert causes[0]["field"] == "metadata.name" and "RFC 1123" in causes[0]["message"]
    assert api.get(f"{CM.format(ns=ns)}/Not_Valid").status_code == 404


def test_malformed_json_and_yaml_are_400(api: Api, ns: str) -> None:
    r = api.request(
        "POST", CM.format(ns=ns), data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["kind"] == "Status"
    r = api.request(
        "POST", CM.format(ns=ns), data=b"a: [", headers={"Content-Type": "application/yaml"}
    )
    assert r.status_code == 400


def test_yaml_bodies_are_accepted(api: Api, ns: str) -> None:
    body = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-yaml\ndata:\n  k: v\n"
    r = api.request(
        "POST", CM.format(ns=ns), data=body, headers={"Content-Type": "application/yaml"}
    )
    assert r.status_code == 201 and r.json()["data"] == {"k": "v"}


def test_body_over_3_mib_is_413(api: Api, ns: str) -> None:
    r = api.post(CM.format(ns=ns), configmap("big", k="x" * (3 * 1024 * 1024 + 10)))
    assert r.status_code == 413 and r.json()["reason"] == "RequestEntityTooLarge"
    assert api.get(f"{CM.format(ns=ns)}/big").status_code == 404


def test_unknown_kind_and_missing_object_are_404(api: Api, ns: str) -> None:
    assert api.get(f"/api/v1/namespaces/{ns}/gizmos").status_code == 404
    assert api.get("/apis/nothing.example.com/v1/things").status_code == 404
    r = api.get(f"{CM.format(ns=ns)}/absent")
    assert r.status_code == 404 and r.json()["message"] == 'configmaps "absent" not found'


def test_create_in_missing_namespace_is_404(api: Api) -> None:
    r = api.post(CM.format(ns="no-such-ns"), configmap("x"))
    assert r.status_code == 404 and "no-such-ns" in r.json()["message"]


def test_anonymous_requests_get_401(anonymous: Api) -> None:
    r = anonymous.get("/api/v1/namespaces")
    assert r.status_code == 401 and r.json()["reason"] == "Unauthorized"


def test_dry_run_writes_nothing(api: Api, ns: str) -> None:
    r = api.post(CM.format(ns=ns) + "?dryRun=All", configmap("dry"))
    assert r.status_code == 201 and r.json()["metadata"]["name"] == "dry"
    assert api.get(f"{CM.format(ns=ns)}/dry").status_code == 404


def test_patch_kinds(api: Api, ns: str) -> None:
    api.post(CM.format(ns=ns), configmap("p", a="1", b="2"))
    url = f"{CM.format(ns=ns)}/p"
    r = api.patch(url, {"data": {"a": None, "c": "3"}}, "application/merge-patch+json")
    assert r.json()["data"] == {"b": "2", "c": "3"}
    r = api.patch(
        url, [{"op": "replace", "path": "/data/b", "value": "x"}], "application/json-patch+json"
    )
    assert r.json()["data"]["b"] == "x"
    r = api.patch(
        url, {"metadata": {"labels": {"l": "v"}}}, "application/strategic-merge-patch+json"
    )
    assert r.json()["metadata"]["labels"] == {"l": "v"}
    r = api.patch(
        url, [{"op": "test", "path": "/data/b", "value": "nope"}], "application/json-patch+json"
    )
    assert r.status_code == 422


def test_label_selectors_equality_and_set_based(api: Api, ns: str) -> None:
    for name, tier in (("l1", "web"), ("l2", "db"), ("l3", "cache")):
        body = configmap(name)
        body["metadata"]["labels"] = {"tier": tier}
        api.post(CM.format(ns=ns), body)
    api.post(CM.format(ns=ns), configmap("l4"))

    def names(selector: str) -> set[str]:
        r = api.get(CM.format(ns=ns), params={"labelSelector": selector})
        assert r.status_code == 200, r.text
        return {i["metadata"]["name"] for i in r.json()["items"]}

    assert names("tier=web") == {"l1"}
    assert names("tier!=web") == {"l2", "l3", "l4"}
    assert names("tier in (db,cache)") == {"l2", "l3"}
    assert names("tier notin (db)") == {"l1", "l3", "l4"}
    assert names("tier") == {"l1", "l2", "l3"}
    assert names("!tier") == {"l4"}
    assert api.get(CM.format(ns=ns), params={"labelSelector": "tier in (a"}).status_code == 400


def test_field_selectors(api: Api, ns: str) -> None:
    api.post(CM.format(ns=ns), configmap("f1"))
    api.post(CM.format(ns=ns), configmap("f2"))
    r = api.get(CM.format(ns=ns), params={"fieldSelector": "metadata.name=f2"})
    assert [i["metadata"]["name"] for i in r.json()["items"]] == ["f2"]
    r = api.get(
        "/api/v1/configmaps", params={"fieldSelector": f"metadata.namespace={ns},metadata.name!=f2"}
    )
    assert {i["metadata"]["name"] for i in r.json()["items"]} == {"f1"}
    r = api.get(CM.format(ns=ns), params={"fieldSelector": "spec.nothing=x"})
    assert r.status_code == 400 and "field label not supported" in r.json()["message"]


def test_limit_and_continue_page_through_everything(api: Api, ns: str) -> None:
    for i in range(7):
        api.post(CM.format(ns=ns), configmap(f"page{i}"))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        params = {"limit": "3", **({"continue": token} if token else {})}
        body = api.get(CM.format(ns=ns), params=params).json()
        seen += [i["metadata"]["name"] for i in body["items"]]
        pages += 1
        token = body["metadata"].get("continue", "")
        if not token:
            break
    assert pages == 3 and seen == sorted(f"page{i}" for i in range(7))


def test_generation_moves_with_spec_not_metadata(api: Api, ns: str) -> None:
    url = f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines"
    vm = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "gen"},
        "spec": {
            "runStrategy": "Halted",
            "template": {"spec": {"domain": {"devices": {}, "memory": {"guest": "128Mi"}}}},
        },
    }
    created = api.post(url, vm)
    assert created.status_code == 201, created.text
    assert created.json()["metadata"]["generation"] == 1
    r = api.patch(
        f"{url}/gen", {"metadata": {"labels": {"a": "b"}}}, "application/merge-patch+json"
    )
    assert r.json()["metadata"]["generation"] == 1
    r = api.patch(f"{url}/gen", {"spec": {"runStrategy": "Always"}}, "application/merge-patch+json")
    assert r.json()["metadata"]["generation"] == 2


def test_status_is_its_own_subresource(api: Api, ns: str) -> None:
    url = f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines"
    vm = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "st"},
        "spec": {
            "runStrategy": "Halted",
            "template": {"spec": {"domain": {"devices": {}, "memory": {"guest": "128Mi"}}}},
        },
        "status": {"printableStatus": "Running"},
    }
    created = api.post(url, vm).json()
    assert "printableStatus" not in created.get("status", {})
    r = api.patch(
        f"{url}/st/status",
        {"status": {"printableStatus": "Stopped"}, "spec": {"runStrategy": "Always"}},
        "application/merge-patch+json",
    )
    assert r.status_code == 200, r.text
    assert (
        r.json()["status"]["printableStatus"] == "Stopped"
        and r.json()["spec"]["runStrategy"] == "Halted"
    )
    r = api.patch(
        f"{url}/st", {"status": {"printableStatus": "Paused"}}, "application/merge-patch+json"
    )
    assert r.json()["status"]["printableStatus"] == "Stopped"


def test_finalizers_hold_deletion_until_removed(api: Api, ns: str) -> None:
    body = configmap("fin")
    body["metadata"]["finalizers"] = ["example.com/hold"]
    api.post(CM.format(ns=ns), body)
    r = api.delete(f"{CM.format(ns=ns)}/fin")
    assert r.status_code == 200 and r.json()["metadata"]["deletionTimestamp"]
    assert api.get(f"{CM.format(ns=ns)}/fin").status_code == 200
    r = api.patch(
        f"{CM.format(ns=ns)}/fin",
        {"metadata": {"finalizers": None}},
        "application/merge-patch+json",
    )
    assert r.status_code == 200
    assert api.get(f"{CM.format(ns=ns)}/fin").status_code == 404


def _owned(api: Api, ns: str, owner: dict[str, Any], name: str, block: bool = False) -> None:
    body = configmap(name)
    body["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "blockOwnerDeletion": block,
        }
    ]
    assert api.post(CM.format(ns=ns), body).status_code == 201


@pytest.mark.parametrize("policy", ["Background", "Foreground"])
def test_cascading_deletion_removes_dependents(api: Api, ns: str, policy: str) -> None:
    owner = api.post(CM.format(ns=ns), configmap("owner")).json()
    _owned(api, ns, owner, "child", block=True)
    _owned(api, ns, owner, "child2")
    r = api.delete(f"{CM.format(ns=ns)}/owner", {"propagationPolicy": policy})
    assert r.status_code == 200
    wait_for(lambda: api.get(f"{CM.format(ns=ns)}/child").status_code == 404)
    wait_for(lambda: api.get(f"{CM.format(ns=ns)}/child2").status_code == 404)
    wait_for(lambda: api.get(f"{CM.format(ns=ns)}/owner").status_code == 404)


def test_orphan_deletion_keeps_dependents_without_the_reference(api: Api, ns: str) -> None:
    owner = api.post(CM.format(ns=ns), configmap("owner")).json()
    _owned(api, ns, owner, "kept")
    api.delete(f"{CM.format(ns=ns)}/owner", {"propagationPolicy": "Orphan"})
    wait_for(lambda: api.get(f"{CM.format(ns=ns)}/owner").status_code == 404)
    kept = api.get(f"{CM.format(ns=ns)}/kept").json()
    assert "ownerReferences" not in kept["metadata"]


def test_namespace_deletion_removes_its_contents(api: Api, ns: str) -> None:
    api.post(CM.format(ns=ns), configmap("inside"))
    r = api.delete(f"/api/v1/namespaces/{ns}")
    assert r.status_code == 200 and r.json()["status"]["phase"] == "Terminating"
    wait_for(lambda: api.get(f"/api/v1/namespaces/{ns}").status_code == 404)
    assert api.get(f"{CM.format(ns=ns)}/inside").status_code == 404


def test_deletecollection_with_selector(api: Api, ns: str) -> None:
    for name, keep in (("d1", "no"), ("d2", "no"), ("d3", "yes")):
        body = configmap(name)
        body["metadata"]["labels"] = {"keep": keep}
        api.post(CM.format(ns=ns), body)
    r = api.delete(CM.format(ns=ns), params={"labelSelector": "keep=no"})
    assert r.status_code == 200
    left = {i["metadata"]["name"] for i in api.get(CM.format(ns=ns)).json()["items"]}
    assert "d3" in left and not {"d1", "d2"} & left


def test_table_responses_carry_printer_columns(api: Api, ns: str) -> None:
    api.post(CM.format(ns=ns), configmap("tab"))
    r = api.get(
        CM.format(ns=ns),
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"},
    )
    body = r.json()
    assert body["kind"] == "Table"
    assert body["columnDefinitions"][0]["name"] == "Name"
    assert [row["cells"][0] for row in body["rows"]] == ["tab"]


def _watch_lines(api: Api, path: str, params: dict[str, str], count: int) -> list[dict[str, Any]]:
    r = api.request("GET", path, params={"watch": "true", **params}, stream=True)
    assert r.status_code == 200
    events = []
    for line in r.iter_lines():
        if line:
            events.append(json.loads(line))
        if len(events) == count:
            break
    r.close()
    return events


def test_watch_from_a_resource_version_replays_history(api: Api, ns: str) -> None:
    rv = api.post(CM.format(ns=ns), configmap("w1")).json()["metadata"]["resourceVersion"]
    api.patch(f"{CM.format(ns=ns)}/w1", {"data": {"x": "1"}}, "application/merge-patch+json")
    api.delete(f"{CM.format(ns=ns)}/w1")
    events = _watch_lines(api, CM.format(ns=ns), {"resourceVersion": rv, "timeoutSeconds": "5"}, 2)
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert events[0]["object"]["data"] == {"x": "1"}


def test_watch_with_label_selector_sees_objects_leave(api: Api, ns: str) -> None:
    body = configmap("wl")
    body["metadata"]["labels"] = {"app": "x"}
    rv = api.post(CM.format(ns=ns), body).json()["metadata"]["resourceVersion"]
    api.patch(
        f"{CM.format(ns=ns)}/wl",
        {"metadata": {"labels": {"app": "y"}}},
        "application/merge-patch+json",
    )
    events = _watch_lines(
        api,
        CM.format(ns=ns),
        {"resourceVersion": rv, "labelSelector": "app=x", "timeoutSeconds": "5"},
        1,
    )
    assert events[0]["type"] == "DELETED"


def test_watch_from_a_compacted_version_is_410(api: Api, apiserver: Any, ns: str) -> None:
    api.post(CM.format(ns=ns), configmap("old"))
    server = apiserver.server
    floor = server.store.revision
    apiserver.call(_compact(server, keep=0))
    events = _watch_lines(api, CM.format(ns=ns), {"resourceVersion": str(floor - 1)}, 1)
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


async def _compact(server: Any, keep: int) -> None:
    server.store.compact(keep=keep)


def _vm(name: str, **spec: Any) -> dict[str, Any]:
    template = {"spec": {"domain": {"devices": {}, "memory": {"guest": "128Mi"}}}}
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"runStrategy": "Halted", "template": template, **spec},
    }


def test_unknown_fields_strict_is_400_and_warn_drops_with_a_warning(api: Api, ns: str) -> None:
    url = f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines"
    r = api.post(url + "?fieldValidation=Strict", _vm("strict", colour="blue"))
    assert r.status_code == 400
    assert 'strict decoding error: unknown field "spec.colour"' in r.json()["message"]
    r = api.post(url, _vm("warned", colour="blue"))
    assert r.status_code == 201 and "colour" not in r.json()["spec"]
    assert 'unknown field "spec.colour"' in r.headers["Warning"]
    assert api.post(url + "?fieldValidation=Sometimes", _vm("x")).status_code == 400


def test_an_upstream_field_vmo_does_not_support_is_refused_by_name(api: Api, ns: str) -> None:
    vm = _vm("gpu")
    vm["spec"]["template"]["spec"]["domain"]["devices"]["gpus"] = [
        {"name": "g", "deviceName": "nvidia.com/x"}
    ]
    r = api.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", vm)
    assert r.status_code == 422
    fields = [c["field"] for c in r.json()["details"]["causes"]]
    assert fields == ["spec.template.spec.domain.devices.gpus"]
    assert "not supported by VMO" in r.json()["details"]["causes"][0]["message"]


def test_deprecated_running_is_accepted_with_a_warning(api: Api, ns: str) -> None:
    vm = _vm("legacy")
    del vm["spec"]["runStrategy"]
    vm["spec"]["running"] = False
    r = api.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", vm)
    assert r.status_code == 201, r.text
    assert "spec.running is deprecated" in r.headers["Warning"]
