"""The agent's own HTTP API on a unix socket: what virt-api relays to virt-handler.

Only the local API server reaches it (the socket is root-only, mode 0600); authorisation has
already happened there. Streams (console, VNC, port-forward) are WebSockets carrying raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from vmo.engine.agent.agent import NodeAgent
from vmo.engine.agent.logs import log_routes
from vmo.engine.agent.runtime import VmiRuntime
from vmo.engine.qemu.errors import QemuError

log = logging.getLogger(__name__)

BASE = "/v1/namespaces/{namespace}/virtualmachineinstances/{name}"
CHUNK = 64 * 1024


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }
    return web.Response(
        body=json.dumps(body).encode(), status=code, content_type="application/json"
    )


class AgentApi:
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self._runner: web.AppRunner | None = None
        self.extra_routes: list[web.RouteDef] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_put(BASE + "/{action:pause|unpause|softreboot}", self._action)
        app.router.add_get(BASE + "/guestosinfo", self._guestosinfo)
        app.router.add_get(BASE + "/filesystemlist", self._filesystemlist)
        app.router.add_get(BASE + "/userlist", self._userlist)
        app.router.add_get(BASE + "/console", self._console)
        app.router.add_get(BASE + "/vnc", self._vnc)
        app.router.add_get(BASE + "/portforward/{port:\\d+}", self._portforward)
        app.router.add_get(BASE + "/portforward/{port:\\d+}/{proto:tcp|udp}", self._portforward)
        app.router.add_get(BASE + "/hostport/{proto:tcp|udp}/{port:\\d+}", self._hostport)
        app.router.add_routes(log_routes(self.agent))
        app.router.add_routes(self.extra_routes)
        return app

    async def start(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        old_umask = os.umask(0o177)
        try:
            await web.UnixSite(self._runner, str(path)).start()
        finally:
            os.umask(old_umask)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _runtime(self, request: web.Request) -> VmiRuntime | None:
        runtime = self.agent.runtime(request.match_info["namespace"], request.match_info["name"])
        return runtime if runtime is not None and runtime.alive else None

    async def _action(self, request: web.Request) -> web.Response:
        runtime = self._runtime(request)
        if runtime is None:
            return _status(409, "Conflict", "VMI is not running on this node")
        action = request.match_info["action"]
        try:
            if action == "softreboot":
                await runtime.soft_reboot()
            else:
                await self.agent.set_paused(runtime.namespace, runtime.name, action == "pause")
        except QemuError as exc:
            return _status(500, "InternalError", str(exc))
        return web.Response(status=202)

    async def _guestosinfo(self, request: web.Request) -> web.Response:
        runtime = self._runtime(request)
        if runtime is None:
            return _status(409, "Conflict", "VMI is not running on this node")
        info = await guest_os_info(runtime)
        if info is None:
            return _status(409, "Conflict", "VMI does not have guest agent connected")
        return web.json_response(info)

    async def _filesystemlist(self, request: web.Request) -> web.Response:
        return await self._guest_report(request, "guest-get-fsinfo", filesystem_list)

    async def _userlist(self, request: web.Request) -> web.Response:
        return await self._guest_report(request, "guest-get-users", user_list)

    async def _guest_report(
        self, request: web.Request, command: str, shape: Callable[[Any], dict[str, Any]]
    ) -> web.Response:
        """A guest agent command's answer in KubeVirt's shape; 409 when no agent answers."""
        runtime = self._runtime(request)
        if runtime is None:
            return _status(409, "Conflict", "VMI is not running on this node")
        answer = await guest_agent_call(runtime, command)
        if answer is None:
            return _status(409, "Conflict", "VMI does not have guest agent connected")
        return web.json_response(shape(answer))

    async def _console(self, request: web.Request) -> web.StreamResponse:
        return await self._socket_stream(request, "serial")

    async def _vnc(self, request: web.Request) -> web.StreamResponse:
        return await self._socket_stream(request, "vnc")

    async def _socket_stream(self, request: web.Request, which: str) -> web.StreamResponse:
        runtime = self._runtime(request)
        if runtime is None or runtime.process is None:
            return _status(409, "Conflict", "VMI is not running on this node")
        paths = runtime.process.paths
        path = str(paths.serial if which == "serial" else paths.vnc)
        return await _bridge(request, lambda: asyncio.open_unix_connection(path))

    async def _hostport(self, request: web.Request) -> web.Response:
        runtime = self._runtime(request)
        if runtime is None:
            return _status(404, "NotFound", "VMI is not running on this node")
        proto, guest = request.match_info["proto"], int(request.match_info["port"])
        port = await self.agent.host_port(runtime.namespace, runtime.name, proto, guest)
        if port is None:
            return _status(404, "NotFound", "no pod network port to forward to")
        return web.json_response({"port": port})

    async def _portforward(self, request: web.Request) -> web.StreamResponse:
        runtime = self._runtime(request)
        if runtime is None:
            return _status(409, "Conflict", "VMI is not running on this node")
        proto = request.match_info.get("proto", "tcp")
        if proto != "tcp":
            return _status(400, "BadRequest", "only tcp port-forwarding is supported")
        host = await self.agent.host_port(
            runtime.namespace, runtime.name, proto, int(request.match_info["port"])
        )
        if host is None:
            return _status(409, "Conflict", "the VMI has no pod network interface to forward to")
        return await _bridge(request, lambda: asyncio.open_connection("127.0.0.1", host))


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _bridge(request: web.Request, opener: Opener) -> web.StreamResponse:
    """Joins a WebSocket to a byte stream until either side closes."""
    try:
        reader, writer = await opener()
    except OSError as exc:
        return _status(503, "ServiceUnavailable", f"cannot reach the VM: {exc}")
    ws = web.WebSocketResponse(protocols=("plain.kubevirt.io",), max_msg_size=0)
    await ws.prepare(request)

    async def to_socket() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                writer.write(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                writer.write(msg.data.encode())
            else:
                break
            await writer.drain()

    async def to_ws() -> None:
        while data := await reader.read(CHUNK):
            await ws.send_bytes(data)

    tasks = [asyncio.create_task(to_socket()), asyncio.create_task(to_ws())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        await ws.close()
    return ws


async def guest_agent_call(runtime: VmiRuntime, command: str) -> Any:
    """One guest agent command's ``return`` value, or None when no agent answers."""
    from vmo.engine.qemu.guest_agent import GuestAgentClient

    if runtime.process is None:
        return None
    try:
        agent = await asyncio.wait_for(
            GuestAgentClient.connect(runtime.process.paths.guest_agent), 2.0
        )
    except (QemuError, OSError, TimeoutError):
        return None
    try:
        return await agent.execute(command)
    except (QemuError, TimeoutError):
        return None
    finally:
        await agent.close()


