"""``qemu_argv(domain)``: the exact QEMU command line for a ``Domain``, as a pure function.

Modern syntax only: ``-blockdev`` (JSON) with ``-device``, ``-netdev``, socket chardevs that never
wait for a client, ``-nodefaults`` so that every device on the command line is one VMO asked for.
The output is pinned by golden tests (tests/golden/qemu).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from vmo.engine.qemu.accel import Accelerator
from vmo.engine.qemu.domain import (
    CpuTopology,
    Disk,
    DiskBus,
    DiskCache,
    Domain,
    EfiFirmware,
    Nic,
    RuntimePaths,
    TapBackend,
    UserBackend,
)

__all__ = [
    "DEFAULT_QEMU",
    "GUEST_AGENT_CHANNEL",
    "SCSI_CONTROLLER",
    "cpu_model",
    "disk_node_names",
    "format_node_name",
    "qemu_argv",
    "storage_argv",
]

DEFAULT_QEMU = "qemu-system-x86_64"

OptValue = str | int | bool | None

# cache mode -> (O_DIRECT on the file, ignore flushes, guest-visible write cache), as libvirt maps them.
_CACHE_MODES: dict[DiskCache, tuple[bool, bool, bool]] = {
    DiskCache.NONE: (True, False, True),
    DiskCache.WRITETHROUGH: (False, False, False),
    DiskCache.WRITEBACK: (False, False, True),
    DiskCache.DIRECTSYNC: (True, False, False),
    DiskCache.UNSAFE: (False, True, True),
}

# (bus, cdrom) -> QEMU device driver.
_DISK_DRIVERS: dict[tuple[DiskBus, bool], str] = {
    (DiskBus.VIRTIO, False): "virtio-blk-pci",
    (DiskBus.SATA, False): "ide-hd",
    (DiskBus.SATA, True): "ide-cd",
    (DiskBus.SCSI, False): "scsi-hd",
    (DiskBus.SCSI, True): "scsi-cd",
}

# Under TCG there is no host CPU to pass through; "max" enables everything TCG can emulate.
_HOST_MODELS: dict[tuple[str, Accelerator], str] = {
    ("host-model", Accelerator.KVM): "host",
    ("host-model", Accelerator.TCG): "max",
    ("host-passthrough", Accelerator.KVM): "host",
}


def _sandbox(run_as: str | None) -> str:
    # QEMU installs its seccomp filter before -runas drops privileges, so the set*uid calls
    # -runas makes must stay allowed (measured: QEMU 7.2 dies of SIGSYS otherwise).
    elevate = "deny" if run_as is None else "allow"
    return _opts(
        "on",
        ("obsolete", "deny"),
        ("elevateprivileges", elevate),
        ("spawn", "deny"),
        ("resourcecontrol", "deny"),
    )


_SCSI_CONTROLLER = "scsi0"
SCSI_CONTROLLER = _SCSI_CONTROLLER
_VIRTIO_SERIAL = "virtio-serial0"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


def _escape(value: str) -> str:
    # QEMU's key=value parser takes a doubled comma as a literal comma.
    return value.replace(",", ",,")


def _opts(head: str, *pairs: tuple[str, OptValue]) -> str:
    """``head,key=value,...`` with None values left out and booleans as on/off."""
    parts = [_escape(head)]
    for key, value in pairs:
        if value is None:
            continue
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        parts.append(f"{key}={_escape(text)}")
    return ",".join(parts)


def _blockdev(spec: dict[str, Any]) -> list[str]:
    return ["-blockdev", json.dumps(spec, separators=(",", ":"))]


def _device_id(item_id: str) -> str:
    # "ua-" (user alias, as libvirt names them) keeps ids starting with a letter, as QEMU requires.
    return f"ua-{item_id}"


def _identity(domain: Domain) -> list[str]:
    argv = [
        "-name",
        _opts(f"guest={domain.name}", ("debug-threads", True)),
        "-uuid",
        str(domain.uuid),
    ]
    if domain.smbios_serial is not None:
        argv += ["-smbios", _opts("type=1", ("serial", domain.smbios_serial))]
    return argv


def _firmware_blockdevs(efi: EfiFirmware) -> list[str]:
    code = {"driver": "file", "filename": str(efi.code), "node-name": "fw-code-file"}
    vars_ = {"driver": "file", "filename": str(efi.vars), "node-name": "fw-vars-file"}
    return [
        *_blockdev({**code, "read-only": True}),
        *_blockdev(
            {"driver": "raw", "file": "fw-code-file", "node-name": "fw-code", "read-only": True}
        ),
        *_blockdev({**vars_, "read-only": False}),
        *_blockdev(
            {"driver": "raw", "file": "fw-vars-file", "node-name": "fw-vars", "read-only": False}
        ),
    ]


def _machine(domain: Domain) -> list[str]:
    efi = domain.efi
    machine = _opts(
        domain.machine,
        ("usb", False),
        ("dump-guest-core", False),
        ("smm", True if efi and efi.secure_boot else None),
        ("pflash0", "fw-code" if efi else None),
        ("pflash1", "fw-vars" if efi else None),
    )
    argv = _firmware_blockdevs(efi) if efi else []
    argv += ["-machine", machine, "-accel", domain.accel.value]
    if efi and efi.secure_boot:
        # Only SMM code may write the variable store, or secure boot can be switched off by the OS.
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return argv


def cpu_model(cpu: CpuTopology, accel: Accelerator) -> str:
    """The ``-cpu`` value: KubeVirt's host-model/host-passthrough mapped for the accelerator."""
    if cpu.model in ("host-model", "host-passthrough"):
        model = _HOST_MODELS.get((cpu.model, accel))
        if model is None:
            raise ValueError(f"cpu model {cpu.model} needs KVM, accelerator is {accel}")
        return model
    return cpu.model


