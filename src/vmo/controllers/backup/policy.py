"""BackupPolicy: VMO's backup application, on KubeVirt's own backup API only.

For each policy, at each slot of its cron schedule (or at once when annotated
``vmo.dev/backup-now``), every VM its selector picks is backed up into its BackupRepository:

1. a VirtualMachineBackupTracker ``<vm>-vmo`` and a scratch PVC ``<vm>-vmo-backup`` (upstream
   needs one for pull mode) are made once, and a token Secret ``vmo-backup-token`` per namespace;
2. a pull-mode VirtualMachineBackup from the tracker is created (``skipQuiesce`` for
   CrashConsistent), incremental when the tracker's checkpoint is the one the repository's last
   backup of the VM was taken at, full (``forceFullBackup``) otherwise: a backup that was never
   stored must not become the base of the next one;
3. once its export is ready, each volume's data is pulled (only the dirty extents for an
   incremental one) into the repository, and the manifest is written with the VM's, DataVolumes'
   and PVCs' manifests;
4. the VirtualMachineBackup is deleted (that ends it, and moves the tracker on), and the
   retention rules prune the VM's older backups.

After downtime a missed slot runs once, not once per slot; two backups of one VM never run at
once (a per-VM task here, and the repository's VM lock across processes). The policy's status
lists, per VM, the last success, the last failure and why, and the recovery point.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import os
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from croniter import croniter

from vmo.api.selectors import labels_of, selector_matches
from vmo.client import (
    DATAVOLUME,
    PVC,
    SECRET,
    VM,
    VMBACKUP,
    VMBACKUPTRACKER,
    Client,
    Conflict,
    NotFound,
    Resource,
)
from vmo.controllers.backup.codec import WrongKey
from vmo.controllers.backup.disk import backup_disk
from vmo.controllers.backup.endpoints import EndpointSource
from vmo.controllers.backup.repository import (
    BackupRef,
    DiskIndex,
    Manifest,
    Repository,
    RepositoryError,
    new_backup_id,
)
from vmo.controllers.backup.retention import Retention, kept
from vmo.controllers.backup.stores import local_store, s3_store
from vmo.runtime import Controller, Result, Watch, merge_conditions, split_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]
BACKUP_REPOSITORY = Resource("vmo.dev", "v1alpha1", "backuprepositories", "BackupRepository")
BACKUP_POLICY = Resource("vmo.dev", "v1alpha1", "backuppolicies", "BackupPolicy")
POLICY_LABEL = "vmo.dev/backup-policy"
BACKUP_NOW = "vmo.dev/backup-now"
VERIFY_NOW = "vmo.dev/verify-now"
TOKEN_SECRET = "vmo-backup-token"
EXPORT_TIMEOUT = timedelta(minutes=30)


def default_backup_root() -> Path:
    """Where local-directory repositories live: ``$VMO_BACKUP_ROOT``, else ``backups`` in
    VMO's home (``$VMO_HOME``, else ``~/.vmo``)."""
    if os.environ.get("VMO_BACKUP_ROOT"):
        return Path(os.environ["VMO_BACKUP_ROOT"])
    return Path(os.environ.get("VMO_HOME") or Path.home() / ".vmo") / "backups"


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def schedule_due(schedule: str, last: datetime, now: datetime) -> tuple[datetime | None, datetime]:
    """(the latest slot in (last, now] — run once for it, however many were missed — or None,
    and the next slot after now)."""
    after = croniter(schedule, last).get_next(datetime)
    upcoming = croniter(schedule, now).get_next(datetime)
    if after > now:
        return None, upcoming
    latest = croniter(schedule, now + timedelta(seconds=1)).get_prev(datetime)
    return latest, upcoming


def selected(vm: JSON, selector: JSON | None) -> bool:
    """A policy without a selector backs up every VM of its namespace."""
    return selector_matches(labels_of(vm), selector or {})


def portable(obj: JSON) -> JSON:
    """An object as a restore would apply it: no status, uid, versions or owner references."""
    out = copy.deepcopy(obj)
    out.pop("status", None)
    md = out.get("metadata") or {}
    for key in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields",
                "ownerReferences", "finalizers", "deletionTimestamp", "selfLink"):  # fmt: skip
        md.pop(key, None)
    return out


