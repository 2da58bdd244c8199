"""CustomResourceDefinitions: checking a definition, and turning it into served kinds.

``validate_crd`` refuses definitions kube-apiserver would refuse (naming, one storage version,
structural schemas, valid defaults); ``crd_resource_types`` turns an accepted one into one
``ResourceType`` per served version, in Kubernetes' version priority order (the first is the
preferred version), whose objects the server then validates and defaults with ``vmo.api.schema``.
"""

from __future__ import annotations

import re
from typing import Any

from vmo.api import schema as structural
from vmo.api.meta import dns1123_label_errors, dns1123_subdomain_errors
from vmo.api.types import JSON, Cause, PrinterColumn, ResourceType

__all__ = ["crd_resource_types", "structural_errors", "validate_crd", "version_priority"]

_KIND = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_KUBE_VERSION = re.compile(r"^v(\d+)(?:(alpha|beta)(\d+))?$")
# What kube-apiserver lets a CRD schema say about the root metadata.
_ROOT_METADATA_FIELDS = {"name", "generateName"}
_IMPLICIT_ROOT: JSON = {
    "apiVersion": {"type": "string"},
    "kind": {"type": "string"},
    "metadata": {"type": "object"},
}
_BRANCH_KEYS = ("allOf", "anyOf", "oneOf")


# --------------------------------------------------------------------------- served kinds


def crd_resource_types(crd: JSON) -> list[ResourceType]:
    """One ResourceType per served version of ``crd``, the preferred version first."""
    spec = crd["spec"]
    served = [v for v in spec.get("versions") or () if v.get("served")]
    served.sort(key=lambda v: version_priority(v["name"]))
    return [_version_type(spec, version) for version in served]


def _version_type(spec: JSON, version: JSON) -> ResourceType:
    names = spec["names"]
    subresources = version.get("subresources") or {}
    return ResourceType(
        group=spec["group"],
        version=version["name"],
        kind=names["kind"],
        plural=names["plural"],
        singular=names.get("singular") or names["kind"].lower(),
        namespaced=spec.get("scope") == "Namespaced",
        short_names=tuple(names.get("shortNames") or ()),
        categories=tuple(names.get("categories") or ()),
        subresources=tuple(s for s in ("status", "scale") if s in subresources),
        printer_columns=tuple(
            _printer_column(c) for c in version.get("additionalPrinterColumns") or ()
        ),
        schema=served_schema(version),
        field_selectors={
            f["jsonPath"].lstrip("."): f["jsonPath"] for f in version.get("selectableFields") or ()
        },
    )


def _printer_column(column: JSON) -> PrinterColumn:
    return PrinterColumn(
        name=column["name"],
        type=column["type"],
        json_path=column["jsonPath"],
        description=column.get("description", ""),
        priority=int(column.get("priority", 0)),
        format=column.get("format", ""),
    )


def served_schema(version: JSON) -> JSON:
    """The version's schema with the fields every object has (apiVersion, kind, metadata)."""
    given = (version.get("schema") or {}).get("openAPIV3Schema")
    if not given:
        return {"type": "object", structural.PRESERVE_KEY: True}
    properties = {**_IMPLICIT_ROOT, **(given.get("properties") or {})}
    return {**given, "properties": properties}


def version_priority(name: str) -> tuple[int, int, int, str]:
    """Sort key: GA before beta before alpha, higher numbers first, other names last by name."""
    match = _KUBE_VERSION.match(name)
    if match is None:
        return (3, 0, 0, name)
    major, stage, minor = match.groups()
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -int(major), -int(minor or 0), name)


# --------------------------------------------------------------------------- validation


def validate_crd(crd: JSON, old: JSON | None) -> list[Cause]:
    """What kube-apiserver would refuse in ``crd`` (``old`` is the stored one on update)."""
    spec = crd.get("spec") or {}
    causes = _names(crd, spec)
    causes += _versions(spec.get("versions") or [])
    if old is not None:
        causes += _update(spec, old)
    return causes


def _names(crd: JSON, spec: JSON) -> list[Cause]:
    group = str(spec.get("group", ""))
    names = spec.get("names") or {}
    plural = str(names.get("plural", ""))
    causes: list[Cause] = []
    expected = f"{plural}.{group}"
    name = (crd.get("metadata") or {}).get("name")
    if name != expected:
        detail = 'must be spec.names.plural+"."+spec.group'
        causes.append(_invalid("metadata.name", name, detail))
    causes += [_invalid("spec.group", group, e) for e in dns1123_subdomain_errors(group)]
    if "." not in group:
        causes.append(_invalid("spec.group", group, "should be a domain with at least one dot"))
    causes += _names_fields(names, "spec.names")
    return causes


