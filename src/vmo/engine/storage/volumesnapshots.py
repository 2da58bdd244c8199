"""The embedded engine's CSI snapshotter: VolumeSnapshots of claims, backed by the node pools'
volume snapshots (what the external-snapshotter and a CSI driver are to a cluster).

Each pool is a driver (``local.storage.vmo.dev``, ``shared.storage.vmo.dev``, the provisioners of
VMO's StorageClasses) with a default VolumeSnapshotClass. A node handles the VolumeSnapshots of
the claims its pools hold; it claims each one with the ``vmo.dev/snapshot-node`` annotation
(first writer wins for the shared pool), then:

- takes the pool snapshot named like the VolumeSnapshot, or adopts it when it exists already for
  that claim (CSI's ``CreateSnapshot`` is idempotent by name: a VM snapshot's node takes all of a
  VM's disks at one instant, then makes their VolumeSnapshots);
- makes the VolumeSnapshotContent ``snapcontent-<snapshot uid>`` (``source.volumeHandle``,
  ``volumeSnapshotRef`` with the uid, the class's driver and deletion policy) and reports both
  statuses: bound, ``readyToUse``, ``creationTime``, ``restoreSize``.

Deleting a VolumeSnapshot deletes its content when the policy is Delete, and with it the pool
snapshot; Retain keeps both. A content stays while a snapshot is bound to it, as upstream's.
A claim a running VMI writes is not snapshotted on its own (the pool snapshot would freeze a
layer QEMU still writes): its VolumeSnapshot reports an error saying to snapshot the VM.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from vmo.api.annotations import SNAPSHOT_NODE
from vmo.api.volumesnapshot import (
    BOUND_CONTENT_FINALIZER,
    BOUND_SNAPSHOT_FINALIZER,
    DEFAULT_SNAPSHOT_CLASS_ANNOTATION,
)
from vmo.client import VMI, Client, Conflict, NotFound, Resource
from vmo.engine.storage.claims import LOCAL_PROVISIONER, SHARED_PROVISIONER
from vmo.engine.storage.pool import Pool, PoolError, SnapshotRecord
from vmo.runtime import Controller, Result, Watch

log = logging.getLogger(__name__)

JSON = dict[str, Any]

VOLUMESNAPSHOT = Resource("snapshot.storage.k8s.io", "v1", "volumesnapshots", "VolumeSnapshot")
VOLUMESNAPSHOTCONTENT = Resource(
    "snapshot.storage.k8s.io",
    "v1",
    "volumesnapshotcontents",
    "VolumeSnapshotContent",
    namespaced=False,
)
VOLUMESNAPSHOTCLASS = Resource(
    "snapshot.storage.k8s.io",
    "v1",
    "volumesnapshotclasses",
    "VolumeSnapshotClass",
    namespaced=False,
)
# the drivers are the pools' provisioners (engine/storage/claims.py names the same two)
LOCAL_DRIVER = LOCAL_PROVISIONER  # a snapshot class matches its storage class by driver name
SHARED_DRIVER = SHARED_PROVISIONER
LOCAL_SNAPSHOT_CLASS = "vmo-local"
SHARED_SNAPSHOT_CLASS = "vmo-shared"
CONTENT_KEY = "content:"
_FINAL_VMI = ("Succeeded", "Failed")

__all__ = [
    "LOCAL_DRIVER",
    "SHARED_DRIVER",
    "VOLUMESNAPSHOT",
    "VOLUMESNAPSHOTCLASS",
    "VOLUMESNAPSHOTCONTENT",
    "VolumeSnapshotter",
    "content_name",
    "ensure_snapshot_classes",
    "snapshot_classes",
]


def snapshot_classes() -> list[JSON]:
    """One default VolumeSnapshotClass per driver (pool kind)."""
    return [
        {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotClass",
            "metadata": {
                "name": name,
                "annotations": {DEFAULT_SNAPSHOT_CLASS_ANNOTATION: "true"},
                "labels": {"app.kubernetes.io/managed-by": "vmo"},
            },
            "driver": driver,
            "deletionPolicy": "Delete",
        }
        for name, driver in (
            (LOCAL_SNAPSHOT_CLASS, LOCAL_DRIVER),
            (SHARED_SNAPSHOT_CLASS, SHARED_DRIVER),
        )
    ]


async def ensure_snapshot_classes(client: Client) -> None:
    """Creates VMO's VolumeSnapshotClasses where missing (an administrator's changes stay)."""
    for vsc in snapshot_classes():
        with contextlib.suppress(Conflict):
            await client.create(VOLUMESNAPSHOTCLASS, vsc)


def content_name(snapshot: JSON) -> str:
    return f"snapcontent-{snapshot['metadata']['uid']}"


def restore_size(size: int) -> str:
    """Bytes as upstream's quantity prints them: the largest binary suffix that divides them."""
    for suffix, shift in (("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


def _nanoseconds(stamp: str) -> int:
    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return int(when.timestamp()) * 1_000_000_000


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _claims_of(vmi: JSON) -> set[str]:
    names = set()
    for volume in (vmi.get("spec") or {}).get("volumes") or []:
        if "persistentVolumeClaim" in volume:
            names.add(str((volume["persistentVolumeClaim"] or {}).get("claimName", "")))
        elif "dataVolume" in volume:
            names.add(str((volume["dataVolume"] or {}).get("name", "")))
    return names - {""}


def _content_keys(_etype: str, content: JSON) -> list[str]:
    ref = (content.get("spec") or {}).get("volumeSnapshotRef") or {}
    keys = [CONTENT_KEY + content["metadata"]["name"]]
    if ref.get("name") and ref.get("namespace"):
        keys.append(f"{ref['namespace']}/{ref['name']}")
    return keys


class SnapshotRefused(Exception):
    """A VolumeSnapshot this node cannot take; the message goes to its ``status.error``."""


class VolumeSnapshotter(Controller):
    """One per node: takes, binds and removes the VolumeSnapshots of its pools' claims."""

    def __init__(self, client: Client, node: str, pools: Sequence[Pool]) -> None:
        super().__init__(client)
        self.node = node
        self.pools = list(pools)  # the node's own pool first, then the shared one
        self.name = f"volume-snapshotter-{node}"

    def watches(self) -> Sequence[Watch]:
        return [Watch(VOLUMESNAPSHOT), Watch(VOLUMESNAPSHOTCONTENT, _content_keys)]

    def driver_of(self, pool: Pool) -> str:
        return LOCAL_DRIVER if pool is self.pools[0] else SHARED_DRIVER

    def pool_of(self, namespace: str, claim: str) -> Pool | None:
        return next((p for p in self.pools if p.exists(namespace, claim)), None)

    def class_of(self, pool: Pool) -> str:
        """The VolumeSnapshotClass VMO made for the pool's driver."""
        return LOCAL_SNAPSHOT_CLASS if pool is self.pools[0] else SHARED_SNAPSHOT_CLASS

    async def reconcile(self, key: str) -> Result | None:
        if key.startswith(CONTENT_KEY):
            content = await self.client.find(VOLUMESNAPSHOTCONTENT, key[len(CONTENT_KEY) :])
            if content is not None:
                await self.sync_content(content)
            return None
        namespace, _, name = key.rpartition("/")
        snapshot = await self.client.find(VOLUMESNAPSHOT, name, namespace)
        if snapshot is not None:
            await self.sync(snapshot)
        return None

    # --- VolumeSnapshot ---------------------------------------------------------------------

    async def sync(self, snapshot: JSON) -> None:
        md = snapshot["metadata"]
        handler = (md.get("annotations") or {}).get(SNAPSHOT_NODE)
        if handler and handler != self.node:
            return
        if md.get("deletionTimestamp"):
            if handler == self.node and BOUND_SNAPSHOT_FINALIZER in (md.get("finalizers") or []):
                await self._delete(snapshot)
            return
        claim = str(((snapshot.get("spec") or {}).get("source") or {}).get(
            "persistentVolumeClaimName") or "")  # fmt: skip
        pool = self.pool_of(md["namespace"], claim) if claim else None
        if pool is None:
            return  # another node's claim, or not provisioned yet
        status = snapshot.get("status") or {}
        if status.get("readyToUse") or status.get("error"):
            await self._check_bound(snapshot)
            return
        try:
            snapshot = await self._claim(snapshot, pool)
        except (Conflict, NotFound):
            return  # another node was first, or it went
        try:
            record = await self._take(snapshot, pool, claim)
            content = await self._ensure_content(snapshot, pool, record)
        except (SnapshotRefused, PoolError, OSError) as exc:
            await self._report_error(snapshot, str(exc))
            return
        await self._report_ready(snapshot, content, record)

    async def _claim(self, snapshot: JSON, pool: Pool) -> JSON:
        md = snapshot["metadata"]
        spec = snapshot.get("spec") or {}
        finalizers = md.get("finalizers") or []
        annotations = md.get("annotations") or {}
        patch: JSON = {"metadata": {"resourceVersion": md["resourceVersion"]}}
        if annotations.get(SNAPSHOT_NODE) != self.node:
            patch["metadata"]["annotations"] = {SNAPSHOT_NODE: self.node}
        if BOUND_SNAPSHOT_FINALIZER not in finalizers:
            patch["metadata"]["finalizers"] = [*finalizers, BOUND_SNAPSHOT_FINALIZER]
        if not spec.get("volumeSnapshotClassName"):
            # as the snapshot controller does: the default class of the claim's driver
            patch["spec"] = {"volumeSnapshotClassName": await self._default_class(pool)}
        if len(patch) == 1 and len(patch["metadata"]) == 1:
            return snapshot
        result: JSON = await self.client.patch(VOLUMESNAPSHOT, md["name"], patch, md["namespace"])
        return result

    async def _default_class(self, pool: Pool) -> str:
        driver = self.driver_of(pool)
        classes, _ = await self.client.list(VOLUMESNAPSHOTCLASS)
        defaults = [
            c["metadata"]["name"]
            for c in classes
            if c.get("driver") == driver
            and (c["metadata"].get("annotations") or {}).get(DEFAULT_SNAPSHOT_CLASS_ANNOTATION)
            == "true"
        ]
        return sorted(defaults)[0] if len(defaults) == 1 else self.class_of(pool)

    async def _snapshot_class(self, snapshot: JSON, pool: Pool) -> JSON:
        name = str((snapshot.get("spec") or {}).get("volumeSnapshotClassName") or "")
        found = await self.client.find(VOLUMESNAPSHOTCLASS, name)
        if found is None:
            raise SnapshotRefused(f"VolumeSnapshotClass {name} does not exist")
        if found.get("driver") != self.driver_of(pool):
            raise SnapshotRefused(
                f"VolumeSnapshotClass {name} is for driver {found.get('driver')}, the claim's "
                f"driver is {self.driver_of(pool)}"
            )
        return found

    async def _take(self, snapshot: JSON, pool: Pool, claim: str) -> SnapshotRecord:
        md = snapshot["metadata"]
        namespace, name = md["namespace"], md["name"]
        await self._snapshot_class(snapshot, pool)
        if pool.has_snapshot(namespace, name):
            record = pool.snapshot_record(namespace, name)
            owners = {md.get("uid")} | {o.get("uid") for o in md.get("ownerReferences") or []}
            if record.volume != claim or record.owner_uid not in owners:
                # e.g. one an earlier, retained snapshot of that name left
                raise SnapshotRefused(f"another volume snapshot named {name} exists in the pool")
            return record  # taken already (a VM snapshot's node took it with the VM's disks)
        user = await self._writer(namespace, claim)
        if user is not None:
            raise SnapshotRefused(
                f"claim {claim} is in use by the running VirtualMachineInstance {user}: snapshot "
                "its VirtualMachine with a VirtualMachineSnapshot, or stop it first"
            )
        return await pool.snapshot(namespace, claim, name, owner_uid=str(md.get("uid", "")))

    async def _writer(self, namespace: str, claim: str) -> str | None:
        """The running VMI that has the claim open, if any."""
        vmis, _ = await self.client.list(VMI, namespace)
        for vmi in vmis:
            if (vmi.get("status") or {}).get("phase") in _FINAL_VMI:
                continue
            if claim in _claims_of(vmi):
                return str(vmi["metadata"]["name"])
        return None

    async def _ensure_content(self, snapshot: JSON, pool: Pool, record: SnapshotRecord) -> JSON:
        md = snapshot["metadata"]
        vsclass = await self._snapshot_class(snapshot, pool)
        name = content_name(snapshot)
        body = {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": {
                "name": name,
                "annotations": {SNAPSHOT_NODE: self.node},
                "finalizers": [BOUND_CONTENT_FINALIZER],
            },
            "spec": {
                "deletionPolicy": vsclass.get("deletionPolicy") or "Delete",
                "driver": self.driver_of(pool),
                "source": {"volumeHandle": f"{md['namespace']}/{record.volume}"},
                "volumeSnapshotClassName": vsclass["metadata"]["name"],
                "volumeSnapshotRef": {
                    "apiVersion": "snapshot.storage.k8s.io/v1",
                    "kind": "VolumeSnapshot",
                    "name": md["name"],
                    "namespace": md["namespace"],
                    "uid": md["uid"],
                    "resourceVersion": md["resourceVersion"],
                },
            },
        }
        content = await self.client.find(VOLUMESNAPSHOTCONTENT, name)
        if content is None:
            content = await self.client.create(VOLUMESNAPSHOTCONTENT, body)
        status = {
            "snapshotHandle": f"{record.namespace}/{record.name}",
            "creationTime": _nanoseconds(record.created),
            "restoreSize": record.virtual_size,
            "readyToUse": True,
        }
        if (content.get("status") or {}) != status:
            content = await self.client.patch_status(VOLUMESNAPSHOTCONTENT, name, status)
        return content

    async def _report_ready(self, snapshot: JSON, content: JSON, record: SnapshotRecord) -> None:
        md = snapshot["metadata"]
        status = {
            "boundVolumeSnapshotContentName": content["metadata"]["name"],
            "creationTime": record.created,
            "readyToUse": True,
            "restoreSize": restore_size(record.virtual_size),
            "error": None,
        }
        with contextlib.suppress(NotFound):
            await self.client.patch_status(VOLUMESNAPSHOT, md["name"], status, md["namespace"])

    async def _report_error(self, snapshot: JSON, message: str) -> None:
        md = snapshot["metadata"]
        log.warning("volume snapshot %s/%s: %s", md["namespace"], md["name"], message)
        status = {"readyToUse": False, "error": {"message": message, "time": _now()}}
        with contextlib.suppress(NotFound):
            await self.client.patch_status(VOLUMESNAPSHOT, md["name"], status, md["namespace"])

    async def _check_bound(self, snapshot: JSON) -> None:
        """A ready snapshot whose content went reports it, as the snapshot controller does."""
        status = snapshot.get("status") or {}
        bound = status.get("boundVolumeSnapshotContentName")
        if not bound or not status.get("readyToUse"):
            return
        content = await self.client.find(VOLUMESNAPSHOTCONTENT, bound)
        if content is None:
            await self._report_error(snapshot, f"VolumeSnapshotContent {bound} is missing")

    async def _delete(self, snapshot: JSON) -> None:
        md = snapshot["metadata"]
        content = await self.client.find(VOLUMESNAPSHOTCONTENT, content_name(snapshot))
        if content is not None:
            if (content.get("spec") or {}).get("deletionPolicy") == "Delete":
                await self._remove_physical(content)
                if not content["metadata"].get("deletionTimestamp"):
                    await self.client.delete(VOLUMESNAPSHOTCONTENT, content["metadata"]["name"])
                    content = await self.client.find(
                        VOLUMESNAPSHOTCONTENT, content["metadata"]["name"]
                    )
            if content is not None:
                await self._drop_finalizer(VOLUMESNAPSHOTCONTENT, content, BOUND_CONTENT_FINALIZER)
        await self._drop_finalizer(VOLUMESNAPSHOT, snapshot, BOUND_SNAPSHOT_FINALIZER)
        log.info("volume snapshot %s/%s deleted", md["namespace"], md["name"])

    # --- VolumeSnapshotContent --------------------------------------------------------------

    async def sync_content(self, content: JSON) -> None:
        md = content["metadata"]
        if (md.get("annotations") or {}).get(SNAPSHOT_NODE) != self.node:
            return
        if not md.get("deletionTimestamp") or BOUND_CONTENT_FINALIZER not in (
            md.get("finalizers") or []
        ):
            return
        ref = (content.get("spec") or {}).get("volumeSnapshotRef") or {}
        snapshot = await self.client.find(
            VOLUMESNAPSHOT, ref.get("name", ""), ref.get("namespace", "")
        )
        if (
            snapshot is not None
            and snapshot["metadata"].get("uid") == ref.get("uid")
            and not snapshot["metadata"].get("deletionTimestamp")
        ):
            return  # bound: it goes once its VolumeSnapshot does
        if (content.get("spec") or {}).get("deletionPolicy") == "Delete":
            await self._remove_physical(content)
        await self._drop_finalizer(VOLUMESNAPSHOTCONTENT, content, BOUND_CONTENT_FINALIZER)

    async def _remove_physical(self, content: JSON) -> None:
        handle = str((content.get("status") or {}).get("snapshotHandle") or "")
        namespace, _, name = handle.partition("/")
        if not name:
            return
        for pool in self.pools:
            with contextlib.suppress(PoolError, OSError):
                if await pool.delete_snapshot(namespace, name):
                    log.info("pool snapshot %s removed with its content", handle)

    async def _drop_finalizer(self, res: Resource, obj: JSON, finalizer: str) -> None:
        md = obj["metadata"]
        if finalizer not in (md.get("finalizers") or []):
            return
        rest = [f for f in md["finalizers"] if f != finalizer]
        patch = {"metadata": {"resourceVersion": md["resourceVersion"], "finalizers": rest}}
        with contextlib.suppress(NotFound):
            await self.client.patch(res, md["name"], patch, md.get("namespace", ""))
