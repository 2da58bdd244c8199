"""The shapes every served kind is described by: its API coordinates, schema and hooks.

The API server serves exactly the ``ResourceType`` values it is given; built-in kinds, KubeVirt's
family and CRD-defined kinds all reduce to this one description.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

ALL_VERBS: tuple[str, ...] = (
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
)


@dataclass(frozen=True)
class Cause:
    """One reason a request was refused, as in a Kubernetes ``Status.details.causes`` entry."""

    field: str
    message: str
    reason: str = "FieldValueInvalid"

    def to_json(self) -> JSON:
        return {"reason": self.reason, "message": self.message, "field": self.field}


@dataclass(frozen=True)
class PrinterColumn:
    """An ``additionalPrinterColumns`` entry: what ``kubectl get`` shows for a kind."""

    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0
    format: str = ""


Validator = Callable[[JSON, JSON | None], list[Cause]]
"""(new object, old object or None on create) -> causes; empty means valid."""

Defaulter = Callable[[JSON], None]
"""Fills defaults into an object in place."""

Warner = Callable[[JSON], list[str]]
"""Admission warnings for an accepted object (sent as HTTP ``Warning`` headers)."""


@dataclass(frozen=True)
class ResourceType:
    """One kind served at one group/version."""

    group: str  # "" for the core group
    version: str
    kind: str
    plural: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    # subresources served as plain object views: "status" (and "scale" for CRDs that ask)
    subresources: tuple[str, ...] = ()
    printer_columns: tuple[PrinterColumn, ...] = ()
    # structural OpenAPI v3 schema of the whole object (apiVersion/kind/metadata/spec/status);
    # may carry x-kubernetes-patch-merge-key / x-kubernetes-patch-strategy and list-map keys.
    schema: JSON | None = None
    validate: Validator | None = None
    default: Defaulter | None = None
    warn: Warner | None = None
    # extra field selectors beyond metadata.name / metadata.namespace: selector -> JSON path
    field_selectors: Mapping[str, str] = field(default_factory=dict)
    # True when changes to the whole object except metadata/status bump generation
    # (Kubernetes: kinds with a status subresource bump generation on spec changes only)
    has_generation: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version
