"""Structural OpenAPI v3 schemas: validation with Kubernetes field errors, and defaulting.

Every kind VMO serves (its own models and CRD-defined kinds alike) is checked by ``validate``
and defaulted by ``apply_defaults``, the way kube-apiserver treats a custom resource: unknown
fields are refused (strict field validation) except below ``x-kubernetes-preserve-unknown-fields``,
and the root ``metadata`` is left to the ObjectMeta rules.

Causes carry upstream's reasons and message bodies (``Required value``, ``Unsupported value: "x":
supported values: "a", "b"`` ...). Two reasons are VMO's:

- ``FieldValueUnknown`` marks an unknown field. Upstream answers those with a 400 BadRequest
  ``strict decoding error: unknown field "spec.foo"`` rather than a 422 cause; the server can
  tell them apart by this reason (see ``strict_decoding_message``). ``prune_unknown`` drops
  them instead, for ``fieldValidation=Ignore`` or ``Warn``.
- a schema node carrying ``x-vmo-unsupported: "<reason>"`` is an upstream field VMO's embedded
  engine does not implement: any value there is refused with ``FieldValueForbidden``.

A node with Kubernetes' quantity pattern is a quantity: its value is also parsed, so that one out
of range is refused (``"1e400"`` matches the pattern; see ``vmo.api.quantity``).

Field paths follow Go's ``field.Path``: ``spec.ports[0].port`` for list items and
``spec.selector[app]`` for the values of a map (``additionalProperties``).
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from vmo.api.quantity import QUANTITY_PATTERN, QuantityError, parse_quantity
from vmo.api.types import JSON, Cause

__all__ = [
    "DUPLICATE",
    "FORBIDDEN",
    "INVALID",
    "NOT_SUPPORTED",
    "REQUIRED",
    "TOO_LONG",
    "TOO_MANY",
    "TYPE_INVALID",
    "UNKNOWN",
    "UNSUPPORTED_KEY",
    "apply_defaults",
    "prune_unknown",
    "strict_decoding_message",
    "validate",
]

REQUIRED = "FieldValueRequired"
INVALID = "FieldValueInvalid"
NOT_SUPPORTED = "FieldValueNotSupported"
TYPE_INVALID = "FieldValueTypeInvalid"
TOO_LONG = "FieldValueTooLong"
TOO_MANY = "FieldValueTooMany"
DUPLICATE = "FieldValueDuplicate"
FORBIDDEN = "FieldValueForbidden"
UNKNOWN = "FieldValueUnknown"

UNSUPPORTED_KEY = "x-vmo-unsupported"
UNSUPPORTED_MESSAGE = "field not supported by VMO's embedded engine"
PRESERVE_KEY = "x-kubernetes-preserve-unknown-fields"
INT_OR_STRING_KEY = "x-kubernetes-int-or-string"
EMBEDDED_KEY = "x-kubernetes-embedded-resource"
LIST_TYPE_KEY = "x-kubernetes-list-type"
LIST_MAP_KEYS_KEY = "x-kubernetes-list-map-keys"

# Fields every embedded resource may carry whatever its schema lists.
_EMBEDDED_FIELDS = ("apiVersion", "kind", "metadata")
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


# --------------------------------------------------------------------------- paths and values


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _index(path: str, index: int) -> str:
    return f"{path}[{index}]"


def _map_key(path: str, key: str) -> str:
    return f"{path}[{key}]"


def _type_name(value: Any) -> str:
    """The JSON type of ``value`` as kube-openapi names it in its messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _shown(value: Any) -> str:
    """A value as a field error body shows it: strings quoted, the rest as compact JSON."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _invalid(path: str, value: Any, detail: str, reason: str = INVALID) -> Cause:
    return Cause(path, f"Invalid value: {_shown(value)}: {detail}", reason)


def _in_body(path: str) -> str:
    return f"{path or 'body'} in body"


# --------------------------------------------------------------------------- validation


def validate(schema: JSON, obj: Any, *, path: str = "") -> list[Cause]:
    """All the ways ``obj`` breaks ``schema``; empty means valid.

    ``path`` is the field path of ``obj`` inside its object; at the root (empty path) a
    ``metadata`` field is left alone, since ObjectMeta has its own rules.
    """
    return _node(schema, obj, path, strict=True)


def strict_decoding_message(causes: Sequence[Cause]) -> str | None:
    """Upstream's 400 message for the unknown fields among ``causes``, or None if there are none."""
    unknown = [c.field for c in causes if c.reason == UNKNOWN]
    if not unknown:
        return None
    return "strict decoding error: " + ", ".join(f'unknown field "{f}"' for f in unknown)


