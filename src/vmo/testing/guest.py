"""VMO's tiny test guest: a Debian kernel and busybox initramfs that boots in seconds under TCG.

``build_guest`` makes it from Debian packages without root (kernel + initramfs, and the same
boot files on a syslinux disk as raw, qcow2 and streamOptimized vmdk); ``seed_iso`` writes a
NoCloud seed; ``RunningGuest`` runs QEMU on it and watches the serial console.

Everything the guest does at boot lives in ``guest_init.sh`` (its /init): on success it prints
``VMO-GUEST-READY hostname=<h> ip=<a,b> mac=<m,n>`` on the serial console, counts seconds in
/run/vmo/counter, answers TCP 5432 with ``vmo-guest <hostname> counter=<n> macs=<...>`` and
echoes on TCP 7, and powers off cleanly on an ACPI power-button press. When QEMU gives it a
virtio-serial port named ``org.qemu.guest_agent.0`` it runs Debian's real ``qemu-ga`` on it, and
the kernel loads ext2/ext4 on demand, so ``mke2fs`` + ``mount`` give qemu-ga something to freeze.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import json
import logging
import lzma
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, Protocol

from vmo.engine.qemu.argv import GUEST_AGENT_CHANNEL

__all__ = [
    "DEFAULT_MAC",
    "READY_MARKER",
    "ElfLinking",
    "FileBundle",
    "GuestBuildError",
    "GuestImage",
    "GuestTimeoutError",
    "PackageVersions",
    "ReadyMarker",
    "RunningGuest",
    "build_guest",
    "default_cache_dir",
    "elf_linking",
    "free_port",
    "program_files",
    "qemu_argv",
    "seed_iso",
]

log = logging.getLogger(__name__)

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"
AGENT_BINARY = "usr/sbin/qemu-ga"
# Bump when the build recipe changes in a way the package versions and init script do not show.
BUILD_REVISION = 4
KERNEL_CMDLINE = "console=ttyS0 loglevel=4 panic=-1"
READY_MARKER = "VMO-GUEST-READY"
DEFAULT_MAC = "52:54:00:12:34:56"
DISK_SIZE = 48 * 1024 * 1024
PARTITION_OFFSET = 1024 * 1024
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")

# Drivers the guest may need. Device drivers load only when a device on the PCI or virtio bus
# matches one of their aliases: virtio for KubeVirt's default buses, e1000/e1000e for
# `model: e1000*`, ATA/AHCI/virtio-scsi for cdrom-attached seeds (sr_mod/sd_mod follow them).
DEVICE_MODULES = (
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "virtio_console",
    "e1000",
    "e1000e",
    "ata_piix",
    "ahci",
    "sr_mod",
    "sd_mod",
)
# Loaded on every boot: NoCloud filesystems, and the ACPI power button with its input events.
ALWAYS_MODULES = ("isofs", "vfat", "nls_cp437", "nls_utf8", "nls_iso8859_1", "button", "evdev")
# Loaded only when the kernel asks /sbin/modprobe for one of their aliases: ``fs-ext4``/``fs-ext2``
# on a mount (ext4 also serves ext2 in Debian's kernel), ``crypto-crc32c`` for metadata_csum.
ON_DEMAND_MODULES = ("ext4", "crc32c_generic")
GUEST_MODULES = DEVICE_MODULES + ALWAYS_MODULES + ON_DEMAND_MODULES

INITTAB = """\
::sysinit:/init boot
ttyS0::respawn:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/init shutdown
"""
ACPI_POWER_HANDLER = "#!/bin/sh\nexec /init power-button\n"
# The kernel's request_module() runs /sbin/modprobe; /init resolves names and aliases itself.
MODPROBE = '#!/bin/sh\nexec /init modprobe "$@"\n'
OS_RELEASE = f"""\
PRETTY_NAME="VMO test guest (Debian kernel, busybox)"
NAME="VMO test guest"
ID=vmo-guest
ID_LIKE=debian
VERSION_ID="{BUILD_REVISION}"
"""
# Inner archives of big, rarely needed files, unpacked by /init on first use: the kernel then
# inflates ~9 MB less before /init runs (about 0.3 s under TCG).
BUNDLE_DIR = "usr/lib/vmo"
# Debian's multiarch library directory: the dynamic loader searches it without an ld.so.cache.
LIBRARY_DIR = "lib/x86_64-linux-gnu"
LIBRARY_SEARCH = (LIBRARY_DIR, "usr/lib/x86_64-linux-gnu", "lib", "usr/lib")

SYSLINUX_CFG = f"""\
DEFAULT vmo
PROMPT 0
TIMEOUT 0
LABEL vmo
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND {KERNEL_CMDLINE}
"""


class _Decompressor(Protocol):
    def decompress(self, data: bytes, /) -> bytes: ...


class GuestBuildError(Exception):
    """A step of the guest build failed; carries the command and what it printed."""

    def __init__(self, message: str, *, argv: Sequence[str] = (), output: str = "") -> None:
        detail = f"{message}: {' '.join(argv)}\n{output}" if argv else message
        super().__init__(detail.rstrip())
        self.argv = list(argv)
        self.output = output


class GuestTimeoutError(Exception):
    """The guest's console did not show what was awaited in time."""

    def __init__(self, pattern: str, timeout: float, console: str) -> None:
        tail = console[-3000:]
        super().__init__(f"no {pattern!r} on the console within {timeout:.0f} s; tail:\n{tail}")
        self.pattern = pattern
        self.console = console


