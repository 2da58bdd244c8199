"""Object semantics on top of the store: what create, update, patch and delete mean.

This is the part of kube-apiserver's generic registry VMO needs: server-set metadata, generation,
the status subresource, optimistic concurrency, admission (defaults, schema and semantic
validation), finalizers and graceful deletion. Each call either commits one write or raises an
``ApiError`` having written nothing.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vmo.api import meta as metav
from vmo.api import schema
from vmo.api.types import JSON, Cause, ResourceType
from vmo.apiserver import errors
from vmo.apiserver import store as st
from vmo.apiserver.errors import ApiError
from vmo.apiserver.watch import Change, WatchHub

log = logging.getLogger(__name__)

FOREGROUND = "foregroundDeletion"
ORPHAN = "orphan"
NAMESPACE_FINALIZER = "kubernetes"
_SERVER_SET = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
)

# Names validated as DNS labels or as free path segments rather than DNS subdomains.
_NAME_RULES: dict[tuple[str, str], str] = {
    ("", "Namespace"): "label",
    ("", "Service"): "label",
    ("rbac.authorization.k8s.io", "Role"): "segment",
    ("rbac.authorization.k8s.io", "ClusterRole"): "segment",
    ("rbac.authorization.k8s.io", "RoleBinding"): "segment",
    ("rbac.authorization.k8s.io", "ClusterRoleBinding"): "segment",
}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


FIELD_VALIDATION = ("Strict", "Warn", "Ignore")


@dataclass(frozen=True)
class Caller:
    """Who asks and how: admission checks depend on it (RBAC escalation, field validation),
    and it collects the warnings the response carries."""

    name: str = "system:vmo"
    groups: tuple[str, ...] = ("system:masters",)
    dry_run: bool = False
    # upstream's default when a client sends no fieldValidation parameter
    field_validation: str = "Warn"
    # None for internal callers (controllers): nobody reads their warnings
    warnings: list[str] | None = field(default=None, compare=False)

    def warn(self, messages: list[str]) -> None:
        if self.warnings is not None:
            self.warnings.extend(messages)


SYSTEM = Caller()


Admission = Callable[[ResourceType, JSON, JSON | None, Caller], None]
"""Raises ApiError to refuse (new, old) from caller; may mutate new."""


@dataclass
class KindHooks:
    """Kind-specific behaviour the generic code calls into."""

    on_create: Callable[[JSON], None] | None = None
    pending_deletion: Callable[[JSON], bool] | None = None


def _key(rt: ResourceType, namespace: str, name: str) -> str:
    base = f"{rt.group or 'core'}/{rt.plural}/"
    return f"{base}{namespace}/{name}" if rt.namespaced else f"{base}{name}"


def resource_prefix(rt: ResourceType, namespace: str = "") -> str:
    base = f"{rt.group or 'core'}/{rt.plural}/"
    return f"{base}{namespace}/" if rt.namespaced and namespace else base


def _ratchet(causes: list[Cause], stored: list[Cause]) -> list[Cause]:
    """Validation ratcheting, as kube-apiserver's: an update is not refused for an invalid
    value it leaves as it was (the stored object already had the same complaint), so an
    object admitted by an older, laxer release can still have its status and metadata
    written, while every new or changed invalid value is refused."""
    known = {(c.field, c.message) for c in stored}
    return [c for c in causes if (c.field, c.message) not in known]


def _body_without(obj: JSON, *top: str) -> JSON:
    return {k: v for k, v in obj.items() if k not in top}


def _comparable(obj: JSON) -> JSON:
    clone = dict(obj)
    md = dict(clone.get("metadata") or {})
    md.pop("resourceVersion", None)
    md.pop("managedFields", None)
    clone["metadata"] = md
    return clone


@dataclass
class ObjectService:
    store: st.Store
    hub: WatchHub
    admission: list[Admission] = field(default_factory=list)
    hooks: dict[tuple[str, str], KindHooks] = field(default_factory=dict)

    # --- reads -------------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str, name: str) -> JSON:
        return self.row(rt, namespace, name).obj()

    def row(self, rt: ResourceType, namespace: str, name: str) -> st.Row:
        found = self.store.find(_key(rt, namespace, name))
        if found is None:
            raise errors.not_found(rt.plural, rt.group, name)
        return found

    def find(self, rt: ResourceType, namespace: str, name: str) -> JSON | None:
        found = self.store.find(_key(rt, namespace, name))
        return found.obj() if found else None

    def scan(
        self, rt: ResourceType, namespace: str = "", *, start_after: str = "", limit: int = 0
    ) -> list[st.Row]:
        return self.store.scan(resource_prefix(rt, namespace), start_after=start_after, limit=limit)

    # --- create ------------------------------------------------------------------------------

    def create(self, rt: ResourceType, namespace: str, body: JSON, caller: Caller = SYSTEM) -> JSON:
        obj = self._prepare_new(rt, namespace, body)
        self._admit(rt, obj, None, caller)
        md = obj["metadata"]
        md["uid"] = str(uuid.uuid4())
        md["creationTimestamp"] = now_rfc3339()
        if rt.has_generation:
            md["generation"] = 1
        if caller.dry_run:
            if self.store.find(_key(rt, namespace, md["name"])):
                raise errors.already_exists(rt.plural, rt.group, md["name"])
            return obj
        key = _key(rt, namespace, md["name"])
        try:
            rv, data = self.store.create(key, obj)
        except st.AlreadyExists:
            raise errors.already_exists(rt.plural, rt.group, md["name"]) from None
        self.hub.publish(Change("ADDED", rv, key, data))
        return obj

    def _prepare_new(self, rt: ResourceType, namespace: str, body: JSON) -> JSON:
        obj = body  # callers hand over freshly decoded objects; no copy needed
        self._check_type_meta(rt, obj)
        md = obj.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise errors.bad_request("metadata must be an object")
        self._check_namespace(rt, namespace, md)
        if not md.get("name") and md.get("generateName"):
            md["name"] = f"{md['generateName']}{_random_suffix()}"
        for server_field in (*_SERVER_SET, "resourceVersion", "selfLink"):
            md.pop(server_field, None)
        if "status" in rt.subresources:
            obj.pop("status", None)
        hooks = self.hooks.get((rt.group, rt.kind))
        if hooks and hooks.on_create:
            hooks.on_create(obj)
        return obj

    def _check_type_meta(self, rt: ResourceType, obj: JSON) -> None:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version is None and kind is None:
            obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
            return
        if kind != rt.kind or api_version != rt.api_version:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({rt.api_version})"
                if kind == rt.kind
                else f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )

    def _check_namespace(self, rt: ResourceType, namespace: str, md: JSON) -> None:
        if not rt.namespaced:
            return
        body_ns = md.get("namespace")
        if body_ns and body_ns != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        md["namespace"] = namespace

    def _admit(self, rt: ResourceType, obj: JSON, old: JSON | None, caller: Caller) -> None:
        md = obj["metadata"]
        causes = metav.validate_object_meta(
            md,
            name_rule=_NAME_RULES.get((rt.group, rt.kind), "subdomain"),
            namespaced=rt.namespaced,
        )
        # An update that leaves everything but metadata as stored keeps a body that was
        # defaulted and validated when it was written: skip that work (label patches, finalizers).
        if old is None or _body_without(obj, "metadata") != _body_without(old, "metadata"):
            causes += self._admit_body(rt, obj, old, caller)
        if causes:
            raise errors.invalid(rt.kind, rt.group, str(md.get("name", "")), causes)
        for admit in self.admission:
            admit(rt, obj, old, caller)

    def _admit_body(
        self, rt: ResourceType, obj: JSON, old: JSON | None, caller: Caller
    ) -> list[Cause]:
        if rt.schema is not None:
            schema.apply_defaults(rt.schema, obj)
        if rt.default is not None:
            rt.default(obj)
        causes = schema.validate(rt.schema, _body_without(obj, "metadata")) if rt.schema else []
        if any(c.reason == schema.UNKNOWN for c in causes):
            causes = self._unknown_fields(rt, obj, causes, caller)
        if causes and old is not None and rt.schema is not None:
            causes = _ratchet(causes, schema.validate(rt.schema, _body_without(old, "metadata")))
        if not causes and rt.validate is not None:
            causes += rt.validate(obj, old)
            if causes and old is not None:
                causes = _ratchet(causes, rt.validate(old, None))
        if not causes and rt.warn is not None:
            caller.warn(rt.warn(obj))
        return causes

    def _unknown_fields(
        self, rt: ResourceType, obj: JSON, causes: list[Cause], caller: Caller
    ) -> list[Cause]:
        """Strict refuses unknown fields (400, as upstream); Warn and Ignore drop them."""
        assert rt.schema is not None
        if caller.field_validation == "Strict":
            message = schema.strict_decoding_message(causes)
            raise errors.bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: {message}'
            )
        dropped = schema.prune_unknown(rt.schema, obj)
        if caller.field_validation == "Warn":
            caller.warn([f'unknown field "{path}"' for path in dropped])
        return [c for c in causes if c.reason != schema.UNKNOWN]

    # --- update ------------------------------------------------------------------------------

    def update(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        body: JSON,
        *,
        subresource: str = "",
        caller: Caller = SYSTEM,
    ) -> JSON:
        current = self.row(rt, namespace, name)
        return self.replace(rt, current, body, subresource=subresource, caller=caller)

    def replace(
        self,
        rt: ResourceType,
        current: st.Row,
        body: JSON,
        *,
        subresource: str = "",
        caller: Caller = SYSTEM,
    ) -> JSON:
        """Writes ``body`` over the stored object ``current`` (an update or an applied patch)."""
        old = current.obj()
        obj = body  # callers hand over freshly decoded objects; no copy needed
        self._check_type_meta(rt, obj)
        md = obj.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise errors.bad_request("metadata must be an object")
        name = old["metadata"]["name"]
        if md.get("name", name) != name:
            raise errors.bad_request(
                f"the name of the object ({md.get('name')}) does not match the name on the URL ({name})"
            )
        expect = md.get("resourceVersion")
        if expect not in (None, ""):
            if not str(expect).isdigit():
                raise errors.bad_request(f'invalid resourceVersion "{expect}"')
            if int(expect) != current.rv:
                raise errors.conflict(rt.plural, rt.group, name)
        obj = self._merge_server_fields(rt, old, obj, subresource)
        if _comparable(obj) == _comparable(old):
            return old
        self._admit(rt, obj, old, caller)
        # admission may restore what the request left out (defaults, assigned MACs): judge
        # "no change" and the generation on what would be stored
        if _comparable(obj) == _comparable(old):
            return old
        if rt.has_generation and _body_without(obj, "metadata", "status") != _body_without(
            old, "metadata", "status"
        ):
            obj["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if caller.dry_run:
            return obj
        if self._ready_to_vanish(rt, obj):
            return self._remove(rt, current, obj)
        rv, data = self.store.update(current.key, obj, expect_rv=current.rv)
        self.hub.publish(Change("MODIFIED", rv, current.key, data, current.data))
        return obj

    def _merge_server_fields(
        self, rt: ResourceType, old: JSON, new: JSON, subresource: str
    ) -> JSON:
        old_md = old["metadata"]
        if subresource == "status":
            return {**old, "metadata": dict(old_md), "status": new.get("status", {})}
        md = new["metadata"]
        for fld in (*_SERVER_SET, "namespace", "name"):
            if fld in old_md:
                md[fld] = old_md[fld]
            else:
                md.pop(fld, None)
        if "status" in rt.subresources:
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        if old_md.get("deletionTimestamp"):
            # finalizers may only shrink on an object being deleted
            kept = set(old_md.get("finalizers") or [])
            md["finalizers"] = [f for f in md.get("finalizers") or [] if f in kept]
            if not md["finalizers"]:
                del md["finalizers"]
        return new

    # --- delete ------------------------------------------------------------------------------

    def delete(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        *,
        propagation: str = "Background",
        preconditions: JSON | None = None,
        caller: Caller = SYSTEM,
    ) -> tuple[JSON, bool]:
        """Deletes or starts deleting; returns (object, whether it is gone now)."""
        current = self.row(rt, namespace, name)
        obj = current.obj()
        md = obj["metadata"]
        self._check_preconditions(rt, current, preconditions or {})
        finalizers = list(md.get("finalizers") or [])
        if propagation == "Foreground" and FOREGROUND not in finalizers:
            finalizers.append(FOREGROUND)
        elif propagation == "Orphan" and ORPHAN not in finalizers:
            finalizers.append(ORPHAN)
        pending = bool(finalizers) or self._kind_pending(rt, obj)
        if caller.dry_run:
            return obj, not pending
        if not pending:
            return self._remove(rt, current, obj), True
        if md.get("deletionTimestamp") and finalizers == list(md.get("finalizers") or []):
            return obj, False
        md.setdefault("deletionTimestamp", now_rfc3339())
        md.setdefault("deletionGracePeriodSeconds", 0)
        md["finalizers"] = finalizers
        if rt.group == "" and rt.kind == "Namespace":
            obj.setdefault("status", {})["phase"] = "Terminating"
        rv, data = self.store.update(current.key, obj, expect_rv=current.rv)
        self.hub.publish(Change("MODIFIED", rv, current.key, data, current.data))
        return obj, False

    def _check_preconditions(self, rt: ResourceType, current: st.Row, pre: JSON) -> None:
        md = current.obj()["metadata"]
        uid, rv = pre.get("uid"), pre.get("resourceVersion")
        if uid and uid != md.get("uid"):
            raise ApiError(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {errors.qualified(rt.plural, rt.group)} "
                f'"{md["name"]}": Precondition failed: UID in precondition: {uid}, UID in object '
                f"meta: {md.get('uid')}",
            )
        if rv and str(rv) != str(current.rv):
            raise errors.conflict(rt.plural, rt.group, md["name"])

    def _kind_pending(self, rt: ResourceType, obj: JSON) -> bool:
        hooks = self.hooks.get((rt.group, rt.kind))
        return bool(hooks and hooks.pending_deletion and hooks.pending_deletion(obj))

    def _ready_to_vanish(self, rt: ResourceType, obj: JSON) -> bool:
        md = obj["metadata"]
        return (
            bool(md.get("deletionTimestamp"))
            and not md.get("finalizers")
            and not self._kind_pending(rt, obj)
        )

    def _remove(self, rt: ResourceType, current: st.Row, last: JSON) -> JSON:
        rv, data = self.store.delete(current.key, expect_rv=current.rv)
        self.hub.publish(Change("DELETED", rv, current.key, data, current.data))
        last["metadata"]["resourceVersion"] = str(rv)
        return last


def _random_suffix() -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(secrets.choice(alphabet) for _ in range(5))


__all__ = ["SYSTEM", "Admission", "Caller", "KindHooks", "ObjectService", "resource_prefix"]
