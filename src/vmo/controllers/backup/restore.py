"""BackupRestore: a backup back into a VM, through CDI DataVolumes, on any cluster.

``vmo.dev/v1alpha1`` BackupRestore names a repository and a backup (an id or unique prefix, or
a VM whose latest backup is meant) and a target:

- **a new VM** (the target name does not exist), in any namespace: the VM is rebuilt from the
  manifest the backup holds, stopped (``runStrategy: Halted``, or ``spec.runStrategy``), with
  each restored disk as a DataVolume ``<vm>-<volume>`` owned by the VM. Its firmware UUID and
  serial are dropped when it is a copy beside the original (another name or namespace), so the
  guest does not see a second machine with one identity; with ``macAddressPolicy: Generate``
  every interface gets a new locally administered MAC (``newMacAddresses`` names some);
- **an existing VM**, which must be stopped: the restored disks become new DataVolumes
  ``<restore>-<volume>``; once every one is imported, the VM's volumes are pointed at them in one
  update and the DataVolumes the VM owned before (its dataVolumeTemplates') are deleted. Standalone
  DataVolumes and PVCs the VM used are left in place and named in the status (``replaced``).
  The rest of the VM's spec is its own: only disks are restored;
- ``volumesOnly``: the DataVolumes ``<restore>-<volume>`` alone, for a single disk.

The target may be in another namespace only if that namespace consents: its annotation
``vmo.dev/accept-restores-from`` names the restore's namespace (or ``*``), since the controller
acts there with its own rights.

Each DataVolume imports from the controllers' ``RestoreServer`` over HTTPS (its CA in a
ConfigMap, per-restore basic-auth credentials in a Secret, both ``<restore>-vmo-restore`` in the
target namespace and deleted at the end). A failure (a damaged chunk, an import that fails, the
VM deleted) fails the restore and removes what it made: a VM it created, the DataVolumes, the
Secret and ConfigMap; an existing VM is never changed unless every disk imported.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from vmo.client import (
    CONFIGMAP,
    DATAVOLUME,
    NAMESPACE,
    PVC,
    SECRET,
    STORAGECLASS,
    VM,
    VMI,
    Client,
    Conflict,
    NotFound,
    Resource,
)
from vmo.controllers.backup.codec import WrongKey
from vmo.controllers.backup.policy import BackupPolicyController
from vmo.controllers.backup.repository import Manifest, Repository, RepositoryError
from vmo.controllers.backup.restore_server import RestoreServer, Served
from vmo.runtime import Controller, Result, Watch, merge_conditions, split_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]
BACKUP_RESTORE = Resource("vmo.dev", "v1alpha1", "backuprestores", "BackupRestore")
RESTORE_LABEL = "vmo.dev/backup-restore"
RESTORE_NS_LABEL = "vmo.dev/backup-restore-namespace"
RESTORED_FROM = "vmo.dev/restored-from"
ACCEPT_RESTORES = "vmo.dev/accept-restores-from"  # on a namespace: who may restore into it
FINALIZER = "vmo.dev/backup-restore"
IMPORT_POLICY_NS = "vmo-system"
IMPORT_POLICY = "vmo-import-policy"
IMPORT_POLICY_TAG = "# vmo backup restores"


class RestoreInvalid(Exception):
    """A restore that cannot go on; ``reason`` is the condition's, the message names the field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _name(*parts: str) -> str:
    return "-".join(parts)[:63].rstrip("-.")


def _claim(volume: JSON) -> str:
    return str(
        (volume.get("dataVolume") or {}).get("name")
        or (volume.get("persistentVolumeClaim") or {}).get("claimName")
        or ""
    )


def _volumes(vm: JSON) -> list[JSON]:
    spec = ((vm.get("spec") or {}).get("template") or {}).get("spec") or {}
    return list(spec.get("volumes") or [])


