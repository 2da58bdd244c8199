"""``vmo migrate`` and ``vmo node cordon|uncordon|drain``: live migration and node maintenance.

What a drain does with each VMI is decided by pure functions (``plan_eviction``,
``drain_step``); the rest creates VirtualMachineInstanceMigrations and follows them, leaving the
moving itself to the migration controller and the node agents.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vmo.api.annotations import DRAIN_NODE
from vmo.client import (
    KUBEVIRT,
    NODE,
    TRANSIENT_ERRORS,
    VMI,
    VMIM,
    ApiStatusError,
    Client,
    Credentials,
    Resource,
)

JSON = dict[str, Any]

FINAL_MIGRATION_PHASES = frozenset({"Succeeded", "Failed"})
FINAL_VMI_PHASES = frozenset({"Succeeded", "Failed"})
DRAIN_LABEL = DRAIN_NODE
# upstream's evacuation controller marks the migrations it creates for a draining node this way
EVACUATION_ANNOTATION = "kubevirt.io/evacuationMigration"
# names as virt-api's migrate subresource (virtctl migrate) and the evacuation controller do
MIGRATE_PREFIX = "kubevirt-migrate-vm-"
EVACUATION_PREFIX = "kubevirt-evacuation-"
MAX_RETRIES = 3
POLL_SECONDS = 2.0
INTERRUPTED = 130

EVICTION_STRATEGIES = ("None", "LiveMigrate", "LiveMigrateIfPossible", "External")


# --- decisions (pure) -----------------------------------------------------------------------


class EvictionAction(enum.Enum):
    MIGRATE = "migrate"
    STOP = "stop"
    BLOCKED = "blocked"
    EXTERNAL = "external"


@dataclass(frozen=True)
class Eviction:
    """What draining a node does with one VMI, and why."""

    action: EvictionAction
    strategy: str
    reason: str = ""


def eviction_strategy(vmi: JSON, cluster_default: str | None) -> str:
    """The VMI's own strategy, else the cluster's (KubeVirt CR), else ``None`` (as upstream)."""
    own = (vmi.get("spec") or {}).get("evictionStrategy")
    return str(own or cluster_default or "None")


def live_migratable(vmi: JSON) -> tuple[bool | None, str]:
    """The ``LiveMigratable`` condition: True, False or absent (None), and its message."""
    for cond in (vmi.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "LiveMigratable":
            reason = str(cond.get("message") or cond.get("reason") or "")
            return cond.get("status") == "True", reason
    return None, ""


def plan_eviction(vmi: JSON, *, cluster_default: str | None = None) -> Eviction:
    """Upstream's eviction semantics for one VMI on a draining node.

    ``LiveMigrate`` blocks (never stops) a VMI that cannot migrate; ``LiveMigrateIfPossible``
    stops it instead, as a pod eviction would; ``External`` leaves it to another controller.
    """
    strategy = eviction_strategy(vmi, cluster_default)
    migratable, reason = live_migratable(vmi)
    if strategy == "LiveMigrate":
        if migratable is False:
            return Eviction(EvictionAction.BLOCKED, strategy, reason or "LiveMigratable is False")
        return Eviction(EvictionAction.MIGRATE, strategy)
    if strategy == "LiveMigrateIfPossible":
        if migratable:
            return Eviction(EvictionAction.MIGRATE, strategy)
        return Eviction(EvictionAction.STOP, strategy, reason or "not live migratable")
    if strategy == "External":
        return Eviction(EvictionAction.EXTERNAL, strategy)
    return Eviction(EvictionAction.STOP, strategy)


class StepKind(enum.Enum):
    MIGRATE = "migrate"  # create a migration
    FOLLOW = "follow"  # a migration is in flight: wait for it
    STOP = "stop"  # delete the VMI
    STOPPING = "stopping"  # its deletion is under way
    BLOCKED = "blocked"
    EXTERNAL = "external"
    GAVE_UP = "gave-up"  # its migrations failed MAX_RETRIES + 1 times


WAITING = frozenset({StepKind.MIGRATE, StepKind.FOLLOW, StepKind.STOP, StepKind.STOPPING})


def drain_step(vmi: JSON, eviction: Eviction, *, in_flight: JSON | None, failures: int) -> StepKind:
    """The next thing a drain does for a VMI still on the node.

    A migration already in flight is followed whatever the strategy, so a resumed drain never
    duplicates one and never stops a VMI in the middle of moving.
    """
    if (vmi.get("metadata") or {}).get("deletionTimestamp"):
        return StepKind.STOPPING
    if in_flight is not None:
        return StepKind.FOLLOW
    if eviction.action is EvictionAction.MIGRATE:
        return StepKind.GAVE_UP if failures > MAX_RETRIES else StepKind.MIGRATE
    return {
        EvictionAction.STOP: StepKind.STOP,
        EvictionAction.BLOCKED: StepKind.BLOCKED,
        EvictionAction.EXTERNAL: StepKind.EXTERNAL,
    }[eviction.action]


def migration_in_flight(migration: JSON) -> bool:
    return (migration.get("status") or {}).get("phase") not in FINAL_MIGRATION_PHASES


def vmi_on_node(vmi: JSON, node: str) -> bool:
    """A VMI the node still runs: bound to it and not final (Running or earlier)."""
    status = vmi.get("status") or {}
    return status.get("nodeName") == node and status.get("phase") not in FINAL_VMI_PHASES


def failure_message(migration: JSON) -> str:
    """Why a migration failed: its failure condition, else the migration state's reason."""
    status = migration.get("status") or {}
    conditions = status.get("conditions") or []
    failed = [c for c in conditions if "fail" in str(c.get("type", "")).lower()]
    for cond in [*failed, *conditions]:
        if cond.get("status") == "True" and cond.get("message"):
            return str(cond["message"])
    reason = (status.get("migrationState") or {}).get("failureReason")
    return str(reason or "no reason given")


