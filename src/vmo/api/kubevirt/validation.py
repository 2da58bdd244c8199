"""Semantic admission checks for VMs, VMIs and migrations, in the spirit of KubeVirt's virt-api.

Structural checks (types, unknown fields, list lengths, quantities in range) belong to the schema;
these catch what a schema cannot: names that must match or be unique, mutually exclusive choices,
value ranges and immutability. The bounds on sizes and counts, and where each comes from, are in
``_bounds``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Iterator
from decimal import Decimal

from vmo.api.kubevirt._bounds import (
    CLOUD_INIT_MAX_LEN,
    MIN_GUEST_MEMORY,
    MIN_GUEST_MEMORY_TEXT,
    disk_size_causes,
    max_vcpus,
    size_value,
)
from vmo.api.kubevirt.cdi import datavolume_spec_causes
from vmo.api.types import JSON, Cause

INVALID = "FieldValueInvalid"
REQUIRED = "FieldValueRequired"
DUPLICATE = "FieldValueDuplicate"
NOT_FOUND = "FieldValueNotFound"
FORBIDDEN = "FieldValueForbidden"

DISK_TYPES = ("disk", "cdrom", "lun")
BINDINGS = ("masquerade", "bridge", "sriov", "passt", "passtBinding", "slirp", "macvtap", "binding")
VOLUME_SOURCES = (
    "containerDisk",
    "dataVolume",
    "persistentVolumeClaim",
    "cloudInitNoCloud",
    "cloudInitConfigDrive",
    "emptyDisk",
    "secret",
    "configMap",
    "hostDisk",
    "ephemeral",
    "containerPath",
    "serviceAccount",
    "downwardAPI",
    "downwardMetrics",
    "sysprep",
    "memoryDump",
)
USER_DATA = ("userData", "userDataBase64", "secretRef")
NETWORK_DATA = ("networkData", "networkDataBase64", "networkDataSecretRef")
MAC_PATTERN = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
RUNNING_DEPRECATED = "spec.running is deprecated; use spec.runStrategy instead"
CPU_AXES = ("sockets", "cores", "threads")
# upstream's wording for a negative resource quantity
MUST_BE_POSITIVE = "{field} '{value}': must be greater than or equal to 0."


def quantity_value(value: object) -> Decimal | None:
    """A quantity's exact value, or None when ``value`` is not a quantity (in range)."""
    return size_value(value)


def _obj(value: object) -> JSON:
    """``value`` if it is an object, else an empty one: the schema reports wrong types."""
    return value if isinstance(value, dict) else {}


