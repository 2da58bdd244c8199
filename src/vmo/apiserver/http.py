"""The HTTP face of the embedded API server (aiohttp): routing, negotiation, verbs, watch.

Resource requests are resolved like kube-apiserver's RequestInfo, authenticated, authorised by
RBAC, then served from the ``ObjectService``. Every refusal is a ``Status`` body; an unexpected
failure is logged and answered as a 500 ``Status`` without internals.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web

from vmo.api.types import JSON, ResourceType
from vmo.apiserver import discovery, errors, heap, openapi, rbac, table
from vmo.apiserver import objects as ob
from vmo.apiserver import patch as patching
from vmo.apiserver import protobuf as pb
from vmo.apiserver import store as st
from vmo.apiserver.audit import AuditLog
from vmo.apiserver.audit import RequestInfo as AuditRequest
from vmo.apiserver.audit import event as audit_event
from vmo.apiserver.auth import Authenticator, Identity
from vmo.apiserver.errors import ApiError
from vmo.apiserver.metrics import REQUEST_INFO_KEY, ApiMetrics
from vmo.apiserver.registry import Registry
from vmo.apiserver.requests import (
    ResourcePath,
    Wanted,
    decode_body,
    decode_json,
    parse_accept,
    parse_resource_path,
)
from vmo.apiserver.selectors import SelectorError, parse_field_selector, parse_label_selector
from vmo.apiserver.watch import Change, Snapshot

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
# in the order kube-apiserver names them when it refuses another
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, APPLY_PATCH, STRATEGIC_MERGE_PATCH)
BOOKMARK_INTERVAL = 30.0
WATCH_WRITE_BUFFER = 16 * 1024
HISTORY_PAGE = 500  # events a watch replaying history reads from the store at a time
VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0+vmo",
    "gitCommit": "",
    "gitTreeState": "clean",
    "buildDate": "2026-11-25T00:00:00Z",
    "goVersion": "python",
    "compiler": "cpython",
    "platform": "linux/amd64",
}

_IDENTITY_KEY = web.RequestKey("identity", Identity)


class Authorizer(Protocol):
    def check(self, user: Identity, method: str, path: str, query: dict[str, str]) -> None:
        """Raises ApiError(403) when RBAC does not allow the request."""


VirtualCreate = Callable[[JSON, Identity, str], JSON]
"""Kinds that are computed, not stored (access reviews): (body, caller, namespace) -> answer."""


@dataclass(frozen=True)
class ExtraGroup:
    version: str
    resources: JSON
    handler: Callable[[web.Request, ResourcePath], Awaitable[web.StreamResponse]]


SubresourceHandler = Callable[
    [web.Request, ResourceType, ResourcePath, Identity], Awaitable[web.StreamResponse]
]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, content_type="application/json")


def status_response(exc: ApiError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return web.Response(
        body=_dumps(exc.status()), status=exc.code, content_type="application/json", headers=headers
    )


def _success(details: JSON | None = None) -> JSON:
    body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
    if details:
        body["details"] = details
    return body


_AUDITED_BODY = 3 << 20  # request bodies up to this size go into Request-level events


async def _json_body(request: web.Request) -> bytes | None:
    """The request's JSON body, for the audit log: read before the handler (aiohttp keeps it for
    the handler), parsed only if the event's level wants it."""
    if request.method not in ("POST", "PUT", "PATCH") or "json" not in request.content_type:
        return None
    if (request.content_length or 0) > _AUDITED_BODY:
        return None
    with contextlib.suppress(web.HTTPException):
        return await request.read()
    return None


def _parsed(raw: bytes | None) -> Any:
    """The body as JSON; None for what the handler refused anyway (not JSON, nested past
    Python's recursion limit)."""
    if raw is None:
        return None
    with contextlib.suppress(ValueError, TypeError, RecursionError):
        return json.loads(raw)
    return None


def _audit_info(request: web.Request, user: Identity | None) -> AuditRequest:
    name = user.name if user is not None else ""
    groups = tuple(user.groups) if user is not None else ()
    try:
        attrs = rbac.request_attributes(
            request.method, request.path, dict(request.query), rbac.UserInfo(name, groups)
        )
    except rbac.RequestInfoError:
        return AuditRequest(name, groups, request.method.lower(), request.path, False)
    # the API server's metrics label the request with what this parse found (no second parse)
    request[REQUEST_INFO_KEY] = attrs
    return AuditRequest(
        name, groups, attrs.verb, request.path, attrs.resource_request, attrs.api_group,
        attrs.api_version, attrs.resource, attrs.subresource, attrs.namespace, attrs.name,
        user.uid if user is not None else "",
    )  # fmt: skip


