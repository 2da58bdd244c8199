"""VirtualMachineExport end to end: an embedded cluster's node serves DataVolumes over HTTPS.

The export server is reached with real TLS (trusting the CA the export's links carry), with
``requests`` and with ``vmo export download``; every VirtualMachineExport the controller writes is
checked against upstream's schema. The pure parts (durations, ranges, layouts, source states)
are pinned first.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import gzip
import hashlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import yaml

from tests.conftest import SCHEMAS, Api
from vmo.cli.main import main as vmo_main
from vmo.engine.storage import export as ex
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import boot_vm

NS = "virtual-machines"
JSON = dict[str, Any]
EXPORTS = f"/apis/export.kubevirt.io/v1/namespaces/{NS}/virtualmachineexports"
DATAVOLUMES = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes"
SIZE = 48 << 20


# --- the upstream schema as oracle ------------------------------------------------------------


def _draft7(node: Any) -> Any:
    """Upstream's structural schema in Draft 7: unknown fields refused, ``nullable`` honoured."""
    if isinstance(node, list):
        return [_draft7(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _draft7(v) for k, v in node.items() if k not in ("properties", "nullable")}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if "properties" in node:
        out["properties"] = {k: _draft7(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def _export_validator() -> jsonschema.Draft7Validator:
    document = yaml.safe_load(
        (SCHEMAS / "kubevirt-v1.9.0" / "virtualmachineexport.yaml").read_text()
    )
    return jsonschema.Draft7Validator(_draft7(document["openAPIV3Schema"]))


def assert_upstream_valid(obj: JSON) -> None:
    body = copy.deepcopy(obj)
    body["metadata"] = {"name": obj["metadata"]["name"]}  # ObjectMeta is not in the file
    errors = sorted(_export_validator().iter_errors(body), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


# --- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2h", 7200), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400), ("300ms", 0.3), ("0", 0)],
)
def test_durations_parse_as_go_does(text: str, seconds: float) -> None:
    assert ex.parse_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "2", "h", "1x", "1h 2m"])
def test_bad_durations_are_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        ex.parse_duration(text)


def test_ttl_defaults_to_two_hours_from_creation() -> None:
    export = {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": {}}
    assert ex.rfc3339(ex.expiration_time(export)) == "2026-01-01T02:00:00Z"
    export["spec"]["ttlDuration"] = "10m"
    assert ex.rfc3339(ex.expiration_time(export)) == "2026-01-01T00:10:00Z"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=-5", (95, 99)),
        ("bytes=90-200", (90, 99)),
        ("", None),
        ("bytes=0-1,5-6", None),
    ],
)
def test_ranges(header: str, expected: tuple[int, int] | None) -> None:
    assert ex.parse_range(header, 100) == expected


def test_a_range_past_the_end_is_unsatisfiable() -> None:
    with pytest.raises(ValueError, match="not satisfiable"):
        ex.parse_range("bytes=100-", 100)


def test_layout_maps_each_depth_to_its_file_and_holes_to_zeros() -> None:
    top, base = Path("/p/top"), Path("/p/base")
    mapping = [
        {"start": 0, "length": 10, "depth": 1, "data": True, "zero": False, "offset": 100},
        {"start": 10, "length": 5, "depth": 0, "data": True, "zero": False, "offset": 7},
        {"start": 15, "length": 5, "depth": 1, "data": False, "zero": True},
    ]
    layout = ex.layout_from_map(20, [top, base], mapping)
    assert list(ex.pieces(layout, 8, 16)) == [(base, 108, 2), (top, 7, 5), (None, 0, 2)]


def test_compressed_clusters_are_unmappable() -> None:
    mapping = [{"start": 0, "length": 10, "depth": 0, "data": True, "zero": False}]
    with pytest.raises(ex.Unmappable):
        ex.layout_from_map(10, [Path("/x")], mapping)


def test_missing_claim_is_pending_with_upstreams_pvc_condition() -> None:
    state = ex.pvc_state(NS, "gone", ex.ClaimInfo(False, False, None, False), False)
    assert not state.available and state.ready == ex.ready(False, "Initializing")
    assert state.source == ex.Condition(
        "PVCReady", False, "PVCNotFound", f"PersistentVolumeClaim {NS}/gone not found"
    )


