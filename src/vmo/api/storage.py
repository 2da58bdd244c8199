"""Kubernetes' storage kinds as VMO serves them: core/v1 PersistentVolumeClaim and
PersistentVolume, storage.k8s.io/v1 StorageClass.

The schemas hold the fields VMO supports; what it does not (claim ``selector``, ``dataSource``,
volume attributes classes, PV sources other than ``local``/``hostPath``/``csi``) is refused
by name. The validators carry upstream's update rules: a claim's spec is immutable but for its
storage request (which may only grow) and the binder's ``volumeName``; a StorageClass's
provisioner, parameters, reclaim policy and binding mode never change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from vmo.api.core import (
    _columns,
    array,
    boolean,
    obj,
    object_reference,
    quantity,
    resource,
    string,
    string_map,
    strings,
    unsupported,
)
from vmo.api.quantity import QuantityError, parse_quantity
from vmo.api.types import JSON, Cause, PrinterColumn, ResourceType

__all__ = [
    "ACCESS_MODES",
    "COMPUTED_CELLS",
    "DEFAULT_CLASS_ANNOTATION",
    "PVC_PROTECTION",
    "PV_PROTECTION",
    "SELECTED_NODE",
    "claim_request",
    "storage_types",
]

ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
VOLUME_MODES = ("Filesystem", "Block")
RECLAIM_POLICIES = ("Retain", "Delete", "Recycle")
BINDING_MODES = ("Immediate", "WaitForFirstConsumer")
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
PVC_PROTECTION = "kubernetes.io/pvc-protection"
PV_PROTECTION = "kubernetes.io/pv-protection"
# the node a WaitForFirstConsumer claim was provisioned for (its first consumer's)
SELECTED_NODE = "volume.kubernetes.io/selected-node"
_FORBIDDEN = "FieldValueForbidden"
_REQUIRED = "FieldValueRequired"


_MODE_ABBREVIATIONS = {
    "ReadWriteOnce": "RWO",
    "ReadOnlyMany": "ROX",
    "ReadWriteMany": "RWX",
    "ReadWriteOncePod": "RWOP",
}


def _modes_cell(section: str) -> Callable[[JSON], Any]:
    def cell(obj: JSON) -> str:
        modes = (obj.get(section) or {}).get("accessModes") or []
        return ",".join(_MODE_ABBREVIATIONS.get(str(m), str(m)) for m in modes)

    return cell


COMPUTED_CELLS: dict[tuple[str, str, str], Callable[[JSON], Any]] = {
    ("v1", "PersistentVolumeClaim", "Access Modes"): _modes_cell("status"),
    ("v1", "PersistentVolume", "Access Modes"): _modes_cell("spec"),
}
"""Access modes as kubectl prints them (RWO, ROX, RWX, RWOP), for the table convertor."""


def claim_request(pvc: JSON) -> int | None:
    """The storage a claim asks for, in bytes (None when missing or malformed)."""
    value = (((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    if value is None:
        return None
    try:
        return int(parse_quantity(value))
    except (QuantityError, TypeError, ValueError):
        return None


def _resources() -> JSON:
    return obj(
        {
            "requests": obj(
                {"storage": quantity("The minimum amount of storage the claim needs.")},
                "Minimum resources the volume should have.",
                additionalProperties=quantity(),
            ),
            "limits": obj(
                {"storage": quantity()},
                "Maximum resources allowed.",
                additionalProperties=quantity(),
            ),
        },
        "The minimum resources the volume should have.",
    )


def _access_modes(description: str) -> JSON:
    return array(string(enum=ACCESS_MODES), description, list_type="atomic")


def _claim_spec() -> JSON:
    return obj(
        {
            "accessModes": _access_modes("The desired access modes the volume should have."),
            "resources": _resources(),
            "storageClassName": string("Name of the StorageClass required by the claim."),
            "volumeMode": string("Filesystem or Block.", enum=VOLUME_MODES),
            "volumeName": string("The binding reference to the PersistentVolume."),
            "selector": unsupported("VMO provisions every claim; it binds none by selector"),
            "dataSource": unsupported("populate claims with a DataVolume instead"),
            "dataSourceRef": unsupported("populate claims with a DataVolume instead"),
            "volumeAttributesClassName": unsupported("volume attributes classes are not served"),
        },
        "The desired characteristics of a volume.",
    )


def _claim_status() -> JSON:
    return obj(
        {
            "phase": string("The current phase of the claim.", enum=("Pending", "Bound", "Lost")),
            "accessModes": _access_modes("The access modes the volume backing the claim has."),
            "capacity": string_map("The actual resources of the underlying volume."),
            "allocatedResources": string_map("The storage allocated to the claim."),
            "conditions": array(
                obj(
                    {
                        "type": string(),
                        "status": string(),
                        "reason": string(),
                        "message": string(),
                        "lastProbeTime": string(fmt="date-time", nullable=True),
                        "lastTransitionTime": string(fmt="date-time", nullable=True),
                    },
                    required=("type", "status"),
                ),
                "The current conditions of the claim (resizing).",
                map_keys=("type",),
                merge_key="type",
            ),
        },
        "The current information/status of a persistent volume claim.",
    )


def _claim_causes(new: JSON, old: JSON | None) -> list[Cause]:
    spec = new.get("spec") or {}
    causes = []
    if not spec.get("accessModes"):
        causes.append(
            Cause(
                "spec.accessModes", "Required value: at least 1 access mode is required", _REQUIRED
            )
        )
    request = claim_request(new)
    if request is None:
        causes.append(Cause("spec.resources[storage]", "Required value", _REQUIRED))
    elif request <= 0:
        causes.append(Cause("spec.resources[storage]", "Invalid value: must be greater than zero"))
    if old is None:
        return causes
    before = old.get("spec") or {}
    previous = claim_request(old)
    if request is not None and previous is not None and request < previous:
        causes.append(
            Cause(
                "spec.resources.requests.storage",
                "Forbidden: field can not be less than previous value",
                _FORBIDDEN,
            )
        )
    frozen = ("accessModes", "storageClassName", "volumeMode")
    changed = [k for k in frozen if spec.get(k) != before.get(k)]
    if before.get("volumeName") and spec.get("volumeName") != before.get("volumeName"):
        changed.append("volumeName")
    if changed:
        causes.append(
            Cause(
                "spec",
                "Forbidden: spec is immutable after creation except resources.requests and "
                "volumeAttributesClassName for bound claims",
                _FORBIDDEN,
            )
        )
    return causes


def persistent_volume_claim() -> ResourceType:
    return ResourceType(
        group="",
        version="v1",
        kind="PersistentVolumeClaim",
        plural="persistentvolumeclaims",
        singular="persistentvolumeclaim",
        namespaced=True,
        short_names=("pvc",),
        subresources=("status",),
        printer_columns=_columns(
            PrinterColumn("Status", "string", ".status.phase"),
            PrinterColumn("Volume", "string", ".spec.volumeName"),
            PrinterColumn("Capacity", "string", ".status.capacity.storage"),
            PrinterColumn("Access Modes", "string", ".status.accessModes"),
            PrinterColumn("StorageClass", "string", ".spec.storageClassName"),
            PrinterColumn("VolumeMode", "string", ".spec.volumeMode", priority=1),
        ),
        schema=resource(
            "PersistentVolumeClaim is a user's request for and claim to a persistent volume.",
            {"spec": _claim_spec(), "status": _claim_status()},
        ),
        validate=_claim_causes,
        field_selectors={"status.phase": ".status.phase"},
    )


def _node_affinity() -> JSON:
    requirement = obj(
        {
            "key": string(),
            "operator": string(enum=("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")),
            "values": strings(),
        },
        required=("key", "operator"),
    )
    term = obj({"matchExpressions": array(requirement), "matchFields": array(requirement)})
    return obj(
        {"required": obj({"nodeSelectorTerms": array(term)}, required=("nodeSelectorTerms",))},
        "The nodes this volume can be accessed from.",
    )


def _volume_spec() -> JSON:
    return obj(
        {
            "capacity": string_map("The volume's capacity (storage)."),
            "accessModes": _access_modes("The ways the volume can be mounted."),
            "claimRef": object_reference("The claim bound to this volume."),
            "persistentVolumeReclaimPolicy": string(
                "What happens to the volume when released from its claim.", enum=RECLAIM_POLICIES
            ),
            "storageClassName": string("The StorageClass this volume belongs to."),
            "volumeMode": string("Filesystem or Block.", enum=VOLUME_MODES),
            "mountOptions": strings(),
            "nodeAffinity": _node_affinity(),
            "local": obj(
                {"path": string("The full path to the volume on the node."), "fsType": string()},
                "A directly-attached storage on the node.",
                required=("path",),
            ),
            "hostPath": obj(
                {"path": string(), "type": string()}, "A file on the host.", required=("path",)
            ),
            "csi": obj(
                {
                    "driver": string(),
                    "volumeHandle": string(),
                    "readOnly": boolean(),
                    "fsType": string(),
                    "volumeAttributes": string_map(),
                },
                "A volume handled by a CSI driver.",
                required=("driver", "volumeHandle"),
            ),
        },
        "The actual volume backing the persistent volume.",
    )


def _volume_causes(new: JSON, old: JSON | None) -> list[Cause]:
    spec = new.get("spec") or {}
    causes = []
    if not spec.get("accessModes"):
        causes.append(Cause("spec.accessModes", "Required value", _REQUIRED))
    if "storage" not in (spec.get("capacity") or {}):
        causes.append(Cause("spec.capacity", "Required value", _REQUIRED))
    if not any(k in spec for k in ("local", "hostPath", "csi")):
        causes.append(Cause("spec", "Required value: must specify a volume type", _REQUIRED))
    if old is not None:
        before = old.get("spec") or {}
        for key in ("local", "hostPath", "csi", "nodeAffinity", "volumeMode"):
            if spec.get(key) != before.get(key):
                causes.append(Cause(f"spec.{key}", "Forbidden: field is immutable", _FORBIDDEN))
    return causes


def persistent_volume() -> ResourceType:
    status = obj(
        {
            "phase": string(enum=("Pending", "Available", "Bound", "Released", "Failed")),
            "message": string(),
            "reason": string(),
            "lastPhaseTransitionTime": string(fmt="date-time", nullable=True),
        },
        "The current information/status of a persistent volume.",
    )
    return ResourceType(
        group="",
        version="v1",
        kind="PersistentVolume",
        plural="persistentvolumes",
        singular="persistentvolume",
        namespaced=False,
        short_names=("pv",),
        subresources=("status",),
        printer_columns=_columns(
            PrinterColumn("Capacity", "string", ".spec.capacity.storage"),
            PrinterColumn("Access Modes", "string", ".spec.accessModes"),
            PrinterColumn("Reclaim Policy", "string", ".spec.persistentVolumeReclaimPolicy"),
            PrinterColumn("Status", "string", ".status.phase"),
            PrinterColumn("Claim", "string", ".spec.claimRef.name"),
            PrinterColumn("StorageClass", "string", ".spec.storageClassName"),
            PrinterColumn("Reason", "string", ".status.reason"),
            PrinterColumn("VolumeMode", "string", ".spec.volumeMode", priority=1),
        ),
        schema=resource(
            "PersistentVolume is a storage resource provisioned by an administrator or a "
            "provisioner.",
            {"spec": _volume_spec(), "status": status},
        ),
        validate=_volume_causes,
        field_selectors={"status.phase": ".status.phase"},
    )


def _class_causes(new: JSON, old: JSON | None) -> list[Cause]:
    causes = []
    if not new.get("provisioner"):
        causes.append(Cause("provisioner", "Required value", _REQUIRED))
    if old is not None:
        for key in ("provisioner", "parameters", "reclaimPolicy", "volumeBindingMode"):
            if new.get(key) != old.get(key):
                causes.append(
                    Cause(key, "Forbidden: updates to " + key + " are forbidden.", _FORBIDDEN)
                )
    return causes


def storage_class() -> ResourceType:
    schema = resource(
        "StorageClass describes the parameters for a class of storage.",
        {
            "provisioner": string("The type of the provisioner."),
            "parameters": string_map("Parameters for the provisioner."),
            "reclaimPolicy": string("Delete or Retain.", enum=("Delete", "Retain")),
            "allowVolumeExpansion": boolean("Whether the class allows volume expansion."),
            "volumeBindingMode": string(
                "How claims are provisioned and bound.", enum=BINDING_MODES
            ),
            "mountOptions": strings(),
            "allowedTopologies": unsupported("VMO's classes follow each node's pool"),
        },
        required=("provisioner",),
    )
    return ResourceType(
        group="storage.k8s.io",
        version="v1",
        kind="StorageClass",
        plural="storageclasses",
        singular="storageclass",
        namespaced=False,
        short_names=("sc",),
        printer_columns=_columns(
            PrinterColumn("Provisioner", "string", ".provisioner"),
            PrinterColumn("ReclaimPolicy", "string", ".reclaimPolicy"),
            PrinterColumn("VolumeBindingMode", "string", ".volumeBindingMode"),
            PrinterColumn("AllowVolumeExpansion", "boolean", ".allowVolumeExpansion"),
        ),
        schema=schema,
        validate=_class_causes,
    )


def storage_types() -> list[ResourceType]:
    """The storage kinds; like the other core kinds, they carry no ``metadata.generation``."""
    kinds = [persistent_volume_claim(), persistent_volume(), storage_class()]
    return [replace(rt, has_generation=False) for rt in kinds]
