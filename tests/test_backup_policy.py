"""BackupPolicy's pure parts (schedule, selection, portable manifests) and its CRDs as a real API
server serves them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Api
from vmo.client import Client, load_kubeconfig
from vmo.controllers.backup.crds import backup_crds, ensure_crds
from vmo.controllers.backup.disk import FileSource, backup_disk
from vmo.controllers.backup.policy import (
    BACKUP_REPOSITORY,
    VERIFY_NOW,
    BackupPolicyController,
    BackupRepositoryController,
    portable,
    schedule_due,
    selected,
)
from vmo.controllers.backup.repository import (
    BackupRef,
    Manifest,
    Repository,
    RepositoryError,
    local_store,
    new_backup_id,
)
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_missed_slots_run_once_and_the_next_one_is_named() -> None:
    # daily at 03:00; last run two days ago; now 10:00: one run, for today's slot
    slot, upcoming = schedule_due("0 3 * * *", t("2026-12-01T03:00:00"), t("2026-12-03T10:00:00"))
    assert slot == t("2026-12-03T03:00:00") and upcoming == t("2026-12-04T03:00:00")
    # ran at today's slot already: nothing is due until tomorrow
    slot, upcoming = schedule_due("0 3 * * *", t("2026-12-03T03:00:00"), t("2026-12-03T10:00:00"))
    assert slot is None and upcoming == t("2026-12-04T03:00:00")
    # exactly at a slot
    slot, _ = schedule_due("*/15 * * * *", t("2026-12-03T09:30:00"), t("2026-12-03T09:45:00"))
    assert slot == t("2026-12-03T09:45:00")
    with pytest.raises((ValueError, KeyError)):
        schedule_due("every day", t("2026-12-03T00:00:00"), t("2026-12-03T10:00:00"))


def test_selectors_pick_vms_by_their_labels() -> None:
    vm = {"metadata": {"labels": {"tier": "db", "env": "prod"}}}
    assert selected(vm, None) and selected(vm, {})
    assert selected(vm, {"matchLabels": {"tier": "db"}})
    assert not selected(vm, {"matchLabels": {"tier": "web"}})
    assert selected(
        vm, {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}
    )
    assert not selected(
        vm, {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}
    )
    assert not selected(vm, {"matchExpressions": [{"key": "x", "operator": "Exists"}]})
    assert selected(vm, {"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]})


def test_manifests_keep_what_a_restore_applies() -> None:
    vm = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "db", "namespace": "ns", "uid": "u", "resourceVersion": "9",
                     "labels": {"a": "b"}, "ownerReferences": [{}], "finalizers": ["f"]},
        "spec": {"runStrategy": "Always"},
        "status": {"ready": True},
    }  # fmt: skip
    out = portable(vm)
    assert out == {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "db", "namespace": "ns", "labels": {"a": "b"}},
        "spec": {"runStrategy": "Always"},
    }
    assert vm["metadata"]["uid"] == "u"  # the original is left alone


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with ThreadedServer(tmp_path_factory.mktemp("vmo-backup-crds")) as running:
        yield running


def test_the_crds_are_accepted_and_their_kinds_served(server: ThreadedServer) -> None:
    async def install() -> None:
        async with Client(load_kubeconfig(server.kubeconfig)) as client:
            await ensure_crds(client)
            await ensure_crds(client)  # idempotent

    asyncio.run(install())
    api = Api(server.url, server.ca, server.admin_token)
    ns = "bk-crds"
    assert api.post("/api/v1/namespaces", {"metadata": {"name": ns}}).status_code == 201
    policies = f"/apis/vmo.dev/v1alpha1/namespaces/{ns}/backuppolicies"
    good = {
        "apiVersion": "vmo.dev/v1alpha1",
        "kind": "BackupPolicy",
        "metadata": {"name": "p"},
        "spec": {"repository": "r", "schedule": "0 3 * * *", "consistency": "CrashConsistent"},
    }

    assert asyncio.run(_wait(lambda: api.post(policies, good).status_code in (201, 409)))
    bad = {**good, "metadata": {"name": "q"}, "spec": {"repository": "r", "schedule": "x",
                                                       "consistency": "Sometimes"}}  # fmt: skip
    refused = api.post(policies, bad)
    assert refused.status_code == 422 and "spec.consistency" in refused.text
    missing = api.post(policies, {**good, "metadata": {"name": "z"}, "spec": {"schedule": "x"}})
    assert missing.status_code == 422 and "spec.repository" in missing.text
    # the example applies as it is (in its own namespace here)
    for doc in yaml.safe_load_all((EXAMPLES / "backup-policy.yaml").read_text()):
        plural = "backuprepositories" if doc["kind"] == "BackupRepository" else "backuppolicies"
        doc["metadata"]["namespace"] = ns
        r = api.post(f"/apis/vmo.dev/v1alpha1/namespaces/{ns}/{plural}", doc)
        assert r.status_code == 201, r.text
    assert {c["metadata"]["name"] for c in backup_crds()} == {
        "backuprepositories.vmo.dev",
        "backuppolicies.vmo.dev",
        "backuprestores.vmo.dev",
    }


async def _wait(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    """The kinds of a new CRD are served a moment after it is accepted."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if check():
            return True
        await asyncio.sleep(0.2)
    return False