def test_running_vm_is_in_use_as_upstream_words_it() -> None:
    vm = boot_vm("web", namespace=NS, disk="web-root", interfaces=[], networks=[])
    claim = ex.ClaimInfo(True, True, "node-1", True)
    state = ex.vm_state(NS, "web", vm=vm, claims={"web-root": claim}, running=True)
    assert state.ready == ex.ready(False, "InUse", f"Virtual Machine {NS}/web is running")
    assert state.vm_name == "web" and not state.available
    stopped = ex.vm_state(NS, "web", vm=vm, claims={"web-root": claim}, running=False)
    assert stopped.available and stopped.node == "node-1"


def test_vm_without_claims_is_skipped() -> None:
    vm = {"spec": {"template": {"spec": {"volumes": [{"name": "c", "containerDisk": {}}]}}}}
    state = ex.vm_state(NS, "v", vm=vm, claims={}, running=False)
    assert state.skipped and state.ready.reason == "VMNoVolumes"


def test_snapshot_source_names_volumes_by_claim() -> None:
    snapshot = {"spec": {"source": {"name": "web"}}, "status": {"readyToUse": True}}
    content = {
        "spec": {
            "volumeBackups": [
                {
                    "volumeName": "root",
                    "persistentVolumeClaim": {"metadata": {"name": "web-root"}},
                    "volumeSnapshotName": "vmsnapshot-1-volume-root",
                }
            ]
        }
    }
    state = ex.snapshot_state(
        NS, "s", snapshot=snapshot, content=content, present={"vmsnapshot-1-volume-root"}
    )
    assert state.available and state.vm_name == "web"
    assert state.volumes == (ex.ExportVolume("web-root", "web-root", "vmsnapshot-1-volume-root"),)
    assert state.source == ex.Condition("VolumesCreated", True, "AllPVCsReady")
    missing = ex.snapshot_state(NS, "s", snapshot=None, content=None, present=set())
    assert missing.ready.reason == "VMSnapshotNotFound"


def test_status_of_every_phase_is_valid_upstream() -> None:
    export = {
        "apiVersion": "export.kubevirt.io/v1",
        "kind": "VirtualMachineExport",
        "metadata": {"name": "e", "namespace": NS, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"source": {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": "d"}},
    }
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    claim = ex.ClaimInfo(True, True, "node-1", True)
    for state, serving in (
        (ex.pvc_state(NS, "d", claim, False), ex.Serving("https://127.0.0.1:1", "PEM")),
        (ex.pvc_state(NS, "d", claim, True), None),
        (ex.pvc_state(NS, "d", ex.ClaimInfo(False, False, None, False), False), None),
    ):
        status = ex.export_status(export, state, serving=serving, token_secret="t", now=now)
        assert_upstream_valid({**export, "status": status})


# --- the cluster ------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    server = ThreadedServer(tmp_path_factory.mktemp("vmo-export"), engine=True).start()
    try:
        yield server
    finally:
        api = Api(server.url, server.ca, server.admin_token)
        api.delete(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines")
        vmis = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances"
        wait_for(lambda: not api.get(vmis).json()["items"], 120, "every VMI to be gone")
        api.delete(EXPORTS)
        api.delete(DATAVOLUMES)
        server.stop()


def pool_dirs(cluster: ThreadedServer) -> list[Path]:
    return [cluster.home / "nodes" / "node-1" / "pool", cluster.home / "shared-pool"]


def export_temp_files(cluster: ThreadedServer) -> list[Path]:
    found: list[Path] = []
    for root in pool_dirs(cluster):
        if root.is_dir():
            found += [p for p in root.rglob(".part-*")]
    return found


def _image(path: Path) -> None:
    """A qcow2 with data, a hole and more data: a raw export must reproduce it exactly."""
    raw = path.with_suffix(".raw")
    with raw.open("wb") as fh:
        fh.write(os.urandom(5 << 20))
        fh.seek(20 << 20)
        fh.write(os.urandom(3 << 20) + b"tail")
        fh.truncate(SIZE)
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()


@pytest.fixture(scope="module")
def datavolume(cluster: ThreadedServer, capi: Api) -> str:
    """A Succeeded DataVolume imported from a local qcow2 with data and holes."""
    images = cluster.home / "images"
    images.mkdir(exist_ok=True)
    _image(images / "export-src.qcow2")
    name = "export-src"
    body = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": {"http": {"url": f"file://{images / 'export-src.qcow2'}"}},
            "storage": {"resources": {"requests": {"storage": str(SIZE)}}},
        },
    }
    assert capi.post(DATAVOLUMES, body).status_code == 201
    wait_for(lambda: dv_phase(capi, name) == "Succeeded", 60, "the import")
    return name


def dv_phase(capi: Api, name: str) -> str:
    return str(capi.get(f"{DATAVOLUMES}/{name}").json().get("status", {}).get("phase", ""))


def guest_bytes(cluster: ThreadedServer, claim: str, tmp: Path) -> bytes:
    """What `qemu-img convert -O raw` makes of the pool volume: the oracle for raw exports."""
    # the volume's name links to its top layer, whose backing names are relative to the layer
    volume = (cluster.home / "nodes" / "node-1" / "pool" / f"{NS}--{claim}.qcow2").resolve()
    out = tmp / f"{claim}.oracle.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-q", "-O", "raw", str(volume), str(out)], check=True
    )
    data = out.read_bytes()
    out.unlink()
    return data


