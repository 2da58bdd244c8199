"""Admission that needs the whole cluster's view: MAC addresses (KubeMacPool's role) and
Service ClusterIPs and NodePorts (kube-apiserver's allocators).

Both keep an in-memory index fed by the watch hub, so a write costs a lookup, not a scan.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from vmo.api.kubevirt import macs
from vmo.api.services import addresses_in_use, allocate_service
from vmo.api.types import JSON, ResourceType
from vmo.apiserver import errors
from vmo.apiserver import objects as ob
from vmo.apiserver.registry import Registry
from vmo.apiserver.watch import Change

_MAC_KINDS = {
    "virtualmachines": "VirtualMachine",
    "virtualmachineinstances": "VirtualMachineInstance",
}


def _coords(obj: JSON) -> tuple[str, str]:
    md = obj.get("metadata") or {}
    return str(md.get("namespace", "")), str(md.get("name", ""))


@dataclass
class MacPool:
    """Stable, unique MAC addresses for VM and VMI interfaces, per network."""

    service: ob.ObjectService
    registry: Registry
    rng: random.Random = field(default_factory=random.SystemRandom)
    _by_object: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    _counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    _loaded: bool = False

    def observe(self, change: Change) -> None:
        group, plural = change.key.split("/", 2)[:2]
        if group != "kubevirt.io" or plural not in _MAC_KINDS or not self._loaded:
            return
        self._forget(change.key)
        if change.type != "DELETED":
            self._remember(change.key, change.obj)

    def _remember(self, key: str, obj: JSON) -> None:
        used = macs.macs_in_use([obj])
        if used:
            self._by_object[key] = used
            for network, found in used.items():
                self._counts[network].update(found)

    def _forget(self, key: str) -> None:
        for network, found in self._by_object.pop(key, {}).items():
            self._counts[network].subtract(found)

    def _load(self) -> None:
        if self._loaded:
            return
        for plural in _MAC_KINDS:
            rt = self.registry.lookup("kubevirt.io", "v1", plural)
            if rt is not None:
                for row in self.service.scan(rt):
                    self._remember(row.key, row.obj())
        self._loaded = True

    def _used_by_others(self, obj: JSON) -> dict[str, set[str]]:
        """MACs in use, minus those of this object and of its VM/VMI twin (same name)."""
        namespace, name = _coords(obj)
        own: Counter[tuple[str, str]] = Counter()
        for plural in _MAC_KINDS:
            key = f"kubevirt.io/{plural}/{namespace}/{name}"
            for network, found in self._by_object.get(key, {}).items():
                own.update((network, mac) for mac in found)
        return {
            network: {mac for mac, n in counts.items() if n - own[(network, mac)] > 0}
            for network, counts in self._counts.items()
        }

    def admit(self, rt: ResourceType, obj: JSON, old: JSON | None, caller: ob.Caller) -> None:
        if rt.group != "kubevirt.io" or rt.plural not in _MAC_KINDS:
            return
        self._load()
        used = self._used_by_others(obj)
        causes = macs.mac_conflicts(obj, used)
        if causes:
            raise errors.invalid(rt.kind, rt.group, _coords(obj)[1], causes)
        assigned = macs.macs_to_assign(obj, used, rng=self.rng, old=old)
        if assigned:
            macs.apply_macs(obj, assigned)


@dataclass
class ServiceAllocator:
    """ClusterIP and NodePort allocation for Services, as kube-apiserver does on create."""

    service: ob.ObjectService
    registry: Registry

    def admit(self, rt: ResourceType, obj: JSON, old: JSON | None, caller: ob.Caller) -> None:
        if rt.group != "" or rt.kind != "Service":
            return
        if old is not None:
            # the allocated ClusterIP is immutable; keep it when an update omits it
            spec = obj.setdefault("spec", {})
            for key in ("clusterIP", "clusterIPs"):
                if key in old.get("spec", {}) and not spec.get(key):
                    spec[key] = old["spec"][key]
        services = [row.obj() for row in self.service.scan(rt)]
        ips, ports = addresses_in_use(services, exclude=_coords(obj))
        causes = allocate_service(obj, used_ips=ips, used_ports=ports)
        if causes:
            raise errors.invalid(rt.kind, rt.group, _coords(obj)[1], causes)
