"""The tiny test guest: built from Debian packages, booted under TCG, reporting what it was given.

Each guest boots once per module (a few seconds each under TCG); the two disk formats boot in
parallel. The first run downloads ~75 MB of Debian packages into the guest cache. The guest
agent is Debian's real qemu-ga, driven through VMO's own ``GuestAgentClient``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmo.engine.qemu import GUEST_AGENT_CHANNEL, GuestAgentClient
from vmo.testing.guest import (
    DEFAULT_MAC,
    GuestBuildError,
    GuestImage,
    GuestTimeoutError,
    ReadyMarker,
    RunningGuest,
    build_guest,
    default_cache_dir,
    elf_linking,
    free_port,
    qemu_argv,
    seed_iso,
)

SECOND_MAC = "52:54:00:12:34:57"
STATIC_ADDRESS = "10.0.3.50"
HOSTNAME = "db-1"
CLOUD_CONFIG = """\
#cloud-config
write_files:
  - path: /etc/vmo-test/greeting
    permissions: '0600'
    content: |
      hello from write_files
runcmd:
  - echo runcmd-ran > /run/runcmd-marker
"""
# v2 subset: the second NIC (by MAC) is static; the first is not mentioned, so it uses DHCP.
NETWORK_CONFIG = f"""\
version: 2
ethernets:
  second:
    match:
      macaddress: "{SECOND_MAC}"
    addresses: [{STATIC_ADDRESS}/24]
    gateway4: 10.0.3.1
"""


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest(default_cache_dir())


@contextlib.contextmanager
def booted(argv: list[str]) -> Iterator[RunningGuest]:
    guest = RunningGuest(argv)
    try:
        yield guest.start()
    finally:
        guest.stop()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seeds")


@pytest.fixture(scope="module")
def db_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def echo_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def agent_socket(seeds: Path) -> Path:
    return seeds / "db-qga.sock"


@pytest.fixture(scope="module")
def guest(
    image: GuestImage, seeds: Path, db_port: int, echo_port: int, agent_socket: Path
) -> Iterator[RunningGuest]:
    """Direct kernel boot, seed on virtio, two NICs (DHCP + static), cloud-config user-data,
    and the guest agent's channel (nothing freezable mounted: only the read-only ISO seed)."""
    seed = seed_iso(
        seeds / "db.iso",
        meta_data=f"instance-id: iid-db-1\nlocal-hostname: {HOSTNAME}\n",
        user_data=CLOUD_CONFIG,
        network_config=NETWORK_CONFIG,
    )
    argv = qemu_argv(
        image,
        seed=seed,
        macs=[DEFAULT_MAC, SECOND_MAC],
        host_forwards=[(db_port, 5432), (echo_port, 7)],
        agent_socket=agent_socket,
    )
    with booted(argv) as running:
        yield running


@pytest.fixture(scope="module")
def ready(guest: RunningGuest) -> ReadyMarker:
    return guest.wait_ready(timeout=30)


def ask(port: int, send: bytes = b"", *, timeout: float = 10.0) -> bytes:
    """One TCP exchange through the user-net hostfwd, retried while the guest starts listening."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                if send:
                    conn.sendall(send)
                    conn.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := conn.recv(4096):
                    reply += chunk
                if reply:
                    return reply
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no reply on port {port}")
        time.sleep(0.2)


def run_on_console(guest: RunningGuest, command: str, *, timeout: float = 10.0) -> str:
    """Runs ``command`` in the serial-console shell; returns its output."""
    start = len(guest.console)
    # The markers are split in the typed text so that only the shell's output matches them.
    guest.send(f"echo VMO-BE''GIN; {command}; echo VMO-E''ND\n")
    match = guest.wait_for(r"VMO-BEGIN\n([\s\S]*?)VMO-END", timeout=timeout, start=start)
    return match.group(1).replace("\r", "")


# --- build ------------------------------------------------------------------------------------


def test_build_is_cached_by_package_versions(image: GuestImage) -> None:
    again = build_guest(default_cache_dir())
    assert again.root == image.root
    manifest = json.loads((image.root / "manifest.json").read_text())
    assert manifest["versions"]["kernel_package"].startswith("linux-image-")
    for path in (image.kernel, image.kernel_elf, image.initramfs, image.disk_qcow2):
        assert path.stat().st_size > 0


def test_initramfs_has_console_node_init_and_busybox(image: GuestImage) -> None:
    names = initramfs_names(image)
    assert {b"init", b"bin/busybox", b"dev/console", b"etc/vmo/modules"} <= names


def test_disk_images_have_the_formats_they_claim(image: GuestImage) -> None:
    with image.disk_raw.open("rb") as f:
        assert f.read(512)[510:] == b"\x55\xaa"
    assert image.disk_qcow2.read_bytes()[:4] == b"QFI\xfb"
    assert b"streamOptimized" in image.disk_vmdk.read_bytes()[:4096]


def cpio_files(archive: bytes) -> dict[str, bytes]:
    """The entries of a newc cpio archive: name -> data."""
    files: dict[str, bytes] = {}
    at = 0
    while archive[at : at + 6] == b"070701":
        size, namesize = int(archive[at + 54 : at + 62], 16), int(archive[at + 94 : at + 102], 16)
        name = archive[at + 110 : at + 110 + namesize - 1].decode()
        data_at = at + 110 + namesize + (-(110 + namesize) % 4)
        files[name] = archive[data_at : data_at + size]
        at = data_at + size + (-size % 4)
    return files


def initramfs_files(image: GuestImage) -> dict[str, bytes]:
    """The initramfs's files, with those of the bundles /init unpacks on first use."""
    files = cpio_files(gzip.decompress(image.initramfs.read_bytes()))
    for name in [n for n in files if n.startswith("usr/lib/vmo/")]:
        files |= cpio_files(gzip.decompress(files[name]))
    return files


