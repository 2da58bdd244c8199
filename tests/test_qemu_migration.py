"""Live migration between real QEMU processes: the decisions as pure functions, then one booted
test guest that moves from QEMU to QEMU (its data disk copied over NBD every time) through
success, a killed destination, cancellation, timeouts and post-copy."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from vmo.engine.qemu import (
    Disk,
    DiskBus,
    DiskCache,
    DiskFormat,
    Domain,
    KernelBoot,
    QemuProcess,
    QMPClient,
    QMPError,
    RuntimePaths,
    VMRunState,
    disk_node_names,
    launch,
    qemu_argv,
)
from vmo.engine.qemu.migration import (
    UNLIMITED_BANDWIDTH,
    BlockMirror,
    ConvergenceWatch,
    MigrationMode,
    MigrationProgress,
    MigrationResult,
    MigrationTuning,
    TcpAddress,
    UnixAddress,
    Verdict,
    bitmap_mapping,
    completion_timeout,
    finish_target,
    migrate,
    parse_address,
    post_copy_available,
    prepare_target,
    recover_source,
    source_settings,
    start_incoming,
    target_settings,
    wait_incoming,
)
from vmo.testing.guest import READY_MARKER, GuestImage, build_guest, default_cache_dir, seed_iso

MIB = 1 << 20
GUEST_MEMORY_MIB = 128
# Small: under a bandwidth cap QEMU 7.2 charges a mirror for the whole virtual size.
DATA_DISK_BYTES = 16 * MIB
# Enough to finish an idle guest in about a second, little enough to stop one mid-way.
SLOW = 16 * MIB
on_module_loop = pytest.mark.asyncio(loop_scope="module")


# --- the decisions -----------------------------------------------------------------------------


def test_source_settings_set_every_capability_and_lift_the_bandwidth_cap() -> None:
    settings = source_settings(MigrationTuning(max_downtime_ms=250), mirrors=False)
    assert settings.capabilities == {
        "events": True,
        "auto-converge": False,
        "postcopy-ram": False,
        "pause-before-switchover": False,
        "dirty-bitmaps": False,
    }
    assert settings.parameters == {"max-bandwidth": UNLIMITED_BANDWIDTH, "downtime-limit": 250}


def test_checkpoint_bitmaps_of_copied_disks_are_mapped_and_nothing_else() -> None:
    nodes = [
        {"node-name": "disk0-format", "dirty-bitmaps": [
            {"name": "vmo-ckpt-c1"}, {"name": "vmo-bk-b1"}, {"name": "other"}]},
        {"node-name": "disk1-format", "dirty-bitmaps": [{"name": "vmo-ckpt-c9"}]},
        {"node-name": "disk2-format", "dirty-bitmaps": []},
    ]  # fmt: skip
    address = UnixAddress(Path("/run/x.sock"))
    mirrors = [BlockMirror("disk0-format", address, "disk0-format"),
               BlockMirror("disk2-format", address, "disk2-format")]  # fmt: skip
    busy = [{"node-name": "disk2-format",
             "dirty-bitmaps": [{"name": "vmo-ckpt-c2"}, {"name": "vmo-bk-b2", "busy": True}]}]  # fmt: skip
    assert bitmap_mapping(busy, mirrors[1:]) == []  # mapped, it would fail the migration
    mapping = bitmap_mapping(nodes, mirrors)
    # disk1 is not copied (shared storage): its bitmap goes through the image
    assert mapping == [{"node-name": "disk0-format", "alias": "disk0-format",
                        "bitmaps": [{"name": "vmo-ckpt-c1", "alias": "vmo-ckpt-c1"}]}]  # fmt: skip
    settings = source_settings(MigrationTuning(), mirrors=True, bitmaps=mapping)
    assert settings.capabilities["dirty-bitmaps"] is True
    assert settings.parameters["block-bitmap-mapping"] == mapping
    assert target_settings(MigrationTuning(), bitmaps=True).capabilities["dirty-bitmaps"]


def test_source_settings_follow_the_tuning() -> None:
    tuning = MigrationTuning(
        bandwidth_bytes_per_s=64 * MIB, allow_auto_converge=True, allow_post_copy=True
    )
    settings = source_settings(tuning, mirrors=True)
    assert settings.capabilities["auto-converge"] is True
    assert settings.capabilities["postcopy-ram"] is True
    assert settings.capabilities["pause-before-switchover"] is True
    assert settings.parameters["max-bandwidth"] == 64 * MIB
    assert {"capability": "events", "state": True} in settings.capability_list()


def test_target_settings_enable_post_copy_only_when_allowed() -> None:
    assert target_settings(MigrationTuning()).capabilities == {
        "events": True,
        "postcopy-ram": False,
        "dirty-bitmaps": False,
    }
    assert target_settings(MigrationTuning(allow_post_copy=True)).capabilities["postcopy-ram"]


def test_completion_timeout_counts_memory_and_copied_disks() -> None:
    tuning = MigrationTuning(completion_timeout_per_gib=150)
    assert completion_timeout(tuning, data_bytes=3 << 30) == 450
    assert completion_timeout(tuning, data_bytes=512 * MIB) == 75
    assert completion_timeout(MigrationTuning(completion_timeout_per_gib=0), data_bytes=1) == 0


@pytest.mark.parametrize(
    "changes",
    [{"bandwidth_bytes_per_s": -1}, {"max_downtime_ms": -5}, {"progress_timeout": -1}],
)
def test_tuning_refuses_negative_values(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        MigrationTuning(**changes)  # type: ignore[arg-type]


def watch(
    *, completion: float = 100, progress: float = 10, post_copy: bool = False
) -> ConvergenceWatch:
    return ConvergenceWatch(
        completion_timeout=completion,
        progress_timeout=progress,
        allow_post_copy=post_copy,
        started_at=0.0,
    )


def test_a_migration_making_new_lows_is_left_alone() -> None:
    w = watch(progress=5)
    assert all(w.observe(1000 - t, float(t), post_copy=False) is None for t in range(50))


def test_no_new_low_for_the_progress_timeout_aborts_as_stuck() -> None:
    w = watch(progress=5)
    assert w.observe(100, 1.0, post_copy=False) is None
    # Each pre-copy pass raises the remaining bytes again: that is not progress.
    assert w.observe(150, 3.0, post_copy=False) is None
    assert w.observe(120, 5.0, post_copy=False) is None
    assert w.observe(101, 6.5, post_copy=False) is Verdict.ABORT_STUCK
    assert w.reason(Verdict.ABORT_STUCK, 6.5) == (
        "Live migration stuck for 5 seconds and has been aborted"
    )


def test_the_completion_timeout_aborts_without_post_copy() -> None:
    w = watch(completion=30, progress=0)
    assert w.observe(10, 29.0, post_copy=False) is None
    assert w.observe(5, 30.5, post_copy=False) is Verdict.ABORT_NOT_COMPLETED
    assert w.reason(Verdict.ABORT_NOT_COMPLETED, 30.5) == (
        "Live migration is not completed after 30 seconds and has been aborted"
    )


def test_the_completion_timeout_starts_post_copy_when_allowed() -> None:
    w = watch(completion=30, progress=5, post_copy=True)
    assert w.observe(10, 31.0, post_copy=False) is Verdict.START_POST_COPY


def test_nothing_is_aborted_once_in_post_copy() -> None:
    w = watch(completion=1, progress=1, post_copy=True)
    assert w.observe(10, 50.0, post_copy=True) is None


def test_zero_timeouts_never_fire() -> None:
    w = watch(completion=0, progress=0)
    assert w.observe(10, 1e6, post_copy=False) is None


def test_addresses_parse_from_migration_uris() -> None:
    assert parse_address("unix:/run/x/m.sock") == UnixAddress(Path("/run/x/m.sock"))
    assert parse_address("tcp:127.0.0.1:49153") == TcpAddress("127.0.0.1", 49153)
    assert parse_address("tcp:[::1]:4444") == TcpAddress("::1", 4444)
    assert TcpAddress("::1", 4444).uri() == "tcp:[::1]:4444"
    for bad in ("unix:relative", "tcp:host", "rdma:1.2.3.4:5", "tcp:h:0"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_an_incoming_domain_listens_and_autostarts(tmp_path: Path) -> None:
    domain = Domain(name="dst", uuid=uuid.UUID(int=1), paths=RuntimePaths.under(tmp_path))
    argv = qemu_argv(replace(domain, incoming="defer"))
    assert argv[-2:] == ["-incoming", "defer"]
    assert "-S" not in argv
    assert "-incoming" not in qemu_argv(domain)
    assert qemu_argv(replace(domain, incoming="unix:/run/m.sock"))[-1] == "unix:/run/m.sock"
    with pytest.raises(ValueError, match="incoming"):
        replace(domain, incoming="exec:cat /etc/passwd")


# --- real QEMU ---------------------------------------------------------------------------------


class Console:
    """The guest's serial shell over QEMU's unix-socket chardev."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.text = ""
        self.pos = 0

    @classmethod
    async def open(cls, path: Path) -> Console:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

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

    async def run(self, command: str, *, timeout: float = 15.0) -> str:
        # The markers are split in the typed text so that only the shell's output matches them.
        self.writer.write(f"echo VMO-BE''GIN; {command}; echo VMO-E''ND\n".encode())
        await self.writer.drain()
        return (await self.expect(r"VMO-BEGIN\n([\s\S]*?)VMO-END", timeout)).group(1)

    async def counter(self) -> int:
        return int((await self.run("cat /run/vmo/counter")).strip())

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Vm:
    domain: Domain
    process: QemuProcess
    console: Console | None = None

    @property
    def workdir(self) -> Path:
        return self.process.workdir

    @property
    def disk(self) -> Disk:
        return self.domain.disks[0]

    async def qmp(self) -> QMPClient:
        return await self.process.qmp()

    async def status(self) -> VMRunState:
        return await (await self.qmp()).query_status()

    async def shell(self) -> Console:
        if self.console is None:
            self.console = await Console.open(self.domain.paths.serial)
        return self.console

    async def stop(self) -> None:
        """Idempotent: closes the console and QMP, kills QEMU if it still runs."""
        if self.console is not None:
            await self.console.close()
            self.console = None
        await self.process.kill()


