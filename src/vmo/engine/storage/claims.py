"""The embedded engine's volume provisioner: StorageClasses, PersistentVolumes and the binding of
PersistentVolumeClaims, backed by the node pools (what a CSI driver and the external provisioner
are to a cluster).

Two classes, one per kind of pool:

- ``vmo-local`` (the default): the node's own pool, ReadWriteOnce, ``WaitForFirstConsumer``. A
  standalone claim is provisioned on the node that first runs a VMI using it; its PV's node
  affinity then keeps every later VMI there (migrations copy the volume and move the PV).
- ``vmo-shared``: the host-wide pool every node opens in place, ReadWriteMany, ``Immediate``.

A claim a DataVolume owns is filled by the DataVolume's import; it binds once the import has
succeeded, as CDI's do. A standalone claim is a blank volume of the requested size. The claim
keeps ``kubernetes.io/pvc-protection`` while a VMI uses it; once released, its PV is deleted with
the volume (reclaim policy Delete) or kept, Released, with the volume (Retain).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmo.api.annotations import STORAGE_NODE
from vmo.api.kubevirt.migratable import vmi_claim_names
from vmo.api.quantity import QuantityError, parse_quantity
from vmo.api.storage import (
    DEFAULT_CLASS_ANNOTATION,
    PV_PROTECTION,
    PVC_PROTECTION,
    SELECTED_NODE,
    claim_request,
)
from vmo.client import (
    DATAVOLUME,
    PV,
    PVC,
    STORAGECLASS,
    VMI,
    ApiStatusError,
    Client,
    Conflict,
    NotFound,
)
from vmo.engine.storage.pool import Pool, PoolError
from vmo.runtime import Controller, EventRecorder, Result, TemporaryError, Watch, split_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]

LOCAL_CLASS = "vmo-local"
SHARED_CLASS = "vmo-shared"
LOCAL_PROVISIONER = "local.storage.vmo.dev"
SHARED_PROVISIONER = "shared.storage.vmo.dev"
PROVISIONERS = (LOCAL_PROVISIONER, SHARED_PROVISIONER)
STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
BETA_STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
BIND_COMPLETED = "pv.kubernetes.io/bind-completed"
BOUND_BY_CONTROLLER = "pv.kubernetes.io/bound-by-controller"
HOSTNAME_LABEL = "kubernetes.io/hostname"
CDI_CONTENT_TYPE = "cdi.kubevirt.io/storage.contentType"
CDI_FOR_DATAVOLUME = "cdi.kubevirt.io/createdForDataVolume"
CDI_POD_PHASE = "cdi.kubevirt.io/storage.pod.phase"
CDI_POD_RESTARTS = "cdi.kubevirt.io/storage.pod.restarts"
CDI_IMPORT_SOURCE = "cdi.kubevirt.io/storage.import.source"
CDI_IMPORT_ENDPOINT = "cdi.kubevirt.io/storage.import.endpoint"
COMPONENT = "vmo-volume-provisioner"

__all__ = [
    "LOCAL_CLASS",
    "SHARED_CLASS",
    "ClaimController",
    "Provisioner",
    "claim_for_datavolume",
    "ensure_storage_classes",
    "storage_classes",
]


def storage_classes() -> list[JSON]:
    """VMO's two StorageClasses (the local one is the default)."""
    return [
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": LOCAL_CLASS,
                "annotations": {DEFAULT_CLASS_ANNOTATION: "true"},
                "labels": {"app.kubernetes.io/managed-by": "vmo"},
            },
            "provisioner": LOCAL_PROVISIONER,
            "parameters": {"accessModes": "ReadWriteOnce,ReadWriteOncePod"},
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": True,
        },
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": SHARED_CLASS, "labels": {"app.kubernetes.io/managed-by": "vmo"}},
            "provisioner": SHARED_PROVISIONER,
            "parameters": {"accessModes": "ReadWriteMany,ReadWriteOnce,ReadOnlyMany"},
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
            "allowVolumeExpansion": True,
        },
    ]


async def ensure_storage_classes(client: Client) -> None:
    """Creates VMO's classes where missing (an administrator's changes to them are kept)."""
    for sc in storage_classes():
        with contextlib.suppress(Conflict):
            await client.create(STORAGECLASS, sc)


