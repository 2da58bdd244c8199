"""The OpenAPI documents, read by the real kubectl from a tiny server that serves only them.

The server here serves discovery, the OpenAPI documents and a create that validates like VMO's
(unknown fields refused when kubectl asks for ``fieldValidation=Strict``), so that what kubectl
does with the documents is tested apart from the rest of the API server.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from vmo.api import schema
from vmo.api.core import core_resource_types
from vmo.api.types import JSON, ResourceType
from vmo.apiserver import openapi, openapi_pb
from vmo.apiserver.server import builtin_types

KUBECTL = shutil.which("kubectl")
TYPES = core_resource_types()


# --------------------------------------------------------------------------- document shapes


def by_kind(kind: str) -> ResourceType:
    return next(rt for rt in TYPES if rt.kind == kind)


def test_definition_names_follow_upstream() -> None:
    assert openapi.definition_name("", "v1", "Namespace") == "io.k8s.api.core.v1.Namespace"
    assert openapi.definition_name("rbac.authorization.k8s.io", "v1", "Role") == (
        "io.k8s.api.rbac.v1.Role"
    )
    assert openapi.definition_name("kubevirt.io", "v1", "VirtualMachine") == (
        "io.kubevirt.v1.VirtualMachine"
    )
    assert openapi.definition_name("apiextensions.k8s.io", "v1", "CustomResourceDefinition") == (
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition"
    )


def test_v3_index_lists_every_group_version_with_a_hash() -> None:
    paths = openapi.openapi_v3_index(TYPES)["paths"]
    assert {"api/v1", "apis/rbac.authorization.k8s.io/v1", "apis/apiextensions.k8s.io/v1"} <= set(
        paths
    )
    url = paths["api/v1"]["serverRelativeURL"]
    assert url.startswith("/openapi/v3/api/v1?hash=") and len(url.split("=")[1]) == 128


def test_v3_hash_changes_with_the_document() -> None:
    before = openapi.openapi_v3_index(TYPES)["paths"]["api/v1"]["serverRelativeURL"]
    fewer = [rt for rt in TYPES if rt.kind != "Secret"]
    after = openapi.openapi_v3_index(fewer)["paths"]["api/v1"]["serverRelativeURL"]
    assert before != after


def test_v3_schema_carries_gvk_and_object_meta_reference() -> None:
    doc = openapi.openapi_v3_group_version(TYPES, "", "v1")
    node = doc["components"]["schemas"]["io.k8s.api.core.v1.ConfigMap"]
    assert node["x-kubernetes-group-version-kind"] == [
        {"group": "", "version": "v1", "kind": "ConfigMap"}
    ]
    assert node["properties"]["metadata"]["allOf"] == [
        {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    ]
    assert "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta" in doc["components"]["schemas"]
    assert "io.k8s.api.rbac.v1.Role" not in doc["components"]["schemas"]


def test_v3_paths_offer_field_validation_on_writes() -> None:
    doc = openapi.openapi_v3_group_version(TYPES, "", "v1")
    item = doc["paths"]["/api/v1/namespaces/{namespace}/configmaps/{name}"]
    assert item["patch"]["x-kubernetes-group-version-kind"]["kind"] == "ConfigMap"
    assert "fieldValidation" in {p["name"] for p in item["patch"]["parameters"]}
    assert "/api/v1/namespaces/{name}/status" in doc["paths"]


def test_create_only_kinds_publish_only_post() -> None:
    doc = openapi.openapi_v3_group_version(TYPES, "authorization.k8s.io", "v1")
    item = doc["paths"]["/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"]
    assert set(item) == {"post", "parameters"}


def test_unsupported_fields_are_explained_not_hidden() -> None:
    doc = openapi.openapi_v3_group_version(TYPES, "", "v1")
    spec = doc["components"]["schemas"]["io.k8s.api.core.v1.Service"]["properties"]["spec"]
    assert "not supported by VMO" in spec["properties"]["externalName"]["description"]
    assert "x-vmo-unsupported" not in str(doc)


def test_v2_uses_swagger_shapes() -> None:
    doc = openapi.openapi_v2(TYPES)
    assert doc["swagger"] == "2.0"
    service = doc["definitions"]["io.k8s.api.core.v1.Service"]
    target_port = service["properties"]["spec"]["properties"]["ports"]["items"]["properties"][
        "targetPort"
    ]
    assert target_port["format"] == "int-or-string" and "anyOf" not in target_port
    assert service["properties"]["metadata"]["$ref"] == (
        "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    )


def test_every_patchable_kind_offers_field_validation_in_v3() -> None:
    """Without it kubectl falls back to validating against /openapi/v2 on its own."""
    for rt in builtin_types():
        if "patch" not in rt.verbs:
            continue
        doc = openapi.openapi_v3_group_version(builtin_types(), rt.group, rt.version)
        patches = [
            item["patch"]
            for item in doc["paths"].values()
            if "patch" in item
            and item["patch"]["x-kubernetes-group-version-kind"]["kind"] == rt.kind
        ]
        assert patches, f"{rt.kind} has no PATCH operation"
        for patch in patches:
            assert "fieldValidation" in {p["name"] for p in patch["parameters"]}, rt.kind


def test_v2_paths_offer_field_validation_as_swagger_parameters() -> None:
    doc = openapi.openapi_v2(TYPES)
    item = doc["paths"]["/api/v1/namespaces/{namespace}/configmaps/{name}"]
    patch = item["patch"]
    assert patch["x-kubernetes-group-version-kind"] == {
        "group": "",
        "version": "v1",
        "kind": "ConfigMap",
    }
    assert patch["consumes"][0] == "application/apply-patch+yaml"
    body, *queries = patch["parameters"]
    assert body["in"] == "body" and body["schema"]["$ref"].startswith("#/definitions/")
    assert {"name": "fieldValidation", "in": "query", "type": "string"}.items() <= next(
        q for q in queries if q["name"] == "fieldValidation"
    ).items()
    assert [p["name"] for p in item["parameters"]] == ["name", "namespace"]
    assert item["parameters"][0]["type"] == "string" and "schema" not in item["parameters"][0]


@pytest.mark.parametrize(
    ("accept", "protobuf"),
    [
        ("application/com.github.proto-openapi.spec.v2@v1.0+protobuf", True),
        ("application/com.github.proto-openapi.spec.v2.v1.0+protobuf", True),
        ("application/com.github.proto-openapi.spec.v2@v1.0+protobuf, application/json", True),
        ("application/json, application/com.github.proto-openapi.spec.v2@v1.0+protobuf", False),
        ("application/json", False),
        ("*/*", False),
        ("", False),
    ],
)
def test_v2_is_protobuf_when_asked_for_first(accept: str, protobuf: bool) -> None:
    assert openapi_pb.wants_protobuf(accept) is protobuf


def test_v2_protobuf_carries_definitions_paths_and_extensions() -> None:
    body, content_type = openapi.openapi_v2_negotiated(
        TYPES, "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
    )
    assert content_type == "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
    document = openapi_pb._document_class().FromString(body)
    assert document.swagger == "2.0"
    definitions = {d.name: d.value for d in document.definitions.additional_properties}
    review = definitions["io.k8s.api.authorization.v1.SelfSubjectAccessReview"]
    (gvk,) = [e for e in review.vendor_extension if e.name == "x-kubernetes-group-version-kind"]
    assert json.loads(gvk.value.yaml) == [
        {"group": "authorization.k8s.io", "version": "v1", "kind": "SelfSubjectAccessReview"}
    ]
    assert list(review.type.value) == ["object"] and list(review.required) == ["spec"]
    fields = {f.name: f.value for f in review.properties.additional_properties}
    assert fields["metadata"]._ref == "#/definitions/" + openapi.OBJECT_META
    paths = {p.name: p.value for p in document.paths.path}
    patch = paths["/api/v1/namespaces/{namespace}/configmaps/{name}"].patch
    names = [
        p.parameter.non_body_parameter.query_parameter_sub_schema.name for p in patch.parameters
    ]
    assert "fieldValidation" in names
    assert patch.parameters[0].parameter.body_parameter.name == "body"


def test_an_empty_properties_map_stays_present_in_protobuf() -> None:
    """kube-openapi tells an object with no fields from a map by whether properties is set."""
    document = {"swagger": "2.0", "definitions": {"Empty": {"type": "object", "properties": {}}}}
    decoded = openapi_pb._document_class().FromString(openapi_pb.encode(document))
    empty = decoded.definitions.additional_properties[0].value
    assert empty.HasField("properties") and not empty.properties.additional_properties


def test_additional_properties_false_is_kept_in_protobuf() -> None:
    document = {"swagger": "2.0", "definitions": {"Closed": {"additionalProperties": False}}}
    decoded = openapi_pb._document_class().FromString(openapi_pb.encode(document))
    closed = decoded.definitions.additional_properties[0].value.additional_properties
    assert closed.WhichOneof("oneof") == "boolean" and closed.boolean is False


# --------------------------------------------------------------------------- the tiny server


@dataclass
class TinyServer:
    """Discovery, OpenAPI and an echoing create, in a thread; records what it was asked."""

    publish_field_validation: bool = True
    serve_v2: bool = True
    serve_v3: bool = True
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.rel_url}")
        path = request.path
        if request.method == "POST":
            return await self.create(request)
        if path == "/openapi/v2" and self.serve_v2:
            accept = request.headers.get("Accept", "")
            payload, content_type = openapi.openapi_v2_negotiated(TYPES, accept)
            return web.Response(body=payload, content_type=content_type)
        body = self.document(path)
        if body is None:
            return web.json_response(_status(404, "NotFound", "not found"), status=404)
        return web.json_response(body)

    def document(self, path: str) -> JSON | None:
        if path == "/version":
            return {"major": "1", "minor": "32", "gitVersion": "v1.32.0"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            return _group_list()
        if path.startswith("/openapi/v3") and not self.serve_v3:
            return None
        if path == "/openapi/v3":
            return openapi.openapi_v3_index(TYPES)
        if path.startswith("/openapi/v3/"):
            return self.group_version_document(path.removeprefix("/openapi/v3/"))
        parts = path.strip("/").split("/")
        if parts == ["api", "v1"]:
            return _resource_list("", "v1")
        if parts[0] == "apis" and len(parts) == 3:
            return _resource_list(parts[1], parts[2])
        return None

    def group_version_document(self, gv_path: str) -> JSON:
        parts = gv_path.split("/")
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        doc = openapi.openapi_v3_group_version(TYPES, group, version)
        if not self.publish_field_validation:
            for item in doc["paths"].values():
                for operation in item.values():
                    if isinstance(operation, dict):
                        operation.pop("parameters", None)
        return doc

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        rt = next(t for t in TYPES if t.plural == request.path.rsplit("/", 1)[1])
        assert rt.schema is not None
        message = schema.strict_decoding_message(schema.validate(rt.schema, body))
        if message and request.query.get("fieldValidation") == "Strict":
            text = f'{rt.kind} in version "v1" cannot be handled as a {rt.kind}: {message}'
            return web.json_response(_status(400, "BadRequest", text), status=400)
        return web.json_response(body, status=201)


def _status(code: int, reason: str, message: str) -> JSON:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "code": code,
        "message": message,
    }


def _group_list() -> JSON:
    versions: dict[str, list[str]] = {}
    for rt in TYPES:
        if rt.group and rt.version not in versions.setdefault(rt.group, []):
            versions[rt.group].append(rt.version)
    groups = [
        {
            "name": group,
            "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in vs],
            "preferredVersion": {"groupVersion": f"{group}/{vs[0]}", "version": vs[0]},
        }
        for group, vs in versions.items()
    ]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def _resource_list(group: str, version: str) -> JSON:
    resources = [
        {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(rt.verbs),
            "shortNames": list(rt.short_names),
        }
        for rt in TYPES
        if rt.group == group and rt.version == version
    ]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


def serve(server: TinyServer) -> Iterator[TinyServer]:
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())
    ready = threading.Event()

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        server.url = f"http://127.0.0.1:{port}"
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    ready.wait(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="module")
def tiny() -> Iterator[TinyServer]:
    yield from serve(TinyServer())


@dataclass
class Kubectl:
    server: TinyServer
    cache: Path

    def __call__(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        assert KUBECTL is not None
        command = [KUBECTL, "-s", self.server.url, f"--cache-dir={self.cache}", *args]
        env = {"KUBECONFIG": "/dev/null", "PATH": "/usr/bin:/bin", "HOME": str(self.cache)}
        return subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=60, env=env, check=False
        )


@pytest.fixture(scope="module")
def kubectl(tiny: TinyServer, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    return Kubectl(tiny, tmp_path_factory.mktemp("kubectl-cache"))


CONFIG_MAP: JSON = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "settings", "namespace": "default"},
    "data": {"color": "blue"},
}


def test_explain_configmaps_shows_vmo_descriptions(kubectl: Kubectl) -> None:
    out = kubectl("explain", "configmaps")
    assert out.returncode == 0, out.stderr
    assert "KIND:       ConfigMap" in out.stdout
    assert "ConfigMap holds configuration data" in out.stdout
    assert "binaryData\t<map[string]string>" in out.stdout


def test_explain_follows_the_object_meta_reference(kubectl: Kubectl) -> None:
    out = kubectl("explain", "namespace.metadata")
    assert out.returncode == 0, out.stderr
    assert "FIELD: metadata <ObjectMeta>" in out.stdout
    assert "ownerReferences\t<[]OwnerReference>" in out.stdout


def test_explain_reaches_nested_crd_fields_by_short_name(kubectl: Kubectl) -> None:
    out = kubectl("explain", "crd.spec.versions")
    assert out.returncode == 0, out.stderr
    assert "GROUP:      apiextensions.k8s.io" in out.stdout
    assert "additionalPrinterColumns\t<[]Object>" in out.stdout
    assert "served\t<boolean> -required-" in out.stdout


def test_apply_of_unknown_field_is_refused_by_server_side_validation(kubectl: Kubectl) -> None:
    bad = {**CONFIG_MAP, "colour": "red"}
    out = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(bad))
    assert out.returncode != 0
    assert 'strict decoding error: unknown field "colour"' in out.stderr
    # kubectl saw fieldValidation among the write parameters and left checking to the server
    assert any("POST" in r and "fieldValidation=Strict" in r for r in kubectl.server.requests)


def test_apply_of_valid_object_succeeds(kubectl: Kubectl) -> None:
    out = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(CONFIG_MAP))
    assert out.returncode == 0, out.stderr
    assert "configmap/settings created" in out.stdout


def test_explain_reads_the_protobuf_v2_document(kubectl: Kubectl) -> None:
    """kube-openapi parses the whole document or nothing: every definition must be well formed."""
    out = kubectl("explain", "--output=plaintext-openapiv2", "configmaps")
    assert out.returncode == 0, out.stderr
    assert "ConfigMap holds configuration data" in out.stdout
    assert "binaryData\t<map[string]string>" in out.stdout
    assert any(r.startswith("GET /openapi/v2") for r in kubectl.server.requests)


def test_without_v3_kubectl_reads_field_validation_from_v2_paths(tmp_path: Path) -> None:
    """A kubectl that cannot read v3 learns from the protobuf v2 paths that VMO validates."""
    for server in serve(TinyServer(serve_v3=False)):
        bad = {**CONFIG_MAP, "colour": "red"}
        out = Kubectl(server, tmp_path)("apply", "-f", "-", stdin=yaml.safe_dump(bad))
        assert out.returncode != 0
        assert 'strict decoding error: unknown field "colour"' in out.stderr
        assert any(r.startswith("GET /openapi/v2") for r in server.requests)
        assert any("POST" in r and "fieldValidation=Strict" in r for r in server.requests)


def test_without_v3_field_validation_kubectl_validates_against_v2(tmp_path: Path) -> None:
    """The path the reviews always take: kubectl checks the object against the v2 schema."""
    for server in serve(TinyServer(publish_field_validation=False)):
        bad = {**CONFIG_MAP, "colour": "red"}
        out = Kubectl(server, tmp_path)("apply", "-f", "-", stdin=yaml.safe_dump(bad))
        assert out.returncode != 0
        assert 'ValidationError(ConfigMap): unknown field "colour"' in out.stderr
        assert not any(r.startswith("POST") for r in server.requests)


def test_without_field_validation_or_v2_kubectl_refuses(tmp_path: Path) -> None:
    """Pins why v2 is served: with neither, kubectl cannot validate and refuses to apply."""
    for server in serve(TinyServer(publish_field_validation=False, serve_v2=False)):
        out = Kubectl(server, tmp_path)("apply", "-f", "-", stdin=yaml.safe_dump(CONFIG_MAP))
        assert out.returncode != 0
        assert "error validating data" in out.stderr
        assert not any(r.startswith("POST") for r in server.requests)
