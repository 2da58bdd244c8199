"""Disk hotplug on a running QEMU: a qcow2 volume onto the virtio-scsi controller, and off again.

Attaching is ``blockdev-add`` (the volume's qcow2 chain, each layer handed over by file
descriptor: QEMU runs as an unprivileged user that cannot open the pool's files) then
``device_add`` of a ``scsi-hd``. Detaching is ``device_del``, waiting for ``DEVICE_DELETED``, then
``blockdev-del`` and closing the descriptors. Both are idempotent and read their state from QEMU
(its block nodes and peripheral devices), so an agent that restarted halfway finishes the job.
A device QEMU does not report deleted in time stays attached, with its node: never half-removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmo.engine.qemu import fdsets, snapshot
from vmo.engine.qemu.argv import SCSI_CONTROLLER
from vmo.engine.qemu.errors import QemuError, QMPError, QMPTimeout
from vmo.engine.qemu.qmp import EventListener, QMPClient

__all__ = [
    "DETACH_TIMEOUT",
    "DetachTimeout",
    "HotplugDisk",
    "attach",
    "attached_devices",
    "block_nodes",
    "detach",
    "device_id",
    "layer_chain",
    "node_name",
]

JSON = dict[str, Any]
DETACH_TIMEOUT = 30.0
# an fdset's opaque: "vmo-hotplug:<node>:<path>"
_OPAQUE = "vmo-hotplug"


class DetachTimeout(QemuError):
    """QEMU did not report the device deleted in time; the disk stays attached."""


def node_name(volume: str) -> str:
    """The block node of a hot-plugged volume: short (QEMU allows 31 bytes) and stable."""
    return "hp-" + hashlib.sha256(volume.encode()).hexdigest()[:12]


def device_id(volume: str) -> str:
    return f"ua-{volume}"  # as argv names the disks it starts with


@dataclass(frozen=True)
class HotplugDisk:
    """One disk to attach: the volume's layers, top first (each names the next as backing)."""

    volume: str
    layers: tuple[Path, ...]
    readonly: bool = False
    serial: str | None = None
    direct: bool = False

    @property
    def node(self) -> str:
        return node_name(self.volume)

    @property
    def device(self) -> str:
        return device_id(self.volume)


def layer_chain(top: Path, *, limit: int = 256) -> tuple[Path, ...]:
    """``top`` and the files under it, read from the qcow2 headers (backing names are relative
    to the layer's directory, as the pool writes them)."""
    chain = [top]
    while len(chain) < limit:
        with chain[-1].open("rb") as fh:
            head = fh.read(32)
            if len(head) < 32 or head[:4] != b"QFI\xfb":
                raise QemuError(f"{chain[-1]} is not a qcow2 image")
            offset = int.from_bytes(head[8:16], "big")
            length = int.from_bytes(head[16:20], "big")
            if not offset or not length:
                return tuple(chain)
            fh.seek(offset)
            name = fh.read(length).decode(errors="replace")
        chain.append(Path(os.path.normpath(chain[-1].parent / name)))
    raise QemuError(f"{top}: backing chain longer than {limit}")


async def block_nodes(qmp: QMPClient) -> set[str]:
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    return {str(n.get("node-name")) for n in nodes or []}


async def attached_devices(qmp: QMPClient) -> set[str]:
    props = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
    return {str(p.get("name")) for p in props or [] if str(p.get("type", "")).startswith("child<")}


async def _pass_fd(qmp: QMPClient, path: Path, node: str, *, writable: bool) -> int:
    return await fdsets.pass_fd(qmp, path, f"{_OPAQUE}:{node}:{path}", writable=writable)


async def _release_fds(qmp: QMPClient, node: str) -> None:
    await fdsets.release_fds(qmp, f"{_OPAQUE}:{node}:")


async def _chain(qmp: QMPClient, disk: HotplugDisk) -> JSON:
    """The blockdev-add options of the whole chain; the backing chain ends in an explicit null so
    that QEMU never opens a file by the name in a header."""
    cache = {"direct": disk.direct, "no-flush": False}
    spec: JSON | None = None
    for depth, layer in reversed(list(enumerate(disk.layers))):
        top = depth == 0
        readonly = disk.readonly or not top
        fdset = await _pass_fd(qmp, layer, disk.node, writable=not readonly)
        spec = {
            "driver": "qcow2",
            "read-only": readonly,
            "cache": cache,
            "discard": "unmap",
            "file": {
                "driver": "file",
                "filename": f"/dev/fdset/{fdset}",
                "read-only": readonly,
                "cache": cache,
                "discard": "unmap",
            },
            "backing": spec,
        }
    assert spec is not None
    return {**spec, "node-name": disk.node}


async def attach(qmp: QMPClient, disk: HotplugDisk) -> None:
    """Adds the disk's block node (unless QEMU has it) and its SCSI device (unless attached)."""
    if disk.node not in await block_nodes(qmp):
        try:
            await qmp.execute("blockdev-add", await _chain(qmp, disk))
        except QemuError:
            await _release_fds(qmp, disk.node)
            raise
    if disk.device not in await attached_devices(qmp):
        device: JSON = {
            "driver": "scsi-hd",
            "bus": f"{SCSI_CONTROLLER}.0",
            "drive": disk.node,
            "id": disk.device,
            "write-cache": "off",
        }
        if disk.serial:
            device["serial"] = disk.serial
        await qmp.execute("device_add", device)


async def detach(
    qmp: QMPClient,
    volume: str,
    *,
    nodes: Sequence[str] = (),
    timeout: float = DETACH_TIMEOUT,
) -> None:
    """Unplugs the volume's device, then deletes its block nodes, top first (``nodes``: those of
    a disk QEMU started with, or the overlays snapshots put on a hot-plugged one and that one;
    by default the hot-plugged node). ``DetachTimeout`` leaves both in place."""
    device = device_id(volume)
    if device in await attached_devices(qmp):
        with qmp.listen("DEVICE_DELETED") as listener:
            try:
                await qmp.execute("device_del", {"id": device})
            except QMPError as exc:
                if device in await attached_devices(qmp):
                    raise
                del exc  # it went away meanwhile
            else:
                await _wait_deleted(listener, device, timeout)
    present = await block_nodes(qmp)
    for node in nodes or [node_name(volume)]:
        if node in present:
            await qmp.execute("blockdev-del", {"node-name": node})
        await _release_fds(qmp, node)
        await snapshot.release_fds(qmp, node)  # a live snapshot's overlay


async def _wait_deleted(listener: EventListener, device: str, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise QMPTimeout("DEVICE_DELETED", timeout)
            event = await listener.get(remaining)
        except QMPTimeout:
            raise DetachTimeout(
                f"device {device}: QEMU did not report it deleted within {timeout:.0f}s "
                "(the guest has not released it); the disk stays attached"
            ) from None
        if (event.get("data") or {}).get("device") == device:
            return
