"""The API server under bad input and load probes: unread watches, deep bodies, wrong media
types, clients that hang up, and anonymous requests. Each over real HTTPS (and kubectl)
against a server of this module's own, since some tests change its watch buffer or its RBAC."""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Api, Kubectl
from vmo.apiserver import http
from vmo.apiserver import store as st
from vmo.apiserver.heap import HeapTrimmer
from vmo.apiserver.requests import MAX_DEPTH
from vmo.apiserver.watch import WATCH_BUFFER, Change, WatchHub
from vmo.testing.apiserver import ThreadedServer

CM = "/api/v1/namespaces/{ns}/configmaps"
DEEP = 10_000  # the probe's depth


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Polls a condition the server reaches on its own loop, failing on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with ThreadedServer(tmp_path_factory.mktemp("vmo-hardening")) as running:
        yield running


@pytest.fixture(scope="module")
def admin(server: ThreadedServer) -> Api:
    return Api(server.url, server.ca, server.admin_token)


@pytest.fixture(scope="module")
def anonymous(server: ThreadedServer) -> Api:
    return Api(server.url, server.ca, None)


@pytest.fixture
def ns(admin: Api, unique: str) -> str:
    r = admin.post("/api/v1/namespaces", {"metadata": {"name": f"h-{unique}"}})
    assert r.status_code == 201, r.text
    return f"h-{unique}"


def configmap(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


# --- watches: bounded buffers, slow watchers closed, everything freed on hang-up ----------------


def change(n: int) -> Change:
    return Change("ADDED", n, f"/configmaps/ns/c{n}", b"{}")


def test_a_watcher_buffer_never_exceeds_its_bound_and_a_full_one_is_closed() -> None:
    hub = WatchHub(buffer=4)
    slow, other = hub.subscribe("/configmaps/"), hub.subscribe("/secrets/")
    closed: list[bool] = []
    slow.on_overflow = lambda: closed.append(True)
    for n in range(1, 5):
        hub.publish(change(n))
        assert slow.queue.qsize() == n
    hub.publish(change(5))  # the fifth event finds the buffer full
    assert closed == [True] and slow.overflowed
    # the events it will never send are let go at once; only the end marker is left
    assert slow.queue.qsize() == 1 and slow.queue.get_nowait() is None
    assert hub.watchers == 1  # the hub holds no reference to the closed watcher
    hub.publish(change(6))
    assert slow.queue.empty() and other.queue.empty()


def test_closing_the_hub_ends_watchers_whose_buffers_are_full() -> None:
    hub = WatchHub(buffer=2)
    sub = hub.subscribe("/configmaps/")
    hub.publish(change(1))
    hub.publish(change(2))
    hub.close_all()
    assert sub.queue.get_nowait() is None and hub.watchers == 0


def test_watchers_starting_between_changes_share_one_snapshot() -> None:
    hub = WatchHub()
    reads: list[int] = []

    def read() -> list[Change]:
        reads.append(1)
        return [change(1)]

    first = hub.snapshot("/configmaps/ns/", read)
    assert hub.snapshot("/configmaps/ns/", read) is first and len(reads) == 1
    hub.publish(change(2))  # a change under the prefix makes the next watcher read anew
    assert hub.snapshot("/configmaps/ns/", read) is not first and len(reads) == 2


def rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def test_heap_freed_by_closed_connections_goes_back_to_the_os() -> None:
    trimmer = HeapTrimmer()
    assert trimmer.available  # glibc, as on every machine VMO runs on
    # 170 MiB of connection-sized buffers; freeing every other one leaves holes between live
    # ones, which glibc never gives back by itself (its heap only shrinks from the top)
    buffers = [bytearray(60_000) for _ in range(3000)]
    assert not trimmer.trim_if_worth_it()  # a growing heap is left alone
    del buffers[::2]
    before = rss_mib()
    assert trimmer.trim_if_worth_it()
    assert rss_mib() < before - 50
    assert not trimmer.trim_if_worth_it()  # nothing freed since: nothing to do
    assert len(buffers) == 1500


def _tls(server: ThreadedServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.ca))


