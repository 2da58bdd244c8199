"""kubevirt.io/v1: VirtualMachine, VirtualMachineInstance, migrations, replica sets, KubeVirt."""

from __future__ import annotations

from vmo.api.kubevirt import _vmi_spec
from vmo.api.kubevirt._builders import (
    JSON,
    any_object,
    arr,
    boolean,
    integer,
    obj,
    quantity,
    resource_schema,
    string,
    string_map,
    strings,
    unsupported,
)
from vmo.api.kubevirt._common import label_selector
from vmo.api.kubevirt._status import (
    RUN_STRATEGIES,
    vm_status,
    vmi_status,
    vmim_status,
)
from vmo.api.kubevirt.cdi import datavolume_spec
from vmo.api.kubevirt.defaults import default_vm, default_vmi
from vmo.api.kubevirt.validation import validate_vm, validate_vmi, validate_vmim, vm_warnings
from vmo.api.types import PrinterColumn, ResourceType

START_PAUSED = _vmi_spec.START_PAUSED
GROUP = "kubevirt.io"
VERSION = "v1"
AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp")
PHASE = PrinterColumn("Phase", "string", ".status.phase")
READY = PrinterColumn("Ready", "string", ".status.conditions[?(@.type=='Ready')].status")


def instancetype_matcher() -> JSON:
    """``spec.instancetype`` / ``spec.preference``; kind defaults to the cluster-wide kind."""
    no_inference = "inferring instancetypes and preferences from volume labels is not implemented"
    return obj(
        {
            "name": string(),
            "kind": string(),
            "revisionName": string(),
            "inferFromVolume": unsupported(no_inference),
            "inferFromVolumeFailurePolicy": unsupported(no_inference),
        }
    )


def datavolume_template() -> JSON:
    return obj(
        {
            "apiVersion": string(),
            "kind": string(),
            "metadata": _vmi_spec.template_metadata(),
            "spec": datavolume_spec(in_vm_template=True),
        },
        required=("spec",),
    )


def vm_spec() -> JSON:
    template = obj(
        {"metadata": _vmi_spec.template_metadata(), "spec": _vmi_spec.vmi_spec()},
        required=("spec",),
    )
    return obj(
        {
            "runStrategy": string(enum=RUN_STRATEGIES),
            "running": boolean(),
            "template": template,
            "instancetype": instancetype_matcher(),
            "preference": instancetype_matcher(),
            "dataVolumeTemplates": arr(datavolume_template()),
            "updateVolumesStrategy": unsupported(
                "volume migration strategies are not supported by VMO's embedded engine"
            ),
        },
        required=("template",),
    )


def vmim_spec() -> JSON:
    return obj(
        {
            "vmiName": string(),
            "addedNodeSelector": string_map(),
            "priority": string(enum=("system-critical", "user-triggered", "system-maintenance")),
            "sendTo": unsupported("decentralized cross-cluster migration is not supported by VMO"),
            "receive": unsupported("decentralized cross-cluster migration is not supported by VMO"),
        }
    )


def virtual_machine() -> ResourceType:
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="VirtualMachine",
        plural="virtualmachines",
        singular="virtualmachine",
        namespaced=True,
        short_names=("vm", "vms"),
        categories=("all",),
        subresources=("status",),
        printer_columns=(
            AGE,
            PrinterColumn(
                "Status", "string", ".status.printableStatus", description="Human Readable Status"
            ),
            READY,
        ),
        schema=resource_schema(vm_spec(), vm_status()),
        validate=validate_vm,
        warn=vm_warnings,
        default=default_vm,
    )


def virtual_machine_instance() -> ResourceType:
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="VirtualMachineInstance",
        plural="virtualmachineinstances",
        singular="virtualmachineinstance",
        namespaced=True,
        short_names=("vmi", "vmis"),
        categories=("all",),
        # upstream's VMI CRD has no status subresource: virt-handler writes the whole object
        subresources=(),
        printer_columns=(
            AGE,
            PHASE,
            PrinterColumn("IP", "string", ".status.interfaces[0].ipAddress"),
            PrinterColumn("NodeName", "string", ".status.nodeName"),
            READY,
            PrinterColumn(
                "Live-Migratable",
                "string",
                ".status.conditions[?(@.type=='LiveMigratable')].status",
                priority=1,
            ),
            PrinterColumn(
                "Paused", "string", ".status.conditions[?(@.type=='Paused')].status", priority=1
            ),
        ),
        schema=resource_schema(_vmi_spec.vmi_spec(), vmi_status()),
        validate=validate_vmi,
        default=default_vmi,
    )


def virtual_machine_instance_migration() -> ResourceType:
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="VirtualMachineInstanceMigration",
        plural="virtualmachineinstancemigrations",
        singular="virtualmachineinstancemigration",
        namespaced=True,
        short_names=("vmim", "vmims"),
        categories=("all",),
        subresources=("status",),
        printer_columns=(
            PrinterColumn(
                "Phase",
                "string",
                ".status.phase",
                description="The current phase of VM instance migration",
            ),
            PrinterColumn(
                "VMI",
                "string",
                ".spec.vmiName",
                description="The name of the VMI to perform the migration on",
            ),
        ),
        schema=resource_schema(vmim_spec(), vmim_status()),
        validate=validate_vmim,
    )


