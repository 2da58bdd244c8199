"""Initial placement by the balancer: a kube-scheduler extender (its ``prioritize`` verb).

The embedded engine's scheduler asks the extenders that the ConfigMap
``vmo-system/vmo-scheduler-extenders`` lists (vmo.engine.virtcontroller.extenders); this
runnable serves one over HTTPS and publishes that ConfigMap while a Partial or Full policy
exists (and withdraws it without one, or when it stops: ``ignorable: true`` covers the moments
between). For a VMI a Partial or Full
BalancePolicy selects, the answer ranks the nodes by the imbalance the VMI would leave
(``BalanceController.placement_scores``); for any other VMI it is neutral. Callers authenticate
with a bearer token that may ``post`` the non-resource URL ``/prioritize`` (TokenReview and
SubjectAccessReview, as the metrics endpoints check theirs).

On a cluster, kube-scheduler can be given the same extender in its KubeSchedulerConfiguration;
VMO does not render that, nor yet the node-affinity mutation the issue names for cluster mode.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from vmo.client import CONFIGMAP, TRANSIENT_ERRORS, ApiStatusError, Client, Conflict, NotFound
from vmo.controllers.balance.controller import BalanceController
from vmo.controllers.balance.crds import BALANCE_POLICY
from vmo.runtime.metrics_http import DelegatedAuth, refusal

log = logging.getLogger(__name__)

JSON = dict[str, Any]
NAMESPACE = "vmo-system"
CONFIGMAP_NAME = "vmo-scheduler-extenders"
CONFIG_KEY = "extenders.yaml"
VERB = "prioritize"
PATH = f"/{VERB}"
# the scheduler's own score is 0..100 (least allocated) plus soft-affinity weights; weight 3
# lets the policy's ranking (up to 300) lead
WEIGHT = 3
TIMEOUT = "2s"
RECHECK_SECONDS = 2.0
_API_ERRORS: tuple[type[Exception], ...] = (ApiStatusError, *TRANSIENT_ERRORS)


class PlacementExtender:
    """A ``Runnable`` of the controllers' manager (it runs on the leader only)."""

    name = "balance-placement-extender"

    def __init__(
        self,
        client: Client,
        balancer: BalanceController,
        *,
        cert: Path,
        key: Path,
        ca: Path,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.client = client
        self.balancer = balancer
        self.cert, self.key, self.ca = cert, key, ca
        self.host, self.port = host, port
        self.url = ""
        self._auth = DelegatedAuth(client, path=PATH, verb="post")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 2**20)
        app.router.add_post(PATH, self._prioritize)
        return app

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def _prioritize(self, request: web.Request) -> web.Response:
        refused = await refusal(request, self._auth)
        if refused is not None:
            return refused
        try:
            args = await request.json()
            pod = args["Pod"]
            names = list(args.get("NodeNames") or [
                n["metadata"]["name"] for n in (args.get("Nodes") or {}).get("items") or []])  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"not ExtenderArgs: {exc}"}, status=400)
        scores = self.balancer.placement_scores(pod, [str(n) for n in names])
        return web.json_response([{"Host": n, "Score": scores.get(n, 0)} for n in names])

    def _configmap(self) -> JSON:
        entry = {
            "urlPrefix": self.url,
            "prioritizeVerb": VERB,
            "weight": WEIGHT,
            "enableHTTPS": True,
            "tlsConfig": {"caData": base64.b64encode(self.ca.read_bytes()).decode()},
            "httpTimeout": TIMEOUT,
            "ignorable": True,
        }
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIGMAP_NAME, "namespace": NAMESPACE,
                         "labels": {"app.kubernetes.io/managed-by": "vmo-controllers"}},
            "data": {CONFIG_KEY: yaml.safe_dump([entry], sort_keys=False)},
        }  # fmt: skip

    async def _publish(self) -> None:
        body = self._configmap()
        try:
            await self.client.create(CONFIGMAP, body, NAMESPACE)
        except Conflict:
            found = await self.client.get(CONFIGMAP, CONFIGMAP_NAME, NAMESPACE)
            await self.client.replace(CONFIGMAP, {**found, "data": body["data"]})

    async def run(self, stop: asyncio.Event) -> None:
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl())
            await site.start()
            address: Any = runner.addresses[0]
            self.url = f"https://{self.host}:{address[1]}"
            log.info("placement extender at %s%s", self.url, PATH)
            published = False
            while not stop.is_set():
                wanted = self._wanted()
                try:
                    if wanted and not published:
                        await self._publish()
                    elif published and not wanted:
                        await self._withdraw()
                    published = wanted
                except _API_ERRORS as exc:
                    log.warning("placement extender not (un)announced: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RECHECK_SECONDS)
        finally:
            with contextlib.suppress(Exception):
                await self._withdraw()
            await runner.cleanup()

    def _wanted(self) -> bool:
        """Announced only while a Partial or Full policy exists: without one, the scheduler
        need not ask anyone."""
        for policy in self.balancer.informer(BALANCE_POLICY).items():
            spec = policy.get("spec") or {}
            if spec.get("automationLevel") in ("Partial", "Full") and not spec.get("suspend"):
                return True
        return False

    async def _withdraw(self) -> None:
        found = await self.client.find(CONFIGMAP, CONFIGMAP_NAME, NAMESPACE)
        urls = json.dumps((found or {}).get("data") or {})
        if found is not None and self.url and self.url in urls:
            with contextlib.suppress(NotFound):
                await self.client.delete(CONFIGMAP, CONFIGMAP_NAME, NAMESPACE)


__all__ = ["CONFIGMAP_NAME", "NAMESPACE", "PlacementExtender"]
