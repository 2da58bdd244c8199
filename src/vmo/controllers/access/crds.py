"""``vmo.dev/v1alpha1`` VMAccessPolicy: who gets which VM role (``vmo.api.access.ROLES``) on the
VMs that names, a label selector or a folder pick, in the policy's namespace."""

from __future__ import annotations

from typing import Any

from vmo.api.access import ROLES
from vmo.api.quantity import QUANTITY_PATTERN
from vmo.client import Client, Resource
from vmo.controllers.crds import CONDITIONS, GROUP, LABEL_SELECTOR, VERSION, crd, install, obj
from vmo.controllers.crds import string as _str

JSON = dict[str, Any]

VMACCESSPOLICY = Resource(GROUP, VERSION, "vmaccesspolicies", "VMAccessPolicy")
VMQUOTA = Resource(GROUP, VERSION, "vmquotas", "VMQuota")

# a folder path: names of letters, digits, '-' and '_' between slashes (vmo.api.access)
FOLDER_PATTERN = r"^/?([A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?/?)*$"

SUBJECT = obj(
    {
        "kind": _str(enum=["User", "Group", "ServiceAccount"]),
        "name": _str(minLength=1),
        "namespace": _str(description="a ServiceAccount's; the policy's own by default"),
    },
    required=["kind", "name"],
)

POLICY_SPEC = obj(
    {
        "role": _str(enum=list(ROLES)),
        "subjects": {"type": "array", "items": SUBJECT, "minItems": 1},
        "virtualMachines": obj(
            {
                "names": {"type": "array", "items": _str(minLength=1)},
                "selector": LABEL_SELECTOR,
                "folder": _str(
                    pattern=FOLDER_PATTERN,
                    maxLength=64,
                    description="prod/db: the VMs in it and in every folder below it",
                ),
            },
            description=(
                "a VM is reached when names lists it, or when it matches selector and is in "
                "folder (each where given)"
            ),
        ),
    },
    required=["role", "subjects", "virtualMachines"],
)

POLICY_STATUS = obj(
    {
        "virtualMachines": {"type": "array", "items": _str()},
        "reached": {"type": "integer"},
        "role": _str(description="the Role the policy compiles to"),
        "roleBinding": _str(),
        "rules": {"type": "integer"},
        "conflicts": {"type": "array", "items": _str()},
        "observedGeneration": {"type": "integer"},
        "conditions": CONDITIONS,
    }
)


QUANTITY = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN}  # fmt: skip

QUOTA_SPEC = obj(
    {
        "folder": _str(pattern=FOLDER_PATTERN, maxLength=64,
                       description="count only the VMs in this folder and below it"),
        "hard": obj(
            {
                "virtualMachines": {"type": "integer", "minimum": 0},
                "vcpus": {"type": "integer", "minimum": 0},
                "memory": QUANTITY,
                "storage": QUANTITY,
            },
        ),
    },
    required=["hard"],
)  # fmt: skip

USAGE = obj(
    {
        "virtualMachines": {"type": "integer"},
        "vcpus": {"type": "integer"},
        "memory": _str(),
        "storage": _str(),
    }
)

QUOTA_STATUS = obj(
    {
        "hard": USAGE,
        "used": USAGE,
        "observedGeneration": {"type": "integer"},
        "conditions": CONDITIONS,
    }
)


def access_crds() -> list[JSON]:
    return [
        crd(
            "VMQuota",
            "vmquotas",
            QUOTA_SPEC,
            QUOTA_STATUS,
            [
                {"name": "Folder", "type": "string", "jsonPath": ".spec.folder"},
                {"name": "VMs", "type": "integer", "jsonPath": ".status.used.virtualMachines"},
                {"name": "vCPUs", "type": "integer", "jsonPath": ".status.used.vcpus"},
                {"name": "Memory", "type": "string", "jsonPath": ".status.used.memory"},
            ],
        ),
        crd(
            "VMAccessPolicy",
            "vmaccesspolicies",
            POLICY_SPEC,
            POLICY_STATUS,
            [
                {"name": "Role", "type": "string", "jsonPath": ".spec.role"},
                {"name": "Folder", "type": "string", "jsonPath": ".spec.virtualMachines.folder"},
                {"name": "VMs", "type": "integer", "jsonPath": ".status.reached"},
            ],
        ),
    ]


async def ensure_crds(client: Client) -> None:
    await install(client, access_crds())


__all__ = ["VMACCESSPOLICY", "VMQUOTA", "access_crds", "ensure_crds"]
