"""export.kubevirt.io/v1 VirtualMachineExport on one node: the export server and its controller.

Each node runs one HTTPS export server (virt-exportserver's role; a CA and a server certificate
of its own under ``<state dir>/export-pki``) and one ``ExportController`` (virt-controller's
export role). The controller resolves an export's source (a claim, a VM's claims, or a VM
snapshot's volume snapshots) as upstream does, with upstream's phases, conditions, reasons and
messages; the node whose pool holds the volumes (annotation ``vmo.dev/export-node``, claimed
with a resourceVersion-guarded patch) serves them and writes the status.

A volume is served as the bytes the guest sees: ``raw`` streams the qcow2 chain's extents
(``qemu-img map``) straight from the image files, zeros where nothing is allocated, so no copy is
made and Range requests cost nothing; an image ``qemu-img map`` cannot place (compressed
clusters) is converted once into a ``.part-`` raw file of the pool, removed with the export.
``gzip`` is that raw stream compressed on the fly. Every request carries the export's token
(header or query parameter ``x-kubevirt-export-token``); without it: 401 and no data.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import functools
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import ssl
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vmo.api.annotations import EXPORT_NODE, STORAGE_NODE
from vmo.api.duration import parse_duration
from vmo.api.kubevirt.migratable import claim_name
from vmo.client import (
    DATAVOLUME,
    SECRET,
    VM,
    VMEXPORT,
    VMI,
    VMSNAPSHOT,
    VMSNAPSHOTCONTENT,
    Client,
    Conflict,
    NotFound,
)
from vmo.engine.storage import qemu_img
from vmo.engine.storage.backup_endpoints import BackupVolume, serve_data, serve_map
from vmo.engine.storage.pool import Pool, volume_stem
from vmo.runtime import (
    Controller,
    Result,
    TemporaryError,
    Watch,
    merge_conditions,
    object_key,
    split_key,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]

BackupLookup = Callable[[str, str], "dict[str, BackupVolume] | None"]

# the names this module has always used for the client's resources
EXPORT, VM_SNAPSHOT, VM_SNAPSHOT_CONTENT = VMEXPORT, VMSNAPSHOT, VMSNAPSHOTCONTENT

TOKEN_HEADER = "x-kubevirt-export-token"
TOKEN_KEY = "token"
DEFAULT_TTL = dt.timedelta(hours=2)
SERVICE_PREFIX = "virt-export-"
TOKEN_PREFIX = "export-token-"
# while an export is not Ready its source is looked at again this often (upstream: 3 s)
REQUEUE_SECONDS = 3.0
FINAL_VMI_PHASES = frozenset({"Succeeded", "Failed"})
_CHUNK = 4 << 20
_ZEROS = bytes(_CHUNK)
_GZIP_LEVEL = 1
_GZIP_THREADS = 2
_SAMPLE = 64 << 10
_DNS_LABEL_MAX = 63

# upstream's condition reasons (pkg/storage/export/export)
INITIALIZING = "Initializing"
IN_USE = "InUse"
POD_READY = "PodReady"
POD_PENDING = "PodPending"
PVC_NOT_FOUND = "PVCNotFound"
PVC_BOUND = "PVCBound"
PVC_PENDING = "PVCPending"
VM_NOT_FOUND = "VMNotFound"
VOLUMES_NOT_POPULATED = "VolumesNotPopulated"
VM_NO_VOLUMES = "VMNoVolumes"
SNAPSHOT_NOT_FOUND = "VMSnapshotNotFound"
SNAPSHOT_NO_VOLUMES = "VMSnapshotNoVolumes"
NOT_ALL_PVCS_CREATED = "NotAllPVCsCreated"
ALL_PVCS_READY = "AllPVCsReady"


class ExportError(Exception):
    """A volume this node cannot serve as asked."""


# --- naming, durations, times (pure) ----------------------------------------------------------


def _dns_name(prefix: str, name: str) -> str:
    """``prefix + name`` kept within a DNS label (long names shortened with a hash suffix)."""
    full = prefix + name.replace(".", "-")
    if len(full) <= _DNS_LABEL_MAX:
        return full
    digest = hashes.Hash(hashes.SHA256())
    digest.update(name.encode())
    suffix = digest.finalize().hex()[:8]
    return f"{full[: _DNS_LABEL_MAX - 9]}-{suffix}"


def service_name(export_name: str) -> str:
    return _dns_name(SERVICE_PREFIX, export_name)


def default_token_secret(export_name: str) -> str:
    """The Secret upstream generates when ``spec.tokenSecretRef`` is not set."""
    return _dns_name(TOKEN_PREFIX, export_name)


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def ttl_of(export: JSON) -> dt.timedelta:
    text = (export.get("spec") or {}).get("ttlDuration")
    return parse_duration(str(text)) if text else DEFAULT_TTL


def expiration_time(export: JSON) -> dt.datetime:
    """Creation time plus ``spec.ttlDuration`` (default 2h), as upstream computes it."""
    created = (export.get("metadata") or {}).get("creationTimestamp")
    start = parse_time(created) if created else dt.datetime.now(dt.UTC)
    return start + ttl_of(export)


# --- the source (decisions are pure; lookups below) -------------------------------------------


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str = ""
    message: str = ""

    def as_json(self) -> JSON:
        return {
            "type": self.type,
            "status": "True" if self.status else "False",
            "reason": self.reason,
            "message": self.message,
        }


def ready(status: bool, reason: str, message: str = "") -> Condition:
    return Condition("Ready", status, reason, message)


_INITIALIZING = Condition("Ready", False, INITIALIZING)


@dataclass(frozen=True)
class ExportVolume:
    """One volume of an export: its name in the links, and where its bytes come from."""

    name: str
    claim: str
    snapshot: str = ""  # a volume snapshot's name when the source is a VM snapshot


@dataclass(frozen=True)
class SourceState:
    """What an export's source amounts to now, as upstream's source types report it."""

    volumes: tuple[ExportVolume, ...] = ()
    available: bool = False  # populated and not in use
    ready: Condition = _INITIALIZING
    source: Condition | None = None  # PVCReady / VolumesCreated
    vm_name: str | None = None
    skipped: bool = False
    # the node whose pool holds the volumes (their DataVolumes' vmo.dev/storage-node)
    node: str | None = None
    backup: bool = False  # a pull-mode backup's volumes: data and map endpoints


def source_kind(export: JSON) -> str:
    """``pvc``, ``vm``, ``snapshot`` or ``""`` for a source this node does not export."""
    source = (export.get("spec") or {}).get("source") or {}
    group, kind = source.get("apiGroup") or "", source.get("kind")
    if kind == "PersistentVolumeClaim" and group == "":
        return "pvc"
    if kind == "VirtualMachine" and group == "kubevirt.io":
        return "vm"
    if kind == "VirtualMachineSnapshot" and group == "snapshot.kubevirt.io":
        return "snapshot"
    if kind == "VirtualMachineBackup" and group == "backup.kubevirt.io":
        return "backup"
    return ""


@dataclass(frozen=True)
class ClaimInfo:
    """What the cluster and this node know of one claim."""

    exists: bool  # a DataVolume of that name, or a pool volume of this node
    populated: bool
    node: str | None
    bound: bool


def pvc_state(namespace: str, name: str, claim: ClaimInfo, in_use: bool) -> SourceState:
    ref = f"{namespace}/{name}"
    if not claim.exists:
        message = f"PersistentVolumeClaim {ref} not found"
        return SourceState(source=Condition("PVCReady", False, PVC_NOT_FOUND, message))
    source = Condition("PVCReady", True, PVC_BOUND) if claim.bound else None
    source = source or Condition("PVCReady", False, PVC_PENDING)
    volumes = (ExportVolume(name, name),)
    if not claim.populated:
        message = f"PersistentVolumeClaim {ref} is not populated"
        return SourceState(volumes, False, ready(False, PVC_PENDING, message), source, None)
    if in_use:
        message = f"PersistentVolumeClaim {ref} is in use"
        return SourceState(volumes, False, ready(False, IN_USE, message), source, None)
    return SourceState(volumes, True, ready(False, INITIALIZING), source, node=claim.node)


def vm_state(
    namespace: str,
    name: str,
    *,
    vm: JSON | None,
    claims: dict[str, ClaimInfo],
    running: bool,
) -> SourceState:
    """``claims``: the VM's claims (dataVolume / persistentVolumeClaim volumes), in order."""
    ref = f"{namespace}/{name}"
    if vm is None:
        return SourceState(ready=ready(False, VM_NOT_FOUND, f"Virtual Machine {ref} not found"))
    kinds = _vm_claim_kinds(vm)
    present = {c: info for c, info in claims.items() if info.exists}
    # a DataVolume whose claim does not exist yet is "not populated"; a missing plain claim is
    # left out, as upstream does
    populated = all(info.populated for info in present.values()) and all(
        claims.get(c, ClaimInfo(False, False, None, False)).exists
        for c, kind in kinds.items()
        if kind == "dataVolume"
    )
    volumes = tuple(ExportVolume(c, c) for c in present)
    node = next((i.node for i in present.values() if i.node), None)
    if not present and populated:
        message = f"Virtual Machine {ref} has no volumes"
        return SourceState(ready=ready(False, VM_NO_VOLUMES, message), vm_name=name, skipped=True)
    if not populated:
        message = f"Not all volumes in the Virtual Machine {ref} are populated"
        return SourceState(volumes, False, ready(False, VOLUMES_NOT_POPULATED, message), None, name)
    if running:
        message = f"Virtual Machine {ref} is running"
        return SourceState(volumes, False, ready(False, IN_USE, message), None, name)
    return SourceState(volumes, True, ready(False, INITIALIZING), None, name, node=node)