def format_bytes(size: int) -> str:
    """A byte count as a Kubernetes quantity: the largest binary suffix that divides it."""
    for suffix, shift in (("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


def _owner_datavolume(pvc: JSON) -> JSON | None:
    for ref in pvc["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "DataVolume" and ref.get("controller"):
            found: JSON = ref
            return found
    return None


def _dv_section(dv: JSON) -> JSON:
    spec = dv.get("spec") or {}
    section: JSON = spec.get("storage") or spec.get("pvc") or {}
    return section


def _dv_source_kind(dv: JSON) -> str:
    source = (dv.get("spec") or {}).get("source") or {}
    return next(iter(source), "none")


def datavolume_class(dv: JSON) -> str | None:
    """The class a DataVolume's claim gets: the one it names, else the shared class for a
    ReadWriteMany request (VMO's storage profile), else None (the default class)."""
    section = _dv_section(dv)
    if section.get("storageClassName"):
        return str(section["storageClassName"])
    if "ReadWriteMany" in (section.get("accessModes") or []):
        return SHARED_CLASS
    return None


def claim_for_datavolume(dv: JSON) -> JSON:
    """The PVC of a DataVolume, of the same name and owned by it, with CDI's annotations."""
    md = dv["metadata"]
    section = _dv_section(dv)
    size = ((section.get("resources") or {}).get("requests") or {}).get("storage")
    spec: JSON = {
        "accessModes": list(section.get("accessModes") or ["ReadWriteOnce"]),
        "resources": {"requests": {"storage": size or "1Gi"}},
        "volumeMode": section.get("volumeMode") or "Filesystem",
    }
    storage_class = datavolume_class(dv)
    if storage_class:
        spec["storageClassName"] = storage_class
    annotations = {
        CDI_CONTENT_TYPE: str((dv.get("spec") or {}).get("contentType") or "kubevirt"),
        CDI_FOR_DATAVOLUME: str(md.get("uid", "")),
        CDI_IMPORT_SOURCE: _dv_source_kind(dv),
        CDI_POD_PHASE: "Pending",
        CDI_POD_RESTARTS: "0",
    }
    url = (((dv.get("spec") or {}).get("source") or {}).get("http") or {}).get("url")
    if url:
        annotations[CDI_IMPORT_ENDPOINT] = str(url)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": md["name"],
            "namespace": md["namespace"],
            "labels": {
                "app": "containerized-data-importer",
                "app.kubernetes.io/component": "storage",
                "app.kubernetes.io/managed-by": "cdi-controller",
            },
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": "cdi.kubevirt.io/v1beta1",
                    "kind": "DataVolume",
                    "name": md["name"],
                    "uid": md.get("uid", ""),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def claims_of_vmi(vmi: JSON) -> set[str]:
    return set(vmi_claim_names(vmi)) - {""}


def _in_use(vmis: Sequence[JSON], claim: str) -> bool:
    return any(
        (vmi.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        and claim in claims_of_vmi(vmi)
        for vmi in vmis
    )


@dataclass
class Provisioner:
    """One node's provisioner: binds claims to the volumes of its pools."""

    client: Client
    node: str
    pool: Pool
    shared_pool: Pool
    # (namespace, claim, bytes) -> True when a running QEMU here grew the volume (block_resize)
    resize_online: Callable[[str, str, int], Awaitable[bool]] | None = None
    # (claim, pool) -> fills a claim annotated for import (the DataVolume importer's transfer)
    import_claim: Callable[[JSON, Pool], Awaitable[Any]] | None = None
    events: EventRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.events = EventRecorder(self.client, component=COMPONENT)

    async def storage_class(self, pvc: JSON) -> JSON | None:
        name = (pvc.get("spec") or {}).get("storageClassName")
        return await self.client.find(STORAGECLASS, str(name)) if name else None

    def pool_of(self, provisioner: str) -> Pool:
        return self.shared_pool if provisioner == SHARED_PROVISIONER else self.pool

    async def ensure_datavolume_claim(self, dv: JSON) -> JSON | None:
        """Creates the DataVolume's claim if missing; the claim as it is."""
        md = dv["metadata"]
        found = await self.client.find(PVC, md["name"], md["namespace"])
        if found is not None:
            return found
        try:
            return await self.client.create(PVC, claim_for_datavolume(dv))
        except Conflict:
            return await self.client.find(PVC, md["name"], md["namespace"])
        except ApiStatusError as exc:
            log.warning(
                "claim of DataVolume %s/%s not created: %s", md["namespace"], md["name"], exc
            )
            return None

    async def bind_datavolume(self, dv: JSON, pool: Pool, *, restarts: int = 0) -> None:
        """After a successful import: the DataVolume's claim binds to a PV of its volume."""
        pvc = await self.ensure_datavolume_claim(dv)
        if pvc is None or (pvc.get("status") or {}).get("phase") == "Bound":
            return
        md = dv["metadata"]
        sc = await self.storage_class(pvc)
        provisioner = str((sc or {}).get("provisioner") or "")
        if provisioner not in PROVISIONERS:
            provisioner = SHARED_PROVISIONER if pool is self.shared_pool else LOCAL_PROVISIONER
        size = pool.record(md["namespace"], md["name"]).virtual_size
        annotations = {CDI_POD_PHASE: "Succeeded", CDI_POD_RESTARTS: str(restarts)}
        await self._bind(pvc, sc, provisioner, size, extra_annotations=annotations)

    async def provision(self, pvc: JSON, sc: JSON) -> bool:
        """A standalone claim's blank volume on this node, then the binding; False (with a
        Warning Event) when the pool cannot hold it."""
        md = pvc["metadata"]
        provisioner = str(sc.get("provisioner"))
        pool = self.pool_of(provisioner)
        size = claim_request(pvc) or 0
        namespace, name = md["namespace"], md["name"]
        if not pool.exists(namespace, name):
            total = _pool_total(pool)
            if size > total:
                await self._refuse(
                    pvc,
                    f"the pool of node {self.node} holds {format_bytes(total)}, the claim asks for "
                    f"{format_bytes(size)}",
                )
                return False
            try:
                await pool.create_blank(namespace, name, size, owner_uid=md.get("uid", ""))
            except PoolError as exc:
                await self._refuse(pvc, str(exc))
                return False
        await self._bind(pvc, sc, provisioner, pool.record(namespace, name).virtual_size)
        await self.events.record(
            pvc,
            "ProvisioningSucceeded",
            f"Successfully provisioned volume pvc-{md.get('uid', '')} on node {self.node}",
        )
        return True

    async def import_annotated(self, pvc: JSON, sc: JSON) -> None:
        """A standalone claim annotated ``cdi.kubevirt.io/storage.import.endpoint``: imported
        here, then bound; a failure is a Warning Event and the claim's pod phase Failed."""
        md = pvc["metadata"]
        if self.import_claim is None:
            return
        provisioner = str(sc.get("provisioner"))
        pool = self.pool_of(provisioner)
        namespace, name = md["namespace"], md["name"]
        await self._annotate(pvc, {CDI_POD_PHASE: "Running"})
        try:
            if not pool.exists(namespace, name):
                await self.import_claim(pvc, pool)
        except Exception as exc:  # the importer's refusals and transfer failures alike
            log.warning("claim %s/%s: import failed: %s", namespace, name, exc)
            await self._annotate(pvc, {CDI_POD_PHASE: "Failed"})
            await self.events.record(
                pvc, "ImportFailed", f"Failed to import into PVC {name}: {exc}", type_="Warning"
            )
            return
        size = pool.record(namespace, name).virtual_size
        await self._bind(pvc, sc, provisioner, size, extra_annotations={CDI_POD_PHASE: "Succeeded"})

    async def _annotate(self, pvc: JSON, annotations: dict[str, str]) -> None:
        md = pvc["metadata"]
        with contextlib.suppress(NotFound):
            await self.client.patch(
                PVC, md["name"], {"metadata": {"annotations": annotations}}, md["namespace"]
            )

    async def _refuse(self, pvc: JSON, why: str) -> None:
        sc_name = (pvc.get("spec") or {}).get("storageClassName")
        await self.events.record(
            pvc,
            "ProvisioningFailed",
            f'failed to provision volume with StorageClass "{sc_name}": {why}',
            type_="Warning",
        )

    async def _bind(
        self,
        pvc: JSON,
        sc: JSON | None,
        provisioner: str,
        size: int,
        *,
        extra_annotations: dict[str, str] | None = None,
    ) -> None:
        md, spec = pvc["metadata"], pvc.get("spec") or {}
        pv_name = f"pvc-{md['uid']}"
        shared = provisioner == SHARED_PROVISIONER
        capacity = format_bytes(max(size, claim_request(pvc) or 0))
        volume: JSON = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "annotations": {PROVISIONED_BY: provisioner}},
            "spec": {
                "capacity": {"storage": capacity},
                "accessModes": list(spec.get("accessModes") or ["ReadWriteOnce"]),
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": md["namespace"],
                    "name": md["name"],
                    "uid": md["uid"],
                },
                "persistentVolumeReclaimPolicy": str((sc or {}).get("reclaimPolicy") or "Delete"),
                "storageClassName": str(spec.get("storageClassName") or ""),
                "volumeMode": str(spec.get("volumeMode") or "Filesystem"),
                "csi": {
                    "driver": provisioner,
                    "volumeHandle": f"{md['namespace']}/{md['name']}",
                    "volumeAttributes": {"pool": "shared" if shared else "local"},
                },
            },
        }
        if not shared:
            volume["spec"]["csi"]["volumeAttributes"]["node"] = self.node
            volume["spec"]["nodeAffinity"] = {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": HOSTNAME_LABEL, "operator": "In", "values": [self.node]}
                            ]
                        }
                    ]
                }
            }
        with contextlib.suppress(Conflict):
            await self.client.create(PV, volume)
        await self.client.patch_status(PV, pv_name, {"phase": "Bound"})
        annotations = {
            BIND_COMPLETED: "yes",
            BOUND_BY_CONTROLLER: "yes",
            STORAGE_PROVISIONER: provisioner,
            BETA_STORAGE_PROVISIONER: provisioner,
            **(extra_annotations or {}),
        }
        if not shared:
            annotations[SELECTED_NODE] = self.node
        await self.client.patch(
            PVC,
            md["name"],
            {"metadata": {"annotations": annotations}, "spec": {"volumeName": pv_name}},
            md["namespace"],
        )
        await self.client.patch_status(
            PVC,
            md["name"],
            {
                "phase": "Bound",
                "accessModes": volume["spec"]["accessModes"],
                "capacity": {"storage": capacity},
            },
            md["namespace"],
        )

    # --- expansion ------------------------------------------------------------------------------

    async def expand(self, pvc: JSON) -> None:
        """A bound claim asking for more than it has: the volume grows (online through the QEMU
        using it, else offline), then the PV's and the claim's capacity follow."""
        md, status = pvc["metadata"], pvc.get("status") or {}
        namespace, name = md["namespace"], md["name"]
        request = claim_request(pvc) or 0
        pool = next((p for p in (self.pool, self.shared_pool) if p.exists(namespace, name)), None)
        if pool is None or request <= _capacity(status):
            return
        grown = self.resize_online is not None and await self.resize_online(
            namespace, name, request
        )
        try:
            await pool.resize(namespace, name, request, offline=not grown)
        except PoolError as exc:
            await self.events.record(
                pvc, "VolumeResizeFailed", f"resize of volume {name} failed: {exc}", type_="Warning"
            )
            return
        capacity = format_bytes(request)
        pv_name = str((pvc.get("spec") or {}).get("volumeName") or "")
        if pv_name:
            with contextlib.suppress(NotFound):
                await self.client.patch(PV, pv_name, {"spec": {"capacity": {"storage": capacity}}})
        await self.client.patch_status(
            PVC,
            name,
            {"capacity": {"storage": capacity}, "allocatedResources": {"storage": capacity}},
            namespace,
        )
        how = "online" if grown else "offline"
        await self.events.record(
            pvc, "VolumeResizeSuccessful", f"volume {name} grew to {capacity} ({how})"
        )

    # --- release --------------------------------------------------------------------------------

    def holds(self, pvc: JSON, pv: JSON | None) -> bool:
        """Whether this node's pools hold the claim's volume."""
        md = pvc["metadata"]
        attributes = (((pv or {}).get("spec") or {}).get("csi") or {}).get("volumeAttributes") or {}
        if attributes.get("pool") == "shared":
            return self.shared_pool.exists(md["namespace"], md["name"])
        return self.pool.exists(md["namespace"], md["name"]) or (
            attributes.get("node") == self.node
        )

    async def release(self, pvc: JSON) -> bool:
        """A deleted claim no VMI uses: its PV reclaimed, then the protection finalizer gone.
        False when the claim is still in use or not this node's."""
        md = pvc["metadata"]
        namespace, name = md["namespace"], md["name"]
        vmis, _ = await self.client.list(VMI, namespace=namespace)
        if _in_use(vmis, name):
            return False
        pv_name = (pvc.get("spec") or {}).get("volumeName")
        pv = await self.client.find(PV, str(pv_name)) if pv_name else None
        if pv is not None and not self.holds(pvc, pv):
            return False
        if pv is not None:
            policy = (pv.get("spec") or {}).get("persistentVolumeReclaimPolicy") or "Delete"
            if policy == "Delete":
                if not self._dv_owned(pvc):  # a DataVolume's volume goes with the DataVolume
                    for pool in (self.pool, self.shared_pool):
                        if pool.delete(namespace, name):
                            log.info("deleted volume %s/%s with its claim", namespace, name)
                await self._drop_finalizer(PV, pv, PV_PROTECTION)
                with contextlib.suppress(NotFound):
                    await self.client.delete(PV, str(pv_name))
            else:
                with contextlib.suppress(NotFound):
                    await self.client.patch_status(PV, str(pv_name), {"phase": "Released"})
        await self._drop_finalizer(PVC, pvc, PVC_PROTECTION)
        return True

    @staticmethod
    def _dv_owned(pvc: JSON) -> bool:
        return _owner_datavolume(pvc) is not None

    async def _drop_finalizer(self, res: Any, obj: JSON, finalizer: str) -> None:
        md = obj["metadata"]
        finalizers = [f for f in md.get("finalizers") or [] if f != finalizer]
        if finalizers == list(md.get("finalizers") or []):
            return
        with contextlib.suppress(NotFound):
            await self.client.patch(
                res,
                md["name"],
                {"metadata": {"finalizers": finalizers or None}},
                md.get("namespace", ""),
            )


