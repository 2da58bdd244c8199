"""Benchmark of the controller runtime against the embedded API server.

Prints, each beside its floor from the same run:
- event delivery: N ConfigMap writes seen by a shared informer's handler, beside the same
  writes read off a bare watch stream (the floor: the runtime's cost is the cache and the
  dispatch);
- reconcile throughput: N keys through a Controller's queue and workers (each reconcile one
  GET), beside the same N GETs issued by hand with the same concurrency;
- recovery: how long an informer takes to see a write made while the API server was down,
  after the server is back, beside a bare client's first successful request after the restart.

Run: ``python bench/runtime.py [--n 2000]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from vmo.client import CONFIGMAP, Client, NotFound
from vmo.runtime import Controller, Informers, Result, Selector, Watch, split_key
from vmo.testing.apiserver import ThreadedServer

NS = "default"


def configmap(name: str, value: str = "0") -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": NS}, "data": {"v": value}}


async def delivery(client: Client, n: int, prefix: str) -> tuple[float, float]:
    """Seconds until every write was seen: (informer handler, bare watch)."""
    _, rv = await client.list(CONFIGMAP, NS)
    informer = Informers(client).get(Selector(CONFIGMAP, namespace=NS))
    seen_by_informer: set[str] = set()
    done_informer = asyncio.Event()

    def handler(_etype: str, obj: dict[str, object]) -> None:
        name = str(obj["metadata"]["name"])  # type: ignore[index]
        if name.startswith(prefix):
            seen_by_informer.add(name)
            if len(seen_by_informer) == n:
                done_informer.set()

    handle = informer.add_handler(handler)
    await informer.wait_synced()
    seen_by_watch: set[str] = set()

    async def bare_watch() -> None:
        async for _etype, obj in client.watch(CONFIGMAP, NS, resource_version=rv):
            name = str(obj["metadata"]["name"])
            if name.startswith(prefix):
                seen_by_watch.add(name)
                if len(seen_by_watch) == n:
                    return

    watcher = asyncio.create_task(bare_watch())
    start = time.perf_counter()
    sem = asyncio.Semaphore(16)

    async def write(i: int) -> None:
        async with sem:
            await client.create(CONFIGMAP, configmap(f"{prefix}{i}"))

    await asyncio.gather(*(write(i) for i in range(n)))
    await done_informer.wait()
    informer_s = time.perf_counter() - start
    await watcher
    watch_s = time.perf_counter() - start
    await informer.remove_handler(handle)
    return informer_s, watch_s


class Reader(Controller):
    """Each reconcile reads its ConfigMap once."""

    name = "bench-reader"
    workers = 16

    def __init__(self, client: Client, want: int) -> None:
        super().__init__(client, informers=Informers(client))
        self.want, self.done = want, asyncio.Event()
        self.count = 0

    def watches(self) -> Sequence[Watch]:
        return [Watch(Selector(CONFIGMAP, namespace="bench-none"))]

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        await self.client.get(CONFIGMAP, name, namespace)
        self.count += 1
        if self.count == self.want:
            self.done.set()
        return None


async def throughput(client: Client, names: list[str]) -> tuple[float, float]:
    """Seconds for len(names) reconciles through the runtime, and for the same GETs by hand."""
    controller = Reader(client, len(names))
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    start = time.perf_counter()
    for name in names:
        controller.enqueue(f"{NS}/{name}")
    await controller.done.wait()
    runtime_s = time.perf_counter() - start
    stop.set()
    await task
    sem = asyncio.Semaphore(16)

    async def get(name: str) -> None:
        async with sem:
            await client.get(CONFIGMAP, name, NS)

    start = time.perf_counter()
    await asyncio.gather(*(get(name) for name in names))
    return runtime_s, time.perf_counter() - start


async def recovery(server: ThreadedServer, client: Client) -> tuple[float, float]:
    """After a restart: seconds until the informer saw a write made while it was away, and
    until a bare request first succeeded."""
    informer = Informers(client).get(Selector(CONFIGMAP, namespace=NS))
    seen = asyncio.Event()

    def handler(_etype: str, obj: dict[str, object]) -> None:
        if obj["metadata"]["name"] == "written-while-away":  # type: ignore[index]
            seen.set()

    handle = informer.add_handler(handler)
    await informer.wait_synced()
    await asyncio.to_thread(server.restart_apiserver)
    start = time.perf_counter()
    while True:
        try:
            await client.create(CONFIGMAP, configmap("written-while-away"))
            break
        except (OSError, NotFound):
            await asyncio.sleep(0.01)
    bare_s = time.perf_counter() - start
    await seen.wait()
    informer_s = time.perf_counter() - start
    await informer.remove_handler(handle)
    return informer_s, bare_s


def line(what: str, figure: float, floor: float, unit: str = "s") -> None:
    ratio = figure / floor if floor else float("inf")
    print(f"{what:<46} {figure:8.3f} {unit}   floor {floor:8.3f} {unit}   ratio {ratio:5.2f}")


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as home, ThreadedServer(Path(home)) as server:
        async with Client.from_kubeconfig(server.kubeconfig) as client:
            informer_s, watch_s = await delivery(client, n, "d-")
            line(f"{n} writes seen by a shared informer", informer_s, watch_s)
            names = [f"d-{i}" for i in range(n)]
            runtime_s, by_hand_s = await throughput(client, names)
            line(f"{n} reconciles (one GET each), 16 workers", runtime_s, by_hand_s)
            informer_s, bare_s = await recovery(server, client)
            line("informer sees a write after an API restart", informer_s, bare_s)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    asyncio.run(main(parser.parse_args().n))
