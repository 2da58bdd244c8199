"""The one Kubernetes client VMO's controllers, node agent and CLI use (async, aiohttp).

It speaks only the Kubernetes API, so what uses it runs the same against VMO's embedded server
and a real cluster. Errors carry the server's ``Status``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

log = logging.getLogger(__name__)

JSON = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """API coordinates of one kind."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str = "", name: str = "", subresource: str = "") -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


NAMESPACE = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
NODE = Resource("", "v1", "nodes", "Node", namespaced=False)
SERVICE = Resource("", "v1", "services", "Service")
ENDPOINTS = Resource("", "v1", "endpoints", "Endpoints")
EVENT = Resource("", "v1", "events", "Event")
SECRET = Resource("", "v1", "secrets", "Secret")
CONFIGMAP = Resource("", "v1", "configmaps", "ConfigMap")
LEASE = Resource("coordination.k8s.io", "v1", "leases", "Lease")
ROLE = Resource("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLEBINDING = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
PVC = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
PV = Resource("", "v1", "persistentvolumes", "PersistentVolume", namespaced=False)
STORAGECLASS = Resource("storage.k8s.io", "v1", "storageclasses", "StorageClass", namespaced=False)
VM = Resource("kubevirt.io", "v1", "virtualmachines", "VirtualMachine")
VMI = Resource("kubevirt.io", "v1", "virtualmachineinstances", "VirtualMachineInstance")
VMIM = Resource(
    "kubevirt.io", "v1", "virtualmachineinstancemigrations", "VirtualMachineInstanceMigration"
)
KUBEVIRT = Resource("kubevirt.io", "v1", "kubevirts", "KubeVirt")
VMSNAPSHOT = Resource(
    "snapshot.kubevirt.io", "v1beta1", "virtualmachinesnapshots", "VirtualMachineSnapshot"
)
VMSNAPSHOTCONTENT = Resource(
    "snapshot.kubevirt.io",
    "v1beta1",
    "virtualmachinesnapshotcontents",
    "VirtualMachineSnapshotContent",
)
VMRESTORE = Resource(
    "snapshot.kubevirt.io", "v1beta1", "virtualmachinerestores", "VirtualMachineRestore"
)
VMCLONE = Resource("clone.kubevirt.io", "v1beta1", "virtualmachineclones", "VirtualMachineClone")
VMEXPORT = Resource("export.kubevirt.io", "v1", "virtualmachineexports", "VirtualMachineExport")
CRD = Resource(
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    "CustomResourceDefinition",
    namespaced=False,
)
VMBACKUP = Resource(
    "backup.kubevirt.io", "v1alpha1", "virtualmachinebackups", "VirtualMachineBackup"
)
VMBACKUPTRACKER = Resource(
    "backup.kubevirt.io",
    "v1alpha1",
    "virtualmachinebackuptrackers",
    "VirtualMachineBackupTracker",
)
DATAVOLUME = Resource("cdi.kubevirt.io", "v1beta1", "datavolumes", "DataVolume")
NAD = Resource(
    "k8s.cni.cncf.io", "v1", "network-attachment-definitions", "NetworkAttachmentDefinition"
)
MULTI_NETWORK_POLICY = Resource(
    "k8s.cni.cncf.io", "v1beta1", "multi-networkpolicies", "MultiNetworkPolicy"
)
NETWORK_POLICY = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
INSTANCETYPE = Resource(
    "instancetype.kubevirt.io",
    "v1beta1",
    "virtualmachineinstancetypes",
    "VirtualMachineInstancetype",
)
CLUSTER_INSTANCETYPE = Resource(
    "instancetype.kubevirt.io",
    "v1beta1",
    "virtualmachineclusterinstancetypes",
    "VirtualMachineClusterInstancetype",
    namespaced=False,
)
PREFERENCE = Resource(
    "instancetype.kubevirt.io", "v1beta1", "virtualmachinepreferences", "VirtualMachinePreference"
)
CLUSTER_PREFERENCE = Resource(
    "instancetype.kubevirt.io",
    "v1beta1",
    "virtualmachineclusterpreferences",
    "VirtualMachineClusterPreference",
    namespaced=False,
)


WebSocket = aiohttp.ClientWebSocketResponse
WSMsgType = aiohttp.WSMsgType

# What a request may raise when the connection, not the server, failed: worth retrying.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError, OSError, TimeoutError)


class ApiStatusError(Exception):
    """The server refused a request; ``status`` is its Kubernetes ``Status`` body."""

    def __init__(self, code: int, status: JSON, method: str, path: str) -> None:
        self.code = code
        self.status = status
        self.reason = str(status.get("reason", ""))
        self.method = method
        self.path = path
        super().__init__(f"{method} {path}: {code} {self.reason}: {status.get('message', '')}")


class NotFound(ApiStatusError):
    pass


class Conflict(ApiStatusError):
    """409: a stale resourceVersion (reason Conflict) or an existing name (AlreadyExists)."""


class Gone(ApiStatusError):
    pass


def _error(code: int, status: JSON, method: str, path: str) -> ApiStatusError:
    cls = {404: NotFound, 409: Conflict, 410: Gone}.get(code, ApiStatusError)
    return cls(code, status, method, path)


@dataclass(frozen=True)
class Credentials:
    server: str
    token: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    namespace: str = "default"


def load_kubeconfig(path: Path | str | None = None, *, context: str = "") -> Credentials:
    """Reads a kubeconfig (``$KUBECONFIG`` or ``~/.kube/config`` when no path is given)."""
    chosen = Path(path or os.environ.get("KUBECONFIG") or Path.home() / ".kube" / "config")
    config = yaml.safe_load(chosen.read_text())
    ctx_name = context or config.get("current-context", "")
    ctx = next(c["context"] for c in config["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == ctx["user"])
    ca_file = cluster.get("certificate-authority", "")
    if cluster.get("certificate-authority-data"):
        ca_file = _materialise(base64.b64decode(cluster["certificate-authority-data"]), ".crt")
    cert_file, key_file = user.get("client-certificate", ""), user.get("client-key", "")
    if user.get("client-certificate-data"):
        cert_file = _materialise(base64.b64decode(user["client-certificate-data"]), ".crt")
        key_file = _materialise(base64.b64decode(user["client-key-data"]), ".key")
    token = user.get("token", "")
    if user.get("exec"):
        token = exec_credential(user["exec"])
    return Credentials(
        server=cluster["server"].rstrip("/"),
        token=token,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        namespace=ctx.get("namespace", "default"),
    )


class ExecCredentialError(Exception):
    """A kubeconfig's exec credential plugin failed; the message says how."""


def exec_credential(spec: dict[str, Any]) -> str:
    """The token a kubeconfig's ``exec`` plugin prints (``client.authentication.k8s.io/v1``
    ExecCredential on stdout), as kubectl runs it: argv from ``command`` and ``args``, ``env``
    added, stdin and stderr the user's (a login prompt reaches them)."""
    argv = [str(spec["command"]), *(str(a) for a in spec.get("args") or [])]
    env = {**os.environ, **{str(e["name"]): str(e["value"]) for e in spec.get("env") or []}}
    env["KUBERNETES_EXEC_INFO"] = json.dumps(
        {"apiVersion": spec.get("apiVersion", "client.authentication.k8s.io/v1"),
         "kind": "ExecCredential", "spec": {"interactive": sys.stdin.isatty()}}
    )  # fmt: skip
    try:
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExecCredentialError(f"exec plugin {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise ExecCredentialError(f"exec plugin {argv[0]} exited with {done.returncode}")
    try:
        token = json.loads(done.stdout)["status"]["token"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ExecCredentialError(f"exec plugin {argv[0]} printed no ExecCredential token") from exc
    return str(token)


def _materialise(data: bytes, suffix: str) -> str:
    fd, name = tempfile.mkstemp(prefix="vmo-kubeconfig-", suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return name


class Client:
    """Async Kubernetes API client. Use as ``async with Client(creds) as c: ...``."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, path: Path | str | None = None) -> Client:
        return cls(load_kubeconfig(path))

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.creds.server.startswith("https"):
            return False
        ctx = ssl.create_default_context(cafile=self.creds.ca_file or None)
        if self.creds.cert_file:
            ctx.load_cert_chain(self.creds.cert_file, self.creds.key_file)
        return ctx

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.creds.token}"} if self.creds.token else {}
            self._session = aiohttp.ClientSession(
                self.creds.server,
                headers=headers,
                # every informer holds one connection for its watch: the embedded engine runs
                # dozens (controllers and node services share this client), and a request that
                # waits for a free connection behind them would wait for ever
                connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=512),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- raw ---------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(
            method, path, data=data, params=params, headers=headers
        ) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                try:
                    status = json.loads(raw)
                except ValueError:
                    status = {"message": raw.decode(errors="replace")}
                raise _error(resp.status, status, method, path)
            return json.loads(raw) if raw else None

    # --- verbs -------------------------------------------------------------------------------

    async def get(self, res: Resource, name: str, namespace: str = "") -> JSON:
        result: JSON = await self.request("GET", res.path(namespace, name))
        return result

    async def find(self, res: Resource, name: str, namespace: str = "") -> JSON | None:
        try:
            return await self.get(res, name, namespace)
        except NotFound:
            return None

    async def list(
        self,
        res: Resource,
        namespace: str = "",
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> tuple[list[JSON], str]:
        """All items (following ``continue``) and the list's resourceVersion."""
        params = {"limit": "500"}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        items: list[JSON] = []
        while True:
            body = await self.request("GET", res.path(namespace), params=params)
            items += body.get("items") or []
            token = body.get("metadata", {}).get("continue")
            if not token:
                return items, str(body.get("metadata", {}).get("resourceVersion", ""))
            params["continue"] = token

    async def create(self, res: Resource, obj: JSON, namespace: str = "") -> JSON:
        ns = namespace or obj.get("metadata", {}).get("namespace", "")
        body = {"apiVersion": res.api_version, "kind": res.kind, **obj}
        result: JSON = await self.request("POST", res.path(ns), body)
        return result

    async def replace(self, res: Resource, obj: JSON, *, subresource: str = "") -> JSON:
        md = obj["metadata"]
        path = res.path(md.get("namespace", ""), md["name"], subresource)
        result: JSON = await self.request("PUT", path, obj)
        return result

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Any,
        namespace: str = "",
        *,
        patch_type: str = "merge",
        subresource: str = "",
    ) -> JSON:
        content_type = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }[patch_type]
        path = res.path(namespace, name, subresource)
        result: JSON = await self.request("PATCH", path, patch, content_type=content_type)
        return result

    async def patch_status(
        self, res: Resource, name: str, status: JSON, namespace: str = ""
    ) -> JSON:
        return await self.patch(res, name, {"status": status}, namespace, subresource="status")

    async def delete(
        self, res: Resource, name: str, namespace: str = "", *, propagation: str = "Background"
    ) -> JSON | None:
        try:
            result: JSON = await self.request(
                "DELETE", res.path(namespace, name), {"propagationPolicy": propagation}
            )
            return result
        except NotFound:
            return None

    # --- watch -------------------------------------------------------------------------------

    async def watch(
        self,
        res: Resource,
        namespace: str = "",
        *,
        resource_version: str = "",
        label_selector: str = "",
        field_selector: str = "",
        timeout: int = 300,
    ) -> AsyncIterator[tuple[str, JSON]]:
        """(event type, object) pairs until the server ends the stream; raises Gone on 410."""
        params = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout)}
        if resource_version:
            params["resourceVersion"] = resource_version
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        path = res.path(namespace)
        timeouts = aiohttp.ClientTimeout(total=None, sock_read=timeout + 30)
        async with self.session.get(path, params=params, timeout=timeouts) as resp:
            if resp.status >= 400:
                raise _error(resp.status, await resp.json(), "GET", path)
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR":
                    status = event["object"]
                    raise _error(int(status.get("code", 500)), status, "WATCH", path)
                yield event["type"], event["object"]

    # --- streams and health ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def websocket(
        self, path: str, *, protocols: tuple[str, ...] = ()
    ) -> AsyncIterator[WebSocket]:
        """A WebSocket to an API path (console, VNC, port-forward subresources), with this
        client's credentials; a refused upgrade raises the server's Status as ApiStatusError."""
        try:
            ws = await self.session.ws_connect(path, protocols=protocols, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            status = {"message": exc.message, "code": exc.status}
            raise _error(exc.status, status, "GET", path) from None
        try:
            yield ws
        finally:
            await ws.close()

    async def healthy(self) -> bool:
        """True when the server answers ``/readyz`` with 200 (within seconds: a probe must not
        hang on a server that accepts connections and never answers)."""
        try:
            async with self.session.get("/readyz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status == 200
        except TRANSIENT_ERRORS:
            return False
