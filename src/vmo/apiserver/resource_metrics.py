"""``metrics.k8s.io/v1beta1``, metrics-server's resource metrics API, served from Prometheus.

``kubectl top node`` reads NodeMetrics: the node's QEMU processes, as the rate of
``vmo_node_cpu_usage_seconds_total`` and ``vmo_node_memory_resident_bytes``. ``kubectl top pod``
reads the PodMetrics of virt-launcher Pods: their VMI's ``kubevirt_vmi_cpu_usage_seconds_total``
and ``kubevirt_vmi_memory_resident_bytes``, as one ``compute`` container. Prometheus is the one
``vmo up`` started, named in the home's ``monitoring/prometheus.json``, read per request (it may
start after the API server). Without it the group answers 503 ServiceUnavailable, as
kube-apiserver does while metrics-server is away. Authorization is the server's own: RBAC on
``metrics.k8s.io`` ``nodes`` and ``pods``, granted by ``system:aggregated-metrics-reader``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from aiohttp import web

from vmo.api.types import JSON, ResourceType
from vmo.apiserver import errors
from vmo.apiserver import objects as ob
from vmo.apiserver.errors import ApiError
from vmo.apiserver.launcher_pods import VMI_NAME_LABEL
from vmo.apiserver.registry import Registry
from vmo.apiserver.requests import ResourcePath
from vmo.apiserver.selectors import SelectorError, parse_field_selector, parse_label_selector
from vmo.client.prometheus import (
    PrometheusClient,
    PrometheusConfig,
    PrometheusError,
    PrometheusNotConfigured,
    Sample,
    go_duration,
    label_matcher,
)
from vmo.home import StateDir

__all__ = ["GROUP", "VERSION", "ResourceMetrics", "cpu_quantity", "memory_quantity"]

GROUP = "metrics.k8s.io"
VERSION = "v1beta1"
API_VERSION = f"{GROUP}/{VERSION}"
COMPUTE = "compute"  # the virt-launcher container QEMU runs in upstream
LAUNCHER_APP = ("kubevirt.io", "virt-launcher")
DEFAULT_WINDOW = 60.0
QUERY_TIMEOUT = 5.0
_FIELDS = {"metadata.name": "metadata.name", "metadata.namespace": "metadata.namespace"}


def resource_list() -> JSON:
    """The group version's APIResourceList, as metrics-server publishes it."""
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": API_VERSION,
        "resources": [
            {"name": "nodes", "singularName": "", "namespaced": False, "kind": "NodeMetrics",
             "verbs": ["get", "list"]},
            {"name": "pods", "singularName": "", "namespaced": True, "kind": "PodMetrics",
             "verbs": ["get", "list"]},
        ],
    }  # fmt: skip


def cpu_quantity(cores: float) -> str:
    """Cores as metrics-server writes them, in nanocores, rounded to whole microcores: finer
    digits of a rate are floating-point noise, and kubectl rounds 1 nanocore over up to 1m."""
    return f"{max(round(cores * 1e6), 0) * 1000}n"


def memory_quantity(size: float) -> str:
    """Bytes as metrics-server writes them: Ki when whole kibibytes, else bytes."""
    whole = max(round(size), 0)
    return f"{whole // 1024}Ki" if whole % 1024 == 0 else str(whole)


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unavailable(resource: str, why: str) -> ApiError:
    return ApiError(
        503,
        "ServiceUnavailable",
        f"the server is currently unable to handle the request (get {resource}.{GROUP}): {why}",
    )  # no Retry-After, as kube-apiserver's for an absent APIService: clients fail at once


@dataclasses.dataclass(frozen=True)
class _Usage:
    cpu: float
    memory: float

    def json(self) -> JSON:
        return {"cpu": cpu_quantity(self.cpu), "memory": memory_quantity(self.memory)}


def _by(samples: Iterable[Sample], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.get(label, "") for label in labels): s.value for s in samples}


