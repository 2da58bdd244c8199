"""The API server's side of virt-launcher Pods: only the engine writes them, and ``pods/log``
relays the guest's serial console log or QEMU's log from the node agent that runs the VMI.

On a KubeVirt cluster the kubelet serves a container's log; here the node agent does, reading
its VMI's working directory (``guest-console-log``: what the guest wrote to its serial port;
``compute``: QEMU's own log). Deleting a Pod is allowed, as upstream, and stops its VMI: the
engine's launcher-pod controller sees the Pod gone and deletes the VMI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from vmo.api.annotations import AGENT_SOCKET
from vmo.api.pods import COMPUTE, CONTAINERS
from vmo.api.types import JSON, ResourceType
from vmo.apiserver import errors
from vmo.apiserver import objects as ob
from vmo.apiserver.auth import Identity
from vmo.apiserver.errors import ApiError
from vmo.apiserver.registry import Registry
from vmo.apiserver.requests import ResourcePath

log = logging.getLogger(__name__)

__all__ = ["LOG_DISCOVERY", "LauncherPods"]

LOG_DISCOVERY = [("log", "Pod", ["get"])]
VMI_NAME_LABEL = "vm.kubevirt.io/name"
CHUNK = 64 * 1024
# pods/log parameters relayed to the agent, each a non-negative integer when given
_COUNTS = ("tailLines", "limitBytes")
# upstream's parameters VMO cannot honour: refused by name rather than ignored
_UNSUPPORTED = {
    "timestamps": "VMO's logs carry no per-line timestamps",
    "previous": "a virt-launcher Pod's containers are never restarted",
    "sinceSeconds": "VMO's logs carry no per-line timestamps",
    "sinceTime": "VMO's logs carry no per-line timestamps",
}


@dataclass
class LauncherPods:
    service: ob.ObjectService
    registry: Registry
    writers: frozenset[str]  # the engine's user names: the only callers that write Pods

    # --- admission -----------------------------------------------------------------------------

    def admit(self, rt: ResourceType, new: JSON, old: JSON | None, caller: ob.Caller) -> None:
        """Pods are the engine's record of where each VMI runs: users may read or delete them."""
        if rt.group != "" or rt.kind != "Pod" or caller.name in self.writers:
            return
        verb = "create" if old is None else "update"
        name = str(new.get("metadata", {}).get("name", ""))
        raise ApiError(
            403,
            "Forbidden",
            f'pods "{name}" is forbidden: User "{caller.name}" cannot {verb} pods: VMO makes '
            "one virt-launcher Pod for each VirtualMachineInstance and only its engine writes "
            "them; create or change the VirtualMachine or VirtualMachineInstance instead",
            kind="pods",
            name=name,
        )

    # --- pods/log ------------------------------------------------------------------------------

    async def log(
        self, request: web.Request, rt: ResourceType, rp: ResourcePath, user: Identity
    ) -> web.StreamResponse:
        if request.method != "GET":
            raise errors.method_not_allowed(f"{request.method} is not supported on pods/log")
        pod = self.service.get(rt, rp.namespace, rp.name)
        params = log_params(request.query, pod)
        vmi_name = _vmi_name(pod)
        socket = self._agent_socket(pod)
        path = f"/v1/namespaces/{rp.namespace}/virtualmachineinstances/{vmi_name}/log"
        connector = aiohttp.UnixConnector(path=socket)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get(f"http://agent{path}", params=params) as answer,
            ):
                if answer.status >= 400:
                    raise _agent_error(answer.status, await answer.read())
                return await _relay(request, answer)
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiError(
                503, "ServiceUnavailable", f"the node agent did not answer: {exc}"
            ) from None

    def _agent_socket(self, pod: JSON) -> str:
        node_name = str((pod.get("spec") or {}).get("nodeName") or "")
        if not node_name:
            raise errors.bad_request(
                f'pod "{pod["metadata"]["name"]}" is not scheduled to a node yet: no logs'
            )
        node_rt = self.registry.lookup("", "v1", "nodes")
        assert node_rt is not None
        node = self.service.find(node_rt, "", node_name) or {}
        socket = (node.get("metadata", {}).get("annotations") or {}).get(AGENT_SOCKET)
        if not socket:
            raise ApiError(
                503, "ServiceUnavailable", f"the node agent of {node_name} is not reachable"
            )
        return str(socket)


def log_params(query: Mapping[str, str], pod: JSON) -> dict[str, str]:
    """The agent's query for a pods/log request, or a 400 naming the parameter at fault."""
    given = dict(query)
    name = pod["metadata"]["name"]
    for param, why in _UNSUPPORTED.items():
        if given.get(param) not in (None, "", "false", "0"):
            raise errors.bad_request(f"{param} is not supported for pod {name}: {why}")
    container = given.get("container") or COMPUTE
    if container not in CONTAINERS:
        raise errors.bad_request(
            f"container {container} is not valid for pod {name}: "
            f"choose one of [{' '.join(CONTAINERS)}]"
        )
    params = {"container": container}
    for param in _COUNTS:
        value = given.get(param)
        if value in (None, ""):
            continue
        if not value.isdigit():
            raise errors.bad_request(f"{param}: {value!r} must be a non-negative integer")
        params[param] = value
    if given.get("follow") in ("true", "1"):
        params["follow"] = "true"
    return params


def _vmi_name(pod: JSON) -> str:
    md = pod["metadata"]
    for ref in md.get("ownerReferences") or []:
        if ref.get("kind") == "VirtualMachineInstance":
            return str(ref["name"])
    return str((md.get("labels") or {}).get(VMI_NAME_LABEL, ""))


async def _relay(request: web.Request, answer: aiohttp.ClientResponse) -> web.StreamResponse:
    """Streams the agent's bytes to the client as they come (``follow`` keeps it open)."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    async for chunk in answer.content.iter_chunked(CHUNK):
        await response.write(chunk)
    await response.write_eof()
    return response


def _agent_error(code: int, raw: bytes) -> ApiError:
    try:
        status = json.loads(raw)
        return ApiError(code, str(status.get("reason", "InternalError")), str(status["message"]))
    except (ValueError, KeyError, TypeError):
        return ApiError(code, "InternalError", raw.decode(errors="replace"))
