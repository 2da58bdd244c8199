"""Kubernetes protobuf wire encoding: golden bytes, round trips, errors, real kubectl traffic."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from tests.kubectl_capture import KubectlCapture
from vmo.apiserver.protobuf import PROTOBUF_CONTENT_TYPE, ProtobufError, decode, encode, supports

# Bodies captured from kubectl v1.32 (`kubectl create namespace demo`;
# `kubectl create secret generic s --from-literal=a=b --from-file=bin=<b"x\0\xff">`).
KUBECTL_NAMESPACE = bytes.fromhex(
    "6b3873000a0f0a02763112094e616d657370616365121c0a140a0464656d6f12001a0022002a00320038"
    "00420012001a020a001a002200"
)
KUBECTL_SECRET = bytes.fromhex(
    "6b3873000a0c0a0276311206536563726574122f0a110a017312001a0022002a0032003800420012060a01"
    "61120162120a0a0362696e12037800ff1a064f70617175651a002200"
)
# `kubectl auth can-i create pods -n x`
KUBECTL_ACCESS_REVIEW = bytes.fromhex(
    "6b3873000a320a17617574686f72697a6174696f6e2e6b38732e696f2f7631121753656c665375626a6563"
    "7441636365737352657669657712390a100a0012001a0022002a00320038004200121b0a190a0178120663"
    "72656174651a0022002a04706f647332003a001a08080012001a0020001a002200"
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _envelope(api_version: str, kind: str, raw: bytes) -> bytes:
    type_meta = _field(1, api_version.encode()) + _field(2, kind.encode())
    return b"k8s\x00" + _field(1, type_meta) + _field(2, raw) + _field(3, b"") + _field(4, b"")


# --- golden bytes from kubectl ------------------------------------------------------------


def test_decodes_kubectl_namespace_body() -> None:
    assert decode(KUBECTL_NAMESPACE) == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "demo"},
        "spec": {},
        "status": {},
    }


def test_encodes_namespace_exactly_as_kubectl_does() -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}
    assert encode(namespace) == KUBECTL_NAMESPACE


def test_secret_data_decodes_to_base64_like_json() -> None:
    secret = decode(KUBECTL_SECRET)
    assert secret["data"] == {
        "a": base64.b64encode(b"b").decode(),
        "bin": base64.b64encode(b"x\x00\xff").decode(),
    }
    assert secret["type"] == "Opaque"


def test_secret_round_trips_byte_for_byte() -> None:
    assert encode(decode(KUBECTL_SECRET)) == KUBECTL_SECRET


def test_access_review_shows_allowed_false_like_json() -> None:
    review = decode(KUBECTL_ACCESS_REVIEW)
    assert review == {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "metadata": {},
        "spec": {"resourceAttributes": {"namespace": "x", "verb": "create", "resource": "pods"}},
        "status": {"allowed": False},
    }
    assert encode(review) == KUBECTL_ACCESS_REVIEW


def test_time_is_written_as_seconds_and_nanos() -> None:
    seconds = 1714979289  # 2024-05-06T07:08:09Z
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"creationTimestamp": "2024-05-06T07:08:09Z"},
    }
    timestamp = b"\x08" + _varint(seconds) + b"\x10\x00"
    assert _field(8, timestamp) in encode(namespace)


# --- round trips of kinds kubectl does not send -------------------------------------------


def _round_trip(obj: dict[str, Any]) -> dict[str, Any]:
    body = encode(obj)
    assert body.startswith(b"k8s\x00")
    decoded = decode(body)
    assert encode(decoded) == body, "encoding is not canonical"
    return decoded


def test_status_with_details_and_causes_round_trips() -> None:
    status = {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": 'VirtualMachine "vm1" is invalid',
        "reason": "Invalid",
        "details": {
            "name": "vm1",
            "group": "kubevirt.io",
            "kind": "VirtualMachine",
            "causes": [
                {"reason": "FieldValueRequired", "message": "Required", "field": "spec.template"}
            ],
        },
        "code": 422,
    }
    assert _round_trip(status) == status


def test_meta_group_status_is_supported_too() -> None:
    status = {"apiVersion": "meta.k8s.io/v1", "kind": "Status", "metadata": {}, "code": 404}
    assert _round_trip(status) == status


def test_metadata_times_render_as_rfc3339() -> None:
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": "demo",
            "uid": "5f0c",
            "resourceVersion": "42",
            "generation": 3,
            "creationTimestamp": "2024-05-06T07:08:09Z",
            "deletionTimestamp": "2024-05-07T00:00:00Z",
            "deletionGracePeriodSeconds": 0,
            "labels": {"b": "2", "a": "1"},
            "annotations": {"note": ""},
            "finalizers": ["kubernetes"],
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u1", "controller": True}
            ],
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Terminating"},
    }
    assert _round_trip(namespace) == namespace


def test_time_offsets_are_normalised_to_utc() -> None:
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "n", "creationTimestamp": "2024-05-06T09:08:09+02:00"},
    }
    assert decode(encode(namespace))["metadata"]["creationTimestamp"] == "2024-05-06T07:08:09Z"


def test_managed_fields_keep_their_fields_v1_document() -> None:
    entry = {
        "manager": "kubectl-create",
        "operation": "Update",
        "apiVersion": "v1",
        "time": "2024-05-06T07:08:09Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:data": {".": {}, "f:a": {}}},
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s", "managedFields": [entry]},
        "immutable": False,
        "type": "Opaque",
    }
    assert _round_trip(secret) == secret


def test_configmap_binary_data_and_service_account_round_trip() -> None:
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", "namespace": "ns"},
        "immutable": True,
        "data": {"k": "v"},
        "binaryData": {"blob": "AAEC"},
    }
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "robot", "namespace": "ns"},
        "secrets": [{"name": "robot-token"}],
        "imagePullSecrets": [{"name": "pull"}],
        "automountServiceAccountToken": False,
    }
    assert _round_trip(config_map) == config_map
    assert _round_trip(account) == account


def test_service_with_named_target_port_and_status_round_trips() -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"}],
            "selector": {"app": "web"},
            "clusterIP": "10.0.0.10",
            "clusterIPs": ["10.0.0.10"],
            "type": "LoadBalancer",
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {
            "loadBalancer": {"ingress": [{"ip": "192.0.2.1", "ipMode": "VIP"}]},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "lastTransitionTime": "2024-01-01T00:00:00Z",
                    "reason": "Ok",
                    "message": "",
                }
            ],
        },
    }
    assert _round_trip(service) == service


def test_cluster_role_with_rules_and_aggregation_rule_round_trips() -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "vm-viewer"},
        "rules": [
            {"verbs": ["get", "list"], "apiGroups": ["kubevirt.io"], "resources": ["vms"]},
            {"verbs": ["get"], "nonResourceURLs": ["/healthz"]},
        ],
        "aggregationRule": {
            "clusterRoleSelectors": [
                {
                    "matchLabels": {"rbac.vmo.dev/aggregate": "true"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}],
                }
            ]
        },
    }
    assert _round_trip(role) == role


def test_subject_access_review_with_extra_round_trips() -> None:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "metadata": {},
        "spec": {
            "resourceAttributes": {
                "namespace": "ns",
                "verb": "list",
                "resource": "pods",
                "labelSelector": {"rawSelector": "app=web"},
            },
            "user": "alice",
            "groups": ["devs"],
            "extra": {"scopes": ["a", "b"]},
            "uid": "1",
        },
        "status": {"allowed": True, "reason": "RBAC"},
    }
    assert _round_trip(review) == review


def test_rules_review_status_round_trips() -> None:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "metadata": {},
        "spec": {"namespace": "ns"},
        "status": {
            "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
            "nonResourceRules": [{"verbs": ["get"], "nonResourceURLs": ["/api"]}],
            "incomplete": False,
        },
    }
    assert _round_trip(review) == review


def test_token_request_status_round_trips() -> None:
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "metadata": {"name": "robot", "namespace": "default"},
        "spec": {"audiences": ["vmo"], "expirationSeconds": 3600},
        "status": {"token": "abc", "expirationTimestamp": "2030-01-01T00:00:00Z"},
    }
    assert _round_trip(request) == request


def test_load_balancer_ingress_ip_mode_is_field_3() -> None:
    """k8s.io/api core/v1 numbers ipMode 3 (the table once said 5, which Go would drop)."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1", "ipMode": "VIP"}]}},
    }
    ingress = _field(1, b"192.0.2.1") + _field(2, b"") + _field(3, b"VIP")
    assert _field(1, ingress) in encode(service)


