"""clone.kubevirt.io/v1beta1 VirtualMachineClone and export.kubevirt.io/v1 VirtualMachineExport."""

from __future__ import annotations

from vmo.api.kubevirt._builders import (
    JSON,
    any_object,
    arr,
    obj,
    resource_schema,
    string,
    string_map,
    strings,
)
from vmo.api.kubevirt._common import kubevirt_condition, reference_causes, typed_local_ref
from vmo.api.kubevirt.validation import MAC_PATTERN
from vmo.api.types import Cause, PrinterColumn, ResourceType

CLONE_PHASES = (
    "SnapshotInProgress",
    "CreatingTargetVM",
    "RestoreInProgress",
    "Succeeded",
    "Failed",
    "Unknown",
)
EXPORT_PHASES = ("Pending", "Ready", "Terminated", "Skipped")
CLONE_SOURCES = {
    ("kubevirt.io", "VirtualMachine"),
    ("snapshot.kubevirt.io", "VirtualMachineSnapshot"),
}
CLONE_TARGETS = {("kubevirt.io", "VirtualMachine")}
EXPORT_SOURCES = {
    ("", "PersistentVolumeClaim"),
    ("kubevirt.io", "VirtualMachine"),
    ("snapshot.kubevirt.io", "VirtualMachineSnapshot"),
    ("backup.kubevirt.io", "VirtualMachineBackup"),
}
SOURCE_KIND = PrinterColumn("SourceKind", "string", ".spec.source.kind")
SOURCE_NAME = PrinterColumn("SourceName", "string", ".spec.source.name")


def validate_clone(new: JSON, old: JSON | None) -> list[Cause]:
    """Clone a VM or a VM snapshot into a VM; new MAC addresses must be MAC addresses."""
    spec = new.get("spec") or {}
    causes = reference_causes(spec.get("source"), "spec.source", CLONE_SOURCES)
    target = spec.get("target")
    if target is not None:
        causes += reference_causes(target, "spec.target", CLONE_TARGETS)
    for iface, mac in (spec.get("newMacAddresses") or {}).items():
        if not isinstance(mac, str) or not MAC_PATTERN.match(mac):
            causes.append(Cause(f"spec.newMacAddresses[{iface}]", f"{mac!r} is not a MAC address"))
    return causes


def validate_export(new: JSON, old: JSON | None) -> list[Cause]:
    source = (new.get("spec") or {}).get("source")
    return reference_causes(source, "spec.source", EXPORT_SOURCES)


def clone_spec() -> JSON:
    return obj(
        {
            "source": typed_local_ref(),
            "target": typed_local_ref(),
            "labelFilters": strings(),
            "annotationFilters": strings(),
            "template": obj({"labelFilters": strings(), "annotationFilters": strings()}),
            "newMacAddresses": string_map(),
            "newSMBiosSerial": string(),
            "patches": strings(),
            "volumeNamePolicy": string(enum=("RandomizeNames", "PrefixTargetName")),
        },
        required=("source",),
    )


def clone_status() -> JSON:
    return obj(
        {
            "phase": string(enum=CLONE_PHASES),
            "conditions": arr(kubevirt_condition()),
            "creationTime": string(),
            "snapshotName": string(),
            "restoreName": string(),
            "targetName": string(),
        }
    )


def virtual_machine_clone() -> ResourceType:
    return ResourceType(
        group="clone.kubevirt.io",
        version="v1beta1",
        kind="VirtualMachineClone",
        plural="virtualmachineclones",
        singular="virtualmachineclone",
        namespaced=True,
        short_names=("vmclone", "vmclones"),
        categories=("all",),
        subresources=("status",),
        printer_columns=(
            PrinterColumn("Phase", "string", ".status.phase"),
            PrinterColumn("SourceVirtualMachine", "string", ".spec.source.name"),
            PrinterColumn("TargetVirtualMachine", "string", ".spec.target.name"),
        ),
        schema=resource_schema(clone_spec(), clone_status()),
        validate=validate_clone,
    )


def export_spec() -> JSON:
    return obj(
        {"source": typed_local_ref(), "tokenSecretRef": string(), "ttlDuration": string()},
        required=("source",),
    )


def export_status() -> JSON:
    return obj(
        {
            "phase": string(enum=EXPORT_PHASES),
            "conditions": arr(kubevirt_condition()),
            # internal/external links: cert, volumes[{name, formats[{format, url}]}], manifests
            "links": any_object(),
            "serviceName": string(),
            "tokenSecretRef": string(),
            "ttlExpirationTime": string(),
            "virtualMachineName": string(),
        }
    )


def virtual_machine_export() -> ResourceType:
    return ResourceType(
        group="export.kubevirt.io",
        version="v1",
        kind="VirtualMachineExport",
        plural="virtualmachineexports",
        singular="virtualmachineexport",
        namespaced=True,
        short_names=("vmexport", "vmexports"),
        categories=("all",),
        subresources=("status",),
        printer_columns=(
            SOURCE_KIND,
            SOURCE_NAME,
            PrinterColumn("Phase", "string", ".status.phase"),
        ),
        schema=resource_schema(export_spec(), export_status()),
        validate=validate_export,
    )


def clone_and_export_resource_types() -> list[ResourceType]:
    return [virtual_machine_clone(), virtual_machine_export()]
