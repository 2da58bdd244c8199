"""What VMO's CustomResourceDefinitions (``vmo.dev/v1alpha1``) share: schema helpers, the
CRD's shape, and ``install`` (create what is missing, bring older specs up to date)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from vmo.client import CRD, Client, Conflict

JSON = dict[str, Any]
GROUP = "vmo.dev"
VERSION = "v1alpha1"


def string(**extra: Any) -> JSON:
    return {"type": "string", **extra}


def integer(**extra: Any) -> JSON:
    return {"type": "integer", **extra}


def obj(properties: JSON, **extra: Any) -> JSON:
    return {"type": "object", "properties": properties, **extra}


CONDITIONS: JSON = {
    "type": "array",
    "items": obj(
        {
            "type": string(),
            "status": string(enum=["True", "False", "Unknown"]),
            "reason": string(),
            "message": string(),
            "lastTransitionTime": string(format="date-time"),
            "observedGeneration": integer(),
        },
        required=["type", "status"],
    ),
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


LABEL_SELECTOR: JSON = obj(
    {
        "matchLabels": {"type": "object", "additionalProperties": string()},
        "matchExpressions": {
            "type": "array",
            "items": obj(
                {
                    "key": string(),
                    "operator": string(enum=["In", "NotIn", "Exists", "DoesNotExist"]),
                    "values": {"type": "array", "items": string()},
                },
                required=["key", "operator"],
            ),
        },
    }
)


def crd(
    kind: str,
    plural: str,
    spec: JSON,
    status: JSON,
    columns: list[JSON],
    *,
    scope: str = "Namespaced",
    short_names: Sequence[str] = (),
) -> JSON:
    """A ``vmo.dev/v1alpha1`` kind (namespaced unless ``scope="Cluster"``) with a status
    subresource."""
    names: JSON = {
        "kind": kind,
        "plural": plural,
        "singular": kind.lower(),
        "listKind": f"{kind}List",
        "categories": ["vmo"],
    }
    if short_names:
        names["shortNames"] = list(short_names)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": names,
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": obj(
                            {
                                "apiVersion": string(),
                                "kind": string(),
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                            required=["spec"],
                        )
                    },
                }
            ],
        },
    }


async def install(client: Client, crds: Sequence[JSON]) -> None:
    """Creates the CRDs that are missing, and brings an older version's up to this one's spec
    (a field its schema lacks would be pruned from every object)."""
    for crd in crds:
        found = await client.find(CRD, crd["metadata"]["name"])
        if found is None:
            with contextlib.suppress(Conflict):
                await client.create(CRD, crd)
        elif found.get("spec") != crd["spec"]:
            with contextlib.suppress(Conflict):
                await client.replace(CRD, {**found, "spec": crd["spec"]})


__all__ = [
    "CONDITIONS",
    "GROUP",
    "LABEL_SELECTOR",
    "VERSION",
    "crd",
    "install",
    "integer",
    "obj",
    "string",
]
