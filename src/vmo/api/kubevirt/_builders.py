"""A small typed vocabulary for writing structural OpenAPI v3 schemas compactly.

Every builder returns a plain JSON-schema dict in the vocabulary ``vmo.api.schema`` understands;
``unsupported(reason)`` marks a valid upstream field that VMO's embedded engine refuses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vmo.api.quantity import QUANTITY_PATTERN

JSON = dict[str, Any]

UNSUPPORTED_KEY = "x-vmo-unsupported"
PRESERVE_KEY = "x-kubernetes-preserve-unknown-fields"


def obj(
    properties: Mapping[str, JSON] | None = None,
    *,
    required: Sequence[str] = (),
    preserve: bool = False,
    description: str = "",
) -> JSON:
    """An object with the given properties; unknown fields are refused unless ``preserve``."""
    node: JSON = {"type": "object"}
    if description:
        node["description"] = description
    if properties is not None:
        node["properties"] = dict(properties)
    if required:
        node["required"] = list(required)
    if preserve:
        node[PRESERVE_KEY] = True
    return node


def empty() -> JSON:
    """An object that carries no fields, such as ``masquerade: {}`` or ``pod: {}``."""
    return obj({})


def any_object() -> JSON:
    """An object whose content is kept as given (status sub-objects, label selectors ...)."""
    return obj(preserve=True)


def arr(items: JSON) -> JSON:
    return {"type": "array", "items": items}


def string(
    *,
    enum: Iterable[str] | None = None,
    pattern: str | None = None,
    default: str | None = None,
) -> JSON:
    node: JSON = {"type": "string"}
    if enum is not None:
        node["enum"] = list(enum)
    if pattern is not None:
        node["pattern"] = pattern
    if default is not None:
        node["default"] = default
    return node


def integer(*, default: int | None = None) -> JSON:
    node: JSON = {"type": "integer"}
    if default is not None:
        node["default"] = default
    return node


def boolean(*, default: bool | None = None) -> JSON:
    node: JSON = {"type": "boolean"}
    if default is not None:
        node["default"] = default
    return node


def quantity() -> JSON:
    """A Kubernetes quantity: ``"2Gi"``, ``"500m"`` or a plain integer."""
    return {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-int-or-string": True,
        "pattern": QUANTITY_PATTERN,
    }


def string_map() -> JSON:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def quantity_map() -> JSON:
    """``requests``/``limits``: resource name -> quantity."""
    return {"type": "object", "additionalProperties": quantity()}


def strings() -> JSON:
    return arr(string())


def unsupported(reason: str) -> JSON:
    """A valid upstream field that VMO refuses with ``reason`` whatever its value."""
    return {UNSUPPORTED_KEY: reason}


def unsupported_fields(reason: str, *names: str) -> dict[str, JSON]:
    """Several upstream fields refused for the same reason, ready to merge into properties."""
    return {name: unsupported(reason) for name in names}


def resource_schema(
    spec: JSON | None,
    status: JSON | None = None,
    *,
    spec_required: bool = True,
    top_level: Mapping[str, JSON] | None = None,
) -> JSON:
    """The whole-object schema: apiVersion, kind, metadata, then spec/status or other fields."""
    properties: dict[str, JSON] = {
        "apiVersion": string(),
        "kind": string(),
        # metadata is checked by the API server's ObjectMeta rules, not by the kind's schema
        "metadata": any_object(),
    }
    if spec is not None:
        properties["spec"] = spec
    if status is not None:
        properties["status"] = status
    properties.update(top_level or {})
    required = ["spec"] if spec is not None and spec_required else []
    return obj(properties, required=required)
