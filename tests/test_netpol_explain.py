"""Explaining a flow: which policies allow or deny it, and why (``vmo.api.netpol.explain``,
and ``vmo netpol explain`` / ``status`` against the API server)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.conftest import Api
from vmo.api.netpol import POLICY_FOR, Endpoint, default_policy, explain
from vmo.testing.apiserver import ThreadedServer

NS = "default"
DB = Endpoint(NS, "db", {"app": "db"}, ("192.168.50.10",), {"postgres": ("TCP", 5432)})
CLIENT_A = Endpoint(NS, "client-a", {"role": "client-a"}, ("192.168.50.11",))
CLIENT_B = Endpoint(NS, "client-b", {"role": "client-b"}, ("192.168.50.12",))
OTHER_NS = Endpoint("tenant-b", "probe", {"role": "client-a"}, ("10.1.2.3",))


def policy(name: str, spec: dict[str, Any], *, multi: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": name, "namespace": NS}, "spec": spec}
    if multi is not None:
        obj["metadata"]["annotations"] = {POLICY_FOR: multi}
    default_policy(obj)
    return obj


ONLY_A = policy(
    "db-only-a",
    {
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [
            {
                "from": [{"podSelector": {"matchLabels": {"role": "client-a"}}}],
                "ports": [{"port": 5432}],
            }
        ],
    },
)


def test_nothing_isolates_so_everything_is_open() -> None:
    verdict = explain([], CLIENT_B, DB, 5432)
    assert verdict.allowed
    assert all("no policy isolates it" in r for r in verdict.reasons)


def test_the_allowed_client_and_the_rule_that_allows_it() -> None:
    verdict = explain([ONLY_A], CLIENT_A, DB, 5432)
    assert verdict.allowed
    assert any(
        "NetworkPolicy default/db-only-a allows it (ingress[0])" in r for r in verdict.reasons
    )


def test_another_client_or_port_is_denied_with_the_reason() -> None:
    for source, port in ((CLIENT_B, 5432), (CLIENT_A, 22)):
        verdict = explain([ONLY_A], source, DB, port)
        assert not verdict.allowed
        assert any("none of its 1 ingress rules matches" in r for r in verdict.reasons)
        assert any("denied" in r for r in verdict.reasons)


def test_policies_add_up_and_named_ports_resolve_on_the_destination() -> None:
    named = policy(
        "db-postgres-b",
        {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"role": "client-b"}}}],
                    "ports": [{"port": "postgres"}],
                }
            ],
        },
    )
    assert explain([ONLY_A, named], CLIENT_B, DB, 5432).allowed
    assert not explain([ONLY_A, named], CLIENT_B, DB, 5433).allowed


def test_ip_blocks_except_and_namespace_selectors() -> None:
    spec = {
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]},
        ],
    }
    blocked = policy("db-blocks", spec)
    assert not explain([blocked], OTHER_NS, DB, 5432).allowed  # 10.1.2.3 is the exception
    spaces = {"tenant-b": {"team": "b"}}
    verdict = explain([blocked], OTHER_NS, DB, 5432, namespaces=spaces)
    assert verdict.allowed and any("ingress[1]" in r for r in verdict.reasons)
    # a podSelector alone means the policy's own namespace
    assert not explain([ONLY_A], OTHER_NS, DB, 5432).allowed


def test_the_sources_egress_must_allow_it_too() -> None:
    egress = policy(
        "a-to-nothing",
        {
            "podSelector": {"matchLabels": {"role": "client-a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "172.16.0.0/12"}}]}],
        },
    )
    verdict = explain([ONLY_A, egress], CLIENT_A, DB, 5432)
    assert not verdict.allowed
    assert any(
        r.startswith("egress of default/client-a") and "denied" in r for r in verdict.reasons
    )


def test_a_multi_network_policy_counts_on_its_networks_only() -> None:
    multi = policy("db-vlan", ONLY_A["spec"], multi="vlan10")
    assert not explain([multi], CLIENT_B, DB, 5432, network=(NS, "vlan10")).allowed
    assert explain([multi], CLIENT_B, DB, 5432, network=(NS, "vlan20")).allowed
    verdict = explain([multi], CLIENT_A, DB, 5432, network=(NS, "vlan10"))
    assert any("MultiNetworkPolicy default/db-vlan" in r for r in verdict.reasons)


# --------------------------------------------------------------------------- the CLI


def _vmi(api: Api, name: str, labels: dict[str, str], ip: str) -> None:
    body = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "domain": {
                "devices": {"interfaces": [{"name": "lan", "bridge": {}}]},
                "resources": {"requests": {"memory": "64Mi"}},
            },
            "networks": [{"name": "lan", "multus": {"networkName": "vlan10"}}],
        },
    }
    path = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances"
    response = api.post(path, body)
    assert response.status_code == 201, response.text
    vmi = response.json()
    vmi["status"] = {"phase": "Running", "interfaces": [{"name": "lan", "ipAddress": ip}]}
    response = api.put(f"{path}/{name}", vmi)  # VMIs have no status subresource upstream
    assert response.status_code == 200, response.text


def vmo(server: ThreadedServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmo.cli.main", *args, "--kubeconfig", str(server.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_vmo_netpol_explain_and_status(apiserver: ThreadedServer, api: Api, unique: str) -> None:
    db, client = f"{unique}-db", f"{unique}-a"
    _vmi(api, db, {"app": unique}, "192.168.60.10")
    _vmi(api, client, {"role": unique}, "192.168.60.11")
    multi = {
        "apiVersion": "k8s.cni.cncf.io/v1beta1",
        "kind": "MultiNetworkPolicy",
        "metadata": {"name": unique, "namespace": NS, "annotations": {POLICY_FOR: "vlan10"}},
        "spec": {
            "podSelector": {"matchLabels": {"app": unique}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": unique}}}]}],
        },
    }
    assert api.post(
        f"/apis/k8s.cni.cncf.io/v1beta1/namespaces/{NS}/multi-networkpolicies", multi
    ).ok
    allowed = vmo(
        apiserver, "netpol", "explain", client, db, "5432", "--network", "vlan10", "-n", NS
    )
    assert allowed.returncode == 0, allowed.stderr
    assert (
        allowed.stdout.startswith("ALLOWED")
        and f"MultiNetworkPolicy {NS}/{unique}" in allowed.stdout
    )
    denied = vmo(apiserver, "netpol", "explain", db, db, "22", "--network", "vlan10", "-n", NS)
    assert denied.returncode == 1 and denied.stdout.startswith("DENIED"), denied.stdout
    missing = vmo(apiserver, "netpol", "explain", "nobody", db, "22", "-n", NS)
    assert missing.returncode == 2 and "not found" in missing.stderr
    # status: what a node agent recorded on its Node
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": unique}}
    record = {
        "table": "vmo_mnp_x",
        "interfaces": 2,
        "rules": 7,
        "sets": 4,
        "synced": "2026-12-04T05:00:00Z",
        "error": None,
    }
    pod = {**record, "table": "vmo_np_x", "interfaces": 1, "rules": 3, "sets": 2}
    pod["error"] = "nft refused the ruleset"
    node["metadata"]["annotations"] = {
        "vmo.dev/l2-policy": json.dumps(record),
        "vmo.dev/pod-policy": json.dumps(pod),
    }
    assert api.post("/api/v1/nodes", node).status_code == 201
    try:
        shown = vmo(apiserver, "netpol", "status")
        assert shown.returncode == 0, shown.stderr
        rows = [r.split() for r in shown.stdout.splitlines()]
        lines = [r for r in rows if r and r[0] == unique]
        assert [r[1:6] for r in lines] == [
            ["bridge", "vmo_mnp_x", "2", "7", "4"],
            ["pod", "vmo_np_x", "1", "3", "2"],
        ], shown.stdout
        assert "nft refused the ruleset" in shown.stdout
    finally:
        api.delete(f"/api/v1/nodes/{unique}")