def _node(schema: JSON, value: Any, path: str, *, strict: bool) -> list[Cause]:
    if UNSUPPORTED_KEY in schema:
        return [
            Cause(path, f"Forbidden: {UNSUPPORTED_MESSAGE}: {schema[UNSUPPORTED_KEY]}", FORBIDDEN)
        ]
    if value is None:
        return _null(schema, path)
    type_error = _type_error(schema, value, path)
    if type_error is not None:
        return [type_error]
    causes = _scalar_checks(schema, value, path)
    if isinstance(value, list):
        causes += _array(schema, value, path, strict=strict)
    elif isinstance(value, dict):
        causes += _object(schema, value, path, strict=strict)
    causes += _combinators(schema, value, path)
    return causes


def _null(schema: JSON, path: str) -> list[Cause]:
    if schema.get("nullable") or not (schema.get("type") or schema.get(INT_OR_STRING_KEY)):
        return []
    expected = schema.get("type") or "integer or string"
    return [_type_mismatch(path, None, expected)]


def _type_mismatch(path: str, value: Any, expected: str) -> Cause:
    actual = _type_name(value)
    return Cause(
        path,
        f'Invalid value: "{actual}": {_in_body(path)} must be of type {expected}: "{actual}"',
        TYPE_INVALID,
    )


def _type_error(schema: JSON, value: Any, path: str) -> Cause | None:
    expected = schema.get("type")
    if schema.get(INT_OR_STRING_KEY) and not expected:
        ok = isinstance(value, str) or _is_integer(value)
        return None if ok else _type_mismatch(path, value, "integer or string")
    if not expected:
        return None
    return None if _has_type(value, expected) else _type_mismatch(path, value, expected)


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    # JSON decoders may hand over 3.0 for 3; kube-openapi accepts integral floats as integers.
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _has_type(value: Any, expected: str) -> bool:
    if expected == "object":
        return isinstance(value, dict)
    if expected == "array":
        return isinstance(value, list)
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":
        return _is_integer(value)
    if expected == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True


def _scalar_checks(schema: JSON, value: Any, path: str) -> list[Cause]:
    causes = _enum(schema, value, path)
    if isinstance(value, str):
        causes += _string(schema, value, path)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        causes += _number(schema, value, path)
    if not causes and schema.get("pattern") == QUANTITY_PATTERN:
        causes += _quantity(value, path)
    return causes


def _quantity(value: Any, path: str) -> list[Cause]:
    """What the pattern of a quantity cannot see: its range (``"1e400"`` matches it)."""
    try:
        parse_quantity(int(value) if isinstance(value, float) else value)
    except QuantityError as exc:
        return [_invalid(path, value, str(exc))]
    return []


def _enum(schema: JSON, value: Any, path: str) -> list[Cause]:
    allowed = schema.get("enum")
    if allowed is None or value in allowed:
        return []
    listed = ", ".join(_shown(a) for a in allowed)
    return [
        Cause(
            path, f"Unsupported value: {_shown(value)}: supported values: {listed}", NOT_SUPPORTED
        )
    ]


def _string(schema: JSON, value: str, path: str) -> list[Cause]:
    causes: list[Cause] = []
    max_length = schema.get("maxLength")
    if max_length is not None and len(value) > max_length:
        causes.append(Cause(path, f"Too long: may not be more than {max_length} bytes", TOO_LONG))
    min_length = schema.get("minLength")
    if min_length is not None and len(value) < min_length:
        detail = f"{_in_body(path)} should be at least {min_length} chars long"
        causes.append(_invalid(path, value, detail))
    pattern = schema.get("pattern")
    if pattern is not None and not _compiled(pattern).search(value):
        causes.append(_invalid(path, value, f"{_in_body(path)} should match '{pattern}'"))
    causes += _string_format(schema.get("format"), value, path)
    return causes


@lru_cache(maxsize=512)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _string_format(fmt: str | None, value: str, path: str) -> list[Cause]:
    if fmt == "date-time" and not _DATE_TIME.fullmatch(value):
        return [_invalid(path, value, f"{_in_body(path)} must be of type date-time")]
    if fmt == "byte":
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return [_invalid(path, "<value omitted>", "illegal base64 data")]
    return []


