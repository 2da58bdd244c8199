"""`vmo up -d --nodes 2` with its engine, as a script runs it: real subprocesses, real kubectl.

Each node agent boots the KVM probe guest (QEMU) when it starts: run this module under the VM
lock (``flock /tmp/vmo-vm.lock pytest ...``).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_cli_lifecycle import loose_modes, server_pid, vmo


@dataclass(frozen=True)
class Started:
    home: Path
    up: subprocess.CompletedProcess[str]
    nodes_right_after: dict[str, str]  # node -> its Ready status, read as `up -d` returned


def ready_statuses(home: Path) -> dict[str, str]:
    out = subprocess.run(
        ["kubectl", "--kubeconfig", str(home / "admin.kubeconfig"), "get", "nodes", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return {
        item["metadata"]["name"]: next(
            c["status"] for c in item["status"]["conditions"] if c["type"] == "Ready"
        )
        for item in json.loads(out.stdout)["items"]
    }


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    home = tmp_path_factory.mktemp("vmo-up") / "home"
    home.mkdir(mode=0o755)
    try:
        up = vmo(home, "up", "-d", "--nodes", "2", "--port", "0", timeout=300)
        # the next line of a script that ran `vmo up -d`: nothing may be waited for in between
        nodes = ready_statuses(home) if up.returncode == 0 else {}
        yield Started(home, up, nodes)
    finally:
        down = vmo(home, "down", "--stop-vms")
        pid = server_pid(home)
        assert down.returncode == 0 and pid is None, down.stdout + down.stderr


def test_up_detached_returns_once_the_nodes_it_started_are_ready(started: Started) -> None:
    assert started.up.returncode == 0, started.up.stdout + started.up.stderr
    assert started.nodes_right_after == {"node-1": "True", "node-2": "True"}
    assert "node-1, node-2 (Ready)" in started.up.stdout


def test_nodes_write_nothing_others_can_read(started: Started) -> None:
    assert started.up.returncode == 0, started.up.stderr
    assert list(started.home.glob("nodes/*/accelerator.json"))  # the nodes' files are checked
    assert loose_modes(started.home) == {}


def test_up_runs_vmo_s_own_controllers_which_install_their_crds(started: Started) -> None:
    assert started.up.returncode == 0, started.up.stderr
    kubeconfig = str(started.home / "admin.kubeconfig")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        crds = subprocess.run(
            ["kubectl", "--kubeconfig", kubeconfig, "get", "crd", "vmaccesspolicies.vmo.dev",
             "backuppolicies.vmo.dev", "vmquotas.vmo.dev"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if crds.returncode == 0:
            break
        time.sleep(0.5)
    assert crds.returncode == 0, crds.stderr
    deadline = time.monotonic() + 60
    holder = ""
    while not holder and time.monotonic() < deadline:
        lease = subprocess.run(
            ["kubectl", "--kubeconfig", kubeconfig, "get", "lease", "-n", "vmo-system",
             "vmo-controllers", "-o", "jsonpath={.spec.holderIdentity}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        holder = lease.stdout if lease.returncode == 0 else ""
        time.sleep(0.5)
    assert holder, "no replica of VMO's controllers holds their Lease"
