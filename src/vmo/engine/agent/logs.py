"""The node agent's log endpoint: what the kubelet's container logs are to a virt-launcher Pod.

``GET .../virtualmachineinstances/<name>/log?container=...`` answers with the bytes of one file in
the VMI's working directory: ``compute`` is QEMU's log (its stderr and the agent's launch
headers), ``guest-console-log`` what the guest wrote to its serial port. ``tailLines``,
``limitBytes`` and ``follow`` mean what they mean to ``kubectl logs``. Only those two files are
ever read, and only inside the workdir (no symlinks followed).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from vmo.engine.agent.agent import NodeAgent
from vmo.engine.qemu.domain import SERIAL_LOG_NAME
from vmo.engine.qemu.process import LOG_NAME

__all__ = ["LOG_FILES", "log_routes", "tail_lines"]

LOG_FILES = {"compute": LOG_NAME, "guest-console-log": SERIAL_LOG_NAME}
ROUTE = "/v1/namespaces/{namespace}/virtualmachineinstances/{name}/log"
MAX_READ = 16 * 1024 * 1024  # the newest bytes one answer starts from
FOLLOW_POLL = 0.5


def tail_lines(data: bytes, lines: int) -> bytes:
    """The last ``lines`` lines of ``data`` (a final line without newline counts as one)."""
    if lines <= 0:
        return b""
    body = data[:-1] if data.endswith(b"\n") else data
    cut = len(body)
    for _ in range(lines):
        cut = body.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1 :]


def log_path(workdir: Path, container: str) -> Path:
    """The file behind ``container``, proven to lie in ``workdir``; KeyError for others."""
    path = workdir / LOG_FILES[container]
    if not path.resolve().is_relative_to(workdir.resolve()):
        raise PermissionError(f"{path} is outside {workdir}")
    return path


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # the container has written nothing yet


def _read_from(fd: int, offset: int, limit: int = MAX_READ) -> bytes:
    return os.pread(fd, limit, offset)


def _count(request: web.Request, param: str) -> int | None:
    value = request.query.get(param, "")
    return int(value) if value.isdigit() else None


def log_routes(agent: NodeAgent) -> list[web.RouteDef]:
    async def serve(request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        container = request.query.get("container", "compute")
        workdir = agent.workdir(namespace, name)
        if container not in LOG_FILES:
            raise web.HTTPBadRequest(text=f"container {container} is not valid")
        if not workdir.is_dir():
            raise web.HTTPNotFound(text=f"VMI {namespace}/{name} has no logs on this node")
        fd = _open(log_path(workdir, container))
        try:
            return await _answer(request, fd, lambda: _alive(agent, namespace, name))
        finally:
            if fd is not None:
                os.close(fd)

    return [web.get(ROUTE, serve)]


def _alive(agent: NodeAgent, namespace: str, name: str) -> bool:
    runtime = agent.runtime(namespace, name)
    return runtime is not None and runtime.alive


async def _answer(
    request: web.Request, fd: int | None, alive: Callable[[], bool]
) -> web.StreamResponse:
    start = max(0, os.fstat(fd).st_size - MAX_READ) if fd is not None else 0
    raw = _read_from(fd, start) if fd is not None else b""
    tail = _count(request, "tailLines")
    data = tail_lines(raw, tail) if tail is not None else raw
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    budget = await _write(response, data, _count(request, "limitBytes"))
    if fd is not None and request.query.get("follow") == "true":
        await _follow(response, fd, start + len(raw), budget, alive)
    await response.write_eof()
    return response


async def _write(response: web.StreamResponse, data: bytes, budget: int | None) -> int | None:
    if budget is not None:
        data, budget = data[:budget], max(0, budget - len(data))
    if data:
        await response.write(data)
    return budget


async def _follow(
    response: web.StreamResponse,
    fd: int,
    offset: int,
    budget: int | None,
    alive: Callable[[], bool],
) -> None:
    """New bytes as the file grows, until the VMI stops here, the file is replaced by a new
    QEMU's (truncated), the byte budget is spent, or the client goes (cancels this handler)."""
    while budget != 0:
        running = alive()
        size = os.fstat(fd).st_size
        if size < offset:
            return
        if size > offset:
            data = _read_from(fd, offset, size - offset)
            offset += len(data)
            budget = await _write(response, data, budget)
        elif not running:
            return
        await asyncio.sleep(FOLLOW_POLL)
