"""What VMO's metrics cost, measured with real QEMU guests (issue 14, item 7).

1. A node agent scraped as Prometheus scrapes it: ``vmo node run`` as its own process with 50
   small VMIs (64 MiB, an emptyDisk, pod network; paused once Running when their idle CPU is
   not low), scraped over HTTPS with a ``system:monitoring`` token once a second. Scrape
   duration p50/p99 (target p99 <= 100 ms) beside the same agent with no VMIs; the agent's CPU
   per scrape (its CPU while scraped minus its idle rate over an equal period without scrapes
   before and after, divided by the scrapes) beside its idle CPU rate; series per scrape.
2. Instrumentation cost on API create p99: creates of small ConfigMaps by concurrent clients
   against an API server with metrics on, one with them off, and one with them on and scraped
   every second, in interleaved rounds (a fresh server and home per variant and round, one at a
   time, the order rotating each round, to cancel drift); the median over rounds of each
   round's on/off ratio (target: <= 2 % added), beside the in-process cost per request.

The scrapers and the load run as child processes, so that what they measure is not slowed by
the servers this process runs. The VMs run under TCG: take the machine's VM lock.

    flock -o /tmp/vmo-vm.lock .venv/bin/python bench/metrics.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from apiserver import pct, request, timed_ops  # bench/apiserver.py: the measuring helpers

from vmo.client import NODE, VMI, Client
from vmo.engine.agent.metrics import proc_stat
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.processes import qemus_under

JSON = dict[str, Any]
NS = "virtual-machines"
NODE_NAME = "bench-node"
VMIS = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances"
PAUSE = f"/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/{{}}/pause"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
MONITORING = ("bench:prometheus", ("system:monitoring",))
TARGET_SCRAPE_P99_MS = 100.0
TARGET_ADDED_PCT = 2.0
IDLE_GUEST_CORES = 0.05  # guests using more than this (in all) are paused before measuring
# what Prometheus 2.x sends with each scrape
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}


# --- children: a Prometheus-like scraper and a load generator, each a process of its own -------


def cpu_seconds(pid: int) -> float:
    stat = proc_stat(Path(f"/proc/{pid}/stat"))
    if stat is None:
        raise RuntimeError(f"process {pid} is gone")
    return stat.user + stat.system


def series_in(body: str) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith("#"))


def value_of(body: str, metric: str) -> float:
    for line in body.splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"{metric} is not in the scrape")


def _session(spec: JSON, limit: int = 64) -> aiohttp.ClientSession:
    ctx = ssl.create_default_context(cafile=spec["ca"])
    # Prometheus keeps its connection to a target open between scrapes
    connector = aiohttp.TCPConnector(ssl=ctx, limit=limit, keepalive_timeout=300)
    headers = {"Authorization": f"Bearer {spec['token']}"}
    return aiohttp.ClientSession(spec["url"], connector=connector, headers=headers)


async def scrape_once(session: aiohttp.ClientSession) -> tuple[float, str]:
    """Seconds from sending the request to the last byte of the body, and the body."""
    started = time.perf_counter()
    async with session.get("/metrics", headers=PROMETHEUS_HEADERS) as resp:
        body = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"scrape: {resp.status} {body[:200]}")
    return time.perf_counter() - started, body


async def scrape_every(
    session: aiohttp.ClientSession, count: int, interval: float
) -> list[tuple[float, str]]:
    """``count`` scrapes on a fixed schedule, one every ``interval`` seconds, as Prometheus."""
    out = []
    start = time.monotonic()
    for i in range(count):
        await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
        out.append(await scrape_once(session))
    return out


async def scrape_child(spec: JSON) -> JSON:
    """Idle, scrape ``count`` times, idle again; the agent's CPU over each period."""
    pid, count, interval = spec["pid"], spec["count"], spec["interval"]
    async with _session(spec, limit=1) as session:
        await scrape_once(session)  # a warm target: Prometheus has scraped it before
        idle = count * interval
        t0, c0 = time.monotonic(), cpu_seconds(pid)
        await asyncio.sleep(idle)
        t1, c1 = time.monotonic(), cpu_seconds(pid)
        scrapes = await scrape_every(session, count, interval)
        await asyncio.sleep(max(0.0, t1 + count * interval - time.monotonic()))
        t2, c2 = time.monotonic(), cpu_seconds(pid)
        await asyncio.sleep(idle)
        t3, c3 = time.monotonic(), cpu_seconds(pid)
    bodies = [body for _, body in scrapes]
    return {
        "durations": [seconds for seconds, _ in scrapes],
        "series": [series_in(body) for body in bodies],
        "vmis": [value_of(body, "vmo_node_vmis") for body in bodies],
        "sampling": [value_of(body, "vmo_node_agent_scrape_duration_seconds") for body in bodies],
        "idle_cpu": (c1 - c0) + (c3 - c2),
        "idle_wall": (t1 - t0) + (t3 - t2),
        "scrape_cpu": c2 - c1,
        "scrape_wall": t2 - t1,
    }


