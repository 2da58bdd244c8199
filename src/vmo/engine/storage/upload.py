"""Uploads into DataVolumes: the agent's ``/upload`` endpoint and the ``vmo image-upload`` logic.

The endpoint (``PUT`` or ``POST /upload/<namespace>/<dv-name>``) streams the request body into the
node's pool through the same detection, decompression and conversion as an import; it accepts
data only while the DataVolume is ``UploadReady`` on this node.

Authorisation: the caller sends its own Kubernetes bearer token. The agent asks the API server,
*as the caller*, a SelfSubjectAccessReview for ``create`` on ``uploadtokenrequests`` in the
``upload.cdi.kubevirt.io`` group in the DataVolume's namespace: the permission CDI itself demands
before it hands out an upload token, so the same Roles grant uploads on VMO and on a cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from vmo.api.annotations import AGENT_SOCKET, STORAGE_NODE
from vmo.client import DATAVOLUME, Client, Credentials
from vmo.engine.storage.importer import (
    DataVolumeController,
    DataVolumePhase,
    UploadRefused,
)
from vmo.engine.storage.pool import PoolError, PoolFull

log = logging.getLogger(__name__)

JSON = dict[str, Any]
UPLOAD_PATH = "/upload/{namespace}/{name}"
UPLOAD_GROUP = "upload.cdi.kubevirt.io"
UPLOAD_RESOURCE = "uploadtokenrequests"
_CHUNK = 1 << 20

Authorizer = Callable[[str, str, str], Awaitable[None]]
"""(bearer token, namespace, DataVolume name) -> None; raises ``UploadRefused`` (401/403)."""


class UploadError(Exception):
    """``image_upload`` could not finish; the message says at which step and why."""


# --- authorisation ----------------------------------------------------------------------------


def access_review(namespace: str, name: str) -> JSON:
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {
            "resourceAttributes": {
                "namespace": namespace,
                "verb": "create",
                "group": UPLOAD_GROUP,
                "resource": UPLOAD_RESOURCE,
                "name": name,
            }
        },
    }


def api_server_authorizer(creds: Credentials) -> Authorizer:
    """Checks the caller's token against the API server ``creds`` point at (CA reused)."""

    async def authorize(token: str, namespace: str, name: str) -> None:
        if not token:
            raise UploadRefused(401, "a bearer token is required")
        caller = Client(Credentials(server=creds.server, token=token, ca_file=creds.ca_file))
        try:
            review = await caller.request(
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                access_review(namespace, name),
            )
        except Exception as exc:
            raise UploadRefused(401, f"the token was not accepted: {exc}") from exc
        finally:
            await caller.close()
        if not (review.get("status") or {}).get("allowed"):
            raise UploadRefused(
                403,
                f"not allowed to create {UPLOAD_RESOURCE}.{UPLOAD_GROUP} in namespace {namespace}",
            )

    return authorize


# --- the endpoint -----------------------------------------------------------------------------


def _status(code: int, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "code": code,
    }
    return web.json_response(body, status=code)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    return header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(_CHUNK):
        yield chunk


def upload_routes(controller: DataVolumeController, authorize: Authorizer) -> list[web.RouteDef]:
    """Routes for the agent's HTTP API: ``PUT``/``POST /upload/<namespace>/<name>``."""

    async def upload(request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        try:
            await authorize(_bearer(request), namespace, name)
            info = await controller.receive_upload(
                namespace, name, _body(request), total=request.content_length
            )
        except UploadRefused as exc:
            return _status(exc.code, exc.message)
        except PoolFull as exc:
            return _status(507, str(exc))
        except PoolError as exc:
            return _status(400, str(exc))
        return _status(200, f"uploaded {info.virtual_size} bytes (virtual) to {namespace}/{name}")

    return [web.put(UPLOAD_PATH, upload), web.post(UPLOAD_PATH, upload)]


# --- the client side (vmo image-upload) -------------------------------------------------------


def upload_datavolume(namespace: str, name: str, size: str) -> JSON:
    """The DataVolume ``image-upload`` creates when it does not exist yet."""
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "source": {"upload": {}},
            "storage": {"resources": {"requests": {"storage": size}}},
        },
    }


