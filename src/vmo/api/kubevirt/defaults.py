"""What KubeVirt's mutating webhook (and, for the firmware UUID, its VM controller) fills in.

VMO applies these at admission so that stored objects look as they would on a KubeVirt cluster
configured with the defaults: amd64, machine type q35, CPU model host-model, no memory overcommit,
cluster default interface binding "bridge" on the pod network.
"""

from __future__ import annotations

import math
import uuid

from vmo.api.quantity import QuantityError, parse_quantity
from vmo.api.types import JSON

DEFAULT_ARCHITECTURE = "amd64"
DEFAULT_MACHINE_TYPE = "q35"
DEFAULT_CPU_MODEL = "host-model"
# amd64 default for disk/cdrom buses when none is given (q35 has no IDE; SATA boots every guest)
DEFAULT_DISK_BUS = "sata"
# KubeVirt's DefaultNetworkInterface cluster setting; the reason VMs should declare masquerade
DEFAULT_POD_BINDING = "bridge"
DEFAULT_NETWORK_NAME = "default"
CLUSTER_INSTANCETYPE_KIND = "virtualmachineclusterinstancetype"
CLUSTER_PREFERENCE_KIND = "virtualmachineclusterpreference"
# The namespace KubeVirt derives a VM's stable firmware UUID from (UUID v5 of the VM name).
FIRMWARE_UUID_NAMESPACE = uuid.UUID("6a1a24a1-4061-4607-8bf4-a3963d0c5895")


def firmware_uuid(name: str) -> str:
    """The stable firmware UUID KubeVirt assigns a VM that does not set one."""
    return str(uuid.uuid5(FIRMWARE_UUID_NAMESPACE, name))


def _child(parent: JSON, key: str) -> JSON:
    """``parent[key]``, created empty when absent or null.

    A value of the wrong type is left for the schema to report; defaults then go to a detached
    object, so that they never mask the user's mistake.
    """
    value = parent.get(key)
    if value is None:
        value = parent[key] = {}
    return value if isinstance(value, dict) else {}


def _peek(parent: JSON, key: str) -> JSON:
    """``parent[key]`` if it is an object, else an empty one; nothing is created."""
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _items(value: object) -> list[JSON]:
    """The object items of a list; anything else is the schema's to report."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def default_vm(vm: JSON) -> None:
    """Defaults of a VirtualMachine: instancetype/preference kinds, architecture, machine type."""
    spec = _child(vm, "spec")
    for key, kind in (
        ("instancetype", CLUSTER_INSTANCETYPE_KIND),
        ("preference", CLUSTER_PREFERENCE_KIND),
    ):
        matcher = spec.get(key)
        if isinstance(matcher, dict) and not matcher.get("kind"):
            matcher["kind"] = kind
    template = spec.get("template")
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        return  # the validator refuses a VM without a template
    vmi_spec: JSON = template["spec"]
    vmi_spec.setdefault("architecture", DEFAULT_ARCHITECTURE)
    domain = _child(vmi_spec, "domain")
    machine = _child(domain, "machine")
    if not machine.get("type"):
        machine["type"] = DEFAULT_MACHINE_TYPE
    name = vm.get("metadata", {}).get("name")
    firmware = _child(domain, "firmware")
    if name and not firmware.get("uuid"):
        firmware["uuid"] = firmware_uuid(name)


def default_vmi(vmi: JSON) -> None:
    """Defaults of a VirtualMachineInstance, in the order KubeVirt's webhook applies them."""
    spec = _child(vmi, "spec")
    default_vmi_spec(spec)
    domain = _child(spec, "domain")
    firmware = _child(domain, "firmware")
    name = vmi.get("metadata", {}).get("name")
    if name and not firmware.get("uuid"):
        # KubeVirt draws a random UUID for a bare VMI; a name-derived one is as unique and stable
        firmware["uuid"] = firmware_uuid(name)
    _child(domain, "features")
    _default_status(vmi, domain)


def default_vmi_spec(spec: JSON) -> None:
    """Spec defaults shared by every VMI, whether created directly or from a VM."""
    spec.setdefault("architecture", DEFAULT_ARCHITECTURE)
    domain = _child(spec, "domain")
    machine = _child(domain, "machine")
    if not machine.get("type"):
        machine["type"] = DEFAULT_MACHINE_TYPE
    _default_memory(domain)
    _default_cpu(domain)
    _default_pull_policies(spec)
    _default_network_interface(spec)
    _default_volume_disks(spec)
    _default_disk_devices(domain)


