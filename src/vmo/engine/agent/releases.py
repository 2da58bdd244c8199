"""The node resources a VMI's teardown could not give back, and the sweep that retries them.

A tap or bridge that cannot be removed (an ``ip`` command failed, ``network.json`` could not be
read or written) is logged with its VMI, its taps and the error, and kept here; the node's sweep
retries it every ``interval`` seconds until it is released, so a passing failure leaks nothing
and a lasting one keeps saying so in the log. The sweep runs only while something is pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vmo.engine.agent.host import NetworkReleaser

log = logging.getLogger(__name__)

JSON = dict[str, Any]

SWEEP_SECONDS = 10.0


@dataclass(frozen=True)
class PendingRelease:
    """The network of one VMI (by uid) that this node still has to give back."""

    namespace: str
    name: str
    uid: str
    taps: tuple[str, ...] = ()

    def vmi(self) -> JSON:
        """What the releaser is given: the VMI's identity (the VMI itself may be gone)."""
        return {"metadata": {"namespace": self.namespace, "name": self.name, "uid": self.uid}}

    def with_taps(self, taps: Iterable[str]) -> PendingRelease:
        merged = tuple(sorted({*self.taps, *taps}))
        return PendingRelease(self.namespace, self.name, self.uid, merged)

    def __str__(self) -> str:
        taps = ", ".join(self.taps) or "no tap recorded"
        return f"VMI {self.namespace}/{self.name} (uid {self.uid}; {taps})"


class PendingReleases:
    """Releases a VMI's network now, or keeps it for the sweep when that fails."""

    def __init__(self, release: NetworkReleaser, *, interval: float = SWEEP_SECONDS) -> None:
        self._release = release
        self.interval = interval
        self._pending: dict[str, PendingRelease] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, uid: object) -> bool:
        return uid in self._pending

    def pending(self) -> list[PendingRelease]:
        return list(self._pending.values())

    async def give_back(self, item: PendingRelease) -> bool:
        """Releases ``item``; False when that failed and the sweep will retry it."""
        if await self._try(item):
            return True
        self._keep(item)
        return False

    async def sweep(self) -> int:
        """Retries every pending release once; returns how many are still pending."""
        for item in self.pending():
            if await self._try(item) and self._pending.get(item.uid) == item:
                del self._pending[item.uid]
                log.info("released the network of %s on retry", item)
        return len(self._pending)

    async def close(self) -> None:
        """Stops the sweep (the agent is going away; what is left stays in network.json)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for item in self.pending():
            log.warning("agent stopping with the network of %s not released", item)

    async def _try(self, item: PendingRelease) -> bool:
        try:
            await self._release(item.vmi(), list(item.taps))
        # The releaser runs ip(8), nft and file writes: whatever it raises, the release is kept
        # and retried, never dropped; the error is logged with what it was about.
        except Exception as exc:
            log.warning(
                "releasing the network of %s failed (%s: %s); the node's sweep retries it",
                item,
                type(exc).__name__,
                exc,
            )
            return False
        return True

    def _keep(self, item: PendingRelease) -> None:
        known = self._pending.get(item.uid)
        self._pending[item.uid] = item if known is None else known.with_taps(item.taps)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep_until_drained(), name="network-release-sweep"
            )

    async def _sweep_until_drained(self) -> None:
        while self._pending:
            await asyncio.sleep(self.interval)
            await self.sweep()
