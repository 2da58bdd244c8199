"""The audit trail: every API request as an ``audit.k8s.io/v1`` Event, one JSON line each, at the
level an audit Policy gives it (kube-apiserver's ``--audit-policy-file`` format), in a log that
rotates and is hash-chained so that an edited, removed or reordered line shows.

**Levels** (first matching rule of the policy wins; no rule matches: None, nothing logged):
None; Metadata (who, what, where, when, the response code); Request (and the request body);
RequestResponse (and the response body, for responses that are not streams). Without a policy
file every request is logged at Metadata. Each request is one event, at stage
ResponseComplete (a watch, log or console stream: when it ends).

**The chain.** Each event carries two annotations: ``vmo.dev/audit-prev``, the hash of the event
before it, and ``vmo.dev/audit-hash``, SHA-256 over that previous hash and the event's own
canonical JSON (sorted keys, no spaces, without the hash annotation itself). A rotated file
keeps the chain going into the next one, and ``audit.head`` holds the last hash, so that
removing lines from the end shows too. ``verify_chain`` checks all of it; ``vmo audit verify``
runs it. Removing whole files from the start of the chain (what rotation itself does past its
backup count) leaves a chain that starts later, which verify reports as its first hash.

The writer is hand-written: the stdlib's rotating handlers neither chain records nor keep the
chain across rotation, and no audit library speaks Kubernetes' Event format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

JSON = dict[str, Any]
LEVELS = ("None", "Metadata", "Request", "RequestResponse")
PREV = "vmo.dev/audit-prev"
HASH = "vmo.dev/audit-hash"
GENESIS = "0" * 64
LOG_NAME = "audit.log"
HEAD_NAME = "audit.head"
DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_BACKUPS = 10


class AuditPolicyError(ValueError):
    """The policy file is not an audit.k8s.io/v1 Policy VMO can apply; says where."""


# --- the policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceMatch:
    group: str | None  # None: any group ("" is the core group)
    resources: tuple[str, ...]  # "" or empty: any; "pods/log", "*/scale", "pods/*"
    names: tuple[str, ...]

    def matches(self, group: str, resource: str, subresource: str, name: str) -> bool:
        if self.group is not None and self.group != group:
            return False
        if self.resources:
            full = f"{resource}/{subresource}" if subresource else resource
            if not any(_resource_matches(r, resource, subresource, full) for r in self.resources):
                return False
        return not self.names or name in self.names


def _resource_matches(rule: str, resource: str, subresource: str, full: str) -> bool:
    if rule in ("*", full):
        return True
    if rule.startswith("*/"):
        return subresource == rule[2:]
    if rule.endswith("/*"):
        return resource == rule[:-2] and bool(subresource)
    return False


@dataclass(frozen=True)
class AuditRule:
    level: str
    users: tuple[str, ...] = ()
    user_groups: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ()
    resources: tuple[ResourceMatch, ...] = ()
    namespaces: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()

    def matches(self, request: RequestInfo) -> bool:
        if self.users and request.user not in self.users:
            return False
        if self.user_groups and not set(self.user_groups) & set(request.groups):
            return False
        if self.verbs and request.verb not in self.verbs:
            return False
        if not request.resource_request:
            if self.resources or self.namespaces:
                return False
            return not self.non_resource_urls or any(
                u == request.path or (u.endswith("*") and request.path.startswith(u[:-1]))
                for u in self.non_resource_urls
            )
        if self.non_resource_urls:
            return False
        if self.namespaces and request.namespace not in self.namespaces:
            return False
        return not self.resources or any(
            m.matches(request.group, request.resource, request.subresource, request.name)
            for m in self.resources
        )


@dataclass(frozen=True)
class AuditPolicy:
    rules: tuple[AuditRule, ...]

    def level(self, request: RequestInfo) -> str:
        return next((r.level for r in self.rules if r.matches(request)), "None")


DEFAULT_POLICY = AuditPolicy((AuditRule("Metadata"),))


def _strings(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise AuditPolicyError(f"{where}: a list of strings")
    return tuple(raw)


def parse_policy(doc: Any) -> AuditPolicy:
    """An ``audit.k8s.io/v1`` Policy document; AuditPolicyError naming the field."""
    if not isinstance(doc, dict) or doc.get("kind") != "Policy":
        raise AuditPolicyError("kind: must be Policy")
    if doc.get("apiVersion") != "audit.k8s.io/v1":
        raise AuditPolicyError("apiVersion: must be audit.k8s.io/v1")
    rules = []
    for i, raw in enumerate(doc.get("rules") or []):
        where = f"rules[{i}]"
        level = raw.get("level")
        if level not in LEVELS:
            raise AuditPolicyError(f"{where}.level: {level!r} is not one of {', '.join(LEVELS)}")
        matches = []
        for j, res in enumerate(raw.get("resources") or []):
            group = res.get("group")
            if group is not None and not isinstance(group, str):
                raise AuditPolicyError(f"{where}.resources[{j}].group: a string")
            matches.append(
                ResourceMatch(
                    group,
                    _strings(res.get("resources"), f"{where}.resources[{j}].resources"),
                    _strings(res.get("resourceNames"), f"{where}.resources[{j}].resourceNames"),
                )
            )
        rules.append(
            AuditRule(
                level,
                _strings(raw.get("users"), f"{where}.users"),
                _strings(raw.get("userGroups"), f"{where}.userGroups"),
                _strings(raw.get("verbs"), f"{where}.verbs"),
                tuple(matches),
                _strings(raw.get("namespaces"), f"{where}.namespaces"),
                _strings(raw.get("nonResourceURLs"), f"{where}.nonResourceURLs"),
            )
        )
    return AuditPolicy(tuple(rules))


def load_policy(path: Path) -> AuditPolicy:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise AuditPolicyError(f"{path}: {exc}") from exc
    return parse_policy(doc)


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestInfo:
    """What an audit rule and an event need of a request."""

    user: str
    groups: tuple[str, ...]
    verb: str
    path: str
    resource_request: bool
    group: str = ""
    version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    uid: str = ""


def _stamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event(
    info: RequestInfo,
    *,
    level: str,
    uri: str,
    source_ips: Sequence[str],
    user_agent: str,
    code: int,
    received: datetime,
    completed: datetime,
    status: Mapping[str, Any] | None = None,
    request_object: Any = None,
    response_object: Any = None,
) -> JSON:
    """One ``audit.k8s.io/v1`` Event at stage ResponseComplete."""
    body: JSON = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": level,
        "auditID": str(uuid.uuid4()),
        "stage": "ResponseComplete",
        "requestURI": uri,
        "verb": info.verb,
        "user": {"username": info.user, "groups": list(info.groups),
                 **({"uid": info.uid} if info.uid else {})},
        "sourceIPs": list(source_ips),
        "userAgent": user_agent,
        "responseStatus": {"metadata": {}, "code": code},
        "requestReceivedTimestamp": _stamp(received),
        "stageTimestamp": _stamp(completed),
    }  # fmt: skip
    if info.resource_request and info.resource:
        ref: JSON = {"resource": info.resource}
        for key, value in (("namespace", info.namespace), ("name", info.name),
                           ("apiGroup", info.group), ("apiVersion", info.version),
                           ("subresource", info.subresource)):  # fmt: skip
            if value:
                ref[key] = value
        body["objectRef"] = ref
    if status and code >= 400:
        for key in ("status", "reason", "message"):
            if status.get(key):
                body["responseStatus"][key] = status[key]
    if level in ("Request", "RequestResponse") and request_object is not None:
        body["requestObject"] = request_object
    if level == "RequestResponse" and response_object is not None:
        body["responseObject"] = response_object
    return body


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev: str, body: Mapping[str, Any]) -> str:
    """The event's hash: over the previous one and its canonical JSON without ``HASH``."""
    annotations = {k: v for k, v in (body.get("annotations") or {}).items() if k != HASH}
    unhashed = {**body, "annotations": annotations}
    return hashlib.sha256(prev.encode() + b"\n" + _canonical(unhashed)).hexdigest()