class Cluster:
    """The one test guest, wherever it currently runs, and the targets made for it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.current: Vm | None = None
        self.made: list[Vm] = []
        self._names = itertools.count()

    @property
    def vm(self) -> Vm:
        assert self.current is not None
        return self.current

    def node(self) -> str:
        return disk_node_names(self.vm.domain)["data"]

    async def boot(self, image: GuestImage) -> Vm:
        workdir = self._workdir()
        disk = Disk(
            "data",
            workdir / "data.qcow2",
            DiskFormat.QCOW2,
            DiskBus.VIRTIO,
            cache=DiskCache.WRITEBACK,  # tmp may be tmpfs: no O_DIRECT
        )
        qemu_img("create", "-q", "-f", "qcow2", str(disk.path), str(DATA_DISK_BYTES))
        # Without a NoCloud seed the guest looks for one for seconds. Read-only and the same file
        # on every host, it is not copied (upstream regenerates it on the target).
        seed = seed_iso(
            self.root / "seed.iso",
            meta_data="instance-id: mig\nlocal-hostname: mig\n",
            user_data="",
        )
        readonly = Disk("seed", seed, DiskFormat.RAW, readonly=True, cache=DiskCache.WRITEBACK)
        domain = Domain(
            name="mig-guest",
            uuid=uuid.UUID(int=7),
            paths=RuntimePaths.under(workdir),
            memory_mib=GUEST_MEMORY_MIB,
            disks=(disk, readonly),
            graphics=False,
            guest_agent=False,
            rng=False,
            kernel_boot=KernelBoot(image.kernel_elf, image.initramfs, image.cmdline),
        )
        vm = self._track(Vm(domain, await launch(domain, workdir=workdir)))
        await (await vm.shell()).expect(READY_MARKER, timeout=60)
        self.current = vm
        return vm

    async def target(self, tuning: MigrationTuning) -> Vm:
        """An empty destination, listening for memory and exporting an empty data disk."""
        workdir = self._workdir()
        disk = replace(self.vm.disk, path=workdir / "data.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", str(disk.path), str(DATA_DISK_BYTES))
        domain = replace(
            self.vm.domain,
            paths=RuntimePaths.under(workdir),
            disks=(disk, *self.vm.domain.disks[1:]),
            incoming="defer",
        )
        vm = self._track(Vm(domain, await launch(domain, workdir=workdir)))
        qmp = await vm.qmp()
        assert await qmp.query_status() is VMRunState.INMIGRATE
        await start_incoming(qmp, uri=memory_uri(vm), tuning=tuning, bitmaps=True)
        await prepare_target(qmp, nbd_listen=nbd_address(vm), exports=[self.node()])
        return vm

    def mirrors(self, target: Vm) -> list[BlockMirror]:
        return [BlockMirror(self.node(), nbd_address(target), export=self.node())]

    async def migrate(
        self, target: Vm, tuning: MigrationTuning, **kwargs: object
    ) -> MigrationResult:
        return await migrate(
            await self.vm.qmp(),
            uri=memory_uri(target),
            tuning=tuning,
            mirrors=self.mirrors(target),
            guest_memory_bytes=GUEST_MEMORY_MIB * MIB,
            local_disk_bytes=DATA_DISK_BYTES,
            **kwargs,  # type: ignore[arg-type]
        )

    async def move_to(self, target: Vm) -> None:
        """After a completed migration: the target owns the guest, the source goes."""
        result = await wait_incoming(await target.qmp(), timeout=30)
        assert result.completed, result
        await finish_target(await target.qmp())
        source = self.vm
        assert await source.status() is VMRunState.POSTMIGRATE
        await source.stop()
        self.current = target

    def _track(self, vm: Vm) -> Vm:
        self.made.append(vm)
        return vm

    async def stop_all(self) -> None:
        for vm in self.made:
            await vm.stop()

    def _workdir(self) -> Path:
        path = self.root / f"vm{next(self._names)}"
        path.mkdir()
        return path


def memory_uri(vm: Vm) -> str:
    return f"unix:{vm.workdir / 'migration.sock'}"


def nbd_address(vm: Vm) -> UnixAddress:
    return UnixAddress(vm.workdir / "nbd.sock")


def qemu_img(*args: str) -> str:
    return subprocess.run(
        ["qemu-img", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def qemu_pids_under(root: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if b"qemu-system" in cmdline and str(root).encode() in cmdline:
                    pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest(default_cache_dir())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("migration")
    yield path
    leaked = qemu_pids_under(path)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)
    assert not leaked, f"QEMU processes leaked: {leaked}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(root: Path, image: GuestImage) -> AsyncIterator[Cluster]:
    cluster = Cluster(root)
    await cluster.boot(image)
    yield cluster
    await cluster.stop_all()


async def assert_source_intact(vm: Vm) -> None:
    """Running, no block job, no NBD client node left from the migration."""
    qmp = await vm.qmp()
    assert await qmp.query_status() is VMRunState.RUNNING
    assert await qmp.execute("query-block-jobs") == []
    nodes = {n["node-name"] for n in await qmp.execute("query-named-block-nodes", {"flat": True})}
    assert not {n for n in nodes if n.startswith("vmo-mig")}
    before = await (await vm.shell()).counter()
    await asyncio.sleep(1.1)
    assert await (await vm.shell()).counter() > before


async def discard(target: Vm) -> None:
    """A failed migration's target: QEMU exits by itself once the stream breaks."""
    with contextlib.suppress(TimeoutError):
        await target.process.wait_exit(timeout=5)
    await target.stop()


