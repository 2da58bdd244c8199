"""A VMI goes final, and its VM shows Stopped, only once its QEMU is gone; what teardown cannot
give back is logged and retried by the node's sweep.

Real node agents (``NodeServices``, what `vmo up` runs) against the embedded API server, with
real QEMU processes (a diskless guest that sits in its firmware), real taps and bridges. No VM
controller runs here: the tests write the VMIs' phases the scheduler would write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vmo.client import NAD, VMI, Client
from vmo.engine.agent.runtime import workdir_name
from vmo.engine.embedded import NodeServices
from vmo.engine.network import bridge
from vmo.engine.qemu.process import MANIFEST_NAME, ProcessIdentity, find
from vmo.testing.apiserver import ThreadedServer

NS = "default"
JSON = dict[str, Any]
T = TypeVar("T")


async def until(probe: Callable[[], Awaitable[T] | T], what: str, timeout: float = 30.0) -> T:
    """Awaits ``probe()`` until it returns something true; fails naming ``what`` otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {result!r})")
        await asyncio.sleep(0.05)


def qemus_in(workdir: Path) -> list[int]:
    """QEMU processes (not zombies) whose command line names ``workdir``: what a leak looks like."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"qemu-system" in cmdline and str(workdir).encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def vmi_manifest(name: str, *, nad: str | None = None, grace: int = 1) -> JSON:
    """A diskless VMI (it idles in its firmware), on a bridge network when ``nad`` is given."""
    devices: JSON = {"autoattachGraphicsDevice": False, "autoattachPodInterface": False}
    spec: JSON = {
        "terminationGracePeriodSeconds": grace,
        "domain": {"devices": devices, "resources": {"requests": {"memory": "64Mi"}}},
    }
    if nad is not None:
        devices["interfaces"] = [{"name": "net1", "bridge": {}}]
        spec["networks"] = [{"name": "net1", "multus": {"networkName": nad}}]
    meta = {"name": name, "namespace": NS}
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": meta,
        "spec": spec,
    }


class Node:
    """One node agent on a state directory that outlives it, restartable like `vmo node run`."""

    def __init__(self, client: Client, name: str, state_dir: Path) -> None:
        self.client, self.name, self.state_dir = client, name, state_dir
        self.services: NodeServices | None = None
        self._stop = asyncio.Event()

    async def start(self) -> NodeServices:
        self._stop = asyncio.Event()
        # TCG without the accelerator probe: these guests only idle
        self.services = NodeServices(self.client, self.name, self.state_dir, use_emulation=True)
        await self.services.start(self._stop)
        return self.services

    async def stop(self) -> None:
        """The agent goes away; its QEMUs keep running."""
        if self.services is not None:
            self._stop.set()
            await self.services.close()
            self.services = None

    def workdir(self, vmi: str) -> Path:
        return self.state_dir / "vms" / workdir_name(NS, vmi)


@pytest.fixture
async def client(apiserver: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(apiserver.kubeconfig) as c:
        yield c
    await asyncio.sleep(0.25)  # aiohttp closes TLS transports on a later loop turn


@pytest.fixture
async def node(client: Client, unique: str) -> AsyncIterator[Node]:
    # a short home: the VMs' unix sockets must fit in 108 bytes, which pytest's long
    # per-test directories under a full run do not leave room for
    home = Path(tempfile.mkdtemp(prefix="vmo-td-"))
    n = Node(client, f"td-{unique}", home / "nodes" / f"td-{unique}")
    try:
        yield n
    finally:
        try:
            await _stop_and_check(n)
        finally:
            shutil.rmtree(home, ignore_errors=True)


async def _stop_and_check(n: Node) -> None:
    """Stops the node's agent; nothing it ran may be left: no QEMU, no tap."""
    await n.stop()
    leaked = qemus_in(n.state_dir)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    taps = bridge.cleanup_orphans(bridge.NetworkState(n.state_dir))
    assert not leaked, f"QEMU processes left running: {leaked}"
    assert not taps, f"taps left behind: {taps}"


async def schedule(client: Client, vmi: JSON, node: str) -> JSON:
    """Creates the VMI and binds it to ``node`` as the scheduler does."""
    created = await client.create(VMI, vmi, NS)
    status = {"phase": "Scheduled", "nodeName": node}
    return await client.patch(VMI, created["metadata"]["name"], {"status": status}, NS)


async def phase_of(client: Client, name: str) -> str | None:
    vmi = await client.find(VMI, name, NS)
    return None if vmi is None else str((vmi.get("status") or {}).get("phase") or "")


