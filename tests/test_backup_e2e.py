"""KubeVirt's backup API on a real guest, read the way a backup application reads it.

One VM with a root and a data disk (DataVolumes in the node's pool). The guest writes random
data to its data disk; a pull-mode VirtualMachineBackup from a tracker serves both volumes'
data and map endpoints; VMO's backup application pulls them into a repository, and the data
disk restored from it reads, byte for byte, what the guest read. Deleting the backup ends it and
moves the tracker's checkpoint on; the next backup is incremental, its map lists only what the
guest wrote since, and the data disk restored from it matches again. The tests run in order and
share the VM.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, Kubectl
from tests.test_kubevirt_models import upstream_errors
from tests.test_snapshot_e2e import FIND_DATA, READ_SUM, WRITE, blank_dv, data_vm
from tests.test_vm_e2e import BOOT_TIMEOUT, NS, console, engine_cluster, wait_for, wait_running
from vmo.controllers.backup.disk import FileTarget, backup_disk, restore_disk
from vmo.controllers.backup.endpoints import EndpointSource
from vmo.controllers.backup.repository import DiskIndex, Repository, local_store
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import http_datavolume

BK = f"/apis/backup.kubevirt.io/v1alpha1/namespaces/{NS}"
EXPORTS = f"/apis/export.kubevirt.io/v1/namespaces/{NS}/virtualmachineexports"
TOKEN = "backup-e2e-token"
JSON = dict[str, Any]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-backup"))


@pytest.fixture(scope="module")
def guest(k: Kubectl, capi: Api, cluster: ThreadedServer, image_server: str) -> dict[str, Any]:
    """VM ``bk`` running with known data on its data disk; its tracker, token and target PVC."""
    k.apply(http_datavolume("bk-root", f"{image_server}/disk.qcow2", namespace=NS))
    k.apply(blank_dv("bk-data"))
    k.apply(data_vm("bk", "bk-root", "bk-data"))
    wait_running(capi, "bk")
    wait_for(lambda: "bk-up" in console(cluster, "bk", "echo bk-up"), BOOT_TIMEOUT, "console")
    console(cluster, "bk", WRITE)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "bk-token", "namespace": NS},
        "data": {"token": base64.b64encode(TOKEN.encode()).decode()},
    }
    target = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "bk-target", "namespace": NS},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}},
    }
    tracker = {
        "apiVersion": "backup.kubevirt.io/v1alpha1",
        "kind": "VirtualMachineBackupTracker",
        "metadata": {"name": "bk-tracker", "namespace": NS},
        "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "bk"}},
    }
    for obj in (secret, target, tracker):
        k.apply(obj)
    return {"sums": [guest_sum(cluster)], "indexes": {}}


def guest_sum(cluster: ThreadedServer) -> str:
    return console(cluster, "bk", READ_SUM).split()[0]


def backup(name: str, *, source: JSON | None = None, mode: str = "Pull") -> JSON:
    return {
        "apiVersion": "backup.kubevirt.io/v1alpha1",
        "kind": "VirtualMachineBackup",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": source
            or {"apiGroup": "backup.kubevirt.io", "kind": "VirtualMachineBackupTracker",
                "name": "bk-tracker"},
            "mode": mode,
            "pvcName": "bk-target",
            "tokenSecretRef": "bk-token",
        },
    }  # fmt: skip


def conditions(obj: JSON) -> dict[str, JSON]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def wait_reason(capi: Api, name: str, ctype: str, reason: str, timeout: float = 90) -> JSON:
    def reached() -> JSON | None:
        found = capi.get(f"{BK}/virtualmachinebackups/{name}")
        obj: JSON = found.json() if found.ok else {}
        cond = conditions(obj).get(ctype) or {}
        assert conditions(obj).get("Failed", {}).get("status") != "True" or ctype == "Failed", obj
        return obj if cond.get("reason") == reason else None

    found: JSON = wait_for(reached, timeout, f"backup {name}: {ctype} {reason}")
    return found


def pull(status: JSON, repo: Repository, parents: dict[str, DiskIndex]) -> dict[str, DiskIndex]:
    """Every included volume into ``repo`` (incrementally from ``parents`` where given)."""

    async def run() -> dict[str, DiskIndex]:
        out = {}
        for volume in status["includedVolumes"]:
            name = volume["volumeName"]
            parent = parents.get(name)
            incremental = status["type"] == "Incremental"
            async with EndpointSource(
                volume["dataEndpoint"], volume["mapEndpoint"], TOKEN,
                ca_pem=status["endpointCert"], incremental=incremental,
            ) as source:  # fmt: skip
                changed = source.changed() if incremental else None
                if incremental:
                    # only what the guest wrote since the first backup, not the disk
                    assert sum(n for _, n in changed or []) < source.size // 4, changed
                index, _ = await backup_disk(repo, name, source, parent=parent, changed=changed)
            out[name] = index
        return out

    return asyncio.run(run())


def restored_sum(repo: Repository, index: DiskIndex, path: Path) -> str:
    async def run() -> None:
        target = FileTarget(path, index.size, fresh=True)
        try:
            await restore_disk(repo, index, target)
        finally:
            target.close()

    asyncio.run(run())
    return hashlib.md5(path.read_bytes()[: 1 << 20]).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    path = tmp_path_factory.mktemp("bk-repo")
    found: Repository = asyncio.run(Repository.init(local_store(path), chunk_size=256 << 10))
    return found


def finish(capi: Api, name: str, checkpoint: str) -> None:
    assert capi.delete(f"{BK}/virtualmachinebackups/{name}").status_code == 200
    wait_for(
        lambda: capi.get(f"{BK}/virtualmachinebackups/{name}").status_code == 404,
        60,
        f"backup {name} to end",
    )
    tracker = capi.get(f"{BK}/virtualmachinebackuptrackers/bk-tracker").json()
    assert tracker["status"]["latestCheckpoint"]["name"] == checkpoint
    assert upstream_errors(tracker) == []
    assert capi.get(f"{EXPORTS}/{name}").status_code == 404


def test_a_full_pull_backup_restores_what_the_guest_wrote(
    cluster: ThreadedServer, capi: Api, k: Kubectl, guest: dict[str, Any], repo: Repository,
    tmp_path: Path,
) -> None:  # fmt: skip
    k.apply(backup("bk-1"))
    ready = wait_reason(capi, "bk-1", "Progressing", "ExportReady")
    status = ready["status"]
    assert status["type"] == "Full"
    assert status["checkpointName"].startswith("bk-1-")
    assert conditions(ready)["Quiesced"]["reason"] == "QuiesceSucceeded"
    assert {v["volumeName"] for v in status["includedVolumes"]} == {"root", "data"}
    assert upstream_errors(ready) == []
    indexes = pull(status, repo, {})
    assert restored_sum(repo, indexes["data"], tmp_path / "data.img") == guest["sums"][0]
    guest["indexes"] = indexes
    finish(capi, "bk-1", status["checkpointName"])


def test_the_next_backup_is_incremental_and_restores_the_new_data(
    cluster: ThreadedServer, capi: Api, k: Kubectl, guest: dict[str, Any], repo: Repository,
    tmp_path: Path,
) -> None:  # fmt: skip
    console(cluster, "bk", WRITE)
    guest["sums"].append(guest_sum(cluster))
    assert guest["sums"][1] != guest["sums"][0]
    k.apply(backup("bk-2"))
    ready = wait_reason(capi, "bk-2", "Progressing", "ExportReady")
    status = ready["status"]
    assert status["type"] == "Incremental", status
    indexes = pull(status, repo, guest["indexes"])
    assert restored_sum(repo, indexes["data"], tmp_path / "data.img") == guest["sums"][1]
    # the first point in time is still there, whole
    first = guest["indexes"]["data"]
    assert restored_sum(repo, first, tmp_path / "first.img") == guest["sums"][0]
    guest["indexes"] = indexes  # the next incremental builds on this one's checkpoint
    finish(capi, "bk-2", status["checkpointName"])
    # nothing of either backup is left on the node: no fleece, no export socket
    assert not list(cluster.home.glob("**/.vmo-fleece-*"))
    assert not list(cluster.home.glob("**/backup.nbd"))


def test_refusals_say_why(capi: Api, k: Kubectl, guest: dict[str, Any]) -> None:
    # a push into a claim the VM itself uses would overwrite a disk it is running on
    onto_disk = backup("bk-push-0", mode="Push")
    onto_disk["spec"]["pvcName"] = "bk-data"
    k.apply(onto_disk)
    failed = wait_reason(capi, "bk-push-0", "Failed", "Failed", 30)
    message = conditions(failed)["Failed"]["message"]
    assert message == f"Backup has failed: PVC {NS}/bk-data is in use by VMI bk", message
    assert capi.delete(f"{BK}/virtualmachinebackups/bk-push-0").status_code == 200
    ghost = {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "ghost"}
    k.apply(backup("bk-ghost", source=ghost))
    waiting = wait_reason(capi, "bk-ghost", "Progressing", "Initializing", 30)
    message = conditions(waiting)["Progressing"]["message"]
    assert message == "vm ghost does not exist, cannot do backup"
    assert capi.delete(f"{BK}/virtualmachinebackups/bk-ghost").status_code == 200
    wait_for(
        lambda: capi.get(f"{BK}/virtualmachinebackups/bk-ghost").status_code == 404,
        30,
        "bk-ghost to go",
    )


# --- VMO's backup application: a BackupPolicy run by `vmo controllers run` ----------------------


@pytest.fixture(scope="module")
def controllers(
    cluster: ThreadedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """VMO's controllers as their own process, against the embedded API; their backup root."""
    root = tmp_path_factory.mktemp("bk-root")
    argv = [sys.executable, "-m", "vmo.cli.main", "controllers", "run",
            "--kubeconfig", str(cluster.kubeconfig), "--backup-root", str(root),
            "--lease-duration", "4"]  # fmt: skip
    log = (root.parent / "controllers.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield root
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


POLICIES = f"/apis/vmo.dev/v1alpha1/namespaces/{NS}/backuppolicies"


def vm_entry(capi: Api) -> JSON:
    found = capi.get(f"{POLICIES}/nightly")
    status = (found.json() if found.ok else {}).get("status") or {}
    return next((v for v in status.get("virtualMachines") or [] if v["name"] == "bk"), {})


def run_policy(capi: Api, k: Kubectl, previous: str) -> JSON:
    k("annotate", "backuppolicy", "nightly", "-n", NS, "vmo.dev/backup-now=yes", "--overwrite")

    def done() -> JSON | None:
        entry = vm_entry(capi)
        assert not entry.get("lastFailureReason"), entry
        return entry if entry.get("lastBackup", previous) != previous else None

    found: JSON = wait_for(done, 120, "the policy's backup of bk")
    return found


def test_a_backup_policy_stores_full_then_incremental_backups_that_restore(
    cluster: ThreadedServer, capi: Api, k: Kubectl, guest: dict[str, Any], controllers: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    wait_for(
        lambda: capi.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                         "backuppolicies.vmo.dev").ok,
        60, "the backup CRDs",
    )  # fmt: skip
    repository = {
        "apiVersion": "vmo.dev/v1alpha1",
        "kind": "BackupRepository",
        "metadata": {"name": "local", "namespace": NS},
        "spec": {"local": {"path": "e2e"}, "chunkSize": 262144},
    }
    policy = {
        "apiVersion": "vmo.dev/v1alpha1",
        "kind": "BackupPolicy",
        "metadata": {"name": "nightly", "namespace": NS},
        "spec": {"repository": "local", "schedule": "0 3 * * *", "retention": {"keepLast": 5}},
    }
    wait_for(lambda: capi.post(f"/apis/vmo.dev/v1alpha1/namespaces/{NS}/backuprepositories",
                               repository).status_code in (201, 409), 30, "the repository")  # fmt: skip
    assert capi.post(POLICIES, policy).status_code == 201
    first = run_policy(capi, k, "")
    assert first["lastBackupType"] == "Full" and first["recoveryPoint"]

    def repository_ready() -> JSON | None:
        found = capi.get(f"/apis/vmo.dev/v1alpha1/namespaces/{NS}/backuprepositories/local")
        status: JSON = (found.json() if found.ok else {}).get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        return status if ready.get("status") == "True" else None

    repo_status = wait_for(repository_ready, 30, "the repository's Ready condition")
    assert repo_status["chunkSize"] == 262144 and repo_status["encrypted"] is False
    repo = asyncio.run(Repository.open(local_store(controllers / NS / "e2e")))
    manifest = asyncio.run(repo.latest(NS, "bk"))
    assert manifest is not None and manifest.kind == "Full"
    assert {o["kind"] for o in manifest.objects} >= {"VirtualMachine", "DataVolume"}
    data = manifest.disk("data")
    assert data is not None
    current = guest_sum(cluster)
    assert restored_sum(repo, data, tmp_path / "p1.img") == current
    console(cluster, "bk", WRITE)
    changed = guest_sum(cluster)
    second = run_policy(capi, k, first["lastBackup"])
    assert second["lastBackupType"] == "Incremental", second
    manifest = asyncio.run(repo.latest(NS, "bk"))
    assert manifest is not None and manifest.kind == "Incremental"
    data = manifest.disk("data")
    assert data is not None
    assert restored_sum(repo, data, tmp_path / "p2.img") == changed
    # the policy's VirtualMachineBackups are gone once stored; the repository verifies
    left = capi.get(f"{BK}/virtualmachinebackups?labelSelector=vmo.dev%2Fbackup-policy").json()
    assert left["items"] == []
    assert asyncio.run(repo.verify()).ok


def vmo_backup(cluster: ThreadedServer, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmo.cli.main", "backup", *args, "--repository", "local",
            "-n", NS, "--kubeconfig", str(cluster.kubeconfig), "--backup-root", str(root)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_the_cli_lists_shows_restores_verifies_and_prunes(
    cluster: ThreadedServer, guest: dict[str, Any], controllers: Path, tmp_path: Path
) -> None:
    listed = vmo_backup(cluster, controllers, "ls")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("bk") >= 2 and "Incremental" in listed.stdout
    repo = asyncio.run(Repository.open(local_store(controllers / NS / "e2e")))
    refs = asyncio.run(repo.backups(NS, "bk"))
    latest = refs[-1].id
    shown = vmo_backup(cluster, controllers, "show", latest[:20])
    assert (
        shown.returncode == 0 and "disk data" in shown.stdout and "VirtualMachine" in shown.stdout
    )
    out = tmp_path / "data.raw"
    restored = vmo_backup(
        cluster, controllers, "restore", latest, "--disk", "data", "--output", str(out)
    )
    assert restored.returncode == 0, restored.stderr
    assert hashlib.md5(out.read_bytes()[: 1 << 20]).hexdigest() == guest_sum(cluster)
    again = vmo_backup(
        cluster, controllers, "restore", latest, "--disk", "data", "--output", str(out)
    )
    assert again.returncode == 1 and "pass --force" in again.stderr
    missing = vmo_backup(cluster, controllers, "show", "20200101")
    assert missing.returncode == 1 and "not found" in missing.stderr
    assert vmo_backup(cluster, controllers, "verify").returncode == 0
    pruned = vmo_backup(cluster, controllers, "prune", "--keep-last", "1", "--grace", "0")
    assert pruned.returncode == 0 and "forgot 1 backups" in pruned.stdout, pruned.stdout
    assert [r.id for r in asyncio.run(repo.backups(NS, "bk"))] == [latest]
    # a damaged chunk: verify names it and fails, and a restore of it stops
    manifest = asyncio.run(repo.read_manifest(refs[-1]))
    data = manifest.disk("data")
    assert data is not None
    victim = sorted(data.chunks())[0]
    chunk_file = controllers / NS / "e2e" / Repository.chunk_key(victim)
    blob = bytearray(chunk_file.read_bytes())
    blob[-1] ^= 0xFF
    chunk_file.write_bytes(bytes(blob))
    verified = vmo_backup(cluster, controllers, "verify")
    assert verified.returncode == 1 and victim.hex() in verified.stdout
    broken = vmo_backup(
        cluster, controllers, "restore", latest, "--disk", "data", "--output", str(tmp_path / "x")
    )
    assert broken.returncode == 1 and "damaged" in broken.stderr
    assert not (tmp_path / "x").exists()  # no half-restored disk under its name
    blob[-1] ^= 0xFF  # mended, for the restores below
    chunk_file.write_bytes(bytes(blob))
    assert vmo_backup(cluster, controllers, "verify").returncode == 0


def test_after_a_restart_of_the_vm_the_next_backup_stays_incremental(
    cluster: ThreadedServer, capi: Api, k: Kubectl, guest: dict[str, Any], repo: Repository,
    tmp_path: Path,
) -> None:  # fmt: skip
    before = capi.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/bk").json()
    argv = [sys.executable, "-m", "vmo.cli.main", "restart", "bk", "-n", NS,
            "--kubeconfig", str(cluster.kubeconfig)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    def restarted() -> bool:
        vmi = capi.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/bk")
        body = vmi.json() if vmi.ok else {}
        uid = body.get("metadata", {}).get("uid")
        return bool(
            uid and uid != before["metadata"]["uid"] and body["status"].get("phase") == "Running"
        )

    wait_for(restarted, BOOT_TIMEOUT, "bk to run again")
    wait_for(lambda: "bk-up" in console(cluster, "bk", "echo bk-up"), BOOT_TIMEOUT, "console")
    console(cluster, "bk", WRITE)
    current = guest_sum(cluster)
    k.apply(backup("bk-3"))
    ready = wait_reason(capi, "bk-3", "Progressing", "ExportReady")
    status = ready["status"]
    # the checkpoint lives in the image: a clean restart keeps it
    assert status["type"] == "Incremental", status
    indexes = pull(status, repo, guest["indexes"])
    assert restored_sum(repo, indexes["data"], tmp_path / "data.img") == current
    guest["indexes"] = indexes
    finish(capi, "bk-3", status["checkpointName"])


def test_an_agent_killed_mid_backup_fails_it_and_the_next_one_is_still_incremental(
    cluster: ThreadedServer, capi: Api, k: Kubectl, guest: dict[str, Any], repo: Repository,
    tmp_path: Path,
) -> None:  # fmt: skip
    k.apply(backup("bk-5"))
    wait_reason(capi, "bk-5", "Progressing", "ExportReady")
    cluster.restart_node("node-1")  # the guest keeps running; the new agent adopts it
    failed = wait_reason(capi, "bk-5", "Failed", "Failed", 120)
    message = conditions(failed)["Failed"]["message"]
    assert message == "Backup has failed: the node agent restarted during the backup"
    assert capi.get(f"{EXPORTS}/bk-5").status_code == 404
    assert not list(cluster.home.glob("**/.vmo-fleece-*"))
    assert capi.delete(f"{BK}/virtualmachinebackups/bk-5").status_code == 200
    wait_for(
        lambda: capi.get(f"{BK}/virtualmachinebackups/bk-5").status_code == 404, 30, "bk-5 to go"
    )
    # what the dead backup left was swept, but the tracker's checkpoint was kept
    console(cluster, "bk", WRITE)
    current = guest_sum(cluster)
    k.apply(backup("bk-6"))
    ready = wait_reason(capi, "bk-6", "Progressing", "ExportReady")
    assert ready["status"]["type"] == "Incremental", ready["status"]
    indexes = pull(ready["status"], repo, guest["indexes"])
    assert restored_sum(repo, indexes["data"], tmp_path / "data.img") == current
    guest["indexes"] = indexes
    finish(capi, "bk-6", ready["status"]["checkpointName"])


# --- push mode ---------------------------------------------------------------------------------


def dump(raw: Path, inside: str, out: Path) -> Path:
    """A file out of the ext4 filesystem in ``raw``, by e2fsprogs' debugfs (an oracle that is
    not VMO's code)."""
    subprocess.run(["debugfs", "-R", f"dump {inside} {out}", str(raw)], check=True,
                   capture_output=True)  # fmt: skip
    assert out.is_file() and out.stat().st_size > 0, f"{inside} is not in the claim"
    return out


def first_mib_md5(qcow2: Path, tmp: Path) -> str:
    raw = tmp / f"{qcow2.name}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(qcow2), str(raw)], check=True)
    return hashlib.md5(raw.read_bytes()[: 1 << 20]).hexdigest()


def test_push_backups_write_sparse_qcow2s_into_the_pvc_that_stitch_back(
    cluster: ThreadedServer, capi: Api, k: Kubectl, guest: dict[str, Any], tmp_path: Path
) -> None:
    tracker = {"apiVersion": "backup.kubevirt.io/v1alpha1", "kind": "VirtualMachineBackupTracker",
               "metadata": {"name": "bk-push-tracker", "namespace": NS},
               "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine",
                                   "name": "bk"}}}  # fmt: skip
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "bk-push", "namespace": NS},
             "spec": {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": "256Mi"}}}}  # fmt: skip
    k.apply(tracker)
    k.apply(claim)
    source = {"apiGroup": "backup.kubevirt.io", "kind": "VirtualMachineBackupTracker",
              "name": "bk-push-tracker"}  # fmt: skip
    sums = []
    for name in ("bk-push-1", "bk-push-2"):
        if sums:
            console(cluster, "bk", WRITE)
        sums.append(guest_sum(cluster))
        body = backup(name, source=source, mode="Push")
        body["spec"]["pvcName"] = "bk-push"
        k.apply(body)

        def complete(name: str = name) -> JSON | None:
            found = capi.get(f"{BK}/virtualmachinebackups/{name}").json()
            conds = conditions(found)
            assert conds.get("Failed", {}).get("status") != "True", found
            return found if conds.get("Complete", {}).get("status") == "True" else None

        done = wait_for(complete, 120, f"push backup {name}")
        assert upstream_errors(done) == []
        assert {v["volumeName"] for v in done["status"]["includedVolumes"]} == {"root", "data"}
        assert done["status"]["type"] == ("Full" if name.endswith("1") else "Incremental")
        found = capi.get(f"{BK}/virtualmachinebackuptrackers/bk-push-tracker").json()
        assert found["status"]["latestCheckpoint"]["name"] == done["status"]["checkpointName"]
    # the claim holds an ext4 filesystem with one directory per backup
    volume = next(cluster.home.glob(f"nodes/*/pool/{NS}--bk-push.qcow2"))
    raw = tmp_path / "claim.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(volume), str(raw)], check=True)
    full = dump(raw, "/bk-push-1/data.qcow2", tmp_path / "full.qcow2")
    incr = dump(raw, "/bk-push-2/data.qcow2", tmp_path / "incr.qcow2")
    assert dump(raw, "/bk-push-1/root.qcow2", tmp_path / "root.qcow2")
    assert first_mib_md5(full, tmp_path) == sums[0]
    mapped = subprocess.run(["qemu-img", "map", "--output=json", str(incr)], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    data = sum(e["length"] for e in json.loads(mapped) if e["data"])
    assert 0 < data <= 2 << 20, data  # the 1 MiB the guest wrote, not the disk
    # upstream's recipe: the incremental rebased onto the full one reads as the disk did
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(full), "-F", "qcow2", str(incr)],
                   check=True)  # fmt: skip
    assert first_mib_md5(incr, tmp_path) == sums[1]
    assert not list(cluster.home.glob("**/.vmo-fleece-*")) and not list(
        cluster.home.glob("**/.vmo-push-*")
    )


