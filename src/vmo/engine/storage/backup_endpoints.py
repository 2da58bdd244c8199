"""A pull-mode backup's ``data`` and ``map`` endpoints, as KubeVirt's export server serves them
(``.../virtualmachineexports/<name>/exports/<volume>/{data,map}``), read from the NBD export of
the backup's point-in-time view (``vmo.engine.qemu.backup``) on this node.

- ``GET data?offset=&length=``: the guest's bytes, raw (``application/octet-stream``, 200);
  length 0 or none means to the end of the disk; an offset past the end is refused.
- ``GET map?offset=&length=&page_size=``: ``{"extents": [{offset, length, type, description}],
  "next_offset": n | null}``, at most ``page_size`` (default 512) extents a page, equal neighbours
  coalesced. A full backup maps ``base:allocation`` (type bit 0 hole, bit 1 zero: ``data``,
  ``hole``, ``zero``, ``hole,zero``); an incremental one merges the zero bit with the dirty bitmap
  (bit 0 dirty: ``clean``, ``dirty``, ``zero``, ``dirty,zero``), as upstream's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from vmo.engine.qemu.nbd import (
    BASE_ALLOCATION,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
    Extent,
    NBDClient,
    NBDError,
    dirty_bitmap_context,
)

READ_CHUNK = 256 << 10  # upstream's read size
PAGE_SIZE = 512
FULL_DESCRIPTIONS = {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}
INCREMENTAL_DESCRIPTIONS = {0: "clean", 1: "dirty", 2: "zero", 3: "dirty,zero"}


@dataclass(frozen=True)
class BackupVolume:
    """One volume of a pull-mode backup: where its NBD export is, and its frozen bitmap."""

    socket: Path
    export: str
    bitmap: str | None  # None: a full backup

    @property
    def contexts(self) -> list[str]:
        return [BASE_ALLOCATION] + ([dirty_bitmap_context(self.bitmap)] if self.bitmap else [])


def _int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a non-negative integer\n") from None
    if value < 0:
        raise web.HTTPBadRequest(text=f"{name} must be a non-negative integer\n")
    return value


async def _connect(volume: BackupVolume) -> NBDClient:
    try:
        return await NBDClient.connect(volume.socket, volume.export, contexts=volume.contexts)
    except (NBDError, OSError) as exc:
        raise web.HTTPServiceUnavailable(
            text=f"the backup's export is not available: {exc}\n"
        ) from None


async def serve_data(request: web.Request, volume: BackupVolume) -> web.StreamResponse:
    if request.method != "GET":
        raise web.HTTPMethodNotAllowed(request.method, ["GET"])
    offset, length = _int(request, "offset", 0), _int(request, "length", 0)
    nbd = await _connect(volume)
    try:
        if offset >= nbd.size:
            raise web.HTTPBadRequest(text=f"offset {offset} is past the disk's end ({nbd.size})\n")
        end = nbd.size if length == 0 else min(nbd.size, offset + length)
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/octet-stream"
        resp.content_length = end - offset
        await resp.prepare(request)
        at = offset
        while at < end:
            step = min(READ_CHUNK, end - at)
            await resp.write(await nbd.pread(at, step))
            at += step
        await resp.write_eof()
        return resp
    finally:
        await nbd.close()


def merge_incremental(allocation: Sequence[Extent], dirty: Sequence[Extent]) -> list[Extent]:
    """One extent list from two that cover the same range: bit 0 dirty, bit 1 zero."""
    out: list[Extent] = []
    i = j = 0
    at = allocation[0].offset if allocation else 0
    while i < len(allocation) and j < len(dirty):
        a, d = allocation[i], dirty[j]
        end = min(a.offset + a.length, d.offset + d.length)
        flags = (1 if d.flags & STATE_DIRTY else 0) | (2 if a.flags & STATE_ZERO else 0)
        if end > at:
            _push(out, at, end - at, flags)
            at = end
        if a.offset + a.length <= end:
            i += 1
        if d.offset + d.length <= end:
            j += 1
    return out


def _push(out: list[Extent], offset: int, length: int, flags: int) -> None:
    if out and out[-1].flags == flags and out[-1].offset + out[-1].length == offset:
        last = out.pop()
        out.append(Extent(last.offset, last.length + length, flags))
    else:
        out.append(Extent(offset, length, flags))


def full_flags(extent: Extent) -> int:
    return (1 if extent.flags & STATE_HOLE else 0) | (2 if extent.flags & STATE_ZERO else 0)


async def serve_map(request: web.Request, volume: BackupVolume) -> web.Response:
    if request.method != "GET":
        raise web.HTTPMethodNotAllowed(request.method, ["GET"])
    offset, length = _int(request, "offset", 0), _int(request, "length", 0)
    page = _int(request, "page_size", PAGE_SIZE) or PAGE_SIZE
    nbd = await _connect(volume)
    try:
        if offset >= nbd.size:
            raise web.HTTPBadRequest(text=f"offset {offset} is past the disk's end ({nbd.size})\n")
        span = None if length == 0 else length
        allocation = await nbd.block_status(BASE_ALLOCATION, offset, span)
        if volume.bitmap is not None:
            dirty = await nbd.block_status(dirty_bitmap_context(volume.bitmap), offset, span)
            extents = merge_incremental(allocation, dirty)
            names = INCREMENTAL_DESCRIPTIONS
        else:
            extents = []
            for e in allocation:
                _push(extents, e.offset, e.length, full_flags(e))
            names = FULL_DESCRIPTIONS
    finally:
        await nbd.close()
    shown = extents[:page]
    body: dict[str, Any] = {
        "extents": [
            {"offset": e.offset, "length": e.length, "type": e.flags, "description": names[e.flags]}
            for e in shown
        ],
        "next_offset": extents[page].offset if len(extents) > page else None,
    }
    return web.json_response(body)


__all__ = ["BackupVolume", "merge_incremental", "serve_data", "serve_map"]