def new_mac() -> str:
    """A random unicast, locally administered MAC (the 0x02 bit set, the 0x01 bit clear)."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def owner_reference(vm: JSON) -> JSON:
    md = vm["metadata"]
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": md["name"],
            "uid": md["uid"], "controller": True, "blockOwnerDeletion": True}  # fmt: skip


def restored_vm(
    manifest: Manifest,
    source: JSON,
    *,
    name: str,
    namespace: str,
    dvs: dict[str, str],
    spec: JSON,
    restore_key: str,
) -> JSON:
    """The new VM a restore creates: the backed-up VM's manifest, its disks renamed to ``dvs``
    (volume name -> DataVolume), stopped, its identity changed where it is a copy."""
    vm = copy.deepcopy(source)
    md = vm.setdefault("metadata", {})
    annotations = dict(md.get("annotations") or {})
    annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
    annotations[RESTORED_FROM] = restore_key
    md.update({"name": name, "namespace": namespace, "annotations": annotations})
    vm_spec = vm.setdefault("spec", {})
    vm_spec.pop("running", None)
    vm_spec["runStrategy"] = "Halted"
    renamed = {}
    for volume in _volumes(vm):
        vname = str(volume.get("name"))
        if vname in dvs:
            renamed[_claim(volume)] = dvs[vname]
            volume.pop("persistentVolumeClaim", None)
            volume["dataVolume"] = {"name": dvs[vname]}
    if "dataVolumeTemplates" in vm_spec:
        vm_spec["dataVolumeTemplates"] = [
            t
            for t in vm_spec["dataVolumeTemplates"]
            if (t.get("metadata") or {}).get("name") not in renamed
        ]
        if not vm_spec["dataVolumeTemplates"]:
            del vm_spec["dataVolumeTemplates"]
    template = vm_spec.setdefault("template", {}).setdefault("spec", {})
    domain = template.setdefault("domain", {})
    original = manifest.ref
    if (name, namespace) != (original.vm, original.namespace):
        firmware = domain.get("firmware") or {}
        firmware.pop("uuid", None)
        firmware.pop("serial", None)
        if "firmware" in domain and not firmware:
            del domain["firmware"]
    wanted = dict(spec.get("newMacAddresses") or {})
    generate = spec.get("macAddressPolicy") == "Generate"
    for iface in (domain.get("devices") or {}).get("interfaces") or []:
        iname = str(iface.get("name"))
        if iname in wanted:
            iface["macAddress"] = wanted[iname]
        elif generate:
            iface["macAddress"] = new_mac()
    return vm


class BackupRestoreController(Controller):
    name = "backup-restores"
    workers = 2
    POLL = 2.0

    def __init__(self, client: Client, opener: BackupPolicyController, server: RestoreServer):
        super().__init__(client)
        self.opener = opener
        self.server = server
        # per restore in progress: its repository opened and its backup's manifest read, once
        # (an encrypted repository costs a key derivation to open)
        self._opened: dict[tuple[str, str], tuple[Repository, Manifest]] = {}

    def watches(self) -> Sequence[Watch]:
        return [Watch(BACKUP_RESTORE), Watch(DATAVOLUME, _dv_keys)]

    async def run(self, stop: asyncio.Event) -> None:
        await self.server.start()
        try:
            await self._allow_in_import_policy()
            await super().run(stop)
        finally:
            await self.server.close()

    async def _allow_in_import_policy(self) -> None:
        """The embedded engine's importer runs on the host and refuses loopback addresses unless
        the import policy allows them: allow exactly this server's address (replacing the line a
        previous run wrote). Nothing to do for a server that importers reach elsewhere."""
        host = urlsplit(self.server.url).hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            return
        entry = f"{host}:{self.server.port}" if host != "::1" else f"[::1]:{self.server.port}"
        for _ in range(5):
            cm = await self.client.find(CONFIGMAP, IMPORT_POLICY, IMPORT_POLICY_NS)
            lines = [
                line
                for line in str(((cm or {}).get("data") or {}).get("allowedHosts", "")).splitlines()
                if not line.rstrip().endswith(IMPORT_POLICY_TAG)
            ]
            lines.append(f"{entry}  {IMPORT_POLICY_TAG}")
            data = {"allowedHosts": "\n".join(lines) + "\n"}
            try:
                if cm is None:
                    body = {"metadata": {"name": IMPORT_POLICY, "namespace": IMPORT_POLICY_NS},
                            "data": data}  # fmt: skip
                    await self.client.create(CONFIGMAP, body, IMPORT_POLICY_NS)
                else:
                    cm["data"] = {**(cm.get("data") or {}), **data}
                    await self.client.replace(CONFIGMAP, cm)
                return
            except Conflict:
                continue
            except NotFound:
                return  # no vmo-system namespace: not the embedded engine

    # --- the loop -----------------------------------------------------------------------------

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        restore = await self.client.find(BACKUP_RESTORE, name, namespace)
        if restore is None:
            self.server.forget(namespace, name)
            self._opened.pop((namespace, name), None)
            return None
        status = restore.get("status") or {}
        md = restore["metadata"]
        if md.get("deletionTimestamp"):
            if status.get("phase") not in ("Succeeded",):
                await self._undo(restore)
            await self._cleanup(restore)
            await self._drop_finalizer(restore)
            return None
        if status.get("phase") in ("Succeeded", "Failed"):
            self.server.forget(namespace, name)
            self._opened.pop((namespace, name), None)
            return None
        if FINALIZER not in (md.get("finalizers") or []):
            patch = {"metadata": {"finalizers": [*(md.get("finalizers") or []), FINALIZER],
                                  "resourceVersion": md["resourceVersion"]}}  # fmt: skip
            with contextlib.suppress(Conflict, NotFound):
                await self.client.patch(BACKUP_RESTORE, name, patch, namespace)
            return Result.after(0.1)
        try:
            return await self._progress(restore)
        except RestoreInvalid as exc:
            # what this pass already recorded (a VM it created) must be undone too
            fresh = await self.client.find(BACKUP_RESTORE, name, namespace) or restore
            await self._fail(fresh, exc.reason, exc.message)
            return None
        except (RepositoryError, WrongKey) as exc:
            await self._conditions(restore, {"phase": status.get("phase") or "Pending"},
                                   progressing=("False", "RepositoryUnavailable", str(exc)))  # fmt: skip
            return Result.after(10.0)

    async def _progress(self, restore: JSON) -> Result | None:
        md, spec = restore["metadata"], restore.get("spec") or {}
        namespace, name = md["namespace"], md["name"]
        status = dict(restore.get("status") or {})
        opened = self._opened.get((namespace, name))
        if opened is None:
            repo = await self.opener.open_repository(namespace, str(spec.get("repository") or ""))
            opened = self._opened[(namespace, name)] = (
                repo,
                await self._manifest(repo, namespace, spec),
            )
        repo, manifest = opened
        target_ns = str((spec.get("target") or {}).get("namespace") or namespace)
        target_name = str((spec.get("target") or {}).get("name") or manifest.ref.vm)
        disks = self._disks(manifest, spec)
        await self._accepts(target_ns, namespace)
        source_vm = next((o for o in manifest.objects if o.get("kind") == "VirtualMachine"), None)
        vm = None if spec.get("volumesOnly") else await self.client.find(VM, target_name, target_ns)
        created = bool(status.get("createdVirtualMachine"))
        if created and vm is None:
            raise RestoreInvalid("TargetDeleted", f"VirtualMachine {target_ns}/{target_name} "
                                 "was deleted during the restore")  # fmt: skip
        existing = vm is not None and not created
        if existing:
            if await self.client.find(VMI, target_name, target_ns) is not None:
                raise RestoreInvalid(
                    "VirtualMachineRunning",
                    f"VirtualMachine {target_ns}/{target_name} is running: stop it before "
                    "restoring into it (or restore to a new name with spec.target.name)",
                )
            present = {str(v.get("name")) for v in _volumes(vm or {})}
            for volume in disks:
                if volume not in present:
                    raise RestoreInvalid(
                        "VolumeNotInTarget",
                        f"spec.volumes: {volume} is not a volume of VirtualMachine "
                        f"{target_ns}/{target_name}",
                    )
        elif not spec.get("volumesOnly"):
            if source_vm is None:
                raise RestoreInvalid("NoManifest", f"backup {manifest.ref} holds no VM manifest: "
                                     "restore its disks with spec.volumesOnly")  # fmt: skip
            missing = [
                str(v.get("name"))
                for v in _volumes(source_vm)
                if _claim(v) and str(v.get("name")) not in disks
            ]
            if missing:
                raise RestoreInvalid(
                    "VolumesMissing",
                    f"spec.volumes: a new VM needs every disk of the backup; missing "
                    f"{', '.join(missing)} (or restore the disks alone with spec.volumesOnly)",
                )
        new_vm = not existing and not spec.get("volumesOnly")
        dv_names = {d: _name(target_name if new_vm else name, d) for d in disks}
        if not status.get("startTime"):
            status.update({"startTime": _now(), "backup": manifest.ref.id,
                           "targetName": target_name, "targetNamespace": target_ns})  # fmt: skip
        creds = await self._credentials(restore, target_ns)
        for volume in disks:
            index = manifest.disk(volume)
            assert index is not None
            self.server.serve(namespace, name, volume, Served(repo, index, *creds))
        for volume in disks:  # someone else's DataVolume under a name this restore needs
            found = await self.client.find(DATAVOLUME, dv_names[volume], target_ns)
            theirs = (found or {}).get("metadata", {}).get("labels", {}) or {}
            if found is not None and theirs.get(RESTORE_LABEL) != name:
                raise RestoreInvalid("DataVolumeExists", f"DataVolume {target_ns}/"
                                     f"{dv_names[volume]} exists and is not this restore's")  # fmt: skip
        if new_vm and vm is None:
            assert source_vm is not None
            body = restored_vm(manifest, source_vm, name=target_name, namespace=target_ns,
                               dvs=dv_names, spec=spec,
                               restore_key=f"{namespace}/{name}")  # fmt: skip
            body.setdefault("metadata", {}).setdefault("labels", {}).update(self._labels(restore))
            try:
                vm = await self.client.create(VM, body, target_ns)
            except Conflict:
                vm = await self.client.get(VM, target_name, target_ns)
            status["createdVirtualMachine"] = True
            await self._status(restore, status)
        rows = []
        for volume in disks:
            dv = await self._ensure_dv(restore, manifest, volume, dv_names[volume], target_ns, vm)
            dstatus = dv.get("status") or {}
            rows.append({"name": volume, "dataVolume": dv_names[volume],
                         "size": (manifest.disk(volume) or manifest.disks[0]).size,
                         "phase": str(dstatus.get("phase") or "Pending"),
                         "progress": str(dstatus.get("progress") or "")})  # fmt: skip
            if dstatus.get("phase") == "Failed":
                why = next((c.get("message") for c in dstatus.get("conditions") or []
                            if c.get("type") == "Running"), "") or "the import failed"  # fmt: skip
                raise RestoreInvalid("ImportFailed", f"volume {volume}: {why}")
        status["volumes"] = rows
        if any(r["phase"] != "Succeeded" for r in rows):
            status["phase"] = "Restoring"
            done = sum(1 for r in rows if r["phase"] == "Succeeded")
            await self._conditions(restore, status,
                                   progressing=("True", "Restoring",
                                                f"{done} of {len(rows)} volumes imported"))  # fmt: skip
            return Result.after(self.POLL)
        if existing and vm is not None:
            replaced = await self._switch(vm, dv_names)
            for row in rows:
                if row["name"] in replaced:
                    row["replaced"] = replaced[row["name"]]
        elif new_vm and vm is not None and spec.get("runStrategy") not in (None, "Halted"):
            await self.client.patch(VM, target_name, {"spec": {"runStrategy": spec["runStrategy"]}},
                                    target_ns)  # fmt: skip
        await self._cleanup(restore)
        status.update({"phase": "Succeeded", "completionTime": _now(), "volumes": rows})
        await self._conditions(restore, status, progressing=("False", "Succeeded",
                               f"restored {len(rows)} volumes of backup {manifest.ref.id}"),
                               ready=True)  # fmt: skip
        return None

    # --- pieces -------------------------------------------------------------------------------

    async def _manifest(self, repo: Repository, namespace: str, spec: JSON) -> Manifest:
        refs = await repo.backups(namespace, str(spec["virtualMachine"]) if spec.get(
            "virtualMachine") else None)  # fmt: skip
        wanted = str(spec.get("backup") or "")
        if wanted:
            matches = [r for r in refs if r.id == wanted or r.id.startswith(wanted)]
            if len(matches) != 1:
                raise RestoreInvalid(
                    "BackupNotFound",
                    f"spec.backup: {wanted} "
                    f"{'is ambiguous' if matches else 'is not in repository'} "
                    f"{spec.get('repository')}",
                )
            return await repo.read_manifest(matches[0])
        if not spec.get("virtualMachine"):
            raise RestoreInvalid("BackupNotFound", "spec.backup or spec.virtualMachine is required")
        if not refs:
            raise RestoreInvalid("BackupNotFound", f"spec.virtualMachine: no backup of "
                                 f"{spec['virtualMachine']} in {spec.get('repository')}")  # fmt: skip
        return await repo.read_manifest(refs[-1])

    @staticmethod
    def _disks(manifest: Manifest, spec: JSON) -> list[str]:
        names = [d.name for d in manifest.disks]
        wanted = [str(v) for v in spec.get("volumes") or []] or names
        for i, volume in enumerate(wanted):
            if volume not in names:
                raise RestoreInvalid(
                    "VolumeNotInBackup",
                    f"spec.volumes[{i}]: {volume} is not a disk of backup {manifest.ref.id} "
                    f"(it has {', '.join(names)})",
                )
        return wanted

    @staticmethod
    def _labels(restore: JSON) -> dict[str, str]:
        md = restore["metadata"]
        return {RESTORE_LABEL: md["name"], RESTORE_NS_LABEL: md["namespace"]}

    def _side_name(self, restore: JSON) -> str:
        return _name(restore["metadata"]["name"], "vmo-restore")

    async def _credentials(self, restore: JSON, target_ns: str) -> tuple[str, str]:
        """The restore's basic-auth Secret and CA ConfigMap in the target namespace."""
        side = self._side_name(restore)
        labels = self._labels(restore)
        secret = await self.client.find(SECRET, side, target_ns)
        if secret is None:
            user, password = "vmo-restore", secrets.token_urlsafe(32)
            body = {"metadata": {"name": side, "namespace": target_ns, "labels": labels},
                    "type": "Opaque",
                    "data": {"accessKeyId": base64.b64encode(user.encode()).decode(),
                             "secretKey": base64.b64encode(password.encode()).decode()}}  # fmt: skip
            try:
                secret = await self.client.create(SECRET, body, target_ns)
            except Conflict:
                secret = await self.client.get(SECRET, side, target_ns)
        for obj in (secret, await self.client.find(CONFIGMAP, side, target_ns)):
            if obj is not None and not self._ours(restore, obj):
                raise RestoreInvalid("SideObjectExists", f"{obj.get('kind', 'object')} "
                                     f"{target_ns}/{side} exists and is not this restore's")  # fmt: skip
        data = secret.get("data") or {}
        creds = (base64.b64decode(data.get("accessKeyId", "")).decode(),
                 base64.b64decode(data.get("secretKey", "")).decode())  # fmt: skip
        ca = self.server.ca_pem.decode()
        cm = await self.client.find(CONFIGMAP, side, target_ns)
        body = {"metadata": {"name": side, "namespace": target_ns, "labels": labels},
                "data": {"ca.pem": ca}}  # fmt: skip
        if cm is None:
            with contextlib.suppress(Conflict):
                await self.client.create(CONFIGMAP, body, target_ns)
        elif (cm.get("data") or {}).get("ca.pem") != ca:  # the controllers restarted: a new CA
            cm["data"] = body["data"]
            with contextlib.suppress(Conflict):
                await self.client.replace(CONFIGMAP, cm)
        return creds

    async def _storage(self, manifest: Manifest, volume: str, size: int) -> JSON:
        """The restored DataVolume's storage: the original claim's class (where this cluster
        has it), access modes and volume mode, at least the disk's size."""
        source_vm = next((o for o in manifest.objects if o.get("kind") == "VirtualMachine"), {})
        claim = next((_claim(v) for v in _volumes(source_vm) if v.get("name") == volume), "")
        pvc = next((o for o in manifest.objects if o.get("kind") == "PersistentVolumeClaim"
                    and (o.get("metadata") or {}).get("name") == claim), None)  # fmt: skip
        pspec = (pvc or {}).get("spec") or {}
        storage: JSON = {
            "accessModes": list(pspec.get("accessModes") or ["ReadWriteOnce"]),
            "resources": {"requests": {"storage": str(size)}},
        }
        if pspec.get("volumeMode"):
            storage["volumeMode"] = pspec["volumeMode"]
        sc = pspec.get("storageClassName")
        if sc and await self.client.find(STORAGECLASS, str(sc)) is not None:
            storage["storageClassName"] = sc
        return storage

    async def _ensure_dv(
        self, restore: JSON, manifest: Manifest, volume: str, dv_name: str, target_ns: str,
        vm: JSON | None,
    ) -> JSON:  # fmt: skip
        found = await self.client.find(DATAVOLUME, dv_name, target_ns)
        labels = self._labels(restore)
        if found is not None:
            if (found["metadata"].get("labels") or {}).get(RESTORE_LABEL) != labels[RESTORE_LABEL]:
                raise RestoreInvalid("DataVolumeExists", f"DataVolume {target_ns}/{dv_name} exists "
                                     "and is not this restore's")  # fmt: skip
            md = restore["metadata"]
            url = ((found.get("spec") or {}).get("source") or {}).get("http", {}).get("url")
            phase = (found.get("status") or {}).get("phase")
            if phase != "Succeeded" and url != self.server.volume_url(
                md["namespace"], md["name"], volume
            ):
                # the controllers restarted: their server listens elsewhere now; import again
                with contextlib.suppress(NotFound):
                    await self.client.delete(DATAVOLUME, dv_name, target_ns)
                return {"metadata": found["metadata"], "status": {"phase": "Pending"}}
            return found
        md = restore["metadata"]
        index = manifest.disk(volume)
        assert index is not None
        side = self._side_name(restore)
        metadata: JSON = {"name": dv_name, "namespace": target_ns, "labels": labels,
                          "annotations": {RESTORED_FROM: f"{md['namespace']}/{md['name']}"}}  # fmt: skip
        if vm is not None:
            metadata["ownerReferences"] = [owner_reference(vm)]
        body = {
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataVolume",
            "metadata": metadata,
            "spec": {
                "source": {"http": {
                    "url": self.server.volume_url(md["namespace"], md["name"], volume),
                    "secretRef": side,
                    "certConfigMap": side,
                }},
                "storage": await self._storage(manifest, volume, index.size),
            },
        }  # fmt: skip
        try:
            return await self.client.create(DATAVOLUME, body, target_ns)
        except Conflict:
            return await self.client.get(DATAVOLUME, dv_name, target_ns)

    async def _switch(self, vm: JSON, dv_names: dict[str, str]) -> dict[str, str]:
        """Points the stopped VM's restored volumes at their new DataVolumes in one update;
        deletes the DataVolumes it owned before. Returns volume -> the claim it used before."""
        md = vm["metadata"]
        replaced: dict[str, str] = {}
        for _ in range(5):
            fresh = await self.client.get(VM, md["name"], md["namespace"])
            body = copy.deepcopy(fresh)
            replaced = {}
            for volume in _volumes(body):
                vname = str(volume.get("name"))
                if vname in dv_names and _claim(volume) != dv_names[vname]:  # not switched yet
                    replaced[vname] = _claim(volume)
                    volume.pop("persistentVolumeClaim", None)
                    volume["dataVolume"] = {"name": dv_names[vname]}
            old = set(replaced.values())
            spec = body["spec"]
            if "dataVolumeTemplates" in spec:
                spec["dataVolumeTemplates"] = [
                    t for t in spec["dataVolumeTemplates"]
                    if (t.get("metadata") or {}).get("name") not in old
                ]  # fmt: skip
            try:
                await self.client.replace(VM, body)
                break
            except Conflict:
                continue
        else:
            raise RepositoryError(
                f"VirtualMachine {md['namespace']}/{md['name']} kept changing: its disks were not "
                "switched (retrying)"
            )
        uid = md.get("uid")
        for claim in set(replaced.values()) - set(dv_names.values()):
            for res in (DATAVOLUME, PVC):
                obj = await self.client.find(res, claim, md["namespace"])
                owners = (obj or {}).get("metadata", {}).get("ownerReferences") or []
                if obj is not None and any(o.get("uid") == uid for o in owners):
                    with contextlib.suppress(NotFound):
                        await self.client.delete(res, claim, md["namespace"])
        return replaced

    async def _cleanup(self, restore: JSON) -> None:
        """The Secret and ConfigMap go, and the server stops serving the restore."""
        md = restore["metadata"]
        self.server.forget(md["namespace"], md["name"])
        self._opened.pop((md["namespace"], md["name"]), None)
        target_ns = (
            (restore.get("status") or {}).get("targetNamespace")
            or ((restore.get("spec") or {}).get("target") or {}).get("namespace")
            or md["namespace"]
        )
        for res in (SECRET, CONFIGMAP):
            found = await self.client.find(res, self._side_name(restore), str(target_ns))
            if found is not None and self._ours(restore, found):
                with contextlib.suppress(NotFound):
                    await self.client.delete(res, self._side_name(restore), str(target_ns))

    def _ours(self, restore: JSON, obj: JSON) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(labels.get(k) == v for k, v in self._labels(restore).items())

    async def _accepts(self, target_ns: str, source_ns: str) -> None:
        """A restore into another namespace needs that namespace's consent: the controllers act
        with their own rights there, so a user of one namespace must not reach into another."""
        if target_ns == source_ns:
            return
        ns = await self.client.find(NAMESPACE, target_ns)
        if ns is None:
            raise RestoreInvalid("TargetNamespaceNotFound",
                                 f"spec.target.namespace: namespace {target_ns} not found")  # fmt: skip
        raw = ((ns.get("metadata") or {}).get("annotations") or {}).get(ACCEPT_RESTORES, "")
        allowed = {part.strip() for part in raw.split(",") if part.strip()}
        if "*" not in allowed and source_ns not in allowed:
            raise RestoreInvalid(
                "TargetNamespaceNotAllowed",
                f"spec.target.namespace: namespace {target_ns} does not accept restores from "
                f"{source_ns} (its annotation {ACCEPT_RESTORES} must name {source_ns})",
            )

    async def _undo(self, restore: JSON) -> None:
        """What a restore that did not succeed made: its DataVolumes, and a VM it created."""
        md, status = restore["metadata"], restore.get("status") or {}
        target_ns = str(status.get("targetNamespace") or md["namespace"])
        if status.get("createdVirtualMachine") and status.get("targetName"):
            vm = await self.client.find(VM, str(status["targetName"]), target_ns)
            if (
                vm is not None
                and (vm["metadata"].get("labels") or {}).get(RESTORE_LABEL) == md["name"]
            ):
                with contextlib.suppress(NotFound):
                    await self.client.delete(VM, str(status["targetName"]), target_ns)
        dvs, _ = await self.client.list(
            DATAVOLUME, target_ns, label_selector=f"{RESTORE_LABEL}={md['name']},"
            f"{RESTORE_NS_LABEL}={md['namespace']}",
        )  # fmt: skip
        for dv in dvs:
            with contextlib.suppress(NotFound):
                await self.client.delete(DATAVOLUME, dv["metadata"]["name"], target_ns)

    async def _fail(self, restore: JSON, reason: str, message: str) -> None:
        log.warning("restore %s/%s failed: %s", restore["metadata"]["namespace"],
                    restore["metadata"]["name"], message)  # fmt: skip
        await self._undo(restore)
        await self._cleanup(restore)
        status = dict(restore.get("status") or {})
        status.update({"phase": "Failed", "completionTime": _now()})
        await self._conditions(restore, status, progressing=("False", reason, message),
                               failed=(reason, message))  # fmt: skip

    async def _drop_finalizer(self, restore: JSON) -> None:
        md = restore["metadata"]
        rest = [f for f in md.get("finalizers") or [] if f != FINALIZER]
        patch = {"metadata": {"finalizers": rest, "resourceVersion": md["resourceVersion"]}}
        with contextlib.suppress(NotFound, Conflict):
            await self.client.patch(BACKUP_RESTORE, md["name"], patch, md["namespace"])

    async def _status(self, restore: JSON, status: JSON) -> None:
        md = restore["metadata"]
        with contextlib.suppress(NotFound, Conflict):
            await self.client.patch(BACKUP_RESTORE, md["name"], {"status": status},
                                    md["namespace"], subresource="status")  # fmt: skip

    async def _conditions(
        self,
        restore: JSON,
        status: JSON,
        *,
        progressing: tuple[str, str, str],
        ready: bool = False,
        failed: tuple[str, str] | None = None,
    ) -> None:
        conds = [
            {"type": "Progressing", "status": progressing[0], "reason": progressing[1],
             "message": progressing[2]},
            {"type": "Ready", "status": "True" if ready else "False",
             "reason": "Succeeded" if ready else progressing[1], "message": progressing[2]},
        ]  # fmt: skip
        if failed is not None:
            conds.append({"type": "Failed", "status": "True", "reason": failed[0],
                          "message": failed[1]})  # fmt: skip
        old = (restore.get("status") or {}).get("conditions")
        status = {**status, "conditions": merge_conditions(old, conds, _now(), keep_others=True)}
        if status != restore.get("status"):
            await self._status(restore, status)


def _dv_keys(_etype: str, dv: JSON) -> list[str]:
    labels = (dv.get("metadata") or {}).get("labels") or {}
    if RESTORE_LABEL in labels and RESTORE_NS_LABEL in labels:
        return [f"{labels[RESTORE_NS_LABEL]}/{labels[RESTORE_LABEL]}"]
    return []


__all__ = [
    "BACKUP_RESTORE",
    "BackupRestoreController",
    "RestoreInvalid",
    "new_mac",
    "restored_vm",
]
