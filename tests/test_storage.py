"""Node storage: the qcow2 pool, DataVolume imports (HTTP, file, blank, clone, upload), VMI volumes."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import lzma
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.conftest import imports_allowed, make_user
from vmo.client import DATAVOLUME, Client
from vmo.engine.storage.importer import (
    STORAGE_NODE,
    DataVolumeController,
    HttpAccess,
    ImportSpecError,
    RetryPolicy,
    SourceKind,
    TransferError,
    import_plan,
    open_http,
)
from vmo.engine.storage.pool import (
    ImageError,
    InvalidVolumeName,
    Pool,
    PoolFull,
    VolumeExists,
    parse_progress,
)
from vmo.engine.storage.upload import (
    UploadError,
    api_server_authorizer,
    image_upload,
    upload_routes,
)
from vmo.engine.storage.urlpolicy import parse_allowed_hosts
from vmo.engine.storage.volumes import VolumeError, container_disk_file, resolve_volumes
from vmo.testing.apiserver import ThreadedServer

MIB = 1 << 20
SIZE = 16 * MIB
MARKS = {0: b"VMO-BOOT", 5 * MIB: b"VMO-MIDDLE", SIZE - 16: b"VMO-END"}


# --- images -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 16 MiB raw with marks and 2 MiB of data, and the same as qcow2, vmdk, vdi, gz, xz."""
    root = tmp_path_factory.mktemp("images")
    raw = root / "disk.raw"
    with raw.open("wb") as fh:
        fh.truncate(SIZE)
        fh.seek(8 * MIB)
        fh.write(bytes(range(256)) * (2 * MIB // 256))
        for offset, mark in MARKS.items():
            fh.seek(offset)
            fh.write(mark)
    out = {"raw": raw}
    for fmt in ("qcow2", "vmdk", "vdi"):
        out[fmt] = root / f"disk.{fmt}"
        subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(out[fmt])], check=True)
    out["raw.gz"] = root / "disk.raw.gz"
    out["raw.gz"].write_bytes(gzip.compress(raw.read_bytes(), 1))
    out["qcow2.xz"] = root / "disk.qcow2.xz"
    out["qcow2.xz"].write_bytes(lzma.compress(out["qcow2"].read_bytes(), preset=0))
    return out


def same_content(volume: Path, raw: Path) -> bool:
    result = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(volume)]
    )
    return result.returncode == 0


def pool_files(pool: Pool) -> list[str]:
    """The pool's visible files, after checking its layer directory holds no orphan: every layer
    is in the chain of a volume or a snapshot."""
    needed: set[Path] = set()
    for link in pool.root.glob("*.qcow2"):
        needed.update(pool.chain(link))
    for record in pool.snapshots():
        needed.update(pool.chain(pool.snapshot_path(record.namespace, record.name)))
    layers = {p for p in pool.layers_dir.iterdir() if p.name != ".lock"}
    assert layers == {p for p in needed if p.parent == pool.layers_dir}
    return sorted(p.name for p in pool.root.iterdir() if p.name not in (".layers", ".snapshots"))


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    return Pool(tmp_path / "pool")


# --- pool -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vdi", "raw.gz", "qcow2.xz"])
async def test_import_detects_format_and_converts_to_qcow2(
    pool: Pool, images: dict[str, Path], fmt: str
) -> None:
    info = await pool.import_file("default", "disk", images[fmt])
    assert info.format == "qcow2"
    assert info.virtual_size == SIZE
    assert same_content(pool.path("default", "disk"), images["raw"])
    assert pool.record("default", "disk").source == str(images[fmt])
    assert pool_files(pool) == ["default--disk.json", "default--disk.qcow2"]


async def test_import_reports_progress_to_100(pool: Pool, images: dict[str, Path]) -> None:
    seen: list[float] = []
    await pool.import_file("default", "disk", images["vmdk"], progress=seen.append)
    assert seen[-1] == 100.0
    assert seen == sorted(seen)


def test_progress_parser_reads_qemu_img_output() -> None:
    assert parse_progress(b"    (0.00/100%)\r    (12.50/100%)\r") == [0.0, 12.5]


async def test_blank_volume_is_thin(pool: Pool) -> None:
    info = await pool.create_blank("ns1", "scratch", 1 << 30)
    assert info.virtual_size == 1 << 30
    assert info.real_size < 2 * MIB


async def test_info_and_delete(pool: Pool) -> None:
    await pool.create_blank("default", "a", 64 * MIB)
    assert pool.exists("default", "a")
    assert (await pool.info("default", "a")).virtual_size == 64 * MIB
    assert pool.delete("default", "a")
    assert not pool.exists("default", "a")
    assert pool_files(pool) == []
    assert not pool.delete("default", "a")


