"""The embedded engine assembled: a node agent with its storage, network and API, and the
cluster-wide controllers. ``vmo up`` runs both; ``vmo node run`` runs a node alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from vmo.api.annotations import AGENT_SOCKET, STORAGE_NODE
from vmo.api.kubevirt.migratable import claim_name
from vmo.client import (
    DATAVOLUME,
    ENDPOINTS,
    NAD,
    NAMESPACE,
    NETWORK_POLICY,
    SECRET,
    SERVICE,
    VMI,
    ApiStatusError,
    Client,
)
from vmo.engine import cloudinit
from vmo.engine.agent.agent import NodeAgent, PrepareError
from vmo.engine.agent.api import AgentApi
from vmo.engine.agent.backups import BackupExecutor
from vmo.engine.agent.metrics import NodeMetrics
from vmo.engine.agent.migration import MigrationRoles
from vmo.engine.agent.netpolicy import L2PolicyEnforcer, PodPolicyEnforcer
from vmo.engine.agent.node import now_rfc3339 as nodeobj_now
from vmo.engine.agent.snapshots import SnapshotExecutor
from vmo.engine.network import bridge, ipam
from vmo.engine.qemu.domain import DiskFormat
from vmo.engine.qemu.vmi import LocalVolume
from vmo.engine.storage import qemu_img
from vmo.engine.storage.claims import (
    ClaimController,
    Provisioner,
    claims_importing,
    ensure_storage_classes,
    provision_for_vmi,
)
from vmo.engine.storage.export import ExportController
from vmo.engine.storage.importer import DataVolumeController
from vmo.engine.storage.pool import Pool, VolumeRecord
from vmo.engine.storage.upload import api_server_authorizer, upload_routes
from vmo.engine.storage.volumes import VolumeError, resolve_volumes, virtual_size
from vmo.engine.storage.volumesnapshots import ensure_snapshot_classes
from vmo.home import StateDir
from vmo.runtime import Controller, Manager, Result, Runnable, Watch
from vmo.runtime.metrics_http import MetricsEndpoint

log = logging.getLogger(__name__)

JSON = dict[str, Any]


@dataclass
class NodeServices:
    """One node: agent, its HTTP API, storage pool and the background tasks around them."""

    client: Client
    name: str
    state_dir: Path
    use_emulation: bool | None = None
    cpus: int | None = None
    memory_ki: int | None = None
    agent: NodeAgent | None = None
    api: AgentApi | None = None
    pool: Pool = field(init=False)
    shared_pool: Pool = field(init=False)
    net_state: bridge.NetworkState = field(init=False)
    ipam: ipam.IpamStore = field(init=False)
    _network_config: dict[str, JSON] = field(default_factory=dict)
    datavolumes: DataVolumeController = field(init=False)
    provisioner: Provisioner = field(init=False)
    snapshots: SnapshotExecutor = field(init=False)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    # virt-handler's /metrics (HTTPS, delegated auth); off when the home has no metrics cert
    metrics: bool = True
    metrics_endpoint: MetricsEndpoint | None = None

    @property
    def pool_dir(self) -> Path:
        return self.state_dir / "pool"

    @property
    def shared_pool_dir(self) -> Path:
        """``$VMO_HOME/shared-pool``: ReadWriteMany volumes every node of this host opens in place
        (what shared storage is to a cluster)."""
        return self.state_dir.parent.parent / "shared-pool"

    async def start(self, stop: asyncio.Event) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pool = Pool(self.pool_dir)
        self.shared_pool = Pool(self.shared_pool_dir)
        self.net_state = bridge.NetworkState(self.state_dir)
        # one IPAM store per host: agents on one host share each bridge segment
        self.ipam = ipam.IpamStore(self.state_dir.parent.parent / "network")
        self.agent = NodeAgent(
            self.client,
            self.name,
            self.state_dir,
            prepare_volumes=self._prepare_volumes,
            prepare_networks=self._prepare_networks,
            release_networks=self._release_networks,
            use_emulation=self.use_emulation,
            cpus=self.cpus,
            memory_ki=self.memory_ki,
        )
        self.l2policy = L2PolicyEnforcer(self.client, self.name)
        self.podpolicy = PodPolicyEnforcer(self.client, self.name)
        importing = functools.partial(claims_importing, self.client)

        async def waiting(vmi: JSON) -> str | None:
            # policies that cannot be enforced here hold a VMI back, as claims being filled do
            return (
                await self.l2policy.blocks(vmi)
                or await self.podpolicy.blocks(vmi)
                or await importing(vmi)
            )

        self.agent.volumes_waiting = waiting
        self.provisioner = Provisioner(
            self.client, self.name, self.pool, self.shared_pool, resize_online=self._resize_online
        )
        self.datavolumes = DataVolumeController(
            self.client,
            self.pool,
            self.name,
            import_dir=self.image_dir,
            shared_pool=self.shared_pool,
            claims=self.provisioner,
        )
        self.provisioner.import_claim = self.datavolumes.import_claim
        self.agent.migrations = MigrationRoles(
            self.agent,
            prepare_target_volumes=self._prepare_target_volumes,
            adopt_volume=self._adopt_volume,
            release_source_volume=self._release_source_volume,
        )
        self.snapshots = SnapshotExecutor(
            self.client, self.name, self.agent, [self.pool, self.shared_pool]
        )
        self.api = AgentApi(self.agent)
        self.api.extra_routes += upload_routes(
            self.datavolumes, api_server_authorizer(self.client.creds)
        )
        await self.api.start(self.agent.socket_path)
        await self.agent.start(stop)
        backups = BackupExecutor(self.client, self.name, self.agent, [self.pool, self.shared_pool])
        exports = ExportController(
            self.client,
            self.name,
            [self.pool, self.shared_pool],
            self.state_dir,
            backups=backups.backup_volumes,
        )
        claims = ClaimController(self.provisioner)
        background = Manager(
            [
                self.datavolumes,
                claims,
                self.snapshots,
                exports,
                backups,
                self.l2policy,
                self.podpolicy,
            ]
        )
        self.tasks.append(
            asyncio.get_running_loop().create_task(background.run(stop), name=f"node-{self.name}")
        )
        await self._start_metrics()

    async def _start_metrics(self) -> None:
        home = StateDir(self.state_dir.parent.parent)
        if not self.metrics or not home.metrics_cert.exists():
            return
        assert self.agent is not None
        collector = NodeMetrics(
            self.agent, {"local": self.pool.root, "shared": self.shared_pool.root}
        )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        self.metrics_endpoint = MetricsEndpoint(
            self.client,
            home.metrics_cert,
            home.metrics_key,
            job="vmo-node-agent",
            instance_name=self.name,
            registry=registry,
            refresh=collector.refresh,
            port_file=self.state_dir / "metrics.port",
            targets_dir=home.metrics_targets,
            labels={"node": self.name},
        )
        await self.metrics_endpoint.start()

    @property
    def image_dir(self) -> Path:
        """Where ``file://`` DataVolume imports may read from: ``$VMO_HOME/images``."""
        return self.state_dir.parent.parent / "images"

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.metrics_endpoint is not None:
            # the target stays: a node whose agent is gone is a target that is down
            await self.metrics_endpoint.stop(forget=False)
        if self.agent is not None:
            await self.agent.close()
        if self.api is not None:
            await self.api.stop()

    # --- what the agent needs from storage and networking ---------------------------------------

    async def _read_secret(self, namespace: str, name: str) -> JSON | None:
        return await self.client.find(SECRET, name, namespace)

    async def _prepare_volumes(self, vmi: JSON, workdir: Path) -> dict[str, LocalVolume]:
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            await provision_for_vmi(self.provisioner, vmi)  # this node is the first consumer
        except ApiStatusError as exc:
            raise PrepareError("VolumeNotReady", f"claim not provisioned: {exc}") from None
        try:
            resolved = await resolve_volumes(
                vmi, self.pool, workdir=workdir, shared_pool=self.shared_pool
            )
        except VolumeError as exc:
            raise PrepareError("VolumeNotReady", str(exc)) from None
        volumes = {
            name: LocalVolume(
                Path(v.path),
                DiskFormat(v.format),
                shared=v.shared,
                claim=v.claim,
                backing=v.backing,
                readonly=v.readonly,
                virtual_size=virtual_size(Path(v.path), v.format),
            )
            for name, v in resolved.items()
        }
        try:
            content = await cloudinit.seed_content(vmi, self._read_secret)
        except cloudinit.SeedError as exc:
            raise PrepareError("CloudInitError", str(exc)) from None
        network_config = self._network_config.get(vmi["metadata"]["uid"])
        if content is not None and content.network_data is None and network_config is not None:
            content = dataclasses.replace(
                content, network_data=yaml.safe_dump(network_config, sort_keys=False)
            )
        if content is not None:
            found = cloudinit.cloud_init_volume(vmi)
            assert found is not None
            seed = await asyncio.to_thread(cloudinit.write_seed, content, workdir / "seed.iso")
            volumes[found[1]["name"]] = LocalVolume(
                seed, DiskFormat.RAW, readonly=True, virtual_size=seed.stat().st_size
            )
        return volumes

    async def _resize_online(self, namespace: str, claim: str, size: int) -> bool:
        """Grows the claim's disk in the QEMU of this node that has it open (``block_resize``;
        the guest sees the new size at once); False when no QEMU here uses it."""
        agent = self.agent
        if agent is None:
            return False
        for runtime in list(agent.runtimes.values()):
            for volume, local in runtime.volume_sources():
                if local.claim != (namespace, claim) or runtime.process is None:
                    continue
                node = runtime.disk_nodes[str(volume["name"])]
                qmp = await runtime.process.qmp()
                await qmp.execute("block_resize", {"node-name": node, "size": size})
                return True
            for rec in runtime.hotplugged.values():
                if (runtime.namespace, rec.get("claim")) != (namespace, claim):
                    continue
                if runtime.process is None:
                    continue
                qmp = await runtime.process.qmp()
                await qmp.execute("block_resize", {"node-name": str(rec["node"]), "size": size})
                rec["size"] = size
                runtime.save_volumes()
                return True
        return False

    # --- what a live migration needs from storage ------------------------------------------------

    async def _prepare_target_volumes(self, vmi: JSON, workdir: Path) -> dict[str, LocalVolume]:
        """The target's files: shared volumes as they are, fresh overlays and blank disks for
        ephemeral ones, and an empty copy (of the size the source reports) of every volume held
        in the source node's own pool; the source mirrors into the copies."""
        namespace, uid = vmi["metadata"]["namespace"], vmi["metadata"]["uid"]
        sizes = {
            str(v.get("name")): int(v.get("size") or 0)
            for v in (vmi.get("status") or {}).get("volumeStatus") or []
        }
        kept, remote = [], []
        for volume in vmi["spec"].get("volumes") or []:
            claim = claim_name(volume)
            if claim and not any(p.exists(namespace, claim) for p in (self.pool, self.shared_pool)):
                remote.append((volume, claim))
            else:
                kept.append(volume)
        local_vmi = {**vmi, "spec": {**vmi["spec"], "volumes": kept}}
        volumes = await self._prepare_volumes(local_vmi, workdir)
        try:
            for volume, claim in remote:
                size = sizes.get(str(volume["name"]), 0)
                if size <= 0:
                    raise PrepareError(
                        "VolumeNotReady",
                        f"the source reports no size for volume {volume['name']} in "
                        "status.volumeStatus",
                    )
                path = self.pool.incoming_path(namespace, claim, uid.replace("-", "")[:16])
                await _qemu_img_create(path, size)
                volumes[str(volume["name"])] = LocalVolume(
                    path, DiskFormat.QCOW2, claim=(namespace, claim), virtual_size=size
                )
        except BaseException:
            for local in volumes.values():
                if local.path.parent == self.pool.root:
                    local.path.unlink(missing_ok=True)
            raise
        return volumes

    async def _adopt_volume(self, vmi: JSON, local: LocalVolume) -> LocalVolume:
        """A migrated copy becomes this node's pool volume; its DataVolume names this node."""
        assert local.claim is not None
        namespace, claim = local.claim
        if not local.path.name.startswith(".migrating-"):
            return local
        dv = await self.client.find(DATAVOLUME, claim, namespace)
        record = VolumeRecord(
            namespace,
            claim,
            local.virtual_size,
            "qcow2",
            f"live migration to {self.name}",
            nodeobj_now(),
            str((dv or {}).get("metadata", {}).get("uid", "")),
        )
        path = self.pool.adopt_incoming(local.path, record)
        if dv is not None:
            with contextlib.suppress(ApiStatusError):
                await self.client.patch(
                    DATAVOLUME,
                    claim,
                    {"metadata": {"annotations": {STORAGE_NODE: self.name}}},
                    namespace,
                )
        return dataclasses.replace(local, path=path)

    async def _release_source_volume(self, claim: tuple[str, str]) -> None:
        if self.pool.delete(*claim):
            log.info("volume %s/%s left node %s with its VM", *claim, self.name)

    async def _prepare_networks(self, vmi: JSON) -> tuple[dict[str, str], list[JSON]]:
        """Bridges and taps for the VMI's Multus networks; IPAM leases go to its cloud-init."""
        taps: dict[str, str] = {}
        reported: list[JSON] = []
        ethernets: dict[str, JSON] = {}
        macs = _interface_macs(vmi)
        uid = vmi["metadata"]["uid"]
        try:
            for index, network in enumerate(vmi["spec"].get("networks") or []):
                if "multus" not in network:
                    continue
                field_path = f"spec.networks[{index}].multus.networkName"
                nad = await self._network_attachment(
                    vmi, network["multus"]["networkName"], field_path
                )
                conf = bridge.parse_bridge_conf(nad["spec"].get("config", ""))
                plan = bridge.bridge_plan(conf, node=self.name)
                tap = bridge.tap_name(uid, network["name"], self.name)
                mac = macs[network["name"]]
                await asyncio.to_thread(
                    bridge.attach_tap,
                    self.net_state,
                    plan,
                    tap,
                    owner=f"{uid}/{network['name']}",
                    mac=mac,
                )
                taps[network["name"]] = tap
                lease = ipam.ipam_address(conf, vmi, iface=network["name"], store=self.ipam)
                if lease is not None:
                    ethernets[network["name"]] = ipam.static_ethernet(mac, lease)
                    ip = str(lease.address.ip)
                    reported.append({"name": network["name"], "ipAddress": ip, "ipAddresses": [ip]})
        except (bridge.NetConfError, OSError, ValueError, RuntimeError) as exc:
            await self._release_networks(vmi, list(taps.values()))
            raise PrepareError("NetworkError", str(exc)) from None
        if ethernets:
            self._network_config[uid] = ipam.network_config(ethernets)
        return taps, reported

    async def _network_attachment(self, vmi: JSON, ref: str, field_path: str) -> JSON:
        namespace, _, name = ref.rpartition("/")
        namespace = namespace or vmi["metadata"]["namespace"]
        nad = await self.client.find(NAD, name, namespace)
        if nad is None:
            raise PrepareError(
                "NetworkNotFound",
                f'{field_path}: network-attachment-definition "{namespace}/{name}" not found',
            )
        return nad

    async def _release_networks(self, vmi: JSON, taps: list[str]) -> None:
        md = vmi["metadata"]
        # and those network.json records for this VMI: a restarted agent never made them itself
        recorded = await asyncio.to_thread(bridge.taps_of, self.net_state, md.get("uid", ""))
        for tap in sorted({*taps, *recorded}):
            await asyncio.to_thread(bridge.detach_tap, self.net_state, tap)
        self._network_config.pop(md.get("uid", ""), None)


