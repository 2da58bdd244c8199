"""The node agent's part of a live migration (virt-handler's role on the source and the target).

The protocol is the VMI's ``status.migrationState`` (see docs/migration.md): the migration
controller names the target node; the target agent starts a QEMU waiting for the guest's state
and, for disks that are not on shared storage, exports empty copies over NBD, then publishes its
address; the source agent mirrors the disks, migrates memory, and writes the outcome. Whoever
sees the destination running first hands the VMI over (``status.nodeName``); after a failure the
target removes everything it made and the source keeps running.

Only the keys each side owns are ever written (JSON merge patches of ``status.migrationState``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmo.api.quantity import QuantityError, parse_quantity
from vmo.client import VMI, ApiStatusError, NotFound
from vmo.engine.agent.host import AgentHost
from vmo.engine.agent.runtime import VmiRuntime, migration_port, qemu_user
from vmo.engine.qemu import migration as qm
from vmo.engine.qemu.errors import QemuError
from vmo.engine.qemu.qmp import VMRunState
from vmo.engine.qemu.vmi import LocalVolume

log = logging.getLogger(__name__)

JSON = dict[str, Any]
MARKER = "migration.json"
TARGET_LABEL = "kubevirt.io/migrationTargetNodeName"
MIGRATION_PORT_ROLE = 0  # upstream's value for the memory stream in targetDirectMigrationNodePorts
BLOCK_PORT_ROLE = 49153  # and for the block-migration (NBD) stream
TARGET_LISTEN = "127.0.0.1"
CLOUD_INIT = ("cloudInitNoCloud", "cloudInitConfigDrive")

TargetVolumePreparer = Callable[[JSON, Path], Awaitable[dict[str, LocalVolume]]]
"""(VMI, target workdir) -> the target's file for each volume: shared volumes as they are,
empty copies (sized from ``status.volumeStatus``) for what the source will mirror."""

VolumeAdopter = Callable[[JSON, LocalVolume], Awaitable[LocalVolume]]
"""After a successful migration: moves a copied pool volume into this node's pool."""

SourceVolumeReleaser = Callable[[tuple[str, str]], Awaitable[None]]
"""After a successful migration: removes the source's copy of a node-local pool volume."""


def in_flight(state: JSON) -> bool:
    return (
        bool(state.get("migrationUid")) and not state.get("completed") and not state.get("failed")
    )


def migration_state(vmi: JSON) -> JSON:
    return dict((vmi.get("status") or {}).get("migrationState") or {})


def tuning_from(config: JSON) -> qm.MigrationTuning:
    """QEMU tuning from upstream's ``migrationConfiguration`` (the KubeVirt CR's field names)."""

    def number(key: str, default: float) -> float:
        value = config.get(key)
        if value is None or value == "":
            return default
        try:
            return float(parse_quantity(value))
        except (QuantityError, TypeError, ValueError):
            return default

    post_copy = bool(config.get("allowPostCopy"))
    if post_copy:
        available, why = qm.post_copy_available(run_as=qemu_user())
        if not available:
            log.warning("allowPostCopy is set but post-copy cannot run here: %s", why)
            post_copy = False
    return qm.MigrationTuning(
        bandwidth_bytes_per_s=int(number("bandwidthPerMigration", 0)),
        max_downtime_ms=int(number("maxDowntimeMs", 300)),
        allow_auto_converge=bool(config.get("allowAutoConverge")),
        allow_post_copy=post_copy,
        completion_timeout_per_gib=int(number("completionTimeoutPerGiB", 150)),
        progress_timeout=int(number("progressTimeout", 150)),
    )


def copied_volumes(runtime: VmiRuntime) -> list[tuple[str, LocalVolume]]:
    """The source's volumes a migration copies: everything not on shared storage except the
    read-only cloud-init seed (regenerated on the target)."""
    out = []
    for volume, local in runtime.volume_sources():
        if local.shared or any(k in volume for k in CLOUD_INIT):
            continue
        out.append((str(volume["name"]), local))
    return out


def export_name(volume: str) -> str:
    return f"vmo-{volume}"


