"""snapshot.storage.k8s.io/v1 as VMO serves it: VolumeSnapshot, VolumeSnapshotContent and
VolumeSnapshotClass (the CSI snapshot kinds), backed by the node pools' volume snapshots.

The schemas hold the fields VMO supports. Pre-provisioned snapshots (a VolumeSnapshot bound to
an existing content by ``spec.source.volumeSnapshotContentName``, a content naming a
``snapshotHandle``) and group snapshots are refused by name. The validators carry upstream's
rules: exactly one source, sources immutable, a class name never empty.
"""

from __future__ import annotations

from vmo.api.core import (
    _columns,
    boolean,
    integer,
    obj,
    object_reference,
    quantity,
    resource,
    string,
    string_map,
    unsupported,
)
from vmo.api.types import JSON, Cause, PrinterColumn, ResourceType

__all__ = [
    "BOUND_CONTENT_FINALIZER",
    "BOUND_SNAPSHOT_FINALIZER",
    "DEFAULT_SNAPSHOT_CLASS_ANNOTATION",
    "DELETION_POLICIES",
    "GROUP",
    "VERSION",
    "volume_snapshot_types",
]

GROUP = "snapshot.storage.k8s.io"
VERSION = "v1"
DELETION_POLICIES = ("Delete", "Retain")
DEFAULT_SNAPSHOT_CLASS_ANNOTATION = "snapshot.storage.kubernetes.io/is-default-class"
# the external-snapshotter's finalizers: a bound snapshot, and a content bound to one
BOUND_SNAPSHOT_FINALIZER = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection"
BOUND_CONTENT_FINALIZER = "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection"
_PRE_PROVISIONED = "pre-provisioned snapshots are not supported: snapshot a claim instead"
_FORBIDDEN = "FieldValueForbidden"
_REQUIRED = "FieldValueRequired"
_INVALID = "FieldValueInvalid"


def _error() -> JSON:
    return obj(
        {
            "message": string("A string detailing the error encountered during snapshot creation."),
            "time": string("The time the error was encountered.", fmt="date-time"),
        },
        "The last error encountered during the snapshot's creation, if any.",
    )


def _one_source(source: JSON, old: JSON | None, path: str, keys: tuple[str, str]) -> list[Cause]:
    """Exactly one of ``keys`` is set; once set, it stays and never changes."""
    present = [k for k in keys if source.get(k)]
    causes = []
    if len(present) != 1:
        causes.append(
            Cause(path, f"Invalid value: exactly one of {keys[1]} and {keys[0]} must be set")
        )
    if old is not None:
        for key in keys:
            if key in old and source.get(key) != old.get(key):
                causes.append(Cause(f"{path}.{key}", f"Invalid value: {key} is immutable"))
    return causes


# --------------------------------------------------------------------------- VolumeSnapshot


def _snapshot_causes(new: JSON, old: JSON | None) -> list[Cause]:
    spec = new.get("spec") or {}
    before = (((old or {}).get("spec") or {}).get("source") or {}) if old is not None else None
    causes = _one_source(
        spec.get("source") or {},
        before,
        "spec.source",
        ("persistentVolumeClaimName", "volumeSnapshotContentName"),
    )
    if "volumeSnapshotClassName" in spec and not spec["volumeSnapshotClassName"]:
        causes.append(
            Cause(
                "spec.volumeSnapshotClassName",
                "Invalid value: volumeSnapshotClassName must not be the empty string when set",
            )
        )
    return causes


def volume_snapshot() -> ResourceType:
    spec = obj(
        {
            "source": obj(
                {
                    "persistentVolumeClaimName": string(
                        "The name of the PersistentVolumeClaim to take a snapshot of."
                    ),
                    "volumeSnapshotContentName": unsupported(_PRE_PROVISIONED),
                },
                "Where the snapshot's content comes from: a claim to take a snapshot of.",
            ),
            "volumeSnapshotClassName": string(
                "The VolumeSnapshotClass requested; the default class of the claim's driver "
                "when empty."
            ),
        },
        "The desired characteristics of a snapshot requested by a user.",
        required=("source",),
    )
    status = obj(
        {
            "boundVolumeSnapshotContentName": string(
                "The name of the VolumeSnapshotContent this snapshot is bound to."
            ),
            "creationTime": string("When the point-in-time snapshot was taken.", fmt="date-time"),
            "readyToUse": boolean("Whether the snapshot is ready to restore a volume from."),
            "restoreSize": quantity("The minimum size of a volume restored from this snapshot."),
            "error": _error(),
            "volumeGroupSnapshotName": unsupported("group snapshots are not served"),
        },
        "The current information of a snapshot.",
    )
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="VolumeSnapshot",
        plural="volumesnapshots",
        singular="volumesnapshot",
        namespaced=True,
        short_names=("vs",),
        subresources=("status",),
        printer_columns=_columns(
            PrinterColumn("ReadyToUse", "boolean", ".status.readyToUse"),
            PrinterColumn("SourcePVC", "string", ".spec.source.persistentVolumeClaimName"),
            PrinterColumn(
                "SourceSnapshotContent", "string", ".spec.source.volumeSnapshotContentName"
            ),
            PrinterColumn("RestoreSize", "string", ".status.restoreSize"),
            PrinterColumn("SnapshotClass", "string", ".spec.volumeSnapshotClassName"),
            PrinterColumn("SnapshotContent", "string", ".status.boundVolumeSnapshotContentName"),
            PrinterColumn("CreationTime", "date", ".status.creationTime"),
        ),
        schema=resource(
            "VolumeSnapshot is a user's request for a point-in-time snapshot of a persistent "
            "volume.",
            {"spec": spec, "status": status},
            required=("spec",),
        ),
        validate=_snapshot_causes,
    )


