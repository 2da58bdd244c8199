"""An asyncio QMP client: ``MessageStream`` frames JSON messages, ``QMPClient`` gives them meaning.

The client has an explicit ``Runstate`` (IDLE -> CONNECTING -> RUNNING -> DISCONNECTING -> IDLE);
an operation in the wrong state raises ``StateError`` naming both states. Each command gets its
timeout from ``QMP_TIMEOUTS``. Events reach every ``EventListener`` opened before they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from enum import Enum, StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from vmo.api.types import JSON
from vmo.engine.qemu.errors import (
    QMPConnectionLost,
    QMPError,
    QMPProtocolError,
    QMPTimeout,
    StateError,
)

__all__ = [
    "DEFAULT_QMP_TIMEOUT",
    "QMP_TIMEOUTS",
    "EventListener",
    "MessageStream",
    "QMPClient",
    "Runstate",
    "VMRunState",
    "qmp_timeout",
]

log = logging.getLogger("vmo.engine.qemu.qmp")

DEFAULT_QMP_TIMEOUT = 5.0

# Seconds to wait for an answer, per command; anything absent gets DEFAULT_QMP_TIMEOUT.
# Long ones either do real work before answering or answer from a main loop busy migrating.
QMP_TIMEOUTS: dict[str, float] = {
    "migrate": 60.0,
    "migrate-incoming": 60.0,
    "migrate_cancel": 60.0,
    "migrate-continue": 60.0,
    "query-migrate": 60.0,
    "migrate-start-postcopy": 60.0,
    "blockdev-add": 60.0,
    "blockdev-del": 60.0,
    "blockdev-snapshot-sync": 60.0,
    "blockdev-snapshot": 60.0,
    "block-dirty-bitmap-add": 60.0,
    "block-dirty-bitmap-remove": 60.0,
    "blockdev-backup": 60.0,
    "block-job-cancel": 600.0,
    "block-job-complete": 600.0,
    "job-dismiss": 60.0,
    "query-block-jobs": 60.0,
    "query-jobs": 60.0,
    "snapshot-save": 60.0,
    "snapshot-load": 60.0,
    "snapshot-delete": 60.0,
    "device_add": 30.0,
    "device_del": 30.0,
    "query-qmp-schema": 30.0,
    "guest-fsfreeze-freeze": 3600.0,
    "guest-fsfreeze-freeze-list": 3600.0,
    "guest-fsfreeze-thaw": 60.0,
    "guest-fsfreeze-status": 10.0,
    "guest-fstrim": 600.0,
    "guest-sync-delimited": 10.0,
    "guest-get-osinfo": 10.0,
    "guest-network-get-interfaces": 10.0,
}

# query-qmp-schema answers are megabytes; asyncio's default line limit is 64 KiB.
_LINE_LIMIT = 32 << 20
_EVENT_BACKLOG = 1024
_FD_SEND_POLL = 0.001


def qmp_timeout(command: str) -> float:
    """The timeout for ``command`` from ``QMP_TIMEOUTS``."""
    return QMP_TIMEOUTS.get(command, DEFAULT_QMP_TIMEOUT)


class Runstate(Enum):
    """The client's connection state."""

    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    DISCONNECTING = "disconnecting"


class VMRunState(StrEnum):
    """QEMU's own RunState of the guest, as ``query-status`` reports it."""

    DEBUG = "debug"
    FINISH_MIGRATE = "finish-migrate"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