def test_local_subject_access_review_round_trips() -> None:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "LocalSubjectAccessReview",
        "metadata": {"namespace": "ns"},
        "spec": {
            "resourceAttributes": {"namespace": "ns", "verb": "get", "resource": "pods"},
            "user": "alice",
        },
        "status": {"allowed": False},
    }
    assert _round_trip(review) == review


def test_token_review_with_user_round_trips() -> None:
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {},
        "spec": {"token": "abc", "audiences": ["vmo"]},
        "status": {
            "authenticated": True,
            "user": {
                "username": "system:serviceaccount:ns:robot",
                "uid": "u-1",
                "groups": ["system:serviceaccounts"],
                "extra": {"authentication.kubernetes.io/credential-id": ["JTI=1"]},
            },
            "audiences": ["vmo"],
        },
    }
    assert _round_trip(review) == review


def test_self_subject_review_fields_follow_upstream_numbers() -> None:
    """authentication/v1: SelfSubjectReview{metadata 1, status 2}, status{userInfo 1},
    UserInfo{username 1, uid 2, groups 3, extra 4}."""
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "SelfSubjectReview",
        "metadata": {},
        "status": {"userInfo": {"username": "alice", "uid": "7", "groups": ["devs"]}},
    }
    user = _field(1, b"alice") + _field(2, b"7") + _field(3, b"devs")
    assert _field(2, _field(1, user)) in encode(review)
    assert _round_trip(review) == review


