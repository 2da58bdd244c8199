"""The embedded nodes' "hardware": a Redfish-subset BMC, so that a node can be fenced (powered
off for certain) while its agent is dead or hung.

A node run by ``vmo node run`` holds the lock of ``nodes/<node>/agent.pid`` for its life
(``claim_node``). Its power is a record in ``nodes/<node>/power.json``: ``ForceOff`` records
Off, then SIGKILLs the agent that holds the lock and every process whose argv names the node's
directory (its QEMUs, qemu-img...), and answers only once ``/proc`` shows none left; while Off,
``vmo node run`` for that node refuses to start, until ``On``. The BMC is served over HTTPS
(the host's serving certificate from VMO's CA) with HTTP basic auth by the control plane, not
by the agent. The Redfish subset::

    GET  /redfish/v1                                           service root
    GET  /redfish/v1/Systems                                   one member per node
    GET  /redfish/v1/Systems/{node}                            {"PowerState": "On"|"Off"|...}
    POST /redfish/v1/Systems/{node}/Actions/ComputerSystem.Reset
         {"ResetType": "ForceOff" | "On" | "ForceRestart"}     204 once done

A node of ``vmo up``'s own process (no ``agent.pid``) has no BMC: its agent is the control plane.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import json
import logging
import os
import re
import secrets
import signal
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from vmo.client import NAMESPACE, SECRET, Client, Conflict
from vmo.home import AlreadyRunning, ServerLock, StateDir, write_private

log = logging.getLogger(__name__)

JSON = dict[str, Any]

AGENT_LOCK = "agent.pid"
POWER_FILE = "power.json"
FORCE_OFF_TIMEOUT = 15.0
_POLL = 0.05
USERNAME = "vmo-bmc"
REALM = "vmo-bmc"
SECRET_NAMESPACE = "vmo-system"
SECRET_NAME = "vmo-embedded-bmc"
RESET_TYPES = ("On", "ForceOff", "ForceRestart")
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class PowerState(enum.StrEnum):
    """Redfish's ``PowerState`` values this BMC reports."""

    ON = "On"
    OFF = "Off"
    POWERING_OFF = "PoweringOff"


# --- errors --------------------------------------------------------------------------------------


class NodePowerError(Exception):
    """``vmo node run`` may not start this node's agent; the message says why."""


class PoweredOff(NodePowerError):
    def __init__(self, node: str, record: JSON) -> None:
        since = record.get("changed", "an unknown time")
        super().__init__(
            f"node {node} is powered off by its BMC: {record.get('cause', 'ForceOff')} at "
            f"{since}; power it on first (Redfish ComputerSystem.Reset ResetType On)"
        )


class AgentRunning(NodePowerError):
    def __init__(self, node: str, pid: int | None) -> None:
        super().__init__(f"node {node} already has a running agent (pid {pid or 'unknown'})")


class PowerOffFailed(Exception):
    """Processes of the node were still alive when the ForceOff gave up."""

    def __init__(self, node: str, pids: list[int]) -> None:
        super().__init__(f"node {node}: processes still alive after ForceOff: {pids}")
        self.pids = pids


# --- the node's power: files and processes --------------------------------------------------------


