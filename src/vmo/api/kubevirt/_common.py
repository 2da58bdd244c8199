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


def condition(*extra: str) -> JSON:
    """A status condition: type, status, reason, message, lastTransitionTime, plus ``extra``.

    KubeVirt's conditions add ``lastProbeTime``, CDI's ``lastHeartbeatTime``, metav1's
    ``observedGeneration``.
    """
    properties = {
        "type": string(),
        "status": string(),
        "reason": string(),
        "message": string(),
        "lastTransitionTime": string(),
    }
    for name in extra:
        properties[name] = integer() if name == "observedGeneration" else string()
    return obj(properties, required=("type", "status"))


def kubevirt_condition() -> JSON:
    return condition("lastProbeTime")


def cdi_condition() -> JSON:
    return condition("lastHeartbeatTime")


def meta_condition() -> JSON:
    return condition("observedGeneration")


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
