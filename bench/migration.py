"""Benchmark: live migration through VMO (VirtualMachineInstanceMigration) beside the same guest
migrated by hand over raw QMP.

A two-node embedded cluster (``ThreadedServer(engine=True, nodes=2)``) runs the test guest from a
ReadWriteMany DataVolume (shared pool: memory only moves). Each VMIM is timed from its create
call to phase Succeeded (polled every 20 ms), with QEMU's own figures from the source agent's
``MigrationResult``. The floor is the same ``Domain`` (``domain_from_vmi`` of the same VMI spec,
same cloud-init seed) launched as two QEMU processes and migrated with ``migrate`` /
``query-migrate``. Busy guests rewrite a 64 MiB file in /tmp without pause; they migrate with
auto-converge and a completion timeout. One extra VMO row moves a node-local disk too.
Run: ``python bench/migration.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmo.client import DATAVOLUME, VM, VMI, VMIM, Client
from vmo.engine.cloudinit import seed_content, write_seed
from vmo.engine.qemu import QemuProcess, RuntimePaths, launch
from vmo.engine.qemu.accel import Accelerator
from vmo.engine.qemu.domain import DiskFormat, Domain
from vmo.engine.qemu.migration import MigrationResult
from vmo.engine.qemu.vmi import LocalVolume, NodeContext, domain_from_vmi
from vmo.engine.virtcontroller.migrationconfig import MIGRATIONPOLICY
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import boot_vm, http_datavolume
from vmo.testing.guest import build_guest, default_cache_dir
from vmo.testing.processes import kill_qemus_under

NS = "virtual-machines"
MIB = 1 << 20
GIB = 1 << 30
BANDWIDTH = "1Gi"
BANDWIDTH_BYTES = GIB
DOWNTIME_LIMIT_MS = 300
# A busy guest may never converge: give up after this long (QEMU's completion timeout).
BUSY_TIMEOUT_S = 25
POLL_S = 0.02
# The guest boots in 2-4 s under TCG; the busy loop starts from its user-data right after.
SETTLE_S = 8.0
BOOT_TIMEOUT_S = 180.0
MIGRATION_TIMEOUT_S = 120.0
TARGET_DOWNTIME_MS = 300
STRETCH_DOWNTIME_MS = 100
TARGET_OVERHEAD_S = 1.0
TARGET_IDLE_FACTOR = 1.2
DISK_SIZE = "48Mi"  # the image's size: a copied disk costs its whole virtual size

IDLE_USER_DATA = "#cloud-config\n"
BUSY_USER_DATA = """#!/bin/sh
# rewrite 64 MiB of tmpfs with non-zero data, again and again
(while :; do
  dd if=/dev/urandom of=/tmp/dirty bs=1M count=64 conv=notrunc 2>/dev/null
done) >/dev/null 2>&1 &
"""


@dataclass(frozen=True)
class Case:
    memory_mib: int
    busy: bool
    shared: bool = True

    @property
    def name(self) -> str:
        size = "1GiB" if self.memory_mib == 1024 else f"{self.memory_mib}MiB"
        load = "busy" if self.busy else "idle"
        disk = "" if self.shared else " local-disk"
        return f"{size} {load}{disk}"

    @property
    def slug(self) -> str:
        load = "busy" if self.busy else "idle"
        return f"m{self.memory_mib}-{load}{'' if self.shared else '-local'}"

    @property
    def completion_timeout_per_gib(self) -> int:
        """KubeVirt's knob for a ``BUSY_TIMEOUT_S`` timeout (memory only: the disk is shared)."""
        if not self.busy:
            return 150
        return max(1, round(BUSY_TIMEOUT_S * 1024 / self.memory_mib))


@dataclass
class VmoSample:
    wall_s: float
    phase: str
    result: MigrationResult | None


@dataclass
class RawSample:
    completed: bool
    status: str
    total_ms: int | None
    downtime_ms: int | None
    ram_bytes: int


@dataclass
class Row:
    case: Case
    vmo: list[VmoSample] = field(default_factory=list)
    raw: list[RawSample] = field(default_factory=list)


# --- the VMO side -----------------------------------------------------------------------------


def policy(case: Case) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selectors": {"virtualMachineInstanceSelector": {"bench-case": case.slug}},
        "bandwidthPerMigration": BANDWIDTH,
        "maxDowntimeMs": DOWNTIME_LIMIT_MS,
        "completionTimeoutPerGiB": case.completion_timeout_per_gib,
        "allowAutoConverge": case.busy,
    }
    return {
        "apiVersion": "migrations.kubevirt.io/v1alpha1",
        "kind": "MigrationPolicy",
        "metadata": {"name": f"bench-{case.slug}"},
        "spec": spec,
    }