@dataclass(frozen=True)
class NodePower:
    """One node's power, by its directory (``$VMO_HOME/nodes/<node>``)."""

    directory: Path

    @property
    def node(self) -> str:
        return self.directory.name

    @property
    def lock(self) -> ServerLock:
        return ServerLock(self.directory / AGENT_LOCK)

    @property
    def record_path(self) -> Path:
        return self.directory / POWER_FILE

    @property
    def managed(self) -> bool:
        """Whether this node runs as its own process (so the BMC can power it off)."""
        return self.lock.path.exists()

    def record(self) -> JSON:
        try:
            found: JSON = json.loads(self.record_path.read_text())
            return found
        except (OSError, ValueError):
            return {"powerState": PowerState.ON.value}

    def switched_off(self) -> bool:
        return self.record().get("powerState") == PowerState.OFF.value

    def processes(self) -> list[int]:
        """The node's live processes: its agent, and every process whose argv names the node's
        directory (QEMU's -pidfile, sockets and disks are all under it). Zombies are dead."""
        pids = set(processes_naming(str(self.directory) + os.sep))
        holder = self.lock.holder(wait=0.2)
        if holder:
            pids.add(holder)
        pids.discard(os.getpid())
        return sorted(p for p in pids if _alive(p))

    def state(self) -> PowerState:
        if not self.switched_off():
            return PowerState.ON
        return PowerState.POWERING_OFF if self.processes() else PowerState.OFF

    def force_off(self, *, timeout: float = FORCE_OFF_TIMEOUT, cause: str = "ForceOff") -> None:
        """Records Off, then SIGKILLs the node's processes until none is left (a process that
        appears meanwhile is killed too); PowerOffFailed when some outlive ``timeout``."""
        self._write(PowerState.OFF, cause)
        deadline = time.monotonic() + timeout
        while pids := self.processes():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() >= deadline:
                raise PowerOffFailed(self.node, pids)
            time.sleep(_POLL)
        log.info("node %s powered off by its BMC (%s)", self.node, cause)

    def power_on(self, cause: str = "On") -> None:
        self._write(PowerState.ON, cause)
        log.info("node %s powered on by its BMC", self.node)

    def _write(self, state: PowerState, cause: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {"powerState": state.value, "cause": cause, "changed": stamp}
        write_private(self.record_path, json.dumps(record) + "\n")


def claim_node(directory: Path) -> None:
    """What ``vmo node run`` does first: take the node's agent lock for the life of the process
    (the BMC finds the agent by it), and refuse to start a node its BMC has powered off."""
    power = NodePower(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        power.lock.claim()
    except AlreadyRunning as exc:
        raise AgentRunning(power.node, exc.pid) from None
    if power.switched_off():
        raise PoweredOff(power.node, power.record())


def processes_naming(text: str) -> list[int]:
    """Pids whose argv has an argument containing ``text``."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle in arg for arg in argv):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie holds nothing, runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # the state follows the parenthesised command name, which may itself hold ") "
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


# --- the Redfish service ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BmcCredentials:
    username: str
    password: str

    @classmethod
    def load_or_create(cls, path: Path) -> BmcCredentials:
        try:
            data = json.loads(path.read_text())
            return cls(str(data["username"]), str(data["password"]))
        except (OSError, ValueError, KeyError):
            pass
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        creds = cls(USERNAME, secrets.token_urlsafe(24))
        write_private(path, json.dumps({"username": creds.username, "password": creds.password}))
        return creds

    def accepts(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, self.username) and secrets.compare_digest(
            password, self.password
        )


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"code": f"Base.1.0.{code}", "message": message}}
    return web.json_response(body, status=status)


SYSTEMS = "/redfish/v1/Systems"


def system_resource(node: str, state: PowerState) -> JSON:
    path = f"{SYSTEMS}/{node}"
    return {
        "@odata.id": path,
        "@odata.type": "#ComputerSystem.v1_20_0.ComputerSystem",
        "Id": node,
        "Name": node,
        "SystemType": "Virtual",
        "PowerState": state.value,
        "Actions": {
            "#ComputerSystem.Reset": {
                "target": f"{path}/Actions/ComputerSystem.Reset",
                "ResetType@Redfish.AllowableValues": list(RESET_TYPES),
            }
        },
    }


@dataclass
class Bmc:
    """The Redfish service of every embedded node of this home, on ``host:port`` (0: any)."""

    state: StateDir
    host: str = "127.0.0.1"
    port: int = 0
    force_off_timeout: float = FORCE_OFF_TIMEOUT
    url: str = ""
    _runner: web.AppRunner | None = None
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.state.root / "bmc"

    @property
    def credentials(self) -> BmcCredentials:
        return BmcCredentials.load_or_create(self.directory / "credentials.json")

    def address_template(self) -> str:
        """The system URL of any node, ``{node}`` standing for its name (HAPolicy's form)."""
        return f"{self.url}{SYSTEMS}/{{node}}"

    async def start(self) -> str:
        creds = self.credentials
        app = web.Application(middlewares=[self._auth(creds)])
        app.router.add_get("/redfish/v1", self._root)
        app.router.add_get(SYSTEMS, self._systems)
        app.router.add_get(SYSTEMS + "/{node}", self._system)
        app.router.add_post(SYSTEMS + "/{node}/Actions/ComputerSystem.Reset", self._reset)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl())
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"https://{self.host}:{port}"
        write_private(self.directory / "url", self.url + "\n")
        log.info("embedded BMC (Redfish) at %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def publish(self, client: Client) -> None:
        """The Secret an HAPolicy's redfish fencing names: ``username``, ``password``,
        ``ca.crt`` and ``address`` (the system URL template), in vmo-system."""
        creds = self.credentials
        ca = (self.state.pki / "ca.crt").read_bytes()
        data = {"username": creds.username.encode(), "password": creds.password.encode(),
                "ca.crt": ca, "address": self.address_template().encode()}  # fmt: skip
        secret = {
            "metadata": {"name": SECRET_NAME, "namespace": SECRET_NAMESPACE},
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
        with contextlib.suppress(Conflict):
            await client.create(NAMESPACE, {"metadata": {"name": SECRET_NAMESPACE}})
        try:
            await client.create(SECRET, secret)
        except Conflict:
            await client.patch(SECRET, SECRET_NAME, {"data": secret["data"]}, SECRET_NAMESPACE)

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.state.metrics_cert, self.state.metrics_key)
        return ctx

    @staticmethod
    def _auth(creds: BmcCredentials) -> Middleware:
        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not creds.accepts(request.headers.get("Authorization")):
                response = _error(401, "InsufficientPrivilege", "authentication required")
                response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}"'
                return response
            return await handler(request)

        return middleware

    def _power(self, request: web.Request) -> NodePower | None:
        node = request.match_info["node"]
        if not _NODE_NAME.match(node) or ".." in node:
            return None
        power = NodePower(self.state.nodes / node)
        return power if power.managed else None

    async def _root(self, _request: web.Request) -> web.Response:
        return web.json_response({
            "@odata.id": "/redfish/v1",
            "@odata.type": "#ServiceRoot.v1_15_0.ServiceRoot",
            "Id": "RootService",
            "Name": "VMO embedded BMC",
            "RedfishVersion": "1.15.0",
            "Systems": {"@odata.id": SYSTEMS},
        })  # fmt: skip

    async def _systems(self, _request: web.Request) -> web.Response:
        nodes = sorted(p.parent.name for p in self.state.nodes.glob(f"*/{AGENT_LOCK}"))
        members = [{"@odata.id": f"{SYSTEMS}/{n}"} for n in nodes]
        return web.json_response({
            "@odata.id": SYSTEMS,
            "@odata.type": "#ComputerSystemCollection.ComputerSystemCollection",
            "Name": "Computer System Collection",
            "Members": members,
            "Members@odata.count": len(members),
        })  # fmt: skip

    async def _system(self, request: web.Request) -> web.Response:
        power = self._power(request)
        if power is None:
            return _error(404, "ResourceMissingAtURI", f"no system {request.match_info['node']}")
        state = await asyncio.to_thread(power.state)
        return web.json_response(system_resource(power.node, state))

    async def _reset(self, request: web.Request) -> web.Response:
        power = self._power(request)
        if power is None:
            return _error(404, "ResourceMissingAtURI", f"no system {request.match_info['node']}")
        try:
            body = await request.json()
            reset_type = body.get("ResetType") if isinstance(body, dict) else None
        except ValueError:
            return _error(400, "MalformedJSON", "the request body is not JSON")
        if reset_type not in RESET_TYPES:
            return _error(400, "ActionParameterValueNotInList",
                          f"ResetType {reset_type!r} is not one of {', '.join(RESET_TYPES)}")  # fmt: skip
        lock = self._locks.setdefault(power.node, asyncio.Lock())
        async with lock:
            try:
                if reset_type in ("ForceOff", "ForceRestart"):
                    await asyncio.to_thread(
                        power.force_off, timeout=self.force_off_timeout, cause=reset_type
                    )
                if reset_type in ("On", "ForceRestart"):
                    await asyncio.to_thread(power.power_on, reset_type)
            except PowerOffFailed as exc:
                return _error(500, "GeneralError", str(exc))
        return web.Response(status=204)


__all__ = [
    "Bmc",
    "BmcCredentials",
    "NodePower",
    "NodePowerError",
    "PowerOffFailed",
    "PowerState",
    "PoweredOff",
    "claim_node",
    "system_resource",
]