async def test_existing_volume_is_not_overwritten(pool: Pool) -> None:
    await pool.create_blank("default", "a", MIB)
    with pytest.raises(VolumeExists):
        await pool.create_blank("default", "a", MIB)


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "UPPER", "", "a" * 254])
def test_names_that_escape_or_are_invalid_are_refused(pool: Pool, name: str) -> None:
    with pytest.raises(InvalidVolumeName):
        pool.path("default", name)
    with pytest.raises(InvalidVolumeName):
        pool.path(name, "disk")


async def test_import_beyond_capacity_is_pool_full_and_leaves_nothing(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    small = Pool(tmp_path / "small", capacity_bytes=1 * MIB)
    for fmt in ("qcow2", "raw.gz"):
        with pytest.raises(PoolFull):
            await small.import_file("default", "disk", images[fmt])
        assert pool_files(small) == []


async def test_blank_larger_than_pool_is_pool_full(tmp_path: Path) -> None:
    small = Pool(tmp_path / "small", capacity_bytes=8 * MIB)
    with pytest.raises(PoolFull):
        await small.create_blank("default", "big", 64 * MIB)
    assert pool_files(small) == []


async def test_corrupt_image_is_refused_and_leaves_nothing(pool: Pool, tmp_path: Path) -> None:
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + b"\xff" * 4096)
    with pytest.raises(ImageError):
        await pool.import_file("default", "disk", broken)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(b"x" * 100000)[:-100])
    with pytest.raises(ImageError):
        await pool.import_file("default", "disk2", truncated)
    assert pool_files(pool) == []


async def test_image_with_backing_file_is_refused(
    pool: Pool, images: dict[str, Path], tmp_path: Path
) -> None:
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(images["raw"]),
            str(overlay),
        ],
        check=True,
    )
    with pytest.raises(ImageError, match="backing file"):
        await pool.import_file("default", "disk", overlay)


async def test_clone_copies_a_volume(pool: Pool, images: dict[str, Path]) -> None:
    await pool.import_file("src", "golden", images["qcow2"])
    await pool.clone(("src", "golden"), "dst", "copy")
    assert same_content(pool.path("dst", "copy"), images["raw"])


def test_partials_from_a_crash_are_discarded(pool: Pool) -> None:
    (pool.root / ".part-default--x-1234.qcow2").write_bytes(b"junk")
    assert len(pool.discard_partials()) == 1
    assert pool_files(pool) == []


# --- plans ------------------------------------------------------------------------------------


def dv(
    name: str, source: dict[str, Any], size: str = "64Mi", ns: str = "default"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {"source": source, "storage": {"resources": {"requests": {"storage": size}}}},
    }


def test_file_urls_are_confined_to_the_import_dir(tmp_path: Path) -> None:
    inside = import_plan(
        dv("a", {"http": {"url": f"file://{tmp_path}/disk.qcow2"}}), import_dir=tmp_path
    )
    assert inside.kind is SourceKind.FILE and inside.path == tmp_path / "disk.qcow2"
    with pytest.raises(ImportSpecError, match="must come from under"):
        import_plan(dv("a", {"http": {"url": f"file://{tmp_path}/../x.raw"}}), import_dir=tmp_path)


def test_blank_needs_a_size(tmp_path: Path) -> None:
    plan = import_plan(dv("a", {"blank": {}}, size="1Gi"), import_dir=tmp_path)
    assert plan.kind is SourceKind.BLANK and plan.size == 1 << 30
    spec = {"metadata": {"name": "a", "namespace": "d"}, "spec": {"source": {"blank": {}}}}
    with pytest.raises(ImportSpecError, match="size"):
        import_plan(spec, import_dir=tmp_path)


def test_pvc_source_defaults_to_the_datavolume_namespace(tmp_path: Path) -> None:
    plan = import_plan(dv("a", {"pvc": {"name": "golden"}}, ns="team"), import_dir=tmp_path)
    assert plan.source_pvc == ("team", "golden")