async def _qemu_img_create(path: Path, size: int) -> None:
    try:
        argv = qemu_img.create(path, size)
    except qemu_img.ImageSizeError as exc:
        raise PrepareError("VolumeNotReady", str(exc)) from None
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise PrepareError("VolumeNotReady", f"qemu-img create failed: {err.decode().strip()}")


def _interface_macs(vmi: JSON) -> dict[str, str]:
    from vmo.engine.qemu.vmi import stable_mac

    uid = vmi["metadata"]["uid"]
    return {
        i["name"]: str(i.get("macAddress") or stable_mac(uid, i["name"])).lower()
        for i in vmi["spec"]["domain"]["devices"].get("interfaces") or []
    }


def cluster_controllers(client: Client) -> list[Runnable]:
    """The cluster-wide controllers: virt-controller's role, endpoints, and the service proxy
    (kube-proxy's role on this host)."""
    from vmo.engine.network.endpoints import EndpointsController
    from vmo.engine.virtcontroller.controllers import virt_controllers
    from vmo.engine.virtcontroller.nodelifecycle import NodeLifecycleController

    return [*virt_controllers(client), EndpointsController(client), NodeLifecycleController(client)]


@dataclass
class Engine:
    """Everything of the embedded engine that runs beside the API server in ``vmo up``."""

    state: StateDir
    nodes: int = 1
    use_emulation: bool | None = None
    client: Client | None = None
    node_services: list[NodeServices] = field(default_factory=list)
    _controllers: asyncio.Task[None] | None = None

    async def start(self, stop: asyncio.Event) -> None:
        client = self.client = Client.from_kubeconfig(self.state.engine_kubeconfig)
        await ensure_storage_classes(client)
        await ensure_snapshot_classes(client)
        opener = AgentPortOpener(client, self.node_services)
        manager = Manager([*cluster_controllers(client), ServiceProxyController(client, opener)])
        self._controllers = asyncio.get_running_loop().create_task(manager.run(stop))
        for index in range(1, self.nodes + 1):
            name = f"node-{index}"
            node = NodeServices(
                self.client, name, self.state.nodes / name, use_emulation=self.use_emulation
            )
            await node.start(stop)
            self.node_services.append(node)

    async def close(self) -> None:
        for node in self.node_services:
            await node.close()
        for task in (self._controllers,):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.client is not None:
            await self.client.close()


