"""virtctl-style streaming commands: serial console, VNC proxy and port-forward over WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
import termios
import tty
from collections.abc import Awaitable, Callable

import aiohttp

from vmo.client import Credentials

ESCAPE = b"\x1d"  # Ctrl-]
SUBRESOURCES = "/apis/subresources.kubevirt.io/v1"


def stream_url(creds: Credentials, namespace: str, vmi: str, what: str) -> str:
    return (
        f"{creds.server}{SUBRESOURCES}/namespaces/{namespace}/virtualmachineinstances/{vmi}/{what}"
    )


def _ssl(creds: Credentials) -> ssl.SSLContext | bool:
    if not creds.server.startswith("https"):
        return False
    ctx = ssl.create_default_context(cafile=creds.ca_file or None)
    if creds.cert_file:
        ctx.load_cert_chain(creds.cert_file, creds.key_file)
    return ctx


async def open_stream(
    session: aiohttp.ClientSession, creds: Credentials, url: str
) -> aiohttp.ClientWebSocketResponse:
    headers = {"Authorization": f"Bearer {creds.token}"} if creds.token else {}
    try:
        return await session.ws_connect(
            url, headers=headers, ssl=_ssl(creds), protocols=("plain.kubevirt.io",), max_msg_size=0
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise SystemExit(
            f"vmo: the server refused the connection: {exc.status} {exc.message}"
        ) from None


async def console(creds: Credentials, namespace: str, vmi: str) -> int:
    """Interactive serial console; Ctrl-] leaves. Without a terminal, pipes stdin/stdout."""
    url = stream_url(creds, namespace, vmi, "console")
    async with aiohttp.ClientSession() as session:
        ws = await open_stream(session, creds, url)
        interactive = sys.stdin.isatty()
        if interactive:
            print(
                f"Successfully connected to {vmi} console. The escape sequence is ^]",
                file=sys.stderr,
            )
        saved = termios.tcgetattr(sys.stdin.fileno()) if interactive else None
        try:
            if interactive:
                tty.setraw(sys.stdin.fileno())
            await _pump_stdio(ws, stop_on_escape=interactive)
        finally:
            if saved is not None:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
            await ws.close()
    return 0


async def _pump_stdio(ws: aiohttp.ClientWebSocketResponse, *, stop_on_escape: bool) -> None:
    loop = asyncio.get_running_loop()
    stdin_fd = sys.stdin.fileno()
    outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()

    def on_stdin() -> None:
        data = os.read(stdin_fd, 4096)
        if stop_on_escape and ESCAPE in data:
            data = data[: data.index(ESCAPE)]
            outgoing.put_nowait(data)
            outgoing.put_nowait(None)
            loop.remove_reader(stdin_fd)
            return
        outgoing.put_nowait(data or None)
        if not data:
            loop.remove_reader(stdin_fd)

    async def to_ws() -> None:
        while (data := await outgoing.get()) is not None:
            if data:
                await ws.send_bytes(data)
        if not stop_on_escape:
            # piped input ended: give the guest a moment to answer before closing
            await asyncio.sleep(2.0)

    async def from_ws() -> None:
        async for msg in ws:
            if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                payload = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                os.write(sys.stdout.fileno(), payload)
            else:
                break

    loop.add_reader(stdin_fd, on_stdin)
    tasks = [asyncio.create_task(to_ws()), asyncio.create_task(from_ws())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        with contextlib.suppress(ValueError):
            loop.remove_reader(stdin_fd)
        for task in tasks:
            task.cancel()


async def tcp_proxy(
    creds: Credentials, url: str, *, port: int, ready: Callable[[int], None], once: bool = False
) -> None:
    """Listens on 127.0.0.1:port; each connection is carried over its own WebSocket to ``url``."""
    session = aiohttp.ClientSession()
    served = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ws = await open_stream(session, creds, url)
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            writer.close()
            return
        await _join(ws, reader, writer)
        if once:
            served.set()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    ready(bound)
    try:
        if once:
            await served.wait()
        else:
            await asyncio.Event().wait()
    finally:
        server.close()
        await session.close()


async def _join(
    ws: aiohttp.ClientWebSocketResponse, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    async def up() -> None:
        while data := await reader.read(65536):
            await ws.send_bytes(data)

    async def down() -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            writer.write(msg.data)
            await writer.drain()

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await ws.close()
    writer.close()


Runner = Callable[[], Awaitable[int]]
