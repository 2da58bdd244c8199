"""virtctl-style streaming commands: serial console, VNC proxy and port-forward over WebSockets
(to local TCP connections, or to stdin/stdout as ``port-forward --stdio`` for ssh's ProxyCommand).

The WebSockets are the client's (``Client.websocket``): this module moves bytes between them and
the terminal or local TCP connections, and opens no HTTP connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import threading
import tty
from collections.abc import AsyncIterator, Awaitable, Callable

from vmo.client import ApiStatusError, Client, Credentials, WebSocket, WSMsgType

ESCAPE = b"\x1d"  # Ctrl-]
SUBRESOURCES = "/apis/subresources.kubevirt.io/v1"
PROTOCOLS = ("plain.kubevirt.io",)
STDIO_LINGER = 5.0  # seconds the guest's answer may still come after stdin ends


def stream_path(
    namespace: str, vmi: str, what: str, *, resource: str = "virtualmachineinstances"
) -> str:
    return f"{SUBRESOURCES}/namespaces/{namespace}/{resource}/{vmi}/{what}"


@contextlib.asynccontextmanager
async def open_stream(client: Client, path: str) -> AsyncIterator[WebSocket]:
    """The subresource's WebSocket; a refusal becomes the command's error message."""
    try:
        async with client.websocket(path, protocols=PROTOCOLS) as ws:
            yield ws
    except ApiStatusError as exc:
        raise SystemExit(f"vmo: the server refused the connection: {exc}") from None


async def console(creds: Credentials, namespace: str, vmi: str) -> int:
    """Interactive serial console; Ctrl-] leaves. Without a terminal, pipes stdin/stdout."""
    path = stream_path(namespace, vmi, "console")
    async with Client(creds) as client, open_stream(client, path) as ws:
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
    return 0


async def _pump_stdio(ws: WebSocket, *, stop_on_escape: bool) -> None:
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
            if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
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
    creds: Credentials, path: str, *, port: int, ready: Callable[[int], None], once: bool = False
) -> None:
    """Listens on 127.0.0.1:port; each connection is carried over its own WebSocket to ``path``."""
    served = asyncio.Event()
    async with Client(creds) as client:

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                async with open_stream(client, path) as ws:
                    await _join(ws, reader, writer)
            except SystemExit as exc:
                print(exc, file=sys.stderr)
            finally:
                writer.close()
            if once:
                served.set()

        server = await asyncio.start_server(handle, "127.0.0.1", port)
        ready(server.sockets[0].getsockname()[1])
        try:
            await (served.wait() if once else asyncio.Event().wait())
        finally:
            server.close()


async def _join(ws: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def up() -> None:
        while data := await reader.read(65536):
            await ws.send_bytes(data)

    async def down() -> None:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                break
            writer.write(msg.data)
            await writer.drain()

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


async def stdio_forward(creds: Credentials, path: str) -> None:
    """Carries stdin to the port-forward WebSocket at ``path`` and its bytes to stdout, until
    the guest's side closes or stdin ends: the ProxyCommand half of ``vmo ssh``."""
    async with Client(creds) as client, open_stream(client, path) as ws:
        loop = asyncio.get_running_loop()
        incoming: asyncio.Queue[bytes] = asyncio.Queue()
        # a thread, not add_reader: stdin may be a file or /dev/null, which epoll refuses
        reader = threading.Thread(
            target=_read_stdin, args=(loop, incoming), name="stdin", daemon=True
        )
        reader.start()

        async def up() -> None:
            while data := await incoming.get():
                await ws.send_bytes(data)

        async def down() -> None:
            async for msg in ws:
                if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                    break
                payload = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                await loop.run_in_executor(None, _write_stdout, payload)

        sending, receiving = asyncio.create_task(up()), asyncio.create_task(down())
        try:
            await asyncio.wait((sending, receiving), return_when=asyncio.FIRST_COMPLETED)
            if sending.done() and not receiving.done():
                # stdin ended, the guest may still be answering; a WebSocket has no half-close
                await asyncio.wait((receiving,), timeout=STDIO_LINGER)
        finally:
            for task in (sending, receiving):
                task.cancel()


def _read_stdin(loop: asyncio.AbstractEventLoop, into: asyncio.Queue[bytes]) -> None:
    fd = sys.stdin.fileno()
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            loop.call_soon_threadsafe(into.put_nowait, data)
        if not data:
            return


def _write_stdout(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(sys.stdout.fileno(), view) :]


Runner = Callable[[], Awaitable[int]]
