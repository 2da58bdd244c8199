"""An embedded API server running in a background thread, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vmo.apiserver.audit import AuditLog
from vmo.apiserver.oidc import OIDCConfig
from vmo.apiserver.server import ApiServer
from vmo.engine.bmc import Bmc
from vmo.engine.embedded import Engine
from vmo.home import StateDir

T = TypeVar("T")


@dataclass
class ThreadedServer:
    """Starts an ``ApiServer`` on its own event loop in a daemon thread."""

    home: Path
    port: int = 0
    engine: bool = False
    nodes: int = 1
    server: ApiServer | None = None
    running_engine: Engine | None = None
    audit: AuditLog | None = None  # default: the home's audit/, every request at Metadata
    oidc: OIDCConfig | None = None  # an OpenID Connect issuer whose ID tokens are accepted
    metrics: bool = True  # the API server's request instrumentation and /metrics
    bmc: bool = False  # with engine: the embedded nodes' Redfish BMC (vmo.engine.bmc), its Secret
    running_bmc: Bmc | None = None
    url: str = ""
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None

    def start(self) -> ThreadedServer:
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vmo-apiserver", daemon=True
        )
        self._thread.start()
        self.server = self.call(self._make())
        self.url = self.call(self.server.start())
        if self.engine:
            self.call(self._start_engine(), timeout=120)
        return self

    async def _start_engine(self) -> None:
        self._stop = asyncio.Event()
        self.running_engine = Engine(StateDir(self.home), nodes=self.nodes)
        await self.running_engine.start(self._stop)
        if self.bmc:
            self.running_bmc = Bmc(StateDir(self.home))
            await self.running_bmc.start()
            assert self.running_engine.client is not None
            await self.running_bmc.publish(self.running_engine.client)

    def restart_node(self, name: str, *, between: Callable[[], None] | None = None) -> None:
        """Stops one node's agent (its QEMUs keep running) and starts a fresh one on the same
        state directory, as a crashed and restarted `vmo node run` would be; ``between`` runs
        while the node has no agent (the rest of the cluster goes on)."""
        assert self.running_engine is not None
        self.call(self._stop_node(name), timeout=120)
        if between is not None:
            between()
        self.call(self._start_node(name), timeout=120)

    def _node_index(self, name: str) -> int:
        assert self.running_engine is not None
        return next(i for i, n in enumerate(self.running_engine.node_services) if n.name == name)

    async def _stop_node(self, name: str) -> None:
        assert self.running_engine is not None
        await self.running_engine.node_services[self._node_index(name)].close()

    async def _start_node(self, name: str) -> None:
        from vmo.engine.embedded import NodeServices

        assert self.running_engine is not None
        nodes = self.running_engine.node_services
        index = self._node_index(name)
        old = nodes[index]
        fresh = NodeServices(old.client, name, old.state_dir)
        await fresh.start(self._stop)
        nodes[index] = fresh

    def restart_apiserver(self, *, between: Callable[[], None] | None = None) -> None:
        """Stops the API server and starts a new one on the same port and store, as a crashed
        and restarted ``vmo up`` would be; ``between`` runs while no server is up."""
        assert self.server is not None
        self.port = int(self.url.rsplit(":", 1)[1])
        self.call(self.server.stop())
        if between is not None:
            between()
        self.server = self.call(self._make())
        self.url = self.call(self.server.start())

    async def _make(self) -> ApiServer:
        return ApiServer(
            StateDir(self.home),
            port=self.port,
            audit=self.audit,
            oidc=self.oidc,
            metrics=self.metrics,
        )

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Runs a coroutine on the server's loop and waits for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def stop(self) -> None:
        if self.running_bmc is not None:
            self.call(self.running_bmc.stop())
            self.running_bmc = None
        if self.running_engine is not None:
            self.call(self.running_engine.close(), timeout=120)
            self.running_engine = None
        if self.server is not None:
            self.call(self.server.stop())
            self.server = None
        with contextlib.suppress(Exception):
            self.call(self._loop.shutdown_asyncgens(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()

    @property
    def kubeconfig(self) -> Path:
        return StateDir(self.home).kubeconfig

    @property
    def ca(self) -> Path:
        return StateDir(self.home).pki / "ca.crt"

    @property
    def admin_token(self) -> str:
        config = yaml.safe_load(self.kubeconfig.read_text())
        token: str = config["users"][0]["user"]["token"]
        return token

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