def when_active(event: asyncio.Event) -> Callable[[MigrationProgress], None]:
    def on_progress(progress: MigrationProgress) -> None:
        if progress.status == "active" and progress.ram_transferred > 0:
            event.set()

    return on_progress


def when_copying(event: asyncio.Event) -> Callable[[MigrationProgress], None]:
    def on_progress(progress: MigrationProgress) -> None:
        if progress.status == "mirroring" and progress.disk_transferred > 0:
            event.set()

    return on_progress


@on_module_loop
async def test_an_idle_guest_moves_and_keeps_running(cluster: Cluster) -> None:
    counter = await (await cluster.vm.shell()).counter()
    tuning = MigrationTuning()
    target = await cluster.target(tuning)
    samples: list[MigrationProgress] = []
    result = await cluster.migrate(target, tuning, on_progress=samples.append)
    assert result.completed, result.failure_reason
    assert result.mode is MigrationMode.PRE_COPY
    assert result.downtime_ms is not None and result.downtime_ms < 2000
    assert result.ram_bytes > 0 and result.qemu_total_ms is not None
    assert samples and samples[0].status == "mirroring"
    await cluster.move_to(target)
    assert await target.status() is VMRunState.RUNNING
    shell = await target.shell()
    after = await shell.counter()
    assert after >= counter
    await asyncio.sleep(1.1)
    assert await shell.counter() > after
    assert await (await target.qmp()).execute("query-block-jobs") == []


