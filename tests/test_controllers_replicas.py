"""Two replicas of ``vmo controllers run`` (real processes) against a real API server: one
leads and acts; when it is killed, the other takes the Lease over and acts in its place."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmo.client import LEASE, VM, VMI, Client
from vmo.controllers.example import NODE_LABEL
from vmo.controllers.manager import LEASE_NAME
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]

VMO = Path(sys.executable).with_name("vmo")
SPEC: JSON = {
    "domain": {
        "memory": {"guest": "64Mi"},
        "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
    },
    "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/example/disk:1"}}],
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThreadedServer]:
    # a server of its own: the replicas label every VM they see
    with ThreadedServer(tmp_path / "home") as running:
        yield running


@pytest.fixture
async def client(server: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(server.kubeconfig) as c:
        yield c
    await asyncio.sleep(0.1)


def replica(server: ThreadedServer, identity: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [str(VMO), "controllers", "run", "--kubeconfig", str(server.kubeconfig)]
    argv += ["--identity", identity, "--lease-duration", "3"]
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


async def until(probe: Any, timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (got := await probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not met within {timeout}s (last: {got!r})")
        await asyncio.sleep(0.1)
    return got


async def test_one_replica_leads_and_the_other_takes_over_when_it_dies(
    server: ThreadedServer, client: Client, tmp_path: Path
) -> None:
    replicas = {name: replica(server, name, tmp_path / f"{name}.log") for name in ("a", "b")}

    async def holder() -> str | None:
        lease = await client.find(LEASE, LEASE_NAME, "vmo-system")
        return ((lease or {}).get("spec") or {}).get("holderIdentity") or None

    async def label(want: str) -> bool:
        vm = await client.get(VM, "db", "default")
        return (vm["metadata"].get("labels") or {}).get(NODE_LABEL) == want

    try:
        leader = await until(holder)
        assert leader in replicas
        vm = {"metadata": {"name": "db", "namespace": "default"}}
        vm["spec"] = {"runStrategy": "Halted", "template": {"spec": copy.deepcopy(SPEC)}}
        await client.create(VM, vm)
        await client.create(
            VMI, {"metadata": {"name": "db", "namespace": "default"}, "spec": copy.deepcopy(SPEC)}
        )
        await client.patch(VMI, "db", {"status": {"phase": "Running", "nodeName": "n1"}}, "default")
        await until(lambda: label("n1"))

        os.kill(replicas[leader].pid, signal.SIGKILL)  # no chance to release the lease
        replicas[leader].wait(10)
        survivor = next(name for name in replicas if name != leader)
        await until(lambda: _is(holder, survivor))
        await client.patch(VMI, "db", {"status": {"nodeName": "n2"}}, "default")
        await until(lambda: label("n2"))
    finally:
        for proc in replicas.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in replicas.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    # a replica stopped by SIGTERM gives its lease up on the way out
    assert await holder() is None


async def _is(probe: Any, want: str) -> bool:
    return bool(await probe() == want)