class BackupPolicyController(Controller):
    name = "backup-policies"
    workers = 2

    def __init__(self, client: Client, backup_root: Path) -> None:
        super().__init__(client)
        self.backup_root = backup_root
        self.jobs: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._status_lock = asyncio.Lock()

    def watches(self) -> Sequence[Watch]:
        return [Watch(BACKUP_POLICY)]

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        policy = await self.client.find(BACKUP_POLICY, name, namespace)
        if policy is None:
            return None
        spec = policy.get("spec") or {}
        status = policy.get("status") or {}
        now = _now()
        created = _parse(str(policy["metadata"]["creationTimestamp"]))
        last = _parse(status["lastScheduleTime"]) if status.get("lastScheduleTime") else created
        try:
            slot, upcoming = schedule_due(str(spec.get("schedule") or ""), last, now)
        except (ValueError, KeyError) as exc:
            await self._policy_condition(policy, False, "InvalidSchedule", f"spec.schedule: {exc}")
            return None
        annotations = policy["metadata"].get("annotations") or {}
        manual = annotations.get(BACKUP_NOW)
        if spec.get("suspend") and not manual:
            return Result.after((upcoming - now).total_seconds())
        if slot is not None or manual:
            started = await self._run_all(policy)
            patch: JSON = {"status": {"nextScheduleTime": _stamp(upcoming)}}
            if slot is not None:
                patch["status"]["lastScheduleTime"] = _stamp(slot)
            with contextlib.suppress(NotFound):
                await self.client.patch(BACKUP_POLICY, name, patch, namespace, subresource="status")
            if manual:
                clear = {"metadata": {"annotations": {BACKUP_NOW: None}}}
                with contextlib.suppress(NotFound):
                    await self.client.patch(BACKUP_POLICY, name, clear, namespace)
            log.info("policy %s/%s: %d backups started", namespace, name, started)
        return Result.after(max((upcoming - now).total_seconds(), 1.0))

    async def _run_all(self, policy: JSON) -> int:
        namespace = policy["metadata"]["namespace"]
        vms, _ = await self.client.list(VM, namespace)
        started = 0
        for vm in vms:
            if not selected(vm, (policy.get("spec") or {}).get("selector")):
                continue
            key = (namespace, vm["metadata"]["name"])
            if key in self.jobs and not self.jobs[key].done():
                continue  # two backups of one VM never run at once
            self.jobs[key] = asyncio.get_running_loop().create_task(
                self._job(policy, vm["metadata"]["name"]), name=f"backup-{key[0]}-{key[1]}"
            )
            started += 1
        return started

    # --- one VM -------------------------------------------------------------------------------

    async def _job(self, policy: JSON, vm_name: str) -> None:
        namespace = policy["metadata"]["namespace"]
        await self._vm_status(policy, vm_name, {"running": True})
        backup_name = ""
        try:
            repo = await self.open_repository(namespace, str(policy["spec"]["repository"]))
            async with repo.vm_lock(namespace, vm_name, f"policy {policy['metadata']['name']}"):
                backup_name, manifest, sent = await self._backup(policy, repo, vm_name)
                await self._prune(policy, repo, vm_name)
        except (RepositoryError, WrongKey, OSError, TimeoutError, ValueError) as exc:
            log.warning("backup of %s/%s failed: %s", namespace, vm_name, exc)
            await self._vm_status(
                policy, vm_name,
                {"running": False, "lastFailureTime": _stamp(_now()), "lastFailureReason": str(exc)},
            )  # fmt: skip
            if backup_name:
                with contextlib.suppress(NotFound):
                    await self.client.delete(VMBACKUP, backup_name, namespace)
            return
        await self._vm_status(
            policy, vm_name,
            {"running": False, "lastBackup": manifest.ref.id, "lastBackupType": manifest.kind,
             "lastSuccessTime": _stamp(_now()), "recoveryPoint": manifest.created,
             "bytesSent": sent},
        )  # fmt: skip

    async def _backup(
        self, policy: JSON, repo: Repository, vm_name: str
    ) -> tuple[str, Manifest, int]:
        namespace = policy["metadata"]["namespace"]
        vm = await self.client.get(VM, vm_name, namespace)
        tracker = await self._ensure_prerequisites(vm)
        previous = await repo.latest(namespace, vm_name)
        latest = ((tracker.get("status") or {}).get("latestCheckpoint") or {}).get("name")
        # incremental only on top of a checkpoint the repository holds the backup of
        force_full = previous is None or not latest or previous.stats.get("checkpoint") != latest
        stamp = _now().strftime("%Y%m%d%H%M%S")
        backup_name = f"{vm_name}-{stamp}"[:63]
        consistency = (policy.get("spec") or {}).get("consistency") or "Quiesce"
        body = {
            "apiVersion": "backup.kubevirt.io/v1alpha1",
            "kind": "VirtualMachineBackup",
            "metadata": {"name": backup_name, "namespace": namespace,
                         "labels": {POLICY_LABEL: policy["metadata"]["name"]}},
            "spec": {
                "source": {"apiGroup": "backup.kubevirt.io", "kind": "VirtualMachineBackupTracker",
                           "name": tracker["metadata"]["name"]},
                "mode": "Pull",
                "pvcName": f"{vm_name}-vmo-backup",
                "tokenSecretRef": TOKEN_SECRET,
                "skipQuiesce": consistency == "CrashConsistent",
                "forceFullBackup": force_full,
            },
        }  # fmt: skip
        await self.client.create(VMBACKUP, body, namespace)
        ready = await self._wait_ready(namespace, backup_name)
        status = ready["status"]
        token = await self._token(namespace)
        incremental = status.get("type") == "Incremental" and previous is not None
        disks: list[DiskIndex] = []
        sent = 0
        async with repo.writing(f"policy {policy['metadata']['name']}"):
            for volume in status.get("includedVolumes") or []:
                parent = previous.disk(volume["volumeName"]) if incremental and previous else None
                async with EndpointSource(
                    volume["dataEndpoint"], volume["mapEndpoint"], token,
                    ca_pem=status.get("endpointCert") or None, incremental=incremental,
                ) as source:  # fmt: skip
                    changed = source.changed() if parent is not None else None
                    index, stats = await backup_disk(
                        repo, volume["volumeName"], source, parent=parent, changed=changed
                    )
                disks.append(index)
                sent += stats.sent_bytes
            ref = BackupRef(namespace, vm_name, new_backup_id())
            manifest = Manifest(
                ref,
                created=str(ready["metadata"]["creationTimestamp"]),
                kind="Incremental" if incremental else "Full",
                disks=disks,
                parent=previous.ref.id if incremental and previous else None,
                vm_uid=str(vm["metadata"].get("uid", "")),
                objects=await self._objects(vm),
                stats={"checkpoint": status.get("checkpointName"), "bytesSent": sent,
                       "virtualMachineBackup": backup_name},
            )  # fmt: skip
            await repo.write_manifest(manifest)
        with contextlib.suppress(NotFound):
            await self.client.delete(VMBACKUP, backup_name, namespace)
        return backup_name, manifest, sent

    async def _wait_ready(self, namespace: str, name: str) -> JSON:
        deadline = _now() + EXPORT_TIMEOUT
        while _now() < deadline:
            backup = await self.client.find(VMBACKUP, name, namespace)
            if backup is None:
                raise RepositoryError(f"VirtualMachineBackup {name} went away")
            conds = {c.get("type"): c for c in (backup.get("status") or {}).get("conditions") or []}
            if (conds.get("Failed") or {}).get("status") == "True":
                raise RepositoryError(str(conds["Failed"].get("message")))
            if (conds.get("Progressing") or {}).get("reason") == "ExportReady":
                return backup
            await self.clock.sleep(1.0)
        raise TimeoutError(f"VirtualMachineBackup {name} was not ready in {EXPORT_TIMEOUT}")

    async def _objects(self, vm: JSON) -> list[JSON]:
        namespace = vm["metadata"]["namespace"]
        objects = [portable(vm)]
        volumes = (((vm.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
            "volumes"
        ) or []
        for volume in volumes:
            name = (volume.get("dataVolume") or {}).get("name") or (
                volume.get("persistentVolumeClaim") or {}
            ).get("claimName")
            if not name:
                continue
            for res in (DATAVOLUME, PVC):
                found = await self.client.find(res, str(name), namespace)
                if found is not None:
                    objects.append(portable(found))
        return objects

    async def _ensure_prerequisites(self, vm: JSON) -> JSON:
        md = vm["metadata"]
        namespace, name = md["namespace"], md["name"]
        if await self.client.find(SECRET, TOKEN_SECRET, namespace) is None:
            token = base64.b64encode(secrets.token_urlsafe(32).encode()).decode()
            body = {"metadata": {"name": TOKEN_SECRET, "namespace": namespace},
                    "type": "Opaque", "data": {"token": token}}  # fmt: skip
            with contextlib.suppress(Conflict):
                await self.client.create(SECRET, body, namespace)
        scratch = f"{name}-vmo-backup"
        if await self.client.find(PVC, scratch, namespace) is None:
            body = {"metadata": {"name": scratch, "namespace": namespace},
                    "spec": {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": "1Gi"}}}}  # fmt: skip
            with contextlib.suppress(Conflict):
                await self.client.create(PVC, body, namespace)
        tracker_name = f"{name}-vmo"
        tracker = await self.client.find(VMBACKUPTRACKER, tracker_name, namespace)
        if tracker is None:
            body = {"metadata": {"name": tracker_name, "namespace": namespace},
                    "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine",
                                        "name": name}}}  # fmt: skip
            try:
                tracker = await self.client.create(VMBACKUPTRACKER, body, namespace)
            except Conflict:
                tracker = await self.client.get(VMBACKUPTRACKER, tracker_name, namespace)
        return tracker

    async def _token(self, namespace: str) -> str:
        secret = await self.client.get(SECRET, TOKEN_SECRET, namespace)
        return base64.b64decode((secret.get("data") or {})["token"]).decode()

    async def _prune(self, policy: JSON, repo: Repository, vm_name: str) -> None:
        retention = Retention.from_spec((policy.get("spec") or {}).get("retention"))
        if retention.keeps_all:
            return
        namespace = policy["metadata"]["namespace"]
        refs = await repo.backups(namespace, vm_name)
        keep = kept([(r.id, r.created) for r in refs], retention)
        for ref in refs:
            if ref.id not in keep:
                await repo.delete_backup(ref)

    # --- repositories ---------------------------------------------------------------------------

    async def open_repository(self, namespace: str, name: str) -> Repository:
        spec = ((await self.client.get(BACKUP_REPOSITORY, name, namespace)).get("spec")) or {}
        secret: bytes | None = None
        if spec.get("encryptionKeySecret"):
            data = (await self.client.get(SECRET, spec["encryptionKeySecret"], namespace)).get(
                "data"
            ) or {}
            if "key" not in data:
                raise RepositoryError(f"Secret {spec['encryptionKeySecret']} has no key 'key'")
            secret = base64.b64decode(data["key"])
        if spec.get("s3"):
            s3 = spec["s3"]
            creds = (await self.client.get(SECRET, s3["credentialsSecret"], namespace)).get(
                "data"
            ) or {}
            store: Any = s3_store(
                s3["bucket"], endpoint=s3["endpoint"], prefix=s3.get("prefix") or "",
                region=s3.get("region") or "us-east-1",
                access_key=base64.b64decode(creds["accessKeyId"]).decode(),
                secret_key=base64.b64decode(creds["secretAccessKey"]).decode(),
            )  # fmt: skip
        else:
            relative = Path(str((spec.get("local") or {}).get("path") or name))
            if relative.is_absolute() or ".." in relative.parts:
                raise RepositoryError(
                    f"spec.local.path {relative}: must be a relative path under the backup root"
                )
            store = local_store(self.backup_root / namespace / relative)
        chunk = int(spec.get("chunkSize") or 1 << 20)
        return await Repository.open_or_init(store, secret=secret, chunk_size=chunk, name=name)

    # --- status ---------------------------------------------------------------------------------

    async def _vm_status(self, policy: JSON, vm_name: str, fields: JSON) -> None:
        md = policy["metadata"]
        async with self._status_lock:
            fresh = await self.client.find(BACKUP_POLICY, md["name"], md["namespace"])
            if fresh is None:
                return
            status = fresh.get("status") or {}
            vms = [dict(v) for v in status.get("virtualMachines") or []]
            entry = next((v for v in vms if v.get("name") == vm_name), None)
            if entry is None:
                entry = {"name": vm_name}
                vms.append(entry)
            entry.update(fields)
            vms.sort(key=lambda v: str(v.get("name")))
            with contextlib.suppress(NotFound, Conflict):
                await self.client.patch(
                    BACKUP_POLICY, md["name"], {"status": {"virtualMachines": vms}},
                    md["namespace"], subresource="status",
                )  # fmt: skip

    async def _policy_condition(self, policy: JSON, ok: bool, reason: str, message: str) -> None:
        md = policy["metadata"]
        cond = {"type": "Ready", "status": "True" if ok else "False", "reason": reason,
                "message": message, "observedGeneration": int(md.get("generation") or 1)}  # fmt: skip
        old = (policy.get("status") or {}).get("conditions")
        merged = merge_conditions(old, [cond], _stamp(_now()), keep_others=True)
        with contextlib.suppress(NotFound):
            await self.client.patch(
                BACKUP_POLICY, md["name"], {"status": {"conditions": merged}}, md["namespace"],
                subresource="status",
            )  # fmt: skip


class BackupRepositoryController(Controller):
    """A BackupRepository's status: whether it opens (the store answers, the key is right),
    and what it holds. The repository is created in its store on first reconcile.

    Verification jobs: on ``spec.verify.schedule`` (cron; a missed slot runs once) or at once
    when annotated ``vmo.dev/verify-now``, every chunk any backup needs is read and re-hashed
    (``Repository.verify``), in a task of its own; ``status.verification`` and the ``Verified``
    condition name the damaged chunks and the backups that need them."""

    name = "backup-repositories"
    workers = 1
    RESYNC = 60.0
    LISTED = 100  # damaged chunks and backups named in the status at most (all are counted)

    def __init__(self, client: Client, backup_root: Path) -> None:
        super().__init__(client)
        self.opener = BackupPolicyController(client, backup_root)
        self.verifying: dict[tuple[str, str], asyncio.Task[None]] = {}

    def watches(self) -> Sequence[Watch]:
        return [Watch(BACKUP_REPOSITORY)]

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        found = await self.client.find(BACKUP_REPOSITORY, name, namespace)
        if found is None:
            return None
        gen = int(found["metadata"].get("generation") or 1)
        status: JSON = {}
        try:
            repo = await self.opener.open_repository(namespace, name)
            refs = await repo.backups()
            status = {"id": str(repo.config.get("id", "")), "chunkSize": repo.chunk_size,
                      "encrypted": repo.codec.encrypted, "backups": len(refs)}  # fmt: skip
            cond = {"type": "Ready", "status": "True", "reason": "Available",
                    "message": f"{len(refs)} backups", "observedGeneration": gen}  # fmt: skip
        except (RepositoryError, WrongKey, OSError, KeyError, ValueError) as exc:
            cond = {"type": "Ready", "status": "False", "reason": "Unavailable",
                    "message": str(exc), "observedGeneration": gen}  # fmt: skip
        ours = [cond]
        delay = self.RESYNC
        if cond["status"] == "True":
            wait, extra = await self._maybe_verify(found, status)
            delay, ours = min(delay, wait), ours + extra
        # merged into what is there now, guarded by its resourceVersion: a verification that
        # finished meanwhile keeps its Verified condition
        fresh = await self.client.find(BACKUP_REPOSITORY, name, namespace)
        if fresh is None:
            return None
        old = fresh.get("status") or {}
        status["conditions"] = merge_conditions(
            old.get("conditions"), ours, _stamp(_now()), keep_others=True
        )
        if {**old, **status} != old:
            patch = {"metadata": {"resourceVersion": fresh["metadata"]["resourceVersion"]},
                     "status": status}  # fmt: skip
            try:
                await self.client.patch(
                    BACKUP_REPOSITORY, name, patch, namespace, subresource="status"
                )
            except Conflict:
                return Result.after(0.5)
            except NotFound:
                return None
        return Result.after(delay)

    async def _maybe_verify(self, repo_obj: JSON, status: JSON) -> tuple[float, list[JSON]]:
        """Starts a verification when one is due; the seconds until the next one, and the
        conditions to set (an invalid schedule)."""
        md, spec = repo_obj["metadata"], repo_obj.get("spec") or {}
        key = (md["namespace"], md["name"])
        schedule = str((spec.get("verify") or {}).get("schedule") or "")
        manual = (md.get("annotations") or {}).get(VERIFY_NOW)
        old = repo_obj.get("status") or {}
        now = _now()
        slot, upcoming = None, None
        if schedule:
            last = old.get("lastVerifyTime") or md["creationTimestamp"]
            try:
                slot, upcoming = schedule_due(schedule, _parse(str(last)), now)
            except (ValueError, KeyError) as exc:
                cond = {"type": "Verified", "status": "False", "reason": "InvalidSchedule",
                        "message": f"spec.verify.schedule: {exc}"}  # fmt: skip
                return self.RESYNC, [cond]
            status["nextVerifyTime"] = _stamp(upcoming)
        running = key in self.verifying and not self.verifying[key].done()
        if (slot is not None or manual) and not running:
            if manual:  # taken before the run starts, so that one request runs once
                clear = {"metadata": {"annotations": {VERIFY_NOW: None}}}
                with contextlib.suppress(NotFound):
                    await self.client.patch(BACKUP_REPOSITORY, md["name"], clear, md["namespace"])
            self.verifying[key] = asyncio.get_running_loop().create_task(
                self._verify(md["namespace"], md["name"]), name=f"verify-{key[0]}-{key[1]}"
            )
        if upcoming is None:
            return self.RESYNC, []
        return max((upcoming - now).total_seconds(), 1.0), []

    async def stop(self) -> None:
        """No verification outlives the controller (a replica that lost its Lease)."""
        for task in self.verifying.values():
            task.cancel()
        await asyncio.gather(*self.verifying.values(), return_exceptions=True)
        self.verifying.clear()
        await super().stop()

    async def _verify(self, namespace: str, name: str) -> None:
        try:
            await self._verify_once(namespace, name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("verification of repository %s/%s failed", namespace, name)
        self.enqueue(f"{namespace}/{name}")

    async def _verify_once(self, namespace: str, name: str) -> None:
        started = _now()
        try:
            repo = await self.opener.open_repository(namespace, name)
            report = await repo.verify()
        except (RepositoryError, WrongKey, OSError, KeyError, ValueError) as exc:
            cond = {"type": "Verified", "status": "False", "reason": "VerifyFailed",
                    "message": f"verification could not run: {exc}"}  # fmt: skip
            result: JSON = {}
        else:
            damaged = sorted(report.damaged.items())
            result = {
                "chunks": report.chunks,
                "bytes": report.bytes,
                "damagedChunkCount": len(damaged),
                "damagedChunks": [{"id": d, "reason": why} for d, why in damaged[: self.LISTED]],
                "backupsNeedingDamagedChunks": sorted(report.backups)[: self.LISTED],
                "seconds": round((_now() - started).total_seconds(), 3),
            }
            if report.ok:
                cond = {"type": "Verified", "status": "True", "reason": "Verified",
                        "message": f"{report.chunks} chunks re-hashed, none damaged"}  # fmt: skip
            else:
                cond = {"type": "Verified", "status": "False", "reason": "DamagedChunks",
                        "message": f"{len(damaged)} of {report.chunks} chunks damaged; "
                                   f"{len(report.backups)} backups need them"}  # fmt: skip
        for _ in range(10):  # the result is written whatever else changes the status meanwhile
            fresh = await self.client.find(BACKUP_REPOSITORY, name, namespace)
            if fresh is None:
                return
            old = (fresh.get("status") or {}).get("conditions")
            patch: JSON = {
                "metadata": {"resourceVersion": fresh["metadata"]["resourceVersion"]},
                "status": {
                    "lastVerifyTime": _stamp(started),
                    "conditions": merge_conditions(old, [cond], _stamp(_now()), keep_others=True),
                },
            }
            if result:
                patch["status"]["verification"] = result
            try:
                await self.client.patch(BACKUP_REPOSITORY, name, patch, namespace,
                                        subresource="status")  # fmt: skip
                return
            except Conflict:
                await asyncio.sleep(0.2)
            except NotFound:
                return


__all__ = [
    "BACKUP_NOW",
    "BACKUP_POLICY",
    "BACKUP_REPOSITORY",
    "VERIFY_NOW",
    "BackupPolicyController",
    "BackupRepositoryController",
    "default_backup_root",
    "portable",
    "schedule_due",
    "selected",
]
