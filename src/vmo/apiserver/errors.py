"""API errors as Kubernetes ``Status`` objects.

Every refusal the server makes is an ``ApiError``; the HTTP layer turns it into a ``Status`` body
with the same code, reason and causes, so clients see exactly what kube-apiserver would send.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmo.api.types import Cause

__all__ = [
    "ApiError",
    "Cause",
    "already_exists",
    "bad_request",
    "conflict",
    "gone",
    "invalid",
    "method_not_allowed",
    "not_found",
    "qualified",
]

JSON = dict[str, Any]


class ApiError(Exception):
    """A request refused with an HTTP code and a Kubernetes ``StatusReason``."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        kind: str = "",
        group: str = "",
        name: str = "",
        causes: Sequence[Cause] = (),
        retry_after: int = 0,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.kind = kind
        self.group = group
        self.name = name
        self.causes = tuple(causes)
        self.retry_after = retry_after

    def status(self) -> JSON:
        details: JSON = {}
        if self.name:
            details["name"] = self.name
        if self.group:
            details["group"] = self.group
        if self.kind:
            details["kind"] = self.kind
        if self.causes:
            details["causes"] = [c.to_json() for c in self.causes]
        if self.retry_after:
            details["retryAfterSeconds"] = self.retry_after
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if details:
            body["details"] = details
        return body


def qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{qualified(resource, group)} "{name}" not found',
        kind=resource,
        group=group,
        name=name,
    )


def already_exists(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{qualified(resource, group)} "{name}" already exists',
        kind=resource,
        group=group,
        name=name,
    )


def conflict(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified(resource, group)} "{name}": the object '
        "has been modified; please apply your changes to the latest version and try again",
        kind=resource,
        group=group,
        name=name,
    )


def invalid(kind: str, group: str, name: str, causes: Sequence[Cause]) -> ApiError:
    summary = "; ".join(f"{c.field}: {c.message}" if c.field else c.message for c in causes)
    return ApiError(
        422,
        "Invalid",
        f'{kind}.{group} "{name}" is invalid: [{summary}]'
        if group
        else f'{kind} "{name}" is invalid: [{summary}]',
        kind=kind,
        group=group,
        name=name,
        causes=causes,
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def method_not_allowed(message: str) -> ApiError:
    return ApiError(405, "MethodNotAllowed", message)
