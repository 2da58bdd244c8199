"""Runs a set of controllers together, optionally only while holding a leader Lease.

Each one is supervised: a ``run`` that raises is logged and started again after a backoff,
so one controller's bug never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vmo.runtime._clock import SYSTEM_CLOCK, Clock
from vmo.runtime._leader import LeaderElector
from vmo.runtime._queue import Backoff

log = logging.getLogger(__name__)

RESTART = Backoff(base=1.0, cap=30.0)


class Runnable(Protocol):
    name: str

    async def run(self, stop: asyncio.Event) -> None: ...


@dataclass
class Manager:
    """``run(stop)`` runs every runnable until ``stop`` (or until leadership is lost)."""

    runnables: Sequence[Runnable]
    election: LeaderElector | None = None
    clock: Clock = SYSTEM_CLOCK

    async def run(self, stop: asyncio.Event) -> None:
        if self.election is None:
            await self._run_all(stop)
        else:
            await self.election.run(stop, lambda lost: self._run_all(stop, lost))

    async def _run_all(self, stop: asyncio.Event, lost: asyncio.Event | None = None) -> None:
        """Runs everything until ``stop`` or ``lost`` is set."""
        until = stop
        relay = None
        if lost is not None:
            until = asyncio.Event()
            relay = asyncio.get_running_loop().create_task(_first_of(until, stop, lost))
        try:
            await asyncio.gather(*(self._supervise(r, until) for r in self.runnables))
        finally:
            if relay is not None:
                relay.cancel()
                await asyncio.gather(relay, return_exceptions=True)

    async def _supervise(self, runnable: Runnable, stop: asyncio.Event) -> None:
        crashes = 0
        while not stop.is_set():
            started = self.clock.monotonic()
            try:
                await runnable.run(stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                # a run that lasted a while was healthy: its crash starts the backoff anew
                crashes = 1 if self.clock.monotonic() - started > RESTART.cap else crashes + 1
                delay = RESTART.delay(crashes)
                log.exception("%s crashed; restarting in %.0fs", runnable.name, delay)
                await self.clock.sleep(delay)


async def _first_of(target: asyncio.Event, *events: asyncio.Event) -> None:
    """Sets ``target`` once any of ``events`` is set."""
    waiters = [asyncio.get_running_loop().create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        target.set()
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
