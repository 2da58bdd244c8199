"""A command typed on a VM's serial console through the API server's ``console`` subresource,
and what it printed: for end-to-end tests and benchmarks that drive real guests."""

from __future__ import annotations

import secrets
import time

from vmo.client import Client, Credentials, WSMsgType
from vmo.testing.apiserver import ThreadedServer

__all__ = ["ConsoleTimeout", "console", "console_exchange"]


class ConsoleTimeout(AssertionError):
    """The guest did not finish the command in time (an AssertionError, for tests)."""


async def console_exchange(
    server: ThreadedServer, namespace: str, vmi: str, command: str, timeout: float = 30
) -> str:
    """Types ``command`` between two markers and returns what it printed between them. The
    markers are computed by the guest's shell, so the typed line's echo never matches, and are
    new for each call, so what an earlier call left on the console never does either."""
    a, b, c = (secrets.randbelow(10**6) for _ in range(3))
    begin, end = f"VMO{a + b}B", f"VMO{a + c}E"
    path = (
        f"/apis/subresources.kubevirt.io/v1/namespaces/{namespace}"
        f"/virtualmachineinstances/{vmi}/console"
    )
    creds = Credentials(server=server.url, token=server.admin_token, ca_file=str(server.ca))
    seen = ""
    async with Client(creds) as client, client.websocket(path) as ws:
        typed = f"\necho VMO$(({a}+{b}))B; {command}; echo VMO$(({a}+{c}))E\n"
        await ws.send_bytes(typed.encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            if msg.type != WSMsgType.BINARY:
                break
            seen += msg.data.decode(errors="replace")
            if begin in seen and end in seen.split(begin, 1)[1]:
                answer: str = seen.split(begin, 1)[1].split(end, 1)[0]
                return answer
    raise ConsoleTimeout(f"no answer from the console of {vmi}: {seen[-500:]!r}")


def console(
    server: ThreadedServer, namespace: str, vmi: str, command: str, timeout: float = 30
) -> str:
    """``console_exchange`` from a thread other than the server's loop."""
    return server.call(
        console_exchange(server, namespace, vmi, command, timeout), timeout=timeout + 30
    )
