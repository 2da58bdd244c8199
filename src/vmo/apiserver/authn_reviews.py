"""The ``authentication.k8s.io`` reviews: who the caller is, and whose a bearer token is.

Like upstream's, they are answered from the request and never stored: ``SelfSubjectReview``
(``kubectl auth whoami``) shows the caller as the server authenticated it, ``TokenReview`` (used by
webhook authenticators) names the user a token stands for.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from vmo.api.types import JSON
from vmo.apiserver import errors
from vmo.apiserver.auth import Authenticator, Identity

__all__ = ["AUTHN_GROUP", "authentication_reviews", "self_subject_review", "token_review"]

AUTHN_GROUP = "authentication.k8s.io"
_API_VERSION = f"{AUTHN_GROUP}/v1"

Review = Callable[[JSON, Identity, str], JSON]
"""(request body, caller, namespace) -> the answered review."""


def authentication_reviews(authenticator: Authenticator) -> dict[tuple[str, str], Review]:
    """The reviews of this group by (group, plural), as the API server's computed kinds."""
    return {
        (AUTHN_GROUP, "selfsubjectreviews"): self_subject_review,
        (AUTHN_GROUP, "tokenreviews"): token_review(authenticator),
    }


def self_subject_review(body: JSON, user: Identity, namespace: str) -> JSON:
    """The caller's user information; the request carries nothing to read."""
    return _answer("SelfSubjectReview", {"status": {"userInfo": _user_info(user)}})


def token_review(authenticator: Authenticator) -> Review:
    """A TokenReview answerer that authenticates ``spec.token`` as a request's bearer token."""

    def review(body: JSON, user: Identity, namespace: str) -> JSON:
        spec = body.get("spec")
        token = spec.get("token") if isinstance(spec, dict) else None
        if not isinstance(token, str) or not token:
            # upstream's own words for an empty token
            raise errors.bad_request("token is required for TokenReview in authentication")
        who = authenticator.authenticate({"Authorization": f"Bearer {token}"}, None)
        status: JSON = {"authenticated": who is not None}
        if who is not None:
            status["user"] = _user_info(who)
        return _answer("TokenReview", {"spec": spec, "status": status})

    return review


def _answer(kind: str, fields: JSON) -> JSON:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    head: JSON = {"apiVersion": _API_VERSION, "kind": kind, "metadata": {"creationTimestamp": now}}
    return head | fields


def _user_info(user: Identity) -> JSON:
    """UserInfo as Go prints it: empty fields left out. VMO's identities carry no extra."""
    info: JSON = {"username": user.name}
    if user.uid:
        info["uid"] = user.uid
    if user.groups:
        info["groups"] = list(user.groups)
    return info
