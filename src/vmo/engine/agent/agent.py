"""The node agent: virt-handler's part for the VMIs scheduled to this node.

It registers the Node, keeps its Lease, and reconciles each VMI assigned here: prepares volumes,
cloud-init seed and taps, launches or re-adopts QEMU, reports phase, interfaces and conditions,
and stops VMs gracefully when their VMI is deleted. QEMU processes outlive the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmo.api.annotations import HOST_FORWARDS
from vmo.api.kubevirt.migratable import claim_name, live_migratable, migration_method
from vmo.client import KUBEVIRT, VMI, ApiStatusError, Client, NotFound
from vmo.engine.agent import node as nodeobj
from vmo.engine.agent.forwards import read_usernet
from vmo.engine.agent.host import NetworkPreparer, NetworkReleaser, PrepareError
from vmo.engine.agent.hotplug import HotplugSync
from vmo.engine.agent.hotplug import migratability as hotplug_migratability
from vmo.engine.agent.migration import MigrationRoles
from vmo.engine.agent.releases import PendingRelease, PendingReleases
from vmo.engine.agent.runtime import VmiRuntime, workdir_name
from vmo.engine.qemu.accel import Accelerator, detect_accelerator
from vmo.engine.qemu.errors import QemuError
from vmo.engine.qemu.hotplug import DETACH_TIMEOUT
from vmo.engine.qemu.vmi import LocalVolume
from vmo.runtime import DELETED, Controller, Result, Watch, object_key, split_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]

FINALIZER = "kubevirt.io/foregroundDeleteVirtualMachine"
DEFAULT_GRACE = 30
FINAL = ("Succeeded", "Failed")

VolumePreparer = Callable[[JSON, Path], Awaitable[dict[str, LocalVolume]]]
"""(VMI, its workdir) -> the local file behind each volume (raises PrepareError)."""
VolumeWaiter = Callable[[JSON], Awaitable[str | None]]
"""VMI -> why it cannot start yet (a claim its volumes name is still being filled), or None."""
VOLUME_WAIT_SECONDS = 2.0

__all__ = ["NetworkPreparer", "NetworkReleaser", "NodeAgent", "PrepareError"]


async def use_emulation_from_kubevirt(client: Client) -> bool | None:
    """``spec.configuration.developerConfiguration.useEmulation`` of the KubeVirt CR, if any
    (true forces TCG without probing, as KubeVirt does)."""
    try:
        crs, _ = await client.list(KUBEVIRT)
    except ApiStatusError:
        return None
    for cr in crs:
        dev = cr.get("spec", {}).get("configuration", {}).get("developerConfiguration", {})
        if dev.get("useEmulation") is True:
            return True
    return None


def now() -> str:
    return nodeobj.now_rfc3339()


def condition(ctype: str, status: bool, reason: str = "", message: str = "") -> JSON:
    cond: JSON = {
        "type": ctype,
        "status": "True" if status else "False",
        "lastProbeTime": None,
        "lastTransitionTime": now(),
    }
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def pod_interfaces(vmi: JSON, runtime: VmiRuntime) -> list[JSON]:
    """status.interfaces as KubeVirt reports them from the domain (masquerade: the guest IP)."""
    from vmo.engine.qemu.vmi import stable_mac

    networks = {n["name"]: n for n in vmi["spec"].get("networks") or []}
    out = []
    for iface in vmi["spec"]["domain"]["devices"].get("interfaces") or []:
        name = iface["name"]
        mac = str(iface.get("macAddress") or stable_mac(runtime.uid, name)).lower()
        entry: JSON = {"name": name, "mac": mac, "infoSource": "domain", "queueCount": 1}
        network = networks.get(name, {})
        if "pod" in network:
            cidr = network["pod"].get("vmNetworkCIDR") or "10.0.2.0/24"
            guest = cidr.rsplit(".", 1)[0] + ".2" if cidr.endswith(".0/24") else "10.0.2.2"
            entry |= {"ipAddress": guest, "ipAddresses": [guest], "podInterfaceName": "eth0"}
        extra = next((e for e in runtime.extra_interfaces if e.get("name") == name), {})
        entry.update(extra)
        out.append(entry)
    return out


def shared_claims(runtime: VmiRuntime) -> set[str]:
    return {
        str(claim_name(vmi_volume))
        for vmi_volume, local in runtime.volume_sources()
        if local.shared and claim_name(vmi_volume)
    }


def volume_status(vmi: JSON, runtime: VmiRuntime) -> list[JSON]:
    """status.volumeStatus as upstream: one entry per volume with its disk target and size
    (a migration's target sizes its copies from these)."""
    out = []
    for index, (volume, local) in enumerate(runtime.volume_sources()):
        entry: JSON = {"name": volume["name"], "target": f"disk{index}"}
        if local.virtual_size:
            entry["size"] = local.virtual_size
        claim = claim_name(volume)
        if claim:
            info: JSON = {
                "claimName": claim,
                "accessModes": ["ReadWriteMany" if local.shared else "ReadWriteOnce"],
            }
            if local.virtual_size:
                info["capacity"] = {"storage": str(local.virtual_size)}
            entry["persistentVolumeClaimInfo"] = info
        out.append(entry)
    return out


def running_status(vmi: JSON, runtime: VmiRuntime) -> JSON:
    shared = shared_claims(runtime)
    stamp = now()
    conditions = [
        condition("Ready", True),
        live_migratable(vmi, shared_claims=shared).condition(stamp),
    ]
    if runtime.domain is not None and runtime.domain.start_paused:
        message = "VMI was started paused (spec.startStrategy: Paused)"
        conditions.append(condition("Paused", True, "PausedByUser", message))
    return {
        "phase": "Running",
        "nodeName": runtime.node,
        "interfaces": pod_interfaces(vmi, runtime),
        "conditions": conditions,
        "guestOSInfo": {},
        "machine": {"type": "q35"},
        "migrationMethod": migration_method(vmi, shared_claims=shared),
        "volumeStatus": volume_status(vmi, runtime),
    }


@dataclass
class NodeAgent:
    client: Client
    node: str
    state_dir: Path
    prepare_volumes: VolumePreparer
    prepare_networks: NetworkPreparer
    release_networks: NetworkReleaser
    use_emulation: bool | None = None
    runtimes: dict[tuple[str, str], VmiRuntime] = field(default_factory=dict)
    accel: Accelerator = Accelerator.TCG
    _latest: dict[tuple[str, str], JSON | None] = field(default_factory=dict)
    _sync: VmiSync | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _taps: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _releases: PendingReleases | None = None
    migrations: MigrationRoles | None = None
    cpus: int | None = None
    memory_ki: int | None = None
    detach_timeout: float = DETACH_TIMEOUT
    _hotplug: HotplugSync | None = None
    # as a virt-launcher pod stays Pending until its claims are bound, a VMI stays Scheduled
    volumes_waiting: VolumeWaiter | None = None
    _waiting: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def hotplug(self) -> HotplugSync:
        """Disks hot-plugged into running VMIs (the spec's hotpluggable volumes)."""
        if self._hotplug is None:
            self._hotplug = HotplugSync(self)
        return self._hotplug

    @property
    def releases(self) -> PendingReleases:
        """Network releases that failed, retried by the node's sweep until they succeed."""
        if self._releases is None:
            self._releases = PendingReleases(self.release_networks)
        return self._releases

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "agent.sock"

    def workdir(self, namespace: str, name: str) -> Path:
        return self.vms_dir / workdir_name(namespace, name)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, stop: asyncio.Event) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.vms_dir.mkdir(exist_ok=True)
        override = self.use_emulation
        if override is None:
            override = await use_emulation_from_kubevirt(self.client)
        self.accel = await asyncio.to_thread(
            detect_accelerator, self.state_dir / "accelerator.json", override=override
        )
        log.info("node %s: accelerator %s", self.node, self.accel)
        await nodeobj.ensure_lease_namespace(self.client)
        await nodeobj.register(
            self.client,
            nodeobj.node_object(
                self.node,
                socket_path=str(self.socket_path),
                cpus=self.cpus,
                memory_ki=self.memory_ki,
            ),
        )
        loop = asyncio.get_running_loop()
        self._sync = VmiSync(self)
        self._tasks += [
            loop.create_task(
                nodeobj.heartbeat(self.client, self.node, stop), name=f"heartbeat-{self.node}"
            ),
            loop.create_task(self._sync.run(stop), name=f"vmi-sync-{self.node}"),
        ]

    async def close(self) -> None:
        """Stops reconciling; QEMU processes keep running to be adopted by the next agent."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.migrations is not None:
            await self.migrations.close()
        await self.releases.close()
        for runtime in self.runtimes.values():
            await runtime.close()
        self.runtimes.clear()

    def on_vmi(self, etype: str, vmi: JSON) -> list[str]:
        """Remembers the newest copy of every VMI; returns the key when it concerns this node."""
        md = vmi["metadata"]
        key = (md["namespace"], md["name"])
        self._latest[key] = None if etype == DELETED else vmi
        if (
            etype == DELETED
            or vmi.get("status", {}).get("nodeName") == self.node
            or key in self.runtimes
            or (self.migrations is not None and self.migrations.concerns(vmi))
        ):
            return [object_key(vmi)]
        return []

    def enqueue(self, key: tuple[str, str]) -> None:
        if self._sync is not None:
            self._sync.enqueue(f"{key[0]}/{key[1]}")

    def latest(self, key: tuple[str, str]) -> JSON | None:
        return self._latest.get(key)

    def remember(self, vmi: JSON) -> None:
        md = vmi["metadata"]
        self._latest[(md["namespace"], md["name"])] = vmi

    async def adopt_migrated(self, vmi: JSON, runtime: VmiRuntime, taps: list[str]) -> None:
        self.runtimes[runtime.key] = runtime
        self._taps[runtime.key] = list(taps)
        await self._restore_forwards(runtime)  # a restarted agent's hand-over adopted this QEMU
        await self._report_running(vmi, runtime)
        self._monitor(runtime)

    async def release(self, runtime: VmiRuntime, taps: list[str] | None = None) -> None:
        await self._release(runtime, taps)

    # --- reconcile -----------------------------------------------------------------------------

    async def reconcile(self, key: tuple[str, str]) -> None:
        vmi = self._latest.get(key)
        runtime = self.runtimes.get(key)
        if self.migrations is not None and await self.migrations.reconcile(key, vmi):
            return
        if vmi is None:
            if runtime is not None:
                await self._teardown(runtime, None, grace=0)
            return
        if vmi.get("status", {}).get("nodeName") != self.node:
            return
        if vmi["metadata"].get("deletionTimestamp"):
            await self._delete(vmi, runtime)
            return
        phase = vmi.get("status", {}).get("phase", "")
        if phase in FINAL:
            if runtime is not None and not runtime.alive:
                await self._teardown(runtime, vmi, grace=0)
            return
        if runtime is None and phase == "Scheduled":
            await self._launch(vmi)
        elif runtime is None and phase == "Running":
            await self._readopt(vmi)
        elif runtime is not None and phase == "Running" and runtime.alive and _settled(vmi):
            await self.hotplug.sync(vmi, runtime)

    async def _launch(self, vmi: JSON) -> None:
        md = vmi["metadata"]
        key = (md["namespace"], md["name"])
        if await self._volumes_wait(vmi, key):
            return
        await self._add_finalizer(vmi)
        runtime = VmiRuntime(
            md["namespace"], md["name"], md["uid"], self.workdir(*key), node=self.node
        )
        self.runtimes[key] = runtime
        try:
            # networks first: their IPAM leases become the seed's network-config
            taps, runtime.extra_interfaces = await self.prepare_networks(vmi)
            self._taps[key] = list(taps.values())
            volumes = await self.prepare_volumes(vmi, runtime.workdir)
            await runtime.start(vmi, accel=self.accel, volumes=volumes, taps=taps)
        except (PrepareError, QemuError, OSError) as exc:
            reason = exc.reason if isinstance(exc, PrepareError) else type(exc).__name__
            log.warning("VMI %s/%s failed to start: %s", *key, exc)
            await self._teardown(runtime, vmi, grace=0)
            await self._set_status(
                vmi,
                {
                    "phase": "Failed",
                    "reason": reason,
                    "conditions": [condition("Ready", False, reason, str(exc))],
                },
            )
            return
        await self._report_running(vmi, runtime)
        self._monitor(runtime)

    async def _volumes_wait(self, vmi: JSON, key: tuple[str, str]) -> bool:
        """Whether the VMI must wait for its claims (then it is looked at again shortly, and the
        reason is logged once); nothing is prepared for it meanwhile."""
        if self.volumes_waiting is None:
            return False
        reason = await self.volumes_waiting(vmi)
        if reason is None:
            self._waiting.pop(key, None)
            return False
        if self._waiting.get(key) != reason:
            log.info("VMI %s/%s waits: %s", *key, reason)
            self._waiting[key] = reason
        asyncio.get_running_loop().call_later(VOLUME_WAIT_SECONDS, self.enqueue, key)
        return True

    async def _readopt(self, vmi: JSON) -> None:
        md = vmi["metadata"]
        key = (md["namespace"], md["name"])
        if self.migrations is not None and await self.migrations.recover_target(vmi):
            return  # the guest came here by a migration whose hand-over a restart interrupted
        runtime = VmiRuntime(
            md["namespace"], md["name"], md["uid"], self.workdir(*key), node=self.node
        )
        if await runtime.adopt():
            log.info("re-adopted QEMU of VMI %s/%s", *key)
            self.runtimes[key] = runtime
            await self._restore_forwards(runtime)
            await self.hotplug.verify(runtime)  # the disks QEMU has, as it says
            self._monitor(runtime)
            if self.migrations is not None:
                await self.migrations.recover_source(vmi, runtime)
            return
        await self._set_status(
            vmi,
            {
                "phase": "Failed",
                "reason": "QemuGone",
                "conditions": [
                    condition("Ready", False, "QemuGone", "the VM's QEMU process is gone")
                ],
            },
        )

    async def _restore_forwards(self, runtime: VmiRuntime) -> None:
        """The Service forwards of a QEMU this agent did not start, read from QEMU itself: the
        VMI's annotation may name another QEMU's ports (a migration's source, a stale write)."""
        try:
            usernet = await read_usernet(runtime)
        except (QemuError, OSError) as exc:
            log.warning("VMI %s/%s: forwards not read from QEMU: %s", *runtime.key, exc)
            return
        runtime.pod_netdev, runtime.forwards = usernet.netdev, dict(usernet.forwards)
        await self._record_forwards(runtime)

    def _monitor(self, runtime: VmiRuntime) -> None:
        asyncio.get_running_loop().create_task(self._await_exit(runtime))

    async def _await_exit(self, runtime: VmiRuntime) -> None:
        try:
            status = await runtime.wait_exit()
        except asyncio.CancelledError:
            return
        if runtime.stopping or self.runtimes.get(runtime.key) is not runtime:
            return
        vmi = self._latest.get(runtime.key)
        if vmi is None:
            return
        if status.shutdown_reason == "guest-shutdown":
            phase, reason, message = "Succeeded", "GuestShutdown", "the guest shut down"
        else:
            tail = runtime.stderr_tail()
            phase, reason = "Failed", "QemuExited"
            message = f"QEMU exited unexpectedly ({status.code=}, {status.signal=})" + (
                f": {tail}" if tail else ""
            )
        log.info("VMI %s/%s: %s (%s)", runtime.namespace, runtime.name, phase, message)
        await self._release(runtime)
        self.runtimes.pop(runtime.key, None)
        await self._set_status(
            vmi,
            {
                "phase": phase,
                "reason": reason,
                "conditions": [condition("Ready", False, reason, message)],
            },
        )

    async def _delete(self, vmi: JSON, runtime: VmiRuntime | None) -> None:
        grace = vmi["spec"].get("terminationGracePeriodSeconds")
        grace = DEFAULT_GRACE if grace is None else int(grace)
        if runtime is None:
            # not adopted (an earlier agent's QEMU, answering QMP or not): the teardown finds it
            md = vmi["metadata"]
            workdir = self.workdir(md["namespace"], md["name"])
            runtime = VmiRuntime(md["namespace"], md["name"], md["uid"], workdir)
        await self._teardown(runtime, vmi, grace=grace)
        await self._remove_finalizer(vmi)

    async def _teardown(self, runtime: VmiRuntime, vmi: JSON | None, *, grace: float) -> None:
        """Stops the VMI's QEMU and gives back what it held. ``stop`` returns only once that QEMU
        has exited, so whatever the caller reports next (Failed, the finalizer gone) is true."""
        await runtime.stop(grace)
        await self._release(runtime)
        runtime.remove_workdir()
        self.runtimes.pop(runtime.key, None)

    async def _release(self, runtime: VmiRuntime, taps: list[str] | None = None) -> None:
        """Gives back the VMI's taps (those given, or those this agent made); a failure is logged
        and retried by the node's sweep (``releases``)."""
        taps = self._taps.pop(runtime.key, []) if taps is None else taps
        # named by the runtime's uid, never the newest VMI of that name (it may be a successor's)
        pending = PendingRelease(runtime.namespace, runtime.name, runtime.uid, tuple(taps))
        await self.releases.give_back(pending)

    # --- status --------------------------------------------------------------------------------

    async def _report_running(self, vmi: JSON, runtime: VmiRuntime) -> None:
        await self._set_status(vmi, running_status(vmi, runtime))

    async def report_volumes(self, vmi: JSON, runtime: VmiRuntime) -> None:
        """status.volumeStatus with the hotplug entries, and LiveMigratable that follows them."""
        fresh = self._latest.get(runtime.key) or vmi
        volumes = volume_status(fresh, runtime) + self.hotplug.entries(runtime)
        refusal = hotplug_migratability(runtime)
        migratable = refusal or live_migratable(fresh, shared_claims=shared_claims(runtime))
        conditions = [
            c
            for c in fresh.get("status", {}).get("conditions") or []
            if c.get("type") != "LiveMigratable"
        ]
        old = next(
            (
                c
                for c in fresh.get("status", {}).get("conditions") or []
                if c.get("type") == "LiveMigratable"
            ),
            None,
        )
        cond = migratable.condition(now())
        if (
            old is not None
            and old.get("status") == cond["status"]
            and old.get("reason") == cond.get("reason")
        ):
            cond = old
        await self._set_status(fresh, {"volumeStatus": volumes, "conditions": [*conditions, cond]})

    async def _set_status(self, vmi: JSON, status: JSON) -> None:
        """Merge-patches the given status keys only: the migration controller and the other
        node's agent write other keys of the same status concurrently."""
        md = vmi["metadata"]
        current = vmi.get("status", {})
        patch = dict(status)
        if status.get("phase") and status["phase"] != current.get("phase"):
            transitions = list(current.get("phaseTransitionTimestamps") or [])
            transitions.append({"phase": status["phase"], "phaseTransitionTimestamp": now()})
            patch["phaseTransitionTimestamps"] = transitions
        try:
            fresh = await self.client.patch(VMI, md["name"], {"status": patch}, md["namespace"])
            self._latest[(md["namespace"], md["name"])] = fresh
        except NotFound:
            pass
        except ApiStatusError as exc:
            log.warning("status of VMI %s/%s not written: %s", md["namespace"], md["name"], exc)

    async def _add_finalizer(self, vmi: JSON) -> None:
        finalizers = list(vmi["metadata"].get("finalizers") or [])
        if FINALIZER not in finalizers:
            md = vmi["metadata"]
            patch = {
                "metadata": {
                    "finalizers": [*finalizers, FINALIZER],
                    "resourceVersion": md["resourceVersion"],
                }
            }
            vmi_now = await self.client.patch(VMI, md["name"], patch, md["namespace"])
            self._latest[(md["namespace"], md["name"])] = vmi_now
            vmi["metadata"] = vmi_now["metadata"]

    async def _remove_finalizer(self, vmi: JSON) -> None:
        md = vmi["metadata"]
        try:
            fresh = await self.client.get(VMI, md["name"], md["namespace"])
        except NotFound:
            return
        finalizers = [f for f in fresh["metadata"].get("finalizers") or [] if f != FINALIZER]
        with contextlib.suppress(NotFound):
            await self.client.patch(
                VMI, md["name"], {"metadata": {"finalizers": finalizers or None}}, md["namespace"]
            )

    # --- actions for the agent API -------------------------------------------------------------

    def runtime(self, namespace: str, name: str) -> VmiRuntime | None:
        return self.runtimes.get((namespace, name))

    async def set_paused(self, namespace: str, name: str, paused: bool) -> None:
        runtime = self.runtimes[(namespace, name)]
        await (runtime.pause() if paused else runtime.unpause())
        vmi = self._latest.get((namespace, name))
        if vmi is None:
            return
        conditions = [
            c for c in vmi.get("status", {}).get("conditions") or [] if c.get("type") != "Paused"
        ]
        if paused:
            conditions.append(condition("Paused", True, "PausedByUser", "VMI was paused by user"))
        await self._set_status(vmi, {"conditions": conditions})

    async def host_port(self, namespace: str, name: str, proto: str, guest_port: int) -> int | None:
        runtime = self.runtimes.get((namespace, name))
        if runtime is None:
            return None
        known = dict(runtime.forwards)
        port = await runtime.host_port(proto, guest_port)
        if port is not None and runtime.forwards != known:
            await self._record_forwards(runtime)
        return port

    async def _record_forwards(self, runtime: VmiRuntime) -> None:
        value = ",".join(f"{p}:{g}:{h}" for (p, g), h in sorted(runtime.forwards.items()))
        with contextlib.suppress(ApiStatusError):
            await self.client.patch(
                VMI,
                runtime.name,
                {"metadata": {"annotations": {HOST_FORWARDS: value}}},
                runtime.namespace,
            )


def _settled(vmi: JSON) -> bool:
    """No migration in flight: the guest's disks are not being moved."""
    state = vmi.get("status", {}).get("migrationState") or {}
    return not state or bool(state.get("completed") or state.get("failed"))


class VmiSync(Controller):
    """virt-handler's loop: every VMI event that concerns this node queues that VMI; one
    reconcile per VMI at a time, many VMIs at once (a graceful stop may take its VMI's whole
    termination grace period, and must not hold up the other VMIs' launches)."""

    workers = 64

    def __init__(self, agent: NodeAgent) -> None:
        super().__init__(agent.client)
        self.agent = agent
        self.name = f"virt-handler-{agent.node}"

    def watches(self) -> Sequence[Watch]:
        return [Watch(VMI, self.agent.on_vmi)]

    async def reconcile(self, key: str) -> Result | None:
        await self.agent.reconcile(split_key(key))
        return None
