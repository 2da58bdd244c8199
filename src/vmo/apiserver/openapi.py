"""The OpenAPI documents kubectl reads: ``/openapi/v3`` (explain, field validation) and ``/openapi/v2``.

Each served kind's schema is published under the definition name upstream gives it
(``io.k8s.api.core.v1.Namespace``, ``io.kubevirt.v1.VirtualMachine``) with its
``x-kubernetes-group-version-kind``; ``metadata`` refers to a shared ObjectMeta definition. Both
versions also carry the resource paths, with the ``fieldValidation`` parameter on writes, which is
how kubectl learns that the server validates fields itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vmo.api.schema import INT_OR_STRING_KEY, PRESERVE_KEY, UNSUPPORTED_KEY, UNSUPPORTED_MESSAGE
from vmo.api.types import JSON, ResourceType
from vmo.apiserver import openapi_pb

__all__ = [
    "OBJECT_META",
    "definition_name",
    "openapi_v2",
    "openapi_v2_negotiated",
    "openapi_v3_group_version",
    "openapi_v3_index",
]

META = "io.k8s.apimachinery.pkg.apis.meta.v1"
OBJECT_META = f"{META}.ObjectMeta"
LIST_META = f"{META}.ListMeta"
STATUS = f"{META}.Status"
PATCH = f"{META}.Patch"
_INFO = {"title": "Kubernetes", "version": "v1.32.0"}
_JSON = "application/json"
_V3_REF = "#/components/schemas/"
_V2_REF = "#/definitions/"
_PATCH_TYPES = (
    "application/apply-patch+yaml",
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
)
# Upstream's definition prefixes for the Kubernetes groups whose Go packages are not io.k8s.api.
_GROUP_PREFIXES = {
    "": "io.k8s.api.core",
    "apiextensions.k8s.io": "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions",
    "apiregistration.k8s.io": "io.k8s.kube-aggregator.pkg.apis.apiregistration",
}


# --------------------------------------------------------------------------- names


def definition_name(group: str, version: str, kind: str) -> str:
    """Upstream's definition name: ``io.k8s.api.rbac.v1.Role``, ``io.kubevirt.v1.VirtualMachine``."""
    prefix = _GROUP_PREFIXES.get(group)
    if prefix is None and group.endswith(".k8s.io"):
        prefix = "io.k8s.api." + group.split(".")[0]
    if prefix is None:
        prefix = ".".join(reversed(group.split(".")))
    return f"{prefix}.{version}.{kind}"


def _gv_path(group: str, version: str) -> str:
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def _gvk(rt: ResourceType, kind: str = "") -> JSON:
    return {"group": rt.group, "version": rt.version, "kind": kind or rt.kind}


# --------------------------------------------------------------------------- v3


def openapi_v3_index(types: Sequence[ResourceType]) -> JSON:
    """The ``/openapi/v3`` discovery document: one entry per group/version, with a content hash."""
    paths: JSON = {}
    for group, version in _group_versions(types):
        document = openapi_v3_group_version(types, group, version)
        digest = hashlib.sha512(_canonical(document)).hexdigest().upper()
        gv_path = _gv_path(group, version)
        paths[gv_path] = {"serverRelativeURL": f"/openapi/v3/{gv_path}?hash={digest}"}
    return {"paths": paths}