def route(migration: JSON) -> str:
    """``source -> target`` once the controller has chosen the target."""
    state = (migration.get("status") or {}).get("migrationState") or {}
    source, target = state.get("sourceNode"), state.get("targetNode")
    return f"{source} -> {target}" if source and target else ""


def parse_node_selector(items: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a ValueError names an item without ``=``."""
    selector: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--added-node-selector {item!r}: expected KEY=VALUE")
        selector[key] = value
    return selector


def migration_body(
    vmi_name: str,
    *,
    prefix: str = MIGRATE_PREFIX,
    added_node_selector: dict[str, str] | None = None,
    drain_node: str = "",
) -> JSON:
    metadata: JSON = {"generateName": prefix}
    if drain_node:
        metadata["labels"] = {DRAIN_LABEL: drain_node}
        metadata["annotations"] = {EVACUATION_ANNOTATION: drain_node}
    spec: JSON = {"vmiName": vmi_name}
    if added_node_selector:
        spec["addedNodeSelector"] = added_node_selector
    return {"metadata": metadata, "spec": spec}


# --- waiting for change ---------------------------------------------------------------------


@dataclass
class ChangeSignal:
    """Wakes a loop on any watch event of the given kinds, with a poll as the fallback."""

    client: Client
    watches: list[tuple[Resource, str, str]]  # (kind, namespace, field selector)
    poll: float = POLL_SECONDS
    _event: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> ChangeSignal:
        self._tasks = [asyncio.create_task(self._watch(*w)) for w in self.watches]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self, res: Resource, namespace: str, field_selector: str) -> None:
        while True:
            with contextlib.suppress(ApiStatusError, *TRANSIENT_ERRORS):
                async for _ in self.client.watch(
                    res, namespace, field_selector=field_selector, timeout=60
                ):
                    self._event.set()
            await asyncio.sleep(self.poll)

    def clear(self) -> None:
        self._event.clear()

    async def wait(self, limit: float | None = None) -> None:
        """Until something changed, the poll interval passed, or ``limit`` seconds passed."""
        delay = self.poll if limit is None else max(0.0, min(self.poll, limit))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), delay)


# --- nodes ----------------------------------------------------------------------------------


class NodeNotFound(Exception):
    def __init__(self, node: str) -> None:
        super().__init__(f'node "{node}" not found')
        self.node = node


async def set_unschedulable(client: Client, node: str, unschedulable: bool) -> bool:
    """Cordons or uncordons ``node`` as kubectl does; returns whether it changed."""
    current = await client.find(NODE, node)
    if current is None:
        raise NodeNotFound(node)
    if bool((current.get("spec") or {}).get("unschedulable")) == unschedulable:
        return False
    # kubectl leaves no ``unschedulable: false`` behind: the field is dropped on uncordon
    await client.patch(NODE, node, {"spec": {"unschedulable": True if unschedulable else None}})
    return True


async def cordon(client: Client, node: str, *, undo: bool = False) -> int:
    verb = "uncordoned" if undo else "cordoned"
    try:
        changed = await set_unschedulable(client, node, not undo)
    except NodeNotFound as exc:
        print(f"vmo node {'uncordon' if undo else 'cordon'}: {exc}", flush=True)
        return 1
    print(f"node/{node} {verb}" if changed else f"node/{node} already {verb}", flush=True)
    return 0


# --- vmo migrate ----------------------------------------------------------------------------


def _refusal(exc: ApiStatusError) -> str:
    return str(exc.status.get("message") or exc)


async def migrate(
    client: Client,
    namespace: str,
    name: str,
    *,
    added_node_selector: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 0,
    poll: float = POLL_SECONDS,
) -> int:
    """Creates a migration of VMI ``namespace/name`` and (``wait``) follows it to its end.

    0: Succeeded (or created, without ``wait``); 1: Failed, cancelled or timed out; 2: refused.
    """
    body = migration_body(name, added_node_selector=added_node_selector)
    try:
        vmi = await client.find(VMI, name, namespace)
        if vmi is None:
            print(f'vmo migrate: VirtualMachineInstance "{namespace}/{name}" not found', flush=True)
            return 2
        created = await client.create(VMIM, body, namespace)
    except ApiStatusError as exc:
        print(f"vmo migrate: {_refusal(exc)}", flush=True)
        return 2
    vmim = created["metadata"]["name"]
    source = (vmi.get("status") or {}).get("nodeName") or "no node"
    print(f"migration {namespace}/{vmim} of VMI {name} created (on {source})", flush=True)
    if not wait:
        return 0
    return await follow_migration(client, namespace, vmim, timeout=timeout, poll=poll)


async def follow_migration(
    client: Client, namespace: str, vmim: str, *, timeout: float = 0, poll: float = POLL_SECONDS
) -> int:
    """Prints each phase of migration ``vmim`` until it ends; 0 if it Succeeded."""
    started = time.monotonic()
    printed = ""
    watch = [(VMIM, namespace, f"metadata.name={vmim}")]
    async with ChangeSignal(client, watch, poll) as changes:
        while True:
            changes.clear()
            current = await client.find(VMIM, vmim, namespace)
            if current is None:
                print(f"migration {vmim} was deleted before it ended (cancelled)", flush=True)
                return 1
            phase = (current.get("status") or {}).get("phase") or ""
            line = f"  {phase:<16} {route(current)}".rstrip()
            if phase and line != printed:
                print(line, flush=True)
                printed = line
            if phase in FINAL_MIGRATION_PHASES:
                return _migration_outcome(current, time.monotonic() - started)
            left = timeout - (time.monotonic() - started) if timeout else None
            if left is not None and left <= 0:
                print(
                    f"migration {vmim} is still {phase or 'unprocessed'} after {timeout:g}s; "
                    "it continues (vmo migrate --cancel aborts it)",
                    flush=True,
                )
                return 1
            await changes.wait(left)


def _migration_outcome(migration: JSON, elapsed: float) -> int:
    name = migration["metadata"]["name"]
    vmi = migration["spec"]["vmiName"]
    if migration["status"]["phase"] == "Succeeded":
        print(f"VMI {vmi} migrated {route(migration)} in {elapsed:.1f}s ({name})", flush=True)
        return 0
    print(f"migration {name} failed after {elapsed:.1f}s: {failure_message(migration)}", flush=True)
    return 1


async def cancel_migration(client: Client, namespace: str, name: str) -> int:
    """Deletes the in-flight migrations of VMI ``name``: the controller aborts them."""
    items, _ = await client.list(VMIM, namespace)
    doomed = [m for m in items if m["spec"].get("vmiName") == name and migration_in_flight(m)]
    if not doomed:
        print(f"vmo migrate --cancel: no migration of VMI {namespace}/{name} in flight", flush=True)
        return 1
    for migration in doomed:
        await client.delete(VMIM, migration["metadata"]["name"], namespace)
        print(f"migration {migration['metadata']['name']}: abort requested", flush=True)
    return 0


# --- vmo node drain -------------------------------------------------------------------------


def _key(obj: JSON) -> str:
    return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


@dataclass
class DrainProgress:
    """What this drain run has done and seen, per VMI (``namespace/name``)."""

    node: str
    following: dict[str, str] = field(default_factory=dict)  # VMI -> migration it follows
    failures: dict[str, int] = field(default_factory=dict)
    stopping: dict[str, str] = field(default_factory=dict)  # VMI -> its eviction strategy
    outcomes: dict[str, str] = field(default_factory=dict)  # VMI -> what became of it
    said: dict[str, str] = field(default_factory=dict)  # VMI -> last progress line

    def say(self, key: str, line: str) -> None:
        """Prints a VMI's progress line unless it is the one printed last for that VMI."""
        if self.said.get(key) != line:
            print(f"{key}: {line}", flush=True)
            self.said[key] = line


async def _cluster_eviction_strategy(client: Client) -> str | None:
    try:
        items, _ = await client.list(KUBEVIRT)
    except ApiStatusError:
        return None
    for kv in items:
        strategy = ((kv.get("spec") or {}).get("configuration") or {}).get("evictionStrategy")
        if strategy:
            return str(strategy)
    return None


def _in_flight_by_vmi(migrations: list[JSON]) -> dict[str, JSON]:
    found: dict[str, JSON] = {}
    for m in migrations:
        if migration_in_flight(m):
            found[f"{m['metadata'].get('namespace', '')}/{m['spec'].get('vmiName')}"] = m
    return found


async def drain(
    client: Client,
    node: str,
    *,
    timeout: float = 0,
    dry_run: bool = False,
    poll: float = POLL_SECONDS,
) -> int:
    """Cordons ``node`` and moves every VMI off it; 0 once none is left, 1 otherwise."""
    if await client.find(NODE, node) is None:
        print(f'vmo node drain: node "{node}" not found', flush=True)
        return 1
    cluster_default = await _cluster_eviction_strategy(client)
    if dry_run:
        return await _print_plan(client, node, cluster_default)
    await cordon(client, node)
    progress = DrainProgress(node)
    deadline = time.monotonic() + timeout if timeout else None
    watches = [(VMI, "", ""), (VMIM, "", "")]
    async with ChangeSignal(client, watches, poll) as changes:
        while True:
            changes.clear()
            steps = await _drain_round(client, progress, cluster_default)
            if not set(steps.values()) & WAITING:  # drained, or nothing left can move
                return _summary(progress, steps, timed_out=False)
            left = deadline - time.monotonic() if deadline is not None else None
            if left is not None and left <= 0:
                return _summary(progress, steps, timed_out=True)
            await changes.wait(left)


async def _print_plan(client: Client, node: str, cluster_default: str | None) -> int:
    vmis, _ = await client.list(VMI)
    on_node = [v for v in vmis if vmi_on_node(v, node)]
    print(f"node/{node} would be cordoned; {len(on_node)} VMI(s) on it", flush=True)
    for vmi in on_node:
        eviction = plan_eviction(vmi, cluster_default=cluster_default)
        why = f": {eviction.reason}" if eviction.reason else ""
        verb = {
            EvictionAction.MIGRATE: "would migrate",
            EvictionAction.STOP: "would stop",
            EvictionAction.BLOCKED: "would block the drain (not live migratable)",
            EvictionAction.EXTERNAL: "left to an external controller",
        }[eviction.action]
        print(f"{_key(vmi)}: {verb} (evictionStrategy {eviction.strategy}){why}", flush=True)
    return 0


async def _drain_round(
    client: Client, progress: DrainProgress, cluster_default: str | None
) -> dict[str, StepKind]:
    """One level-based pass: read fresh state, act on every VMI still on the node."""
    vmis, _ = await client.list(VMI)
    migrations, _ = await client.list(VMIM)
    _note_departures(progress, vmis)
    in_flight = _in_flight_by_vmi(migrations)
    by_name = {_key(m): m for m in migrations}
    steps: dict[str, StepKind] = {}
    for vmi in (v for v in vmis if vmi_on_node(v, progress.node)):
        key = _key(vmi)
        _note_finished_migration(progress, key, by_name)
        # a migration that Succeeded before the VMI's nodeName moved is still followed
        current = in_flight.get(key) or by_name.get(progress.following.get(key, ""))
        eviction = plan_eviction(vmi, cluster_default=cluster_default)
        step = drain_step(vmi, eviction, in_flight=current, failures=progress.failures.get(key, 0))
        steps[key] = await _act(client, progress, vmi, eviction, step, current)
    return steps


def _note_departures(progress: DrainProgress, vmis: list[JSON]) -> None:
    """Reports VMIs this run moved or stopped once they are off the node."""
    present = {_key(v): v for v in vmis}
    for key in [*progress.following, *progress.stopping]:
        if key in progress.outcomes:
            continue
        vmi = present.get(key)
        if vmi is not None and vmi_on_node(vmi, progress.node):
            continue
        target = (vmi or {}).get("status", {}).get("nodeName")
        if key in progress.following and vmi is not None and target:
            progress.outcomes[key] = "migrated"
            progress.say(key, f"migrated to {target}")
        else:
            progress.outcomes[key] = "stopped"
            strategy = progress.stopping.get(key)
            progress.say(key, f"stopped (evictionStrategy {strategy})" if strategy else "stopped")


def _note_finished_migration(progress: DrainProgress, key: str, by_name: dict[str, JSON]) -> None:
    """Counts a failure when the migration this run followed for ``key`` ended without moving it."""
    name = progress.following.get(key)
    if name is None:
        return
    migration = by_name.get(name)
    phase = ((migration or {}).get("status") or {}).get("phase")
    if migration is not None and phase not in FINAL_MIGRATION_PHASES:
        return
    if phase == "Succeeded":
        return  # the VMI's nodeName follows; nothing failed
    del progress.following[key]
    progress.failures[key] = progress.failures.get(key, 0) + 1
    why = failure_message(migration) if migration is not None else "it was deleted"
    short = name.split("/", 1)[1]
    tries = progress.failures[key]
    retry = f"; retrying ({tries}/{MAX_RETRIES})" if tries <= MAX_RETRIES else ""
    progress.say(key, f"migration {short} failed: {why}{retry}")


async def _act(
    client: Client,
    progress: DrainProgress,
    vmi: JSON,
    eviction: Eviction,
    step: StepKind,
    migration: JSON | None,
) -> StepKind:
    key, name, namespace = _key(vmi), vmi["metadata"]["name"], vmi["metadata"]["namespace"]
    strategy = f"(evictionStrategy {eviction.strategy})"
    if step is StepKind.FOLLOW and migration is not None:
        progress.following[key] = _key(migration)
        phase = (migration.get("status") or {}).get("phase") or "Pending"
        target = ((migration.get("status") or {}).get("migrationState") or {}).get("targetNode")
        progress.say(key, f"migrating {progress.node} -> {target or '?'} ({phase})")
    elif step is StepKind.MIGRATE:
        body = migration_body(name, prefix=EVACUATION_PREFIX, drain_node=progress.node)
        try:
            created = await client.create(VMIM, body, namespace)
        except ApiStatusError as exc:
            progress.say(key, f"cannot evict: {_refusal(exc)} {strategy}")
            return StepKind.BLOCKED
        progress.following[key] = _key(created)
        progress.say(key, f"migration {created['metadata']['name']} created {strategy}")
    elif step is StepKind.STOP:
        await client.delete(VMI, name, namespace)
        progress.stopping[key] = eviction.strategy
        why = f": {eviction.reason}" if eviction.reason else ""
        progress.say(key, f"stopping {strategy}{why}")
    elif step is StepKind.BLOCKED:
        progress.say(key, f"cannot evict: not live migratable: {eviction.reason} {strategy}")
    elif step is StepKind.EXTERNAL:
        progress.say(key, f"left on the node: an external controller must move it {strategy}")
    elif step is StepKind.GAVE_UP:
        progress.say(key, f"gave up after {MAX_RETRIES + 1} failed migrations")
    return step


_UNFINISHED = {
    StepKind.BLOCKED: "blocked",
    StepKind.EXTERNAL: "external",
    StepKind.GAVE_UP: "failed",
}


def _summary(progress: DrainProgress, steps: dict[str, StepKind], *, timed_out: bool) -> int:
    done = _count(progress.outcomes.values())
    node = progress.node
    if not steps:
        print(f"node/{node} drained{': ' + done if done else ''}", flush=True)
        return 0
    left = _count(_UNFINISHED.get(s, "in progress") for s in steps.values())
    why = "timed out" if timed_out else "nothing more can move"
    print(f"node/{node} not drained ({why}): {len(steps)} VMI(s) left: {left}", flush=True)
    if done:
        print(f"  done so far: {done}", flush=True)
    print(_leave_hint(node), flush=True)
    return 1


def _count(labels: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))


