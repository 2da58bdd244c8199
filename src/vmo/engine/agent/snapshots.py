"""The node's half of VM snapshots: it takes the volume snapshots a VirtualMachineSnapshotContent
lists, and removes them (merging what must be merged) when the content goes.

The cluster's snapshot controller writes the content; the node that runs the VM (online) or holds
its volumes (offline) claims it with the ``vmo.dev/snapshot-node`` annotation and the content's
protection finalizer, takes the pool snapshots, then makes one VolumeSnapshot per volume (owned
by the content, as upstream's) which the node's snapshotter binds to a VolumeSnapshotContent
(engine/storage/volumesnapshots.py). Once they are ready it reports ``status.readyToUse`` /
``status.error``. Protocol: docs/snapshots.md.

Online: the guest's filesystems are frozen through its guest agent when one answers (and thawed
whatever happens), the vCPUs are paused for the instant every disk moves onto its new overlay
(so a VM's disks are consistent with each other even without an agent), then resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmo.api.annotations import SNAPSHOT_INDICATIONS, SNAPSHOT_NODE
from vmo.client import VMI, VMSNAPSHOTCONTENT, Client, Conflict, NotFound
from vmo.engine.agent.agent import NodeAgent
from vmo.engine.agent.runtime import VmiRuntime
from vmo.engine.qemu.errors import QemuError
from vmo.engine.qemu.guest_agent import GuestAgentClient
from vmo.engine.qemu.qmp import QMPClient
from vmo.engine.qemu.snapshot import Overlay, merge_layer, snapshot_disks
from vmo.engine.storage.pool import Pool, PoolError
from vmo.engine.storage.volumesnapshots import VOLUMESNAPSHOT, VolumeSnapshotter
from vmo.runtime import SHUTDOWN_GRACE_SECONDS, Controller, Result, Watch, split_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]
INDICATIONS = SNAPSHOT_INDICATIONS
CONTENT_FINALIZER = "snapshot.kubevirt.io/vmsnapshotcontent-protection"
# set once the pool snapshots are taken: the content's volume snapshots are VolumeSnapshots
# (contents from before they existed have none, and their pool snapshots go with them)
VOLUME_SNAPSHOTS = "vmo.dev/volume-snapshots"
CONTENT_API_VERSION = "snapshot.kubevirt.io/v1beta1"
AGENT_CONNECT_TIMEOUT = 2.0
FREEZE_TIMEOUT = 30.0
SWEEP_SECONDS = 10.0
_FINAL_VMI = ("Succeeded", "Failed")


class SnapshotError(Exception):
    pass


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Backup:
    volume: str  # the VM's volume name
    claim: str
    snapshot: str  # the volume snapshot's name

    @classmethod
    def parse(cls, item: JSON) -> Backup:
        claim = (((item.get("persistentVolumeClaim") or {}).get("metadata")) or {}).get("name")
        return cls(
            str(item.get("volumeName", "")), str(claim or ""), str(item["volumeSnapshotName"])
        )


def backups_of(content: JSON) -> list[Backup]:
    return [Backup.parse(b) for b in (content.get("spec") or {}).get("volumeBackups") or []]


def _owner_content_keys(_etype: str, snapshot: JSON) -> list[str]:
    md = snapshot["metadata"]
    return [
        f"{md['namespace']}/{ref['name']}"
        for ref in md.get("ownerReferences") or []
        if ref.get("kind") == "VirtualMachineSnapshotContent" and ref.get("controller")
    ]


def volume_snapshot_object(content: JSON, backup: Backup, node: str, vsclass: str) -> JSON:
    """The VolumeSnapshot of one volume of a VM snapshot, owned by its content."""
    md = content["metadata"]
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {
            "name": backup.snapshot,
            "namespace": md["namespace"],
            "annotations": {SNAPSHOT_NODE: node},
            "ownerReferences": [
                {
                    "apiVersion": CONTENT_API_VERSION,
                    "kind": "VirtualMachineSnapshotContent",
                    "name": md["name"],
                    "uid": md.get("uid", ""),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "source": {"persistentVolumeClaimName": backup.claim},
            "volumeSnapshotClassName": vsclass,
        },
    }


def source_vm(content: JSON) -> tuple[str, str]:
    md = (((content.get("spec") or {}).get("source") or {}).get("virtualMachine") or {}).get(
        "metadata"
    ) or {}
    return str(md.get("namespace") or content["metadata"]["namespace"]), str(md.get("name", ""))


async def _switch(
    qmp: QMPClient, disk: str, node: str, added: list[Overlay], _old: Path, new: Path
) -> None:
    added.extend(await snapshot_disks(qmp, [Overlay(disk, node, new)]))


class SnapshotExecutor(Controller):
    """One per node: takes and removes the volume snapshots of the contents it claims."""

    workers = 1  # one node's snapshots are taken one at a time

    def __init__(self, client: Client, node: str, agent: NodeAgent, pools: Sequence[Pool]) -> None:
        super().__init__(client)
        self.node, self.agent, self.pools = node, agent, list(pools)
        self.name = f"snapshot-executor-{node}"
        self.volume_snapshots = VolumeSnapshotter(client, node, self.pools)

    def watches(self) -> Sequence[Watch]:
        return [Watch(VMSNAPSHOTCONTENT), Watch(VOLUMESNAPSHOT, _owner_content_keys)]

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        sweep = loop.create_task(self._sweep(stop))
        snapshotter = loop.create_task(self.volume_snapshots.run(stop))
        try:
            await super().run(stop)
        finally:
            sweep.cancel()
            try:
                if stop.is_set():  # it stops on its own: let its reconciles in flight finish
                    await asyncio.wait({snapshotter}, timeout=SHUTDOWN_GRACE_SECONDS)
            finally:
                snapshotter.cancel()
                await asyncio.gather(sweep, snapshotter, return_exceptions=True)

    async def _sweep(self, stop: asyncio.Event) -> None:
        """Merges (offline) the layers no snapshot needs any more once no QEMU has them open."""
        while not stop.is_set():
            await self.clock.sleep(SWEEP_SECONDS)
            with contextlib.suppress(PoolError, OSError):
                await self.merge(live=False)

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        content = await self.client.find(VMSNAPSHOTCONTENT, name, namespace)
        if content is None:
            return None
        return Result(await self.sync(content))

    # --- reconcile ----------------------------------------------------------------------------

    async def sync(self, content: JSON) -> float | None:
        md = content["metadata"]
        owner = (md.get("annotations") or {}).get(SNAPSHOT_NODE)
        if md.get("deletionTimestamp"):
            if owner == self.node and CONTENT_FINALIZER in (md.get("finalizers") or []):
                if not await self.remove(content):
                    return 0.5  # its VolumeSnapshots go first
                await self._drop_finalizer(content)
            return None
        status = content.get("status") or {}
        if status.get("readyToUse") or status.get("error") or (owner and owner != self.node):
            return None
        if owner == self.node and (md.get("annotations") or {}).get(VOLUME_SNAPSHOTS):
            return await self.await_volume_snapshots(content)
        vm_ns, vm_name = source_vm(content)
        vmi = await self.client.find(VMI, vm_name, vm_ns)
        runtime: VmiRuntime | None = None
        if vmi is not None and (vmi.get("status") or {}).get("phase") not in _FINAL_VMI:
            vstatus = vmi.get("status") or {}
            if vstatus.get("nodeName") != self.node:
                return None
            runtime = self.agent.runtimes.get((vm_ns, vm_name))
            if vstatus.get("phase") != "Running" or runtime is None or not runtime.alive:
                return 1.0  # scheduled here, not running yet
        elif not self._holds_all(vm_ns, backups_of(content)):
            return None
        claimed = await self._claim(content)
        if claimed is None:
            return None
        try:
            indications, _times = await self.take(claimed, runtime)
        except (SnapshotError, PoolError, QemuError, OSError) as exc:
            log.warning("snapshot %s/%s failed: %s", md["namespace"], md["name"], exc)
            await self._report(claimed, error=str(exc))
            return None
        taken = await self._mark_taken(claimed, indications)
        return None if taken is None else await self.await_volume_snapshots(taken)

    async def _mark_taken(self, content: JSON, indications: list[str]) -> JSON | None:
        md = content["metadata"]
        annotations = {INDICATIONS: ",".join(indications), VOLUME_SNAPSHOTS: "true"}
        with contextlib.suppress(NotFound):
            marked: JSON = await self.client.patch(
                VMSNAPSHOTCONTENT, md["name"], {"metadata": {"annotations": annotations}},
                md["namespace"],
            )  # fmt: skip
            return marked
        return None

    async def await_volume_snapshots(self, content: JSON) -> float | None:
        """Makes the content's VolumeSnapshots where missing; reports the content ready once
        every one is (or failed once one did)."""
        namespace = content["metadata"]["namespace"]
        statuses: list[JSON] = []
        for b in backups_of(content):
            vs = await self.client.find(VOLUMESNAPSHOT, b.snapshot, namespace)
            if vs is None:
                pool = self._pool_of(namespace, b.claim)
                if pool is None:
                    await self._report(content, error=f"volume {b.claim} left node {self.node}")
                    return None
                body = volume_snapshot_object(
                    content, b, self.node, self.volume_snapshots.class_of(pool)
                )
                with contextlib.suppress(Conflict):
                    await self.client.create(VOLUMESNAPSHOT, body, namespace)
                return 0.5
            vstatus = vs.get("status") or {}
            if vstatus.get("error"):
                message = f"VolumeSnapshot {b.snapshot}: {vstatus['error'].get('message', '')}"
                await self._report(content, error=message)
                return None
            if not vstatus.get("readyToUse"):
                return 0.5
            statuses.append(
                {"volumeSnapshotName": b.snapshot, "readyToUse": True,
                 "creationTime": vstatus.get("creationTime")}
            )  # fmt: skip
        await self._report(content, statuses=statuses)
        return None

    def _pool_of(self, namespace: str, claim: str) -> Pool | None:
        return next((p for p in self.pools if p.exists(namespace, claim)), None)

    def _holds_all(self, namespace: str, backups: list[Backup]) -> bool:
        """Offline: this node holds every volume (any of them in its own pool, not only the
        shared one, so exactly one node claims it) — or there is nothing to snapshot."""
        pools = [self._pool_of(namespace, b.claim) for b in backups]
        if not backups:
            return True  # nothing to take: the first node to claim it reports it
        return all(p is not None for p in pools) and any(p is self.pools[0] for p in pools)

    async def _claim(self, content: JSON) -> JSON | None:
        md = content["metadata"]
        patch = {
            "metadata": {
                "resourceVersion": md["resourceVersion"],
                "annotations": {SNAPSHOT_NODE: self.node},
                "finalizers": [*(md.get("finalizers") or []), CONTENT_FINALIZER],
            }
        }
        try:
            return await self.client.patch(VMSNAPSHOTCONTENT, md["name"], patch, md["namespace"])
        except (Conflict, NotFound):
            return None

    async def _drop_finalizer(self, content: JSON) -> None:
        md = content["metadata"]
        rest = [f for f in md.get("finalizers") or [] if f != CONTENT_FINALIZER]
        patch = {"metadata": {"resourceVersion": md["resourceVersion"], "finalizers": rest}}
        with contextlib.suppress(NotFound):
            await self.client.patch(VMSNAPSHOTCONTENT, md["name"], patch, md["namespace"])

    async def _report(
        self, content: JSON, *, error: str = "", statuses: list[JSON] | None = None
    ) -> None:
        md = content["metadata"]
        now = _now()
        status: JSON
        if error:
            status = {"readyToUse": False, "error": {"message": error, "time": now}}
        else:
            status = {"readyToUse": True, "creationTime": now,
                      "volumeSnapshotStatus": statuses or []}  # fmt: skip
        with contextlib.suppress(NotFound):
            await self.client.patch_status(VMSNAPSHOTCONTENT, md["name"], status, md["namespace"])

    # --- taking -------------------------------------------------------------------------------

    async def take(
        self, content: JSON, runtime: VmiRuntime | None
    ) -> tuple[list[str], dict[str, str]]:
        """Takes every volume snapshot of the content; (indications, creation time by snapshot).
        All or nothing: what was taken is removed again when a later volume fails."""
        namespace = content["metadata"]["namespace"]
        owner = str(content["metadata"].get("uid", ""))
        backups = backups_of(content)
        plan: list[tuple[Backup, Pool]] = []
        for b in backups:
            pool = self._pool_of(namespace, b.claim)
            if pool is None:
                raise SnapshotError(f"volume {b.claim} of the VM is not on node {self.node}")
            plan.append((b, pool))
        taken: list[tuple[Backup, Pool]] = []
        times: dict[str, str] = {}
        try:
            if runtime is None:
                for b, pool in plan:
                    record = await pool.snapshot(namespace, b.claim, b.snapshot, owner_uid=owner)
                    taken.append((b, pool))
                    times[b.snapshot] = record.created
                return [], times
            indications = await self._take_live(namespace, owner, plan, runtime, taken, times)
            return indications, times
        except BaseException:
            for b, pool in taken:
                with contextlib.suppress(PoolError, OSError):
                    await pool.delete_snapshot(namespace, b.snapshot)
            raise

    async def _take_live(
        self,
        namespace: str,
        owner: str,
        plan: list[tuple[Backup, Pool]],
        runtime: VmiRuntime,
        taken: list[tuple[Backup, Pool]],
        times: dict[str, str],
    ) -> list[str]:
        assert runtime.process is not None
        indications = ["Online"]
        guest_agent: GuestAgentClient | None = None
        with contextlib.suppress(QemuError, OSError, TimeoutError):
            guest_agent = await asyncio.wait_for(
                GuestAgentClient.connect(runtime.process.paths.guest_agent, timeout=1.0),
                AGENT_CONNECT_TIMEOUT,
            )
        freeze_attempted = False
        try:
            if guest_agent is None:
                indications.append("NoGuestAgent")
            else:
                freeze_attempted = True
                try:
                    await asyncio.wait_for(guest_agent.fsfreeze_freeze(), FREEZE_TIMEOUT)
                    indications.append("GuestAgent")
                except TimeoutError:
                    indications.append("QuiesceTimeout")
                except (QemuError, OSError):
                    indications.append("NoGuestAgent")
            qmp = await runtime.process.qmp()
            running = (await qmp.execute("query-status")).get("status") == "running"
            if not running:
                indications.append("Paused")
            if running:
                await qmp.execute("stop")
            try:
                for b, pool in plan:
                    hotplugged = runtime.hotplugged.get(b.volume)
                    if hotplugged is not None:
                        taken_at = await self._take_hotplugged(
                            qmp, namespace, owner, b, pool, runtime
                        )
                        taken.append((b, pool))
                        times[b.snapshot] = taken_at
                        continue
                    node = runtime.disk_nodes.get(b.volume)
                    local = runtime.volumes.get(b.volume)
                    if node is None or local is None:
                        raise SnapshotError(f"volume {b.volume} is not a disk of the running VM")
                    added: list[Overlay] = []

                    record = await pool.snapshot(
                        namespace,
                        b.claim,
                        b.snapshot,
                        owner_uid=owner,
                        switch=functools.partial(_switch, qmp, b.volume, node, added),
                    )
                    taken.append((b, pool))
                    times[b.snapshot] = record.created
                    overlay = added[0]
                    runtime.volumes[b.volume] = dataclasses.replace(local, path=overlay.path)
                    runtime.disk_nodes[b.volume] = overlay.new_node
                    runtime.layer_nodes[str(overlay.path)] = overlay.new_node
                    runtime.save_volumes()
            finally:
                if running:
                    await qmp.execute("cont")
        finally:
            if guest_agent is not None:
                if freeze_attempted:
                    with contextlib.suppress(QemuError, OSError, TimeoutError):
                        await asyncio.wait_for(guest_agent.fsfreeze_thaw(), FREEZE_TIMEOUT)
                await guest_agent.close()
        return indications

    async def _take_hotplugged(
        self,
        qmp: QMPClient,
        namespace: str,
        owner: str,
        b: Backup,
        pool: Pool,
        runtime: VmiRuntime,
    ) -> str:
        """A hot-plugged disk's snapshot (its creation time): its top node moves onto an overlay as a boot disk's
        does; the hotplug record follows the new top (the overlay's node joins ``layer_nodes``,
        so that an unplug deletes the whole chain of nodes)."""
        record = runtime.hotplugged[b.volume]
        added: list[Overlay] = []
        taken = await pool.snapshot(
            namespace,
            b.claim,
            b.snapshot,
            owner_uid=owner,
            switch=functools.partial(_switch, qmp, b.volume, str(record["node"]), added),
        )
        overlay = added[0]
        record["path"], record["node"] = str(overlay.path), overlay.new_node
        runtime.layer_nodes[str(overlay.path)] = overlay.new_node
        runtime.save_volumes()
        return taken.created

    # --- removing -----------------------------------------------------------------------------

    async def remove(self, content: JSON) -> bool:
        """Deletes the content's VolumeSnapshots (their contents' deletion policy decides
        whether the pool snapshots go), then merges the layers no snapshot holds any more away
        (live where a running VM's chain holds them); False while VolumeSnapshots remain."""
        namespace = content["metadata"]["namespace"]
        uid = content["metadata"].get("uid")
        with_objects = bool((content["metadata"].get("annotations") or {}).get(VOLUME_SNAPSHOTS))
        pending = False
        for b in backups_of(content):
            vs = await self.client.find(VOLUMESNAPSHOT, b.snapshot, namespace)
            if vs is not None and uid in {o.get("uid") for o in vs["metadata"].get(
                    "ownerReferences") or []}:  # fmt: skip
                pending = True
                if not vs["metadata"].get("deletionTimestamp"):
                    await self.client.delete(VOLUMESNAPSHOT, b.snapshot, namespace)
            elif not with_objects:
                for pool in self.pools:
                    with contextlib.suppress(PoolError, OSError):
                        await pool.delete_snapshot(namespace, b.snapshot)
        if pending:
            return False
        await self.merge(live=True)
        return True

    def _running(self) -> list[VmiRuntime]:
        return [r for r in self.agent.runtimes.values() if r.process is not None and r.alive]

    async def merge(self, *, live: bool) -> None:
        for pool in self.pools:
            if live:
                for runtime in self._running():
                    await self._merge_live(pool, runtime)
            # hot-plugged chains are merged once unplugged (their layers have no node VMO
            # can name in a live merge), and never offline while QEMU has them open
            tops = [path for r in self._running() for path in r.open_tops()]
            await pool.merge_offline(tops)

    async def _merge_live(self, pool: Pool, runtime: VmiRuntime) -> None:
        assert runtime.process is not None
        chain: set[Path] = set()
        for local in runtime.volumes.values():
            chain.update(pool.chain(local.path))
        for layer, child in pool.merges():
            if child not in chain:
                continue
            qmp = await runtime.process.qmp()
            try:
                await merge_layer(qmp, layer, child, pool.backing_of(layer), runtime.layer_nodes)
            except (QemuError, OSError) as exc:
                # QEMU 7.2 reopens by path the layers it opened itself at start (as root) when a
                # block job starts on an O_DIRECT chain, and runs unprivileged by then: the
                # sweep merges the layer offline once the VM stops
                log.warning("live merge of %s into %s failed: %s", layer.name, child.name, exc)
                continue
            runtime.layer_nodes.pop(str(layer), None)
            runtime.save_volumes()
            pool.collect()
