"""VMI volumes to local files: pool volumes for claims and DataVolumes, ephemeral qcow2 for the rest.

``persistentVolumeClaim`` and ``dataVolume`` resolve to the node's pool volume of that name;
``ephemeral`` (a claim under a throw-away overlay), ``emptyDisk`` and ``containerDisk`` become
qcow2 files in the VMI's workdir. A ``containerDisk`` is served only from the local image store
(``<store>/<image with / : @ mapped to _>.qcow2``) since the embedded engine pulls no registries.
``cloudInitNoCloud``/``cloudInitConfigDrive`` are left to the caller (they become a seed ISO).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmo.api.quantity import QuantityError, parse_quantity
from vmo.engine.storage import qemu_img
from vmo.engine.storage.pool import InvalidVolumeName, Pool

JSON = dict[str, Any]
CLOUD_INIT = frozenset({"cloudInitNoCloud", "cloudInitConfigDrive"})
_IMAGE_CHARS = re.compile(r"[/:@]")


class VolumeError(Exception):
    """A VMI volume this node cannot provide; ``field_path`` names the spec field at fault."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field_path, self.message = field_path, message
        super().__init__(f"{field_path}: {message}")


@dataclass(frozen=True)
class ResolvedVolume:
    path: Path
    format: str  # "qcow2" or "raw", as QEMU's block driver names it
    readonly: bool = False
    # in the host-wide shared pool: opened in place by a migration's target
    shared: bool = False
    # (namespace, claim) of a node-local pool volume: copied, then moved, by a migration
    claim: tuple[str, str] | None = None
    # the file a node-local copy starts from on a target (containerDisk/ephemeral base)
    backing: Path | None = None


def virtual_size(path: Path, fmt: str) -> int:
    """The disk size a guest sees: the qcow2 header's size field, or a raw file's length."""
    if fmt == "qcow2":
        with path.open("rb") as fh:
            header = fh.read(32)
        if len(header) < 32 or header[:4] != b"QFI\xfb":
            raise ValueError(f"{path} is not a qcow2 image")
        return int.from_bytes(header[24:32], "big")
    return path.stat().st_size


def container_disk_file(image: str, store: Path) -> Path:
    """Where the local image store keeps ``image`` (``quay.io/a/b:1`` -> ``quay.io_a_b_1.qcow2``)."""
    return store / (_IMAGE_CHARS.sub("_", image) + ".qcow2")