@on_module_loop
async def test_a_copied_disk_keeps_what_the_guest_wrote(cluster: Cluster) -> None:
    shell = await cluster.vm.shell()
    write = "dd if=/dev/urandom of=/dev/vda bs=1M count=4 seek=8 2>/dev/null; sync"
    read = "dd if=/dev/vda bs=1M count=4 skip=8 2>/dev/null | md5sum"
    written = await shell.run(f"{write}; {read}")
    source_disk = cluster.vm.disk.path
    tuning = MigrationTuning()
    target = await cluster.target(tuning)
    result = await cluster.migrate(target, tuning)
    assert result.completed, result.failure_reason
    assert result.disk_bytes >= 4 * MIB
    await cluster.move_to(target)
    # The page cache came along with the memory: drop it so that the read reaches the disk.
    reread = await (await target.shell()).run(f"echo 3 > /proc/sys/vm/drop_caches; {read}")
    assert reread == written
    compared = qemu_img(
        "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(source_disk), str(target.disk.path)
    )
    assert "identical" in compared


@on_module_loop
async def test_a_checkpoint_bitmap_of_a_copied_disk_arrives_persistent_and_recording(
    cluster: Cluster,
) -> None:
    qmp = await cluster.vm.qmp()
    node = cluster.node()
    await qmp.execute("block-dirty-bitmap-add",
                      {"node": node, "name": "vmo-ckpt-mig", "persistent": True})  # fmt: skip
    await qmp.execute("block-dirty-bitmap-add", {"node": node, "name": "scratch"})
    await (await cluster.vm.shell()).run(
        "dd if=/dev/urandom of=/dev/vda bs=1M count=3 seek=2 2>/dev/null; sync"
    )

    async def bitmaps(vm: Vm) -> dict[str, Any]:
        nodes = await (await vm.qmp()).execute("query-named-block-nodes", {"flat": True})
        info = next(n for n in nodes if n["node-name"] == node)
        return {b["name"]: b for b in info.get("dirty-bitmaps") or []}

    before = (await bitmaps(cluster.vm))["vmo-ckpt-mig"]
    assert before["count"] >= 3 * MIB
    tuning = MigrationTuning()
    target = await cluster.target(tuning)
    result = await cluster.migrate(target, tuning)
    assert result.completed, result.failure_reason
    await cluster.move_to(target)
    arrived = await bitmaps(target)
    assert set(arrived) == {"vmo-ckpt-mig"}  # only checkpoints travel
    bitmap = arrived["vmo-ckpt-mig"]
    assert bitmap["persistent"] and bitmap["recording"] and not bitmap.get("inconsistent")
    # the copy wrote the whole disk on the target, and none of it counts as a guest write
    assert bitmap["count"] == before["count"]
    await (await target.shell()).run(
        "dd if=/dev/urandom of=/dev/vda bs=1M count=2 seek=12 2>/dev/null; sync"
    )
    assert (await bitmaps(target))["vmo-ckpt-mig"]["count"] >= before["count"] + 2 * MIB
    await (await target.qmp()).execute(
        "block-dirty-bitmap-remove", {"node": node, "name": "vmo-ckpt-mig"}
    )


