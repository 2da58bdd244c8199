"""Live disk snapshots and merges on a running QEMU.

A snapshot moves the guest's disks onto fresh, empty qcow2 overlays in one ``transaction``
(every disk switches at the same instant, so a multi-disk snapshot is crash-consistent as a
whole): the old tops become read-only backing layers, which is what the snapshot keeps.

QEMU runs as an unprivileged user that cannot open files in the pool, so each overlay is opened
here and handed over by file descriptor (``add-fd``). Only a read-write one: with a read-only
descriptor beside it QEMU reopens the layer read-only once a further snapshot covers it, and the
read-write open file description, still held by the fdset, keeps the image locks it had (locks
belong to open file descriptions, not descriptors); the merge that later reopens the layer
read-write then fails with 'Failed to get "write" lock' (measured, QEMU 7.2). Without one, that
reopen fails quietly and the layer stays open read-write, its permissions narrowed all the same.
The fdset's ``opaque`` names the node and the file, so the node of a layer can be found later.

A merge (``block-stream``) copies a layer that is no longer needed into the layer above it and
drops it from the running chain; the child's header then names the layer's backing file by the
relative name VMO gives (QEMU would write ``/dev/fdset/N``). ``merge_layer`` also lets go of
the merged node and its descriptors, so that the file's space is freed once it is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmo.engine.qemu.errors import QemuError, QMPError
from vmo.engine.qemu.qmp import QMPClient

log = logging.getLogger(__name__)

JSON = dict[str, Any]
_JOB_TIMEOUT = 600.0
# an fdset's opaque: "vmo-layer:<node>:<path>"
_OPAQUE = "vmo-layer"
_JOB_END = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


@dataclass(frozen=True)
class Overlay:
    """One disk's switch: its current top node and the new (empty) overlay file for it."""

    disk: str
    node: str
    path: Path
    new_node: str = ""

    def named(self) -> Overlay:
        if self.new_node:
            return self
        return Overlay(self.disk, self.node, self.path, f"snap-{uuid.uuid4().hex[:12]}")


def _opaque(node: str, path: Path) -> str:
    return f"{_OPAQUE}:{node}:{path}"


def _parse_opaque(opaque: str) -> tuple[str, str] | None:
    """(node, path) from an opaque VMO wrote; None for anything else."""
    kind, _, rest = opaque.partition(":")
    node, sep, path = rest.partition(":")
    return (node, path) if kind == _OPAQUE and sep else None


async def _pass_fds(qmp: QMPClient, path: Path, opaque: str) -> int:
    """Adds a read-write descriptor of ``path`` to a new fdset; its id."""
    rw = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        added = await qmp.execute("add-fd", {"opaque": opaque}, fds=[rw])
        return int(added["fdset-id"])
    finally:
        os.close(rw)


async def _remove_fdset(qmp: QMPClient, fdset: int) -> None:
    with contextlib.suppress(QemuError):
        await qmp.execute("remove-fd", {"fdset-id": fdset})


async def _fdsets(qmp: QMPClient) -> list[tuple[int, str, str]]:
    """(fdset id, node, path) of every fdset VMO passed."""
    found = []
    for fdset in await qmp.execute("query-fdsets"):
        for fd in fdset.get("fds") or []:
            parsed = _parse_opaque(str(fd.get("opaque") or ""))
            if parsed is not None:
                found.append((int(fdset["fdset-id"]), *parsed))
                break
    return found


async def release_fds(qmp: QMPClient, node: str) -> None:
    """Closes QEMU's descriptors of the layer passed for ``node`` (once no node uses them)."""
    for fdset, owner, _ in await _fdsets(qmp):
        if owner == node:
            await _remove_fdset(qmp, fdset)


async def _named_nodes(qmp: QMPClient) -> list[JSON]:
    nodes: list[JSON] = await qmp.execute("query-named-block-nodes", {"flat": True})
    return nodes


async def _cache_of(qmp: QMPClient, node: str) -> JSON:
    """The cache options of ``node`` (an overlay must behave as the layer under it did)."""
    for info in await _named_nodes(qmp):
        if info.get("node-name") == node:
            cache = info.get("cache") or {}
            return {k: bool(cache[k]) for k in ("direct", "no-flush") if k in cache}
    return {}


async def add_overlay(
    qmp: QMPClient, overlay: Overlay, *, cache: Mapping[str, bool] | None = None
) -> int:
    """``blockdev-add`` of the overlay file (without its backing: the snapshot links it); the
    fdset id. ``cache``: ``direct`` / ``no-flush``, as the disk's other layers have them."""
    cache = cache or {}
    fdset = await _pass_fds(qmp, overlay.path, _opaque(overlay.new_node, overlay.path))
    try:
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": overlay.new_node,
                "file": {
                    "driver": "file",
                    "filename": f"/dev/fdset/{fdset}",
                    "discard": "unmap",
                    "cache": dict(cache),
                    # QEMU cannot reopen the overlay read-only once a later snapshot covers it
                    # (only the read-write descriptor is in its fdset), so it would keep the
                    # image's write lock and no other QEMU (a linked clone's) could open it as
                    # a backing file. VMO itself makes sure only the top layer is ever written.
                    "locking": "off",
                },
                "cache": dict(cache),
                "discard": "unmap",
                "backing": None,
            },
        )
    except BaseException:
        await _remove_fdset(qmp, fdset)
        raise
    return fdset


