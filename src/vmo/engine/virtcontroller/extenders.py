"""kube-scheduler's extender protocol, on the embedded scheduler's side: before placing a VMI,
the scheduler asks each configured extender to ``prioritize`` the nodes that pass its filters,
and adds ``score x weight x 10`` (kube-scheduler's MaxNodeScore / MaxExtenderPriority) to each
node's own score. This is how VMO's balancer steers initial placement in the embedded engine,
the way a scheduler extender does on a cluster.

The configuration lives in the API, so that a process of its own can publish it: the ConfigMap
``vmo-system/vmo-scheduler-extenders``, key ``extenders.yaml``, a list of kube-scheduler's
``Extender`` entries (``urlPrefix``, ``prioritizeVerb``, ``weight``, ``enableHTTPS``,
``tlsConfig.caData``, ``httpTimeout``, ``ignorable``). The request is kube-scheduler's
``ExtenderArgs`` with the VMI's virt-launcher Pod (as KubeVirt labels it) and the node names;
the answer a ``HostPriorityList``. Requests carry the engine's bearer token. An ignorable
extender that fails is skipped (and logged); one that is not fails the VMI's placement, as
kube-scheduler does.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import yaml

from vmo.api.duration import parse_duration
from vmo.api.scheduling import vmi_request

log = logging.getLogger(__name__)

JSON = dict[str, Any]
CONFIGMAP_NAMESPACE = "vmo-system"
CONFIGMAP_NAME = "vmo-scheduler-extenders"
CONFIG_KEY = "extenders.yaml"
MAX_EXTENDER_PRIORITY = 10
MAX_NODE_SCORE = 100
DEFAULT_TIMEOUT = 5.0


class ExtenderError(Exception):
    """An extender that must answer (not ignorable) did not."""


@dataclass(frozen=True)
class Extender:
    url_prefix: str
    prioritize_verb: str
    weight: float = 1.0
    ca_data: bytes = b""
    timeout: float = DEFAULT_TIMEOUT
    ignorable: bool = False

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.url_prefix.startswith("https://"):
            return False
        ctx = ssl.create_default_context()
        if self.ca_data:
            ctx.load_verify_locations(cadata=self.ca_data.decode())
        return ctx


def parse_extenders(configmap: Mapping[str, Any] | None) -> list[Extender]:
    """The prioritizing extenders the ConfigMap lists (entries it cannot read are logged and
    left out: a bad entry must not stop every placement)."""
    text = ((configmap or {}).get("data") or {}).get(CONFIG_KEY) or ""
    try:
        entries = yaml.safe_load(text) or []
    except yaml.YAMLError as exc:
        log.warning("%s/%s: %s is not YAML: %s", CONFIGMAP_NAMESPACE, CONFIGMAP_NAME, CONFIG_KEY, exc)  # fmt: skip
        return []
    found = []
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        try:
            if not entry.get("prioritizeVerb"):
                continue  # VMO's scheduler asks extenders to prioritize only
            timeout = entry.get("httpTimeout")
            tls = entry.get("tlsConfig") or {}
            found.append(
                Extender(
                    url_prefix=str(entry["urlPrefix"]).rstrip("/"),
                    prioritize_verb=str(entry["prioritizeVerb"]),
                    weight=float(entry.get("weight") or 1),
                    ca_data=base64.b64decode(tls["caData"]) if tls.get("caData") else b"",
                    timeout=parse_duration(str(timeout)).total_seconds()
                    if timeout
                    else DEFAULT_TIMEOUT,
                    ignorable=bool(entry.get("ignorable")),
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("scheduler extender %d unreadable, left out: %s", i, exc)
    return found


def launcher_pod(vmi: JSON) -> JSON:
    """The virt-launcher Pod an extender sees for ``vmi``: KubeVirt's labels and the requests."""
    md = vmi.get("metadata") or {}
    request = vmi_request(vmi)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"virt-launcher-{md.get('name', '')}",
            "namespace": md.get("namespace", ""),
            "labels": {
                **(md.get("labels") or {}),
                "kubevirt.io": "virt-launcher",
                "kubevirt.io/created-by": md.get("uid", ""),
                "vm.kubevirt.io/name": md.get("name", ""),
            },
        },
        "spec": {
            "containers": [
                {
                    "name": "compute",
                    "resources": {
                        "requests": {
                            "cpu": f"{request.cpu_millis}m",
                            "memory": str(request.memory_bytes),
                        }
                    },
                }
            ]
        },
    }


async def prioritize(
    extenders: Sequence[Extender], vmi: JSON, node_names: Sequence[str], token: str
) -> dict[str, float]:
    """The extenders' weighted scores by node, on the scheduler's 0..100 scale per extender."""
    scores: dict[str, float] = {}
    if not extenders or not node_names:
        return scores
    args = {"Pod": launcher_pod(vmi), "NodeNames": list(node_names)}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for ext in extenders:
        try:
            answer = await _ask(ext, args, headers)
        except ExtenderError as exc:
            if ext.ignorable:
                log.warning("scheduler extender %s ignored: %s", ext.url_prefix, exc)
                continue
            raise
        scale = ext.weight * MAX_NODE_SCORE / MAX_EXTENDER_PRIORITY
        for host, score in answer.items():
            if host in node_names:
                scores[host] = scores.get(host, 0.0) + scale * score
    return scores


async def _ask(ext: Extender, args: JSON, headers: Mapping[str, str]) -> dict[str, float]:
    url = f"{ext.url_prefix}/{ext.prioritize_verb}"
    timeout = aiohttp.ClientTimeout(total=ext.timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, json=args, headers=headers, ssl=ext.ssl_context()) as r,
        ):
            body = await r.json(content_type=None)
            if r.status != 200:
                raise ExtenderError(f"{url}: HTTP {r.status}: {str(body)[:200]}")
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise ExtenderError(f"{url}: {exc or type(exc).__name__}") from exc
    if not isinstance(body, list):
        raise ExtenderError(f"{url}: not a HostPriorityList")
    out: dict[str, float] = {}
    for item in body:
        try:
            score = float(item["Score"])
        except (KeyError, TypeError, ValueError):
            continue
        out[str(item.get("Host", ""))] = min(max(score, 0.0), MAX_EXTENDER_PRIORITY)
    return out


__all__ = [
    "CONFIGMAP_NAME",
    "CONFIGMAP_NAMESPACE",
    "CONFIG_KEY",
    "Extender",
    "ExtenderError",
    "launcher_pod",
    "parse_extenders",
    "prioritize",
]
