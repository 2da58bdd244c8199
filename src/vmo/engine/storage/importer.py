"""CDI DataVolume imports on one node: sources, phases, conditions and the level-based controller.

What a DataVolume asks for becomes an ``ImportPlan`` (a pure function of its spec); the
``DataVolumeController`` claims unassigned DataVolumes for its node (annotation
``vmo.dev/storage-node``, set with a resourceVersion-guarded patch so one node wins), runs one
transfer per DataVolume into the node's ``Pool`` and reports CDI's status: ``phase``,
``progress`` ("N.NN%", "100.0%" when done), ``claimName``, ``restartCount`` and the ``Bound``,
``Ready`` and ``Running`` conditions with upstream's reasons.

Sources: ``http`` (HTTP(S), optional ``certConfigMap`` CA bundle and ``secretRef`` basic auth with
CDI's keys ``accessKeyId``/``secretKey``), ``upload`` (data arrives through ``upload.py``),
``blank``, ``pvc`` (a copy of another volume of this node's pool, any namespace). VMO extension:
an ``http.url`` with the ``file://`` scheme imports a local file, only from under the import
directory (``$VMO_HOME/images`` by default, which only the host's administrator fills; symlinks
are resolved before the check); CDI itself would reject such a URL, so a manifest using it is
plainly marked as embedded-only. Other CDI sources (registry, s3, gcs, imageio, vddk) are refused
as unsupported, so nothing else is fetched.

The importer runs on the host, where CDI's runs in a pod: every URL an ``http`` import fetches,
each redirect included (followed here, at most ``MAX_REDIRECTS``), is admitted by ``urlpolicy``
first, after DNS resolution and pinned to the addresses checked. By default nothing on loopback,
link-local or any of this host's own addresses is fetched; an administrator allows hosts in the
ConfigMap ``vmo-system/vmo-import-policy`` (key ``allowedHosts``), read at each import. A refusal
fails the DataVolume at once: ``Running`` False with reason ``ImportRefused`` and a message
naming the URL and why, and a Warning Event ``ImportFailed``; nothing is written to the pool.

Where CDI retries a failing transfer forever, VMO retries ``RetryPolicy.attempts`` times, keeping
the phase and the error in the ``Running`` condition meanwhile, then ends in ``Failed``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import aiohttp
from yarl import URL

from vmo.api.annotations import CLONE_MODE, STORAGE_NODE
from vmo.api.quantity import QuantityError, parse_quantity
from vmo.client import CONFIGMAP, DATAVOLUME, NODE, SECRET, Client, Conflict, NotFound
from vmo.engine.storage.claims import Provisioner
from vmo.engine.storage.pool import Pool, PoolError, VolumeInfo, VolumeNotFound
from vmo.engine.storage.urlpolicy import (
    AllowList,
    ImportRefused,
    PolicyUnavailable,
    Resolve,
    UrlGuard,
    load_allowed_hosts,
    system_resolve,
)
from vmo.runtime import Controller, EventRecorder, Result, Watch, merge_conditions, split_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]
# "full": a DataVolume made from a snapshot is an independent copy, not a linked clone
_CHUNK = 1 << 20
_PROGRESS_INTERVAL = 0.5
# Go's http.Client (CDI's importer) stops after 10 redirects
MAX_REDIRECTS = 10
# CDI's DataVolume import controller, as its Events name it
IMPORT_COMPONENT = "datavolume-import-controller"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class DataVolumePhase(StrEnum):
    """The DataVolume phases VMO's embedded storage passes through (CDI has 24)."""

    PENDING = "Pending"
    IMPORT_SCHEDULED = "ImportScheduled"
    IMPORT_IN_PROGRESS = "ImportInProgress"
    CLONE_SCHEDULED = "CloneScheduled"
    CLONE_IN_PROGRESS = "CloneInProgress"
    UPLOAD_SCHEDULED = "UploadScheduled"
    UPLOAD_READY = "UploadReady"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class SourceKind(StrEnum):
    HTTP = "http"
    FILE = "file"
    UPLOAD = "upload"
    BLANK = "blank"
    PVC = "pvc"
    SNAPSHOT = "snapshot"


