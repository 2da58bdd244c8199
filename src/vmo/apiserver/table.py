"""Server-side printing: objects to the ``meta.k8s.io/v1`` ``Table`` that ``kubectl get`` shows.

Columns come from the kind's printer columns, evaluated with the small JSONPath dialect that
``additionalPrinterColumns`` use; cells are typed as a CRD's table convertor types them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from vmo.api.pods import COMPUTED_CELLS as POD_CELLS
from vmo.api.storage import COMPUTED_CELLS as STORAGE_CELLS
from vmo.api.types import JSON, PrinterColumn

__all__ = [
    "AGE_COLUMN",
    "JsonPathError",
    "TableError",
    "human_duration",
    "jsonpath",
    "to_table",
]

TABLE_API_VERSION = "meta.k8s.io/v1"

AGE_COLUMN = PrinterColumn(
    name="Age",
    type="date",
    json_path=".metadata.creationTimestamp",
    description="Time since the object was created",
)

_NAME_COLUMN: JSON = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "description": "Name of the object, unique among objects of its kind in its namespace",
    "priority": 0,
}

_INCLUDE_OBJECT = ("Metadata", "Object", "None")


class TableError(ValueError):
    """A Table request the server must refuse (400), e.g. an unknown ``includeObject``."""


class JsonPathError(ValueError):
    """A printer column path outside the supported JSONPath dialect."""


# --------------------------------------------------------------------------- tables


def to_table(
    objs: list[JSON],
    columns: Sequence[PrinterColumn],
    *,
    include_object: str = "Metadata",
    resource_version: str,
    continue_token: str = "",
    remaining_item_count: int | None = None,
    now: datetime | None = None,
    api_version: str = TABLE_API_VERSION,
) -> JSON:
    """Render ``objs`` as a Table; no columns means Kubernetes' defaults (Name and Age)."""
    mode = include_object or "Metadata"
    if mode not in _INCLUDE_OBJECT:
        raise TableError(f'unrecognized includeObject value: "{include_object}"')
    columns = tuple(columns) or (AGE_COLUMN,)
    paths = [_compile(c.json_path) for c in columns]
    moment = now or datetime.now(UTC)
    rows = [
        {
            "cells": [
                _name_cell(obj),
                *(_cell(c, p, obj, moment) for c, p in zip(columns, paths, strict=True)),
            ],
            "object": _row_object(obj, mode, api_version),
        }
        for obj in objs
    ]
    metadata: JSON = {"resourceVersion": resource_version}
    if continue_token:
        metadata["continue"] = continue_token
    if remaining_item_count is not None:
        metadata["remainingItemCount"] = remaining_item_count
    return {
        "kind": "Table",
        "apiVersion": api_version,
        "metadata": metadata,
        "columnDefinitions": [_NAME_COLUMN, *(_column_definition(c) for c in columns)],
        "rows": rows,
    }


def _name_cell(obj: JSON) -> str:
    """The Name cell; a default StorageClass reads "NAME (default)", as upstream prints it."""
    md = obj.get("metadata", {})
    name = str(md.get("name", ""))
    default = (md.get("annotations") or {}).get("storageclass.kubernetes.io/is-default-class")
    if obj.get("kind") == "StorageClass" and default == "true":
        return f"{name} (default)"
    return name


def _column_definition(column: PrinterColumn) -> JSON:
    description = column.description or (
        f"Custom resource definition column (in JSONPath format): {column.json_path}"
    )
    return {
        "name": column.name,
        "type": column.type,
        "format": column.format,
        "description": description,
        "priority": column.priority,
    }


def _row_object(obj: JSON, mode: str, api_version: str) -> JSON | None:
    if mode == "None":
        return None
    if mode == "Object":
        return obj
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": api_version,
        "metadata": obj.get("metadata", {}),
    }


COMPUTED_CELLS = {**POD_CELLS, **STORAGE_CELLS}