def _vm_claim_kinds(vm: JSON) -> dict[str, str]:
    template = ((vm.get("spec") or {}).get("template") or {}).get("spec") or {}
    kinds = {}
    for volume in template.get("volumes") or []:
        claim = claim_name(volume)
        if claim:
            kinds[claim] = "dataVolume" if "dataVolume" in volume else "persistentVolumeClaim"
    return kinds


def vm_claims(vm: JSON) -> list[str]:
    return list(_vm_claim_kinds(vm))


def snapshot_state(
    namespace: str,
    name: str,
    *,
    snapshot: JSON | None,
    content: JSON | None,
    present: set[str],
    node: str | None = None,
) -> SourceState:
    """``present``: the volume snapshot names this node's pools hold."""
    ref = f"{namespace}/{name}"
    none_message = f"VirtualMachineSnapshot {ref} does not contain any volume snapshots"
    if snapshot is None:
        return SourceState(
            ready=ready(False, SNAPSHOT_NOT_FOUND, f"VirtualMachineSnapshot {ref} not found"),
            source=Condition("VolumesCreated", False, SNAPSHOT_NO_VOLUMES, none_message),
        )
    vm_name = str(((snapshot.get("spec") or {}).get("source") or {}).get("name") or "") or None
    if not (snapshot.get("status") or {}).get("readyToUse") or content is None:
        created = Condition("VolumesCreated", False, NOT_ALL_PVCS_CREATED, none_message)
        not_ready = ready(False, NOT_ALL_PVCS_CREATED, none_message)
        return SourceState(ready=not_ready, source=created, vm_name=vm_name)
    volumes = tuple(snapshot_volumes(content))
    if not volumes:
        created = Condition("VolumesCreated", False, SNAPSHOT_NO_VOLUMES, none_message)
        return SourceState(source=created, vm_name=vm_name, skipped=True)
    if not all(v.snapshot in present for v in volumes):
        created = Condition(
            "VolumesCreated",
            False,
            NOT_ALL_PVCS_CREATED,
            "Not all PVCs have been successfully restored",
        )
        return SourceState(volumes, False, ready(False, INITIALIZING), created, vm_name, node=node)
    created = Condition("VolumesCreated", True, ALL_PVCS_READY)
    return SourceState(volumes, True, ready(False, INITIALIZING), created, vm_name, node=node)


