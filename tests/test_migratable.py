"""LiveMigratable rules and migration admission (pure), as KubeVirt decides them."""

from __future__ import annotations

from typing import Any

from vmo.api.kubevirt.migratable import (
    ALLOW_POD_BRIDGE,
    INTERFACE_NOT_MIGRATABLE,
    live_migratable,
    migration_method,
)
from vmo.apiserver.migrations import migration_refusal

JSON = dict[str, Any]


def vmi(binding: str = "masquerade", *, annotations: dict[str, str] | None = None) -> JSON:
    return {
        "metadata": {"name": "v", "namespace": "ns", "annotations": annotations or {}},
        "spec": {
            "domain": {
                "devices": {
                    "disks": [{"name": "root", "disk": {}}, {"name": "ci", "disk": {}}],
                    "interfaces": [{"name": "default", binding: {}}],
                }
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [
                {"name": "root", "dataVolume": {"name": "root-dv"}},
                {"name": "ci", "cloudInitNoCloud": {"userData": "#cloud-config\n"}},
            ],
        },
        "status": {"phase": "Running", "conditions": []},
    }


def test_masquerade_is_migratable_and_bridge_on_the_pod_network_is_not() -> None:
    assert live_migratable(vmi()).migratable
    refused = live_migratable(vmi("bridge"))
    assert not refused.migratable and refused.reason == INTERFACE_NOT_MIGRATABLE
    assert ALLOW_POD_BRIDGE in refused.message
    assert live_migratable(vmi("bridge", annotations={ALLOW_POD_BRIDGE: ""})).migratable
    cond = refused.condition("2026-01-01T00:00:00Z")
    assert cond["type"] == "LiveMigratable" and cond["status"] == "False"


def test_bridge_on_a_multus_network_is_migratable() -> None:
    v = vmi()
    v["spec"]["domain"]["devices"]["interfaces"].append({"name": "vlan", "bridge": {}})
    v["spec"]["networks"].append({"name": "vlan", "multus": {"networkName": "nad"}})
    assert live_migratable(v).migratable


def test_migration_method_follows_where_the_disks_live() -> None:
    assert migration_method(vmi()) == "BlockMigration"
    assert migration_method(vmi(), shared_claims={"root-dv"}) == "LiveMigration"


def test_admission_refusals_use_upstream_messages() -> None:
    mig = {"metadata": {"namespace": "ns"}, "spec": {"vmiName": "v"}}
    assert migration_refusal(mig, None) == 'the VMI "ns/v" does not exist'
    running = vmi()
    assert migration_refusal(mig, running) is None
    final = vmi()
    final["status"]["phase"] = "Succeeded"
    assert migration_refusal(mig, final) == "Cannot migrate VMI in finalized state."
    pending = vmi()
    pending["status"]["phase"] = "Scheduling"
    assert "not running" in (migration_refusal(mig, pending) or "")
    blocked = vmi("bridge")
    blocked["status"]["conditions"] = [live_migratable(blocked).condition("2026-01-01T00:00:00Z")]
    assert (migration_refusal(mig, blocked) or "").startswith(
        f"Cannot migrate VMI, Reason: {INTERFACE_NOT_MIGRATABLE}, Message: "
    )
    busy = vmi()
    busy["status"]["migrationState"] = {"migrationUid": "u1"}
    assert "in-flight migration detected. Active migration job (u1)" in (
        migration_refusal(mig, busy) or ""
    )
    busy["status"]["migrationState"]["completed"] = True
    assert migration_refusal(mig, busy) is None
