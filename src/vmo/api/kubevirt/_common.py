"""Schema pieces shared by several KubeVirt-family kinds: conditions, references, selectors."""

from __future__ import annotations

from collections.abc import Collection

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
from vmo.api.types import Cause


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


def immutable_spec(new: JSON, old: JSON | None) -> list[Cause]:
    """Upstream refuses any spec change of snapshots, restores, backups and trackers."""
    if old is not None and new.get("spec") != old.get("spec"):
        return [Cause("spec", "spec is immutable after creation", "FieldValueForbidden")]
    return []


def reference_causes(ref: object, field: str, allowed: Collection[tuple[str, str]]) -> list[Cause]:
    """A typed reference must name one of the ``allowed`` (apiGroup, kind) pairs and a name."""
    if not isinstance(ref, dict):
        return [
            Cause(
                field, "a reference with apiGroup, kind and name is required", "FieldValueRequired"
            )
        ]
    causes: list[Cause] = []
    if (ref.get("apiGroup") or "", ref.get("kind")) not in allowed:
        kinds = ", ".join(f"{kind} ({group or 'core'})" for group, kind in sorted(allowed))
        causes.append(Cause(f"{field}.kind", f"must reference one of: {kinds}"))
    if not ref.get("name"):
        causes.append(Cause(f"{field}.name", "name is required", "FieldValueRequired"))
    return causes
