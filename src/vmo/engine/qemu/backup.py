"""Point-in-time backups of a running QEMU's disks, full or incremental by dirty bitmaps, served
over NBD (QEMU's own export) for a reader to pull.

A checkpoint is a persistent dirty bitmap on a disk's top node, named ``vmo-ckpt-<name>``: QEMU
records every write after it, and stores it in the qcow2 when it closes the image, so that it
outlives a restart of the VM (not a crash: an image closed uncleanly marks its bitmaps
inconsistent, and they are not used).

A backup, in one ``transaction`` on every disk at once (the guest already frozen by the caller):
- a disabled copy of the previous checkpoint's bitmap (``vmo-bk-<name>``): exactly the writes
  between the two checkpoints, frozen at this instant;
- the new checkpoint's bitmap, recording from this instant;
- a copy-before-write job (``blockdev-backup sync=none``) into a temporary overlay on the disk
  (the *fleece*): what the guest overwrites from now on is copied there first, so the overlay
  reads as the disk was at this instant while the guest runs on.
The fleece is exported read-only over NBD with the frozen bitmap (``qemu:dirty-bitmap:...``)
and ``base:allocation``. ``finish`` removes all of it; on success the previous checkpoint goes
(the new one replaces it), on failure the new one goes (the previous stays valid). ``sweep``
removes what a crash in between left, by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket as pysocket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmo.engine.qemu import fdsets
from vmo.engine.qemu.errors import QemuError, QMPError
from vmo.engine.qemu.qmp import QMPClient

log = logging.getLogger(__name__)

JSON = dict[str, Any]
CHECKPOINT_PREFIX = "vmo-ckpt-"
FROZEN_PREFIX = "vmo-bk-"
FLEECE_PREFIX = "vmo-fleece-"
EXPORT_PREFIX = "vmo-backup-"
_OPAQUE = "vmo-fleece"


def checkpoint_bitmap(checkpoint: str) -> str:
    return CHECKPOINT_PREFIX + checkpoint


@dataclass(frozen=True)
class BackupDisk:
    """A disk to back up: its volume name (the export's name) and its current top node."""

    volume: str
    node: str


@dataclass
class DiskExport:
    volume: str
    node: str
    fleece_node: str
    fleece_path: Path
    frozen_bitmap: str | None  # None: a full backup of this disk
    reason: str = ""  # why it is full although a checkpoint was asked for
    size: int = 0

    @property
    def incremental(self) -> bool:
        return self.frozen_bitmap is not None


@dataclass
class BackupExport:
    """What a started backup exports; ``finish`` undoes it."""

    name: str
    socket: Path
    checkpoint: str
    since: str | None
    disks: list[DiskExport] = field(default_factory=list)

    @property
    def incremental(self) -> bool:
        return bool(self.disks) and all(d.incremental for d in self.disks)


async def _nodes(qmp: QMPClient) -> list[JSON]:
    nodes: list[JSON] = await qmp.execute("query-named-block-nodes", {"flat": True})
    return nodes


def _info(nodes: list[JSON], node: str) -> JSON:
    for info in nodes:
        if info.get("node-name") == node:
            return info
    raise QemuError(f"QEMU has no block node {node}")


async def bitmaps(qmp: QMPClient, node: str) -> dict[str, JSON]:
    """The dirty bitmaps on ``node``, by name."""
    info = _info(await _nodes(qmp), node)
    return {str(b["name"]): b for b in info.get("dirty-bitmaps") or []}


def _unusable(bitmap: JSON | None) -> str:
    """Why a checkpoint bitmap cannot give an incremental backup ('' if it can)."""
    if bitmap is None:
        return "missing"
    if bitmap.get("inconsistent"):
        return "inconsistent (the image was not closed cleanly)"
    if not bitmap.get("recording", True):
        return "not recording"
    if bitmap.get("busy"):
        return "in use by another operation"
    return ""


def _frozen(info: JSON, name: str, since: str | None, volume: str) -> tuple[str | None, str]:
    """(the frozen bitmap backup ``name`` makes of checkpoint ``since`` on this node, or None
    for a full backup; why it is full although ``since`` was asked for)."""
    if since is None:
        return None, ""
    found = {str(b["name"]): b for b in info.get("dirty-bitmaps") or []}
    why = _unusable(found.get(checkpoint_bitmap(since)))
    if why:
        return None, f"checkpoint {since} is {why} on volume {volume}"
    return f"{FROZEN_PREFIX}{name}", ""


def _bitmap_actions(
    node: str, frozen: str | None, since: str | None, checkpoint: str
) -> list[JSON]:
    """A backup's bitmap actions in its transaction: the frozen copy of ``since`` (for an
    incremental one) and the new checkpoint, recording from this instant."""
    actions: list[JSON] = []
    if frozen is not None:
        assert since is not None
        actions += [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": node, "name": frozen, "disabled": True}},
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": node, "target": frozen, "bitmaps": [checkpoint_bitmap(since)]}},
        ]  # fmt: skip
    actions.append({"type": "block-dirty-bitmap-add",
                    "data": {"node": node, "name": checkpoint_bitmap(checkpoint),
                             "persistent": True}})  # fmt: skip
    return actions


async def _settle(
    qmp: QMPClient, node: str, frozen: str | None, since: str | None, checkpoint: str, *,
    success: bool,
) -> None:  # fmt: skip
    """The frozen bitmap goes; on success the new checkpoint replaces ``since``, on failure it
    goes and ``since`` stays valid."""
    stale = [frozen] if frozen else []
    if success and since is not None:
        stale.append(checkpoint_bitmap(since))
    if not success:
        stale.append(checkpoint_bitmap(checkpoint))
    for bitmap in stale:
        with contextlib.suppress(QemuError):
            await qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": bitmap})


async def _pass_fd(qmp: QMPClient, path: Path, node: str) -> int:
    return await fdsets.pass_fd(qmp, path, f"{_OPAQUE}:{node}:{path}")


async def _release_fds(qmp: QMPClient, node: str) -> None:
    await fdsets.release_fds(qmp, f"{_OPAQUE}:{node}:")


async def start(
    qmp: QMPClient,
    name: str,
    disks: Sequence[BackupDisk],
    *,
    checkpoint: str,
    since: str | None,
    workdir: Path,
    socket: Path,
) -> BackupExport:
    """Starts the backup ``name`` of ``disks`` (see the module docstring) and exports it on the
    unix ``socket``. ``since``: the previous checkpoint (None for a full backup); a disk on
    which it is missing or unusable is backed up in full, and its ``reason`` says why.
    All or nothing: on failure nothing of it is left in QEMU or on disk."""
    export = BackupExport(name, socket, checkpoint, since)
    nodes = await _nodes(qmp)
    try:
        for disk in disks:
            info = _info(nodes, disk.node)
            size = int((info.get("image") or {}).get("virtual-size") or 0)
            digest = hashlib.sha256(f"{name}/{disk.volume}".encode()).hexdigest()[:12]
            fleece_node = FLEECE_PREFIX + digest  # QEMU's node names: at most 31 bytes
            path = workdir / f".{fleece_node}.qcow2"
            frozen, reason = _frozen(info, name, since, disk.volume)
            export.disks.append(
                DiskExport(disk.volume, disk.node, fleece_node, path, frozen, reason, size)
            )
        for d in export.disks:
            argv = ["qemu-img", "create", "-q", "-f", "qcow2", str(d.fleece_path), str(d.size)]
            await asyncio.to_thread(subprocess.run, argv, check=True, capture_output=True)
            fdset = await _pass_fd(qmp, d.fleece_path, d.fleece_node)
            await qmp.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": d.fleece_node,
                    "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}"},
                    "backing": d.node,
                },
            )
        actions: list[JSON] = []
        for d in export.disks:
            actions += _bitmap_actions(d.node, d.frozen_bitmap, since, checkpoint)
            actions += [
                {"type": "blockdev-backup",
                 "data": {"device": d.node, "target": d.fleece_node, "sync": "none",
                          "job-id": d.fleece_node, "auto-dismiss": True}},
            ]  # fmt: skip
        await qmp.execute("transaction", {"actions": actions})
        await _listen(qmp, socket, f"{EXPORT_PREFIX}{name}")
        for d in export.disks:
            args: JSON = {"type": "nbd", "id": f"{EXPORT_PREFIX}{name}-{d.volume}",
                          "node-name": d.fleece_node, "name": d.volume, "writable": False}  # fmt: skip
            if d.frozen_bitmap is not None:
                args["bitmaps"] = [{"node": d.node, "name": d.frozen_bitmap}]
            await qmp.execute("block-export-add", args)
    except BaseException:
        await finish(qmp, export, success=False)
        raise
    return export