# --- HTTP -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def http_server(files: dict[str, Path]) -> AsyncIterator[str]:
    async def serve(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def allowed_http_server(server: ThreadedServer, files: dict[str, Path]) -> AsyncIterator[str]:
    """``http_server`` on loopback, allowed in ``server``'s import policy while it runs."""
    async with http_server(files) as base:
        with imports_allowed(server, URL(base).raw_authority):
            yield base


def allowing(base: str) -> HttpAccess:
    """Access to the local server at ``base``, allowed as an administrator's list would."""
    allowed, errors = parse_allowed_hosts(URL(base).raw_authority)
    assert not errors
    return HttpAccess(allowed=allowed)


async def test_http_stream_import_with_progress(pool: Pool, images: dict[str, Path]) -> None:
    seen: list[float] = []
    async with (
        http_server({"disk.raw": images["raw"]}) as base,
        open_http(f"{base}/disk.raw", allowing(base)) as (chunks, total),
    ):
        await pool.import_stream("default", "web", chunks, total=total, progress=seen.append)
    assert same_content(pool.path("default", "web"), images["raw"])
    # the transfer counts for 90%, the conversion for the rest
    assert seen[0] < 90.0 and 90.0 in seen and seen[-1] == 100.0
    assert seen == sorted(seen)


async def test_http_404_is_a_clear_transfer_error(pool: Pool) -> None:
    async with http_server({}) as base:
        with pytest.raises(TransferError, match="expected status code 200, got 404"):
            async with open_http(f"{base}/missing.qcow2", allowing(base)):
                pass


# --- the controller against the API server ----------------------------------------------------


async def wait_dv(
    client: Client, ns: str, name: str, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    for _ in range(300):
        obj = await client.find(DATAVOLUME, name, ns)
        if obj is not None and check(obj):
            return obj
        await asyncio.sleep(0.05)
    raise AssertionError(f"DataVolume {ns}/{name} never got there: {obj}")


def phase_is(*phases: str) -> Callable[[dict[str, Any]], bool]:
    return lambda obj: (obj.get("status") or {}).get("phase") in phases


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == ctype)


@contextlib.asynccontextmanager
async def running_controller(
    apiserver: ThreadedServer, pool: Pool, import_dir: Path, node: str = "node-1"
) -> AsyncIterator[tuple[Client, DataVolumeController]]:
    client = Client.from_kubeconfig(apiserver.kubeconfig)
    controller = DataVolumeController(
        client, pool, node, import_dir=import_dir, retry=RetryPolicy(attempts=2, delay=0.05)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    try:
        yield client, controller
    finally:
        stop.set()
        await task
        await client.close()
        # TLS connections finish closing on the next loop turns, before the test's loop ends
        await asyncio.sleep(0.1)


async def test_controller_imports_from_http_to_succeeded(
    apiserver: ThreadedServer, pool: Pool, images: dict[str, Path], tmp_path: Path, unique: str
) -> None:
    async with (
        allowed_http_server(apiserver, {"disk.vmdk": images["vmdk"]}) as base,
        running_controller(apiserver, pool, tmp_path) as (client, _),
    ):
        await client.create(DATAVOLUME, dv(unique, {"http": {"url": f"{base}/disk.vmdk"}}))
        done = await wait_dv(client, "default", unique, phase_is("Succeeded", "Failed"))
        assert done["status"]["phase"] == "Succeeded"
        assert done["status"]["progress"] == "100.0%"
        assert done["status"]["claimName"] == unique
        assert done["metadata"]["annotations"][STORAGE_NODE] == "node-1"
        assert condition(done, "Ready")["status"] == "True"
        assert condition(done, "Bound")["reason"] == "Bound"
        assert condition(done, "Running")["reason"] == "Completed"
        # the DataVolume asked for 64Mi: the image grows to the claim's size
        assert (await pool.info("default", unique)).virtual_size == 64 * MIB
        await client.delete(DATAVOLUME, unique, "default")
        for _ in range(100):
            if not pool.exists("default", unique):
                break
            await asyncio.sleep(0.05)
        assert pool_files(pool) == []


async def test_controller_http_404_fails_with_the_reason_and_no_partial(
    apiserver: ThreadedServer, pool: Pool, tmp_path: Path, unique: str
) -> None:
    async with (
        allowed_http_server(apiserver, {}) as base,
        running_controller(apiserver, pool, tmp_path) as (client, _),
    ):
        await client.create(DATAVOLUME, dv(unique, {"http": {"url": f"{base}/nope.qcow2"}}))
        failed = await wait_dv(client, "default", unique, phase_is("Failed"))
        running = condition(failed, "Running")
        assert running["reason"] == "Error"
        assert "expected status code 200, got 404" in running["message"]
        assert failed["status"]["restartCount"] == 2
        assert pool_files(pool) == []


async def test_controller_blank_file_and_clone(
    apiserver: ThreadedServer, pool: Pool, images: dict[str, Path], unique: str
) -> None:
    import_dir = images["raw"].parent
    async with running_controller(apiserver, pool, import_dir) as (client, _):
        await client.create(DATAVOLUME, dv(f"{unique}-blank", {"blank": {}}, size="1Gi"))
        url = f"file://{images['raw.gz']}"
        await client.create(DATAVOLUME, dv(f"{unique}-file", {"http": {"url": url}}, size="16Mi"))
        for name in (f"{unique}-blank", f"{unique}-file"):
            assert (await wait_dv(client, "default", name, phase_is("Succeeded", "Failed")))[
                "status"
            ]["phase"] == "Succeeded"
        source = {"pvc": {"namespace": "default", "name": f"{unique}-file"}}
        await client.create(DATAVOLUME, dv(f"{unique}-clone", source, size="16Mi"))
        clone = await wait_dv(client, "default", f"{unique}-clone", phase_is("Succeeded", "Failed"))
        assert clone["status"]["phase"] == "Succeeded"
        assert condition(clone, "Running")["message"] == "Clone Complete"
        assert same_content(pool.path("default", f"{unique}-clone"), images["raw"])
        assert (await pool.info("default", f"{unique}-blank")).virtual_size == 1 << 30


async def test_a_datavolume_claimed_by_another_node_is_left_alone(
    apiserver: ThreadedServer, pool: Pool, tmp_path: Path, unique: str
) -> None:
    async with running_controller(apiserver, pool, tmp_path) as (client, _):
        other = dv(f"{unique}-other", {"blank": {}})
        other["metadata"]["annotations"] = {STORAGE_NODE: "node-2"}
        created = await client.create(DATAVOLUME, other)
        # created after it, so it comes later on the same watch: once the controller has
        # imported this one, it has had the other one in hand too
        await client.create(DATAVOLUME, dv(f"{unique}-own", {"blank": {}}))
        own = await wait_dv(client, "default", f"{unique}-own", phase_is("Succeeded", "Failed"))
        assert own["status"]["phase"] == "Succeeded"
        assert own["metadata"]["annotations"][STORAGE_NODE] == "node-1"
        obj = await client.get(DATAVOLUME, f"{unique}-other", "default")
        # never written to: no claim, no status, no finalizer
        assert obj["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
        assert not pool.exists("default", f"{unique}-other")
        assert pool.exists("default", f"{unique}-own")


async def test_claim_with_stale_resource_version_loses(
    apiserver: ThreadedServer, pool: Pool, tmp_path: Path, unique: str
) -> None:
    async with Client.from_kubeconfig(apiserver.kubeconfig) as client:
        created = await client.create(DATAVOLUME, dv(unique, {"blank": {}}))
        await client.patch(DATAVOLUME, unique, {"metadata": {"labels": {"x": "y"}}}, "default")
        late = DataVolumeController(client, pool, "node-9", import_dir=tmp_path)
        assert await late._claim(created) is None
        await client.delete(DATAVOLUME, unique, "default")


# --- upload -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def agent_socket(
    apiserver: ThreadedServer, controller: DataVolumeController, path: Path
) -> AsyncIterator[Path]:
    app = web.Application(client_max_size=0)
    app.router.add_routes(upload_routes(controller, api_server_authorizer(controller.client.creds)))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield path
    finally:
        await runner.cleanup()


async def test_image_upload_to_succeeded(
    apiserver: ThreadedServer, pool: Pool, images: dict[str, Path], tmp_path: Path, unique: str
) -> None:
    sock = Path(f"/tmp/vmo-upload-{unique}.sock")
    try:
        async with (
            running_controller(apiserver, pool, tmp_path) as (client, controller),
            agent_socket(apiserver, controller, sock),
        ):
            sent: list[float] = []
            done = await image_upload(
                client,
                namespace="default",
                name=unique,
                path=images["raw.gz"],
                size="32Mi",
                agent_socket=sock,
                progress=sent.append,
            )
            assert done["status"]["phase"] == "Succeeded"
            assert condition(done, "Running")["message"] == "Upload Complete"
            assert sent[-1] == 100.0
            assert same_content(pool.path("default", unique), images["raw"])
            # the DataVolume is no longer UploadReady: a second upload is refused
            with pytest.raises(UploadError, match="409"):
                await _raw_put(sock, client.creds.token, unique, images["raw"])
    finally:
        sock.unlink(missing_ok=True)


async def _raw_put(sock: Path, token: str, name: str, path: Path) -> None:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session,
    ):
        with path.open("rb") as body:
            resp = await session.put(
                f"http://agent/upload/default/{name}",
                data=body,
                headers={"Authorization": f"Bearer {token}"},
            )
        async with resp:
            if resp.status != 200:
                raise UploadError(f"{resp.status}: {await resp.text()}")


async def test_upload_needs_permission(
    apiserver: ThreadedServer, pool: Pool, images: dict[str, Path], tmp_path: Path, unique: str
) -> None:
    token, _ = make_user(apiserver, f"nobody-{unique}")
    sock = Path(f"/tmp/vmo-upload-{unique}.sock")
    try:
        async with (
            running_controller(apiserver, pool, tmp_path) as (client, controller),
            agent_socket(apiserver, controller, sock),
        ):
            await client.create(DATAVOLUME, dv(unique, {"upload": {}}))
            await wait_dv(client, "default", unique, phase_is("UploadReady"))
            with pytest.raises(UploadError, match="403"):
                await _raw_put(sock, token, unique, images["raw"])
            with pytest.raises(UploadError, match="401"):
                await _raw_put(sock, "not-a-token", unique, images["raw"])
            assert not pool.exists("default", unique)
    finally:
        sock.unlink(missing_ok=True)


# --- VMI volumes ------------------------------------------------------------------------------


def vmi(*volumes: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "vm", "namespace": "default"}, "spec": {"volumes": list(volumes)}}


