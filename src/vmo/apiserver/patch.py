"""The three patch formats a Kubernetes API server accepts, applied to plain JSON objects.

``json_merge_patch`` (RFC 7386), ``json_patch`` (RFC 6902) and ``strategic_merge_patch`` (the
Kubernetes format driven by the kind's schema) are pure: they never modify their arguments and
raise ``PatchError`` for a patch that cannot apply. The server maps ``PatchError`` to a 422/400.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmo.api.types import JSON

__all__ = [
    "ApplyConflict",
    "PatchError",
    "json_equal",
    "json_merge_patch",
    "json_patch",
    "record_update",
    "server_side_apply",
    "strategic_merge_patch",
]


class PatchError(ValueError):
    """A patch that cannot be applied; ``op_index`` and ``path`` locate it when known."""

    def __init__(self, message: str, *, op_index: int | None = None, path: str = "") -> None:
        super().__init__(message)
        self.op_index = op_index
        self.path = path


# --------------------------------------------------------------------------- JSON equality


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``, ``1`` is ``1.0``, key order does not matter."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


# --------------------------------------------------------------------------- RFC 7386


def json_merge_patch(target: JSON, patch: JSON) -> JSON:
    """Apply an RFC 7386 merge patch; ``null`` deletes a member, lists are replaced whole."""
    if not isinstance(patch, dict):
        raise PatchError("a merge patch for an object must be a JSON object")
    result = _merge_value(target, patch)
    assert isinstance(result, dict)  # a dict patch always yields a dict
    return result


def _merge_value(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_value(result.get(key), value)
    return result


# --------------------------------------------------------------------------- RFC 6902


def json_patch(target: JSON, ops: list[JSON]) -> JSON:
    """Apply an RFC 6902 patch atomically: on any failure the target is left as it was."""
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a JSON array of operations")
    doc: Any = copy.deepcopy(target)
    for index, op in enumerate(ops):
        doc = _apply_op(doc, op, index)
    if not isinstance(doc, dict):
        raise PatchError("the patched document is not a JSON object")
    return doc


_OP_MEMBERS: dict[str, tuple[str, ...]] = {
    "add": ("value",),
    "remove": (),
    "replace": ("value",),
    "move": ("from",),
    "copy": ("from",),
    "test": ("value",),
}


def _apply_op(doc: Any, op: Any, index: int) -> Any:
    if not isinstance(op, dict):
        raise PatchError(f"op {index}: an operation must be a JSON object", op_index=index)
    name, path = op.get("op"), op.get("path")
    if not isinstance(path, str):
        raise PatchError(f"op {index}: missing or invalid 'path'", op_index=index)
    where = f"op {index} ({name} {path})"
    if name not in _OP_MEMBERS:
        raise PatchError(f"{where}: unknown operation {name!r}", op_index=index, path=path)
    for member in _OP_MEMBERS[name]:
        if member not in op:
            raise PatchError(f"{where}: missing {member!r}", op_index=index, path=path)
    try:
        return _OP_FUNCS[name](doc, op)
    except _PointerError as err:
        raise PatchError(f"{where}: {err}", op_index=index, path=path) from None


class _PointerError(Exception):
    """A JSON pointer that does not resolve; turned into a ``PatchError`` naming the op."""


def parse_pointer(pointer: str) -> list[str]:
    """Split an RFC 6901 pointer into unescaped reference tokens."""
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise _PointerError(f"invalid JSON pointer {pointer!r}: must start with '/'")
    tokens = pointer[1:].split("/")
    for token in tokens:
        if re.search(r"~(?![01])", token):
            raise _PointerError(f"invalid escape in JSON pointer token {token!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in tokens]


def _list_index(token: str, length: int, *, for_insert: bool) -> int:
    if for_insert and token == "-":
        return length
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise _PointerError(f"invalid array index {token!r}")
    index = int(token)
    limit = length if for_insert else length - 1
    if index > limit:
        raise _PointerError(f"array index {index} out of bounds (length {length})")
    return index


def _resolve(doc: Any, tokens: Sequence[str]) -> Any:
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                raise _PointerError("path not found")
            node = node[token]
        elif isinstance(node, list):
            node = node[_list_index(token, len(node), for_insert=False)]
        else:
            raise _PointerError("path not found")
    return node


def _parent(doc: Any, tokens: Sequence[str]) -> Any:
    parent = _resolve(doc, tokens[:-1])
    if not isinstance(parent, dict | list):
        raise _PointerError("parent of the path is not an object or array")
    return parent


def _add(doc: Any, tokens: Sequence[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _parent(doc, tokens), tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    else:
        parent.insert(_list_index(last, len(parent), for_insert=True), value)
    return doc


def _remove(doc: Any, tokens: Sequence[str]) -> Any:
    """Remove the target and return it."""
    if not tokens:
        raise _PointerError("cannot remove the whole document")
    parent, last = _parent(doc, tokens), tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _PointerError("path not found")
        return parent.pop(last)
    return parent.pop(_list_index(last, len(parent), for_insert=False))


def _op_add(doc: Any, op: JSON) -> Any:
    return _add(doc, parse_pointer(op["path"]), copy.deepcopy(op["value"]))


def _op_remove(doc: Any, op: JSON) -> Any:
    _remove(doc, parse_pointer(op["path"]))
    return doc


def _op_replace(doc: Any, op: JSON) -> Any:
    tokens = parse_pointer(op["path"])
    _resolve(doc, tokens)  # the target must exist
    if not tokens:
        return copy.deepcopy(op["value"])
    parent = _parent(doc, tokens)
    key: Any = tokens[-1] if isinstance(parent, dict) else int(tokens[-1])
    parent[key] = copy.deepcopy(op["value"])
    return doc


def _source(op: JSON) -> list[str]:
    source = op["from"]
    if not isinstance(source, str):
        raise _PointerError("'from' must be a string")
    return parse_pointer(source)


def _op_move(doc: Any, op: JSON) -> Any:
    source, target = _source(op), parse_pointer(op["path"])
    if source == target:
        _resolve(doc, source)
        return doc
    if target[: len(source)] == source:
        raise _PointerError("cannot move a value into one of its own children")
    return _add(doc, target, _remove(doc, source))


def _op_copy(doc: Any, op: JSON) -> Any:
    value = copy.deepcopy(_resolve(doc, _source(op)))
    return _add(doc, parse_pointer(op["path"]), value)


def _op_test(doc: Any, op: JSON) -> Any:
    if not json_equal(_resolve(doc, parse_pointer(op["path"])), op["value"]):
        raise _PointerError("test failed: value differs")
    return doc


_OP_FUNCS: dict[str, Callable[[Any, JSON], Any]] = {
    "add": _op_add,
    "remove": _op_remove,
    "replace": _op_replace,
    "move": _op_move,
    "copy": _op_copy,
    "test": _op_test,
}


# --------------------------------------------------------------------------- strategic merge

_DIRECTIVE = "$patch"
_RETAIN_KEYS = "$retainKeys"
_DELETE_PREFIX = "$deleteFromPrimitiveList/"
_ORDER_PREFIX = "$setElementOrder/"

# ObjectMeta's patch tags, which hold for every kind whatever its schema says about metadata.
_OBJECT_META_FIELDS: JSON = {
    "finalizers": {
        "type": "array",
        "items": {"type": "string"},
        "x-kubernetes-patch-strategy": "merge",
    },
    "ownerReferences": {
        "type": "array",
        "items": {"type": "object"},
        "x-kubernetes-patch-strategy": "merge",
        "x-kubernetes-patch-merge-key": "uid",
    },
}


@dataclass(frozen=True)
class _FieldMeta:
    """How one field merges: its schema node, list/map strategy and list merge keys."""

    schema: JSON | None
    strategy: str  # "merge", "replace" or "" (lists replace, maps merge)
    merge_keys: tuple[str, ...]

    @property
    def items(self) -> JSON | None:
        items = self.schema.get("items") if self.schema else None
        return items if isinstance(items, dict) else None


def strategic_merge_patch(target: JSON, patch: JSON, schema: JSON | None) -> JSON:
    """Apply a Kubernetes strategic merge patch, reading list strategies from ``schema``.

    ``schema`` is the kind's structural OpenAPI v3 schema; lists it marks with
    ``x-kubernetes-patch-strategy: merge`` (or as ``x-kubernetes-list-type: map``) merge by key,
    all other lists are replaced. ObjectMeta's own tags (finalizers, ownerReferences by uid)
    apply whatever the schema.
    """
    if not isinstance(patch, dict):
        raise PatchError("a strategic merge patch must be a JSON object")
    result = _sm_map(copy.deepcopy(target), copy.deepcopy(patch), _with_object_meta(schema))
    return result if result is not None else {}


def _with_object_meta(schema: JSON | None) -> JSON:
    root: JSON = dict(schema) if schema else {"type": "object"}
    properties = dict(root.get("properties") or {})
    meta: JSON = dict(properties.get("metadata") or {"type": "object"})
    meta_props = dict(meta.get("properties") or {})
    for name, tags in _OBJECT_META_FIELDS.items():
        meta_props[name] = {**tags, **(meta_props.get(name) or {})}
    meta["properties"] = meta_props
    properties["metadata"] = meta
    root["properties"] = properties
    return root


def _field_meta(schema: JSON | None, key: str) -> _FieldMeta:
    node: Any = None
    if schema:
        properties = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        if key in properties:
            node = properties[key]
        elif isinstance(additional, dict):
            node = additional
    if not isinstance(node, dict):
        return _FieldMeta(None, "", ())
    strategies = [s for s in str(node.get("x-kubernetes-patch-strategy", "")).split(",") if s]
    strategy = next((s for s in strategies if s != "retainKeys"), "")
    merge_keys: tuple[str, ...] = ()
    if merge_key := node.get("x-kubernetes-patch-merge-key"):
        merge_keys = (str(merge_key),)
    elif node.get("x-kubernetes-list-type") == "map":
        merge_keys = tuple(node.get("x-kubernetes-list-map-keys") or ())
        strategy = strategy or "merge"
    return _FieldMeta(node, strategy, merge_keys)


def _sm_map(original: JSON | None, patch: JSON, schema: JSON | None) -> JSON | None:
    """Merge ``patch`` into ``original`` (both owned); None means the map is deleted."""
    if _DIRECTIVE in patch:
        directive = patch.pop(_DIRECTIVE)
        if directive == "replace":
            replaced: JSON = _strip_directives(patch)
            return replaced
        if directive == "delete":
            return None
        raise PatchError(f"invalid $patch directive {directive!r} in a map")
    result: JSON = original if original is not None else {}
    _apply_retain_keys(result, patch)
    _apply_element_orders(result, patch, schema)
    deletions = {k: v for k, v in patch.items() if k.startswith(_DELETE_PREFIX)}
    for key, value in patch.items():
        if key not in deletions:
            _sm_field(result, key, value, _field_meta(schema, key))
    for key, value in deletions.items():
        _delete_from_primitive_list(result, key.removeprefix(_DELETE_PREFIX), value)
    return result


def _sm_field(result: JSON, key: str, value: Any, meta: _FieldMeta) -> None:
    if value is None:
        result.pop(key, None)
        return
    current = result.get(key)
    if isinstance(value, dict) and (current is None or isinstance(current, dict)):
        if meta.strategy == "replace" and current is not None:
            result[key] = _strip_directives(value)
            return
        merged = _sm_map(current, value, meta.schema)
        if merged is None:
            result.pop(key, None)
        else:
            result[key] = merged
    elif isinstance(value, list) and (current is None or isinstance(current, list)):
        result[key] = _sm_list(current or [], value, meta)
    else:
        result[key] = _strip_directives(value)


def _strip_directives(value: Any) -> Any:
    """A patch value taken whole: drop nulls and directive markers it may carry."""
    if isinstance(value, dict):
        return {
            k: _strip_directives(v)
            for k, v in value.items()
            if v is not None and not k.startswith("$")
        }
    if isinstance(value, list):
        return [
            _strip_directives(v) for v in value if not (isinstance(v, dict) and _DIRECTIVE in v)
        ]
    return value


def _apply_retain_keys(original: JSON, patch: JSON) -> None:
    if _RETAIN_KEYS not in patch:
        return
    retain = patch.pop(_RETAIN_KEYS)
    if not isinstance(retain, list) or not all(isinstance(k, str) for k in retain):
        raise PatchError("$retainKeys must be a list of strings")
    for key, value in patch.items():
        if value is not None and not key.startswith("$") and key not in retain:
            raise PatchError(f"field {key!r} is in the patch but not in its $retainKeys list")
    for key in list(original):
        if key not in retain:
            del original[key]


def _delete_from_primitive_list(original: JSON, key: str, values: Any) -> None:
    if not isinstance(values, list):
        raise PatchError(f"{_DELETE_PREFIX}{key} must be a list")
    current = original.get(key)
    if isinstance(current, list):
        original[key] = [v for v in current if not any(json_equal(v, d) for d in values)]


# Lists ---------------------------------------------------------------------


def _sm_list(original: list[Any], patch: list[Any], meta: _FieldMeta) -> list[Any]:
    replace, patch = _split_replace_directive(patch)
    if meta.strategy != "merge" or replace:
        return [_strip_directives(v) for v in patch]
    if not original and not patch:
        return []
    if any(isinstance(v, dict) for v in [*original, *patch]):
        if not meta.merge_keys:
            raise PatchError("cannot merge lists of objects without a merge key")
        return _merge_object_list(original, patch, meta)
    merged = list(original)
    for value in patch:
        if not any(json_equal(value, m) for m in merged):
            merged.append(value)
    return _order_merged(merged, patch, original, _identity_of(()))


def _split_replace_directive(patch: list[Any]) -> tuple[bool, list[Any]]:
    """A ``{"$patch": "replace"}`` element turns the list into a plain replacement."""
    marker = [v for v in patch if isinstance(v, dict) and v.get(_DIRECTIVE) == "replace"]
    if not marker:
        return False, patch
    return True, [v for v in patch if not (isinstance(v, dict) and _DIRECTIVE in v)]


def _identity_of(keys: tuple[str, ...]) -> Callable[[Any], Any]:
    if not keys:
        return lambda item: item
    return lambda item: tuple(item.get(k) for k in keys) if isinstance(item, dict) else item


def _merge_object_list(original: list[Any], patch: list[Any], meta: _FieldMeta) -> list[Any]:
    identity = _identity_of(meta.merge_keys)
    merged = list(original)
    plain: list[Any] = []
    for item in patch:
        if not isinstance(item, dict):
            raise PatchError("list elements must all be objects in a list merged by key")
        if all(k not in item for k in meta.merge_keys):
            raise PatchError(f"{item} does not contain declared merge key: {meta.merge_keys[0]}")
        directive = item.get(_DIRECTIVE)
        if directive == "delete":
            merged = [m for m in merged if not json_equal(identity(m), identity(item))]
        elif directive is not None:
            raise PatchError(f"invalid $patch directive {directive!r} in a list element")
        else:
            plain.append(item)
    for item in plain:
        position = _find(merged, identity(item), identity)
        if position is None:
            merged.append(_sm_map(None, item, meta.items))
        else:
            merged[position] = _sm_map(merged[position], item, meta.items)
    return _order_merged(merged, plain, original, identity)


def _find(items: Sequence[Any], wanted: Any, identity: Callable[[Any], Any]) -> int | None:
    for position, item in enumerate(items):
        if json_equal(identity(item), wanted):
            return position
    return None


def _order_merged(
    merged: list[Any], order: list[Any], server_order: list[Any], identity: Callable[[Any], Any]
) -> list[Any]:
    """Order a merged list as Kubernetes does: patch order first, live order for the rest.

    Items named in ``order`` keep that relative order; items only on the server keep theirs, and
    are interleaved before a patch item only when the live list already had them before it.
    """
    ordered_ids = [identity(v) for v in order]
    in_order = [m for m in merged if _find(ordered_ids, identity(m), lambda x: x) is not None]
    server_only = [m for m in merged if _find(ordered_ids, identity(m), lambda x: x) is None]
    in_order.sort(key=lambda m: _find(ordered_ids, identity(m), lambda x: x) or 0)
    server_ids = [identity(v) for v in server_order]

    def live_index(item: Any) -> int | None:
        return _find(server_ids, identity(item), lambda x: x)

    result: list[Any] = []
    left, right = server_only, in_order
    while left and right:
        li, ri = live_index(left[0]), live_index(right[0])
        if li is not None and ri is not None and li < ri:
            result.append(left.pop(0))
        else:
            result.append(right.pop(0))
    return result + left + right


def _apply_element_orders(original: JSON, patch: JSON, schema: JSON | None) -> None:
    """Process ``$setElementOrder/<field>``: merge that list now and order it as listed."""
    for key in [k for k in patch if k.startswith(_ORDER_PREFIX)]:
        order = patch.pop(key)
        field = key.removeprefix(_ORDER_PREFIX)
        if not isinstance(order, list):
            raise PatchError(f"{key} must be a list")
        meta = _field_meta(schema, field)
        current, update = original.get(field), patch.pop(field, None)
        if current is None and update is None:
            continue
        if not isinstance(current, list | None) or not isinstance(update, list | None):
            raise PatchError(f"{key} applies to a field that is not a list")
        merged = (
            _sm_list(current or [], update, meta) if update is not None else list(current or [])
        )
        identity = _identity_of(meta.merge_keys)
        original[field] = _order_merged(merged, order, current or [], identity)


# --------------------------------------------------------------------------- server-side apply

# Paths are tuples of fieldsV1 elements: "f:<name>", "k:<json keys>", "v:<json value>".
_FieldPath = tuple[str, ...]
_Owners = dict[tuple[str, str], set[_FieldPath]]  # (manager, operation) -> owned paths
_Stamps = dict[tuple[str, str], JSON]  # (manager, operation) -> apiVersion and time

# Server-owned metadata that no manager owns, as in Kubernetes' field manager.
_UNOWNED: frozenset[_FieldPath] = frozenset(
    {
        ("f:apiVersion",),
        ("f:kind",),
        *(
            ("f:metadata", f"f:{name}")
            for name in (
                "name",
                "namespace",
                "uid",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
                "selfLink",
            )
        ),
    }
)


class ApplyConflict(Exception):
    """Server-side apply touched fields another manager owns with a different value (409).

    ``conflicts`` lists (manager, field) pairs, field in dotted form such as ``.spec.running``.
    """

    def __init__(self, conflicts: Sequence[tuple[str, str]], api_version: str) -> None:
        self.conflicts = tuple(conflicts)
        count = len(self.conflicts)
        lines = [f'conflict with "{m}" using {api_version}: {f}' for m, f in self.conflicts]
        head = f"Apply failed with {count} conflict{'s' if count != 1 else ''}: "
        super().__init__(head + (lines[0] if count == 1 else "\n" + "\n".join(lines)))
        self.api_version = api_version


def server_side_apply(
    live: JSON | None,
    applied: JSON,
    *,
    manager: str,
    force: bool,
    schema: JSON | None,
    now: datetime | None = None,
) -> JSON:
    """Apply a configuration as ``manager`` owns it, recording ownership in managedFields.

    Fields the manager applied before and omits now are removed unless another manager owns
    them. Raises ``ApplyConflict`` when another manager owns an applied field whose value
    differs, unless ``force`` moves ownership to ``manager``.
    """
    base: JSON = copy.deepcopy(live) if live is not None else {}
    config = copy.deepcopy(applied)
    config.get("metadata", {}).pop("managedFields", None)
    effective = _with_object_meta(schema)
    owners, stamps = _read_managed_fields(base)
    applying = _owned_paths(config, effective) - _UNOWNED
    taken = _conflicts(base, config, applying, owners, manager)
    if taken and not force:
        raise ApplyConflict(_describe_conflicts(taken), str(config.get("apiVersion", "")))
    for other, path in taken:
        owners[(other[0], other[1])].discard(path)
    previous = owners.pop((manager, "Apply"), set())
    result: JSON = _apply_merge(base, config, effective)
    still_owned = set().union(*owners.values()) if owners else set()
    for path in _outermost(previous - applying - still_owned):
        _remove_path(result, path)
    owners[(manager, "Apply")] = applying
    moment = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    stamps[(manager, "Apply")] = {"apiVersion": str(config.get("apiVersion", "")), "time": moment}
    _write_managed_fields(result, owners, stamps)
    return result


def record_update(
    old: JSON | None,
    new: JSON,
    *,
    manager: str,
    schema: JSON | None,
    now: datetime | None = None,
) -> JSON:
    """``new`` with managedFields for a create/update/patch by ``manager`` (not an apply).

    Fields the write changed move to the manager's ``Update`` entry; updates never conflict.
    """
    result = copy.deepcopy(new)
    result.setdefault("metadata", {}).pop("managedFields", None)
    before: JSON = old or {}
    owners, stamps = _read_managed_fields(before)
    present = _owned_paths(result, _with_object_meta(schema)) - _UNOWNED
    changed = {p for p in present if _changed(before, result, p)}
    for key in owners:
        owners[key] = (owners[key] - changed) & present
    if changed:
        owners[(manager, "Update")] = owners.get((manager, "Update"), set()) | changed
        moment = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        stamps[(manager, "Update")] = {"apiVersion": str(new.get("apiVersion", "")), "time": moment}
    _write_managed_fields(result, owners, stamps)
    return result


def _changed(old: JSON, new: JSON, path: _FieldPath) -> bool:
    before, after = _value_at(old, path), _value_at(new, path)
    if before is _MISSING:
        return True
    # A keyed list item is "changed" only by appearing; its fields carry their own changes.
    if path[-1].startswith(("k:", "v:")) and isinstance(after, dict):
        return False
    return not json_equal(before, after)


def _outermost(paths: set[_FieldPath]) -> list[_FieldPath]:
    """Paths not inside another path of the set: removing a list item removes its fields."""
    return [p for p in paths if not any(p[:n] in paths for n in range(1, len(p)))]


def _list_kind(node: JSON | None) -> tuple[str, tuple[str, ...]]:
    """A list's ownership model: ("map", keys), ("set", ()) or ("atomic", ())."""
    if not node:
        return "atomic", ()
    if node.get("x-kubernetes-list-type") == "map":
        return "map", tuple(node.get("x-kubernetes-list-map-keys") or ())
    if node.get("x-kubernetes-list-type") == "set":
        return "set", ()
    strategy = str(node.get("x-kubernetes-patch-strategy", ""))
    if "merge" in strategy.split(","):
        key = node.get("x-kubernetes-patch-merge-key")
        return ("map", (str(key),)) if key else ("set", ())
    return "atomic", ()


