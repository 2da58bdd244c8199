"""instancetype.kubevirt.io/v1beta1: instance types and preferences, namespaced and cluster-wide."""

from __future__ import annotations

from vmo.api.kubevirt._builders import (
    JSON,
    any_object,
    integer,
    obj,
    quantity,
    resource_schema,
    string,
    string_map,
    unsupported,
    unsupported_fields,
)
from vmo.api.kubevirt._vmi_spec import (
    NO_CONFIDENTIAL,
    NO_DISK_TUNING,
    NO_HOTPLUG,
    NO_HUGEPAGES,
    NO_PASSTHROUGH,
    NO_PINNING,
    NO_POD,
)
from vmo.api.types import ResourceType

GROUP = "instancetype.kubevirt.io"
VERSION = "v1beta1"


def instancetype_spec() -> JSON:
    cpu = obj(
        {
            "guest": integer(),
            "model": string(),
            "maxSockets": unsupported(NO_HOTPLUG),
            **unsupported_fields(
                NO_PINNING, "dedicatedCPUPlacement", "isolateEmulatorThread", "numa", "realtime"
            ),
        },
        required=("guest",),
    )
    memory = obj(
        {
            "guest": quantity(),
            "maxGuest": unsupported(NO_HOTPLUG),
            "hugepages": unsupported(NO_HUGEPAGES),
            "overcommitPercent": unsupported("memory overcommit is not applied by VMO's engine"),
        },
        required=("guest",),
    )
    return obj(
        {
            "cpu": cpu,
            "memory": memory,
            "annotations": string_map(),
            "nodeSelector": string_map(),
            "schedulerName": unsupported(NO_POD),
            **unsupported_fields(NO_PASSTHROUGH, "gpus", "hostDevices"),
            **unsupported_fields(NO_DISK_TUNING, "ioThreads", "ioThreadsPolicy"),
            "launchSecurity": unsupported(NO_CONFIDENTIAL),
        },
        required=("cpu", "memory"),
    )


def preference_spec() -> JSON:
    """Preferences are hints; their device and feature sections are kept as written."""
    requirements = obj(
        {
            "architecture": string(),
            "cpu": obj({"guest": integer()}, required=("guest",)),
            "memory": obj({"guest": quantity()}, required=("guest",)),
        }
    )
    return obj(
        {
            "annotations": string_map(),
            "clock": any_object(),
            "cpu": any_object(),
            "devices": any_object(),
            "features": any_object(),
            "firmware": any_object(),
            "machine": obj({"preferredMachineType": string()}),
            "preferSpreadSocketToCoreRatio": integer(),
            "preferredArchitecture": string(),
            "preferredSubdomain": string(),
            "preferredTerminationGracePeriodSeconds": integer(),
            "requirements": requirements,
            "volumes": obj({"preferredStorageClassName": string()}),
            "preferredLaunchSecurity": unsupported(NO_CONFIDENTIAL),
        }
    )


def _kind(
    kind: str,
    plural: str,
    *,
    namespaced: bool,
    short_names: tuple[str, ...],
    spec: JSON,
    spec_required: bool,
) -> ResourceType:
    return ResourceType(
        group=GROUP,
        version=VERSION,
        kind=kind,
        plural=plural,
        singular=plural[:-1],
        namespaced=namespaced,
        short_names=short_names,
        categories=("all",) if namespaced else (),
        schema=resource_schema(spec, None, spec_required=spec_required),
    )


def instancetype_resource_types() -> list[ResourceType]:
    return [
        _kind(
            "VirtualMachineInstancetype",
            "virtualmachineinstancetypes",
            namespaced=True,
            short_names=("vminstancetype", "vminstancetypes", "vmf", "vmfs"),
            spec=instancetype_spec(),
            spec_required=True,
        ),
        _kind(
            "VirtualMachineClusterInstancetype",
            "virtualmachineclusterinstancetypes",
            namespaced=False,
            short_names=("vmclusterinstancetype", "vmclusterinstancetypes", "vmcf", "vmcfs"),
            spec=instancetype_spec(),
            spec_required=True,
        ),
        _kind(
            "VirtualMachinePreference",
            "virtualmachinepreferences",
            namespaced=True,
            short_names=("vmpref", "vmprefs", "vmp", "vmps"),
            spec=preference_spec(),
            spec_required=True,
        ),
        _kind(
            "VirtualMachineClusterPreference",
            "virtualmachineclusterpreferences",
            namespaced=False,
            short_names=("vmcp", "vmcps"),
            spec=preference_spec(),
            spec_required=True,
        ),
    ]