async def test_volumes_resolve_to_pool_and_workdir(pool: Pool, tmp_path: Path) -> None:
    await pool.create_blank("default", "root", 32 * MIB)
    resolved = await resolve_volumes(
        vmi(
            {"name": "a", "persistentVolumeClaim": {"claimName": "root", "readOnly": True}},
            {"name": "b", "dataVolume": {"name": "root"}},
            {"name": "c", "emptyDisk": {"capacity": "1Gi"}},
            {"name": "d", "cloudInitNoCloud": {"userData": "#cloud-config"}},
        ),
        pool,
        workdir=tmp_path / "vm",
        datavolumes={"root": {"status": {"phase": "Succeeded"}}},
    )
    assert resolved["a"].path == pool.top("default", "root") and resolved["a"].readonly
    assert resolved["b"].path == pool.top("default", "root")
    assert resolved["c"].path.parent == tmp_path / "vm" and resolved["c"].format == "qcow2"
    assert "d" not in resolved


async def test_missing_claim_and_unready_datavolume_name_the_field(
    pool: Pool, tmp_path: Path
) -> None:
    with pytest.raises(VolumeError) as err:
        await resolve_volumes(
            vmi({"name": "a", "persistentVolumeClaim": {"claimName": "nope"}}),
            pool,
            workdir=tmp_path,
        )
    assert err.value.field_path == "spec.volumes[0].persistentVolumeClaim.claimName"
    await pool.create_blank("default", "root", MIB)
    with pytest.raises(VolumeError, match="not ready") as err:
        await resolve_volumes(
            vmi({"name": "a", "dataVolume": {"name": "root"}}),
            pool,
            workdir=tmp_path,
            datavolumes={"root": {"status": {"phase": "ImportInProgress"}}},
        )
    assert err.value.field_path == "spec.volumes[0].dataVolume.name"


