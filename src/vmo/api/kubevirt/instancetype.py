"""instancetype.kubevirt.io/v1beta1: instance types and preferences, namespaced and cluster-wide.

An instancetype's ``cpu.guest`` and ``memory.guest`` become every VM's that selects it, so they are
held to a VM's bounds when the instancetype is written: 1 to 288 vCPUs (QEMU's q35 maximum,
``_bounds.Q35_MAX_VCPUS``) and at least VMO's 64Mi of guest memory.
"""

from __future__ import annotations

from vmo.api.kubevirt._bounds import (
    MIN_GUEST_MEMORY,
    MIN_GUEST_MEMORY_TEXT,
    Q35_MAX_VCPUS,
    size_value,
)
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
    int32,
)
from vmo.api.types import Cause, ResourceType, Validator

GROUP = "instancetype.kubevirt.io"
VERSION = "v1beta1"


def instancetype_spec() -> JSON:
    cpu = obj(
        {
            "guest": int32(),
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


def validate_instancetype(new: JSON, old: JSON | None) -> list[Cause]:
    """The guest's vCPUs and memory within what a VM may have."""
    spec = _object(new.get("spec"))
    causes: list[Cause] = []
    vcpus = _object(spec.get("cpu")).get("guest")
    if isinstance(vcpus, int) and not 1 <= vcpus <= Q35_MAX_VCPUS:
        message = f"{vcpus} vCPUs is not in 1-{Q35_MAX_VCPUS}, the vCPUs QEMU's q35 machine takes"
        causes.append(Cause("spec.cpu.guest", message))
    guest = size_value(_object(spec.get("memory")).get("guest"))
    if guest is not None and guest < MIN_GUEST_MEMORY:
        message = f"guest memory must be at least {MIN_GUEST_MEMORY_TEXT}"
        causes.append(Cause("spec.memory.guest", message))
    return causes


def _object(value: object) -> JSON:
    return value if isinstance(value, dict) else {}


def _kind(
    kind: str,
    plural: str,
    *,
    namespaced: bool,
    short_names: tuple[str, ...],
    spec: JSON,
    spec_required: bool,
    validate: Validator | None = None,
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
        validate=validate,
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
            validate=validate_instancetype,
        ),
        _kind(
            "VirtualMachineClusterInstancetype",
            "virtualmachineclusterinstancetypes",
            namespaced=False,
            short_names=("vmclusterinstancetype", "vmclusterinstancetypes", "vmcf", "vmcfs"),
            spec=instancetype_spec(),
            spec_required=True,
            validate=validate_instancetype,
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