def _names_fields(names: JSON, path: str) -> list[Cause]:
    causes: list[Cause] = []
    for field in ("plural", "singular"):
        value = names.get(field)
        if value:
            causes += [_invalid(f"{path}.{field}", value, e) for e in dns1123_label_errors(value)]
    for index, short in enumerate(names.get("shortNames") or ()):
        field = f"{path}.shortNames[{index}]"
        causes += [_invalid(field, short, e) for e in dns1123_label_errors(short)]
    for field in ("kind", "listKind"):
        value = names.get(field)
        if value and not _KIND.match(value):
            causes.append(_invalid(f"{path}.{field}", value, "must be a CamelCase identifier"))
    if names.get("kind") and names.get("kind") == names.get("listKind"):
        causes.append(
            _invalid(f"{path}.listKind", names["listKind"], "kind and listKind must differ")
        )
    return causes


def _versions(versions: list[JSON]) -> list[Cause]:
    if not versions:
        return [
            Cause(
                "spec.versions",
                "Required value: must have at least one version",
                "FieldValueRequired",
            )
        ]
    causes: list[Cause] = []
    seen: set[str] = set()
    for index, version in enumerate(versions):
        path = f"spec.versions[{index}]"
        name = str(version.get("name", ""))
        if name in seen:
            causes.append(
                Cause(f"{path}.name", f'Duplicate value: "{name}"', "FieldValueDuplicate")
            )
        seen.add(name)
        causes += [_invalid(f"{path}.name", name, e) for e in dns1123_label_errors(name)]
        causes += _version(version, path)
    storage = sum(1 for v in versions if v.get("storage"))
    if storage != 1:
        detail = "must have exactly one version marked as storage version"
        causes.append(_invalid("spec.versions", [v.get("name") for v in versions], detail))
    return causes


def _version(version: JSON, path: str) -> list[Cause]:
    causes: list[Cause] = []
    openapi = (version.get("schema") or {}).get("openAPIV3Schema")
    schema_path = f"{path}.schema.openAPIV3Schema"
    if not openapi:
        causes.append(
            Cause(schema_path, "Required value: schemas are required", "FieldValueRequired")
        )
    else:
        causes += _root_schema(openapi, schema_path)
    for index, column in enumerate(version.get("additionalPrinterColumns") or ()):
        json_path = str(column.get("jsonPath", ""))
        if not json_path.startswith((".", "{")):
            field = f"{path}.additionalPrinterColumns[{index}].jsonPath"
            causes.append(_invalid(field, json_path, "must be a simple json path starting with ."))
    causes += _scale(version, path)
    return causes


def _scale(version: JSON, path: str) -> list[Cause]:
    scale = (version.get("subresources") or {}).get("scale")
    if not isinstance(scale, dict):
        return []
    causes = []
    for field, prefix in (("specReplicasPath", ".spec."), ("statusReplicasPath", ".status.")):
        value = str(scale.get(field, ""))
        if not value.startswith(prefix):
            detail = f"should be a json path under {prefix.rstrip('.')}"
            causes.append(_invalid(f"{path}.subresources.scale.{field}", value, detail))
    return causes


def _root_schema(openapi: JSON, path: str) -> list[Cause]:
    causes: list[Cause] = []
    if openapi.get("type") != "object":
        detail = "must be object at the root"
        causes.append(_invalid(f"{path}.type", openapi.get("type"), detail))
    metadata = (openapi.get("properties") or {}).get("metadata") or {}
    extra = set(metadata.get("properties") or ()) - _ROOT_METADATA_FIELDS
    if extra:
        causes.append(
            Cause(
                f"{path}.properties[metadata]",
                "Forbidden: must not specify anything other than name and generateName",
                "FieldValueForbidden",
            )
        )
    return causes + structural_errors(openapi, path)


def structural_errors(node: JSON, path: str) -> list[Cause]:
    """Why ``node`` is not a structural schema, or does not validate its own defaults."""
    causes = _node_rules(node, path)
    properties = node.get("properties") or {}
    for name, sub in properties.items():
        causes += structural_errors(sub, f"{path}.properties[{name}]")
    items = node.get("items")
    if isinstance(items, dict):
        causes += structural_errors(items, f"{path}.items")
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        causes += structural_errors(additional, f"{path}.additionalProperties")
    return causes