def _group_versions(types: Iterable[ResourceType]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for rt in types:
        seen.setdefault((rt.group, rt.version), None)
    return list(seen)


def _canonical(document: JSON) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def openapi_v3_group_version(types: Sequence[ResourceType], group: str, version: str) -> JSON:
    """The OpenAPI 3.0 document of one group/version: its kinds' schemas and resource paths."""
    served = [rt for rt in types if rt.group == group and rt.version == version]
    schemas: JSON = {name: node for name, node in _meta_definitions(_V3_REF).items()}
    paths: JSON = {}
    for rt in served:
        schemas.update(_kind_definitions(rt, ref=_V3_REF, v2=False))
        paths.update(_resource_paths(rt))
    return {
        "openapi": "3.0.0",
        "info": dict(_INFO),
        "paths": paths,
        "components": {"schemas": schemas},
    }


# --------------------------------------------------------------------------- v2


def openapi_v2(types: Sequence[ResourceType]) -> JSON:
    """The Swagger 2.0 document of every kind, with the same paths as the v3 documents.

    kubectl validates the kinds that cannot be patched (the reviews) on the client, from this
    document in protobuf (``openapi_pb``); older kubectls read nothing else.
    """
    definitions: JSON = dict(_meta_definitions(_V2_REF))
    paths: JSON = {}
    for rt in types:
        definitions.update(_kind_definitions(rt, ref=_V2_REF, v2=True))
        paths.update(_resource_paths(rt, _V2))
    return {"swagger": "2.0", "info": dict(_INFO), "paths": paths, "definitions": definitions}


def openapi_v2_negotiated(types: Sequence[ResourceType], accept: str) -> tuple[bytes, str]:
    """The v2 document as the Accept header asks for it: (body, content type)."""
    document = openapi_v2(types)
    if openapi_pb.wants_protobuf(accept):
        return openapi_pb.encode(document), openapi_pb.CONTENT_TYPE
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode(), _JSON


# --------------------------------------------------------------------------- kind schemas


def _kind_definitions(rt: ResourceType, *, ref: str, v2: bool) -> JSON:
    name = definition_name(rt.group, rt.version, rt.kind)
    source = rt.schema or {"type": "object", PRESERVE_KEY: True}
    node = _published(source, v2=v2)
    node.setdefault("type", "object")
    properties = node.setdefault("properties", {})
    properties.setdefault("apiVersion", {"type": "string", "description": _API_VERSION_DOC})
    properties.setdefault("kind", {"type": "string", "description": _KIND_DOC})
    properties["metadata"] = _ref(ref, OBJECT_META, "Standard object's metadata.", v2=v2)
    node["x-kubernetes-group-version-kind"] = [_gvk(rt)]
    items = {"type": "array", "items": {"$ref": ref + name}, "description": f"List of {rt.plural}."}
    object_list = {
        "type": "object",
        "description": f"{rt.kind}List is a list of {rt.kind} objects.",
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string", "description": _API_VERSION_DOC},
            "kind": {"type": "string", "description": _KIND_DOC},
            "metadata": _ref(ref, LIST_META, "Standard list metadata.", v2=v2),
            "items": items,
        },
        "x-kubernetes-group-version-kind": [_gvk(rt, rt.kind + "List")],
    }
    return {name: node, name + "List": object_list}


def _ref(prefix: str, name: str, description: str, *, v2: bool) -> JSON:
    if v2:
        return {"$ref": prefix + name, "description": description}
    return {"allOf": [{"$ref": prefix + name}], "description": description, "default": {}}


def _published(node: JSON, *, v2: bool) -> JSON:
    """A schema node as published: VMO markers turned into descriptions, v2 simplified."""
    if UNSUPPORTED_KEY in node:
        reason = f"{UNSUPPORTED_MESSAGE}: {node[UNSUPPORTED_KEY]}"
        return {"description": f"{node.get('description', '')} ({reason})".strip()}
    out: JSON = {}
    for key, value in node.items():
        if key.startswith("x-vmo-"):
            continue
        out[key] = _published_value(key, value, v2=v2)
    return _v2_node(out) if v2 else out


def _published_value(key: str, value: Any, *, v2: bool) -> Any:
    if key == "properties" and isinstance(value, dict):
        return {name: _published(sub, v2=v2) for name, sub in value.items()}
    if key in ("items", "additionalProperties", "not") and isinstance(value, dict):
        return _published(value, v2=v2)
    if key in ("allOf", "anyOf", "oneOf") and isinstance(value, list):
        return [_published(branch, v2=v2) for branch in value]
    return copy.deepcopy(value)


def _v2_node(node: JSON) -> JSON:
    """Swagger 2.0 has no nullable or combinators; open-ended objects lose their shape.

    kubectl's client-side validation treats a typed object as closed, so a node that keeps
    unknown fields is published without type or properties, as upstream publishes CRDs.
    """
    for key in ("nullable", "anyOf", "oneOf", "allOf", "not"):
        node.pop(key, None)
    if node.get(INT_OR_STRING_KEY):
        node["type"] = "string"
        node["format"] = "int-or-string"
        node.pop("pattern", None)
    if node.get(PRESERVE_KEY):
        for key in ("type", "properties", "additionalProperties", "required"):
            node.pop(key, None)
    return node


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class _Style:
    """How one OpenAPI version spells references, bodies, responses and parameters."""

    v2: bool

    @property
    def ref(self) -> str:
        return _V2_REF if self.v2 else _V3_REF


_V3 = _Style(v2=False)
_V2 = _Style(v2=True)


