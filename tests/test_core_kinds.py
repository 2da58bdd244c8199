"""The built-in kinds: their coordinates are upstream's, and their typical objects validate."""

from __future__ import annotations

import copy

import pytest

from vmo.api import schema
from vmo.api.core import core_resource_types
from vmo.api.types import JSON, Cause, ResourceType

TYPES = {(rt.group, rt.kind): rt for rt in core_resource_types()}
RBAC = "rbac.authorization.k8s.io"
AUTHZ = "authorization.k8s.io"

EXAMPLES: dict[tuple[str, str], JSON] = {
    ("", "Namespace"): {
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    },
    ("", "Node"): {
        "spec": {"unschedulable": True, "taints": [{"key": "k", "effect": "NoSchedule"}]},
        "status": {
            "capacity": {"cpu": "8", "memory": "16Gi", "pods": 110},
            "allocatable": {"cpu": "7500m", "memory": "15Gi"},
            "conditions": [
                {"type": "Ready", "status": "True", "lastHeartbeatTime": "2024-01-01T00:00:00Z"}
            ],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.2"}],
            "nodeInfo": {"kubeletVersion": "vmo-0.1.0", "architecture": "amd64"},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        },
    },
    ("", "Service"): {
        "spec": {
            "type": "NodePort",
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
            ],
            "clusterIP": "10.96.0.10",
        },
        "status": {"loadBalancer": {}},
    },
    ("", "Endpoints"): {
        "subsets": [
            {
                "addresses": [{"ip": "10.0.0.5", "targetRef": {"kind": "Pod", "name": "p"}}],
                "ports": [{"port": 80}],
            }
        ]
    },
    ("", "ConfigMap"): {"data": {"a": "b"}, "binaryData": {"bin": "AAEC"}, "immutable": False},
    ("", "Secret"): {"type": "Opaque", "data": {"password": "aHVudGVyMg=="}, "stringData": {}},
    ("", "ServiceAccount"): {
        "secrets": [{"name": "token"}],
        "imagePullSecrets": [{"name": "pull"}],
        "automountServiceAccountToken": False,
    },
    ("", "Event"): {
        "involvedObject": {"kind": "VirtualMachine", "namespace": "d", "name": "vm", "uid": "u"},
        "reason": "Started",
        "message": "VM started",
        "type": "Normal",
        "count": 2,
        "source": {"component": "vmo-controller"},
        "firstTimestamp": "2024-01-01T00:00:00Z",
        "lastTimestamp": "2024-01-01T00:01:00Z",
        "eventTime": None,
        "reportingComponent": "vmo",
    },
    (RBAC, "Role"): {
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]
    },
    (RBAC, "ClusterRole"): {
        "rules": [{"nonResourceURLs": ["/healthz"], "verbs": ["get"]}],
        "aggregationRule": {
            "clusterRoleSelectors": [{"matchLabels": {"rbac.vmo.dev/aggregate-to-view": "true"}}]
        },
    },
    (RBAC, "RoleBinding"): {
        "subjects": [{"kind": "User", "name": "alice", "apiGroup": RBAC}],
        "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": "reader"},
    },
    (RBAC, "ClusterRoleBinding"): {
        "subjects": [{"kind": "ServiceAccount", "name": "ctl", "namespace": "vmo-system"}],
        "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": "admin"},
    },
    (AUTHZ, "SubjectAccessReview"): {
        "spec": {
            "user": "alice",
            "groups": ["team"],
            "resourceAttributes": {"verb": "get", "resource": "pods", "namespace": "d"},
        }
    },
    (AUTHZ, "LocalSubjectAccessReview"): {
        "spec": {"user": "alice", "resourceAttributes": {"verb": "get", "resource": "pods"}}
    },
    (AUTHZ, "SelfSubjectAccessReview"): {
        "spec": {"nonResourceAttributes": {"path": "/healthz", "verb": "get"}},
        "status": {"allowed": True},
    },
    (AUTHZ, "SelfSubjectRulesReview"): {"spec": {"namespace": "d"}},
    ("authentication.k8s.io", "TokenReview"): {"spec": {"token": "abc"}},
    ("authentication.k8s.io", "SelfSubjectReview"): {},
    ("coordination.k8s.io", "Lease"): {
        "spec": {
            "holderIdentity": "agent-1",
            "leaseDurationSeconds": 40,
            "renewTime": "2024-01-01T00:00:00.123456Z",
        }
    },
    ("apiextensions.k8s.io", "CustomResourceDefinition"): {
        "spec": {
            "group": "vmo.dev",
            "scope": "Namespaced",
            "names": {"plural": "accesspolicies", "kind": "AccessPolicy"},
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object"}},
                    "subresources": {"status": {}},
                }
            ],
        },
        "status": {"storedVersions": ["v1alpha1"], "acceptedNames": {"plural": "x", "kind": "X"}},
    },
}