def _cell(column: PrinterColumn, path: list[_Step], obj: JSON, now: datetime) -> Any:
    """A cell as the CRD table convertor makes it; None (kubectl prints ``<none>``) if absent."""
    kind = (str(obj.get("apiVersion", "")), str(obj.get("kind", "")), column.name)
    computed = COMPUTED_CELLS.get(kind)
    if computed is not None:
        return computed(obj)
    try:
        results = _evaluate(path, obj)
    except JsonPathError:
        return None
    if not results:
        return None
    value = results[0]
    if column.type == "string":
        return _print_value(value)
    return _typed_cell(column.type, value, now)


def _typed_cell(column_type: str, value: Any, now: datetime) -> Any:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if column_type == "integer" and is_number:
        return int(value)  # a float truncates toward zero, as Go's int64() does
    if column_type == "number" and is_number:
        return float(value)
    if column_type == "boolean" and isinstance(value, bool):
        return value
    if column_type == "date" and isinstance(value, str):
        return _age(value, now)
    return None


def _age(timestamp: str, now: datetime) -> str:
    if timestamp in ("", "null"):
        return "<unknown>"
    try:
        moment = parse_rfc3339(timestamp)
    except ValueError:
        return "<invalid>"
    return human_duration(now - moment)


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp with zone, as Kubernetes serialises ``metav1.Time``."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", text):
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _print_value(value: Any) -> str | None:
    """A value as ``kubectl``'s JSONPath printer writes it: objects and lists as compact JSON."""
    if value is None:
        return None
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    return str(value)