def _capacity(status: JSON) -> int:
    value = (status.get("capacity") or {}).get("storage")
    try:
        return int(parse_quantity(value)) if value is not None else 0
    except (QuantityError, TypeError, ValueError):
        return 0


def _pool_total(pool: Pool) -> int:
    if pool.capacity_bytes is not None:
        return int(pool.capacity_bytes)
    pool.root.mkdir(parents=True, exist_ok=True)
    stat = os.statvfs(pool.root)
    return stat.f_blocks * stat.f_frsize


class ClaimController(Controller):
    """The provisioner's loop on one node: Immediate claims are provisioned by the first node to
    select itself; WaitForFirstConsumer ones by the node agent launching their first VMI
    (``provision_for_vmi``); deleted claims are released once no VMI uses them."""

    workers = 4

    def __init__(self, provisioner: Provisioner) -> None:
        super().__init__(provisioner.client)
        self.provisioner = provisioner
        self.name = f"volume-provisioner-{provisioner.node}"

    def watches(self) -> Sequence[Watch]:
        return [Watch(PVC), Watch(VMI, _vmi_claim_keys)]

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        pvc = await self.client.find(PVC, name, namespace)
        if pvc is None:
            return None
        prov = self.provisioner
        if pvc["metadata"].get("deletionTimestamp"):
            await prov.release(pvc)
            return None
        if (pvc.get("status") or {}).get("phase") == "Bound":
            await prov.expand(pvc)
            return None
        if _owner_datavolume(pvc):
            return None  # a DataVolume's claim binds when its import succeeds
        sc = await prov.storage_class(pvc)
        if sc is None:
            sc_name = (pvc.get("spec") or {}).get("storageClassName")
            if sc_name:
                await prov._refuse(pvc, f'storageclass.storage.k8s.io "{sc_name}" not found')
            return None
        if sc.get("provisioner") not in PROVISIONERS:
            return None
        annotations = pvc["metadata"].get("annotations") or {}
        if annotations.get(CDI_IMPORT_ENDPOINT):
            # the importer is the claim's first consumer, whatever the binding mode
            if annotations.get(CDI_POD_PHASE) != "Failed" and await self._select(pvc):
                fresh = await self.client.find(PVC, name, namespace)
                if fresh is not None:
                    await prov.import_annotated(fresh, sc)
            return None
        if sc.get("volumeBindingMode") == "WaitForFirstConsumer":
            selected = (pvc["metadata"].get("annotations") or {}).get(SELECTED_NODE)
            if selected != prov.node:
                return None  # provisioned where its first VMI starts
        elif not await self._select(pvc):
            return None
        try:
            await prov.provision(pvc, sc)
        except (Conflict, ApiStatusError) as exc:
            raise TemporaryError(f"claim {key} not bound: {exc}", delay=1.0) from exc
        return None

    async def _select(self, pvc: JSON) -> bool:
        """Claims an Immediate claim for this node (one node provisions it)."""
        md = pvc["metadata"]
        selected = (md.get("annotations") or {}).get(STORAGE_NODE)
        if selected:
            return bool(selected == self.provisioner.node)
        patch = {
            "metadata": {
                "resourceVersion": md["resourceVersion"],
                "annotations": {STORAGE_NODE: self.provisioner.node},
            }
        }
        try:
            await self.client.patch(PVC, md["name"], patch, md["namespace"])
        except (Conflict, NotFound):
            return False
        return True