def _item_key(item: Any, keys: tuple[str, ...]) -> str:
    identity = {k: item.get(k) for k in keys if k in item} if isinstance(item, dict) else {}
    return "k:" + _compact_json(identity)


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _owned_paths(value: Any, schema: JSON | None, prefix: _FieldPath = ()) -> set[_FieldPath]:
    if isinstance(value, dict) and value:
        paths: set[_FieldPath] = set()
        for key, child in value.items():
            child_schema = _field_meta(schema, key).schema
            paths |= _owned_paths(child, child_schema, (*prefix, f"f:{key}"))
        return paths
    if isinstance(value, list) and prefix:
        kind, keys = _list_kind(schema)
        items = schema.get("items") if schema else None
        if kind == "map":
            paths = set()
            for item in value:
                item_path = (*prefix, _item_key(item, keys))
                paths |= {item_path} | _owned_paths(item, items, item_path)
            return paths
        if kind == "set":
            return {(*prefix, "v:" + _compact_json(item)) for item in value}
    return {prefix} if prefix else set()


_MISSING = object()


def _value_at(obj: Any, path: _FieldPath) -> Any:
    node = obj
    for element in path:
        kind, _, text = element.partition(":")
        if kind == "f":
            node = node.get(text, _MISSING) if isinstance(node, dict) else _MISSING
        elif kind == "k" and isinstance(node, list):
            wanted = json.loads(text)
            node = next((i for i in node if _matches_key(i, wanted)), _MISSING)
        elif kind == "v" and isinstance(node, list):
            wanted = json.loads(text)
            node = next((i for i in node if json_equal(i, wanted)), _MISSING)
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