async def snapshot_disks(qmp: QMPClient, overlays: Sequence[Overlay]) -> list[Overlay]:
    """Moves every disk onto its overlay at once; the overlays with their node names.

    On failure nothing changed: the added overlay nodes are deleted again, their descriptors
    closed, and the disks still write to their old tops.
    """
    named = [o.named() for o in overlays]
    added: list[tuple[str, int]] = []
    try:
        for overlay in named:
            cache = await _cache_of(qmp, overlay.node)
            added.append((overlay.new_node, await add_overlay(qmp, overlay, cache=cache)))
        actions = [
            {"type": "blockdev-snapshot", "data": {"node": o.node, "overlay": o.new_node}}
            for o in named
        ]
        await qmp.execute("transaction", {"actions": actions})
    except BaseException:
        for node, fdset in added:
            with contextlib.suppress(QemuError):
                await qmp.execute("blockdev-del", {"node-name": node})
            await _remove_fdset(qmp, fdset)
        raise
    return named


async def node_of(qmp: QMPClient, path: Path, known: Mapping[str, str]) -> str | None:
    """The format node QEMU has ``path`` open as: from ``known`` (path -> node of the overlays
    VMO added by descriptor), else the node named in the fdset VMO passed for that file, else
    matched by the file's identity among the nodes QEMU opened by name."""
    if str(path) in known:
        return known[str(path)]
    nodes = await _named_nodes(qmp)
    names = {str(n.get("node-name")) for n in nodes}
    for _, node, passed in await _fdsets(qmp):
        if passed == str(path) and node in names:
            return node
    with contextlib.suppress(OSError):
        target = path.stat()
        for info in nodes:
            filename = str(info.get("file") or "")
            if info.get("drv") != "qcow2" or not filename.startswith("/"):
                continue
            with contextlib.suppress(OSError):
                st = os.stat(filename)
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    return str(info["node-name"])
    return None


async def stream_into(
    qmp: QMPClient,
    device: str,
    base: str | None,
    backing_name: str | None,
    *,
    timeout: float = _JOB_TIMEOUT,
) -> None:
    """Copies everything between ``device`` and ``base`` (exclusive; the whole chain below when
    None) into ``device`` and drops those layers from the chain; waits for the job's end.
    ``backing_name`` is what the device's header then names as its backing file (relative, as
    the pool writes them: QEMU would write an fdset's name).

    ``QemuError`` when the job fails, is cancelled, or outlasts ``timeout`` (it is cancelled
    then: the chain stays as it was, with what was already copied)."""
    job = f"merge-{uuid.uuid4().hex[:8]}"
    arguments: JSON = {"job-id": job, "device": device, "auto-dismiss": True}
    if base is not None:
        arguments["base-node"] = base
        if backing_name is not None:
            arguments["backing-file"] = backing_name
    with qmp.listen(*_JOB_END) as events:
        await qmp.execute("block-stream", arguments)
        try:
            async with asyncio.timeout(timeout):
                async for event in events:
                    data = event.get("data") or {}
                    if data.get("device") != job:
                        continue
                    if event.get("event") == "BLOCK_JOB_CANCELLED":
                        raise QemuError(f"merging into {device} was cancelled")
                    if data.get("error"):
                        raise QemuError(f"merging into {device} failed: {data['error']}")
                    return
        except TimeoutError:
            with contextlib.suppress(QemuError):
                await qmp.execute("block-job-cancel", {"device": job, "force": True})
            raise QemuError(f"merging into {device} did not finish in {timeout:g} s") from None
    raise QemuError(f"merging into {device}: the QMP connection was lost before the job ended")


async def drop_node(qmp: QMPClient, node: str) -> None:
    """Deletes a format node nothing stands on any more (a merged layer), the file node under
    it when that was added by name (``-blockdev``), and the descriptors VMO passed for it."""
    info = next((n for n in await _named_nodes(qmp) if n.get("node-name") == node), None)
    if info is None:
        await release_fds(qmp, node)
        return
    await qmp.execute("blockdev-del", {"node-name": node})
    filename = info.get("file")
    for other in await _named_nodes(qmp):
        name = str(other.get("node-name") or "")
        if other.get("drv") == "file" and other.get("file") == filename and name[:1] != "#":
            with contextlib.suppress(QMPError):  # still in use by another node: it stays
                await qmp.execute("blockdev-del", {"node-name": name})
    await release_fds(qmp, node)


async def merge_layer(
    qmp: QMPClient,
    layer: Path,
    child: Path,
    under: Path | None,
    known: Mapping[str, str],
    *,
    timeout: float = _JOB_TIMEOUT,
) -> None:
    """Merges ``layer`` into ``child`` in the running chain (``under``: the layer's backing file,
    None when it has none) and lets go of the layer's node; the caller then deletes its file.
    ``known``: path -> node of the overlays VMO added (see ``node_of``).

    ``QemuError`` when QEMU does not have ``child`` (or ``under``) open, or the merge fails."""
    device = await node_of(qmp, child, known)
    if device is None:
        raise QemuError(f"QEMU has no node for {child.name}: cannot merge {layer.name} into it")
    base: str | None = None
    backing_name: str | None = None
    if under is not None:
        base = await node_of(qmp, under, known)
        if base is None:
            raise QemuError(f"QEMU has no node for {under.name}, the layer under {layer.name}")
        backing_name = os.path.relpath(under, child.parent)
    merged = await node_of(qmp, layer, known)
    await stream_into(qmp, device, base, backing_name, timeout=timeout)
    if merged is not None:
        await drop_node(qmp, merged)