def initramfs_names(image: GuestImage) -> set[bytes]:
    return {name.encode() for name in initramfs_files(image)}


def test_initramfs_carries_qemu_ga_with_its_loader_and_libraries(image: GuestImage) -> None:
    names = initramfs_names(image)
    libs = {b"lib/x86_64-linux-gnu/" + so for so in (b"libc.so.6", b"libglib-2.0.so.0")}
    assert {b"usr/sbin/qemu-ga", b"lib64/ld-linux-x86-64.so.2", *libs} <= names
    assert not any(b"libselinux" in name for name in names)  # in the Depends, not DT_NEEDED


def test_big_rarely_needed_files_are_bundled_apart_from_the_eager_ones(image: GuestImage) -> None:
    eager = cpio_files(gzip.decompress(image.initramfs.read_bytes()))
    assert {"usr/lib/vmo/agent.cpio.gz", "usr/lib/vmo/modules.cpio.gz"} <= set(eager)
    assert not any(name.endswith(("/ext4.ko", "/qemu-ga", "/libc.so.6")) for name in eager)
    assert any(name.endswith("/virtio_net.ko") for name in eager)


def test_initramfs_carries_ext4_for_on_demand_loading(image: GuestImage) -> None:
    names = initramfs_names(image)
    for module in (b"/ext4.ko", b"/jbd2.ko", b"/mbcache.ko", b"/crc16.ko", b"/crc32c_generic.ko"):
        assert any(name.endswith(module) for name in names), module
    assert b"sbin/modprobe" in names


def test_elf_linking_reads_interpreter_and_needed_libraries() -> None:
    qemu_img = shutil.which("qemu-img")
    assert qemu_img is not None
    linking = elf_linking(Path(qemu_img).read_bytes())
    assert linking.interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert "libc.so.6" in linking.needed
    with pytest.raises(GuestBuildError, match="ELF64"):
        elf_linking(b"#!/bin/sh\n")


def test_agent_socket_adds_the_port_the_engine_names(tmp_path: Path) -> None:
    image = GuestImage(root=tmp_path, kernel_release="test")
    argv = qemu_argv(image, agent_socket=tmp_path / "qga.sock")
    port = next(arg for arg in argv if arg.startswith("virtserialport,"))
    assert f"name={GUEST_AGENT_CHANNEL}" in port.split(",")
    assert not any("virtserialport" in arg for arg in qemu_argv(image))


def test_seed_iso_is_labelled_cidata(tmp_path: Path) -> None:
    seed = seed_iso(tmp_path / "s.iso", meta_data="instance-id: a\n", user_data="#!/bin/sh\n")
    # ISO9660 primary volume descriptor at 32 KiB: type 1, "CD001", volume id at offset 40
    descriptor = seed.read_bytes()[32768 : 32768 + 2048]
    assert descriptor[1:6] == b"CD001"
    assert descriptor[40:72].strip() == b"cidata"


# --- the booted guest -------------------------------------------------------------------------


def test_guest_reports_ready_with_the_macs_from_argv(ready: ReadyMarker) -> None:
    assert ready.macs == (DEFAULT_MAC, SECOND_MAC)