# --- push mode: QEMU writes the backup itself ---------------------------------------------------


@dataclass
class PushTarget:
    volume: str
    node: str  # the disk's top node
    target_node: str
    path: Path  # the qcow2 QEMU writes: every cluster (full) or the dirty ones (incremental)
    frozen_bitmap: str | None
    reason: str = ""


@dataclass
class PushBackup:
    name: str
    checkpoint: str
    since: str | None
    targets: list[PushTarget] = field(default_factory=list)

    @property
    def incremental(self) -> bool:
        return bool(self.targets) and all(t.frozen_bitmap is not None for t in self.targets)


async def push_start(
    qmp: QMPClient,
    name: str,
    disks: Sequence[BackupDisk],
    *,
    checkpoint: str,
    since: str | None,
    workdir: Path,
) -> PushBackup:
    """Push mode: in one ``transaction`` at this instant, the new checkpoint and, per disk, a
    ``blockdev-backup`` job into a new qcow2 file in ``workdir`` (``sync=full``, or
    ``sync=bitmap`` of the frozen writes since ``since``, the bitmap left as it is). The target
    is sparse: zeros are not written, and an incremental one holds only the dirty clusters
    (whoever stitches them rebases it onto the previous backup's file; it names no backing
    file itself). A backup is incremental on every disk or on none: when one disk's checkpoint
    is unusable, every disk is backed up in full, so that one backup is of one type.
    All or nothing."""
    push = PushBackup(name, checkpoint, since)
    nodes = await _nodes(qmp)
    try:
        for disk in disks:
            info = _info(nodes, disk.node)
            size = int((info.get("image") or {}).get("virtual-size") or 0)
            digest = hashlib.sha256(f"push/{name}/{disk.volume}".encode()).hexdigest()[:12]
            target_node = FLEECE_PREFIX + digest  # swept like a fleece after a crash
            frozen, reason = _frozen(info, name, since, disk.volume)
            path = workdir / f".{target_node}.qcow2"
            push.targets.append(
                PushTarget(disk.volume, disk.node, target_node, path, frozen, reason)
            )
            argv = ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)]
            await asyncio.to_thread(subprocess.run, argv, check=True, capture_output=True)
            fdset = await _pass_fd(qmp, path, target_node)
            await qmp.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": target_node,
                    "discard": "unmap",
                    "detect-zeroes": "unmap",
                    "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}"},
                },
            )
        if any(t.frozen_bitmap is None for t in push.targets):
            for t in push.targets:
                if t.frozen_bitmap is not None:
                    t.frozen_bitmap = None
                    t.reason = f"full, as another disk's checkpoint {since} is not usable"
        actions: list[JSON] = []
        for t in push.targets:
            job: JSON = {"device": t.node, "target": t.target_node, "sync": "full",
                         "job-id": t.target_node, "auto-dismiss": False}  # fmt: skip
            if t.frozen_bitmap is not None:
                job.update({"sync": "bitmap", "bitmap": t.frozen_bitmap, "bitmap-mode": "never"})
            actions += _bitmap_actions(t.node, t.frozen_bitmap, since, checkpoint)
            actions.append({"type": "blockdev-backup", "data": job})
        await qmp.execute("transaction", {"actions": actions})
    except BaseException:
        await push_finish(qmp, push, success=False)
        raise
    return push