async def wait_for_phase(
    client: Client,
    namespace: str,
    name: str,
    phases: tuple[DataVolumePhase, ...],
    *,
    timeout: float,
) -> JSON:
    """Polls the DataVolume until it reaches one of ``phases``; ``Failed`` ends the wait."""
    deadline = time.monotonic() + timeout
    while True:
        dv = await client.get(DATAVOLUME, name, namespace)
        phase = (dv.get("status") or {}).get("phase")
        if phase in phases:
            return dv
        if phase == DataVolumePhase.FAILED:
            raise UploadError(f"DataVolume {namespace}/{name} failed: {_running_message(dv)}")
        if time.monotonic() > deadline:
            raise UploadError(f"DataVolume {namespace}/{name} still {phase} after {timeout:.0f}s")
        await asyncio.sleep(0.1)


def _running_message(dv: JSON) -> str:
    for cond in (dv.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Running":
            return str(cond.get("message", ""))
    return ""


async def _file_chunks(
    path: Path, total: int, progress: Callable[[float], None] | None
) -> AsyncIterator[bytes]:
    sent = 0
    with path.open("rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, _CHUNK):
            sent += len(chunk)
            if progress is not None:
                progress(100.0 * sent / total if total else 100.0)
            yield chunk


async def image_upload(
    client: Client,
    *,
    namespace: str,
    name: str,
    path: Path,
    size: str,
    agent_socket: Path | None = None,
    progress: Callable[[float], None] | None = None,
    timeout: float = 120.0,
) -> JSON:
    """Like ``virtctl image-upload dv``: creates the DataVolume if needed, sends the file, waits.

    Returns the DataVolume once ``Succeeded``; ``progress`` receives the percentage sent.
    """
    if not client.creds.token:
        raise UploadError("uploads are authorised by bearer token; the kubeconfig has none")
    existing = await client.find(DATAVOLUME, name, namespace)
    if existing is None:
        await client.create(DATAVOLUME, upload_datavolume(namespace, name, size), namespace)
    elif "upload" not in ((existing.get("spec") or {}).get("source") or {}):
        raise UploadError(f"DataVolume {namespace}/{name} exists and is not an upload DataVolume")
    ready = await wait_for_phase(
        client, namespace, name, (DataVolumePhase.UPLOAD_READY,), timeout=timeout
    )
    socket = agent_socket or await _claiming_agent_socket(client, ready)
    await _send(client.creds.token, socket, namespace, name, path, progress)
    return await wait_for_phase(
        client, namespace, name, (DataVolumePhase.SUCCEEDED,), timeout=timeout
    )


async def _claiming_agent_socket(client: Client, dv: JSON) -> Path:
    """The upload endpoint of the node agent that claimed the DataVolume (named on its Node)."""
    from vmo.client import NODE

    node_name = (dv.get("metadata", {}).get("annotations") or {}).get(STORAGE_NODE)
    node = await client.find(NODE, node_name) if node_name else None
    socket = ((node or {}).get("metadata", {}).get("annotations") or {}).get(AGENT_SOCKET)
    if not socket:
        raise UploadError(f"no node agent has claimed DataVolume {dv['metadata']['name']} yet")
    return Path(socket)


async def _send(
    token: str,
    agent_socket: Path,
    namespace: str,
    name: str,
    path: Path,
    progress: Callable[[float], None] | None,
) -> None:
    total = path.stat().st_size
    headers = {"Authorization": f"Bearer {token}", "Content-Length": str(total)}
    url = "http://vmo-agent" + UPLOAD_PATH.format(namespace=namespace, name=name)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(agent_socket)), timeout=timeout
        ) as session,
        session.put(url, data=_file_chunks(path, total, progress), headers=headers) as resp,
    ):
        if resp.status != 200:
            text = await resp.text()
            try:
                message = json.loads(text).get("message", text)
            except ValueError:
                message = text
            raise UploadError(f"upload refused ({resp.status}): {message}")