@on_module_loop
async def test_a_checkpoint_on_shared_storage_reaches_the_destination_through_the_image(
    cluster: Cluster,
) -> None:
    """No copy: both QEMUs open the one image; the source stores its persistent bitmaps in it
    when it lets go of the image, and the destination loads them when it takes it over."""
    qmp = await cluster.vm.qmp()
    node = cluster.node()
    await qmp.execute("block-dirty-bitmap-add",
                      {"node": node, "name": "vmo-ckpt-shared", "persistent": True})  # fmt: skip
    await (await cluster.vm.shell()).run(
        "dd if=/dev/urandom of=/dev/vda bs=1M count=2 seek=4 2>/dev/null; sync"
    )

    async def bitmaps(vm: Vm) -> dict[str, Any]:
        nodes = await (await vm.qmp()).execute("query-named-block-nodes", {"flat": True})
        info = next(n for n in nodes if n["node-name"] == node)
        return {b["name"]: b for b in info.get("dirty-bitmaps") or []}

    before = (await bitmaps(cluster.vm))["vmo-ckpt-shared"]
    tuning = MigrationTuning()
    workdir = cluster._workdir()
    domain = replace(cluster.vm.domain, paths=RuntimePaths.under(workdir), incoming="defer")
    target = cluster._track(Vm(domain, await launch(domain, workdir=workdir)))
    await start_incoming(await target.qmp(), uri=memory_uri(target), tuning=tuning)
    result = await migrate(
        qmp, uri=memory_uri(target), tuning=tuning, mirrors=[],
        guest_memory_bytes=GUEST_MEMORY_MIB * MIB, local_disk_bytes=0,
    )  # fmt: skip
    assert result.completed, result.failure_reason
    await cluster.move_to(target)
    bitmap = (await bitmaps(target))["vmo-ckpt-shared"]
    assert bitmap["persistent"] and bitmap["recording"] and not bitmap.get("inconsistent")
    assert bitmap["count"] == before["count"] >= 2 * MIB
    await (await target.qmp()).execute(
        "block-dirty-bitmap-remove", {"node": node, "name": "vmo-ckpt-shared"}
    )