async def _qemu_img(field: str, argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise VolumeError(
            field, f"qemu-img {argv[1]} failed: {err.decode(errors='replace').strip()}"
        )


async def _overlay(base: Path, dest: Path, field: str) -> Path:
    """A qcow2 overlay on ``base``: writes stay in ``dest``, the base is never modified."""
    if not dest.exists():
        await _qemu_img(field, qemu_img.create(dest, backing=str(base)))
    return dest


async def _blank(dest: Path, size: int, field: str) -> Path:
    if not dest.exists():
        try:
            argv = qemu_img.create(dest, size)
        except qemu_img.ImageSizeError as exc:
            raise VolumeError(field, str(exc)) from exc
        await _qemu_img(field, argv)
    return dest


def _pool_of(pools: Sequence[Pool], namespace: str, claim: str, field: str) -> Pool:
    """The pool holding the claim's volume: the node's own, else the shared one."""
    for pool in pools:
        try:
            if pool.exists(namespace, claim):
                return pool
        except InvalidVolumeName as exc:
            raise VolumeError(field, str(exc)) from exc
    raise VolumeError(field, f"no volume {claim!r} in namespace {namespace} on this node")


def _pool_volume(pools: Sequence[Pool], namespace: str, claim: str, field: str) -> Path:
    """The claim's top layer (QEMU is given layers by their own names, never the volume's link:
    it reopens files by name, and a snapshot moves the link)."""
    return _pool_of(pools, namespace, claim, field).top(namespace, claim)


def _pool_resolved(ctx: _Context, claim: str, field: str, readonly: bool) -> ResolvedVolume:
    pool = _pool_of(ctx.pools, ctx.namespace, claim, field)
    path = pool.top(ctx.namespace, claim)
    shared = ctx.shared_root is not None and pool.root == ctx.shared_root
    return ResolvedVolume(
        path, "qcow2", readonly, shared=shared, claim=None if shared else (ctx.namespace, claim)
    )


def _datavolume_ready(name: str, field: str, datavolumes: Mapping[str, JSON] | None) -> None:
    if datavolumes is None:
        return
    dv = datavolumes.get(name)
    phase = ((dv or {}).get("status") or {}).get("phase")
    if phase != "Succeeded":
        raise VolumeError(field, f"DataVolume {name} is not ready (phase {phase or 'unknown'})")


def _capacity(value: Any, field: str) -> int:
    try:
        return int(parse_quantity(value))
    except QuantityError as exc:
        raise VolumeError(field, str(exc)) from exc


@dataclass(frozen=True)
class _Context:
    pools: Sequence[Pool]
    shared_root: Path | None
    namespace: str
    workdir: Path
    image_store: Path | None
    datavolumes: Mapping[str, JSON] | None


async def _resolve_one(volume: JSON, base: str, ctx: _Context) -> ResolvedVolume | None:
    name = str(volume.get("name", ""))
    if "persistentVolumeClaim" in volume:
        src = volume["persistentVolumeClaim"] or {}
        field = f"{base}.persistentVolumeClaim.claimName"
        return _pool_resolved(ctx, str(src.get("claimName", "")), field, bool(src.get("readOnly")))
    if "dataVolume" in volume:
        dv_name = str((volume["dataVolume"] or {}).get("name", ""))
        field = f"{base}.dataVolume.name"
        _datavolume_ready(dv_name, field, ctx.datavolumes)
        return _pool_resolved(ctx, dv_name, field, False)
    if "ephemeral" in volume:
        claim = ((volume["ephemeral"] or {}).get("persistentVolumeClaim") or {}).get("claimName")
        field = f"{base}.ephemeral.persistentVolumeClaim.claimName"
        source = _pool_volume(ctx.pools, ctx.namespace, str(claim or ""), field)
        return ResolvedVolume(
            await _overlay(source, ctx.workdir / f"ephemeral-{name}.qcow2", field),
            "qcow2",
            backing=source,
        )
    if "emptyDisk" in volume:
        field = f"{base}.emptyDisk.capacity"
        size = _capacity((volume["emptyDisk"] or {}).get("capacity"), field)
        disk = await _blank(ctx.workdir / f"emptydisk-{name}.qcow2", size, field)
        return ResolvedVolume(disk, "qcow2")
    if "containerDisk" in volume:
        return await _container_disk(volume, base, ctx)
    if CLOUD_INIT & volume.keys():
        return None
    kinds = sorted(k for k in volume if k != "name")
    kind = kinds[0] if kinds else "source"
    raise VolumeError(
        f"{base}.{kind}", "this volume type is not supported by VMO's embedded engine"
    )


async def _container_disk(volume: JSON, base: str, ctx: _Context) -> ResolvedVolume:
    image = str((volume["containerDisk"] or {}).get("image", ""))
    field = f"{base}.containerDisk.image"
    if ctx.image_store is None:
        raise VolumeError(field, "containerDisk needs a local image store; none is configured")
    source = container_disk_file(image, ctx.image_store)
    if not source.is_file():
        raise VolumeError(
            field,
            f"container image {image!r} is not in the local image store (expected {source}); "
            "VMO's embedded engine pulls no registries: use a DataVolume or add the image there",
        )
    name = str(volume.get("name", ""))
    return ResolvedVolume(
        await _overlay(source, ctx.workdir / f"containerdisk-{name}.qcow2", field),
        "qcow2",
        backing=source,
    )


async def resolve_volumes(
    vmi: JSON,
    pool: Pool,
    *,
    workdir: Path,
    image_store: Path | None = None,
    datavolumes: Mapping[str, JSON] | None = None,
    shared_pool: Pool | None = None,
) -> dict[str, ResolvedVolume]:
    """Each VMI volume's local file (cloud-init volumes excluded); raises ``VolumeError``.

    ``datavolumes`` (name -> DataVolume in the VMI's namespace), when given, must show a
    ``dataVolume`` source as Succeeded; the pool only ever holds complete volumes anyway.
    """
    namespace = str((vmi.get("metadata") or {}).get("namespace") or "default")
    pools = [pool] + ([shared_pool] if shared_pool is not None else [])
    shared_root = shared_pool.root if shared_pool is not None else None
    ctx = _Context(pools, shared_root, namespace, workdir, image_store, datavolumes)
    workdir.mkdir(parents=True, exist_ok=True)
    resolved: dict[str, ResolvedVolume] = {}
    for index, volume in enumerate((vmi.get("spec") or {}).get("volumes") or []):
        found = await _resolve_one(volume, f"spec.volumes[{index}]", ctx)
        if found is not None:
            resolved[str(volume.get("name", ""))] = found
    return resolved
