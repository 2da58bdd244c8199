"""``vmo export create|download|delete``: VirtualMachineExports as ``virtctl vmexport`` does them.

``download`` waits for the export to be Ready, reads its token Secret through the API, fetches
the volume over HTTPS (trusting the export's own CA from ``status.links``), shows progress and
checks the size: a raw download must match its Content-Length, a gzip download must be one whole
gzip stream whose content is as long as the raw volume.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import ssl
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from vmo.client import SECRET, ApiStatusError, Client, Credentials, Resource

JSON = dict[str, Any]

EXPORT = Resource("export.kubevirt.io", "v1", "virtualmachineexports", "VirtualMachineExport")
TOKEN_HEADER = "x-kubevirt-export-token"
FORMAT_FILES = {"raw": "disk.img", "gzip": "disk.img.gz"}
SOURCES = {
    "vm": ("kubevirt.io", "VirtualMachine"),
    "snapshot": ("snapshot.kubevirt.io", "VirtualMachineSnapshot"),
    "pvc": ("", "PersistentVolumeClaim"),
}
_CHUNK = 1 << 20


class DownloadError(Exception):
    """The export cannot be downloaded as asked; the message says why."""


# --- decisions (pure) -------------------------------------------------------------------------


def export_body(name: str, namespace: str, *, kind: str, source: str, ttl: str = "") -> JSON:
    group, source_kind = SOURCES[kind]
    spec: JSON = {"source": {"apiGroup": group, "kind": source_kind, "name": source}}
    if ttl:
        spec["ttlDuration"] = ttl
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def pick_link(export: JSON, volume: str, fmt: str) -> tuple[str, str]:
    """(url, CA PEM) of ``volume`` (may be empty when the export has one) in ``fmt``."""
    links = (export.get("status") or {}).get("links") or {}
    link = links.get("external") or links.get("internal") or {}
    volumes = link.get("volumes") or []
    if not volume:
        if len(volumes) != 1:
            names = ", ".join(str(v.get("name")) for v in volumes) or "none"
            raise DownloadError(
                f"the export has several volumes ({names}); choose one with --volume"
            )
        chosen = volumes[0]
    else:
        found = [v for v in volumes if v.get("name") == volume]
        if not found:
            names = ", ".join(str(v.get("name")) for v in volumes) or "none"
            raise DownloadError(f"--volume {volume}: not in the export (volumes: {names})")
        chosen = found[0]
    for entry in chosen.get("formats") or []:
        if entry.get("format") == fmt:
            return str(entry["url"]), str(link.get("cert") or "")
    raise DownloadError(f"--format {fmt}: volume {chosen.get('name')} is not offered as {fmt}")


def waiting_reason(export: JSON) -> str:
    status = export.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            text = cond.get("message") or cond.get("reason") or ""
            return f"{status.get('phase', 'Pending')}: {text}".rstrip(": ")
    return str(status.get("phase") or "Pending")


# --- actions ----------------------------------------------------------------------------------


async def create(
    client: Client, namespace: str, name: str, *, kind: str, source: str, ttl: str = ""
) -> int:
    body = export_body(name, namespace, kind=kind, source=source, ttl=ttl)
    await client.create(EXPORT, body, namespace)
    print(f"VirtualMachineExport {namespace}/{name} created")
    return 0


async def delete(client: Client, namespace: str, name: str) -> int:
    gone = await client.delete(EXPORT, name, namespace)
    print(f"VirtualMachineExport {namespace}/{name} {'deleted' if gone else 'not found'}")
    return 0


async def wait_ready(
    client: Client, namespace: str, name: str, *, timeout: float, say: Callable[[str], None]
) -> JSON:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        export = await client.get(EXPORT, name, namespace)
        phase = (export.get("status") or {}).get("phase")
        if phase == "Ready":
            return export
        if phase == "Skipped":
            raise DownloadError(f"the export has nothing to download ({waiting_reason(export)})")
        reason = waiting_reason(export)
        if reason != last:
            say(f"waiting for VirtualMachineExport {namespace}/{name}: {reason}")
            last = reason
        if time.monotonic() > deadline:
            raise DownloadError(f"not Ready after {timeout:.0f} s ({reason})")
        await asyncio.sleep(1.0)


async def read_token(client: Client, namespace: str, export: JSON) -> str:
    ref = (export.get("status") or {}).get("tokenSecretRef")
    if not ref:
        raise DownloadError("the export names no token Secret (status.tokenSecretRef)")
    secret = await client.get(SECRET, str(ref), namespace)
    raw = (secret.get("data") or {}).get("token")
    if not raw:
        raise DownloadError(f"Secret {namespace}/{ref} has no key 'token'")
    return base64.b64decode(raw).decode()


def _ssl_context(cert_pem: str, insecure: bool) -> ssl.SSLContext | bool:
    if insecure:
        return False
    if not cert_pem:
        raise DownloadError("the export's links carry no CA certificate; use --insecure")
    return ssl.create_default_context(cadata=cert_pem)


async def download(
    client: Client,
    namespace: str,
    name: str,
    *,
    volume: str = "",
    output: str = "",
    fmt: str = "raw",
    insecure: bool = False,
    timeout: float = 600.0,
    quiet: bool = False,
) -> int:
    def say(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    export = await wait_ready(client, namespace, name, timeout=timeout, say=say)
    url, cert = pick_link(export, volume, fmt)
    token = await read_token(client, namespace, export)
    target = Path(output or FORMAT_FILES[fmt])
    context = _ssl_context(cert, insecure)
    headers = {TOKEN_HEADER: token, "Accept-Encoding": "identity"}
    timeouts = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeouts, auto_decompress=False) as session:
        expected = None
        if fmt == "gzip":
            raw_url, _ = pick_link(export, volume, "raw")
            async with session.head(raw_url, headers=headers, ssl=context) as head:
                _check_status(head)
                expected = head.content_length
        written = await _fetch(session, url, target, headers, context, fmt, quiet=quiet)
    if expected is not None and written != expected:
        target.unlink(missing_ok=True)
        raise DownloadError(f"gzip content is {written} bytes, the raw volume {expected}")
    say(f"downloaded {target} ({target.stat().st_size} bytes, {fmt})")
    return 0


def _check_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status == 401:
        raise DownloadError("the export server refused the token (401)")
    if resp.status not in (200, 206):
        raise DownloadError(f"the export server answered {resp.status} {resp.reason}")


async def _fetch(
    session: aiohttp.ClientSession,
    url: str,
    target: Path,
    headers: dict[str, str],
    context: ssl.SSLContext | bool,
    fmt: str,
    *,
    quiet: bool,
) -> int:
    """Writes the body to ``target``; returns the content size checked (raw bytes)."""
    part = target.with_name(f".{target.name}.part")
    try:
        async with session.get(url, headers=headers, ssl=context) as resp:
            _check_status(resp)
            total = resp.content_length
            size = await _stream_to(resp, part, total, fmt, quiet=quiet)
        os.replace(part, target)
        return size
    finally:
        part.unlink(missing_ok=True)


async def _stream_to(
    resp: aiohttp.ClientResponse, part: Path, total: int | None, fmt: str, *, quiet: bool
) -> int:
    received = 0
    inflater = _Inflater() if fmt == "gzip" else None
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=quiet) as progress, part.open("wb") as fh:
        task = progress.add_task(part.name.removeprefix(".").removesuffix(".part"), total=total)
        async for chunk in resp.content.iter_chunked(_CHUNK):
            fh.write(chunk)
            received += len(chunk)
            if inflater is not None:
                inflater.feed(chunk)
            progress.update(task, completed=received)
    if total is not None and received != total:
        raise DownloadError(f"short download: {received} of {total} bytes")
    if inflater is not None:
        return inflater.finish()
    return received


class _Inflater:
    """Counts the content of a gzip stream of one or more members (RFC 1952 allows several)."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.size = 0
        self._in_member = False

    def feed(self, chunk: bytes) -> None:
        data, more = chunk, False
        # output is bounded per call; a full-size output may have more behind it
        while data or more:
            self._in_member = True
            out = self._z.decompress(data, _CHUNK)
            self.size += len(out)
            data, more = self._z.unconsumed_tail, len(out) == _CHUNK
            if self._z.eof:
                # at a member's end the rest of the input is in unused_data (CPython repeats
                # it in unconsumed_tail when the output bound was hit too)
                data, more = self._z.unused_data, False
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._in_member = False

    def finish(self) -> int:
        if self._in_member:
            raise DownloadError("truncated gzip stream")
        return self.size