def _items(value: object) -> list[JSON]:
    """The object items of a list; anything else is the schema's to report."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def vm_warnings(vm: JSON) -> list[str]:
    """Admission warnings for a VirtualMachine (accepted, but worth telling the user)."""
    spec = _obj(vm.get("spec"))
    return [RUNNING_DEPRECATED] if "running" in spec else []


def validate_vm(new: JSON, old: JSON | None) -> list[Cause]:
    """Semantic checks of a VirtualMachine (create and update alike)."""
    spec = _obj(new.get("spec"))
    causes = list(_run_strategy(spec))
    causes += _datavolume_templates(_items(spec.get("dataVolumeTemplates")))
    template_spec = _obj(spec.get("template")).get("spec")
    if not isinstance(template_spec, dict):
        return [*causes, Cause("spec.template.spec", "a VM needs a template spec", REQUIRED)]
    with_instancetype = isinstance(spec.get("instancetype"), dict)
    causes += vmi_spec_causes(
        template_spec, path="spec.template.spec", memory_required=not with_instancetype
    )
    if with_instancetype:
        causes += _instancetype_conflicts(template_spec, "spec.template.spec")
    return causes


def validate_vmi(new: JSON, old: JSON | None) -> list[Cause]:
    """Semantic checks of a VirtualMachineInstance; its spec is fixed once created."""
    spec = _obj(new.get("spec"))
    causes = vmi_spec_causes(spec, path="spec", memory_required=True)
    if old is not None and _frozen_vmi_spec(spec) != _frozen_vmi_spec(_obj(old.get("spec"))):
        causes.append(
            Cause("spec", "a VirtualMachineInstance spec cannot change after creation", FORBIDDEN)
        )
    return causes


def validate_vmim(new: JSON, old: JSON | None) -> list[Cause]:
    """A migration names its VMI, and its spec is fixed once created."""
    spec = _obj(new.get("spec"))
    causes: list[Cause] = []
    if not spec.get("vmiName"):
        causes.append(Cause("spec.vmiName", "the VMI to migrate must be named", REQUIRED))
    if old is not None and spec != _obj(old.get("spec")):
        causes.append(Cause("spec", "a migration's spec cannot change after creation", FORBIDDEN))
    return causes


def vmi_spec_causes(spec: JSON, *, path: str, memory_required: bool) -> list[Cause]:
    """Every semantic check of a VMI spec found at ``path`` (``spec`` or ``spec.template.spec``)."""
    domain = _obj(spec.get("domain"))
    devices = _obj(domain.get("devices"))
    disks = _items(devices.get("disks"))
    interfaces = _items(devices.get("interfaces"))
    volumes = _items(spec.get("volumes"))
    networks = _items(spec.get("networks"))
    dev = f"{path}.domain.devices"
    return [
        *_disks(disks, volumes, dev, path),
        *_volumes(volumes, f"{path}.volumes"),
        *_interfaces(interfaces, networks, dev, path),
        *_networks(networks, interfaces, f"{path}.networks", dev),
        *_boot_order(disks, interfaces, dev),
        *_memory(domain, f"{path}.domain", required=memory_required),
        *_resources(domain, f"{path}.domain"),
        *_cpu(domain, f"{path}.domain"),
        *_scalars(spec, path),
    ]


def _run_strategy(spec: JSON) -> Iterator[Cause]:
    has_running = spec.get("running") is not None
    has_strategy = bool(spec.get("runStrategy"))
    if has_running and has_strategy:
        yield Cause("spec.running", "spec.running and spec.runStrategy are mutually exclusive")
    elif not has_running and not has_strategy:
        yield Cause(
            "spec.runStrategy", "one of spec.runStrategy or spec.running is required", REQUIRED
        )


def _datavolume_templates(templates: list[JSON]) -> Iterator[Cause]:
    names = [_obj(t.get("metadata")).get("name") for t in templates]
    for i, name in enumerate(names):
        field = f"spec.dataVolumeTemplates[{i}].metadata.name"
        if not name:
            yield Cause(field, "a data volume template needs a name", REQUIRED)
        elif name in names[:i]:
            yield Cause(field, f"data volume template {name!r} is declared twice", DUPLICATE)
        yield from datavolume_spec_causes(
            templates[i].get("spec"), f"spec.dataVolumeTemplates[{i}].spec"
        )


def _duplicates(items: list[JSON]) -> Iterator[tuple[int, str]]:
    """(index, name) of each item whose name repeats an earlier one."""
    seen: set[str] = set()
    for i, item in enumerate(items):
        name = item.get("name")
        if isinstance(name, str) and name in seen:
            yield i, name
        elif isinstance(name, str):
            seen.add(name)


def _present(item: JSON, keys: Iterable[str]) -> list[str]:
    return [key for key in keys if item.get(key) is not None]


def _disks(disks: list[JSON], volumes: list[JSON], dev: str, path: str) -> Iterator[Cause]:
    volume_names = {v.get("name") for v in volumes}
    for i, name in _duplicates(disks):
        yield Cause(
            f"{dev}.disks[{i}].name",
            f"disk {name!r} is declared twice: a volume can back only one disk",
            DUPLICATE,
        )
    for i, disk in enumerate(disks):
        field = f"{dev}.disks[{i}]"
        kinds = _present(disk, DISK_TYPES)
        if len(kinds) > 1:
            yield Cause(field, f"a disk is exactly one of disk, cdrom, lun; got {', '.join(kinds)}")
        if disk.get("name") not in volume_names:
            yield Cause(
                f"{field}.name",
                f"disk {disk.get('name')!r} names no volume in {path}.volumes",
                NOT_FOUND,
            )


def _volumes(volumes: list[JSON], base: str) -> Iterator[Cause]:
    for i, name in _duplicates(volumes):
        yield Cause(f"{base}[{i}].name", f"volume {name!r} is declared twice", DUPLICATE)
    for i, volume in enumerate(volumes):
        sources = _present(volume, VOLUME_SOURCES)
        if not sources:
            yield Cause(f"{base}[{i}]", "a volume needs exactly one source", REQUIRED)
        elif len(sources) > 1:
            yield Cause(f"{base}[{i}]", f"a volume has one source; got {', '.join(sources)}")
        for source in ("cloudInitNoCloud", "cloudInitConfigDrive"):
            if isinstance(volume.get(source), dict):
                yield from _cloud_init(volume[source], f"{base}[{i}].{source}")
        empty_disk = _obj(volume.get("emptyDisk"))
        if "capacity" in empty_disk:
            field = f"{base}[{i}].emptyDisk.capacity"
            yield from disk_size_causes(empty_disk["capacity"], field, name="emptyDisk")


def _cloud_init(source: JSON, field: str) -> Iterator[Cause]:
    user, network = _present(source, USER_DATA), _present(source, NETWORK_DATA)
    if not user and not network:
        yield Cause(field, "cloud-init needs user data or network data", REQUIRED)
    for group in (user, network):
        if len(group) > 1:
            yield Cause(field, f"give only one of {', '.join(group)}")
    for kind, secret_ref in (("user", "UserDataSecretRef"), ("network", "NetworkDataSecretRef")):
        yield from _inline_data(source, field, kind=kind, secret_ref=secret_ref)


def _inline_data(source: JSON, field: str, *, kind: str, secret_ref: str) -> Iterator[Cause]:
    """Inline ``userData``/``networkData`` (base64 decoded) within upstream's 2 KiB limit."""
    plain, encoded = source.get(f"{kind}Data"), source.get(f"{kind}DataBase64")
    data = plain.encode() if isinstance(plain, str) else b""
    if isinstance(encoded, str) and encoded:
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            yield Cause(
                f"{field}.{kind}DataBase64", f"{kind}DataBase64 is not a valid base64 value."
            )
    if len(data) > CLOUD_INIT_MAX_LEN:
        yield Cause(
            field,
            f"{field} {kind}data exceeds {CLOUD_INIT_MAX_LEN} byte limit. "
            f"Should use {secret_ref} for larger data.",
        )