def test_map_entries_are_written_in_key_order() -> None:
    def labelled(labels: dict[str, str]) -> bytes:
        return encode({"apiVersion": "v1", "kind": "Namespace", "metadata": {"labels": labels}})

    assert labelled({"b": "2", "a": "1"}) == labelled({"a": "1", "b": "2"})


def test_unknown_fields_in_a_body_are_ignored() -> None:
    raw = _field(1, _field(1, b"demo")) + _field(99, b"from a newer kubectl")
    assert decode(_envelope("v1", "Namespace", raw))["metadata"] == {"name": "demo"}


def test_supports_lists_the_built_in_kinds_only() -> None:
    assert supports("v1", "Secret")
    assert supports("rbac.authorization.k8s.io/v1", "ClusterRoleBinding")
    assert not supports("kubevirt.io/v1", "VirtualMachine")
    assert not supports("v1", "Pod")


# --- errors -------------------------------------------------------------------------------


def test_body_without_magic_is_rejected() -> None:
    with pytest.raises(ProtobufError, match="magic"):
        decode(b'{"kind": "Namespace"}')


@pytest.mark.parametrize("cut", [5, 20, len(KUBECTL_SECRET) - 10])
def test_truncated_body_is_rejected(cut: int) -> None:
    with pytest.raises(ProtobufError, match="truncated"):
        decode(KUBECTL_SECRET[:cut])


def test_unsupported_kind_is_named_when_decoding() -> None:
    with pytest.raises(ProtobufError, match=r"kubevirt\.io/v1.*VirtualMachine"):
        decode(_envelope("kubevirt.io/v1", "VirtualMachine", b""))


