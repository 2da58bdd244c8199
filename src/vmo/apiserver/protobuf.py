"""Kubernetes protobuf wire encoding for the built-in kinds kubectl sends and reads as protobuf.

kubectl's generators (`create namespace`, `create secret`, `create rolebinding`, `auth can-i`,
`auth whoami`, `create token` ...; tests/test_kubectl_protobuf.py lists them all) POST
`application/vnd.kubernetes.protobuf` bodies: the magic `k8s\\0` and a `runtime.Unknown` envelope
whose `raw` holds the kind's own message. `decode` turns such a body into the dict the JSON API
would carry; `encode` is its inverse, so answers can be protobuf too.

The codec is hand-rolled and driven by `_MESSAGES`, a table of upstream field numbers (k8s.io/api
and apimachinery `generated.proto`). Encoding reproduces Go's generated marshalers byte for byte:
fields in number order, non-pointer Go fields always written (zero values included), pointer
fields only when set, map entries sorted by key. Decoding follows Go's JSON output except that
values Go would print as `null` (zero times, empty lists and maps) are left out.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "PROTOBUF_CONTENT_TYPE",
    "ProtobufError",
    "decode",
    "encode",
    "supports",
]

PROTOBUF_CONTENT_TYPE: Final = "application/vnd.kubernetes.protobuf"
_MAGIC: Final = b"k8s\x00"
_UINT64: Final = 1 << 64
# Go's zero time.Time (0001-01-01T00:00:00Z) as Unix seconds; metav1.Time encodes it as empty.
_ZERO_TIME_SECONDS: Final = -62135596800

_VARINT: Final = 0
_FIXED64: Final = 1
_LENGTH: Final = 2
_FIXED32: Final = 5

JSONObject = dict[str, Any]
_WireValue = int | bytes


class ProtobufError(ValueError):
    """A body or object that cannot be converted: bad magic, truncation, unknown kind, bad value."""


class Shape(enum.Enum):
    """How one field's value looks on the wire and in JSON."""

    STRING = "string"
    BYTES = "bytes"  # base64 text in JSON
    BOOL = "bool"
    INT32 = "int32"
    INT64 = "int64"
    MESSAGE = "message"
    TIME = "time"  # metav1.Time: Timestamp{seconds, nanos}; RFC 3339 in JSON
    INT_OR_STRING = "intOrString"  # intstr.IntOrString{type, intVal, strVal}
    FIELDS_V1 = "fieldsV1"  # metav1.FieldsV1{Raw}: a JSON document inline in JSON
    EXTRA_VALUE = "extraValue"  # ExtraValue{items}: a plain list of strings in JSON


class Card(enum.Enum):
    """Cardinality of a field."""

    SINGLE = "single"
    LIST = "list"
    MAP = "map"  # map<string, shape>: repeated entry messages {key = 1, value = 2}


@dataclass(frozen=True)
class Field:
    """One message field: wire number, JSON name, shape, and Go's emission rules."""

    number: int
    name: str
    shape: Shape
    card: Card = Card.SINGLE
    message: str = ""
    # A Go pointer field: written and shown only when set.
    pointer: bool = False
    # A Go field without `omitempty`: its zero value is still shown in JSON.
    keep_zero: bool = False


def _str(number: int, name: str, *, pointer: bool = False, keep: bool = False) -> Field:
    return Field(number, name, Shape.STRING, pointer=pointer, keep_zero=keep)


def _strs(number: int, name: str) -> Field:
    return Field(number, name, Shape.STRING, Card.LIST)


def _bool(number: int, name: str, *, pointer: bool = False, keep: bool = False) -> Field:
    return Field(number, name, Shape.BOOL, pointer=pointer, keep_zero=keep)


def _i32(number: int, name: str, *, pointer: bool = False, keep: bool = False) -> Field:
    return Field(number, name, Shape.INT32, pointer=pointer, keep_zero=keep)


def _i64(number: int, name: str, *, pointer: bool = False) -> Field:
    return Field(number, name, Shape.INT64, pointer=pointer)


def _time(number: int, name: str, *, pointer: bool = False) -> Field:
    return Field(number, name, Shape.TIME, pointer=pointer)


def _msg(number: int, name: str, message: str, *, pointer: bool = False) -> Field:
    return Field(number, name, Shape.MESSAGE, message=message, pointer=pointer)