class MessageStream:
    """Newline-delimited JSON objects over a unix stream socket; QMP and the guest agent share it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open_unix(cls, path: Path, *, timeout: float) -> MessageStream:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=_LINE_LIMIT), timeout
            )
        except (OSError, TimeoutError) as exc:
            raise QMPConnectionLost(f"cannot connect to {path}: {exc}") from exc
        return cls(reader, writer)

    async def read(self) -> JSON:
        """The next message; ``QMPConnectionLost`` at end of stream."""
        while True:
            try:
                line = await self._reader.readline()
            except (OSError, ValueError) as exc:
                raise QMPConnectionLost(f"read failed: {exc}") from exc
            if not line:
                raise QMPConnectionLost("end of stream")
            if line.strip():
                return _decode(line)

    async def write(self, message: JSON) -> None:
        await self.write_raw(json.dumps(message).encode() + b"\n")

    async def write_raw(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            raise QMPConnectionLost(f"write failed: {exc}") from exc

    async def write_with_fds(self, message: JSON, fds: Sequence[int]) -> None:
        """Writes ``message`` with ``fds`` attached (SCM_RIGHTS), as QMP's ``add-fd`` wants."""
        data = json.dumps(message).encode() + b"\n"
        try:
            # sendmsg goes around the transport: whatever it still buffers must be out first
            while self._writer.transport.get_write_buffer_size():
                await self._writer.drain()
                await asyncio.sleep(_FD_SEND_POLL)
            transport_socket = self._writer.get_extra_info("socket")
            if transport_socket is None:
                raise QMPConnectionLost("write failed: the connection is closed")
            # a duplicate of the connection's socket: sendmsg is not exposed on the transport
            with socket.socket(fileno=os.dup(transport_socket.fileno())) as sock:
                sent = await self._send_fds(sock, data, fds)
            if sent < len(data):
                await self.write_raw(data[sent:])
        except OSError as exc:
            raise QMPConnectionLost(f"write failed: {exc}") from exc

    @staticmethod
    async def _send_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> int:
        """Bytes sent with the descriptors (the socket is non-blocking: waits while it is full)."""
        while True:
            try:
                return socket.send_fds(sock, [data], list(fds))
            except BlockingIOError:
                await asyncio.sleep(_FD_SEND_POLL)

    async def skip_past(self, sentinel: bytes) -> None:
        """Discards everything up to and including ``sentinel``."""
        try:
            await self._reader.readuntil(sentinel)
        except asyncio.IncompleteReadError as exc:
            raise QMPConnectionLost("end of stream before sentinel") from exc
        except (OSError, asyncio.LimitOverrunError) as exc:
            raise QMPConnectionLost(f"read failed: {exc}") from exc

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


def _decode(line: bytes) -> JSON:
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise QMPProtocolError("not JSON", received=line) from exc
    if not isinstance(message, dict):
        raise QMPProtocolError("not a JSON object", received=line)
    return message


