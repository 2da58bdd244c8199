"""Point-in-time backups with checkpoints (persistent dirty bitmaps) on a real QEMU, read over
NBD with VMO's client. The QEMU has no guest: writes go through its block layer (HMP
``qemu-io``), as a guest's do, so what the bitmaps record and the fleece keeps is QEMU's own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from vmo.engine.agent.runtime import qemu_user
from vmo.engine.qemu import backup as qb
from vmo.engine.qemu.domain import Disk, DiskCache, DiskFormat
from vmo.engine.qemu.nbd import (
    BASE_ALLOCATION,
    STATE_DIRTY,
    STATE_HOLE,
    NBDClient,
    NBDError,
    dirty_bitmap_context,
)
from vmo.engine.qemu.process import launch_storage
from vmo.engine.qemu.qmp import QMPClient

MIB = 1 << 20
SIZE = 16 * MIB
on_loop = pytest.mark.asyncio(loop_scope="function")


class Qemu:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.disk = home / "disk.qcow2"
        self.sock = home / "qmp.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None

    async def start(self) -> QMPClient:
        argv = ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none"]
        argv += ["-qmp", f"unix:{self.sock},server=on,wait=off"]
        # a BlockBackend over the disk's node, as a guest's disk device has: the backup's
        # copy-before-write filter goes in between, and writes through it are copied first
        argv += ["-drive", f"if=none,id=drive0,node-name=disk0,format=qcow2,file={self.disk}"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        for _ in range(100):
            if self.sock.exists():
                break
            await asyncio.sleep(0.05)
        self.qmp = await QMPClient.connect(self.sock)
        return self.qmp

    async def write(self, offset: int, length: int, pattern: int) -> None:
        assert self.qmp is not None
        command = f'qemu-io drive0 "write -P {pattern} {offset} {length}"'
        out = await self.qmp.execute("human-monitor-command", {"command-line": command})
        assert out.strip() == "", out  # qemu-io prints to QEMU's stdout; the reply is an error

    async def stop(self) -> None:
        """A clean quit: QEMU closes the image and stores its persistent bitmaps in it."""
        if self.qmp is not None:
            with_quit = self.qmp
            self.qmp = None
            with contextlib.suppress(Exception):  # it may close the socket before answering
                await with_quit.execute("quit")
            await with_quit.disconnect()
        if self.proc is not None:
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE)], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 1 0 {4 * MIB}", str(disk)],
        check=True,
        capture_output=True,
    )
    yield tmp_path


@pytest_asyncio.fixture
async def qemu(home: Path) -> AsyncIterator[Qemu]:
    q = Qemu(home)
    await q.start()
    try:
        yield q
    finally:
        await q.stop()


DISKS = [qb.BackupDisk("root", "disk0")]


async def start(q: Qemu, name: str, checkpoint: str, since: str | None) -> qb.BackupExport:
    assert q.qmp is not None
    return await qb.start(
        q.qmp,
        name,
        DISKS,
        checkpoint=checkpoint,
        since=since,
        workdir=q.home,
        socket=q.home / f"{name}.nbd",
    )


def dirty(extents: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return [(o, n) for o, n, f in extents if f & STATE_DIRTY]


@on_loop
async def test_a_full_backup_reads_the_disk_as_it_was_when_it_started(qemu: Qemu) -> None:
    export = await start(qemu, "b1", "c1", None)
    assert not export.incremental and export.disks[0].reason == ""
    await qemu.write(0, 64 << 10, 9)  # after the point in time: not in the backup
    async with await NBDClient.connect(export.socket, "root", contexts=[BASE_ALLOCATION]) as nbd:
        assert nbd.size == SIZE
        assert await nbd.pread(0, 64 << 10) == bytes([1]) * (64 << 10)
        assert await nbd.pread(8 * MIB, 4096) == bytes(4096)
        allocation = await nbd.block_status(BASE_ALLOCATION)
        assert sum(e.length for e in allocation) == SIZE
        holes = [e for e in allocation if e.flags & STATE_HOLE]
        assert holes and holes[0].offset >= 4 * MIB  # the unwritten rest reads as a hole
        with pytest.raises(NBDError, match="not negotiated"):
            await nbd.block_status(dirty_bitmap_context("x"))
    assert qemu.qmp is not None
    await qb.finish(qemu.qmp, export, success=True)
    left = await qb.bitmaps(qemu.qmp, "disk0")
    assert set(left) == {"vmo-ckpt-c1"} and left["vmo-ckpt-c1"]["persistent"]
    assert not list(qemu.home.glob(".vmo-fleece-*")) and not export.socket.exists()
    nodes = await qemu.qmp.execute("query-named-block-nodes", {"flat": True})
    assert not [n for n in nodes if n["node-name"].startswith("vmo-fleece-")]


@on_loop
async def test_an_incremental_backup_exports_exactly_the_writes_since_the_checkpoint(
    qemu: Qemu,
) -> None:
    assert qemu.qmp is not None
    await qb.finish(qemu.qmp, await start(qemu, "b1", "c1", None), success=True)
    await qemu.write(MIB, 64 << 10, 2)
    await qemu.write(10 * MIB, 128 << 10, 3)
    export = await start(qemu, "b2", "c2", "c1")
    assert export.incremental
    await qemu.write(12 * MIB, 64 << 10, 4)  # after b2's instant: in c2, not in b2's map
    bitmap = dirty_bitmap_context(export.disks[0].frozen_bitmap or "")
    async with await NBDClient.connect(export.socket, "root", contexts=[bitmap]) as nbd:
        extents = await nbd.block_status(bitmap)
        assert dirty([(e.offset, e.length, e.flags) for e in extents]) == [
            (MIB, 64 << 10),
            (10 * MIB, 128 << 10),
        ]
        assert await nbd.pread(10 * MIB, 4096) == bytes([3]) * 4096
        assert await nbd.pread(12 * MIB, 4096) == bytes(4096)
    await qb.finish(qemu.qmp, export, success=True)
    left = await qb.bitmaps(qemu.qmp, "disk0")
    assert set(left) == {"vmo-ckpt-c2"}  # the previous checkpoint went, the new one replaced it
    assert left["vmo-ckpt-c2"]["count"] == 64 << 10  # recording since b2's instant


@on_loop
async def test_a_failed_backup_keeps_the_previous_checkpoint(qemu: Qemu) -> None:
    assert qemu.qmp is not None
    await qb.finish(qemu.qmp, await start(qemu, "b1", "c1", None), success=True)
    await qemu.write(MIB, 4096, 5)
    await qb.finish(qemu.qmp, await start(qemu, "b2", "c2", "c1"), success=False)
    left = await qb.bitmaps(qemu.qmp, "disk0")
    assert set(left) == {"vmo-ckpt-c1"} and left["vmo-ckpt-c1"]["count"] > 0
    export = await start(qemu, "b3", "c3", "c1")  # the next one is still incremental
    assert export.incremental
    await qb.finish(qemu.qmp, export, success=True)


@on_loop
async def test_a_missing_checkpoint_makes_a_full_backup_that_says_why(qemu: Qemu) -> None:
    assert qemu.qmp is not None
    export = await start(qemu, "b1", "c1", "gone")
    assert not export.incremental
    assert export.disks[0].reason == "checkpoint gone is missing on volume root"
    await qb.finish(qemu.qmp, export, success=True)


@on_loop
async def test_checkpoints_outlive_a_restart_of_qemu(qemu: Qemu) -> None:
    assert qemu.qmp is not None
    await qb.finish(qemu.qmp, await start(qemu, "b1", "c1", None), success=True)
    await qemu.write(2 * MIB, 4096, 6)
    await qemu.stop()
    qmp = await qemu.start()
    left = await qb.bitmaps(qmp, "disk0")
    assert left["vmo-ckpt-c1"]["count"] == 64 << 10  # one cluster: the write before the restart
    export = await start(qemu, "b2", "c2", "c1")
    assert export.incremental
    await qb.finish(qmp, export, success=True)


@on_loop
async def test_sweep_removes_what_a_crash_mid_backup_left(qemu: Qemu) -> None:
    assert qemu.qmp is not None
    await qb.finish(qemu.qmp, await start(qemu, "b1", "c1", None), success=True)
    await start(qemu, "b2", "c2", "c1")  # the agent "dies" here: nothing finishes it
    removed = await qb.sweep(qemu.qmp, qemu.home, keep=["c1"])
    assert any(r.startswith("vmo-fleece-") for r in removed)
    assert "disk0/vmo-ckpt-c2" in removed and "disk0/vmo-bk-b2" in removed
    assert set(await qb.bitmaps(qemu.qmp, "disk0")) == {"vmo-ckpt-c1"}
    assert not list(qemu.home.glob(".vmo-fleece-*"))
    jobs = await qemu.qmp.execute("query-block-jobs")
    assert jobs == []


# --- push mode ----------------------------------------------------------------------------------


async def push(q: Qemu, name: str, checkpoint: str, since: str | None) -> qb.PushBackup:
    assert q.qmp is not None
    backup = await qb.push_start(
        q.qmp, name, DISKS, checkpoint=checkpoint, since=since, workdir=q.home
    )
    for _ in range(200):
        ended, error, done, total = await qb.push_progress(q.qmp, backup)
        if ended:
            assert error == "" and 0 < done == total <= SIZE
            return backup
        await asyncio.sleep(0.05)
    raise AssertionError("the push jobs did not end")


def raw_of(path: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(out)], check=True)
    return out.read_bytes()


@on_loop
async def test_push_writes_a_sparse_full_then_an_incremental_that_stitches_to_the_disk(
    qemu: Qemu,
) -> None:
    assert qemu.qmp is not None
    full = await push(qemu, "p1", "c1", None)
    assert not full.incremental
    await qemu.write(0, 64 << 10, 9)  # after p1's instant: not in p1
    await qb.push_release(qemu.qmp, full)
    full_file = full.targets[0].path.rename(qemu.home / "p1-root.qcow2")
    assert raw_of(full_file, qemu.home / "p1.raw")[: 4 * MIB] == bytes([1]) * (4 * MIB)
    await qb.push_finish(qemu.qmp, full, success=True)
    assert set(await qb.bitmaps(qemu.qmp, "disk0")) == {"vmo-ckpt-c1"}
    await qemu.write(10 * MIB, 128 << 10, 3)
    incr = await push(qemu, "p2", "c2", "c1")
    assert incr.incremental
    await qb.push_release(qemu.qmp, incr)
    incr_file = incr.targets[0].path.rename(qemu.home / "p2-root.qcow2")
    await qb.push_finish(qemu.qmp, incr, success=True)
    assert set(await qb.bitmaps(qemu.qmp, "disk0")) == {"vmo-ckpt-c2"}
    # the incremental holds only the dirty clusters: the first 64 KiB and the 128 KiB at 10 MiB
    info = subprocess.run(["qemu-img", "map", "--output=json", str(incr_file)],
                          check=True, capture_output=True, text=True).stdout  # fmt: skip
    data = [e for e in json.loads(info) if e["data"]]
    assert sum(e["length"] for e in data) == (64 << 10) + (128 << 10), data
    # upstream's recipe: rebase the incremental onto the full one, and it reads as the disk
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(full_file), "-F", "qcow2",
                    str(incr_file)], check=True)  # fmt: skip
    await qemu.stop()
    disk = raw_of(qemu.home / "disk.qcow2", qemu.home / "disk.raw")
    assert raw_of(incr_file, qemu.home / "p2.raw") == disk
    nodes_left = list(qemu.home.glob(".vmo-fleece-*"))
    assert nodes_left == []


@on_loop
async def test_a_failed_push_removes_its_file_and_keeps_the_previous_checkpoint(
    qemu: Qemu,
) -> None:
    assert qemu.qmp is not None
    first = await push(qemu, "p1", "c1", None)
    await qb.push_finish(qemu.qmp, first, success=True)
    second = await qb.push_start(qemu.qmp, "p2", DISKS, checkpoint="c2", since="c1",
                                 workdir=qemu.home)  # fmt: skip
    await qb.push_finish(qemu.qmp, second, success=False)
    assert set(await qb.bitmaps(qemu.qmp, "disk0")) == {"vmo-ckpt-c1"}
    assert not second.targets[0].path.exists()
    nodes = await qemu.qmp.execute("query-named-block-nodes", {"flat": True})
    assert not [n for n in nodes if n["node-name"].startswith("vmo-fleece-")]
    assert await qemu.qmp.execute("query-jobs") == []
    first.targets[0].path.unlink()


@on_loop
async def test_a_guestless_storage_qemu_backs_up_a_stopped_vm_s_disk_and_stores_the_checkpoint(
    home: Path,
) -> None:
    """What a backup of a stopped VM runs in: ``launch_storage`` opens the disk as a VM would
    (node ``disk0-format``), unprivileged where it can be; a full push backup, then an
    incremental pull from its checkpoint; quitting stores the new checkpoint in the image."""
    disk = Disk("d0", home / "disk.qcow2", format=DiskFormat.QCOW2, cache=DiskCache.WRITETHROUGH)
    workdir = home / "storage"
    process = await launch_storage("vmo-backup-t", [disk], workdir=workdir, run_as=qemu_user())
    try:
        qmp = await process.qmp()
        disks = [qb.BackupDisk("root", "disk0-format")]
        push = await qb.push_start(qmp, "b1", disks, checkpoint="c1", since=None, workdir=workdir)
        for _ in range(200):
            ended, error, done, total = await qb.push_progress(qmp, push)
            if ended:
                break
            await asyncio.sleep(0.05)
        assert ended and not error and done == total == SIZE
        await qb.push_release(qmp, push)
        await qb.push_finish(qmp, push, success=True)
        export = await qb.start(qmp, "b2", disks, checkpoint="c2", since="c1", workdir=workdir,
                                socket=workdir / "b2.nbd")  # fmt: skip
        assert export.incremental, [d.reason for d in export.disks]
        await qb.finish(qmp, export, success=True)
    finally:
        status = await process.quit()
    assert status.code == 0 and status.shutdown_reason == "host-qmp-quit"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(disk.path)], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    stored = json.loads(info)["format-specific"]["data"].get("bitmaps") or []
    assert [b["name"] for b in stored] == [qb.checkpoint_bitmap("c2")]