@dataclass
class Incoming:
    """A target QEMU waiting for (or having received) a guest: the migration's target half."""

    uid: str
    runtime: VmiRuntime
    taps: list[str]
    copies: dict[str, LocalVolume]  # volume name -> the empty copy the source mirrors into
    port: int = 0
    nbd_port: int = 0
    watcher: asyncio.Task[None] | None = None

    def save(self) -> None:
        data = {
            "uid": self.uid,
            "taps": self.taps,
            "port": self.port,
            "nbd_port": self.nbd_port,
            "copies": {name: str(v.path) for name, v in self.copies.items()},
        }
        path = self.runtime.workdir / MARKER
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)


def read_marker(workdir: Path) -> JSON | None:
    try:
        data: JSON = json.loads((workdir / MARKER).read_text())
        return data
    except (OSError, ValueError):
        return None


@dataclass
class MigrationRoles:
    """Source and target behaviour of one node agent."""

    agent: AgentHost
    prepare_target_volumes: TargetVolumePreparer
    adopt_volume: VolumeAdopter
    release_source_volume: SourceVolumeReleaser
    incoming: dict[tuple[str, str], Incoming] = field(default_factory=dict)
    outgoing: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict)
    _handled: set[str] = field(default_factory=set)
    _aborts: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    _outgoing_uid: dict[tuple[str, str], str] = field(default_factory=dict)
    # QEMU's figures of the migrations this node sent, by migration uid (for benchmarks, logs)
    results: dict[str, qm.MigrationResult] = field(default_factory=dict)

    @property
    def node(self) -> str:
        return self.agent.node

    # --- dispatch --------------------------------------------------------------------------------

    def concerns(self, vmi: JSON) -> bool:
        md = vmi["metadata"]
        state = migration_state(vmi)
        return state.get("targetNode") == self.node or (md["namespace"], md["name"]) in (
            self.incoming.keys() | self.outgoing.keys()
        )

    async def reconcile(self, key: tuple[str, str], vmi: JSON | None) -> bool:
        """Handles what is the migration's business; True when the agent should do nothing else."""
        incoming = self.incoming.get(key)
        if vmi is None:
            if incoming is not None:
                await self._discard_target(key, incoming)
            return False
        state = migration_state(vmi)
        status = vmi.get("status") or {}
        mine_as_target = (
            state.get("targetNode") == self.node and status.get("nodeName") != self.node
        )
        if incoming is not None and incoming.uid != state.get("migrationUid"):
            await self._discard_target(key, incoming)
            incoming = None
        if vmi["metadata"].get("deletionTimestamp") and key in self._aborts:
            self._aborts[key].set()
        if mine_as_target:
            if incoming is None and read_marker(self.agent.workdir(*key)) is not None:
                await self.recover_target(vmi)
                return True
            if vmi["metadata"].get("deletionTimestamp") or not in_flight(state):
                if incoming is not None and not state.get("completed"):
                    await self._discard_target(key, incoming)
                return True
            if state.get("abortRequested"):
                return True  # the source cancels; its failure tells this side to clean up
            if incoming is None and not state.get("targetNodeAddress"):
                await self._prepare_target(vmi)
            return True
        if incoming is not None and status.get("nodeName") == self.node:
            await self._take_over(vmi, incoming)
            return True
        runtime = self.agent.runtimes.get(key)
        source = runtime is not None and status.get("nodeName") == self.node and in_flight(state)
        if source and state.get("abortRequested") and key not in self.outgoing:
            # aborted before this side started copying: nothing to cancel but the promise
            self._handled.add(str(state["migrationUid"]))
            await self._write_state(
                vmi,
                {
                    "failed": True,
                    "abortStatus": "Succeeded",
                    "failureReason": "migration aborted by request",
                    "endTimestamp": _now(),
                },
            )
            return False
        if (
            runtime is not None
            and source
            and state.get("targetNodeAddress")
            and state["migrationUid"] not in self._handled
            and key not in self.outgoing
        ):
            self._handled.add(state["migrationUid"])
            self._aborts[key] = asyncio.Event()
            self._outgoing_uid[key] = str(state["migrationUid"])
            task = asyncio.get_running_loop().create_task(self._run_source(vmi, runtime))
            self.outgoing[key] = task
            task.add_done_callback(lambda _t: self._source_done(key))
        if key in self._aborts and (
            state.get("abortRequested")
            or state.get("failed")  # the target gave up: stop copying at once
            or state.get("migrationUid") != self._outgoing_uid.get(key)
        ):
            self._aborts[key].set()
        return False

    async def close(self) -> None:
        """Agent shutdown: stops following migrations (QEMU keeps going; the next agent
        finishes or rolls back what it finds)."""
        tasks = [*self.outgoing.values()]
        tasks += [i.watcher for i in self.incoming.values() if i.watcher is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for incoming in self.incoming.values():
            await incoming.runtime.close()
        self.incoming.clear()

    def _source_done(self, key: tuple[str, str]) -> None:
        self.outgoing.pop(key, None)
        self._aborts.pop(key, None)
        self._outgoing_uid.pop(key, None)
        # a newer migration may have been waiting for this one to end
        self.agent.enqueue(key)

    # --- target ----------------------------------------------------------------------------------

    async def _prepare_target(self, vmi: JSON) -> None:
        md = vmi["metadata"]
        key = (md["namespace"], md["name"])
        state = migration_state(vmi)
        workdir = self.agent.workdir(*key)
        await self._clear_stale(workdir)
        runtime = VmiRuntime(md["namespace"], md["name"], md["uid"], workdir, node=self.node)
        incoming = Incoming(str(state["migrationUid"]), runtime, [], {})
        self.incoming[key] = incoming
        try:
            taps, runtime.extra_interfaces = await self.agent.prepare_networks(vmi)
            incoming.taps = list(taps.values())
            volumes = await self.prepare_target_volumes(vmi, workdir)
            copies = {
                name: volumes[name]
                for name, local in _volume_map(vmi, volumes).items()
                if not local.shared and name in volumes and not _is_seed(vmi, name)
            }
            incoming.copies = copies
            incoming.port = migration_port(TARGET_LISTEN)
            await runtime.start(
                vmi, accel=self.agent.accel, volumes=volumes, taps=taps, incoming="defer"
            )
            incoming.save()
            client = await _qmp(runtime)
            if copies:
                incoming.nbd_port = migration_port(TARGET_LISTEN)
                await qm.prepare_target(
                    client,
                    nbd_listen=qm.TcpAddress(TARGET_LISTEN, incoming.nbd_port),
                    exports=[runtime.disk_nodes[name] for name in copies],
                )
                incoming.save()
            tuning = tuning_from(state.get("migrationConfiguration") or {})
            await qm.start_incoming(
                client,
                uri=qm.TcpAddress(TARGET_LISTEN, incoming.port).uri(),
                tuning=tuning,
                bitmaps=bool(copies),
            )
        except Exception as exc:
            log.warning("VMI %s/%s: migration target not prepared: %s", *key, exc)
            await self._discard_target(key, incoming)
            await self._write_state(
                vmi,
                {
                    "failed": True,
                    "failureReason": f"target node {self.node} could not prepare: {exc}",
                    "endTimestamp": _now(),
                },
            )
            return
        ports = {str(incoming.port): MIGRATION_PORT_ROLE}
        if incoming.nbd_port:
            ports[str(incoming.nbd_port)] = BLOCK_PORT_ROLE
        await self._write_state(
            vmi,
            {
                "targetNodeAddress": TARGET_LISTEN,
                "targetDirectMigrationNodePorts": ports,
                "targetNodeDomainDetected": True,
                "targetNodeDomainReadyTimestamp": _now(),
            },
        )
        incoming.watcher = asyncio.get_running_loop().create_task(self._watch_target(key, incoming))

    async def _watch_target(self, key: tuple[str, str], incoming: Incoming) -> None:
        """Waits for the destination to run the guest (then hands the VMI over) or to fail."""
        runtime = incoming.runtime
        try:
            outcome = await qm.wait_incoming(await _qmp(runtime))
        except (QemuError, OSError) as exc:
            outcome = qm.IncomingResult(False, qm.MigrationMode.PRE_COPY, str(exc))
        if self.incoming.get(key) is not incoming:
            return
        vmi = self.agent.latest(key)
        if outcome.completed:
            if vmi is not None:
                await self._complete(vmi, mode=outcome.mode.value)
                self.agent.enqueue(key)
            return
        if vmi is not None and in_flight(migration_state(vmi)):
            tail = runtime.stderr_tail()
            reason = outcome.failure_reason or "the target QEMU failed"
            await self._write_state(
                vmi,
                {
                    "failed": True,
                    "failureReason": reason + (f" ({tail})" if tail else ""),
                    "endTimestamp": _now(),
                },
            )
        await self._discard_target(key, incoming)

    async def _complete(self, vmi: JSON, *, mode: str | None) -> None:
        """Writes the hand-over: completed, the end time, and the target as the VMI's node."""
        state = migration_state(vmi)
        if state.get("completed"):
            return
        target = str(state.get("targetNode") or "")
        patch: JSON = {"completed": True, "endTimestamp": _now()}
        if mode:
            patch["mode"] = mode
        await self._patch_vmi(
            vmi,
            {
                "metadata": {"labels": {TARGET_LABEL: None}},
                "status": {"nodeName": target, "migrationState": patch},
            },
        )

    async def _take_over(self, vmi: JSON, incoming: Incoming) -> None:
        """The guest runs here now: this node's agent owns the VMI from here on."""
        md = vmi["metadata"]
        key = (md["namespace"], md["name"])
        runtime = incoming.runtime
        if incoming.watcher is not None and incoming.watcher is not asyncio.current_task():
            incoming.watcher.cancel()
        if incoming.nbd_port:
            with contextlib.suppress(QemuError, OSError):
                await qm.finish_target(await _qmp(runtime))
        for name, local in list(runtime.volumes.items()):
            if local.claim is not None and name in incoming.copies:
                runtime.volumes[name] = await self.adopt_volume(vmi, local)
        runtime.save_volumes()
        with contextlib.suppress(FileNotFoundError):
            (runtime.workdir / MARKER).unlink()
        self.incoming.pop(key, None)
        await self.agent.adopt_migrated(vmi, runtime, incoming.taps)
        log.info("VMI %s/%s now runs on %s", *key, self.node)

    async def _discard_target(self, key: tuple[str, str], incoming: Incoming) -> None:
        if self.incoming.get(key) is incoming:
            self.incoming.pop(key, None)
        if incoming.watcher is not None and incoming.watcher is not asyncio.current_task():
            incoming.watcher.cancel()
        runtime = incoming.runtime
        await runtime.kill()  # also one a restarted agent could not adopt: found by its pid
        await runtime.close()  # a QEMU that exited by itself still has our QMP connection
        await self.agent.release(runtime, incoming.taps)  # a failure is logged, then swept
        for local in incoming.copies.values():
            with contextlib.suppress(FileNotFoundError):
                local.path.unlink()
        runtime.remove_workdir()

    async def _clear_stale(self, workdir: Path) -> None:
        """A workdir left by an earlier attempt on this node: its QEMU and copies go."""
        if not workdir.exists():
            return
        await VmiRuntime("", "", "", workdir).kill()  # answering QMP or not
        marker = read_marker(workdir) or {}
        for path in (marker.get("copies") or {}).values():
            try:
                Path(path).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("stale migration copy %s not removed: %s", path, exc)
        shutil.rmtree(workdir, ignore_errors=True)

    async def recover_target(self, vmi: JSON) -> bool:
        """At agent start: a target half left by the previous agent. True when handled."""
        md = vmi["metadata"]
        key = (md["namespace"], md["name"])
        workdir = self.agent.workdir(*key)
        marker = read_marker(workdir)
        if marker is None:
            return False
        state = migration_state(vmi)
        runtime = VmiRuntime(md["namespace"], md["name"], md["uid"], workdir, node=self.node)
        try:
            adopted = await runtime.adopt()
        except QemuError:
            adopted = False  # a target QEMU that does not answer is rolled back: killed below
        copies = {
            name: runtime.volumes[name]
            for name in marker.get("copies") or {}
            if name in runtime.volumes
        }
        incoming = Incoming(
            str(marker.get("uid")),
            runtime,
            list(marker.get("taps") or []),
            copies,
            int(marker.get("port") or 0),
            int(marker.get("nbd_port") or 0),
        )
        running = adopted and (await _safe_state(runtime)) in ("running", "paused")
        if running and state.get("migrationUid") == incoming.uid and not state.get("failed"):
            log.info("VMI %s/%s: finishing the hand-over a restart interrupted", *key)
            if (vmi.get("status") or {}).get("nodeName") != self.node:
                await self._complete(vmi, mode=None)
            self.incoming[key] = incoming
            fresh = await self._get(key) or vmi
            await self._take_over(fresh, incoming)
            return True
        log.info("VMI %s/%s: rolling back a migration target a restart interrupted", *key)
        if in_flight(state) and state.get("migrationUid") == incoming.uid:
            await self._write_state(
                vmi,
                {
                    "failed": True,
                    "failureReason": f"the node agent of target {self.node} restarted "
                    "during the migration",
                    "endTimestamp": _now(),
                },
            )
        await self._discard_target(key, incoming)
        return True

    # --- source ----------------------------------------------------------------------------------

    async def _run_source(self, vmi: JSON, runtime: VmiRuntime) -> None:
        md = vmi["metadata"]
        key = (md["namespace"], md["name"])
        state = migration_state(vmi)
        uid = str(state["migrationUid"])
        ports = {
            int(p): role for p, role in (state.get("targetDirectMigrationNodePorts") or {}).items()
        }
        port = next((p for p, role in ports.items() if role == MIGRATION_PORT_ROLE), 0)
        nbd_port = next((p for p, role in ports.items() if role == BLOCK_PORT_ROLE), 0)
        address = str(state.get("targetNodeAddress"))
        copies = copied_volumes(runtime)
        mirrors = [
            qm.BlockMirror(
                node=runtime.disk_nodes[name],
                server=qm.TcpAddress(address, nbd_port),
                export=runtime.disk_nodes[name],
                sync=qm.MirrorSync.TOP if local.backing is not None else qm.MirrorSync.FULL,
            )
            for name, local in copies
        ]
        tuning = tuning_from(state.get("migrationConfiguration") or {})
        await self._write_state(vmi, {"startTimestamp": _now(), "mode": "PreCopy"})
        memory = runtime.memory_mib << 20
        disk_bytes = sum(local.virtual_size for _, local in copies)
        abort = self._aborts.setdefault(key, asyncio.Event())
        if abort.is_set():
            return
        try:
            result = await qm.migrate(
                await _qmp(runtime),
                uri=qm.TcpAddress(address, port).uri(),
                tuning=tuning,
                mirrors=mirrors,
                guest_memory_bytes=memory,
                local_disk_bytes=disk_bytes,
                abort=abort,
            )
        except (QemuError, OSError, ValueError) as exc:
            result = _failed_result(str(exc))
        self.results[uid] = result
        fresh = await self._get(key) or vmi
        if migration_state(fresh).get("migrationUid") != uid:
            return
        if result.completed:
            log.info(
                "VMI %s/%s migrated to %s in %d ms (downtime %s ms)",
                *key,
                state.get("targetNode"),
                result.total_ms,
                result.downtime_ms,
            )
            runtime.stopping = True
            self.agent.runtimes.pop(key, None)
            await self._complete(fresh, mode=result.mode.value)
            await self._retire_source(runtime, key, copies)
            return
        log.warning("VMI %s/%s: migration failed: %s", *key, result.failure_reason)
        if migration_state(fresh).get("failed"):
            return  # the target side said why first
        patch: JSON = {
            "failed": True,
            "failureReason": result.failure_reason or "migration failed",
            "endTimestamp": _now(),
        }
        if result.aborted and migration_state(fresh).get("abortRequested"):
            patch["abortStatus"] = "Succeeded"
        await self._write_state(fresh, patch)

    async def _retire_source(
        self, runtime: VmiRuntime, key: tuple[str, str], copies: list[tuple[str, LocalVolume]]
    ) -> None:
        """The source half after success: QEMU, taps, workdir and node-local volumes go."""
        await runtime.kill()
        await self.agent.release(runtime)
        runtime.remove_workdir()
        for _, local in copies:
            if local.claim is not None:
                await self.release_source_volume(local.claim)

    async def recover_source(self, vmi: JSON, runtime: VmiRuntime) -> None:
        """At agent start, after re-adopting a source QEMU with a migration in flight: finish
        what QEMU finished, roll back the rest (the source keeps running)."""
        md = vmi["metadata"]
        key = (md["namespace"], md["name"])
        state = migration_state(vmi)
        if not in_flight(state):
            return
        try:
            client = await _qmp(runtime)
            status = str((await client.execute("query-migrate")).get("status", "none"))
            # "completed" is also what a QEMU that came here by an earlier migration reports of
            # that incoming one; only a source that gave its guest away is left postmigrate
            gave_away = (await client.query_status()) is VMRunState.POSTMIGRATE
        except (QemuError, OSError):
            status, gave_away = "unknown", False
        if status == "completed" and gave_away:
            runtime.stopping = True
            self.agent.runtimes.pop(key, None)
            await self._complete(vmi, mode=state.get("mode"))
            await self._retire_source(runtime, key, copied_volumes(runtime))
            return
        with contextlib.suppress(QemuError, OSError):
            await qm.recover_source(await _qmp(runtime))
        self._handled.add(str(state["migrationUid"]))
        if state.get("startTimestamp") or state.get("targetNodeAddress"):
            await self._write_state(
                vmi,
                {
                    "failed": True,
                    "failureReason": f"the node agent of source {self.node} restarted "
                    "during the migration",
                    "endTimestamp": _now(),
                },
            )

    # --- API writes ------------------------------------------------------------------------------

    async def _get(self, key: tuple[str, str]) -> JSON | None:
        try:
            return await self.agent.client.get(VMI, key[1], key[0])
        except NotFound:
            return None

    async def _write_state(self, vmi: JSON, state: JSON) -> None:
        await self._patch_vmi(vmi, {"status": {"migrationState": state}})

    async def _patch_vmi(self, vmi: JSON, patch: JSON) -> None:
        md = vmi["metadata"]
        try:
            fresh = await self.agent.client.patch(VMI, md["name"], patch, md["namespace"])
            self.agent.remember(fresh)
        except NotFound:
            pass
        except ApiStatusError as exc:
            log.warning(
                "VMI %s/%s: migration state not written: %s", md["namespace"], md["name"], exc
            )


def _failed_result(reason: str) -> qm.MigrationResult:
    return qm.MigrationResult(
        completed=False,
        mode=qm.MigrationMode.PRE_COPY,
        failure_reason=reason,
        aborted=False,
        total_ms=0,
        qemu_total_ms=None,
        downtime_ms=None,
        setup_ms=None,
        ram_bytes=0,
        disk_bytes=0,
    )


def _volume_map(vmi: JSON, volumes: dict[str, LocalVolume]) -> dict[str, LocalVolume]:
    return {
        str(v.get("name")): volumes[str(v.get("name"))]
        for v in vmi["spec"].get("volumes") or []
        if str(v.get("name")) in volumes
    }


def _is_seed(vmi: JSON, name: str) -> bool:
    return any(
        v.get("name") == name and any(k in v for k in CLOUD_INIT)
        for v in vmi["spec"].get("volumes") or []
    )


async def _qmp(runtime: VmiRuntime) -> Any:
    if runtime.process is None:
        raise QemuError(f"{runtime.namespace}/{runtime.name} has no QEMU")
    return await runtime.process.qmp()


async def _safe_state(runtime: VmiRuntime) -> str:
    try:
        return await runtime.running_state()
    except (QemuError, OSError):
        return "unknown"


def _now() -> str:
    from vmo.engine.agent.node import now_rfc3339

    return now_rfc3339()
