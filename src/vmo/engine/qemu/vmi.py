"""``domain_from_vmi``: a KubeVirt VirtualMachineInstance spec, resolved on one node, as a ``Domain``.

The mapping is strict: a field it does not understand, with a non-empty value, raises
``UnsupportedSpec`` naming that field, so a VMI never silently runs without something it asked for.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from vmo.api.kubevirt.core import START_PAUSED
from vmo.api.quantity import QuantityError, parse_quantity
from vmo.api.types import JSON
from vmo.engine.qemu.accel import Accelerator
from vmo.engine.qemu.domain import (
    CpuTopology,
    Disk,
    DiskBus,
    DiskCache,
    DiskFormat,
    Domain,
    EfiFirmware,
    HostForward,
    Nic,
    NicModel,
    RuntimePaths,
    TapBackend,
    UserBackend,
)
from vmo.engine.qemu.errors import UnsupportedSpec

__all__ = [
    "DEFAULT_VM_NETWORK_CIDR",
    "LocalVolume",
    "NodeContext",
    "OvmfFiles",
    "VolumeResolver",
    "domain_from_vmi",
    "stable_mac",
]

# KubeVirt's default pod network for masquerade (vmNetworkCIDR).
DEFAULT_VM_NETWORK_CIDR = "10.0.2.0/24"
_MIB = 1 << 20

# Keys mapped (or deliberately without effect on QEMU) at each level; any other key with a
# non-empty value is refused.
_SPEC_KEYS = {
    "domain",
    "volumes",
    "networks",
    # Scheduling and lifecycle: the node agent's business, not QEMU's.
    "terminationGracePeriodSeconds",
    "evictionStrategy",
    "nodeSelector",
    "affinity",
    "tolerations",
    "topologySpreadConstraints",
    "schedulerName",
    "priorityClassName",
    "hostname",
    "subdomain",
    "dnsPolicy",
    "dnsConfig",
    "readinessProbe",
    "livenessProbe",
    "accessCredentials",
    "architecture",
    "startStrategy",
}
_DOMAIN_KEYS = {"cpu", "memory", "resources", "devices", "firmware", "machine", "features", "clock"}
_CPU_KEYS = {"sockets", "cores", "threads", "model", "maxSockets"}
_MEMORY_KEYS = {"guest", "maxGuest"}
_DEVICE_KEYS = {
    "disks",
    "interfaces",
    "rng",
    "autoattachGraphicsDevice",
    "autoattachSerialConsole",
    "autoattachPodInterface",
    "autoattachMemBalloon",
    "blockMultiQueue",
    "networkInterfaceMultiqueue",
    "disableHotplug",
}
_FIRMWARE_KEYS = {"uuid", "serial", "bootloader"}
_FEATURE_KEYS = {"acpi", "apic", "smm"}
_DISK_KEYS = {"name", "disk", "cdrom", "bootOrder", "serial", "cache", "io", "tag"}
_DISK_TARGET_KEYS = {"bus", "readonly", "tray"}
_INTERFACE_KEYS = {"name", "masquerade", "bridge", "macAddress", "model", "ports", "bootOrder"}
_BINDINGS = ("masquerade", "bridge", "sriov", "slirp", "passtBinding", "binding", "macvtap")
_NIC_MODELS = {
    "virtio": NicModel.VIRTIO,
    "e1000": NicModel.E1000,
    "e1000e": NicModel.E1000E,
    "rtl8139": NicModel.RTL8139,
    "pcnet": NicModel.PCNET,
    "ne2k_pci": NicModel.NE2K_PCI,
}


@dataclass(frozen=True)
class LocalVolume:
    """A volume as it exists on this node: a file and its format, and what a migration needs to
    know of it: on shared storage (opened in place by the target), a node-local pool volume
    (``claim``: copied, then moved to the target's pool), or an overlay on a ``backing`` file
    every node has (only the overlay is copied)."""

    path: Path
    format: DiskFormat = DiskFormat.RAW
    shared: bool = False
    claim: tuple[str, str] | None = None
    backing: Path | None = None
    readonly: bool = False
    virtual_size: int = 0


VolumeResolver = Callable[[str, JSON], LocalVolume | None]
"""(volume name, the VMI's ``spec.volumes[]`` entry) -> the local file, or None if there is none."""


@dataclass(frozen=True)
class OvmfFiles:
    """Where this node keeps OVMF: code and variable templates, plain and secure-boot."""

    code: Path
    vars_template: Path
    secure_code: Path | None = None
    secure_vars_template: Path | None = None


@dataclass(frozen=True)
class NodeContext:
    """What the node knows that the VMI does not: files, taps, ports, firmware, accelerator."""

    workdir: Path
    accel: Accelerator
    volumes: Mapping[str, LocalVolume] | VolumeResolver
    taps: Mapping[str, str] = field(default_factory=dict)
    """VMI network name -> tap device made for it by the network layer."""
    host_ports: Mapping[str, int] = field(default_factory=dict)
    """``"<interface>/<tcp|udp>/<guest port>"`` -> host port forwarded to it."""
    host_address: str = "127.0.0.1"
    ovmf: OvmfFiles | None = None
    run_as: str | None = None
    # Not "none" (O_DIRECT): QEMU 7.2, once unprivileged, must reopen by name the layers it
    # opened at start when a live snapshot or merge changes an O_DIRECT chain, and cannot. Like
    # "none", writethrough has every write on the host's disk before the guest sees it done;
    # it is also upstream's choice where O_DIRECT is unavailable.
    default_disk_cache: DiskCache = DiskCache.WRITETHROUGH
    incoming: str | None = None
    """A migration target's ``-incoming`` URI (the QEMU waits for the source's state)."""


def _is_empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == []


def _refuse_unknown(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in sorted(obj):
        if key not in allowed and not _is_empty(obj[key]):
            raise UnsupportedSpec(f"{where}.{key}", "not supported by VMO's QEMU engine")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _section(obj: Mapping[str, Any], key: str, where: str) -> JSON:
    value = obj.get(key) or {}
    if not isinstance(value, dict):
        raise UnsupportedSpec(_join(where, key), "must be an object")
    return value


def _items(obj: Mapping[str, Any], key: str, where: str) -> list[JSON]:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise UnsupportedSpec(_join(where, key), "must be a list of objects")
    return value


def stable_mac(vmi_uid: str, interface: str) -> str:
    """A locally administered MAC (QEMU's 52:54:00 prefix) that stays the same across restarts."""
    digest = hashlib.sha256(f"{vmi_uid}/{interface}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def _mebibytes(value: Any, where: str) -> int:
    try:
        size = parse_quantity(value)
    except (QuantityError, TypeError) as exc:
        raise UnsupportedSpec(where, f"not a quantity: {value!r}") from exc
    if size <= 0:
        raise UnsupportedSpec(where, "must be positive")
    return math.ceil(size / _MIB)


def _memory_mib(domain: JSON) -> int:
    memory = _section(domain, "memory", "spec.domain")
    _refuse_unknown(memory, _MEMORY_KEYS, "spec.domain.memory")
    if "guest" in memory:
        return _mebibytes(memory["guest"], "spec.domain.memory.guest")
    requests = _section(_section(domain, "resources", "spec.domain"), "requests", "resources")
    if "memory" in requests:
        return _mebibytes(requests["memory"], "spec.domain.resources.requests.memory")
    raise UnsupportedSpec("spec.domain.memory.guest", "neither memory.guest nor requests.memory")


def _vcpus_from_resources(domain: JSON) -> int:
    # KubeVirt: without a topology, the vCPU count comes from the CPU limit, else the request.
    resources = _section(domain, "resources", "spec.domain")
    for kind in ("limits", "requests"):
        cpu = _section(resources, kind, "spec.domain.resources").get("cpu")
        if cpu is not None:
            where = f"spec.domain.resources.{kind}.cpu"
            try:
                return max(1, math.ceil(parse_quantity(cpu)))
            except QuantityError as exc:
                raise UnsupportedSpec(where, f"not a quantity: {cpu!r}") from exc
    return 1


def _cpu(domain: JSON, accel: Accelerator) -> CpuTopology:
    cpu = _section(domain, "cpu", "spec.domain")
    _refuse_unknown(cpu, _CPU_KEYS, "spec.domain.cpu")
    model = str(cpu.get("model") or "host-model")
    if model == "host-passthrough" and accel is not Accelerator.KVM:
        raise UnsupportedSpec("spec.domain.cpu.model", "host-passthrough needs KVM")
    if not any(key in cpu for key in ("sockets", "cores", "threads")):
        return CpuTopology(sockets=_vcpus_from_resources(domain), model=model)
    try:
        return CpuTopology(
            sockets=int(cpu.get("sockets", 1)),
            cores=int(cpu.get("cores", 1)),
            threads=int(cpu.get("threads", 1)),
            model=model,
        )
    except (ValueError, TypeError) as exc:
        raise UnsupportedSpec("spec.domain.cpu", str(exc)) from exc


def _efi(efi: JSON, ctx: NodeContext) -> EfiFirmware:
    where = "spec.domain.firmware.bootloader.efi"
    _refuse_unknown(efi, {"secureBoot", "persistent"}, where)
    if ctx.ovmf is None:
        raise UnsupportedSpec(where, "OVMF is not installed on this node")
    # KubeVirt turns secure boot on unless the VMI says otherwise.
    secure = efi.get("secureBoot", True) is not False
    code, template = ctx.ovmf.code, ctx.ovmf.vars_template
    if secure:
        if ctx.ovmf.secure_code is None or ctx.ovmf.secure_vars_template is None:
            raise UnsupportedSpec(f"{where}.secureBoot", "no secure-boot OVMF on this node")
        code, template = ctx.ovmf.secure_code, ctx.ovmf.secure_vars_template
    return EfiFirmware(code, ctx.workdir / "efi-vars.fd", template, secure_boot=secure)


def _firmware(domain: JSON, ctx: NodeContext) -> EfiFirmware | None:
    firmware = _section(domain, "firmware", "spec.domain")
    _refuse_unknown(firmware, _FIRMWARE_KEYS, "spec.domain.firmware")
    bootloader = _section(firmware, "bootloader", "spec.domain.firmware")
    _refuse_unknown(bootloader, {"bios", "efi"}, "spec.domain.firmware.bootloader")
    if "efi" in bootloader:
        return _efi(_section(bootloader, "efi", "bootloader"), ctx)
    bios = _section(bootloader, "bios", "bootloader")
    # SeaBIOS output always reaches the serial console here; useSerial changes nothing.
    _refuse_unknown(bios, {"useSerial"}, "spec.domain.firmware.bootloader.bios")
    return None


def _uuid(vmi: JSON, domain: JSON) -> UUID:
    firmware = _section(domain, "firmware", "spec.domain")
    raw = firmware.get("uuid") or (vmi.get("metadata") or {}).get("uid")
    where = "spec.domain.firmware.uuid"
    if not raw:
        raise UnsupportedSpec(where, "neither firmware.uuid nor metadata.uid is set")
    try:
        return UUID(str(raw))
    except ValueError as exc:
        raise UnsupportedSpec(where, f"not a UUID: {raw!r}") from exc


def _machine(domain: JSON) -> str:
    machine = _section(domain, "machine", "spec.domain")
    _refuse_unknown(machine, {"type"}, "spec.domain.machine")
    kind = str(machine.get("type") or "q35")
    if not kind.startswith(("q35", "pc-q35-")):
        raise UnsupportedSpec("spec.domain.machine.type", f"only q35 machines, not {kind!r}")
    return kind


def _check_features_and_clock(domain: JSON) -> None:
    features = _section(domain, "features", "spec.domain")
    _refuse_unknown(features, _FEATURE_KEYS, "spec.domain.features")
    for name in sorted(_FEATURE_KEYS & features.keys()):
        if (features[name] or {}).get("enabled", True) is False:
            raise UnsupportedSpec(f"spec.domain.features.{name}.enabled", "cannot be turned off")
    clock = _section(domain, "clock", "spec.domain")
    _refuse_unknown(clock, {"utc"}, "spec.domain.clock")
    utc = _section(clock, "utc", "spec.domain.clock")
    _refuse_unknown(utc, set(), "spec.domain.clock.utc")


def _resolve_volume(
    name: str, volumes: Sequence[JSON], ctx: NodeContext, where: str
) -> LocalVolume:
    for index, volume in enumerate(volumes):
        if volume.get("name") != name:
            continue
        local = ctx.volumes(name, volume) if callable(ctx.volumes) else ctx.volumes.get(name)
        if local is None:
            raise UnsupportedSpec(f"spec.volumes[{index}]", f"volume {name!r} has no file here")
        return local
    raise UnsupportedSpec(f"{where}.name", f"no volume named {name!r}")


def _disk_target(disk: JSON, where: str) -> tuple[JSON, bool]:
    """The disk's ``disk`` or ``cdrom`` section and whether it is a CD-ROM."""
    targets = [key for key in ("disk", "cdrom", "lun") if key in disk]
    if "lun" in targets:
        raise UnsupportedSpec(f"{where}.lun", "LUN passthrough is not supported")
    if len(targets) > 1:
        raise UnsupportedSpec(where, "more than one of disk, cdrom")
    key = targets[0] if targets else "disk"
    target = _section(disk, key, where)
    _refuse_unknown(target, _DISK_TARGET_KEYS, f"{where}.{key}")
    if target.get("tray", "closed") != "closed":
        raise UnsupportedSpec(f"{where}.cdrom.tray", "only a closed tray")
    return target, key == "cdrom"


def _disk_bus(target: JSON, cdrom: bool, where: str) -> DiskBus:
    bus = str(target.get("bus") or ("sata" if cdrom else "virtio"))
    try:
        parsed = DiskBus(bus)
    except ValueError as exc:
        raise UnsupportedSpec(f"{where}.bus", f"bus {bus!r} is not supported") from exc
    if cdrom and parsed is DiskBus.VIRTIO:
        raise UnsupportedSpec(f"{where}.bus", "a cdrom cannot be on virtio")
    return parsed


def _disk_cache(disk: JSON, ctx: NodeContext, where: str) -> DiskCache:
    if "cache" not in disk:
        return ctx.default_disk_cache
    try:
        return DiskCache(disk["cache"])
    except ValueError as exc:
        raise UnsupportedSpec(f"{where}.cache", f"unknown cache mode {disk['cache']!r}") from exc


def _disk(disk: JSON, where: str, volumes: Sequence[JSON], ctx: NodeContext) -> Disk:
    _refuse_unknown(disk, _DISK_KEYS, where)
    target, cdrom = _disk_target(disk, where)
    name = str(disk.get("name") or "")
    local = _resolve_volume(name, volumes, ctx, where)
    try:
        return Disk(
            id=name,
            path=local.path,
            format=local.format,
            bus=_disk_bus(target, cdrom, f"{where}.{'cdrom' if cdrom else 'disk'}"),
            boot_order=disk.get("bootOrder"),
            serial=disk.get("serial"),
            readonly=bool(target.get("readonly", cdrom)),
            cdrom=cdrom,
            cache=_disk_cache(disk, ctx, where),
        )
    except ValueError as exc:
        raise UnsupportedSpec(where, str(exc)) from exc


def _binding(interface: JSON, where: str) -> str:
    bindings = [key for key in _BINDINGS if key in interface]
    if len(bindings) != 1:
        raise UnsupportedSpec(where, "needs exactly one binding (masquerade or bridge)")
    if bindings[0] not in ("masquerade", "bridge"):
        raise UnsupportedSpec(f"{where}.{bindings[0]}", "binding not supported")
    return bindings[0]


def _network(name: str, networks: Sequence[JSON], where: str) -> tuple[int, JSON]:
    for index, network in enumerate(networks):
        if network.get("name") == name:
            return index, network
    raise UnsupportedSpec(f"{where}.name", f"no network named {name!r}")


def _host_forwards(interface: JSON, where: str, ctx: NodeContext) -> tuple[HostForward, ...]:
    forwards = []
    for index, port in enumerate(_items(interface, "ports", where)):
        proto = str(port.get("protocol") or "TCP").lower()
        key = f"{interface['name']}/{proto}/{port.get('port')}"
        if key not in ctx.host_ports:
            raise UnsupportedSpec(f"{where}.ports[{index}]", f"no host port allocated for {key}")
        try:
            forwards.append(
                HostForward(proto, ctx.host_address, ctx.host_ports[key], int(port["port"]))
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise UnsupportedSpec(f"{where}.ports[{index}]", str(exc)) from exc
    return tuple(forwards)


def _pod_backend(
    interface: JSON, binding: str, pod: JSON, where: str, ctx: NodeContext
) -> UserBackend:
    # bridge binding on the pod network (KubeVirt's default interface) gets the same user-mode
    # network: the guest takes its address by DHCP; it is not live-migratable (see migratable.py)
    cidr = str(pod.get("vmNetworkCIDR") or DEFAULT_VM_NETWORK_CIDR)
    try:
        network = ipaddress.IPv4Network(cidr)
        return UserBackend(network, _host_forwards(interface, where, ctx))
    except ValueError as exc:
        raise UnsupportedSpec("spec.networks.pod.vmNetworkCIDR", str(exc)) from exc


def _backend(
    interface: JSON, where: str, networks: Sequence[JSON], ctx: NodeContext
) -> TapBackend | UserBackend:
    binding = _binding(interface, where)
    index, network = _network(str(interface.get("name")), networks, where)
    net_where = f"spec.networks[{index}]"
    _refuse_unknown(network, {"name", "pod", "multus"}, net_where)
    if "pod" in network:
        return _pod_backend(interface, binding, _section(network, "pod", net_where), where, ctx)
    if "multus" not in network:
        raise UnsupportedSpec(net_where, "needs pod or multus")
    if binding != "bridge":
        raise UnsupportedSpec(f"{where}.{binding}", "multus networks need bridge binding")
    tap = ctx.taps.get(str(network["name"]))
    if tap is None:
        raise UnsupportedSpec(f"{net_where}.multus.networkName", "no tap device for it here")
    return TapBackend(tap)


def _nic(
    interface: JSON, where: str, vmi_uid: str, networks: Sequence[JSON], ctx: NodeContext
) -> Nic:
    _refuse_unknown(interface, _INTERFACE_KEYS | set(_BINDINGS), where)
    name = str(interface.get("name") or "")
    model = str(interface.get("model") or "virtio")
    if model not in _NIC_MODELS:
        raise UnsupportedSpec(f"{where}.model", f"NIC model {model!r} is not supported")
    mac = str(interface.get("macAddress") or stable_mac(vmi_uid, name))
    try:
        return Nic(
            id=name,
            mac=mac.lower().replace("-", ":"),
            backend=_backend(interface, where, networks, ctx),
            model=_NIC_MODELS[model],
            boot_order=interface.get("bootOrder"),
        )
    except ValueError as exc:
        raise UnsupportedSpec(where, str(exc)) from exc


def _devices(
    vmi: JSON, spec: JSON, ctx: NodeContext
) -> tuple[tuple[Disk, ...], tuple[Nic, ...], JSON]:
    domain = _section(spec, "domain", "spec")
    devices = _section(domain, "devices", "spec.domain")
    _refuse_unknown(devices, _DEVICE_KEYS, "spec.domain.devices")
    volumes = _items(spec, "volumes", "spec")
    networks = _items(spec, "networks", "spec")
    where = "spec.domain.devices"
    disks = tuple(
        _disk(disk, f"{where}.disks[{i}]", volumes, ctx)
        for i, disk in enumerate(_items(devices, "disks", where))
    )
    uid = str((vmi.get("metadata") or {}).get("uid") or vmi.get("metadata", {}).get("name"))
    nics = tuple(
        _nic(interface, f"{where}.interfaces[{i}]", uid, networks, ctx)
        for i, interface in enumerate(_items(devices, "interfaces", where))
    )
    return disks, nics, devices


def domain_from_vmi(vmi: JSON, *, ctx: NodeContext) -> Domain:
    """The ``Domain`` that realises ``vmi`` on this node; ``UnsupportedSpec`` names what cannot be."""
    spec = _section(vmi, "spec", "")
    _refuse_unknown(spec, _SPEC_KEYS, "spec")
    domain = _section(spec, "domain", "spec")
    _refuse_unknown(domain, _DOMAIN_KEYS, "spec.domain")
    _check_features_and_clock(domain)
    disks, nics, devices = _devices(vmi, spec, ctx)
    firmware = _section(domain, "firmware", "spec.domain")
    try:
        return Domain(
            name=str((vmi.get("metadata") or {}).get("name")),
            uuid=_uuid(vmi, domain),
            paths=RuntimePaths.under(ctx.workdir),
            accel=ctx.accel,
            machine=_machine(domain),
            cpu=_cpu(domain, ctx.accel),
            memory_mib=_memory_mib(domain),
            disks=disks,
            nics=nics,
            smbios_serial=firmware.get("serial"),
            run_as=ctx.run_as,
            rng="rng" in devices,
            graphics=devices.get("autoattachGraphicsDevice", True) is not False,
            efi=_firmware(domain, ctx),
            # as KubeVirt: every VMI may have disks hot-plugged, unless it opts out
            scsi_controller=devices.get("disableHotplug") is not True,
            incoming=ctx.incoming,
            start_paused=ctx.incoming is None and spec.get("startStrategy") == START_PAUSED,
        )
    except ValueError as exc:
        raise UnsupportedSpec("spec", str(exc)) from exc
