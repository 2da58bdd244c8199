"""The VMQuota controller: each quota's ``status.used`` is what the VMs in its scope declare now
(``vmo.api.quota``), and its ``Exceeded`` condition says when a lowered limit is below that (the
API server refuses what would add to it; nothing running is touched)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from vmo.api import quota as q
from vmo.client import CLUSTER_INSTANCETYPE, INSTANCETYPE, VM, Client, Conflict, NotFound
from vmo.controllers.access.crds import VMQUOTA
from vmo.runtime import Controller, Result, Watch, merge_conditions, split_key, timestamp

JSON = dict[str, Any]


class VMQuotaController(Controller):
    name = "vm-quota"

    def __init__(self, client: Client) -> None:
        super().__init__(client)

    def watches(self) -> Sequence[Watch]:
        return [
            Watch(VMQUOTA),
            Watch(VM, self._quotas_of_namespace),
            Watch(INSTANCETYPE, self._quotas_of_namespace),
            Watch(CLUSTER_INSTANCETYPE, self._every_quota),
        ]

    def _quotas_of_namespace(self, _etype: str, obj: JSON) -> list[str]:
        namespace = obj["metadata"].get("namespace", "")
        return [
            f"{namespace}/{x['metadata']['name']}" for x in self.informer(VMQUOTA).items(namespace)
        ]

    def _every_quota(self, _etype: str, _obj: JSON) -> list[str]:
        return [
            f"{x['metadata'].get('namespace', '')}/{x['metadata']['name']}"
            for x in self.informer(VMQUOTA).items()
        ]

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        quota = await self.client.find(VMQUOTA, name, namespace)
        if quota is None:
            return None
        vms = self.informer(VM).items(namespace)
        types: dict[tuple[str, str], JSON] = {
            ("VirtualMachineInstancetype", t["metadata"]["name"]): t
            for t in self.informer(INSTANCETYPE).items(namespace)
        }
        types |= {
            ("VirtualMachineClusterInstancetype", t["metadata"]["name"]): t
            for t in self.informer(CLUSTER_INSTANCETYPE).items()
        }
        used = q.used(quota, vms, types)
        limits = q.hard_limits(quota)
        over = [a for a, limit in limits.items() if getattr(used, a) > limit]
        if over:
            shown = ", ".join(f"{a} {getattr(used, a)} > {limits[a]}" for a in over)
            cond = {"type": "Exceeded", "status": "True", "reason": "OverLimit",
                    "message": f"the VMs declare more than the quota allows ({shown}): new or "
                               "larger VMs are refused until it is back under"}  # fmt: skip
        else:
            cond = {"type": "Exceeded", "status": "False", "reason": "WithinLimits",
                    "message": "the VMs in scope fit the quota"}  # fmt: skip
        hard = {**q.Usage(**limits).to_json()}
        hard = {k: v for k, v in hard.items() if q.DIMENSIONS[k] in limits}
        old = quota.get("status") or {}
        status = {
            "hard": hard,
            "used": used.to_json(),
            "observedGeneration": quota["metadata"].get("generation", 1),
            "conditions": merge_conditions(old.get("conditions"), [cond], timestamp()),
        }
        if status != old:
            with contextlib.suppress(Conflict, NotFound):
                await self.client.replace(
                    VMQUOTA, {**quota, "status": status}, subresource="status"
                )
        return None


__all__ = ["VMQuotaController"]