class ImportSpecError(Exception):
    """A DataVolume this node cannot import as written; retrying will not help."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field_path, self.message = field_path, message
        super().__init__(f"{field_path}: {message}")


class TransferError(Exception):
    """The source could not be read (unreachable, refused, not found); worth retrying."""


@dataclass(frozen=True)
class ImportPlan:
    kind: SourceKind
    size: int | None = None
    url: str = ""
    path: Path | None = None
    source_pvc: tuple[str, str] | None = None
    cert_config_map: str = ""
    secret_ref: str = ""
    insecure: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    delay: float = 2.0
    factor: float = 2.0

    def backoff(self, failures: int) -> float:
        return self.delay * self.factor ** (failures - 1)


# (scheduled phase, in-progress phase, completion message) per source kind, as CDI names them
_PHASES: dict[SourceKind, tuple[DataVolumePhase, DataVolumePhase, str]] = {
    SourceKind.HTTP: (
        DataVolumePhase.IMPORT_SCHEDULED,
        DataVolumePhase.IMPORT_IN_PROGRESS,
        "Import Complete",
    ),
    SourceKind.FILE: (
        DataVolumePhase.IMPORT_SCHEDULED,
        DataVolumePhase.IMPORT_IN_PROGRESS,
        "Import Complete",
    ),
    SourceKind.BLANK: (
        DataVolumePhase.IMPORT_SCHEDULED,
        DataVolumePhase.IMPORT_IN_PROGRESS,
        "Import Complete",
    ),
    SourceKind.PVC: (
        DataVolumePhase.CLONE_SCHEDULED,
        DataVolumePhase.CLONE_IN_PROGRESS,
        "Clone Complete",
    ),
    SourceKind.SNAPSHOT: (
        DataVolumePhase.CLONE_SCHEDULED,
        DataVolumePhase.CLONE_IN_PROGRESS,
        "Clone Complete",
    ),
    SourceKind.UPLOAD: (
        DataVolumePhase.UPLOAD_SCHEDULED,
        DataVolumePhase.IMPORT_IN_PROGRESS,
        "Upload Complete",
    ),
}


# --- the plan (pure) --------------------------------------------------------------------------


def requested_size(dv: JSON) -> int | None:
    """``spec.storage`` (or ``spec.pvc``) ``.resources.requests.storage`` in bytes, if set."""
    spec = dv.get("spec") or {}
    for key in ("storage", "pvc"):
        value = (((spec.get(key) or {}).get("resources") or {}).get("requests") or {}).get(
            "storage"
        )
        if value is None:
            continue
        try:
            return int(parse_quantity(value))
        except QuantityError as exc:
            raise ImportSpecError(f"spec.{key}.resources.requests.storage", str(exc)) from exc
    return None


def import_plan(dv: JSON, *, import_dir: Path) -> ImportPlan:
    """What to do for a DataVolume; raises ``ImportSpecError`` naming the field at fault."""
    spec = dv.get("spec") or {}
    source = spec.get("source") or {}
    size = requested_size(dv)
    if spec.get("sourceRef"):
        raise ImportSpecError("spec.sourceRef", "DataSource references are not supported yet")
    kinds = [k for k in source if source[k] is not None]
    if len(kinds) != 1:
        raise ImportSpecError("spec.source", "exactly one source is required")
    kind = kinds[0]
    body = source[kind] or {}
    if kind == "http":
        return _http_plan(body, size, import_dir)
    if kind == "blank":
        if size is None:
            raise ImportSpecError(
                "spec.storage.resources.requests.storage", "a blank DataVolume needs a size"
            )
        return ImportPlan(SourceKind.BLANK, size)
    if kind == "upload":
        return ImportPlan(SourceKind.UPLOAD, size)
    if kind == "pvc":
        namespace = str(body.get("namespace") or dv["metadata"].get("namespace", ""))
        return ImportPlan(SourceKind.PVC, size, source_pvc=(namespace, str(body.get("name", ""))))
    if kind == "snapshot":
        namespace = str(body.get("namespace") or dv["metadata"].get("namespace", ""))
        if not body.get("name"):
            raise ImportSpecError("spec.source.snapshot.name", "the snapshot's name is required")
        return ImportPlan(SourceKind.SNAPSHOT, size, source_pvc=(namespace, str(body["name"])))
    raise ImportSpecError(f"spec.source.{kind}", "this source is not supported by VMO's storage")


def _http_plan(body: JSON, size: int | None, import_dir: Path) -> ImportPlan:
    url = str(body.get("url", ""))
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return ImportPlan(SourceKind.FILE, size, url=url, path=_local_path(parsed.path, import_dir))
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ImportSpecError("spec.source.http.url", f"not an http(s) or file URL: {url!r}")
    return ImportPlan(
        SourceKind.HTTP,
        size,
        url=url,
        cert_config_map=str(body.get("certConfigMap") or ""),
        secret_ref=str(body.get("secretRef") or ""),
        insecure=bool(body.get("insecureSkipVerify")),
    )


def _local_path(raw: str, import_dir: Path) -> Path:
    path = Path(unquote(raw)).resolve()
    allowed = import_dir.resolve()
    if not path.is_relative_to(allowed):
        raise ImportSpecError(
            "spec.source.http.url", f"file:// imports must come from under {allowed}, not {path}"
        )
    return path


# --- status (pure) ----------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def percent(value: float) -> str:
    """CDI's progress string for a transfer under way."""
    return f"{value:.2f}%"