def unread_watch(server: ThreadedServer, path: str) -> ssl.SSLSocket:
    """A TLS client that asks for a watch and never reads it (a tiny receive window)."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    tls = _tls(server).wrap_socket(raw, server_hostname="127.0.0.1")
    request = f"GET {path} HTTP/1.1\r\nHost: vmo\r\nAuthorization: Bearer {server.admin_token}\r\n"
    tls.sendall(request.encode() + b"\r\n")
    return tls


def hang_up(sock: socket.socket) -> None:
    """Closes with a reset, as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return count


TCP_CLOSE = 7  # linux/tcp_states.h: a socket whose peer reset the connection


def reset_by_server(sock: socket.socket) -> bool:
    """Whether the server reset this connection (a FIN would leave it CLOSE_WAIT, or, queued
    behind bytes the client never read, ESTABLISHED)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE


def test_watches_are_freed_when_their_clients_hang_up(server: ThreadedServer, ns: str) -> None:
    assert server.server is not None
    hub = server.server.hub
    base_watchers, base_sockets = hub.watchers, open_sockets()
    clients = [unread_watch(server, f"{CM.format(ns=ns)}?watch=true") for _ in range(100)]
    try:
        wait_for(lambda: hub.watchers == base_watchers + 100)
    finally:
        for client in clients:
            client.close()
    # no event is ever published: the server must notice the hang-ups by itself
    wait_for(lambda: hub.watchers == base_watchers)
    wait_for(lambda: open_sockets() <= base_sockets)


def test_unread_watches_are_closed_when_they_fall_behind(
    server: ThreadedServer, admin: Api, ns: str
) -> None:
    assert server.server is not None
    hub = server.server.hub
    base = hub.watchers
    path = f"{CM.format(ns=ns)}?watch=true"
    events: list[str] = []
    count = 40
    # the reader subscribes with the default buffer: it shares the server's process (and GIL),
    # and must not be closed itself when the test's threads are slow
    reader = threading.Thread(target=_read_watch, args=(admin, ns, events, count), daemon=True)
    reader.start()
    wait_for(lambda: hub.watchers == base + 1)
    hub.buffer = 8  # for watchers subscribing from here on
    try:
        slow = [unread_watch(server, path) for _ in range(20)]
        # each request reaches the server after its client sent it: wait for all 20
        wait_for(lambda: hub.watchers == base + 21)
    finally:
        hub.buffer = WATCH_BUFFER
    try:
        for i in range(count):
            # 10 MiB in all: more than a watcher that reads nothing can hold in the kernel's
            # buffers (autotuned up to 4 MiB), the transport's and its watch buffer (8 events)
            r = admin.post(CM.format(ns=ns), configmap(f"big-{i}", k="x" * 256 * 1024))
            assert r.status_code == 201, r.text
        # the 20 that read nothing are reset, so that the server's kernel dropped what they never
        # read, and their watches closed; the one that reads sees every event
        wait_for(lambda: all(reset_by_server(sock) for sock in slow))
        wait_for(lambda: hub.watchers <= base + 1)
        reader.join(30)
        assert events == [f"big-{i}" for i in range(count)]
    finally:
        for sock in slow:
            sock.close()
    wait_for(lambda: hub.watchers == base)


def _read_watch(api: Api, ns: str, names: list[str], count: int) -> None:
    params = {"watch": "true", "timeoutSeconds": "60"}
    with api.get(CM.format(ns=ns), params=params, stream=True) as resp:
        for line in resp.iter_lines():
            names.append(json.loads(line)["object"]["metadata"]["name"])
            if len(names) == count:
                return


def test_a_client_hanging_up_is_not_logged_as_an_error(
    server: ThreadedServer, admin: Api, ns: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert server.server is not None
    hub = server.server.hub
    caplog.set_level(logging.DEBUG, logger="vmo.apiserver.http")
    base = hub.watchers
    client = unread_watch(server, f"{CM.format(ns=ns)}?watch=true&allowWatchBookmarks=true")
    wait_for(lambda: hub.watchers == base + 1)
    hang_up(client)
    assert admin.post(CM.format(ns=ns), configmap("after-hang-up")).status_code == 201
    wait_for(lambda: hub.watchers == base)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    went_away = [r for r in caplog.records if "went away" in r.getMessage()]
    assert went_away and all(r.levelno == logging.DEBUG for r in went_away)


def _history(admin: Api, ns: str, updates: int) -> str:
    """Writes a ConfigMap and ``updates`` changes to it; returns the version before them."""
    rv = admin.get(CM.format(ns=ns)).json()["metadata"]["resourceVersion"]
    assert admin.post(CM.format(ns=ns), configmap("h", n="0")).status_code == 201
    for n in range(1, updates + 1):
        r = admin.patch(f"{CM.format(ns=ns)}/h", {"data": {"n": str(n)}}, MERGE)
        assert r.status_code == 200
    return str(rv)


def _events(admin: Api, ns: str, rv: str, count: int) -> list[dict[str, Any]]:
    params = {"watch": "true", "resourceVersion": rv, "timeoutSeconds": "10"}
    events: list[dict[str, Any]] = []
    with admin.get(CM.format(ns=ns), params=params, stream=True) as resp:
        for line in resp.iter_lines():
            events.append(json.loads(line))
            if len(events) == count or events[-1]["type"] == "ERROR":
                break
    return events


MERGE = "application/merge-patch+json"


def test_a_watch_far_behind_replays_history_a_page_at_a_time(
    server: ThreadedServer, admin: Api, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.server is not None
    store = server.server.store
    pages: list[int] = []
    read = store.events_since

    def paged(rv: int, prefix: str = "", *, limit: int = 0) -> list[st.Event]:
        page = read(rv, prefix, limit=limit)
        pages.append(len(page))
        return page

    monkeypatch.setattr(http, "HISTORY_PAGE", 7)
    monkeypatch.setattr(store, "events_since", paged)
    rv = _history(admin, ns, updates=40)
    events = _events(admin, ns, rv, count=41)
    assert [e["object"]["data"]["n"] for e in events] == [str(n) for n in range(41)]
    assert [e["type"] for e in events] == ["ADDED"] + ["MODIFIED"] * 40
    assert len(pages) >= 6 and max(pages) <= 7  # never more than a page held at once


def test_a_compaction_between_pages_ends_the_replay_with_410(
    server: ThreadedServer, admin: Api, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.server is not None
    store = server.server.store
    read = store.events_since
    calls: list[int] = []

    def compacted_after_the_first_page(
        rv: int, prefix: str = "", *, limit: int = 0
    ) -> list[st.Event]:
        calls.append(rv)
        if len(calls) == 2:
            store.compact(keep=0)
        return read(rv, prefix, limit=limit)

    monkeypatch.setattr(http, "HISTORY_PAGE", 7)
    monkeypatch.setattr(store, "events_since", compacted_after_the_first_page)
    rv = _history(admin, ns, updates=20)
    events = _events(admin, ns, rv, count=30)
    assert [e["type"] for e in events] == ["ADDED"] + ["MODIFIED"] * 6 + ["ERROR"]
    assert events[-1]["object"]["code"] == 410 and events[-1]["object"]["reason"] == "Expired"


# --- bodies nested too deep: 400 from every decoder ---------------------------------------------


def nested(depth: int) -> dict[str, Any]:
    """A mapping ``depth`` containers deep (itself included)."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def deep_object_json(depth: int) -> bytes:
    """A ConfigMap-shaped body whose ``data`` nests until the whole is ``depth`` deep."""
    inner = '{"a":' * (depth - 2) + "{}" + "}" * (depth - 2)
    return f'{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"deep"}},"data":{inner}}}'.encode()


