"""The embedded engine assembled: a node agent with its storage, network and API, and the
cluster-wide controllers. ``vmo up`` runs both; ``vmo node run`` runs a node alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmo.client import NAD, SECRET, Client
from vmo.engine import cloudinit
from vmo.engine.agent.agent import NodeAgent, PrepareError
from vmo.engine.agent.api import AgentApi
from vmo.engine.qemu.domain import DiskFormat
from vmo.engine.qemu.vmi import LocalVolume

log = logging.getLogger(__name__)

JSON = dict[str, Any]


@dataclass
class NodeServices:
    """One node: agent, its HTTP API, storage pool and the background tasks around them."""

    client: Client
    name: str
    state_dir: Path
    use_emulation: bool | None = None
    agent: NodeAgent | None = None
    api: AgentApi | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def pool_dir(self) -> Path:
        return self.state_dir / "pool"

    async def start(self, stop: asyncio.Event) -> None:
        from vmo.engine.storage.pool import Pool

        self.pool = Pool(self.pool_dir)
        self.agent = NodeAgent(
            self.client,
            self.name,
            self.state_dir,
            prepare_volumes=self._prepare_volumes,
            prepare_networks=self._prepare_networks,
            release_networks=self._release_networks,
            use_emulation=self.use_emulation,
        )
        self.api = AgentApi(self.agent)
        self._mount_storage_routes()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self.api.start(self.agent.socket_path)
        await self.agent.start(stop)
        for name, factory in self._background():
            self.tasks.append(
                asyncio.get_running_loop().create_task(_forever(name, factory), name=name)
            )

    def _mount_storage_routes(self) -> None:
        with contextlib.suppress(ImportError):
            from vmo.engine.storage.upload import upload_routes

            assert self.api is not None
            self.api.extra_routes += upload_routes(self.client, self.pool)

    def _background(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        from vmo.engine.network.services import ServiceProxy
        from vmo.engine.storage.importer import DataVolumeController

        assert self.agent is not None
        agent = self.agent
        dv = DataVolumeController(self.client, self.pool, self.name)
        proxy = ServiceProxy(self.client, agent)
        return [(f"datavolumes-{self.name}", dv.run), (f"service-proxy-{self.name}", proxy.run)]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.agent is not None:
            await self.agent.close()
        if self.api is not None:
            await self.api.stop()

    # --- what the agent needs from storage and networking ---------------------------------------

    async def _read_secret(self, namespace: str, name: str) -> JSON | None:
        return await self.client.find(SECRET, name, namespace)

    async def _prepare_volumes(self, vmi: JSON, workdir: Path) -> dict[str, LocalVolume]:
        from vmo.engine.storage.volumes import VolumeError, resolve_volumes

        workdir.mkdir(parents=True, exist_ok=True)
        try:
            resolved = resolve_volumes(vmi, self.pool, workdir=workdir)
        except VolumeError as exc:
            raise PrepareError("VolumeNotReady", str(exc)) from None
        volumes = {
            name: LocalVolume(Path(v.path), DiskFormat(v.format)) for name, v in resolved.items()
        }
        try:
            content = await cloudinit.seed_content(vmi, self._read_secret)
        except cloudinit.SeedError as exc:
            raise PrepareError("CloudInitError", str(exc)) from None
        if content is not None:
            found = cloudinit.cloud_init_volume(vmi)
            assert found is not None
            seed = await asyncio.to_thread(cloudinit.write_seed, content, workdir / "seed.iso")
            volumes[found[1]["name"]] = LocalVolume(seed, DiskFormat.RAW)
        return volumes

    async def _prepare_networks(self, vmi: JSON) -> tuple[dict[str, str], list[JSON]]:
        from vmo.engine.network import bridge

        taps: dict[str, str] = {}
        interfaces = {
            i["name"]: i for i in vmi["spec"]["domain"]["devices"].get("interfaces") or []
        }
        for index, network in enumerate(vmi["spec"].get("networks") or []):
            if "multus" not in network:
                continue
            field_path = f"spec.networks[{index}].multus.networkName"
            nad = await self._network_attachment(vmi, network["multus"]["networkName"], field_path)
            try:
                conf = bridge.parse_netconf(nad)
                plan = bridge.bridge_plan(conf, node=self.name)
                await asyncio.to_thread(bridge.apply_bridge, plan)
                tap = bridge.tap_name(vmi["metadata"]["uid"], network["name"])
                await asyncio.to_thread(bridge.create_tap, tap, plan.bridge, mtu=conf.mtu)
            except (bridge.NetworkError, OSError) as exc:
                raise PrepareError("NetworkError", f"{field_path}: {exc}") from None
            taps[network["name"]] = tap
            del interfaces[network["name"]]
        return taps, []

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
        from vmo.engine.network import bridge

        for tap in taps:
            await asyncio.to_thread(bridge.delete_tap, tap)


async def _forever(name: str, factory: Callable[[], Awaitable[None]]) -> None:
    """Runs a controller loop, restarting it after an unexpected error."""
    while True:
        try:
            await factory()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; restarting in 2 s", name)
            await asyncio.sleep(2)


async def run_controllers(client: Client, stop: asyncio.Event) -> None:
    """The cluster-wide controllers (virt-controller's role and the endpoints controller)."""
    from vmo.engine.network.endpoints import EndpointsController
    from vmo.engine.virtcontroller.controllers import run_controllers as run_virt

    endpoints = EndpointsController(client)
    tasks = [
        asyncio.create_task(_forever("virt-controller", lambda: run_virt(client, stop=stop))),
        asyncio.create_task(_forever("endpoints", endpoints.run)),
    ]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@dataclass
class Engine:
    """Everything of the embedded engine that runs beside the API server in ``vmo up``."""

    state: Any  # vmo.apiserver.server.StateDir (duck-typed: the engine never imports the server)
    nodes: int = 1
    use_emulation: bool | None = None
    client: Client | None = None
    node_services: list[NodeServices] = field(default_factory=list)
    _controllers: asyncio.Task[None] | None = None

    async def start(self, stop: asyncio.Event) -> None:
        self.client = Client.from_kubeconfig(self.state.engine_kubeconfig)
        self._controllers = asyncio.get_running_loop().create_task(
            run_controllers(self.client, stop)
        )
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
        if self._controllers is not None:
            self._controllers.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._controllers
        if self.client is not None:
            await self.client.close()
