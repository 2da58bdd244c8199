"""QEMU processes that outlive their agent, and the accelerator probe, on this machine's real QEMU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmo.engine.qemu import (
    Accelerator,
    Disk,
    DiskBus,
    DiskCache,
    DiskFormat,
    Domain,
    GuestAgentClient,
    HostForward,
    LaunchError,
    Nic,
    ProcessError,
    QMPTimeout,
    RuntimePaths,
    UserBackend,
    VMRunState,
    WorkdirEscape,
    adopt,
    detect_accelerator,
    launch,
    probe_kvm,
)
from vmo.engine.qemu import accel as accel_module

ROOT = Path(__file__).resolve().parent.parent


def qemu_pids_in(workdir: Path) -> list[int]:
    """Every process whose command line mentions ``workdir``: what a leak would look like."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and str(workdir).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "vm"
    yield path
    leaked = qemu_pids_in(path)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"QEMU processes leaked: {leaked}"


def bios_domain(workdir: Path, **changes: object) -> Domain:
    """A 64 MiB TCG guest with no disk: it sits in SeaBIOS and ignores the ACPI power button."""
    fields: dict[str, object] = {
        "name": "bios-only",
        "uuid": uuid.UUID(int=42),
        "paths": RuntimePaths.under(workdir),
        "accel": Accelerator.TCG,
        "memory_mib": 64,
        "graphics": False,
    }
    return Domain(**{**fields, **changes})  # type: ignore[arg-type]


async def test_launch_runs_the_guest_and_records_the_run(workdir: Path) -> None:
    process = await launch(bios_domain(workdir), workdir=workdir)
    try:
        assert await (await process.qmp()).query_status() is VMRunState.RUNNING
        assert int(process.paths.pidfile.read_text()) == process.pid
        assert os.getsid(process.pid) == process.pid  # its own session: survives the agent
        assert json.loads((workdir / "qemu.argv.json").read_text())["argv"] == process.argv
        assert process.exit_status is None
    finally:
        await process.kill()


async def test_qemu_inherits_no_descriptor_of_the_agent(workdir: Path) -> None:
    """A descriptor the agent was given without close-on-exec (a shell's ``flock`` lock, say)
    must not stay open in a QEMU that outlives the agent."""
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        process = await launch(bios_domain(workdir), workdir=workdir)
        try:
            targets = {
                os.readlink(f"/proc/{process.pid}/fd/{fd}")
                for fd in os.listdir(f"/proc/{process.pid}/fd")
            }
            assert os.readlink(f"/proc/self/fd/{write_end}") not in targets
        finally:
            await process.kill()
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_adopt_reattaches_after_the_handle_is_dropped(workdir: Path) -> None:
    process = await launch(bios_domain(workdir), workdir=workdir)
    pid = process.pid
    await process.detach()
    del process
    adopted = await adopt(workdir)
    assert adopted is not None and adopted.pid == pid
    try:
        assert await (await adopted.qmp()).query_status() is VMRunState.RUNNING
    finally:
        status = await adopted.kill()
    assert status.signal == signal.SIGKILL
    assert not any(path.exists() for path in adopted.paths.sockets())
    assert await adopt(workdir) is None


async def test_qemu_outlives_the_agent_that_launched_it(workdir: Path) -> None:
    script = (
        "import asyncio, sys, uuid\n"
        "from pathlib import Path\n"
        "from vmo.engine.qemu import Accelerator, Domain, RuntimePaths, launch\n"
        "w = Path(sys.argv[1])\n"
        "d = Domain(name='orphan', uuid=uuid.UUID(int=5), paths=RuntimePaths.under(w),\n"
        "           accel=Accelerator.TCG, memory_mib=64, graphics=False)\n"
        "asyncio.run(launch(d, workdir=w))\n"
    )
    agent = subprocess.run(
        [sys.executable, "-c", script, str(workdir)], capture_output=True, timeout=30, check=False
    )
    assert agent.returncode == 0, agent.stderr.decode()
    adopted = await adopt(workdir)
    assert adopted is not None
    assert await (await adopted.qmp()).query_status() is VMRunState.RUNNING
    status = await adopted.kill()
    # Not our child: the exit code went to init, but the exit itself is seen.
    assert status.code is None
    assert adopted.exit_status == status


async def test_powerdown_escalates_when_the_guest_ignores_acpi(workdir: Path) -> None:
    process = await launch(bios_domain(workdir), workdir=workdir)
    started = time.monotonic()
    status = await process.powerdown(grace=0.5)
    assert time.monotonic() - started >= 0.5
    assert status.code == 0  # QEMU exits cleanly on SIGTERM...
    assert status.signal == signal.SIGTERM  # ...and says why in its log
    assert status.shutdown_reason == "host-signal"
    assert any("terminating on signal 15" in line for line in process.last_stderr_lines())


async def test_an_externally_killed_qemu_is_detected_with_its_last_words(workdir: Path) -> None:
    process = await launch(bios_domain(workdir), workdir=workdir)
    os.kill(process.pid, signal.SIGTERM)
    status = await process.wait_exit(timeout=10)
    assert status.signal == signal.SIGTERM
    lines = process.last_stderr_lines(n=5)
    assert 1 <= len(lines) <= 5
    assert "terminating on signal 15" in lines[-1]
    assert not process.paths.qmp.exists() and not process.paths.pidfile.exists()


