"""``vmo audit`` and ``vmo audit verify``: the embedded API server's audit log, filtered by VM,
user, verb, namespace and time, and its hash chain checked (``vmo.apiserver.audit``). They read
the log's files in the home (``--dir`` for another), as its owner on this host."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vmo.api.duration import parse_duration
from vmo.apiserver.audit import read_events, verify_chain
from vmo.home import StateDir

JSON = dict[str, Any]
VM_RESOURCES = ("virtualmachines", "virtualmachineinstances")


def parse_when(text: str, now: datetime) -> datetime:
    """``1h``/``30m`` (that long ago) or an RFC 3339 time; ValueError naming the value."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (1h, 30m) nor a time (RFC 3339)"
        ) from None


def _time(event: JSON) -> datetime | None:
    stamp = event.get("requestReceivedTimestamp")
    if not stamp:
        return None
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))


def matching(
    events: Iterator[JSON],
    *,
    vm: str = "",
    user: str = "",
    verb: str = "",
    namespace: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[JSON]:
    for event in events:
        ref = event.get("objectRef") or {}
        if vm and not (ref.get("name") == vm and ref.get("resource") in VM_RESOURCES):
            continue
        if user and (event.get("user") or {}).get("username") != user:
            continue
        if verb and event.get("verb") != verb:
            continue
        if namespace and ref.get("namespace") != namespace:
            continue
        when = _time(event)
        if since and (when is None or when < since):
            continue
        if until and (when is None or when > until):
            continue
        yield event


def add_audit_commands(sub: Any, state_of: Callable[[argparse.Namespace], StateDir]) -> None:
    audit = sub.add_parser("audit", help="the API server's audit log: who did what, when")
    audit.add_argument("--dir", default="", help="the log's directory (default: the home's audit/)")
    audit.add_argument("--vm", default="", help="requests on this VM (or its VMI)")
    audit.add_argument("--user", default="")
    audit.add_argument("--verb", default="", help="get, list, create, update, patch, delete, ...")
    audit.add_argument("-n", "--namespace", default="")
    audit.add_argument("--since", default="", help="a duration (1h) or an RFC 3339 time")
    audit.add_argument("--until", default="")
    audit.add_argument("-o", "--output", choices=["table", "json"], default="table")
    audit.set_defaults(func=lambda a: _list(a, state_of))
    verbs = audit.add_subparsers(dest="audit_command")
    verify = verbs.add_parser("verify", help="check the log's hash chain")
    verify.add_argument("--dir", default="")
    verify.set_defaults(func=lambda a: _verify(a, state_of))


def _directory(
    args: argparse.Namespace, state_of: Callable[[argparse.Namespace], StateDir]
) -> Path:
    return Path(args.dir) if args.dir else state_of(args).root / "audit"


def _list(args: argparse.Namespace, state_of: Callable[[argparse.Namespace], StateDir]) -> int:
    now = datetime.now(UTC)
    try:
        since = parse_when(args.since, now) if args.since else None
        until = parse_when(args.until, now) if args.until else None
    except ValueError as exc:
        print(f"vmo audit: {exc}", file=sys.stderr)
        return 2
    directory = _directory(args, state_of)
    if not directory.is_dir():
        print(f"vmo audit: no audit log in {directory}", file=sys.stderr)
        return 1
    events = (e for _, _, e in read_events(directory) if e)
    found = matching(events, vm=args.vm, user=args.user, verb=args.verb,
                     namespace=args.namespace, since=since, until=until)  # fmt: skip
    if args.output == "json":
        for event in found:
            print(json.dumps(event, sort_keys=True))
        return 0
    table = Table("TIME", "USER", "VERB", "RESOURCE", "NAMESPACE", "CODE", "SOURCE", box=None)
    for event in found:
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", "") + (
            f"/{ref['subresource']}" if ref.get("subresource") else ""
        )
        what = (
            f"{resource}/{ref['name']}"
            if ref.get("name")
            else resource or event.get("requestURI", "")
        )
        table.add_row(
            str(event.get("requestReceivedTimestamp", ""))[:23],
            str((event.get("user") or {}).get("username") or "(unauthenticated)"),
            str(event.get("verb", "")),
            what,
            str(ref.get("namespace", "")),
            str((event.get("responseStatus") or {}).get("code", "")),
            ",".join(event.get("sourceIPs") or []),
        )
    Console(width=None if sys.stdout.isatty() else 220).print(table)
    return 0


def _verify(args: argparse.Namespace, state_of: Callable[[argparse.Namespace], StateDir]) -> int:
    directory = _directory(args, state_of)
    if not directory.is_dir():
        print(f"vmo audit verify: no audit log in {directory}", file=sys.stderr)
        return 1
    report = verify_chain(directory)
    if not report.ok:
        print(f"vmo audit verify: BROKEN after {report.events} events: {report.problem}",
              file=sys.stderr)  # fmt: skip
        return 1
    start = (
        "the start"
        if set(report.first) == {"0"}
        else f"{report.first[:12]} (rotated away before it)"
    )
    print(f"audit chain OK: {report.events} events, from {start} to {report.last[:12]}")
    return 0


__all__ = ["add_audit_commands", "matching", "parse_when"]