def datavolume(case: Case, image_url: str) -> dict[str, Any]:
    dv = http_datavolume(f"{case.slug}-root", image_url, namespace=NS, size=DISK_SIZE)
    if case.shared:
        dv["spec"]["storage"]["accessModes"] = ["ReadWriteMany"]
    return dv


def vm_manifest(case: Case) -> dict[str, Any]:
    manifest = boot_vm(
        case.slug,
        namespace=NS,
        disk=f"{case.slug}-root",
        interfaces=[{"name": "default", "masquerade": {}}],
        networks=[{"name": "default", "pod": {}}],
        labels={"bench-case": case.slug},
        grace=0,
        cloud_init={"userData": BUSY_USER_DATA if case.busy else IDLE_USER_DATA},
    )
    manifest["spec"]["template"]["spec"]["domain"]["memory"]["guest"] = f"{case.memory_mib}Mi"
    return manifest


async def wait_vmi_running(client: Client, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        vmi = await client.find(VMI, name, NS)
        if vmi and vmi.get("status", {}).get("phase") == "Running":
            return vmi
        await asyncio.sleep(0.1)
    raise TimeoutError(f"VMI {NS}/{name} not Running within {BOOT_TIMEOUT_S:.0f} s")


async def migrate_vmo(client: Client, server: ThreadedServer, name: str) -> VmoSample:
    body = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": f"{name}-mig-", "namespace": NS},
        "spec": {"vmiName": name},
    }
    began = time.perf_counter()
    created = await client.create(VMIM, body, NS)
    phase = ""
    deadline = time.monotonic() + MIGRATION_TIMEOUT_S
    while phase not in ("Succeeded", "Failed"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"VMIM {created['metadata']['name']} still {phase!r}")
        await asyncio.sleep(POLL_S)
        found = await client.get(VMIM, created["metadata"]["name"], NS)
        phase = found.get("status", {}).get("phase", "")
    wall = time.perf_counter() - began
    return VmoSample(wall, phase, await agent_result(server, created["metadata"]["uid"]))


async def agent_result(server: ThreadedServer, uid: str) -> MigrationResult | None:
    """The source agent's record of the migration (written just before the VMI says done)."""
    assert server.running_engine is not None
    for _ in range(100):
        for node in server.running_engine.node_services:
            if node.agent is not None and node.agent.migrations is not None:
                found = node.agent.migrations.results.get(uid)
                if found is not None:
                    return found
        await asyncio.sleep(POLL_S)
    return None


async def remove_vm(client: Client, case: Case) -> None:
    with contextlib.suppress(Exception):
        await client.delete(VM, case.slug, NS)
    for _ in range(600):
        if await client.find(VMI, case.slug, NS) is None:
            break
        await asyncio.sleep(0.1)
    with contextlib.suppress(Exception):
        await client.delete(DATAVOLUME, f"{case.slug}-root", NS)


async def vmo_case(
    client: Client, server: ThreadedServer, case: Case, image_url: str, repeats: int
) -> tuple[list[VmoSample], dict[str, Any]]:
    """Boots the case's VM, migrates it ``repeats`` times (back and forth); returns the
    samples and the VMI as it ran (its spec is the floor's)."""
    await client.create(MIGRATIONPOLICY, policy(case))
    await client.create(DATAVOLUME, datavolume(case, image_url), NS)
    await client.create(VM, vm_manifest(case), NS)
    try:
        vmi = await wait_vmi_running(client, case.slug)
        await asyncio.sleep(SETTLE_S)
        samples = []
        for _ in range(repeats):
            samples.append(await migrate_vmo(client, server, case.slug))
            await asyncio.sleep(1.0)  # let the target settle before moving it again
        return samples, vmi
    finally:
        await remove_vm(client, case)
        with contextlib.suppress(Exception):
            await client.delete(MIGRATIONPOLICY, f"bench-{case.slug}")


# --- the floor: two QEMUs and raw QMP ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def raw_domain(vmi: dict[str, Any], image: Path, workdir: Path) -> Domain:
    """The VMI's own Domain, on an overlay of the guest image and the same NoCloud seed."""
    workdir.mkdir(parents=True)
    disk = workdir / "root.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(disk)],
        check=True,
        timeout=60,
    )
    content = await seed_content(vmi, _no_secrets)
    assert content is not None, "the VMI has a cloudInitNoCloud volume"
    seed = write_seed(content, workdir / "seed.iso")
    volumes = {
        "root": LocalVolume(disk, DiskFormat.QCOW2, shared=True),
        "cloudinit": LocalVolume(seed, DiskFormat.RAW, readonly=True),
    }
    ctx = NodeContext(workdir=workdir / "vm0", accel=Accelerator.TCG, volumes=volumes)
    return domain_from_vmi(vmi, ctx=ctx)


async def _no_secrets(namespace: str, name: str) -> dict[str, Any] | None:
    return None