@dataclasses.dataclass
class ResourceMetrics:
    """The ``metrics.k8s.io`` handler: objects from the store, usage from Prometheus."""

    service: ob.ObjectService
    registry: Registry
    state: StateDir
    window: float = DEFAULT_WINDOW  # the rate window, reported as each item's ``window``

    async def handle(self, request: web.Request, rp: ResourcePath) -> web.StreamResponse:
        if rp.resource not in ("nodes", "pods") or rp.subresource:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        watch = rp.watch_prefix or request.query.get("watch") in ("true", "1")
        if request.method != "GET" or watch:
            raise errors.method_not_allowed(
                f"{'watch' if watch else request.method} is not supported on "
                f"{rp.resource}.{GROUP}: the resource metrics API serves get and list"
            )
        labels, fields = (
            request.query.get("labelSelector", ""),
            request.query.get("fieldSelector", ""),
        )
        if rp.resource == "nodes":
            body = await self._nodes(rp.name, labels, fields)
        else:
            body = await self._pods(rp.namespace, rp.name, labels, fields)
        return web.json_response(body)

    # --- nodes ---------------------------------------------------------------------------------

    async def _nodes(self, name: str, labels: str, fields: str) -> JSON:
        nodes = self._objects(self._rt("nodes"), "", name, labels, fields)
        matcher = "{" + label_matcher("node", name) + "}" if name else ""
        cpu, memory, stamp = await self._usage(
            "nodes",
            f"sum by (node) (rate(vmo_node_cpu_usage_seconds_total{matcher}[{self._range}]))",
            f"sum by (node) (vmo_node_memory_resident_bytes{matcher})",
            ("node",),
        )
        items = []
        for node in nodes:
            key = (str(node["metadata"]["name"]),)
            if key in cpu and key in memory:
                usage = _Usage(cpu[key], memory[key])
                items.append(self._item("NodeMetrics", node, stamp, {"usage": usage.json()}))
        return self._answer("NodeMetrics", "nodes", name, items)

    # --- pods ----------------------------------------------------------------------------------

    async def _pods(self, namespace: str, name: str, labels: str, fields: str) -> JSON:
        pods = [
            pod
            for pod in self._objects(self._rt("pods"), namespace, name, labels, fields)
            if (pod["metadata"].get("labels") or {}).get(LAUNCHER_APP[0]) == LAUNCHER_APP[1]
        ]
        selector = "{" + label_matcher("namespace", namespace) + "}" if namespace else ""
        cpu, memory, stamp = await self._usage(
            "pods",
            "sum by (namespace, name) "
            f"(rate(kubevirt_vmi_cpu_usage_seconds_total{selector}[{self._range}]))",
            f"sum by (namespace, name) (kubevirt_vmi_memory_resident_bytes{selector})",
            ("namespace", "name"),
        )
        items = []
        for pod in pods:
            md = pod["metadata"]
            key = (str(md["namespace"]), str((md.get("labels") or {}).get(VMI_NAME_LABEL, "")))
            if key in cpu and key in memory:
                container = {"name": COMPUTE, "usage": _Usage(cpu[key], memory[key]).json()}
                items.append(self._item("PodMetrics", pod, stamp, {"containers": [container]}))
        return self._answer("PodMetrics", "pods", name, items)

    # --- shared --------------------------------------------------------------------------------

    @property
    def _range(self) -> str:
        return f"{max(round(self.window * 1000), 1)}ms"

    def _rt(self, plural: str) -> ResourceType:
        rt = self.registry.lookup("", "v1", plural)
        assert rt is not None, plural
        return rt

    def _objects(
        self, rt: ResourceType, namespace: str, name: str, labels: str, fields: str
    ) -> list[JSON]:
        """The Nodes or Pods asked for: the one named (404 when absent), or those selected."""
        if name:
            found = self.service.find(rt, namespace, name)
            if found is None:
                raise errors.not_found(rt.plural, GROUP, name)
            return [found]
        try:
            label_sel = parse_label_selector(labels)
            field_sel = parse_field_selector(fields)
            field_sel.check(_FIELDS)
        except SelectorError as exc:
            raise errors.bad_request(str(exc)) from None
        return [
            obj
            for obj in (row.obj() for row in self.service.scan(rt, namespace))
            if label_sel.matches(obj["metadata"].get("labels")) and field_sel.matches(obj, _FIELDS)
        ]

    async def _usage(
        self, resource: str, cpu_expr: str, memory_expr: str, keys: tuple[str, ...]
    ) -> tuple[dict[tuple[str, ...], float], dict[tuple[str, ...], float], float]:
        """CPU cores and resident bytes by ``keys``, evaluated at one instant; 503 without
        Prometheus."""
        try:
            config = PrometheusConfig.from_home(self.state)
        except PrometheusNotConfigured as exc:
            raise _unavailable(resource, f"{exc}; `vmo up` starts Prometheus") from None
        except PrometheusError as exc:
            raise _unavailable(resource, str(exc)) from None
        now = time.time()
        try:
            async with PrometheusClient(dataclasses.replace(config, timeout=QUERY_TIMEOUT)) as prom:
                cpu, memory = await asyncio.gather(
                    prom.query(cpu_expr, now), prom.query(memory_expr, now)
                )
        except PrometheusError as exc:
            raise _unavailable(resource, str(exc)) from None
        return _by(cpu, *keys), _by(memory, *keys), now

    def _item(self, kind: str, obj: JSON, stamp: float, usage: Mapping[str, object]) -> JSON:
        md = obj["metadata"]
        meta: JSON = {"name": md["name"], "creationTimestamp": _rfc3339(time.time())}
        if md.get("namespace"):
            meta["namespace"] = md["namespace"]
        if md.get("labels"):
            meta["labels"] = dict(md["labels"])
        return {
            "kind": kind,
            "apiVersion": API_VERSION,
            "metadata": meta,
            "timestamp": _rfc3339(stamp),
            "window": go_duration(self.window),
            **usage,
        }

    @staticmethod
    def _answer(kind: str, plural: str, name: str, items: list[JSON]) -> JSON:
        if name:
            if not items:
                raise errors.not_found(plural, GROUP, name)
            return items[0]
        return {"kind": f"{kind}List", "apiVersion": API_VERSION, "metadata": {}, "items": items}