@dataclass
class AgentPortOpener:
    """Finds the host port behind a VMI's guest port on whichever node agent runs it: in this
    process directly, otherwise through that agent's unix socket."""

    client: Client
    local: list[NodeServices]

    async def host_port(self, namespace: str, vmi: str, proto: str, guest_port: int) -> int | None:
        for node in self.local:
            if node.agent is not None and node.agent.runtime(namespace, vmi) is not None:
                return await node.agent.host_port(namespace, vmi, proto, guest_port)
        return await self._remote(namespace, vmi, proto, guest_port)

    async def _remote(self, namespace: str, vmi: str, proto: str, guest_port: int) -> int | None:
        import aiohttp

        from vmo.client import NODE, VMI

        obj = await self.client.find(VMI, vmi, namespace)
        node_name = (obj or {}).get("status", {}).get("nodeName")
        node = await self.client.find(NODE, node_name) if node_name else None
        socket_path = (node or {}).get("metadata", {}).get("annotations", {}).get(AGENT_SOCKET)
        if not socket_path:
            return None
        url = f"http://agent/v1/namespaces/{namespace}/virtualmachineinstances/{vmi}/hostport/{proto.lower()}/{guest_port}"
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path)) as session,
                session.get(url) as resp,
            ):
                if resp.status != 200:
                    return None
                port = (await resp.json()).get("port")
                return int(port) if port else None
        except (aiohttp.ClientError, OSError):
            return None