def example(group: str, kind: str) -> JSON:
    rt = TYPES[(group, kind)]
    return {
        "apiVersion": rt.api_version,
        "kind": kind,
        "metadata": {"name": "example"},
        **copy.deepcopy(EXAMPLES[(group, kind)]),
    }


def admitted(rt: ResourceType, obj: JSON) -> list[Cause]:
    """What the server does: defaults, then schema validation, then the kind's own checks."""
    assert rt.schema is not None
    schema.apply_defaults(rt.schema, obj)
    causes = schema.validate(rt.schema, obj)
    if not causes and rt.validate is not None:
        causes = rt.validate(obj, None)
    return causes


def test_every_kind_has_an_example() -> None:
    assert set(EXAMPLES) == set(TYPES)


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=lambda k: k[1])
def test_example_validates(key: tuple[str, str]) -> None:
    obj = example(*key)
    if key[1] == "CustomResourceDefinition":
        obj["metadata"]["name"] = "accesspolicies.vmo.dev"
    assert admitted(TYPES[key], obj) == []


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=lambda k: k[1])
def test_unknown_top_level_field_is_refused(key: tuple[str, str]) -> None:
    obj = example(*key)
    obj["bogus"] = 1
    assert schema.validate(TYPES[key].schema or {}, obj) == [
        Cause("bogus", 'unknown field "bogus"', "FieldValueUnknown")
    ]


@pytest.mark.parametrize(
    ("kind", "plural", "short", "namespaced"),
    [
        ("Namespace", "namespaces", ("ns",), False),
        ("Node", "nodes", ("no",), False),
        ("Service", "services", ("svc",), True),
        ("Endpoints", "endpoints", ("ep",), True),
        ("ConfigMap", "configmaps", ("cm",), True),
        ("Secret", "secrets", (), True),
        ("ServiceAccount", "serviceaccounts", ("sa",), True),
        ("Event", "events", ("ev",), True),
    ],
)
def test_core_group_coordinates(
    kind: str, plural: str, short: tuple[str, ...], namespaced: bool
) -> None:
    rt = TYPES[("", kind)]
    assert (rt.plural, rt.short_names, rt.namespaced, rt.api_version) == (
        plural,
        short,
        namespaced,
        "v1",
    )


def test_crd_coordinates() -> None:
    rt = TYPES[("apiextensions.k8s.io", "CustomResourceDefinition")]
    assert rt.short_names == ("crd", "crds")
    assert not rt.namespaced
    assert rt.subresources == ("status",)


def test_review_kinds_are_create_only() -> None:
    for kind in ("SubjectAccessReview", "SelfSubjectAccessReview", "SelfSubjectRulesReview"):
        assert TYPES[(AUTHZ, kind)].verbs == ("create",)
    assert TYPES[(AUTHZ, "LocalSubjectAccessReview")].namespaced


def test_service_defaults_type_protocol_and_affinity() -> None:
    obj = example("", "Service")
    admitted(TYPES[("", "Service")], obj)
    del obj["spec"]["type"]
    admitted(TYPES[("", "Service")], obj)
    assert obj["spec"]["type"] == "ClusterIP"
    assert obj["spec"]["sessionAffinity"] == "None"
    assert [p["protocol"] for p in obj["spec"]["ports"]] == ["TCP", "UDP"]


