"""`vmo demo`: the seed's hybrid example running on the embedded engine.

A database-style VM on the pod network published by a Service, beside two VMs on a layer-2
VLAN network that keep the MAC addresses they had on vSphere. The guest image is built from
Debian packages (the test guest) and imported by DataVolumes from ``$VMO_HOME/images``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from vmo.client import DATAVOLUME, NAD, SERVICE, VM, VMI, Client, Conflict
from vmo.testing.builders import boot_vm, http_datavolume

NS = "virtual-machines"
IMAGE_NAME = "vmo-guest.qcow2"
VLAN_MACS = {"app-1": "00:50:56:01:00:01", "app-2": "00:50:56:01:00:02"}

JSON = dict[str, Any]


def _datavolume(name: str, url: str) -> JSON:
    return http_datavolume(name, url, namespace=NS)


def _vm(name: str, *, labels: JSON, interfaces: list[JSON], networks: list[JSON]) -> JSON:
    return boot_vm(
        name,
        namespace=NS,
        disk=f"{name}-root",
        interfaces=interfaces,
        networks=networks,
        labels=labels,
        grace=10,
    )


def manifests(image_url: str) -> list[tuple[Any, JSON]]:
    """(resource, object) pairs of the hybrid demo, in apply order."""
    vlan = {
        "cniVersion": "0.3.1",
        "name": "vlan100",
        "type": "bridge",
        "bridge": "br-demo",
        "vlan": 100,
        "ipam": {
            "type": "host-local",
            "subnet": "192.168.100.0/24",
            "rangeStart": "192.168.100.10",
            "rangeEnd": "192.168.100.50",
        },
    }
    out: list[tuple[Any, JSON]] = [
        (
            NAD,
            {
                "metadata": {"name": "vlan100", "namespace": NS},
                "spec": {"config": json.dumps(vlan)},
            },
        ),
        (DATAVOLUME, _datavolume("demo-db-root", image_url)),
        (
            VM,
            _vm(
                "demo-db",
                labels={"app": "demo-db"},
                interfaces=[
                    {"name": "default", "masquerade": {}, "ports": [{"name": "pg", "port": 5432}]}
                ],
                networks=[{"name": "default", "pod": {}}],
            ),
        ),
        (
            SERVICE,
            {
                "metadata": {"name": "demo-db", "namespace": NS},
                "spec": {
                    "type": "NodePort",
                    "selector": {"app": "demo-db"},
                    "ports": [{"name": "pg", "port": 5432, "targetPort": 5432, "protocol": "TCP"}],
                },
            },
        ),
    ]
    for name, mac in VLAN_MACS.items():
        out.append((DATAVOLUME, _datavolume(f"{name}-root", image_url)))
        out.append(
            (
                VM,
                _vm(
                    name,
                    labels={"app": "legacy"},
                    interfaces=[{"name": "lan", "bridge": {}, "macAddress": mac}],
                    networks=[{"name": "lan", "multus": {"networkName": "vlan100"}}],
                ),
            )
        )
    return out


def stage_image(home: Path) -> str:
    """Builds (or reuses) the guest image and places it where DataVolumes may import from."""
    from vmo.testing.guest import build_guest, default_cache_dir

    guest = build_guest(default_cache_dir())
    images = home / "images"
    images.mkdir(parents=True, exist_ok=True)
    target = images / IMAGE_NAME
    if not target.exists():
        shutil.copyfile(guest.disk_qcow2, target)
    return f"file://{target}"


async def apply_demo(kubeconfig: Path, image_url: str, *, timeout: float = 600) -> JSON:
    """Creates what is missing and waits for the database VM to run; returns its Service."""
    async with Client.from_kubeconfig(kubeconfig) as client:
        for resource, obj in manifests(image_url):
            with contextlib.suppress(Conflict):
                await client.create(resource, obj)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            vmi = await client.find(VMI, "demo-db", NS)
            if vmi and vmi.get("status", {}).get("phase") == "Running":
                return await client.get(SERVICE, "demo-db", NS)
            await asyncio.sleep(1)
    raise TimeoutError("the demo VM did not reach Running in time")
