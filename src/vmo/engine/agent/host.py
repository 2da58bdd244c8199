"""What the migration roles need of their node agent, as a Protocol.

``agent.py`` implements it and ``migration.py`` uses it, so neither imports the other's
internals (and there is no import cycle between them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from vmo.client import Client
from vmo.engine.agent.runtime import VmiRuntime
from vmo.engine.qemu.accel import Accelerator

JSON = dict[str, Any]
Key = tuple[str, str]

NetworkPreparer = Callable[[JSON], Awaitable[tuple[dict[str, str], list[JSON]]]]
"""VMI -> (network name -> tap, extra status interfaces info) (raises PrepareError)."""

NetworkReleaser = Callable[[JSON, list[str]], Awaitable[None]]

VolumePreparer = Callable[[JSON, Path], Awaitable[dict[str, Any]]]
"""(VMI, its workdir) -> the local file behind each volume (raises PrepareError)."""


class PrepareError(Exception):
    """A VMI cannot start here; ``reason`` and the message go to its status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class HotplugHost(Protocol):
    """What disk hotplug needs of its node agent (``agent.py`` implements it)."""

    client: Client
    detach_timeout: float

    @property
    def prepare_volumes(self) -> VolumePreparer: ...

    def enqueue(self, key: Key) -> None: ...

    async def report_volumes(self, vmi: JSON, runtime: VmiRuntime) -> None: ...


class AgentHost(Protocol):
    """A node agent as its migration roles see it."""

    client: Client
    node: str
    accel: Accelerator
    runtimes: dict[Key, VmiRuntime]

    @property
    def prepare_networks(self) -> NetworkPreparer: ...

    @property
    def release_networks(self) -> NetworkReleaser: ...

    def workdir(self, namespace: str, name: str) -> Path: ...

    def enqueue(self, key: Key) -> None:
        """Reconcile that VMI again soon."""

    def latest(self, key: Key) -> JSON | None:
        """The newest copy of that VMI the agent has seen (None once deleted)."""

    def remember(self, vmi: JSON) -> None:
        """Records a VMI just written, so the next read is not older than the write."""

    async def adopt_migrated(self, vmi: JSON, runtime: VmiRuntime, taps: list[str]) -> None:
        """Takes over a guest that has just migrated here: reports it Running and follows it."""

    async def release(self, runtime: VmiRuntime, taps: list[str] | None = None) -> None:
        """Gives back the VMI's taps (``taps``, or those the agent made for it); a failure is
        logged and retried by the node's sweep."""
