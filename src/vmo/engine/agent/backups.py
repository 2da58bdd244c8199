"""backup.kubevirt.io/v1alpha1 VirtualMachineBackup on one node: the roles upstream splits
between virt-controller's backup controller and virt-handler/virt-launcher, for the VMIs that
run here.

A backup whose VM runs on this node is claimed (``vmo.dev/backup-node`` and upstream's finalizer
``backup.kubevirt.io/vmbackup-protection``, in one resourceVersion-guarded patch), the guest is
frozen through its agent unless ``skipQuiesce``, the point-in-time backup is started on every
claim-backed disk (``vmo.engine.qemu.backup``), and the guest is thawed at once. Its checkpoint
is ``<backup>-<creationTimestamp, 2006-01-02_15-04-05>``; it is incremental when its source is a
tracker with a ``latestCheckpoint`` and ``forceFullBackup`` is not set, and falls back to full
when QEMU no longer has that checkpoint (a VM snapshot or a live migration moved the disk onto a
new image, or the image was closed uncleanly), saying why in its status and an Event.

Pull mode: a VirtualMachineExport of the backup's own name serves each volume's ``data`` and
``map``; once it is Ready the links and CA go to ``status.includedVolumes`` and ``endpointCert``.
Deleting the backup (or its ``ttlDuration``, 2h by default, running out) ends it: the exports go,
the new checkpoint replaces the old one, and the tracker's ``latestCheckpoint`` names it.
Push mode: QEMU itself writes each disk (all of it, or the clusters dirty since the checkpoint)
into a sparse qcow2 (``vmo.engine.qemu.backup.push_start``); once every job has ended the files
go into the ext4 filesystem inside the target claim, as ``/<backup>/<volume>.qcow2``
(``vmo.engine.storage.backup_pvc``), and the backup completes by itself, moving the tracker on.
The claim must be on this node (or shared) and in use by no VMI; one still waiting for its first
consumer is provisioned here.

A stopped VM (which upstream's engine does not back up) is backed up by the node whose pools
hold its claims: the VM is locked (``vmo.dev/backup-in-progress``, so that it does not start
meanwhile), and a guestless QEMU (``vmo.engine.qemu.process.launch_storage``) opens the claims'
images as the VM's QEMU would; the same pull or push runs in it, and it quits (storing the
checkpoint) when the backup ends.

Conditions, reasons and messages are upstream's (Progressing, Complete, Failed, Quiesced).
A backup this node started whose session a restart of the agent lost fails ("the node agent
restarted during the backup"), and what it left in QEMU is swept away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from vmo.api.annotations import BACKUP_LOCK, BACKUP_NODE, EXPORT_NODE
from vmo.api.duration import parse_duration
from vmo.api.kubevirt.migratable import claim_name
from vmo.api.storage import SELECTED_NODE
from vmo.client import (
    PVC,
    VM,
    VMBACKUP,
    VMBACKUPTRACKER,
    VMEXPORT,
    VMI,
    Client,
    Conflict,
    NotFound,
)
from vmo.engine.agent.agent import NodeAgent
from vmo.engine.agent.runtime import VmiRuntime, qemu_user, workdir_name
from vmo.engine.qemu import backup as qb
from vmo.engine.qemu.argv import format_node_name
from vmo.engine.qemu.domain import Disk, DiskCache, DiskFormat
from vmo.engine.qemu.errors import QemuError
from vmo.engine.qemu.guest_agent import GuestAgentClient
from vmo.engine.qemu.process import QemuProcess, adopt, launch_storage
from vmo.engine.qemu.process import find as find_qemu
from vmo.engine.storage.backup_endpoints import BackupVolume
from vmo.engine.storage.backup_pvc import PushTargetError, store_files
from vmo.engine.storage.claims import claims_of_vmi
from vmo.engine.storage.pool import Pool, PoolError
from vmo.runtime import Controller, EventRecorder, Result, Watch, merge_conditions, split_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]
FINALIZER = "backup.kubevirt.io/vmbackup-protection"
GROUP = "backup.kubevirt.io"
DEFAULT_TTL = timedelta(hours=2)
CHECKPOINT_TIME = "%Y-%m-%d_%H-%M-%S"
FREEZE_TIMEOUT = 30.0
RETRY_SECONDS = 2.0


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def checkpoint_name(backup: JSON) -> str:
    created = _parse(str(backup["metadata"]["creationTimestamp"]))
    return f"{backup['metadata']['name']}-{created.strftime(CHECKPOINT_TIME)}"


def condition(ctype: str, status: bool, reason: str, message: str, generation: int) -> JSON:
    return {"type": ctype, "status": "True" if status else "False", "reason": reason,
            "message": message, "observedGeneration": generation}  # fmt: skip


def is_terminal(backup: JSON) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (backup.get("status") or {}).get("conditions") or []
    )


def ttl_of(backup: JSON) -> timedelta:
    raw = (backup.get("spec") or {}).get("ttlDuration")
    if not raw:
        return DEFAULT_TTL
    try:
        return parse_duration(str(raw))
    except ValueError:
        return DEFAULT_TTL


@dataclass
class Session:
    """A backup running on this node."""

    export: qb.BackupExport | None  # pull mode
    namespace: str
    vm: str
    tracker: str | None
    volumes: list[JSON]  # [{volumeName, diskTarget}]
    warning: str = ""  # why the backup completes with a warning (the freeze failed)
    push: qb.PushBackup | None = None  # push mode: QEMU's jobs, and where their files go
    target: tuple[Pool, str] | None = None  # the target claim's pool and name
    workdir: Path | None = None  # where the backup's files and sockets are made
    offline: QemuProcess | None = None  # a stopped VM's disks, held open by a guestless QEMU
    lock: str = ""  # the stopped VM's BACKUP_LOCK value while it is backed up


@dataclass
class _Source:
    """What a backup reads: the disks' block nodes in a QEMU, and their targets (vda, ...)."""

    disks: list[qb.BackupDisk]
    targets: dict[str, str]
    runtime: VmiRuntime | None = None  # the running VMI's
    images: list[Disk] = field(default_factory=list)  # a stopped VM's, to open
    vm: JSON | None = None  # the stopped VM