def deep_object_yaml(depth: int) -> bytes:
    # flow style: block style would indent past the body size limit long before 10,000
    inner = "{a: " * (depth - 2) + "{}" + "}" * (depth - 2)
    return f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\ndata: {inner}\n".encode()


def deep_json_patch(depth: int) -> bytes:
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return f'[{{"op":"add","path":"/data/x","value":{inner}}}]'.encode()


DEEP_CASES = {
    "create json": ("POST", "", "application/json", deep_object_json),
    "create yaml": ("POST", "", "application/yaml", deep_object_yaml),
    "update json": ("PUT", "/target", "application/json", deep_object_json),
    "update yaml": ("PUT", "/target", "application/yaml", deep_object_yaml),
    "merge patch": ("PATCH", "/target", "application/merge-patch+json", deep_object_json),
    "strategic merge patch": (
        "PATCH",
        "/target",
        "application/strategic-merge-patch+json",
        deep_object_json,
    ),
    "json patch": ("PATCH", "/target", "application/json-patch+json", deep_json_patch),
    "apply patch": (
        "PATCH",
        "/target?fieldManager=probe",
        "application/apply-patch+yaml",
        deep_object_yaml,
    ),
    "delete options": ("DELETE", "/target", "application/json", deep_object_json),
}


@pytest.mark.parametrize("case", DEEP_CASES)
def test_a_body_nested_10000_deep_is_a_400(admin: Api, ns: str, case: str) -> None:
    method, suffix, media, body = DEEP_CASES[case]
    assert admin.post(CM.format(ns=ns), configmap("target", k="v")).status_code == 201
    r = admin.request(
        method, CM.format(ns=ns) + suffix, data=body(DEEP), headers={"Content-Type": media}
    )
    assert r.status_code == 400, r.text
    status = r.json()
    assert status["kind"] == "Status" and status["reason"] == "BadRequest"
    assert f"nested more than {MAX_DEPTH} levels" in status["message"]
    assert admin.get(f"{CM.format(ns=ns)}/target").json()["data"] == {"k": "v"}


