"""migrations.kubevirt.io/v1alpha1 MigrationPolicy: per-workload migration tuning."""

from __future__ import annotations

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
from vmo.api.types import ResourceType


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
    )
