"""NetworkPolicy and MultiNetworkPolicy served by the API: kubectl round trips, upstream's
defaults, kubernetes-validate as the oracle, and refusals that name the field and store nothing."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import Api, Kubectl
from vmo.api.netpol import POLICY_FOR, policy_for, validate_policy

NS = "default"
K8S_VERSION = "1.30"
NETPOLS = f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"
MULTI = f"/apis/k8s.cni.cncf.io/v1beta1/namespaces/{NS}/multi-networkpolicies"


def db_policy(name: str) -> dict[str, Any]:
    """Only VMs labelled role=client-a reach the database VM's port 5432."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [
                {
                    "from": [
                        {"podSelector": {"matchLabels": {"role": "client-a"}}},
                        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                    ],
                    "ports": [{"port": 5432}, {"port": 6000, "endPort": 6010, "protocol": "UDP"}],
                }
            ],
        },
    }


def multi_policy(name: str, networks: str | None = "vlan-31") -> dict[str, Any]:
    policy = db_policy(name)
    policy["apiVersion"] = "k8s.cni.cncf.io/v1beta1"
    policy["kind"] = "MultiNetworkPolicy"
    if networks is not None:
        policy["metadata"]["annotations"] = {POLICY_FOR: networks}
    return policy


def test_kubectl_applies_a_network_policy_with_upstreams_defaults(
    kubectl: Kubectl, api: Api, unique: str
) -> None:
    kubectl.apply(db_policy(unique))
    stored = api.get(f"{NETPOLS}/{unique}").json()
    assert stored["spec"]["policyTypes"] == ["Ingress"]
    ports = stored["spec"]["ingress"][0]["ports"]
    assert [p["protocol"] for p in ports] == ["TCP", "UDP"]
    kubernetes_validate.validate(stored, K8S_VERSION, strict=True)
    listed = kubectl("get", "netpol", "-n", NS, unique, "-o", "name").stdout.strip()
    # enforced on the pod network: no write warns any more
    response = api.post(NETPOLS, db_policy(f"{unique}-w"))
    assert response.status_code == 201 and "Warning" not in response.headers
    assert listed == f"networkpolicy.networking.k8s.io/{unique}"


def test_egress_rules_make_the_policy_an_egress_one_too(api: Api, unique: str) -> None:
    policy = db_policy(unique)
    policy["spec"]["egress"] = [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "dns"}]}]
    response = api.post(NETPOLS, policy)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["policyTypes"] == ["Ingress", "Egress"]
    kubernetes_validate.validate(response.json(), K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("mutate", "field", "text"),
    [
        (
            lambda s: s["ingress"][0]["from"][1]["ipBlock"].update(cidr="10.0.0/8"),
            "spec.ingress[0].from[1].ipBlock.cidr",
            "must be a valid CIDR",
        ),
        (
            lambda s: s["ingress"][0]["from"][1]["ipBlock"].update({"except": ["192.168.0.0/24"]}),
            "spec.ingress[0].from[1].ipBlock.except[0]",
            "strict subset",
        ),
        (
            lambda s: s["ingress"][0]["ports"][1].update(endPort=5999),
            "spec.ingress[0].ports[1].endPort",
            "greater than or equal to `port`",
        ),
        (
            lambda s: s["ingress"][0]["ports"][1].update(port="postgres"),
            "spec.ingress[0].ports[1].endPort",
            "non-numeric",
        ),
        (
            lambda s: s["ingress"][0]["ports"][0].update(port=70000),
            "spec.ingress[0].ports[0].port",
            "between 1 and 65535",
        ),
        (
            lambda s: s["ingress"][0]["ports"][0].update(port="Not_A_Name"),
            "spec.ingress[0].ports[0].port",
            "IANA service name",
        ),
        (
            lambda s: s["ingress"][0]["ports"][0].update(protocol="ICMP"),
            "spec.ingress[0].ports[0].protocol",
            "Unsupported value",
        ),
        (
            lambda s: s["ingress"][0]["from"][1].update(podSelector={}),
            "spec.ingress[0].from[1]",
            "both ipBlock and another peer",
        ),
        (
            lambda s: s["ingress"][0]["from"].append({}),
            "spec.ingress[0].from[2]",
            "must specify a peer",
        ),
        (
            lambda s: s.update(policyTypes=["Ingress", "Ingress"]),
            "spec.policyTypes[1]",
            "Duplicate value",
        ),
        (
            lambda s: s["podSelector"].update(matchExpressions=[{"key": "app", "operator": "In"}]),
            "spec.podSelector.matchExpressions[0].values",
            "must be specified",
        ),
    ],
)
def test_bad_policies_are_refused_naming_the_field(
    api: Api, unique: str, mutate: Any, field: str, text: str
) -> None:
    policy = db_policy(unique)
    mutate(policy["spec"])
    response = api.post(NETPOLS, policy)
    assert response.status_code == 422, response.text
    status = response.json()
    assert status["kind"] == "Status" and status["reason"] == "Invalid"
    causes = status["details"]["causes"]
    assert any(c["field"] == field and text in c["message"] for c in causes), causes
    assert api.get(f"{NETPOLS}/{unique}").status_code == 404  # nothing half-written