def snapshot_volumes(content: JSON) -> Iterator[ExportVolume]:
    """A snapshot content's volume backups, named by their claim as upstream's links are."""
    for backup in (content.get("spec") or {}).get("volumeBackups") or []:
        claim = str(
            ((backup.get("persistentVolumeClaim") or {}).get("metadata") or {}).get("name") or ""
        )
        snap = str(backup.get("volumeSnapshotName") or "")
        if claim and snap:
            yield ExportVolume(claim, claim, snap)


# --- the status (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    """Where this node serves an export."""

    base_url: str  # https://127.0.0.1:<port>
    cert_pem: str


def volume_path_prefix(namespace: str, name: str) -> str:
    """The per-export prefix of the server's URLs (upstream's export proxy path)."""
    return f"/api/export.kubevirt.io/v1/namespaces/{namespace}/virtualmachineexports/{name}"


def export_links(export: JSON, state: SourceState, serving: Serving) -> JSON:
    md = export["metadata"]
    base = serving.base_url + volume_path_prefix(md["namespace"], md["name"])
    if state.backup:
        backups = [
            {
                "name": v.name,
                "endpoints": [
                    {"endpoint": "data", "url": f"{base}/exports/{v.name}/data"},
                    {"endpoint": "map", "url": f"{base}/exports/{v.name}/map"},
                ],
            }
            for v in state.volumes
        ]
        backup_link = {"cert": serving.cert_pem, "backups": backups}
        return {"internal": dict(backup_link), "external": dict(backup_link)}
    volumes = [
        {
            "name": v.name,
            "formats": [
                {"format": "raw", "url": f"{base}/volumes/{v.name}/disk.img"},
                {"format": "gzip", "url": f"{base}/volumes/{v.name}/disk.img.gz"},
            ],
        }
        for v in state.volumes
    ]
    link = {"cert": serving.cert_pem, "volumes": volumes}
    return {"internal": dict(link), "external": dict(link)}


def export_status(
    export: JSON,
    state: SourceState,
    *,
    serving: Serving | None,
    token_secret: str | None,
    now: dt.datetime,
    not_ready: Condition | None = None,
) -> JSON:
    """The whole status upstream's controller would write for this source state.

    ``serving`` is set when this node serves the volumes; ``not_ready`` overrides the Ready
    condition while the source is available but the server cannot serve it yet.
    """
    old = export.get("status") or {}
    conditions: list[Condition] = []
    if serving is not None and not_ready is None:
        conditions.append(ready(True, POD_READY))
        phase = "Ready"
    else:
        conditions.append(not_ready or state.ready)
        phase = "Pending"
    if state.source is not None:
        conditions.append(state.source)
    if state.skipped:
        phase = "Skipped"
    status: JSON = {
        "phase": phase,
        "conditions": merge_conditions(
            old.get("conditions"),
            [{"lastProbeTime": None, **c.as_json()} for c in conditions],
            rfc3339(now),
            keep_others=True,
        ),
        "links": export_links(export, state, serving) if phase == "Ready" and serving else {},
        "serviceName": service_name(export["metadata"]["name"]),
        "ttlExpirationTime": rfc3339(expiration_time(export)),
    }
    if token_secret:
        status["tokenSecretRef"] = token_secret
    if state.vm_name:
        status["virtualMachineName"] = state.vm_name
    return status


