"""``vmo login``: single sign-on through an OpenID Connect issuer's device authorization grant
(RFC 8628: open a URL, type a code, sign in there), then a kubeconfig whose user is an exec
credential plugin (``vmo login token``) that kubectl, the ``kubernetes`` client and ``vmo`` all
run for a token, refreshed from the issuer when it expires.

The tokens are kept in the home's ``oidc/`` directory (0600), one file per issuer and client.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import ssl
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import yaml

from vmo.home import StateDir, write_private

JSON = dict[str, Any]
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
EARLY = 30  # seconds before expiry a token is refreshed


class LoginError(Exception):
    pass


def _cache(state: StateDir, issuer: str, client_id: str) -> Path:
    digest = hashlib.sha256(f"{issuer}\n{client_id}".encode()).hexdigest()[:16]
    return state.root / "oidc" / f"{digest}.json"


def _ssl(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file or None)


async def _discover(session: aiohttp.ClientSession, issuer: str, ca: ssl.SSLContext) -> JSON:
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    async with session.get(url, ssl=ca) as answer:
        if answer.status != 200:
            raise LoginError(f"{url}: {answer.status}")
        found: JSON = json.loads(await answer.read())
    if found.get("issuer") != issuer:
        raise LoginError(f"the issuer at {issuer} calls itself {found.get('issuer')!r}")
    return found


async def device_login(issuer: str, client_id: str, ca_file: str, scope: str) -> JSON:
    """The device flow, to its end: the token endpoint's answer."""
    ca = _ssl(ca_file)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        found = await _discover(session, issuer, ca)
        endpoint = found.get("device_authorization_endpoint")
        if not endpoint:
            raise LoginError(f"the issuer at {issuer} offers no device authorization")
        async with session.post(str(endpoint), data={"client_id": client_id, "scope": scope},
                                ssl=ca) as answer:  # fmt: skip
            device = json.loads(await answer.read())
            if answer.status != 200:
                raise LoginError(
                    f"device authorization refused: {device.get('error', answer.status)}"
                )
        where = device.get("verification_uri_complete") or device["verification_uri"]
        print(f"To sign in, open {where}\nand enter the code {device['user_code']}", file=sys.stderr,
              flush=True)  # fmt: skip
        interval = float(device.get("interval") or 5)
        deadline = time.monotonic() + float(device.get("expires_in") or 600)
        while time.monotonic() < deadline:
            await asyncio.sleep(interval)
            form = {"grant_type": DEVICE_GRANT, "device_code": device["device_code"],
                    "client_id": client_id}  # fmt: skip
            async with session.post(str(found["token_endpoint"]), data=form, ssl=ca) as answer:
                tokens: JSON = json.loads(await answer.read())
            if answer.status == 200 and tokens.get("id_token"):
                return {**tokens, "token_endpoint": found["token_endpoint"]}
            error = tokens.get("error")
            if error == "slow_down":
                interval += 5
            elif error != "authorization_pending":
                raise LoginError(f"sign-in failed: {error or answer.status}")
        raise LoginError("the code expired before the sign-in was approved")


async def refreshed(cached: JSON, client_id: str, ca_file: str) -> JSON:
    form = {"grant_type": "refresh_token", "refresh_token": cached.get("refresh_token", ""),
            "client_id": client_id}  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(str(cached["token_endpoint"]), data=form, ssl=_ssl(ca_file)) as answer,
    ):
        tokens: JSON = json.loads(await answer.read())
    if answer.status != 200 or not tokens.get("id_token"):
        raise LoginError(
            f"the refresh was refused ({tokens.get('error', answer.status)}): run vmo login"
        )
    return {**cached, **tokens}


def _expiry(id_token: str) -> int:
    return int(jwt.decode(id_token, options={"verify_signature": False}).get("exp", 0))


def cmd_login(args: argparse.Namespace, state: StateDir) -> int:
    if not args.issuer_url or not args.client_id:
        print("vmo login: --issuer-url and --client-id are required", file=sys.stderr)
        return 2
    try:
        tokens = asyncio.run(
            device_login(args.issuer_url, args.client_id, args.ca_file, args.scope)
        )
    except (LoginError, aiohttp.ClientError, OSError) as exc:
        print(f"vmo login: {exc}", file=sys.stderr)
        return 1
    cache = _cache(state, args.issuer_url, args.client_id)
    cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(cache, json.dumps(tokens))
    claims = jwt.decode(tokens["id_token"], options={"verify_signature": False})
    server = args.server or state.url_file.read_text().strip()
    ca = args.certificate_authority or str(state.pki / "ca.crt")
    token_args = ["-m", "vmo.cli.main", "--home", str(state.root), "login", "token",
                  "--issuer-url", args.issuer_url, "--client-id", args.client_id]  # fmt: skip
    if args.ca_file:
        token_args += ["--ca-file", str(Path(args.ca_file).resolve())]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "vmo", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "oidc", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
            "args": token_args, "interactiveMode": "IfAvailable", "provideClusterInfo": False}}}],
        "contexts": [{"name": "vmo-oidc", "context": {"cluster": "vmo", "user": "oidc",
                                                      "namespace": args.namespace}}],
        "current-context": "vmo-oidc",
    }  # fmt: skip
    out = Path(args.output) if args.output else state.root / "oidc.kubeconfig"
    write_private(out, yaml.safe_dump(config, sort_keys=False))
    print(f"signed in as {claims.get('sub')} ({claims.get('email', '')}); kubeconfig: {out}")
    return 0


def cmd_token(args: argparse.Namespace, state: StateDir) -> int:
    cache = _cache(state, args.issuer_url, args.client_id)
    try:
        cached: JSON = json.loads(cache.read_text())
    except (OSError, ValueError):
        print(
            f"vmo login token: not signed in to {args.issuer_url}: run vmo login", file=sys.stderr
        )
        return 1
    if _expiry(cached["id_token"]) - EARLY < time.time():
        try:
            cached = asyncio.run(refreshed(cached, args.client_id, args.ca_file))
        except (LoginError, aiohttp.ClientError, OSError) as exc:
            print(f"vmo login token: {exc}", file=sys.stderr)
            return 1
        write_private(cache, json.dumps(cached))
    expires = datetime.fromtimestamp(_expiry(cached["id_token"]), UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                      "status": {"token": cached["id_token"], "expirationTimestamp": expires}}))  # fmt: skip
    return 0


def add_login_commands(sub: Any, state_of: Any) -> None:
    login = sub.add_parser("login", help="sign in through an OpenID Connect issuer (device flow)")
    login.add_argument("--issuer-url", default="")
    login.add_argument("--client-id", default="")
    login.add_argument("--ca-file", default="", help="the CA of the issuer's certificate")
    login.add_argument("--scope", default="openid email groups offline_access")
    login.add_argument("--server", default="", help="the API server (default: this home's)")
    login.add_argument("--certificate-authority", default="", help="the API server's CA")
    login.add_argument("-n", "--namespace", default="virtual-machines")
    login.add_argument("-o", "--output", default="", help="the kubeconfig to write")
    login.set_defaults(func=lambda a: cmd_login(a, state_of(a)))
    verbs = login.add_subparsers(dest="login_command")
    token = verbs.add_parser("token", help="print an ExecCredential (the kubeconfig runs this)")
    token.add_argument("--issuer-url", required=True)
    token.add_argument("--client-id", required=True)
    token.add_argument("--ca-file", default="")
    token.set_defaults(func=lambda a: cmd_token(a, state_of(a)))


__all__ = ["add_login_commands", "cmd_login", "cmd_token", "device_login"]
