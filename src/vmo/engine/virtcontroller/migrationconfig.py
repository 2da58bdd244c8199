"""The migration configuration a VMI migrates with: the KubeVirt CR's
``spec.configuration.migrations`` over upstream's defaults, overridden by the best-matching
``migrations.kubevirt.io/v1alpha1`` MigrationPolicy.

Policy choice follows upstream (``matchPolicy``/``countMatchingLabels`` in
``pkg/virt-controller/watch/migration``): a policy matches when every pair of its
``virtualMachineInstanceSelector`` is among the VMI's labels and every pair of its
``namespaceSelector`` among the namespace's labels; the match with the most matched labels wins,
equal totals go to the one with more matched VMI labels, then to the lexicographically first
name. A policy that sets ``allowPostCopy`` but not ``allowWorkloadDisruption`` sets both
(upstream's ``GetMigrationConfByPolicy``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmo.api.quantity import QuantityError, parse_quantity
from vmo.client import Resource

JSON = dict[str, Any]

MIGRATIONPOLICY = Resource(
    "migrations.kubevirt.io", "v1alpha1", "migrationpolicies", "MigrationPolicy", namespaced=False
)

# Upstream's defaults (pkg/virt-config), except maxDowntimeMs, which is VMO's own.
DEFAULTS: Mapping[str, Any] = {
    "bandwidthPerMigration": "0Mi",
    "completionTimeoutPerGiB": 150,
    "progressTimeout": 150,
    "allowAutoConverge": False,
    "allowPostCopy": False,
    "allowWorkloadDisruption": False,
    "maxDowntimeMs": 300,
    "parallelMigrationsPerCluster": 5,
    "parallelOutboundMigrationsPerNode": 2,
    "nodeDrainTaintKey": "kubevirt.io/drain",
    "unsafeMigrationOverride": False,
}
# What a MigrationPolicy's spec may override.
POLICY_FIELDS = (
    "allowAutoConverge",
    "bandwidthPerMigration",
    "completionTimeoutPerGiB",
    "allowPostCopy",
    "allowWorkloadDisruption",
    "maxDowntimeMs",
)
_INTEGER_FIELDS = (
    "completionTimeoutPerGiB",
    "progressTimeout",
    "maxDowntimeMs",
    "parallelMigrationsPerCluster",
    "parallelOutboundMigrationsPerNode",
)
_BOOLEAN_FIELDS = (
    "allowAutoConverge",
    "allowPostCopy",
    "allowWorkloadDisruption",
    "unsafeMigrationOverride",
)


class MigrationConfigError(ValueError):
    """A migration setting that cannot be used; ``field`` names where it came from."""

    def __init__(self, field: str, value: object, why: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}: {value!r} {why}")


@dataclass(frozen=True)
class MigrationConfig:
    """``configuration`` is upstream's ``migrationConfiguration`` (the KubeVirt CR's field
    names); ``policy_name`` the MigrationPolicy that shaped it, empty when none matched."""

    configuration: Mapping[str, Any]
    policy_name: str = ""

    @property
    def bandwidth_bytes_per_second(self) -> int:
        """0 means unlimited."""
        return int(parse_quantity(str(self.configuration["bandwidthPerMigration"])))

    @property
    def parallel_migrations_per_cluster(self) -> int:
        return int(self.configuration["parallelMigrationsPerCluster"])

    @property
    def parallel_outbound_migrations_per_node(self) -> int:
        return int(self.configuration["parallelOutboundMigrationsPerNode"])

    def as_json(self) -> JSON:
        return copy.deepcopy(dict(self.configuration))


DEFAULT_CONFIG = MigrationConfig(dict(DEFAULTS))


# --- policy matching -------------------------------------------------------------------------------


def _selector(policy: JSON, key: str) -> dict[str, str]:
    selectors = (policy.get("spec") or {}).get("selectors") or {}
    return {str(k): str(v) for k, v in (selectors.get(key) or {}).items()}


def policy_score(
    policy: JSON, vmi_labels: Mapping[str, str], namespace_labels: Mapping[str, str]
) -> tuple[int, int] | None:
    """(total matched labels, matched VMI labels), or None when the policy does not match."""
    if (policy.get("spec") or {}).get("selectors") is None:
        return None
    vmi_selector = _selector(policy, "virtualMachineInstanceSelector")
    ns_selector = _selector(policy, "namespaceSelector")
    if any(vmi_labels.get(k) != v for k, v in vmi_selector.items()):
        return None
    if any(namespace_labels.get(k) != v for k, v in ns_selector.items()):
        return None
    return (len(vmi_selector) + len(ns_selector), len(vmi_selector))


def match_policy(
    policies: Sequence[JSON], vmi_labels: Mapping[str, str], namespace_labels: Mapping[str, str]
) -> JSON | None:
    """The policy that applies to a VMI with these labels in a namespace with these labels."""
    best: tuple[tuple[int, int], str, JSON] | None = None
    for policy in policies:
        score = policy_score(policy, vmi_labels, namespace_labels)
        if score is None:
            continue
        name = str(policy.get("metadata", {}).get("name", ""))
        if best is None or score > best[0] or (score == best[0] and name < best[1]):
            best = (score, name, policy)
    return None if best is None else best[2]


# --- resolution ------------------------------------------------------------------------------------


def _checked(field: str, key: str, value: Any) -> Any:
    if key == "bandwidthPerMigration":
        try:
            if parse_quantity(value if isinstance(value, int) else str(value)) < 0:
                raise MigrationConfigError(field, value, "is negative")
        except QuantityError as exc:
            raise MigrationConfigError(field, value, "is not a quantity") from exc
        return str(value)
    if key in _INTEGER_FIELDS and (
        isinstance(value, bool) or not isinstance(value, int) or value < 0
    ):
        raise MigrationConfigError(field, value, "is not a non-negative integer")
    if key in _BOOLEAN_FIELDS and not isinstance(value, bool):
        raise MigrationConfigError(field, value, "is not a boolean")
    return value


def cluster_migrations(kubevirt: JSON | None) -> JSON:
    """The KubeVirt CR's ``spec.configuration.migrations`` over the defaults."""
    merged = dict(DEFAULTS)
    spec = ((kubevirt or {}).get("spec") or {}).get("configuration") or {}
    for key, value in (spec.get("migrations") or {}).items():
        if value is None:
            continue
        field = f"KubeVirt spec.configuration.migrations.{key}"
        merged[key] = _checked(field, key, copy.deepcopy(value))
    return merged