def configmap(name: str) -> JSON:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"app": "bench-metrics"}},
            "data": {"key": "value"}}  # fmt: skip


async def load_child(spec: JSON) -> JSON:
    """``count`` ConfigMap creates by ``clients`` clients (after a warm-up), their latencies in
    ms; with ``scrape`` > 0 the server's /metrics is scraped that often meanwhile."""
    prefix, clients = spec["prefix"], spec["clients"]
    async with _session(spec) as session:

        def creates(names: list[str]) -> list[Any]:
            return [request("POST", CONFIGMAPS, configmap(n), 201) for n in names]

        await timed_ops(session, creates([f"{prefix}-w{i}" for i in range(clients * 10)]), clients)
        scraper = None
        if spec["scrape"]:
            scraper = asyncio.create_task(scrape_every(session, 10**6, spec["scrape"]))
        latencies = await timed_ops(
            session, creates([f"{prefix}-{i}" for i in range(spec["count"])]), clients
        )
        if scraper is not None:
            scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scraper
    return {"latencies": latencies}


def child(argv_spec: str) -> None:
    spec = json.loads(argv_spec)
    run = scrape_child if spec["kind"] == "scrape" else load_child
    print(json.dumps(asyncio.run(run(spec))), flush=True)


async def run_child(spec: JSON) -> JSON:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child", json.dumps(spec), stdout=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the {spec['kind']} child failed ({proc.returncode})")
    result: JSON = json.loads(out)
    return result


# --- 1. scraping a node agent with VMIs ---------------------------------------------------------


def vmi(name: str) -> JSON:
    """The smallest VMI the engine accepts: 64 MiB, one small emptyDisk, the pod network."""
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "bench-metrics"}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
            "domain": {
                "cpu": {"cores": 1},
                "memory": {"guest": "64Mi"},
                "devices": {
                    "disks": [{"name": "scratch", "disk": {"bus": "virtio"}}],
                    "interfaces": [{"name": "default", "masquerade": {}}],
                },
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [{"name": "scratch", "emptyDisk": {"capacity": "16Mi"}}],
        },
    }


@dataclass
class Scrapes:
    """One idle/scrape/idle measurement of the agent."""

    vmis: int
    durations: list[float]
    series: list[int]
    sampling: list[float]
    idle_rate: float  # agent CPU seconds per second without scrapes
    cpu_per_scrape: float

    @classmethod
    def of(cls, result: JSON) -> Scrapes:
        idle_rate = result["idle_cpu"] / result["idle_wall"]
        added = result["scrape_cpu"] - idle_rate * result["scrape_wall"]
        vmis = {int(v) for v in result["vmis"]}
        if len(vmis) != 1:
            raise RuntimeError(f"the agent reported {sorted(vmis)} VMIs across the scrapes")
        return cls(vmis.pop(), result["durations"], result["series"], result["sampling"],
                   idle_rate, added / len(result["durations"]))  # fmt: skip


def guests_cpu_rate(home: Path, seconds: float) -> float:
    """Cores the QEMUs under ``home`` use, over ``seconds``."""
    pids = qemus_under(home)

    def total() -> float:
        return sum(s.user + s.system for p in pids if (s := proc_stat(Path(f"/proc/{p}/stat"))))

    before = total()
    time.sleep(seconds)
    return (total() - before) / seconds


async def wait_for(what: str, timeout: float, check: Any) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(1)


async def node_ready(client: Client) -> bool:
    node = await client.find(NODE, NODE_NAME)
    conditions = (node or {}).get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def phases(client: Client) -> dict[str, str]:
    items, _ = await client.list(VMI, NS)
    return {i["metadata"]["name"]: i.get("status", {}).get("phase", "") for i in items}


async def paused(client: Client) -> int:
    items, _ = await client.list(VMI, NS)
    return sum(
        1
        for i in items
        for c in i.get("status", {}).get("conditions") or []
        if c.get("type") == "Paused" and c.get("status") == "True"
    )