def _node_rules(node: JSON, path: str) -> list[Cause]:
    causes: list[Cause] = []
    int_or_string = bool(node.get(structural.INT_OR_STRING_KEY))
    preserve = bool(node.get(structural.PRESERVE_KEY))
    node_type = node.get("type")
    if "$ref" in node:
        causes.append(_forbidden(f"{path}.$ref", "$ref is not supported"))
    if not node_type and not int_or_string and not preserve:
        causes.append(
            Cause(
                f"{path}.type",
                "Required value: must not be empty for specified fields",
                "FieldValueRequired",
            )
        )
    if node_type and int_or_string:
        causes.append(
            _forbidden(f"{path}.type", "must be empty if x-kubernetes-int-or-string is true")
        )
    if node_type == "array" and not isinstance(node.get("items"), dict):
        causes.append(
            Cause(f"{path}.items", "Required value: must be specified", "FieldValueRequired")
        )
    additional = node.get("additionalProperties")
    if additional is not None and node.get("properties"):
        causes.append(
            _forbidden(
                f"{path}.additionalProperties",
                "additionalProperties and properties are mutual exclusive",
            )
        )
    if additional is False:
        causes.append(_forbidden(f"{path}.additionalProperties", "must not be false"))
    causes += _list_map_rules(node, path)
    causes += _branch_rules(node, path)
    if "default" in node:
        causes += [
            Cause(f"{path}.default", cause.message, cause.reason)
            for cause in structural.validate(node, node["default"], path="default")
        ]
    return causes


def _list_map_rules(node: JSON, path: str) -> list[Cause]:
    if node.get(structural.LIST_TYPE_KEY) != "map":
        return []
    keys = node.get(structural.LIST_MAP_KEYS_KEY) or []
    if not keys:
        return [
            Cause(
                f"{path}.x-kubernetes-list-map-keys",
                "Required value: must not be empty if x-kubernetes-list-type is map",
                "FieldValueRequired",
            )
        ]
    items = node.get("items") or {}
    item_properties = items.get("properties") or {}
    required = set(items.get("required") or ())
    causes = []
    for key in keys:
        prop = item_properties.get(key)
        if prop is None:
            causes.append(
                _invalid(
                    f"{path}.x-kubernetes-list-map-keys",
                    key,
                    "entries must all be names of item properties",
                )
            )
        elif key not in required and "default" not in prop:
            detail = "all map keys must be required or have a default value"
            causes.append(_invalid(f"{path}.items.properties[{key}]", key, detail))
    return causes


def _branch_rules(node: JSON, path: str) -> list[Cause]:
    """Value validations only inside allOf/anyOf/oneOf/not: no types, defaults or new shapes."""
    branches: list[tuple[str, Any]] = [
        (f"{path}.{key}[{i}]", branch)
        for key in _BRANCH_KEYS
        for i, branch in enumerate(node.get(key) or ())
    ]
    if isinstance(node.get("not"), dict):
        branches.append((f"{path}.not", node["not"]))
    causes = []
    for branch_path, branch in branches:
        for forbidden in ("default", "nullable", structural.PRESERVE_KEY, "additionalProperties"):
            if forbidden in branch:
                causes.append(
                    _forbidden(f"{branch_path}.{forbidden}", "must be undefined to be structural")
                )
    return causes


def _update(spec: JSON, old: JSON) -> list[Cause]:
    old_spec = old.get("spec") or {}
    causes: list[Cause] = []
    if old_spec.get("scope") and spec.get("scope") != old_spec.get("scope"):
        causes.append(_invalid("spec.scope", spec.get("scope"), "field is immutable"))
    declared = {v.get("name") for v in spec.get("versions") or ()}
    stored = (old.get("status") or {}).get("storedVersions") or ()
    for index, name in enumerate(stored):
        if name not in declared:
            detail = "must appear in spec.versions"
            causes.append(_invalid(f"status.storedVersions[{index}]", name, detail))
    return causes


def _invalid(field: str, value: Any, detail: str) -> Cause:
    shown = f'"{value}"' if isinstance(value, str) else repr(value)
    return Cause(field, f"Invalid value: {shown}: {detail}", "FieldValueInvalid")


def _forbidden(field: str, detail: str) -> Cause:
    return Cause(field, f"Forbidden: {detail}", "FieldValueForbidden")