async def push_progress(qmp: QMPClient, push: PushBackup) -> tuple[bool, str, int, int]:
    """(every job has ended, the first error, bytes done, bytes in all)."""
    jobs = {str(j.get("device")): j for j in await qmp.execute("query-block-jobs") or []}
    done = total = 0
    ended, error = True, ""
    for t in push.targets:
        job = jobs.get(t.target_node)
        if job is None:
            ended, error = True, error or f"the backup job of volume {t.volume} went away"
            continue
        done += int(job.get("offset") or 0)
        total += int(job.get("len") or 0)
        if job.get("status") != "concluded":
            ended = False
        elif job.get("error"):
            error = error or f"volume {t.volume}: {job['error']}"
    return ended, error, done, total


async def push_release(qmp: QMPClient, push: PushBackup) -> None:
    """Ends the jobs and closes the target nodes, so that QEMU has written all of each qcow2
    (its metadata included) before anyone reads the files; the bitmaps stay as they are."""
    for t in push.targets:
        await _drop_fleece(qmp, t.target_node, None)


async def push_finish(qmp: QMPClient, push: PushBackup, *, success: bool) -> None:
    """Ends the jobs and removes the target nodes (their files stay for the caller, which must
    delete them) and the frozen bitmaps; keeps the new checkpoint only on ``success``."""
    for t in push.targets:
        await _drop_fleece(qmp, t.target_node, None)
        if not success:
            t.path.unlink(missing_ok=True)
        await _settle(qmp, t.node, t.frozen_bitmap, push.since, push.checkpoint, success=success)