def _msgs(number: int, name: str, message: str) -> Field:
    return Field(number, name, Shape.MESSAGE, Card.LIST, message=message)


def _map(number: int, name: str, value: Shape = Shape.STRING) -> Field:
    return Field(number, name, value, Card.MAP)


def _meta(number: int = 1) -> Field:
    return _msg(number, "metadata", "ObjectMeta")


# Fields are listed in Go struct order (the JSON key order); encoding sorts them by number.
_MESSAGES: Final[dict[str, tuple[Field, ...]]] = {
    # k8s.io/apimachinery/pkg/apis/meta/v1
    "ObjectMeta": (
        _str(1, "name"),
        _str(2, "generateName"),
        _str(3, "namespace"),
        _str(4, "selfLink"),
        _str(5, "uid"),
        _str(6, "resourceVersion"),
        _i64(7, "generation"),
        _time(8, "creationTimestamp"),
        _time(9, "deletionTimestamp", pointer=True),
        _i64(10, "deletionGracePeriodSeconds", pointer=True),
        _map(11, "labels"),
        _map(12, "annotations"),
        _msgs(13, "ownerReferences", "OwnerReference"),
        _strs(14, "finalizers"),
        _msgs(17, "managedFields", "ManagedFieldsEntry"),
    ),
    "OwnerReference": (
        _str(5, "apiVersion", keep=True),
        _str(1, "kind", keep=True),
        _str(3, "name", keep=True),
        _str(4, "uid", keep=True),
        _bool(6, "controller", pointer=True),
        _bool(7, "blockOwnerDeletion", pointer=True),
    ),
    "ManagedFieldsEntry": (
        _str(1, "manager"),
        _str(2, "operation"),
        _str(3, "apiVersion"),
        _time(4, "time", pointer=True),
        _str(6, "fieldsType"),
        Field(7, "fieldsV1", Shape.FIELDS_V1, pointer=True),
        _str(8, "subresource"),
    ),
    "ListMeta": (
        _str(1, "selfLink"),
        _str(2, "resourceVersion"),
        _str(3, "continue"),
        _i64(4, "remainingItemCount", pointer=True),
    ),
    "LabelSelector": (
        _map(1, "matchLabels"),
        _msgs(2, "matchExpressions", "LabelSelectorRequirement"),
    ),
    "LabelSelectorRequirement": (
        _str(1, "key", keep=True),
        _str(2, "operator", keep=True),
        _strs(3, "values"),
    ),
    "Condition": (
        _str(1, "type", keep=True),
        _str(2, "status", keep=True),
        _i64(3, "observedGeneration"),
        _time(4, "lastTransitionTime"),
        _str(5, "reason", keep=True),
        _str(6, "message", keep=True),
    ),
    "Status": (
        _msg(1, "metadata", "ListMeta"),
        _str(2, "status"),
        _str(3, "message"),
        _str(4, "reason"),
        _msg(5, "details", "StatusDetails", pointer=True),
        _i32(6, "code"),
    ),
    "StatusDetails": (
        _str(1, "name"),
        _str(2, "group"),
        _str(3, "kind"),
        _str(6, "uid"),
        _msgs(4, "causes", "StatusCause"),
        _i32(5, "retryAfterSeconds"),
    ),
    "StatusCause": (_str(1, "reason"), _str(2, "message"), _str(3, "field")),
    # k8s.io/api/core/v1
    "Namespace": (
        _meta(),
        _msg(2, "spec", "NamespaceSpec"),
        _msg(3, "status", "NamespaceStatus"),
    ),
    "NamespaceSpec": (_strs(1, "finalizers"),),
    "NamespaceStatus": (_str(1, "phase"), _msgs(2, "conditions", "NamespaceCondition")),
    "NamespaceCondition": (
        _str(1, "type", keep=True),
        _str(2, "status", keep=True),
        _time(4, "lastTransitionTime"),
        _str(5, "reason"),
        _str(6, "message"),
    ),
    "Secret": (
        _meta(),
        _bool(5, "immutable", pointer=True),
        _map(2, "data", Shape.BYTES),
        _map(4, "stringData"),
        _str(3, "type"),
    ),
    "ConfigMap": (
        _meta(),
        _bool(4, "immutable", pointer=True),
        _map(2, "data"),
        _map(3, "binaryData", Shape.BYTES),
    ),
    "ServiceAccount": (
        _meta(),
        _msgs(2, "secrets", "ObjectReference"),
        _msgs(3, "imagePullSecrets", "LocalObjectReference"),
        _bool(4, "automountServiceAccountToken", pointer=True),
    ),
    "ObjectReference": (
        _str(1, "kind"),
        _str(2, "namespace"),
        _str(3, "name"),
        _str(4, "uid"),
        _str(5, "apiVersion"),
        _str(6, "resourceVersion"),
        _str(7, "fieldPath"),
    ),
    "LocalObjectReference": (_str(1, "name"),),
    "Service": (
        _meta(),
        _msg(2, "spec", "ServiceSpec"),
        _msg(3, "status", "ServiceStatus"),
    ),
    "ServiceSpec": (
        _msgs(1, "ports", "ServicePort"),
        _map(2, "selector"),
        _str(3, "clusterIP"),
        _strs(18, "clusterIPs"),
        _str(4, "type"),
        _strs(5, "externalIPs"),
        _str(7, "sessionAffinity"),
        _str(8, "loadBalancerIP"),
        _strs(9, "loadBalancerSourceRanges"),
        _str(10, "externalName"),
        _str(11, "externalTrafficPolicy"),
        _i32(12, "healthCheckNodePort"),
        _bool(13, "publishNotReadyAddresses"),
        _msg(14, "sessionAffinityConfig", "SessionAffinityConfig", pointer=True),
        _strs(19, "ipFamilies"),
        _str(17, "ipFamilyPolicy", pointer=True),
        _bool(20, "allocateLoadBalancerNodePorts", pointer=True),
        _str(21, "loadBalancerClass", pointer=True),
        _str(22, "internalTrafficPolicy", pointer=True),
        _str(23, "trafficDistribution", pointer=True),
    ),
    "ServicePort": (
        _str(1, "name"),
        _str(2, "protocol"),
        _str(6, "appProtocol", pointer=True),
        _i32(3, "port", keep=True),
        Field(4, "targetPort", Shape.INT_OR_STRING),
        _i32(5, "nodePort"),
    ),
    "ServiceStatus": (
        _msg(1, "loadBalancer", "LoadBalancerStatus"),
        _msgs(2, "conditions", "Condition"),
    ),
    "LoadBalancerStatus": (_msgs(1, "ingress", "LoadBalancerIngress"),),
    "LoadBalancerIngress": (
        _str(1, "ip"),
        _str(2, "hostname"),
        _str(3, "ipMode", pointer=True),
        _msgs(4, "ports", "PortStatus"),
    ),
    "PortStatus": (
        _i32(1, "port", keep=True),
        _str(2, "protocol", keep=True),
        _str(3, "error", pointer=True),
    ),
    "SessionAffinityConfig": (_msg(1, "clientIP", "ClientIPConfig", pointer=True),),
    "ClientIPConfig": (_i32(1, "timeoutSeconds", pointer=True),),
    # k8s.io/api/rbac/v1
    "PolicyRule": (
        _strs(1, "verbs"),
        _strs(2, "apiGroups"),
        _strs(3, "resources"),
        _strs(4, "resourceNames"),
        _strs(5, "nonResourceURLs"),
    ),
    "Role": (_meta(), _msgs(2, "rules", "PolicyRule")),
    "ClusterRole": (
        _meta(),
        _msgs(2, "rules", "PolicyRule"),
        _msg(3, "aggregationRule", "AggregationRule", pointer=True),
    ),
    "AggregationRule": (_msgs(1, "clusterRoleSelectors", "LabelSelector"),),
    "Subject": (
        _str(1, "kind", keep=True),
        _str(2, "apiGroup"),
        _str(3, "name", keep=True),
        _str(4, "namespace"),
    ),
    "RoleRef": (
        _str(1, "apiGroup", keep=True),
        _str(2, "kind", keep=True),
        _str(3, "name", keep=True),
    ),
    "RoleBinding": (_meta(), _msgs(2, "subjects", "Subject"), _msg(3, "roleRef", "RoleRef")),
    "ClusterRoleBinding": (
        _meta(),
        _msgs(2, "subjects", "Subject"),
        _msg(3, "roleRef", "RoleRef"),
    ),
    # k8s.io/api/authorization/v1
    "SelfSubjectAccessReview": (
        _meta(),
        _msg(2, "spec", "SelfSubjectAccessReviewSpec"),
        _msg(3, "status", "SubjectAccessReviewStatus"),
    ),
    "SelfSubjectAccessReviewSpec": (
        _msg(1, "resourceAttributes", "ResourceAttributes", pointer=True),
        _msg(2, "nonResourceAttributes", "NonResourceAttributes", pointer=True),
    ),
    "SubjectAccessReview": (
        _meta(),
        _msg(2, "spec", "SubjectAccessReviewSpec"),
        _msg(3, "status", "SubjectAccessReviewStatus"),
    ),
    "LocalSubjectAccessReview": (
        _meta(),
        _msg(2, "spec", "SubjectAccessReviewSpec"),
        _msg(3, "status", "SubjectAccessReviewStatus"),
    ),
    "SubjectAccessReviewSpec": (
        _msg(1, "resourceAttributes", "ResourceAttributes", pointer=True),
        _msg(2, "nonResourceAttributes", "NonResourceAttributes", pointer=True),
        _str(3, "user"),
        _strs(4, "groups"),
        _map(5, "extra", Shape.EXTRA_VALUE),
        _str(6, "uid"),
    ),
    "ResourceAttributes": (
        _str(1, "namespace"),
        _str(2, "verb"),
        _str(3, "group"),
        _str(4, "version"),
        _str(5, "resource"),
        _str(6, "subresource"),
        _str(7, "name"),
        _msg(8, "fieldSelector", "FieldSelectorAttributes", pointer=True),
        _msg(9, "labelSelector", "LabelSelectorAttributes", pointer=True),
    ),
    "FieldSelectorAttributes": (
        _str(1, "rawSelector"),
        _msgs(2, "requirements", "FieldSelectorRequirement"),
    ),
    "FieldSelectorRequirement": (
        _str(1, "key", keep=True),
        _str(2, "operator", keep=True),
        _strs(3, "values"),
    ),
    "LabelSelectorAttributes": (
        _str(1, "rawSelector"),
        _msgs(2, "requirements", "LabelSelectorRequirement"),
    ),
    "NonResourceAttributes": (_str(1, "path"), _str(2, "verb")),
    "SubjectAccessReviewStatus": (
        _bool(1, "allowed", keep=True),
        _bool(4, "denied"),
        _str(2, "reason"),
        _str(3, "evaluationError"),
    ),
    "SelfSubjectRulesReview": (
        _meta(),
        _msg(2, "spec", "SelfSubjectRulesReviewSpec"),
        _msg(3, "status", "SubjectRulesReviewStatus"),
    ),
    "SelfSubjectRulesReviewSpec": (_str(1, "namespace"),),
    "SubjectRulesReviewStatus": (
        _msgs(1, "resourceRules", "ResourceRule"),
        _msgs(2, "nonResourceRules", "NonResourceRule"),
        _bool(3, "incomplete", keep=True),
        _str(4, "evaluationError"),
    ),
    "ResourceRule": (
        _strs(1, "verbs"),
        _strs(2, "apiGroups"),
        _strs(3, "resources"),
        _strs(4, "resourceNames"),
    ),
    "NonResourceRule": (_strs(1, "verbs"), _strs(2, "nonResourceURLs")),
    # k8s.io/api/authentication/v1
    "TokenRequest": (
        _meta(),
        _msg(2, "spec", "TokenRequestSpec"),
        _msg(3, "status", "TokenRequestStatus"),
    ),
    "TokenRequestSpec": (
        _strs(1, "audiences"),
        _i64(4, "expirationSeconds", pointer=True),
        _msg(3, "boundObjectRef", "BoundObjectReference", pointer=True),
    ),
    "BoundObjectReference": (
        _str(1, "kind"),
        _str(2, "apiVersion"),
        _str(3, "name"),
        _str(4, "uid"),
    ),
    "TokenRequestStatus": (_str(1, "token", keep=True), _time(2, "expirationTimestamp")),
    "TokenReview": (
        _meta(),
        _msg(2, "spec", "TokenReviewSpec"),
        _msg(3, "status", "TokenReviewStatus"),
    ),
    "TokenReviewSpec": (_str(1, "token"), _strs(2, "audiences")),
    "TokenReviewStatus": (
        _bool(1, "authenticated"),
        _msg(2, "user", "UserInfo"),
        _strs(4, "audiences"),
        _str(3, "error"),
    ),
    "SelfSubjectReview": (_meta(), _msg(2, "status", "SelfSubjectReviewStatus")),
    "SelfSubjectReviewStatus": (_msg(1, "userInfo", "UserInfo"),),
    "UserInfo": (
        _str(1, "username"),
        _str(2, "uid"),
        _strs(3, "groups"),
        _map(4, "extra", Shape.EXTRA_VALUE),
    ),
}

