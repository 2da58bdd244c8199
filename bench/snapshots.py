"""Benchmark: volume snapshots, linked and full clones and restores in a node's pool.

Each volume is a thin qcow2 holding DATA_MIB of random data. Measured, median of RUNS:
- snapshot and linked clone of a 1 GiB and a 16 GiB volume: both must be copy-on-write, so each
  must take <= 100 ms and the 16 GiB figure must stay within 1.5x of the 1 GiB one;
- in-place restore (a fresh top layer on the snapshot) for both sizes;
- full clone throughput (an independent copy, ``qemu-img convert``) beside ``cp`` of the same
  snapshot file in the same run (a ratio: the machine is noisy).
- through the API (the embedded engine, a stopped VM with one DataVolume of each size):
  VirtualMachineSnapshot created -> readyToUse, VirtualMachineRestore created -> complete
  (the controllers' and node's round trips on top of the pool operations above).
Run: ``python bench/snapshots.py [--runs N] [--data-mib M] [--no-api]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from vmo.client import DATAVOLUME, VM, VMRESTORE, VMSNAPSHOT, Client
from vmo.engine.storage.pool import Pool
from vmo.testing.apiserver import ThreadedServer

GIB = 1 << 30
MIB = 1 << 20
COW_LIMIT_S = 0.100
COW_RATIO = 1.5
NS = "bench"


def fill(path: Path, mib: int) -> None:
    """Writes ``mib`` MiB of data (a byte pattern) at the start of the qcow2 at ``path``."""
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {mib}M", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


async def cow_figures(pool: Pool, size_gib: int, runs: int, data_mib: int) -> dict[str, float]:
    name = f"vol{size_gib}g"
    await pool.create_blank(NS, name, size_gib * GIB)
    fill(pool.top(NS, name), data_mib)
    snaps, clones, restores = [], [], []
    for i in range(runs):
        snaps.append(await timed(lambda i=i: pool.snapshot(NS, name, f"{name}-s{i}")))
        clones.append(
            await timed(
                lambda i=i: pool.volume_from_snapshot(
                    pool, (NS, f"{name}-s{i}"), NS, f"{name}-c{i}"
                )
            )
        )
        restores.append(await timed(lambda i=i: pool.restore(NS, name, f"{name}-s{i}")))
    return {
        "snapshot": statistics.median(snaps),
        "linked clone": statistics.median(clones),
        "restore": statistics.median(restores),
    }


async def full_clone(pool: Pool, data_mib: int) -> tuple[float, float]:
    """(full clone MB/s, cp MB/s) of the same snapshot (data_mib of data)."""
    await pool.create_blank(NS, "full", 4 * GIB)
    fill(pool.top(NS, "full"), data_mib)
    await pool.snapshot(NS, "full", "full-s")
    layer = pool.snapshot_path(NS, "full-s")
    subprocess.run(["sync"], check=True)
    clone_s = await timed(
        lambda: pool.volume_from_snapshot(pool, (NS, "full-s"), NS, "full-copy", full=True)
    )
    target = pool.root.parent / "cp-copy.qcow2"
    start = time.perf_counter()
    shutil.copyfile(layer, target)
    cp_s = time.perf_counter() - start
    target.unlink()
    return data_mib / clone_s, data_mib / cp_s


API_NS = "default"


def _dv(name: str, size: str) -> dict[str, object]:
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": API_NS},
        "spec": {
            "source": {"blank": {}},
            "storage": {"resources": {"requests": {"storage": size}}},
        },
    }


def _vm(name: str, dv: str) -> dict[str, object]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": API_NS},
        "spec": {
            "runStrategy": "Halted",
            "template": {
                "spec": {
                    "domain": {
                        "memory": {"guest": "64Mi"},
                        "devices": {"disks": [{"name": "data", "disk": {"bus": "virtio"}}]},
                    },
                    "volumes": [{"name": "data", "dataVolume": {"name": dv}}],
                }
            },
        },
    }


async def _until(
    client: Client, res: object, name: str, done: Callable[[dict[str, object]], bool]
) -> None:
    while True:
        obj = await client.find(res, name, API_NS)  # type: ignore[arg-type]
        if obj is not None and done(obj):
            return
        await asyncio.sleep(0.01)


async def api_figures(kubeconfig: Path, runs: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    async with Client.from_kubeconfig(kubeconfig) as client:
        for size in ("1Gi", "16Gi"):
            vm = f"vm-{size.lower()}"
            await client.create(DATAVOLUME, _dv(f"{vm}-data", size), API_NS)
            await _until(
                client,
                DATAVOLUME,
                f"{vm}-data",
                lambda o: (o.get("status") or {}).get("phase") == "Succeeded",
            )  # type: ignore[union-attr]
            await client.create(VM, _vm(vm, f"{vm}-data"), API_NS)
            snaps, restores = [], []
            for i in range(runs):
                snap = {
                    "apiVersion": "snapshot.kubevirt.io/v1beta1",
                    "kind": "VirtualMachineSnapshot",
                    "metadata": {"name": f"{vm}-s{i}", "namespace": API_NS},
                    "spec": {
                        "source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm}
                    },
                }
                start = time.perf_counter()
                await client.create(VMSNAPSHOT, snap, API_NS)
                await _until(
                    client,
                    VMSNAPSHOT,
                    f"{vm}-s{i}",
                    lambda o: bool((o.get("status") or {}).get("readyToUse")),
                )  # type: ignore[union-attr]
                snaps.append(time.perf_counter() - start)
                restore = {
                    "apiVersion": "snapshot.kubevirt.io/v1beta1",
                    "kind": "VirtualMachineRestore",
                    "metadata": {"name": f"{vm}-r{i}", "namespace": API_NS},
                    "spec": {
                        "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm},
                        "virtualMachineSnapshotName": f"{vm}-s{i}",
                    },
                }
                start = time.perf_counter()
                await client.create(VMRESTORE, restore, API_NS)
                await _until(
                    client,
                    VMRESTORE,
                    f"{vm}-r{i}",
                    lambda o: bool((o.get("status") or {}).get("complete")),
                )  # type: ignore[union-attr]
                restores.append(time.perf_counter() - start)
            out[size] = {
                "snapshot": statistics.median(snaps),
                "restore": statistics.median(restores),
            }
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data-mib", type=int, default=256)
    parser.add_argument("--no-api", action="store_true", help="skip the end-to-end figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vmo-bench-") as tmp:
        # one pool per size, so neither is measured among the other's files
        small = await cow_figures(Pool(Path(tmp) / "pool-1g"), 1, args.runs, args.data_mib)
        large = await cow_figures(Pool(Path(tmp) / "pool-16g"), 16, args.runs, args.data_mib)
        pool = Pool(Path(tmp) / "pool-full")
        print(f"copy-on-write operations, median of {args.runs}, {args.data_mib} MiB of data:")
        print(f"{'operation':<14}{'1 GiB ms':>10}{'16 GiB ms':>11}{'ratio':>8}  verdict")
        for op in ("snapshot", "linked clone", "restore"):
            a, b = small[op] * 1000, large[op] * 1000
            ratio = b / a
            ok = a <= COW_LIMIT_S * 1000 and b <= COW_LIMIT_S * 1000 and ratio <= COW_RATIO
            print(f"{op:<14}{a:>10.1f}{b:>11.1f}{ratio:>8.2f}  {verdict(ok)}"
                  f" (<= {COW_LIMIT_S * 1000:.0f} ms, ratio <= {COW_RATIO})")  # fmt: skip
        clone_mbs, cp_mbs = await full_clone(pool, args.data_mib * 2)
        print(
            f"full clone: {clone_mbs:.0f} MB/s beside cp of the same file {cp_mbs:.0f} MB/s "
            f"(ratio {clone_mbs / cp_mbs:.2f})"
        )
        if args.no_api:
            return
        server = ThreadedServer(Path(tmp) / "home", engine=True).start()
        try:
            figures = await api_figures(server.kubeconfig, args.runs)
        finally:
            server.stop()
        print(f"through the API (embedded engine, stopped VM), median of {args.runs}:")
        print(f"{'operation':<14}{'1 GiB ms':>10}{'16 GiB ms':>11}{'ratio':>8}")
        for op in ("snapshot", "restore"):
            a, b = figures["1Gi"][op] * 1000, figures["16Gi"][op] * 1000
            print(f"{op:<14}{a:>10.0f}{b:>11.0f}{b / a:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