def test_unsupported_kind_is_named_when_encoding() -> None:
    with pytest.raises(ProtobufError, match=r"'v1'.*'Pod'"):
        encode({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})


def test_encoding_a_wrongly_typed_value_names_the_field() -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"labels": {"a": 1}}}
    with pytest.raises(ProtobufError, match=r"metadata\.labels\['a'\]: expected a string"):
        encode(namespace)


def test_secret_data_must_be_base64() -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {}, "data": {"a": "not base64!"}}
    with pytest.raises(ProtobufError, match="base64"):
        encode(secret)


def test_compressed_envelope_is_rejected() -> None:
    type_meta = _field(1, b"v1") + _field(2, b"Namespace")
    body = b"k8s\x00" + _field(1, type_meta) + _field(2, b"") + _field(3, b"gzip")
    with pytest.raises(ProtobufError, match="contentEncoding"):
        decode(body)


# --- real kubectl -------------------------------------------------------------------------

KUBECTL_ACCEPT = "application/vnd.kubernetes.protobuf,application/json"


@pytest.mark.parametrize("answer_protobuf", [False, True], ids=["json-answer", "protobuf-answer"])
def test_kubectl_create_namespace(tmp_path: Path, answer_protobuf: bool) -> None:
    with KubectlCapture(tmp_path, answer_protobuf=answer_protobuf) as capture:
        result = capture.kubectl("create", "namespace", "demo")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "namespace/demo created"
    post = capture.last_post()
    assert post.content_type == PROTOBUF_CONTENT_TYPE
    assert post.accept == KUBECTL_ACCEPT
    assert decode(post.body)["metadata"] == {"name": "demo"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["create", "secret", "generic", "s", "--from-literal=a=b"],
            {"kind": "Secret", "metadata": {"name": "s"}, "data": {"a": "Yg=="}},
        ),
        (
            ["create", "configmap", "c", "-n", "other", "--from-literal=k=v"],
            {
                "kind": "ConfigMap",
                "metadata": {"name": "c", "namespace": "other"},
                "data": {"k": "v"},
            },
        ),
        (
            ["create", "serviceaccount", "robot"],
            {"kind": "ServiceAccount", "metadata": {"name": "robot"}},
        ),
        (
            ["create", "role", "r", "--verb=get,list", "--resource=pods,deployments.apps"],
            {
                "kind": "Role",
                "rules": [
                    {"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods"]},
                    {"verbs": ["get", "list"], "apiGroups": ["apps"], "resources": ["deployments"]},
                ],
            },
        ),
        (
            ["create", "clusterrole", "agg", "--aggregation-rule=rbac.vmo.dev/agg=true"],
            {
                "kind": "ClusterRole",
                "aggregationRule": {
                    "clusterRoleSelectors": [{"matchLabels": {"rbac.vmo.dev/agg": "true"}}]
                },
            },
        ),
        (
            ["create", "rolebinding", "rb", "--role=r", "--serviceaccount=default:robot"],
            {
                "kind": "RoleBinding",
                "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": "default"}],
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
            },
        ),
        (
            ["create", "clusterrolebinding", "crb", "--clusterrole=agg", "--group=devs"],
            {
                "kind": "ClusterRoleBinding",
                "subjects": [
                    {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "devs"}
                ],
            },
        ),
        (
            ["create", "service", "clusterip", "web", "--tcp=80:8080"],
            {
                "kind": "Service",
                "spec": {
                    "ports": [
                        {"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080}
                    ],
                    "selector": {"app": "web"},
                    "type": "ClusterIP",
                },
            },
        ),
    ],
    ids=lambda value: value[1] if isinstance(value, list) else None,
)
def test_kubectl_create_generators_are_decoded(
    tmp_path: Path, args: list[str], expected: dict[str, Any]
) -> None:
    with KubectlCapture(tmp_path, answer_protobuf=True) as capture:
        result = capture.kubectl(*args)
    assert result.returncode == 0, result.stderr
    body = capture.last_post().body
    decoded = decode(body)
    assert {key: decoded.get(key) for key in expected} == expected
    assert encode(decoded) == body