@on_module_loop
async def test_a_killed_destination_fails_the_migration_and_the_source_runs_on(
    cluster: Cluster,
) -> None:
    tuning = MigrationTuning(bandwidth_bytes_per_s=SLOW)
    target = await cluster.target(tuning)
    active = asyncio.Event()
    migration = asyncio.create_task(
        cluster.migrate(target, tuning, on_progress=when_active(active))
    )
    await asyncio.wait_for(active.wait(), 30)
    await target.process.kill()
    result = await asyncio.wait_for(migration, 30)
    assert not result.completed and not result.aborted
    assert result.failure_reason is not None
    assert result.failure_reason.startswith("Live migration failed")
    await discard(target)
    await assert_source_intact(cluster.vm)


@on_module_loop
async def test_a_destination_killed_during_the_disk_copy_fails_cleanly(cluster: Cluster) -> None:
    tuning = MigrationTuning(bandwidth_bytes_per_s=4 * MIB)  # 16 MiB take 4 s
    target = await cluster.target(tuning)
    copying = asyncio.Event()
    migration = asyncio.create_task(
        cluster.migrate(target, tuning, on_progress=when_copying(copying))
    )
    await asyncio.wait_for(copying.wait(), 30)
    await target.process.kill()
    result = await asyncio.wait_for(migration, 30)
    assert not result.completed and result.ram_bytes == 0
    assert result.failure_reason is not None and "copy of disk0-format" in result.failure_reason
    await assert_source_intact(cluster.vm)