def _default_memory(domain: JSON) -> None:
    resources = _child(domain, "resources")
    requests = _child(resources, "requests")
    limits = _child(resources, "limits")
    for resource in ("cpu", "memory"):
        if resource in limits and resource not in requests:
            requests[resource] = limits[resource]
    memory = _child(domain, "memory")
    guest = memory.get("guest")
    if guest is None:
        guest = requests.get("memory") or limits.get("memory")
        if guest is not None:
            memory["guest"] = guest
    if guest is not None and "memory" not in requests:
        requests["memory"] = guest  # memory overcommit 100%: request what the guest sees
    for key, value in (("requests", requests), ("limits", limits)):
        if not value and resources.get(key) == {}:
            del resources[key]
    if not resources and domain.get("resources") == {}:
        del domain["resources"]
    if not memory and domain.get("memory") == {}:
        del domain["memory"]


def _default_cpu(domain: JSON) -> None:
    cpu = _child(domain, "cpu")
    if not any(cpu.get(axis) for axis in ("sockets", "cores", "threads")):
        # no topology: as many sockets as whole CPUs requested, which guests schedule best
        resources = _peek(domain, "resources")
        limits, requests = _peek(resources, "limits"), _peek(resources, "requests")
        vcpus = limits.get("cpu") or requests.get("cpu")
        cpu["sockets"] = max(1, _whole_cpus(vcpus))
        cpu["cores"] = 1
        cpu["threads"] = 1
    if not cpu.get("model"):
        cpu["model"] = DEFAULT_CPU_MODEL


def _whole_cpus(value: object) -> int:
    """A CPU quantity rounded up to whole CPUs (``2``, ``"2"``, ``"1500m"`` -> 2); 0 if unknown.

    Defaults run before validation, so ``value`` may be anything: what is not a quantity in
    range (``"1e400"``) counts as unknown, and validation then refuses it by name.
    """
    if not isinstance(value, str | int):
        return 0
    try:
        return math.ceil(parse_quantity(value))
    except QuantityError:
        return 0


def _default_pull_policies(spec: JSON) -> None:
    for volume in _items(spec.get("volumes")):
        disk = volume.get("containerDisk")
        if not isinstance(disk, dict) or disk.get("imagePullPolicy"):
            continue
        image = str(disk.get("image", ""))
        untagged = not any(mark in image.rsplit("/", 1)[-1] for mark in ":@")
        always = image.endswith(":latest") or untagged
        disk["imagePullPolicy"] = "Always" if always else "IfNotPresent"


def _default_network_interface(spec: JSON) -> None:
    devices = _child(_child(spec, "domain"), "devices")
    if devices.get("autoattachPodInterface") is False:
        return
    if devices.get("interfaces") or spec.get("networks"):
        return
    devices["interfaces"] = [{"name": DEFAULT_NETWORK_NAME, DEFAULT_POD_BINDING: {}}]
    spec["networks"] = [{"name": DEFAULT_NETWORK_NAME, "pod": {}}]


def _default_volume_disks(spec: JSON) -> None:
    """Every volume without a disk gets one of the same name."""
    devices = _child(_child(spec, "domain"), "devices")
    disks = devices.get("disks") or []
    if not isinstance(disks, list):
        return
    named = {disk.get("name") for disk in _items(disks)}
    volume_names = [v.get("name") for v in _items(spec.get("volumes"))]
    missing = [name for name in volume_names if isinstance(name, str) and name not in named]
    if missing:
        devices["disks"] = [*disks, *({"name": name} for name in missing)]


def _default_disk_devices(domain: JSON) -> None:
    for disk in _items(_child(domain, "devices").get("disks")):
        if not any(kind in disk for kind in ("disk", "cdrom", "lun")):
            disk["disk"] = {}
        if isinstance(disk.get("disk"), dict):
            disk["disk"].setdefault("bus", DEFAULT_DISK_BUS)
        cdrom = disk.get("cdrom")
        if isinstance(cdrom, dict):
            cdrom.setdefault("bus", DEFAULT_DISK_BUS)
            cdrom.setdefault("readonly", True)
            cdrom.setdefault("tray", "closed")


def _default_status(vmi: JSON, domain: JSON) -> None:
    """Status fields KubeVirt's webhook records at creation: guest memory and CPU topology."""
    status = _child(vmi, "status")
    guest = _peek(domain, "memory").get("guest")
    if guest is not None and "memory" not in status:
        status["memory"] = {"guestAtBoot": guest, "guestCurrent": guest, "guestRequested": guest}
    cpu = _child(domain, "cpu")
    if "currentCPUTopology" not in status:
        status["currentCPUTopology"] = {
            axis: cpu[axis] for axis in ("sockets", "cores", "threads") if axis in cpu
        }
