"""RBAC wired into the server: request checks, access reviews, escalation admission, tokens.

The ``RBACAuthorizer`` index is kept current from the watch hub one object at a time, so a
request costs a lookup of the bindings that name its user, never a scan of the store.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from vmo.api.types import JSON, ResourceType
from vmo.apiserver import errors, rbac
from vmo.apiserver import objects as ob
from vmo.apiserver.auth import Identity, ServiceAccountTokens
from vmo.apiserver.errors import ApiError
from vmo.apiserver.registry import Registry
from vmo.apiserver.requests import ResourcePath, decode_body
from vmo.apiserver.watch import Change

AUTHZ_GROUP = "authorization.k8s.io"
_KIND_BY_PLURAL = {
    "roles": "Role",
    "clusterroles": "ClusterRole",
    "rolebindings": "RoleBinding",
    "clusterrolebindings": "ClusterRoleBinding",
}
TOKEN_DEFAULT_SECONDS = 3600
TOKEN_MIN_SECONDS = 600


def user_info(name: str, groups: tuple[str, ...], uid: str = "") -> rbac.UserInfo:
    return rbac.UserInfo(name=name, groups=groups, uid=uid)


class RbacAuthorization:
    def __init__(self, service: ob.ObjectService, registry: Registry) -> None:
        self.service = service
        self.registry = registry
        self.authorizer = rbac.RBACAuthorizer()
        self._loaded = False
        service.hub.listen(self.observe)

    # --- keeping the index current -------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        for plural, kind in _KIND_BY_PLURAL.items():
            rt = self.registry.kind_in_group(rbac.RBAC_GROUP, kind)
            assert rt is not None, plural
            self.authorizer.replace(kind, [row.obj() for row in self.service.scan(rt)])
        self._loaded = True

    def observe(self, change: Change) -> None:
        group, plural = change.key.split("/", 2)[:2]
        kind = _KIND_BY_PLURAL.get(plural) if group == rbac.RBAC_GROUP else None
        if kind is None or not self._loaded:
            return
        md = change.obj.get("metadata", {})
        if change.type == "DELETED":
            self.authorizer.remove(kind, str(md.get("namespace", "")), str(md.get("name", "")))
        else:
            self.authorizer.upsert(kind, change.obj)

    # --- request checks ------------------------------------------------------------------------

    def check(self, user: Identity, method: str, path: str, query: dict[str, str]) -> None:
        if rbac.MASTERS_GROUP in user.groups:
            return
        self._ensure_loaded()
        try:
            attrs = rbac.request_attributes(
                method, path, query, user_info(user.name, user.groups, user.uid)
            )
        except rbac.RequestInfoError:
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource"
            ) from None
        decision = self.authorizer.authorize(attrs)
        if not decision.allowed:
            raise rbac.forbidden(attrs)

    def loaded(self) -> rbac.RBACAuthorizer:
        """The authorizer, with every Role and binding of the store in it."""
        self._ensure_loaded()
        return self.authorizer

    def allowed(self, attrs: rbac.RequestAttributes) -> rbac.Decision:
        self._ensure_loaded()
        return self.authorizer.authorize(attrs)

    # --- escalation admission ------------------------------------------------------------------

    def admit_rbac_change(
        self, rt: ResourceType, obj: JSON, old: JSON | None, caller: ob.Caller
    ) -> None:
        """Refuses Roles and bindings that grant more than the caller holds (escalate/bind)."""
        if rt.group != rbac.RBAC_GROUP:
            return
        self._ensure_loaded()
        user = user_info(caller.name, caller.groups)
        if rt.kind in ("Role", "ClusterRole"):
            # on create the request carries no name, so a resourceNames-limited escalate
            # grant does not apply, as upstream
            request_name = str(obj["metadata"]["name"]) if old is not None else ""
            rbac.check_role_escalation(user, self.authorizer, role=obj, request_name=request_name)
        else:
            rbac.check_binding_escalation(user, self.authorizer, binding=obj)


# --- access reviews (computed kinds) ----------------------------------------------------------


def access_reviews(authz: RbacAuthorization) -> dict[tuple[str, str], Any]:
    def self_review(body: JSON, user: Identity, namespace: str) -> JSON:
        who = user_info(user.name, user.groups, user.uid)
        return _answer(body, authz.allowed(rbac.review_attributes(_spec(body), who)))

    def subject_review(body: JSON, user: Identity, namespace: str) -> JSON:
        spec = _spec(body)
        if not spec.get("user") and not spec.get("groups"):
            raise errors.invalid(
                "SubjectAccessReview",
                AUTHZ_GROUP,
                "",
                [
                    errors.Cause(
                        "spec.user",
                        "Invalid value: at least one of user or group must be specified",
                    )
                ],
            )
        return _answer(
            body, authz.allowed(rbac.review_attributes(spec, rbac.user_from_review_spec(spec)))
        )

    def local_review(body: JSON, user: Identity, namespace: str) -> JSON:
        attrs_ns = (_spec(body).get("resourceAttributes") or {}).get("namespace", namespace)
        if attrs_ns != namespace:
            raise errors.invalid(
                "LocalSubjectAccessReview",
                AUTHZ_GROUP,
                "",
                [
                    errors.Cause(
                        "spec.resourceAttributes.namespace",
                        "Invalid value: must match metadata.namespace",
                    )
                ],
            )
        return subject_review(body, user, namespace)

    def rules_review(body: JSON, user: Identity, namespace: str) -> JSON:
        authz._ensure_loaded()
        target_ns = str(_spec(body).get("namespace", ""))
        rules = authz.authorizer.rules_for(user_info(user.name, user.groups, user.uid), target_ns)
        return {**body, "status": rules.to_status()}

    return {
        (AUTHZ_GROUP, "selfsubjectaccessreviews"): self_review,
        (AUTHZ_GROUP, "subjectaccessreviews"): subject_review,
        (AUTHZ_GROUP, "localsubjectaccessreviews"): local_review,
        (AUTHZ_GROUP, "selfsubjectrulesreviews"): rules_review,
    }


def _spec(body: JSON) -> JSON:
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise errors.bad_request("spec is required")
    return spec


def _answer(body: JSON, decision: rbac.Decision) -> JSON:
    status: JSON = {"allowed": decision.allowed}
    if decision.reason:
        status["reason"] = decision.reason
    answer = {**body, "status": status}
    answer.setdefault("metadata", {})
    answer["metadata"].setdefault("creationTimestamp", None)
    return answer


# --- ServiceAccount tokens (TokenRequest) -------------------------------------------------------


def token_request_handler(
    service: ob.ObjectService, registry: Registry, tokens: ServiceAccountTokens
) -> Any:
    async def handle(
        request: web.Request, rt: ResourceType, rp: ResourcePath, user: Identity
    ) -> web.Response:
        from vmo.apiserver.http import json_response

        if request.method != "POST":
            raise errors.method_not_allowed(
                "only POST (create) is supported on serviceaccounts/token"
            )
        sa = service.get(rt, rp.namespace, rp.name)
        body = decode_body(
            await request.read(), request.headers.get("Content-Type", "application/json")
        )
        spec = body.get("spec") or {}
        seconds = int(spec.get("expirationSeconds") or TOKEN_DEFAULT_SECONDS)
        if seconds < TOKEN_MIN_SECONDS:
            raise errors.invalid(
                "TokenRequest",
                "authentication.k8s.io",
                rp.name,
                [
                    errors.Cause(
                        "spec.expirationSeconds",
                        "Invalid value: may not specify a duration less than 10 minutes",
                    )
                ],
            )
        token, expires = tokens.issue(
            rp.namespace,
            rp.name,
            str(sa["metadata"]["uid"]),
            seconds=seconds,
            audiences=list(spec.get("audiences") or []),
        )
        answer = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": rp.name, "namespace": rp.namespace, "creationTimestamp": None},
            "spec": {**spec, "expirationSeconds": seconds},
            "status": {"token": token, "expirationTimestamp": _rfc3339(expires)},
        }
        return json_response(answer, 201)

    return handle


def _rfc3339(epoch: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