def _allow(review: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 201, review | {"status": {"allowed": True}}


def test_kubectl_auth_can_i_sends_a_self_subject_access_review(tmp_path: Path) -> None:
    with KubectlCapture(tmp_path, responder=_allow, answer_protobuf=True) as capture:
        result = capture.kubectl("auth", "can-i", "create", "pods", "-n", "x")
    assert result.stdout.strip() == "yes", result.stderr
    post = capture.last_post()
    assert post.path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
    assert post.accept == KUBECTL_ACCEPT
    assert decode(post.body)["spec"] == {
        "resourceAttributes": {"namespace": "x", "verb": "create", "resource": "pods"}
    }


def _rules(review: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    rules = [{"verbs": ["get", "list"], "apiGroups": ["kubevirt.io"], "resources": ["vms"]}]
    return 201, review | {"status": {"resourceRules": rules, "incomplete": False}}


def test_kubectl_auth_can_i_list_reads_a_protobuf_rules_review(tmp_path: Path) -> None:
    with KubectlCapture(tmp_path, responder=_rules, answer_protobuf=True) as capture:
        result = capture.kubectl("auth", "can-i", "--list", "-n", "y")
    assert result.returncode == 0, result.stderr
    assert "vms.kubevirt.io" in result.stdout
    assert decode(capture.last_post().body)["spec"] == {"namespace": "y"}


def _token(request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status = {"token": "tok-123", "expirationTimestamp": "2030-01-01T00:00:00Z"}
    return 201, request | {"status": status}


def test_kubectl_create_token_reads_a_protobuf_token_request(tmp_path: Path) -> None:
    with KubectlCapture(tmp_path, responder=_token, answer_protobuf=True) as capture:
        result = capture.kubectl("create", "token", "robot", "--audience=vmo", "--duration=10m")
    assert result.stdout.strip() == "tok-123", result.stderr
    post = capture.last_post()
    assert post.path == "/api/v1/namespaces/default/serviceaccounts/robot/token"
    assert decode(post.body)["spec"] == {"audiences": ["vmo"], "expirationSeconds": 600}


def _whoami(review: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    user = {"username": "alice", "uid": "u-7", "groups": ["devs", "system:authenticated"]}
    return 201, review | {"status": {"userInfo": user}}


def test_kubectl_auth_whoami_reads_a_protobuf_self_subject_review(tmp_path: Path) -> None:
    """kubectl's own Go decoder reads VMO's bytes: the field numbers are the ones it knows."""
    with KubectlCapture(tmp_path, responder=_whoami, answer_protobuf=True) as capture:
        result = capture.kubectl("auth", "whoami")
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 1) for line in result.stdout.splitlines()]
    assert rows == [
        ["ATTRIBUTE", "VALUE"],
        ["Username", "alice"],
        ["UID", "u-7"],
        ["Groups", "[devs system:authenticated]"],
    ]
    post = capture.last_post()
    assert post.path == "/apis/authentication.k8s.io/v1/selfsubjectreviews"
    assert post.content_type == PROTOBUF_CONTENT_TYPE
    assert decode(post.body) == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "SelfSubjectReview",
        "metadata": {},
        "status": {"userInfo": {}},
    }


def _forbid(obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 403, {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": "namespaces is forbidden: VMO says no",
        "reason": "Forbidden",
        "details": {"kind": "namespaces"},
        "code": 403,
    }


def test_kubectl_reads_a_protobuf_error_status(tmp_path: Path) -> None:
    with KubectlCapture(tmp_path, responder=_forbid, answer_protobuf=True) as capture:
        result = capture.kubectl("create", "namespace", "demo")
    assert result.returncode != 0
    assert "Error from server (Forbidden): namespaces is forbidden: VMO says no" in result.stderr