class EventListener:
    """Events (optionally only some names) arriving while the listener is open."""

    def __init__(self, client: QMPClient, names: Iterable[str]) -> None:
        self._client = client
        self.names = frozenset(names)
        self._queue: asyncio.Queue[JSON | BaseException | None] = asyncio.Queue(_EVENT_BACKLOG)

    def accepts(self, event: JSON) -> bool:
        return not self.names or event.get("event") in self.names

    def put(self, item: JSON | BaseException | None) -> None:
        if self._queue.full():
            log.warning("event listener %s is full; dropping the oldest event", sorted(self.names))
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    async def get(self, timeout: float | None = None) -> JSON:
        """The next event; ``QMPTimeout`` if none comes in time."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError as exc:
            raise QMPTimeout(f"event {'|'.join(sorted(self.names)) or '*'}", timeout or 0) from exc
        if item is None:
            raise QMPConnectionLost("client disconnected")
        if isinstance(item, BaseException):
            raise QMPConnectionLost("connection lost while waiting for an event") from item
        return item

    def close(self) -> None:
        self._client._listeners.discard(self)

    def __enter__(self) -> EventListener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[JSON]:
        return self

    async def __anext__(self) -> JSON:
        try:
            return await self.get()
        except QMPConnectionLost:
            raise StopAsyncIteration from None


class QMPClient:
    """One QMP connection to one QEMU monitor."""

    def __init__(self, *, name: str = "qmp") -> None:
        self.name = name
        self._runstate = Runstate.IDLE
        self._stream: MessageStream | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[JSON]] = {}
        self._listeners: set[EventListener] = set()
        self._ids = itertools.count(1)
        self._lost: BaseException | None = None
        self._fd_lock = asyncio.Lock()
        self.greeting: JSON = {}

    @property
    def runstate(self) -> Runstate:
        return self._runstate

    def _require(self, operation: str, required: Runstate) -> None:
        if self._runstate is not required:
            raise StateError(operation, current=self._runstate.value, required=required.value)

    def _set_runstate(self, state: Runstate) -> None:
        log.debug("%s: runstate %s -> %s", self.name, self._runstate.value, state.value)
        self._runstate = state

    @classmethod
    async def connect(cls, path: Path, *, timeout: float = DEFAULT_QMP_TIMEOUT) -> QMPClient:
        """A client connected to the monitor at ``path``, capabilities negotiated."""
        client = cls(name=f"qmp:{path.name}")
        await client.open(path, timeout=timeout)
        return client

    async def open(self, path: Path, *, timeout: float = DEFAULT_QMP_TIMEOUT) -> None:
        self._require("connect", Runstate.IDLE)
        self._set_runstate(Runstate.CONNECTING)
        try:
            self._stream = await MessageStream.open_unix(path, timeout=timeout)
            await asyncio.wait_for(self._negotiate(self._stream), timeout)
        except BaseException as exc:
            await self._close_stream()
            self._set_runstate(Runstate.IDLE)
            if isinstance(exc, TimeoutError):
                raise QMPTimeout("qmp_capabilities", timeout) from exc
            raise
        self._lost = None
        self._reader_task = asyncio.create_task(self._read_loop(self._stream))
        self._set_runstate(Runstate.RUNNING)

    async def _negotiate(self, stream: MessageStream) -> None:
        greeting = await stream.read()
        if "QMP" not in greeting:
            raise QMPProtocolError("no QMP greeting", received=json.dumps(greeting).encode())
        self.greeting = greeting["QMP"]
        await stream.write({"execute": "qmp_capabilities", "id": "negotiate"})
        reply = await stream.read()
        if "error" in reply:
            error = reply["error"]
            raise QMPError(
                error.get("class", "?"),
                error.get("desc", ""),
                command="qmp_capabilities",
                arguments=None,
            )

    async def _read_loop(self, stream: MessageStream) -> None:
        try:
            while True:
                self._dispatch(await stream.read())
        except QMPConnectionLost as exc:
            self._connection_lost(exc)
        except QMPProtocolError as exc:
            log.error("%s: protocol error, dropping the connection: %s", self.name, exc)
            self._connection_lost(exc)

    def _dispatch(self, message: JSON) -> None:
        if "event" in message:
            log.debug("%s: event %s", self.name, message["event"])
            for listener in list(self._listeners):
                if listener.accepts(message):
                    listener.put(message)
            return
        future = self._pending.get(str(message.get("id")))
        if future is None:
            # A reply to a command that already timed out.
            log.debug("%s: late or unsolicited reply %s", self.name, message.get("id"))
        elif not future.done():
            future.set_result(message)

    def _connection_lost(self, cause: BaseException) -> None:
        if self._runstate is Runstate.RUNNING:
            log.info("%s: connection lost: %s", self.name, cause)
            self._lost = cause
            self._set_runstate(Runstate.DISCONNECTING)
        for future in self._pending.values():
            if not future.done():
                lost = QMPConnectionLost("connection lost while waiting for a reply")
                lost.__cause__ = cause
                future.set_exception(lost)
        for listener in list(self._listeners):
            listener.put(cause)

    async def execute(
        self,
        command: str,
        arguments: JSON | None = None,
        *,
        timeout: float | None = None,
        fds: Sequence[int] = (),
    ) -> Any:
        """Runs ``command``; its ``return`` value, or ``QMPError`` with the server's class and desc.
        ``fds`` go with the command (``add-fd``, ``getfd``)."""
        if self._lost is not None:
            raise QMPConnectionLost(f"{command}: connection lost") from self._lost
        self._require(f"execute {command}", Runstate.RUNNING)
        assert self._stream is not None
        limit = qmp_timeout(command) if timeout is None else timeout
        message_id = f"vmo-{next(self._ids)}"
        message: JSON = {"execute": command, "id": message_id}
        if arguments is not None:
            message["arguments"] = arguments
        future: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        log.debug("%s: -> %s %s", self.name, command, message_id)
        try:
            if fds:
                # QEMU keeps only the last descriptors received for the next command that takes
                # them: one command with descriptors in flight at a time
                async with self._fd_lock:
                    await self._stream.write_with_fds(message, fds)
                    reply = await asyncio.wait_for(future, limit)
            else:
                await self._stream.write(message)
                reply = await asyncio.wait_for(future, limit)
        except TimeoutError as exc:
            raise QMPTimeout(command, limit) from exc
        finally:
            del self._pending[message_id]
        if "error" in reply:
            error = reply["error"]
            raise QMPError(
                error.get("class", "?"), error.get("desc", ""), command=command, arguments=arguments
            )
        return reply.get("return")

    def listen(self, *names: str) -> EventListener:
        """An open listener for the named events (all events if none are named)."""
        self._require("listen", Runstate.RUNNING)
        listener = EventListener(self, names)
        self._listeners.add(listener)
        return listener

    async def events(self) -> AsyncGenerator[JSON, None]:
        """Every event from now until the connection ends."""
        with self.listen() as listener:
            async for event in listener:
                yield event

    async def wait_event(self, name: str, timeout: float) -> JSON:
        """The next ``name`` event arriving after this call."""
        with self.listen(name) as listener:
            return await listener.get(timeout)

    async def query_status(self) -> VMRunState:
        status = await self.execute("query-status")
        return VMRunState(status["status"])

    async def _close_stream(self) -> None:
        if self._stream is not None:
            await self._stream.close()
            self._stream = None

    async def disconnect(self) -> None:
        """Closes the connection; idempotent. QEMU keeps running."""
        if self._runstate is Runstate.IDLE:
            return
        self._set_runstate(Runstate.DISCONNECTING)
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
        await self._close_stream()
        for listener in list(self._listeners):
            listener.put(None)
        self._set_runstate(Runstate.IDLE)

    async def __aenter__(self) -> QMPClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()