@pytest.mark.parametrize(
    "path",
    [
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachines/any/start",
    ],
    ids=["access review", "kubevirt subresource"],
)
def test_a_deep_body_to_a_computed_endpoint_is_a_400(admin: Api, path: str) -> None:
    method = "PUT" if "subresources" in path else "POST"
    r = admin.request(
        method, path, data=deep_object_json(DEEP), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["reason"] == "BadRequest", r.text


NEST_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "nests.hardening.vmo.dev"},
    "spec": {
        "group": "hardening.vmo.dev",
        "scope": "Namespaced",
        "names": {"plural": "nests", "singular": "nest", "kind": "Nest", "listKind": "NestList"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                        },
                    }
                },
            }
        ],
    },
}


def nest(name: str, depth: int) -> dict[str, Any]:
    """A Nest ``depth`` containers deep: the object, its spec, then spec's own nesting."""
    return {
        "apiVersion": "hardening.vmo.dev/v1",
        "kind": "Nest",
        "metadata": {"name": name},
        "spec": nested(depth - 1),
    }


def test_a_body_at_the_depth_limit_is_served_through_every_verb(admin: Api, ns: str) -> None:
    r = admin.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", NEST_CRD)
    assert r.status_code in (201, 409), r.text
    nests = f"/apis/hardening.vmo.dev/v1/namespaces/{ns}/nests"
    wait_for(lambda: admin.get(nests).status_code == 200)
    at_limit = nest("at-limit", MAX_DEPTH)
    assert admin.post(nests, at_limit).status_code == 201
    merge = {"spec": nested(MAX_DEPTH - 1)}
    r = admin.patch(f"{nests}/at-limit", merge, "application/merge-patch+json")
    assert r.status_code == 200, r.text
    r = admin.request(
        "PATCH",
        f"{nests}/at-limit?fieldManager=probe&force=true",
        data=json.dumps(at_limit),  # JSON is YAML
        headers={"Content-Type": "application/apply-patch+yaml"},
    )
    assert r.status_code == 200, r.text
    assert admin.get(f"{nests}/at-limit").json()["spec"] == nested(MAX_DEPTH - 1)
    r = admin.post(nests, nest("past-limit", MAX_DEPTH + 1))
    assert r.status_code == 400 and r.json()["reason"] == "BadRequest", r.text


def test_yaml_aliases_that_expand_past_the_body_are_a_400(admin: Api, ns: str) -> None:
    lines = ["apiVersion: v1", "kind: ConfigMap", "metadata: {name: laughs}", "l0: &l0 [x, x]"]
    lines += [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}]" for i in range(1, 12)]
    r = admin.request(
        "POST",
        CM.format(ns=ns),
        data="\n".join(lines).encode(),
        headers={"Content-Type": "application/yaml"},
    )
    assert r.status_code == 400 and r.json()["reason"] == "BadRequest", r.text
    assert admin.get(f"{CM.format(ns=ns)}/laughs").status_code == 404