def _resource_paths(rt: ResourceType, style: _Style = _V3) -> JSON:
    prefix = "/" + _gv_path(rt.group, rt.version)
    scope = f"{prefix}/namespaces/{{namespace}}/" if rt.namespaced else f"{prefix}/"
    name = definition_name(rt.group, rt.version, rt.kind)
    kind_ref = {"$ref": style.ref + name}
    list_ref = {"$ref": style.ref + name + "List"}
    verbs = set(rt.verbs)
    collection: JSON = {}
    if "list" in verbs:
        collection["get"] = _operation(rt, "list", list_ref, style=style)
    if "create" in verbs:
        collection["post"] = _operation(
            rt, "post", kind_ref, body=kind_ref, writes=True, style=style
        )
    if "deletecollection" in verbs:
        status_ref = {"$ref": style.ref + STATUS}
        collection["delete"] = _operation(rt, "deletecollection", status_ref, style=style)
    paths: JSON = {}
    if collection:
        parameters = _path_parameters(rt, named=False, style=style)
        paths[scope + rt.plural] = {**collection, "parameters": parameters}
    item_parameters = _path_parameters(rt, named=True, style=style)
    item = _item_operations(rt, kind_ref, verbs, style)
    if item:
        paths[f"{scope}{rt.plural}/{{name}}"] = {**item, "parameters": item_parameters}
    for sub in rt.subresources:
        sub_ops = _item_operations(rt, kind_ref, {"get", "update", "patch"}, style)
        paths[f"{scope}{rt.plural}/{{name}}/{sub}"] = {**sub_ops, "parameters": item_parameters}
    return paths


def _item_operations(rt: ResourceType, kind_ref: JSON, verbs: set[str], style: _Style) -> JSON:
    ops: JSON = {}
    if "get" in verbs:
        ops["get"] = _operation(rt, "get", kind_ref, style=style)
    if "update" in verbs:
        ops["put"] = _operation(rt, "put", kind_ref, body=kind_ref, writes=True, style=style)
    if "patch" in verbs:
        patch_body = {"$ref": style.ref + PATCH}
        ops["patch"] = _operation(rt, "patch", kind_ref, body=patch_body, writes=True, style=style)
    if "delete" in verbs:
        ops["delete"] = _operation(rt, "delete", {"$ref": style.ref + STATUS}, style=style)
    return ops


def _operation(
    rt: ResourceType,
    action: str,
    response: JSON,
    *,
    body: JSON | None = None,
    writes: bool = False,
    style: _Style,
) -> JSON:
    operation: JSON = {
        "operationId": f"{action}{rt.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(rt),
        "responses": {"200": _response(response, "OK", style)},
    }
    if action == "post":
        operation["responses"]["201"] = _response(response, "Created", style)
    parameters = [_query(name, doc, style) for name, doc in _WRITE_PARAMETERS] if writes else []
    content_types = _PATCH_TYPES if action == "patch" else ("application/json",)
    if body is not None and style.v2:
        operation["consumes"] = list(content_types)
        parameters.insert(0, {"name": "body", "in": "body", "required": True, "schema": body})
    elif body is not None:
        operation["requestBody"] = {
            "content": {t: {"schema": body} for t in content_types},
            "required": True,
        }
    if style.v2:
        operation["produces"] = ["application/json"]
    if parameters:
        operation["parameters"] = parameters
    return operation


def _response(schema: JSON, description: str, style: _Style) -> JSON:
    if style.v2:
        return {"description": description, "schema": schema}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _query(name: str, description: str, style: _Style) -> JSON:
    return {"name": name, "in": "query", "description": description, **_string_type(style)}


def _string_type(style: _Style) -> JSON:
    """Swagger 2.0 types a non-body parameter inline; OpenAPI 3 through its schema."""
    shape = {"type": "string", "uniqueItems": True}
    return shape if style.v2 else {"schema": shape}


def _path_parameters(rt: ResourceType, *, named: bool, style: _Style) -> list[JSON]:
    parameters = []
    if named:
        parameters.append(_in_path("name", f"name of the {rt.kind}", style))
    if rt.namespaced:
        parameters.append(_in_path("namespace", "object name and auth scope", style))
    return parameters


def _in_path(name: str, description: str, style: _Style) -> JSON:
    return {
        "name": name,
        "in": "path",
        "description": description,
        "required": True,
        **_string_type(style),
    }


_WRITE_PARAMETERS = (
    ("dryRun", "When present, modifications are not persisted. Valid value: All."),
    ("fieldManager", "A name associated with the actor or entity making these changes."),
    (
        "fieldValidation",
        "How the server treats unknown or duplicate fields: Ignore, Warn or Strict.",
    ),
)


# --------------------------------------------------------------------------- shared definitions

_API_VERSION_DOC = (
    "APIVersion defines the versioned schema of this representation of an object. Servers "
    "should convert recognized schemas to the latest internal value."
)
_KIND_DOC = (
    "Kind is a string value representing the REST resource this object represents. In CamelCase."
)