def _condition(ctype: str, status: bool, reason: str = "", message: str = "") -> JSON:
    return {
        "type": ctype,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
    }


def dv_status(
    phase: DataVolumePhase,
    claim: str,
    *,
    progress: str = "N/A",
    restarts: int = 0,
    running: tuple[bool, str, str] = (False, "", ""),
) -> JSON:
    """A DataVolume status with CDI's three conditions (timestamps added on write)."""
    # the claim (the pool volume's name) is bound to this node once the node took the DataVolume
    bound = (
        _condition("Bound", True, "Bound", f"PVC {claim} Bound")
        if phase is not DataVolumePhase.PENDING
        else _condition("Bound", False, "NotFound", "No PVC found")
    )
    ready = phase is DataVolumePhase.SUCCEEDED
    return {
        "phase": str(phase),
        "progress": progress,
        "claimName": claim,
        "restartCount": restarts,
        "conditions": [
            bound,
            _condition("Ready", ready, "TransferRunning" if running[0] else ""),
            _condition("Running", *running),
        ],
    }


def in_progress_status(phase: DataVolumePhase, claim: str, value: float, restarts: int) -> JSON:
    return dv_status(
        phase,
        claim,
        progress=percent(value),
        restarts=restarts,
        running=(True, "Pod is running", ""),
    )


def error_status(
    phase: DataVolumePhase, claim: str, message: str, *, restarts: int, progress: str = "N/A"
) -> JSON:
    return dv_status(
        phase, claim, progress=progress, restarts=restarts, running=(False, "Error", message)
    )


def refused_status(claim: str, message: str, restarts: int = 0) -> JSON:
    """Failed because the import policy refused a URL (``ImportRefused``, VMO's reason)."""
    return dv_status(
        DataVolumePhase.FAILED, claim, restarts=restarts, running=(False, "ImportRefused", message)
    )


def succeeded_status(claim: str, message: str, restarts: int = 0) -> JSON:
    return dv_status(
        DataVolumePhase.SUCCEEDED,
        claim,
        progress="100.0%",
        restarts=restarts,
        running=(False, "Completed", message),
    )


def phases_for(kind: SourceKind) -> tuple[DataVolumePhase, DataVolumePhase, str]:
    return _PHASES[kind]


# --- HTTP source ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpAccess:
    """How to reach an HTTP source: TLS trust, basic-auth credentials, the hosts the
    administrator allows besides the default policy, and how host names are resolved."""

    ssl: ssl.SSLContext | bool = True
    # the Authorization header's value (basic auth from the secretRef)
    authorization: str | None = None
    allowed: AllowList = field(default_factory=AllowList)
    resolve: Resolve = system_resolve


async def http_access(client: Client, namespace: str, plan: ImportPlan) -> HttpAccess:
    """Reads the CA bundle ConfigMap and credentials Secret a plan names, and the import policy."""
    context: ssl.SSLContext | bool = True
    if plan.insecure:
        context = False
    elif plan.cert_config_map:
        cm = await client.get(CONFIGMAP, plan.cert_config_map, namespace)
        context = ssl.create_default_context(cadata="\n".join((cm.get("data") or {}).values()))
    authorization = None
    if plan.secret_ref:
        secret = await client.get(SECRET, plan.secret_ref, namespace)
        data = secret.get("data") or {}
        user = base64.b64decode(data.get("accessKeyId", "")).decode()
        password = base64.b64decode(data.get("secretKey", "")).decode()
        try:
            authorization = aiohttp.encode_basic_auth(user, password)
        except ValueError as exc:
            raise TransferError(f"secret {plan.secret_ref}: accessKeyId: {exc}") from exc
    try:
        allowed = await load_allowed_hosts(client)
    except PolicyUnavailable as exc:
        raise TransferError(str(exc)) from exc
    return HttpAccess(context, authorization, allowed)