@on_module_loop
async def test_cancelling_the_task_cancels_the_migration(cluster: Cluster) -> None:
    tuning = MigrationTuning(bandwidth_bytes_per_s=SLOW)
    target = await cluster.target(tuning)
    incoming = asyncio.create_task(wait_incoming(await target.qmp(), timeout=60))
    active = asyncio.Event()
    migration = asyncio.create_task(
        cluster.migrate(target, tuning, on_progress=when_active(active))
    )
    await asyncio.wait_for(active.wait(), 30)
    migration.cancel()
    with pytest.raises(asyncio.CancelledError):
        await migration
    assert (await (await cluster.vm.qmp()).execute("query-migrate"))["status"] == "cancelled"
    outcome = await asyncio.wait_for(incoming, 30)
    assert not outcome.completed and outcome.failure_reason is not None
    await discard(target)
    await assert_source_intact(cluster.vm)


@on_module_loop
async def test_a_cancellation_while_qemu_adds_the_nbd_node_still_removes_it(
    cluster: Cluster,
) -> None:
    """The task is cancelled after ``blockdev-add`` went out and before its reply came back (an
    agent shut down at that moment): the node QEMU added must go all the same."""
    tuning = MigrationTuning(bandwidth_bytes_per_s=SLOW)
    target = await cluster.target(tuning)
    qmp = await cluster.vm.qmp()
    real = qmp.execute
    sent = asyncio.Event()

    async def execute(command: str, arguments: object = None, **kwargs: object) -> object:
        if command == "blockdev-add" and not sent.is_set():
            reply = asyncio.ensure_future(real(command, arguments, **kwargs))  # type: ignore[arg-type]
            await asyncio.sleep(0.05)  # written to QEMU
            sent.set()
            await asyncio.sleep(30)  # cancelled in here, the reply unread
            return await reply
        return await real(command, arguments, **kwargs)  # type: ignore[arg-type]

    qmp.execute = execute  # type: ignore[method-assign]
    try:
        migration = asyncio.create_task(cluster.migrate(target, tuning))
        await asyncio.wait_for(sent.wait(), 30)
        migration.cancel()
        with pytest.raises(asyncio.CancelledError):
            await migration
    finally:
        del qmp.execute
    await discard(target)
    await assert_source_intact(cluster.vm)


@on_module_loop
async def test_recover_source_undoes_what_a_dead_driver_left(cluster: Cluster) -> None:
    """What a migration's driver leaves when it dies mid-copy (an NBD client node, a mirror job,
    the memory stream): ``recover_source`` leaves the source as it was before."""
    tuning = MigrationTuning(bandwidth_bytes_per_s=SLOW)
    target = await cluster.target(tuning)
    qmp = await cluster.vm.qmp()
    mirror = cluster.mirrors(target)[0]
    assert isinstance(mirror.server, UnixAddress)
    server = {"type": "unix", "path": str(mirror.server.path)}
    await qmp.execute(
        "blockdev-add",
        {"driver": "nbd", "node-name": "vmo-mig-nbd-0", "server": server, "export": mirror.export},
    )
    await qmp.execute(
        "blockdev-mirror",
        {
            "job-id": "vmo-mig-0",
            "device": mirror.node,
            "target": "vmo-mig-nbd-0",
            "sync": "full",
            "copy-mode": "write-blocking",
            "auto-dismiss": False,
            "speed": SLOW,
        },
    )
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": SLOW})
    await qmp.execute("migrate", {"uri": memory_uri(target)})
    assert (await qmp.execute("query-migrate"))["status"] in ("setup", "active")
    await recover_source(qmp)
    assert (await qmp.execute("query-migrate"))["status"] == "cancelled"
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
    await discard(target)
    await assert_source_intact(cluster.vm)