def _string(description: str, **extra: Any) -> JSON:
    return {"type": "string", "description": description, **extra}


def _string_map(description: str) -> JSON:
    return {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": description,
    }


def _meta_definitions(ref: str) -> JSON:
    owner = {
        "type": "object",
        "description": "Information that identifies an owning object.",
        "required": ["apiVersion", "kind", "name", "uid"],
        "properties": {
            "apiVersion": _string("API version of the referent."),
            "kind": _string("Kind of the referent."),
            "name": _string("Name of the referent."),
            "uid": _string("UID of the referent."),
            "controller": {
                "type": "boolean",
                "description": "If true, this reference points to the managing controller.",
            },
            "blockOwnerDeletion": {
                "type": "boolean",
                "description": "If true, the owner cannot be deleted before this object is.",
            },
        },
        "x-kubernetes-map-type": "atomic",
    }
    managed = {
        "type": "object",
        "description": "Which fields a manager set, and when.",
        "properties": {
            "manager": _string("The workflow managing these fields."),
            "operation": _string("The operation that set these fields: Apply or Update."),
            "apiVersion": _string("The version of the fields' schema."),
            "time": _string("When these fields were set.", format="date-time"),
            "fieldsType": _string("The format of fieldsV1: FieldsV1."),
            "fieldsV1": {"type": "object", "description": "The set of fields, as a tree."},
            "subresource": _string("The subresource these fields were set through."),
        },
    }
    object_meta = {
        "type": "object",
        "description": (
            "ObjectMeta is metadata that all persisted resources must have, which includes all "
            "objects users must create."
        ),
        "properties": {
            "name": _string("Name must be unique within a namespace; it cannot be updated."),
            "generateName": _string("Prefix the server uses to generate a unique name."),
            "namespace": _string(
                "The namespace the object lives in; empty for cluster-wide kinds."
            ),
            "uid": _string("Unique in time and space; set by the server.", readOnly=True),
            "resourceVersion": _string("Internal version of this object, for concurrency control."),
            "generation": {
                "type": "integer",
                "format": "int64",
                "description": "A sequence number for a specific generation of the desired state.",
            },
            "creationTimestamp": _string("When this object was created.", format="date-time"),
            "deletionTimestamp": _string("When this object will be deleted.", format="date-time"),
            "deletionGracePeriodSeconds": {
                "type": "integer",
                "format": "int64",
                "description": "Seconds allowed for graceful termination.",
            },
            "labels": _string_map("Map of string keys and values to organize and select objects."),
            "annotations": _string_map("Unstructured key value map set by tools and users."),
            "ownerReferences": {
                "type": "array",
                "description": "Objects this object depends on; it is collected when they are gone.",
                "items": {"$ref": ref + f"{META}.OwnerReference"},
                "x-kubernetes-patch-merge-key": "uid",
                "x-kubernetes-patch-strategy": "merge",
            },
            "finalizers": {
                "type": "array",
                "description": "Must be empty before the object is deleted from the registry.",
                "items": {"type": "string"},
                "x-kubernetes-list-type": "set",
                "x-kubernetes-patch-strategy": "merge",
            },
            "managedFields": {
                "type": "array",
                "description": "Which manager set which fields (server-side apply).",
                "items": {"$ref": ref + f"{META}.ManagedFieldsEntry"},
            },
            "selfLink": _string("Deprecated; not set."),
        },
    }
    list_meta = {
        "type": "object",
        "description": "ListMeta describes metadata that synthetic resources must have.",
        "properties": {
            "resourceVersion": _string("The version of the list, for watching from it."),
            "continue": _string("Set when more items are available: pass it back to get them."),
            "remainingItemCount": {"type": "integer", "format": "int64"},
            "selfLink": _string("Deprecated; not set."),
        },
    }
    status = {
        "type": "object",
        "description": "Status is a return value for calls that don't return other objects.",
        "properties": {
            "apiVersion": _string(_API_VERSION_DOC),
            "kind": _string(_KIND_DOC),
            "status": _string("Success or Failure."),
            "message": _string("A human-readable description of the status."),
            "reason": _string("A machine-readable description of why the call failed."),
            "code": {"type": "integer", "format": "int32"},
            "details": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
        "x-kubernetes-group-version-kind": [{"group": "", "version": "v1", "kind": "Status"}],
    }
    return {
        OBJECT_META: object_meta,
        LIST_META: list_meta,
        f"{META}.OwnerReference": owner,
        f"{META}.ManagedFieldsEntry": managed,
        STATUS: status,
        PATCH: {"type": "object", "description": "A patch, in one of the patch formats."},
    }