@contextlib.asynccontextmanager
async def open_http(
    url: str, access: HttpAccess
) -> AsyncIterator[tuple[AsyncIterable[bytes], int | None]]:
    """The body of ``url`` as chunks and its length, each hop (redirects included) admitted by
    the import policy first; ``ImportRefused``, or ``TransferError`` as CDI words it."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    guard = UrlGuard(access.allowed, access.resolve)
    # the connector reaches only the addresses the guard checked (never its own DNS lookup)
    connector = aiohttp.TCPConnector(resolver=guard.resolver, use_dns_cache=False)
    try:
        async with (
            # the bytes as stored: compression is detected from them, and progress counts them
            aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False
            ) as session,
            _follow(session, URL(url), access, guard) as resp,
        ):
            if resp.status != 200:
                raise TransferError(
                    "Unable to connect to http data source: expected status code 200, "
                    f"got {resp.status}. Status: {resp.status} {resp.reason}"
                )
            yield resp.content.iter_chunked(_CHUNK), resp.content_length
    except aiohttp.ClientError as exc:
        raise TransferError(f"Unable to connect to http data source: {exc}") from exc
    except PolicyUnavailable as exc:
        raise TransferError(f"Unable to connect to http data source: {exc}") from exc


@contextlib.asynccontextmanager
async def _follow(
    session: aiohttp.ClientSession, url: URL, access: HttpAccess, guard: UrlGuard
) -> AsyncIterator[aiohttp.ClientResponse]:
    """The response at the end of ``url``'s redirects, followed here so each one is checked."""
    authorization, via = access.authorization, ""
    for _ in range(MAX_REDIRECTS + 1):
        await guard.admit(url, via=via)
        headers = {"Accept-Encoding": "identity"}
        if authorization is not None:
            headers["Authorization"] = authorization
        resp = await session.get(url, ssl=access.ssl, allow_redirects=False, headers=headers)
        location = resp.headers.get("Location") if resp.status in _REDIRECTS else None
        if location is None:
            try:
                yield resp
            finally:
                resp.release()
            return
        resp.release()
        target = _redirect_target(url, location)
        # as Go's client (CDI's) does: credentials do not follow a redirect to another origin
        if _origin(target) != _origin(url):
            authorization = None
        url, via = target, str(url)
    raise TransferError(
        f"Unable to connect to http data source: stopped after {MAX_REDIRECTS} redirects"
    )


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.raw_host, url.port


def _redirect_target(url: URL, location: str) -> URL:
    try:
        return url.join(URL(location))
    except ValueError as exc:
        raise TransferError(
            f"Unable to connect to http data source: bad redirect {location!r}: {exc}"
        ) from exc


# --- the controller ---------------------------------------------------------------------------


CLAIM_IMPORT_ENDPOINT = "cdi.kubevirt.io/storage.import.endpoint"
CLAIM_IMPORT_SECRET = "cdi.kubevirt.io/storage.import.secretName"
CLAIM_IMPORT_CERT = "cdi.kubevirt.io/storage.import.certConfigMap"