def test_guest_takes_hostname_from_meta_data(ready: ReadyMarker) -> None:
    assert ready.hostname == HOSTNAME


def test_unconfigured_nic_uses_dhcp(ready: ReadyMarker) -> None:
    assert "10.0.2.15" in ready.ips  # QEMU user networking's first DHCP lease


def test_network_config_assigns_static_address_by_mac(ready: ReadyMarker) -> None:
    assert STATIC_ADDRESS in ready.ips


def test_database_port_answers_with_hostname_counter_and_macs(
    ready: ReadyMarker, db_port: int
) -> None:
    line = ask(db_port).decode()
    assert re.fullmatch(
        rf"vmo-guest {HOSTNAME} counter=\d+ macs={DEFAULT_MAC},{SECOND_MAC}\n", line
    )


def test_counter_keeps_counting(ready: ReadyMarker, db_port: int) -> None:
    def counter() -> int:
        match = re.search(rb"counter=(\d+)", ask(db_port))
        assert match is not None
        return int(match.group(1))

    first = counter()
    deadline = time.monotonic() + 10
    while counter() <= first:
        assert time.monotonic() < deadline, "counter did not advance"
        time.sleep(0.3)


def test_echo_port_echoes(ready: ReadyMarker, echo_port: int) -> None:
    assert ask(echo_port, b"ping 123\n") == b"ping 123\n"


def test_serial_console_runs_a_shell(guest: RunningGuest, ready: ReadyMarker) -> None:
    assert run_on_console(guest, "echo $((6 * 7))") == "42\n"


def test_cloud_config_write_files_and_runcmd_applied(
    guest: RunningGuest, ready: ReadyMarker
) -> None:
    output = run_on_console(guest, "cat /etc/vmo-test/greeting /run/runcmd-marker")
    assert output == "hello from write_files\nruncmd-ran\n"


# --- other boot paths --------------------------------------------------------------------------


