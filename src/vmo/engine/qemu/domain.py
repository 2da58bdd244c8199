"""A typed description of one QEMU virtual machine: everything ``qemu_argv`` needs, nothing more.

A ``Domain`` is what a VMI spec becomes on a node once volumes, taps and the accelerator are known.
It is frozen and validated on construction so that ``qemu_argv`` can stay a plain mapping.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from uuid import UUID

from vmo.engine.qemu.accel import Accelerator

__all__ = [
    "SATA_PORTS",
    "CpuTopology",
    "Disk",
    "DiskBus",
    "DiskCache",
    "DiskFormat",
    "Domain",
    "EfiFirmware",
    "HostForward",
    "KernelBoot",
    "Nic",
    "NicModel",
    "RuntimePaths",
    "TapBackend",
    "UserBackend",
]

# KubeVirt's default vmNetworkCIDR for masquerade.
_KUBEVIRT_POD_CIDR = ipaddress.IPv4Network("10.0.2.0/24")
# q35's built-in ICH9 AHCI controller.
SATA_PORTS = 6
# Linux sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_ID = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_CPU_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_INCOMING = re.compile(r"^(defer|unix:/\S+|tcp:\S*:\d+)$")


class DiskBus(StrEnum):
    VIRTIO = "virtio"
    SATA = "sata"
    SCSI = "scsi"


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


class DiskCache(StrEnum):
    """libvirt's (and KubeVirt's) cache modes; each is a (direct, write-cache, no-flush) triple."""

    NONE = "none"
    WRITETHROUGH = "writethrough"
    WRITEBACK = "writeback"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"


class NicModel(StrEnum):
    VIRTIO = "virtio-net-pci"
    E1000 = "e1000"
    E1000E = "e1000e"
    RTL8139 = "rtl8139"
    PCNET = "pcnet"
    NE2K_PCI = "ne2k_pci"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_id(kind: str, value: str) -> None:
    _require(bool(_ID.match(value)) and len(value) <= 63, f"{kind} id {value!r} is not a DNS label")


@dataclass(frozen=True)
class CpuTopology:
    """vCPU layout; ``model`` is a QEMU model name, or KubeVirt's host-model / host-passthrough."""

    sockets: int = 1
    cores: int = 1
    threads: int = 1
    model: str = "host-model"

    def __post_init__(self) -> None:
        _require(min(self.sockets, self.cores, self.threads) >= 1, "cpu counts must be >= 1")
        _require(bool(_CPU_MODEL.match(self.model)), f"bad cpu model {self.model!r}")

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores * self.threads


@dataclass(frozen=True)
class Disk:
    """One block device backed by a local file."""

    id: str
    path: Path
    format: DiskFormat = DiskFormat.QCOW2
    bus: DiskBus = DiskBus.VIRTIO
    boot_order: int | None = None
    serial: str | None = None
    readonly: bool = False
    cdrom: bool = False
    cache: DiskCache = DiskCache.NONE

    def __post_init__(self) -> None:
        _check_id("disk", self.id)
        _require(self.path.is_absolute(), f"disk {self.id}: path must be absolute")
        _require(
            not (self.cdrom and self.bus is DiskBus.VIRTIO), f"disk {self.id}: no virtio cdrom"
        )
        _require(self.boot_order is None or self.boot_order >= 1, "boot order starts at 1")


@dataclass(frozen=True)
class TapBackend:
    """An existing tap device (created by the network layer) the NIC attaches to."""

    ifname: str

    def __post_init__(self) -> None:
        _require(bool(_IFNAME.match(self.ifname)), f"bad tap name {self.ifname!r}")


@dataclass(frozen=True)
class HostForward:
    """A host address:port forwarded into the guest (QEMU ``hostfwd``)."""

    proto: str
    host_addr: str
    host_port: int
    guest_port: int

    def __post_init__(self) -> None:
        _require(self.proto in ("tcp", "udp"), f"bad protocol {self.proto!r}")
        ipaddress.ip_address(self.host_addr)
        _require(0 <= self.host_port <= 65535 and 0 < self.guest_port <= 65535, "bad port")