async def start_vmis(client: Client, home: Path, count: int) -> str:
    """Creates the VMIs, waits for them all to be Running, pauses them when they are busy;
    says how they stand."""
    started = time.monotonic()
    names = [f"m{i:02d}" for i in range(count)]
    for name in names:
        await client.create(VMI, vmi(name))

    async def all_running() -> bool:
        now = await phases(client)
        failed = [n for n, p in now.items() if p in ("Failed", "Succeeded")]
        if failed:
            raise RuntimeError(f"VMIs ended before the scrapes: {failed}")
        return sum(p == "Running" for p in now.values()) == count

    await wait_for(f"{count} VMIs to be Running", 60 + 12 * count, all_running)
    say(f"{count} VMIs Running {time.monotonic() - started:.0f} s after the first create")
    busy = await asyncio.to_thread(guests_cpu_rate, home, 5.0)
    if busy <= IDLE_GUEST_CORES:
        return f"{count} VMIs running, their guests idle at {busy:.3f} cores"
    for name in names:
        await client.request("PUT", PAUSE.format(name), {})

    async def all_paused() -> bool:
        return await paused(client) == count

    await wait_for(f"{count} VMIs to be Paused", 120, all_paused)
    after = await asyncio.to_thread(guests_cpu_rate, home, 5.0)
    return f"{count} VMIs paused: their guests used {busy:.2f} cores, paused {after:.3f}"


async def delete_vmis(client: Client) -> None:
    await client.request("DELETE", VMIS, {"propagationPolicy": "Background"})

    async def none_left() -> bool:
        return not await phases(client)

    await wait_for("every VMI to be gone", 300, none_left)


async def measure_agent(
    server: ThreadedServer, agent: subprocess.Popen[bytes], args: argparse.Namespace
) -> tuple[Scrapes, Scrapes, str]:
    assert server.server is not None
    token = server.server.tokens.add(*MONITORING)
    port = (server.home / "nodes" / NODE_NAME / "metrics.port").read_text().strip()
    spec = {"kind": "scrape", "url": f"https://127.0.0.1:{port}", "ca": str(server.ca),
            "token": token, "pid": agent.pid, "count": args.scrapes, "interval": 1.0}  # fmt: skip
    async with Client.from_kubeconfig(server.kubeconfig) as client:
        try:
            say(f"scraping the agent with no VMIs ({args.scrapes} scrapes, idle periods around)")
            empty = Scrapes.of(await run_child(spec))
            say(f"creating {args.vmis} VMIs")
            how = await start_vmis(client, server.home, args.vmis)
            say(how)
            say(f"scraping the agent with {args.vmis} VMIs")
            full = Scrapes.of(await run_child(spec))
            if full.vmis != args.vmis:
                raise RuntimeError(f"the agent reported {full.vmis} VMIs, not {args.vmis}")
        finally:
            await delete_vmis(client)
    return empty, full, how


