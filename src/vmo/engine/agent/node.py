"""The agent's Node object and its Lease heartbeat, as a kubelet keeps them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
from datetime import UTC, datetime
from typing import Any

from vmo.api.annotations import AGENT_SOCKET
from vmo.client import LEASE, NAMESPACE, NODE, Client, Conflict, NotFound

log = logging.getLogger(__name__)

JSON = dict[str, Any]

LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10.0
AGENT_SOCKET_ANNOTATION = AGENT_SOCKET
AGENT_VERSION = "v1.32.0+vmo"
# What the host keeps for itself: 1 CPU's worth is too much on 2 cores; memory is plentiful.
RESERVED_MEMORY_KI = 512 * 1024


def now_rfc3339(micro: bool = False) -> str:
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ"
    return datetime.now(UTC).strftime(fmt)


def host_memory_ki() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    raise RuntimeError("MemTotal missing from /proc/meminfo")


def node_object(
    name: str, *, socket_path: str, cpus: int | None = None, memory_ki: int | None = None
) -> JSON:
    """The Node this agent registers: capacity, allocatable, labels, conditions, addresses."""
    cpus = cpus or os.cpu_count() or 1
    memory_ki = memory_ki or host_memory_ki()
    capacity = {"cpu": str(cpus), "memory": f"{memory_ki}Ki", "pods": "110"}
    allocatable = {**capacity, "memory": f"{max(memory_ki - RESERVED_MEMORY_KI, 0)}Ki"}
    stamp = now_rfc3339()
    return {
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubevirt.io/schedulable": "true",
            },
            "annotations": {AGENT_SOCKET_ANNOTATION: socket_path},
        },
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "vmo node agent is posting ready status",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "osImage": platform.platform(),
                "kernelVersion": platform.release(),
                "kubeletVersion": AGENT_VERSION,
                "kubeProxyVersion": AGENT_VERSION,
                "containerRuntimeVersion": "qemu://7",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        },
    }


async def register(client: Client, node: JSON) -> None:
    """Creates the Node or refreshes its labels, annotations and status."""
    name = node["metadata"]["name"]
    existing = await client.find(NODE, name)
    if existing is None:
        with contextlib.suppress(Conflict):
            await client.create(NODE, {k: v for k, v in node.items() if k != "status"})
    else:
        md = node["metadata"]
        await client.patch(
            NODE, name, {"metadata": {"labels": md["labels"], "annotations": md["annotations"]}}
        )
    await client.patch_status(NODE, name, node["status"])


async def ensure_lease_namespace(client: Client) -> None:
    with contextlib.suppress(Conflict):
        await client.create(NAMESPACE, {"metadata": {"name": LEASE_NAMESPACE}})


async def renew_lease(client: Client, node: str) -> None:
    spec = {
        "holderIdentity": node,
        "leaseDurationSeconds": LEASE_SECONDS,
        "renewTime": now_rfc3339(micro=True),
    }
    try:
        await client.patch(LEASE, node, {"spec": spec}, LEASE_NAMESPACE)
    except NotFound:
        await client.create(
            LEASE, {"metadata": {"name": node, "namespace": LEASE_NAMESPACE}, "spec": spec}
        )


async def heartbeat(client: Client, node: str, stop: asyncio.Event) -> None:
    """Renews the Lease and the Ready condition until ``stop`` is set."""
    while not stop.is_set():
        try:
            await renew_lease(client, node)
            stamp = now_rfc3339()
            ready = {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "vmo node agent is posting ready status",
                "lastHeartbeatTime": stamp,
            }
            current = await client.get(NODE, node)
            conditions = [
                c
                for c in current.get("status", {}).get("conditions", [])
                if c.get("type") != "Ready"
            ]
            previous: JSON = next(
                (
                    c
                    for c in current.get("status", {}).get("conditions", [])
                    if c.get("type") == "Ready"
                ),
                {},
            )
            ready["lastTransitionTime"] = (
                previous.get("lastTransitionTime", stamp)
                if previous.get("status") == "True"
                else stamp
            )
            await client.patch_status(NODE, node, {"conditions": [*conditions, ready]})
        except Exception as exc:  # a missed heartbeat is retried, never fatal
            log.warning("heartbeat of %s failed: %s", node, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HEARTBEAT_SECONDS)