def test_service_ports_merge_by_port_and_are_unique_by_port_and_protocol() -> None:
    rt = TYPES[("", "Service")]
    assert rt.schema is not None
    ports = rt.schema["properties"]["spec"]["properties"]["ports"]
    assert ports["x-kubernetes-patch-merge-key"] == "port"
    assert ports["x-kubernetes-list-map-keys"] == ["port", "protocol"]
    obj = example("", "Service")
    obj["spec"]["ports"].append({"name": "again", "port": 80})
    causes = admitted(rt, obj)
    assert [(c.field, c.reason) for c in causes] == [("spec.ports[2]", "FieldValueDuplicate")]


def test_load_balancer_service_is_refused() -> None:
    obj = example("", "Service")
    obj["spec"]["type"] = "LoadBalancer"
    cause = admitted(TYPES[("", "Service")], obj)[0]
    assert (cause.field, cause.reason) == ("spec.type", "FieldValueNotSupported")


def test_service_external_ips_are_not_supported() -> None:
    obj = example("", "Service")
    obj["spec"]["externalIPs"] = ["1.2.3.4"]
    cause = admitted(TYPES[("", "Service")], obj)[0]
    assert cause.reason == "FieldValueForbidden"
    assert "not supported by VMO's embedded engine" in cause.message


def test_secret_data_must_be_base64() -> None:
    obj = example("", "Secret")
    obj["data"]["password"] = "hunter2!"
    cause = admitted(TYPES[("", "Secret")], obj)[0]
    assert cause.field == "data[password]"


def test_secret_type_defaults_to_opaque() -> None:
    obj = example("", "Secret")
    del obj["type"]
    admitted(TYPES[("", "Secret")], obj)
    assert obj["type"] == "Opaque"


def test_namespace_phase_is_active_or_terminating() -> None:
    obj = example("", "Namespace")
    obj["status"]["phase"] = "Gone"
    assert admitted(TYPES[("", "Namespace")], obj)[0].reason == "FieldValueNotSupported"


def test_node_quantities_are_checked() -> None:
    obj = example("", "Node")
    obj["status"]["capacity"]["memory"] = "16 gigs"
    assert admitted(TYPES[("", "Node")], obj)[0].field == "status.capacity[memory]"


def test_role_binding_needs_a_role_ref() -> None:
    obj = example(RBAC, "RoleBinding")
    del obj["roleRef"]
    assert admitted(TYPES[(RBAC, "RoleBinding")], obj) == [
        Cause("roleRef", "Required value", "FieldValueRequired")
    ]


def test_policy_rule_needs_verbs() -> None:
    obj = example(RBAC, "Role")
    del obj["rules"][0]["verbs"]
    assert admitted(TYPES[(RBAC, "Role")], obj)[0].field == "rules[0].verbs"


def test_event_field_selectors_follow_upstream() -> None:
    selectors = TYPES[("", "Event")].field_selectors
    assert selectors["involvedObject.name"] == ".involvedObject.name"
    assert selectors["source"] == ".source.component"
    assert {"reason", "type", "involvedObject.kind", "involvedObject.uid"} <= set(selectors)


def test_other_field_selectors() -> None:
    assert TYPES[("", "Secret")].field_selectors == {"type": ".type"}
    assert TYPES[("", "Namespace")].field_selectors == {"status.phase": ".status.phase"}
    assert TYPES[("", "Node")].field_selectors == {"spec.unschedulable": ".spec.unschedulable"}


def test_kinds_with_columns_end_with_age_or_created_at() -> None:
    with_columns = [rt for rt in TYPES.values() if rt.printer_columns and rt.kind != "Event"]
    assert {"Namespace", "Node", "Service"} <= {rt.kind for rt in with_columns}
    for rt in with_columns:
        assert rt.printer_columns[-1].name in ("Age", "Created At"), rt.kind


def test_every_schema_node_has_a_description_at_the_top() -> None:
    for rt in TYPES.values():
        assert rt.schema is not None and rt.schema.get("description"), rt.kind
