"""``vmo balance``: status, recommendations and apply against an embedded API server (the
policy's status and a recommendation written as the controller writes them), and simulate on
trace files, good and bad."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Api
from vmo.controllers.balance.trace import dump, hot_spot
from vmo.testing.apiserver import ThreadedServer

NS = "virtual-machines"
POLICIES = "/apis/vmo.dev/v1alpha1/balancepolicies"
RECS = f"/apis/vmo.dev/v1alpha1/namespaces/{NS}/balancerecommendations"


def vmo(*argv: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["--home", str(home)] if home else []
    return subprocess.run(
        [sys.executable, "-m", "vmo.cli.main", *prefix, *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadedServer, Api]]:
    with ThreadedServer(home=tmp_path_factory.mktemp("bal") / "home") as server:
        api = Api(server.url, server.ca, server.admin_token)
        from vmo.client import Client
        from vmo.controllers.manager import ensure_crds

        async def crds() -> None:
            async with Client.from_kubeconfig(server.kubeconfig) as client:
                await ensure_crds(client)

        server.call(crds())
        api.post("/api/v1/namespaces", {"metadata": {"name": NS}})
        yield server, api


def test_status_recommendations_and_apply(cluster: tuple[ThreadedServer, Api]) -> None:
    server, api = cluster
    body = {"apiVersion": "vmo.dev/v1alpha1", "kind": "BalancePolicy",
            "metadata": {"name": "drs"}, "spec": {"automationLevel": "Manual"}}  # fmt: skip
    assert api.post(POLICIES, body).status_code == 201
    status = {"imbalance": 0.123, "targetImbalance": 0.05, "virtualMachines": 7,
              "recommendations": 1, "migrationsStarted": 0, "lastCycleTime": "2026-01-01T00:00:00Z",
              "message": "1 migration(s) take the imbalance from 0.123 to 0.080",
              "conditions": [{"type": "Ready", "status": "True", "reason": "Recommended",
                              "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                             {"type": "Conflict", "status": "True", "reason": "VMSelectedTwice",
                              "message": "1 VM(s) selected by more than one policy are not moved",
                              "lastTransitionTime": "2026-01-01T00:00:00Z"}]}  # fmt: skip
    r = api.patch(f"{POLICIES}/drs/status", {"status": status}, "application/merge-patch+json")
    assert r.status_code == 200, r.text
    rec = {"apiVersion": "vmo.dev/v1alpha1", "kind": "BalanceRecommendation",
           "metadata": {"name": "web-1a2b3c4d", "namespace": NS,
                        "labels": {"vmo.dev/balance-policy": "drs"}},
           "spec": {"policy": "drs", "virtualMachineInstance": "web", "source": "node-a",
                    "target": "node-c", "priority": 3, "rule": "LoadBalance",
                    "reason": "node-a is 30 points above the mean", "imbalanceBefore": 0.123,
                    "imbalanceAfter": 0.08, "memoryBytes": 2 * 2**30, "expectedSeconds": 32.0,
                    "bandwidth": {"bytesPerSecond": 67108864.0, "source": "assumed"}}}  # fmt: skip
    assert api.post(RECS, rec).status_code == 201, "the recommendation is stored"
    kube = ["--kubeconfig", str(server.kubeconfig)]

    out = vmo("balance", "status", *kube)
    assert out.returncode == 0, out.stderr
    assert "drs" in out.stdout and "Manual" in out.stdout
    assert "12.3" in out.stdout and "5.0" in out.stdout  # imbalance beside target, in points
    assert "Conflict" in out.stdout and "more than one policy" in out.stdout

    out = vmo("balance", "recommendations", "-n", NS, *kube)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "web-1a2b3c4d" in ln)
    for cell in (f"{NS}/web-1a2b3c4d", "node-a", "node-c", "LoadBalance", "12.3 -> 8.0",
                 "2.0Gi", "~32s*", "Pending"):  # fmt: skip
        assert cell in line, (cell, line)

    out = vmo("balance", "apply", f"{NS}/web-1a2b3c4d", *kube)
    assert out.returncode == 0, out.stderr
    assert "node-a -> node-c" in out.stdout
    assert api.get(f"{RECS}/web-1a2b3c4d").json()["spec"]["approved"] is True

    out = vmo("balance", "apply", f"{NS}/nothing-here", *kube)
    assert out.returncode == 1 and "not found" in out.stderr and "Traceback" not in out.stderr


def test_status_without_policies_says_the_balancer_is_idle(tmp_path: Path) -> None:
    with ThreadedServer(home=tmp_path / "home") as server:
        from vmo.client import Client
        from vmo.controllers.manager import ensure_crds

        async def crds() -> None:
            async with Client.from_kubeconfig(server.kubeconfig) as client:
                await ensure_crds(client)

        server.call(crds())
        out = vmo("balance", "status", "--kubeconfig", str(server.kubeconfig))
    assert out.returncode == 0
    assert "No BalancePolicy" in out.stderr


def test_simulate_replays_a_trace_through_vmo_and_its_peers(tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    dump(hot_spot(3, nodes=5, vms=40, steps=120), trace)
    out = vmo("balance", "simulate", str(trace))
    assert out.returncode == 0, out.stderr
    rows = {ln.split("  ")[0].strip(): ln for ln in out.stdout.splitlines() if " pt " in ln}
    assert set(rows) == {"VMO (threshold 3)", "LowNodeUtilization 20/50",
                         "KubeVirtRelieveAndMigrate"}, out.stdout  # fmt: skip
    assert "1.00x" in rows["LowNodeUtilization 20/50"]


def test_simulate_refuses_a_bad_trace_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "stepSeconds": 60, "steps": 10, "nodes": []}))
    out = vmo("balance", "simulate", str(bad))
    assert out.returncode == 1
    assert "nodes" in out.stderr and "Traceback" not in out.stderr
    out = vmo("balance", "simulate", str(tmp_path / "missing.json"))
    assert out.returncode == 1 and "No such file" in out.stderr