def _cpu_and_memory(domain: Domain) -> list[str]:
    cpu = domain.cpu
    smp = _opts(
        f"cpus={cpu.vcpus}",
        ("sockets", cpu.sockets),
        ("cores", cpu.cores),
        ("threads", cpu.threads),
    )
    return ["-cpu", cpu_model(cpu, domain.accel), "-smp", smp, "-m", f"{domain.memory_mib}M"]


def _host_runtime(domain: Domain) -> list[str]:
    return _host_runtime_of(domain.paths, domain.run_as, domain.sandbox)


def _host_runtime_of(paths: RuntimePaths, run_as: str | None, sandbox: bool) -> list[str]:
    argv = [
        "-pidfile",
        str(paths.pidfile),
        "-chardev",
        _opts(
            "socket",
            ("id", "charmonitor"),
            ("path", str(paths.qmp)),
            ("server", True),
            ("wait", False),
        ),
        "-mon",
        "chardev=charmonitor,id=monitor,mode=control",
    ]
    if run_as is not None:
        argv += ["-runas", run_as]
    if sandbox:
        argv += ["-sandbox", _sandbox(run_as)]
    return argv


def _disk_backend(index: int, disk: Disk) -> list[str]:
    direct, no_flush, _ = _CACHE_MODES[disk.cache]
    cache = {"direct": direct, "no-flush": no_flush}
    file_node = f"disk{index}-file"
    file_spec = {
        "driver": "file",
        "filename": str(disk.path),
        "node-name": file_node,
        "cache": cache,
        "read-only": disk.readonly,
        "discard": "unmap",
    }
    format_spec = {
        "driver": disk.format.value,
        "file": file_node,
        "node-name": _format_node(index),
        "cache": cache,
        "read-only": disk.readonly,
        "discard": "unmap",
    }
    return [*_blockdev(file_spec), *_blockdev(format_spec)]


def _disk_buses(disks: Iterable[Disk]) -> Iterator[str | None]:
    """The ``bus=`` value of each disk: AHCI ports in order, the one SCSI controller, or none."""
    sata_port = 0
    for disk in disks:
        if disk.bus is DiskBus.SATA:
            yield f"ide.{sata_port}"
            sata_port += 1
        elif disk.bus is DiskBus.SCSI:
            yield f"{_SCSI_CONTROLLER}.0"
        else:
            yield None


def _disk_device(index: int, disk: Disk, bus: str | None) -> list[str]:
    _, _, write_cache = _CACHE_MODES[disk.cache]
    device = _opts(
        _DISK_DRIVERS[(disk.bus, disk.cdrom)],
        ("bus", bus),
        ("drive", _format_node(index)),
        ("id", _device_id(disk.id)),
        ("bootindex", disk.boot_order),
        ("serial", disk.serial),
        ("write-cache", write_cache),
    )
    return ["-device", device]


def _disks(domain: Domain) -> list[str]:
    argv: list[str] = []
    if domain.scsi_controller or any(disk.bus is DiskBus.SCSI for disk in domain.disks):
        argv += ["-device", _opts("virtio-scsi-pci", ("id", _SCSI_CONTROLLER))]
    for index, (disk, bus) in enumerate(zip(domain.disks, _disk_buses(domain.disks), strict=True)):
        argv += _disk_backend(index, disk) + _disk_device(index, disk, bus)
    return argv


def _user_netdev(netdev_id: str, backend: UserBackend) -> str:
    guest = str(backend.guest_address)
    forwards = [
        ("hostfwd", f"{f.proto}:{f.host_addr}:{f.host_port}-{guest}:{f.guest_port}")
        for f in backend.hostfwds
    ]
    return _opts(
        "user",
        ("id", netdev_id),
        ("net", str(backend.network)),
        ("host", str(backend.gateway)),
        ("dhcpstart", guest),
        ("dns", str(backend.dns)),
        *forwards,
    )


def _netdev(netdev_id: str, backend: TapBackend | UserBackend) -> str:
    if isinstance(backend, UserBackend):
        return _user_netdev(netdev_id, backend)
    # The network layer owns the tap's lifetime; QEMU must not run ifup/ifdown scripts.
    return _opts(
        "tap",
        ("id", netdev_id),
        ("ifname", backend.ifname),
        ("script", "no"),
        ("downscript", "no"),
    )


def _nic(index: int, nic: Nic) -> list[str]:
    netdev_id = f"netdev{index}"
    device = _opts(
        nic.model.value,
        ("netdev", netdev_id),
        ("id", _device_id(nic.id)),
        ("mac", nic.mac),
        ("bootindex", nic.boot_order),
    )
    return ["-netdev", _netdev(netdev_id, nic.backend), "-device", device]


def _nics(domain: Domain) -> list[str]:
    return [arg for index, nic in enumerate(domain.nics) for arg in _nic(index, nic)]


def _socket_chardev(chardev_id: str, path: str, *, logfile: str | None = None) -> list[str]:
    return [
        "-chardev",
        _opts(
            "socket",
            ("id", chardev_id),
            ("path", path),
            ("server", True),
            ("wait", False),
            ("logfile", logfile),
        ),
    ]


def _consoles(domain: Domain) -> list[str]:
    paths = domain.paths
    # QEMU records the guest's serial output whether or not a console is attached (upstream's
    # guest-console-log container); a new QEMU starts a new log, as a new launcher pod does
    argv = _socket_chardev("charserial0", str(paths.serial), logfile=str(paths.serial_log))
    argv += ["-device", "isa-serial,chardev=charserial0,id=serial0"]
    if domain.guest_agent:
        argv += ["-device", _opts("virtio-serial-pci", ("id", _VIRTIO_SERIAL))]
        argv += _socket_chardev("charchannel0", str(paths.guest_agent))
        argv += [
            "-device",
            _opts(
                "virtserialport",
                ("bus", f"{_VIRTIO_SERIAL}.0"),
                ("nr", 1),
                ("chardev", "charchannel0"),
                ("id", "channel0"),
                ("name", GUEST_AGENT_CHANNEL),
            ),
        ]
    if domain.graphics:
        argv += ["-device", "VGA,id=video0"]
    argv += ["-vnc", f"unix:{_escape(str(paths.vnc))}"]
    return argv


def _rng(domain: Domain) -> list[str]:
    if not domain.rng:
        return []
    return [
        "-object",
        "rng-random,id=objrng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=objrng0,id=rng0",
    ]


def _kernel_boot(domain: Domain) -> list[str]:
    boot = domain.kernel_boot
    if boot is None:
        return []
    argv = ["-kernel", str(boot.kernel)]
    if boot.initrd is not None:
        argv += ["-initrd", str(boot.initrd)]
    if boot.cmdline:
        argv += ["-append", boot.cmdline]
    return argv


def _start_state(domain: Domain) -> list[str]:
    """How the guest starts: as a migration's destination, which runs it by itself once the
    migration completes (so never with -S), stopped (``-S``), or running."""
    if domain.incoming is not None:
        return ["-incoming", domain.incoming]
    return ["-S"] if domain.start_paused else []


def disk_node_names(domain: Domain) -> dict[str, str]:
    """Each disk's id -> the node name of its format layer (what block jobs and exports name)."""
    return {disk.id: _format_node(index) for index, disk in enumerate(domain.disks)}


def format_node_name(index: int) -> str:
    """The node name of the format layer of a VM's (or a storage QEMU's) disk ``index``."""
    return f"disk{index}-format"


_format_node = format_node_name


def qemu_argv(domain: Domain, *, binary: str = DEFAULT_QEMU) -> list[str]:
    """The complete command line (``argv[0]`` is ``binary``) that runs ``domain``."""
    return [
        binary,
        *_identity(domain),
        "-msg",
        "timestamp=on",
        "-no-user-config",
        "-nodefaults",
        "-display",
        "none",
        *_machine(domain),
        *_cpu_and_memory(domain),
        *_host_runtime(domain),
        *_disks(domain),
        *_nics(domain),
        *_consoles(domain),
        *_rng(domain),
        *_kernel_boot(domain),
        *_start_state(domain),
    ]


def storage_argv(
    name: str,
    disks: Sequence[Disk],
    paths: RuntimePaths,
    *,
    run_as: str | None,
    sandbox: bool = True,
    binary: str = DEFAULT_QEMU,
) -> list[str]:
    """A QEMU that runs no guest (``-machine none``: no CPU, no memory, no device) and only opens
    ``disks`` as block nodes, named as a VM's are (``disk{i}-format``): what a backup of a
    stopped VM runs its block jobs, bitmaps and NBD export in. The images are opened on the
    command line, before ``-runas`` drops privileges, as a VM's are; quitting through QMP
    stores their persistent bitmaps."""
    argv = [
        binary,
        "-name",
        _opts(f"guest={name}", ("debug-threads", True)),
        "-msg",
        "timestamp=on",
        "-no-user-config",
        "-nodefaults",
        "-display",
        "none",
        "-machine",
        "none",
        *_host_runtime_of(paths, run_as, sandbox),
    ]
    for index, disk in enumerate(disks):
        argv += _disk_backend(index, disk)
    return argv
