"""The API server's own metrics: request latency and counts, store size, open watches.

Requests are labelled as kube-apiserver labels them (verb, group, resource, subresource, code);
a resource the server does not serve is ``other``, so a client probing random paths cannot grow
the series count. A watch's duration is its whole stream, so watches are counted but not timed.
``/metrics`` also serves the process-wide registry: the controllers of the embedded engine that
share this process (``vmo_controller_*``) and the process's own CPU and memory.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client import Counter as PCounter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmo.apiserver import rbac
from vmo.apiserver import store as st
from vmo.apiserver.registry import Registry
from vmo.apiserver.watch import WatchHub

LABELS = ("verb", "group", "resource", "subresource", "code")
# kube-apiserver's request-duration buckets, cut to what an embedded server answers in
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_NOBODY = rbac.UserInfo(name="", groups=())
# what the audit middleware parsed of a request, kept on it for the metrics middleware
REQUEST_INFO_KEY = web.RequestKey("request_attributes", rbac.RequestAttributes)


class ApiMetrics(Collector):
    """One API server's families, in a registry of its own (tests run many servers at once)."""

    def __init__(self, store: st.Store, hub: WatchHub, registry: Registry, db_path: str) -> None:
        self.store = store
        self.hub = hub
        self.types = registry
        self.db_path = db_path
        self.registry = CollectorRegistry(auto_describe=False)
        self.duration = Histogram(
            "vmo_apiserver_request_duration_seconds",
            "Response latency of API requests (watches excluded).",
            LABELS,
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.requests = PCounter(
            "vmo_apiserver_requests_total", "API requests answered.", LABELS, registry=self.registry
        )
        self.registry.register(self)
        self._children: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def labels(self, request: web.Request, code: int) -> tuple[str, ...]:
        attrs = request.get(REQUEST_INFO_KEY)  # what the audit middleware parsed already
        if attrs is None:
            try:
                attrs = rbac.request_attributes(
                    request.method, request.path, request.query, _NOBODY
                )
            except rbac.RequestInfoError:
                return ("other", "", "other", "", str(code))
        if not attrs.resource_request:
            return (attrs.verb, "", "", "", str(code))
        served = self.types.lookup(attrs.api_group, attrs.api_version, attrs.resource)
        resource = attrs.resource if served is not None else "other"
        sub = attrs.subresource if served is not None and len(attrs.subresource) < 40 else ""
        return (attrs.verb, attrs.api_group if served else "", resource, sub, str(code))

    def observe(self, request: web.Request, code: int, seconds: float) -> None:
        labels = self.labels(request, code)
        children = self._children.get(labels)
        if children is None:  # the label sets are bounded (served kinds x verbs x codes)
            children = self._children[labels] = (
                self.requests.labels(*labels),
                self.duration.labels(*labels),
            )
        children[0].inc()
        if labels[0] != "watch":
            children[1].observe(seconds)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except web.HTTPException as exc:
            code = exc.status
            raise
        finally:
            self.observe(request, code, time.perf_counter() - started)

    def collect(self) -> Iterable[Metric]:
        size = GaugeMetricFamily("vmo_apiserver_store_size_bytes", "Size of the store's files.")
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(self.db_path + suffix).st_size
        size.add_metric([], total)
        yield size
        objects = GaugeMetricFamily(
            "vmo_apiserver_store_objects", "Objects in the store.", labels=["group", "resource"]
        )
        for rt in sorted(self.types.storage_types(), key=lambda t: (t.group, t.plural)):
            objects.add_metric([rt.group, rt.plural], self.store.count(f"{rt.group}/{rt.plural}/"))
        yield objects
        watches = GaugeMetricFamily(
            "vmo_apiserver_watches", "Open watch streams.", labels=["group", "resource"]
        )
        counts: Counter[tuple[str, str]] = Counter()
        for prefix in self.hub.prefixes():
            group, _, rest = prefix.partition("/")
            counts[(group, rest.partition("/")[0])] += 1
        for (group, resource), n in sorted(counts.items()):
            watches.add_metric([group, resource], n)
        yield watches

    def render(self) -> web.Response:
        body = generate_latest(self.registry) + generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
