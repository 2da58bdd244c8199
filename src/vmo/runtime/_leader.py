"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does.

Replicas of a controller race to hold one Lease. The holder renews it every ``retry_period``;
the others watch its record and take it over only after they have seen the record unchanged
for ``lease_duration`` by their own clock (never by comparing clocks across hosts). A holder
that cannot renew within ``renew_deadline`` stops acting before anyone else may start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from vmo.client import LEASE, NAMESPACE, TRANSIENT_ERRORS, ApiStatusError, Client, Conflict
from vmo.runtime._clock import SYSTEM_CLOCK, Clock
from vmo.runtime._informer import cancel_and_wait
from vmo.runtime._status import micro_timestamp

log = logging.getLogger(__name__)

JSON = dict[str, Any]

Leading = Callable[[asyncio.Event], Coroutine[Any, Any, None]]

_RETRIED: tuple[type[Exception], ...] = (ApiStatusError, *TRANSIENT_ERRORS)


@dataclass(frozen=True)
class LeaseTiming:
    """client-go's defaults for controller managers: 15 s, 10 s, 2 s."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


@dataclass
class LeaderElector:
    """Holds ``namespace/name`` as ``identity`` while it can; see ``run``."""

    client: Client
    name: str
    namespace: str
    identity: str
    timing: LeaseTiming = field(default_factory=LeaseTiming)
    clock: Clock = SYSTEM_CLOCK
    _observed: tuple[str, str, int] | None = field(default=None, init=False)
    _observed_at: float = field(default=0.0, init=False)
    _renewed_at: float | None = field(default=None, init=False)
    attempts: int = field(default=0, init=False)  # tries so far, won or not

    @property
    def is_leader(self) -> bool:
        return self._renewed_at is not None and (
            self.clock.monotonic() - self._renewed_at < self.timing.renew_deadline
        )

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this elector holds the lease afterwards."""
        self.attempts += 1
        try:
            lease = await self.client.find(LEASE, self.name, self.namespace)
            if lease is None:
                await self.client.create(LEASE, self._lease(None), self.namespace)
                return self._won()
            spec = lease.get("spec") or {}
            self._observe(spec)
            holder = str(spec.get("holderIdentity") or "")
            if holder and holder != self.identity and not self._expired():
                return False
            await self.client.replace(LEASE, self._lease(lease))
            return self._won()
        except Conflict:
            return False  # another replica wrote first
        except _RETRIED as exc:
            log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            return False

    def _observe(self, spec: JSON) -> None:
        record = (
            str(spec.get("holderIdentity") or ""),
            str(spec.get("renewTime") or ""),
            int(spec.get("leaseTransitions") or 0),
        )
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock.monotonic()

    def _expired(self) -> bool:
        return self.clock.monotonic() - self._observed_at >= self.timing.lease_duration

    def _won(self) -> bool:
        self._renewed_at = self.clock.monotonic()
        return True

    def _lease(self, current: JSON | None) -> JSON:
        now = micro_timestamp(self.clock.now())
        spec = dict((current or {}).get("spec") or {})
        transitions = int(spec.get("leaseTransitions") or 0)
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = now
            if current is not None:
                transitions += 1
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=int(self.timing.lease_duration),
            renewTime=now,
            leaseTransitions=transitions,
        )
        metadata = (current or {}).get("metadata") or {
            "name": self.name,
            "namespace": self.namespace,
        }
        return {
            "apiVersion": LEASE.api_version,
            "kind": LEASE.kind,
            "metadata": metadata,
            "spec": spec,
        }

    async def release(self) -> None:
        """Gives the lease up at once (client-go's ReleaseOnCancel), so a successor need not wait."""
        if self._renewed_at is None:
            return
        self._renewed_at = None
        with contextlib.suppress(*_RETRIED):
            lease = await self.client.get(LEASE, self.name, self.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
                await self.client.replace(LEASE, lease)

    async def run(self, stop: asyncio.Event, leading: Leading) -> None:
        """Until ``stop``: wait to lead, run ``leading(lost)`` while leading, and set ``lost``
        (then wait for ``leading`` to return) when the lease cannot be renewed in time."""
        while not stop.is_set():
            if not await self.try_acquire_or_renew():
                await self._pause(stop)
                continue
            log.info("%s leads %s/%s", self.identity, self.namespace, self.name)
            lost = asyncio.Event()
            task = asyncio.get_running_loop().create_task(leading(lost))
            try:
                await self._renew_until_lost(stop, task)
            finally:
                lost.set()
                try:
                    await _wait_or_cancel(task)
                finally:
                    await self.release()

    async def _renew_until_lost(self, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        while not stop.is_set() and not task.done():
            await self._pause(stop)
            if stop.is_set() or task.done():
                return
            if not await self.try_acquire_or_renew() and not self.is_leader:
                log.warning("%s lost %s/%s", self.identity, self.namespace, self.name)
                return

    async def _pause(self, stop: asyncio.Event) -> None:
        waiter = asyncio.get_running_loop().create_task(stop.wait())
        sleeper = asyncio.get_running_loop().create_task(self.clock.sleep(self.timing.retry_period))
        try:
            await asyncio.wait([waiter, sleeper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, sleeper):
                t.cancel()
            await asyncio.gather(waiter, sleeper, return_exceptions=True)


async def _wait_or_cancel(task: asyncio.Task[None]) -> None:
    """Lets ``leading`` finish once told it lost; if this elector itself is being cancelled,
    the leading task is cancelled too (and the caller's cancellation still propagates)."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        await cancel_and_wait(task)
        raise asyncio.CancelledError
    await task


async def ensure_namespace(client: Client, namespace: str) -> None:
    """Leases live in a namespace; make it if missing (ignoring a race with another replica)."""
    if await client.find(NAMESPACE, namespace) is None:
        with contextlib.suppress(Conflict):
            await client.create(NAMESPACE, {"metadata": {"name": namespace}})