def go_float(value: float) -> str:
    """Format a float as Go's ``%v`` does: shortest digits, exponent form from 1e6, below 1e-4."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign, digit_tuple, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)) or "0"
    point = len(digits) + exponent  # position of the decimal point in ``digits``
    scientific = point - 1
    prefix = "-" if sign else ""
    if value == 0:
        return f"{prefix}0"
    if scientific < -4 or scientific >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{prefix}{mantissa}e{'-' if scientific < 0 else '+'}{abs(scientific):02d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{prefix}{digits}{'0' * (point - len(digits))}"
    return f"{prefix}{digits[:point]}.{digits[point:]}"


def human_duration(delta: timedelta) -> str:
    """A duration as ``kubectl`` ages read: ``45s``, ``5m3s``, ``3h2m``, ``2d``, ``3y40d``."""
    seconds = int(delta.total_seconds())  # int() truncates toward zero, as Go's does
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return _two_units(minutes, "m", seconds % 60, "s")
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return _two_units(hours, "h", minutes % 60, "m")
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return _two_units(hours // 24, "d", hours % 24, "h")
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        return _two_units(hours // 24 // 365, "y", (hours // 24) % 365, "d")
    return f"{hours // 24 // 365}y"


def _two_units(major: int, major_unit: str, minor: int, minor_unit: str) -> str:
    return f"{major}{major_unit}{minor}{minor_unit}" if minor else f"{major}{major_unit}"


# --------------------------------------------------------------------------- JSONPath


@dataclass(frozen=True)
class _Step:
    """One path step: ``field``, ``index``, ``slice``, ``wildcard`` or ``filter``."""

    kind: str
    name: str = ""
    index: int = 0
    bounds: tuple[int | None, int | None, int | None] = (None, None, None)
    left: tuple[_Step, ...] = ()
    operator: str = ""
    literal: Any = None


def jsonpath(obj: Any, expr: str) -> list[Any]:
    """All values ``expr`` selects in ``obj``; missing keys select nothing."""
    return _evaluate(_compile(expr), obj)


def _compile(expr: str) -> list[_Step]:
    text = expr.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    if text.startswith("$"):
        text = text[1:]
    return list(_parse_steps(text, expr))


def _parse_steps(text: str, expr: str) -> list[_Step]:
    steps: list[_Step] = []
    position = 0
    while position < len(text):
        char = text[position]
        if text.startswith("..", position):
            raise JsonPathError(f"recursive descent is not supported: {expr!r}")
        if char == ".":
            name, position = _read_field(text, position + 1)
            steps.append(_Step("wildcard") if name == "*" else _Step("field", name=name))
        elif char == "[":
            end = _closing_bracket(text, position, expr)
            steps.append(_bracket_step(text[position + 1 : end].strip(), expr))
            position = end + 1
        elif char.isspace():
            position += 1
        else:
            raise JsonPathError(f"unexpected {char!r} at {position} in {expr!r}")
    return steps


def _read_field(text: str, position: int) -> tuple[str, int]:
    name: list[str] = []
    while position < len(text) and text[position] not in ".[ ":
        if text[position] == "\\" and position + 1 < len(text):
            position += 1  # "\." keeps a dot inside a key such as kubevirt\.io/size
        name.append(text[position])
        position += 1
    return "".join(name), position


def _closing_bracket(text: str, start: int, expr: str) -> int:
    depth, quote = 0, ""
    for position in range(start, len(text)):
        char = text[position]
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
            if depth == 0:
                return position
    raise JsonPathError(f"unclosed '[' in {expr!r}")


def _bracket_step(inner: str, expr: str) -> _Step:
    if inner == "*":
        return _Step("wildcard")
    if inner.startswith("?(") and inner.endswith(")"):
        return _filter_step(inner[2:-1].strip(), expr)
    if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
        return _Step("field", name=inner[1:-1])
    if re.fullmatch(r"-?\d+", inner):
        return _Step("index", index=int(inner))
    if match := re.fullmatch(r"(-?\d*):(-?\d*)(?::(-?\d*))?", inner):
        start, stop, step = (int(g) if g else None for g in match.groups())
        return _Step("slice", bounds=(start, stop, step))
    raise JsonPathError(f"unsupported subscript [{inner}] in {expr!r}")


_FILTER_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")


def _filter_step(condition: str, expr: str) -> _Step:
    split = _split_condition(condition)
    left_text = split[0] if split else condition
    if not left_text.startswith("@"):
        raise JsonPathError(f"a filter must start with '@' in {expr!r}")
    left = tuple(_parse_steps(left_text[1:], expr))
    if split is None:
        return _Step("filter", left=left, operator="exists")
    return _Step("filter", left=left, operator=split[1], literal=_literal(split[2], expr))


def _split_condition(condition: str) -> tuple[str, str, str] | None:
    quote = ""
    for position, char in enumerate(condition):
        if quote:
            quote = "" if char == quote else quote
            continue
        if char in "'\"":
            quote = char
            continue
        for operator in _FILTER_OPERATORS:
            if condition.startswith(operator, position):
                right = condition[position + len(operator) :]
                return condition[:position].strip(), operator, right.strip()
    return None


def _literal(text: str, expr: str) -> Any:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text) if re.fullmatch(r"-?\d+", text) else float(text)
    except ValueError:
        raise JsonPathError(f"unsupported filter operand {text!r} in {expr!r}") from None


def _evaluate(steps: Sequence[_Step], obj: Any) -> list[Any]:
    current = [obj]
    for step in steps:
        current = [result for node in current for result in _apply_step(step, node)]
    return current


def _apply_step(step: _Step, node: Any) -> list[Any]:
    if step.kind == "field":
        return [node[step.name]] if isinstance(node, dict) and step.name in node else []
    if step.kind == "wildcard":
        if isinstance(node, dict):
            return list(node.values())
        return list(node) if isinstance(node, list) else []
    if not isinstance(node, list):
        return []
    if step.kind == "index":
        in_range = -len(node) <= step.index < len(node)
        return [node[step.index]] if in_range else []
    if step.kind == "slice":
        return node[slice(*step.bounds)]
    return [item for item in node if _filter_matches(step, item)]


def _filter_matches(step: _Step, item: Any) -> bool:
    lefts = _evaluate(step.left, item)
    if not lefts:
        return False
    if step.operator == "exists":
        return True
    return _compare(lefts[0], step.operator, step.literal)


def _compare(left: Any, operator: str, right: Any) -> bool:
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (left, right))
    comparable = numbers or type(left) is type(right)
    if operator == "==":
        return comparable and bool(left == right)
    if operator == "!=":
        return not (comparable and bool(left == right))
    if not comparable or isinstance(left, bool | dict | list | None):
        return False
    return bool(
        {
            "<": left < right,
            ">": left > right,
            "<=": left <= right,
            ">=": left >= right,
        }[operator]
    )
