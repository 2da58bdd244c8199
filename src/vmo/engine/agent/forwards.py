"""The host ports a VMI's QEMU forwards to its guest, read back from that QEMU.

A Service reaches a guest port through a 127.0.0.1 port that QEMU's user networking forwards
(``hostfwd``). The rules live in the QEMU process, which outlives the node agent, so an agent
that adopts a QEMU (after its own restart, or when it finishes a migration's hand-over that a
restart interrupted) reads them from QEMU itself (``info usernet``): a record kept elsewhere can
name another QEMU's ports, and a runtime that does not know its user network cannot open new ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vmo.engine.agent.runtime import VmiRuntime

__all__ = ["UserNet", "parse_usernet", "read_usernet"]

# "Hub -1 (netdev0):" opens each user-network stack in QEMU's `info usernet`
_STACK = re.compile(r"^Hub\s+-?\d+\s+\((?P<netdev>[^)]+)\):\s*$")
# "  TCP[HOST_FORWARD]  8   127.0.0.1 45001   10.0.2.2  5432   0   0"
_FORWARD = re.compile(
    r"^\s*(?P<proto>TCP|UDP)\[HOST_FORWARD\]\s+-?\d+\s+\S+\s+(?P<host>\d+)\s+\S+\s+(?P<guest>\d+)\b"
)


@dataclass(frozen=True)
class UserNet:
    """A QEMU's user network: its netdev id (None without one) and its forwards,
    ``(proto, guest port) -> host port`` with ``proto`` in lower case as the runtime keys them."""

    netdev: str | None = None
    forwards: dict[tuple[str, int], int] = field(default_factory=dict)


def parse_usernet(text: str) -> UserNet:
    """The first user-network stack of ``info usernet`` output (a VMI has one pod network)."""
    netdev: str | None = None
    forwards: dict[tuple[str, int], int] = {}
    for line in text.splitlines():
        stack = _STACK.match(line)
        if stack is not None:
            if netdev is not None:
                break
            netdev = stack["netdev"]
            continue
        forward = _FORWARD.match(line)
        if forward is not None and netdev is not None:
            forwards[(forward["proto"].lower(), int(forward["guest"]))] = int(forward["host"])
    return UserNet(netdev, forwards)


async def read_usernet(runtime: VmiRuntime) -> UserNet:
    """What the runtime's QEMU forwards now (raises QemuError when QEMU does not answer)."""
    reply = await runtime.qmp("human-monitor-command", {"command-line": "info usernet"})
    return parse_usernet(str(reply or ""))
