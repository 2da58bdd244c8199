"""Assembly of the embedded API server: state directory, store, kinds, controllers, TLS listener."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from vmo.api.core import core_resource_types
from vmo.api.crd import crd_resource_types
from vmo.api.kubevirt import kubevirt_resource_types
from vmo.api.netpol import netpol_resource_types
from vmo.api.pods import pod
from vmo.api.storage import storage_types
from vmo.api.types import JSON, ResourceType
from vmo.api.volumesnapshot import volume_snapshot_types
from vmo.apiserver import bootstrap_roles, kubevirt_api, pki, rbac, resource_metrics
from vmo.apiserver import objects as ob
from vmo.apiserver import store as st
from vmo.apiserver.allocators import MacPool, ServiceAllocator
from vmo.apiserver.audit import AuditLog
from vmo.apiserver.auth import Authenticator, ServiceAccountTokens, TokenFile
from vmo.apiserver.authn_reviews import authentication_reviews
from vmo.apiserver.authz import RbacAuthorization, access_reviews, token_request_handler
from vmo.apiserver.http import ApiHandlers, ExtraGroup
from vmo.apiserver.kubevirt_api import KubeVirtApi
from vmo.apiserver.launcher_pods import LOG_DISCOVERY, LauncherPods
from vmo.apiserver.lifecycle import Lifecycle
from vmo.apiserver.metrics import ApiMetrics
from vmo.apiserver.migrations import MigrationAdmission
from vmo.apiserver.oidc import OIDCAuthenticator, OIDCConfig
from vmo.apiserver.registry import Registry
from vmo.apiserver.resource_metrics import ResourceMetrics
from vmo.apiserver.storage_admission import StorageAdmission
from vmo.apiserver.vm_access import VMAccessAdmission
from vmo.apiserver.vm_quota import VMQuotaAdmission
from vmo.apiserver.watch import WatchHub
from vmo.home import StateDir, write_private

log = logging.getLogger(__name__)

ADMIN_USER = "vmo-admin"
ADMIN_GROUPS = ("system:masters",)
ENGINE_USER = "system:vmo-engine"
BOOT_NAMESPACES = ("default", "kube-system", "kube-public", "virtual-machines")
HISTORY_KEEP = 50_000
COMPACT_EVERY = 60.0


def builtin_types() -> list[ResourceType]:
    return [
        *core_resource_types(),
        pod(),
        *storage_types(),
        *kubevirt_resource_types(),
        *volume_snapshot_types(),
        *netpol_resource_types(),
    ]


def kubeconfig(
    *, server: str, ca_pem: str, user: str, token: str, namespace: str = "default"
) -> JSON:
    import base64

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "vmo",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem.encode()).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": "vmo", "context": {"cluster": "vmo", "user": user, "namespace": namespace}}
        ],
        "current-context": "vmo",
        "preferences": {},
    }


class ApiServer:
    """One embedded API server bound to a state directory."""

    def __init__(
        self,
        state: StateDir,
        *,
        host: str = "127.0.0.1",
        port: int = 6443,
        audit: AuditLog | None = None,
        oidc: OIDCConfig | None = None,
        metrics: bool = True,
    ) -> None:
        """``audit``: where and how requests are audited (default: every request at Metadata
        level into the home's ``audit`` directory); ``oidc``: an OpenID Connect issuer whose ID
        tokens are accepted (kube-apiserver's ``--oidc-*``)."""
        self.state = state
        self.host = host
        self.port = port
        state.prepare()
        self.audit = audit if audit is not None else AuditLog(state.root / "audit")
        self.oidc = OIDCAuthenticator(oidc) if oidc is not None else None
        self.ca = pki.ensure_ca(state.pki)
        self.serving = pki.ensure_serving(self.ca, state.pki)
        pki.ensure_metrics_serving(self.ca, state.pki)
        self.store = st.Store(state.db)
        self.hub = WatchHub()
        self.registry = Registry(builtin_types())
        self.service = ob.ObjectService(self.store, self.hub, hooks=_kind_hooks())
        self.tokens = TokenFile(state.tokens)
        self.sa_tokens = ServiceAccountTokens(state.sa_key)
        self.authz = RbacAuthorization(self.service, self.registry)
        self.service.admission.append(self.authz.admit_rbac_change)
        # who may name which VM is decided before anything about the VM is looked at
        vm_access = VMAccessAdmission(self.service, self.registry, self.authz)
        self.service.admission.append(vm_access.admit)
        self.service.admission.append(vm_access.admit_policy)
        self.service.admission.append(VMQuotaAdmission(self.service, self.registry).admit)
        mac_pool = MacPool(self.service, self.registry)
        self.hub.listen(mac_pool.observe)
        self.service.admission.append(mac_pool.admit)
        self.service.admission.append(ServiceAllocator(self.service, self.registry).admit)
        self.service.admission.append(MigrationAdmission(self.service, self.registry).admit)
        self.service.admission.append(StorageAdmission(self.service, self.registry).admit)
        self.lifecycle = Lifecycle(
            self.service,
            self.registry,
            crd_types=crd_resource_types,
            aggregate=rbac.aggregate_cluster_roles,
        )
        self.handlers = ApiHandlers(
            self.registry,
            self.service,
            Authenticator(self.tokens, self.sa_tokens, self._service_account_uid, issuer=self.oidc),
            self.authz,
            audit=self.audit,
            metrics=ApiMetrics(self.store, self.hub, self.registry, str(state.db))
            if metrics
            else None,
        )
        self.handlers.virtual.update(access_reviews(self.authz))
        self.handlers.virtual.update(authentication_reviews(self.handlers.authenticator))
        token_handler = token_request_handler(self.service, self.registry, self.sa_tokens)
        self.handlers.subresources[("", "v1", "serviceaccounts", "token")] = token_handler
        self.handlers.extra_discovery[("", "v1", "serviceaccounts")] = [
            ("token", "TokenRequest", ["create"])
        ]
        pods = LauncherPods(self.service, self.registry, frozenset({ENGINE_USER, ob.SYSTEM.name}))
        self.service.admission.append(pods.admit)
        self.handlers.subresources[("", "v1", "pods", "log")] = pods.log
        self.handlers.extra_discovery[("", "v1", "pods")] = LOG_DISCOVERY
        virt_api = KubeVirtApi(self.service, self.registry)
        self.handlers.extra_groups[kubevirt_api.GROUP] = ExtraGroup(
            kubevirt_api.VERSION, kubevirt_api.resource_list(), virt_api.handle
        )
        # metrics.k8s.io (kubectl top) from the Prometheus `vmo up` started, as metrics-server
        self.resource_metrics = ResourceMetrics(self.service, self.registry, state)
        self.handlers.extra_groups[resource_metrics.GROUP] = ExtraGroup(
            resource_metrics.VERSION, resource_metrics.resource_list(), self.resource_metrics.handle
        )
        self._runner: web.AppRunner | None = None
        self._compactor: asyncio.Task[None] | None = None

    def _service_account_uid(self, namespace: str, name: str) -> str | None:
        rt = self.registry.lookup("", "v1", "serviceaccounts")
        assert rt is not None
        sa = self.service.find(rt, namespace, name)
        return str(sa["metadata"]["uid"]) if sa else None

    # --- bootstrap -----------------------------------------------------------------------------

    def bootstrap(self) -> str | None:
        """Creates what a fresh server needs; returns the admin token when it was just made."""
        self._ensure_all(
            self._rt("", "namespaces"), ({"metadata": {"name": n}} for n in BOOT_NAMESPACES)
        )
        self._ensure_all(
            self._rt(rbac.RBAC_GROUP, "clusterroles"), bootstrap_roles.bootstrap_cluster_roles()
        )
        self._ensure_all(
            self._rt(rbac.RBAC_GROUP, "clusterrolebindings"),
            bootstrap_roles.bootstrap_cluster_role_bindings(),
        )
        if self.tokens.path.exists() and self.state.kubeconfig.exists():
            return None
        return self.tokens.add(ADMIN_USER, ADMIN_GROUPS)

    def _rt(self, group: str, plural: str) -> ResourceType:
        for rt in self.registry.storage_types():
            if rt.group == group and rt.plural == plural:
                return rt
        raise LookupError(f"{plural}.{group} is not registered")

    def _ensure_all(self, rt: ResourceType, objects: Iterable[JSON]) -> None:
        for obj in objects:
            name = obj["metadata"]["name"]
            if self.service.find(rt, "", name) is None:
                self.service.create(rt, "", {"apiVersion": rt.api_version, "kind": rt.kind, **obj})

    # --- serving -------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.serving.cert, self.serving.key)
        ctx.load_verify_locations(self.ca.cert)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # client certificates authenticate when presented
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def start(self) -> str:
        """Binds, starts controllers and returns the server URL."""
        self.lifecycle.prime()
        self.audit.open()
        if self.oidc is not None:
            await self.oidc.start()
        admin_token = self.bootstrap()
        self.lifecycle.start()
        self._runner = web.AppRunner(self.handlers.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=self.ssl_context(), backlog=512
        )
        await site.start()
        sockname: Any = self._runner.addresses[0]
        url = f"https://{self.host}:{sockname[1]}"
        if admin_token is not None:
            self.write_kubeconfig(
                self.state.kubeconfig, url=url, user=ADMIN_USER, token=admin_token
            )
        else:
            self._retarget_kubeconfig(self.state.kubeconfig, url)
        if self.state.engine_kubeconfig.exists():
            self._retarget_kubeconfig(self.state.engine_kubeconfig, url)
        else:
            token = self.tokens.add(ENGINE_USER, ADMIN_GROUPS)
            self.write_kubeconfig(
                self.state.engine_kubeconfig, url=url, user=ENGINE_USER, token=token
            )
        # written last: its presence tells `vmo up -d` and scripts that the kubeconfigs are ready
        write_private(self.state.url_file, url + "\n")
        self._compactor = asyncio.get_running_loop().create_task(self._compact_forever())
        log.info("VMO API server listening on %s", url)
        return url

    def write_kubeconfig(
        self, path: Path, *, url: str, user: str, token: str, namespace: str = "default"
    ) -> None:
        config = kubeconfig(
            server=url, ca_pem=self.ca.cert.read_text(), user=user, token=token, namespace=namespace
        )
        write_private(path, yaml.safe_dump(config, sort_keys=False))

    def _retarget_kubeconfig(self, path: Path, url: str) -> None:
        config = yaml.safe_load(path.read_text())
        for cluster in config.get("clusters", []):
            cluster["cluster"]["server"] = url
        write_private(path, yaml.safe_dump(config, sort_keys=False))

    async def _compact_forever(self) -> None:
        while True:
            await asyncio.sleep(COMPACT_EVERY)
            self.store.compact(keep=HISTORY_KEEP)

    async def stop(self) -> None:
        if self._compactor is not None:
            self._compactor.cancel()
        self.hub.close_all()
        await self.lifecycle.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self.audit.close()
        if self.oidc is not None:
            await self.oidc.stop()
        self.store.close()


def _namespace_on_create(obj: JSON) -> None:
    spec = obj.setdefault("spec", {})
    finalizers = spec.setdefault("finalizers", [])
    if ob.NAMESPACE_FINALIZER not in finalizers:
        finalizers.append(ob.NAMESPACE_FINALIZER)
    obj["status"] = {"phase": "Active"}
    labels = obj["metadata"].setdefault("labels", {})
    labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]


def _namespace_pending(obj: JSON) -> bool:
    return ob.NAMESPACE_FINALIZER in (obj.get("spec", {}).get("finalizers") or [])


def _crd_on_create(obj: JSON) -> None:
    finalizers = obj["metadata"].setdefault("finalizers", [])
    if "customresourcecleanup.apiextensions.k8s.io" not in finalizers:
        finalizers.append("customresourcecleanup.apiextensions.k8s.io")


def _kind_hooks() -> dict[tuple[str, str], ob.KindHooks]:
    return {
        ("", "Namespace"): ob.KindHooks(
            on_create=_namespace_on_create, pending_deletion=_namespace_pending
        ),
        ("apiextensions.k8s.io", "CustomResourceDefinition"): ob.KindHooks(
            on_create=_crd_on_create
        ),
    }
