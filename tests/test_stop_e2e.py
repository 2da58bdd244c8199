"""Stopped means gone, on a real guest: the moment a VM's printableStatus says Stopped, no QEMU
of that VM runs any more, whether its agent started the QEMU or re-adopted it after a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, Kubectl
from tests.test_teardown import qemus_in
from tests.test_vm_e2e import BOOT_TIMEOUT, NS, engine_cluster, vm, vmi_of, wait_for
from vmo.engine.agent.runtime import workdir_name
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import http_datavolume

NAME = "stopper"
SUB = f"/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachines/{NAME}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-stop"))


@pytest.fixture(scope="module")
def stopper(cluster: ThreadedServer, capi: Api, image_server: str) -> Path:
    """The VM, created stopped (each test starts it); returns its workdir on node-1."""
    k = Kubectl(cluster.kubeconfig)
    k.apply(http_datavolume(f"{NAME}-root", f"{image_server}/disk.qcow2", namespace=NS))
    manifest = vm(NAME, disk=f"{NAME}-root")
    manifest["spec"]["runStrategy"] = "Halted"
    k.apply(manifest)
    wait_for(lambda: printable(capi) == "Stopped", 60, f"{NAME} created Stopped")
    return cluster.home / "nodes" / "node-1" / "vms" / workdir_name(NS, NAME)


def printable(capi: Api) -> str:
    return str(
        capi.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/{NAME}")
        .json()
        .get("status", {})
        .get("printableStatus")
    )


def start(capi: Api, workdir: Path) -> dict[str, Any]:
    assert capi.put(f"{SUB}/start", {}).status_code == 202

    def running() -> dict[str, Any] | None:
        vmi = vmi_of(capi, NAME)
        ok = vmi and vmi.get("status", {}).get("phase") == "Running" and qemus_in(workdir)
        return vmi if ok else None

    found: dict[str, Any] = wait_for(running, BOOT_TIMEOUT, f"{NAME} Running")
    return found


def stop_and_check_gone(capi: Api, workdir: Path) -> None:
    assert capi.put(f"{SUB}/stop", {}).status_code == 202
    wait_for(lambda: printable(capi) == "Stopped", 120, f"{NAME} Stopped")
    assert qemus_in(workdir) == []  # read right after Stopped was: nothing was left running


def test_stopped_means_its_qemu_is_gone(capi: Api, stopper: Path) -> None:
    start(capi, stopper)
    stop_and_check_gone(capi, stopper)


def test_stopped_means_gone_for_a_qemu_a_restarted_agent_adopted(
    cluster: ThreadedServer, capi: Api, stopper: Path
) -> None:
    before = start(capi, stopper)
    cluster.restart_node("node-1")  # the QEMU outlives its agent; the new agent adopts it
    assert vmi_of(capi, NAME)["metadata"]["uid"] == before["metadata"]["uid"]  # type: ignore[index]
    stop_and_check_gone(capi, stopper)
