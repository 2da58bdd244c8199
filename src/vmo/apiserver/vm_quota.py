"""Admission of VirtualMachines under ``vmo.dev/v1alpha1`` VMQuotas (``vmo.api.quota``): a VM
whose create, resize or move into a folder would take a quota of its namespace past a limit is
refused with 403 and ResourceQuota's message, naming the quota and the requested, used and
limited numbers. Only what the request adds is judged. A quota's counts come from VM objects
alone, so a migration's second copy never counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmo.api import quota as q
from vmo.api.types import JSON, ResourceType
from vmo.apiserver import objects as ob
from vmo.apiserver.errors import ApiError
from vmo.apiserver.registry import Registry

INSTANCETYPES = {
    "VirtualMachineInstancetype": "virtualmachineinstancetypes",
    "VirtualMachineClusterInstancetype": "virtualmachineclusterinstancetypes",
}


@dataclass
class VMQuotaAdmission:
    service: ob.ObjectService
    registry: Registry

    def admit(self, rt: ResourceType, obj: JSON, old: JSON | None, caller: ob.Caller) -> None:
        if (rt.group, rt.kind) != ("kubevirt.io", "VirtualMachine"):
            return
        md = obj.get("metadata") or {}
        if md.get("deletionTimestamp"):
            return
        quota_rt = self.registry.lookup("vmo.dev", "v1alpha1", "vmquotas")
        if quota_rt is None:
            return  # the CRD is not installed: no quota to keep
        namespace, name = str(md.get("namespace") or ""), str(md.get("name") or "")
        quotas = [row.obj() for row in self.service.scan(quota_rt, namespace)]
        if not quotas:
            return
        others = [row.obj() for row in self.service.scan(rt, namespace)]
        others = [v for v in others if v["metadata"]["name"] != name]
        types = self._instancetypes(namespace, [*others, obj, *([old] if old else [])])
        new = q.vm_usage(obj, _it(types, obj))
        before = q.vm_usage(old, _it(types, old)) if old is not None else q.Usage()
        for quota in quotas:
            if not q.in_scope(quota, obj):
                continue
            current = q.used(quota, others, types)
            if old is not None and q.in_scope(quota, old):
                current += before
                requested = new - before
            else:
                requested = new
            refusal = q.exceeded(quota, current, requested)
            if refusal is not None:
                raise ApiError(
                    403,
                    "Forbidden",
                    f'virtualmachines.kubevirt.io "{name}" is forbidden: {refusal}',
                    kind="virtualmachines",
                    group="kubevirt.io",
                    name=name,
                )

    def _instancetypes(
        self, namespace: str, vms: list[JSON]
    ) -> dict[tuple[str, str], Mapping[str, Any]]:
        found: dict[tuple[str, str], Mapping[str, Any]] = {}
        for vm in vms:
            ref = q.instancetype_ref(vm)
            if ref is None or ref in found:
                continue
            kind, name = ref
            rt = self.registry.lookup("instancetype.kubevirt.io", "v1beta1", INSTANCETYPES[kind])
            if rt is None:
                continue
            obj = self.service.find(rt, namespace if rt.namespaced else "", name)
            if obj is not None:
                found[ref] = obj
        return found


def _it(
    types: Mapping[tuple[str, str], Mapping[str, Any]], vm: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    ref = q.instancetype_ref(vm)
    return types.get(ref) if ref else None


__all__ = ["VMQuotaAdmission"]