# (apiVersion, kind) -> top-level message.
_KINDS: Final[dict[tuple[str, str], str]] = {
    ("v1", "Namespace"): "Namespace",
    ("v1", "Secret"): "Secret",
    ("v1", "ConfigMap"): "ConfigMap",
    ("v1", "ServiceAccount"): "ServiceAccount",
    ("v1", "Service"): "Service",
    # The API server sends Status with the core group's version; both spellings are accepted.
    ("v1", "Status"): "Status",
    ("meta.k8s.io/v1", "Status"): "Status",
    ("rbac.authorization.k8s.io/v1", "Role"): "Role",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "ClusterRole",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "RoleBinding",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "ClusterRoleBinding",
    ("authorization.k8s.io/v1", "SelfSubjectAccessReview"): "SelfSubjectAccessReview",
    ("authorization.k8s.io/v1", "SelfSubjectRulesReview"): "SelfSubjectRulesReview",
    ("authorization.k8s.io/v1", "SubjectAccessReview"): "SubjectAccessReview",
    ("authorization.k8s.io/v1", "LocalSubjectAccessReview"): "LocalSubjectAccessReview",
    ("authentication.k8s.io/v1", "TokenRequest"): "TokenRequest",
    ("authentication.k8s.io/v1", "TokenReview"): "TokenReview",
    ("authentication.k8s.io/v1", "SelfSubjectReview"): "SelfSubjectReview",
}