class RawPair:
    """The guest in a QEMU of its own, and the destinations made to move it."""

    def __init__(self, domain: Domain, root: Path, busy: bool, timeout_s: float) -> None:
        self.domain, self.root, self.busy, self.timeout_s = domain, root, busy, timeout_s
        self.made: list[QemuProcess] = []
        self.source: QemuProcess | None = None
        self._n = 0

    async def _launch(self, incoming: str | None) -> QemuProcess:
        workdir = self.root / f"vm{self._n}"
        self._n += 1
        domain = dataclasses.replace(
            self.domain, paths=RuntimePaths.under(workdir), incoming=incoming
        )
        process = await launch(domain, workdir=workdir, startup_timeout=30)
        self.made.append(process)
        return process

    async def boot(self) -> None:
        self.source = await self._launch(None)

    async def migrate(self) -> RawSample:
        assert self.source is not None
        target = await self._launch("defer")
        uri = f"tcp:127.0.0.1:{free_port()}"
        dst, src = await target.qmp(), await self.source.qmp()
        await dst.execute("migrate-set-capabilities", {"capabilities": caps(events=True)})
        await dst.execute("migrate-incoming", {"uri": uri})
        await src.execute(
            "migrate-set-capabilities",
            {"capabilities": caps(events=True, **{"auto-converge": self.busy})},
        )
        await src.execute(
            "migrate-set-parameters",
            {"max-bandwidth": BANDWIDTH_BYTES, "downtime-limit": DOWNTIME_LIMIT_MS},
        )
        await src.execute("migrate", {"uri": uri})
        info = await self._poll(src)
        sample = raw_sample(info)
        if sample.completed:
            await self.source.kill()
            self.source = target
        else:
            await target.kill()
        return sample

    async def _poll(self, src: Any) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            info: dict[str, Any] = await src.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                await src.execute("migrate_cancel")
                while info.get("status") not in ("failed", "cancelled"):
                    await asyncio.sleep(POLL_S)
                    info = await src.execute("query-migrate")
                return {**info, "status": "timed out (cancelled)"}
            await asyncio.sleep(POLL_S)

    async def stop(self) -> None:
        for process in self.made:
            with contextlib.suppress(Exception):
                await process.kill()


def caps(**states: bool) -> list[dict[str, Any]]:
    return [{"capability": name, "state": on} for name, on in states.items()]


def raw_sample(info: dict[str, Any]) -> RawSample:
    ram = info.get("ram") or {}
    return RawSample(
        completed=info.get("status") == "completed",
        status=str(info.get("status")),
        total_ms=info.get("total-time"),
        downtime_ms=info.get("downtime"),
        ram_bytes=int(ram.get("transferred", 0)),
    )


async def raw_case(
    case: Case, vmi: dict[str, Any], image: Path, root: Path, repeats: int
) -> list[RawSample]:
    timeout = BUSY_TIMEOUT_S if case.busy else MIGRATION_TIMEOUT_S
    pair = RawPair(await raw_domain(vmi, image, root), root, case.busy, timeout)
    try:
        await pair.boot()
        await asyncio.sleep(SETTLE_S)
        samples = []
        for _ in range(repeats):
            samples.append(await pair.migrate())
            await asyncio.sleep(1.0)
        return samples
    finally:
        await pair.stop()


# --- the report -------------------------------------------------------------------------------


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def verdicts(row: Row, wall: float | None, raw_total: float | None) -> str:
    results = [s.result for s in row.vmo if s.result is not None]
    downs = [r.downtime_ms for r in results if r.downtime_ms is not None]
    notes = []
    if downs:
        worst = max(downs)
        mark = "OK" if worst <= TARGET_DOWNTIME_MS else "MISSED"
        stretch = " stretch OK" if worst <= STRETCH_DOWNTIME_MS else ""
        notes.append(f"downtime {mark}{stretch}")
    if wall is not None and raw_total is not None:
        over = wall - raw_total / 1000
        notes.append(f"overhead {'OK' if over <= TARGET_OVERHEAD_S else 'MISSED'}")
    if not row.case.busy and results:
        limit_ms = TARGET_IDLE_FACTOR * row.case.memory_mib * MIB / BANDWIDTH_BYTES * 1000
        totals = [r.qemu_total_ms for r in results if r.qemu_total_ms is not None]
        if totals:
            notes.append(f"idle total {'OK' if max(totals) <= limit_ms else 'MISSED'}")
    return ", ".join(notes)


def outcome(row: Row) -> str:
    """Mode and completion of each VMO run, then each raw run."""
    vmo = [
        f"{s.result.mode}{'' if s.result.completed else ' NOT completed'}"
        if s.result is not None
        else s.phase
        for s in row.vmo
    ]
    raw = [s.status for s in row.raw]
    return f"VMO {'/'.join(vmo) or '-'}; raw {'/'.join(raw) or '-'}"


