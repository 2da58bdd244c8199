"""Benchmark of the embedded API server with 10,000 VirtualMachines stored.

Prints create/update/get latency (p50, p99), full-list time and watch delivery, at 1 and 16
concurrent clients, each beside the same operation done directly on SQLite in the same run
(the floor), and the server's resident memory. Run: ``make bench`` (or ``python bench/apiserver.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

NS = "virtual-machines"
VM_PATH = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines"
TARGETS = {
    "mutating p99 ms": 25.0,
    "get p99 ms": 10.0,
    "watch p99 ms": 50.0,
    "list s": 1.0,
    "rss MB": 300.0,
}


def vm(name: str, generation: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"app": "bench", "gen": str(generation)}},
        "spec": {
            "runStrategy": "Halted",
            "template": {
                "metadata": {"labels": {"app": "bench"}},
                "spec": {
                    "domain": {
                        "cpu": {"cores": 1},
                        "memory": {"guest": "256Mi"},
                        "devices": {
                            "disks": [{"name": "root", "disk": {"bus": "virtio"}}],
                            "interfaces": [{"name": "default", "masquerade": {}}],
                        },
                    },
                    "networks": [{"name": "default", "pod": {}}],
                    "volumes": [
                        {"name": "root", "persistentVolumeClaim": {"claimName": f"{name}-root"}}
                    ],
                },
            },
        },
    }


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- the server under test ---------------------------------------------------------------------


class Server:
    def __init__(self, home: Path) -> None:
        self.home = home
        argv = [
            sys.executable,
            "-m",
            "vmo.cli.main",
            "--home",
            str(home),
            "up",
            "--port",
            "0",
            "--no-engine",
        ]
        with open(home / "log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while not (home / "apiserver.url").exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"server did not start; see {home / 'log'}")
            time.sleep(0.05)
        self.url = (home / "apiserver.url").read_text().strip()
        config = yaml.safe_load((home / "admin.kubeconfig").read_text())
        self.token = config["users"][0]["user"]["token"]
        self.ssl = ssl.create_default_context(cafile=str(home / "pki" / "ca.crt"))

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


async def timed_ops(
    session: aiohttp.ClientSession,
    ops: list[Callable[[aiohttp.ClientSession], Awaitable[None]]],
    clients: int,
) -> list[float]:
    latencies: list[float] = []
    queue = list(reversed(ops))

    async def worker() -> None:
        while queue:
            op = queue.pop()
            start = time.perf_counter()
            await op(session)
            latencies.append((time.perf_counter() - start) * 1000)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies


def request(
    method: str, path: str, body: Any = None, expect: int = 200
) -> Callable[[aiohttp.ClientSession], Awaitable[None]]:
    data = json.dumps(body).encode() if body is not None else None

    async def run(session: aiohttp.ClientSession) -> None:
        async with session.request(
            method, path, data=data, headers={"Content-Type": "application/json"}
        ) as resp:
            await resp.read()
            if resp.status != expect:
                raise RuntimeError(f"{method} {path}: {resp.status}")

    return run


async def api_phase(server: Server, total: int, small: int) -> dict[str, float]:
    out: dict[str, float] = {}
    connector = aiohttp.TCPConnector(ssl=server.ssl, limit=64)
    headers = {"Authorization": f"Bearer {server.token}"}
    async with aiohttp.ClientSession(server.url, connector=connector, headers=headers) as s:
        names = [f"vm-{i:05d}" for i in range(total)]
        one = await timed_ops(s, [request("POST", VM_PATH, vm(n), 201) for n in names[:small]], 1)
        many = await timed_ops(s, [request("POST", VM_PATH, vm(n), 201) for n in names[small:]], 16)
        out |= {"create p50 c1": pct(one, 50), "create p99 c1": pct(one, 99)}
        out |= {"create p50 c16": pct(many, 50), "create p99 c16": pct(many, 99)}
        merge = "application/merge-patch+json"

        def update(name: str, gen: int) -> Callable[[aiohttp.ClientSession], Awaitable[None]]:
            body = json.dumps({"metadata": {"labels": {"gen": str(gen)}}}).encode()

            async def run(session: aiohttp.ClientSession) -> None:
                async with session.patch(
                    f"{VM_PATH}/{name}", data=body, headers={"Content-Type": merge}
                ) as resp:
                    await resp.read()
                    assert resp.status == 200

            return run

        one = await timed_ops(s, [update(n, 1) for n in names[:small]], 1)
        many = await timed_ops(s, [update(n, 2) for n in names[: small * 4]], 16)
        out |= {"update p50 c1": pct(one, 50), "update p99 c1": pct(one, 99)}
        out |= {"update p50 c16": pct(many, 50), "update p99 c16": pct(many, 99)}
        one = await timed_ops(s, [request("GET", f"{VM_PATH}/{n}") for n in names[:small]], 1)
        many = await timed_ops(
            s, [request("GET", f"{VM_PATH}/{n}") for n in names[: small * 4]], 16
        )
        out |= {"get p50 c1": pct(one, 50), "get p99 c1": pct(one, 99)}
        out |= {"get p50 c16": pct(many, 50), "get p99 c16": pct(many, 99)}
        lists = []
        for _ in range(5):
            start = time.perf_counter()
            async with s.get(VM_PATH) as resp:
                body = await resp.json()
            lists.append(time.perf_counter() - start)
            assert len(body["items"]) == total
        out["list s"] = statistics.median(lists)
        for watchers in (1, 16):
            delays = await watch_delivery(s, names[:small], watchers)
            out[f"watch p50 c{watchers}"] = pct(delays, 50)
            out[f"watch p99 c{watchers}"] = pct(delays, 99)
    out["rss MB"] = server.rss_mb()
    return out


async def watch_delivery(s: aiohttp.ClientSession, names: list[str], watchers: int) -> list[float]:
    """ms from sending a write to each watcher receiving its event."""
    async with s.get(VM_PATH, params={"limit": "1"}) as resp:
        rv = (await resp.json())["metadata"]["resourceVersion"]
    sent: dict[str, float] = {}
    delays: list[float] = []
    done = asyncio.Event()
    expected = len(names) * watchers
    marker = f"w{watchers}"

    async def watch() -> None:
        params = {"watch": "true", "resourceVersion": rv, "timeoutSeconds": "120"}
        async with s.get(VM_PATH, params=params, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            async for line in resp.content:
                event = json.loads(line)
                md = event["object"]["metadata"]
                if md.get("labels", {}).get("gen") == marker:
                    delays.append((time.perf_counter() - sent[md["name"]]) * 1000)
                    if len(delays) == expected:
                        done.set()
                        return

    tasks = [asyncio.create_task(watch()) for _ in range(watchers)]
    await asyncio.sleep(0.5)
    body = json.dumps({"metadata": {"labels": {"gen": marker}}}).encode()
    for name in names:
        sent[name] = time.perf_counter()
        async with s.patch(
            f"{VM_PATH}/{name}", data=body, headers={"Content-Type": "application/merge-patch+json"}
        ) as resp:
            await resp.read()
    await asyncio.wait_for(done.wait(), 60)
    for t in tasks:
        t.cancel()
    return delays


# --- the floor: the same operations straight on SQLite ------------------------------------------


def sqlite_phase(path: Path, total: int, small: int) -> dict[str, float]:
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute(
        "CREATE TABLE objects (key TEXT PRIMARY KEY, rv INTEGER, data BLOB) WITHOUT ROWID"
    )
    setup.close()
    names = [f"vm-{i:05d}" for i in range(total)]
    rv = iter(range(1, 10**9))
    lock = threading.Lock()

    def connect() -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def run(
        op: Callable[[sqlite3.Connection, str], None], items: list[str], threads: int
    ) -> list[float]:
        latencies: list[float] = []
        queue = list(reversed(items))

        def worker() -> None:
            db = connect()
            while True:
                with lock:
                    if not queue:
                        break
                    item = queue.pop()
                start = time.perf_counter()
                op(db, item)
                latencies.append((time.perf_counter() - start) * 1000)
            db.close()

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return latencies

    def create(db: sqlite3.Connection, name: str) -> None:
        db.execute(
            "INSERT INTO objects VALUES (?, ?, ?)", (name, next(rv), json.dumps(vm(name)).encode())
        )

    def update(db: sqlite3.Connection, name: str) -> None:
        db.execute("BEGIN IMMEDIATE")
        (data,) = db.execute("SELECT data FROM objects WHERE key=?", (name,)).fetchone()
        obj = json.loads(data)
        obj["metadata"]["labels"]["gen"] = "x"
        db.execute(
            "UPDATE objects SET data=?, rv=? WHERE key=?",
            (json.dumps(obj).encode(), next(rv), name),
        )
        db.execute("COMMIT")

    def get(db: sqlite3.Connection, name: str) -> None:
        json.loads(db.execute("SELECT data FROM objects WHERE key=?", (name,)).fetchone()[0])

    out: dict[str, float] = {}
    for label, op in (("create", create), ("update", update), ("get", get)):
        first = names[:small]
        rest = names[small:] if label == "create" else names[: small * 4]
        one, many = run(op, first, 1), run(op, rest, 16)
        out |= {f"{label} p50 c1": pct(one, 50), f"{label} p99 c1": pct(one, 99)}
        out |= {f"{label} p50 c16": pct(many, 50), f"{label} p99 c16": pct(many, 99)}
    db = connect()
    lists = []
    for _ in range(5):
        start = time.perf_counter()
        rows = db.execute("SELECT data FROM objects ORDER BY key").fetchall()
        lists.append(time.perf_counter() - start)
        assert len(rows) == total
    out["list s"] = statistics.median(lists)
    db.close()
    return out


def report(api: dict[str, float], floor: dict[str, float]) -> None:
    print(f"{'figure':<18}{'VMO API':>12}{'SQLite floor':>14}{'ratio':>9}   target")
    for key, value in api.items():
        base = floor.get(key)
        target = ""
        for name, limit in TARGETS.items():
            kind = name.split()[0]
            if (kind == "mutating" and key.split()[0] in ("create", "update") and "p99" in key) or (
                kind != "mutating" and key.startswith(kind) and (name.split()[1] in key)
            ):
                target = f"<= {limit:g} {'OK' if value <= limit else 'MISSED'}"
        ratio = f"{value / base:8.1f}x" if base else "        -"
        shown_base = f"{base:14.3f}" if base is not None else f"{'-':>14}"
        print(f"{key:<18}{value:12.3f}{shown_base}{ratio}   {target}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=500, help="operations measured at 1 client")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        floor = sqlite_phase(Path(tmp) / "floor.db", args.objects, args.sample)
        server = Server(home)
        try:
            api = asyncio.run(api_phase(server, args.objects, args.sample))
        finally:
            server.stop()
    print(
        f"VMO API server benchmark: {args.objects} VirtualMachines stored, {os.cpu_count()} CPUs; times in ms unless named"
    )
    report(api, floor)


if __name__ == "__main__":
    main()