def supports(api_version: str, kind: str) -> bool:
    """Whether objects of this apiVersion and kind can be decoded and encoded."""
    return (api_version, kind) in _KINDS


# --- public entry points ------------------------------------------------------------------


def decode(body: bytes) -> JSONObject:
    """Decode a Kubernetes protobuf body into the JSON-shaped object it carries."""
    if not body.startswith(_MAGIC):
        raise ProtobufError(f"not a Kubernetes protobuf body: expected magic {_MAGIC!r}")
    envelope = _parse(body[len(_MAGIC) :], "envelope")
    type_meta = _parse(_last_bytes(envelope, 1, "typeMeta"), "typeMeta")
    api_version = _text(_last_bytes(type_meta, 1, "typeMeta.apiVersion"), "apiVersion")
    kind = _text(_last_bytes(type_meta, 2, "typeMeta.kind"), "kind")
    _check_content(envelope)
    message = _message_for(api_version, kind)
    obj: JSONObject = {"apiVersion": api_version, "kind": kind}
    obj.update(_decode_message(message, _last_bytes(envelope, 2, "raw"), kind))
    return obj


def encode(obj: JSONObject) -> bytes:
    """Encode a JSON-shaped object of a supported kind as a Kubernetes protobuf body."""
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise ProtobufError("object needs string apiVersion and kind to be encoded")
    raw = _encode_message(_message_for(api_version, kind), obj, kind)
    type_meta = _len_field(1, api_version.encode()) + _len_field(2, kind.encode())
    # runtime.Unknown: typeMeta, raw, then the always-written empty contentEncoding/contentType.
    envelope = (
        _len_field(1, type_meta) + _len_field(2, raw) + _len_field(3, b"") + _len_field(4, b"")
    )
    return _MAGIC + envelope


