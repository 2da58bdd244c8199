"""The HTTPS server a restore's DataVolumes import from: each restored disk, streamed raw.

A BackupRestore turns every disk it restores into a CDI DataVolume with an ``http`` source whose
URL points here (``/restores/<namespace>/<restore>/<volume>``), with basic-auth credentials in
a Secret (``secretRef``, CDI's keys ``accessKeyId``/``secretKey``) and this server's CA in a
ConfigMap (``certConfigMap``). So the restore works through CDI's own importer on any cluster,
and through the embedded engine's. Each disk is served only while its restore is in progress,
only to the restore's own credentials; chunks are read from the repository in order, a few
ahead, each checked against its id: a damaged chunk aborts the response, so the importer sees a
short body and fails rather than writing a wrong disk. ``HEAD`` and single ``Range`` requests
are answered too (CDI's nbdkit-based importer asks for them).

The certificate is self-signed per process (ECDSA P-256, via ``cryptography``), for the names
and addresses in the URL the importers are given.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hmac
import ipaddress
import logging
import re
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import BasicAuth, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vmo.controllers.backup.repository import ZERO, DiskIndex, Repository, RepositoryError

log = logging.getLogger(__name__)

PATH = "/restores/{namespace}/{name}/{volume}"
AHEAD = 4  # chunks read ahead of the one being sent
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Served:
    repo: Repository
    index: DiskIndex
    user: str
    password: str


def _certificate(hosts: list[str]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmo-backup-restore")])
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class RestoreServer:
    """Serves registered disks over HTTPS at ``listen``; ``url`` is how importers reach it
    (default: the listening address itself)."""

    def __init__(self, listen: str = "127.0.0.1:0", url: str = "") -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port or 0)
        self._url = url.rstrip("/")
        self.served: dict[tuple[str, str, str], Served] = {}
        self.ca_pem = b""
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return self._url or f"https://{self.host}:{self.port}"

    def volume_url(self, namespace: str, name: str, volume: str) -> str:
        return self.url + PATH.format(namespace=namespace, name=name, volume=volume)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", PATH, self._get)
        app.router.add_route("HEAD", PATH, self._get)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        hosts = sorted({self.host, *([urlsplit(self._url).hostname or ""] if self._url else [])})
        cert, key = _certificate([h for h in hosts if h and h not in ("0.0.0.0", "::")])
        self.ca_pem = cert
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory(prefix="vmo-restore-") as tmp:
            (Path(tmp) / "cert.pem").write_bytes(cert)
            (Path(tmp) / "key.pem").write_bytes(key)
            context.load_cert_chain(Path(tmp) / "cert.pem", Path(tmp) / "key.pem")
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=context)
        await site.start()
        if self.port == 0:
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1])
        log.info("backup restores served at %s", self.url)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def serve(self, namespace: str, name: str, volume: str, served: Served) -> None:
        self.served[(namespace, name, volume)] = served

    def forget(self, namespace: str, name: str) -> None:
        for key in [k for k in self.served if k[:2] == (namespace, name)]:
            del self.served[key]

    # --- the endpoint -------------------------------------------------------------------------

    async def _get(self, request: web.Request) -> web.StreamResponse:
        m = request.match_info
        served = self.served.get((m["namespace"], m["name"], m["volume"]))
        if served is None or not self._authorized(request, served):
            # the same answer for "no such restore" and "wrong credentials"
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="vmo"'})
        size = served.index.size
        start, end = 0, size
        status = 200
        header = request.headers.get("Range", "")
        if header:
            parsed = _RANGE.match(header.strip())
            if parsed is None or (not parsed[1] and not parsed[2]):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            if parsed[1]:
                start = int(parsed[1])
                end = min(int(parsed[2]) + 1, size) if parsed[2] else size
            else:  # the last N bytes
                start = max(size - int(parsed[2]), 0)
            if start >= end:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
        resp = web.StreamResponse(status=status)
        resp.content_type = "application/octet-stream"
        resp.content_length = end - start
        resp.headers["Accept-Ranges"] = "bytes"
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        try:
            await self._stream(resp, served, start, end)
        except (RepositoryError, OSError) as exc:
            log.warning("restore of %s stopped: %s", request.path, exc)
            if request.transport is not None:
                request.transport.close()  # a short body: the importer fails, writes nothing
            return resp
        await resp.write_eof()
        return resp

    @staticmethod
    def _authorized(request: web.Request, served: Served) -> bool:
        try:
            auth = BasicAuth.decode(request.headers.get("Authorization", ""))
        except ValueError:
            return False
        return hmac.compare_digest(auth.login.encode(), served.user.encode()) and (
            hmac.compare_digest(auth.password.encode(), served.password.encode())
        )

    async def _stream(self, resp: web.StreamResponse, served: Served, start: int, end: int) -> None:
        index, repo = served.index, served.repo
        cs = index.chunk_size
        first, last = start // cs, (end - 1) // cs

        async def chunk(i: int) -> bytes:
            length = min(cs, index.size - i * cs)
            digest = index.digests[i]
            if digest == ZERO:
                return bytes(length)
            if repo.local:
                data = await asyncio.to_thread(repo.load_chunk_blocking, digest)
            else:
                data = await repo.get_chunk(digest)
            if len(data) != length:
                raise RepositoryError(f"chunk {i} of {index.name} holds {len(data)} bytes")
            return data

        loop = asyncio.get_running_loop()
        pending: collections.deque[asyncio.Task[bytes]] = collections.deque()
        upcoming = iter(range(first, last + 1))
        for i in upcoming:
            pending.append(loop.create_task(chunk(i)))
            if len(pending) >= AHEAD:
                break
        i = first
        try:
            while pending:
                data = await pending.popleft()
                nxt = next(upcoming, None)
                if nxt is not None:
                    pending.append(loop.create_task(chunk(nxt)))
                lo = start - i * cs if i == first else 0
                hi = end - i * cs if i == last else len(data)
                await resp.write(data[lo:hi])
                i += 1
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


__all__ = ["PATH", "RestoreServer", "Served"]