async def test_wait_exit_times_out_while_qemu_runs(workdir: Path) -> None:
    process = await launch(bios_domain(workdir), workdir=workdir)
    try:
        with pytest.raises(TimeoutError):
            await process.wait_exit(timeout=0.1)
        assert process.exit_status is None
    finally:
        await process.kill()


async def test_a_failing_start_raises_with_qemu_stderr(workdir: Path) -> None:
    disk = Disk("root", workdir / "missing.qcow2", DiskFormat.QCOW2, cache=DiskCache.WRITEBACK)
    with pytest.raises(LaunchError) as caught:
        await launch(bios_domain(workdir, disks=(disk,)), workdir=workdir)
    assert any("missing.qcow2" in line for line in caught.value.stderr_lines)


async def test_a_second_launch_into_a_busy_workdir_is_refused(workdir: Path) -> None:
    process = await launch(bios_domain(workdir), workdir=workdir)
    try:
        with pytest.raises(ProcessError, match="already runs"):
            await launch(bios_domain(workdir), workdir=workdir)
    finally:
        await process.kill()


async def test_runtime_paths_outside_the_workdir_are_refused(tmp_path: Path, workdir: Path) -> None:
    outside = RuntimePaths.under(tmp_path / "elsewhere")
    with pytest.raises(WorkdirEscape):
        await launch(bios_domain(workdir, paths=outside), workdir=workdir)


async def test_adopt_finds_nothing_in_an_empty_workdir(tmp_path: Path) -> None:
    assert await adopt(tmp_path) is None


async def test_every_disk_bus_and_a_user_nic_are_accepted_by_qemu(workdir: Path) -> None:
    workdir.mkdir()
    images = []
    for name, fmt in (("a", "qcow2"), ("b", "raw"), ("c", "qcow2"), ("d", "raw")):
        path = workdir / f"{name}.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "8M"], check=True)
        images.append(path)
    # tmp_path may be tmpfs, which has no O_DIRECT: use a page-cache mode.
    wb = DiskCache.WRITEBACK
    disks = (
        Disk("root", images[0], DiskFormat.QCOW2, DiskBus.VIRTIO, boot_order=1, cache=wb),
        Disk("cd", images[1], DiskFormat.RAW, DiskBus.SATA, cdrom=True, readonly=True, cache=wb),
        Disk("data", images[2], DiskFormat.QCOW2, DiskBus.SCSI, serial="d,1", cache=wb),
        Disk("old", images[3], DiskFormat.RAW, DiskBus.SATA, cache=DiskCache.UNSAFE),
    )
    nic = Nic(
        "default",
        "52:54:00:00:00:01",
        UserBackend(hostfwds=(HostForward("tcp", "127.0.0.1", 0, 22),)),
    )
    process = await launch(
        bios_domain(workdir, disks=disks, nics=(nic,), rng=True), workdir=workdir
    )
    try:
        qmp = await process.qmp()
        devices = {block["qdev"] for block in await qmp.execute("query-block")}
        assert {f"/machine/peripheral/ua-{d.id}/virtio-backend" for d in disks[:1]} <= devices
        assert {"ua-cd", "ua-data", "ua-old"} <= devices
        with pytest.raises(QMPTimeout):  # the guest has no agent to answer
            await GuestAgentClient.connect(process.paths.guest_agent, timeout=0.3)
    finally:
        await process.kill()


def test_the_probe_guest_runs_under_tcg() -> None:
    """If this fails the probe itself is broken, and 'KVM does not work' would mean nothing."""
    result = probe_kvm(accel=Accelerator.TCG, timeout=10)
    assert result.works, result.detail


def test_detection_really_probes_and_picks_tcg_here(tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    assert detect_accelerator(cache, timeout=3) is Accelerator.TCG
    recorded = json.loads(cache.read_text())
    assert recorded["accelerator"] == "tcg"
    assert recorded["key"]["kernel"] == os.uname().release
    assert "QEMU emulator version" in recorded["key"]["qemuVersion"]


def test_detection_uses_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "accel.json"
    detect_accelerator(cache, timeout=3)
    recorded = json.loads(cache.read_text())
    recorded["accelerator"] = "kvm"  # a verdict only the cache can give on this machine
    cache.write_text(json.dumps(recorded))

    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("probed despite a valid cache")

    monkeypatch.setattr(accel_module, "probe_kvm", no_probe)
    assert detect_accelerator(cache) is Accelerator.KVM


def test_a_cache_for_another_qemu_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    key = {"qemu": "/usr/bin/qemu-system-x86_64", "qemuVersion": "QEMU 1.0", "kernel": "x"}
    cache.write_text(json.dumps({"key": key, "accelerator": "kvm"}))
    assert detect_accelerator(cache, timeout=3) is Accelerator.TCG


def test_use_emulation_forces_tcg_without_probing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("probed despite useEmulation")

    monkeypatch.setattr(accel_module, "probe_kvm", no_probe)
    assert detect_accelerator(tmp_path / "c.json", override=True) is Accelerator.TCG
    assert not (tmp_path / "c.json").exists()