def _interfaces(
    interfaces: list[JSON], networks: list[JSON], dev: str, path: str
) -> Iterator[Cause]:
    by_name = {n.get("name"): n for n in networks}
    for i, name in _duplicates(interfaces):
        yield Cause(
            f"{dev}.interfaces[{i}].name", f"interface {name!r} is declared twice", DUPLICATE
        )
    for i, iface in enumerate(interfaces):
        field = f"{dev}.interfaces[{i}]"
        bindings = _present(iface, BINDINGS)
        if len(bindings) != 1:
            yield Cause(field, "an interface needs exactly one binding (masquerade or bridge)")
        network = by_name.get(iface.get("name"))
        if network is None:
            yield Cause(
                f"{field}.name",
                f"interface {iface.get('name')!r} names no network in {path}.networks",
                NOT_FOUND,
            )
        elif "masquerade" in bindings and network.get("pod") is None:
            yield Cause(
                f"{field}.masquerade",
                "masquerade binding is only allowed on the pod network; use bridge on multus",
            )
        if "macAddress" in iface:
            yield from _mac_address(iface["macAddress"], f"{field}.macAddress")
        yield from _ports(iface, field, masquerade="masquerade" in bindings)


def _mac_address(mac: object, field: str) -> Iterator[Cause]:
    if not isinstance(mac, str) or not MAC_PATTERN.match(mac):
        yield Cause(field, f"{mac!r} is not a MAC address like 02:00:00:aa:bb:cc")
        return
    octets = [int(part, 16) for part in re.split(r"[:-]", mac)]
    if octets[0] & 1:
        yield Cause(field, f"{mac} is a multicast address; a NIC needs a unicast address")
    elif not any(octets):
        yield Cause(field, "00:00:00:00:00:00 is not a usable MAC address")


def _ports(iface: JSON, field: str, *, masquerade: bool) -> Iterator[Cause]:
    ports = _items(iface.get("ports"))
    if ports and not masquerade:
        yield Cause(f"{field}.ports", "ports are forwarded only by the masquerade binding")
    named: set[str] = set()
    for j, port in enumerate(ports):
        number = port.get("port")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            yield Cause(f"{field}.ports[{j}].port", f"port {number!r} is not in 1-65535")
        name = port.get("name")
        if name and name in named:
            yield Cause(f"{field}.ports[{j}].name", f"port name {name!r} is used twice", DUPLICATE)
        named.add(name or "")


