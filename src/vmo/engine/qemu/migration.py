"""Live migration between two QEMU processes (virt-launcher's part): memory over QEMU's migration
stream, node-local disks copied over NBD with ``blockdev-mirror``.

The target QEMU is launched with ``Domain.incoming`` (``defer``), then ``start_incoming`` and
``prepare_target``; the source runs ``migrate``, which returns a ``MigrationResult`` for every
outcome QEMU can have (failed, aborted, timed out) and leaves a failed source running with no
block job behind. The decisions (capabilities, timeouts) are pure functions, tested on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from vmo.api.types import JSON
from vmo.engine.qemu.backup import CHECKPOINT_PREFIX
from vmo.engine.qemu.errors import ProtocolError, QMPConnectionLost, QMPError
from vmo.engine.qemu.qmp import EventListener, QMPClient, VMRunState

__all__ = [
    "UNLIMITED_BANDWIDTH",
    "BlockMirror",
    "ConvergenceWatch",
    "IncomingResult",
    "MigrationMode",
    "MigrationProgress",
    "MigrationResult",
    "MigrationSettings",
    "MigrationTuning",
    "MirrorSync",
    "SocketAddress",
    "TcpAddress",
    "UnixAddress",
    "Verdict",
    "completion_timeout",
    "finish_target",
    "migrate",
    "parse_address",
    "post_copy_available",
    "prepare_target",
    "recover_source",
    "source_settings",
    "start_incoming",
    "target_settings",
    "wait_incoming",
]

log = logging.getLogger("vmo.engine.qemu.migration")

GIB = 1 << 30
# the ports a migration target's QEMU listens on (memory stream and NBD), above Linux's default
# ephemeral range so that no hostfwd or client port takes them; network policy lets the
# migration streams through on these ports only (engine.network.podpolicy)
MIGRATION_PORTS = range(61000, 62000)
# QEMU's rate limiter has no "off" for precopy: 1 TiB/s is beyond anything a host can send.
UNLIMITED_BANDWIDTH = 1 << 40
POLL_INTERVAL = 0.1
_SETTLE_TIMEOUT = 30.0
_JOB_PREFIX = "vmo-mig-"  # the block jobs of a migration
_NBD_NODE_PREFIX = "vmo-mig-nbd-"  # and the NBD client nodes they write to
_RESUME_TIMEOUT = 2.0
_JOB_COMMAND_TIMEOUT = 60.0
_USERFAULTFD_SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")

# Upstream's (virt-launcher's) failure reasons, so VMI status reads the same as on KubeVirt.
REASON_NOT_COMPLETED = (
    "Live migration is not completed after {seconds} seconds and has been aborted"
)
REASON_STUCK = "Live migration stuck for {seconds} seconds and has been aborted"
REASON_ABORTED = "Live migration aborted"
REASON_FAILED = "Live migration failed: {detail}"

_TERMINAL = frozenset({"completed", "failed", "cancelled"})
# Events after which the state is sampled at once instead of at the next poll: the guest is
# paused at the switchover, so every poll interval spent there is downtime.
_WAKING_EVENTS = ("MIGRATION", "JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_ERROR")
# Once QEMU is in these the destination runs the guest: cancelling or resuming the source would
# leave the guest's state split between two hosts.
_POST_COPY = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})


# --- addresses --------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnixAddress:
    path: Path

    def uri(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 < self.port <= 65535:
            raise ValueError(f"tcp port {self.port} is not in 1..65535")

    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


SocketAddress = UnixAddress | TcpAddress

_TCP_URI = re.compile(r"^tcp:(\[(?P<v6>[^\]]+)\]|(?P<host>[^:]+)):(?P<port>\d+)$")


def parse_address(text: str) -> SocketAddress:
    """``unix:/path`` or ``tcp:host:port`` (QEMU's migration URI syntax) as an address."""
    if text.startswith("unix:/"):
        return UnixAddress(Path(text.removeprefix("unix:")))
    match = _TCP_URI.match(text)
    if match is None:
        raise ValueError(f"address {text!r} is neither unix:/path nor tcp:host:port")
    return TcpAddress(match["v6"] or match["host"], int(match["port"]))


def _qapi_address(address: SocketAddress) -> JSON:
    """QAPI ``SocketAddress`` (flat), as ``blockdev-add`` of an NBD client wants it."""
    if isinstance(address, UnixAddress):
        return {"type": "unix", "path": str(address.path)}
    return {"type": "inet", "host": address.host, "port": str(address.port)}


def _qapi_legacy_address(address: SocketAddress) -> JSON:
    """QAPI ``SocketAddressLegacy`` (fields under ``data``), as ``nbd-server-start`` wants it."""
    flat = _qapi_address(address)
    return {"type": flat.pop("type"), "data": flat}


# --- tuning and the settings QEMU gets from it -------------------------------------------------


class MigrationMode(StrEnum):
    """KubeVirt's ``migrationState.mode``."""

    PRE_COPY = "PreCopy"
    POST_COPY = "PostCopy"


class MirrorSync(StrEnum):
    FULL = "full"
    """Copy the whole disk: the target is an empty image of the same size."""
    TOP = "top"
    """Copy only the top layer: the target already has the same backing chain."""


@dataclass(frozen=True)
class MigrationTuning:
    """One migration's knobs, from KubeVirt's ``migrationConfiguration`` (upstream defaults)."""

    bandwidth_bytes_per_s: int = 0
    """0 means unlimited."""
    max_downtime_ms: int = 300
    allow_auto_converge: bool = False
    allow_post_copy: bool = False
    completion_timeout_per_gib: float = 150.0
    """Seconds per GiB of memory and copied disk; 0 disables the completion timeout."""
    progress_timeout: float = 150.0
    """Seconds without a new low of the remaining bytes; 0 disables it."""

    def __post_init__(self) -> None:
        if self.bandwidth_bytes_per_s < 0:
            raise ValueError("bandwidth_bytes_per_s must be >= 0 (0 = unlimited)")
        if not 0 <= self.max_downtime_ms <= 2_000_000:
            raise ValueError("max_downtime_ms must be in 0..2000000 (QEMU's downtime-limit)")
        if self.completion_timeout_per_gib < 0 or self.progress_timeout < 0:
            raise ValueError("completion_timeout_per_gib and progress_timeout must be >= 0")


@dataclass(frozen=True)
class MigrationSettings:
    """What ``migrate-set-capabilities`` and ``migrate-set-parameters`` are given."""

    capabilities: dict[str, bool]
    parameters: dict[str, Any] = field(default_factory=dict)

    def capability_list(self) -> list[JSON]:
        return [{"capability": name, "state": on} for name, on in self.capabilities.items()]


def source_settings(
    tuning: MigrationTuning, *, mirrors: bool, bitmaps: Sequence[JSON] = ()
) -> MigrationSettings:
    """The source's settings. Every capability is set explicitly, on or off: a QEMU keeps them
    from an earlier (failed) migration. ``bitmaps``: the ``block-bitmap-mapping`` of the
    checkpoint bitmaps on copied disks, which then travel in the migration stream."""
    bandwidth = tuning.bandwidth_bytes_per_s or UNLIMITED_BANDWIDTH
    parameters: dict[str, Any] = {
        "max-bandwidth": bandwidth,
        "downtime-limit": tuning.max_downtime_ms,
    }
    if bitmaps:
        parameters["block-bitmap-mapping"] = list(bitmaps)
    return MigrationSettings(
        capabilities={
            "events": True,
            "auto-converge": tuning.allow_auto_converge,
            "postcopy-ram": tuning.allow_post_copy,
            # Disk copies must be complete before the destination takes over.
            "pause-before-switchover": mirrors,
            "dirty-bitmaps": bool(bitmaps),
        },
        parameters=parameters,
    )


def target_settings(tuning: MigrationTuning, *, bitmaps: bool = False) -> MigrationSettings:
    """The destination's settings: post-copy must be enabled on both sides, and so must
    ``dirty-bitmaps`` for a copied disk's checkpoints to arrive."""
    return MigrationSettings(
        capabilities={
            "events": True,
            "postcopy-ram": tuning.allow_post_copy,
            "dirty-bitmaps": bitmaps,
        },
    )


def bitmap_mapping(nodes: Sequence[JSON], mirrors: Sequence[BlockMirror]) -> list[JSON]:
    """QEMU's ``block-bitmap-mapping`` for the checkpoint bitmaps (``vmo-ckpt-*``) on the copied
    disks: each source node under the target's node name (its export's), each bitmap under its
    own name. A disk on shared storage is not copied and not listed: its persistent bitmaps
    reach the destination through the image itself, stored when the source lets go of it."""
    by_name = {str(n.get("node-name")): n for n in nodes}
    mapping = []
    for mirror in mirrors:
        found = (by_name.get(mirror.node) or {}).get("dirty-bitmaps") or []
        if any(b.get("busy") or b.get("inconsistent") for b in found):
            # QEMU checks every bitmap of a mapped node and would refuse the whole migration:
            # this disk's checkpoint stays behind, and its next backup is a full one
            continue
        names = sorted(
            str(b["name"]) for b in found if str(b.get("name", "")).startswith(CHECKPOINT_PREFIX)
        )
        if names:
            mapping.append({"node-name": mirror.node, "alias": mirror.export,
                            "bitmaps": [{"name": n, "alias": n} for n in names]})  # fmt: skip
    return mapping


def completion_timeout(tuning: MigrationTuning, *, data_bytes: int) -> float:
    """Seconds a migration of ``data_bytes`` (memory + copied disks) may take; 0 = forever."""
    return tuning.completion_timeout_per_gib * data_bytes / GIB


class Verdict(Enum):
    START_POST_COPY = "start-post-copy"
    ABORT_NOT_COMPLETED = "abort-not-completed"
    ABORT_STUCK = "abort-stuck"


@dataclass
class ConvergenceWatch:
    """Upstream's migration monitor as a pure state machine over (remaining bytes, time).

    Progress is a new low of the remaining bytes (each pre-copy pass raises them again, so a
    mere decrease would count a guest that out-dirties the link as progressing)."""

    completion_timeout: float
    progress_timeout: float
    allow_post_copy: bool
    started_at: float
    _low: int | None = None
    _last_progress: float = 0.0

    def __post_init__(self) -> None:
        self._last_progress = self.started_at

    def observe(self, remaining: int, now: float, *, post_copy: bool) -> Verdict | None:
        if self._low is None or remaining < self._low:
            self._low = remaining
            self._last_progress = now
        if post_copy:
            return None  # the destination runs the guest: aborting would lose it
        late = self.completion_timeout > 0 and now - self.started_at > self.completion_timeout
        if late and self.allow_post_copy:
            return Verdict.START_POST_COPY
        if self.progress_timeout > 0 and now - self._last_progress > self.progress_timeout:
            return Verdict.ABORT_STUCK
        if late:
            return Verdict.ABORT_NOT_COMPLETED
        return None

    def reason(self, verdict: Verdict, now: float) -> str:
        if verdict is Verdict.ABORT_STUCK:
            return REASON_STUCK.format(seconds=int(now - self._last_progress))
        return REASON_NOT_COMPLETED.format(seconds=int(self.completion_timeout))


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockMirror:
    """One node-local disk to copy: the source's block node into an NBD export on the target."""

    node: str
    """The source's format node (``qemu_argv``'s ``disk_node_names``)."""
    server: SocketAddress
    export: str
    sync: MirrorSync = MirrorSync.FULL


@dataclass(frozen=True)
class MigrationProgress:
    """One sample, given to ``on_progress`` about every ``POLL_INTERVAL``."""

    status: str
    """``mirroring`` until the memory migration starts, then QEMU's migration status."""
    mode: MigrationMode
    elapsed_s: float
    ram_total: int
    ram_remaining: int
    ram_transferred: int
    disk_total: int
    disk_remaining: int
    disk_transferred: int
    dirty_pages_rate: int
    iterations: int

    @property
    def remaining(self) -> int:
        return self.ram_remaining + self.disk_remaining


@dataclass(frozen=True)
class MigrationResult:
    """How a migration ended, with QEMU's figures (None where QEMU did not report them)."""

    completed: bool
    mode: MigrationMode
    failure_reason: str | None
    aborted: bool
    """Ended by ``abort`` or by a timeout (KubeVirt's ``abortStatus: Succeeded``)."""
    total_ms: int
    """Wall time of the whole operation, disk copies included."""
    qemu_total_ms: int | None
    downtime_ms: int | None
    setup_ms: int | None
    ram_bytes: int
    disk_bytes: int

    @property
    def failed(self) -> bool:
        return not self.completed

    @property
    def transferred_bytes(self) -> int:
        return self.ram_bytes + self.disk_bytes


@dataclass(frozen=True)
class IncomingResult:
    """How a migration ended, as the destination saw it."""

    completed: bool
    mode: MigrationMode
    failure_reason: str | None


# --- source side -------------------------------------------------------------------------------


class _Failure(Exception):
    def __init__(self, reason: str, *, aborted: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.aborted = aborted


@dataclass
class _Mirror:
    spec: BlockMirror
    job: str
    target_node: str
    info: JSON = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.info.get("len", 0))

    @property
    def offset(self) -> int:
        return int(self.info.get("offset", 0))


async def _apply(qmp: QMPClient, settings: MigrationSettings) -> None:
    await qmp.execute("migrate-set-capabilities", {"capabilities": settings.capability_list()})
    if settings.parameters:
        await qmp.execute("migrate-set-parameters", dict(settings.parameters))


class _SourceMigration:
    """One outgoing migration; ``run`` drives it, ``fail`` undoes whatever it had started."""

    def __init__(
        self,
        qmp: QMPClient,
        *,
        uri: str,
        tuning: MigrationTuning,
        mirrors: Sequence[BlockMirror],
        guest_memory: int,
        disk_bytes: int,
        on_progress: Callable[[MigrationProgress], None] | None,
        abort: asyncio.Event | None,
    ) -> None:
        self.qmp = qmp
        self.uri = uri
        self.tuning = tuning
        self.mirrors = [
            _Mirror(spec, job=f"{_JOB_PREFIX}{i}", target_node=f"{_NBD_NODE_PREFIX}{i}")
            for i, spec in enumerate(mirrors)
        ]
        self.on_progress = on_progress
        self.abort = abort
        self.started = time.monotonic()
        self.watch = ConvergenceWatch(
            completion_timeout=completion_timeout(tuning, data_bytes=guest_memory + disk_bytes),
            progress_timeout=tuning.progress_timeout,
            allow_post_copy=tuning.allow_post_copy,
            started_at=self.started,
        )
        self.guest_memory = guest_memory
        self.mode = MigrationMode.PRE_COPY
        self.was_running = False
        self.migrating = False
        self.switched_over = False
        self.info: JSON = {}
        self.added_nodes: list[str] = []
        self.events: EventListener | None = None

    # --- the happy path ---

    async def _tick(self, interval: float = POLL_INTERVAL) -> None:
        """Until the next event that may change the state, or ``interval``."""
        if self.events is None:
            await asyncio.sleep(interval)
            return
        # Not get(timeout): Python 3.11's wait_for loses a cancellation that arrives together
        # with the event.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await self.events.get()

    async def run(self) -> MigrationResult:
        self.was_running = await self.qmp.query_status() is VMRunState.RUNNING
        mapping: list[JSON] = []
        if self.mirrors:
            nodes = await self.qmp.execute("query-named-block-nodes", {"flat": True})
            mapping = bitmap_mapping(nodes, [m.spec for m in self.mirrors])
        await _apply(
            self.qmp, source_settings(self.tuning, mirrors=bool(self.mirrors), bitmaps=mapping)
        )
        await self._start_mirrors()
        while True:
            _raise_if_cancelled()
            await self._sample()
            if self.abort is not None and self.abort.is_set() and not self._in_post_copy():
                raise _Failure(REASON_ABORTED, aborted=True)
            if self.migrating and self.info.get("status") == "completed":
                result = self._result(completed=True)
                log.info("migration completed: %s", result)
                return result
            await self._step()
            await self._tick()

    async def _start_mirrors(self) -> None:
        for mirror in self.mirrors:
            spec = mirror.spec
            # recorded first: a cancellation while QEMU adds the node must still remove it
            self.added_nodes.append(mirror.target_node)
            try:
                await self.qmp.execute(
                    "blockdev-add",
                    {
                        "driver": "nbd",
                        "node-name": mirror.target_node,
                        "server": _qapi_address(spec.server),
                        "export": spec.export,
                    },
                )
            except QMPError as exc:
                self.added_nodes.remove(mirror.target_node)
                detail = f"NBD target {spec.export}: {exc.desc}"
                raise _Failure(REASON_FAILED.format(detail=detail)) from exc
            arguments: JSON = {
                "job-id": mirror.job,
                "device": spec.node,
                "target": mirror.target_node,
                "sync": spec.sync.value,
                # Guest writes reach the target before they complete: the copy always converges.
                "copy-mode": "write-blocking",
                "auto-dismiss": False,
            }
            if self.tuning.bandwidth_bytes_per_s:
                arguments["speed"] = self.tuning.bandwidth_bytes_per_s
            await self.qmp.execute("blockdev-mirror", arguments, timeout=_JOB_COMMAND_TIMEOUT)

    async def _sample(self) -> None:
        if self.mirrors:
            jobs = await self.qmp.execute("query-block-jobs")
            by_id = {job.get("device"): job for job in jobs}
            for mirror in self.mirrors:
                mirror.info = by_id.get(mirror.job, mirror.info)
        if self.migrating:
            self.info = await self.qmp.execute("query-migrate")
        if self.on_progress is not None:
            self.on_progress(self._progress())

    def _progress(self) -> MigrationProgress:
        ram = self.info.get("ram") or {}
        disk_total = sum(m.length for m in self.mirrors)
        disk_done = sum(m.offset for m in self.mirrors)
        memory = self.guest_memory
        return MigrationProgress(
            status=str(self.info.get("status", "mirroring")),
            mode=self.mode,
            elapsed_s=time.monotonic() - self.started,
            ram_total=int(ram.get("total", memory)),
            ram_remaining=int(ram.get("remaining", memory)),
            ram_transferred=int(ram.get("transferred", 0)),
            disk_total=disk_total,
            disk_remaining=disk_total - disk_done,
            disk_transferred=disk_done,
            dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
            iterations=int(ram.get("dirty-sync-count", 0)),
        )

    async def _step(self) -> None:
        self._check_mirrors()
        status = self.info.get("status")
        if not self.migrating:
            if all(m.info.get("ready") for m in self.mirrors):
                await self._start_migration()
                return
        elif status in ("failed", "cancelled"):
            detail = self.info.get("error-desc") or f"QEMU reports the migration {status}"
            raise _Failure(REASON_FAILED.format(detail=detail))
        elif status == "pre-switchover":
            await self._switch_over()
            return
        elif status == "postcopy-active":
            self.mode = MigrationMode.POST_COPY
        await self._judge()

    def _in_post_copy(self) -> bool:
        return self.info.get("status") in _POST_COPY

    def _check_mirrors(self) -> None:
        if self.switched_over:
            return  # finished on purpose
        for mirror in self.mirrors:
            info = mirror.info
            if info.get("error") or info.get("status") in ("concluded", "null", "aborting"):
                detail = info.get("error") or f"job {info.get('status')}"
                raise _Failure(
                    REASON_FAILED.format(detail=f"copy of {mirror.spec.node} failed: {detail}")
                )

    async def _start_migration(self) -> None:
        log.info("migrating to %s (%d disk copies ready)", self.uri, len(self.mirrors))
        try:
            await self.qmp.execute("migrate", {"uri": self.uri})
        except QMPError as exc:
            raise _Failure(REASON_FAILED.format(detail=exc.desc)) from exc
        self.migrating = True

    async def _judge(self) -> None:
        now = time.monotonic()
        post_copy = self.mode is MigrationMode.POST_COPY
        verdict = self.watch.observe(self._progress().remaining, now, post_copy=post_copy)
        if verdict is Verdict.START_POST_COPY:
            if not self.migrating:
                return  # post-copy needs a running migration; the disks are still syncing
            log.info("migration not completed in %.0f s: starting post-copy", now - self.started)
            await self.qmp.execute("migrate-start-postcopy")
            self.mode = MigrationMode.POST_COPY
        elif verdict is not None:
            raise _Failure(self.watch.reason(verdict, now), aborted=True)

    async def _switch_over(self) -> None:
        """The source is paused: the disk copies are finished (not pivoted: the source keeps its
        own disks for a rollback), their NBD connections closed, then QEMU goes on."""
        for mirror in self.mirrors:
            # Cancelling a ready mirror completes it: the target is a consistent copy.
            await self.qmp.execute("block-job-cancel", {"device": mirror.job})
        for mirror in self.mirrors:
            info = await self._wait_concluded(mirror.job)
            if info.get("error"):
                raise _Failure(
                    REASON_FAILED.format(detail=f"copy of {mirror.spec.node}: {info['error']}")
                )
            mirror.info = info
        self.switched_over = True
        await self._dismiss_jobs()
        await self._delete_target_nodes()
        await self.qmp.execute("migrate-continue", {"state": "pre-switchover"})

    # --- undoing ---

    async def fail(self, failure: _Failure) -> MigrationResult:
        """Cancels what runs, removes what was added, resumes the source; the result."""
        if self._in_post_copy():
            return await self._fail_in_post_copy(failure)
        if self.migrating and self.info.get("status") not in _TERMINAL:
            with contextlib.suppress(QMPError):
                await self.qmp.execute("migrate_cancel")
            await self._settle_migration()
        if self.info.get("status") == "completed":
            log.warning("the migration completed before it could be aborted (%s)", failure.reason)
            return self._result(completed=True)
        await self._drop_mirrors()
        await self._resume_source()
        log.info("migration failed: %s", failure.reason)
        return self._result(completed=False, reason=failure.reason, aborted=failure.aborted)

    async def _fail_in_post_copy(self, failure: _Failure) -> MigrationResult:
        """Nothing can be undone in post-copy: QEMU is left to finish (or to pause, if the stream
        breaks); the source is never resumed."""
        log.error("cannot abort a migration in post-copy (%s); QEMU goes on", failure.reason)
        reason = f"{failure.reason} (in post-copy: not aborted, the source stays paused)"
        return self._result(completed=False, reason=reason)

    async def _settle_migration(self) -> None:
        deadline = time.monotonic() + _SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            self.info = await self.qmp.execute("query-migrate")
            if self.info.get("status") in _TERMINAL:
                return
            await self._tick()
        log.error("migration still %s %g s after migrate_cancel", self.info, _SETTLE_TIMEOUT)

    async def _wait_concluded(self, job: str) -> JSON:
        deadline = time.monotonic() + _SETTLE_TIMEOUT
        while True:
            jobs = {j.get("device"): j for j in await self.qmp.execute("query-block-jobs")}
            info: JSON = jobs.get(job) or {"status": "null"}
            if info.get("status") in ("concluded", "null") or time.monotonic() > deadline:
                return info
            await self._tick()

    async def _drop_mirrors(self) -> None:
        jobs = {j.get("device"): j for j in await self.qmp.execute("query-block-jobs")}
        ours = [m.job for m in self.mirrors if m.job in jobs]
        for job in ours:
            if jobs[job].get("status") != "concluded":
                with contextlib.suppress(QMPError):  # it may conclude in between
                    await self.qmp.execute("block-job-cancel", {"device": job, "force": True})
        for job in ours:
            await self._wait_concluded(job)
        await self._dismiss_jobs()
        await self._delete_target_nodes()

    async def _dismiss_jobs(self) -> None:
        jobs = {j.get("device") for j in await self.qmp.execute("query-block-jobs")}
        for mirror in self.mirrors:
            if mirror.job in jobs:
                await self.qmp.execute("job-dismiss", {"id": mirror.job})

    async def _delete_target_nodes(self) -> None:
        while self.added_nodes:
            node = self.added_nodes.pop()
            try:
                await self.qmp.execute("blockdev-del", {"node-name": node})
            except QMPError as exc:
                log.warning("cannot remove the NBD client node %s: %s", node, exc)

    async def _resume_source(self) -> None:
        """QEMU restarts a source it had paused once a migration fails; this waits for that, and
        resumes the guest itself if QEMU did not (a failure at the switchover)."""
        if not self.was_running:
            return
        with self.qmp.listen("RESUME") as resumed:
            if await self.qmp.query_status() is VMRunState.RUNNING:
                return
            with contextlib.suppress(ProtocolError):
                await resumed.get(_RESUME_TIMEOUT)
                return
        state = await self.qmp.query_status()
        if state is not VMRunState.RUNNING:
            log.warning("source still %s after the failed migration: resuming it", state.value)
            await self.qmp.execute("cont")

    def _result(
        self, *, completed: bool, reason: str | None = None, aborted: bool = False
    ) -> MigrationResult:
        ram = self.info.get("ram") or {}

        def qemu_ms(key: str) -> int | None:
            value = self.info.get(key)
            return None if value is None else int(value)

        return MigrationResult(
            completed=completed,
            mode=self.mode,
            failure_reason=reason,
            aborted=aborted,
            total_ms=int((time.monotonic() - self.started) * 1000),
            qemu_total_ms=qemu_ms("total-time"),
            downtime_ms=qemu_ms("downtime"),
            setup_ms=qemu_ms("setup-time"),
            ram_bytes=int(ram.get("transferred", 0)),
            disk_bytes=sum(m.offset for m in self.mirrors),
        )


def _raise_if_cancelled() -> None:
    """A cancellation a library call swallowed (3.11's ``wait_for``) still counts."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def migrate(
    qmp: QMPClient,
    *,
    uri: str,
    tuning: MigrationTuning,
    guest_memory_bytes: int,
    mirrors: Sequence[BlockMirror] = (),
    local_disk_bytes: int = 0,
    on_progress: Callable[[MigrationProgress], None] | None = None,
    abort: asyncio.Event | None = None,
) -> MigrationResult:
    """Migrates the VM behind ``qmp`` to the destination listening at ``uri``.

    Disks in ``mirrors`` are copied first (the target exports them with ``prepare_target``);
    memory follows once every copy is in sync. ``local_disk_bytes`` (the copied disks' size)
    counts in the completion timeout. Setting ``abort`` ends the migration with an aborted
    result; cancelling the task does the same, then re-raises. After any failure the source
    runs again (if it ran) and no block job or NBD client node of this migration is left.
    """
    if guest_memory_bytes <= 0:
        raise ValueError("guest_memory_bytes must be > 0")
    run = _SourceMigration(
        qmp,
        uri=uri,
        tuning=tuning,
        mirrors=mirrors,
        guest_memory=guest_memory_bytes,
        disk_bytes=local_disk_bytes,
        on_progress=on_progress,
        abort=abort,
    )
    with qmp.listen(*_WAKING_EVENTS) as run.events:
        try:
            return await run.run()
        except _Failure as failure:
            return await run.fail(failure)
        except QMPConnectionLost as exc:
            # The source QEMU itself is gone: there is nothing left to cancel or resume.
            reason = REASON_FAILED.format(detail=f"source QEMU: {exc}")
            return run._result(completed=False, reason=reason)
        except ProtocolError as exc:
            return await run.fail(_Failure(REASON_FAILED.format(detail=str(exc))))
        except BaseException:
            # Cancelled (or on_progress raised): undo, whatever else is cancelled meanwhile.
            await asyncio.shield(run.fail(_Failure(REASON_ABORTED, aborted=True)))
            raise


async def recover_source(qmp: QMPClient) -> None:
    """After the process that drove a migration from this QEMU died: cancels the migration and
    this module's block jobs, removes their NBD client nodes, and runs a guest that a
    switchover pause left stopped. The source is then as it was before the migration."""
    with contextlib.suppress(QMPError):
        await qmp.execute("migrate_cancel")
    jobs = [j for j in await qmp.execute("query-block-jobs") or [] if _ours(j.get("device"))]
    for job in jobs:
        if job.get("status") != "concluded":
            with contextlib.suppress(QMPError):
                await qmp.execute("block-job-cancel", {"device": job["device"], "force": True})
    deadline = time.monotonic() + _SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        left = {j.get("device"): j for j in await qmp.execute("query-block-jobs") or []}
        waiting = [j for j in jobs if left.get(j["device"], {}).get("status", "null") != "null"]
        for job in waiting:
            if left[job["device"]].get("status") == "concluded":
                with contextlib.suppress(QMPError):
                    await qmp.execute("job-dismiss", {"id": job["device"]})
        if not waiting:
            break
        await asyncio.sleep(POLL_INTERVAL)
    for node in await qmp.execute("query-named-block-nodes", {"flat": True}) or []:
        name = str(node.get("node-name") or "")
        if name.startswith(_NBD_NODE_PREFIX):
            try:
                await qmp.execute("blockdev-del", {"node-name": name})
            except QMPError as exc:
                log.warning("cannot remove the NBD client node %s: %s", name, exc)
    status = await qmp.execute("query-status")
    if status.get("status") in ("finish-migrate", "postmigrate", "pre-switchover"):
        await qmp.execute("cont")


def _ours(job: object) -> bool:
    return isinstance(job, str) and job.startswith(_JOB_PREFIX)


# --- target side -------------------------------------------------------------------------------


async def start_incoming(
    qmp: QMPClient, *, uri: str | None, tuning: MigrationTuning, bitmaps: bool = False
) -> None:
    """Sets the destination's capabilities, then listens on ``uri`` (``migrate-incoming``; pass
    None when the domain was launched listening already). ``bitmaps``: accept dirty bitmaps
    in the stream (when disks are copied). With ``allow_post_copy`` on a QEMU that cannot use
    userfaultfd this raises ``QMPError`` ("Postcopy is not supported")."""
    await _apply(qmp, target_settings(tuning, bitmaps=bitmaps))
    if uri is not None:
        await qmp.execute("migrate-incoming", {"uri": uri})


async def prepare_target(
    qmp: QMPClient, *, nbd_listen: SocketAddress, exports: Sequence[str]
) -> None:
    """Serves the block nodes ``exports`` (the target's empty copies) writable over NBD, each
    under its own node name as export name."""
    await qmp.execute("nbd-server-start", {"addr": _qapi_legacy_address(nbd_listen)})
    try:
        for node in exports:
            await qmp.execute(
                "block-export-add",
                {"type": "nbd", "id": f"vmo-mig-{node}", "node-name": node, "writable": True},
                timeout=_JOB_COMMAND_TIMEOUT,
            )
    except BaseException:
        await finish_target(qmp)
        raise


async def finish_target(qmp: QMPClient) -> None:
    """Stops the NBD server and its exports; idempotent."""
    try:
        await qmp.execute("nbd-server-stop", timeout=_JOB_COMMAND_TIMEOUT)
    except QMPError as exc:
        log.debug("nbd-server-stop: %s", exc)


async def wait_incoming(qmp: QMPClient, *, timeout: float | None = None) -> IncomingResult:
    """Until the destination runs the guest (migration completed) or the migration failed.

    A failed incoming migration makes QEMU exit: a lost connection is a failure too.
    ``TimeoutError`` if neither happens within ``timeout``.
    """
    mode = MigrationMode.PRE_COPY
    try:
        with qmp.listen("MIGRATION") as events:
            status = (await qmp.execute("query-migrate")).get("status")
            async with asyncio.timeout(timeout):
                while status not in _TERMINAL:
                    if status == "postcopy-active":
                        mode = MigrationMode.POST_COPY
                    status = (await events.get())["data"]["status"]
            if status == "completed" and await qmp.query_status() is VMRunState.RUNNING:
                return IncomingResult(completed=True, mode=mode, failure_reason=None)
    except QMPConnectionLost as exc:
        detail = f"destination QEMU exited: {exc}"
        return IncomingResult(False, mode, REASON_FAILED.format(detail=detail))
    return IncomingResult(False, mode, REASON_FAILED.format(detail=f"destination {status}"))


# --- post-copy ---------------------------------------------------------------------------------


def post_copy_available(*, run_as: str | None = None) -> tuple[bool, str]:
    """Whether a destination QEMU (dropping to ``run_as``, or keeping this process's user) can
    use post-copy: QEMU 7.2 needs the userfaultfd syscall, which an unprivileged process gets
    only with ``vm.unprivileged_userfaultfd = 1`` (QEMU 7.2 does not use /dev/userfaultfd)."""
    if not _USERFAULTFD_SYSCTL.exists():
        return False, "the kernel has no userfaultfd (CONFIG_USERFAULTFD)"
    if run_as is None:
        uid = os.geteuid()
    else:
        try:
            uid = pwd.getpwnam(run_as).pw_uid
        except KeyError:
            return False, f"user {run_as!r} (QEMU's -runas) does not exist"
    if uid == 0:
        return True, "QEMU runs as root"
    if _USERFAULTFD_SYSCTL.read_text().strip() == "1":
        return True, "vm.unprivileged_userfaultfd is 1"
    who = f"user {run_as}" if run_as is not None else f"uid {uid}"
    return False, (
        f"QEMU runs as {who} and vm.unprivileged_userfaultfd is 0: "
        "the destination cannot open userfaultfd"
    )
