"""`vmo console`, `vmo port-forward` and `vmo vnc` end to end: the real commands, through the
API server's subresources, to a real guest (QEMU, TCG). Boots a guest: run under the VM lock.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import Api, Kubectl
from tests.test_vm_e2e import (
    BOOT_TIMEOUT,
    NS,
    console,
    datavolume,
    engine_cluster,
    vm,
    wait_for,
    wait_running,
)
from vmo.testing.apiserver import ThreadedServer

NAME = "streams"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-streams"))


@pytest.fixture(scope="module")
def booted(cluster: ThreadedServer, image_server: str) -> ThreadedServer:
    """The VM ``streams`` running, its shell answering on the serial console."""
    k = Kubectl(cluster.kubeconfig)
    k.apply(datavolume(f"{NAME}-root", f"{image_server}/disk.qcow2"))
    k.apply(vm(NAME, disk=f"{NAME}-root"))
    wait_running(Api(cluster.url, cluster.ca, cluster.admin_token), NAME)
    wait_for(lambda: "ok" in console(cluster, NAME, "echo ok"), BOOT_TIMEOUT, "the guest's shell")
    return cluster


def vmo_argv(cluster: ThreadedServer, *args: str) -> list[str]:
    kubeconfig = str(cluster.kubeconfig)
    return [sys.executable, "-m", "vmo.cli.main", *args, "-n", NS, "--kubeconfig", kubeconfig]


def listening_port(proc: subprocess.Popen[str]) -> int:
    """The local port a proxy command prints when it listens."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"127\.0\.0\.1:(\d+)", line)
    assert found, f"no listening line: {line!r}"
    return int(found.group(1))


def first_bytes(port: int, size: int, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        received = b""
        while len(received) < size and (chunk := sock.recv(size - len(received))):
            received += chunk
        return received


def proxy(cluster: ThreadedServer, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        vmo_argv(cluster, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def stop(proc: subprocess.Popen[str]) -> str:
    """Stops a proxy command; returns what it wrote to stderr."""
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def test_console_types_into_the_guest_and_prints_its_answer(booted: ThreadedServer) -> None:
    run = subprocess.run(
        vmo_argv(booted, "console", NAME),
        input="\necho BEGIN-$((6*7))\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "BEGIN-42" in run.stdout  # computed by the guest's shell, not echoed keystrokes


def test_port_forward_reaches_the_guests_port(booted: ThreadedServer) -> None:
    forward = proxy(booted, "port-forward", f"vm/{NAME}", "0:5432")
    try:
        port = listening_port(forward)
        assert first_bytes(port, 9) == b"vmo-guest"
    finally:
        assert "Traceback" not in stop(forward)


def test_vnc_proxy_speaks_rfb_from_the_guests_display(booted: ThreadedServer) -> None:
    vnc = proxy(booted, "vnc", NAME)
    try:
        port = listening_port(vnc)
        assert first_bytes(port, 12) == b"RFB 003.008\n"
    finally:
        assert "Traceback" not in stop(vnc)


def test_console_of_a_missing_vmi_is_refused_with_the_servers_answer(
    booted: ThreadedServer,
) -> None:
    run = subprocess.run(
        vmo_argv(booted, "console", "no-such-vm"),
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "refused the connection" in run.stderr and "404" in run.stderr
    assert "Traceback" not in run.stderr
