"""Which kinds the server serves, looked up by URL coordinates or by apiVersion and kind.

Built-in kinds are registered at start; CRD-defined kinds come and go as CRDs change.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmo.api.types import ResourceType


class Registry:
    def __init__(self, types: Iterable[ResourceType] = ()) -> None:
        self._by_path: dict[tuple[str, str, str], ResourceType] = {}
        self._by_kind: dict[tuple[str, str], ResourceType] = {}
        self._owner: dict[tuple[str, str], str] = {}  # (group, plural) -> "builtin" | crd name
        for rt in types:
            self.add(rt)

    def add(self, rt: ResourceType, *, owner: str = "builtin") -> None:
        self._by_path[(rt.group, rt.version, rt.plural)] = rt
        self._by_kind[(rt.api_version, rt.kind)] = rt
        self._owner[(rt.group, rt.plural)] = owner

    def remove_owned_by(self, owner: str) -> list[ResourceType]:
        gone = [
            rt for rt in self._by_path.values() if self._owner.get((rt.group, rt.plural)) == owner
        ]
        for rt in gone:
            self._by_path.pop((rt.group, rt.version, rt.plural), None)
            self._by_kind.pop((rt.api_version, rt.kind), None)
        for rt in gone:
            if not any(
                t.group == rt.group and t.plural == rt.plural for t in self._by_path.values()
            ):
                self._owner.pop((rt.group, rt.plural), None)
        return gone

    def owner_of(self, group: str, plural: str) -> str | None:
        return self._owner.get((group, plural))

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_path.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        return self._by_kind.get((api_version, kind))

    def kind_in_group(self, group: str, kind: str) -> ResourceType | None:
        for rt in self._by_path.values():
            if rt.group == group and rt.kind == kind:
                return rt
        return None

    def all(self) -> list[ResourceType]:
        return list(self._by_path.values())

    def storage_types(self) -> list[ResourceType]:
        """One type per (group, plural): the store keeps each resource once, whatever version."""
        seen: dict[tuple[str, str], ResourceType] = {}
        for rt in self._by_path.values():
            seen.setdefault((rt.group, rt.plural), rt)
        return list(seen.values())

    def namespaced_storage_types(self) -> list[ResourceType]:
        return [rt for rt in self.storage_types() if rt.namespaced]

    def group_versions(self) -> dict[str, list[str]]:
        """group -> versions, in registration order (the first is the preferred version)."""
        out: dict[str, list[str]] = {}
        for group, version, _ in self._by_path:
            versions = out.setdefault(group, [])
            if version not in versions:
                versions.append(version)
        return out

    def in_group_version(self, group: str, version: str) -> list[ResourceType]:
        return [rt for (g, v, _), rt in self._by_path.items() if g == group and v == version]
