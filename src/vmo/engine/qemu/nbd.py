"""An asyncio NBD client, for reading what QEMU exports: a disk's data and its block status
(allocation, and the dirty extents of a bitmap, ``qemu:dirty-bitmap:NAME``).

Hand-written because no well-kept Python library speaks NBD under asyncio (libnbd's Python
binding is blocking and comes only with the system's Python). Only what a backup needs: the
fixed newstyle handshake, structured replies, ``NBD_OPT_SET_META_CONTEXT``, ``NBD_OPT_GO``,
``NBD_CMD_READ`` and ``NBD_CMD_BLOCK_STATUS``, one request in flight per connection (open more
connections for parallel reads). The protocol's constants follow the NBD protocol document.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vmo.engine.qemu.errors import QemuError

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0

CMD_READ = 0
CMD_DISC = 2
CMD_BLOCK_STATUS = 7
REPLY_FLAG_DONE = 1
REPLY_NONE = 0
REPLY_OFFSET_DATA = 1
REPLY_OFFSET_HOLE = 2
REPLY_BLOCK_STATUS = 5
REPLY_ERROR_BIT = 1 << 15

STATE_HOLE = 1
STATE_ZERO = 2
STATE_DIRTY = 1  # in a qemu:dirty-bitmap context
BASE_ALLOCATION = "base:allocation"
MAX_REQUEST = 32 << 20  # QEMU's largest read


class NBDError(QemuError):
    pass


def dirty_bitmap_context(bitmap: str) -> str:
    return f"qemu:dirty-bitmap:{bitmap}"


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    flags: int


class NBDClient:
    """One connection to one export."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.size = 0
        self.contexts: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._handle = 0

    @classmethod
    async def connect(
        cls, socket_path: Path, export: str, *, contexts: Sequence[str] = (), timeout: float = 10.0
    ) -> NBDClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(socket_path)), timeout
        )
        client = cls(reader, writer)
        try:
            await asyncio.wait_for(client._handshake(export, contexts), timeout)
        except BaseException:
            client._writer.close()
            raise
        return client

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- handshake ------------------------------------------------------------------------------

    async def _read(self, n: int) -> bytes:
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise NBDError("NBD server closed the connection") from None

    async def _option(self, option: int, data: bytes) -> None:
        self._writer.write(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        await self._writer.drain()

    async def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", await self._read(20))
        if magic != OPT_REPLY_MAGIC or opt != option:
            raise NBDError(f"bad option reply (magic {magic:#x}, option {opt})")
        data = await self._read(length)
        if rtype & REP_ERROR_BIT:
            raise NBDError(
                f"NBD option {option} refused ({rtype:#x}): {data.decode(errors='replace')}"
            )
        return rtype, data

    async def _handshake(self, export: str, contexts: Sequence[str]) -> None:
        magic, opt_magic, flags = struct.unpack(">8sQH", await self._read(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NBDError("not a fixed-newstyle NBD server")
        self._writer.write(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        await self._option(OPT_STRUCTURED_REPLY, b"")
        rtype, _ = await self._option_reply(OPT_STRUCTURED_REPLY)
        if rtype != REP_ACK:
            raise NBDError("the NBD server does not do structured replies")
        name = export.encode()
        if contexts:
            queries = b"".join(struct.pack(">I", len(c.encode())) + c.encode() for c in contexts)
            payload = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
            await self._option(OPT_SET_META_CONTEXT, payload + queries)
            while True:
                rtype, data = await self._option_reply(OPT_SET_META_CONTEXT)
                if rtype == REP_ACK:
                    break
                if rtype == REP_META_CONTEXT:
                    (cid,) = struct.unpack(">I", data[:4])
                    self.contexts[data[4:].decode()] = cid
            missing = [c for c in contexts if c not in self.contexts]
            if missing:
                raise NBDError(f"the export has no metadata context {', '.join(missing)}")
        await self._option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            rtype, data = await self._option_reply(OPT_GO)
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and len(data) >= 12:
                info, size, _tflags = struct.unpack(">HQH", data[:12])
                if info == INFO_EXPORT:
                    self.size = size

    # --- transmission --------------------------------------------------------------------------

    async def _request(self, cmd: int, offset: int, length: int, flags: int = 0) -> int:
        self._handle += 1
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self._handle, offset, length)
        self._writer.write(header)
        await self._writer.drain()
        return self._handle

    async def _chunks(self, handle: int) -> list[tuple[int, bytes]]:
        """The structured reply chunks of one request: (type, payload)."""
        chunks: list[tuple[int, bytes]] = []
        while True:
            (magic,) = struct.unpack(">I", await self._read(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, got = struct.unpack(">IQ", await self._read(12))
                if error:
                    raise NBDError(f"NBD request failed (errno {error})")
                return chunks
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NBDError(f"bad NBD reply magic {magic:#x}")
            flags, rtype, got, length = struct.unpack(">HHQI", await self._read(16))
            if got != handle:
                raise NBDError("NBD reply for another request")
            payload = await self._read(length)
            if rtype & REPLY_ERROR_BIT:
                error, mlen = struct.unpack(">IH", payload[:6])
                message = payload[6 : 6 + mlen].decode(errors="replace")
                raise NBDError(f"NBD request failed (errno {error}): {message}")
            chunks.append((rtype, payload))
            if flags & REPLY_FLAG_DONE:
                return chunks

    async def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (holes read as zeros)."""
        if offset < 0 or offset + length > self.size:
            raise NBDError(f"read of {length} at {offset} is outside the export ({self.size})")
        out = bytearray(length)
        async with self._lock:
            done = 0
            while done < length:
                step = min(MAX_REQUEST, length - done)
                base = offset + done
                handle = await self._request(CMD_READ, base, step)
                for rtype, payload in await self._chunks(handle):
                    if rtype == REPLY_OFFSET_DATA:
                        (at,) = struct.unpack(">Q", payload[:8])
                        out[at - offset : at - offset + len(payload) - 8] = payload[8:]
                    elif rtype == REPLY_OFFSET_HOLE:
                        pass  # already zeros
                done += step
        return bytes(out)

    async def block_status(
        self, context: str, offset: int = 0, length: int | None = None
    ) -> list[Extent]:
        """The extents of ``context`` over the range (the whole export by default), merged."""
        if context not in self.contexts:
            raise NBDError(f"metadata context {context} was not negotiated")
        cid = self.contexts[context]
        end = self.size if length is None else min(self.size, offset + length)
        extents: list[Extent] = []
        async with self._lock:
            at = offset
            while at < end:
                step = min(end - at, 0xFFFFFFFF & ~0xFFFF)
                handle = await self._request(CMD_BLOCK_STATUS, at, step)
                advanced = 0
                for rtype, payload in await self._chunks(handle):
                    if rtype != REPLY_BLOCK_STATUS:
                        continue
                    (got,) = struct.unpack(">I", payload[:4])
                    if got != cid:
                        continue
                    for i in range(4, len(payload), 8):
                        elen, flags = struct.unpack(">II", payload[i : i + 8])
                        elen = min(elen, end - (at + advanced))
                        if elen <= 0:
                            break
                        _append(extents, at + advanced, elen, flags)
                        advanced += elen
                if advanced == 0:
                    raise NBDError("NBD block status made no progress")
                at += advanced
        return extents

    async def close(self) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            self._handle += 1
            self._writer.write(
                struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self._handle, 0, 0)
            )
            await self._writer.drain()
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()


def _append(extents: list[Extent], offset: int, length: int, flags: int) -> None:
    if extents and extents[-1].flags == flags and extents[-1].offset + extents[-1].length == offset:
        last = extents.pop()
        extents.append(Extent(last.offset, last.length + length, flags))
    else:
        extents.append(Extent(offset, length, flags))


__all__ = [
    "BASE_ALLOCATION",
    "STATE_DIRTY",
    "STATE_HOLE",
    "STATE_ZERO",
    "Extent",
    "NBDClient",
    "NBDError",
    "dirty_bitmap_context",
]
