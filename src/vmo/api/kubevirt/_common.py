"""Schema pieces shared by several KubeVirt-family kinds: conditions, references, selectors."""

from __future__ import annotations

from vmo.api.kubevirt._builders import (
    JSON,
    any_object,
    arr,
    integer,
    obj,
    quantity_map,
    string,
    string_map,
    strings,
)


def condition() -> JSON:
    """A status condition; both KubeVirt's and metav1's shapes fit within these fields."""
    return obj(
        {
            "type": string(),
            "status": string(),
            "reason": string(),
            "message": string(),
            "lastProbeTime": string(),
            "lastTransitionTime": string(),
            "lastHeartbeatTime": string(),
            "observedGeneration": integer(),
        },
        required=("type", "status"),
    )


def conditions() -> JSON:
    return arr(condition())


def kubevirt_condition() -> JSON:
    """KubeVirt's own condition type (no heartbeat, no observedGeneration)."""
    node = condition()
    for name in ("lastHeartbeatTime", "observedGeneration"):
        del node["properties"][name]
    return node


def typed_local_ref(*, required: tuple[str, ...] = ("kind", "name")) -> JSON:
    """A TypedLocalObjectReference: ``{apiGroup, kind, name}``."""
    return obj({"apiGroup": string(), "kind": string(), "name": string()}, required=required)


def local_ref() -> JSON:
    """A LocalObjectReference: ``{name}``."""
    return obj({"name": string()})


def label_selector() -> JSON:
    return obj(
        {
            "matchLabels": string_map(),
            "matchExpressions": arr(
                obj(
                    {"key": string(), "operator": string(), "values": strings()},
                    required=("key", "operator"),
                )
            ),
        }
    )


def resource_requirements() -> JSON:
    return obj({"requests": quantity_map(), "limits": quantity_map()})


def toleration() -> JSON:
    return obj(
        {
            "key": string(),
            "operator": string(enum=("Exists", "Equal")),
            "value": string(),
            "effect": string(enum=("NoSchedule", "PreferNoSchedule", "NoExecute")),
            "tolerationSeconds": integer(),
        }
    )


def affinity() -> JSON:
    """Node and pod (anti-)affinity; their inner terms are kept as the scheduler defines them."""
    return obj(
        {
            "nodeAffinity": any_object(),
            "podAffinity": any_object(),
            "podAntiAffinity": any_object(),
        }
    )


def phase_transition_timestamps() -> JSON:
    return arr(obj({"phase": string(), "phaseTransitionTimestamp": string()}))
