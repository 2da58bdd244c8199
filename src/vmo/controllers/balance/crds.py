"""The balancer's CustomResourceDefinitions (``vmo.dev/v1alpha1``), installable on any cluster:

- BalancePolicy (cluster-scoped): how VMs are balanced across nodes, as vSphere's DRS settings
  say it: an automation level, a migration threshold 1..5, the resources weighed, which VMs,
  limits per cycle, a per-VM cooldown, maintenance windows, and how usage is measured.
- BalanceRecommendation (in the VM's namespace, so that per-VM access control covers it): one
  move a cycle chose, with why and at what cost; in Full mode, or once approved, carried out as a
  VirtualMachineInstanceMigration whose outcome its status records.

The schema bounds what it can (the threshold's range, the limits' signs, enums); what spans
fields (a cooldown's minimum under its maximum, cron and duration syntax) is checked by
``vmo.controllers.balance.policy`` and reported on the policy's status.
"""

from __future__ import annotations

from typing import Any

from vmo.client import Resource
from vmo.controllers.crds import CONDITIONS, GROUP, LABEL_SELECTOR, VERSION, crd
from vmo.controllers.crds import integer as _int
from vmo.controllers.crds import obj as _obj
from vmo.controllers.crds import string as _str

JSON = dict[str, Any]

BALANCE_POLICY = Resource(GROUP, VERSION, "balancepolicies", "BalancePolicy", namespaced=False)
BALANCE_RECOMMENDATION = Resource(GROUP, VERSION, "balancerecommendations", "BalanceRecommendation")

AUTOMATION_LEVELS = ("Manual", "Partial", "Full")
RESOURCES = ("cpu", "memory", "network")
# a Go duration: what vmo.api.duration parses (the schema keeps out what plainly is not one)
DURATION = _str(pattern=r"^([0-9]+(\.[0-9]*)?(ns|us|µs|ms|s|m|h))+$")
NUMBER: JSON = {"type": "number"}

POLICY_SPEC = _obj(
    {
        "automationLevel": _str(
            enum=list(AUTOMATION_LEVELS),
            default="Manual",
            description="Manual: recommendations only; Partial: automatic initial placement, "
            "migrations recommended; Full: both automatic",
        ),
        "migrationThreshold": _int(
            minimum=1,
            maximum=5,
            default=3,
            description="DRS's: 1 only mandatory moves (constraints, evacuations), "
            "5 also moves of slight benefit",
        ),
        "resources": {
            "type": "array",
            "items": _str(enum=list(RESOURCES)),
            "default": ["cpu", "memory"],
            "x-kubernetes-list-type": "set",
        },
        "vmSelector": LABEL_SELECTOR,
        "namespaceSelector": LABEL_SELECTOR,
        "exclude": _obj({"vmSelector": LABEL_SELECTOR, "namespaceSelector": LABEL_SELECTOR}),
        "limits": _obj(
            {
                "perNode": _int(
                    minimum=0,
                    description="migrations per node and cycle (default "
                    "2, at most the KubeVirt CR's parallelOutboundMigrationsPerNode)",
                ),
                "total": _int(
                    minimum=0,
                    description="migrations per cycle (default 5, at most "
                    "the KubeVirt CR's parallelMigrationsPerCluster)",
                ),
            }
        ),
        "cooldown": _obj(
            {
                "minimum": {**DURATION, "description": "at least 15m (the default)"},
                "maximum": {**DURATION, "description": "the doubling stops here (default 6h)"},
            }
        ),
        "maintenanceWindows": {
            "type": "array",
            "description": "when any is given, automatic migrations start only inside one",
            "items": _obj(
                {"schedule": _str(description="cron: when a window opens"), "duration": DURATION},
                required=["schedule", "duration"],
            ),
        },
        "interval": {**DURATION, "description": "how often a cycle runs (default 5m)"},
        "measurement": _obj(
            {
                "window": {**DURATION, "description": "the usage history weighed (default 30m)"},
                "percentile": _int(minimum=1, maximum=100, default=95),
                "step": {**DURATION, "description": "resolution over the window (default 1m)"},
                "rateInterval": {**DURATION, "description": "rate()'s range (default 2m)"},
            }
        ),
        "headroom": _int(
            minimum=10,
            maximum=100,
            default=90,
            description="no move takes a node's measured usage above this percentage",
        ),
        "suspend": {"type": "boolean"},
    }
)