@dataclass
class ApiHandlers:
    registry: Registry
    service: ob.ObjectService
    authenticator: Authenticator
    authorizer: Authorizer
    # extra subresources served by other components: (group, version, plural, sub) -> handler
    subresources: dict[tuple[str, str, str, str], SubresourceHandler] = field(default_factory=dict)
    extra_discovery: discovery.ExtraSubresources = field(default_factory=dict)
    virtual: dict[tuple[str, str], VirtualCreate] = field(default_factory=dict)
    # API groups served outside the registry (subresource-only groups like
    # subresources.kubevirt.io): group -> (version, APIResourceList, handler)
    extra_groups: dict[str, ExtraGroup] = field(default_factory=dict)
    ready: bool = True
    audit: AuditLog | None = None
    metrics: ApiMetrics | None = None

    # --- app -----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        middlewares = [self._audit, self._errors, self._authenticate]
        if self.metrics is not None:
            middlewares.insert(0, self.metrics.middleware)
        app = web.Application(
            client_max_size=MAX_BODY,
            middlewares=middlewares,
            # a client that hangs up cancels its handler, as a Go server cancels the request's
            # context: an idle watch would otherwise live on until its timeout
            handler_args={"handler_cancellation": True},
        )
        app.cleanup_ctx.append(heap.connection_memory)
        app.router.add_get("/version", self._version)
        app.router.add_get("/version/", self._version)
        for probe in ("/healthz", "/readyz", "/livez"):
            app.router.add_get(probe, self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api", self._api)
        app.router.add_get("/api/", self._api)
        app.router.add_get("/apis", self._apis)
        app.router.add_get("/apis/", self._apis)
        app.router.add_get("/openapi/v2", self._openapi_v2)
        app.router.add_get("/openapi/v3", self._openapi_v3)
        app.router.add_get("/openapi/v3/{path:.*}", self._openapi_v3_gv)
        app.router.add_route("*", "/api/{tail:.*}", self._resource)
        app.router.add_route("*", "/apis/{tail:.*}", self._resource)
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return status_response(exc)
        except web.HTTPRequestEntityTooLarge:
            return status_response(
                ApiError(
                    413,
                    "RequestEntityTooLarge",
                    f"the request body exceeds the {MAX_BODY}-byte limit",
                )
            )
        except web.HTTPException as exc:
            if exc.status == 404:
                return status_response(
                    ApiError(404, "NotFound", "the server could not find the requested resource")
                )
            if exc.status == 405:
                return status_response(
                    errors.method_not_allowed(f"method {request.method} is not allowed")
                )
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("internal error serving %s %s", request.method, request.path)
            return status_response(
                ApiError(
                    500,
                    "InternalError",
                    "Internal error occurred: the server failed to serve the request",
                )
            )

    @web.middleware
    async def _audit(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every request into the audit log, once it is answered (a stream: once it ends)."""
        if self.audit is None:
            return await handler(request)
        received = datetime.now(UTC)
        body = await _json_body(request)
        response: web.StreamResponse | None = None
        try:
            response = await handler(request)
            return response
        finally:
            self._record(request, response, body, received)

    def _record(
        self,
        request: web.Request,
        response: web.StreamResponse | None,
        body: bytes | None,
        received: datetime,
    ) -> None:
        assert self.audit is not None
        user = request.get(_IDENTITY_KEY)
        info = _audit_info(request, user)
        level = self.audit.policy.level(info)
        if level == "None":
            return
        code = response.status if response is not None else 200  # a client that hung up
        answer: Any = None
        wanted = level == "RequestResponse" or code >= 400  # a refusal's Status goes in
        if wanted and isinstance(response, web.Response) and response.body is not None:
            answer = _parsed(bytes(response.body))  # type: ignore[arg-type]
        status = answer if isinstance(answer, dict) and answer.get("kind") == "Status" else None
        self.audit.write(
            audit_event(
                info,
                level=level,
                uri=str(request.rel_url),
                source_ips=[request.remote or ""],
                user_agent=request.headers.get("User-Agent", ""),
                code=code,
                received=received,
                completed=datetime.now(UTC),
                status=status,
                request_object=_parsed(body) if level in ("Request", "RequestResponse") else None,
                response_object=answer if level == "RequestResponse" else None,
            )
        )

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        peercert = None
        if request.transport is not None:
            peercert = request.transport.get_extra_info("peercert")
        user = self.authenticator.authenticate(request.headers, peercert, request.path)
        if user is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        request[_IDENTITY_KEY] = user
        self.authorizer.check(user, request.method, request.path, dict(request.query))
        return await handler(request)

    # --- non-resource --------------------------------------------------------------------------

    async def _version(self, request: web.Request) -> web.Response:
        return json_response(VERSION)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return self.metrics.render()

    async def _health(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.Response(text="not ready", status=503)
        return web.Response(text="ok", content_type="text/plain")

    async def _api(self, request: web.Request) -> web.Response:
        if parse_accept(request.headers.get("Accept", "")).discovery_v2:
            return self._discovery_v2(core=True)
        return json_response(discovery.api_versions())

    async def _apis(self, request: web.Request) -> web.Response:
        if parse_accept(request.headers.get("Accept", "")).discovery_v2:
            return self._discovery_v2(core=False)
        groups = discovery.api_group_list(self.registry)
        for name, extra in self.extra_groups.items():
            version = {"groupVersion": f"{name}/{extra.version}", "version": extra.version}
            groups["groups"].append(
                {"name": name, "versions": [version], "preferredVersion": version}
            )
        return json_response(groups)

    def _discovery_v2(self, *, core: bool) -> web.Response:
        body = discovery.aggregated(self.registry, core=core, extra=self.extra_discovery)
        if not core:  # metrics.k8s.io must be listed here too: `kubectl top` looks for it here
            for name, group in self.extra_groups.items():
                entry = discovery.aggregated_extra_group(name, group.version, group.resources)
                body["items"] += [entry] if entry is not None else []
        return web.Response(
            body=_dumps(body),
            headers={
                "Content-Type": "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
            },
        )

    async def _openapi_v2(self, request: web.Request) -> web.Response:
        accept = request.headers.get("Accept", "")
        body, content_type = openapi.openapi_v2_negotiated(self.registry.all(), accept)
        return web.Response(body=body, content_type=content_type)

    async def _openapi_v3(self, request: web.Request) -> web.Response:
        return json_response(openapi.openapi_v3_index(self.registry.all()))

    async def _openapi_v3_gv(self, request: web.Request) -> web.Response:
        parts = request.match_info["path"].strip("/").split("/")
        if parts[:1] == ["api"] and len(parts) == 2:
            group, version = "", parts[1]
        elif parts[:1] == ["apis"] and len(parts) == 3:
            group, version = parts[1], parts[2]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        types = self.registry.in_group_version(group, version)
        if not types:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return json_response(openapi.openapi_v3_group_version(types, group, version))

    # --- resources -----------------------------------------------------------------------------

    async def _resource(self, request: web.Request) -> web.StreamResponse:
        rp = parse_resource_path(request.path)
        if rp is None:
            return await self._group_discovery(request)
        extra = self.extra_groups.get(rp.group)
        if extra is not None and rp.version == extra.version:
            return await extra.handler(request, rp)
        rt = self.registry.lookup(rp.group, rp.version, rp.resource)
        if rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        user = request[_IDENTITY_KEY]
        if rp.subresource and rp.subresource not in rt.subresources:
            handler = self.subresources.get((rp.group, rp.version, rp.resource, rp.subresource))
            if handler is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return await handler(request, rt, rp, user)
        virtual = self.virtual.get((rp.group, rp.resource))
        if virtual is not None:
            if request.method != "POST" or rp.name:
                raise errors.method_not_allowed(
                    f"{request.method} is not supported on {rp.resource}"
                )
            answer = virtual(await self._body(request), user, rp.namespace)
            return self._respond(request, answer, rt, status=201)
        if rt.namespaced and rp.namespace and request.method in ("POST", "PUT", "PATCH"):
            self._check_namespace_open(rp.namespace, creating=request.method == "POST")
        validation = request.query.get("fieldValidation", "Warn")
        if validation not in ob.FIELD_VALIDATION:
            raise errors.bad_request(
                f'fieldValidation: unsupported value "{validation}": supported values: "Strict", "Warn", "Ignore"'
            )
        caller = ob.Caller(
            user.name,
            user.groups,
            dry_run=request.query.get("dryRun") == "All",
            field_validation=validation,
            warnings=[],
        )
        response = await self._dispatch(request, rt, rp, caller)
        for message in dict.fromkeys(caller.warnings or []):
            response.headers.add("Warning", f'299 - "{message}"')
        return response

    async def _dispatch(
        self, request: web.Request, rt: ResourceType, rp: ResourcePath, caller: ob.Caller
    ) -> web.StreamResponse:
        method = request.method
        if method == "GET":
            if rp.name and not rp.watch_prefix and request.query.get("watch") not in ("true", "1"):
                return self._respond(request, self.service.get(rt, rp.namespace, rp.name), rt)
            if rp.watch_prefix or request.query.get("watch") in ("true", "1"):
                return await self._watch(request, rt, rp)
            return self._list(request, rt, rp)
        if method == "POST" and not rp.name:
            body = await self._body(request)
            created = self.service.create(rt, rp.namespace, body, caller)
            return self._respond(request, created, rt, status=201)
        if method == "PUT" and rp.name:
            body = await self._body(request)
            updated = self.service.update(
                rt, rp.namespace, rp.name, body, subresource=rp.subresource, caller=caller
            )
            return self._respond(request, updated, rt)
        if method == "PATCH" and rp.name:
            return await self._patch(request, rt, rp, caller)
        if method == "DELETE":
            return await self._delete(request, rt, rp, caller)
        raise errors.method_not_allowed(f"{method} is not supported on {request.path}")

    async def _group_discovery(self, request: web.Request) -> web.Response:
        parts = [p for p in request.path.split("/") if p]
        body: JSON | None = None
        extra = self.extra_groups.get(parts[1]) if parts[0] == "apis" and len(parts) > 1 else None
        if extra is not None and request.method == "GET":
            version = {"groupVersion": f"{parts[1]}/{extra.version}", "version": extra.version}
            if len(parts) == 2:
                group = {"name": parts[1], "versions": [version], "preferredVersion": version}
                return json_response({"kind": "APIGroup", "apiVersion": "v1", **group})
            if parts[2:] == [extra.version]:
                return json_response(extra.resources)
        if parts[0] == "api" and len(parts) == 2:
            body = discovery.api_resource_list(self.registry, "", parts[1], self.extra_discovery)
        elif parts[0] == "apis" and len(parts) == 2:
            body = discovery.api_group(self.registry, parts[1])
        elif parts[0] == "apis" and len(parts) == 3:
            body = discovery.api_resource_list(
                self.registry, parts[1], parts[2], self.extra_discovery
            )
        if body is None or request.method != "GET":
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return json_response(body)

    def _check_namespace_open(self, namespace: str, *, creating: bool) -> None:
        ns_rt = self.registry.lookup("", "v1", "namespaces")
        assert ns_rt is not None
        ns = self.service.find(ns_rt, "", namespace)
        if ns is None:
            raise errors.not_found("namespaces", "", namespace)
        if creating and ns["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f"unable to create new content in namespace {namespace} because it is being terminated",
            )

    async def _body(self, request: web.Request) -> JSON:
        raw = await request.read()
        return decode_body(raw, request.headers.get("Content-Type", "application/json"))

    def _respond(
        self, request: web.Request, obj: JSON, rt: ResourceType, status: int = 200
    ) -> web.Response:
        wanted = parse_accept(request.headers.get("Accept", ""))
        obj = self._as_version(obj, rt)
        if wanted.table:
            return json_response(
                self._table([obj], rt, request, str(obj["metadata"].get("resourceVersion", ""))),
                status,
            )
        if wanted.protobuf_only:
            return self._protobuf(obj, status)
        return json_response(obj, status)

    def _protobuf(self, obj: JSON, status: int) -> web.Response:
        if not pb.supports(str(obj.get("apiVersion", "")), str(obj.get("kind", ""))):
            raise ApiError(
                406,
                "NotAcceptable",
                "only the following media types are accepted: application/json",
            )
        return web.Response(
            body=pb.encode(obj), status=status, content_type=pb.PROTOBUF_CONTENT_TYPE
        )

    @staticmethod
    def _as_version(obj: JSON, rt: ResourceType) -> JSON:
        if obj.get("apiVersion") != rt.api_version and obj.get("kind") == rt.kind:
            obj["apiVersion"] = rt.api_version
        return obj

    def _table(
        self, objs: list[JSON], rt: ResourceType, request: web.Request, rv: str, cont: str = ""
    ) -> JSON:
        include = request.query.get("includeObject", "Metadata")
        return table.to_table(
            objs,
            rt.printer_columns,
            include_object=include,
            resource_version=rv,
            continue_token=cont,
        )

    # --- list ----------------------------------------------------------------------------------

    def _filters(self, request: web.Request, rt: ResourceType) -> Callable[[JSON], bool] | None:
        labels = request.query.get("labelSelector", "")
        fields = request.query.get("fieldSelector", "")
        if not labels and not fields:
            return None
        allowed = {
            "metadata.name": "metadata.name",
            "metadata.namespace": "metadata.namespace",
            **rt.field_selectors,
        }
        try:
            label_sel = parse_label_selector(labels) if labels else None
            field_sel = parse_field_selector(fields) if fields else None
            if field_sel is not None:
                for name in field_sel.fields:
                    if name not in allowed:
                        raise SelectorError(f"field label not supported: {name}")
        except SelectorError as exc:
            raise errors.bad_request(str(exc)) from None

        def matches(obj: JSON) -> bool:
            if label_sel is not None and not label_sel.matches(
                obj.get("metadata", {}).get("labels") or {}
            ):
                return False
            return field_sel is None or field_sel.matches(obj, allowed)

        return matches

    def _list(self, request: web.Request, rt: ResourceType, rp: ResourcePath) -> web.Response:
        limit = _int_param(request, "limit")
        start_after = self._continue_from(request.query.get("continue", ""))
        matches = self._filters(request, rt)
        rv = self.service.store.revision
        rows = self.service.scan(
            rt, rp.namespace, start_after=start_after, limit=0 if matches else limit
        )
        next_key = ""
        if matches is None:
            if (
                limit
                and len(rows) == limit
                and self.service.store.scan(
                    ob.resource_prefix(rt, rp.namespace), start_after=rows[-1].key, limit=1
                )
            ):
                next_key = rows[-1].key
            objs_raw = [r.data for r in rows]
            objs: list[JSON] | None = None
        else:
            objs = []
            last_key = ""
            for row in rows:
                obj = row.obj()
                if not matches(obj):
                    continue
                if limit and len(objs) == limit:
                    next_key = last_key  # a further match exists: the client may continue
                    break
                objs.append(obj)
                last_key = row.key
            objs_raw = []
        cont = self._continue_token(next_key, rv) if next_key else ""
        wanted = parse_accept(request.headers.get("Accept", ""))
        if wanted.table:
            parsed = objs if objs is not None else [json.loads(d) for d in objs_raw]
            return json_response(
                self._table([self._as_version(o, rt) for o in parsed], rt, request, str(rv), cont)
            )
        list_meta: JSON = {"resourceVersion": str(rv)}
        if cont:
            list_meta["continue"] = cont
        if objs is not None or self._needs_rewrite(rt):
            items = objs if objs is not None else [json.loads(d) for d in objs_raw]
            body = {
                "apiVersion": rt.api_version,
                "kind": f"{rt.kind}List",
                "metadata": list_meta,
                "items": [self._as_version(o, rt) for o in items],
            }
            return json_response(body)
        head = _dumps(
            {"apiVersion": rt.api_version, "kind": f"{rt.kind}List", "metadata": list_meta}
        )[:-1]
        payload = head + b',"items":[' + b",".join(objs_raw) + b"]}"
        return web.Response(body=payload, content_type="application/json")

    def _needs_rewrite(self, rt: ResourceType) -> bool:
        return (
            len([t for t in self.registry.all() if t.group == rt.group and t.plural == rt.plural])
            > 1
        )

    def _continue_from(self, token: str) -> str:
        if not token:
            return ""
        try:
            decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            key, rv = str(decoded["k"]), int(decoded["rv"])
        except (ValueError, KeyError, TypeError):
            raise errors.bad_request("continue key is not valid: malformed token") from None
        if rv < self.service.store.compacted_revision:
            raise errors.gone(
                "The provided continue parameter is too old to display a consistent list result. "
                "You can start a new list without the continue parameter."
            )
        return key

    @staticmethod
    def _continue_token(key: str, rv: int) -> str:
        return base64.urlsafe_b64encode(_dumps({"k": key, "rv": rv})).decode().rstrip("=")

    # --- patch ---------------------------------------------------------------------------------

    async def _patch(
        self, request: web.Request, rt: ResourceType, rp: ResourcePath, caller: ob.Caller
    ) -> web.Response:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in PATCH_TYPES:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: "
                + ", ".join(PATCH_TYPES),
            )
        raw = await request.read()
        if content_type == APPLY_PATCH:
            return self._apply(request, rt, rp, caller, raw)
        current = self.service.row(rt, rp.namespace, rp.name)
        live = current.obj()
        patched = self._patched(rt, live, content_type, raw)
        if rp.subresource == "status":
            patched = {**live, "status": patched.get("status", {})}
        md = patched.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise errors.bad_request("metadata must be an object")
        # a patch that names a resourceVersion makes it a precondition; otherwise it applies
        # to the version just read
        if md.get("resourceVersion") in (None, live["metadata"].get("resourceVersion")):
            md["resourceVersion"] = str(current.rv)
        result = self.service.replace(
            rt, current, patched, subresource=rp.subresource, caller=caller
        )
        return self._respond(request, result, rt)

    def _patched(self, rt: ResourceType, live: JSON, content_type: str, raw: bytes) -> JSON:
        if (
            content_type == STRATEGIC_MERGE_PATCH
            and self.registry.owner_of(rt.group, rt.plural) != "builtin"
        ):
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "strategic merge patch is not supported for custom resources; use a merge patch",
            )
        patch = decode_json(raw)
        try:
            if content_type == JSON_PATCH:
                if not isinstance(patch, list):
                    raise errors.bad_request("a JSON patch must be a list of operations")
                return patching.json_patch(live, patch)
            if not isinstance(patch, dict):
                raise errors.bad_request("a merge patch must be a JSON object")
            if content_type == MERGE_PATCH:
                return patching.json_merge_patch(live, patch)
            return patching.strategic_merge_patch(live, patch, rt.schema)
        except patching.PatchError as exc:
            raise ApiError(422, "Invalid", f"the patch could not be applied: {exc}") from None

    def _apply(
        self,
        request: web.Request,
        rt: ResourceType,
        rp: ResourcePath,
        caller: ob.Caller,
        raw: bytes,
    ) -> web.Response:
        manager = request.query.get("fieldManager", "")
        if not manager:
            raise errors.bad_request("PATCH with apply requires a fieldManager query parameter")
        applied = decode_body(raw, "application/yaml")
        force = request.query.get("force") == "true"
        live = self.service.find(rt, rp.namespace, rp.name)
        try:
            merged = patching.server_side_apply(
                live, applied, manager=manager, force=force, schema=rt.schema
            )
        except patching.ApplyConflict as exc:
            raise ApiError(
                409, "Conflict", str(exc), kind=rt.plural, group=rt.group, name=rp.name
            ) from None
        except patching.PatchError as exc:
            raise ApiError(
                422, "Invalid", f"the apply configuration could not be applied: {exc}"
            ) from None
        if live is None:
            merged.setdefault("metadata", {})["name"] = rp.name
            created = self.service.create(rt, rp.namespace, merged, caller)
            return self._respond(request, created, rt, status=201)
        current = self.service.row(rt, rp.namespace, rp.name)
        merged.setdefault("metadata", {})["resourceVersion"] = str(current.rv)
        result = self.service.replace(
            rt, current, merged, subresource=rp.subresource, caller=caller
        )
        return self._respond(request, result, rt)

    # --- delete --------------------------------------------------------------------------------

    async def _delete(
        self, request: web.Request, rt: ResourceType, rp: ResourcePath, caller: ob.Caller
    ) -> web.Response:
        raw = await request.read()
        options: JSON = {}
        if raw.strip():
            options = decode_body(raw, request.headers.get("Content-Type", "application/json"))
        propagation = (
            request.query.get("propagationPolicy")
            or options.get("propagationPolicy")
            or "Background"
        )
        if propagation not in ("Background", "Foreground", "Orphan"):
            raise errors.invalid(
                "DeleteOptions",
                "",
                "",
                [
                    errors.Cause(
                        "propagationPolicy",
                        f'Unsupported value: "{propagation}": supported values: "Background", "Foreground", "Orphan"',
                        "FieldValueNotSupported",
                    )
                ],
            )
        if "dryRun" in options and options["dryRun"] == ["All"]:
            caller = dataclasses.replace(caller, dry_run=True)
        preconditions = options.get("preconditions") or {}
        if rp.name:
            obj, _ = self.service.delete(
                rt,
                rp.namespace,
                rp.name,
                propagation=propagation,
                preconditions=preconditions,
                caller=caller,
            )
            return self._respond(request, obj, rt)
        matches = self._filters(request, rt)
        for row in self.service.scan(rt, rp.namespace):
            obj = row.obj()
            if matches is None or matches(obj):
                self.service.delete(
                    rt,
                    str(obj["metadata"].get("namespace", "")),
                    obj["metadata"]["name"],
                    propagation=propagation,
                    caller=caller,
                )
        return json_response(_success())

    # --- watch ---------------------------------------------------------------------------------

    async def _watch(
        self, request: web.Request, rt: ResourceType, rp: ResourcePath
    ) -> web.StreamResponse:
        watch = _Watch(self, request, rt, rp)
        return await watch.run()


class _Watch:
    """One watch stream: initial state or history replay, then live changes, with bookmarks."""

    def __init__(
        self, handlers: ApiHandlers, request: web.Request, rt: ResourceType, rp: ResourcePath
    ) -> None:
        self.h = handlers
        self.request = request
        self.rt = rt
        self.rp = rp
        self.wanted: Wanted = parse_accept(request.headers.get("Accept", ""))
        query = request.query
        self.bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        self.initial = query.get("sendInitialEvents") in ("true", "1")
        self.timeout = _int_param(request, "timeoutSeconds") or 1800
        extra_fields = f"metadata.name={rp.name}" if rp.name else ""
        fields = ",".join(f for f in (query.get("fieldSelector", ""), extra_fields) if f)
        self.matches = (
            handlers._filters(_with_query(request, fieldSelector=fields), rt)
            if fields or query.get("labelSelector")
            else None
        )
        self.prefix = ob.resource_prefix(rt, rp.namespace)
        self.last_rv = self.start_rv = 0
        self.writing = False
        # decided once per stream, not per event: stored bytes can go out as they are
        self.raw = not self.wanted.table and not handlers._needs_rewrite(rt)

    def _match(self, data: JSON | None) -> bool:
        return data is not None and (self.matches is None or self.matches(data))

    async def run(self) -> web.StreamResponse:
        store = self.h.service.store
        sub = self.h.service.hub.subscribe(self.prefix)
        sub.on_overflow = self._drop_if_stalled
        resp = web.StreamResponse(
            headers={"Content-Type": "application/json", "Cache-Control": "no-cache"}
        )
        resp.enable_chunked_encoding()
        try:
            backlog = self._backlog(store)
            await resp.prepare(self.request)
            if self.request.transport is not None:
                # a client that stops reading makes the writer wait after this much, not after
                # the half MiB that asyncio's TLS layer buffers by default
                self.request.transport.set_write_buffer_limits(high=WATCH_WRITE_BUFFER)
            if isinstance(backlog, ApiError):
                await self._error(resp, backlog)
                return resp
            try:
                for etype, change in backlog:
                    await self._send(resp, etype, change)
            except st.Compacted as exc:  # between two pages of the history it replays
                await self._error(resp, errors.gone(str(exc)))
                return resp
            if self.initial and self.bookmarks:
                await self._bookmark(resp, initial_end=True)
            await self._follow(resp, sub)
        except ConnectionResetError:
            # the client hung up (a write found the connection gone): the normal end of a
            # watch, not a server error
            log.debug("watch client on %s went away", self.prefix)
        except asyncio.CancelledError:
            log.debug("watch client on %s went away (handler cancelled)", self.prefix)
            raise
        finally:
            self.h.service.hub.unsubscribe(sub)
        return resp

    def _drop_if_stalled(self) -> None:
        """Called when the hub closes this watcher for falling behind. A writer blocked on a
        client that does not read would never see the end: drop its connection, so that the
        buffered bytes and the TLS state go now."""
        transport = self.request.transport
        if not self.writing or transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # a reset, not a FIN queued behind megabytes the client will never read: the
            # kernel frees the connection's buffers at once instead of probing for minutes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def _backlog(self, store: st.Store) -> Iterable[tuple[str, Change]] | ApiError:
        """What precedes live changes; taken without awaiting, so nothing slips in between."""
        rv_param = self.request.query.get("resourceVersion", "")
        self.last_rv = self.start_rv = store.revision
        if self.initial or rv_param in ("", "0"):
            snapshot = self.h.service.hub.snapshot(self.prefix, lambda: self._current(store))
            return self._initial(snapshot)
        if not rv_param.isdigit():
            return errors.bad_request(f'invalid resourceVersion "{rv_param}"')
        try:
            page = store.events_since(int(rv_param), self.prefix, limit=HISTORY_PAGE)
        except st.Compacted as exc:
            return errors.gone(str(exc))
        return self._replay(store, page)

    def _replay(self, store: st.Store, page: list[st.Event]) -> Iterator[tuple[str, Change]]:
        """History from the version asked for up to this watch's start, read a page at a time:
        a watcher far behind holds one page, not the whole history. Events never change, so
        later pages agree with the first; a compaction in between raises Compacted."""
        while page:
            for event in page:
                if event.rv > self.start_rv:
                    return  # from here on, the live changes carry it
                translated = self._translate(self._historic(store, event))
                if translated is not None:
                    yield translated
            if len(page) < HISTORY_PAGE:
                return
            page = store.events_since(page[-1].rv, self.prefix, limit=HISTORY_PAGE)

    def _historic(self, store: st.Store, event: st.Event) -> Change:
        prev = store.previous_state(event.key, event.rv) if self.matches is not None else None
        return Change(event.type.value, event.rv, event.key, event.data, prev)

    def _current(self, store: st.Store) -> list[Change]:
        return [Change("ADDED", r.rv, r.key, r.data) for r in store.scan(self.prefix)]

    def _initial(self, snapshot: Snapshot) -> Iterator[tuple[str, Change]]:
        # a generator: it keeps the shared snapshot alive only while this watcher sends it
        for change in snapshot.changes:
            if self.matches is None or self._match(change.obj):
                yield "ADDED", change

    def _translate(self, change: Change) -> tuple[str, Change] | None:
        """The event this watcher sees for a change: selectors turn entries and exits into
        ADDED and DELETED, as upstream's filtered watches do."""
        if self.matches is None:
            return change.type, change
        if change.type == "DELETED":
            return ("DELETED", change) if self._match(change.obj) else None
        now = self._match(change.obj)
        before = self._match(change.prev_obj) if change.type != "ADDED" else False
        if now and before:
            return "MODIFIED", change
        if now:
            return "ADDED", change
        if before:
            return "DELETED", change
        return None

    async def _follow(self, resp: web.StreamResponse, sub: Any) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                change = await asyncio.wait_for(sub.queue.get(), min(remaining, BOOKMARK_INTERVAL))
            except TimeoutError:
                if self.bookmarks:
                    await self._bookmark(resp)
                continue
            if change is None:
                return
            if change.rv <= self.last_rv:
                continue
            self.last_rv = change.rv
            translated = self._translate(change)
            if translated is not None:
                await self._send(resp, *translated)

    async def _send(self, resp: web.StreamResponse, etype: str, change: Change) -> None:
        if self.raw:
            # the stored bytes are already the object as served: no parse, no dump
            await self._write(
                resp, b'{"type":"' + etype.encode() + b'","object":' + change.data + b"}\n"
            )
            return
        obj = ApiHandlers._as_version(json.loads(change.data), self.rt)
        if self.wanted.table:
            rv = str(obj["metadata"].get("resourceVersion", ""))
            obj = self.h._table([obj], self.rt, self.request, rv)
        await self._write(resp, _dumps({"type": etype, "object": obj}) + b"\n")

    async def _write(self, resp: web.StreamResponse, data: bytes) -> None:
        self.writing = True  # a write only waits while the client's buffers are full
        try:
            await resp.write(data)
        finally:
            self.writing = False

    async def _error(self, resp: web.StreamResponse, error: ApiError) -> None:
        await self._write(resp, _dumps({"type": "ERROR", "object": error.status()}) + b"\n")

    async def _bookmark(self, resp: web.StreamResponse, *, initial_end: bool = False) -> None:
        md: JSON = {"resourceVersion": str(max(self.last_rv, 0))}
        if initial_end:
            md["annotations"] = {"k8s.io/initial-events-end": "true"}
        bookmark = {"kind": self.rt.kind, "apiVersion": self.rt.api_version, "metadata": md}
        await self._write(resp, _dumps({"type": "BOOKMARK", "object": bookmark}) + b"\n")


def _with_query(request: web.Request, **overrides: str) -> web.Request:
    query = dict(request.query)
    query.update(overrides)
    return request.clone(rel_url=request.rel_url.with_query(query))


def _int_param(request: web.Request, name: str) -> int:
    value = request.query.get(name, "")
    if not value:
        return 0
    if not value.isdigit():
        raise errors.bad_request(f"{name}: invalid value {value!r}: must be a non-negative integer")
    return int(value)