# --- the log -------------------------------------------------------------------------------------


@dataclass
class AuditLog:
    """An append-only, rotating, hash-chained log of events in ``directory``."""

    directory: Path
    policy: AuditPolicy = DEFAULT_POLICY
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS
    _fd: int = field(default=-1, init=False)
    _size: int = field(default=0, init=False)
    _last: str = field(default=GENESIS, init=False)
    _head: int = field(default=-1, init=False)
    _failing: bool = field(default=False, init=False)

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        head = self.directory / HEAD_NAME
        self._last = _read_head(head) or _last_hash(self.directory / LOG_NAME) or GENESIS
        self._open_current()
        self._head = os.open(head, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _open_current(self) -> None:
        path = self.directory / LOG_NAME
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    def close(self) -> None:
        for fd in (self._fd, self._head):
            if fd >= 0:
                os.close(fd)
        self._fd = self._head = -1

    def write(self, body: JSON) -> None:
        """Appends one event, chained to the one before it. A write the disk refuses (full, gone)
        is logged, not raised: the request it records has been answered already, and the chain
        goes on from the last event written."""
        try:
            self._write(body)
        except OSError as exc:
            if not self._failing:
                log.error("audit log %s: events are not being written: %s", self.directory, exc)
            self._failing = True
        else:
            if self._failing:
                log.warning("audit log %s: writing again", self.directory)
            self._failing = False

    def _write(self, body: JSON) -> None:
        if self._fd < 0:
            return
        annotations = dict(body.get("annotations") or {})
        annotations[PREV] = self._last
        body = {**body, "annotations": annotations}
        digest = chain_hash(self._last, body)
        body["annotations"][HASH] = digest
        line = _canonical(body) + b"\n"
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        os.write(self._fd, line)
        self._size += len(line)
        self._last = digest
        os.pwrite(self._head, digest.encode() + b"\n", 0)

    def _rotate(self) -> None:
        os.close(self._fd)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%S.%f")[:-3]
        os.replace(self.directory / LOG_NAME, self.directory / f"audit-{stamp}.log")
        for old in rotated_files(self.directory)[: -self.backups or None]:
            old.unlink(missing_ok=True)
        self._open_current()


def rotated_files(directory: Path) -> list[Path]:
    """The rotated files, oldest first (their names sort by time)."""
    return sorted(p for p in directory.glob("audit-*.log"))


def log_files(directory: Path) -> list[Path]:
    """Every file of the log, oldest first."""
    current = directory / LOG_NAME
    return [*rotated_files(directory), *([current] if current.exists() else [])]


def _read_head(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return text if len(text) == 64 else ""


def _last_hash(path: Path) -> str:
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            return str(json.loads(line)["annotations"][HASH])
        except (ValueError, KeyError, TypeError):
            continue
    return ""


def read_events(directory: Path) -> Iterator[tuple[Path, int, JSON]]:
    """(file, line number, event) for every line of the log, oldest first."""
    for path in log_files(directory):
        with path.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield path, number, json.loads(line)
                except ValueError:
                    yield path, number, {}


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first: str  # the hash the chain starts from (GENESIS unless older files were rotated away)
    last: str
    problem: str = ""


def verify_chain(directory: Path) -> ChainReport:
    """Checks every event's hash and link, and that the chain ends where ``audit.head`` says."""
    prev: str | None = None
    first = last = ""
    count = 0
    for path, number, body in read_events(directory):
        where = f"{path.name}:{number}"
        annotations = body.get("annotations") or {}
        if HASH not in annotations or PREV not in annotations:
            return ChainReport(False, count, first, last, f"{where}: not a chained audit event")
        if prev is None:
            first = str(annotations[PREV])
        elif annotations[PREV] != prev:
            return ChainReport(
                False, count, first, last,
                f"{where}: links to {str(annotations[PREV])[:12]}, the event before it is "
                f"{prev[:12]} (an event was removed, added or reordered before it)",
            )  # fmt: skip
        if chain_hash(str(annotations[PREV]), body) != annotations[HASH]:
            return ChainReport(
                False, count, first, last, f"{where}: its content does not match its hash (edited)"
            )
        prev = last = str(annotations[HASH])
        count += 1
    head = _read_head(directory / HEAD_NAME)
    if head and head != (last or GENESIS):
        return ChainReport(
            False, count, first, last,
            f"the log ends at {last[:12] or 'nothing'}, the server wrote up to {head[:12]} "
            "(events were removed from its end)",
        )  # fmt: skip
    return ChainReport(True, count, first or GENESIS, last or GENESIS)


__all__ = [
    "DEFAULT_POLICY",
    "LEVELS",
    "AuditLog",
    "AuditPolicy",
    "AuditPolicyError",
    "ChainReport",
    "RequestInfo",
    "chain_hash",
    "event",
    "load_policy",
    "log_files",
    "parse_policy",
    "read_events",
    "verify_chain",
]
