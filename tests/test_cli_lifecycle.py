"""`vmo up`, `vmo down` and `vmo status` as a user runs them: real subprocesses, a temporary
``VMO_HOME``, the API server alone (``--no-engine``: no node, no guest).

Whether a server lives is the lock it holds on its pid file; these tests kill servers with
SIGKILL, leave them zombies, and check that a restart and a stop always work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from vmo.cli.controlplane import StartFailed, await_nodes_ready, unready_nodes
from vmo.client import NODE, Client
from vmo.home import StateDir
from vmo.testing.apiserver import ThreadedServer


def vmo_argv(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmo.cli.main", "--home", str(home), *args]


def vmo(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vmo_argv(home, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def up_detached(home: Path) -> subprocess.CompletedProcess[str]:
    return vmo(home, "up", "-d", "--no-engine", "--port", "0")


def foreground_server(home: Path) -> subprocess.Popen[bytes]:
    """`vmo up` as this test's own child: reaped only when the test says so."""
    return subprocess.Popen(
        vmo_argv(home, "up", "--no-engine", "--port", "0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def server_pid(home: Path) -> int | None:
    return StateDir(home).server_lock.holder()


def process_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat (R, S, Z, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def kubectl_namespaces(home: Path) -> str:
    out = subprocess.run(
        ["kubectl", "--kubeconfig", str(home / "admin.kubeconfig"), "get", "ns", "-o", "name"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A VMO home; whatever server still holds its lock afterwards is killed (no leaks)."""
    path = tmp_path / "home"
    yield path
    pid = server_pid(path) if path.exists() else None
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_up_starts_after_a_killed_server_left_as_a_zombie(home: Path) -> None:
    # the server is this test's child, never reaped until the end: after SIGKILL it stays a
    # zombie, whose pid a pid probe (kill -0) counts as alive
    crashed = foreground_server(home)
    try:
        wait_for(lambda: (home / "apiserver.url").exists())
        crashed.send_signal(signal.SIGKILL)
        wait_for(lambda: process_state(crashed.pid) == "Z")
        up = up_detached(home)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "already running" not in up.stdout
        restarted = server_pid(home)
        assert restarted and restarted != crashed.pid
        assert "namespace/virtual-machines" in kubectl_namespaces(home)
        down = vmo(home, "down")
        assert down.returncode == 0 and "VMO stopped" in down.stdout, down.stderr
        assert server_pid(home) is None
    finally:
        crashed.kill()
        crashed.wait(10)


def test_up_starts_after_a_detached_server_was_killed(home: Path) -> None:
    first = up_detached(home)
    assert first.returncode == 0, first.stderr
    killed = server_pid(home)
    assert killed
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: server_pid(home) is None)
    again = up_detached(home)
    assert again.returncode == 0 and "already running" not in again.stdout, again.stderr
    assert server_pid(home) not in (None, killed)
    assert vmo(home, "down").returncode == 0
    assert vmo(home, "status").returncode == 3


def test_a_second_up_of_a_running_server_says_so_and_starts_nothing(home: Path) -> None:
    assert up_detached(home).returncode == 0
    pid = server_pid(home)
    again = up_detached(home)
    assert again.returncode == 0 and f"already running (pid {pid})" in again.stdout
    assert server_pid(home) == pid
    assert vmo(home, "down").returncode == 0


def test_down_waits_for_the_lock_not_the_pid(home: Path) -> None:
    """`vmo down` of a server whose parent never reaps it: the pid stays (a zombie), yet the
    server is gone once its lock is released, and down says so."""
    server = foreground_server(home)
    try:
        wait_for(lambda: (home / "apiserver.url").exists())
        down = vmo(home, "down")
        assert down.returncode == 0 and "VMO stopped" in down.stdout, down.stderr
        assert process_state(server.pid) == "Z"  # not reaped, and down did not wait for that
    finally:
        server.kill()
        server.wait(10)


def test_the_home_and_every_file_in_it_are_private(home: Path) -> None:
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)  # a home that exists already, readable by everyone
    assert up_detached(home).returncode == 0
    try:
        assert (home / "store.db-wal").exists()  # the WAL is among the files checked
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert loose_modes(home) == {}
    finally:
        assert vmo(home, "down").returncode == 0


def loose_modes(home: Path) -> dict[str, str]:
    """Everything under ``home`` that is not its owner's alone: directories beyond 0700,
    files beyond 0600 (sockets may be 0700: connecting needs their write bit only)."""
    loose = {}
    for path in home.rglob("*"):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        allowed = 0o700 if stat.S_ISDIR(mode) or stat.S_ISSOCK(mode) else 0o600
        if stat.S_IMODE(mode) & ~allowed:
            loose[str(path.relative_to(home))] = oct(stat.S_IMODE(mode))
    return loose


# --- `up -d` waits for its nodes: the decision, and the wait against a real API server -------


def node(
    name: str, status: str, *, heartbeat: datetime, reason: str = "KubeletReady"
) -> dict[str, Any]:
    stamp = heartbeat.strftime("%Y-%m-%dT%H:%M:%SZ")
    ready = {"type": "Ready", "status": status, "reason": reason, "lastHeartbeatTime": stamp}
    return {"metadata": {"name": name}, "status": {"conditions": [ready]}}


def test_a_node_is_ready_only_with_a_ready_heartbeat_from_this_start() -> None:
    since = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)
    nodes = [
        node("fresh", "True", heartbeat=since),
        node("stale", "True", heartbeat=since - timedelta(minutes=5)),
        node("sick", "False", heartbeat=since, reason="KubeletNotReady"),
    ]
    assert unready_nodes(nodes, ["fresh", "stale", "sick", "absent"], since=since) == {
        "stale": "no heartbeat since this start",
        "sick": "Ready=False (KubeletNotReady)",
        "absent": "not registered",
    }


def test_waiting_for_nodes_names_the_ones_that_are_not_ready(apiserver: ThreadedServer) -> None:
    since = datetime.now(UTC).replace(microsecond=0)

    async def scenario() -> str:
        async with Client.from_kubeconfig(apiserver.kubeconfig) as client:
            for name, ready in (("wait-ok", "True"), ("wait-sick", "False")):
                await client.create(NODE, {"metadata": {"name": name}})
                await client.patch_status(NODE, name, node(name, ready, heartbeat=since)["status"])
            await await_nodes_ready(client, ["wait-ok"], since=since, deadline=time.monotonic() + 5)
            with pytest.raises(StartFailed) as failed:
                await await_nodes_ready(
                    client,
                    ["wait-ok", "wait-sick", "wait-absent"],
                    since=since,
                    deadline=time.monotonic() + 1,
                )
            return str(failed.value)

    message = asyncio.run(scenario())
    assert "wait-sick: Ready=False" in message and "wait-absent: not registered" in message
    assert "wait-ok" not in message
