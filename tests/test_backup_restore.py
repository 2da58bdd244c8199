"""A BackupRestore's pieces without a guest: the VM it rebuilds from a backup's manifest (checked
against KubeVirt's schema), and the HTTPS server its DataVolumes import from (credentials,
ranges, and a damaged chunk that cuts the body short rather than serve a wrong disk)."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.test_kubevirt_models import upstream_errors
from vmo.controllers.backup.disk import FileSource, backup_disk
from vmo.controllers.backup.repository import (
    BackupRef,
    DiskIndex,
    Manifest,
    Repository,
    local_store,
)
from vmo.controllers.backup.restore import new_mac, restored_vm
from vmo.controllers.backup.restore_server import RestoreServer, Served

MiB = 1 << 20


def source_vm() -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": "db",
            "namespace": "prod",
            "labels": {"app": "db"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "a": "b"},
        },
        "spec": {
            "running": True,
            "dataVolumeTemplates": [
                {
                    "metadata": {"name": "db-root"},
                    "spec": {
                        "source": {"http": {"url": "https://images.example/db.qcow2"}},
                        "storage": {"resources": {"requests": {"storage": "1Gi"}}},
                    },
                }
            ],
            "template": {
                "spec": {
                    "domain": {
                        "firmware": {"uuid": "5d307ca9-b3ef-428c-8861-06e72d69f223"},
                        "devices": {
                            "disks": [{"name": "root", "disk": {}}, {"name": "data", "disk": {}}],
                            "interfaces": [
                                {"name": "default", "masquerade": {}},
                                {"name": "vlan", "bridge": {}, "macAddress": "00:50:56:aa:bb:01"},
                            ],
                        },
                        "resources": {"requests": {"memory": "128Mi"}},
                    },
                    "networks": [
                        {"name": "default", "pod": {}},
                        {"name": "vlan", "multus": {"networkName": "vlan10"}},
                    ],
                    "volumes": [
                        {"name": "root", "dataVolume": {"name": "db-root"}},
                        {"name": "data", "persistentVolumeClaim": {"claimName": "db-data"}},
                        {"name": "ci", "cloudInitNoCloud": {"userData": "#cloud-config\n"}},
                    ],
                }
            },
        },
    }


def manifest() -> Manifest:
    return Manifest(BackupRef("prod", "db", "20261203T000000000000Z-abcdef"), created="x",
                    kind="Full", disks=[], parent=None, objects=[source_vm()])  # fmt: skip


def test_a_new_vm_is_the_backed_up_one_on_its_restored_disks_and_stopped() -> None:
    vm = restored_vm(manifest(), source_vm(), name="db-copy", namespace="dr",
                     dvs={"root": "db-copy-root", "data": "db-copy-data"},
                     spec={"macAddressPolicy": "Generate", "newMacAddresses": {"default": "02:00:00:00:00:07"}},
                     restore_key="prod/r1")  # fmt: skip
    assert upstream_errors(vm) == []
    md, spec = vm["metadata"], vm["spec"]
    assert (md["name"], md["namespace"], md["labels"]) == ("db-copy", "dr", {"app": "db"})
    assert md["annotations"] == {"a": "b", "vmo.dev/restored-from": "prod/r1"}
    assert spec["runStrategy"] == "Halted" and "running" not in spec
    assert "dataVolumeTemplates" not in spec  # the restored DataVolume takes the template's place
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["root"] == {"name": "root", "dataVolume": {"name": "db-copy-root"}}
    assert volumes["data"] == {"name": "data", "dataVolume": {"name": "db-copy-data"}}
    assert "cloudInitNoCloud" in volumes["ci"]
    domain = spec["template"]["spec"]["domain"]
    assert "firmware" not in domain  # a copy beside the original gets its own identity
    macs = {i["name"]: i["macAddress"] for i in domain["devices"]["interfaces"]}
    assert macs["default"] == "02:00:00:00:00:07"
    assert macs["vlan"] != "00:50:56:aa:bb:01"
    assert int(macs["vlan"].split(":")[0], 16) & 0x03 == 0x02


def test_the_same_vm_rebuilt_keeps_its_identity_and_macs() -> None:
    vm = restored_vm(manifest(), source_vm(), name="db", namespace="prod",
                     dvs={"root": "r1-root", "data": "r1-data"}, spec={}, restore_key="prod/r1")  # fmt: skip
    domain = vm["spec"]["template"]["spec"]["domain"]
    assert domain["firmware"]["uuid"] == "5d307ca9-b3ef-428c-8861-06e72d69f223"
    assert domain["devices"]["interfaces"][1]["macAddress"] == "00:50:56:aa:bb:01"
    assert "macAddress" not in domain["devices"]["interfaces"][0]


def test_new_macs_are_unicast_locally_administered_and_differ() -> None:
    macs = {new_mac() for _ in range(200)}
    assert len(macs) == 200
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0x01 == 0 and first & 0x02 == 2


# --- the server -------------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> dict[str, Any]:
    raw = tmp_path / "disk.raw"
    data = os.urandom(3 * MiB + 4321) + bytes(MiB)  # data, then a zero chunk
    raw.write_bytes(data)
    repo = asyncio.run(Repository.init(local_store(tmp_path / "repo"), chunk_size=MiB))

    async def store() -> DiskIndex:
        source = FileSource(raw)
        index, _ = await backup_disk(repo, "root", source)
        source.close()
        return index

    return {"repo": repo, "index": asyncio.run(store()), "data": data, "root": tmp_path}


async def fetch(
    server: RestoreServer, auth: tuple[str, str] | None, **headers: str
) -> tuple[int, bytes, Any]:
    ctx = ssl.create_default_context(cadata=server.ca_pem.decode())
    if auth is not None:
        headers["Authorization"] = (
            "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        )
    method = headers.pop("method", "GET")
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, server.volume_url("ns", "r1", "root"), headers=headers, ssl=ctx
        ) as resp,
    ):
        body = b""
        try:
            body = await resp.read()
        except aiohttp.ClientPayloadError:
            body = b"<short>"
        return resp.status, body, resp.headers


def test_the_server_serves_only_to_the_restores_credentials_whole_or_by_range(
    disk: dict[str, Any],
) -> None:
    async def go() -> None:
        server = RestoreServer()
        await server.start()
        try:
            assert server.url.startswith("https://127.0.0.1:") and server.port > 0
            assert (await fetch(server, ("u", "p")))[0] == 401  # nothing registered
            server.serve("ns", "r1", "root", Served(disk["repo"], disk["index"], "u", "p"))
            status, body, _ = await fetch(server, ("u", "p"))
            assert status == 200 and body == disk["data"]
            assert (await fetch(server, ("u", "wrong")))[0] == 401
            assert (await fetch(server, None))[0] == 401
            status, body, headers = await fetch(
                server, ("u", "p"), Range=f"bytes={MiB - 10}-{MiB + 9}"
            )
            assert status == 206 and body == disk["data"][MiB - 10 : MiB + 10]
            assert headers["Content-Range"] == f"bytes {MiB - 10}-{MiB + 9}/{len(disk['data'])}"
            status, body, _ = await fetch(server, ("u", "p"), Range="bytes=-5")
            assert status == 206 and body == disk["data"][-5:]
            assert (await fetch(server, ("u", "p"), Range="bytes=99999999-"))[0] == 416
            status, body, headers = await fetch(server, ("u", "p"), method="HEAD")
            assert status == 200 and int(headers["Content-Length"]) == len(disk["data"])
            server.forget("ns", "r1")
            assert (await fetch(server, ("u", "p")))[0] == 401
        finally:
            await server.close()

    asyncio.run(go())


def test_a_damaged_chunk_cuts_the_body_short(disk: dict[str, Any]) -> None:
    index: DiskIndex = disk["index"]
    chunk = disk["root"] / "repo" / Repository.chunk_key(index.digests[2])
    blob = bytearray(chunk.read_bytes())
    blob[-1] ^= 0xFF
    chunk.chmod(0o644)
    chunk.write_bytes(bytes(blob))

    async def go() -> tuple[int, bytes]:
        server = RestoreServer()
        await server.start()
        try:
            server.serve("ns", "r1", "root", Served(disk["repo"], index, "u", "p"))
            status, body, _ = await fetch(server, ("u", "p"))
            return status, body
        finally:
            await server.close()

    status, body = asyncio.run(go())
    assert status == 200 and body == b"<short>"  # never a whole body with wrong bytes in it