# --------------------------------------------------------------------------- VolumeSnapshotContent


def _content_causes(new: JSON, old: JSON | None) -> list[Cause]:
    spec = new.get("spec") or {}
    before = (((old or {}).get("spec") or {}).get("source") or {}) if old is not None else None
    causes = _one_source(
        spec.get("source") or {}, before, "spec.source", ("volumeHandle", "snapshotHandle")
    )
    for key in ("deletionPolicy", "driver"):
        if not spec.get(key):
            causes.append(Cause(f"spec.{key}", "Required value", _REQUIRED))
    ref = spec.get("volumeSnapshotRef") or {}
    if not ref.get("name") or not ref.get("namespace"):
        causes.append(
            Cause(
                "spec.volumeSnapshotRef",
                "Invalid value: both spec.volumeSnapshotRef.name and "
                "spec.volumeSnapshotRef.namespace must be set",
                _REQUIRED if not ref else _INVALID,
            )
        )
    if old is not None:
        was = (old.get("spec") or {}).get("sourceVolumeMode")
        if was is not None and spec.get("sourceVolumeMode") != was:
            causes.append(
                Cause("spec.sourceVolumeMode", "Invalid value: sourceVolumeMode is immutable")
            )
    return causes


def volume_snapshot_content() -> ResourceType:
    spec = obj(
        {
            "deletionPolicy": string(
                "Whether the physical snapshot goes with the content (Delete) or stays (Retain).",
                enum=DELETION_POLICIES,
            ),
            "driver": string("The name of the CSI driver that holds the physical snapshot."),
            "source": obj(
                {
                    "volumeHandle": string("The volume the snapshot was (or is) taken of."),
                    "snapshotHandle": unsupported(_PRE_PROVISIONED),
                },
                "Where the snapshot comes from: the volume it is taken of.",
            ),
            "sourceVolumeMode": string("The mode of the volume the snapshot is taken of."),
            "volumeSnapshotClassName": string("The VolumeSnapshotClass it was made with."),
            "volumeSnapshotRef": object_reference("The VolumeSnapshot this content is bound to."),
        },
        "The properties of the snapshot, as its driver holds it.",
        required=("deletionPolicy", "driver", "source", "volumeSnapshotRef"),
    )
    status = obj(
        {
            "creationTime": integer(
                "When the snapshot was taken, in nanoseconds since the epoch.", fmt="int64"
            ),
            "readyToUse": boolean("Whether the snapshot is ready to restore a volume from."),
            "restoreSize": integer(
                "The size, in bytes, of a volume restored from the snapshot.",
                fmt="int64",
                minimum=0,
            ),
            "snapshotHandle": string("The driver's identifier of the snapshot."),
            "error": _error(),
            "volumeGroupSnapshotHandle": unsupported("group snapshots are not served"),
        },
        "The current information of the snapshot.",
    )
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="VolumeSnapshotContent",
        plural="volumesnapshotcontents",
        singular="volumesnapshotcontent",
        namespaced=False,
        short_names=("vsc", "vscs"),
        subresources=("status",),
        printer_columns=_columns(
            PrinterColumn("ReadyToUse", "boolean", ".status.readyToUse"),
            PrinterColumn("RestoreSize", "integer", ".status.restoreSize"),
            PrinterColumn("DeletionPolicy", "string", ".spec.deletionPolicy"),
            PrinterColumn("Driver", "string", ".spec.driver"),
            PrinterColumn("VolumeSnapshotClass", "string", ".spec.volumeSnapshotClassName"),
            PrinterColumn("VolumeSnapshot", "string", ".spec.volumeSnapshotRef.name"),
            PrinterColumn("VolumeSnapshotNamespace", "string", ".spec.volumeSnapshotRef.namespace"),
        ),
        schema=resource(
            "VolumeSnapshotContent represents the actual snapshot in the storage system.",
            {"spec": spec, "status": status},
            required=("spec",),
        ),
        validate=_content_causes,
    )


# --------------------------------------------------------------------------- VolumeSnapshotClass


def _class_causes(new: JSON, _old: JSON | None) -> list[Cause]:
    return [Cause(key, "Required value", _REQUIRED) for key in ("driver", "deletionPolicy")
            if not new.get(key)]  # fmt: skip


def volume_snapshot_class() -> ResourceType:
    schema = resource(
        "VolumeSnapshotClass names a driver and its parameters for snapshots taken with it.",
        {
            "driver": string("The name of the driver that handles this class."),
            "deletionPolicy": string(
                "Whether a content made with this class is deleted with its physical snapshot "
                "(Delete) or kept (Retain).",
                enum=DELETION_POLICIES,
            ),
            "parameters": string_map("Driver-specific parameters."),
        },
        required=("deletionPolicy", "driver"),
    )
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="VolumeSnapshotClass",
        plural="volumesnapshotclasses",
        singular="volumesnapshotclass",
        namespaced=False,
        short_names=("vsclass", "vsclasses"),
        printer_columns=_columns(
            PrinterColumn("Driver", "string", ".driver"),
            PrinterColumn("DeletionPolicy", "string", ".deletionPolicy"),
        ),
        schema=schema,
        validate=_class_causes,
    )


def volume_snapshot_types() -> list[ResourceType]:
    return [volume_snapshot(), volume_snapshot_content(), volume_snapshot_class()]
