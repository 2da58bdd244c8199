"""An OpenID Connect issuer of the test suite's own, over HTTPS on loopback in a thread: the
discovery document, the signing keys (RSA, made at start), the device authorization grant
(RFC 8628) with a test-side approval in place of a browser, refresh tokens, and real signed ID
tokens. ``mint`` signs any token a test needs, good or bad."""

from __future__ import annotations

import asyncio
import secrets
import ssl
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from vmo.apiserver import pki

JSON = dict[str, Any]
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class _Device:
    user_code: str
    client_id: str
    approved: JSON | None = None  # the identity claims once approved


@dataclass
class ThreadedIssuer:
    home: Path
    id_token_seconds: int = 300
    url: str = ""
    ca_file: str = ""
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    kid: str = "k1"
    _devices: dict[str, _Device] = field(default_factory=dict)
    _refresh: dict[str, tuple[str, JSON]] = field(default_factory=dict)  # token -> (client, claims)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    def start(self) -> ThreadedIssuer:
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="oidc-issuer", daemon=True
        )
        self._thread.start()
        future: Future[str] = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.url = future.result(30)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(30)
        self._loop.close()

    async def _start(self) -> str:
        (self.home / "pki").mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = pki.ensure_ca(self.home / "pki")
        serving = pki.ensure_serving(ca, self.home / "pki")
        self.ca_file = str(ca.cert)
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/keys", self._keys)
        app.router.add_post("/device", self._device)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(serving.cert), str(serving.key))
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"https://127.0.0.1:{port}"

    # --- what a test does ----------------------------------------------------------------------

    def approve(
        self, user_code: str, sub: str, *, email: str = "", groups: tuple[str, ...] = ()
    ) -> None:
        """The person at the browser signs in as ``sub`` and approves ``user_code``."""
        for device in self._devices.values():
            if device.user_code == user_code:
                device.approved = {"sub": sub, "email": email or f"{sub}@example.test",
                                   "email_verified": True, "groups": list(groups)}  # fmt: skip
                return
        raise KeyError(f"no device flow with user code {user_code}")

    def pending_codes(self) -> list[str]:
        return [d.user_code for d in self._devices.values() if d.approved is None]

    def mint(
        self,
        claims: JSON,
        *,
        audience: str,
        issuer: str | None = None,
        seconds: int | None = None,
        key: rsa.RSAPrivateKey | None = None,
        kid: str | None = None,
    ) -> str:
        now = int(time.time())
        body = {"iss": issuer or self.url, "aud": audience, "iat": now,
                "exp": now + (self.id_token_seconds if seconds is None else seconds), **claims}  # fmt: skip
        return jwt.encode(
            body, key or self.key, algorithm="RS256", headers={"kid": kid or self.kid}
        )

    # --- the endpoints -------------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.url,
            "jwks_uri": f"{self.url}/keys",
            "token_endpoint": f"{self.url}/token",
            "device_authorization_endpoint": f"{self.url}/device",
            "authorization_endpoint": f"{self.url}/authorize",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "grant_types_supported": [DEVICE_GRANT, "refresh_token"],
        })  # fmt: skip

    async def _keys(self, request: web.Request) -> web.Response:
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return web.json_response(
            {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "RS256"}]}
        )

    async def _device(self, request: web.Request) -> web.Response:
        form = await request.post()
        device_code = secrets.token_urlsafe(24)
        user_code = f"{secrets.randbelow(10**4):04d}-{secrets.randbelow(10**4):04d}"
        self._devices[device_code] = _Device(user_code, str(form.get("client_id", "")))
        return web.json_response({
            "device_code": device_code, "user_code": user_code,
            "verification_uri": f"{self.url}/activate",
            "verification_uri_complete": f"{self.url}/activate?user_code={user_code}",
            "expires_in": 600, "interval": 1,
        })  # fmt: skip

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant = form.get("grant_type")
        if grant == DEVICE_GRANT:
            device = self._devices.get(str(form.get("device_code", "")))
            if device is None:
                return web.json_response({"error": "expired_token"}, status=400)
            if device.approved is None:
                return web.json_response({"error": "authorization_pending"}, status=400)
            del self._devices[str(form["device_code"])]
            return self._tokens(device.client_id, device.approved)
        if grant == "refresh_token":
            found = self._refresh.pop(str(form.get("refresh_token", "")), None)
            if found is None:
                return web.json_response({"error": "invalid_grant"}, status=400)
            return self._tokens(*found)
        return web.json_response({"error": "unsupported_grant_type"}, status=400)

    def _tokens(self, client_id: str, claims: JSON) -> web.Response:
        refresh = secrets.token_urlsafe(24)
        self._refresh[refresh] = (client_id, claims)
        return web.json_response({
            "access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
            "expires_in": self.id_token_seconds, "refresh_token": refresh,
            "id_token": self.mint(claims, audience=client_id),
        })  # fmt: skip


__all__ = ["ThreadedIssuer"]