def test_the_same_refusals_apply_to_updates(api: Api, unique: str) -> None:
    assert api.post(NETPOLS, db_policy(unique)).status_code == 201
    stored = api.get(f"{NETPOLS}/{unique}").json()
    bad = copy.deepcopy(stored)
    bad["spec"]["ingress"][0]["from"][1]["ipBlock"]["cidr"] = "300.0.0.0/8"
    response = api.put(f"{NETPOLS}/{unique}", bad)
    assert response.status_code == 422, response.text
    assert api.get(f"{NETPOLS}/{unique}").json()["spec"] == stored["spec"]


def test_kubectl_applies_a_multi_network_policy(kubectl: Kubectl, api: Api, unique: str) -> None:
    kubectl.apply(multi_policy(unique, "vlan-31,tenant-b/storage"))
    stored = api.get(f"{MULTI}/{unique}").json()
    assert stored["spec"]["policyTypes"] == ["Ingress"]
    assert policy_for(stored) == [(NS, "vlan-31"), ("tenant-b", "storage")]
    # its spec is a NetworkPolicy's: the same oracle holds
    as_netpol = {**stored, "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy"}
    kubernetes_validate.validate(as_netpol, K8S_VERSION, strict=True)


def test_a_multi_network_policy_naming_no_network_is_accepted_with_a_warning(
    api: Api, unique: str
) -> None:
    response = api.post(MULTI, multi_policy(unique, networks=None))
    assert response.status_code == 201, response.text
    assert POLICY_FOR in response.headers.get("Warning", "")


def test_a_malformed_policy_for_annotation_is_refused(api: Api, unique: str) -> None:
    response = api.post(MULTI, multi_policy(unique, "vlan-31,Bad_Name"))
    assert response.status_code == 422, response.text
    causes = response.json()["details"]["causes"]
    assert any(c["field"] == f"metadata.annotations[{POLICY_FOR}]" for c in causes), causes
    assert api.get(f"{MULTI}/{unique}").status_code == 404


def test_every_valid_example_is_also_valid_for_upstream() -> None:
    """The validator accepts only what kube-apiserver's schema accepts (the oracle), for a few
    shapes it must allow: empty selectors, named ports, IPv6 blocks, egress-only."""
    specs: list[dict[str, Any]] = [
        {"podSelector": {}},
        {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]},
        {
            "podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
            "ingress": [
                {
                    "from": [{"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8:1::/48"]}}],
                    "ports": [{"port": "http-alt", "protocol": "TCP"}],
                }
            ],
        },
    ]
    for spec in specs:
        policy = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "x", "namespace": NS},
            "spec": spec,
        }
        assert validate_policy(policy) == []
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)


def test_the_example_is_accepted(kubectl: Kubectl, api: Api) -> None:
    path = Path(__file__).resolve().parent.parent / "examples" / "multi-network-policy.yaml"
    policy = yaml.safe_load(path.read_text())
    assert validate_policy(policy, multi=True) == []
    kubectl("apply", "-f", str(path))
    stored = api.get(f"/apis/k8s.cni.cncf.io/v1beta1/namespaces/virtual-machines/"
                     f"multi-networkpolicies/{policy['metadata']['name']}").json()  # fmt: skip
    assert policy_for(stored) == [("virtual-machines", "vlan120")]
    kubectl("delete", "-f", str(path))
