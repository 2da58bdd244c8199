"""The balancer in Full mode on real guests over two embedded nodes: two guests that both prefer
node-1 and each use about half a core there, node-2 idle; VMO's controllers in their own process
read the guests' usage from the real Prometheus (as ``vmo up`` starts it) and move one guest to
node-2 with a real live migration, which its recommendation records; the guest answers on its
new node, and nothing moves back.

The cluster, the controllers and Prometheus are tests/test_monitoring_e2e.py's fixtures (a
module of their own here)."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import Api, Kubectl
from tests.test_migration_e2e import node_of
from tests.test_monitoring_e2e import Prom, cluster, controllers, prom
from tests.test_vm_e2e import BOOT_TIMEOUT, NS, console, vm, wait_for, wait_running
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import http_datavolume

__all__ = ["cluster", "controllers", "prom"]  # fixtures shared with the monitoring e2e

JSON = dict[str, Any]
POLICIES = "/apis/vmo.dev/v1alpha1/balancepolicies"
RECS = f"/apis/vmo.dev/v1alpha1/namespaces/{NS}/balancerecommendations"
GUESTS = ("bal-a", "bal-b")
# about half a core: a busy loop half of each second
HALF_A_CORE = (
    "(while :; do timeout 0.5 sh -c 'while :; do :; done'; sleep 0.5; done >/dev/null 2>&1 &) ;"
    " echo burning"
)


def _prefer_node1(manifest: JSON) -> JSON:
    spec = manifest["spec"]["template"]["spec"]
    spec["affinity"] = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "preference": {"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-1"]}]}}]}}  # fmt: skip
    return manifest


def test_full_mode_moves_a_guest_off_the_busy_node_with_a_live_migration(
    k: Kubectl, capi: Api, cluster: ThreadedServer, image_server: str, prom: Prom
) -> None:
    for name in GUESTS:
        disk = http_datavolume(f"{name}-root", f"{image_server}/disk.qcow2", namespace=NS)
        disk["spec"]["storage"]["accessModes"] = ["ReadWriteMany"]  # no node holds it
        k.apply(disk)
        k.apply(_prefer_node1(vm(name, disk=f"{name}-root", labels={"balance": "e2e"})))
    for name in GUESTS:
        wait_running(capi, name)
        assert node_of(capi, name) == "node-1", "both prefer node-1, which has room for both"
        wait_for(lambda n=name: "up" in console(cluster, n, "echo up"), BOOT_TIMEOUT, "console")
        assert "burning" in console(cluster, name, HALF_A_CORE)
    expr = 'sum(rate(kubevirt_vmi_cpu_usage_seconds_total{name=~"bal-.*"}[10s]))'
    wait_for(lambda: (prom.value(expr) or 0) > 0.6, 60, "the guests' CPU in Prometheus")
    time.sleep(10)  # a window of it
    policy = {
        "apiVersion": "vmo.dev/v1alpha1",
        "kind": "BalancePolicy",
        "metadata": {"name": "e2e"},
        "spec": {
            "automationLevel": "Full",
            "vmSelector": {"matchLabels": {"balance": "e2e"}},
            "interval": "15s",
            "measurement": {"window": "30s", "step": "2s", "rateInterval": "10s"},
        },
    }
    assert capi.post(POLICIES, policy).status_code == 201

    def migrated() -> JSON | None:
        for rec in capi.get(RECS).json()["items"]:
            if (rec.get("status") or {}).get("phase") == "Succeeded":
                return dict(rec)
            assert (rec.get("status") or {}).get("phase") != "Failed", rec
        return None

    rec = wait_for(migrated, 300, "a recommendation carried out")
    moved = rec["spec"]["virtualMachineInstance"]
    assert rec["spec"]["source"] == "node-1" and rec["spec"]["target"] == "node-2"
    assert rec["spec"]["rule"] == "LoadBalance" and rec["spec"]["reason"]
    assert node_of(capi, moved) == "node-2"
    assert "moved" in console(cluster, moved, "echo moved"), "the guest answers on node-2"
    stayed = next(n for n in GUESTS if n != moved)
    assert node_of(capi, stayed) == "node-1"
    status = capi.get(f"{POLICIES}/e2e").json()["status"]
    assert status["migrationsStarted"] == 1
    assert [c["vm"] for c in status["cooldowns"]] == [f"{NS}/{moved}"]
    # two more cycles: balanced now, and the moved guest cools down; nothing moves back
    cycles: list[str] = [status["lastCycleTime"]]

    def cycled() -> bool:
        stamp = capi.get(f"{POLICIES}/e2e").json()["status"]["lastCycleTime"]
        if stamp != cycles[-1]:
            cycles.append(stamp)
        return len(cycles) >= 3

    wait_for(cycled, 90, "two more cycles")
    status = capi.get(f"{POLICIES}/e2e").json()["status"]
    assert status["migrationsStarted"] == 1, status
    assert node_of(capi, moved) == "node-2" and node_of(capi, stayed) == "node-1"
    capi.delete(f"{POLICIES}/e2e")
