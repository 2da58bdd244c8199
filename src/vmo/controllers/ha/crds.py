"""``vmo.dev/v1alpha1`` HAPolicy (which nodes are protected, how long a node may be unhealthy,
how it is fenced, which annotation orders restarts) and NodeRemediation (one failed node's
incident: its phases, and each affected VM and where it went). Both are cluster-scoped."""

from __future__ import annotations

import enum
from typing import Any

from vmo.client import Client, Resource
from vmo.controllers.crds import CONDITIONS, GROUP, LABEL_SELECTOR, VERSION, crd, install, obj
from vmo.controllers.crds import integer as _int
from vmo.controllers.crds import string as _str

JSON = dict[str, Any]

HAPOLICY = Resource(GROUP, VERSION, "hapolicies", "HAPolicy", namespaced=False)
NODEREMEDIATION = Resource(GROUP, VERSION, "noderemediations", "NodeRemediation", namespaced=False)

DEFAULT_PRIORITY_ANNOTATION = "vmo.dev/restart-priority"
DEFAULT_UNHEALTHY_SECONDS = 30
DEFAULT_FENCE_TIMEOUT_SECONDS = 60
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"


class FencingMethod(enum.StrEnum):
    REDFISH = "redfish"
    OUT_OF_SERVICE_TAINT = "outOfServiceTaint"


class RemediationPhase(enum.StrEnum):
    """A NodeRemediation's lifecycle: Detected -> Fencing -> Fenced -> Restarting -> Completed,
    or ManualRecoveryRequired when fencing fails or cannot be confirmed."""

    DETECTED = "Detected"
    FENCING = "Fencing"
    FENCED = "Fenced"
    RESTARTING = "Restarting"
    COMPLETED = "Completed"
    MANUAL_RECOVERY_REQUIRED = "ManualRecoveryRequired"


class VMRecovery(enum.StrEnum):
    """One affected VM's state in its NodeRemediation."""

    PENDING = "Pending"  # fencing not confirmed yet: untouched
    WAITING = "Waiting"  # fenced, but no healthy node has room for it yet
    RELEASED = "Released"  # its VMI was released; the VM controller starts a new one
    RESTARTED = "Restarted"  # a new VMI of the VM runs, on ``node``
    NOT_RESTARTED = "NotRestarted"  # its runStrategy does not restart it (or no VM owns it)


SECRET_REF = obj(
    {"name": _str(minLength=1), "namespace": _str(description="default: vmo-system")},
    required=["name"],
)

REDFISH = obj(
    {
        "address": _str(
            description="the ComputerSystem URL, {node} standing for the node's name, e.g. "
            "https://bmc-{node}.example.com/redfish/v1/Systems/1; default: the Secret's "
            "'address' key"
        ),
        "credentialsSecret": SECRET_REF,
        "insecureSkipVerify": {"type": "boolean"},
        "caBundleKey": _str(description="the Secret key of the BMC's CA (default ca.crt)"),
    },
    required=["credentialsSecret"],
    description="ComputerSystem.Reset ForceOff, then PowerState polled until Off",
)

OUT_OF_SERVICE = obj(
    {
        "confirmationAnnotation": _str(
            description="the Node annotation by which remediation confirms the node is off "
            "(then this controller adds the taint); without it, the out-of-service taint "
            "itself (added by a remediation operator or an administrator) confirms"
        ),
    },
    description="Kubernetes' node.kubernetes.io/out-of-service:NoExecute taint",
)

POLICY_SPEC = obj(
    {
        "nodeSelector": LABEL_SELECTOR,
        "unhealthySeconds": _int(
            minimum=0, description="how long Ready may be other than True before fencing"
        ),
        "fenceTimeoutSeconds": _int(
            minimum=1, description="how long fencing may take to be confirmed"
        ),
        "restartPriorityAnnotation": _str(
            description="the VM annotation holding its restart priority (an integer, higher "
            "first; default vmo.dev/restart-priority, missing is 0)"
        ),
        "fencing": obj(
            {
                "method": _str(enum=[m.value for m in FencingMethod]),
                "redfish": REDFISH,
                "outOfServiceTaint": OUT_OF_SERVICE,
            },
            required=["method"],
        ),
    },
    required=["fencing"],
)

POLICY_STATUS = obj(
    {
        "nodes": {"type": "array", "items": _str()},
        "observedGeneration": _int(),
        "conditions": CONDITIONS,
    }
)

REMEDIATION_SPEC = obj(
    {
        "nodeName": _str(minLength=1),
        "policy": _str(description="the HAPolicy that protects the node"),
        "confirmedOff": {
            "type": "boolean",
            "description": "an administrator attests the node is powered off: fencing is "
            "taken as confirmed (ends a ManualRecoveryRequired)",
        },
    },
    required=["nodeName", "policy"],
)

AFFECTED_VM = obj(
    {
        "namespace": _str(),
        "name": _str(),
        "priority": _int(),
        "runStrategy": _str(),
        "state": _str(enum=[s.value for s in VMRecovery]),
        "previousUID": _str(description="the VMI that ran on the failed node"),
        "targetNode": _str(description="the node planned when it was released"),
        "node": _str(description="where it runs again"),
        "releasedAt": _str(format="date-time"),
        "restartedAt": _str(format="date-time"),
        "message": _str(),
    },
    required=["namespace", "name", "state"],
)

REMEDIATION_STATUS = obj(
    {
        "phase": _str(enum=[p.value for p in RemediationPhase]),
        "reason": _str(),
        "message": _str(),
        "method": _str(),
        "detectedAt": _str(format="date-time"),
        "fenceRequestedAt": _str(format="date-time"),
        "fencedAt": _str(format="date-time"),
        "completedAt": _str(format="date-time"),
        "nodeReturnedAt": _str(format="date-time"),
        "taintAdded": {"type": "boolean"},
        "virtualMachines": {"type": "array", "items": AFFECTED_VM},
        "observedGeneration": _int(),
        "conditions": CONDITIONS,
    }
)


def ha_crds() -> list[JSON]:
    return [
        crd(
            "HAPolicy",
            "hapolicies",
            POLICY_SPEC,
            POLICY_STATUS,
            [
                {"name": "Fencing", "type": "string", "jsonPath": ".spec.fencing.method"},
                {"name": "Unhealthy", "type": "integer", "jsonPath": ".spec.unhealthySeconds"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ],
            scope="Cluster",
            short_names=["hap"],
        ),
        crd(
            "NodeRemediation",
            "noderemediations",
            REMEDIATION_SPEC,
            REMEDIATION_STATUS,
            [
                {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ],
            scope="Cluster",
            short_names=["nrem"],
        ),
    ]


async def ensure_crds(client: Client) -> None:
    await install(client, ha_crds())


__all__ = [
    "DEFAULT_FENCE_TIMEOUT_SECONDS",
    "DEFAULT_PRIORITY_ANNOTATION",
    "DEFAULT_UNHEALTHY_SECONDS",
    "HAPOLICY",
    "NODEREMEDIATION",
    "OUT_OF_SERVICE_TAINT",
    "FencingMethod",
    "RemediationPhase",
    "VMRecovery",
    "ensure_crds",
    "ha_crds",
]
