"""virt-handler's hotplug part: the VMI's hotpluggable volumes made to match its running QEMU.

A ``hotpluggable`` volume in the VMI spec that QEMU did not start with is provisioned here (a
WaitForFirstConsumer claim's first consumer is this node), resolved to its pool volume and
attached; one that left the spec is detached. ``status.volumeStatus`` shows upstream's phases
(Pending, Bound, AttachedToNode, Ready; Detaching while it goes), and an entry disappears once its
disk is gone. A detach QEMU does not complete in time leaves the disk attached, says so in the
volume's status and an Event, and is retried. A VMI with hot-plugged disks is not live-migratable
(``HotplugNotLiveMigratable``): a migration target would start without them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmo.api.kubevirt.migratable import Migratability
from vmo.engine.agent.host import HotplugHost, PrepareError
from vmo.engine.qemu import hotplug as qh
from vmo.engine.qemu.errors import QemuError
from vmo.runtime import EventRecorder

if TYPE_CHECKING:
    from vmo.engine.agent.runtime import VmiRuntime

log = logging.getLogger(__name__)

JSON = dict[str, Any]
RETRY_SECONDS = 3.0
HOTPLUG_NOT_MIGRATABLE = "HotplugNotLiveMigratable"
_SOURCES = ("persistentVolumeClaim", "dataVolume")


def hotpluggable(volume: JSON) -> bool:
    return any(
        isinstance(volume.get(kind), dict) and volume[kind].get("hotpluggable") is True
        for kind in _SOURCES
    )


def claim_of(volume: JSON) -> str:
    if isinstance(volume.get("dataVolume"), dict):
        return str(volume["dataVolume"].get("name") or "")
    return str((volume.get("persistentVolumeClaim") or {}).get("claimName") or "")


def wanted(spec: JSON, started_with: set[str]) -> dict[str, tuple[JSON, JSON]]:
    """Hotpluggable volumes of ``spec`` (with their disk) that QEMU did not start with."""
    disks = {
        d.get("name"): d for d in (spec.get("domain") or {}).get("devices", {}).get("disks") or []
    }
    return {
        str(v["name"]): (v, disks.get(v["name"]) or {"name": v["name"]})
        for v in spec.get("volumes") or []
        if hotpluggable(v) and v.get("name") not in started_with
    }


def migratability(runtime: VmiRuntime) -> Migratability | None:
    """False while disks are hot-plugged (upstream's reason), else None (the usual rules)."""
    if not runtime.hotplugged:
        return None
    names = ", ".join(sorted(runtime.hotplugged))
    return Migratability(
        False,
        HOTPLUG_NOT_MIGRATABLE,
        f"cannot migrate VMI with hotplugged volumes ({names}): VMO does not carry them over",
    )


@dataclass
class HotplugSync:
    agent: HotplugHost
    # (namespace, name) -> volume name -> (phase, reason, message) of volumes not Ready yet
    progress: dict[tuple[str, str], dict[str, tuple[str, str, str]]] = field(default_factory=dict)
    _events: EventRecorder | None = None

    @property
    def events(self) -> EventRecorder:
        if self._events is None:
            self._events = EventRecorder(self.agent.client, component="virt-handler")
        return self._events

    def entries(self, runtime: VmiRuntime) -> list[JSON]:
        """The hotplug entries of status.volumeStatus (attached ones, then those in progress)."""
        out = []
        progress = self.progress.get(runtime.key, {})
        for name, rec in runtime.hotplugged.items():
            phase, reason, message = progress.get(
                name,
                ("Ready", "VolumeReady", f"Successfully attach hotplugged volume {name} to VM"),
            )
            out.append(_entry(name, rec, phase, reason, message))
        for name, (phase, reason, message) in progress.items():
            if name not in runtime.hotplugged:
                out.append(_entry(name, {"target": ""}, phase, reason, message))
        return out

    def pending(self, vmi: JSON, runtime: VmiRuntime) -> bool:
        """Whether the spec and the QEMU differ (cheap: no QMP)."""
        spec = vmi.get("spec") or {}
        want = wanted(spec, set(runtime.disk_nodes))
        return set(want) != set(runtime.hotplugged) or bool(self._boot_removals(spec, runtime))

    async def sync(self, vmi: JSON, runtime: VmiRuntime) -> None:
        if not self.pending(vmi, runtime) and runtime.key not in self.progress:
            return
        spec = vmi.get("spec") or {}
        retry = False
        for name in [
            n for n in runtime.hotplugged if n not in wanted(spec, set(runtime.disk_nodes))
        ]:
            retry |= not await self._detach(vmi, runtime, name)
        for name in self._boot_removals(spec, runtime):
            retry |= not await self._detach_boot(vmi, runtime, name)
        for name, (volume, disk) in wanted(spec, set(runtime.disk_nodes)).items():
            if name not in runtime.hotplugged:
                retry |= not await self._attach(vmi, runtime, volume, disk)
        await self.agent.report_volumes(vmi, runtime)
        if retry:
            asyncio.get_running_loop().call_later(RETRY_SECONDS, self.agent.enqueue, runtime.key)

    def _boot_removals(self, spec: JSON, runtime: VmiRuntime) -> list[str]:
        """Disks QEMU started with whose hotpluggable volume left the spec."""
        now = {v.get("name") for v in spec.get("volumes") or []}
        return [
            str(v["name"])
            for v in runtime.spec.get("volumes") or []
            if hotpluggable(v) and v.get("name") in runtime.disk_nodes and v.get("name") not in now
        ]

    async def _set_progress(
        self, vmi: JSON, runtime: VmiRuntime, name: str, phase: str, reason: str, message: str
    ) -> None:
        self.progress.setdefault(runtime.key, {})[name] = (phase, reason, message)
        await self.agent.report_volumes(vmi, runtime)

    def _done(self, runtime: VmiRuntime, name: str) -> None:
        progress = self.progress.get(runtime.key, {})
        progress.pop(name, None)
        if not progress:
            self.progress.pop(runtime.key, None)

    async def _attach(self, vmi: JSON, runtime: VmiRuntime, volume: JSON, disk: JSON) -> bool:
        name = str(volume["name"])
        claim = claim_of(volume)
        await self._set_progress(
            vmi,
            runtime,
            name,
            "Pending",
            "VolumePending",
            f"Waiting for volume {claim} on this node",
        )
        single = {**vmi, "spec": {**vmi["spec"], "volumes": [volume]}}
        try:
            local = (await self.agent.prepare_volumes(single, runtime.workdir))[name]
        except (PrepareError, KeyError, OSError) as exc:
            await self._set_progress(vmi, runtime, name, "Pending", "VolumeNotReady", str(exc))
            return False
        await self._set_progress(
            vmi, runtime, name, "Bound", "VolumeBound", f"PVC {claim} is bound on {runtime.node}"
        )
        try:
            layers = qh.layer_chain(local.path)
            target = self._target(runtime)
            plug = qh.HotplugDisk(
                name,
                layers,
                readonly=local.readonly,
                serial=disk.get("serial"),
                direct=disk.get("cache") in ("none", "directsync"),
            )
            assert runtime.process is not None
            qmp = await runtime.process.qmp()
            await qh.attach(qmp, plug)
        except (QemuError, OSError) as exc:
            log.warning("VMI %s/%s: hotplug of %s failed: %s", *runtime.key, name, exc)
            await self._set_progress(vmi, runtime, name, "Failed", "AttachFailed", str(exc))
            await self.events.record(vmi, "HotplugFailed", f"volume {name}: {exc}", type_="Warning")
            return False
        await self._set_progress(
            vmi,
            runtime,
            name,
            "AttachedToNode",
            "VolumeAttachedToNode",
            f"Volume {name} is attached to node {runtime.node}",
        )
        runtime.hotplugged[name] = {
            "claim": claim,
            "path": str(local.path),
            "readonly": local.readonly,
            "shared": local.shared,
            "size": local.virtual_size,
            "target": target,
            "node": plug.node,
        }
        runtime.save_volumes()
        self._done(runtime, name)
        await self.events.record(vmi, "VolumeHotplugged", f"Volume {name} hot-plugged as {target}")
        return True

    def _target(self, runtime: VmiRuntime) -> str:
        used = {str(r.get("target")) for r in runtime.hotplugged.values()}
        scsi_boot = sum(
            1
            for d in (runtime.spec.get("domain") or {}).get("devices", {}).get("disks") or []
            if (d.get("disk") or d.get("cdrom") or {}).get("bus") == "scsi"
        )
        for index in range(scsi_boot, 26 * 27):
            name = "sd" + (
                chr(97 + index) if index < 26 else chr(96 + index // 26) + chr(97 + index % 26)
            )
            if name not in used:
                return name
        raise QemuError("no SCSI target name left")

    async def _detach(self, vmi: JSON, runtime: VmiRuntime, name: str) -> bool:
        overlays = _overlay_nodes(runtime, runtime.hotplugged[name])
        ok = await self._unplug(vmi, runtime, name, nodes=(*overlays, qh.node_name(name)))
        if ok:
            for path in [p for p, node in runtime.layer_nodes.items() if node in overlays]:
                runtime.layer_nodes.pop(path)
            runtime.save_volumes()
        return ok

    async def _detach_boot(self, vmi: JSON, runtime: VmiRuntime, name: str) -> bool:
        fmt = runtime.disk_nodes[name]
        ok = await self._unplug(vmi, runtime, name, nodes=(fmt, fmt.replace("-format", "-file")))
        if ok:
            runtime.disk_nodes.pop(name, None)
            runtime.volumes.pop(name, None)
            runtime.save_volumes()
        return ok

    async def _unplug(
        self, vmi: JSON, runtime: VmiRuntime, name: str, *, nodes: tuple[str, ...]
    ) -> bool:
        await self._set_progress(
            vmi, runtime, name, "Detaching", "VolumeDetaching", f"Detaching volume {name}"
        )
        try:
            assert runtime.process is not None
            qmp = await runtime.process.qmp()
            await qh.detach(qmp, name, nodes=nodes, timeout=self.agent.detach_timeout)
        except QemuError as exc:
            log.warning("VMI %s/%s: unplug of %s failed: %s", *runtime.key, name, exc)
            reason = "DetachTimeout" if isinstance(exc, qh.DetachTimeout) else "DetachFailed"
            await self._set_progress(vmi, runtime, name, "Ready", reason, str(exc))
            await self.events.record(
                vmi, "HotunplugFailed", f"volume {name}: {exc}", type_="Warning"
            )
            return False
        runtime.hotplugged.pop(name, None)
        runtime.save_volumes()
        self._done(runtime, name)
        await self.events.record(vmi, "VolumeHotunplugged", f"Volume {name} removed")
        return True

    async def verify(self, runtime: VmiRuntime) -> None:
        """After an adoption: the records kept only for disks QEMU really has."""
        if not runtime.hotplugged or runtime.process is None:
            return
        try:
            nodes = await qh.block_nodes(await runtime.process.qmp())
        except QemuError as exc:
            log.warning("VMI %s/%s: hot-plugged disks not checked: %s", *runtime.key, exc)
            return
        for name in [n for n, rec in runtime.hotplugged.items() if rec.get("node") not in nodes]:
            log.info("VMI %s/%s: hot-plugged %s is no longer in QEMU", *runtime.key, name)
            runtime.hotplugged.pop(name)
        runtime.save_volumes()


def _overlay_nodes(runtime: VmiRuntime, rec: JSON) -> list[str]:
    """The nodes of the overlays live snapshots put on a hot-plugged disk, top first: its chain's
    layers that ``layer_nodes`` knows (the layers it was attached with have no entry there)."""
    try:
        layers = qh.layer_chain(Path(str(rec["path"])))
    except (OSError, QemuError, KeyError):
        return (
            [rec["node"]] if rec.get("node") and rec["node"] in runtime.layer_nodes.values() else []
        )
    return [runtime.layer_nodes[str(p)] for p in layers if str(p) in runtime.layer_nodes]


def _entry(name: str, rec: JSON, phase: str, reason: str, message: str) -> JSON:
    entry: JSON = {
        "name": name,
        "target": str(rec.get("target") or ""),
        "phase": phase,
        "reason": reason,
        "message": message,
        "hotplugVolume": {},
    }
    if rec.get("size"):
        entry["size"] = int(rec["size"])
    if rec.get("claim"):
        info: JSON = {
            "claimName": rec["claim"],
            "accessModes": ["ReadWriteMany" if rec.get("shared") else "ReadWriteOnce"],
        }
        if rec.get("size"):
            info["capacity"] = {"storage": str(rec["size"])}
        entry["persistentVolumeClaimInfo"] = info
    return entry


__all__ = ["HOTPLUG_NOT_MIGRATABLE", "HotplugSync", "hotpluggable", "migratability", "wanted"]
