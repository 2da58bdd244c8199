"""The ``/metrics`` endpoint of a VMO process that is not the API server (node agents, the
controllers): Prometheus text over HTTPS, guarded as kube-apiserver guards its own ``/metrics``.

A scrape must carry a bearer token. The endpoint asks the API server who the token belongs to
(a TokenReview) and whether that user may ``get`` the non-resource URL ``/metrics`` (a
SubjectAccessReview), as kube-rbac-proxy and the kubelet do; answers are cached for a minute
(denials for ten seconds), so a scrape every few seconds costs no API round trip.

Embedded, the endpoint also writes a Prometheus file-SD target file for itself into the home's
``monitoring/targets`` directory, which the Prometheus ``vmo up`` starts reads; on a cluster,
ServiceMonitors find the endpoints instead (``vmo.api.monitoring.service_monitors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from vmo.client import ApiStatusError, Client, Resource

log = logging.getLogger(__name__)

TOKENREVIEW = Resource(
    "authentication.k8s.io", "v1", "tokenreviews", "TokenReview", namespaced=False
)
SUBJECTACCESSREVIEW = Resource(
    "authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", namespaced=False
)
ALLOW_TTL = 60.0
DENY_TTL = 10.0
CACHE_MAX = 1024
METRICS_PATH = "/metrics"


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": reason, "message": message, "code": code}  # fmt: skip
    return web.Response(
        body=json.dumps(body).encode(), status=code, content_type="application/json"
    )


@dataclass
class DelegatedAuth:
    """Token → user (TokenReview) → may ``verb`` ``path`` (SubjectAccessReview), cached."""

    client: Client
    path: str = METRICS_PATH
    verb: str = "get"
    _cache: dict[str, tuple[float, int, str]] = field(default_factory=dict)

    async def check(self, token: str) -> tuple[int, str]:
        """(200, user) when allowed, else (401|403, why)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        code, why = await self._review(token)
        if code in (200, 401, 403):
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = (now + (ALLOW_TTL if code == 200 else DENY_TTL), code, why)
        return code, why

    async def _review(self, token: str) -> tuple[int, str]:
        try:
            review = await self.client.create(
                TOKENREVIEW,
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                 "spec": {"token": token}},
            )  # fmt: skip
        except ApiStatusError as exc:
            return 503, f"the token could not be reviewed: {exc}"
        status = review.get("status") or {}
        if not status.get("authenticated"):
            return 401, "Unauthorized"
        user = status.get("user") or {}
        name = str(user.get("username", ""))
        spec: dict[str, Any] = {
            "user": name,
            "groups": list(user.get("groups") or []),
            "nonResourceAttributes": {"path": self.path, "verb": self.verb},
        }
        if user.get("uid"):
            spec["uid"] = user["uid"]
        if user.get("extra"):
            spec["extra"] = user["extra"]
        try:
            answer = await self.client.create(
                SUBJECTACCESSREVIEW,
                {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                 "spec": spec},
            )  # fmt: skip
        except ApiStatusError as exc:
            return 503, f"access could not be reviewed: {exc}"
        if (answer.get("status") or {}).get("allowed"):
            return 200, name
        return 403, f'forbidden: User "{name}" cannot {self.verb} path "{self.path}"'


async def refusal(request: web.Request, auth: DelegatedAuth) -> web.Response | None:
    """The Status answer for a request whose bearer token ``auth`` does not allow; None when
    it does."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _status(401, "Unauthorized", "Unauthorized")
    code, why = await auth.check(token.strip())
    if code == 401:
        return _status(401, "Unauthorized", "Unauthorized")
    if code == 403:
        return _status(403, "Forbidden", why)
    if code != 200:
        return _status(503, "ServiceUnavailable", why)
    return None


@dataclass
class MetricsEndpoint:
    """Serves ``registry`` at ``/metrics`` on ``host:port`` over TLS (``cert``/``key``).

    ``refresh`` runs before each scrape (a node agent reads QEMU there), bounded by
    ``refresh_timeout``: a slow source makes a scrape carry the last values, never hang.
    ``port_file`` keeps the port across restarts, so that a restarted process is the same target.
    """

    client: Client
    cert: Path
    key: Path
    job: str
    instance_name: str
    host: str = "127.0.0.1"
    port: int = 0
    registry: CollectorRegistry = REGISTRY
    refresh: Callable[[], Awaitable[None]] | None = None
    refresh_timeout: float = 5.0
    port_file: Path | None = None
    targets_dir: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    address: str = ""
    _runner: web.AppRunner | None = None
    _auth: DelegatedAuth | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(METRICS_PATH, self._metrics)
        return app

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def start(self) -> str:
        """Binds (the remembered port when it is free) and returns ``host:port``."""
        self._auth = DelegatedAuth(self.client)
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        port = self.port or self._remembered_port()
        try:
            site = web.TCPSite(self._runner, self.host, port, ssl_context=self.ssl_context())
            await site.start()
        except OSError:
            if not port or self.port:
                raise
            log.warning("%s: port %d is taken; metrics move to a new port", self.job, port)
            site = web.TCPSite(self._runner, self.host, 0, ssl_context=self.ssl_context())
            await site.start()
        sockname: Any = self._runner.addresses[0]
        self.address = f"{self.host}:{sockname[1]}"
        if self.port_file is not None:
            self.port_file.parent.mkdir(parents=True, exist_ok=True)
            self.port_file.write_text(f"{sockname[1]}\n")
        self._write_target()
        log.info("%s metrics at https://%s%s", self.job, self.address, METRICS_PATH)
        return self.address

    def _remembered_port(self) -> int:
        if self.port_file is None:
            return 0
        try:
            return int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return 0

    @property
    def target_file(self) -> Path | None:
        if self.targets_dir is None:
            return None
        return self.targets_dir / f"{self.job}-{self.instance_name}.json"

    def _write_target(self) -> None:
        path = self.target_file
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = [{"targets": [self.address], "labels": {"job": self.job, **self.labels}}]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)

    async def stop(self, *, forget: bool = True) -> None:
        """Stops serving; ``forget`` also drops the target file (a clean shutdown: no alert)."""
        if forget and self.target_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.target_file.unlink()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self._auth is not None
        refused = await refusal(request, self._auth)
        if refused is not None:
            return refused
        if self.refresh is not None:
            try:
                await asyncio.wait_for(self.refresh(), self.refresh_timeout)
            except TimeoutError:
                log.warning("%s: metrics refresh took over %gs", self.job, self.refresh_timeout)
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
