"""The runtime's example: a VirtualMachine's ``vmo.dev/node`` label names the node its VMI
runs on, as vSphere's inventory shows each VM's host.

``kubectl get vm -l vmo.dev/node=node-1`` then lists what a drain of node-1 touches. The
decision is a pure function; the shell reads fresh state, writes one guarded patch and an
Event, and leaves retries to the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmo.api.annotations import NODE
from vmo.client import VM, VMI, Client, NotFound
from vmo.runtime import Controller, EventRecorder, Result, Watch, split_key

JSON = dict[str, Any]

NODE_LABEL = NODE


def wanted_label(vmi: JSON | None) -> str | None:
    """The label value for a VM whose VMI is ``vmi``: its node while it has one, else none."""
    if vmi is None or (vmi.get("metadata") or {}).get("deletionTimestamp"):
        return None
    status = vmi.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    return str(status.get("nodeName") or "") or None


def label_patch(vm: JSON, node: str | None) -> JSON | None:
    """The merge patch that makes the VM's label say ``node`` (None: nothing to change)."""
    md = vm.get("metadata") or {}
    if (md.get("labels") or {}).get(NODE_LABEL) == node:
        return None
    # guarded by resourceVersion: a VM changed meanwhile is reconciled again, never overwritten
    return {"metadata": {"resourceVersion": md["resourceVersion"], "labels": {NODE_LABEL: node}}}


class NodeLabelController(Controller):
    name = "vm-node-label"

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.events = EventRecorder(client, component="vmo-node-label", clock=self.clock)

    def watches(self) -> Sequence[Watch]:
        # a VMI's key is its VM's: KubeVirt names them alike
        return [Watch(VM), Watch(VMI)]

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        vm = await self.client.find(VM, name, namespace)
        if vm is None:
            return None
        node = wanted_label(await self.client.find(VMI, name, namespace))
        patch = label_patch(vm, node)
        if patch is None:
            return None
        try:
            await self.client.patch(VM, name, patch, namespace)
        except NotFound:
            return None
        if node is not None:
            await self.events.record(vm, "NodeChanged", f"The VM runs on node {node}")
        return None
