"""A small QEMU guest agent client over the same framing as QMP.

The agent's channel is a byte pipe into the guest that may hold stale replies from an earlier
client, so every session (and every session after a timeout) starts with the
``guest-sync-delimited`` handshake: the agent answers with a 0xFF sentinel before its reply, and
everything before the sentinel is discarded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from pathlib import Path
from types import TracebackType
from typing import Any

from vmo.api.types import JSON
from vmo.engine.qemu.errors import QMPConnectionLost, QMPError, QMPTimeout
from vmo.engine.qemu.qmp import MessageStream, qmp_timeout

__all__ = ["GUEST_AGENT_NO_REPLY", "GuestAgentClient"]

log = logging.getLogger("vmo.engine.qemu.guest_agent")

_SENTINEL = b"\xff"
# Commands after which the agent (or the whole guest) goes away without answering.
GUEST_AGENT_NO_REPLY = frozenset({"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram"})


class GuestAgentClient:
    """One session with the guest agent behind a QEMU ``virtserialport`` chardev socket."""

    def __init__(self, stream: MessageStream, *, name: str) -> None:
        self._stream = stream
        self.name = name
        self._lock = asyncio.Lock()
        self._synced = False
        # Random start: sync ids must not repeat across sessions sharing one channel.
        self._ids = itertools.count(random.randrange(1, 1 << 30))

    @classmethod
    async def connect(cls, path: Path, *, timeout: float = 5.0) -> GuestAgentClient:
        """Connects and synchronises; ``QMPTimeout`` if no agent answers within ``timeout``."""
        client = cls(await MessageStream.open_unix(path, timeout=timeout), name=f"qga:{path.name}")
        try:
            async with client._lock:
                await client._sync(timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def _sync(self, timeout: float) -> None:
        sync_id = next(self._ids)
        # A lone 0xFF resets the agent's JSON parser after a half-written request.
        await self._stream.write_raw(_SENTINEL)
        await self._stream.write({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}})
        try:
            await asyncio.wait_for(self._read_sync_reply(sync_id), timeout)
        except TimeoutError as exc:
            raise QMPTimeout("guest-sync-delimited", timeout) from exc
        self._synced = True
        log.debug("%s: synchronised with id %d", self.name, sync_id)

    async def _read_sync_reply(self, sync_id: int) -> None:
        while True:
            await self._stream.skip_past(_SENTINEL)
            reply = await self._stream.read()
            if reply.get("return") == sync_id:
                return

    async def execute(
        self, command: str, arguments: JSON | None = None, *, timeout: float | None = None
    ) -> Any:
        """Runs an agent command; its ``return`` value, or ``QMPError``."""
        limit = qmp_timeout(command) if timeout is None else timeout
        async with self._lock:
            if not self._synced:
                await self._sync(min(limit, qmp_timeout("guest-sync-delimited")))
            message: JSON = {"execute": command}
            if arguments is not None:
                message["arguments"] = arguments
            await self._stream.write(message)
            if command in GUEST_AGENT_NO_REPLY:
                return None
            try:
                reply = await asyncio.wait_for(self._stream.read(), limit)
            except TimeoutError as exc:
                # The reply may still come; only a new handshake can tell it from the next one.
                self._synced = False
                raise QMPTimeout(command, limit) from exc
            except QMPConnectionLost:
                self._synced = False
                raise
        if "error" in reply:
            error = reply["error"]
            raise QMPError(
                error.get("class", "?"), error.get("desc", ""), command=command, arguments=arguments
            )
        return reply.get("return")

    async def ping(self) -> None:
        await self.execute("guest-ping")

    async def info(self) -> JSON:
        result: JSON = await self.execute("guest-info")
        return result

    async def osinfo(self) -> JSON:
        result: JSON = await self.execute("guest-get-osinfo")
        return result

    async def network_interfaces(self) -> list[JSON]:
        result: list[JSON] = await self.execute("guest-network-get-interfaces")
        return result

    async def fsfreeze_freeze(self) -> int:
        """Freezes guest filesystems; the number frozen."""
        return int(await self.execute("guest-fsfreeze-freeze"))

    async def fsfreeze_thaw(self) -> int:
        """Thaws guest filesystems; the number thawed."""
        return int(await self.execute("guest-fsfreeze-thaw"))

    async def fsfreeze_status(self) -> str:
        return str(await self.execute("guest-fsfreeze-status"))

    async def close(self) -> None:
        await self._stream.close()

    async def __aenter__(self) -> GuestAgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