# --- where a volume's guest-visible bytes are (qemu-img map) ---------------------------------


@dataclass(frozen=True)
class Extent:
    """``length`` guest bytes from ``start``: read at ``offset`` of ``source``, or zeros."""

    start: int
    length: int
    source: Path | None = None
    offset: int = 0


@dataclass(frozen=True)
class Layout:
    size: int
    extents: tuple[Extent, ...]


class Unmappable(ExportError):
    """Some data of the image has no plain place in a file (compressed clusters)."""


async def _qemu_img_json(argv: list[str]) -> Any:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise ExportError(f"qemu-img {argv[1]} failed: {err.decode(errors='replace').strip()}")
    return json.loads(out)


def layout_from_map(size: int, chain: Sequence[Path], mapping: Sequence[JSON]) -> Layout:
    """The extents of ``qemu-img map --output=json``; ``chain[depth]`` is each layer's file."""
    extents = []
    for entry in mapping:
        start, length = int(entry["start"]), int(entry["length"])
        if not entry.get("data") or entry.get("zero"):
            extents.append(Extent(start, length))
            continue
        if "offset" not in entry or int(entry.get("depth", 0)) >= len(chain):
            raise Unmappable(f"extent at {start} has no file offset (compressed?)")
        extents.append(Extent(start, length, chain[int(entry["depth"])], int(entry["offset"])))
    return Layout(size, tuple(extents))


async def map_layout(path: Path) -> Layout:
    """The guest-visible layout of a qcow2 (or raw) image and its backing chain."""
    infos = await _qemu_img_json(qemu_img.info(path, backing_chain=True))
    chain = [path]
    for info in infos[:-1]:
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        chain.append(Path(str(backing)))
    size = int(infos[0]["virtual-size"])
    fmt = str(infos[0].get("format", "qcow2"))
    mapping = await _qemu_img_json(qemu_img.map_extents(path, fmt=fmt))
    return layout_from_map(size, chain, mapping)


def pieces(layout: Layout, first: int, last: int) -> Iterator[tuple[Path | None, int, int]]:
    """(file or None for zeros, file offset, length) covering guest bytes ``first..last``."""
    for ext in layout.extents:
        lo, hi = max(first, ext.start), min(last + 1, ext.start + ext.length)
        if lo >= hi:
            continue
        yield ext.source, ext.offset + (lo - ext.start), hi - lo


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range, inclusive; None when absent
    or not one range (served whole); ValueError when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if match is None:
        return None
    a, b = match.groups()
    if not a and not b:
        return None
    if not a:
        first, last = max(0, size - int(b)), size - 1
    else:
        first = int(a)
        last = min(int(b), size - 1) if b else size - 1
    if first > last or first >= size:
        raise ValueError(f"range {header!r} not satisfiable for {size} bytes")
    return first, last


# --- TLS material -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportPki:
    """The node's export CA and the server certificate it signs (127.0.0.1 and localhost)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        return self.directory / "tls.key"

    def ensure(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca_key_path = self.directory / "ca.key"
        if not (self.ca_cert.is_file() and ca_key_path.is_file()):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _certificate("vmo-export-ca", key.public_key(), key, None, ca=True)
            _write_pair(self.ca_cert, ca_key_path, cert, key)
            self.cert.unlink(missing_ok=True)
        if not (self.cert.is_file() and self.key.is_file()):
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
            assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
            ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _certificate("vmo-export-server", key.public_key(), ca_key, ca, ca=False)
            _write_pair(self.cert, self.key, cert, key)

    def ca_pem(self) -> str:
        return self.ca_cert.read_text()

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def _certificate(
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    *,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650 if ca else 825))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# --- what one export serves -------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeFile:
    """A served volume: a claim of a pool, or one of its volume snapshots."""

    pool: Pool
    namespace: str
    claim: str
    snapshot: str = ""

    def image(self) -> Path:
        """The image to read now: the claim's current top layer (a snapshot taken meanwhile
        moves it), or the snapshot's read-only layer."""
        if self.snapshot:
            return self.pool.snapshot_path(self.namespace, self.snapshot)
        return self.pool.top(self.namespace, self.claim)