@dataclass(frozen=True)
class PackageVersions:
    """The exact Debian packages a guest build is made of (the cache key's main part)."""

    kernel_package: str
    kernel_version: str
    busybox_version: str
    # qemu-guest-agent and its Depends closure: (package, version), sorted
    agent_packages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GuestImage:
    """The files of one built guest, all inside ``root``."""

    root: Path
    kernel_release: str
    cmdline: str = KERNEL_CMDLINE

    @property
    def kernel(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def kernel_elf(self) -> Path:
        """The uncompressed kernel: QEMU boots it through its PVH entry point, skipping the
        bzImage decompressor (about 4 s of a 7 s boot under TCG)."""
        return self.root / "vmlinux"

    @property
    def initramfs(self) -> Path:
        return self.root / "initramfs.cpio.gz"

    @property
    def disk_raw(self) -> Path:
        return self.root / "disk.raw"

    @property
    def disk_qcow2(self) -> Path:
        return self.root / "disk.qcow2"

    @property
    def disk_vmdk(self) -> Path:
        return self.root / "disk.vmdk"


def default_cache_dir() -> Path:
    """``$VMO_GUEST_CACHE``, else ``~/.cache/vmo-test-guest``."""
    env = os.environ.get("VMO_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vmo-test-guest"


# --- running tools ---------------------------------------------------------------------------


def _run(argv: Sequence[str], *, cwd: Path | None = None, stdin: bytes | None = None) -> str:
    """Runs a tool. Every argv here puts ``--`` before its operands (files, package names), so
    that none is ever read as an option; each of these tools accepts it."""
    env = {**os.environ, "LC_ALL": "C", "MTOOLS_SKIP_CHECK": "1"}
    try:
        done = subprocess.run(
            list(argv), cwd=cwd, input=stdin, capture_output=True, env=env, check=False
        )
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} is not installed (see packages/apt.txt)") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")
        raise GuestBuildError(f"exit status {done.returncode}", argv=argv, output=output)
    return done.stdout.decode(errors="replace")


def _apt_stanzas(packages: Sequence[str]) -> dict[str, str]:
    """Each package's candidate stanza, from a single ``apt-cache show``."""
    text = _run(["apt-cache", "show", "--no-all-versions", "--", *packages])
    found: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        package = re.search(r"^Package: (\S+)$", stanza, re.MULTILINE)
        if package:
            found[package.group(1)] = stanza
    return found


def _field(stanza: str, name: str) -> str | None:
    value = re.search(rf"^{name}: (.*)$", stanza, re.MULTILINE)
    return value.group(1).strip() if value else None


def _apt_fields(packages: Sequence[str], name: str) -> dict[str, str]:
    """One field of each package's candidate version, from a single ``apt-cache show``."""
    found = {
        package: value
        for package, stanza in _apt_stanzas(packages).items()
        if (value := _field(stanza, name)) is not None
    }
    missing = set(packages) - set(found)
    if missing:
        raise GuestBuildError(f"apt-cache shows no {name} for {sorted(missing)}")
    return found