def _networks(networks: list[JSON], interfaces: list[JSON], base: str, dev: str) -> Iterator[Cause]:
    iface_names = {iface.get("name") for iface in interfaces}
    for i, name in _duplicates(networks):
        yield Cause(f"{base}[{i}].name", f"network {name!r} is declared twice", DUPLICATE)
    pod_seen = multus_default_seen = False
    for i, net in enumerate(networks):
        field = f"{base}[{i}]"
        kinds = _present(net, ("pod", "multus", "resourceClaim"))
        if len(kinds) != 1:
            yield Cause(field, "a network is exactly one of pod or multus")
        if net.get("pod") is not None:
            if pod_seen:
                yield Cause(f"{field}.pod", "only one network may be the pod network", DUPLICATE)
            pod_seen = True
        multus = net.get("multus")
        if isinstance(multus, dict):
            yield from _network_name(multus.get("networkName"), f"{field}.multus.networkName")
        if isinstance(multus, dict) and multus.get("default"):
            if multus_default_seen or pod_seen or any(n.get("pod") is not None for n in networks):
                yield Cause(
                    f"{field}.multus.default",
                    "only one network may be the default (pod or multus default)",
                )
            multus_default_seen = True
        if net.get("name") not in iface_names:
            yield Cause(
                f"{field}.name",
                f"network {net.get('name')!r} has no interface in {dev}.interfaces",
                NOT_FOUND,
            )


def _network_name(name: object, field: str) -> Iterator[Cause]:
    """A NetworkAttachmentDefinition reference: ``<name>`` or ``<namespace>/<name>``."""
    parts = name.split("/") if isinstance(name, str) else []
    if not 1 <= len(parts) <= 2 or not all(DNS_SUBDOMAIN.match(part) for part in parts):
        yield Cause(field, f"{name!r} is not a network name like 'vlan120' or 'prod/vlan120'")


def _boot_order(disks: list[JSON], interfaces: list[JSON], dev: str) -> Iterator[Cause]:
    owners: dict[int, str] = {}
    devices = [(f"{dev}.disks[{i}]", d) for i, d in enumerate(disks)]
    devices += [(f"{dev}.interfaces[{i}]", d) for i, d in enumerate(interfaces)]
    for field, device in devices:
        order = device.get("bootOrder")
        if order is None:
            continue
        if not isinstance(order, int) or order < 1:
            yield Cause(f"{field}.bootOrder", f"boot order must be 1 or greater, got {order!r}")
        elif order in owners:
            yield Cause(
                f"{field}.bootOrder",
                f"boot order {order} is already given to {owners[order]}",
                DUPLICATE,
            )
        else:
            owners[order] = field


def _memory(domain: JSON, base: str, *, required: bool) -> Iterator[Cause]:
    resources = _obj(domain.get("resources"))
    requests = _obj(resources.get("requests"))
    limits = _obj(resources.get("limits"))
    guest_field, guest_raw = f"{base}.memory.guest", _obj(domain.get("memory")).get("guest")
    if guest_raw is None:
        guest_field, guest_raw = f"{base}.resources.requests.memory", requests.get("memory")
    if guest_raw is None:
        if required:
            yield Cause(
                f"{base}.memory.guest",
                f"set {base}.memory.guest or {base}.resources.requests.memory",
                REQUIRED,
            )
        return
    guest = quantity_value(guest_raw)
    if guest is None:
        yield Cause(guest_field, f"{guest_raw!r} is not a quantity")
        return
    if guest < MIN_GUEST_MEMORY:
        yield Cause(guest_field, f"guest memory must be at least {MIN_GUEST_MEMORY_TEXT}")
    limit = quantity_value(limits.get("memory"))
    if limit is not None and guest > limit:
        yield Cause(guest_field, f"guest memory exceeds {base}.resources.limits.memory")