def test_a_local_repository_path_stays_under_the_backup_root(
    server: ThreadedServer, tmp_path: Path
) -> None:
    api = Api(server.url, server.ca, server.admin_token)
    ns = "bk-paths"
    assert api.post("/api/v1/namespaces", {"metadata": {"name": ns}}).status_code == 201
    repos = f"/apis/vmo.dev/v1alpha1/namespaces/{ns}/backuprepositories"
    for name, path in (("up", "../../etc"), ("abs", "/etc")):
        body = {"apiVersion": "vmo.dev/v1alpha1", "kind": "BackupRepository",
                "metadata": {"name": name}, "spec": {"local": {"path": path}}}  # fmt: skip
        assert api.post(repos, body).status_code == 201

    async def open_them() -> list[str]:
        async with Client(load_kubeconfig(server.kubeconfig)) as client:
            controller = BackupPolicyController(client, tmp_path)
            errors = []
            for name in ("up", "abs"):
                with pytest.raises(RepositoryError) as caught:
                    await controller.open_repository(ns, name)
                errors.append(str(caught.value))
            return errors

    errors = asyncio.run(open_them())
    assert all("must be a relative path under the backup root" in e for e in errors), errors
    assert list(tmp_path.iterdir()) == []


def test_a_verification_job_names_damaged_chunks_and_the_backups_needing_them(
    server: ThreadedServer, tmp_path: Path
) -> None:
    api = Api(server.url, server.ca, server.admin_token)
    ns = "bk-verify"
    assert api.post("/api/v1/namespaces", {"metadata": {"name": ns}}).status_code == 201
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(3 << 20))
    store = local_store(tmp_path / "root" / ns / "r")

    async def fill() -> tuple[str, bytes]:
        repo = await Repository.init(store, chunk_size=1 << 20)
        source = FileSource(image)
        index, _ = await backup_disk(repo, "root", source)
        source.close()
        ref = BackupRef(ns, "vm1", new_backup_id())
        await repo.write_manifest(Manifest(ref, "x", "Full", [index]))
        return ref.id, index.digests[1]

    backup_id, victim = asyncio.run(fill())
    body = {"apiVersion": "vmo.dev/v1alpha1", "kind": "BackupRepository",
            "metadata": {"name": "r", "annotations": {VERIFY_NOW: "yes"}},
            "spec": {"local": {"path": "r"}, "verify": {"schedule": "0 4 * * 0"}}}  # fmt: skip
    repos = f"/apis/vmo.dev/v1alpha1/namespaces/{ns}/backuprepositories"

    async def verify_once() -> JSON:
        async with Client(load_kubeconfig(server.kubeconfig)) as client:
            controller = BackupRepositoryController(client, tmp_path / "root")
            await controller.reconcile(f"{ns}/r")
            await controller.verifying[(ns, "r")]
            found: JSON = await client.get(BACKUP_REPOSITORY, "r", ns)
            return found

    assert api.post(repos, body).status_code == 201
    first = asyncio.run(verify_once())
    status = first["status"]
    verified = next(c for c in status["conditions"] if c["type"] == "Verified")
    assert verified["status"] == "True" and status["verification"]["chunks"] == 3
    assert status["nextVerifyTime"].endswith("04:00:00Z") and status["lastVerifyTime"]
    assert VERIFY_NOW not in (first["metadata"].get("annotations") or {})  # done, so cleared
    chunk = tmp_path / "root" / ns / "r" / Repository.chunk_key(victim)
    chunk.chmod(0o644)
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"!")
    patch = {"metadata": {"annotations": {VERIFY_NOW: "again"}}}
    assert api.patch(f"{repos}/r", patch, "application/merge-patch+json").ok
    second = asyncio.run(verify_once())["status"]
    verified = next(c for c in second["conditions"] if c["type"] == "Verified")
    assert verified["status"] == "False" and verified["reason"] == "DamagedChunks"
    assert verified["message"] == "1 of 3 chunks damaged; 1 backups need them"
    assert second["verification"]["damagedChunks"][0]["id"] == victim.hex()
    assert second["verification"]["backupsNeedingDamagedChunks"] == [f"{ns}/vm1/{backup_id}"]
