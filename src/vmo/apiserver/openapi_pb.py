"""The Swagger 2.0 document in protobuf, the only form in which kubectl reads ``/openapi/v2``.

client-go asks for ``/openapi/v2`` with ``Accept: application/com.github.proto-openapi.spec.v2@v1.0
+protobuf`` and parses the answer as gnostic's ``openapi.v2.Document``; kubectl validates against it
the kinds it cannot leave to the server (those without a PATCH, such as the access reviews). The
message types are built at run time from the field numbers of gnostic's ``OpenAPIv2.proto``,
reduced to the fields VMO's documents use, and ``encode`` fills them from the JSON document the way
gnostic's compiler does: maps become lists of named entries, ``x-`` keys vendor extensions, and
free-form values (``default``, ``enum``, extensions) YAML text (JSON is YAML).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from vmo.api.types import JSON

__all__ = ["CONTENT_TYPE", "encode", "wants_protobuf"]

# What kube-openapi answers with; clients ask with "@v1.0", as client-go does, or with ".v1.0".
CONTENT_TYPE: Final = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
_ASKED: Final = ("application/com.github.proto-openapi.spec.v2@v1.0+protobuf", CONTENT_TYPE)
_JSON_MEDIA: Final = ("application/json", "application/*", "*/*")
_PACKAGE: Final = "openapi.v2"
_SCALARS: Final = {
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
}

# gnostic's OpenAPIv2.proto messages, as (field, number, type); a type is a scalar or a message,
# optionally "repeated T" or "oneof T" (gnostic's oneofs are all named "oneof").
_MESSAGES: Final[dict[str, tuple[tuple[str, int, str], ...]]] = {
    "Document": (
        ("swagger", 1, "string"),
        ("info", 2, "Info"),
        ("host", 3, "string"),
        ("base_path", 4, "string"),
        ("schemes", 5, "repeated string"),
        ("consumes", 6, "repeated string"),
        ("produces", 7, "repeated string"),
        ("paths", 8, "Paths"),
        ("definitions", 9, "Definitions"),
        ("vendor_extension", 16, "repeated NamedAny"),
    ),
    "Info": (
        ("title", 1, "string"),
        ("version", 2, "string"),
        ("description", 3, "string"),
        ("vendor_extension", 7, "repeated NamedAny"),
    ),
    "Paths": (("vendor_extension", 1, "repeated NamedAny"), ("path", 2, "repeated NamedPathItem")),
    "NamedPathItem": (("name", 1, "string"), ("value", 2, "PathItem")),
    "PathItem": (
        ("get", 2, "Operation"),
        ("put", 3, "Operation"),
        ("post", 4, "Operation"),
        ("delete", 5, "Operation"),
        ("patch", 8, "Operation"),
        ("parameters", 9, "repeated ParametersItem"),
        ("vendor_extension", 10, "repeated NamedAny"),
    ),
    "Operation": (
        ("tags", 1, "repeated string"),
        ("summary", 2, "string"),
        ("description", 3, "string"),
        ("operation_id", 5, "string"),
        ("produces", 6, "repeated string"),
        ("consumes", 7, "repeated string"),
        ("parameters", 8, "repeated ParametersItem"),
        ("responses", 9, "Responses"),
        ("deprecated", 11, "bool"),
        ("vendor_extension", 13, "repeated NamedAny"),
    ),
    "ParametersItem": (("parameter", 1, "oneof Parameter"),),
    "Parameter": (
        ("body_parameter", 1, "oneof BodyParameter"),
        ("non_body_parameter", 2, "oneof NonBodyParameter"),
    ),
    "BodyParameter": (
        ("description", 1, "string"),
        ("name", 2, "string"),
        ("in", 3, "string"),
        ("required", 4, "bool"),
        ("schema", 5, "Schema"),
    ),
    "NonBodyParameter": (
        ("query_parameter_sub_schema", 3, "oneof QueryParameterSubSchema"),
        ("path_parameter_sub_schema", 4, "oneof PathParameterSubSchema"),
    ),
    "QueryParameterSubSchema": (
        ("required", 1, "bool"),
        ("in", 2, "string"),
        ("description", 3, "string"),
        ("name", 4, "string"),
        ("type", 6, "string"),
        ("unique_items", 20, "bool"),
    ),
    "PathParameterSubSchema": (
        ("required", 1, "bool"),
        ("in", 2, "string"),
        ("description", 3, "string"),
        ("name", 4, "string"),
        ("type", 5, "string"),
        ("unique_items", 19, "bool"),
    ),
    "Responses": (("response_code", 1, "repeated NamedResponseValue"),),
    "NamedResponseValue": (("name", 1, "string"), ("value", 2, "ResponseValue")),
    "ResponseValue": (("response", 1, "oneof Response"),),
    "Response": (("description", 1, "string"), ("schema", 2, "SchemaItem")),
    "SchemaItem": (("schema", 1, "oneof Schema"),),
    "Definitions": (("additional_properties", 1, "repeated NamedSchema"),),
    "NamedSchema": (("name", 1, "string"), ("value", 2, "Schema")),
    "Properties": (("additional_properties", 1, "repeated NamedSchema"),),
    "Schema": (
        ("_ref", 1, "string"),
        ("format", 2, "string"),
        ("title", 3, "string"),
        ("description", 4, "string"),
        ("default", 5, "Any"),
        ("multiple_of", 6, "double"),
        ("maximum", 7, "double"),
        ("exclusive_maximum", 8, "bool"),
        ("minimum", 9, "double"),
        ("exclusive_minimum", 10, "bool"),
        ("max_length", 11, "int64"),
        ("min_length", 12, "int64"),
        ("pattern", 13, "string"),
        ("max_items", 14, "int64"),
        ("min_items", 15, "int64"),
        ("unique_items", 16, "bool"),
        ("max_properties", 17, "int64"),
        ("min_properties", 18, "int64"),
        ("required", 19, "repeated string"),
        ("enum", 20, "repeated Any"),
        ("additional_properties", 21, "AdditionalPropertiesItem"),
        ("type", 22, "TypeItem"),
        ("items", 23, "ItemsItem"),
        ("all_of", 24, "repeated Schema"),
        ("properties", 25, "Properties"),
        ("discriminator", 26, "string"),
        ("read_only", 27, "bool"),
        ("example", 30, "Any"),
        ("vendor_extension", 31, "repeated NamedAny"),
    ),
    "AdditionalPropertiesItem": (("schema", 1, "oneof Schema"), ("boolean", 2, "oneof bool")),
    "TypeItem": (("value", 1, "repeated string"),),
    "ItemsItem": (("schema", 1, "repeated Schema"),),
    "NamedAny": (("name", 1, "string"), ("value", 2, "Any")),
    # gnostic's Any also has a google.protobuf.Any (field 1) that it never fills from a document
    "Any": (("yaml", 2, "string"),),
}


# --------------------------------------------------------------------------- negotiation


def wants_protobuf(accept: str) -> bool:
    """Whether an Accept header asks for the protobuf document before JSON (kubectl asks only
    for protobuf). As elsewhere in VMO, the first listed representation it serves wins."""
    for entry in accept.split(","):
        media = entry.split(";")[0].strip().lower()
        if media in _ASKED:
            return True
        if media in _JSON_MEDIA:
            return False
    return False


# --------------------------------------------------------------------------- encoding


def encode(document: JSON) -> bytes:
    """The Swagger 2.0 ``document`` as a serialized ``openapi.v2.Document``."""
    # Filling the message takes ~0.1 s; the document changes only when CRDs do.
    return _encoded(json.dumps(document, separators=(",", ":")))


@lru_cache(maxsize=2)
def _encoded(document_text: str) -> bytes:
    message = _document_class()()
    json_format.ParseDict(_document(json.loads(document_text)), message)
    data: bytes = message.SerializeToString(deterministic=True)
    return data


@cache
def _document_class() -> Any:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Document"))


def _file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="openapiv2/OpenAPIv2.proto", package=_PACKAGE, syntax="proto3"
    )
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for field_name, number, spec in fields:
            _add_field(message, field_name, number, spec)
    return file


def _add_field(message: Any, name: str, number: int, spec: str) -> None:
    *modifier, type_name = spec.split()
    field = message.field.add(name=name, number=number)
    field.label = (
        descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
        if modifier == ["repeated"]
        else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    )
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    else:
        field.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
        field.type_name = f".{_PACKAGE}.{type_name}"
    if modifier == ["oneof"]:
        if not message.oneof_decl:
            message.oneof_decl.add(name="oneof")
        field.oneof_index = 0


# --------------------------------------------------------------------------- Swagger -> gnostic

# Schema keys copied as they are, under gnostic's field names. Keys Swagger 2.0 has no place for
# (what a CRD's v3 schema may still carry) are left out, as upstream leaves them out of v2.
_SCHEMA_VALUES: Final = {
    "$ref": "_ref",
    "format": "format",
    "title": "title",
    "description": "description",
    "multipleOf": "multiple_of",
    "maximum": "maximum",
    "exclusiveMaximum": "exclusive_maximum",
    "minimum": "minimum",
    "exclusiveMinimum": "exclusive_minimum",
    "maxLength": "max_length",
    "minLength": "min_length",
    "pattern": "pattern",
    "maxItems": "max_items",
    "minItems": "min_items",
    "uniqueItems": "unique_items",
    "maxProperties": "max_properties",
    "minProperties": "min_properties",
    "required": "required",
    "discriminator": "discriminator",
    "readOnly": "read_only",
}
_OPERATION_VALUES: Final = {
    "tags": "tags",
    "summary": "summary",
    "description": "description",
    "operationId": "operation_id",
    "produces": "produces",
    "consumes": "consumes",
    "deprecated": "deprecated",
}
_PARAMETER_VALUES: Final = ("name", "in", "description", "required")
_SIMPLE_PARAMETER_VALUES: Final = {"type": "type", "uniqueItems": "unique_items"}
_VERBS: Final = ("get", "put", "post", "delete", "patch")


def _document(doc: JSON) -> JSON:
    kept = ("swagger", "host", "schemes", "consumes", "produces")
    out: JSON = {key: doc[key] for key in kept if key in doc}
    if "basePath" in doc:
        out["base_path"] = doc["basePath"]
    if "info" in doc:
        info = doc["info"]
        out["info"] = {k: info[k] for k in ("title", "version", "description") if k in info}
    out["paths"] = {"path": _named(doc.get("paths") or {}, _path_item)}
    out["definitions"] = {"additional_properties": _named(doc.get("definitions") or {}, _schema)}
    return out | _extensions(doc)


def _named(entries: JSON, convert: Callable[[JSON], JSON]) -> list[JSON]:
    return [{"name": name, "value": convert(value)} for name, value in entries.items()]


def _extensions(node: JSON) -> JSON:
    named = [{"name": k, "value": _any(v)} for k, v in node.items() if k.startswith("x-")]
    return {"vendor_extension": named} if named else {}


def _any(value: Any) -> JSON:
    return {"yaml": json.dumps(value, ensure_ascii=False)}


def _path_item(item: JSON) -> JSON:
    out: JSON = {verb: _operation(item[verb]) for verb in _VERBS if verb in item}
    if "parameters" in item:
        out["parameters"] = [_parameter(p) for p in item["parameters"]]
    return out | _extensions(item)


def _operation(op: JSON) -> JSON:
    out: JSON = {field: op[key] for key, field in _OPERATION_VALUES.items() if key in op}
    if "parameters" in op:
        out["parameters"] = [_parameter(p) for p in op["parameters"]]
    if "responses" in op:
        out["responses"] = {"response_code": _named(op["responses"], _response)}
    return out | _extensions(op)


def _response(response: JSON) -> JSON:
    out: JSON = {"description": response.get("description", "")}
    if "schema" in response:
        out["schema"] = {"schema": _schema(response["schema"])}
    return {"response": out}


def _parameter(parameter: JSON) -> JSON:
    common = {key: parameter[key] for key in _PARAMETER_VALUES if key in parameter}
    where = parameter.get("in")
    if where == "body":
        body = common | {"schema": _schema(parameter.get("schema") or {})}
        return {"parameter": {"body_parameter": body}}
    if where not in ("query", "path"):
        raise ValueError(f"a parameter in {where!r} cannot be published in OpenAPI v2 protobuf")
    simple = {f: parameter[k] for k, f in _SIMPLE_PARAMETER_VALUES.items() if k in parameter}
    kind = f"{where}_parameter_sub_schema"
    return {"parameter": {"non_body_parameter": {kind: common | simple}}}


def _schema(node: JSON) -> JSON:
    out: JSON = {field: node[key] for key, field in _SCHEMA_VALUES.items() if key in node}
    if "type" in node:
        out["type"] = {"value": _listed(node["type"])}
    if "items" in node:
        out["items"] = {"schema": [_schema(item) for item in _listed(node["items"])]}
    if "allOf" in node:
        out["all_of"] = [_schema(branch) for branch in node["allOf"]]
    if "properties" in node:
        out["properties"] = {"additional_properties": _named(node["properties"], _schema)}
    extra = node.get("additionalProperties")
    if isinstance(extra, bool):
        out["additional_properties"] = {"boolean": extra}
    elif isinstance(extra, dict):
        out["additional_properties"] = {"schema": _schema(extra)}
    for key in ("default", "example"):
        if key in node:
            out[key] = _any(node[key])
    if "enum" in node:
        out["enum"] = [_any(value) for value in node["enum"]]
    return out | _extensions(node)


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]
