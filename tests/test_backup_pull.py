"""The pull-mode data path end to end, without a guest: a real QEMU's point-in-time backup
(``vmo.engine.qemu.backup``), served over HTTPS by the node's export server with upstream's
``data`` and ``map`` endpoints and token, read by VMO's backup application as a KubeVirt client
would (``EndpointSource``) into a repository, and restored; every restore is compared byte for
byte with a model of the disk at that backup's instant."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.test_qemu_backup import MIB, SIZE, Qemu, home  # noqa: F401 - the fixture
from vmo.controllers.backup.disk import FileTarget, backup_disk, restore_disk
from vmo.controllers.backup.endpoints import EndpointError, EndpointSource
from vmo.controllers.backup.repository import DiskIndex, Repository, local_store
from vmo.engine.qemu import backup as qb
from vmo.engine.storage.backup_endpoints import BackupVolume
from vmo.engine.storage.export import ExportPki, ExportServer, ServedExport, volume_path_prefix

NS, NAME, TOKEN = "virtual-machines", "nightly", "s3cret-token"
on_loop = pytest.mark.asyncio(loop_scope="function")


class Disk:
    """What the guest's disk holds, written alongside QEMU."""

    def __init__(self, qemu: Qemu) -> None:
        self.qemu = qemu
        self.bytes = bytearray(SIZE)
        self.bytes[: 4 * MIB] = bytes([1]) * (4 * MIB)  # the home fixture's first write

    async def write(self, offset: int, length: int, pattern: int) -> None:
        await self.qemu.write(offset, length, pattern)
        self.bytes[offset : offset + length] = bytes([pattern]) * length


@pytest_asyncio.fixture
async def served(home: Path) -> AsyncIterator[tuple[Qemu, ExportServer]]:  # noqa: F811
    qemu = Qemu(home)
    await qemu.start()
    server = ExportServer(ExportPki(home / "pki"))
    await server.start()
    try:
        yield qemu, server
    finally:
        await server.stop()
        await qemu.stop()


def urls(server: ExportServer, volume: str = "root") -> tuple[str, str]:
    base = server.base_url + volume_path_prefix(NS, NAME) + f"/exports/{volume}"
    return base + "/data", base + "/map"


def publish(server: ExportServer, export: qb.BackupExport) -> None:
    disk = export.disks[0]
    volume = BackupVolume(export.socket, disk.volume, disk.frozen_bitmap)
    server.register(ServedExport(NS, NAME, TOKEN, {}, {disk.volume: volume}))


async def pull(
    repo: Repository, server: ExportServer, *, parent: DiskIndex | None, incremental: bool
) -> DiskIndex:
    data, mapping = urls(server)
    async with EndpointSource(
        data, mapping, TOKEN, ca_pem=server.pki.ca_pem(), incremental=incremental
    ) as source:
        assert source.size == SIZE
        changed = source.changed() if incremental else None
        index, stats = await backup_disk(repo, "root", source, parent=parent, changed=changed)
        if incremental:
            cs = repo.chunk_size
            touched = {i for o, n in changed or [] for i in range(o // cs, (o + n - 1) // cs + 1)}
            assert changed and stats.read == len(touched) * cs  # only the chunks written to
    return index


async def restored(repo: Repository, index: DiskIndex, path: Path) -> bytes:
    target = FileTarget(path, index.size, fresh=True)
    try:
        await restore_disk(repo, index, target)
    finally:
        target.close()
    return path.read_bytes()


@on_loop
async def test_full_then_incremental_pull_backups_restore_each_instant(
    served: tuple[Qemu, ExportServer], tmp_path: Path
) -> None:
    qemu, server = served
    assert qemu.qmp is not None
    disk = Disk(qemu)
    repo = await Repository.init(local_store(tmp_path / "repo"), chunk_size=256 << 10)
    at_first = bytes(disk.bytes)
    first = await qb.start(
        qemu.qmp, "b1", qb_disks(), checkpoint="c1", since=None, workdir=qemu.home,
        socket=qemu.home / "b1.nbd",
    )  # fmt: skip
    publish(server, first)
    await disk.write(0, 64 << 10, 9)  # after the instant: not in the first backup
    index1 = await pull(repo, server, parent=None, incremental=False)
    await qb.finish(qemu.qmp, first, success=True)
    server.unregister(NS, NAME)
    assert await restored(repo, index1, tmp_path / "1.img") == at_first

    await disk.write(MIB, 64 << 10, 2)
    await disk.write(10 * MIB, 128 << 10, 3)
    at_second = bytes(disk.bytes)
    second = await qb.start(
        qemu.qmp, "b2", qb_disks(), checkpoint="c2", since="c1", workdir=qemu.home,
        socket=qemu.home / "b2.nbd",
    )  # fmt: skip
    assert second.incremental
    publish(server, second)
    await disk.write(12 * MIB, 64 << 10, 4)  # after the second instant
    index2 = await pull(repo, server, parent=index1, incremental=True)
    await qb.finish(qemu.qmp, second, success=True)
    assert await restored(repo, index2, tmp_path / "2.img") == at_second


def qb_disks() -> list[qb.BackupDisk]:
    return [qb.BackupDisk("root", "disk0")]


def _get(url: str, ca: str, token: str | None) -> tuple[int, bytes]:
    context = ssl.create_default_context(cadata=ca)
    request = urllib.request.Request(
        url, headers={"x-kubevirt-export-token": token} if token else {}
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@on_loop
async def test_the_endpoints_speak_upstream_s_shapes_and_refuse_without_the_token(
    served: tuple[Qemu, ExportServer],
) -> None:
    qemu, server = served
    assert qemu.qmp is not None
    export = await qb.start(
        qemu.qmp, "b1", qb_disks(), checkpoint="c1", since=None, workdir=qemu.home,
        socket=qemu.home / "b1.nbd",
    )  # fmt: skip
    publish(server, export)
    data, mapping = urls(server)
    ca = server.pki.ca_pem()
    status, body = await asyncio.to_thread(_get, f"{mapping}?page_size=1", ca, TOKEN)
    assert status == 200
    page = json.loads(body)
    assert page["extents"] == [{"offset": 0, "length": 4 * MIB, "type": 0, "description": "data"}]
    assert page["next_offset"] == 4 * MIB
    status, body = await asyncio.to_thread(_get, f"{mapping}?offset={4 * MIB}", ca, TOKEN)
    rest = json.loads(body)["extents"]
    assert rest[0]["offset"] == 4 * MIB and rest[0]["description"] in ("hole,zero", "zero")
    status, body = await asyncio.to_thread(_get, f"{data}?offset={MIB}&length=8", ca, TOKEN)
    assert (status, body) == (200, bytes([1]) * 8)
    assert (await asyncio.to_thread(_get, f"{data}?offset={SIZE}", ca, TOKEN))[0] == 400
    assert (await asyncio.to_thread(_get, data, ca, None))[0] == 401
    assert (await asyncio.to_thread(_get, data, ca, "wrong"))[0] == 401
    assert (await asyncio.to_thread(_get, urls(server, "other")[0], ca, TOKEN))[0] == 404
    with pytest.raises(EndpointError, match="HTTP 401"):
        async with EndpointSource(data, mapping, "wrong", ca_pem=ca):
            pass
    await qb.finish(qemu.qmp, export, success=True)
    # the backup is over: its export socket is gone, and a read says so
    status, body = await asyncio.to_thread(_get, data, ca, TOKEN)
    assert status == 503 and b"not available" in body
