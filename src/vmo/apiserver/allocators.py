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

    def _taken_elsewhere(self, network: str, mac: str, obj: JSON) -> bool:
        """Whether another object holds ``mac`` on ``network`` (the VM/VMI twin does not count)."""
        count = self._counts.get(network, Counter())[mac]
        if count <= 0:
            return False
        namespace, name = _coords(obj)
        own = sum(
            mac
            in self._by_object.get(f"kubevirt.io/{plural}/{namespace}/{name}", {}).get(network, ())
            for plural in _MAC_KINDS
        )
        return count - own > 0

    def _used_by_others(self, obj: JSON) -> dict[str, set[str]]:
        """The object's own MACs that others hold, per network: all the conflict check needs,
        without materialising every MAC in the cluster on each write."""
        used: dict[str, set[str]] = {}
        for network, found in macs.macs_in_use([obj]).items():
            taken = {mac for mac in found if self._taken_elsewhere(network, mac, obj)}
            if taken:
                used[network] = taken
        return used

    def _fresh_everywhere(self, assigned: dict[str, str]) -> bool:
        return not any(
            self._counts[n][mac] > 0 for n in list(self._counts) for mac in assigned.values()
        )

    def admit(self, rt: ResourceType, obj: JSON, old: JSON | None, caller: ob.Caller) -> None:
        if rt.group != "kubevirt.io" or rt.plural not in _MAC_KINDS:
            return
        self._load()
        used = self._used_by_others(obj)
        causes = macs.mac_conflicts(obj, used)
        if causes:
            raise errors.invalid(rt.kind, rt.group, _coords(obj)[1], causes)
        previous = _interface_macs(old) if old is not None else {}
        for _ in range(16):
            assigned = macs.macs_to_assign(obj, used, rng=self.rng, old=old)
            fresh = {k: v for k, v in assigned.items() if previous.get(k) != v}
            # a new random address in a 2^40 space is almost never taken; check to be sure
            if not fresh or self._fresh_everywhere(fresh):
                break
        if assigned:
            macs.apply_macs(obj, assigned)


def _interface_macs(obj: JSON) -> dict[str, str]:
    spec = obj.get("spec") or {}
    template_spec: JSON = (spec.get("template") or {}).get("spec") or spec
    domain: JSON = template_spec.get("domain") or {}
    return {
        str(i.get("name")): macs.normalize_mac(i["macAddress"])
        for i in (domain.get("devices") or {}).get("interfaces") or []
        if isinstance(i.get("macAddress"), str)
    }


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