@dataclass
class ServedExport:
    """An export this node serves: its token, its volumes, and what serving them created."""

    namespace: str
    name: str
    token: str
    volumes: dict[str, VolumeFile]
    # a pull-mode VirtualMachineBackup's volumes: served as data and map endpoints
    backups: dict[str, BackupVolume] = field(default_factory=dict)
    _flattened: dict[str, Path] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    requests: set[asyncio.Task[Any]] = field(default_factory=set)

    def authorized(self, token: str | None) -> bool:
        if not token:
            return False
        return hmac.compare_digest(token.encode(), self.token.encode())

    async def layout(self, volume: str) -> Layout:
        """The volume's layout: mapped in place, else (once) converted into a raw temp file."""
        vf = self.volumes[volume]
        flat = self._flattened.get(volume)
        if flat is not None:
            return Layout(flat.stat().st_size, (Extent(0, flat.stat().st_size, flat, 0),))
        try:
            return await map_layout(vf.image())
        except Unmappable:
            pass
        async with self._locks.setdefault(volume, asyncio.Lock()):
            if volume not in self._flattened:
                self._flattened[volume] = await _flatten(vf)
        return await self.layout(volume)

    def close(self) -> None:
        """Stops every request in flight and removes the temp files serving created."""
        for task in list(self.requests):
            task.cancel()
        for path in self._flattened.values():
            path.unlink(missing_ok=True)
        self._flattened.clear()