def _leave_hint(node: str) -> str:
    return (
        f"node/{node} stays cordoned and migrations in flight continue; "
        f"`vmo node drain {node}` resumes, `vmo node uncordon {node}` undoes"
    )


# --- entry points for the CLI ---------------------------------------------------------------


def run(
    creds: Credentials,
    action: Callable[[Client], Awaitable[int]],
    *,
    on_interrupt: str = "",
) -> int:
    """Runs ``action`` with a client; Ctrl-C prints ``on_interrupt`` and returns 130.

    A refusal by the API server prints its Status message and returns 2.
    """

    async def main() -> int:
        async with Client(creds) as client:
            return await action(client)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        if on_interrupt:
            print(f"\ninterrupted: {on_interrupt}", flush=True)
        return INTERRUPTED
    except ApiStatusError as exc:
        print(f"vmo: {_refusal(exc)}", flush=True)
        return 2
    except TRANSIENT_ERRORS as exc:
        print(f"vmo: cannot reach the API server at {creds.server}: {exc}", flush=True)
        return 1


def migrate_interrupted(namespace: str, name: str) -> str:
    return (
        f"the migration of {namespace}/{name} continues; "
        f"`vmo migrate --cancel {name} -n {namespace}` aborts it"
    )


def drain_interrupted(node: str) -> str:
    return _leave_hint(node)


def node_selector_arg(text: str) -> str:
    """argparse type check of one ``--added-node-selector`` item."""
    try:
        parse_node_selector([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from exc
    return text
