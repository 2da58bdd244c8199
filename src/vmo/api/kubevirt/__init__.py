"""VMO's models of the KubeVirt family: schemas, printer columns, defaults and admission checks.

``kubevirt_resource_types()`` lists every upstream kind VMO serves, described as upstream's CRDs
describe them (scope, names, columns) with the fields VMO's embedded engine supports.
"""

from __future__ import annotations

from vmo.api.kubevirt._bounds import MIN_GUEST_MEMORY
from vmo.api.kubevirt.backup import backup_resource_types
from vmo.api.kubevirt.cdi import cdi_resource_types
from vmo.api.kubevirt.clone import clone_and_export_resource_types
from vmo.api.kubevirt.core import core_resource_types
from vmo.api.kubevirt.defaults import default_vm, default_vmi, firmware_uuid
from vmo.api.kubevirt.instancetype import instancetype_resource_types
from vmo.api.kubevirt.migrations import migration_policy
from vmo.api.kubevirt.network import network_attachment_definition
from vmo.api.kubevirt.snapshot import snapshot_resource_types
from vmo.api.kubevirt.validation import validate_vm, validate_vmi, validate_vmim, vm_warnings
from vmo.api.types import ResourceType

__all__ = [
    "MIN_GUEST_MEMORY",
    "default_vm",
    "default_vmi",
    "firmware_uuid",
    "kubevirt_resource_types",
    "validate_vm",
    "validate_vmi",
    "validate_vmim",
    "vm_warnings",
]


def kubevirt_resource_types() -> list[ResourceType]:
    """Every KubeVirt-family kind VMO serves, one entry per served group/version/kind."""
    return [
        *core_resource_types(),
        *instancetype_resource_types(),
        *snapshot_resource_types(),
        *clone_and_export_resource_types(),
        migration_policy(),
        *backup_resource_types(),
        *cdi_resource_types(),
        network_attachment_definition(),
    ]