async def _flatten(vf: VolumeFile) -> Path:
    """A sparse raw copy in the pool's staging area (for images ``qemu-img map`` cannot place)."""
    # a .part- file: counted in the pool's use, and swept at start if a crash leaves it
    stem = volume_stem(vf.namespace, vf.claim)
    target = vf.pool.root / f".part-export-{stem}-{uuid.uuid4().hex[:8]}.raw"
    proc = await asyncio.create_subprocess_exec(
        *qemu_img.convert(vf.image(), target, target_fmt="raw"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        target.unlink(missing_ok=True)
        raise
    if proc.returncode != 0:
        target.unlink(missing_ok=True)
        raise ExportError(f"qemu-img convert failed: {err.decode(errors='replace').strip()}")
    return target


# --- the HTTPS server -------------------------------------------------------------------------


class ExportServer:
    """One node's export server: volumes of the exports registered with it, behind tokens."""

    def __init__(self, pki: ExportPki, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.pki, self.host, self.port = pki, host, port
        self.exports: dict[tuple[str, str], ServedExport] = {}
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def serving(self) -> Serving:
        return Serving(self.base_url, self.pki.ca_pem())

    async def start(self) -> None:
        await asyncio.to_thread(self.pki.ensure)
        app = web.Application()
        prefix = volume_path_prefix("{namespace}", "{name}") + "/volumes/{volume}"
        app.router.add_get(prefix + "/disk.img", self._raw)
        app.router.add_get(prefix + "/disk.img.gz", self._gzip)
        backups = volume_path_prefix("{namespace}", "{name}") + "/exports/{volume}"
        app.router.add_route("*", backups + "/data", self._backup_data)
        app.router.add_route("*", backups + "/map", self._backup_map)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=self.pki.server_context()
        )
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("export server listening on %s", self.base_url)

    async def stop(self) -> None:
        for served in list(self.exports.values()):
            served.close()
        self.exports.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def register(self, served: ServedExport) -> None:
        old = self.exports.get((served.namespace, served.name))
        same = (old.token, old.volumes, old.backups) if old is not None else None
        if same == (served.token, served.volumes, served.backups):
            return
        if old is not None:
            old.close()
        self.exports[(served.namespace, served.name)] = served

    def unregister(self, namespace: str, name: str) -> bool:
        served = self.exports.pop((namespace, name), None)
        if served is not None:
            served.close()
        return served is not None

    # --- requests ---------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> ServedExport:
        """The export the request names, when its token is right (404 / 401 otherwise)."""
        info = request.match_info
        served = self.exports.get((info["namespace"], info["name"]))
        token = request.headers.get(TOKEN_HEADER) or request.query.get(TOKEN_HEADER)
        if served is None:
            # no export served here under that name: nothing to authorize against
            raise web.HTTPNotFound(text="export not found\n")
        if not served.authorized(token):
            raise web.HTTPUnauthorized(text="a valid x-kubevirt-export-token is required\n")
        return served

    def _admit(self, request: web.Request) -> tuple[ServedExport, str]:
        served, volume = self._authorized(request), request.match_info["volume"]
        if volume not in served.volumes:
            raise web.HTTPNotFound(text=f"volume {volume} not found in the export\n")
        return served, volume

    def _admit_backup(self, request: web.Request) -> tuple[ServedExport, BackupVolume]:
        served, name = self._authorized(request), request.match_info["volume"]
        volume = served.backups.get(name)
        if volume is None:
            raise web.HTTPNotFound(text=f"volume {name} not found in the backup\n")
        return served, volume

    async def _backup_data(self, request: web.Request) -> web.StreamResponse:
        served, volume = self._admit_backup(request)
        return await self._tracked(served, serve_data(request, volume))

    async def _backup_map(self, request: web.Request) -> web.StreamResponse:
        served, volume = self._admit_backup(request)
        return await self._tracked(served, serve_map(request, volume))

    async def _raw(self, request: web.Request) -> web.StreamResponse:
        served, volume = self._admit(request)
        return await self._tracked(served, self._send_raw(request, served, volume))

    async def _gzip(self, request: web.Request) -> web.StreamResponse:
        served, volume = self._admit(request)
        return await self._tracked(served, self._send_gzip(request, served, volume))

    async def _tracked(self, served: ServedExport, work: Any) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        served.requests.add(task)
        try:
            response: web.StreamResponse = await work
            return response
        finally:
            served.requests.discard(task)

    async def _send_raw(
        self, request: web.Request, served: ServedExport, volume: str
    ) -> web.StreamResponse:
        layout = await served.layout(volume)
        try:
            wanted = parse_range(request.headers.get("Range", ""), layout.size)
        except ValueError:
            raise web.HTTPRequestRangeNotSatisfiable(
                headers={"Content-Range": f"bytes */{layout.size}"}
            ) from None
        first, last = wanted or (0, layout.size - 1)
        resp = web.StreamResponse(status=206 if wanted else 200)
        resp.content_type = "application/octet-stream"
        resp.content_length = last - first + 1
        resp.headers["Accept-Ranges"] = "bytes"
        if wanted:
            resp.headers["Content-Range"] = f"bytes {first}-{last}/{layout.size}"
        await resp.prepare(request)
        if request.method != "HEAD" and layout.size:
            async for chunk in _read(layout, first, last):
                await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _send_gzip(
        self, request: web.Request, served: ServedExport, volume: str
    ) -> web.StreamResponse:
        layout = await served.layout(volume)
        resp = web.StreamResponse()
        resp.content_type = "application/gzip"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if request.method != "HEAD":
            async for member in gzip_members(_read(layout, 0, layout.size - 1)):
                await resp.write(member)
        await resp.write_eof()
        return resp


def gzip_member(chunk: bytes) -> bytes:
    """One gzip member of ``chunk``: deflated, or stored when a sample shows it does not
    compress (random data deflates at ~20 MB/s here, stores at ~170 MB/s)."""
    sample = chunk[:_SAMPLE]
    level = _GZIP_LEVEL
    if sample and len(zlib.compress(sample, _GZIP_LEVEL)) > 0.9 * len(sample):
        level = 0
    packer = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(chunk) + packer.flush()


@functools.cache
def _zero_member() -> bytes:
    return gzip_member(_ZEROS)


async def gzip_members(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks as consecutive gzip members (a multi-member gzip file, as RFC 1952 allows),
    compressed by two threads at once; a whole chunk of zeros costs nothing."""
    loop = asyncio.get_running_loop()
    pending: collections.deque[asyncio.Future[bytes]] = collections.deque()
    produced = False
    async for chunk in chunks:
        if chunk is _ZEROS:
            ready_member: asyncio.Future[bytes] = loop.create_future()
            ready_member.set_result(_zero_member())
            pending.append(ready_member)
        else:
            pending.append(loop.run_in_executor(None, gzip_member, chunk))
        if len(pending) > _GZIP_THREADS:
            produced = True
            yield await pending.popleft()
    while pending:
        produced = True
        yield await pending.popleft()
    if not produced:
        yield gzip_member(b"")


async def _read(layout: Layout, first: int, last: int) -> AsyncIterator[bytes]:
    """The guest bytes ``first..last`` in chunks: file data read in a thread, zeros shared.

    The next chunk is read while the caller sends the previous one.
    """
    files: dict[Path, int] = {}
    try:
        pending: asyncio.Future[bytes] | None = None
        for source, offset, length in pieces(layout, first, last):
            for pos in range(0, length, _CHUNK):
                size = min(_CHUNK, length - pos)
                if source is None:
                    nxt: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                    nxt.set_result(_ZEROS[:size] if size < _CHUNK else _ZEROS)
                else:
                    fd = files.get(source)
                    if fd is None:
                        fd = files[source] = os.open(source, os.O_RDONLY)
                    nxt = asyncio.ensure_future(asyncio.to_thread(_pread, fd, size, offset + pos))
                if pending is not None:
                    yield await pending
                pending = nxt
        if pending is not None:
            yield await pending
    finally:
        for fd in files.values():
            os.close(fd)


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) < size:  # past the end of a file: the rest reads as zeros
        data += bytes(size - len(data))
    return data


# --- the controller ---------------------------------------------------------------------------


def owner_reference(export: JSON) -> JSON:
    md = export["metadata"]
    return {
        "apiVersion": EXPORT.api_version,
        "kind": EXPORT.kind,
        "name": md["name"],
        "uid": md["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _key(obj: JSON) -> tuple[str, str]:
    md = obj.get("metadata") or {}
    return str(md.get("namespace", "")), str(md.get("name", ""))


class ExportController(Controller):
    """Follows VirtualMachineExports and serves those whose volumes live on this node.

    ``pools``: the node's own pool first, then the host's shared pool.
    """

    def __init__(
        self,
        client: Client,
        node_name: str,
        pools: list[Pool],
        state_dir: Path,
        *,
        backups: BackupLookup | None = None,
    ) -> None:
        super().__init__(client)
        self.name = f"exports-{node_name}"
        self.node_name, self.pools, self.state_dir = node_name, pools, state_dir
        self.server = ExportServer(ExportPki(state_dir / "export-pki"))
        # the pull-mode backups running on this node (the node's backup executor)
        self.backups = backups

    def watches(self) -> Sequence[Watch]:
        return [
            Watch(EXPORT),
            Watch(VMI, self._exports_of_namespace),
            Watch(DATAVOLUME, self._exports_of_namespace),
        ]

    def _exports_of_namespace(self, _etype: str, obj: JSON) -> list[str]:
        """A VMI starting or stopping, a DataVolume finishing: its namespace's exports look
        again (upstream indexes exports by their source; a namespace is close enough here)."""
        return [object_key(e) for e in self.informer(EXPORT).items(_key(obj)[0])]

    async def run(self, stop: asyncio.Event) -> None:
        await self.server.start()
        try:
            await super().run(stop)
        finally:
            await self.server.stop()

    async def reconcile(self, key: str) -> Result | None:
        try:
            return await self.sync(split_key(key))
        except Conflict as exc:
            raise TemporaryError(f"stale read: {exc}", delay=0.1) from exc

    # --- reconcile ----------------------------------------------------------------------------

    async def sync(self, key: tuple[str, str]) -> Result | None:
        namespace, name = key
        export = await self.client.find(EXPORT, name, namespace)
        if export is None or export["metadata"].get("deletionTimestamp"):
            self.server.unregister(namespace, name)
            return None
        kind = source_kind(export)
        if not kind:
            return None
        state = await self._resolve(export, kind)
        if not await self._owned(export, state):
            self.server.unregister(namespace, name)
            return None
        remaining = (expiration_time(export) - dt.datetime.now(dt.UTC)).total_seconds()
        if remaining <= 0:
            log.info("VirtualMachineExport %s/%s expired; deleting it", namespace, name)
            self.server.unregister(namespace, name)
            await self.client.delete(EXPORT, name, namespace)
            return None
        await self._converge(export, state)
        phase = (export.get("status") or {}).get("phase")
        delay = remaining if phase in ("Ready", "Skipped") else min(remaining, REQUEUE_SECONDS)
        return Result.after(max(delay, 0.05))

    async def _owned(self, export: JSON, state: SourceState) -> bool:
        """True when this node is (now) the one to serve the export and write its status."""
        md = export["metadata"]
        owner: str | None = (md.get("annotations") or {}).get(EXPORT_NODE)
        wanted = state.node or owner or self.node_name
        if owner == wanted:
            return owner == self.node_name
        if owner not in (None, self.node_name) and wanted != self.node_name:
            return False
        # unclaimed, ours to hand over, or ours to take: one guarded write decides
        patch = {
            "metadata": {
                "resourceVersion": md["resourceVersion"],
                "annotations": {EXPORT_NODE: wanted},
            }
        }
        try:
            updated = await self.client.patch(EXPORT, md["name"], patch, md["namespace"])
        except (Conflict, NotFound):
            return False
        export.update(updated)
        return wanted == self.node_name

    async def _converge(self, export: JSON, state: SourceState) -> None:
        namespace, name = _key(export)
        spec_ref = (export.get("spec") or {}).get("tokenSecretRef")
        token_ref = spec_ref or (export.get("status") or {}).get("tokenSecretRef")
        backups = self.backups(namespace, name) if state.backup and self.backups else None
        files = self._local_files(namespace, state) if state.available and not backups else None
        serving: Serving | None = None
        not_ready: Condition | None = None
        if files or backups:
            token_ref = token_ref or default_token_secret(name)
            token = await self._token(export, token_ref, generate=not spec_ref)
            if token is None:
                message = f"token secret {namespace}/{token_ref} has no key {TOKEN_KEY!r}"
                not_ready = ready(False, POD_PENDING, message)
            else:
                served = ServedExport(namespace, name, token, files or {}, backups or {})
                self.server.register(served)
                serving = self.server.serving()
        elif state.available:
            not_ready = ready(False, POD_PENDING, f"volumes are not on node {self.node_name}")
        if serving is None:
            self.server.unregister(namespace, name)
        status = export_status(
            export,
            state,
            serving=serving,
            token_secret=token_ref,
            now=dt.datetime.now(dt.UTC),
            not_ready=not_ready,
        )
        await self._write_status(export, status)

    async def _write_status(self, export: JSON, status: JSON) -> None:
        if export.get("status") == status:
            return
        body = {**export, "status": status}
        updated = await self.client.replace(EXPORT, body, subresource="status")
        export.update(updated)

    def _local_files(self, namespace: str, state: SourceState) -> dict[str, VolumeFile] | None:
        files = {}
        for volume in state.volumes:
            found = self._locate(namespace, volume)
            if found is None:
                return None
            files[volume.name] = found
        return files or None

    def _locate(self, namespace: str, volume: ExportVolume) -> VolumeFile | None:
        for pool in self.pools:
            if volume.snapshot and pool.has_snapshot(namespace, volume.snapshot):
                return VolumeFile(pool, namespace, volume.claim, volume.snapshot)
            if not volume.snapshot and pool.exists(namespace, volume.claim):
                return VolumeFile(pool, namespace, volume.claim)
        return None

    async def _token(self, export: JSON, secret_name: str, *, generate: bool) -> str | None:
        namespace = export["metadata"]["namespace"]
        secret = await self.client.find(SECRET, secret_name, namespace)
        if secret is None and generate:
            secret = await self._create_token_secret(export, secret_name)
        if secret is None:
            return None
        raw = (secret.get("data") or {}).get(TOKEN_KEY)
        if raw is None:
            text = (secret.get("stringData") or {}).get(TOKEN_KEY)
            return str(text) if text else None
        return base64.b64decode(raw).decode()

    async def _create_token_secret(self, export: JSON, secret_name: str) -> JSON:
        namespace = export["metadata"]["namespace"]
        token = secrets.token_urlsafe(24)
        body = {
            "metadata": {
                "name": secret_name,
                "namespace": namespace,
                "ownerReferences": [owner_reference(export)],
            },
            "type": "Opaque",
            "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
        }
        try:
            return await self.client.create(SECRET, body, namespace)
        except Conflict:
            return await self.client.get(SECRET, secret_name, namespace)

    # --- sources ------------------------------------------------------------------------------

    async def _resolve(self, export: JSON, kind: str) -> SourceState:
        namespace = export["metadata"]["namespace"]
        name = str(export["spec"]["source"]["name"])
        if kind == "pvc":
            claim = await self._claim_info(namespace, name)
            in_use = claim.populated and await self._claim_in_use(namespace, name)
            return pvc_state(namespace, name, claim, in_use)
        if kind == "backup":
            found = self.backups(namespace, name) if self.backups else None
            if not found:
                message = "VMBackup has no included volumes"
                return SourceState(ready=ready(False, INITIALIZING, message))
            volumes = tuple(ExportVolume(v, "") for v in found)
            return SourceState(
                volumes, True, ready(False, INITIALIZING), node=self.node_name, backup=True
            )
        if kind == "vm":
            vm = await self.client.find(VM, name, namespace)
            claims = {c: await self._claim_info(namespace, c) for c in vm_claims(vm or {})}
            vmi = await self.client.find(VMI, name, namespace) if vm else None
            running = (
                vmi is not None and (vmi.get("status") or {}).get("phase") not in FINAL_VMI_PHASES
            )
            return vm_state(namespace, name, vm=vm, claims=claims, running=running)
        return await self._snapshot_state(namespace, name)

    async def _snapshot_state(self, namespace: str, name: str) -> SourceState:
        snapshot = await self.client.find(VM_SNAPSHOT, name, namespace)
        content_name = ((snapshot or {}).get("status") or {}).get(
            "virtualMachineSnapshotContentName"
        )
        content = None
        if content_name:
            content = await self.client.find(VM_SNAPSHOT_CONTENT, str(content_name), namespace)
        volumes = list(snapshot_volumes(content or {}))
        present = {v.snapshot for v in volumes if self._locate(namespace, v) is not None}
        node = None
        if volumes:
            # the node holding the snapshotted claim serves it; with no claim left, the node
            # whose own pool has the snapshots (the shared pool settles nothing: all see it)
            node = (await self._claim_info(namespace, volumes[0].claim)).node
            own = self.pools[0]
            if node is None and all(own.has_snapshot(namespace, v.snapshot) for v in volumes):
                node = self.node_name
        return snapshot_state(
            namespace, name, snapshot=snapshot, content=content, present=present, node=node
        )

    async def _claim_info(self, namespace: str, claim: str) -> ClaimInfo:
        dv = await self.client.find(DATAVOLUME, claim, namespace)
        local = any(pool.exists(namespace, claim) for pool in self.pools)
        if dv is None:
            # a claim with no DataVolume: its node is the one whose own pool has it
            own = self.node_name if self.pools[0].exists(namespace, claim) else None
            return ClaimInfo(local, local, own, local)
        node = (dv["metadata"].get("annotations") or {}).get(STORAGE_NODE)
        populated = (dv.get("status") or {}).get("phase") == "Succeeded"
        return ClaimInfo(True, populated, str(node) if node else None, bool(node))

    async def _claim_in_use(self, namespace: str, claim: str) -> bool:
        """A VMI that is not final uses the claim (upstream: a pod mounts the PVC)."""
        vmis, _ = await self.client.list(VMI, namespace)
        for vmi in vmis:
            if (vmi.get("status") or {}).get("phase") in FINAL_VMI_PHASES:
                continue
            if any(claim_name(v) == claim for v in (vmi.get("spec") or {}).get("volumes") or []):
                return True
        return False