def _message_for(api_version: str, kind: str) -> str:
    try:
        return _KINDS[(api_version, kind)]
    except KeyError:
        raise ProtobufError(
            f"protobuf encoding of apiVersion={api_version!r} kind={kind!r} is not supported"
        ) from None


def _check_content(envelope: dict[int, list[_WireValue]]) -> None:
    encoding = _text(_last_bytes(envelope, 3, "contentEncoding"), "contentEncoding")
    content_type = _text(_last_bytes(envelope, 4, "contentType"), "contentType")
    if encoding:
        raise ProtobufError(f"unsupported contentEncoding {encoding!r} in protobuf envelope")
    if content_type not in ("", PROTOBUF_CONTENT_TYPE):
        raise ProtobufError(f"unsupported contentType {content_type!r} in protobuf envelope")


# --- wire level ---------------------------------------------------------------------------


def _read_varint(data: bytes, pos: int, path: str) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError(f"{path}: truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtobufError(f"{path}: varint longer than 10 bytes")


def _fields(data: bytes, path: str) -> Iterator[tuple[int, int, _WireValue]]:
    """Yield (field number, wire type, value) for each field of a serialized message."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos, path)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ProtobufError(f"{path}: field number 0 is invalid")
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos, path)
            yield number, wire_type, value
            continue
        if wire_type == _LENGTH:
            size, pos = _read_varint(data, pos, path)
        elif wire_type in (_FIXED64, _FIXED32):
            size = 8 if wire_type == _FIXED64 else 4
        else:
            raise ProtobufError(f"{path}: unsupported wire type {wire_type} for field {number}")
        if pos + size > len(data):
            raise ProtobufError(f"{path}: truncated field {number}")
        yield number, wire_type, data[pos : pos + size]
        pos += size


def _parse(data: bytes, path: str) -> dict[int, list[_WireValue]]:
    parsed: dict[int, list[_WireValue]] = {}
    for number, _wire_type, value in _fields(data, path):
        parsed.setdefault(number, []).append(value)
    return parsed


def _last_bytes(parsed: dict[int, list[_WireValue]], number: int, path: str) -> bytes:
    values = parsed.get(number)
    if not values:
        return b""
    value = values[-1]
    if not isinstance(value, bytes):
        raise ProtobufError(f"{path}: expected length-delimited data, got a varint")
    return value


def _text(data: bytes, path: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise ProtobufError(f"{path}: invalid UTF-8 string") from err


def _varint(value: int) -> bytes:
    value %= _UINT64  # negative ints are written as their 64-bit two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, _LENGTH) + _varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _key(number, _VARINT) + _varint(value)


# --- decoding -----------------------------------------------------------------------------


def _decode_message(message: str, data: bytes, path: str) -> JSONObject:
    parsed = _parse(data, path)
    out: JSONObject = {}
    for field in _MESSAGES[message]:
        where = f"{path}.{field.name}"
        values = parsed.get(field.number, [])
        if field.card is Card.LIST:
            items = [_decode_value(field, v, f"{where}[{i}]") for i, v in enumerate(values)]
            if items:
                out[field.name] = items
        elif field.card is Card.MAP:
            entries = dict(_decode_entry(field, v, where) for v in values)
            if entries:
                out[field.name] = entries
        else:
            _decode_single(field, values, where, out)
    return out


def _decode_single(field: Field, values: list[_WireValue], path: str, out: JSONObject) -> None:
    if not values:
        if not field.pointer and field.shape in (Shape.MESSAGE, Shape.INT_OR_STRING):
            out[field.name] = _decode_value(field, b"", path)
        elif not field.pointer and field.keep_zero:
            out[field.name] = _ZERO[field.shape]
        return
    value = _decode_value(field, values[-1], path)
    if value is None:
        return  # a zero metav1.Time: Go shows null
    always_shown = field.shape in (Shape.MESSAGE, Shape.INT_OR_STRING)
    if field.pointer or field.keep_zero or always_shown or value:
        out[field.name] = value


_ZERO: Final[dict[Shape, Any]] = {
    Shape.STRING: "",
    Shape.BOOL: False,
    Shape.INT32: 0,
    Shape.INT64: 0,
}


def _decode_entry(field: Field, value: _WireValue, path: str) -> tuple[str, Any]:
    if not isinstance(value, bytes):
        raise ProtobufError(f"{path}: map entry must be length-delimited")
    entry = _parse(value, path)
    key = _text(_last_bytes(entry, 1, path), f"{path} key")
    raw_value = entry.get(2, [b""])[-1]
    return key, _decode_value(field, raw_value, f"{path}[{key!r}]")


def _decode_value(field: Field, value: _WireValue, path: str) -> Any:
    if field.shape in (Shape.BOOL, Shape.INT32, Shape.INT64):
        if not isinstance(value, int):
            raise ProtobufError(f"{path}: expected a varint")
        return _decode_number(field.shape, value)
    if not isinstance(value, bytes):
        raise ProtobufError(f"{path}: expected length-delimited data, got a varint")
    return _BYTES_DECODERS[field.shape](field, value, path)


def _decode_number(shape: Shape, value: int) -> bool | int:
    if shape is Shape.BOOL:
        return value != 0
    signed = value - _UINT64 if value >= 1 << 63 else value
    if shape is Shape.INT32:
        # int32 is sign-extended to 64 bits on the wire; keep the low 32 bits' meaning
        signed = (signed + (1 << 31)) % (1 << 32) - (1 << 31)
    return signed


def _decode_time(_field: Field, data: bytes, path: str) -> str | None:
    if not data:
        return None
    parsed = _parse(data, path)
    seconds = _decode_number(Shape.INT64, _last_int(parsed, 1, path))
    if seconds == _ZERO_TIME_SECONDS:
        return None
    try:
        moment = datetime.fromtimestamp(int(seconds), UTC)
    except (OverflowError, OSError, ValueError) as err:
        raise ProtobufError(f"{path}: timestamp out of range") from err
    # metav1.Time shows whole seconds in JSON
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _last_int(parsed: dict[int, list[_WireValue]], number: int, path: str) -> int:
    values = parsed.get(number)
    if not values:
        return 0
    value = values[-1]
    if not isinstance(value, int):
        raise ProtobufError(f"{path}: expected a varint in field {number}")
    return value


def _decode_int_or_string(_field: Field, data: bytes, path: str) -> int | str:
    parsed = _parse(data, path)
    if _last_int(parsed, 1, path) == 1:
        return _text(_last_bytes(parsed, 3, path), path)
    return int(_decode_number(Shape.INT32, _last_int(parsed, 2, path)))


def _decode_fields_v1(_field: Field, data: bytes, path: str) -> Any:
    raw = _last_bytes(_parse(data, path), 1, path)
    try:
        return json.loads(raw) if raw else {}
    except ValueError as err:
        raise ProtobufError(f"{path}: fieldsV1 is not JSON") from err


def _decode_extra_value(_field: Field, data: bytes, path: str) -> list[str]:
    items = _parse(data, path).get(1, [])
    return [_text(_as_bytes(item, path), path) for item in items]


def _as_bytes(value: _WireValue, path: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtobufError(f"{path}: expected length-delimited data, got a varint")
    return value


_BYTES_DECODERS: Final[dict[Shape, Callable[[Field, bytes, str], Any]]] = {
    Shape.STRING: lambda _f, data, path: _text(data, path),
    Shape.BYTES: lambda _f, data, _p: base64.b64encode(data).decode(),
    Shape.MESSAGE: lambda f, data, path: _decode_message(f.message, data, path),
    Shape.TIME: _decode_time,
    Shape.INT_OR_STRING: _decode_int_or_string,
    Shape.FIELDS_V1: _decode_fields_v1,
    Shape.EXTRA_VALUE: _decode_extra_value,
}


# --- encoding -----------------------------------------------------------------------------


def _encode_message(message: str, obj: Any, path: str) -> bytes:
    if not isinstance(obj, dict):
        raise ProtobufError(f"{path}: expected an object, got {type(obj).__name__}")
    out = bytearray()
    for field in sorted(_MESSAGES[message], key=lambda f: f.number):
        out += _encode_field(field, obj.get(field.name), f"{path}.{field.name}")
    return bytes(out)


def _encode_field(field: Field, value: Any, path: str) -> bytes:
    if field.card is Card.LIST:
        if value is None:
            return b""
        if not isinstance(value, list):
            raise ProtobufError(f"{path}: expected a list, got {type(value).__name__}")
        return b"".join(_encode_one(field, item, f"{path}[{i}]") for i, item in enumerate(value))
    if field.card is Card.MAP:
        return _encode_map(field, value, path)
    if value is None:
        # Go writes non-pointer fields even when zero; pointer fields only when set.
        return b"" if field.pointer else _encode_one(field, _EMPTY.get(field.shape), path)
    return _encode_one(field, value, path)


_EMPTY: Final[dict[Shape, Any]] = {
    Shape.STRING: "",
    Shape.BOOL: False,
    Shape.INT32: 0,
    Shape.INT64: 0,
    Shape.MESSAGE: {},
    Shape.INT_OR_STRING: 0,
}


def _encode_map(field: Field, value: Any, path: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, dict):
        raise ProtobufError(f"{path}: expected an object, got {type(value).__name__}")
    out = bytearray()
    for key in sorted(value):  # Go's generated marshalers sort map keys
        if not isinstance(key, str):
            raise ProtobufError(f"{path}: map keys must be strings")
        where = f"{path}[{key!r}]"
        entry = _len_field(1, key.encode()) + _encode_one(
            Field(2, field.name, field.shape), value[key], where
        )
        out += _len_field(field.number, entry)
    return bytes(out)


def _encode_one(field: Field, value: Any, path: str) -> bytes:
    """Encode one value (a list element, a map value, or a single field) with its key."""
    if field.shape is Shape.BOOL:
        if not isinstance(value, bool):
            raise ProtobufError(f"{path}: expected a boolean, got {type(value).__name__}")
        return _varint_field(field.number, int(value))
    if field.shape in (Shape.INT32, Shape.INT64):
        return _varint_field(field.number, _integer(field.shape, value, path))
    return _len_field(field.number, _PAYLOAD_ENCODERS[field.shape](field, value, path))


def _integer(shape: Shape, value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtobufError(f"{path}: expected an integer, got {type(value).__name__}")
    bits = 32 if shape is Shape.INT32 else 64
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise ProtobufError(f"{path}: {value} does not fit in int{bits}")
    return value


def _string_payload(_field: Field, value: Any, path: str) -> bytes:
    if not isinstance(value, str):
        raise ProtobufError(f"{path}: expected a string, got {type(value).__name__}")
    return value.encode()


def _bytes_payload(_field: Field, value: Any, path: str) -> bytes:
    if not isinstance(value, str):
        raise ProtobufError(f"{path}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise ProtobufError(f"{path}: invalid base64 data") from err


def _time_payload(_field: Field, value: Any, path: str) -> bytes:
    if value is None:
        return b""  # zero metav1.Time
    if not isinstance(value, str):
        raise ProtobufError(f"{path}: expected an RFC 3339 time string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as err:
        raise ProtobufError(f"{path}: invalid RFC 3339 time {value!r}") from err
    if moment.tzinfo is None:
        raise ProtobufError(f"{path}: time {value!r} lacks a timezone")
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    seconds = delta.days * 86400 + delta.seconds
    if seconds == _ZERO_TIME_SECONDS and not delta.microseconds:
        return b""
    return _varint_field(1, seconds) + _varint_field(2, delta.microseconds * 1000)


def _int_or_string_payload(_field: Field, value: Any, path: str) -> bytes:
    if isinstance(value, str):
        return _varint_field(1, 1) + _varint_field(2, 0) + _len_field(3, value.encode())
    number = _integer(Shape.INT32, value, path)
    return _varint_field(1, 0) + _varint_field(2, number) + _len_field(3, b"")


def _fields_v1_payload(_field: Field, value: Any, path: str) -> bytes:
    try:
        raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as err:
        raise ProtobufError(f"{path}: fieldsV1 is not JSON-serializable") from err
    return _len_field(1, raw)


def _extra_value_payload(_field: Field, value: Any, path: str) -> bytes:
    if not isinstance(value, list):
        raise ProtobufError(f"{path}: expected a list of strings")
    return b"".join(_len_field(1, _string_payload(_field, item, path)) for item in value)


_PAYLOAD_ENCODERS: Final[dict[Shape, Callable[[Field, Any, str], bytes]]] = {
    Shape.STRING: _string_payload,
    Shape.BYTES: _bytes_payload,
    Shape.MESSAGE: lambda f, value, path: _encode_message(f.message, value, path),
    Shape.TIME: _time_payload,
    Shape.INT_OR_STRING: _int_or_string_payload,
    Shape.FIELDS_V1: _fields_v1_payload,
    Shape.EXTRA_VALUE: _extra_value_payload,
}