def qmp(sock: Path, command: str) -> None:
    """Sends one QMP command (after the capabilities handshake) and waits for its return."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        stream = conn.makefile("rwb")
        stream.readline()  # greeting
        for execute in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": execute}).encode() + b"\n")
            stream.flush()
            while "return" not in (reply := json.loads(stream.readline())):
                assert "error" not in reply, reply


def test_shell_user_data_and_cdrom_seed_then_acpi_poweroff(image: GuestImage, seeds: Path) -> None:
    seed = seed_iso(
        seeds / "script.iso",
        meta_data='{"instance-id": "iid-2", "local-hostname": "scripted"}',
        user_data="#!/bin/sh\nhostname from-script\n",
        network_config=None,
    )
    sock = seeds / "qmp.sock"
    argv = qemu_argv(image, seed=seed, seed_bus="cdrom", qmp_socket=sock)
    with booted(argv) as guest:
        assert guest.wait_ready(timeout=30).hostname == "from-script"
        qmp(sock, "system_powerdown")
        assert guest.process.wait(timeout=20) == 0
        assert "powering off" in guest.console


@pytest.fixture(scope="module")
def disk_guests(image: GuestImage, seeds: Path) -> Iterator[dict[str, RunningGuest]]:
    """The qcow2 and the streamOptimized vmdk, booting at the same time (BIOS + syslinux)."""
    seed = seed_iso(seeds / "disk.iso", meta_data="local-hostname: from-disk\n", user_data="")
    with contextlib.ExitStack() as stack:
        yield {
            fmt: stack.enter_context(booted(qemu_argv(image, boot=fmt, seed=seed)))
            for fmt in ("qcow2", "vmdk")
        }


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_disk_image_boots_to_ready(disk_guests: dict[str, RunningGuest], fmt: str) -> None:
    ready = disk_guests[fmt].wait_ready(timeout=45)
    assert (ready.hostname, ready.macs) == ("from-disk", (DEFAULT_MAC,))
    assert "-kernel" not in disk_guests[fmt].argv


# --- the guest agent: Debian's qemu-ga behind VMO's GuestAgentClient ---------------------------

# An agent that starts after the ready marker may take a few seconds under TCG to answer.
AGENT_TIMEOUT = 30.0
# User-data that makes and mounts an ext2 filesystem (busybox mke2fs) with the ext4 driver on
# the blank disk; the kernel asks /sbin/modprobe for fs-ext4, which loads ext4 and its deps.
MOUNT_DATA_DISK = """\
#!/bin/sh
for disk in /sys/block/vd*; do
    [ "$(cat "$disk/serial")" = vmo-data ] && dev=/dev/${disk##*/}
done
mke2fs -L vmo-data "$dev"
mkdir -p /mnt/data
mount -t ext4 "$dev" /mnt/data
echo before-freeze > /mnt/data/hello
"""


async def test_guest_agent_answers_ping_and_info(ready: ReadyMarker, agent_socket: Path) -> None:
    async with await GuestAgentClient.connect(agent_socket, timeout=AGENT_TIMEOUT) as qga:
        await qga.ping()
        info = await qga.info()
    assert info["version"].startswith("7.2")
    enabled = {c["name"] for c in info["supported_commands"] if c["enabled"]}
    assert {"guest-get-osinfo", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"} <= enabled


async def test_guest_agent_reports_osinfo_of_the_guest(
    image: GuestImage, ready: ReadyMarker, agent_socket: Path
) -> None:
    async with await GuestAgentClient.connect(agent_socket, timeout=AGENT_TIMEOUT) as qga:
        osinfo = await qga.osinfo()
    assert osinfo["kernel-release"] == image.kernel_release
    assert (osinfo["id"], osinfo["machine"]) == ("vmo-guest", "x86_64")
    assert osinfo["pretty-name"].startswith("VMO test guest")


async def test_fsfreeze_with_nothing_freezable_freezes_none_and_stays_thawed(
    ready: ReadyMarker, agent_socket: Path
) -> None:
    # qemu-ga skips what cannot freeze (rootfs, tmpfs, the read-only ISO seed: EOPNOTSUPP) and,
    # having frozen nothing, leaves its frozen state at once; thaw then thaws nothing.
    async with await GuestAgentClient.connect(agent_socket, timeout=AGENT_TIMEOUT) as qga:
        try:
            assert await qga.fsfreeze_freeze() == 0
            assert await qga.fsfreeze_status() == "thawed"
        finally:
            thawed = await qga.fsfreeze_thaw()
        assert thawed == 0
        assert await qga.fsfreeze_status() == "thawed"


@pytest.fixture(scope="module")
def fs_agent_socket(seeds: Path) -> Path:
    return seeds / "fs-qga.sock"


@pytest.fixture(scope="module")
def fs_guest(image: GuestImage, seeds: Path, fs_agent_socket: Path) -> Iterator[RunningGuest]:
    """A guest whose user-data makes and mounts a filesystem on a blank second disk."""
    seed = seed_iso(seeds / "fs.iso", meta_data="instance-id: iid-fs\n", user_data=MOUNT_DATA_DISK)
    blank = seeds / "data.raw"
    blank.touch()
    os.truncate(blank, 32 * 1024 * 1024)
    argv = qemu_argv(image, seed=seed, agent_socket=fs_agent_socket)
    argv += ["-drive", f"file={blank},format=raw,if=none,id=data0"]
    argv += ["-device", "virtio-blk-pci,drive=data0,serial=vmo-data"]
    with booted(argv) as running:
        running.wait_ready(timeout=60)
        yield running


def test_user_data_mounts_ext4_loaded_on_demand(fs_guest: RunningGuest) -> None:
    mounts = run_on_console(fs_guest, "grep ' /mnt/data ' /proc/mounts; cat /mnt/data/hello")
    assert re.fullmatch(r"/dev/vd\w+ /mnt/data ext4 rw\S* 0 0\nbefore-freeze\n", mounts)
    assert "ext4 " in run_on_console(fs_guest, "lsmod")


async def test_fsfreeze_freezes_the_mounted_filesystem_and_thaws_it(
    fs_guest: RunningGuest, fs_agent_socket: Path
) -> None:
    async with await GuestAgentClient.connect(fs_agent_socket, timeout=AGENT_TIMEOUT) as qga:
        try:
            frozen = await qga.fsfreeze_freeze()
            assert frozen >= 1
            assert await qga.fsfreeze_status() == "frozen"
            start = len(fs_guest.console)
            # A write to a frozen filesystem blocks in the kernel until the thaw.
            fs_guest.send("(echo during > /mnt/data/write && echo VMO-WR''OTE) &\n")
            with pytest.raises(GuestTimeoutError):
                fs_guest.wait_for("VMO-WROTE", timeout=1.5, start=start)
        finally:
            thawed = await qga.fsfreeze_thaw()
        assert thawed == frozen
        assert await qga.fsfreeze_status() == "thawed"
    fs_guest.wait_for("VMO-WROTE", timeout=10, start=start)
