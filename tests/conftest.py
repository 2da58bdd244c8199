"""Shared fixtures: one embedded API server per test session, and clients that talk to it."""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from vmo.engine.storage.urlpolicy import POLICY_CONFIGMAP, POLICY_NAMESPACE, policy_configmap
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.guest import GuestImage, build_guest, default_cache_dir

ROOT = Path(__file__).resolve().parent.parent


def _upstream_schemas() -> Path:
    """The upstream schemas, the conformance oracle: ``../shared/schemas`` beside the checkout
    (``$VMO_UPSTREAM_SCHEMAS`` overrides). Their absence is an error, not a reason to skip."""
    for candidate in (
        os.environ.get("VMO_UPSTREAM_SCHEMAS"),
        ROOT.parent / "shared" / "schemas",
        "/work/shared/schemas",
    ):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise RuntimeError(
        "the upstream schemas (../shared/schemas) are missing: the conformance tests need them"
    )


SCHEMAS = _upstream_schemas()
_names = itertools.count()


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    server = ThreadedServer(tmp_path_factory.mktemp("vmo-home")).start()
    yield server
    server.stop()


@pytest.fixture
def unique() -> str:
    """A fresh name, so tests sharing the server never collide."""
    return f"t{next(_names)}"


@dataclass
class Api:
    """Plain HTTPS requests to the server, as a given user."""

    base: str
    ca: Path
    token: str | None

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data = kw.pop("data", None)
        if body is not None:
            data = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        return requests.request(
            method,
            self.base + path,
            data=data,
            headers=headers,
            verify=str(self.ca),
            timeout=30,
            **kw,
        )

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        return self.request("POST", path, body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        return self.request("PUT", path, body, **kw)

    def patch(self, path: str, body: Any, content_type: str, **kw: Any) -> requests.Response:
        return self.request("PATCH", path, body, headers={"Content-Type": content_type}, **kw)

    def delete(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        return self.request("DELETE", path, body, **kw)


@pytest.fixture(scope="session")
def api(apiserver: ThreadedServer) -> Api:
    return Api(apiserver.url, apiserver.ca, apiserver.admin_token)


@pytest.fixture(scope="session")
def anonymous(apiserver: ThreadedServer) -> Api:
    return Api(apiserver.url, apiserver.ca, None)


@dataclass
class Kubectl:
    kubeconfig: Path

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)

    def apply(
        self, manifest: dict[str, Any] | str, *extra: str
    ) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return self("apply", "-f", "-", *extra, input=text)


@pytest.fixture(scope="session")
def kubectl(apiserver: ThreadedServer) -> Kubectl:
    return Kubectl(apiserver.kubeconfig)


def make_user(apiserver: ThreadedServer, name: str, *groups: str) -> tuple[str, Path]:
    """Adds a user with a token; returns the token and a kubeconfig for it."""
    assert apiserver.server is not None
    token = apiserver.server.tokens.add(name, tuple(groups))
    path = apiserver.home / f"{name}.kubeconfig"
    apiserver.server.write_kubeconfig(
        path, url=apiserver.url, user=name, token=token, namespace="virtual-machines"
    )
    return token, path


# --- the test guest, served over HTTP as a user's image server would (end-to-end modules) ---


@pytest.fixture(scope="module")
def k(cluster: ThreadedServer) -> Kubectl:
    """kubectl as the admin of the module's engine cluster (each e2e module defines ``cluster``)."""
    return Kubectl(cluster.kubeconfig)


@pytest.fixture(scope="module")
def capi(cluster: ThreadedServer) -> Api:
    """Plain HTTPS requests as the admin of the module's engine cluster."""
    return Api(cluster.url, cluster.ca, cluster.admin_token)


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return build_guest(default_cache_dir())


@pytest.fixture(scope="module")
def image_server(guest: GuestImage, cluster: ThreadedServer) -> Iterator[str]:
    """The guest over HTTP on loopback, allowed for imports on the module's ``cluster`` the
    way an administrator allows a local mirror (the import policy refuses loopback otherwise)."""
    handler = partial(_QuietHandler, directory=str(guest.root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    with imports_allowed(cluster, host):
        yield f"http://{host}"
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def imports_allowed(server: ThreadedServer, *entries: str) -> Iterator[None]:
    """DataVolume imports from ``entries`` (host[:port] or CIDR) allowed on ``server`` for the
    block, as an administrator does it: ``kubectl apply`` of the namespace ``vmo-system`` and
    the ConfigMap ``vmo-import-policy``, deleted afterwards."""
    kubectl = Kubectl(server.kubeconfig)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": POLICY_NAMESPACE}}
    kubectl.apply(yaml.safe_dump_all([namespace, policy_configmap(*entries)]))
    try:
        yield
    finally:
        kubectl("delete", "configmap", "-n", POLICY_NAMESPACE, POLICY_CONFIGMAP)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass
