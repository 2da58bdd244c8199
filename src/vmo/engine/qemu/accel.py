"""Which accelerator this host can really run guests with: KVM when a probe guest proves it, else TCG.

Opening ``/dev/kvm`` is not proof: on some hosts KVM creates VMs whose vCPUs stall as soon as they
leave real mode, and on others (PVM, ``kvm_pvm``) only 64-bit code runs while boot loaders' 32-bit
protected mode fails (an ``iret`` there is an "emulation failure"). The probe boots a 512-byte boot
sector that goes through 32-bit protected mode, with an ``iret`` as syslinux does, to 64-bit long
mode (as every x86-64 guest kernel does), writes a marker to COM1 and exits QEMU through
``isa-debug-exit``. The verdict is cached per QEMU version and kernel release.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from vmo.engine.qemu.errors import QemuNotFound

__all__ = [
    "PROBE_MARKER",
    "Accelerator",
    "ProbeResult",
    "detect_accelerator",
    "probe_boot_sector",
    "probe_kvm",
]

log = logging.getLogger("vmo.engine.qemu.accel")

PROBE_MARKER = b"VMOKVMOK"
_ORIGIN = 0x7C00
_DEBUG_EXIT_PORT = 0xF4
_DEBUG_EXIT_VALUE = 0x10
# isa-debug-exit makes QEMU exit with (value << 1) | 1.
_PROBE_EXIT_CODE = (_DEBUG_EXIT_VALUE << 1) | 1
_PROBE_REVISION = "2"


class Accelerator(StrEnum):
    """QEMU's ``-accel`` values VMO uses."""

    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class ProbeResult:
    """What one KVM probe run showed."""

    works: bool
    detail: str


# GDT selectors of the probe: 64-bit code, flat 32-bit code, flat 32-bit data.
_CODE64, _CODE32, _DATA32 = 0x08, 0x10, 0x18
_GDT = struct.pack("<QQQQ", 0, 0x00209A0000000000, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)


def _real_mode(gdtr: int, protected_mode: int) -> bytes:
    """16-bit code: identity-map the first 2 MiB (for later), enter 32-bit protected mode."""
    return b"".join(
        [
            b"\xfa",  # cli
            b"\x31\xc0",  # xor ax, ax
            b"\x8e\xd8\x8e\xc0\x8e\xd0",  # mov ds/es/ss, ax
            b"\xbc\x00\x7c",  # mov sp, 0x7c00
            b"\xbf\x00\x10",  # mov di, 0x1000          page tables at 0x1000..0x3fff
            b"\xb9\x00\x0c",  # mov cx, 0x0c00
            b"\x66\x31\xc0",  # xor eax, eax
            b"\x66\xf3\xab",  # rep stosd               zero them
            b"\xc7\x06\x00\x10\x03\x20",  # mov word [0x1000], 0x2003   PML4[0] -> PDPT
            b"\xc7\x06\x00\x20\x03\x30",  # mov word [0x2000], 0x3003   PDPT[0] -> PD
            b"\xc7\x06\x00\x30\x83\x00",  # mov word [0x3000], 0x0083   PD[0]: 2 MiB page at 0
            b"\x0f\x01\x16" + struct.pack("<H", gdtr),  # lgdt [gdtr]
            b"\x0f\x20\xc0",  # mov eax, cr0
            b"\x66\x83\xc8\x01",  # or eax, 1               PE
            b"\x0f\x22\xc0",  # mov cr0, eax
            b"\xea" + struct.pack("<HH", protected_mode, _CODE32),  # jmp 0x10:protected_mode
        ]
    )