def filesystem_list(fsinfo: Any) -> dict[str, Any]:
    """``guest-get-fsinfo`` as KubeVirt's VirtualMachineInstanceFileSystemList."""
    items = [
        {
            "diskName": str(fs.get("name", "")),
            "mountPoint": str(fs.get("mountpoint", "")),
            "fileSystemType": str(fs.get("type", "")),
            "usedBytes": int(fs.get("used-bytes", 0)),
            "totalBytes": int(fs.get("total-bytes", 0)),
            **_fs_disks(fs.get("disk")),
        }
        for fs in fsinfo or []
        if isinstance(fs, dict)
    ]
    return {"metadata": {}, "items": items}


def _fs_disks(disks: Any) -> dict[str, Any]:
    shaped = [
        {
            "busType": str(d.get("bus-type", "")),
            **({"serial": d["serial"]} if d.get("serial") else {}),
        }
        for d in disks or []
        if isinstance(d, dict)
    ]
    return {"disk": shaped} if shaped else {}


def user_list(users: Any) -> dict[str, Any]:
    """``guest-get-users`` as KubeVirt's VirtualMachineInstanceGuestOSUserList (login time in
    fractional seconds since the epoch, as the agent reports it)."""
    items = []
    for user in users or []:
        if not isinstance(user, dict):
            continue
        item: dict[str, Any] = {"userName": str(user.get("user", ""))}
        if user.get("domain"):
            item["domain"] = str(user["domain"])
        if user.get("login-time"):
            item["loginTime"] = float(user["login-time"])
        items.append(item)
    return {"metadata": {}, "items": items}


async def guest_os_info(runtime: VmiRuntime) -> dict[str, Any] | None:
    """KubeVirt's guestOSInfo from the guest agent, or None when no agent answers."""
    info = await guest_agent_call(runtime, "guest-get-osinfo")
    if not isinstance(info, dict):
        return None
    return {
        "id": info.get("id", ""),
        "name": info.get("name", ""),
        "prettyName": info.get("pretty-name", ""),
        "version": info.get("version", ""),
        "versionId": info.get("version-id", ""),
        "kernelRelease": info.get("kernel-release", ""),
        "kernelVersion": info.get("kernel-version", ""),
        "machine": info.get("machine", ""),
    }
