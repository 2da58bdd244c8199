"""The virt-api role: the ``subresources.kubevirt.io`` actions on VMs and VMIs.

start/stop/restart change the VirtualMachine as KubeVirt's virt-api does (runStrategy or
``status.stateChangeRequests``); pause/unpause, console, VNC, the guest agent's reports (OS info,
filesystems, users) and port-forward are relayed to the node agent that runs the VMI, over the
agent's unix socket named on its Node (annotation ``vmo.dev/agent-socket``), as virt-api relays
to virt-handler. ``/version`` answers with upstream's version Info shape.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import platform
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from vmo.api.annotations import AGENT_SOCKET
from vmo.api.types import JSON, ResourceType
from vmo.apiserver import errors
from vmo.apiserver import objects as ob
from vmo.apiserver.errors import ApiError
from vmo.apiserver.hotplug_api import HOTPLUG_SUBRESOURCES, VolumeHotplug
from vmo.apiserver.registry import Registry
from vmo.apiserver.requests import ResourcePath, decode_json

log = logging.getLogger(__name__)

GROUP = "subresources.kubevirt.io"
VERSION = "v1"
AGENT_SOCKET_ANNOTATION = AGENT_SOCKET
FINAL_PHASES = ("Succeeded", "Failed")

# (resource, subresource) -> (verbs in discovery, kind)
SUBRESOURCES: dict[tuple[str, str], tuple[list[str], str]] = {
    ("virtualmachines", "start"): (["update"], "VirtualMachine"),
    ("virtualmachines", "stop"): (["update"], "VirtualMachine"),
    ("virtualmachines", "restart"): (["update"], "VirtualMachine"),
    ("virtualmachineinstances", "pause"): (["update"], "VirtualMachineInstance"),
    ("virtualmachineinstances", "unpause"): (["update"], "VirtualMachineInstance"),
    ("virtualmachineinstances", "softreboot"): (["update"], "VirtualMachineInstance"),
    ("virtualmachineinstances", "console"): (["get"], "VirtualMachineInstance"),
    ("virtualmachineinstances", "vnc"): (["get"], "VirtualMachineInstance"),
    ("virtualmachineinstances", "guestosinfo"): (["get"], "VirtualMachineInstance"),
    ("virtualmachineinstances", "filesystemlist"): (["get"], "VirtualMachineInstance"),
    ("virtualmachineinstances", "userlist"): (["get"], "VirtualMachineInstance"),
    ("virtualmachineinstances", "portforward"): (["get"], "VirtualMachineInstance"),
    ("virtualmachines", "portforward"): (["get"], "VirtualMachine"),
    # disk hotplug (hotplug_api)
    ("virtualmachineinstances", "addvolume"): (["update"], "VirtualMachineInstance"),
    ("virtualmachineinstances", "removevolume"): (["update"], "VirtualMachineInstance"),
    ("virtualmachines", "addvolume"): (["update"], "VirtualMachine"),
    ("virtualmachines", "removevolume"): (["update"], "VirtualMachine"),
}
_AGENT_ACTIONS = ("pause", "unpause", "softreboot")
_AGENT_STREAMS = ("console", "vnc", "portforward")
# what the node agent reports from the guest agent, relayed as is
_GUEST_REPORTS = ("guestosinfo", "filesystemlist", "userlist")


def version_info() -> JSON:
    """The server's version in the shape of KubeVirt's ``version.Info`` (Go fields kept)."""
    try:
        version = importlib.metadata.version("vmo")
    except importlib.metadata.PackageNotFoundError:
        version = "0.0.0"
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return {
        "gitVersion": f"v{version}",
        "gitCommit": "",
        "gitTreeState": "",
        "buildDate": "",
        "goVersion": f"python{platform.python_version()}",
        "compiler": platform.python_implementation().lower(),
        "platform": f"{platform.system().lower()}/{machine}",
    }


def resource_list() -> JSON:
    resources = [
        {
            "name": f"{res}/{sub}",
            "singularName": "",
            "namespaced": True,
            "kind": kind,
            "verbs": verbs,
        }
        for (res, sub), (verbs, kind) in SUBRESOURCES.items()
    ]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{GROUP}/{VERSION}",
        "resources": resources,
    }


def conflict(resource: str, name: str, message: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource}.kubevirt.io "{name}": {message}',
        kind=resource,
        group="kubevirt.io",
        name=name,
    )


def _final(vmi: JSON | None) -> bool:
    return vmi is None or vmi.get("status", {}).get("phase") in FINAL_PHASES


def _has_condition(vmi: JSON, ctype: str) -> bool:
    return any(
        c.get("type") == ctype and c.get("status") == "True"
        for c in vmi.get("status", {}).get("conditions") or []
    )


@dataclass
class KubeVirtApi:
    """Serves ``/apis/subresources.kubevirt.io/v1/...`` for the embedded server."""

    service: ob.ObjectService
    registry: Registry

    def _rt(self, plural: str) -> ResourceType:
        rt = self.registry.lookup("kubevirt.io", "v1", plural)
        if rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rt

    async def handle(self, request: web.Request, rp: ResourcePath) -> web.StreamResponse:
        if rp.resource == "version" and not rp.name and not rp.namespace:
            if request.method != "GET":
                raise errors.method_not_allowed(f"{request.method} is not supported on version")
            return web.json_response(version_info())
        key = (rp.resource, rp.subresource.split("/")[0])
        if key not in SUBRESOURCES or not rp.name or not rp.namespace:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        verbs, _ = SUBRESOURCES[key]
        expected = "GET" if verbs == ["get"] else "PUT"
        if request.method != expected:
            raise errors.method_not_allowed(
                f"{request.method} is not supported on {rp.resource}/{key[1]}"
            )
        body = await _options(request)
        dry_run = body.get("dryRun") == ["All"]
        if key == ("virtualmachines", "portforward"):
            return await self._relay_stream(
                request, self._vmi_of_vm(rp.namespace, rp.name), rp.subresource
            )
        if key[1] in HOTPLUG_SUBRESOURCES:
            VolumeHotplug(self.service, self.registry).handle(
                resource=rp.resource, action=key[1], namespace=rp.namespace, name=rp.name, body=body
            )
            return web.Response(status=202)
        if rp.resource == "virtualmachines":
            action = {"start": self.start, "stop": self.stop, "restart": self.restart}[key[1]]
            action(rp.namespace, rp.name, body, dry_run)
            return web.Response(status=202)
        vmi = self.service.get(self._rt("virtualmachineinstances"), rp.namespace, rp.name)
        if key[1] in _AGENT_ACTIONS:
            self._check_action(key[1], vmi)
            if not dry_run:
                await self._agent_put(vmi, key[1])
            return web.Response(status=202)
        if key[1] in _GUEST_REPORTS:
            return web.json_response(await self._agent_get(vmi, key[1]))
        return await self._relay_stream(request, vmi, rp.subresource)

    # --- VM lifecycle --------------------------------------------------------------------------

    def _vm_and_vmi(self, namespace: str, name: str) -> tuple[JSON, JSON | None]:
        vm = self.service.get(self._rt("virtualmachines"), namespace, name)
        vmi = self.service.find(self._rt("virtualmachineinstances"), namespace, name)
        return vm, vmi

    def _vmi_of_vm(self, namespace: str, name: str) -> JSON:
        """The VM's VMI, as virt-api finds it for the VM's port-forward: 404 for no VM, 409
        for a VM that has no VMI running."""
        vm, vmi = self._vm_and_vmi(namespace, name)
        owned = vmi is not None and any(
            ref.get("uid") == vm["metadata"].get("uid")
            for ref in vmi["metadata"].get("ownerReferences") or []
        )
        if vmi is None or not owned:
            raise conflict("virtualmachine", name, "VM is not running")
        return vmi

    def start(self, namespace: str, name: str, body: JSON, dry_run: bool) -> None:
        vm, vmi = self._vm_and_vmi(namespace, name)
        strategy = _run_strategy(vm)
        if (
            vmi is not None
            and not _final(vmi)
            and vmi.get("status", {}).get("phase") not in (None, "", "Unknown")
        ):
            raise conflict("virtualmachine", name, "VM is already running")
        request: JSON = {"action": "Start"}
        if body.get("paused"):
            request["data"] = {"paused": "true"}
        if strategy == "Halted" and body.get("paused"):
            # as upstream: the request goes to the VM controller, which turns the VM Always and
            # starts its VMI paused
            self._change_requests(vm, [request], dry_run)
        elif strategy == "Halted":
            self._patch_vm(vm, {"spec": {"runStrategy": "Always", "running": None}}, dry_run)
        elif strategy in ("Manual", "RerunOnFailure"):
            phase = (vmi or {}).get("status", {}).get("phase")
            if strategy == "RerunOnFailure" and phase == "Failed":
                raise conflict(
                    "virtualmachine",
                    name,
                    "RerunOnFailure does not support starting VM from failed state",
                )
            restart = vmi is not None and (
                phase == "Succeeded" or (strategy == "Manual" and _final(vmi))
            )
            requests = (
                [{"action": "Stop", "uid": vmi["metadata"]["uid"]}] if restart and vmi else []
            )
            self._change_requests(vm, [*requests, request], dry_run)
        else:
            raise conflict(
                "virtualmachine", name, f"{strategy} does not support manual start requests"
            )

    def stop(self, namespace: str, name: str, body: JSON, dry_run: bool) -> None:
        vm, vmi = self._vm_and_vmi(namespace, name)
        strategy = _run_strategy(vm)
        grace = body.get("gracePeriod")
        if vmi is not None and not _final(vmi) and grace is not None and not dry_run:
            self._set_grace(vmi, int(grace))
        if strategy in ("Always", "Once"):
            self._patch_vm(vm, {"spec": {"runStrategy": "Halted", "running": None}}, dry_run)
            return
        if _final(vmi):
            raise conflict("virtualmachine", name, "VM is not running")
        assert vmi is not None
        if strategy == "Halted" and grace is None:
            raise conflict(
                "virtualmachine",
                name,
                "Halted only supports manual stop requests with a shorter graceperiod",
            )
        self._change_requests(vm, [{"action": "Stop", "uid": vmi["metadata"]["uid"]}], dry_run)

    def restart(self, namespace: str, name: str, body: JSON, dry_run: bool) -> None:
        grace = body.get("gracePeriodSeconds")
        if grace is not None and int(grace) != 0:
            raise errors.bad_request(
                "For force restart, only gracePeriod=0 is supported for now"
                if int(grace) > 0
                else "gracePeriod has to be greater or equal to 0"
            )
        vm, vmi = self._vm_and_vmi(namespace, name)
        strategy = _run_strategy(vm)
        if strategy in ("Halted", "Once"):
            raise conflict(
                "virtualmachine",
                name,
                f"RunStategy {strategy} does not support manual restart requests",
            )
        if vmi is None:
            raise conflict("virtualmachine", name, "VM is not running: Halted")
        if grace == 0 and not dry_run:
            self._set_grace(vmi, 0)
        stop = {"action": "Stop", "uid": vmi["metadata"]["uid"]}
        self._change_requests(vm, [stop, {"action": "Start"}], dry_run)

    def _patch_vm(self, vm: JSON, patch: JSON, dry_run: bool) -> None:
        from vmo.apiserver.patch import json_merge_patch

        rt = self._rt("virtualmachines")
        current = self.service.row(rt, vm["metadata"]["namespace"], vm["metadata"]["name"])
        caller = ob.Caller(dry_run=dry_run)
        self.service.replace(rt, current, json_merge_patch(current.obj(), patch), caller=caller)

    def _change_requests(self, vm: JSON, requests: list[JSON], dry_run: bool) -> None:
        rt = self._rt("virtualmachines")
        current = self.service.row(rt, vm["metadata"]["namespace"], vm["metadata"]["name"])
        obj = current.obj()
        status = obj.setdefault("status", {})
        if status.get("stateChangeRequests"):
            raise conflict(
                "virtualmachine",
                vm["metadata"]["name"],
                "a state change request is already pending",
            )
        status["stateChangeRequests"] = requests
        self.service.replace(
            rt, current, obj, subresource="status", caller=ob.Caller(dry_run=dry_run)
        )

    def _set_grace(self, vmi: JSON, seconds: int) -> None:
        rt = self._rt("virtualmachineinstances")
        current = self.service.row(rt, vmi["metadata"]["namespace"], vmi["metadata"]["name"])
        obj = current.obj()
        obj["spec"]["terminationGracePeriodSeconds"] = seconds
        self.service.replace(rt, current, obj)

    # --- relayed to the node agent -------------------------------------------------------------

    def _check_action(self, action: str, vmi: JSON) -> None:
        name = vmi["metadata"]["name"]
        if vmi.get("status", {}).get("phase") != "Running":
            raise conflict(
                "virtualmachineinstance",
                name,
                "VMI is not running" if action != "pause" else "VM is not running",
            )
        paused = _has_condition(vmi, "Paused")
        if action == "pause" and paused:
            raise conflict("virtualmachineinstance", name, "VMI is already paused")
        if action == "unpause" and not paused:
            raise conflict("virtualmachineinstance", name, "VMI is not paused")

    def _agent_socket(self, vmi: JSON) -> str:
        node_name = vmi.get("status", {}).get("nodeName")
        if not node_name:
            raise conflict(
                "virtualmachineinstance",
                vmi["metadata"]["name"],
                "VMI is not scheduled to a node yet",
            )
        node_rt = self.registry.lookup("", "v1", "nodes")
        assert node_rt is not None
        node = self.service.find(node_rt, "", node_name)
        socket = (
            (node or {}).get("metadata", {}).get("annotations", {}).get(AGENT_SOCKET_ANNOTATION)
        )
        if not socket:
            raise ApiError(
                503, "ServiceUnavailable", f"the node agent of {node_name} is not reachable"
            )
        return str(socket)

    def _agent_path(self, vmi: JSON, action: str) -> str:
        md = vmi["metadata"]
        return f"/v1/namespaces/{md['namespace']}/virtualmachineinstances/{md['name']}/{action}"

    async def _agent_call(self, vmi: JSON, method: str, action: str) -> Any:
        connector = aiohttp.UnixConnector(path=self._agent_socket(vmi))
        try:
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.request(method, f"http://agent{self._agent_path(vmi, action)}") as resp,
            ):
                raw = await resp.read()
                if resp.status >= 400:
                    raise _agent_error(resp.status, raw)
                return json.loads(raw) if raw else None
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiError(
                503, "ServiceUnavailable", f"the node agent did not answer: {exc}"
            ) from None

    async def _agent_put(self, vmi: JSON, action: str) -> None:
        await self._agent_call(vmi, "PUT", action)

    async def _agent_get(self, vmi: JSON, action: str) -> JSON:
        answer = await self._agent_call(vmi, "GET", action)
        return answer if isinstance(answer, dict) else {}

    async def _relay_stream(
        self, request: web.Request, vmi: JSON, subresource: str
    ) -> web.StreamResponse:
        """Joins the client's WebSocket to the agent's, byte for byte, until either side closes."""
        if vmi.get("status", {}).get("phase") != "Running":
            raise ApiError(
                400,
                "BadRequest",
                "Unable to connect to VM because phase is "
                + str(vmi.get("status", {}).get("phase")),
            )
        socket_path = self._agent_socket(vmi)
        client_ws = web.WebSocketResponse(
            protocols=("plain.kubevirt.io", "base64.kubevirt.io"), max_msg_size=0
        )
        await client_ws.prepare(request)
        connector = aiohttp.UnixConnector(path=socket_path)
        try:
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.ws_connect(
                    f"http://agent{self._agent_path(vmi, subresource)}", max_msg_size=0
                ) as agent_ws,
            ):
                await _pump_both(client_ws, agent_ws)
        except (aiohttp.ClientError, OSError) as exc:
            log.info("relay to the agent failed: %s", exc)
        finally:
            await client_ws.close()
        return client_ws


def _agent_error(code: int, raw: bytes) -> ApiError:
    try:
        status = json.loads(raw)
        return ApiError(
            code, str(status.get("reason", "InternalError")), str(status.get("message", ""))
        )
    except ValueError:
        return ApiError(code, "InternalError", raw.decode(errors="replace"))


async def _pump_both(client: web.WebSocketResponse, agent: aiohttp.ClientWebSocketResponse) -> None:
    async def forward(src: Any, send: Callable[[bytes], Awaitable[None]]) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await send(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await send(msg.data.encode())
            else:
                break

    tasks = [
        asyncio.create_task(forward(client, agent.send_bytes)),
        asyncio.create_task(forward(agent, client.send_bytes)),
    ]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


async def _options(request: web.Request) -> JSON:
    raw = await request.read()
    if not raw.strip():
        return {}
    body = decode_json(raw, "Can not unmarshal Request body to struct")
    return body if isinstance(body, dict) else {}


def _run_strategy(vm: JSON) -> str:
    spec = vm.get("spec", {})
    if spec.get("runStrategy"):
        return str(spec["runStrategy"])
    return "Always" if spec.get("running") else "Halted"