def _number(schema: JSON, value: float, path: str) -> list[Cause]:
    causes: list[Cause] = []
    limits = _INT_RANGES.get(schema.get("format") or "")
    if limits is not None and not limits[0] <= value <= limits[1]:
        causes.append(_invalid(path, value, f"{_in_body(path)} must be of type {schema['format']}"))
    minimum = schema.get("minimum")
    if minimum is not None:
        exclusive = bool(schema.get("exclusiveMinimum"))
        if value < minimum or (exclusive and value == minimum):
            relation = "greater than" if exclusive else "greater than or equal to"
            causes.append(_invalid(path, value, f"{_in_body(path)} should be {relation} {minimum}"))
    maximum = schema.get("maximum")
    if maximum is not None:
        exclusive = bool(schema.get("exclusiveMaximum"))
        if value > maximum or (exclusive and value == maximum):
            relation = "less than" if exclusive else "less than or equal to"
            causes.append(_invalid(path, value, f"{_in_body(path)} should be {relation} {maximum}"))
    return causes


def _array(schema: JSON, value: list[Any], path: str, *, strict: bool) -> list[Cause]:
    causes: list[Cause] = []
    max_items = schema.get("maxItems")
    if max_items is not None and len(value) > max_items:
        message = f"Too many: {len(value)}: must have at most {max_items} items"
        causes.append(Cause(path, message, TOO_MANY))
    min_items = schema.get("minItems")
    if min_items is not None and len(value) < min_items:
        detail = f"{_in_body(path)} should have at least {min_items} items"
        causes.append(_invalid(path, value, detail))
    items = schema.get("items")
    if isinstance(items, dict):
        for index, item in enumerate(value):
            causes += _node(items, item, _index(path, index), strict=strict)
    causes += _list_uniqueness(schema, value, path)
    return causes


def _list_uniqueness(schema: JSON, value: list[Any], path: str) -> list[Cause]:
    list_type = schema.get(LIST_TYPE_KEY)
    if list_type == "set":
        keys = [_shown(item) for item in value]
        shown = [_shown(item) for item in value]
    elif list_type == "map":
        keys, shown = _map_keys(schema, value)
    else:
        return []
    seen: set[str] = set()
    causes = []
    for index, key in enumerate(keys):
        if key in seen:
            causes.append(Cause(_index(path, index), f"Duplicate value: {shown[index]}", DUPLICATE))
        seen.add(key)
    return causes


def _map_keys(schema: JSON, value: list[Any]) -> tuple[list[str], list[str]]:
    """Each item's list-map key (missing keys take their schema default, as upstream does)."""
    names = schema.get(LIST_MAP_KEYS_KEY) or []
    properties = (schema.get("items") or {}).get("properties") or {}
    keys, shown = [], []
    for item in value:
        entry = item if isinstance(item, dict) else {}
        key = {n: entry.get(n, (properties.get(n) or {}).get("default")) for n in names}
        keys.append(_shown(key))
        shown.append(_shown({n: v for n, v in key.items() if v is not None}))
    return keys, shown


def _object(schema: JSON, value: JSON, path: str, *, strict: bool) -> list[Cause]:
    properties: JSON = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    open_ended = bool(schema.get(PRESERVE_KEY)) or additional is True or not strict
    embedded = bool(schema.get(EMBEDDED_KEY))
    causes = _required(schema, value, path)
    if embedded:
        causes += _embedded(value, path)
    for key, item in value.items():
        if not path and key == "metadata":
            continue  # ObjectMeta is validated by the server's own rules
        if key in properties:
            causes += _node(properties[key], item, _child(path, key), strict=strict)
        elif isinstance(additional, dict):
            causes += _node(additional, item, _map_key(path, key), strict=strict)
        elif embedded and key in _EMBEDDED_FIELDS:
            continue
        elif not open_ended and _is_closed(schema):
            field = _child(path, key)
            causes.append(Cause(field, f'unknown field "{field}"', UNKNOWN))
    return causes


def _is_closed(schema: JSON) -> bool:
    """Whether a node refuses fields it does not list: typed objects do; typeless nodes do not."""
    return schema.get("type") == "object" or "properties" in schema


def _required(schema: JSON, value: JSON, path: str) -> list[Cause]:
    return [
        Cause(_child(path, name), "Required value", REQUIRED)
        for name in schema.get("required") or ()
        if value.get(name) is None
    ]


