"""migrations.kubevirt.io/v1alpha1 MigrationPolicy: per-workload migration tuning.

Admission keeps upstream's rules: neither ``bandwidthPerMigration`` nor ``completionTimeoutPerGiB``
may be negative (the schema keeps the bandwidth within a quantity's range).
"""

from __future__ import annotations

from vmo.api.kubevirt._bounds import size_value
from vmo.api.kubevirt._builders import (
    JSON,
    any_object,
    boolean,
    integer,
    obj,
    quantity,
    resource_schema,
    string,
    string_map,
)
from vmo.api.types import Cause, ResourceType


def migration_policy_spec() -> JSON:
    return obj(
        {
            "selectors": obj(
                {"namespaceSelector": string_map(), "virtualMachineInstanceSelector": string_map()}
            ),
            "allowAutoConverge": boolean(),
            "allowPostCopy": boolean(),
            "allowWorkloadDisruption": boolean(),
            "bandwidthPerMigration": quantity(),
            "completionTimeoutPerGiB": integer(),
            "maxDowntimeMs": integer(),
            "experimental": obj(
                {"compression": string(enum=("none", "zstd")), "stallDetector": any_object()}
            ),
        },
        required=("selectors",),
    )


def validate_migration_policy(new: JSON, old: JSON | None) -> list[Cause]:
    spec = new.get("spec")
    if not isinstance(spec, dict):
        return []
    causes: list[Cause] = []
    bandwidth = size_value(spec.get("bandwidthPerMigration"))
    if bandwidth is not None and bandwidth < 0:
        causes.append(Cause("spec.bandwidthPerMigration", "must not be negative"))
    timeout = spec.get("completionTimeoutPerGiB")
    if isinstance(timeout, int) and timeout < 0:
        causes.append(Cause("spec.completionTimeoutPerGiB", "must not be negative"))
    return causes


def migration_policy() -> ResourceType:
    return ResourceType(
        group="migrations.kubevirt.io",
        version="v1alpha1",
        kind="MigrationPolicy",
        plural="migrationpolicies",
        singular="migrationpolicy",
        namespaced=False,
        subresources=("status",),
        schema=resource_schema(migration_policy_spec(), any_object()),
        validate=validate_migration_policy,
    )