# --- media types: text/plain is 415, what kubectl sends still works ----------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_a_text_plain_body_is_415_and_changes_nothing(admin: Api, ns: str, method: str) -> None:
    assert admin.post(CM.format(ns=ns), configmap("plain", k="v")).status_code == 201
    path = CM.format(ns=ns) + ("" if method == "POST" else "/plain")
    body = configmap("plain" if method != "POST" else "plain-new", k="changed")
    r = admin.request(method, path, data=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415, r.text
    assert r.json()["kind"] == "Status" and r.json()["reason"] == "UnsupportedMediaType"
    assert admin.get(f"{CM.format(ns=ns)}/plain").json()["data"] == {"k": "v"}
    assert admin.get(f"{CM.format(ns=ns)}/plain-new").status_code == 404


def test_json_with_a_charset_and_a_missing_content_type_are_json(admin: Api, ns: str) -> None:
    body = json.dumps(configmap("charset", k="v"))
    r = admin.request(
        "POST",
        CM.format(ns=ns),
        data=body,
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 201, r.text
    r = admin.request("POST", CM.format(ns=ns), data=json.dumps(configmap("bare", k="v")).encode())
    assert r.status_code == 201, r.text


def test_what_kubectl_sends_is_still_accepted(server: ThreadedServer, ns: str) -> None:
    kubectl = Kubectl(server.kubeconfig)
    kubectl("create", "configmap", "pb", "--from-literal=k=v", "-n", ns)  # protobuf
    kubectl.apply(configmap("applied", k="v") | {"metadata": {"name": "applied", "namespace": ns}})
    server_side = configmap("ssa", k="v") | {"metadata": {"name": "ssa", "namespace": ns}}
    kubectl.apply(server_side, "--server-side")
    kubectl("patch", "configmap", "pb", "-n", ns, "--type=merge", "-p", '{"data":{"m":"1"}}')
    kubectl("patch", "configmap", "pb", "-n", ns, "-p", '{"data":{"s":"1"}}')  # strategic
    kubectl(
        "patch", "configmap", "pb", "-n", ns, "--type=json",
        "-p", '[{"op":"add","path":"/data/j","value":"1"}]',
    )  # fmt: skip
    data = kubectl.json("get", "configmap", "pb", "-n", ns)["data"]
    assert data == {"k": "v", "m": "1", "s": "1", "j": "1"}
    assert kubectl.json("get", "configmap", "ssa", "-n", ns)["data"] == {"k": "v"}


# --- anonymous requests: public info for everyone, through RBAC; 401 elsewhere -----------------

PUBLIC_INFO = ["/healthz", "/livez", "/readyz", "/version", "/version/"]


@pytest.mark.parametrize("path", PUBLIC_INFO)
def test_anonymous_requests_may_read_public_info(anonymous: Api, path: str) -> None:
    r = anonymous.get(path)
    assert r.status_code == 200, r.text
    if path.startswith("/version"):
        assert r.json()["major"] == "1"
    else:
        assert r.text == "ok"


@pytest.mark.parametrize("path", ["/api/v1/namespaces", "/api", "/apis", "/openapi/v2", "/metrics"])
def test_anonymous_requests_elsewhere_are_still_401(anonymous: Api, path: str) -> None:
    r = anonymous.get(path)
    assert r.status_code == 401 and r.json()["reason"] == "Unauthorized", r.text


def test_a_bad_token_is_401_even_for_public_info(server: ThreadedServer) -> None:
    r = Api(server.url, server.ca, "not-a-token").get("/healthz")
    assert r.status_code == 401 and r.json()["reason"] == "Unauthorized"


def test_public_info_is_granted_by_the_public_info_viewer_binding(
    admin: Api, anonymous: Api
) -> None:
    path = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/system:public-info-viewer"
    binding = admin.get(path).json()
    assert binding["roleRef"]["name"] == "system:public-info-viewer"
    subjects = {s["name"] for s in binding["subjects"]}
    assert subjects == {"system:authenticated", "system:unauthenticated"}
    assert admin.delete(path).status_code == 200
    try:
        r = anonymous.get("/healthz")
        assert r.status_code == 403 and 'User "system:anonymous"' in r.json()["message"]
    finally:
        for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
            binding["metadata"].pop(key, None)
        r = admin.post("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", binding)
        assert r.status_code == 201, r.text
    assert anonymous.get("/healthz").status_code == 200
