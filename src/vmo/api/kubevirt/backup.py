"""backup.kubevirt.io/v1alpha1: VirtualMachineBackup and VirtualMachineBackupTracker.

Upstream enforces a few rules with CEL (spec immutability, source kinds); VMO checks them here.
"""

from __future__ import annotations

from vmo.api.kubevirt._builders import (
    JSON,
    any_object,
    arr,
    boolean,
    obj,
    resource_schema,
    string,
)
from vmo.api.kubevirt._common import (
    immutable_spec,
    meta_condition,
    reference_causes,
    typed_local_ref,
)
from vmo.api.types import Cause, PrinterColumn, ResourceType

GROUP = "backup.kubevirt.io"
VERSION = "v1alpha1"
SOURCE_KIND = PrinterColumn("SourceKind", "string", ".spec.source.kind")
SOURCE_NAME = PrinterColumn("SourceName", "string", ".spec.source.name")
BACKUP_SOURCES = {("kubevirt.io", "VirtualMachine"), (GROUP, "VirtualMachineBackupTracker")}


def validate_backup(new: JSON, old: JSON | None) -> list[Cause]:
    spec = new.get("spec") or {}
    causes = immutable_spec(new, old)
    causes += reference_causes(spec.get("source"), "spec.source", BACKUP_SOURCES)
    if not spec.get("pvcName"):
        causes.append(Cause("spec.pvcName", "pvcName is required", "FieldValueRequired"))
    if spec.get("mode") == "Pull" and not spec.get("tokenSecretRef"):
        causes.append(
            Cause("spec.tokenSecretRef", "required when mode is Pull", "FieldValueRequired")
        )
    return causes


def validate_tracker(new: JSON, old: JSON | None) -> list[Cause]:
    source = (new.get("spec") or {}).get("source") or {}
    causes = immutable_spec(new, old)
    if source.get("apiGroup") != "kubevirt.io":
        causes.append(Cause("spec.source.apiGroup", "apiGroup must be kubevirt.io"))
    if source.get("kind") != "VirtualMachine":
        causes.append(Cause("spec.source.kind", "kind must be VirtualMachine"))
    return causes


def backup_spec() -> JSON:
    return obj(
        {
            "source": typed_local_ref(),
            "mode": string(enum=("Push", "Pull")),
            "pvcName": string(),
            "forceFullBackup": boolean(),
            "skipQuiesce": boolean(),
            "tokenSecretRef": string(),
            "ttlDuration": string(),
        },
        required=("source",),
    )


def backup_status() -> JSON:
    return obj(
        {
            "type": string(),
            "checkpointName": string(),
            "conditions": arr(meta_condition()),
            "endpointCert": string(),
            "exportUID": string(),
            "includedVolumes": arr(any_object()),
        }
    )


def tracker_status() -> JSON:
    return obj(
        {
            "checkpointRedefinitionRequired": boolean(),
            "latestCheckpoint": obj(
                {"name": string(), "creationTime": string(), "volumes": arr(any_object())}
            ),
        }
    )


def backup_resource_types() -> list[ResourceType]:
    return [
        ResourceType(
            group=GROUP,
            version=VERSION,
            kind="VirtualMachineBackup",
            plural="virtualmachinebackups",
            singular="virtualmachinebackup",
            namespaced=True,
            short_names=("vmbackup", "vmbackups"),
            categories=("all",),
            subresources=("status",),
            printer_columns=(
                SOURCE_KIND,
                SOURCE_NAME,
                PrinterColumn("Type", "string", ".status.type"),
                PrinterColumn("CheckpointName", "string", ".status.checkpointName"),
            ),
            schema=resource_schema(backup_spec(), backup_status()),
            validate=validate_backup,
        ),
        ResourceType(
            group=GROUP,
            version=VERSION,
            kind="VirtualMachineBackupTracker",
            plural="virtualmachinebackuptrackers",
            singular="virtualmachinebackuptracker",
            namespaced=True,
            short_names=("vmbackuptracker", "vmbackuptrackers"),
            categories=("all",),
            subresources=("status",),
            printer_columns=(
                SOURCE_KIND,
                SOURCE_NAME,
                PrinterColumn("LatestCheckpoint", "string", ".status.latestCheckpoint.name"),
                PrinterColumn("CheckpointTime", "date", ".status.latestCheckpoint.creationTime"),
            ),
            schema=resource_schema(
                obj({"source": typed_local_ref()}, required=("source",)), tracker_status()
            ),
            validate=validate_tracker,
        ),
    ]
