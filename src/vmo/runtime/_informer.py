"""Informers: one list-and-watch per kind, a cache of what it saw, and handlers fed from it.

An informer keeps watching for as long as it has handlers, whatever the API server does:
- a watch that ends (server timeout, dropped connection, API server restart) resumes from the
  last resourceVersion it saw, so nothing is missed and nothing is listed again;
- a 410 Gone (that resourceVersion was compacted away) re-lists, and objects that vanished
  meanwhile are reported DELETED;
- a failed list or watch is retried with capped backoff, never given up.

``Informers`` shares one informer per (kind, namespace, selectors) among every controller of a
client: the VMI watch of the virt-controller, the scheduler and a node agent is one stream.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vmo.client import TRANSIENT_ERRORS, ApiStatusError, Client, Gone, Resource
from vmo.runtime._clock import SYSTEM_CLOCK, Clock
from vmo.runtime._queue import Backoff

log = logging.getLogger(__name__)

JSON = dict[str, Any]

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"

# A failing list or watch is tried again after 0.2 s, doubling up to 10 s.
RETRY = Backoff(base=0.2, cap=10.0)

Handler = Callable[[str, JSON], None]

# Failures a list or watch outlives: the server's refusals, bad bytes, lost connections.
_RETRIED: tuple[type[Exception], ...] = (ApiStatusError, ValueError, *TRANSIENT_ERRORS)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancels ``task`` and waits for it to end; a cancellation of the caller itself still
    propagates (only the task's own CancelledError is absorbed)."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


def object_key(obj: JSON) -> str:
    """``namespace/name`` (or ``name`` for a cluster-scoped object)."""
    md = obj.get("metadata") or {}
    namespace, name = str(md.get("namespace") or ""), str(md.get("name") or "")
    return f"{namespace}/{name}" if namespace else name


def _rv(obj: JSON) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


@dataclass(frozen=True)
class Selector:
    """What one informer lists and watches."""

    resource: Resource
    namespace: str = ""
    label_selector: str = ""
    field_selector: str = ""


class Informer:
    """One kind's list-and-watch; ``cache`` holds the latest copy of each object by key."""

    def __init__(self, client: Client, selector: Selector, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.client = client
        self.selector = selector
        self.clock = clock
        self.cache: dict[str, JSON] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.relists = 0  # how many times it listed (the first time included)
        self._handlers: dict[int, Handler] = {}
        self._next_handle = 0
        self._task: asyncio.Task[None] | None = None

    # --- reading --------------------------------------------------------------------------------

    def get(self, name: str, namespace: str = "") -> JSON | None:
        return self.cache.get(f"{namespace}/{name}" if namespace else name)

    def items(self, namespace: str | None = None) -> list[JSON]:
        objs = list(self.cache.values())
        if namespace is None:
            return objs
        return [o for o in objs if (o.get("metadata") or {}).get("namespace", "") == namespace]

    async def wait_synced(self) -> None:
        await self.synced.wait()

    # --- handlers -------------------------------------------------------------------------------

    def add_handler(self, handler: Handler) -> int:
        """Feeds ``handler`` every event from now on, after an ADDED for each cached object;
        starts the informer with its first handler."""
        handle = self._next_handle
        self._next_handle += 1
        self._handlers[handle] = handler
        for obj in list(self.cache.values()):
            self._call(handler, ADDED, obj)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"informer-{self.selector.resource.plural}"
            )
        return handle

    async def remove_handler(self, handle: int) -> None:
        """Stops feeding that handler; the last one to go stops the informer."""
        self._handlers.pop(handle, None)
        if self._handlers or self._task is None:
            return
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.cache.clear()
        self.synced.clear()
        self.resource_version = ""

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _dispatch(self, etype: str, obj: JSON) -> None:
        for handler in list(self._handlers.values()):
            self._call(handler, etype, obj)

    def _call(self, handler: Handler, etype: str, obj: JSON) -> None:
        try:
            handler(etype, obj)
        except Exception:  # one handler's bug must not stop the stream for the others
            log.exception("%s handler failed on %s", self.selector.resource.plural, object_key(obj))

    # --- the stream -----------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                if not self.resource_version:
                    await self._relist()
                started = self.clock.monotonic()
                await self._watch()
                failures = 0
                if self.clock.monotonic() - started < 1.0:
                    await self.clock.sleep(RETRY.base)  # a server that ends watches at once

            except Gone:
                log.info(
                    "%s: resourceVersion %s is gone; re-listing", self._name, self.resource_version
                )
                self.resource_version = ""
            except asyncio.CancelledError:
                raise
            except _RETRIED as exc:
                failures += 1
                delay = RETRY.delay(failures)
                log.warning(
                    "%s: %s; retrying in %.1fs", self._name, exc or type(exc).__name__, delay
                )
                await self.clock.sleep(delay)

    @property
    def _name(self) -> str:
        sel = self.selector
        return f"informer for {sel.resource.plural}" + (
            f" in {sel.namespace}" if sel.namespace else ""
        )

    async def _relist(self) -> None:
        sel = self.selector
        items, rv = await self.client.list(
            sel.resource,
            sel.namespace,
            label_selector=sel.label_selector,
            field_selector=sel.field_selector,
        )
        self.relists += 1
        fresh = {object_key(o): o for o in items}
        for key in [k for k in self.cache if k not in fresh]:
            self._dispatch(DELETED, self.cache.pop(key))
        for key, obj in fresh.items():
            old = self.cache.get(key)
            self.cache[key] = obj
            if old is None:
                self._dispatch(ADDED, obj)
            elif _rv(old) != _rv(obj):
                self._dispatch(MODIFIED, obj)
        self.resource_version = rv
        self.synced.set()

    async def _watch(self) -> None:
        sel = self.selector
        async for etype, obj in self.client.watch(
            sel.resource,
            sel.namespace,
            resource_version=self.resource_version,
            label_selector=sel.label_selector,
            field_selector=sel.field_selector,
        ):
            if _rv(obj):
                self.resource_version = _rv(obj)
            if etype == "BOOKMARK":
                continue
            key = object_key(obj)
            if etype == DELETED:
                self.cache.pop(key, None)
            else:
                self.cache[key] = obj
            self._dispatch(etype, obj)


class Informers:
    """The informers of one client, one per selector, shared by everything that asks."""

    _of_client: weakref.WeakKeyDictionary[Client, Informers] = weakref.WeakKeyDictionary()

    def __init__(self, client: Client, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.client = client
        self.clock = clock
        self._informers: dict[Selector, Informer] = {}

    @classmethod
    def of(cls, client: Client) -> Informers:
        """The shared informers of ``client`` (made on first use)."""
        found = cls._of_client.get(client)
        if found is None:
            found = cls._of_client[client] = cls(client)
        return found

    def get(self, selector: Selector | Resource) -> Informer:
        if isinstance(selector, Resource):
            selector = Selector(selector)
        informer = self._informers.get(selector)
        if informer is None:
            informer = self._informers[selector] = Informer(self.client, selector, clock=self.clock)
        return informer

    def __iter__(self) -> Iterator[Informer]:
        return iter(list(self._informers.values()))
