"""Patch application: RFC 7386 merge patch, RFC 6902 JSON patch, Kubernetes strategic merge."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from tests.conftest import SCHEMAS
from vmo.apiserver.patch import (
    ApplyConflict,
    PatchError,
    json_equal,
    json_merge_patch,
    json_patch,
    record_update,
    server_side_apply,
    strategic_merge_patch,
)

# --------------------------------------------------------------------------- RFC 7386

# Appendix A of RFC 7386, wrapped in {"v": ...} where the RFC's target or patch is not an object.
RFC7386_CASES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    ({"v": ["a", "b"]}, {"v": ["c", "d"]}, {"v": ["c", "d"]}),
    ({"v": {"a": "b"}}, {"v": ["c"]}, {"v": ["c"]}),
    ({"v": {"a": "foo"}}, {"v": None}, {}),
    ({"v": {"a": "foo"}}, {"v": "bar"}, {"v": "bar"}),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ({"v": [1, 2]}, {"v": {"a": "b", "c": None}}, {"v": {"a": "b"}}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC7386_CASES)
def test_merge_patch_follows_rfc7386_examples(target: Any, patch: Any, expected: Any) -> None:
    assert json_merge_patch(target, patch) == expected


def test_merge_patch_leaves_its_arguments_unchanged() -> None:
    target = {"metadata": {"labels": {"a": "1"}}}
    patch = {"metadata": {"labels": {"b": "2"}}}
    before = copy.deepcopy((target, patch))
    json_merge_patch(target, patch)
    assert (target, patch) == before


def test_merge_patch_must_be_an_object() -> None:
    with pytest.raises(PatchError):
        json_merge_patch({"a": 1}, ["not", "an", "object"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- RFC 6902

RFC6902_CASES: list[tuple[str, Any, list[Any], Any]] = [
    ("A.1 add object member", {"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}],
     {"baz": "qux", "foo": "bar"}),
    ("A.2 add array element", {"foo": ["bar", "baz"]},
     [{"op": "add", "path": "/foo/1", "value": "qux"}], {"foo": ["bar", "qux", "baz"]}),
    ("A.3 remove object member", {"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}],
     {"foo": "bar"}),
    ("A.4 remove array element", {"foo": ["bar", "qux", "baz"]},
     [{"op": "remove", "path": "/foo/1"}], {"foo": ["bar", "baz"]}),
    ("A.5 replace", {"baz": "qux", "foo": "bar"},
     [{"op": "replace", "path": "/baz", "value": "boo"}], {"baz": "boo", "foo": "bar"}),
    ("A.6 move member", {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
     [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
     {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}),
    ("A.7 move array element", {"foo": ["all", "grass", "cows", "eat"]},
     [{"op": "move", "from": "/foo/1", "path": "/foo/3"}],
     {"foo": ["all", "cows", "eat", "grass"]}),
    ("A.8 test success", {"baz": "qux", "foo": ["a", 2, "c"]},
     [{"op": "test", "path": "/baz", "value": "qux"}, {"op": "test", "path": "/foo/1", "value": 2}],
     {"baz": "qux", "foo": ["a", 2, "c"]}),
    ("A.10 add nested member", {"foo": "bar"},
     [{"op": "add", "path": "/child", "value": {"grandchild": {}}}],
     {"foo": "bar", "child": {"grandchild": {}}}),
    ("A.11 ignore unknown members", {"foo": "bar"},
     [{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}], {"foo": "bar", "baz": "qux"}),
    ("A.14 ~ escape ordering", {"/": 9, "~1": 10},
     [{"op": "test", "path": "/~01", "value": 10}], {"/": 9, "~1": 10}),
    ("A.16 add array value", {"foo": ["bar"]},
     [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}],
     {"foo": ["bar", ["abc", "def"]]}),
    ("copy", {"a": {"b": [1]}}, [{"op": "copy", "from": "/a", "path": "/c"}],
     {"a": {"b": [1]}, "c": {"b": [1]}}),
    ("~1 escape", {"metadata": {"labels": {}}},
     [{"op": "add", "path": "/metadata/labels/vmo.dev~1role", "value": "db"}],
     {"metadata": {"labels": {"vmo.dev/role": "db"}}}),
    ("replace root", {"a": 1}, [{"op": "replace", "path": "", "value": {"b": 2}}], {"b": 2}),
    ("test numbers by value", {"n": 1}, [{"op": "test", "path": "/n", "value": 1.0}], {"n": 1}),
    ("add null value", {"a": 1}, [{"op": "add", "path": "/b", "value": None}],
     {"a": 1, "b": None}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("target", "ops", "expected"),
    [c[1:] for c in RFC6902_CASES],
    ids=[c[0] for c in RFC6902_CASES],
)
def test_json_patch_follows_rfc6902_examples(target: Any, ops: list[Any], expected: Any) -> None:
    assert json_patch(target, ops) == expected


RFC6902_ERRORS: list[tuple[str, Any, list[Any], str]] = [
    ("A.9 test failure", {"baz": "qux"}, [{"op": "test", "path": "/baz", "value": "bar"}],
     "op 0 (test /baz)"),
    ("A.12 add to nonexistent target", {"foo": "bar"},
     [{"op": "add", "path": "/baz/bat", "value": "qux"}], "op 0 (add /baz/bat)"),
    ("A.15 string is not number", {"/": 9, "~1": 10},
     [{"op": "test", "path": "/~01", "value": "10"}], "test failed"),
    ("remove missing", {"a": 1}, [{"op": "remove", "path": "/b"}], "path not found"),
    ("replace missing", {"a": 1}, [{"op": "replace", "path": "/b", "value": 1}], "path not found"),
    ("index past end", {"a": [1]}, [{"op": "add", "path": "/a/2", "value": 1}], "out of bounds"),
    ("leading zero index", {"a": [1, 2]}, [{"op": "remove", "path": "/a/01"}], "invalid array"),
    ("dash outside add", {"a": [1]}, [{"op": "remove", "path": "/a/-"}], "invalid array index"),
    ("bad escape", {"a": 1}, [{"op": "remove", "path": "/a~2"}], "invalid escape"),
    ("no leading slash", {"a": 1}, [{"op": "remove", "path": "a"}], "must start with '/'"),
    ("unknown op", {"a": 1}, [{"op": "frob", "path": "/a"}], "unknown operation"),
    ("missing value", {"a": 1}, [{"op": "add", "path": "/b"}], "missing 'value'"),
    ("move into child", {"a": {"b": 1}}, [{"op": "move", "from": "/a", "path": "/a/b/c"}],
     "own children"),
    ("true is not 1", {"a": True}, [{"op": "test", "path": "/a", "value": 1}], "test failed"),
    ("second op named", {"a": 1},
     [{"op": "add", "path": "/b", "value": 2}, {"op": "remove", "path": "/zz"}], "op 1 (remove"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("target", "ops", "message"),
    [c[1:] for c in RFC6902_ERRORS],
    ids=[c[0] for c in RFC6902_ERRORS],
)
def test_json_patch_errors_name_the_op(target: Any, ops: list[Any], message: str) -> None:
    with pytest.raises(PatchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        json_patch(target, ops)


def test_json_patch_is_atomic() -> None:
    target = {"a": [1, 2]}
    with pytest.raises(PatchError):
        json_patch(target, [{"op": "remove", "path": "/a/0"}, {"op": "remove", "path": "/x"}])
    assert target == {"a": [1, 2]}


def test_json_patch_error_carries_index_and_path() -> None:
    with pytest.raises(PatchError) as caught:
        json_patch({}, [{"op": "test", "path": "/", "value": 1}])
    assert (caught.value.op_index, caught.value.path) == (0, "/")


def test_json_patch_result_must_be_an_object() -> None:
    with pytest.raises(PatchError):
        json_patch({"a": 1}, [{"op": "replace", "path": "", "value": [1]}])


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [(1, 1.0, True), (True, 1, False), ({"a": [1]}, {"a": [1.0]}, True), (None, 0, False)],
)
def test_json_equality(a: Any, b: Any, equal: bool) -> None:
    assert json_equal(a, b) is equal


# --------------------------------------------------------------------------- strategic merge

PORT_LIST = {
    "type": "array",
    "items": {"type": "object", "properties": {"port": {"type": "integer"}}},
    "x-kubernetes-patch-strategy": "merge",
    "x-kubernetes-patch-merge-key": "port",
}
SERVICE_SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "ports": PORT_LIST,
                "selector": {"type": "object", "additionalProperties": {"type": "string"}},
                "externalIPs": {"type": "array", "items": {"type": "string"}},
            },
        }
    },
}

CONTAINER = {
    "type": "object",
    "properties": {
        "env": {
            "type": "array",
            "items": {"type": "object"},
            "x-kubernetes-patch-strategy": "merge",
            "x-kubernetes-patch-merge-key": "name",
        },
        "args": {"type": "array", "items": {"type": "string"}},
    },
}
POD_SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "containers": {
                    "type": "array",
                    "items": CONTAINER,
                    "x-kubernetes-patch-strategy": "merge",
                    "x-kubernetes-patch-merge-key": "name",
                },
                "volumes": {
                    "type": "array",
                    "items": {"type": "object"},
                    "x-kubernetes-patch-strategy": "merge,retainKeys",
                    "x-kubernetes-patch-merge-key": "name",
                },
                "strategy": {"type": "object", "x-kubernetes-patch-strategy": "retainKeys"},
            },
        }
    },
}
LIST_MAP_SCHEMA = {
    "type": "object",
    "properties": {
        "status": {
            "type": "object",
            "properties": {
                "conditions": {
                    "type": "array",
                    "items": {"type": "object"},
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["type"],
                },
                "ports": {
                    "type": "array",
                    "items": {"type": "object"},
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["port", "protocol"],
                },
            },
        }
    },
}


def svc(*ports: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"ports": list(ports)}}


def test_service_ports_merge_by_port() -> None:
    live = svc({"port": 80, "name": "http"}, {"port": 443, "name": "https"})
    patch = svc({"port": 443, "targetPort": 8443})
    assert strategic_merge_patch(live, patch, SERVICE_SCHEMA) == svc(
        {"port": 80, "name": "http"}, {"port": 443, "name": "https", "targetPort": 8443}
    )


def test_new_list_items_come_first_like_kubernetes() -> None:
    live = svc({"port": 80})
    result = strategic_merge_patch(live, svc({"port": 9090}), SERVICE_SCHEMA)
    assert result == svc({"port": 9090}, {"port": 80})


def test_patch_delete_directive_removes_element_by_key() -> None:
    live = svc({"port": 80}, {"port": 443})
    patch = svc({"port": 80, "$patch": "delete"})
    assert strategic_merge_patch(live, patch, SERVICE_SCHEMA) == svc({"port": 443})


def test_patch_replace_directive_in_list_replaces_it() -> None:
    live = svc({"port": 80}, {"port": 443})
    patch = svc({"port": 8080}, {"$patch": "replace"})
    assert strategic_merge_patch(live, patch, SERVICE_SCHEMA) == svc({"port": 8080})


def test_patch_replace_directive_in_map_replaces_it() -> None:
    live = {"spec": {"selector": {"app": "a", "tier": "web"}}}
    patch = {"spec": {"selector": {"app": "b", "$patch": "replace"}}}
    result = strategic_merge_patch(live, patch, SERVICE_SCHEMA)
    assert result == {"spec": {"selector": {"app": "b"}}}


def test_patch_delete_directive_in_map_removes_it() -> None:
    live = {"spec": {"selector": {"app": "a"}, "type": "ClusterIP"}}
    patch = {"spec": {"selector": {"$patch": "delete"}}}
    assert strategic_merge_patch(live, patch, SERVICE_SCHEMA) == {"spec": {"type": "ClusterIP"}}


def test_unknown_directive_is_refused() -> None:
    with pytest.raises(PatchError):
        strategic_merge_patch({"spec": {}}, {"spec": {"$patch": "frob"}}, SERVICE_SCHEMA)


def test_merge_directive_in_list_is_refused() -> None:
    with pytest.raises(PatchError):
        strategic_merge_patch(svc({"port": 1}), svc({"$patch": "merge", "port": 1}), SERVICE_SCHEMA)


def test_element_without_merge_key_is_refused() -> None:
    with pytest.raises(PatchError, match="merge key"):
        strategic_merge_patch(svc({"port": 80}), svc({"name": "x"}), SERVICE_SCHEMA)


def test_primitive_list_without_strategy_is_replaced() -> None:
    live = {"spec": {"externalIPs": ["10.0.0.1", "10.0.0.2"]}}
    patch = {"spec": {"externalIPs": ["10.0.0.3"]}}
    assert strategic_merge_patch(live, patch, SERVICE_SCHEMA) == patch


def test_labels_merge_and_null_deletes() -> None:
    live = {"metadata": {"labels": {"a": "1", "b": "2"}, "annotations": {"x": "y"}}}
    patch = {"metadata": {"labels": {"b": None, "c": "3"}, "annotations": {"x": None}}}
    assert strategic_merge_patch(live, patch, None) == {
        "metadata": {"labels": {"a": "1", "c": "3"}, "annotations": {}}
    }


def test_finalizers_union_without_schema() -> None:
    live = {"metadata": {"finalizers": ["a", "b"]}}
    result = strategic_merge_patch(live, {"metadata": {"finalizers": ["b", "c"]}}, None)
    assert sorted(result["metadata"]["finalizers"]) == ["a", "b", "c"]


def test_delete_from_primitive_list_directive() -> None:
    live = {"metadata": {"finalizers": ["a", "b", "c"]}}
    patch = {"metadata": {"$deleteFromPrimitiveList/finalizers": ["b"]}}
    assert strategic_merge_patch(live, patch, None) == {"metadata": {"finalizers": ["a", "c"]}}


def test_owner_references_merge_by_uid() -> None:
    first = {"uid": "1", "kind": "VirtualMachine", "name": "vm"}
    live = {"metadata": {"ownerReferences": [first]}}
    patch = {"metadata": {"ownerReferences": [{"uid": "1", "controller": True}, {"uid": "2"}]}}
    result = strategic_merge_patch(live, patch, None)
    assert result["metadata"]["ownerReferences"] == [{**first, "controller": True}, {"uid": "2"}]


def test_object_meta_tags_apply_even_with_a_crd_schema() -> None:
    schema = {"type": "object", "properties": {"metadata": {"type": "object"}}}
    live = {"metadata": {"finalizers": ["a"]}}
    result = strategic_merge_patch(live, {"metadata": {"finalizers": ["b"]}}, schema)
    assert sorted(result["metadata"]["finalizers"]) == ["a", "b"]


def test_unknown_schema_replaces_lists() -> None:
    live = {"spec": {"ports": [{"port": 80}]}}
    patch = {"spec": {"ports": [{"port": 443}]}}
    assert strategic_merge_patch(live, patch, None) == patch


def test_preserve_unknown_fields_replaces_lists() -> None:
    schema = {
        "type": "object",
        "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }
    patch = {"spec": {"items": [2]}}
    assert strategic_merge_patch({"spec": {"items": [1]}}, patch, schema) == patch


def test_nested_merge_lists_merge_at_each_level() -> None:
    live = {
        "spec": {
            "containers": [
                {"name": "app", "image": "a:1", "env": [{"name": "A", "value": "1"}]},
                {"name": "side", "image": "s:1"},
            ]
        }
    }
    patch = {"spec": {"containers": [{"name": "app", "env": [{"name": "B", "value": "2"}]}]}}
    result = strategic_merge_patch(live, patch, POD_SCHEMA)
    app, side = result["spec"]["containers"]
    assert app["image"] == "a:1"
    assert app["env"] == [{"name": "B", "value": "2"}, {"name": "A", "value": "1"}]
    assert side == {"name": "side", "image": "s:1"}


def test_list_inside_merged_element_without_strategy_is_replaced() -> None:
    live = {"spec": {"containers": [{"name": "app", "args": ["--a", "--b"]}]}}
    patch = {"spec": {"containers": [{"name": "app", "args": ["--c"]}]}}
    result = strategic_merge_patch(live, patch, POD_SCHEMA)
    assert result["spec"]["containers"] == [{"name": "app", "args": ["--c"]}]


def test_list_map_merges_by_its_keys() -> None:
    live = {"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "Paused"}]}}
    patch = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    result = strategic_merge_patch(live, patch, LIST_MAP_SCHEMA)
    assert result["status"]["conditions"] == [
        {"type": "Ready", "status": "True"},
        {"type": "Paused"},
    ]


def test_list_map_with_two_keys_distinguishes_protocols() -> None:
    live = {"status": {"ports": [{"port": 53, "protocol": "TCP"}]}}
    patch = {"status": {"ports": [{"port": 53, "protocol": "UDP"}]}}
    result = strategic_merge_patch(live, patch, LIST_MAP_SCHEMA)
    assert len(result["status"]["ports"]) == 2


def test_set_element_order_orders_the_merged_list() -> None:
    live = svc({"port": 1}, {"port": 2}, {"port": 3})
    patch = {
        "spec": {
            "$setElementOrder/ports": [{"port": 3}, {"port": 1}, {"port": 2}],
            "ports": [{"port": 1, "name": "one"}],
        }
    }
    result = strategic_merge_patch(live, patch, SERVICE_SCHEMA)
    assert result == svc({"port": 3}, {"port": 1, "name": "one"}, {"port": 2})


def test_set_element_order_alone_reorders() -> None:
    live = {"metadata": {"finalizers": ["a", "b"]}}
    patch = {"metadata": {"$setElementOrder/finalizers": ["b", "a"]}}
    assert strategic_merge_patch(live, patch, None) == {"metadata": {"finalizers": ["b", "a"]}}


def test_retain_keys_drops_fields_not_listed() -> None:
    live = {"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}
    patch = {"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}
    result = strategic_merge_patch(live, patch, POD_SCHEMA)
    assert result == {"spec": {"strategy": {"type": "Recreate"}}}


def test_retain_keys_refuses_patch_fields_outside_the_list() -> None:
    patch = {"spec": {"strategy": {"$retainKeys": ["type"], "other": 1}}}
    with pytest.raises(PatchError, match="retainKeys"):
        strategic_merge_patch({"spec": {"strategy": {}}}, patch, POD_SCHEMA)


def test_retain_keys_inside_merged_list_element() -> None:
    live = {"spec": {"volumes": [{"name": "v", "emptyDir": {}}]}}
    patch = {
        "spec": {"volumes": [{"name": "v", "$retainKeys": ["name", "hostPath"], "hostPath": {}}]}
    }
    result = strategic_merge_patch(live, patch, POD_SCHEMA)
    assert result["spec"]["volumes"] == [{"name": "v", "hostPath": {}}]


def test_directives_never_leak_into_new_fields() -> None:
    patch = {"spec": {"ports": [{"port": 80, "$patch": "delete"}, {"port": 81}]}}
    result = strategic_merge_patch({}, patch, SERVICE_SCHEMA)
    assert result == svc({"port": 81})


def test_null_for_absent_field_is_ignored() -> None:
    assert strategic_merge_patch({"a": 1}, {"b": None}, None) == {"a": 1}


def test_type_change_replaces_value() -> None:
    assert strategic_merge_patch({"a": {"b": 1}}, {"a": "x"}, None) == {"a": "x"}


def test_strategic_merge_leaves_arguments_unchanged() -> None:
    live = svc({"port": 80}, {"port": 443})
    patch = svc({"port": 80, "$patch": "delete"})
    before = copy.deepcopy((live, patch))
    strategic_merge_patch(live, patch, SERVICE_SCHEMA)
    assert (live, patch) == before


def test_replace_strategy_map_is_replaced() -> None:
    schema = {
        "type": "object",
        "properties": {"spec": {"type": "object", "x-kubernetes-patch-strategy": "replace"}},
    }
    result = strategic_merge_patch({"spec": {"a": 1}}, {"spec": {"b": 2}}, schema)
    assert result == {"spec": {"b": 2}}


# --------------------------------------------------------------------------- server-side apply

NOW = datetime(2025, 1, 10, 12, 0, 0, tzinfo=UTC)


def vm(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm-a", "namespace": "default"},
        "spec": spec,
    }


def apply(live: Any, config: dict[str, Any], manager: str, *, force: bool = False) -> Any:
    return server_side_apply(
        live, config, manager=manager, force=force, schema=SERVICE_SCHEMA, now=NOW
    )


def managers(obj: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(e["manager"], e["operation"]): e["fieldsV1"] for e in obj["metadata"]["managedFields"]}


def test_apply_creates_and_records_ownership() -> None:
    result = apply(None, vm(running=True), "kubectl")
    assert result["spec"] == {"running": True}
    (entry,) = result["metadata"]["managedFields"]
    assert entry == {
        "manager": "kubectl",
        "operation": "Apply",
        "apiVersion": "kubevirt.io/v1",
        "time": "2025-01-10T12:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:running": {}}},
    }


def test_apply_by_other_manager_with_different_value_conflicts() -> None:
    live = apply(None, vm(running=True), "kubectl")
    with pytest.raises(ApplyConflict) as caught:
        apply(live, vm(running=False), "vmo-controller")
    assert caught.value.conflicts == (("kubectl", ".spec.running"),)
    assert str(caught.value) == (
        'Apply failed with 1 conflict: conflict with "kubectl" using kubevirt.io/v1: .spec.running'
    )


def test_apply_with_same_value_shares_ownership() -> None:
    live = apply(None, vm(running=True), "kubectl")
    result = apply(live, vm(running=True), "other")
    assert set(managers(result)) == {("kubectl", "Apply"), ("other", "Apply")}


def test_forced_apply_takes_ownership() -> None:
    live = apply(None, vm(running=True, runStrategy="x"), "kubectl")
    result = apply(live, vm(running=False), "vmo", force=True)
    assert result["spec"] == {"running": False, "runStrategy": "x"}
    assert managers(result)[("kubectl", "Apply")] == {"f:spec": {"f:runStrategy": {}}}


def test_field_dropped_from_config_is_removed_when_nobody_else_owns_it() -> None:
    live = apply(None, vm(running=True, runStrategy="x"), "kubectl")
    result = apply(live, vm(running=True), "kubectl")
    assert result["spec"] == {"running": True}


def test_field_dropped_from_config_stays_when_another_manager_owns_it() -> None:
    live = apply(None, vm(running=True, runStrategy="x"), "kubectl")
    live = apply(live, vm(runStrategy="x"), "other")
    result = apply(live, vm(running=True), "kubectl")
    assert result["spec"] == {"running": True, "runStrategy": "x"}


def test_apply_merges_keyed_lists_and_records_items() -> None:
    live = apply(None, svc({"port": 80, "name": "http"}), "a")
    result = apply(live, svc({"port": 443, "name": "https"}), "b")
    assert [p["port"] for p in result["spec"]["ports"]] == [80, 443]
    assert managers(result)[("b", "Apply")] == {
        "f:spec": {"f:ports": {'k:{"port":443}': {".": {}, "f:name": {}, "f:port": {}}}}
    }


def test_apply_removes_list_item_the_manager_dropped() -> None:
    live = apply(None, svc({"port": 80}, {"port": 443}), "a")
    result = apply(live, svc({"port": 443}), "a")
    assert result["spec"]["ports"] == [{"port": 443}]


def test_update_after_apply_takes_changed_fields_so_apply_conflicts() -> None:
    live = apply(None, vm(running=True), "kubectl")
    edited = copy.deepcopy(live)
    edited["spec"]["running"] = False
    updated = record_update(live, edited, manager="kubectl-edit", schema=None, now=NOW)
    assert managers(updated) == {("kubectl-edit", "Update"): {"f:spec": {"f:running": {}}}}
    with pytest.raises(ApplyConflict, match="kubectl-edit"):
        apply(updated, vm(running=True), "kubectl")


# --------------------------------------------------------------------------- upstream schemas

VM_CRD = SCHEMAS / "kubevirt-v1.9.0" / "virtualmachine.yaml"


def test_kubevirt_vm_schema_merges_list_maps_and_replaces_atomic_lists() -> None:
    schema = yaml.safe_load(VM_CRD.read_text())["openAPIV3Schema"]

    def template(**spec: Any) -> dict[str, Any]:
        return {"spec": {"template": {"spec": spec}}}

    live = template(
        resourceClaims=[{"name": "gpu", "resourceClaimName": "c1"}],
        volumes=[{"name": "root", "containerDisk": {"image": "a"}}],
    )
    patch = template(
        resourceClaims=[{"name": "nic", "resourceClaimName": "c2"}],
        volumes=[{"name": "data", "emptyDisk": {"capacity": "1Gi"}}],
    )
    result = strategic_merge_patch(live, patch, schema)["spec"]["template"]["spec"]
    assert [c["name"] for c in result["resourceClaims"]] == ["nic", "gpu"]
    assert result["volumes"] == [{"name": "data", "emptyDisk": {"capacity": "1Gi"}}]