class ServiceProxyController(Controller):
    """kube-proxy's role on this host: Services' ClusterIPs and NodePorts forward to VMIs.

    Every Service or Endpoints event queues the one key: a pass syncs the whole proxy from the
    informers' caches."""

    name = "service-proxy"
    workers = 1

    def __init__(self, client: Client, opener: AgentPortOpener) -> None:
        from vmo.engine.network.podpolicy import PodPolicyGate
        from vmo.engine.network.services import ServiceProxy

        super().__init__(client)
        gate = PodPolicyGate(
            policies=lambda: self.informer(NETWORK_POLICY).items(),
            vmi=lambda namespace, name: self.informer(VMI).get(name, namespace),
            namespaces=lambda: {
                str(ns["metadata"]["name"]): dict(ns["metadata"].get("labels") or {})
                for ns in self.informer(NAMESPACE).items()
            },
        )
        self.proxy = ServiceProxy(opener, gate=gate)

    def watches(self) -> Sequence[Watch]:
        # the policies, VMIs and namespaces are read from their caches at each connection
        return [
            Watch(SERVICE, _proxy_key),
            Watch(ENDPOINTS, _proxy_key),
            Watch(NETWORK_POLICY, _no_key),
            Watch(VMI, _no_key),
            Watch(NAMESPACE, _no_key),
        ]

    async def reconcile(self, key: str) -> Result | None:
        await self.proxy.sync(self.informer(SERVICE).items(), self.informer(ENDPOINTS).items())
        return None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await super().run(stop)
        finally:
            await self.proxy.close()


def _proxy_key(_etype: str, _obj: JSON) -> list[str]:
    return ["all"]


def _no_key(_etype: str, _obj: JSON) -> list[str]:
    return []