# --- the command line -------------------------------------------------------------------------


def run(creds: Credentials, action: Callable[[Client], Any]) -> int:
    async def main() -> int:
        async with Client(creds) as client:
            code: int = await action(client)
            return code

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
    except DownloadError as exc:
        print(f"vmo export: {exc}", flush=True)
        return 1
    except ApiStatusError as exc:
        message = exc.status.get("message") if isinstance(exc.status, dict) else None
        print(f"vmo export: {message or exc}", flush=True)
        return 2
    except (aiohttp.ClientError, OSError) as exc:
        print(f"vmo export: {exc}", flush=True)
        return 1


def add_export_commands(
    sub: Any,
    creds_of: Callable[[argparse.Namespace], Credentials],
    namespace_of: Callable[[argparse.Namespace, Credentials], str],
) -> None:
    """``vmo export …``; the caller passes how it finds credentials and the namespace."""
    export = sub.add_parser("export", help="export VM volumes (VirtualMachineExport)")
    verbs = export.add_subparsers(dest="export_command", required=True)

    def common(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("name", help="the VirtualMachineExport's name")
        cmd.add_argument("-n", "--namespace", default="")
        cmd.add_argument("--kubeconfig", default="")

    create_cmd = verbs.add_parser("create", help="create an export of a VM, snapshot or claim")
    common(create_cmd)
    which = create_cmd.add_mutually_exclusive_group(required=True)
    for kind in SOURCES:
        which.add_argument(f"--{kind}", default="", metavar="NAME")
    create_cmd.add_argument("--ttl", default="", help="time to live, e.g. 1h (default 2h)")

    get = verbs.add_parser("download", help="download a volume of an export")
    common(get)
    get.add_argument("--volume", default="", help="needed when the export has several")
    get.add_argument("--output", default="", help="default disk.img or disk.img.gz")
    get.add_argument("--format", choices=sorted(FORMAT_FILES), default="raw")
    get.add_argument("--insecure", action="store_true", help="do not verify the server's cert")
    get.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for Ready")

    remove = verbs.add_parser("delete", help="delete an export")
    common(remove)

    def command(args: argparse.Namespace) -> int:
        creds = creds_of(args)
        namespace = namespace_of(args, creds)
        if args.export_command == "create":
            kind = next(k for k in SOURCES if getattr(args, k))
            return run(
                creds,
                lambda c: create(
                    c, namespace, args.name, kind=kind, source=getattr(args, kind), ttl=args.ttl
                ),
            )
        if args.export_command == "delete":
            return run(creds, lambda c: delete(c, namespace, args.name))
        return run(
            creds,
            lambda c: download(
                c,
                namespace,
                args.name,
                volume=args.volume,
                output=args.output,
                fmt=args.format,
                insecure=args.insecure,
                timeout=args.timeout,
            ),
        )

    for cmd in (create_cmd, get, remove):
        cmd.set_defaults(func=command)
