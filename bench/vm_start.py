"""Benchmark: VirtualMachine created -> VMI Running, beside spawning the same QEMU by hand.

Runs `vmo up --nodes 0` (API server and controllers) and one `vmo node run` agent as separate
processes, creates VMs through the API and times each until its VMI reports Running (QEMU is up
and answering QMP, as virt-handler reports). The floor is the same QEMU command line, taken from
the agent's own manifest, spawned by hand until QMP says ``running``. Prints p50/p95 for one VM
at a time and for ten created at once, and the agent's RSS with twenty VMs running.
Run: ``python bench/vm_start.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmo.client import NODE, VM, VMI, Client

NS = "virtual-machines"
TARGET_P95 = 1.0
TARGET_OVERHEAD = 1.5
TARGET_RSS_MB = 150.0


def vm(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "domain": {
                        "memory": {"guest": "64Mi"},
                        "devices": {"interfaces": [{"name": "default", "masquerade": {}}]},
                    },
                    "networks": [{"name": "default", "pod": {}}],
                }
            },
        },
    }


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)


async def wait_running(
    client: Client, names: set[str], started: dict[str, float]
) -> dict[str, float]:
    """Seconds from each VM's create call to its VMI phase Running."""
    done: dict[str, float] = {}
    async for etype, vmi in client.watch(VMI, NS, timeout=300):
        if etype == "BOOKMARK":
            continue
        name = vmi["metadata"]["name"]
        if name in names and name not in done and vmi.get("status", {}).get("phase") == "Running":
            done[name] = time.perf_counter() - started[name]
            if len(done) == len(names):
                break
    return done


async def create_batch(client: Client, names: list[str]) -> dict[str, float]:
    started: dict[str, float] = {}
    watcher = asyncio.create_task(wait_running(client, set(names), started))
    await asyncio.sleep(0.05)
    for name in names:
        started[name] = time.perf_counter()
    await asyncio.gather(*(client.create(VM, vm(n)) for n in names))
    return await asyncio.wait_for(watcher, 300)


async def delete_all(client: Client) -> None:
    vms, _ = await client.list(VM, NS)
    for obj in vms:
        await client.delete(VM, obj["metadata"]["name"], NS)
    for _ in range(600):
        items, _ = await client.list(VMI, NS)
        if not items:
            return
        await asyncio.sleep(0.1)


async def floor_spawn(manifest: Path, scratch: Path) -> float:
    """The agent's QEMU argv, pointed at a fresh directory, spawned to QMP ``running``."""
    from vmo.engine.qemu.errors import QemuError
    from vmo.engine.qemu.qmp import QMPClient

    argv: list[str] = json.loads(manifest.read_text())["argv"]
    old = str(manifest.parent)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    argv = [a.replace(old, str(scratch)) for a in argv]
    qmp = scratch / "qmp.sock"
    began = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while True:
            try:
                client = await QMPClient.connect(qmp)
                break
            except QemuError:
                await asyncio.sleep(0.002)
        while (await client.execute("query-status"))["status"] != "running":
            await asyncio.sleep(0.002)
        took = time.perf_counter() - began
        await client.disconnect()
        return took
    finally:
        proc.kill()
        proc.wait()


async def run(home: Path, samples: int) -> None:
    vmo = [sys.executable, "-m", "vmo.cli.main", "--home", str(home)]
    server = start([*vmo, "up", "--port", "0", "--nodes", "0"], home.parent / "server.log")
    try:
        for _ in range(300):
            if (home / "engine.kubeconfig").exists():
                break
            await asyncio.sleep(0.1)
        agent = start([*vmo, "node", "run", "--name", "node-1"], home.parent / "agent.log")
        try:
            await measure(home, agent, samples)
        finally:
            agent.terminate()
            agent.wait(30)
    finally:
        server.terminate()
        server.wait(30)


async def measure(home: Path, agent: subprocess.Popen[bytes], samples: int) -> None:
    async with Client.from_kubeconfig(home / "admin.kubeconfig") as client:
        for _ in range(300):
            if await client.find(NODE, "node-1"):
                break
            await asyncio.sleep(0.1)
        await create_batch(client, ["warmup"])
        manifest = next((home / "nodes" / "node-1" / "vms").glob("warmup-*/qemu.argv.json"))
        floors = [await floor_spawn(manifest, home.parent / "floor") for _ in range(samples)]
        batch_floors = list(
            await asyncio.gather(
                *(floor_spawn(manifest, home.parent / f"floor{i}") for i in range(10))
            )
        )
        await delete_all(client)
        singles: list[float] = []
        for i in range(samples):
            singles += (await create_batch(client, [f"one-{i}"])).values()
            await delete_all(client)
        batch = list((await create_batch(client, [f"ten-{i}" for i in range(10)])).values())
        await create_batch(client, [f"more-{i}" for i in range(10)])
        await asyncio.sleep(2)
        rss = rss_mb(agent.pid)
        await delete_all(client)
    report(floors, batch_floors, singles, batch, rss)


def report(
    floors: list[float],
    batch_floors: list[float],
    singles: list[float],
    batch: list[float],
    rss: float,
) -> None:
    print(
        "VM start benchmark (TCG; seconds): create VM -> VMI Running, beside QEMU spawned by hand"
    )
    print("(the floor for 10 at once is 10 QEMUs spawned at once)")
    print(f"{'figure':<26}{'p50':>8}{'p95':>8}   floor p50/p95   ratio p50   target")
    for label, values, floor in (
        ("1 VM at a time", singles, floors),
        ("10 VMs created at once", batch, batch_floors),
    ):
        floor50, floor95 = pct(floor, 50), pct(floor, 95)
        p50, p95 = pct(values, 50), pct(values, 95)
        verdict = "OK" if p95 <= TARGET_P95 else "MISSED"
        ratio = p50 / floor50
        overhead = "OK" if ratio <= TARGET_OVERHEAD else "MISSED"
        print(
            f"{label:<26}{p50:8.3f}{p95:8.3f}   {floor50:6.3f}/{floor95:6.3f}   {ratio:8.2f}x   "
            f"p95<={TARGET_P95:g}s {verdict}; overhead<={TARGET_OVERHEAD:g}x {overhead}"
        )
    verdict = "OK" if rss <= TARGET_RSS_MB else "MISSED"
    print(f"{'agent RSS with 20 VMs':<26}{rss:8.1f} MB   target <= {TARGET_RSS_MB:g} MB {verdict}")
    mean = statistics.mean(singles)
    print(
        f"(samples: {len(singles)} single, {len(batch)} batch, {len(floors)} floor; mean single {mean:.3f}s)"
    )


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory(prefix="vmo-bench-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(home, samples))


if __name__ == "__main__":
    main()