@dataclass(frozen=True)
class UserBackend:
    """QEMU user networking, laid out as KubeVirt masquerade: gateway .1, guest .2."""

    network: ipaddress.IPv4Network = _KUBEVIRT_POD_CIDR
    hostfwds: tuple[HostForward, ...] = ()

    def __post_init__(self) -> None:
        _require(self.network.num_addresses >= 8, "user network needs at least a /29")

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def guest_address(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 2

    @property
    def dns(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 3


@dataclass(frozen=True)
class Nic:
    """One guest network interface."""

    id: str
    mac: str
    backend: TapBackend | UserBackend
    model: NicModel = NicModel.VIRTIO
    boot_order: int | None = None

    def __post_init__(self) -> None:
        _check_id("nic", self.id)
        _require(bool(_MAC.match(self.mac)), f"nic {self.id}: bad MAC {self.mac!r}")
        _require(int(self.mac[:2], 16) & 1 == 0, f"nic {self.id}: multicast MAC {self.mac}")


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot (tests, appliances)."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class EfiFirmware:
    """OVMF code (read-only) and this VM's own copy of the variable store."""

    code: Path
    vars: Path
    vars_template: Path
    secure_boot: bool = False


SERIAL_LOG_NAME = "serial.log"


@dataclass(frozen=True)
class RuntimePaths:
    """Where one VM's sockets and pidfile live; all under its working directory."""

    qmp: Path
    serial: Path
    vnc: Path
    guest_agent: Path
    pidfile: Path

    @classmethod
    def under(cls, workdir: Path) -> RuntimePaths:
        return cls(
            qmp=workdir / "qmp.sock",
            serial=workdir / "serial.sock",
            vnc=workdir / "vnc.sock",
            guest_agent=workdir / "qga.sock",
            pidfile=workdir / "qemu.pid",
        )

    @property
    def serial_log(self) -> Path:
        """Everything the guest writes to its serial console, as QEMU records it (what
        ``kubectl logs -c guest-console-log`` reads): beside the serial socket."""
        return self.serial.with_name(SERIAL_LOG_NAME)

    def sockets(self) -> tuple[Path, ...]:
        return (self.qmp, self.serial, self.vnc, self.guest_agent)

    def all(self) -> tuple[Path, ...]:
        return (*self.sockets(), self.pidfile)

    def __post_init__(self) -> None:
        for path in self.all():
            _require(path.is_absolute(), f"{path}: runtime paths must be absolute")
        for sock in self.sockets():
            _require(len(bytes(sock)) <= _MAX_SOCKET_PATH, f"{sock}: too long for a unix socket")


@dataclass(frozen=True)
class Domain:
    """One VM as QEMU will run it."""

    name: str
    uuid: UUID
    paths: RuntimePaths
    accel: Accelerator = Accelerator.TCG
    machine: str = "q35"
    cpu: CpuTopology = field(default_factory=CpuTopology)
    memory_mib: int = 128
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    smbios_serial: str | None = None
    run_as: str | None = None
    sandbox: bool = True
    rng: bool = True
    guest_agent: bool = True
    graphics: bool = True
    kernel_boot: KernelBoot | None = None
    efi: EfiFirmware | None = None
    scsi_controller: bool = False
    """A virtio-scsi controller even without SCSI disks: what disks are hot-plugged onto."""
    incoming: str | None = None
    """A live migration's destination: ``defer`` (the URI comes later, through QMP
    ``migrate-incoming``) or a ``unix:``/``tcp:`` URI to listen on. QEMU starts in the
    ``inmigrate`` state and runs the guest as soon as the migration completes."""
    start_paused: bool = False
    """QEMU starts with ``-S``: not one guest instruction runs until QMP ``cont``
    (KubeVirt's ``startStrategy: Paused``)."""

    def __post_init__(self) -> None:
        _require(bool(_NAME.match(self.name)) and len(self.name) <= 253, f"bad name {self.name!r}")
        _require(
            self.incoming is None or bool(_INCOMING.match(self.incoming)),
            f"incoming {self.incoming!r} is not 'defer' nor a unix:/tcp: URI",
        )
        _require(
            not (self.start_paused and self.incoming),
            "a migration target runs as its source does: it cannot also start paused",
        )
        _require(self.memory_mib >= 16, "memory_mib must be >= 16")
        _require(self.machine.startswith(("q35", "pc-q35-")), f"machine {self.machine!r} not q35")
        passthrough = self.cpu.model == "host-passthrough"
        _require(not passthrough or self.accel is Accelerator.KVM, "host-passthrough needs KVM")
        sata = [d for d in self.disks if d.bus is DiskBus.SATA]
        _require(len(sata) <= SATA_PORTS, f"q35 has {SATA_PORTS} SATA ports, {len(sata)} disks")
        ids = [d.id for d in self.disks] + [n.id for n in self.nics]
        _require(len(ids) == len(set(ids)), "disk and nic ids must be unique")
        orders = [d.boot_order for d in self.disks] + [n.boot_order for n in self.nics]
        given = [o for o in orders if o is not None]
        _require(len(given) == len(set(given)), "boot orders must be unique")
