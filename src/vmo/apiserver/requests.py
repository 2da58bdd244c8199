"""Parsing what a request asks for: its resource coordinates, body and wanted representation."""

from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from vmo.api.types import JSON
from vmo.apiserver import errors
from vmo.apiserver import protobuf as pb

JSON_TYPE = "application/json"
YAML_TYPE = "application/yaml"
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
    if media in ("application/yaml", "application/x-yaml", "text/yaml"):
        try:
            loaded = yaml.safe_load(body)
        except yaml.YAMLError as exc:
            raise errors.bad_request(f"unable to decode YAML body: {exc}") from None
    elif media in ("", JSON_TYPE, "text/plain") or media.endswith("+json"):
        try:
            loaded = json.loads(body) if body.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise errors.bad_request(
                f"couldn't get version/kind; json parse error: {exc}"
            ) from None
    else:
        raise errors.ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, {pb.PROTOBUF_CONTENT_TYPE}",
        )
    if not isinstance(loaded, dict):
        raise errors.bad_request("the request body must be a JSON or YAML object")
    return loaded


def decode_any_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"unable to decode patch: {exc}") from None