async def test_container_disk_only_from_the_local_store(
    pool: Pool, images: dict[str, Path], tmp_path: Path
) -> None:
    volume = {"name": "root", "containerDisk": {"image": "quay.io/containerdisks/fedora:40"}}
    with pytest.raises(VolumeError, match="not in the local image store") as err:
        await resolve_volumes(vmi(volume), pool, workdir=tmp_path / "vm", image_store=tmp_path)
    assert err.value.field_path == "spec.volumes[0].containerDisk.image"
    stored = container_disk_file("quay.io/containerdisks/fedora:40", tmp_path)
    assert stored.name == "quay.io_containerdisks_fedora_40.qcow2"
    stored.write_bytes(images["qcow2"].read_bytes())
    resolved = await resolve_volumes(
        vmi(volume), pool, workdir=tmp_path / "vm", image_store=tmp_path
    )
    overlay = resolved["root"].path
    assert overlay.parent == tmp_path / "vm"
    assert same_content(overlay, images["raw"])
    assert stored.read_bytes() == images["qcow2"].read_bytes()


def test_concatenated_gzip_members_decode_exactly_when_a_member_ends_at_the_bound() -> None:
    """An 8 MiB member ends exactly at the decoder's output bound; the next member must follow
    without repeated bytes."""
    import gzip as gz

    from vmo.engine.storage.pool import _Decompressor

    first, second = bytes(8 << 20), b"tail"
    dec = _Decompressor("gzip")
    out = b"".join(dec.feed(gz.compress(first) + gz.compress(second)))
    dec.finish()
    assert len(out) == len(first) + len(second) and out.endswith(second)
