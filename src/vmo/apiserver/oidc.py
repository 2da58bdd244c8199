"""OpenID Connect ID tokens as bearer tokens, configured as kube-apiserver's ``--oidc-*`` flags
are: the issuer (whose discovery document names its keys), the client id the token's audience
must hold, the claims that name the user and its groups, their prefixes, the CA that signs the
issuer's certificate, and the accepted signing algorithms.

A token is accepted when its signature checks against one of the issuer's current keys (by
``kid``), its ``iss`` is the issuer exactly, its ``aud`` holds the client id, it has not expired
(``exp``) and is valid already (``nbf``, ``iat``), and its username claim is there (for
``email``, ``email_verified`` must not be false). PyJWT checks the signature and the registered
claims; the keys are fetched from the issuer's ``jwks_uri`` at start, every ``REFRESH`` seconds,
and at once when a token names a key not seen yet (that token is refused; the next passes once
the key is in, as kube-apiserver's first requests after a rotation are).

Usernames get the issuer's URL and ``#`` as prefix unless the claim is ``email`` or a prefix is
given (``-`` for none); groups get ``groups_prefix``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from vmo.apiserver.auth import AUTHENTICATED, Identity

log = logging.getLogger(__name__)

REFRESH = 600.0
FETCH_TIMEOUT = 10.0


class OIDCConfigError(ValueError):
    pass


@dataclass(frozen=True)
class OIDCConfig:
    issuer_url: str
    client_id: str
    username_claim: str = "sub"
    username_prefix: str | None = None  # None: upstream's default; "-": none
    groups_claim: str = ""
    groups_prefix: str = ""
    ca_file: str = ""
    signing_algs: tuple[str, ...] = ("RS256",)

    def __post_init__(self) -> None:
        if not self.issuer_url.startswith("https://"):
            raise OIDCConfigError(f"--oidc-issuer-url: {self.issuer_url!r} must be an https URL")
        if not self.client_id:
            raise OIDCConfigError("--oidc-client-id: required with --oidc-issuer-url")
        bad = [a for a in self.signing_algs if a not in ("RS256", "RS384", "RS512", "ES256",
                                                          "ES384", "ES512", "PS256", "PS384", "PS512")]  # fmt: skip
        if bad:
            raise OIDCConfigError(f"--oidc-signing-algs: {', '.join(bad)} not supported")

    @property
    def prefix(self) -> str:
        if self.username_prefix == "-":
            return ""
        if self.username_prefix is not None:
            return self.username_prefix
        return "" if self.username_claim == "email" else f"{self.issuer_url}#"


@dataclass
class OIDCAuthenticator:
    config: OIDCConfig
    _keys: dict[str, Any] = field(default_factory=dict)
    _anonymous_keys: list[Any] = field(default_factory=list)  # keys published without a kid
    _fetched: float = 0.0
    _refreshing: asyncio.Task[None] | None = None
    _task: asyncio.Task[None] | None = None

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.config.ca_file or None)

    async def refresh(self) -> None:
        """Fetches the discovery document and the keys it names; errors are logged and the keys
        kept (an issuer that is down for a while does not log everyone out)."""
        url = self.config.issuer_url.rstrip("/") + "/.well-known/openid-configuration"
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(url, ssl=self._ssl()) as answer:
                    answer.raise_for_status()
                    discovery = json.loads(await answer.read())
                if discovery.get("issuer") != self.config.issuer_url:
                    raise OIDCConfigError(
                        f"the issuer's discovery document names issuer {discovery.get('issuer')!r}, "
                        f"not {self.config.issuer_url!r}"
                    )
                async with session.get(str(discovery["jwks_uri"]), ssl=self._ssl()) as answer:
                    answer.raise_for_status()
                    jwks = json.loads(await answer.read())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as exc:
            log.warning("OIDC issuer %s: keys not fetched: %s", self.config.issuer_url, exc)
            return
        keys, anonymous = {}, []
        for entry in jwks.get("keys") or []:
            if entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry).key
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError) as exc:
                log.warning("OIDC issuer %s: key %s skipped: %s", self.config.issuer_url,
                            entry.get("kid"), exc)  # fmt: skip
                continue
            if entry.get("kid"):
                keys[str(entry["kid"])] = key
            else:
                anonymous.append(key)
        self._keys, self._anonymous_keys, self._fetched = keys, anonymous, time.monotonic()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            await self.refresh()

    async def stop(self) -> None:
        for task in (self._task, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _refresh_soon(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            return
        if time.monotonic() - self._fetched < 5.0:
            return  # an unknown kid after a fresh fetch: no fetch storm
        with contextlib.suppress(RuntimeError):
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh())

    def looks_like_mine(self, token: str) -> bool:
        """A JWT whose unverified ``iss`` is this issuer's (other JWTs are not for us)."""
        if token.count(".") != 2:
            return False
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return False
        return claims.get("iss") == self.config.issuer_url

    def authenticate(self, token: str) -> Identity | None:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        kid = header.get("kid")
        candidates: Sequence[Any]
        if kid:
            key = self._keys.get(str(kid))
            if key is None:
                self._refresh_soon()
                return None
            candidates = [key]
        else:
            candidates = [*self._keys.values(), *self._anonymous_keys]
        for key in candidates:
            try:
                claims = jwt.decode(
                    token, key, algorithms=list(self.config.signing_algs),
                    audience=self.config.client_id, issuer=self.config.issuer_url,
                    options={"require": ["iss", "aud", "exp", "iat"]},
                )  # fmt: skip
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                log.info("OIDC token refused: %s", exc)
                return None
            return self._identity(claims)
        log.info("OIDC token refused: its signature matches no key of %s", self.config.issuer_url)
        return None

    def _identity(self, claims: dict[str, Any]) -> Identity | None:
        cfg = self.config
        name = claims.get(cfg.username_claim)
        if not isinstance(name, str) or not name:
            log.info("OIDC token refused: no %s claim", cfg.username_claim)
            return None
        if cfg.username_claim == "email" and claims.get("email_verified") is False:
            log.info("OIDC token refused: email %s is not verified", name)
            return None
        groups: list[str] = []
        if cfg.groups_claim:
            raw = claims.get(cfg.groups_claim)
            if isinstance(raw, str):
                groups = [raw]
            elif isinstance(raw, list):
                groups = [g for g in raw if isinstance(g, str)]
        return Identity(
            f"{cfg.prefix}{name}", (*(f"{cfg.groups_prefix}{g}" for g in groups), AUTHENTICATED)
        )


__all__ = ["OIDCAuthenticator", "OIDCConfig", "OIDCConfigError"]
