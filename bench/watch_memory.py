"""Benchmark: the API server's resident memory under watches that are opened, never read, closed.

Each round opens WATCHES watches over TLS on one namespace, never reads them, writes EVENTS
objects there (so that the unread watchers fall behind and are closed), then closes every client.
Printed: the server's RSS before the rounds, with the watches open, and after each round once
the clients are gone, with the ratio to the start; beside it the floor, a bare aiohttp TLS
server holding the same idle connections (what asyncio and OpenSSL cost by themselves).
The server is a real ``vmo up --no-engine`` process, so its RSS is measurable.
Run: ``python bench/watch_memory.py [--rounds N] [--watches W] [--events E]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
from apiserver import Server  # bench/ is the script's directory

NS = "default"
WATCH = f"/api/v1/namespaces/{NS}/configmaps?watch=true"
SETTLE_S = 30.0  # longest wait for RSS to settle after the clients close
STILL_S = 8  # seconds without change that count as settled (the server trims every 5 s)
RSS_TARGET_RATIO = 2.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def settled_rss(pid: int) -> float:
    """RSS once it has held still for longer than the server's heap-trim interval."""
    deadline = time.monotonic() + SETTLE_S
    samples = [rss_mb(pid)]
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        samples.append(rss_mb(pid))
        if len(samples) > STILL_S and max(samples[-STILL_S:]) - min(samples[-STILL_S:]) < 1.0:
            break
    return samples[-1]


async def open_unread(
    url: str, ctx: ssl.SSLContext, count: int, request: bytes
) -> list[asyncio.StreamWriter]:
    """``count`` TLS connections that each send ``request`` and are never read."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    writers = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads nothing
        sock.connect((host, int(port)))
        _, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=host)
        writer.write(request)
        writers.append(writer)
    await asyncio.gather(*(w.drain() for w in writers))
    return writers


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.transport.abort()
    await asyncio.sleep(0)


async def rounds(
    pid: int,
    rounds: int,
    open_round: Callable[[], Awaitable[list[asyncio.StreamWriter]]],
    during: Callable[[], Awaitable[None]] | None = None,
) -> list[tuple[float, float]]:
    """(RSS with the connections open, RSS after they closed) per round."""
    out = []
    for _ in range(rounds):
        writers = await open_round()
        if during is not None:
            await during()
        await asyncio.sleep(1.0)
        opened = rss_mb(pid)
        await close_all(writers)
        out.append((opened, await settled_rss(pid)))
    return out


async def vmo_phase(
    args: argparse.Namespace, home: Path
) -> tuple[float, list[tuple[float, float]]]:
    server = Server(home)
    try:
        request = (
            f"GET {WATCH} HTTP/1.1\r\nHost: vmo\r\nAuthorization: Bearer {server.token}\r\n\r\n"
        ).encode()
        before = await settled_rss(server.proc.pid)
        counter = iter(range(10**9))

        async def events() -> None:
            await write_configmaps(server, args.events, counter)

        figures = await rounds(
            server.proc.pid,
            args.rounds,
            lambda: open_unread(server.url, server.ssl, args.watches, request),
            events,
        )
        return before, figures
    finally:
        server.stop()


async def write_configmaps(server: Server, count: int, counter: Iterator[int]) -> None:
    """``count`` ConfigMaps of 16 KiB each, one request at a time, as a controller would."""
    connector = aiohttp.TCPConnector(ssl=server.ssl, limit=4)
    headers = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(server.url, connector=connector, headers=headers) as session:
        for _ in range(count):
            name = f"cm-{next(counter)}"
            body = {"metadata": {"name": name}, "data": {"k": "x" * 16384}}
            path = f"/api/v1/namespaces/{NS}/configmaps"
            async with session.post(path, data=json.dumps(body)) as resp:
                await resp.read()
                if resp.status != 201:
                    raise RuntimeError(f"POST {name}: {resp.status}")


# --- the floor: a bare aiohttp TLS server ------------------------------------------------------


def serve_floor(cert: str, key: str, port_file: str) -> None:
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def start() -> None:
        app = web.Application()
        app.router.add_get("/", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx, backlog=512)
        await site.start()
        Path(port_file).write_text(str(runner.addresses[0][1]))
        await asyncio.Event().wait()

    asyncio.run(start())


async def floor_phase(
    args: argparse.Namespace, home: Path
) -> tuple[float, list[tuple[float, float]]]:
    port_file = home / "floor.port"
    pki = home / "pki"
    argv = [sys.executable, __file__, "--floor-server", str(pki / "apiserver.crt")]
    proc = subprocess.Popen([*argv, str(pki / "apiserver.key"), str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the floor server did not start")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        url = f"https://127.0.0.1:{port_file.read_text()}"
        request = b"GET / HTTP/1.1\r\nHost: vmo\r\n\r\n"
        before = await settled_rss(proc.pid)
        figures = await rounds(
            proc.pid, args.rounds, lambda: open_unread(url, ctx, args.watches, request)
        )
        return before, figures
    finally:
        proc.terminate()
        proc.wait(15)


def report(
    args: argparse.Namespace,
    vmo: tuple[float, list[tuple[float, float]]],
    floor: tuple[float, list[tuple[float, float]]],
) -> None:
    print(
        f"Watch memory: {args.rounds} rounds of {args.watches} unread TLS watches"
        f" ({args.events} events of 16 KiB each round), then closed; RSS in MB"
    )
    print(
        f"{'':<10}{'VMO open':>10}{'VMO after':>11}{'ratio':>8}{'floor open':>12}{'floor after':>13}"
    )
    print(f"{'before':<10}{'':>10}{vmo[0]:11.0f}{1.0:8.2f}{'':>12}{floor[0]:13.0f}")
    for i, ((v_open, v_after), (f_open, f_after)) in enumerate(zip(vmo[1], floor[1], strict=True)):
        ratio = v_after / vmo[0]
        print(
            f"{f'round {i + 1}':<10}{v_open:10.0f}{v_after:11.0f}{ratio:8.2f}{f_open:12.0f}{f_after:13.0f}"
        )
    final = vmo[1][-1][1] / vmo[0]
    verdict = "OK" if final <= RSS_TARGET_RATIO else "MISSED"
    print(
        f"VMO RSS after the last round / before: {final:.2f}x (target <= {RSS_TARGET_RATIO:g}x {verdict})"
    )


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--floor-server":
        serve_floor(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--watches", type=int, default=2000)
    parser.add_argument("--events", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        vmo = asyncio.run(vmo_phase(args, home))
        floor = asyncio.run(floor_phase(args, home))
    report(args, vmo, floor)


if __name__ == "__main__":
    main()