def _embedded(value: JSON, path: str) -> list[Cause]:
    causes = [
        Cause(_child(path, name), "Required value: must not be empty", REQUIRED)
        for name in ("apiVersion", "kind")
        if not value.get(name)
    ]
    metadata = value.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        causes.append(_type_mismatch(_child(path, "metadata"), metadata, "object"))
    return causes


def _combinators(schema: JSON, value: Any, path: str) -> list[Cause]:
    causes: list[Cause] = []
    for branch in schema.get("allOf") or ():
        causes += _node(branch, value, path, strict=False)
    any_of = schema.get("anyOf")
    if any_of:
        outcomes = [_node(branch, value, path, strict=False) for branch in any_of]
        if all(outcomes):
            causes.append(_invalid(path, value, "must validate at least one schema (anyOf)"))
            causes += _first_distinct(outcomes)
    one_of = schema.get("oneOf")
    if one_of:
        outcomes = [_node(branch, value, path, strict=False) for branch in one_of]
        passing = sum(1 for outcome in outcomes if not outcome)
        if passing != 1:
            causes.append(_invalid(path, value, "must validate one and only one schema (oneOf)"))
            causes += _first_distinct(outcomes) if passing == 0 else []
    negated = schema.get("not")
    if isinstance(negated, dict) and not _node(negated, value, path, strict=False):
        causes.append(_invalid(path, value, "must not validate the schema (not)"))
    return causes


def _first_distinct(outcomes: list[list[Cause]]) -> list[Cause]:
    """The causes of every failed branch, each once, so that the user sees what each wanted."""
    seen: dict[Cause, None] = {}
    for outcome in outcomes:
        for cause in outcome:
            seen.setdefault(cause, None)
    return list(seen)


# --------------------------------------------------------------------------- defaulting


def apply_defaults(schema: JSON, obj: Any) -> None:
    """Fill ``default`` values into ``obj`` in place, as a CRD's structural defaulting does.

    Defaults apply to absent properties of objects that are present (and inside inserted
    defaults), to every array item and to every map value. A ``null`` in a property that is
    not ``nullable`` is dropped first, so that its default (if any) applies, as upstream prunes it.
    """
    _default(schema, obj, root=True)


def _default(schema: JSON, value: Any, *, root: bool = False) -> None:
    if isinstance(value, dict):
        _default_object(schema, value, root=root)
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for item in value:
                _default(items, item)


def _default_object(schema: JSON, value: JSON, *, root: bool) -> None:
    properties: JSON = schema.get("properties") or {}
    for key, sub in properties.items():
        if root and key == "metadata":
            continue
        if key in value and value[key] is None and not sub.get("nullable"):
            del value[key]
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
    additional = schema.get("additionalProperties")
    for key, item in value.items():
        if root and key == "metadata":
            continue
        sub = properties.get(key, additional if key not in properties else None)
        if isinstance(sub, dict):
            _default(sub, item)


# --------------------------------------------------------------------------- pruning


def prune_unknown(schema: JSON, obj: Any, *, path: str = "") -> list[str]:
    """Drop the fields ``validate`` would call unknown, in place; returns their field paths.

    This is what ``fieldValidation=Ignore`` (silently) and ``Warn`` (with one warning per
    path) do upstream instead of refusing the request.
    """
    if isinstance(obj, list):
        items = schema.get("items")
        if not isinstance(items, dict):
            return []
        return [
            p
            for i, item in enumerate(obj)
            for p in prune_unknown(items, item, path=_index(path, i))
        ]
    if not isinstance(obj, dict):
        return []
    return _prune_object(schema, obj, path)


def _prune_object(schema: JSON, obj: JSON, path: str) -> list[str]:
    properties: JSON = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    keep_all = bool(schema.get(PRESERVE_KEY)) or additional is True or not _is_closed(schema)
    embedded = bool(schema.get(EMBEDDED_KEY))
    pruned: list[str] = []
    for key in list(obj):
        if not path and key == "metadata":
            continue
        if key in properties:
            pruned += prune_unknown(properties[key], obj[key], path=_child(path, key))
        elif isinstance(additional, dict):
            pruned += prune_unknown(additional, obj[key], path=_map_key(path, key))
        elif not keep_all and not (embedded and key in _EMBEDDED_FIELDS):
            del obj[key]
            pruned.append(_child(path, key))
    return pruned