def _matches_key(item: Any, wanted: Any) -> bool:
    if not isinstance(item, dict) or not isinstance(wanted, dict):
        return False
    return all(json_equal(item.get(k), v) for k, v in wanted.items())


def _conflicts(
    live: JSON,
    config: JSON,
    applying: set[_FieldPath],
    owners: _Owners,
    manager: str,
) -> list[tuple[tuple[str, str], _FieldPath]]:
    found = []
    for owner, paths in owners.items():
        if owner[0] == manager:
            continue
        for path in sorted(paths & applying):
            mine, theirs = _value_at(config, path), _value_at(live, path)
            if isinstance(mine, dict) and path[-1].startswith(("k:", "v:")):
                continue  # an item both list; its fields decide conflicts
            if theirs is not _MISSING and not json_equal(mine, theirs):
                found.append((owner, path))
    return found


def _describe_conflicts(
    taken: list[tuple[tuple[str, str], _FieldPath]],
) -> list[tuple[str, str]]:
    return [(owner[0], _dotted(path)) for owner, path in taken]


def _dotted(path: _FieldPath) -> str:
    parts = []
    for element in path:
        kind, _, text = element.partition(":")
        parts.append(f".{text}" if kind == "f" else f"[{text}]")
    return "".join(parts)


def _apply_merge(live: Any, config: Any, schema: JSON | None) -> Any:
    if isinstance(live, dict) and isinstance(config, dict):
        result = dict(live)
        for key, value in config.items():
            child = _field_meta(schema, key).schema
            result[key] = _apply_merge(live.get(key), value, child)
        return result
    if isinstance(live, list) and isinstance(config, list):
        kind, keys = _list_kind(schema)
        items = schema.get("items") if schema else None
        if kind == "map":
            merged = list(live)
            for item in config:
                wanted = json.loads(_item_key(item, keys)[2:])
                index = next((n for n, m in enumerate(merged) if _matches_key(m, wanted)), None)
                if index is None:
                    merged.append(item)
                else:
                    merged[index] = _apply_merge(merged[index], item, items)
            return merged
        if kind == "set":
            return [*live, *(v for v in config if not any(json_equal(v, m) for m in live))]
    return config