async def running(client: Client, name: str) -> JSON:
    async def probe() -> JSON | None:
        vmi = await client.find(VMI, name, NS)
        return vmi if vmi and (vmi.get("status") or {}).get("phase") == "Running" else None

    return await until(probe, f"VMI {name} Running")


def phases_written(vmi: JSON) -> list[str]:
    return [t["phase"] for t in (vmi.get("status") or {}).get("phaseTransitionTimestamps") or []]


def identity_in(workdir: Path) -> ProcessIdentity:
    """The running QEMU of ``workdir``, as its launch recorded it."""
    body = json.loads((workdir / MANIFEST_NAME).read_text())
    identity = ProcessIdentity(int(body["pid"]), int(body["startTime"]))
    assert identity.running()
    return identity


@contextlib.contextmanager
def monitor_taken(workdir: Path) -> Iterator[None]:
    """Another client holds the VM's QMP monitor, which serves one client at a time: the agent's
    own connection gets no greeting, as when a stuck tool holds the monitor. The QEMU runs."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(workdir / "qmp.sock"))
        assert b"QMP" in sock.recv(4096)  # the greeting: the monitor is this socket's now
        yield


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and text in r.getMessage()
    ]


# --- Stopped means gone --------------------------------------------------------------------------

# An agent that died after starting QEMU but before reporting the VMI Running leaves this behind.
EARLIER_AGENT = """
import asyncio, sys, uuid
from pathlib import Path
from vmo.engine.qemu import Accelerator, Domain, RuntimePaths, launch
w = Path(sys.argv[1])
d = Domain(name=sys.argv[2], uuid=uuid.UUID(int=7), paths=RuntimePaths.under(w),
           accel=Accelerator.TCG, memory_mib=64, graphics=False)
asyncio.run(launch(d, workdir=w))
"""


async def test_a_vmi_fails_only_after_the_qemu_an_earlier_agent_left_has_exited(
    client: Client, node: Node, unique: str
) -> None:
    workdir = node.workdir(unique)
    started = subprocess.run(
        [sys.executable, "-c", EARLIER_AGENT, str(workdir), unique],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started.stderr.decode()
    leftover = identity_in(workdir)  # not our child: its parent, the "agent", has exited
    await node.start()
    await schedule(client, vmi_manifest(unique), node.name)

    final = await until(
        lambda: _final_phase(client, unique), f"VMI {unique} to fail: its workdir is taken"
    )
    # the moment the VMI says Failed (and its VM would say Stopped), that QEMU is gone
    assert not leftover.running(), f"{final} while QEMU {leftover.pid} still runs"
    assert final == "Failed"
    await client.delete(VMI, unique, NS)
    await until(lambda: _gone(client, unique), "the VMI to go")


async def _final_phase(client: Client, name: str) -> str | None:
    phase = await phase_of(client, name)
    return phase if phase in ("Succeeded", "Failed") else None


async def _gone(client: Client, name: str) -> bool:
    return await client.find(VMI, name, NS) is None


async def test_a_running_vmi_whose_qemu_does_not_answer_is_not_reported_gone(
    client: Client, node: Node, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    await node.start()
    await schedule(client, vmi_manifest(unique), node.name)
    await running(client, unique)
    workdir = node.workdir(unique)
    qemu = identity_in(workdir)
    await node.stop()
    with monitor_taken(workdir):
        services = await node.start()
        await until(
            lambda: warnings_about(caplog, "does not answer on QMP"),
            "the restarted agent to try to adopt the QEMU",
        )
    # the monitor is free again: a later try adopts the QEMU
    await until(lambda: services.agent and services.agent.runtime(NS, unique), "re-adoption")
    vmi = await running(client, unique)
    assert qemu.running()
    assert phases_written(vmi) == ["Running"]  # the agents wrote no other phase, Failed least
    await client.delete(VMI, unique, NS)
    await until(lambda: _gone(client, unique), "the VMI to go")
    assert not qemu.running()


async def test_deleting_a_vmi_whose_qemu_does_not_answer_stops_that_qemu_first(
    client: Client, node: Node, unique: str
) -> None:
    await node.start()
    await schedule(client, vmi_manifest(unique), node.name)
    await running(client, unique)
    workdir = node.workdir(unique)
    qemu = identity_in(workdir)
    await node.stop()
    with monitor_taken(workdir):
        await client.delete(VMI, unique, NS)  # held by the agent's finalizer meanwhile
        await node.start()
        await until(lambda: _gone(client, unique), "the VMI to go", timeout=60)
        # the finalizer went only after the QEMU had exited
        assert not qemu.running()
    assert not workdir.exists()


# --- teardown errors: logged, retried by the sweep, nothing leaked -----------------------------


@pytest.fixture
async def nad(client: Client, unique: str) -> AsyncIterator[str]:
    """A CNI bridge network on a host bridge of the test's own (VMO creates and removes it)."""
    name = f"td-{unique}"
    host_bridge = f"td{os.getpid() % 100000}{unique}"[:15]  # unique across runs too
    config = {"cniVersion": "0.3.1", "name": name, "type": "bridge", "bridge": host_bridge}
    nad_obj = {"metadata": {"name": name, "namespace": NS}, "spec": {"config": json.dumps(config)}}
    await client.create(NAD, nad_obj, NS)
    yield name
    await client.delete(NAD, name, NS)
    with contextlib.suppress(bridge.LinkError):
        bridge.remove_bridge(host_bridge)