class BackupExecutor(Controller):
    """One per node: runs the VirtualMachineBackups of the VMIs on this node."""

    workers = 1

    def __init__(
        self, client: Client, node: str, agent: NodeAgent, pools: Sequence[Pool] = ()
    ) -> None:
        super().__init__(client)
        self.node, self.agent, self.pools = node, agent, list(pools)
        self.name = f"backup-executor-{node}"
        self.sessions: dict[tuple[str, str], Session] = {}
        self._claim_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.events = EventRecorder(client, component="virt-controller")

    async def stop(self) -> None:
        """The agent is going away: a stopped VM's backup QEMU keeps running, for the next agent
        to sweep and quit (failing the backup), but lets go of its monitor now, which takes one
        client at a time."""
        for session in self.sessions.values():
            if session.offline is not None:
                await session.offline.detach()
        self.sessions.clear()
        await super().stop()

    def watches(self) -> Sequence[Watch]:
        return [
            Watch(VMBACKUP),
            Watch(VMEXPORT, _export_backup_keys),
            Watch(VMI, self._backups_of_vmi),
        ]

    def _backups_of_vmi(self, _etype: str, vmi: JSON) -> list[str]:
        namespace = vmi["metadata"].get("namespace", "")
        return [
            f"{namespace}/{b['metadata']['name']}" for b in self.informer(VMBACKUP).items(namespace)
        ]

    def backup_volumes(self, namespace: str, name: str) -> dict[str, BackupVolume] | None:
        """What the node's export server serves for the backup (None: not running here)."""
        session = self.sessions.get((namespace, name))
        if session is None or session.export is None:
            return None
        return {
            d.volume: BackupVolume(session.export.socket, d.volume, d.frozen_bitmap)
            for d in session.export.disks
        }

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        backup = await self.client.find(VMBACKUP, name, namespace)
        if backup is None:
            session = self.sessions.pop((namespace, name), None)
            if session is not None:
                await self._finish(session, success=False)
            return None
        delay = await self.sync(backup)
        return Result.after(delay) if delay is not None else None

    # --- reconcile ----------------------------------------------------------------------------

    async def sync(self, backup: JSON) -> float | None:
        md = backup["metadata"]
        key = (md["namespace"], md["name"])
        owner = (md.get("annotations") or {}).get(BACKUP_NODE)
        if owner not in (None, self.node):
            return None
        session = self.sessions.get(key)
        if is_terminal(backup):
            if md.get("deletionTimestamp"):
                await self._drop_finalizer(backup)
            return None
        if md.get("deletionTimestamp"):
            if session is not None and session.push is not None:
                # push mode ends by itself: deleted before that, it is abandoned
                self.sessions.pop(key, None)
                await self._finish(session, success=False)
            elif session is not None:
                # pull mode: deleting the backup is how its reader says it is done
                await self._complete(backup, session)
            elif owner == self.node:
                await self._lost(backup)
            await self._drop_finalizer(backup)
            return None
        if session is not None:
            return await self._follow(backup, session)
        if owner == self.node:
            await self._lost(backup)
            return None
        return await self._maybe_start(backup)

    async def _maybe_start(self, backup: JSON) -> float | None:
        md, spec = backup["metadata"], backup.get("spec") or {}
        namespace = md["namespace"]
        vm_name, tracker, waiting = await self._source(backup)
        if waiting:
            await self._initializing(backup, waiting)
            return RETRY_SECONDS
        vmi = await self.client.find(VMI, vm_name, namespace)
        if vmi is not None:
            source, delay = await self._running_source(backup, vmi, vm_name)
        else:
            source, delay = await self._stopped_source(backup, vm_name)
        if source is None:
            return delay
        if not source.disks:
            await self._initializing(backup, f"vm {vm_name} has no volumes to backup")
            return None
        pvc_name = str(spec.get("pvcName") or "")
        pvc = await self.client.find(PVC, pvc_name, namespace) if pvc_name else None
        if pvc is None:
            await self._initializing(backup, f"PVC {namespace}/{pvc_name} doesnt exist")
            return RETRY_SECONDS
        if (pvc.get("spec") or {}).get("volumeMode") == "Block":
            message = (
                f"backup target PVC must be a filesystem PVC, provided pvc "
                f"{namespace}/{pvc_name} is block"
            )
            await self._initializing(backup, message)
            return RETRY_SECONDS
        push = (spec.get("mode") or "Push") != "Pull"
        target: tuple[Pool, str] | None = None
        if push:
            pool, why, fatal = await self._push_target(pvc)
            if pool is None:
                if fatal:
                    claimed = await self._claim(backup)
                    if claimed is not None:
                        await self._fail(claimed, "Failed", f"Backup has failed: {why}")
                    return None
                await self._initializing(backup, why)
                return RETRY_SECONDS
            target = (pool, pvc_name)
        lock = ""
        if source.vm is not None:
            lock = await self._lock_vm(backup, source.vm)
            if not lock:
                return RETRY_SECONDS
        claimed = await self._claim(backup)
        if claimed is None:
            if lock:
                await self._unlock_vm(namespace, vm_name, lock)
            return 0.1
        since = None
        if tracker is not None and not spec.get("forceFullBackup"):
            since = ((tracker.get("status") or {}).get("latestCheckpoint") or {}).get("name")
        try:
            session = await self._start(claimed, source, vm_name, tracker, since, target=target)
        except (QemuError, OSError) as exc:
            log.warning("backup %s/%s failed to start: %s", namespace, md["name"], exc)
            if lock:
                await self._unlock_vm(namespace, vm_name, lock)
            await self._fail(claimed, "Failed", f"Backup has failed: {exc}")
            return None
        session.lock = lock
        self.sessions[(namespace, md["name"])] = session
        if not push:
            await self._create_export(claimed)
        return await self._follow(claimed, session)

    async def _running_source(
        self, backup: JSON, vmi: JSON, vm_name: str
    ) -> tuple[_Source | None, float | None]:
        """The running VMI's disks, when it runs here and may be backed up now."""
        vstatus = vmi.get("status") or {}
        if vstatus.get("phase") != "Running":
            await self._initializing(backup, f"vm {vm_name} is not running, cannot do backup")
            return None, RETRY_SECONDS
        if vstatus.get("nodeName") != self.node:
            return None, None
        runtime = self.agent.runtimes.get((vmi["metadata"]["namespace"], vm_name))
        if runtime is None or not runtime.alive or runtime.process is None:
            return None, RETRY_SECONDS
        migration = vstatus.get("migrationState") or {}
        if migration and not migration.get("completed") and not migration.get("failed"):
            message = (
                f"vm {vm_name} is currently migrating, waiting for migration to complete "
                "before starting backup"
            )
            await self._initializing(backup, message)
            return None, RETRY_SECONDS
        disks = backup_disks(runtime)
        targets = {d.volume: _target(runtime, d.volume) for d in disks}
        return _Source(disks, targets, runtime=runtime), None

    async def _stopped_source(
        self, backup: JSON, vm_name: str
    ) -> tuple[_Source | None, float | None]:
        """A stopped VM's disks, when every claim of its is a volume of this node's pools (a
        shared pool's: every node may, and the first to lock the VM does)."""
        namespace = backup["metadata"]["namespace"]
        vm = await self.client.find(VM, vm_name, namespace)
        if vm is None or vm["metadata"].get("deletionTimestamp"):
            await self._initializing(backup, f"vm {vm_name} does not exist, cannot do backup")
            return None, RETRY_SECONDS
        held = (vm["metadata"].get("annotations") or {}).get(BACKUP_LOCK, "")
        if held.partition("@")[0] == backup["metadata"]["name"] and held != self._lock_value(
            backup
        ):
            return None, None  # another node locked the VM for this backup: it runs it
        volumes = (((vm.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
            "volumes"
        ) or []
        source = _Source([], {}, vm=vm)
        for index, volume in enumerate(volumes):
            claim = claim_name(volume)
            if not claim:
                continue
            pvc = await self.client.find(PVC, claim, namespace)
            if pvc is None or (pvc.get("status") or {}).get("phase") != "Bound":
                message = f"PVC {namespace}/{claim} of vm {vm_name} is not bound yet"
                await self._initializing(backup, message)
                return None, RETRY_SECONDS
            pool = next((p for p in self.pools if p.exists(namespace, claim)), None)
            if pool is None:
                return None, None  # a volume of another node: that node backs it up
            try:
                fmt = DiskFormat(pool.record(namespace, claim).format)
                top = pool.top(namespace, claim)
            except (PoolError, ValueError) as exc:
                await self._initializing(backup, f"PVC {namespace}/{claim}: {exc}")
                return None, RETRY_SECONDS
            slot = len(source.images)
            source.images.append(Disk(f"d{slot}", top, format=fmt, cache=DiskCache.WRITETHROUGH))
            source.disks.append(qb.BackupDisk(str(volume["name"]), format_node_name(slot)))
            source.targets[str(volume["name"])] = f"disk{index}"
        return source, None

    def _lock_value(self, backup: JSON) -> str:
        return f"{backup['metadata']['name']}@{self.node}"

    async def _lock_vm(self, backup: JSON, vm: JSON) -> str:
        """Locks the stopped VM for the backup (it does not start until the lock goes); the
        lock's value, or "" when the VM is locked by another backup or has started."""
        md, vmd = backup["metadata"], vm["metadata"]
        value = self._lock_value(backup)
        held = (vmd.get("annotations") or {}).get(BACKUP_LOCK, "")
        if held and held != value:
            other = held.partition("@")[0]
            found = await self.client.find(VMBACKUP, other, md["namespace"])
            if found is not None and not is_terminal(found):
                await self._initializing(
                    backup, f"vm {vmd['name']} is being backed up by {other}, waiting"
                )
                return ""
        if held != value:
            patch = {
                "metadata": {
                    "resourceVersion": vmd["resourceVersion"],
                    "annotations": {BACKUP_LOCK: value},
                }
            }
            try:
                await self.client.patch(VM, vmd["name"], patch, md["namespace"])
            except (Conflict, NotFound):
                return ""
        if await self.client.find(VMI, vmd["name"], md["namespace"]) is not None:
            await self._unlock_vm(md["namespace"], vmd["name"], value)  # it started first
            return ""
        return value

    async def _unlock_vm(self, namespace: str, name: str, value: str) -> None:
        for _ in range(5):
            vm = await self.client.find(VM, name, namespace)
            if vm is None or (vm["metadata"].get("annotations") or {}).get(BACKUP_LOCK) != value:
                return
            patch = {
                "metadata": {
                    "resourceVersion": vm["metadata"]["resourceVersion"],
                    "annotations": {BACKUP_LOCK: None},
                }
            }
            try:
                await self.client.patch(VM, name, patch, namespace)
                return
            except NotFound:
                return
            except Conflict:
                continue

    async def _push_target(self, pvc: JSON) -> tuple[Pool | None, str, bool]:
        """The pool of this node holding the push target's volume; else why not yet (False) or
        why never (True). A claim still waiting for its first consumer is provisioned here."""
        md = pvc["metadata"]
        namespace, name = md["namespace"], md["name"]
        if (pvc.get("status") or {}).get("phase") != "Bound":
            if SELECTED_NODE not in (md.get("annotations") or {}):
                patch = {"metadata": {"annotations": {SELECTED_NODE: self.node}}}
                with contextlib.suppress(Conflict, NotFound):
                    await self.client.patch(PVC, name, patch, namespace)
            return None, f"PVC {namespace}/{name} is not bound yet", False
        pool = next((p for p in self.pools if p.exists(namespace, name)), None)
        if pool is None:
            return None, (
                f"PVC {namespace}/{name} is a volume of another node; a push backup writes into "
                f"a claim of the node its VM runs on ({self.node}) or a shared one"
            ), True  # fmt: skip
        vmis, _ = await self.client.list(VMI, namespace)
        users = [v["metadata"]["name"] for v in vmis if name in claims_of_vmi(v)]
        if users:
            return None, f"PVC {namespace}/{name} is in use by VMI {users[0]}", True
        return pool, "", False

    async def _source(self, backup: JSON) -> tuple[str, JSON | None, str]:
        """(VM name, tracker, why it must wait)."""
        md = backup["metadata"]
        source = (backup.get("spec") or {}).get("source") or {}
        name = str(source.get("name") or "")
        if source.get("kind") == "VirtualMachineBackupTracker":
            tracker = await self.client.find(VMBACKUPTRACKER, name, md["namespace"])
            if tracker is None:
                return "", None, f"BackupTracker {name} does not exist"
            if (tracker.get("status") or {}).get("checkpointRedefinitionRequired"):
                return "", None, f"Waiting for checkpoint redefinition on tracker {name}"
            vm = str(((tracker.get("spec") or {}).get("source") or {}).get("name") or "")
            return vm, tracker, ""
        return name, None, ""

    async def _start(
        self,
        backup: JSON,
        source: _Source,
        vm_name: str,
        tracker: JSON | None,
        since: str | None,
        *,
        target: tuple[Pool, str] | None = None,
    ) -> Session:
        md = backup["metadata"]
        short = str(md.get("uid", md["name"])).replace("-", "")[:12]
        runtime, offline = source.runtime, None
        if runtime is not None:
            assert runtime.process is not None
            process, workdir = runtime.process, runtime.workdir
        else:
            workdir = self._offline_workdir(md["namespace"], md["name"])
            offline = process = await launch_storage(
                f"vmo-backup-{short}", source.images, workdir=workdir, run_as=qemu_user()
            )
        try:
            return await self._begin(
                backup, source, process, workdir, vm_name, tracker, since, target=target,
                offline=offline, short=short,
            )  # fmt: skip
        except BaseException:
            if offline is not None:
                await _close_offline(offline, workdir)
            raise

    async def _begin(
        self,
        backup: JSON,
        source: _Source,
        process: QemuProcess,
        workdir: Path,
        vm_name: str,
        tracker: JSON | None,
        since: str | None,
        *,
        target: tuple[Pool, str] | None,
        offline: QemuProcess | None,
        short: str,
    ) -> Session:
        md, spec = backup["metadata"], backup.get("spec") or {}
        qmp = await process.qmp()
        checkpoint = checkpoint_name(backup)
        socket = workdir / "backup.nbd"  # one backup of a VMI at a time
        disks, runtime = source.disks, source.runtime
        agent = None
        quiesce = ("QuiesceSkipped", "Guest filesystem quiesce was skipped", False)
        if runtime is None:
            quiesce = ("QuiesceSkipped", "The VM is stopped: its disks are at rest", False)
        warning = ""
        if runtime is not None and not spec.get("skipQuiesce"):
            agent, quiesce, warning = await _freeze(runtime)
        export: qb.BackupExport | None = None
        push: qb.PushBackup | None = None
        try:
            if target is None:
                export = await qb.start(
                    qmp, short, disks, checkpoint=checkpoint, since=since,
                    workdir=workdir, socket=socket,
                )  # fmt: skip
            else:
                push = await qb.push_start(
                    qmp, short, disks, checkpoint=checkpoint, since=since, workdir=workdir
                )
        finally:
            if agent is not None:
                with contextlib.suppress(QemuError, OSError, TimeoutError):
                    await asyncio.wait_for(agent.fsfreeze_thaw(), FREEZE_TIMEOUT)
                await agent.close()
        started: Sequence[qb.DiskExport | qb.PushTarget] = (
            export.disks if export is not None else push.targets if push is not None else []
        )
        fallback = "; ".join(d.reason for d in started if d.reason)
        volumes = [
            {"volumeName": d.volume, "diskTarget": source.targets.get(d.volume, d.volume)}
            for d in started
        ]
        session = Session(export, md["namespace"], vm_name,
                          tracker["metadata"]["name"] if tracker else None,
                          volumes, warning, push=push, target=target, workdir=workdir,
                          offline=offline)  # fmt: skip
        incremental = export.incremental if export is not None else bool(push and push.incremental)
        kind = "Incremental" if since is not None and incremental else "Full"
        gen = int(md.get("generation") or 1)
        status = {
            **(backup.get("status") or {}),
            "type": kind,
            "checkpointName": checkpoint,
            "includedVolumes": volumes,
        }
        reason, text, ok = quiesce
        conditions = [condition("Quiesced", ok, reason, text, gen)]
        message = "Backup is in progress"
        if fallback:
            message += f" (full: {fallback})"
            await self.events.record(
                backup, "CheckpointRedefinitionFailed",
                f"{fallback}: the backup is a full one", type_="Warning",
            )  # fmt: skip
        conditions.append(condition("Progressing", True, "Initiated", message, gen))
        await self._write_status(backup, status, conditions)
        return session

    async def _create_export(self, backup: JSON) -> None:
        md, spec = backup["metadata"], backup.get("spec") or {}
        remaining = ttl_of(backup) - (_now() - _parse(str(md["creationTimestamp"])))
        body = {
            "apiVersion": "export.kubevirt.io/v1",
            "kind": "VirtualMachineExport",
            "metadata": {
                "name": md["name"],
                "namespace": md["namespace"],
                "annotations": {EXPORT_NODE: self.node},
                "ownerReferences": [
                    {"apiVersion": f"{GROUP}/v1alpha1", "kind": "VirtualMachineBackup",
                     "name": md["name"], "uid": md["uid"], "controller": True,
                     "blockOwnerDeletion": True}
                ],
            },
            "spec": {
                "source": {"apiGroup": GROUP, "kind": "VirtualMachineBackup", "name": md["name"]},
                "tokenSecretRef": spec.get("tokenSecretRef"),
                "ttlDuration": f"{max(int(remaining.total_seconds()), 1)}s",
            },
        }  # fmt: skip
        with contextlib.suppress(Conflict):
            await self.client.create(VMEXPORT, body, md["namespace"])
        gen = int(md.get("generation") or 1)
        await self._write_status(
            backup, backup.get("status") or {},
            [condition("Progressing", True, "PreparingExport", "Backup export is being initialized", gen)],
        )  # fmt: skip

    async def _follow(self, backup: JSON, session: Session) -> float | None:
        md = backup["metadata"]
        if session.offline is not None:
            vm = await self.client.find(VM, session.vm, md["namespace"])
            if vm is None or vm["metadata"].get("deletionTimestamp"):
                await self._end_failed(
                    backup, session, "SourceLost", "VM was deleted during backup"
                )
                return None
            exited = session.offline.exit_status
            if exited is not None:
                await self._end_failed(
                    backup, session, "Failed", f"the QEMU holding the VM's disks exited: {exited}"
                )
                return None
        else:
            vmi = await self.client.find(VMI, session.vm, md["namespace"])
            if vmi is None:
                await self._end_failed(
                    backup, session, "SourceLost", "VMI was deleted during backup"
                )
                return None
            phase = (vmi.get("status") or {}).get("phase")
            if phase != "Running":
                await self._end_failed(
                    backup, session, "SourceUnhealthy", f"VMI is not in a running state: {phase}"
                )
                return None
        if session.push is not None:
            return await self._follow_push(backup, session)
        remaining = ttl_of(backup) - (_now() - _parse(str(md["creationTimestamp"])))
        if remaining <= timedelta(0):
            log.info("backup %s/%s: pull mode backup TTL has expired", md["namespace"], md["name"])
            await self._complete(backup, session)
            return None
        export = await self.client.find(VMEXPORT, md["name"], md["namespace"])
        estatus = (export or {}).get("status") or {}
        if estatus.get("phase") != "Ready":
            return min(1.0, remaining.total_seconds())
        links = estatus.get("links") or {}
        chosen = links.get("external") or links.get("internal") or {}
        endpoints = {
            b.get("name"): {e.get("endpoint"): e.get("url") for e in b.get("endpoints") or []}
            for b in chosen.get("backups") or []
        }
        volumes = [
            {**v, "dataEndpoint": endpoints.get(v["volumeName"], {}).get("data", ""),
             "mapEndpoint": endpoints.get(v["volumeName"], {}).get("map", "")}
            for v in session.volumes
        ]  # fmt: skip
        status = {
            **(backup.get("status") or {}),
            "includedVolumes": volumes,
            "endpointCert": chosen.get("cert", ""),
            "exportUID": (export or {}).get("metadata", {}).get("uid", ""),
        }
        gen = int(md.get("generation") or 1)
        ready = condition("Progressing", True, "ExportReady", "Backup export is ready to pull", gen)
        await self._write_status(backup, status, [ready])
        return remaining.total_seconds()

    async def _follow_push(self, backup: JSON, session: Session) -> float | None:
        """Until QEMU's jobs end; then the files go into the target claim, and it completes."""
        md = backup["metadata"]
        push, target = session.push, session.target
        assert push is not None and target is not None and session.workdir is not None
        process = self._process(session)
        if process is None:
            await self._end_failed(backup, session, "SourceLost", "VMI was deleted during backup")
            return None
        try:
            qmp = await process.qmp()
            ended, error, _done, _total = await qb.push_progress(qmp, push)
            if ended and not error:
                await qb.push_release(qmp, push)  # the files are whole once QEMU closed them
        except (QemuError, OSError) as exc:
            ended, error = True, str(exc)
        if not ended:
            return 0.5
        if error:
            await self._end_failed(backup, session, "Failed", error)
            return None
        pool, claim = target
        files = {f"{t.volume}.qcow2": t.path for t in push.targets}
        lock = self._claim_locks.setdefault((session.namespace, claim), asyncio.Lock())
        try:
            async with lock:  # one push at a time edits a claim (on this node)
                vmis, _ = await self.client.list(VMI, session.namespace)
                users = [v["metadata"]["name"] for v in vmis if claim in claims_of_vmi(v)]
                if users:
                    raise PushTargetError(
                        f"PVC {session.namespace}/{claim} is in use by VMI {users[0]}"
                    )
                volume = pool.top(session.namespace, claim)
                await asyncio.to_thread(
                    store_files, volume, md["name"], files, scratch=session.workdir,
                    claim=f"{session.namespace}/{claim}",
                )  # fmt: skip
        except (PushTargetError, PoolError, OSError) as exc:
            await self._end_failed(backup, session, "Failed", str(exc))
            return None
        await self._complete(backup, session)
        return None

    # --- ending -------------------------------------------------------------------------------

    def _process(self, session: Session) -> QemuProcess | None:
        """The QEMU the backup runs in, while it runs."""
        if session.offline is not None:
            return session.offline if session.offline.exit_status is None else None
        runtime = self.agent.runtimes.get((session.namespace, session.vm))
        if runtime is None or runtime.process is None or not runtime.alive:
            return None
        return runtime.process

    def _offline_workdir(self, namespace: str, name: str) -> Path:
        return self.agent.state_dir / "backups" / workdir_name(namespace, name)

    async def _finish(self, session: Session, *, success: bool) -> None:
        process = self._process(session)
        if session.push is not None:
            if process is not None:
                with contextlib.suppress(QemuError, OSError):
                    await qb.push_finish(await process.qmp(), session.push, success=success)
            for t in session.push.targets:  # stored in the claim, or not to be kept
                t.path.unlink(missing_ok=True)
        else:
            assert session.export is not None
            if process is not None:
                with contextlib.suppress(QemuError, OSError):
                    await qb.finish(await process.qmp(), session.export, success=success)
            else:
                for d in session.export.disks:  # the QEMU is gone, and its nodes with it
                    d.fleece_path.unlink(missing_ok=True)
                session.export.socket.unlink(missing_ok=True)
        if session.offline is not None:
            assert session.workdir is not None
            await _close_offline(session.offline, session.workdir)  # the bitmaps are stored
            await self._unlock_vm(session.namespace, session.vm, session.lock)

    async def _complete(self, backup: JSON, session: Session) -> None:
        md = backup["metadata"]
        self.sessions.pop((md["namespace"], md["name"]), None)
        await self._finish(session, success=True)
        with contextlib.suppress(NotFound):
            await self.client.delete(VMEXPORT, md["name"], md["namespace"])
        if session.tracker is not None:
            await self._update_tracker(backup, session)
        gen = int(md.get("generation") or 1)
        if session.warning:
            reason = "CompletedWithWarning"
            message = f"Completed VirtualMachineBackup, warning: {session.warning}"
            await self.events.record(
                backup, "VirtualMachineBackupCompletedWithWarning", message, type_="Warning"
            )
        else:
            reason, message = "Completed", "Successfully completed VirtualMachineBackup"
            await self.events.record(backup, "VirtualMachineBackupCompletedSuccessfully", message)
        await self._write_status(
            backup, backup.get("status") or {},
            [condition("Complete", True, reason, message, gen),
             condition("Progressing", False, reason, message, gen)],
        )  # fmt: skip

    async def _update_tracker(self, backup: JSON, session: Session) -> None:
        md = backup["metadata"]
        tracker = await self.client.find(VMBACKUPTRACKER, str(session.tracker), md["namespace"])
        if tracker is None:
            return
        latest = {
            "name": checkpoint_name(backup),
            "creationTime": md["creationTimestamp"],
            "volumes": session.volumes,
        }
        status = {**(tracker.get("status") or {}), "latestCheckpoint": latest}
        status.pop("checkpointRedefinitionRequired", None)
        with contextlib.suppress(NotFound, Conflict):
            await self.client.replace(
                VMBACKUPTRACKER, {**tracker, "status": status}, subresource="status"
            )

    async def _end_failed(self, backup: JSON, session: Session, reason: str, message: str) -> None:
        md = backup["metadata"]
        self.sessions.pop((md["namespace"], md["name"]), None)
        await self._finish(session, success=False)
        with contextlib.suppress(NotFound):
            await self.client.delete(VMEXPORT, md["name"], md["namespace"])
        await self._fail(backup, reason, f"Backup has failed: {message}")

    async def _lost(self, backup: JSON) -> None:
        """A backup this node started before its agent restarted: what it left in QEMU goes."""
        md = backup["metadata"]
        vm_name, _tracker, _ = await self._source(backup)
        keep = await self._tracked_checkpoints(md["namespace"], vm_name)
        workdir = self._offline_workdir(md["namespace"], md["name"])
        if workdir.exists():  # a stopped VM's backup: its QEMU is swept and quits
            offline: QemuProcess | None = None
            try:
                offline = await adopt(workdir)
            except QemuError:
                offline = find_qemu(workdir)  # it does not answer: it is killed
            if offline is not None:
                with contextlib.suppress(QemuError, OSError):
                    await qb.sweep(await offline.qmp(), workdir, keep=keep)
                await _close_offline(offline, workdir)
            shutil.rmtree(workdir, ignore_errors=True)
        if vm_name:
            await self._unlock_vm(md["namespace"], vm_name, self._lock_value(backup))
        runtime = self.agent.runtimes.get((md["namespace"], vm_name))
        if runtime is not None and runtime.process is not None and runtime.alive:
            with contextlib.suppress(QemuError, OSError):
                qmp = await runtime.process.qmp()
                await qb.sweep(qmp, runtime.workdir, keep=keep)
                (runtime.workdir / "backup.nbd").unlink(missing_ok=True)
                for left in runtime.workdir.glob(".vmo-push-*"):  # a push's filesystem copy
                    left.unlink(missing_ok=True)
                agent = await GuestAgentClient.connect(
                    runtime.process.paths.guest_agent, timeout=1.0
                )
                try:
                    await asyncio.wait_for(agent.fsfreeze_thaw(), FREEZE_TIMEOUT)
                finally:
                    await agent.close()
        with contextlib.suppress(NotFound):
            await self.client.delete(VMEXPORT, md["name"], md["namespace"])
        if not is_terminal(backup) and not md.get("deletionTimestamp"):
            await self._fail(
                backup, "Failed", "Backup has failed: the node agent restarted during the backup"
            )

    async def _tracked_checkpoints(self, namespace: str, vm_name: str) -> list[str]:
        """The latest checkpoint of every tracker of the VM: what a sweep must keep."""
        trackers, _ = await self.client.list(VMBACKUPTRACKER, namespace)
        names = []
        for tracker in trackers:
            source = (tracker.get("spec") or {}).get("source") or {}
            latest = (tracker.get("status") or {}).get("latestCheckpoint") or {}
            if source.get("name") == vm_name and latest.get("name"):
                names.append(str(latest["name"]))
        return names

    async def _fail(self, backup: JSON, reason: str, message: str) -> None:
        gen = int(backup["metadata"].get("generation") or 1)
        await self.events.record(backup, "VirtualMachineBackupFailed", message, type_="Warning")
        await self._write_status(
            backup, backup.get("status") or {},
            [condition("Failed", True, reason, message, gen),
             condition("Progressing", False, reason, message, gen)],
        )  # fmt: skip

    async def _initializing(self, backup: JSON, message: str) -> None:
        gen = int(backup["metadata"].get("generation") or 1)
        await self._write_status(
            backup, backup.get("status") or {},
            [condition("Progressing", True, "Initializing", message, gen)],
        )  # fmt: skip

    # --- writes -------------------------------------------------------------------------------

    async def _claim(self, backup: JSON) -> JSON | None:
        md = backup["metadata"]
        patch = {
            "metadata": {
                "resourceVersion": md["resourceVersion"],
                "annotations": {BACKUP_NODE: self.node},
                "finalizers": [
                    *(f for f in md.get("finalizers") or [] if f != FINALIZER),
                    FINALIZER,
                ],
            }
        }
        try:
            claimed: JSON = await self.client.patch(VMBACKUP, md["name"], patch, md["namespace"])
        except (Conflict, NotFound):
            return None
        return claimed

    async def _drop_finalizer(self, backup: JSON) -> None:
        md = backup["metadata"]
        if FINALIZER not in (md.get("finalizers") or []):
            return
        fresh = await self.client.find(VMBACKUP, md["name"], md["namespace"])
        if fresh is None:
            return
        rest = [f for f in fresh["metadata"].get("finalizers") or [] if f != FINALIZER]
        patch = {
            "metadata": {
                "resourceVersion": fresh["metadata"]["resourceVersion"],
                "finalizers": rest,
            }
        }
        with contextlib.suppress(NotFound, Conflict):
            await self.client.patch(VMBACKUP, md["name"], patch, md["namespace"])

    async def _write_status(self, backup: JSON, status: JSON, conditions: list[JSON]) -> None:
        md = backup["metadata"]
        fresh = await self.client.find(VMBACKUP, md["name"], md["namespace"])
        if fresh is None:
            return
        now = _stamp(_now())
        old = (fresh.get("status") or {}).get("conditions")
        merged = {**status, "conditions": merge_conditions(old, conditions, now, keep_others=True)}
        if merged == fresh.get("status"):
            backup.update(fresh)
            return
        with contextlib.suppress(NotFound, Conflict):
            updated = await self.client.replace(
                VMBACKUP, {**fresh, "status": merged}, subresource="status"
            )
            backup.update(updated)


def backup_disks(runtime: VmiRuntime) -> list[qb.BackupDisk]:
    """The VMI's disks a backup covers: those of its claims (PVCs and DataVolumes), by node."""
    disks = []
    for volume, _local in runtime.volume_sources():
        name = str(volume["name"])
        if claim_name(volume) and name in runtime.disk_nodes:
            disks.append(qb.BackupDisk(name, runtime.disk_nodes[name]))
    return disks


def _target(runtime: VmiRuntime, volume: str) -> str:
    names = [str(v["name"]) for v, _ in runtime.volume_sources()]
    return f"disk{names.index(volume)}" if volume in names else volume


async def _freeze(
    runtime: VmiRuntime,
) -> tuple[GuestAgentClient | None, tuple[str, str, bool], str]:
    """(the agent to thaw with, the Quiesced condition's reason/message/status, a warning)."""
    assert runtime.process is not None
    failed = ("QuiesceFailed", "Guest filesystem quiesce failed", False)
    try:
        agent = await GuestAgentClient.connect(runtime.process.paths.guest_agent, timeout=2.0)
    except (QemuError, OSError, TimeoutError) as exc:
        return None, failed, f"the guest agent does not answer: {exc}"
    try:
        await asyncio.wait_for(agent.fsfreeze_freeze(), FREEZE_TIMEOUT)
    except (QemuError, OSError, TimeoutError) as exc:
        return (
            agent,
            failed,
            f"freezing the guest's filesystems failed: {exc or type(exc).__name__}",
        )
    return agent, ("QuiesceSucceeded", "Guest filesystem was successfully quiesced", True), ""


async def _close_offline(process: QemuProcess, workdir: Path) -> None:
    """Quits a stopped VM's backup QEMU (closing its images stores their bitmaps), and removes
    its working directory."""
    await process.quit()
    shutil.rmtree(workdir, ignore_errors=True)


def _export_backup_keys(_etype: str, export: JSON) -> list[str]:
    source = (export.get("spec") or {}).get("source") or {}
    if source.get("kind") != "VirtualMachineBackup":
        return []
    return [f"{export['metadata'].get('namespace', '')}/{source.get('name', '')}"]


__all__ = ["FINALIZER", "BackupExecutor", "checkpoint_name"]