def _remove_path(obj: Any, path: _FieldPath) -> None:
    parent = _value_at(obj, path[:-1])
    kind, _, text = path[-1].partition(":")
    if kind == "f" and isinstance(parent, dict):
        parent.pop(text, None)
    elif kind in ("k", "v") and isinstance(parent, list):
        wanted = json.loads(text)
        keep = [
            i
            for i in parent
            if not (_matches_key(i, wanted) if kind == "k" else json_equal(i, wanted))
        ]
        parent[:] = keep


def _read_managed_fields(obj: JSON) -> tuple[_Owners, _Stamps]:
    """Owned paths per (manager, operation), and each entry's apiVersion and time."""
    owners: _Owners = {}
    stamps: _Stamps = {}
    for entry in obj.get("metadata", {}).get("managedFields") or []:
        key = (str(entry.get("manager", "")), str(entry.get("operation", "Apply")))
        owners.setdefault(key, set()).update(_tree_paths(entry.get("fieldsV1") or {}, ()))
        stamps[key] = {"apiVersion": entry.get("apiVersion", ""), "time": entry.get("time", "")}
    return owners, stamps


def _tree_paths(tree: JSON, prefix: _FieldPath) -> set[_FieldPath]:
    paths: set[_FieldPath] = set()
    for element, child in tree.items():
        if element == ".":
            paths.add(prefix)
        elif isinstance(child, dict) and child:
            paths |= _tree_paths(child, (*prefix, element))
        else:
            paths.add((*prefix, element))
    return paths


def _paths_tree(paths: set[_FieldPath]) -> JSON:
    tree: JSON = {}
    for path in sorted(paths):
        node = tree
        for element in path:
            node = node.setdefault(element, {})
    # A path that is also the parent of others marks itself with ".", as fieldsV1 does.
    for path in paths:
        node = tree
        for element in path:
            node = node[element]
        if node and "." not in node:
            node["."] = {}
    return tree


def _write_managed_fields(obj: JSON, owners: _Owners, stamps: _Stamps) -> None:
    entries = [
        {
            "manager": manager,
            "operation": operation,
            **stamps.get((manager, operation), {}),
            "fieldsType": "FieldsV1",
            "fieldsV1": _paths_tree(paths),
        }
        for (manager, operation), paths in owners.items()
        if paths
    ]
    obj.setdefault("metadata", {})["managedFields"] = entries
