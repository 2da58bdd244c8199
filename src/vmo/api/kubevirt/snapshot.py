"""snapshot.kubevirt.io/v1beta1: VM snapshots, their contents and restores."""

from __future__ import annotations

from vmo.api.kubevirt._builders import (
    JSON,
    any_object,
    arr,
    boolean,
    obj,
    resource_schema,
    string,
    strings,
)
from vmo.api.kubevirt._common import (
    immutable_spec,
    kubevirt_condition,
    reference_causes,
    typed_local_ref,
)
from vmo.api.types import Cause, PrinterColumn, ResourceType, Validator

GROUP = "snapshot.kubevirt.io"
VERSION = "v1beta1"
SNAPSHOT_PHASES = ("InProgress", "Succeeded", "Failed", "Deleting", "Unknown")
INDICATIONS = (
    "Online",
    "GuestAgent",
    "NoGuestAgent",
    "QuiesceTimeout",
    "Paused",
    "PartialSnapshot",
)

VIRTUAL_MACHINE = {("kubevirt.io", "VirtualMachine")}
CREATION_TIME = PrinterColumn("CreationTime", "date", ".status.creationTime")
READY_TO_USE = PrinterColumn("ReadyToUse", "boolean", ".status.readyToUse")
ERROR = PrinterColumn("Error", "string", ".status.error.message")


def validate_snapshot(new: JSON, old: JSON | None) -> list[Cause]:
    """A snapshot is of a kubevirt.io VirtualMachine, and its spec never changes."""
    source = (new.get("spec") or {}).get("source")
    return immutable_spec(new, old) + reference_causes(source, "spec.source", VIRTUAL_MACHINE)


def validate_restore(new: JSON, old: JSON | None) -> list[Cause]:
    """A restore targets a kubevirt.io VirtualMachine, and its spec never changes."""
    spec = new.get("spec") or {}
    causes = immutable_spec(new, old)
    causes += reference_causes(spec.get("target"), "spec.target", VIRTUAL_MACHINE)
    if not spec.get("virtualMachineSnapshotName"):
        causes.append(
            Cause(
                "spec.virtualMachineSnapshotName", "the snapshot is required", "FieldValueRequired"
            )
        )
    return causes


def snapshot_error() -> JSON:
    return obj({"message": string(), "time": string()})


def snapshot_spec() -> JSON:
    return obj(
        {
            "source": typed_local_ref(),
            "deletionPolicy": string(enum=("Delete", "Retain")),
            "failureDeadline": string(),
        },
        required=("source",),
    )


def snapshot_status() -> JSON:
    return obj(
        {
            "phase": string(enum=SNAPSHOT_PHASES),
            "readyToUse": boolean(),
            "creationTime": string(),
            "error": snapshot_error(),
            "conditions": arr(kubevirt_condition()),
            "indications": arr(string(enum=INDICATIONS)),
            "sourceIndications": arr(
                obj(
                    {"indication": string(enum=INDICATIONS), "message": string()},
                    required=("indication", "message"),
                )
            ),
            "snapshotVolumes": obj({"includedVolumes": strings(), "excludedVolumes": strings()}),
            "virtualMachineSnapshotContentName": string(),
            "sourceUID": string(),
        }
    )


def content_spec() -> JSON:
    return obj(
        {
            # the VM as it was when snapshotted, written by VMO's snapshot controller
            "source": obj({"virtualMachine": any_object()}),
            "virtualMachineSnapshotName": string(),
            "volumeBackups": arr(any_object()),
        },
        required=("source",),
    )


def content_status() -> JSON:
    return obj(
        {
            "readyToUse": boolean(),
            "creationTime": string(),
            "error": snapshot_error(),
            "volumeSnapshotStatus": arr(any_object()),
        }
    )


def restore_spec() -> JSON:
    return obj(
        {
            "target": typed_local_ref(),
            "virtualMachineSnapshotName": string(),
            "targetReadinessPolicy": string(
                enum=("StopTarget", "WaitGracePeriod", "FailImmediate", "WaitEventually"),
                default="WaitGracePeriod",
            ),
            "volumeRestorePolicy": string(enum=("RandomizeNames", "InPlace", "PrefixTargetName")),
            "volumeOwnershipPolicy": string(enum=("Vm", "None")),
            "volumeRestoreOverrides": arr(any_object()),
            "patches": strings(),
        },
        required=("target", "virtualMachineSnapshotName"),
    )


def restore_status() -> JSON:
    return obj(
        {
            "complete": boolean(),
            "restoreTime": string(),
            "conditions": arr(kubevirt_condition()),
            "restores": arr(any_object()),
            "deletedDataVolumes": strings(),
        }
    )


def _kind(
    kind: str,
    *,
    short: str,
    columns: tuple[PrinterColumn, ...],
    spec: JSON,
    status: JSON,
    validate: Validator | None = None,
) -> ResourceType:
    singular = kind.lower()
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind=kind,
        plural=f"{singular}s",
        singular=singular,
        namespaced=True,
        short_names=(short, f"{short}s"),
        categories=("all",),
        subresources=("status",),
        printer_columns=columns,
        schema=resource_schema(spec, status),
        validate=validate,
    )


def snapshot_resource_types() -> list[ResourceType]:
    return [
        _kind(
            "VirtualMachineSnapshot",
            short="vmsnapshot",
            columns=(
                PrinterColumn("SourceKind", "string", ".spec.source.kind"),
                PrinterColumn("SourceName", "string", ".spec.source.name"),
                PrinterColumn("Phase", "string", ".status.phase"),
                READY_TO_USE,
                CREATION_TIME,
                ERROR,
            ),
            spec=snapshot_spec(),
            status=snapshot_status(),
            validate=validate_snapshot,
        ),
        _kind(
            "VirtualMachineSnapshotContent",
            short="vmsnapshotcontent",
            columns=(READY_TO_USE, CREATION_TIME, ERROR),
            spec=content_spec(),
            status=content_status(),
        ),
        _kind(
            "VirtualMachineRestore",
            short="vmrestore",
            columns=(
                PrinterColumn("TargetKind", "string", ".spec.target.kind"),
                PrinterColumn("TargetName", "string", ".spec.target.name"),
                PrinterColumn("Complete", "boolean", ".status.complete"),
                PrinterColumn("RestoreTime", "date", ".status.restoreTime"),
            ),
            spec=restore_spec(),
            status=restore_status(),
            validate=validate_restore,
        ),
    ]