def scrape_phase(args: argparse.Namespace) -> tuple[Scrapes, Scrapes, str]:
    with tempfile.TemporaryDirectory(prefix="vmo-bench-metrics-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        server = ThreadedServer(home, engine=True, nodes=0).start()
        agent: subprocess.Popen[bytes] | None = None
        try:
            agent = start_agent(home, Path(tmp) / "agent.log", args.vmis)
            wait_node(server)
            return asyncio.run(measure_agent(server, agent, args))
        finally:
            if agent is not None:
                stop_process(agent)
            server.stop()
            leaked = qemus_under(home)
            for pid in leaked:
                os.kill(pid, signal.SIGKILL)
            if leaked:
                raise RuntimeError(f"QEMU processes were left running (killed): {leaked}")


def start_agent(home: Path, log: Path, vmis: int) -> subprocess.Popen[bytes]:
    """``vmo node run``, reporting room for the VMIs (each requests 0.1 CPU and 96 MiB)."""
    argv = [sys.executable, "-m", "vmo.cli.main", "--home", str(home), "node", "run",
            "--name", NODE_NAME, "--cpus", str(max(2, vmis // 5)),
            "--memory", f"{max(4, vmis // 6)}Gi"]  # fmt: skip
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)


def wait_node(server: ThreadedServer) -> None:
    async def ready() -> None:
        async with Client.from_kubeconfig(server.kubeconfig) as client:
            await wait_for(f"node {NODE_NAME} to be Ready", 120, lambda: node_ready(client))
        port = server.home / "nodes" / NODE_NAME / "metrics.port"
        for _ in range(300):
            if port.exists():
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{port} was not written")

    asyncio.run(ready())


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- 2. instrumentation cost on API creates ---------------------------------------------------

VARIANTS = ("off", "on", "on, scraped 1/s")


@dataclass
class Rounds:
    """Per variant, each round's create latencies (ms)."""

    runs: dict[str, list[list[float]]]

    def median(self, variant: str, p: float) -> float:
        return statistics.median(pct(run, p) for run in self.runs[variant])

    def each(self, variant: str, p: float) -> str:
        return " ".join(f"{pct(run, p):.2f}" for run in self.runs[variant])

    def paired(self, variant: str, p: float) -> float:
        """The median over rounds of the variant's figure over the same round's "off" figure:
        a round's servers ran side by side, so the machine's drift between rounds cancels."""
        ratios = [
            pct(run, p) / pct(off, p)
            for run, off in zip(self.runs[variant], self.runs["off"], strict=True)
        ]
        return statistics.median(ratios)


def observe_cost(count: int = 20000) -> tuple[float, float]:
    """Seconds the instrumentation adds to one request, measured in this process: labelling
    and observing a create (what the middleware does beside calling the handler), and the
    middleware's whole wrapping around a handler that returns at once."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from vmo.apiserver import rbac
    from vmo.apiserver.metrics import REQUEST_INFO_KEY, ApiMetrics
    from vmo.apiserver.registry import Registry
    from vmo.apiserver.server import builtin_types

    class _Nothing:
        def count(self, _prefix: str) -> int:
            return 0

        def prefixes(self) -> list[str]:
            return []

    metrics = ApiMetrics(_Nothing(), _Nothing(), Registry(builtin_types()), "/nonexistent")  # type: ignore[arg-type]
    request = make_mocked_request("POST", CONFIGMAPS)
    # as the audit middleware leaves it (vmo up audits every request at Metadata)
    request[REQUEST_INFO_KEY] = rbac.request_attributes(
        "POST", CONFIGMAPS, {}, rbac.UserInfo("", ())
    )
    started = time.perf_counter()
    for _ in range(count):
        metrics.observe(request, 201, 0.004)
    observe = (time.perf_counter() - started) / count

    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=201)

    async def wrapped() -> float:
        t0 = time.perf_counter()
        for _ in range(count):
            await handler(request)
        bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(count):
            await metrics.middleware(request, handler)
        return (time.perf_counter() - t0 - bare) / count

    return observe, asyncio.run(wrapped())


async def api_rounds(tmp: Path, args: argparse.Namespace) -> Rounds:
    """Each round starts a fresh server per variant, one at a time, in a rotating order: no
    variant keeps a server (its files, its port, its thread) that might be faster by chance,
    and no idle server shares the machine with the one measured."""
    runs: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for variant in order:
            home = tmp / f"r{r}-{VARIANTS.index(variant)}"
            home.mkdir()
            server = await asyncio.to_thread(
                lambda h=home, v=variant: ThreadedServer(h, metrics=v != "off").start()
            )
            try:
                spec = {"kind": "load", "url": server.url, "ca": str(server.ca),
                        "token": server.admin_token, "prefix": f"r{r}", "count": args.creates,
                        "clients": args.clients, "scrape": 1.0 if "scraped" in variant else 0}  # fmt: skip
                runs[variant].append((await run_child(spec))["latencies"])
            finally:
                await asyncio.to_thread(server.stop)
        say(f"round {r + 1}/{args.rounds}: create p99 "
            + ", ".join(f"{v} {pct(runs[v][-1], 99):.2f} ms" for v in VARIANTS))  # fmt: skip
    return Rounds(runs)


def api_phase(args: argparse.Namespace) -> Rounds:
    with tempfile.TemporaryDirectory(prefix="vmo-bench-metrics-api-") as tmp:
        return asyncio.run(api_rounds(Path(tmp), args))


# --- the report -------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"  .. {text}", flush=True)


def row(figure: str, value: str, beside: str, other: str, ratio: str, verdict: str) -> None:
    print(f"{figure:<36}{value:>11}  {beside:<34}{other:>11}{ratio:>9}  {verdict}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def times(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def verdict(ok: bool, target: str) -> str:
    return f"{target} {'OK' if ok else 'MISSED'}"


def report_scrapes(empty: Scrapes, full: Scrapes, how: str) -> None:
    n = full.vmis
    print(f"1. node agent /metrics, {len(full.durations)} scrapes 1 s apart over HTTPS; {how}")
    p50, p99 = pct(full.durations, 50), pct(full.durations, 99)
    e50, e99 = pct(empty.durations, 50), pct(empty.durations, 99)
    row(f"scrape p50, {n} VMIs", ms(p50), "same agent, no VMIs", ms(e50), times(p50, e50), "-")
    row(f"scrape p99, {n} VMIs", ms(p99), "same agent, no VMIs", ms(e99), times(p99, e99),
        verdict(p99 * 1000 <= TARGET_SCRAPE_P99_MS, f"<= {TARGET_SCRAPE_P99_MS:g} ms"))  # fmt: skip
    s50, e_s50 = statistics.median(full.sampling), statistics.median(empty.sampling)
    row("  of which sampling QEMU (p50)", ms(s50), "no VMIs", ms(e_s50), times(s50, e_s50), "-")
    row(f"agent CPU per scrape, {n} VMIs", ms(full.cpu_per_scrape), "agent idle CPU per second",
        ms(full.idle_rate), times(full.cpu_per_scrape, full.idle_rate), "-")  # fmt: skip
    row("agent CPU per scrape, no VMIs", ms(empty.cpu_per_scrape), "agent idle CPU per second",
        ms(empty.idle_rate), times(empty.cpu_per_scrape, empty.idle_rate), "-")  # fmt: skip
    series, base = statistics.median(full.series), statistics.median(empty.series)
    row(f"series per scrape, {n} VMIs", f"{series:.0f}", "no VMIs", f"{base:.0f}",
        times(series, base), f"- ({(series - base) / n:.0f} per VMI)")  # fmt: skip


def report_api(rounds: Rounds, args: argparse.Namespace) -> None:
    print(f"2. API create latency: {args.creates} ConfigMap creates by {args.clients} clients per "
          f"round, {args.rounds} rounds per variant, interleaved; the MEDIAN over rounds of each "
          "round's figure")  # fmt: skip
    off99, off50 = rounds.median("off", 99), rounds.median("off", 50)
    for variant in VARIANTS[1:]:
        p99, p50 = rounds.median(variant, 99), rounds.median(variant, 50)
        added = (rounds.paired(variant, 99) - 1) * 100
        row(f"create p99, metrics {variant}", f"{p99:.2f} ms", "metrics off", f"{off99:.2f} ms",
            f"{added:+.1f}%", verdict(added <= TARGET_ADDED_PCT, f"added <= {TARGET_ADDED_PCT:g}%"))  # fmt: skip
        row(f"create p50, metrics {variant}", f"{p50:.2f} ms", "metrics off", f"{off50:.2f} ms",
            f"{(rounds.paired(variant, 50) - 1) * 100:+.1f}%", "-")  # fmt: skip
    print("    (the ratio is the median over rounds of each round's on/off ratio; the values are "
          "the medians over rounds)")  # fmt: skip
    for variant in VARIANTS:
        print(f"    p99 per round, metrics {variant}: {rounds.each(variant, 99)} ms")
    observe, wrapping = observe_cost()
    share = wrapping / (off50 / 1000) * 100
    row("instrumentation per request", f"{wrapping * 1e6:.1f} us", "create p50, metrics off",
        f"{off50:.2f} ms", f"{share:.2f}%", verdict(share <= TARGET_ADDED_PCT,
                                                    f"<= {TARGET_ADDED_PCT:g}%"))  # fmt: skip
    print(f"    (measured in-process: the middleware around a handler that returns at once; "
          f"labelling and observing alone {observe * 1e6:.1f} us)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 VMIs, fewer requests")
    parser.add_argument("--vmis", type=int, default=None, help="default 50 (5 with --quick)")
    parser.add_argument("--scrapes", type=int, default=None, help="default 40 (10 with --quick)")
    parser.add_argument("--creates", type=int, default=None, help="per round; default 2000")
    parser.add_argument("--rounds", type=int, default=None, help="per variant; default 7")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--only", choices=("scrape", "api"), default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    quick = args.quick
    args.vmis = args.vmis or (5 if quick else 50)
    args.scrapes = args.scrapes or (10 if quick else 40)
    args.creates = args.creates or (300 if quick else 2000)
    args.rounds = args.rounds or (3 if quick else 7)
    print(f"VMO metrics overhead benchmark: {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}{' (--quick)' if quick else ''}", flush=True)  # fmt: skip
    scrapes = scrape_phase(args) if args.only != "api" else None
    rounds = api_phase(args) if args.only != "scrape" else None
    print()
    row("figure", "value", "beside", "value", "ratio", "verdict")
    if scrapes is not None:
        report_scrapes(*scrapes)
    if rounds is not None:
        report_api(rounds, args)


if __name__ == "__main__":
    main()
