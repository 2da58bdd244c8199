"""A minimal fake API server that records what a real kubectl sends, for protobuf wire tests.

It serves just enough legacy discovery for `kubectl create <kind>` generators and `kubectl auth`,
records every request, and answers POSTs through a responder, in JSON or in protobuf.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from vmo.apiserver import protobuf

KUBECTL = shutil.which("kubectl")

JSONObject = dict[str, Any]
# Takes the decoded request object, returns (HTTP status, object to answer with).
Responder = Callable[[JSONObject], tuple[int, JSONObject]]


def echo(obj: JSONObject) -> tuple[int, JSONObject]:
    """Answer 201 with the object as received, the way a create does."""
    return 201, obj


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    content_type: str
    accept: str
    body: bytes


def _resource(name: str, kind: str, *, namespaced: bool, **extra: str) -> JSONObject:
    verbs = ["create", "get", "list", "delete"]
    resource = {"name": name, "singularName": "", "namespaced": namespaced, "kind": kind}
    return resource | {"verbs": verbs} | extra


_GROUPS = ("apps", "rbac.authorization.k8s.io", "authorization.k8s.io", "authentication.k8s.io")

_DISCOVERY: dict[str, JSONObject] = {
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0"},
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": group,
                "versions": [{"groupVersion": f"{group}/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": f"{group}/v1", "version": "v1"},
            }
            for group in _GROUPS
        ],
    },
    "/api/v1": {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            _resource("namespaces", "Namespace", namespaced=False),
            _resource("pods", "Pod", namespaced=True),
            _resource("secrets", "Secret", namespaced=True),
            _resource("configmaps", "ConfigMap", namespaced=True),
            _resource("services", "Service", namespaced=True),
            _resource("serviceaccounts", "ServiceAccount", namespaced=True),
            _resource(
                "serviceaccounts/token",
                "TokenRequest",
                namespaced=True,
                group="authentication.k8s.io",
                version="v1",
            ),
        ],
    },
    "/apis/apps/v1": {
        "kind": "APIResourceList",
        "groupVersion": "apps/v1",
        "resources": [_resource("deployments", "Deployment", namespaced=True)],
    },
    "/apis/rbac.authorization.k8s.io/v1": {
        "kind": "APIResourceList",
        "groupVersion": "rbac.authorization.k8s.io/v1",
        "resources": [
            _resource("roles", "Role", namespaced=True),
            _resource("clusterroles", "ClusterRole", namespaced=False),
            _resource("rolebindings", "RoleBinding", namespaced=True),
            _resource("clusterrolebindings", "ClusterRoleBinding", namespaced=False),
        ],
    },
    "/apis/authorization.k8s.io/v1": {
        "kind": "APIResourceList",
        "groupVersion": "authorization.k8s.io/v1",
        "resources": [
            _resource("selfsubjectaccessreviews", "SelfSubjectAccessReview", namespaced=False),
            _resource("selfsubjectrulesreviews", "SelfSubjectRulesReview", namespaced=False),
            _resource("subjectaccessreviews", "SubjectAccessReview", namespaced=False),
        ],
    },
    "/apis/authentication.k8s.io/v1": {
        "kind": "APIResourceList",
        "groupVersion": "authentication.k8s.io/v1",
        "resources": [_resource("tokenreviews", "TokenReview", namespaced=False)],
    },
}

_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{server}"}}}}]
users: [{{name: u, user: {{token: test-token}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u, namespace: default}}}}]
current-context: x
"""


@dataclass
class KubectlCapture:
    """Runs kubectl against a recording fake server; use as a context manager."""

    workdir: Path
    responder: Responder = echo
    answer_protobuf: bool = False
    requests: list[Request] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def __enter__(self) -> KubectlCapture:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        server = f"http://127.0.0.1:{self._server.server_address[1]}"
        (self.workdir / "kubeconfig").write_text(_KUBECONFIG.format(server=server))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert KUBECTL is not None
        command = [
            KUBECTL,
            f"--kubeconfig={self.workdir / 'kubeconfig'}",
            f"--cache-dir={self.workdir / 'cache'}",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)

    def posts(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST"]

    def last_post(self) -> Request:
        posts = self.posts()
        assert posts, f"kubectl sent no POST; requests: {[r.path for r in self.requests]}"
        return posts[-1]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

            def do_GET(self) -> None:
                capture._record(self, b"")
                path = self.path.split("?")[0]
                if path in _DISCOVERY:
                    self._answer_json(200, _DISCOVERY[path])
                else:
                    self._answer_json(404, {"kind": "Status", "apiVersion": "v1", "code": 404})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                capture._record(self, body)
                try:
                    status, answer = capture.responder(protobuf.decode(body))
                except protobuf.ProtobufError as err:
                    status, answer = (
                        400,
                        {"kind": "Status", "apiVersion": "v1", "message": str(err)},
                    )
                if capture.answer_protobuf:
                    self._answer(status, protobuf.PROTOBUF_CONTENT_TYPE, protobuf.encode(answer))
                else:
                    self._answer_json(status, answer)

            def _answer_json(self, status: int, obj: JSONObject) -> None:
                self._answer(status, "application/json", json.dumps(obj).encode())

            def _answer(self, status: int, content_type: str, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def _record(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        self.requests.append(
            Request(
                method=handler.command,
                path=handler.path,
                content_type=handler.headers.get("Content-Type", ""),
                accept=handler.headers.get("Accept", ""),
                body=body,
            )
        )
