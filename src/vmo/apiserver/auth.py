"""Authentication: static user tokens, ServiceAccount tokens, client certificates, anonymous.

User tokens live in ``tokens.json`` under the state directory as SHA-256 digests, never in clear.
ServiceAccount tokens are HS256 JWTs signed with a key of the server's; they are valid only while
the ServiceAccount with the same uid exists, as bound tokens are upstream. A request without
credentials is ``system:anonymous`` on the public-info paths only, as kube-apiserver's anonymous
authenticator is when its configuration lists conditions; elsewhere it is refused (401).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"
ANONYMOUS_USER = "system:anonymous"
# what the bootstrap ClusterRole system:public-info-viewer grants to everyone
PUBLIC_INFO_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version", "/version/"})
SA_PREFIX = "system:serviceaccount:"
ISSUER = "https://vmo.dev/embedded"


@dataclass(frozen=True)
class Identity:
    name: str
    groups: tuple[str, ...]
    uid: str = ""


ANONYMOUS = Identity(ANONYMOUS_USER, (UNAUTHENTICATED,))


class TokenFile:
    """Users known by bearer token. The file maps token digests to user names and groups."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, Identity] = {}
        self._mtime = 0.0
        self.reload()

    def reload(self) -> None:
        if not self.path.exists():
            self._users = {}
            return
        self._mtime = self.path.stat().st_mtime
        entries = json.loads(self.path.read_text())
        self._users = {
            e["sha256"]: Identity(e["user"], tuple(e.get("groups", [])), e.get("uid", ""))
            for e in entries
        }

    def lookup(self, token: str) -> Identity | None:
        if self.path.exists() and self.path.stat().st_mtime != self._mtime:
            self.reload()
        digest = hashlib.sha256(token.encode()).hexdigest()
        return self._users.get(digest)

    def add(self, user: str, groups: tuple[str, ...]) -> str:
        """Adds a user with a new token and returns the token (shown once)."""
        token = secrets.token_urlsafe(32)
        entries: list[dict[str, Any]] = (
            json.loads(self.path.read_text()) if self.path.exists() else []
        )
        entries = [e for e in entries if e["user"] != user]
        entries.append(
            {
                "user": user,
                "groups": list(groups),
                "uid": secrets.token_hex(8),
                "sha256": hashlib.sha256(token.encode()).hexdigest(),
            }
        )
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(entries, fh, indent=1)
        os.replace(tmp, self.path)
        self.reload()
        return token


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ServiceAccountTokens:
    """Issues and checks ServiceAccount JWTs (HS256) bound to the account's uid."""

    def __init__(self, key_path: Path) -> None:
        if not key_path.exists():
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
        self._key = key_path.read_bytes()

    def issue(
        self, namespace: str, name: str, uid: str, *, seconds: int, audiences: list[str]
    ) -> tuple[str, int]:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": audiences or [ISSUER],
            "sub": f"{SA_PREFIX}{namespace}:{name}",
            "iat": now,
            "nbf": now,
            "exp": now + seconds,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
        }
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = _b64(
            hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        )
        return f"{header}.{payload}.{signature}", claims["exp"]  # type: ignore[return-value]

    def verify(self, token: str) -> dict[str, Any] | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        expected = hmac.new(self._key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(expected, _unb64(parts[2])):
                return None
            claims: dict[str, Any] = json.loads(_unb64(parts[1]))
        except (ValueError, json.JSONDecodeError):
            return None
        if claims.get("exp", 0) < time.time():
            return None
        return claims


ServiceAccountLookup = Callable[[str, str], str | None]
"""(namespace, name) -> uid of the ServiceAccount, or None when it does not exist."""


class IssuerTokens(Protocol):
    """Tokens of an outside issuer (OpenID Connect, ``vmo.apiserver.oidc``)."""

    def looks_like_mine(self, token: str) -> bool: ...

    def authenticate(self, token: str) -> Identity | None: ...


class Authenticator:
    def __init__(
        self,
        tokens: TokenFile,
        sa_tokens: ServiceAccountTokens,
        sa_lookup: ServiceAccountLookup,
        *,
        anonymous_paths: frozenset[str] = PUBLIC_INFO_PATHS,
        issuer: IssuerTokens | None = None,
    ) -> None:
        self.tokens = tokens
        self.sa_tokens = sa_tokens
        self._sa_lookup = sa_lookup
        self.anonymous_paths = anonymous_paths
        self.issuer = issuer

    def authenticate(
        self, headers: Mapping[str, str], peercert: dict[str, Any] | None, path: str = ""
    ) -> Identity | None:
        """The caller, or None (401). Credentials that fail never fall back to anonymous."""
        auth = headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return self._from_token(auth[7:].strip())
        if peercert:
            return _from_certificate(peercert)
        if "Authorization" not in headers and path in self.anonymous_paths:
            return ANONYMOUS
        return None

    def _from_token(self, token: str) -> Identity | None:
        user = self.tokens.lookup(token)
        if user is not None:
            return _with_authenticated(user)
        if self.issuer is not None and self.issuer.looks_like_mine(token):
            return self.issuer.authenticate(token)
        claims = self.sa_tokens.verify(token)
        if claims is None:
            return None
        sa = claims.get("kubernetes.io", {})
        namespace, account = sa.get("namespace", ""), sa.get("serviceaccount", {})
        if self._sa_lookup(namespace, account.get("name", "")) != account.get("uid"):
            return None
        return Identity(
            f"{SA_PREFIX}{namespace}:{account.get('name')}",
            ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED),
            account.get("uid", ""),
        )


def _with_authenticated(user: Identity) -> Identity:
    if AUTHENTICATED in user.groups:
        return user
    return Identity(user.name, (*user.groups, AUTHENTICATED), user.uid)


def _from_certificate(peercert: dict[str, Any]) -> Identity | None:
    common_name, groups = "", []
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                common_name = value
            elif attr == "organizationName":
                groups.append(value)
    if not common_name:
        return None
    return _with_authenticated(Identity(common_name, tuple(groups)))