def create_export(capi: Api, name: str, source: JSON, **spec: Any) -> JSON:
    body = {
        "apiVersion": "export.kubevirt.io/v1",
        "kind": "VirtualMachineExport",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"source": source, **spec},
    }
    response = capi.post(EXPORTS, body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def pvc_source(claim: str) -> JSON:
    return {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": claim}


def get_export(capi: Api, name: str) -> JSON | None:
    response = capi.get(f"{EXPORTS}/{name}")
    return dict(response.json()) if response.ok else None


def wait_phase(capi: Api, name: str, phase: str, timeout: float = 60) -> JSON:
    def reached() -> JSON | None:
        export = get_export(capi, name)
        return export if export and export.get("status", {}).get("phase") == phase else None

    export: JSON = wait_for(reached, timeout, f"export {name} {phase}")
    assert_upstream_valid(export)
    return export


def condition(export: JSON, ctype: str) -> JSON:
    return next(c for c in export["status"]["conditions"] if c["type"] == ctype)


def link(export: JSON, fmt: str, volume: str = "") -> str:
    volumes = export["status"]["links"]["external"]["volumes"]
    chosen = next(v for v in volumes if not volume or v["name"] == volume)
    return str(next(f["url"] for f in chosen["formats"] if f["format"] == fmt))


def token_of(capi: Api, export: JSON) -> str:
    import base64

    secret = capi.get(f"/api/v1/namespaces/{NS}/secrets/{export['status']['tokenSecretRef']}")
    return base64.b64decode(secret.json()["data"]["token"]).decode()


def ca_file(export: JSON, tmp: Path) -> str:
    path = tmp / "export-ca.pem"
    path.write_text(export["status"]["links"]["external"]["cert"])
    return str(path)


def delete_export(capi: Api, name: str) -> None:
    capi.delete(f"{EXPORTS}/{name}")
    wait_for(lambda: get_export(capi, name) is None, 30, f"export {name} gone")


# --- PersistentVolumeClaim source -------------------------------------------------------------


@pytest.fixture(scope="module")
def ready_export(capi: Api, datavolume: str) -> Iterator[JSON]:
    create_export(capi, "pvc-export", pvc_source(datavolume))
    yield wait_phase(capi, "pvc-export", "Ready")
    delete_export(capi, "pvc-export")


def test_a_claim_export_becomes_ready_with_upstreams_status(ready_export: JSON) -> None:
    status = ready_export["status"]
    assert condition(ready_export, "Ready")["reason"] == "PodReady"
    assert condition(ready_export, "PVCReady")["reason"] == "PVCBound"
    assert status["serviceName"] == "virt-export-pvc-export"
    assert status["tokenSecretRef"] == "export-token-pvc-export"
    assert [v["name"] for v in status["links"]["external"]["volumes"]] == ["export-src"]
    assert link(ready_export, "raw").endswith(
        "/virtualmachineexports/pvc-export/volumes/export-src/disk.img"
    )
    created = ex.parse_time(ready_export["metadata"]["creationTimestamp"])
    assert ex.parse_time(status["ttlExpirationTime"]) - created == dt.timedelta(hours=2)


def test_the_generated_token_secret_belongs_to_the_export(capi: Api, ready_export: JSON) -> None:
    secret = capi.get(f"/api/v1/namespaces/{NS}/secrets/export-token-pvc-export").json()
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "VirtualMachineExport",
        "pvc-export",
        ready_export["metadata"]["uid"],
    )
    assert owner["controller"] is True


def test_raw_download_is_the_guest_visible_disk(
    cluster: ThreadedServer, ready_export: JSON, datavolume: str, tmp_path: Path
) -> None:
    response = requests.get(
        link(ready_export, "raw"),
        headers={
            "x-kubevirt-export-token": token_of(
                Api(cluster.url, cluster.ca, cluster.admin_token), ready_export
            )
        },
        verify=ca_file(ready_export, tmp_path),
        timeout=60,
    )
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == SIZE
    expected = guest_bytes(cluster, datavolume, tmp_path)
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(expected).digest()


def test_gzip_download_inflates_to_the_guest_visible_disk(
    cluster: ThreadedServer, capi: Api, ready_export: JSON, datavolume: str, tmp_path: Path
) -> None:
    response = requests.get(
        link(ready_export, "gzip"),
        params={"x-kubevirt-export-token": token_of(capi, ready_export)},
        verify=ca_file(ready_export, tmp_path),
        timeout=60,
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/gzip"
    assert gzip.decompress(response.content) == guest_bytes(cluster, datavolume, tmp_path)


def test_a_range_of_the_raw_disk(
    cluster: ThreadedServer, capi: Api, ready_export: JSON, datavolume: str, tmp_path: Path
) -> None:
    first, last = (20 << 20) - 10, (20 << 20) + 99
    response = requests.get(
        link(ready_export, "raw"),
        headers={
            "x-kubevirt-export-token": token_of(capi, ready_export),
            "Range": f"bytes={first}-{last}",
        },
        verify=ca_file(ready_export, tmp_path),
        timeout=60,
    )
    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert response.content == guest_bytes(cluster, datavolume, tmp_path)[first : last + 1]


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_without_the_right_token_the_answer_is_401_and_no_data(
    ready_export: JSON, token: str | None, tmp_path: Path
) -> None:
    for fmt in ("raw", "gzip"):
        headers = {} if token is None else {"x-kubevirt-export-token": token}
        response = requests.get(
            link(ready_export, fmt),
            headers=headers,
            verify=ca_file(ready_export, tmp_path),
            timeout=30,
        )
        assert response.status_code == 401
        assert b"\x00" * 16 not in response.content and len(response.content) < 200


def test_the_server_certificate_is_signed_by_the_links_ca(
    ready_export: JSON, tmp_path: Path
) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(link(ready_export, "raw"), verify=True, timeout=30)
    # the export's own CA verifies it (and the answer without a token is 401)
    response = requests.get(
        link(ready_export, "raw"), verify=ca_file(ready_export, tmp_path), timeout=30
    )
    assert response.status_code == 401


def test_cli_download_raw_and_gzip(
    cluster: ThreadedServer, ready_export: JSON, datavolume: str, tmp_path: Path
) -> None:
    expected = guest_bytes(cluster, datavolume, tmp_path)
    base = ["--home", str(cluster.home), "export", "download", "pvc-export", "-n", NS]
    kubeconfig = ["--kubeconfig", str(cluster.kubeconfig)]
    raw = tmp_path / "disk.img"
    assert vmo_main([*base, *kubeconfig, "--output", str(raw)]) == 0
    assert raw.read_bytes() == expected
    packed = tmp_path / "disk.img.gz"
    assert vmo_main([*base, *kubeconfig, "--format", "gzip", "--output", str(packed)]) == 0
    assert gzip.decompress(packed.read_bytes()) == expected
    assert not list(tmp_path.glob(".*.part"))


def test_cli_download_of_an_unknown_volume_names_the_volumes(
    cluster: ThreadedServer, ready_export: JSON, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", "download", "pvc-export", "-n", NS, "--kubeconfig", str(cluster.kubeconfig)]
    assert vmo_main([*argv, "--volume", "nope", "--output", str(tmp_path / "x")]) == 1
    assert "--volume nope: not in the export (volumes: export-src)" in capsys.readouterr().out


def test_deleting_the_export_stops_serving_and_cleans_up(
    cluster: ThreadedServer, capi: Api, datavolume: str, tmp_path: Path
) -> None:
    create_export(capi, "short-lived", pvc_source(datavolume))
    export = wait_phase(capi, "short-lived", "Ready")
    url, token, ca = link(export, "raw"), token_of(capi, export), ca_file(export, tmp_path)
    assert requests.head(url, headers={"x-kubevirt-export-token": token}, verify=ca, timeout=30).ok
    delete_export(capi, "short-lived")
    wait_for(
        lambda: (
            requests.head(
                url, headers={"x-kubevirt-export-token": token}, verify=ca, timeout=30
            ).status_code
            == 404
        ),
        15,
        "the server to stop serving",
    )
    assert export_temp_files(cluster) == []


def test_an_expired_export_is_deleted_with_its_token(capi: Api, datavolume: str) -> None:
    create_export(capi, "ttl-export", pvc_source(datavolume), ttlDuration="4s")
    wait_phase(capi, "ttl-export", "Ready")
    wait_for(lambda: get_export(capi, "ttl-export") is None, 30, "the expired export's deletion")
    wait_for(
        lambda: (
            capi.get(f"/api/v1/namespaces/{NS}/secrets/export-token-ttl-export").status_code == 404
        ),
        30,
        "its token Secret's garbage collection",
    )


def test_a_missing_claim_leaves_the_export_pending_and_nothing_behind(
    cluster: ThreadedServer, capi: Api
) -> None:
    create_export(capi, "no-claim", pvc_source("no-such-claim"))
    export = wait_for(
        lambda: (e := get_export(capi, "no-claim")) and e.get("status", {}).get("conditions") and e,
        30,
        "a status",
    )
    assert_upstream_valid(export)
    assert export["status"]["phase"] == "Pending"
    pvc = condition(export, "PVCReady")
    assert (pvc["status"], pvc["reason"], pvc["message"]) == (
        "False",
        "PVCNotFound",
        f"PersistentVolumeClaim {NS}/no-such-claim not found",
    )
    assert condition(export, "Ready")["reason"] == "Initializing"
    assert "tokenSecretRef" not in export["status"]
    assert capi.get(f"/api/v1/namespaces/{NS}/secrets/export-token-no-claim").status_code == 404
    assert export_temp_files(cluster) == []
    delete_export(capi, "no-claim")


def test_a_user_token_secret_is_used_as_given(capi: Api, datavolume: str, tmp_path: Path) -> None:
    import base64

    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "my-token", "namespace": NS},
        "data": {"token": base64.b64encode(b"sesame").decode()},
    }
    assert capi.post(f"/api/v1/namespaces/{NS}/secrets", secret).status_code == 201
    create_export(capi, "own-token", pvc_source(datavolume), tokenSecretRef="my-token")
    export = wait_phase(capi, "own-token", "Ready")
    assert export["status"]["tokenSecretRef"] == "my-token"
    url, ca = link(export, "raw"), ca_file(export, tmp_path)
    assert requests.head(
        url, headers={"x-kubevirt-export-token": "sesame"}, verify=ca, timeout=30
    ).ok
    delete_export(capi, "own-token")
    capi.delete(f"/api/v1/namespaces/{NS}/secrets/my-token")


# --- VirtualMachine source --------------------------------------------------------------------


def test_a_running_vm_waits_and_is_exported_once_stopped(
    cluster: ThreadedServer, capi: Api, tmp_path: Path
) -> None:
    blank = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": "vm-disk", "namespace": NS},
        "spec": {
            "source": {"blank": {}},
            "storage": {"resources": {"requests": {"storage": "16Mi"}}},
        },
    }
    assert capi.post(DATAVOLUMES, blank).status_code == 201
    wait_for(lambda: dv_phase(capi, "vm-disk") == "Succeeded", 60, "the blank disk")
    vm = boot_vm(
        "exported-vm",
        namespace=NS,
        disk="vm-disk",
        interfaces=[{"name": "default", "masquerade": {}}],
        networks=[{"name": "default", "pod": {}}],
    )
    vms = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines"
    assert capi.post(vms, vm).status_code == 201
    vmi = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/exported-vm"
    wait_for(lambda: phase_of(capi, vmi) == "Running", 120, "the VM")
    create_export(
        capi,
        "vm-export",
        {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "exported-vm"},
    )
    pending = wait_for(
        lambda: (
            (e := get_export(capi, "vm-export")) and condition_or_none(e, "Ready", "InUse") and e
        ),
        30,
        "the export to wait for the VM",
    )
    assert_upstream_valid(pending)
    assert pending["status"]["phase"] == "Pending"
    assert condition(pending, "Ready")["message"] == f"Virtual Machine {NS}/exported-vm is running"
    assert pending["status"]["virtualMachineName"] == "exported-vm"
    stop = {"spec": {"runStrategy": "Halted"}}
    capi.patch(f"{vms}/exported-vm", stop, "application/merge-patch+json")
    export = wait_phase(capi, "vm-export", "Ready", timeout=120)
    assert [v["name"] for v in export["status"]["links"]["external"]["volumes"]] == ["vm-disk"]
    response = requests.get(
        link(export, "raw"),
        headers={"x-kubevirt-export-token": token_of(capi, export)},
        verify=ca_file(export, tmp_path),
        timeout=60,
    )
    assert response.content == guest_bytes(cluster, "vm-disk", tmp_path)
    delete_export(capi, "vm-export")
    capi.delete(f"{vms}/exported-vm")