def _protected_mode(origin: int, long_mode: int) -> bytes:
    """32-bit code at ``origin``: flat segments, an ``iret`` to the next instruction (what PVM's
    emulator cannot do), then PAE + long mode + paging and a jump to 64-bit code."""
    head = b"".join(
        [
            b"\x66\xb8" + struct.pack("<H", _DATA32),  # mov ax, 0x18
            b"\x8e\xd8\x8e\xc0\x8e\xd0",  # mov ds/es/ss, ax
            b"\xbc\x00\x7c\x00\x00",  # mov esp, 0x7c00
            b"\x9c",  # pushfd
            b"\x6a" + bytes([_CODE32]),  # push 0x10
        ]
    )
    after_iret = origin + len(head) + 6  # past "push imm32" (5 bytes) and "iretd" (1)
    return b"".join(
        [
            head,
            b"\x68" + struct.pack("<I", after_iret),  # push after_iret
            b"\xcf",  # iretd
            b"\x0f\x20\xe0",  # after_iret: mov eax, cr4
            b"\x83\xc8\x20",  # or eax, 0x20            PAE
            b"\x0f\x22\xe0",  # mov cr4, eax
            b"\xb8\x00\x10\x00\x00",  # mov eax, 0x1000
            b"\x0f\x22\xd8",  # mov cr3, eax
            b"\xb9\x80\x00\x00\xc0",  # mov ecx, 0xc0000080      EFER
            b"\x0f\x32",  # rdmsr
            b"\x0d\x00\x01\x00\x00",  # or eax, 0x100           LME
            b"\x0f\x30",  # wrmsr
            b"\x0f\x20\xc0",  # mov eax, cr0
            b"\x0d\x00\x00\x00\x80",  # or eax, 0x80000000      PG
            b"\x0f\x22\xc0",  # mov cr0, eax
            b"\xea" + struct.pack("<IH", long_mode, _CODE64),  # jmp 0x08:long_mode
        ]
    )


def _long_mode(message: int) -> bytes:
    """64-bit code: write the NUL-terminated message to COM1, then exit through isa-debug-exit."""
    return b"".join(
        [
            b"\x66\xba\xf8\x03",  # mov dx, 0x3f8
            b"\xbe" + struct.pack("<I", message),  # mov esi, message
            b"\xac",  # next: lodsb
            b"\x84\xc0",  # test al, al
            b"\x74\x03",  # jz done
            b"\xee",  # out dx, al
            b"\xeb\xf8",  # jmp next
            bytes([0xB0, _DEBUG_EXIT_VALUE]),  # done: mov al, value
            bytes([0xE6, _DEBUG_EXIT_PORT]),  # out port, al
            b"\xf4",  # halt: hlt
            b"\xeb\xfd",  # jmp halt
        ]
    )


def probe_boot_sector() -> bytes:
    """The probe guest: a bootable 512-byte MBR image."""
    code16_end = len(_real_mode(0, 0))
    code32_end = code16_end + len(_protected_mode(0, 0))
    code64_end = code32_end + len(_long_mode(0))
    gdt_off = (code64_end + 7) & ~7
    gdtr_off = gdt_off + len(_GDT)
    message_off = gdtr_off + 6
    image = bytearray(512)
    image[:code16_end] = _real_mode(_ORIGIN + gdtr_off, _ORIGIN + code16_end)
    image[code16_end:code32_end] = _protected_mode(_ORIGIN + code16_end, _ORIGIN + code32_end)
    image[code32_end:code64_end] = _long_mode(_ORIGIN + message_off)
    image[gdt_off:gdtr_off] = _GDT
    image[gdtr_off:message_off] = struct.pack("<HI", len(_GDT) - 1, _ORIGIN + gdt_off)
    message = PROBE_MARKER + b"\r\n\0"
    image[message_off : message_off + len(message)] = message
    image[510:512] = b"\x55\xaa"
    return bytes(image)


def probe_argv(qemu: str, image: Path, accel: Accelerator) -> list[str]:
    """The probe's command line; ``-cpu host`` under KVM because that is what VMs will use."""
    cpu = "host" if accel is Accelerator.KVM else "max"
    return [
        qemu,
        "-accel",
        accel.value,
        "-machine",
        "q35",
        "-cpu",
        cpu,
        "-m",
        "16",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-device",
        f"isa-debug-exit,iobase={_DEBUG_EXIT_PORT:#x},iosize=0x1",
        "-drive",
        f"file={image},format=raw,if=ide,index=0,media=disk",
    ]


