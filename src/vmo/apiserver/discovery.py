"""Discovery documents: ``/api``, ``/apis``, group and resource lists, aggregated discovery v2."""

from __future__ import annotations

from vmo.api.types import JSON, ResourceType
from vmo.apiserver.registry import Registry

SUBRESOURCE_VERBS = {"status": ["get", "patch", "update"], "scale": ["get", "patch", "update"]}

# Subresources served by other parts of VMO (the engine's actions, tokens): name -> (kind, verbs)
ExtraSubresources = dict[tuple[str, str, str], list[tuple[str, str, list[str]]]]


def api_versions() -> JSON:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    }


def _group(group: str, versions: list[str]) -> JSON:
    gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": gvs, "preferredVersion": gvs[0]}


def api_group_list(registry: Registry) -> JSON:
    groups = [_group(g, vs) for g, vs in registry.group_versions().items() if g]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(registry: Registry, group: str) -> JSON | None:
    versions = registry.group_versions().get(group)
    if not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(group, versions)}


def _resource(rt: ResourceType) -> JSON:
    entry: JSON = {
        "name": rt.plural,
        "singularName": rt.singular,
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": list(rt.verbs),
    }
    if rt.short_names:
        entry["shortNames"] = list(rt.short_names)
    if rt.categories:
        entry["categories"] = list(rt.categories)
    return entry


def resource_entries(rt: ResourceType, extra: ExtraSubresources) -> list[JSON]:
    out = [_resource(rt)]
    for sub in rt.subresources:
        out.append(
            {
                "name": f"{rt.plural}/{sub}",
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": "Scale" if sub == "scale" else rt.kind,
                "verbs": SUBRESOURCE_VERBS.get(sub, ["get"]),
            }
        )
    for name, kind, verbs in extra.get((rt.group, rt.version, rt.plural), []):
        out.append(
            {
                "name": f"{rt.plural}/{name}",
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": kind,
                "verbs": verbs,
            }
        )
    return out


def api_resource_list(
    registry: Registry, group: str, version: str, extra: ExtraSubresources
) -> JSON | None:
    types = registry.in_group_version(group, version)
    if not types:
        return None
    resources: list[JSON] = []
    for rt in sorted(types, key=lambda t: t.plural):
        resources += resource_entries(rt, extra)
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


def aggregated(registry: Registry, *, core: bool, extra: ExtraSubresources) -> JSON:
    """``apidiscovery.k8s.io/v2`` APIGroupDiscoveryList: all groups and resources in one answer."""
    items = []
    for group, versions in registry.group_versions().items():
        if bool(group) == core:
            continue
        version_entries = []
        for version in versions:
            resources = []
            for rt in sorted(registry.in_group_version(group, version), key=lambda t: t.plural):
                resources.append(_aggregated_resource(rt, extra))
            version_entries.append(
                {"version": version, "resources": resources, "freshness": "Current"}
            )
        items.append(
            {"metadata": {"name": group, "creationTimestamp": None}, "versions": version_entries}
        )
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    }


def _aggregated_resource(rt: ResourceType, extra: ExtraSubresources) -> JSON:
    entry: JSON = {
        "resource": rt.plural,
        "responseKind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
        "scope": "Namespaced" if rt.namespaced else "Cluster",
        "singularResource": rt.singular,
        "verbs": list(rt.verbs),
    }
    if rt.short_names:
        entry["shortNames"] = list(rt.short_names)
    if rt.categories:
        entry["categories"] = list(rt.categories)
    subs = [
        {
            "subresource": sub,
            "responseKind": {
                "group": rt.group,
                "version": rt.version,
                "kind": "Scale" if sub == "scale" else rt.kind,
            },
            "verbs": SUBRESOURCE_VERBS.get(sub, ["get"]),
        }
        for sub in rt.subresources
    ]
    subs += [
        {
            "subresource": name,
            "responseKind": {"group": "", "version": "", "kind": kind},
            "verbs": verbs,
        }
        for name, kind, verbs in extra.get((rt.group, rt.version, rt.plural), [])
    ]
    if subs:
        entry["subresources"] = subs
    return entry


def aggregated_extra_group(name: str, version: str, resources: JSON) -> JSON | None:
    """The aggregated-discovery entry of a group served outside the registry, converted from
    its APIResourceList as kube-apiserver converts an aggregated APIService's legacy discovery.

    Subresources whose parent the group does not serve (``subresources.kubevirt.io``'s
    ``virtualmachines/start``) are left out, and so is a group left with no resource: clients
    reach those by path, and a parent without a kind would shadow the real one in kubectl's
    resource mapping. None when nothing remains.
    """
    entries: dict[str, JSON] = {}
    listed = resources.get("resources") or []
    for res in listed:
        if "/" in res["name"]:
            continue
        entries[res["name"]] = {
            "resource": res["name"],
            "responseKind": {"group": name, "version": version, "kind": res["kind"]},
            "scope": "Namespaced" if res.get("namespaced") else "Cluster",
            "singularResource": res.get("singularName") or "",
            "verbs": list(res.get("verbs") or []),
        }
    for res in listed:
        parent, _, sub = str(res["name"]).partition("/")
        if sub and parent in entries:
            entries[parent].setdefault("subresources", []).append(
                {
                    "subresource": sub,
                    "responseKind": {"group": name, "version": version, "kind": res["kind"]},
                    "verbs": list(res.get("verbs") or []),
                }
            )
    if not entries:
        return None
    return {
        "metadata": {"name": name, "creationTimestamp": None},
        "versions": [
            {"version": version, "resources": list(entries.values()), "freshness": "Current"}
        ],
    }