async def _listen(qmp: QMPClient, path: Path, fdname: str) -> None:
    """QEMU's NBD server on a unix socket the agent makes (QEMU runs unprivileged and could
    not create it here): bound and listening, mode 0600, handed over with ``getfd``."""
    listener = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(16)
        await qmp.execute("getfd", {"fdname": fdname}, fds=[listener.fileno()])
    finally:
        listener.close()
    await qmp.execute("nbd-server-start", {"addr": {"type": "fd", "data": {"str": fdname}}})


async def finish(qmp: QMPClient, export: BackupExport, *, success: bool) -> None:
    """Removes the backup's exports, jobs, fleeces and frozen bitmaps; keeps the new checkpoint
    (and drops the previous one) only on ``success``. Idempotent; every step is tried."""
    with contextlib.suppress(QemuError):
        await qmp.execute("nbd-server-stop")
    for d in export.disks:
        await _drop_fleece(qmp, d.fleece_node, d.fleece_path)
        await _settle(qmp, d.node, d.frozen_bitmap, export.since, export.checkpoint,
                      success=success)  # fmt: skip
    export.socket.unlink(missing_ok=True)


async def _drop_fleece(qmp: QMPClient, node: str, path: Path | None) -> None:
    with contextlib.suppress(QemuError):
        await qmp.execute("block-job-cancel", {"device": node, "force": True})
    for _ in range(50):  # the job lets go of the fleece once it is cancelled (and dismissed)
        jobs = await qmp.execute("query-jobs")
        job = next((j for j in jobs or [] if j.get("id") == node), None)
        if job is None:
            break
        if job.get("status") == "concluded":  # a push job is not dismissed automatically
            with contextlib.suppress(QemuError):
                await qmp.execute("job-dismiss", {"id": node})
        await asyncio.sleep(0.05)
    try:
        await qmp.execute("blockdev-del", {"node-name": node})
    except QMPError as exc:
        if "Failed to find node" not in str(exc) and "Cannot find node" not in str(exc):
            log.warning("fleece %s not deleted: %s", node, exc)
    await _release_fds(qmp, node)
    if path is not None:
        path.unlink(missing_ok=True)


async def sweep(qmp: QMPClient, workdir: Path, *, keep: Sequence[str] = ()) -> list[str]:
    """After a crash mid-backup: removes every fleece, export and frozen bitmap VMO left in this
    QEMU (and the fleece files in ``workdir``), and checkpoints other than ``keep`` that have no
    backup to show for them. What it removed."""
    removed: list[str] = []
    with contextlib.suppress(QemuError):
        await qmp.execute("nbd-server-stop")
    for info in await _nodes(qmp):
        node = str(info.get("node-name") or "")
        if node.startswith(FLEECE_PREFIX):
            await _drop_fleece(qmp, node, None)
            removed.append(node)
    for info in await _nodes(qmp):
        node = str(info.get("node-name") or "")
        for b in info.get("dirty-bitmaps") or []:
            bname = str(b["name"])
            frozen = bname.startswith(FROZEN_PREFIX)
            orphan = bname.startswith(CHECKPOINT_PREFIX) and bname not in {
                checkpoint_bitmap(k) for k in keep
            }
            if frozen or orphan:
                with contextlib.suppress(QemuError):
                    await qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": bname})
                    removed.append(f"{node}/{bname}")
    for path in workdir.glob(f".{FLEECE_PREFIX}*.qcow2"):
        path.unlink(missing_ok=True)
    return removed


__all__ = [
    "BackupDisk",
    "BackupExport",
    "DiskExport",
    "PushBackup",
    "PushTarget",
    "bitmaps",
    "checkpoint_bitmap",
    "finish",
    "push_finish",
    "push_progress",
    "push_release",
    "push_start",
    "start",
    "sweep",
]