def virtual_machine_instance_replica_set() -> ResourceType:
    spec = obj(
        {
            "replicas": integer(),
            "selector": label_selector(),
            "paused": boolean(),
            "template": obj(
                {"metadata": _vmi_spec.template_metadata(), "spec": _vmi_spec.vmi_spec()}
            ),
        },
        required=("selector", "template"),
    )
    status = obj(
        {
            "replicas": integer(),
            "readyReplicas": integer(),
            "labelSelector": string(),
            "conditions": arr(obj(preserve=True)),
        }
    )
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="VirtualMachineInstanceReplicaSet",
        plural="virtualmachineinstancereplicasets",
        singular="virtualmachineinstancereplicaset",
        namespaced=True,
        short_names=("vmirs", "vmirss"),
        categories=("all",),
        subresources=("status", "scale"),
        printer_columns=(
            PrinterColumn(
                "Desired",
                "integer",
                ".spec.replicas",
                description="Number of desired VirtualMachineInstances",
            ),
            PrinterColumn(
                "Current",
                "integer",
                ".status.replicas",
                description="Number of managed and not final or deleted VirtualMachineInstances",
            ),
            PrinterColumn(
                "Ready",
                "integer",
                ".status.readyReplicas",
                description=(
                    "Number of managed VirtualMachineInstances which are ready to receive traffic"
                ),
            ),
            AGE,
        ),
        schema=resource_schema(spec, status),
    )


def virtual_machine_instance_preset() -> ResourceType:
    spec = obj({"selector": label_selector(), "domain": _vmi_spec.domain()}, required=("selector",))
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="VirtualMachineInstancePreset",
        plural="virtualmachineinstancepresets",
        singular="virtualmachineinstancepreset",
        namespaced=True,
        short_names=("vmipreset", "vmipresets"),
        categories=("all",),
        schema=resource_schema(spec, None, spec_required=False),
    )


def kubevirt_spec() -> JSON:
    """The KubeVirt CR: VMO reads cluster configuration from it; install fields are VMO's own."""
    install = "VMO installs itself; KubeVirt operator deployment settings do not apply"
    install_fields = (
        "certificateRotateStrategy",
        "customizeComponents",
        "imagePullPolicy",
        "imagePullSecrets",
        "imageRegistry",
        "imageTag",
        "infra",
        "monitorAccount",
        "monitorNamespace",
        "productComponent",
        "productName",
        "productVersion",
        "serviceMonitorNamespace",
        "synchronizationPort",
        "workloads",
    )
    properties: dict[str, JSON] = {name: unsupported(install) for name in install_fields}
    properties["configuration"] = kubevirt_configuration()
    properties["uninstallStrategy"] = string()
    properties["workloadUpdateStrategy"] = any_object()
    return obj(properties)


def kubevirt_configuration() -> JSON:
    migrations = obj(
        {
            "parallelMigrationsPerCluster": integer(),
            "parallelOutboundMigrationsPerNode": integer(),
            "bandwidthPerMigration": quantity(),
            "completionTimeoutPerGiB": integer(),
            "progressTimeout": integer(),
            "maxDowntimeMs": integer(),
            "allowAutoConverge": boolean(),
            "allowPostCopy": boolean(),
            "allowWorkloadDisruption": boolean(),
            "unsafeMigrationOverride": boolean(),
            "disableTLS": boolean(),
            "network": string(),
            "nodeDrainTaintKey": string(),
            "matchSELinuxLevelOnMigration": boolean(),
            "utilityVolumesTimeout": integer(),
        },
        preserve=True,
    )
    return obj(
        {
            "migrations": migrations,
            "developerConfiguration": obj(
                {"featureGates": strings(), "disabledFeatureGates": strings()}, preserve=True
            ),
            "evictionStrategy": string(enum=_vmi_spec.EVICTION_STRATEGIES),
            "machineType": string(),
            "cpuModel": string(),
            "cpuRequest": quantity(),
            "network": any_object(),
            "vmRolloutStrategy": string(enum=("Stage", "LiveUpdate")),
            "roleAggregationStrategy": string(enum=("AggregateToDefault", "Manual")),
            "vmStateStorageClass": string(),
            "liveUpdateConfiguration": any_object(),
            "architectureConfiguration": any_object(),
        },
        preserve=True,
    )


def kubevirt() -> ResourceType:
    status = obj(
        {
            "phase": string(),
            "conditions": arr(obj(preserve=True)),
            "observedGeneration": integer(),
            "observedKubeVirtVersion": string(),
            "targetKubeVirtVersion": string(),
            "operatorVersion": string(),
            "defaultArchitecture": string(),
            "generations": arr(any_object()),
        },
        preserve=True,
    )
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind="KubeVirt",
        plural="kubevirts",
        singular="kubevirt",
        namespaced=True,  # upstream's KubeVirt CR is namespaced (one per install namespace)
        short_names=("kv", "kvs"),
        categories=("all",),
        subresources=("status",),
        printer_columns=(AGE, PHASE),
        schema=resource_schema(kubevirt_spec(), status, spec_required=True),
    )


def core_resource_types() -> list[ResourceType]:
    return [
        virtual_machine(),
        virtual_machine_instance(),
        virtual_machine_instance_migration(),
        virtual_machine_instance_replica_set(),
        virtual_machine_instance_preset(),
        kubevirt(),
    ]
