"""The endpoints controller: core v1 Endpoints of each selector Service list the VMIs it selects.

``desired_subsets`` (pure) decides; ``EndpointsController.reconcile`` reads fresh state, writes
the Endpoints when they differ, and deletes them when the Service is gone. Informers on Services
and VMIs only enqueue keys. A VMI is an endpoint while Running and not being deleted; its address
is the guest IP it reports (or its node's InternalIP), and ``targetRef`` names it, which is what
the service proxy forwards by.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vmo.client import ENDPOINTS, NODE, SERVICE, VMI, ApiStatusError, Conflict, NotFound
from vmo.runtime import Controller, Result, Watch, object_key, split_key

log = logging.getLogger(__name__)

__all__ = ["EndpointsController", "desired_subsets", "selects"]

JSON = dict[str, Any]


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service selector (equality only) matches when every pair is among the labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _resolve_port(target: Any, vmi: JSON, protocol: str) -> int | None:
    """A numeric targetPort as is; a named one from the VMI's interface ``ports``."""
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    interfaces = (((vmi.get("spec") or {}).get("domain") or {}).get("devices") or {}).get(
        "interfaces"
    )
    for iface in interfaces or []:
        for port in iface.get("ports") or []:
            if port.get("name") == target and str(port.get("protocol") or "TCP") == protocol:
                return int(port["port"])
    return None


def _endpoint_ports(service: JSON, vmi: JSON) -> tuple[tuple[str, int, str], ...]:
    """(name, resolved port, protocol) of each Service port this VMI can serve."""
    ports: list[tuple[str, int, str]] = []
    for port in (service.get("spec") or {}).get("ports") or []:
        protocol = str(port.get("protocol") or "TCP")
        resolved = _resolve_port(port.get("targetPort", port.get("port")), vmi, protocol)
        if resolved is not None:
            ports.append((str(port.get("name") or ""), resolved, protocol))
    return tuple(ports)


def _address(vmi: JSON, node_ips: Mapping[str, str]) -> JSON | None:
    md, status = vmi["metadata"], vmi.get("status") or {}
    node = str(status.get("nodeName") or "")
    interfaces = status.get("interfaces") or []
    ip = (interfaces[0].get("ipAddress") if interfaces else None) or node_ips.get(node)
    if not ip:
        return None
    address: JSON = {
        "ip": ip,
        "targetRef": {
            "kind": "VirtualMachineInstance",
            "namespace": md.get("namespace", ""),
            "name": md["name"],
            "uid": md.get("uid", ""),
        },
    }
    if node:
        address["nodeName"] = node
    return address


def _ready(vmi: JSON) -> bool:
    conditions = (vmi.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    return ready is None or ready.get("status") == "True"  # no Ready condition: trust Running


def desired_subsets(service: JSON, vmis: Iterable[JSON], node_ips: Mapping[str, str]) -> list[JSON]:
    """Endpoints ``subsets`` for ``service``: VMIs grouped by the ports they resolve to."""
    spec = service.get("spec") or {}
    selector = spec.get("selector") or {}
    publish_all = bool(spec.get("publishNotReadyAddresses"))
    groups: dict[tuple[tuple[str, int, str], ...], JSON] = {}
    for vmi in sorted(vmis, key=lambda v: str(v["metadata"]["name"])):
        md = vmi["metadata"]
        if not selects(selector, md.get("labels") or {}) or md.get("deletionTimestamp"):
            continue
        if (vmi.get("status") or {}).get("phase") != "Running":
            continue
        ports, address = _endpoint_ports(service, vmi), _address(vmi, node_ips)
        if not ports or address is None:
            continue
        group = groups.setdefault(ports, {})
        kind = "addresses" if publish_all or _ready(vmi) else "notReadyAddresses"
        group.setdefault(kind, []).append(address)
    return [{**group, "ports": [_port_json(p) for p in ports]} for ports, group in groups.items()]


def _port_json(port: tuple[str, int, str]) -> JSON:
    name, number, protocol = port
    return (
        {"name": name, "port": number, "protocol": protocol}
        if name
        else {"port": number, "protocol": protocol}
    )


class EndpointsController(Controller):
    """Keeps Endpoints in step with Services that have a selector and the VMIs they select."""

    name = "endpoints-controller"

    def watches(self) -> Sequence[Watch]:
        return [Watch(SERVICE), Watch(VMI, self._services_of_namespace)]

    def _services_of_namespace(self, _etype: str, vmi: JSON) -> list[str]:
        # a label change can remove a VMI from a Service: recheck every Service of the namespace
        namespace = vmi["metadata"].get("namespace", "")
        return [
            object_key(svc)
            for svc in self.informer(SERVICE).items(namespace)
            if (svc.get("spec") or {}).get("selector")
        ]

    async def reconcile(self, key: str) -> Result | None:
        await self.sync(*split_key(key))
        return None

    async def sync(self, namespace: str, name: str) -> None:
        """Reads the Service and its VMIs afresh and makes the Endpoints match."""
        service = await self.client.find(SERVICE, name, namespace)
        if service is None:
            await self._delete(namespace, name)
            return
        selector = (service.get("spec") or {}).get("selector") or {}
        if not selector:
            return  # Endpoints of a selector-less Service are the user's to manage
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        vmis, _ = await self.client.list(VMI, namespace, label_selector=label_selector)
        subsets = desired_subsets(service, vmis, await self._node_ips(vmis))
        await self._write(service, subsets)

    async def _node_ips(self, vmis: list[JSON]) -> dict[str, str]:
        """InternalIPs of the nodes of VMIs that report no IP of their own."""
        wanted = {
            str(v.get("status", {}).get("nodeName"))
            for v in vmis
            if v.get("status", {}).get("nodeName")
            and not ((v.get("status", {}).get("interfaces") or [{}])[0].get("ipAddress"))
        }
        ips: dict[str, str] = {}
        for node_name in wanted:
            node = await self.client.find(NODE, node_name)
            addresses = ((node or {}).get("status") or {}).get("addresses") or []
            internal = next(
                (a["address"] for a in addresses if a.get("type") == "InternalIP"), None
            )
            if internal:
                ips[node_name] = internal
        return ips

    async def _write(self, service: JSON, subsets: list[JSON]) -> None:
        md = service["metadata"]
        namespace, name = md.get("namespace", ""), md["name"]
        current = await self.client.find(ENDPOINTS, name, namespace)
        labels = dict(md.get("labels") or {})
        if current is None:
            body = {
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "subsets": subsets,
            }
            with contextlib.suppress(Conflict):  # created meanwhile: the next event reconciles
                await self.client.create(ENDPOINTS, body, namespace)
            return
        if (current.get("subsets") or []) == subsets and (
            current["metadata"].get("labels") or {}
        ) == labels:
            return
        current["subsets"] = subsets
        current["metadata"]["labels"] = labels
        await self.client.replace(ENDPOINTS, current)  # resourceVersion guards a concurrent write

    async def _delete(self, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFound, ApiStatusError):
            await self.client.delete(ENDPOINTS, name, namespace)
