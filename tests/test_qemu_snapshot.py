"""Live snapshots and merges of a pool volume under a real, unprivileged QEMU (TCG, the test
guest): QEMU cannot open the pool's files, so every overlay reaches it as file descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.test_qemu_migration import qemu_pids_under
from vmo.engine.agent.runtime import qemu_user
from vmo.engine.qemu import (
    Disk,
    DiskBus,
    DiskCache,
    DiskFormat,
    Domain,
    KernelBoot,
    QemuError,
    QemuProcess,
    QMPClient,
    QMPError,
    RuntimePaths,
    disk_node_names,
    launch,
)
from vmo.engine.qemu.snapshot import Overlay, merge_layer, node_of, snapshot_disks
from vmo.engine.storage.pool import Pool
from vmo.testing.guest import READY_MARKER, GuestImage, build_guest, default_cache_dir, seed_iso

MIB = 1 << 20
NS, VOLUME = "ns", "data"
DISK_BYTES = 32 * MIB
on_module_loop = pytest.mark.asyncio(loop_scope="module")
# 4 MiB of random bytes at 8 MiB into the data disk, then their checksum as the guest reads it
FIRST, SECOND, THIRD = 8, 16, 24  # MiB offsets of three written regions
DROP_CACHES = "echo 3 > /proc/sys/vm/drop_caches"


def write_cmd(offset_mib: int) -> str:
    return f"dd if=/dev/urandom of=/dev/vda bs=1M count=4 seek={offset_mib} 2>/dev/null; sync"


def read_cmd(offset_mib: int) -> str:
    return f"dd if=/dev/vda bs=1M count=4 skip={offset_mib} 2>/dev/null | md5sum"


class Console:
    """The guest's serial shell over QEMU's unix-socket chardev."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.text, self.pos = "", 0

    @classmethod
    async def open(cls, path: Path) -> Console:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while (match := regex.search(self.text, self.pos)) is None:
                chunk = await self.reader.read(4096)
                if not chunk:
                    raise EOFError(f"console closed; tail: {self.text[-500:]}")
                self.text += chunk.decode(errors="replace").replace("\r", "")
        self.pos = match.end()
        return match

    async def run(self, command: str, *, timeout: float = 30.0) -> str:
        # The markers are split in the typed text so that only the shell's output matches them.
        self.writer.write(f"echo VMO-BE''GIN; {command}; echo VMO-E''ND\n".encode())
        await self.writer.drain()
        return (await self.expect(r"VMO-BEGIN\n([\s\S]*?)VMO-END", timeout)).group(1)

    async def md5(self, offset_mib: int) -> str:
        """The checksum of a written region as the guest reads it from the disk (not its cache)."""
        return (await self.run(f"{DROP_CACHES}; {read_cmd(offset_mib)}")).split()[0]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Guest:
    """The booted guest, its data disk a pool volume, and what VMO knows of its layers."""

    pool: Pool
    domain: Domain
    process: QemuProcess
    console: Console
    node: str  # the data disk's current top node
    known: dict[str, str] = field(default_factory=dict)  # overlay path -> its node
    sums: dict[int, str] = field(default_factory=dict)  # region offset -> md5 when written

    async def qmp(self) -> QMPClient:
        return await self.process.qmp()

    async def write(self, offset_mib: int) -> str:
        self.sums[offset_mib] = (
            await self.console.run(f"{write_cmd(offset_mib)}; {read_cmd(offset_mib)}")
        ).split()[0]
        return self.sums[offset_mib]

    async def snapshot(self, name: str, *, node: str | None = None) -> None:
        """A live snapshot: the pool makes the overlay, QEMU switches onto it by descriptor."""
        qmp = await self.qmp()

        async def switch(old: Path, new: Path) -> None:
            [overlay] = await snapshot_disks(qmp, [Overlay("data", node or self.node, new)])
            self.known[str(new)] = overlay.new_node
            self.node = overlay.new_node

        await self.pool.snapshot(NS, VOLUME, name, switch=switch)

    async def merge(self) -> int:
        """Merges every layer no snapshot holds any more into its child, live; how many."""
        merged = 0
        for layer, child in self.pool.merges():
            under = self.pool.backing_of(layer)
            await merge_layer(await self.qmp(), layer, child, under, self.known)
            self.known.pop(str(layer), None)
            self.pool.collect()
            merged += 1
        return merged

    async def nodes(self) -> dict[str, dict[str, Any]]:
        found = await (await self.qmp()).execute("query-named-block-nodes", {"flat": True})
        return {str(n["node-name"]): n for n in found if not str(n["node-name"]).startswith("#")}

    async def fdsets(self) -> list[dict[str, Any]]:
        fdsets: list[dict[str, Any]] = await (await self.qmp()).execute("query-fdsets")
        return fdsets


