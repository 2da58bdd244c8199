"""The tiny test guest: built from Debian packages, booted under TCG, reporting what it was given.

Each guest boots once per module (a few seconds each under TCG); the two disk formats boot in
parallel. The first run downloads ~70 MB of Debian packages into the guest cache.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmo.testing.guest import (
    DEFAULT_MAC,
    GuestImage,
    ReadyMarker,
    RunningGuest,
    build_guest,
    default_cache_dir,
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
def guest(image: GuestImage, seeds: Path, db_port: int, echo_port: int) -> Iterator[RunningGuest]:
    """Direct kernel boot, seed on virtio, two NICs (DHCP + static), cloud-config user-data."""
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
    archive = gzip.decompress(image.initramfs.read_bytes())
    names = set(re.findall(rb"070701[0-9A-F]{104}([^\x00]+)\x00", archive))
    assert {b"init", b"bin/busybox", b"dev/console", b"etc/vmo/modules"} <= names


def test_disk_images_have_the_formats_they_claim(image: GuestImage) -> None:
    with image.disk_raw.open("rb") as f:
        assert f.read(512)[510:] == b"\x55\xaa"
    assert image.disk_qcow2.read_bytes()[:4] == b"QFI\xfb"
    assert b"streamOptimized" in image.disk_vmdk.read_bytes()[:4096]


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