def probe_kvm(
    qemu: str = "qemu-system-x86_64",
    *,
    timeout: float = 5.0,
    accel: Accelerator = Accelerator.KVM,
) -> ProbeResult:
    """Boots the probe guest under ``accel``; it works if the marker appears within ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="vmo-accel-") as tmp:
        image = Path(tmp) / "probe.img"
        image.write_bytes(probe_boot_sector())
        # SeaBIOS's AHCI driver (q35) will not boot a disk shorter than a few sectors.
        os.truncate(image, 1 << 20)
        argv = probe_argv(qemu, image, accel)
        try:
            run = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                cwd=tmp,  # a crashing QEMU may dump core: keep it in the throwaway directory
            )
        except subprocess.TimeoutExpired:
            # subprocess.run kills the child on timeout: a stalled vCPU is exactly this case.
            return ProbeResult(False, f"no marker within {timeout:g} s under {accel}")
        except OSError as exc:
            raise QemuNotFound(f"cannot run {qemu}: {exc}") from exc
    if PROBE_MARKER in run.stdout and run.returncode == _PROBE_EXIT_CODE:
        return ProbeResult(True, f"probe guest printed its marker under {accel}")
    last = run.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no stderr"]
    return ProbeResult(False, f"probe under {accel} exited {run.returncode}: {last[0]}")


def qemu_version(qemu: str) -> str:
    """The first line of ``qemu --version``: part of the cache key."""
    try:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise QemuNotFound(f"cannot run {qemu} --version: {exc}") from exc
    return out.splitlines()[0].strip() if out else "unknown"


def _cache_key(qemu: str) -> dict[str, str]:
    path = shutil.which(qemu) or qemu
    return {
        # a verdict of an older, weaker probe is not kept (the first one passed on PVM hosts)
        "probe": _PROBE_REVISION,
        "qemu": os.path.realpath(path),
        "qemuVersion": qemu_version(qemu),
        "kernel": platform.release(),
    }


def _read_cache(cache_file: Path, key: dict[str, str]) -> Accelerator | None:
    try:
        data = json.loads(cache_file.read_text())
        if data.get("key") == key:
            return Accelerator(data["accelerator"])
    except (OSError, ValueError, KeyError, TypeError):
        # A missing or unreadable cache only costs one probe.
        return None
    return None


def _write_cache(cache_file: Path, key: dict[str, str], verdict: Accelerator, detail: str) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"key": key, "accelerator": verdict.value, "detail": detail}, indent=2)
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    tmp.write_text(body + "\n")
    tmp.replace(cache_file)


def _kvm_device_opens(device: Path) -> bool:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def detect_accelerator(
    cache_file: Path,
    *,
    qemu: str = "qemu-system-x86_64",
    timeout: float = 5.0,
    override: bool | None = None,
    kvm_device: Path = Path("/dev/kvm"),
) -> Accelerator:
    """KVM if a probe guest really runs under it, else TCG; cached per QEMU version and kernel.

    ``override=True`` forces emulation without probing, as KubeVirt's
    ``developerConfiguration.useEmulation`` does.
    """
    if override:
        log.info("emulation forced: using TCG without probing")
        return Accelerator.TCG
    key = _cache_key(qemu)
    cached = _read_cache(cache_file, key)
    if cached is not None:
        log.debug("accelerator %s from cache %s", cached, cache_file)
        return cached
    if _kvm_device_opens(kvm_device):
        result = probe_kvm(qemu, timeout=timeout)
    else:
        result = ProbeResult(False, f"{kvm_device} cannot be opened")
    verdict = Accelerator.KVM if result.works else Accelerator.TCG
    log.info("accelerator %s: %s", verdict, result.detail)
    _write_cache(cache_file, key, verdict, result.detail)
    return verdict
