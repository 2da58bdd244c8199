"""The audit trail: audit.k8s.io/v1 Events under a Policy of levels, rotated and hash-chained,
read back by ``vmo audit`` and checked by ``vmo audit verify``, on a server of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Api, make_user
from vmo.apiserver.audit import (
    AuditLog,
    AuditPolicyError,
    RequestInfo,
    parse_policy,
    read_events,
    verify_chain,
)
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
NS = "audited"

POLICY = """
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: None
    nonResourceURLs: ["/healthz*", "/version"]
  - level: Metadata
    resources: [{group: "", resources: ["secrets"]}]
  - level: RequestResponse
    resources: [{group: kubevirt.io, resources: ["virtualmachines"]}]
  - level: Request
    verbs: ["create", "update", "patch"]
  - level: Metadata
"""


def test_the_policy_reads_as_kube_apiserver_s_and_refuses_what_it_cannot_apply() -> None:
    policy = parse_policy(yaml.safe_load(POLICY))

    def level(verb: str, group: str, resource: str, path: str = "/x", sub: str = "") -> str:
        info = RequestInfo("u", ("g",), verb, path, bool(resource), group, "v1", resource, sub)
        return policy.level(info)

    assert level("get", "", "", "/healthz/ready") == "None"
    assert level("create", "", "secrets") == "Metadata"  # a Secret's content never goes in
    assert level("get", "kubevirt.io", "virtualmachines") == "RequestResponse"
    assert level("create", "cdi.kubevirt.io", "datavolumes") == "Request"
    assert level("list", "", "pods") == "Metadata"
    with pytest.raises(AuditPolicyError, match=r"rules\[0\]\.level: 'Everything'"):
        parse_policy({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                      "rules": [{"level": "Everything"}]})  # fmt: skip
    with pytest.raises(AuditPolicyError, match="apiVersion"):
        parse_policy({"apiVersion": "audit.k8s.io/v1beta1", "kind": "Policy"})


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadedServer, Path]]:
    home = tmp_path_factory.mktemp("vmo-audit")
    directory = home / "audit-log"
    log = AuditLog(directory, parse_policy(yaml.safe_load(POLICY)), max_bytes=64 << 10, backups=50)
    server = ThreadedServer(home, audit=log).start()
    yield server, directory
    server.stop()


def vm(name: str) -> JSON:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {
                "devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}}}}  # fmt: skip


def events(directory: Path) -> list[JSON]:
    return [e for _, _, e in read_events(directory)]


def test_every_request_is_recorded_with_who_what_where_when_and_the_answer(
    audited: tuple[ThreadedServer, Path],
) -> None:
    server, directory = audited
    admin = Api(server.url, server.ca, server.admin_token)
    assert admin.post("/api/v1/namespaces", {"metadata": {"name": NS}}).status_code == 201
    assert admin.post(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines", vm("web")).ok
    secret = {"metadata": {"name": "s"}, "stringData": {"password": "hunter2"}}
    assert admin.post(f"/api/v1/namespaces/{NS}/secrets", secret).status_code == 201
    assert admin.get("/healthz").ok
    token, _ = make_user(server, "mallory", "interns")
    mallory = Api(server.url, server.ca, token)
    assert (
        mallory.delete(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/web").status_code
        == 403
    )
    assert Api(server.url, server.ca, "not-a-token").get("/api/v1/namespaces").status_code == 401
    found = events(directory)
    created = next(e for e in found if e["verb"] == "create"
                   and e.get("objectRef", {}).get("resource") == "virtualmachines")  # fmt: skip
    assert created["user"]["username"] == "vmo-admin"
    assert "system:masters" in created["user"]["groups"]
    assert created["objectRef"] == {"resource": "virtualmachines", "namespace": NS,
                                    "apiGroup": "kubevirt.io", "apiVersion": "v1"}  # fmt: skip
    assert created["responseStatus"]["code"] == 201 and created["sourceIPs"] == ["127.0.0.1"]
    assert created["level"] == "RequestResponse"
    assert created["requestObject"]["metadata"]["name"] == "web"
    assert created["responseObject"]["metadata"]["uid"]  # the object as stored
    assert created["requestReceivedTimestamp"] <= created["stageTimestamp"]
    stored_secret = next(e for e in found if e.get("objectRef", {}).get("resource") == "secrets")
    assert stored_secret["level"] == "Metadata" and "requestObject" not in stored_secret
    assert "hunter2" not in (directory / "audit.log").read_text() + "".join(
        p.read_text() for p in directory.glob("audit-*.log")
    )
    assert not [e for e in found if e["requestURI"] == "/healthz"]  # level None
    denied = next(e for e in found if e["user"].get("username") == "mallory")
    assert denied["verb"] == "delete" and denied["objectRef"]["name"] == "web"
    assert denied["responseStatus"]["code"] == 403
    assert denied["responseStatus"]["reason"] == "Forbidden"
    assert denied["user"]["groups"] == ["interns", "system:authenticated"]
    unauthenticated = [e for e in found if e["responseStatus"]["code"] == 401]
    assert unauthenticated and unauthenticated[-1]["user"]["username"] == ""


def test_the_log_rotates_and_its_chain_holds_across_files_and_restarts(
    audited: tuple[ThreadedServer, Path], tmp_path: Path
) -> None:
    server, directory = audited
    admin = Api(server.url, server.ca, server.admin_token)
    for i in range(120):  # past the 64 KiB rotation size, several times
        assert admin.post(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines", vm(f"r{i}")).ok
    server.restart_apiserver()  # the chain goes on from audit.head
    admin = Api(server.url, server.ca, server.admin_token)
    assert admin.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/r0").ok
    assert len(list(directory.glob("audit-*.log"))) >= 2
    report = verify_chain(directory)
    assert report.ok and report.events == len(events(directory)), report
    # tampering shows, whichever way
    edited = tmp_path / "edited"
    shutil.copytree(directory, edited)
    victim = sorted(edited.glob("audit-*.log"))[0]
    lines = victim.read_text().splitlines()
    doctored = json.loads(lines[3])
    doctored["user"]["username"] = "someone-else"  # a tidier story about who did it
    lines[3] = json.dumps(doctored, sort_keys=True, separators=(",", ":"))
    victim.write_text("\n".join(lines) + "\n")
    broken = verify_chain(edited)
    assert not broken.ok and f"{victim.name}:4" in broken.problem and "edited" in broken.problem
    removed = tmp_path / "removed"
    shutil.copytree(directory, removed)
    victim = sorted(removed.glob("audit-*.log"))[0]
    lines = victim.read_text().splitlines()
    victim.write_text("\n".join(lines[:5] + lines[6:]) + "\n")
    broken = verify_chain(removed)
    assert not broken.ok and "removed" in broken.problem, broken
    truncated = tmp_path / "truncated"
    shutil.copytree(directory, truncated)
    current = truncated / "audit.log"
    current.write_text("\n".join(current.read_text().splitlines()[:-1]) + "\n")
    broken = verify_chain(truncated)
    assert not broken.ok and "removed from its end" in broken.problem, broken


def vmo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmo.cli.main", "audit", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_vmo_audit_filters_by_vm_user_verb_and_time_and_verifies_the_chain(
    audited: tuple[ThreadedServer, Path], tmp_path: Path
) -> None:
    server, directory = audited
    admin = Api(server.url, server.ca, server.admin_token)
    assert admin.post(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines", vm("db")).ok
    assert admin.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/db").ok
    listed = vmo("--dir", str(directory), "--vm", "db", "--verb", "get", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    found = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(found) == 1 and found[0]["objectRef"]["name"] == "db"
    table = vmo("--dir", str(directory), "--user", "mallory", "--since", "1h")
    assert table.returncode == 0 and "mallory" in table.stdout and "403" in table.stdout
    assert "vmo-admin" not in table.stdout
    assert vmo("--dir", str(directory), "--user", "mallory", "--until", "2000-01-01T00:00:00Z",
               "-o", "json").stdout == ""  # fmt: skip
    bad = vmo("--dir", str(directory), "--since", "yesterday")
    assert bad.returncode == 2 and "neither a duration" in bad.stderr
    ok = vmo("verify", "--dir", str(directory))
    assert ok.returncode == 0 and ok.stdout.startswith("audit chain OK:"), ok.stderr
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    current = copy / "audit.log"
    current.write_text(current.read_text().replace('"verb":"get"', '"verb":"list"', 1))
    broken = vmo("verify", "--dir", str(copy))
    assert broken.returncode == 1 and "BROKEN" in broken.stderr


def test_a_body_too_deep_to_parse_is_refused_and_audited_without_its_body(
    audited: tuple[ThreadedServer, Path],
) -> None:
    server, directory = audited
    admin = Api(server.url, server.ca, server.admin_token)
    deep = '{"a":' * 10000 + "1" + "}" * 10000
    answer = admin.request("POST", f"/api/v1/namespaces/{NS}/configmaps", data=deep,
                           headers={"Content-Type": "application/json"})  # fmt: skip
    assert answer.status_code == 400, answer.text
    event = [
        e for e in events(directory) if e.get("objectRef", {}).get("resource") == "configmaps"
    ][-1]
    assert event["level"] == "Request" and "requestObject" not in event
    assert event["responseStatus"]["code"] == 400


def test_a_full_disk_loses_events_but_never_the_request(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    log.open()
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, log._fd)  # the log's file is now a disk that is always full: ENOSPC
    os.close(full)
    try:
        log.write({"kind": "Event", "apiVersion": "audit.k8s.io/v1", "verb": "get"})  # no raise
        assert log._failing
    finally:
        log.close()
