"""``vmo events VM``: the Events of a VM, its VMI and its virt-launcher Pods, oldest first, as
``kubectl events --for`` shows one object's; ``--watch`` follows new ones.

A VM's VMI shares its name; its Pods are ``virt-launcher-<vmi>-<5 chars>`` (the base cut as a
generateName's), so Events of Pods long gone still match.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from vmo.client import EVENT, TRANSIENT_ERRORS, ApiStatusError, Client, Credentials, Gone

__all__ = ["EventFilter", "add_events_commands", "event_time", "for_vm"]

JSON = dict[str, Any]
_POD_NAME_BASE = 58  # Kubernetes cuts a generateName base to this many characters
_SUFFIX = r"[bcdfghjklmnpqrstvwxz2456789]{5}"  # its random suffix's alphabet
_EPOCH = datetime.min.replace(tzinfo=UTC)


class EventFilter:
    """Which Events are about VM ``name`` (its VMI and virt-launcher Pods included)."""

    def __init__(self, name: str) -> None:
        self.name = name
        base = f"virt-launcher-{name}-"[:_POD_NAME_BASE]
        self._pod = re.compile(re.escape(base) + _SUFFIX)

    def __call__(self, event: JSON) -> bool:
        ref = event.get("involvedObject") or event.get("regarding") or {}
        kind, name = ref.get("kind"), str(ref.get("name") or "")
        if kind in ("VirtualMachine", "VirtualMachineInstance"):
            return name == self.name
        return kind == "Pod" and self._pod.fullmatch(name) is not None


def for_vm(name: str) -> EventFilter:
    return EventFilter(name)


def _parse(stamp: Any) -> datetime | None:
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None


def event_time(event: JSON) -> datetime:
    """When the Event last happened: lastTimestamp, eventTime, firstTimestamp, creation."""
    series = event.get("series") or {}
    for stamp in (event.get("lastTimestamp"), series.get("lastObservedTime"),
                  event.get("eventTime"), event.get("firstTimestamp"),
                  (event.get("metadata") or {}).get("creationTimestamp")):  # fmt: skip
        when = _parse(stamp)
        if when is not None:
            return when
    return _EPOCH


def _age(when: datetime, now: datetime) -> str:
    if when == _EPOCH:
        return "<unknown>"
    seconds = max(int((now - when).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _row(event: JSON, now: datetime) -> list[str]:
    ref = event.get("involvedObject") or event.get("regarding") or {}
    count = int(event.get("count") or (event.get("series") or {}).get("count") or 1)
    message = str(event.get("message") or event.get("note") or "").strip()
    return [
        _age(event_time(event), now),
        str(event.get("type") or ""),
        str(event.get("reason") or ""),
        f"{ref.get('kind', '')}/{ref.get('name', '')}",
        message + (f" (x{count})" if count > 1 else ""),
    ]


# (column, minimum width): fixed, so rows printed one at a time by --watch line up
COLUMNS = (("LAST SEEN", 9), ("TYPE", 7), ("REASON", 22), ("OBJECT", 44), ("MESSAGE", 0))


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 400, highlight=False)


def _print(events: Iterable[JSON], *, header: bool = True) -> None:
    now = datetime.now(UTC)
    table = Table(box=None, pad_edge=False, show_header=header)
    for name, width in COLUMNS:
        table.add_column(name, min_width=width or None, no_wrap=bool(width))
    for event in events:
        table.add_row(*_row(event, now))
    _console().print(table)
    sys.stdout.flush()  # --watch: each Event as it comes, even into a pipe


async def vm_events(client: Client, namespace: str, name: str) -> tuple[list[JSON], str]:
    """The VM's Events in time order, and the list's resourceVersion (to watch from)."""
    events, rv = await client.list(EVENT, namespace)
    matching = [e for e in events if for_vm(name)(e)]
    return sorted(matching, key=event_time), rv


async def follow(
    client: Client, namespace: str, name: str, rv: str, emit: Callable[[JSON], None]
) -> None:
    """Emits each Event about the VM as it is added or updated, until cancelled; a watch that
    ends is resumed, one that is too old (410) restarts from a fresh list."""
    wanted = for_vm(name)
    while True:
        try:
            async for kind, event in client.watch(EVENT, namespace, resource_version=rv):
                rv = str((event.get("metadata") or {}).get("resourceVersion") or rv)
                if kind in ("ADDED", "MODIFIED") and wanted(event):
                    emit(event)
        except Gone:
            _, rv = await client.list(EVENT, namespace)


async def _events(client: Client, namespace: str, args: argparse.Namespace) -> int:
    events, rv = await vm_events(client, namespace, args.name)
    if events:
        _print(events)
    elif not args.watch:
        print(f"No events found for VM {args.name} in namespace {namespace}.", file=sys.stderr)
    if args.watch:
        if not events:
            _print([])  # the header, so the rows that follow line up under it
        await follow(client, namespace, args.name, rv, lambda e: _print([e], header=False))
    return 0


def add_events_commands(
    sub: Any,
    creds_of: Callable[[argparse.Namespace], Credentials],
    namespace_of: Callable[[argparse.Namespace, Credentials], str],
) -> None:
    cmd = sub.add_parser("events", help="a VM's Events (its VMI's and Pods' too), oldest first")
    cmd.add_argument("name", help="the VM (NAME, vm/NAME or vmi/NAME)")
    cmd.add_argument("-n", "--namespace", default="")
    cmd.add_argument("-w", "--watch", action="store_true", help="follow new Events")
    cmd.add_argument("--kubeconfig", default="")

    def run(args: argparse.Namespace) -> int:
        args.name = args.name.split("/", 1)[1] if "/" in args.name else args.name
        creds = creds_of(args)
        namespace = namespace_of(args, creds)

        async def go() -> int:
            async with Client(creds) as client:
                return await _events(client, namespace, args)

        try:
            with contextlib.suppress(KeyboardInterrupt):
                return asyncio.run(go())
            return 0
        except ApiStatusError as exc:
            print(f"vmo events: {exc.status.get('message') or exc}", file=sys.stderr)
            return 1
        except TRANSIENT_ERRORS as exc:
            print(f"vmo events: cannot reach the API server: {exc}", file=sys.stderr)
            return 1

    cmd.set_defaults(func=run)
