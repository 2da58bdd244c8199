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

On a cluster, initial placement is a mutation instead: the same server answers a mutating
admission webhook for VMI creates (``/mutate-virtualmachineinstance``, AdmissionReview v1) with
a preferred node affinity (weight 100) for the node the policy scores best, unless the VMI
prefers nodes of its own; ``vmo balance render-webhook`` prints the
MutatingWebhookConfiguration. kube-apiserver must send a bearer token to it (its admission
kubeconfig), that may ``post`` that path.
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
MUTATE_PATH = "/mutate-virtualmachineinstance"
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
        self._mutate_auth = DelegatedAuth(client, path=MUTATE_PATH, verb="post")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 2**20)
        app.router.add_post(PATH, self._prioritize)
        app.router.add_post(MUTATE_PATH, self._mutate)
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

    async def _mutate(self, request: web.Request) -> web.Response:
        """A mutating admission webhook (AdmissionReview v1) for VMI creates: the cluster-mode
        form of initial placement. It never refuses: at worst it adds nothing."""
        refused = await refusal(request, self._mutate_auth)
        if refused is not None:
            return refused
        try:
            review = await request.json()
            ask = review["request"]
            uid = str(ask["uid"])
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"not an AdmissionReview: {exc}"}, status=400)
        answer: JSON = {"uid": uid, "allowed": True}
        vmi = ask.get("object") if ask.get("operation") == "CREATE" else None
        if isinstance(vmi, dict) and vmi.get("kind") == "VirtualMachineInstance":
            vmi.setdefault("metadata", {}).setdefault("namespace", ask.get("namespace", ""))
            patch = affinity_patch(vmi, self.balancer.placement_affinity(vmi))
            if patch:
                answer["patchType"] = "JSONPatch"
                answer["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        return web.json_response(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": answer}
        )

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


def affinity_patch(vmi: JSON, preference: JSON | None) -> list[JSON]:
    """The JSONPatch that adds ``preference`` to the VMI's preferred node affinity (none when
    there is none, or the VMI prefers a node already: the user's own preference stands)."""
    if preference is None:
        return []
    spec = vmi.get("spec") or {}
    affinity = dict(spec.get("affinity") or {})
    node = dict(affinity.get("nodeAffinity") or {})
    preferred = list(node.get("preferredDuringSchedulingIgnoredDuringExecution") or [])
    if preferred:
        return []
    node["preferredDuringSchedulingIgnoredDuringExecution"] = [preference]
    affinity["nodeAffinity"] = node
    op = "replace" if "affinity" in spec else "add"
    return [{"op": op, "path": "/spec/affinity", "value": affinity}]


def webhook_configuration(
    *, ca_bundle: bytes, url: str = "", service: tuple[str, str] | None = None, port: int = 443
) -> JSON:
    """The MutatingWebhookConfiguration a cluster needs for the placement mutation: VMI creates
    go to ``url`` or the controllers' Service ``(namespace, name)``; failurePolicy Ignore (a
    placement hint must never block a VM), no side effects, two seconds."""
    client_config: JSON = {"caBundle": base64.b64encode(ca_bundle).decode()}
    if service is not None:
        client_config["service"] = {"namespace": service[0], "name": service[1],
                                    "path": MUTATE_PATH, "port": port}  # fmt: skip
    else:
        client_config["url"] = url.rstrip("/") + MUTATE_PATH
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "vmo-balance-placement"},
        "webhooks": [
            {
                "name": "placement.balance.vmo.dev",
                "admissionReviewVersions": ["v1"],
                "clientConfig": client_config,
                "rules": [
                    {
                        "apiGroups": ["kubevirt.io"],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["virtualmachineinstances"],
                        "scope": "Namespaced",
                    }
                ],
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "timeoutSeconds": 2,
                "reinvocationPolicy": "Never",
            }
        ],
    }


__all__ = [
    "CONFIGMAP_NAME",
    "MUTATE_PATH",
    "NAMESPACE",
    "PlacementExtender",
    "affinity_patch",
    "webhook_configuration",
]