def condition_or_none(export: JSON, ctype: str, reason: str) -> bool:
    for cond in export.get("status", {}).get("conditions") or []:
        if cond["type"] == ctype and cond["reason"] == reason:
            return True
    return False


def phase_of(capi: Api, path: str) -> str:
    response = capi.get(path)
    return str(response.json().get("status", {}).get("phase", "")) if response.ok else ""


# --- VirtualMachineSnapshot source ------------------------------------------------------------


def test_a_snapshot_export_serves_the_disk_as_it_was_at_the_snapshot(
    cluster: ThreadedServer, capi: Api, tmp_path: Path
) -> None:
    images = cluster.home / "images"
    images.mkdir(exist_ok=True)
    _image(images / "snap-src.qcow2")
    dv = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": "snap-src", "namespace": NS},
        "spec": {
            "source": {"http": {"url": f"file://{images / 'snap-src.qcow2'}"}},
            "storage": {"resources": {"requests": {"storage": str(SIZE)}}},
        },
    }
    assert capi.post(DATAVOLUMES, dv).status_code == 201
    wait_for(lambda: dv_phase(capi, "snap-src") == "Succeeded", 60, "the import")
    vm = boot_vm(
        "snapped-vm",
        namespace=NS,
        disk="snap-src",
        interfaces=[{"name": "default", "masquerade": {}}],
        networks=[{"name": "default", "pod": {}}],
    )
    vm["spec"]["runStrategy"] = "Halted"
    vms = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines"
    assert capi.post(vms, vm).status_code == 201
    before = guest_bytes(cluster, "snap-src", tmp_path)
    snaps = f"/apis/snapshot.kubevirt.io/v1beta1/namespaces/{NS}/virtualmachinesnapshots"
    snapshot = {
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineSnapshot",
        "metadata": {"name": "snap-1", "namespace": NS},
        "spec": {
            "source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "snapped-vm"}
        },
    }
    assert capi.post(snaps, snapshot).status_code == 201
    wait_for(
        lambda: capi.get(f"{snaps}/snap-1").json().get("status", {}).get("readyToUse"),
        60,
        "the snapshot",
    )
    # the volume moves on after the snapshot: the export must not see it
    top = (cluster.home / "nodes" / "node-1" / "pool" / f"{NS}--snap-src.qcow2").resolve()
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 0 1M", str(top)], check=True, capture_output=True
    )
    assert guest_bytes(cluster, "snap-src", tmp_path) != before
    source = {
        "apiGroup": "snapshot.kubevirt.io",
        "kind": "VirtualMachineSnapshot",
        "name": "snap-1",
    }
    create_export(capi, "snap-export", source)
    export = wait_phase(capi, "snap-export", "Ready")
    assert export["status"]["virtualMachineName"] == "snapped-vm"
    assert condition(export, "VolumesCreated")["reason"] == "AllPVCsReady"
    assert [v["name"] for v in export["status"]["links"]["external"]["volumes"]] == ["snap-src"]
    headers = {"x-kubevirt-export-token": token_of(capi, export)}
    ca = ca_file(export, tmp_path)
    raw = requests.get(link(export, "raw"), headers=headers, verify=ca, timeout=60)
    assert raw.status_code == 200 and raw.content == before
    packed = requests.get(link(export, "gzip"), headers=headers, verify=ca, timeout=60)
    assert gzip.decompress(packed.content) == before
    delete_export(capi, "snap-export")
    capi.delete(f"{snaps}/snap-1")
    capi.delete(f"{vms}/snapped-vm")


def test_a_missing_snapshot_is_pending_as_upstream_says(capi: Api) -> None:
    source = {"apiGroup": "snapshot.kubevirt.io", "kind": "VirtualMachineSnapshot", "name": "nope"}
    create_export(capi, "no-snap", source)
    export = wait_for(
        lambda: (e := get_export(capi, "no-snap")) and e.get("status", {}).get("conditions") and e,
        30,
        "a status",
    )
    assert_upstream_valid(export)
    ready_cond = condition(export, "Ready")
    assert (ready_cond["reason"], ready_cond["message"]) == (
        "VMSnapshotNotFound",
        f"VirtualMachineSnapshot {NS}/nope not found",
    )
    assert condition(export, "VolumesCreated")["reason"] == "VMSnapshotNoVolumes"
    delete_export(capi, "no-snap")