def apply_policy(configuration: JSON, policy: JSON) -> JSON:
    """``configuration`` with what ``policy`` sets overriding it."""
    merged = dict(configuration)
    spec = policy.get("spec") or {}
    name = policy.get("metadata", {}).get("name", "")
    for key in POLICY_FIELDS:
        if spec.get(key) is not None:
            merged[key] = _checked(f"MigrationPolicy {name} spec.{key}", key, spec[key])
    if spec.get("allowWorkloadDisruption") is None and spec.get("allowPostCopy") is not None:
        merged["allowWorkloadDisruption"] = merged["allowPostCopy"]
    return merged


def resolve_migration_config(
    vmi: JSON,
    *,
    kubevirt: JSON | None,
    policies: Sequence[JSON],
    namespace_labels: Mapping[str, str],
) -> MigrationConfig:
    """The configuration ``vmi`` migrates with; raises MigrationConfigError naming a bad field."""
    configuration = cluster_migrations(kubevirt)
    vmi_labels = {str(k): str(v) for k, v in (vmi.get("metadata", {}).get("labels") or {}).items()}
    policy = match_policy(policies, vmi_labels, namespace_labels)
    if policy is None:
        return MigrationConfig(configuration)
    return MigrationConfig(
        apply_policy(configuration, policy), str(policy.get("metadata", {}).get("name", ""))
    )


def active_kubevirt(kubevirts: Sequence[JSON]) -> JSON | None:
    """The KubeVirt CR in force: the oldest one not being deleted (upstream allows one)."""
    live = [kv for kv in kubevirts if not kv.get("metadata", {}).get("deletionTimestamp")]
    if not live:
        return None
    return min(
        live,
        key=lambda kv: (
            kv["metadata"].get("creationTimestamp", ""),
            kv["metadata"].get("namespace", ""),
            kv["metadata"].get("name", ""),
        ),
    )