def layer_md5(path: Path, offset_mib: int, scratch: Path) -> str:
    """The checksum of a region as reading ``path`` (a layer and the chain under it) gives."""
    raw = scratch / f"read-{uuid.uuid4().hex[:8]}.raw"
    try:
        subprocess.run(
            ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(raw)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        with raw.open("rb") as fh:
            fh.seek(offset_mib * MIB)
            return hashlib.md5(fh.read(4 * MIB)).hexdigest()
    finally:
        raw.unlink(missing_ok=True)


def backing_chain(top: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(top)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    chain: list[dict[str, Any]] = json.loads(out)
    return chain


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest(default_cache_dir())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("snapshot")
    yield path
    leaked = qemu_pids_under(path)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)
    assert not leaked, f"QEMU processes leaked: {leaked}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest(root: Path, image: GuestImage) -> AsyncIterator[Guest]:
    pool = Pool(root / "pool")
    await pool.create_blank(NS, VOLUME, DISK_BYTES)
    workdir = root / "vm"
    workdir.mkdir()
    disk = Disk(
        "data",
        pool.top(NS, VOLUME),
        DiskFormat.QCOW2,
        DiskBus.VIRTIO,
        cache=DiskCache.WRITEBACK,  # tmp may be tmpfs: no O_DIRECT
    )
    seed = seed_iso(root / "seed.iso", meta_data="instance-id: snap\n", user_data="")
    domain = Domain(
        name="snap-guest",
        uuid=uuid.UUID(int=11),
        paths=RuntimePaths.under(workdir),
        memory_mib=128,
        disks=(disk, Disk("seed", seed, DiskFormat.RAW, readonly=True, cache=DiskCache.WRITEBACK)),
        graphics=False,
        guest_agent=False,
        rng=False,
        run_as=qemu_user(),
        kernel_boot=KernelBoot(image.kernel_elf, image.initramfs, image.cmdline),
    )
    process = await launch(domain, workdir=workdir)
    console: Console | None = None
    try:
        console = await Console.open(domain.paths.serial)
        await console.expect(READY_MARKER, timeout=60)
        yield Guest(pool, domain, process, console, disk_node_names(domain)["data"])
    finally:
        if console is not None:
            await console.close()
        await process.kill()


def first_overlay_file(guest: Guest) -> str:
    return guest.pool.snapshot_path(NS, "second").name


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def reachable_by_others(path: Path) -> bool:
    """Whether a user neither owning nor in the group of ``path`` and its parents can read it."""
    parents_ok = all(p.stat().st_mode & 0o001 for p in path.parents)
    return parents_ok and bool(path.stat().st_mode & 0o004)


@on_module_loop
async def test_qemu_runs_as_a_user_that_cannot_open_the_pool(guest: Guest) -> None:
    user = qemu_user()
    assert user is not None, "run as root, with user vmo-qemu (`make install` creates it)"
    assert uid_of(guest.process.pid) == pwd.getpwnam(user).pw_uid
    assert not reachable_by_others(guest.pool.top(NS, VOLUME))


@on_module_loop
async def test_a_live_snapshot_freezes_what_the_guest_wrote(guest: Guest, root: Path) -> None:
    first = await guest.write(FIRST)
    before = guest.pool.top(NS, VOLUME)
    await guest.snapshot("first")
    top = guest.pool.top(NS, VOLUME)
    assert top != before and guest.pool.snapshot_path(NS, "first") == before
    second = await guest.write(FIRST)  # the same region again: the old bytes stay in the layer
    assert second != first
    assert layer_md5(guest.pool.snapshot_path(NS, "first"), FIRST, root) == first
    assert await guest.console.md5(FIRST) == second
    assert top.stat().st_blocks * 512 >= 4 * MIB  # the writes went to the new top
    nodes = await guest.nodes()
    # the overlay stands on the old top, whose header QEMU reads by its relative name
    assert nodes[guest.node]["image"]["backing-filename"] == before.name
    assert nodes[guest.node]["backing_file"] == str(before)


@on_module_loop
async def test_a_second_live_snapshot_stands_on_the_first_overlay(guest: Guest, root: Path) -> None:
    first_overlay = guest.node
    assert (await guest.nodes())[first_overlay]["ro"] is False
    await guest.snapshot("second")
    await guest.write(SECOND)
    nodes = await guest.nodes()
    # QEMU stays on the read-write descriptor (see vmo.engine.qemu.snapshot)
    assert nodes[first_overlay]["ro"] is False
    assert nodes[guest.node]["ro"] is False
    assert nodes[guest.node]["image"]["backing-filename"] == first_overlay_file(guest)
    assert layer_md5(guest.pool.snapshot_path(NS, "second"), FIRST, root) == guest.sums[FIRST]
    assert await guest.console.md5(SECOND) == guest.sums[SECOND]
    assert len(guest.pool.chain(guest.pool.top(NS, VOLUME))) == 3


@on_module_loop
async def test_a_failed_switch_leaves_no_node_fdset_or_layer(guest: Guest) -> None:
    nodes, fdsets = set(await guest.nodes()), await guest.fdsets()
    layers, top = set(guest.pool.layers_dir.iterdir()), guest.pool.top(NS, VOLUME)
    with pytest.raises(QMPError):
        await guest.snapshot("broken", node="no-such-node")
    assert set(await guest.nodes()) == nodes
    assert await guest.fdsets() == fdsets
    assert set(guest.pool.layers_dir.iterdir()) == layers
    assert guest.pool.top(NS, VOLUME) == top and not guest.pool.has_snapshot(NS, "broken")
    assert await guest.console.md5(SECOND) == guest.sums[SECOND]  # the guest writes on


@on_module_loop
async def test_nodes_are_found_by_name_or_by_descriptor(guest: Guest) -> None:
    qmp = await guest.qmp()
    original = guest.pool.snapshot_path(NS, "first")
    assert await node_of(qmp, original, {}) == disk_node_names(guest.domain)["data"]
    top = guest.pool.top(NS, VOLUME)
    assert await node_of(qmp, top, {}) == guest.node  # from the fdset VMO passed
    assert await node_of(qmp, top, {str(top): "given"}) == "given"
    assert await node_of(qmp, guest.pool.root / "nothing.qcow2", {}) is None
    with pytest.raises(QemuError, match=r"no node for nothing\.qcow2"):
        await merge_layer(qmp, original, guest.pool.root / "nothing.qcow2", None, {})


@on_module_loop
async def test_a_live_merge_onto_a_grandparent_names_it_relatively(
    guest: Guest, root: Path
) -> None:
    await guest.snapshot("third")
    await guest.write(THIRD)
    first, second = (guest.pool.snapshot_path(NS, n) for n in ("first", "second"))
    second_node = guest.known[str(second)]
    fdsets = len(await guest.fdsets())
    await guest.pool.delete_snapshot(NS, "second")
    assert guest.pool.merges() == [(second, guest.pool.snapshot_path(NS, "third"))]
    assert await guest.merge() == 1
    assert not second.exists()
    assert second_node not in await guest.nodes()
    assert len(await guest.fdsets()) == fdsets - 1
    chain = backing_chain(guest.pool.top(NS, VOLUME))
    names = [c["backing-filename"] for c in chain if "backing-filename" in c]
    assert names == [guest.pool.snapshot_path(NS, "third").name, first.name]
    for offset, digest in guest.sums.items():
        assert await guest.console.md5(offset) == digest
    assert layer_md5(guest.pool.snapshot_path(NS, "third"), SECOND, root) == guest.sums[SECOND]


@on_module_loop
async def test_a_live_merge_of_the_bottom_layer_leaves_no_backing(guest: Guest) -> None:
    first = guest.pool.snapshot_path(NS, "first")
    original = disk_node_names(guest.domain)["data"]
    await guest.pool.delete_snapshot(NS, "first")
    assert await guest.merge() == 1
    assert not first.exists()
    nodes = await guest.nodes()
    assert original not in nodes and original.replace("format", "file") not in nodes
    chain = backing_chain(guest.pool.top(NS, VOLUME))
    assert len(chain) == 2
    assert "backing-filename" not in chain[-1]
    assert all("/" not in c.get("backing-filename", "") for c in chain)
    assert guest.pool.merges() == []
    for offset, digest in guest.sums.items():
        assert await guest.console.md5(offset) == digest


@on_module_loop
async def test_after_qemu_stops_the_chain_is_clean_and_holds_the_last_writes(
    guest: Guest, root: Path
) -> None:
    await guest.console.run("sync")
    await (await guest.qmp()).execute("quit")
    await guest.process.wait_exit(timeout=30)
    top = guest.pool.top(NS, VOLUME)
    for layer in guest.pool.chain(top):
        subprocess.run(["qemu-img", "check", "-q", str(layer)], check=True, timeout=60)
    for offset, digest in guest.sums.items():
        assert layer_md5(top, offset, root) == digest
    assert guest.pool.discard_partials() == []
    layers = {p for p in guest.pool.layers_dir.iterdir() if p.name != ".lock"}
    assert layers == set(guest.pool.chain(top)) | {
        p for r in guest.pool.snapshots() for p in guest.pool.chain(guest.pool.layers_dir / r.layer)
    }