@on_module_loop
async def test_an_abort_request_ends_with_an_aborted_result(cluster: Cluster) -> None:
    tuning = MigrationTuning(bandwidth_bytes_per_s=SLOW)
    target = await cluster.target(tuning)
    abort = asyncio.Event()
    result = await cluster.migrate(target, tuning, on_progress=when_active(abort), abort=abort)
    assert not result.completed and result.aborted
    assert result.failure_reason == "Live migration aborted"
    await discard(target)
    await assert_source_intact(cluster.vm)


@pytest_asyncio.fixture(loop_scope="module")
async def dirtying(cluster: Cluster) -> AsyncIterator[None]:
    """The guest rewrites 16 MiB of tmpfs (non-zero pages) as fast as it can."""
    await (await cluster.vm.shell()).run(
        "dd if=/dev/urandom of=/dev/shm/src bs=1M count=16 2>/dev/null; "
        "(while :; do cp /dev/shm/src /dev/shm/dst; done) & echo $! > /run/dirty.pid",
        timeout=60,
    )
    yield
    await (await cluster.vm.shell()).run("kill $(cat /run/dirty.pid); rm -f /dev/shm/*")


# A dirtying guest cannot converge at this bandwidth; (128 MiB + 16 MiB) * 21.4 s/GiB = 3 s.
DIRTY_TUNING = MigrationTuning(
    bandwidth_bytes_per_s=16 * MIB, completion_timeout_per_gib=21.4, progress_timeout=0
)


@on_module_loop
@pytest.mark.usefixtures("dirtying")
async def test_a_dirtying_guest_is_aborted_at_the_completion_timeout(cluster: Cluster) -> None:
    target = await cluster.target(DIRTY_TUNING)
    result = await asyncio.wait_for(cluster.migrate(target, DIRTY_TUNING), 60)
    assert not result.completed and result.aborted
    assert result.failure_reason == (
        "Live migration is not completed after 3 seconds and has been aborted"
    )
    assert 3000 <= result.total_ms < 10000
    await discard(target)
    await assert_source_intact(cluster.vm)


@on_module_loop
@pytest.mark.usefixtures("dirtying")
async def test_post_copy_completes_a_dirtying_guest(cluster: Cluster) -> None:
    available, why = post_copy_available()
    assert available, why  # the test runs QEMU as root
    tuning = replace(DIRTY_TUNING, allow_post_copy=True)
    target = await cluster.target(tuning)
    incoming = asyncio.create_task(wait_incoming(await target.qmp(), timeout=60))
    result = await asyncio.wait_for(cluster.migrate(target, tuning), 60)
    assert result.completed, result.failure_reason
    assert result.mode is MigrationMode.POST_COPY
    seen = await asyncio.wait_for(incoming, 30)
    assert seen.completed and seen.mode is MigrationMode.POST_COPY  # QEMU really switched
    await cluster.move_to(target)
    shell = await target.shell()
    before = await shell.counter()
    await asyncio.sleep(1.1)
    assert await shell.counter() > before


@on_module_loop
async def test_post_copy_availability_matches_what_qemu_accepts(root: Path) -> None:
    """Root QEMU may use userfaultfd; one dropped to vmo-qemu may not unless the sysctl allows."""
    users: list[str | None] = [None]
    with contextlib.suppress(KeyError):
        users.append(pwd.getpwnam("vmo-qemu").pw_name)  # made by `make install`
    for run_as in users:
        workdir = root / f"postcopy-{run_as or 'root'}"
        domain = Domain(
            name="postcopy-probe",
            uuid=uuid.UUID(int=9),
            paths=RuntimePaths.under(workdir),
            memory_mib=32,
            graphics=False,
            run_as=run_as,
            incoming="defer",
        )
        process = await launch(domain, workdir=workdir)
        try:
            available, why = post_copy_available(run_as=run_as)
            qmp = await process.qmp()
            try:
                await start_incoming(qmp, uri=None, tuning=MigrationTuning(allow_post_copy=True))
                accepted = True
            except QMPError as exc:
                assert "Postcopy is not supported" in exc.desc
                accepted = False
            assert accepted == available, why
        finally:
            await process.kill()