# --- restores: files out of a backup, a new VM, an existing VM, a single disk --------------------

MAKE_FS = (
    "echo 127.0.0.1 localhost bk-$((6*7)) > /etc/hosts; "
    f"{FIND_DATA}; mke2fs -q $D && mkdir -p /mnt/d && mount -t ext2 $D /mnt/d && mkdir /mnt/d/etc "
    "&& cp /etc/hosts /mnt/d/etc/hosts && echo restored-$((6*7)) > /mnt/d/marker && umount /mnt/d "
    "&& sync && echo fs-$((6*7))"
)
READ_MARKER = f"{FIND_DATA}; mkdir -p /mnt/d && mount -t ext2 -o ro $D /mnt/d && cat /mnt/d/marker; umount /mnt/d"
MERGE = "application/merge-patch+json"
RESTORES = f"/apis/vmo.dev/v1alpha1/namespaces/{NS}/backuprestores"


def restore_status(capi: Api, name: str, timeout: float = 180) -> JSON:
    def ended() -> JSON | None:
        found = capi.get(f"{RESTORES}/{name}")
        status: JSON = (found.json() if found.ok else {}).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    found: JSON = wait_for(ended, timeout, f"BackupRestore {name} to end")
    return found


def kv(capi: Api, kind: str, name: str, ns: str = NS) -> JSON | None:
    group = "cdi.kubevirt.io/v1beta1" if kind == "datavolumes" else "kubevirt.io/v1"
    found = capi.get(f"/apis/{group}/namespaces/{ns}/{kind}/{name}")
    return found.json() if found.ok else None