def recorded_taps(node: Node) -> dict[str, Any]:
    return bridge.NetworkState(node.state_dir).taps()


async def test_a_failed_release_is_logged_and_retried_by_the_sweep_until_nothing_is_left(
    client: Client, node: Node, nad: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    services = await node.start()
    assert services.agent is not None
    services.agent.releases.interval = 0.1
    await schedule(client, vmi_manifest(unique, nad=nad), node.name)
    vmi = await running(client, unique)
    (tap,) = recorded_taps(node)
    host_bridge = recorded_taps(node)[tap]["bridge"]
    assert bridge.link_exists(tap) and bridge.link_exists(host_bridge)

    # network.json unreadable (a truncated write): the release fails before removing anything
    state_file = node.state_dir / "network.json"
    saved = state_file.read_text()
    state_file.write_text("{")
    await client.delete(VMI, unique, NS)
    await until(lambda: _gone(client, unique), "the VMI to go (its QEMU stopped)")
    logged = await until(lambda: warnings_about(caplog, tap), "a warning naming the tap")
    assert f"{NS}/{unique}" in logged[0] and vmi["metadata"]["uid"] in logged[0]
    assert "JSONDecodeError" in logged[0] and "sweep retries" in logged[0]
    assert vmi["metadata"]["uid"] in services.agent.releases
    assert bridge.link_exists(tap)  # really not released yet

    state_file.write_text(saved)
    await until(lambda: len(services.agent.releases) == 0, "the sweep to release it")
    assert not bridge.link_exists(tap) and not bridge.link_exists(host_bridge)
    assert recorded_taps(node) == {}


async def test_a_re_adopted_vmi_gives_back_the_taps_an_earlier_agent_made(
    client: Client, node: Node, nad: str, unique: str
) -> None:
    await node.start()
    await schedule(client, vmi_manifest(unique, nad=nad), node.name)
    await running(client, unique)
    (tap,) = recorded_taps(node)
    await node.stop()
    services = await node.start()  # re-adopts the QEMU; it never made that tap itself
    await until(lambda: services.agent and services.agent.runtime(NS, unique), "re-adoption")
    await client.delete(VMI, unique, NS)
    await until(lambda: _gone(client, unique), "the VMI to go")
    assert not bridge.link_exists(tap)
    assert recorded_taps(node) == {}


# --- process identity: the kernel's word, not a pid probe --------------------------------------


def test_an_exited_process_is_not_running_while_its_pid_still_exists() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    identity = ProcessIdentity.of(proc.pid)
    assert identity is not None and identity.running()
    assert not ProcessIdentity(proc.pid, identity.start_time + 1).running()  # another process
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert Path(f"/proc/{proc.pid}").exists()
    assert not identity.running()
    proc.wait()


async def test_find_trusts_the_recorded_start_time_over_a_live_pid(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        identity = ProcessIdentity.of(proc.pid)
        assert identity is not None
        paths = {
            n: str(tmp_path / f"{n}.x") for n in ("qmp", "serial", "vnc", "guest_agent", "pidfile")
        }
        body: JSON = {"argv": ["qemu-system-x86_64"], "paths": paths, "logOffset": 0}
        manifest = tmp_path / MANIFEST_NAME
        # the pid is alive, but it is not the process this record started: nothing runs here
        manifest.write_text(
            json.dumps(body | {"pid": proc.pid, "startTime": identity.start_time - 1})
        )
        assert find(tmp_path) is None
        manifest.write_text(json.dumps(body | {"pid": proc.pid, "startTime": identity.start_time}))
        found = find(tmp_path)
        assert found is not None and found.pid == proc.pid
        await found.detach()
    finally:
        proc.kill()
        proc.wait()