def report(rows: list[Row], repeats: int) -> None:
    print()
    print("Live migration benchmark (TCG, 2 noisy cores: expect spread between runs)")
    print(
        f"bandwidth {BANDWIDTH}/s for VMO (MigrationPolicy) and raw (max-bandwidth); downtime "
        f"limit {DOWNTIME_LIMIT_MS} ms; shared (RWX) disk unless 'local-disk'; busy guests: "
        f"auto-converge, completion timeout {BUSY_TIMEOUT_S} s"
    )
    print(f"each figure is the median of {repeats} run(s); downtime shown as median (max)")
    header = (
        f"{'case':<22}{'VMO wall s':>11}{'VMO QEMU ms':>12}{'VMO down ms':>14}{'VMO MB':>8}"
        f"{'raw ms':>8}{'raw down ms':>14}{'raw MB':>8}{'overhead s':>11}   verdicts"
    )
    print(header)
    for row in rows:
        done = [s for s in row.vmo if s.result is not None and s.result.completed]
        wall = med([s.wall_s for s in done])
        q_total = med(
            [float(s.result.qemu_total_ms) for s in done if s.result and s.result.qemu_total_ms]
        )
        downs = [
            float(s.result.downtime_ms)
            for s in done
            if s.result and s.result.downtime_ms is not None
        ]
        vmo_mb = med([(s.result.ram_bytes + s.result.disk_bytes) / 1e6 for s in done if s.result])
        raw_ok = [s for s in row.raw if s.completed]
        raw_total = med([float(s.total_ms) for s in raw_ok if s.total_ms is not None])
        raw_downs = [float(s.downtime_ms) for s in raw_ok if s.downtime_ms is not None]
        raw_mb = med([s.ram_bytes / 1e6 for s in raw_ok])
        over = None if wall is None or raw_total is None else wall - raw_total / 1000
        print(
            f"{row.case.name:<22}{fmt(wall, '.2f'):>11}{fmt(q_total):>12}"
            f"{downtime_cell(downs):>14}{fmt(vmo_mb):>8}{fmt(raw_total):>8}"
            f"{downtime_cell(raw_downs):>14}{fmt(raw_mb):>8}{fmt(over, '+.2f'):>11}   "
            f"{verdicts(row, wall, raw_total)}"
        )
        print(f"{'':<22}  mode/outcome: {outcome(row)}")
    print(
        f"targets: downtime <= {TARGET_DOWNTIME_MS} ms (stretch {STRETCH_DOWNTIME_MS}); "
        f"overhead (VMO wall - raw total) <= {TARGET_OVERHEAD_S:g} s; idle QEMU total <= "
        f"{TARGET_IDLE_FACTOR:g} x RAM / bandwidth (256 MiB: "
        f"{TARGET_IDLE_FACTOR * 256 * MIB / BANDWIDTH_BYTES * 1000:.0f} ms, 1 GiB: "
        f"{TARGET_IDLE_FACTOR * 1000:.0f} ms); '-' = no completed run"
    )


def downtime_cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({max(values):.0f})"


# --- running it -------------------------------------------------------------------------------


def cases(quick: bool) -> list[Case]:
    sizes = [256] if quick else [256, 1024]
    found = [Case(size, busy) for size in sizes for busy in (False, True)]
    return [*found, Case(256, False, shared=False)]


async def run(
    server: ThreadedServer, image: Path, scratch: Path, quick: bool
) -> tuple[list[Row], int]:
    repeats = 1 if quick else 2
    rows = []
    async with Client.from_kubeconfig(server.kubeconfig) as client:
        for case in cases(quick):
            began = time.monotonic()
            samples, vmi = await vmo_case(client, server, case, image_url(server), repeats)
            row = Row(case, vmo=samples)
            if case.shared:
                row.raw = await raw_case(case, vmi, image, scratch / case.slug, repeats)
            print(f"  {case.name}: done in {time.monotonic() - began:.0f} s", flush=True)
            rows.append(row)
    return rows, repeats


def image_url(server: ThreadedServer) -> str:
    return f"file://{server.home / 'images' / 'disk.qcow2'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="256 MiB only, one run per case")
    args = parser.parse_args()
    guest = build_guest(default_cache_dir())
    tmp = Path(tempfile.mkdtemp(prefix="vmo-bench-mig-"))
    server: ThreadedServer | None = None
    try:
        home = tmp / "home"
        (home / "images").mkdir(parents=True)
        shutil.copy(guest.disk_qcow2, home / "images" / "disk.qcow2")
        print("starting a 2-node embedded cluster ...", flush=True)
        server = ThreadedServer(home, engine=True, nodes=2).start()
        rows, repeats = asyncio.run(run(server, guest.disk_qcow2, tmp / "raw", args.quick))
        report(rows, repeats)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
        kill_qemus_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
