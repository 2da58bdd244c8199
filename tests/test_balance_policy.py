"""A BalancePolicy's spec read into settings (vmo.controllers.balance.policy): defaults, each
problem naming its field, selection, overlaps, maintenance windows, the cluster's limits."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from vmo.controllers.balance.policy import InvalidPolicy, Window, overlaps, parse_policy

JSON = dict[str, Any]


def policy(**spec: Any) -> JSON:
    return {"metadata": {"name": "p"}, "spec": spec}


def test_defaults_are_drs_defaults_with_vmos_cooldown() -> None:
    spec = parse_policy(policy())
    assert spec.automation == "Manual" and not spec.migrates and not spec.places
    s = spec.settings
    assert (s.threshold, s.resources, s.max_per_node, s.max_total, s.headroom) == (
        3, ("cpu", "memory"), 2, 5, 0.9)  # fmt: skip
    assert (spec.cooldown_minimum, spec.cooldown_maximum) == (900, 21600)
    assert (spec.interval, spec.measurement.window, spec.measurement.percentile) == (300, 1800, 95)
    assert parse_policy(policy(automationLevel="Partial")).places
    full = parse_policy(policy(automationLevel="Full"))
    assert full.places and full.migrates


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"migrationThreshold": 0}, "spec.migrationThreshold"),
        ({"migrationThreshold": 6}, "spec.migrationThreshold"),
        ({"migrationThreshold": "3"}, "spec.migrationThreshold"),
        ({"automationLevel": "Auto"}, "spec.automationLevel"),
        ({"resources": ["cpu", "disk"]}, "spec.resources[1]"),
        ({"limits": {"perNode": -1}}, "spec.limits.perNode"),
        ({"cooldown": {"minimum": "5m"}}, "spec.cooldown.minimum"),
        ({"cooldown": {"minimum": "1h", "maximum": "30m"}}, "spec.cooldown.maximum"),
        ({"cooldown": {"minimum": "soon"}}, "spec.cooldown.minimum"),
        (
            {"maintenanceWindows": [{"schedule": "every night", "duration": "1h"}]},
            "spec.maintenanceWindows[0].schedule",
        ),
        (
            {"maintenanceWindows": [{"schedule": "0 22 * * *"}]},
            "spec.maintenanceWindows[0].duration",
        ),
        ({"measurement": {"window": "1m", "step": "5m"}}, "spec.measurement.step"),
        ({"measurement": {"percentile": 0}}, "spec.measurement.percentile"),
        ({"interval": "0s"}, "spec.interval"),
        ({"headroom": 5}, "spec.headroom"),
    ],
)
def test_each_problem_names_its_field(spec: JSON, field: str) -> None:
    with pytest.raises(InvalidPolicy) as refused:
        parse_policy(policy(**spec))
    assert field in [f for f, _ in refused.value.problems], refused.value.problems


def test_every_problem_is_reported_not_just_the_first() -> None:
    with pytest.raises(InvalidPolicy) as refused:
        parse_policy(policy(migrationThreshold=9, cooldown={"minimum": "1m"}))
    assert {f for f, _ in refused.value.problems} == {
        "spec.migrationThreshold",
        "spec.cooldown.minimum",
    }


def test_selection_by_vm_and_namespace_labels_minus_exclusions() -> None:
    spec = parse_policy(
        policy(
            vmSelector={"matchLabels": {"tier": "web"}},
            namespaceSelector={"matchExpressions": [{"key": "env", "operator": "In",
                                                     "values": ["prod"]}]},
            exclude={"vmSelector": {"matchLabels": {"pinned": "yes"}}},
        )
    )  # fmt: skip
    assert spec.selects({"tier": "web"}, {"env": "prod"})
    assert not spec.selects({"tier": "db"}, {"env": "prod"})
    assert not spec.selects({"tier": "web"}, {"env": "dev"})
    assert not spec.selects({"tier": "web", "pinned": "yes"}, {"env": "prod"})
    assert parse_policy(policy()).selects({}, {})  # no selector: every VM


def test_a_vm_two_policies_select_is_an_overlap_naming_both() -> None:
    a = parse_policy({"metadata": {"name": "a"}, "spec": {}})
    b = parse_policy({"metadata": {"name": "b"}, "spec": {"vmSelector": {"matchLabels": {"x": "1"}}}})  # fmt: skip
    found = overlaps([a, b], [("ns/one", {"x": "1"}, {}), ("ns/two", {}, {})])
    assert found == {"ns/one": ["a", "b"]}


def test_maintenance_windows_gate_automatic_moves() -> None:
    spec = parse_policy(policy(maintenanceWindows=[{"schedule": "0 22 * * *", "duration": "6h"}]))
    assert spec.in_window(datetime(2026, 1, 1, 23, 0, tzinfo=UTC))
    assert spec.in_window(datetime(2026, 1, 2, 3, 59, tzinfo=UTC))
    assert not spec.in_window(datetime(2026, 1, 2, 4, 1, tzinfo=UTC))
    assert not spec.in_window(datetime(2026, 1, 2, 12, 0, tzinfo=UTC))
    assert parse_policy(policy()).in_window(datetime(2026, 1, 2, 12, 0, tzinfo=UTC))
    assert Window("*/10 * * * *", 60).open_at(datetime(2026, 1, 1, 0, 10, 30, tzinfo=UTC))


def test_the_limits_never_exceed_the_kubevirt_crs() -> None:
    default = parse_policy(policy()).with_migration_limits(1, 3).settings
    assert (default.max_per_node, default.max_total) == (1, 3)
    asked = parse_policy(policy(limits={"perNode": 4, "total": 10}))
    bounded = asked.with_migration_limits(2, 5).settings
    assert (bounded.max_per_node, bounded.max_total) == (2, 5)
    lower = parse_policy(policy(limits={"perNode": 1, "total": 2})).with_migration_limits(2, 5)
    assert (lower.settings.max_per_node, lower.settings.max_total) == (1, 2)
