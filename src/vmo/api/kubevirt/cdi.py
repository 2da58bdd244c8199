"""cdi.kubevirt.io/v1beta1: DataVolume and DataSource, the disk images VMs boot from.

Admission keeps CDI's rule on a DataVolume's requested size (more than zero, at least 1MiB) and
adds VMO's ceiling of 64Ti (``_bounds.MAX_DISK_SIZE``: CDI has none), in a DataVolume and in a
VM's ``dataVolumeTemplates`` alike.
"""

from __future__ import annotations

from vmo.api.kubevirt._bounds import disk_size_causes
from vmo.api.kubevirt._builders import (
    JSON,
    arr,
    boolean,
    empty,
    integer,
    obj,
    quantity_map,
    resource_schema,
    string,
    strings,
    unsupported,
    unsupported_fields,
)
from vmo.api.kubevirt._common import cdi_condition
from vmo.api.types import Cause, PrinterColumn, ResourceType

GROUP = "cdi.kubevirt.io"
VERSION = "v1beta1"
NO_SOURCE = "this import source is not available in VMO's embedded storage; use an import plan"
NO_PV_BINDING = "binding claims to chosen volumes is not supported by VMO's embedded storage"
ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")

DATAVOLUME_PHASES = (
    "Pending",
    "PVCBound",
    "ImportScheduled",
    "ImportInProgress",
    "CloneScheduled",
    "CloneInProgress",
    "SnapshotForSmartCloneInProgress",
    "CloneFromSnapshotSourceInProgress",
    "SmartClonePVCInProgress",
    "CSICloneInProgress",
    "ExpansionInProgress",
    "NamespaceTransferInProgress",
    "PrepClaimInProgress",
    "RebindInProgress",
    "Succeeded",
    "Failed",
    "Unknown",
    "UploadScheduled",
    "UploadReady",
    "WaitForFirstConsumer",
    "PendingPopulation",
    "Paused",
    "ImportPaused",
)


def claim_spec(*, with_attributes_class: bool) -> JSON:
    """The ``storage``/``pvc`` request: size, class, access and volume mode."""
    properties: dict[str, JSON] = {
        "accessModes": arr(string(enum=ACCESS_MODES)),
        "resources": obj({"requests": quantity_map(), "limits": quantity_map()}),
        "storageClassName": string(),
        "volumeMode": string(enum=("Filesystem", "Block")),
        **unsupported_fields(
            NO_PV_BINDING, "volumeName", "selector", "dataSource", "dataSourceRef"
        ),
    }
    if with_attributes_class:
        properties["volumeAttributesClassName"] = unsupported(
            "volume attributes classes are not supported by VMO's embedded storage"
        )
    return obj(properties)


def namespaced_name() -> JSON:
    return obj({"name": string(), "namespace": string()}, required=("name", "namespace"))


def http_source(*, in_vm_template: bool) -> JSON:
    properties: dict[str, JSON] = {
        "url": string(),
        "secretRef": string(),
        "certConfigMap": string(),
        "extraHeaders": strings(),
        "secretExtraHeaders": strings(),
    }
    if not in_vm_template:
        # newer CDI fields that KubeVirt v1.9's copy of the DataVolume spec does not have yet
        properties["checksum"] = string()
        properties["insecureSkipVerify"] = boolean()
    return obj(properties, required=("url",))


def datavolume_source(*, in_vm_template: bool) -> JSON:
    return obj(
        {
            "http": http_source(in_vm_template=in_vm_template),
            "registry": obj(
                {
                    "url": string(),
                    "secretRef": string(),
                    "certConfigMap": string(),
                    "pullMethod": string(enum=("pod", "node")),
                    "imageStream": unsupported("OpenShift image streams are not available"),
                    "platform": obj({"architecture": string()}),
                }
            ),
            "pvc": namespaced_name(),
            "snapshot": namespaced_name(),
            "upload": empty(),
            "blank": empty(),
            **unsupported_fields(NO_SOURCE, "imageio", "vddk", "s3", "gcs"),
        }
    )


def datavolume_spec(*, in_vm_template: bool) -> JSON:
    """A DataVolume spec; a VM's dataVolumeTemplates carry the same minus serviceAccountName."""
    properties: dict[str, JSON] = {
        "source": datavolume_source(in_vm_template=in_vm_template),
        "sourceRef": obj(
            {"kind": string(enum=("DataSource",)), "name": string(), "namespace": string()},
            required=("kind", "name"),
        ),
        "storage": claim_spec(with_attributes_class=False),
        "pvc": claim_spec(with_attributes_class=True),
        "contentType": string(enum=("kubevirt",)),
        "preallocation": boolean(),
        "priorityClassName": unsupported("VMO imports run no importer pods"),
        **unsupported_fields(
            "warm (multi-stage) imports are not supported by VMO's embedded storage",
            "checkpoints",
            "finalCheckpoint",
        ),
    }
    if not in_vm_template:
        properties["serviceAccountName"] = unsupported("VMO imports run no importer pods")
    return obj(properties)


def datavolume_spec_causes(spec: object, path: str) -> list[Cause]:
    """Semantic checks of a DataVolume spec found at ``path`` (``spec``, or a VM's template)."""
    if not isinstance(spec, dict):
        return []
    causes: list[Cause] = []
    for key, name in (("storage", "Storage"), ("pvc", "PVC")):
        claim = spec.get(key)
        resources = claim.get("resources") if isinstance(claim, dict) else None
        requests = resources.get("requests") if isinstance(resources, dict) else None
        if isinstance(requests, dict) and "storage" in requests:
            field = f"{path}.{key}.resources.requests.storage"
            causes += disk_size_causes(requests["storage"], field, name=name)
    return causes


def validate_datavolume(new: JSON, old: JSON | None) -> list[Cause]:
    return datavolume_spec_causes(new.get("spec"), "spec")


def datavolume_status() -> JSON:
    return obj(
        {
            "phase": string(enum=DATAVOLUME_PHASES),
            "progress": string(),
            "claimName": string(),
            "restartCount": integer(),
            "conditions": arr(cdi_condition()),
        }
    )


def data_volume() -> ResourceType:
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="DataVolume",
        plural="datavolumes",
        singular="datavolume",
        namespaced=True,
        short_names=("dv", "dvs"),
        categories=("all",),
        subresources=("status",),
        printer_columns=(
            PrinterColumn(
                "Phase", "string", ".status.phase", description="The phase the data volume is in"
            ),
            PrinterColumn(
                "Progress",
                "string",
                ".status.progress",
                description="Transfer progress in percentage if known, N/A otherwise",
            ),
            PrinterColumn(
                "Restarts",
                "integer",
                ".status.restartCount",
                description="The number of times the transfer has been restarted.",
            ),
            PrinterColumn("Age", "date", ".metadata.creationTimestamp"),
        ),
        schema=resource_schema(datavolume_spec(in_vm_template=False), datavolume_status()),
        validate=validate_datavolume,
    )


def data_source() -> ResourceType:
    source = obj(
        {"pvc": namespaced_name(), "snapshot": namespaced_name(), "dataSource": namespaced_name()}
    )
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="DataSource",
        plural="datasources",
        singular="datasource",
        namespaced=True,
        short_names=("das",),
        categories=("all",),
        schema=resource_schema(
            obj({"source": source}, required=("source",)),
            obj({"conditions": arr(cdi_condition()), "source": source}),
        ),
    )


def cdi_resource_types() -> list[ResourceType]:
    return [data_volume(), data_source()]
