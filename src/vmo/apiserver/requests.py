"""Parsing what a request asks for: its resource coordinates, body and wanted representation."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

from vmo.api.types import JSON
from vmo.apiserver import errors
from vmo.apiserver import protobuf as pb

JSON_TYPE = "application/json"
YAML_TYPE = "application/yaml"
YAML_TYPES = (YAML_TYPE, "application/x-yaml", "text/yaml")
# Containers a body may nest: more than any Kubernetes kind's schema needs, and few enough that
# the recursive code behind decoding (merge, apply, validation, encoding) stays far from
# Python's recursion limit. A deeper body is a 400, never a RecursionError's 500.
MAX_DEPTH = 100
NAMESPACE_SUBRESOURCES = ("status", "finalize")


@dataclass(frozen=True)
class ResourcePath:
    """A resource URL resolved as Kubernetes' RequestInfo does."""

    group: str
    version: str
    namespace: str
    resource: str
    name: str
    subresource: str
    watch_prefix: bool


def parse_resource_path(path: str) -> ResourcePath | None:
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    watch = bool(rest) and rest[0] == "watch"
    if watch:
        rest = rest[1:]
    namespace = ""
    if len(rest) > 1 and rest[0] == "namespaces":
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    if not rest:
        return None
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = "/".join(rest[2:])
    if resource == "namespaces" and name and not group:
        namespace = ""
    return ResourcePath(group, version, namespace, resource, name, subresource, watch)


@dataclass(frozen=True)
class Wanted:
    """The representation the client asked for in its Accept header."""

    table: bool = False
    protobuf_only: bool = False
    discovery_v2: bool = False


_JSON_MEDIA = (JSON_TYPE, "*/*", "application/*")


def parse_accept(accept: str) -> Wanted:
    """The first representation in the Accept list that VMO serves wins."""
    entries = []
    for entry in accept.split(","):
        media, *params = [p.strip() for p in entry.split(";")]
        entries.append((media.lower(), dict(p.split("=", 1) for p in params if "=" in p)))
    json_ok = not accept.strip() or any(media in _JSON_MEDIA for media, _ in entries)
    for media, options in entries:
        if media not in _JSON_MEDIA:
            continue
        shape = options.get("as")
        if shape == "Table":
            return Wanted(table=True)
        if shape == "APIGroupDiscoveryList" and options.get("v") == "v2":
            return Wanted(discovery_v2=True)
        if shape is None:
            return Wanted()
    return Wanted(protobuf_only=not json_ok)


def decode_body(body: bytes, content_type: str) -> JSON:
    """Decodes a create/update body (JSON, YAML or Kubernetes protobuf) into an object."""
    media = content_type.split(";")[0].strip().lower()
    if media == pb.PROTOBUF_CONTENT_TYPE:
        try:
            return pb.decode(body)
        except pb.ProtobufError as exc:
            raise errors.bad_request(f"unable to decode protobuf body: {exc}") from None
        except RecursionError:
            raise too_deep() from None
    if media in YAML_TYPES:
        loaded = decode_yaml(body)
    elif media in ("", JSON_TYPE):
        loaded = (
            decode_json(body, "couldn't get version/kind; json parse error")
            if body.strip()
            else None
        )
    else:
        raise errors.ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, {pb.PROTOBUF_CONTENT_TYPE}",
        )
    if not isinstance(loaded, dict):
        raise errors.bad_request("the request body must be a JSON or YAML object")
    return loaded


def decode_json(body: bytes, failure: str = "unable to decode patch") -> object:
    """JSON of any shape, refused (400) when malformed or nested past ``MAX_DEPTH``."""
    try:
        loaded = json.loads(body)
    except RecursionError:
        raise too_deep() from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"{failure}: {exc}") from None
    check_nesting(loaded, len(body))
    return loaded


def decode_yaml(body: bytes) -> object:
    try:
        loaded = yaml.load(body, Loader=_NestingLimitedLoader)  # a SafeLoader: no tags run code
    except _TooDeep:
        raise too_deep() from None
    except yaml.YAMLError as exc:
        raise errors.bad_request(f"unable to decode YAML body: {exc}") from None
    check_nesting(loaded, len(body))
    return loaded


def check_nesting(value: object, size: int) -> None:
    """Refuses values nested past ``MAX_DEPTH`` containers, and YAML whose aliases make it
    larger than its text could spell (every JSON or YAML node takes at least one byte)."""
    budget = size + 16
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise errors.bad_request("the request body's aliases expand it beyond its own size")
        if isinstance(node, dict):
            children: Iterable[object] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_DEPTH:
            raise too_deep()
        stack.extend((child, depth + 1) for child in children)


def too_deep() -> errors.ApiError:
    return errors.bad_request(f"the request body is nested more than {MAX_DEPTH} levels deep")


class _TooDeep(yaml.YAMLError):
    pass


class _NestingLimitedLoader(yaml.SafeLoader):
    """A SafeLoader that stops composing past ``MAX_DEPTH`` nodes, before PyYAML's recursive
    composer reaches Python's recursion limit."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self._depth > MAX_DEPTH:
            raise _TooDeep("nested too deep")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
