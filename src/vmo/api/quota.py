"""VM-aware quotas (``vmo.dev/v1alpha1`` VMQuota): what a VirtualMachine declares, counted.

A VM counts what its spec declares, whether it runs or not: its vCPUs (the instancetype's
``spec.cpu.guest``, else sockets * cores * threads of ``domain.cpu``, 1 by default), its memory
(the instancetype's ``spec.memory.guest``, else ``domain.memory.guest``, else the memory
request), the storage its DataVolume templates request, and itself. Counting VM objects, never
pods or VMIs, is what keeps a live migration's second copy (a target launcher and VMI that
exist only while the guest moves) from ever counting, the double count that KubeVirt and
Harvester users hit with namespace ResourceQuotas on pods.

Defined here, below every layer: the quota controller writes ``status.used`` from it, and the
embedded API server refuses a VM over quota with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any

from vmo.api.access import in_folder
from vmo.api.quantity import QuantityError, parse_quantity

JSON = dict[str, Any]

# spec.hard's keys, each beside what it counts
DIMENSIONS = {
    "virtualMachines": "vms",
    "vcpus": "vcpus",
    "memory": "memory",
    "storage": "storage",
}


@dataclass(frozen=True)
class Usage:
    vms: int = 0
    vcpus: int = 0
    memory: int = 0  # bytes
    storage: int = 0  # bytes

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def to_json(self) -> JSON:
        return {
            "virtualMachines": self.vms,
            "vcpus": self.vcpus,
            "memory": format_bytes(self.memory),
            "storage": format_bytes(self.storage),
        }


def _bytes(value: Any) -> int:
    if value in (None, ""):
        return 0
    try:
        return int(parse_quantity(str(value)).to_integral_value())
    except QuantityError:
        return 0


def format_bytes(n: int) -> str:
    """As a Quantity, in the largest binary unit that divides it (``3Gi``, ``1536Mi``)."""
    for suffix, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def instancetype_ref(vm: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, name) of the VM's instancetype; the cluster-wide kind by default, as upstream."""
    matcher = (vm.get("spec") or {}).get("instancetype") or {}
    if not matcher.get("name"):
        return None
    kind = str(matcher.get("kind") or "VirtualMachineClusterInstancetype")
    if kind.lower() == "virtualmachineinstancetype":
        kind = "VirtualMachineInstancetype"
    elif kind.lower() == "virtualmachineclusterinstancetype":
        kind = "VirtualMachineClusterInstancetype"
    return kind, str(matcher["name"])


def vm_usage(vm: Mapping[str, Any], instancetype: Mapping[str, Any] | None = None) -> Usage:
    """What one VM declares (``instancetype``: the object its spec names, when there is one)."""
    spec = vm.get("spec") or {}
    domain = ((spec.get("template") or {}).get("spec") or {}).get("domain") or {}
    itspec = (instancetype or {}).get("spec") or {}
    if (itspec.get("cpu") or {}).get("guest"):
        vcpus = int(itspec["cpu"]["guest"])
    else:
        cpu = domain.get("cpu") or {}
        vcpus = (
            int(cpu.get("sockets") or 1) * int(cpu.get("cores") or 1) * int(cpu.get("threads") or 1)
        )
    memory = _bytes((itspec.get("memory") or {}).get("guest"))
    if not memory:
        memory = _bytes((domain.get("memory") or {}).get("guest"))
    if not memory:
        memory = _bytes(((domain.get("resources") or {}).get("requests") or {}).get("memory"))
    storage = 0
    for template in spec.get("dataVolumeTemplates") or []:
        tspec = template.get("spec") or {}
        section = tspec.get("storage") or tspec.get("pvc") or {}
        storage += _bytes(((section.get("resources") or {}).get("requests") or {}).get("storage"))
    return Usage(1, vcpus, memory, storage)


def hard_limits(quota: Mapping[str, Any]) -> dict[str, int]:
    """spec.hard as numbers, by Usage field."""
    hard = (quota.get("spec") or {}).get("hard") or {}
    out = {}
    for key, attr in DIMENSIONS.items():
        if key in hard:
            value = hard[key]
            out[attr] = _bytes(value) if attr in ("memory", "storage") else int(Decimal(str(value)))
    return out


def in_scope(quota: Mapping[str, Any], vm: Mapping[str, Any]) -> bool:
    """A quota counts every VM of its namespace, or those in its folder (and below)."""
    folder = (quota.get("spec") or {}).get("folder")
    return not folder or in_folder(vm, str(folder))


def used(
    quota: Mapping[str, Any],
    vms: Iterable[Mapping[str, Any]],
    instancetypes: Mapping[tuple[str, str], Mapping[str, Any]],
) -> Usage:
    total = Usage()
    for vm in vms:
        if in_scope(quota, vm) and not (vm.get("metadata") or {}).get("deletionTimestamp"):
            ref = instancetype_ref(vm)
            total += vm_usage(vm, instancetypes.get(ref) if ref else None)
    return total


def _show(attr: str, n: int) -> str:
    key = next(k for k, v in DIMENSIONS.items() if v == attr)
    return f"{key}={format_bytes(n) if attr in ('memory', 'storage') else n}"


def exceeded(quota: Mapping[str, Any], current: Usage, requested: Usage) -> str | None:
    """ResourceQuota's refusal for adding ``requested`` to ``current`` (None: it fits). Only what
    the request adds is judged: a VM that grows nothing passes even where the quota is over."""
    limits = hard_limits(quota)
    over = [
        attr
        for attr, limit in limits.items()
        if getattr(requested, attr) > 0
        and getattr(current, attr) + getattr(requested, attr) > limit
    ]
    if not over:
        return None
    name = (quota.get("metadata") or {}).get("name", "")
    return (
        f"exceeded quota: {name}, "
        f"requested: {','.join(_show(a, getattr(requested, a)) for a in over)}, "
        f"used: {','.join(_show(a, getattr(current, a)) for a in over)}, "
        f"limited: {','.join(_show(a, limits[a]) for a in over)}"
    )


__all__ = [
    "DIMENSIONS",
    "Usage",
    "exceeded",
    "format_bytes",
    "hard_limits",
    "in_scope",
    "instancetype_ref",
    "used",
    "vm_usage",
]