def _vmi_claim_keys(_etype: str, vmi: JSON) -> list[str]:
    namespace = vmi["metadata"].get("namespace", "")
    return [f"{namespace}/{name}" for name in sorted(claims_of_vmi(vmi))]


async def provision_for_vmi(prov: Provisioner, vmi: JSON) -> None:
    """Before a VMI starts here: every standalone WaitForFirstConsumer claim it names that is
    not bound yet is provisioned on this node (this node is its first consumer)."""
    namespace = vmi["metadata"]["namespace"]
    for volume in (vmi.get("spec") or {}).get("volumes") or []:
        name = ((volume.get("persistentVolumeClaim") or {}).get("claimName")) or (
            ((volume.get("ephemeral") or {}).get("persistentVolumeClaim") or {}).get("claimName")
        )
        if not name:
            continue
        pvc = await prov.client.find(PVC, str(name), namespace)
        if pvc is None or (pvc.get("status") or {}).get("phase") == "Bound":
            continue
        if _owner_datavolume(pvc) is not None or pvc["metadata"].get("deletionTimestamp"):
            continue
        if (pvc["metadata"].get("annotations") or {}).get(CDI_IMPORT_ENDPOINT):
            continue  # filled by its import, never blank
        sc = await prov.storage_class(pvc)
        if sc is None or sc.get("provisioner") not in PROVISIONERS:
            continue
        if sc.get("volumeBindingMode") != "WaitForFirstConsumer":
            continue
        selected = (pvc["metadata"].get("annotations") or {}).get(SELECTED_NODE)
        if selected and selected != prov.node:
            continue
        await prov.provision(pvc, sc)


async def claims_importing(client: Client, vmi: JSON) -> str | None:
    """Why the VMI cannot start yet: a standalone claim it names is filled by an import
    (``cdi.kubevirt.io/storage.import.endpoint``) that has not finished; None when none is.
    A DataVolume's claim is the VM controller's to wait for."""
    namespace = vmi["metadata"]["namespace"]
    for volume in (vmi.get("spec") or {}).get("volumes") or []:
        name = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if not name:
            continue
        pvc = await client.find(PVC, str(name), namespace)
        if pvc is None or _owner_datavolume(pvc) is not None:
            continue
        annotations = pvc["metadata"].get("annotations") or {}
        if not annotations.get(CDI_IMPORT_ENDPOINT) or annotations.get(CDI_POD_PHASE) == "Failed":
            continue  # a failed import is not waited for: the start fails, naming the claim
        if (pvc.get("status") or {}).get("phase") != "Bound":
            return f"PVC {namespace}/{name} is still being imported"
    return None


async def datavolume_of(client: Client, pvc: JSON) -> JSON | None:
    ref = _owner_datavolume(pvc)
    if ref is None:
        return None
    return await client.find(DATAVOLUME, str(ref.get("name")), pvc["metadata"]["namespace"])