POLICY_STATUS = _obj(
    {
        "observedGeneration": _int(),
        "lastCycleTime": _str(format="date-time"),
        "nextCycleTime": _str(format="date-time"),
        "imbalance": NUMBER,
        "targetImbalance": NUMBER,
        "nodes": _int(),
        "virtualMachines": _int(),
        "recommendations": _int(),
        "migrationsStarted": _int(),
        "bandwidth": _obj({"bytesPerSecond": NUMBER, "source": _str(enum=["measured", "assumed"])}),
        "message": _str(),
        "cooldowns": {
            "type": "array",
            "items": _obj(
                {
                    "vm": _str(),
                    "lastMove": _str(format="date-time"),
                    "seconds": NUMBER,
                    "source": _str(),
                    "until": _str(format="date-time"),
                },
                required=["vm"],
            ),
        },
        "conditions": CONDITIONS,
    }
)

RECOMMENDATION_SPEC = _obj(
    {
        "policy": _str(),
        "virtualMachineInstance": _str(),
        "source": _str(),
        "target": _str(),
        "priority": _int(minimum=1, maximum=5),
        "rule": _str(),
        "reason": _str(),
        "imbalanceBefore": NUMBER,
        "imbalanceAfter": NUMBER,
        "memoryBytes": _int(minimum=0),
        "expectedSeconds": NUMBER,
        "bandwidth": _obj({"bytesPerSecond": NUMBER, "source": _str(enum=["measured", "assumed"])}),
        "approved": {"type": "boolean", "description": "set by `vmo balance apply`"},
    },
    required=["policy", "virtualMachineInstance", "source", "target"],
)

RECOMMENDATION_STATUS = _obj(
    {
        "phase": _str(enum=["Pending", "Migrating", "Succeeded", "Failed", "Superseded"]),
        "migration": _str(),
        "message": _str(),
        "startTime": _str(format="date-time"),
        "completionTime": _str(format="date-time"),
        "conditions": CONDITIONS,
    }
)


def balance_crds() -> list[JSON]:
    return [
        crd(
            "BalancePolicy",
            "balancepolicies",
            POLICY_SPEC,
            POLICY_STATUS,
            [
                {"name": "Automation", "type": "string", "jsonPath": ".spec.automationLevel"},
                {"name": "Threshold", "type": "integer", "jsonPath": ".spec.migrationThreshold"},
                {"name": "Imbalance", "type": "number", "jsonPath": ".status.imbalance"},
                {
                    "name": "Recommendations",
                    "type": "integer",
                    "jsonPath": ".status.recommendations",
                },
                {"name": "LastCycle", "type": "date", "jsonPath": ".status.lastCycleTime"},
            ],
            scope="Cluster",
            short_names=["bp"],
        ),
        crd(
            "BalanceRecommendation",
            "balancerecommendations",
            RECOMMENDATION_SPEC,
            RECOMMENDATION_STATUS,
            [
                {"name": "VMI", "type": "string", "jsonPath": ".spec.virtualMachineInstance"},
                {"name": "From", "type": "string", "jsonPath": ".spec.source"},
                {"name": "To", "type": "string", "jsonPath": ".spec.target"},
                {"name": "Priority", "type": "integer", "jsonPath": ".spec.priority"},
                {"name": "Rule", "type": "string", "jsonPath": ".spec.rule"},
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            ],
            short_names=["brec"],
        ),
    ]


__all__ = [
    "AUTOMATION_LEVELS",
    "BALANCE_POLICY",
    "BALANCE_RECOMMENDATION",
    "RESOURCES",
    "balance_crds",
]