class UploadRefused(Exception):
    """An upload that cannot be taken now; ``code`` is the HTTP status to answer with."""

    def __init__(self, code: int, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(message)


class _ProgressPublisher:
    """Collects progress from a transfer and writes it to the DataVolume at most twice a second."""

    def __init__(self, write: Callable[[float], Awaitable[None]]) -> None:
        self._write = write
        self._latest: float | None = None
        self._sent: float | None = None
        self._last = 0.0

    def __call__(self, value: float) -> None:
        self._latest = value

    async def run(self) -> None:
        while True:
            await asyncio.sleep(_PROGRESS_INTERVAL / 5)
            await self.flush(force=False)

    async def flush(self, *, force: bool) -> None:
        due = time.monotonic() - self._last >= _PROGRESS_INTERVAL
        if self._latest is None or self._latest == self._sent or not (due or force):
            return
        self._sent, self._last = self._latest, time.monotonic()
        with contextlib.suppress(NotFound):
            await self._write(self._sent)


@dataclass(eq=False)
class DataVolumeController(Controller):
    """Imports the DataVolumes assigned to ``node_name`` into ``pool`` (one task per DataVolume)."""

    client: Client
    pool: Pool
    node_name: str
    import_dir: Path = field(default_factory=lambda: Path.home() / ".vmo" / "images")
    # the host-wide pool every node opens in place: DataVolumes asking ReadWriteMany live there
    shared_pool: Pool | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # makes each DataVolume's claim and binds it once the import succeeded (CDI's role)
    claims: Provisioner | None = None
    _tasks: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict)
    _uploading: set[tuple[str, str]] = field(default_factory=set)
    _cordoned: set[str] = field(default_factory=set)  # keys not claimed while this node was

    workers = 1

    def __post_init__(self) -> None:
        Controller.__init__(self, self.client)
        self.name = f"datavolumes-{self.node_name}"
        self.events = EventRecorder(self.client, component=IMPORT_COMPONENT, clock=self.clock)

    # --- loop ---------------------------------------------------------------------------------

    def watches(self) -> Sequence[Watch]:
        return [Watch(DATAVOLUME), Watch(NODE, self._node_keys)]

    def _node_keys(self, _etype: str, node: JSON) -> list[str]:
        """This node uncordoned: the DataVolumes it left to others meanwhile are looked at again."""
        if node["metadata"].get("name") != self.node_name or node.get("spec", {}).get(
            "unschedulable"
        ):
            return []
        waiting, self._cordoned = sorted(self._cordoned), set()
        return waiting

    async def _schedulable(self) -> bool:
        """An importer runs in a pod, which kube-scheduler keeps off cordoned nodes: a cordoned
        node claims no new DataVolume."""
        node = await self.client.find(NODE, self.node_name)
        return not (node or {}).get("spec", {}).get("unschedulable")

    async def run(self, stop: asyncio.Event) -> None:
        """Watches DataVolumes and reconciles them until ``stop`` is set."""
        self.pool.discard_partials()
        try:
            await super().run(stop)
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _enqueue(self, key: tuple[str, str]) -> None:
        self.enqueue(f"{key[0]}/{key[1]}")

    async def reconcile(self, key: str) -> Result | None:
        # a failure is retried by the queue: a DELETED event brings no second chance, so
        # waiting for the next event could leave a volume behind
        await self.sync(split_key(key))
        return None

    async def sync(self, key: tuple[str, str]) -> None:
        namespace, name = key
        dv = await self.client.find(DATAVOLUME, name, namespace)
        if dv is None or dv["metadata"].get("deletionTimestamp"):
            await self._forget(key)
            return
        owner = (dv["metadata"].get("annotations") or {}).get(STORAGE_NODE)
        if owner is None:
            snapshot = ((dv.get("spec") or {}).get("source") or {}).get("snapshot")
            if (
                snapshot is not None
                and self._snapshot_pool(
                    str(snapshot.get("namespace") or namespace), str(snapshot.get("name") or "")
                )
                is None
            ):
                return  # made where the snapshot is: the node holding it claims it
            if not await self._schedulable():
                self._cordoned.add(f"{namespace}/{name}")
                return
            claimed = await self._claim(dv)
            if claimed is None:
                return
            dv = claimed
        elif owner != self.node_name:
            return
        if self.claims is not None:
            await self.claims.ensure_datavolume_claim(dv)
        running = self._tasks.get(key)
        if (running is not None and not running.done()) or key in self._uploading:
            return
        await self._converge(dv)

    async def _forget(self, key: tuple[str, str]) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for pool in self._pools():
            if pool.delete(*key):
                log.info("deleted volume %s/%s with its DataVolume", *key)

    def _snapshot_pool(self, namespace: str, name: str) -> Pool | None:
        """The pool of this node holding the volume snapshot, if any."""
        return next((p for p in self._pools() if p.has_snapshot(namespace, name)), None)

    def _pools(self) -> list[Pool]:
        return [self.pool] + ([self.shared_pool] if self.shared_pool is not None else [])

    def pool_for(self, dv: JSON) -> Pool:
        """The shared pool for a DataVolume asking ReadWriteMany (when there is one), else the
        node's own pool."""
        if self.shared_pool is not None and is_shared(dv):
            return self.shared_pool
        return self.pool

    async def _claim(self, dv: JSON) -> JSON | None:
        """Sets this node as the DataVolume's storage node unless another agent got there first."""
        md = dv["metadata"]
        patch = {
            "metadata": {
                "resourceVersion": md["resourceVersion"],
                "annotations": {STORAGE_NODE: self.node_name},
            }
        }
        try:
            return await self.client.patch(DATAVOLUME, md["name"], patch, md["namespace"])
        except (Conflict, NotFound):
            return None

    async def _converge(self, dv: JSON) -> None:
        md, status = dv["metadata"], dv.get("status") or {}
        namespace, name, uid = md["namespace"], md["name"], md.get("uid", "")
        pool = self.pool_for(dv)
        if pool.exists(namespace, name):
            if pool.record(namespace, name).owner_uid == uid:
                await self._ensure_succeeded(dv)
                return
            # a volume left by an earlier DataVolume of the same name
            pool.delete(namespace, name)
        if status.get("phase") == DataVolumePhase.FAILED:
            return
        try:
            plan = import_plan(dv, import_dir=self.import_dir)
        except ImportSpecError as exc:
            await self._write(dv, error_status(DataVolumePhase.FAILED, name, str(exc), restarts=0))
            return
        if plan.kind is SourceKind.UPLOAD:
            await self._await_upload(dv)
            return
        self._tasks[(namespace, name)] = asyncio.create_task(
            self._transfer(dv, plan), name=f"dv-import-{namespace}/{name}"
        )

    async def _ensure_succeeded(self, dv: JSON) -> None:
        status = dv.get("status") or {}
        if self.claims is not None:
            restarts = int(status.get("restartCount", 0))
            await self.claims.bind_datavolume(dv, self.pool_for(dv), restarts=restarts)
        if status.get("phase") == DataVolumePhase.SUCCEEDED:
            return
        kind = _kind_of(dv)
        message = phases_for(kind)[2] if kind else "Import Complete"
        restarts = int(status.get("restartCount", 0))
        await self._write(dv, succeeded_status(dv["metadata"]["name"], message, restarts))

    async def _await_upload(self, dv: JSON) -> None:
        phase = (dv.get("status") or {}).get("phase")
        if phase == DataVolumePhase.UPLOAD_READY:
            return
        name = dv["metadata"]["name"]
        await self._write(dv, dv_status(DataVolumePhase.UPLOAD_SCHEDULED, name))
        # the agent's upload endpoint is always listening: ready as soon as scheduled
        await self._write(
            dv, dv_status(DataVolumePhase.UPLOAD_READY, name, running=(True, "Pod is running", ""))
        )

    # --- transfers ----------------------------------------------------------------------------

    async def _transfer(self, dv: JSON, plan: ImportPlan) -> None:
        try:
            await self._attempts(dv, plan)
            # a delete that raced with the last steps of the transfer may have found no volume
            # yet: whoever finishes last makes sure no volume outlives its DataVolume
            current = await self.client.find(
                DATAVOLUME, dv["metadata"]["name"], dv["metadata"]["namespace"]
            )
            if current is None or current["metadata"].get("uid") != dv["metadata"].get("uid"):
                self.pool_for(dv).delete(*_key(dv))
        except NotFound:
            # the DataVolume went away mid-transfer; its DELETED event cleans the pool
            log.info("DataVolume %s/%s deleted during its transfer", *_key(dv))
        except Exception:
            log.exception("DataVolume %s/%s: transfer crashed", *_key(dv))

    async def _attempts(self, dv: JSON, plan: ImportPlan) -> None:
        name = dv["metadata"]["name"]
        scheduled, in_progress, done = phases_for(plan.kind)
        await self._write(dv, dv_status(scheduled, name))
        failures = 0
        while True:
            await self._write(dv, in_progress_status(in_progress, name, 0.0, failures))
            try:
                await self._execute(dv, plan, failures)
            except ImportRefused as exc:
                await self._refuse(dv, exc, failures)
                return
            except (PoolError, TransferError, OSError) as exc:
                failures += 1
                log.warning("DataVolume %s/%s: %s", dv["metadata"]["namespace"], name, exc)
                final = failures >= self.retry.attempts
                phase = DataVolumePhase.FAILED if final else in_progress
                await self._write(dv, error_status(phase, name, str(exc), restarts=failures))
                if final:
                    return
                await asyncio.sleep(self.retry.backoff(failures))
                continue
            await self._write(dv, succeeded_status(name, done, failures))
            return

    async def _refuse(self, dv: JSON, exc: ImportRefused, restarts: int) -> None:
        """A refused import fails at once: the policy said no, and asking again will not change
        that (a DataVolume made after the administrator changed the policy is tried afresh)."""
        md = dv["metadata"]
        log.warning("DataVolume %s/%s: %s", md["namespace"], md["name"], exc)
        await self._write(dv, refused_status(md["name"], str(exc), restarts))
        await self.events.record(
            dv, "ImportFailed", f"Failed to import into PVC {md['name']}: {exc}", type_="Warning"
        )

    async def _execute(self, dv: JSON, plan: ImportPlan, restarts: int) -> VolumeInfo:
        name = dv["metadata"]["name"]
        _, in_progress, _ = phases_for(plan.kind)

        async def report(value: float) -> None:
            await self._write(dv, in_progress_status(in_progress, name, value, restarts))

        publisher = _ProgressPublisher(report)
        ticker = asyncio.create_task(publisher.run())
        try:
            info = await self._fill(dv, plan, publisher)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        return info

    async def _fill(self, dv: JSON, plan: ImportPlan, progress: _ProgressPublisher) -> VolumeInfo:
        md = dv["metadata"]
        ns, name, uid = md["namespace"], md["name"], md.get("uid", "")
        size = plan.size or 0
        pool = self.pool_for(dv)
        if plan.kind is SourceKind.BLANK:
            return await pool.create_blank(ns, name, size, owner_uid=uid)
        if plan.kind is SourceKind.FILE:
            assert plan.path is not None
            if not plan.path.is_file():
                raise TransferError(f"Unable to read local data source: no file {plan.path}")
            return await pool.import_file(
                ns,
                name,
                plan.path,
                progress=progress,
                source=plan.url,
                min_size=size,
                owner_uid=uid,
            )
        if plan.kind is SourceKind.SNAPSHOT:
            assert plan.source_pvc is not None
            source = self._snapshot_pool(*plan.source_pvc)
            if source is None:
                raise TransferError(
                    f"volume snapshot {'/'.join(plan.source_pvc)} not found on node {self.node_name}"
                )
            full = (md.get("annotations") or {}).get(CLONE_MODE) == "full"
            return await pool.volume_from_snapshot(
                source, plan.source_pvc, ns, name, full=full, min_size=size, owner_uid=uid,
                progress=progress,
            )  # fmt: skip
        if plan.kind is SourceKind.PVC:
            assert plan.source_pvc is not None
            try:
                return await pool.clone(plan.source_pvc, ns, name, progress=progress, owner_uid=uid)
            except VolumeNotFound as exc:
                raise TransferError(f"{exc} on node {self.node_name}") from exc
        access = await http_access(self.client, ns, plan)
        async with open_http(plan.url, access) as (chunks, total):
            return await pool.import_stream(
                ns,
                name,
                chunks,
                total=total,
                progress=progress,
                source=plan.url,
                min_size=size,
                owner_uid=uid,
            )

    # --- claims annotated for import (CDI's older, DataVolume-less style) ---------------------

    async def import_claim(self, pvc: JSON, pool: Pool) -> VolumeInfo:
        """Fills a claim annotated ``cdi.kubevirt.io/storage.import.endpoint`` into ``pool``, as
        the DataVolume of the same source would (URL policy, CA bundle and credentials
        included); raises ``ImportSpecError``, ``ImportRefused``, ``TransferError`` or
        ``PoolError``."""
        annotations = pvc["metadata"].get("annotations") or {}
        http: JSON = {"url": annotations.get(CLAIM_IMPORT_ENDPOINT, "")}
        if annotations.get(CLAIM_IMPORT_SECRET):
            http["secretRef"] = annotations[CLAIM_IMPORT_SECRET]
        if annotations.get(CLAIM_IMPORT_CERT):
            http["certConfigMap"] = annotations[CLAIM_IMPORT_CERT]
        spec = pvc.get("spec") or {}
        as_dv = {
            "metadata": pvc["metadata"],
            "spec": {
                "source": {"http": http},
                "storage": {"resources": spec.get("resources") or {}},
            },
        }
        plan = import_plan(as_dv, import_dir=self.import_dir)
        md = pvc["metadata"]
        namespace, name, uid = md["namespace"], md["name"], md.get("uid", "")
        size = plan.size or 0
        if plan.kind is SourceKind.FILE:
            assert plan.path is not None
            if not plan.path.is_file():
                raise TransferError(f"Unable to read local data source: no file {plan.path}")
            return await pool.import_file(
                namespace, name, plan.path, source=plan.url, min_size=size, owner_uid=uid
            )
        access = await http_access(self.client, namespace, plan)
        async with open_http(plan.url, access) as (chunks, total):
            return await pool.import_stream(
                namespace,
                name,
                chunks,
                total=total,
                source=plan.url,
                min_size=size,
                owner_uid=uid,
            )

    # --- uploads ------------------------------------------------------------------------------

    async def receive_upload(
        self, namespace: str, name: str, chunks: AsyncIterable[bytes], *, total: int | None
    ) -> VolumeInfo:
        """Takes an upload's body into the pool; only while the DataVolume is UploadReady here."""
        key = (namespace, name)
        dv = await self._upload_target(namespace, name)
        self._uploading.add(key)
        try:
            return await self._take_upload(dv, chunks, total)
        finally:
            self._uploading.discard(key)
            # a broken upload leaves ImportInProgress behind: reconcile puts it back to UploadReady
            self._enqueue(key)

    async def _upload_target(self, namespace: str, name: str) -> JSON:
        dv = await self.client.find(DATAVOLUME, name, namespace)
        if dv is None:
            raise UploadRefused(404, f"DataVolume {namespace}/{name} not found")
        owner = (dv["metadata"].get("annotations") or {}).get(STORAGE_NODE)
        if owner != self.node_name:
            raise UploadRefused(409, f"DataVolume {namespace}/{name} is served by node {owner}")
        phase = (dv.get("status") or {}).get("phase")
        if phase != DataVolumePhase.UPLOAD_READY or (namespace, name) in self._uploading:
            raise UploadRefused(409, f"DataVolume {namespace}/{name} is not UploadReady ({phase})")
        return dv

    async def _take_upload(
        self, dv: JSON, chunks: AsyncIterable[bytes], total: int | None
    ) -> VolumeInfo:
        md = dv["metadata"]
        ns, name = md["namespace"], md["name"]
        phase = DataVolumePhase.IMPORT_IN_PROGRESS

        async def report(value: float) -> None:
            await self._write(dv, in_progress_status(phase, name, value, 0))

        publisher = _ProgressPublisher(report)
        ticker = asyncio.create_task(publisher.run())
        await report(0.0)
        try:
            info = await self.pool_for(dv).import_stream(
                ns,
                name,
                chunks,
                total=total,
                progress=publisher,
                source="upload",
                min_size=requested_size(dv) or 0,
                owner_uid=md.get("uid", ""),
            )
        except PoolError as exc:
            ready = DataVolumePhase.UPLOAD_READY
            await self._write(dv, error_status(ready, name, str(exc), restarts=0))
            raise
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        await self._write(dv, succeeded_status(name, "Upload Complete"))
        return info

    # --- status -------------------------------------------------------------------------------

    async def _write(self, dv: JSON, status: JSON) -> None:
        md = dv["metadata"]
        old = (dv.get("status") or {}).get("conditions") or []
        now = _now()
        conditions = merge_conditions(old, status["conditions"], now)
        # CDI's conditions carry a heartbeat: the time they were last confirmed
        full = {**status, "conditions": [{**c, "lastHeartbeatTime": now} for c in conditions]}
        if self.claims is not None:
            full["claimName"] = md["name"]  # CDI's: the claim of the same name
        updated = await self.client.patch_status(DATAVOLUME, md["name"], full, md["namespace"])
        dv["status"] = updated.get("status") or full


def access_modes(dv: JSON) -> list[str]:
    spec = dv.get("spec") or {}
    section = spec.get("storage") or spec.get("pvc") or {}
    return [str(m) for m in section.get("accessModes") or []]


def is_shared(dv: JSON) -> bool:
    """A DataVolume asking ``ReadWriteMany``: every node opens it in place (RWX-like)."""
    return "ReadWriteMany" in access_modes(dv)


def _kind_of(dv: JSON) -> SourceKind | None:
    source = (dv.get("spec") or {}).get("source") or {}
    for key in source:
        if key == "http":
            url = str((source[key] or {}).get("url", ""))
            return SourceKind.FILE if url.startswith("file:") else SourceKind.HTTP
        with contextlib.suppress(ValueError):
            return SourceKind(key)
    return None


def _key(dv: JSON) -> tuple[str, str]:
    md = dv["metadata"]
    return str(md.get("namespace", "")), str(md.get("name", ""))