def test_files_come_out_of_a_backup_and_it_restores_into_a_new_vm_with_new_macs(
    cluster: ThreadedServer, capi: Api, k: Kubectl, guest: dict[str, Any], controllers: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    assert "fs-42" in console(cluster, "bk", MAKE_FS)
    hosts = console(cluster, "bk", "cat /etc/hosts")
    guest["random_backup"] = vm_entry(capi)["lastBackup"]
    backup_id = run_policy(capi, k, guest["random_backup"])["lastBackup"]
    guest["fs_backup"] = backup_id
    # files, without restoring the disk
    listed = vmo_backup(cluster, controllers, "files", backup_id, "/", "--disk", "data")
    assert listed.returncode == 0, listed.stderr
    assert "marker" in listed.stdout and "etc" in listed.stdout, listed.stdout
    got = vmo_backup(cluster, controllers, "extract", backup_id, "/etc/hosts", "/marker",
                     "--disk", "data", "--output", str(tmp_path))  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert "extracted 2 files" in got.stdout, got.stdout
    assert "bk-42" in (tmp_path / "hosts").read_text()
    assert (tmp_path / "hosts").read_text().strip() in hosts
    assert (tmp_path / "marker").read_text() == "restored-42\n"
    # the whole VM, as a new one beside the original, with new MACs
    done = vmo_backup(cluster, controllers, "restore", backup_id, "--to-vm", "bk-copy",
                      "--new-macs", "--name", "to-copy")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "into virtual-machines/bk-copy: done" in done.stdout.replace(
        f"{NS}/", "virtual-machines/"
    )
    vm = kv(capi, "virtualmachines", "bk-copy")
    assert vm is not None and upstream_errors(vm) == []
    assert vm["spec"]["runStrategy"] == "Halted"
    volumes = {v["name"]: v for v in vm["spec"]["template"]["spec"]["volumes"]}
    assert volumes["root"]["dataVolume"]["name"] == "bk-copy-root"
    assert volumes["data"]["dataVolume"]["name"] == "bk-copy-data"
    for name in ("bk-copy-root", "bk-copy-data"):
        dv = kv(capi, "datavolumes", name)
        assert dv is not None and dv["status"]["phase"] == "Succeeded"
        assert dv["metadata"]["ownerReferences"][0]["uid"] == vm["metadata"]["uid"]
        assert upstream_errors(dv) == []
    mac = vm["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]["macAddress"]
    original = kv(capi, "virtualmachineinstances", "bk")
    assert original is not None
    assert mac != original["status"]["interfaces"][0]["mac"]
    assert int(mac.split(":")[0], 16) & 0x03 == 0x02  # unicast, locally administered
    for kind in ("secrets", "configmaps"):  # the restore's credentials and CA are gone
        assert capi.get(f"/api/v1/namespaces/{NS}/{kind}/to-copy-vmo-restore").status_code == 404
    # it boots on the restored disks, with its new MAC and the data the backup held
    capi.patch(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/bk-copy",
               {"spec": {"runStrategy": "Always"}}, MERGE)  # fmt: skip
    wait_running(capi, "bk-copy")
    wait_for(lambda: "up" in console(cluster, "bk-copy", "echo up"), BOOT_TIMEOUT, "bk-copy")
    assert mac in console(cluster, "bk-copy", "cat /sys/class/net/e*/address")
    assert "restored-42" in console(cluster, "bk-copy", READ_MARKER)


def test_a_stopped_vm_gets_one_disk_back_and_a_running_one_is_refused(
    cluster: ThreadedServer, capi: Api, guest: dict[str, Any], controllers: Path, repo: Repository,
    tmp_path: Path,
) -> None:  # fmt: skip
    # a running VM is refused, and left alone
    body = {"apiVersion": "vmo.dev/v1alpha1", "kind": "BackupRestore",
            "metadata": {"name": "onto-running", "namespace": NS},
            "spec": {"repository": "local", "virtualMachine": "bk", "target": {"name": "bk-copy"}}}  # fmt: skip
    assert capi.post(RESTORES, body).status_code == 201
    refused = restore_status(capi, "onto-running")
    assert refused["phase"] == "Failed"
    failed = next(c for c in refused["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "VirtualMachineRunning" and "stop it" in failed["message"]
    # a disk the backup does not have is named
    body["metadata"]["name"] = "bad-volume"
    body["spec"]["volumes"] = ["nope"]
    assert capi.post(RESTORES, body).status_code == 201
    bad = restore_status(capi, "bad-volume")
    message = next(c for c in bad["conditions"] if c["type"] == "Failed")["message"]
    assert message.startswith("spec.volumes[0]: nope is not a disk of backup"), message
    # stop bk-copy, and give it back the data disk of the backup before the filesystem
    capi.patch(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/bk-copy",
               {"spec": {"runStrategy": "Halted"}}, MERGE)  # fmt: skip
    wait_for(lambda: kv(capi, "virtualmachineinstances", "bk-copy") is None, 120, "bk-copy to stop")
    done = vmo_backup(cluster, controllers, "restore", guest["random_backup"], "--to-vm",
                      "bk-copy", "--disk", "data", "--name", "data-back")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(was bk-copy-data)" in done.stdout, done.stdout
    vm = kv(capi, "virtualmachines", "bk-copy")
    assert vm is not None
    volumes = {v["name"]: v for v in vm["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["dataVolume"]["name"] == "data-back-data"
    assert volumes["root"]["dataVolume"]["name"] == "bk-copy-root"  # the other disk untouched
    wait_for(lambda: kv(capi, "datavolumes", "bk-copy-data") is None, 30, "the old disk to go")
    # the disk now holds what the earlier backup holds, byte for byte
    local = asyncio.run(Repository.open(local_store(controllers / NS / "e2e")))
    refs = [r for r in asyncio.run(local.backups(NS, "bk")) if r.id == guest["random_backup"]]
    data = asyncio.run(local.read_manifest(refs[0])).disk("data")
    assert data is not None
    expected = restored_sum(local, data, tmp_path / "expected.img")
    capi.patch(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/bk-copy",
               {"spec": {"runStrategy": "Always"}}, MERGE)  # fmt: skip
    wait_running(capi, "bk-copy")
    wait_for(lambda: "up" in console(cluster, "bk-copy", "echo up"), BOOT_TIMEOUT, "bk-copy")
    assert console(cluster, "bk-copy", READ_SUM).split()[0] == expected
    assert capi.delete(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/bk-copy").ok
    # a single disk into another namespace, as a DataVolume alone
    capi.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                     "metadata": {"name": "restored"}})  # fmt: skip
    refused = vmo_backup(cluster, controllers, "restore", guest["fs_backup"], "--disk", "data",
                         "--to-namespace", "restored", "--volumes-only", "--name", "no-consent")  # fmt: skip
    assert refused.returncode == 1
    assert f"does not accept restores from {NS}" in refused.stderr, refused.stderr
    consent = {"metadata": {"annotations": {"vmo.dev/accept-restores-from": NS}}}
    assert capi.patch("/api/v1/namespaces/restored", consent, MERGE).ok
    only = vmo_backup(cluster, controllers, "restore", guest["fs_backup"], "--disk", "data",
                      "--to-namespace", "restored", "--volumes-only", "--name", "one-disk")  # fmt: skip
    assert only.returncode == 0, only.stdout + only.stderr
    dv = kv(capi, "datavolumes", "one-disk-data", "restored")
    assert dv is not None and dv["status"]["phase"] == "Succeeded"
    assert "ownerReferences" not in dv["metadata"]
    assert (
        capi.get("/apis/kubevirt.io/v1/namespaces/restored/virtualmachines").json()["items"] == []
    )


# --- a stopped VM: its disks held open by a guestless QEMU -----------------------------------------

VMS = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines"
LOCK = "vmo.dev/backup-in-progress"


def storage_qemus() -> list[int]:
    """The QEMUs holding a stopped VM's disks for a backup (``guest=vmo-backup-...``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(b"guest=vmo-backup-") for a in argv):
            found.append(int(proc.name))
    return found


def vm_lock(capi: Api) -> str | None:
    vm = capi.get(f"{VMS}/bk").json()
    lock: str | None = (vm["metadata"].get("annotations") or {}).get(LOCK)
    return lock


def test_a_stopped_vm_is_backed_up_incrementally_and_starts_once_the_backup_ends(
    cluster: ThreadedServer, capi: Api, k: Kubectl, guest: dict[str, Any], repo: Repository,
    tmp_path: Path,
) -> None:  # fmt: skip
    console(cluster, "bk", WRITE)
    current = guest_sum(cluster)
    assert capi.patch(f"{VMS}/bk", {"spec": {"runStrategy": "Halted"}}, MERGE).ok
    wait_for(lambda: kv(capi, "virtualmachineinstances", "bk") is None, 120, "bk to stop")
    # the node agent killed mid-backup: the backup fails, its QEMU and the VM's lock go
    k.apply(backup("bk-off-0"))
    wait_reason(capi, "bk-off-0", "Progressing", "ExportReady")
    assert vm_lock(capi) == "bk-off-0@node-1" and len(storage_qemus()) == 1
    cluster.restart_node("node-1")
    failed = wait_reason(capi, "bk-off-0", "Failed", "Failed", 120)
    assert conditions(failed)["Failed"]["message"].endswith(
        "the node agent restarted during the backup"
    )
    wait_for(lambda: storage_qemus() == [] and vm_lock(capi) is None, 30, "the backup's QEMU to go")
    assert capi.delete(f"{BK}/virtualmachinebackups/bk-off-0").status_code == 200
    # a push backup of the stopped VM: incremental from the push tracker's checkpoint
    body = backup("bk-off-push", mode="Push",
                  source={"apiGroup": "backup.kubevirt.io", "kind": "VirtualMachineBackupTracker",
                          "name": "bk-push-tracker"})  # fmt: skip
    body["spec"]["pvcName"] = "bk-push"
    k.apply(body)

    def pushed() -> JSON | None:
        found = capi.get(f"{BK}/virtualmachinebackups/bk-off-push").json()
        conds = conditions(found)
        assert conds.get("Failed", {}).get("status") != "True", found
        return found if conds.get("Complete", {}).get("status") == "True" else None

    done = wait_for(pushed, 120, "the stopped VM's push backup")
    assert done["status"]["type"] == "Incremental", done["status"]
    assert conditions(done)["Quiesced"]["reason"] == "QuiesceSkipped"
    assert upstream_errors(done) == []
    wait_for(lambda: storage_qemus() == [] and vm_lock(capi) is None, 30, "the push's QEMU to go")
    # a pull backup; the VM asked to start meanwhile waits for it
    k.apply(backup("bk-7"))
    ready = wait_reason(capi, "bk-7", "Progressing", "ExportReady")
    status = ready["status"]
    # the checkpoint of bk-6 was stored in the image when the guest stopped
    assert status["type"] == "Incremental", status
    assert {v["volumeName"] for v in status["includedVolumes"]} == {"root", "data"}
    assert upstream_errors(ready) == []
    assert vm_lock(capi) == "bk-7@node-1"
    assert capi.patch(f"{VMS}/bk", {"spec": {"runStrategy": "Always"}}, MERGE).ok
    indexes = pull(status, repo, guest["indexes"])
    assert restored_sum(repo, indexes["data"], tmp_path / "data.img") == current
    assert kv(capi, "virtualmachineinstances", "bk") is None  # held back by the backup
    guest["indexes"] = indexes
    finish(capi, "bk-7", status["checkpointName"])
    wait_running(capi, "bk")
    assert vm_lock(capi) is None and storage_qemus() == []
    assert not list(cluster.home.glob("nodes/*/backups/*"))
    # the checkpoint the stopped VM's backup made is in the image the guest runs on now
    wait_for(lambda: "bk-up" in console(cluster, "bk", "echo bk-up"), BOOT_TIMEOUT, "console")
    console(cluster, "bk", WRITE)
    current = guest_sum(cluster)
    k.apply(backup("bk-8"))
    ready = wait_reason(capi, "bk-8", "Progressing", "ExportReady")
    assert ready["status"]["type"] == "Incremental", ready["status"]
    indexes = pull(ready["status"], repo, guest["indexes"])
    assert restored_sum(repo, indexes["data"], tmp_path / "data8.img") == current
    guest["indexes"] = indexes
    finish(capi, "bk-8", ready["status"]["checkpointName"])


def test_a_vm_deleted_mid_backup_fails_it_and_leaves_nothing(
    cluster: ThreadedServer, capi: Api, k: Kubectl, guest: dict[str, Any]
) -> None:
    k.apply(backup("bk-4"))
    wait_reason(capi, "bk-4", "Progressing", "ExportReady")
    assert (
        capi.delete(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/bk").status_code == 200
    )
    failed = wait_reason(capi, "bk-4", "Failed", "SourceLost", 120)
    assert (
        conditions(failed)["Failed"]["message"]
        == "Backup has failed: VMI was deleted during backup"
    )
    assert upstream_errors(failed) == []
    assert capi.get(f"{EXPORTS}/bk-4").status_code == 404
    assert not list(cluster.home.glob("**/.vmo-fleece-*"))
    assert capi.delete(f"{BK}/virtualmachinebackups/bk-4").status_code == 200
    wait_for(
        lambda: capi.get(f"{BK}/virtualmachinebackups/bk-4").status_code == 404, 30, "bk-4 to go"
    )