def _resources(domain: JSON, base: str) -> Iterator[Cause]:
    """CPU and memory requests and limits: none negative (upstream), no request above its limit."""
    resources = _obj(domain.get("resources"))
    requests = _obj(resources.get("requests"))
    limits = _obj(resources.get("limits"))
    for kind, amounts in (("requests", requests), ("limits", limits)):
        for resource in ("cpu", "memory"):
            amount = quantity_value(amounts.get(resource))
            if amount is not None and amount < 0:
                field = f"{base}.resources.{kind}.{resource}"
                yield Cause(field, MUST_BE_POSITIVE.format(field=field, value=amounts[resource]))
    for resource in ("cpu", "memory"):
        request, cap = quantity_value(requests.get(resource)), quantity_value(limits.get(resource))
        if request is not None and cap is not None and request > cap:
            yield Cause(
                f"{base}.resources.requests.{resource}",
                f"request exceeds {base}.resources.limits.{resource}",
            )


def _cpu(domain: JSON, base: str) -> Iterator[Cause]:
    cpu = _obj(domain.get("cpu"))
    valid = True
    for axis in CPU_AXES:
        value = cpu.get(axis)
        if value is not None and (not isinstance(value, int) or value < 1):
            valid = False
            yield Cause(f"{base}.cpu.{axis}", f"{axis} must be 1 or greater, got {value!r}")
    if valid:
        yield from _vcpu_count(domain, base)


def _vcpu_count(domain: JSON, base: str) -> Iterator[Cause]:
    """No more vCPUs than QEMU's machine type takes, from the topology or the CPU resource."""
    machine = _obj(domain.get("machine")).get("type") or "q35"
    most = max_vcpus(machine)
    beyond = f"more than the {most} vCPUs QEMU's {machine} machine takes"
    whole_field, whole = _cpu_resource(domain, base)
    if whole > most:
        yield Cause(whole_field, f"{whole} CPUs is {beyond}")
    topology = {axis: value for axis in CPU_AXES if (value := _obj(domain.get("cpu")).get(axis))}
    count = math.prod(topology.values())
    # a topology the defaults drew from the CPU resource is that resource's fault, told above
    if topology and count > most and count != whole:
        axis = max(topology, key=topology.__getitem__)
        yield Cause(f"{base}.cpu.{axis}", f"sockets x cores x threads is {count} vCPUs, {beyond}")


def _cpu_resource(domain: JSON, base: str) -> tuple[str, int]:
    """The CPU limit (else request) in whole CPUs, and its field; 0 if neither is given."""
    resources = _obj(domain.get("resources"))
    for kind in ("limits", "requests"):
        amount = quantity_value(_obj(resources.get(kind)).get("cpu"))
        if amount is not None and amount > 0:
            return f"{base}.resources.{kind}.cpu", math.ceil(amount)
    return "", 0


def _scalars(spec: JSON, path: str) -> Iterator[Cause]:
    grace = spec.get("terminationGracePeriodSeconds")
    if isinstance(grace, int) and grace < 0:
        yield Cause(f"{path}.terminationGracePeriodSeconds", "must not be negative")
    for key in ("hostname", "subdomain"):
        value = spec.get(key)
        if isinstance(value, str) and not DNS_LABEL.match(value):
            yield Cause(f"{path}.{key}", f"{value!r} is not a DNS label (a-z, 0-9, '-', <= 63)")


def _instancetype_conflicts(spec: JSON, path: str) -> Iterator[Cause]:
    """With an instancetype, CPU count and guest memory come from it and may not be repeated."""
    domain = _obj(spec.get("domain"))
    for axis in CPU_AXES:
        if _obj(domain.get("cpu")).get(axis) is not None:
            yield Cause(
                f"{path}.domain.cpu.{axis}", "conflicts with the selected instancetype", FORBIDDEN
            )
    if _obj(domain.get("memory")).get("guest") is not None:
        yield Cause(
            f"{path}.domain.memory.guest", "conflicts with the selected instancetype", FORBIDDEN
        )


def _frozen_vmi_spec(spec: JSON) -> JSON:
    """The part of a VMI spec that may never change: everything but hotplugged volumes/disks."""
    frozen = {key: value for key, value in spec.items() if key != "volumes"}
    domain = dict(_obj(frozen.get("domain")))
    devices = {k: v for k, v in _obj(domain.get("devices")).items() if k != "disks"}
    domain["devices"] = devices
    frozen["domain"] = domain
    return frozen