def package_versions() -> PackageVersions:
    """Asks apt which kernel ``linux-image-amd64`` points at, and the candidate versions."""
    depends = _apt_fields([KERNEL_META_PACKAGE], "Depends")[KERNEL_META_PACKAGE]
    kernel = next(
        (d.split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-")), None
    )
    if kernel is None:
        raise GuestBuildError(f"{KERNEL_META_PACKAGE} depends on no linux-image: {depends}")
    versions = _apt_fields([kernel, BUSYBOX_PACKAGE], "Version")
    agent = _apt_fields(sorted(_depends_closure(AGENT_PACKAGE)), "Version")
    return PackageVersions(
        kernel_package=kernel,
        kernel_version=versions[kernel],
        busybox_version=versions[BUSYBOX_PACKAGE],
        agent_packages=tuple(sorted(agent.items())),
    )


def _depends_closure(package: str) -> set[str]:
    """``package`` and everything its Depends pull in (first alternatives), from apt's
    candidates; the ELF files' DT_NEEDED then pick what the guest gets. Pre-Depends are left out:
    they serve maintainer scripts (init-system-helpers would bring perl), which never run here."""
    found: set[str] = set()
    todo = {package}
    while todo:
        found |= todo
        stanzas = _apt_stanzas(sorted(todo))
        if missing := todo - set(stanzas):
            raise GuestBuildError(f"apt-cache shows no package {sorted(missing)}")
        depends = (_field(stanza, "Depends") for stanza in stanzas.values())
        todo = {dep for deps in depends if deps for dep in _first_alternatives(deps)} - found
    return found


def _first_alternatives(depends: str) -> list[str]:
    """``libc6 (>= 2.34), a | b, c:any`` -> ``[libc6, a, c]``."""
    names = (group.split("|")[0].split("(")[0].strip() for group in depends.split(","))
    return [name.split(":")[0] for name in names if name]


# --- the build -------------------------------------------------------------------------------


def _init_script() -> bytes:
    return resources.files("vmo.testing").joinpath("guest_init.sh").read_bytes()


def _cache_key(versions: PackageVersions) -> str:
    recipe = {
        "versions": versions.__dict__,
        "revision": BUILD_REVISION,
        "modules": GUEST_MODULES,
        "cmdline": KERNEL_CMDLINE,
        "inittab": INITTAB,
        "init": hashlib.sha256(_init_script()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def build_guest(cache: Path) -> GuestImage:
    """Returns the guest for the current Debian packages, building it under ``cache`` if needed.

    Idempotent: a finished build lives in ``cache/guest-<key>`` (key = package versions + recipe)
    and is reused. A build happens in a temporary directory inside ``cache`` and is renamed into
    place whole, so an interrupted or concurrent build never leaves a half guest behind.
    """
    cache.mkdir(parents=True, exist_ok=True)
    try:
        versions = package_versions()
    except GuestBuildError:
        # Offline, or apt lists missing: a guest built earlier is still good for tests.
        built = _latest_build(cache)
        if built is None:
            raise
        log.warning("apt-cache failed; reusing the guest in %s", built.root)
        return built
    final = cache / f"guest-{_cache_key(versions)}"
    if (final / "manifest.json").exists():
        return _load(final)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        image = _build_into(work / "guest", versions, downloads=work / "debs")
        shutil.rmtree(work / "debs")
        with contextlib.suppress(OSError):  # lost a race with a concurrent build: keep theirs
            (work / "guest").rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _prune_except(cache, final)
    log.info("built test guest %s (kernel %s)", final, image.kernel_release)
    return _load(final)


def _load(root: Path) -> GuestImage:
    manifest = json.loads((root / "manifest.json").read_text())
    return GuestImage(root=root, kernel_release=manifest["kernel_release"])


def _prune_except(cache: Path, keep: Path) -> None:
    """Removes builds of older package versions or recipes (about 100 MB each)."""
    for old in cache.glob("guest-*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _latest_build(cache: Path) -> GuestImage | None:
    builds = sorted(cache.glob("guest-*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return _load(builds[-1].parent) if builds else None


def _build_into(root: Path, versions: PackageVersions, *, downloads: Path) -> GuestImage:
    downloads.mkdir(parents=True)
    root.mkdir()
    tree = downloads / "tree"
    userland = downloads / "userland"  # the agent's packages, kept apart from kernel and busybox
    base = {
        versions.kernel_package: versions.kernel_version,
        BUSYBOX_PACKAGE: versions.busybox_version,
    }
    debs = _download(base | dict(versions.agent_packages), downloads)
    for package, deb in debs.items():
        _extract(deb, tree if package in base else userland)
    release = _kernel_release(tree)
    shutil.copyfile(tree / "boot" / f"vmlinuz-{release}", root / "vmlinuz")
    (root / "vmlinux").write_bytes(uncompressed_kernel(root / "vmlinuz"))
    modules = module_plan(tree / "lib" / "modules" / release, GUEST_MODULES)
    agent = program_files(userland, AGENT_BINARY)
    _write_initramfs(
        root / "initramfs.cpio.gz", tree=tree, release=release, modules=modules, programs=agent
    )
    image = GuestImage(root=root, kernel_release=release)
    build_disk(image)
    manifest = {
        "kernel_release": release,
        "versions": versions.__dict__,
        "modules": modules.load_order,
        "programs": sorted([*agent.files, *agent.symlinks]),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return image


def _download(packages: dict[str, str], into: Path) -> dict[str, Path]:
    """Downloads the exact ``package: version`` .debs in one apt run; the file of each."""
    _run(
        ["apt-get", "download", "-q", "--", *(f"{p}={v}" for p, v in sorted(packages.items()))],
        cwd=into,
    )
    debs: dict[str, Path] = {}
    for package in packages:
        found = list(into.glob(f"{package}_*.deb"))
        if len(found) != 1:
            raise GuestBuildError(f"apt-get download left {len(found)} files for {package}")
        debs[package] = found[0]
    return debs


def _extract(deb: Path, tree: Path) -> None:
    tree.mkdir(exist_ok=True)
    _run(["dpkg-deb", "-x", "--", str(deb), str(tree)])


def _kernel_release(tree: Path) -> str:
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestBuildError(f"expected one kernel in the package, found {kernels}")
    return kernels[0]


def uncompressed_kernel(bzimage: Path) -> bytes:
    """The ELF kernel inside a bzImage (what the kernel's extract-vmlinux script finds)."""
    blob = bzimage.read_bytes()
    streams: list[tuple[bytes, Callable[[], _Decompressor]]] = [
        (b"\xfd7zXZ\x00", lzma.LZMADecompressor),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    ]
    for magic, make in streams:
        at = blob.find(magic)
        while at >= 0:
            with contextlib.suppress(lzma.LZMAError, zlib.error):
                elf = make().decompress(blob[at:])
                if elf.startswith(b"\x7fELF"):
                    return elf
            at = blob.find(magic, at + 1)
    raise GuestBuildError(f"no xz or gzip compressed ELF kernel found in {bzimage}")


# --- dynamically linked programs: what ld.so would load, found in extracted packages --------


_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NEEDED, _DT_STRTAB = 1, 5


@dataclass(frozen=True)
class ElfLinking:
    """What the dynamic loader reads from an ELF file's program headers."""

    interpreter: str | None
    needed: tuple[str, ...]


def elf_linking(blob: bytes) -> ElfLinking:
    """PT_INTERP and the DT_NEEDED sonames of a little-endian ELF64 file (what ``ldd`` starts
    from); the dynamic string table is found through the PT_LOAD segment that maps it."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2 or blob[5] != 1:
        raise GuestBuildError("not a little-endian ELF64 file")
    (phoff,) = struct.unpack_from("<Q", blob, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", blob, 0x36)
    headers = [struct.unpack_from("<IIQQQQ", blob, phoff + i * phentsize) for i in range(phnum)]
    interpreter = None
    dynamic: list[tuple[int, int]] = []
    for kind, _flags, offset, _vaddr, _paddr, size in headers:
        if kind == _PT_INTERP:
            interpreter = blob[offset : offset + size].rstrip(b"\x00").decode()
        elif kind == _PT_DYNAMIC:
            pairs = struct.iter_unpack("<QQ", blob[offset : offset + size])
            dynamic = list(itertools.takewhile(lambda pair: pair[0] != 0, pairs))
    strtab = next((value for tag, value in dynamic if tag == _DT_STRTAB), None)
    if strtab is None:
        return ElfLinking(interpreter, ())
    base = _file_offset(headers, strtab)
    needed = tuple(
        blob[base + value : blob.index(b"\x00", base + value)].decode()
        for tag, value in dynamic
        if tag == _DT_NEEDED
    )
    return ElfLinking(interpreter, needed)


def _file_offset(headers: list[tuple[int, ...]], address: int) -> int:
    for kind, _flags, offset, vaddr, _paddr, size in headers:
        if kind == _PT_LOAD and vaddr <= address < vaddr + size:
            return address - vaddr + offset
    raise GuestBuildError(f"address {address:#x} is in no PT_LOAD segment")


@dataclass(frozen=True)
class FileBundle:
    """Files that go into the guest together, by initramfs path (e.g. a program and what the
    loader needs to run it)."""

    files: dict[str, bytes]
    symlinks: dict[str, str]

    def archive(self) -> bytes:
        """These files as a gzipped newc cpio archive (what /init's ``unpack`` extracts)."""
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
            cpio = _Cpio(gz)
            for name, data in sorted(self.files.items()):
                cpio.file(name, data, executable=not name.endswith(".ko"))
            for name, target in sorted(self.symlinks.items()):
                cpio.symlink(name, target)
            cpio.trailer()
        return out.getvalue()


def program_files(tree: Path, program: str) -> FileBundle:
    """``program`` (a path in ``tree``, an extracted set of .debs) with what ld.so would load:
    DT_NEEDED sonames, transitively, from Debian's library directories of that same tree, put
    under ``LIBRARY_DIR`` by soname, and the loader at its PT_INTERP path."""
    files = {program: _tree_file(tree, program).read_bytes()}
    linking = elf_linking(files[program])
    symlinks: dict[str, str] = {}
    todo = list(linking.needed)
    if linking.interpreter is not None:
        loader = Path(linking.interpreter).name
        symlinks[linking.interpreter.lstrip("/")] = f"/{LIBRARY_DIR}/{loader}"
        todo.append(loader)
    while todo:
        soname = todo.pop()
        path = f"{LIBRARY_DIR}/{soname}"
        if path in files:
            continue
        files[path] = _library(tree, soname).read_bytes()
        todo += elf_linking(files[path]).needed
    return FileBundle(files=files, symlinks=symlinks)


def _library(tree: Path, soname: str) -> Path:
    for directory in LIBRARY_SEARCH:
        with contextlib.suppress(FileNotFoundError):
            return _tree_file(tree, f"{directory}/{soname}")
    raise GuestBuildError(f"shared library {soname} is in none of {LIBRARY_SEARCH} of {tree}")


def _tree_file(tree: Path, path: str) -> Path:
    """``tree/path`` with symlinks followed inside ``tree`` (absolute targets are the guest's
    paths, not the host's)."""
    current = tree / path
    for _ in range(16):
        if not current.is_symlink():
            if not current.is_file():
                raise FileNotFoundError(current)
            return current
        target = os.readlink(current)
        current = tree / target.lstrip("/") if target.startswith("/") else current.parent / target
    raise GuestBuildError(f"too many symlinks resolving {path} in {tree}")


# --- kernel modules --------------------------------------------------------------------------


def _modinfo(path: Path, key: str) -> list[str]:
    """Values of one modinfo key, read from the module's NUL-separated ``.modinfo`` strings."""
    pattern = re.compile(rb"(?:^|\x00)" + key.encode() + rb"=([^\x00]*)")
    return [m.decode() for m in pattern.findall(path.read_bytes())]


def _module_name(path: Path) -> str:
    return path.name.removesuffix(".ko").replace("-", "_")


@dataclass(frozen=True)
class ModulePlan:
    """What the guest's /init needs to load modules without depmod: per module, its insmod
    sequence (dependencies first, paths relative to the modules directory), and its aliases."""

    load_order: dict[str, list[str]]
    aliases: dict[str, list[str]]

    def all_paths(self) -> list[str]:
        return sorted({p for paths in self.load_order.values() for p in paths})


def module_plan(modules_dir: Path, wanted: Sequence[str]) -> ModulePlan:
    """Resolves ``wanted`` modules from each module's own ``depends=`` string (the kernel
    package ships no modules.dep: depmod makes it at install time)."""
    index = {_module_name(p): p for p in modules_dir.rglob("*.ko")}

    def visit(name: str, order: list[str]) -> None:
        path = index.get(name)
        if path is None:
            raise GuestBuildError(f"kernel module {name} not found in {modules_dir}")
        relative = str(path.relative_to(modules_dir))
        if relative in order:
            return
        for deps in _modinfo(path, "depends"):
            for dep in filter(None, deps.split(",")):
                visit(dep.replace("-", "_"), order)
        order.append(relative)

    load_order: dict[str, list[str]] = {}
    for name in wanted:
        load_order[name] = []
        visit(name, load_order[name])
    aliases = {name: _modinfo(index[name], "alias") for name in wanted}
    return ModulePlan(load_order=load_order, aliases=aliases)


# --- initramfs (newc cpio, written here so that no root is needed for /dev/console) ----------


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass
class _Cpio:
    out: _Sink
    inode: int = 1

    def entry(
        self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = (self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.inode += 1
        self._padded(header + name.encode() + b"\x00")
        self._padded(data)

    def _padded(self, blob: bytes) -> None:
        self.out.write(blob + b"\x00" * (-len(blob) % 4))

    def directory(self, name: str) -> None:
        self.entry(name, 0o040755)

    def file(self, name: str, data: bytes, *, executable: bool = False) -> None:
        self.entry(name, 0o100755 if executable else 0o100644, data)

    def symlink(self, name: str, target: str) -> None:
        self.entry(name, 0o120777, target.encode())

    def trailer(self) -> None:
        self.entry("TRAILER!!!", 0)


def _module_files(modules: ModulePlan, moddir: str) -> dict[str, str]:
    """The /etc/vmo files through which /init loads modules (see its ``load``)."""
    order = "".join(
        f"{name} {' '.join(f'/{moddir}/{p}' for p in paths)}\n"
        for name, paths in modules.load_order.items()
    )
    aliases = "".join(
        f"{alias} {name}\n"
        for name in DEVICE_MODULES
        for alias in modules.aliases[name]
        # only device buses /init scans; sr_mod/sd_mod are loaded after the controllers
        if alias.startswith(("pci:", "virtio:"))
    )
    # exact names the kernel requests (fs-ext2, crypto-crc32c), for /init's modprobe
    requested = "".join(
        f"{alias} {name}\n" for name in ON_DEMAND_MODULES for alias in modules.aliases[name]
    )
    return {
        "etc/vmo/modules": order,
        "etc/vmo/modaliases": aliases,
        "etc/vmo/modules-always": " ".join(ALWAYS_MODULES) + "\n",
        "etc/vmo/aliases": requested,
    }


def _write_initramfs(
    path: Path, *, tree: Path, release: str, modules: ModulePlan, programs: FileBundle
) -> None:
    moddir = f"lib/modules/{release}"
    bundles = _bundles(tree=tree, moddir=moddir, modules=modules, programs=programs)
    eager = {f"{moddir}/{m}" for m in modules.all_paths()} - set(bundles["modules"].files)
    dirs = {"bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp"}
    dirs |= {"etc", "etc/vmo", "etc/acpi", "etc/acpi/PWRF", "root", "mnt", "var", "var/run"}
    dirs |= {"usr/lib", BUNDLE_DIR}
    placed = [*eager, *(name for b in bundles.values() for name in [*b.files, *b.symlinks])]
    for file in placed:
        parent = Path(file).parent
        dirs |= {str(parent), *(str(p) for p in parent.parents if str(p) != ".")}
    # mtime 0 keeps the initramfs byte-identical across builds of the same inputs.
    with gzip.GzipFile(path, "wb", compresslevel=6, mtime=0) as gz:
        cpio = _Cpio(gz)
        for name in sorted(dirs):
            cpio.directory(name)
        # Without /dev/console in the initramfs the kernel starts /init with no stdio.
        cpio.entry("dev/console", 0o020600, rdev=(5, 1))
        cpio.file("bin/busybox", (tree / "bin" / "busybox").read_bytes(), executable=True)
        cpio.symlink("bin/sh", "busybox")
        cpio.file("init", _init_script(), executable=True)
        cpio.file("etc/inittab", INITTAB.encode())
        cpio.file("etc/acpi/PWRF/00000080", ACPI_POWER_HANDLER.encode(), executable=True)
        # before busybox --install, which leaves existing files alone
        cpio.file("sbin/modprobe", MODPROBE.encode(), executable=True)
        cpio.file("etc/os-release", OS_RELEASE.encode())
        for name, text in _module_files(modules, moddir).items():
            cpio.file(name, text.encode())
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        for name in sorted(eager):
            cpio.file(name, (tree / name).read_bytes())
        for bundle, files in bundles.items():
            cpio.file(f"{BUNDLE_DIR}/{bundle}.cpio.gz", files.archive())
        cpio.trailer()


def _bundles(
    *, tree: Path, moddir: str, modules: ModulePlan, programs: FileBundle
) -> dict[str, FileBundle]:
    """The files /init unpacks on first use: the agent, and the modules only on-demand modules
    need (ext4 and its dependencies)."""
    eager = {p for name in DEVICE_MODULES + ALWAYS_MODULES for p in modules.load_order[name]}
    lazy = {p for name in ON_DEMAND_MODULES for p in modules.load_order[name]} - eager
    on_demand = {f"{moddir}/{p}": (tree / moddir / p).read_bytes() for p in sorted(lazy)}
    return {"agent": programs, "modules": FileBundle(files=on_demand, symlinks={})}


# --- the disk: MBR + one FAT partition with syslinux, built without loop devices ----------------


def build_disk(image: GuestImage) -> None:
    """Writes ``disk.raw`` booting ``image``'s kernel and initramfs, and its qcow2 and vmdk."""
    raw = image.disk_raw
    with raw.open("wb") as f:
        f.truncate(DISK_SIZE)
    sectors = PARTITION_OFFSET // 512
    _run(
        ["sfdisk", "-q", "--", str(raw)],
        stdin=f"label: dos\nstart={sectors}, type=c, bootable\n".encode(),
    )
    blocks = (DISK_SIZE - PARTITION_OFFSET) // 1024
    _run(["mkfs.vfat", "--offset", str(sectors), "-n", "VMOBOOT", "--", str(raw), str(blocks)])
    cfg = raw.parent / "syslinux.cfg"
    cfg.write_text(SYSLINUX_CFG)
    fat = f"{raw}@@{PARTITION_OFFSET}"
    for source, name in (
        (image.kernel, "vmlinuz"),
        (image.initramfs, "initrd.gz"),
        (cfg, "syslinux.cfg"),
    ):
        _run(["mcopy", "-i", fat, "--", str(source), f"::/{name}"])
    cfg.unlink()
    _run(["syslinux", "--offset", str(PARTITION_OFFSET), "--install", "--", str(raw)])
    _write_mbr(raw)
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "--", str(raw), str(image.disk_qcow2)])
    vmdk = ["-O", "vmdk", "-o", "subformat=streamOptimized"]
    _run(["qemu-img", "convert", "-f", "raw", *vmdk, "--", str(raw), str(image.disk_vmdk)])


def _write_mbr(raw: Path) -> None:
    code = SYSLINUX_MBR.read_bytes()
    if len(code) > 440:  # the partition table starts at byte 446 (disk signature at 440)
        raise GuestBuildError(f"{SYSLINUX_MBR} is {len(code)} bytes, expected <= 440")
    with raw.open("r+b") as f:
        f.write(code)


# --- NoCloud seed -----------------------------------------------------------------------------


def seed_iso(
    path: Path, *, meta_data: str, user_data: str, network_config: str | None = None
) -> Path:
    """Writes a NoCloud seed: an ISO9660 image labelled ``cidata`` with Joliet and Rock Ridge."""
    files = {"meta-data": meta_data, "user-data": user_data}
    if network_config is not None:
        files["network-config"] = network_config
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=path.parent) as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        argv = ["genisoimage", "-quiet", "-output", str(path), "-volid", "cidata", "-joliet"]
        _run([*argv, "-rock", "--", *sorted(files)], cwd=Path(tmp))
    return path


# --- booting it -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for user-net ``hostfwd``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


BootSource = Literal["kernel", "raw", "qcow2", "vmdk"]


def qemu_argv(
    image: GuestImage,
    *,
    boot: BootSource = "kernel",
    seed: Path | None = None,
    seed_bus: Literal["virtio", "cdrom"] = "virtio",
    macs: Sequence[str] = (DEFAULT_MAC,),
    host_forwards: Sequence[tuple[int, int]] = (),
    memory_mib: int = 256,
    qmp_socket: Path | None = None,
    agent_socket: Path | None = None,
) -> list[str]:
    """A plain QEMU (TCG) command line for the test guest; serial console on stdio.

    ``host_forwards`` are (host port, guest port) pairs on the first NIC's user network.
    Disk boots use ``snapshot=on`` so the cached images are never written. ``agent_socket`` adds
    the guest agent's channel as VMO's engine does: a virtserialport named
    ``org.qemu.guest_agent.0`` behind a listening unix socket (for ``GuestAgentClient``).
    """
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mib), "-smp", "1"]
    argv += ["-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"]
    if boot == "kernel":
        argv += ["-kernel", str(image.kernel_elf), "-initrd", str(image.initramfs)]
        argv += ["-append", image.cmdline]
    else:
        disk = {"raw": image.disk_raw, "qcow2": image.disk_qcow2, "vmdk": image.disk_vmdk}[boot]
        argv += ["-drive", f"file={disk},format={boot},if=virtio,snapshot=on"]
    if seed is not None:
        if seed_bus == "virtio":
            argv += ["-drive", f"file={seed},format=raw,if=virtio,readonly=on"]
        else:
            argv += ["-drive", f"file={seed},format=raw,media=cdrom,readonly=on"]
    for i, mac in enumerate(macs):
        forwards = "".join(
            f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in (host_forwards if i == 0 else ())
        )
        argv += ["-netdev", f"user,id=net{i}{forwards}"]
        argv += ["-device", f"virtio-net-pci,netdev=net{i},mac={mac}"]
    if qmp_socket is not None:
        argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    if agent_socket is not None:
        argv += ["-chardev", f"socket,id=qga0,path={agent_socket},server=on,wait=off"]
        argv += ["-device", "virtio-serial-pci,id=vmo-serial0"]
        argv += ["-device", f"virtserialport,chardev=qga0,name={GUEST_AGENT_CHANNEL}"]
    return argv


@dataclass(frozen=True)
class ReadyMarker:
    """The guest's ``VMO-GUEST-READY`` line, parsed."""

    hostname: str
    ips: tuple[str, ...]
    macs: tuple[str, ...]

    @classmethod
    def parse(cls, line: str) -> ReadyMarker:
        fields = dict(re.findall(r"(\w+)=(\S*)", line))

        def items(key: str) -> tuple[str, ...]:
            return tuple(v for v in fields.get(key, "").split(",") if v)

        return cls(hostname=fields.get("hostname", ""), ips=items("ip"), macs=items("mac"))


@dataclass
class RunningGuest:
    """A QEMU process whose serial console (stdio) is captured and can be written to."""

    argv: list[str]
    started_at: float = 0.0
    _process: subprocess.Popen[bytes] | None = None
    _console: bytearray = field(default_factory=bytearray)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    def start(self) -> RunningGuest:
        self.started_at = time.monotonic()
        self._process = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, name="vmo-guest-console", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self._changed:
                self._console += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def console(self) -> str:
        """Everything the guest (and QEMU) printed so far, CR/LF normalised."""
        with self._changed:
            return self._console.decode(errors="replace").replace("\r\n", "\n")

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("guest not started")
        return self._process

    def wait_for(self, pattern: str, *, timeout: float, start: int = 0) -> re.Match[str]:
        """Waits until ``pattern`` (a regex) appears in the console at or after ``start``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(self.console, start)
                if match is not None:
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader_alive()):
                    raise GuestTimeoutError(pattern, timeout, self.console)
                self._changed.wait(min(left, 0.5))

    def _reader_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def wait_ready(self, *, timeout: float = 30.0) -> ReadyMarker:
        match = self.wait_for(rf"{READY_MARKER}[^\n]*\n", timeout=timeout)
        return ReadyMarker.parse(match.group(0))

    def send(self, text: str) -> None:
        """Types ``text`` on the serial console."""
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(text.encode())
        stdin.flush()

    def stop(self, *, grace: float = 5.0) -> int:
        """Ends QEMU (terminate, then kill); returns its exit status."""
        process = self.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(grace)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return process.returncode

    def __enter__(self) -> RunningGuest:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
