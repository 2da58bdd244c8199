"""The API server's own controllers: garbage collection, namespaces, CRDs, role aggregation.

They play kube-controller-manager's and apiextensions' parts for the embedded server. Each is
level-based: a change only enqueues a key; processing reads fresh state and moves it one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmo.api.types import JSON, ResourceType
from vmo.apiserver import objects as ob
from vmo.apiserver.errors import ApiError
from vmo.apiserver.registry import Registry
from vmo.apiserver.watch import Change

log = logging.getLogger(__name__)

CRD_GROUP = "apiextensions.k8s.io"
CRD_CLEANUP = "customresourcecleanup.apiextensions.k8s.io"
RBAC_GROUP = "rbac.authorization.k8s.io"
_OWNERS = b'"ownerReferences"'
_DELETING = b'"deletionTimestamp"'


def _uid(obj: JSON) -> str:
    return str(obj.get("metadata", {}).get("uid", ""))


def _owner_uids(obj: JSON) -> list[str]:
    return [str(r.get("uid")) for r in obj.get("metadata", {}).get("ownerReferences") or []]


@dataclass
class OwnerIndex:
    """uid -> key of every stored object, and owner uid -> keys of its dependents."""

    keys: dict[str, str] = field(default_factory=dict)
    dependents: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def observe(self, change: Change) -> None:
        # Parsing every write is the hot path's largest cost: an update that touches no owner
        # references leaves the index as it was (a uid never changes).
        if (
            change.type == "MODIFIED"
            and _OWNERS not in change.data
            and _OWNERS not in (change.prev or b"")
        ):
            return
        if change.prev is not None:
            self._forget(change.key, change.prev_obj or {})
        if change.type == "DELETED":
            self._forget(change.key, change.obj)
            return
        obj = change.obj
        self.keys[_uid(obj)] = change.key
        for owner in _owner_uids(obj):
            self.dependents[owner].add(change.key)

    def _forget(self, key: str, prev: JSON) -> None:
        if self.keys.get(_uid(prev)) == key:
            del self.keys[_uid(prev)]
        for owner in _owner_uids(prev):
            deps = self.dependents.get(owner)
            if deps is not None:
                deps.discard(key)
                if not deps:
                    del self.dependents[owner]


class Lifecycle:
    """Runs the server-side controllers on the event loop, fed by the watch hub."""

    def __init__(
        self,
        service: ob.ObjectService,
        registry: Registry,
        *,
        crd_types: Callable[[JSON], list[ResourceType]],
        aggregate: Callable[[list[JSON]], dict[str, list[JSON]]],
    ) -> None:
        self.service = service
        self.registry = registry
        self.index = OwnerIndex()
        self._crd_types = crd_types
        self._aggregate = aggregate
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    # --- wiring ------------------------------------------------------------------------------

    def prime(self) -> None:
        """Builds the index and registers CRD kinds from what is stored (before serving)."""
        for rt in self.registry.storage_types():
            for row in self.service.scan(rt):
                obj = row.obj()
                self.index.keys[_uid(obj)] = row.key
                for owner in _owner_uids(obj):
                    self.index.dependents[owner].add(row.key)
                if obj["metadata"].get("deletionTimestamp"):
                    self._enqueue(row.key)
        crd_rt = self._crd_rt()
        if crd_rt is not None:
            for row in self.service.scan(crd_rt):
                self._register_crd(row.obj())
                self._enqueue(row.key)
        self._aggregate_roles()

    def start(self) -> None:
        self.service.hub.listen(self.observe)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="vmo-lifecycle")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def observe(self, change: Change) -> None:
        self.index.observe(change)
        if _DELETING in change.data:
            self._enqueue(change.key)
        if change.type == "DELETED":
            obj = change.obj
            md = obj.get("metadata", {})
            for dep in list(self.index.dependents.get(_uid(obj), ())):
                self._enqueue(dep)
            for owner in _owner_uids(obj):
                owner_key = self.index.keys.get(owner)
                if owner_key:
                    self._enqueue(owner_key)
            if md.get("namespace"):
                self._enqueue(self._namespace_key(md["namespace"]))
        group_plural = change.key.split("/", 2)[:2]
        if group_plural == [CRD_GROUP, "customresourcedefinitions"]:
            self._enqueue(change.key)
        elif group_plural == [RBAC_GROUP, "clusterroles"]:
            self._enqueue("@aggregate")

    def _enqueue(self, key: str) -> None:
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    async def _run(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            try:
                self._process(key)
            except ApiError as exc:
                log.info("lifecycle: %s: %s; retrying", key, exc.message)
                asyncio.get_running_loop().call_later(1.0, self._enqueue, key)
            except Exception:
                log.exception("lifecycle: %s failed; retrying", key)
                asyncio.get_running_loop().call_later(2.0, self._enqueue, key)

    # --- processing --------------------------------------------------------------------------

    def _process(self, key: str) -> None:
        if key == "@aggregate":
            self._aggregate_roles()
            return
        rt = self._rt_for_key(key)
        if rt is None:
            return
        found = self.service.store.find(key)
        if rt.group == CRD_GROUP and rt.plural == "customresourcedefinitions":
            self._sync_crd(key, found.obj() if found else None)
            return
        if found is None:
            return
        obj = found.obj()
        if obj["metadata"].get("deletionTimestamp"):
            self._finish_deletion(rt, obj)
        self._collect_if_orphaned(rt, obj)

    def _rt_for_key(self, key: str) -> ResourceType | None:
        group, plural = key.split("/", 2)[:2]
        group = "" if group == "core" else group
        for rt in self.registry.storage_types():
            if rt.group == group and rt.plural == plural:
                return rt
        return None

    def _crd_rt(self) -> ResourceType | None:
        return self.registry.kind_in_group(CRD_GROUP, "CustomResourceDefinition")

    def _namespace_key(self, namespace: str) -> str:
        return f"core/namespaces/{namespace}"

    @staticmethod
    def _coords(obj: JSON) -> tuple[str, str]:
        md = obj["metadata"]
        return str(md.get("namespace", "")), str(md["name"])

    def _collect_if_orphaned(self, rt: ResourceType, obj: JSON) -> None:
        """Background cascading deletion: a dependent whose owners are all gone goes too."""
        owners = _owner_uids(obj)
        if not owners or obj["metadata"].get("deletionTimestamp"):
            return
        if any(uid in self.index.keys for uid in owners):
            return
        namespace, name = self._coords(obj)
        log.info("garbage-collecting %s %s/%s: its owners are gone", rt.kind, namespace, name)
        self.service.delete(rt, namespace, name, propagation="Background")

    def _finish_deletion(self, rt: ResourceType, obj: JSON) -> None:
        finalizers = list(obj["metadata"].get("finalizers") or [])
        _namespace, _name = self._coords(obj)
        if ob.ORPHAN in finalizers:
            self._orphan_dependents(obj)
            finalizers.remove(ob.ORPHAN)
            self._set_finalizers(rt, obj, finalizers)
        elif ob.FOREGROUND in finalizers:
            if self._delete_dependents_foreground(obj):
                return
            finalizers.remove(ob.FOREGROUND)
            self._set_finalizers(rt, obj, finalizers)
        elif rt.group == "" and rt.kind == "Namespace":
            self._drain_namespace(obj)

    def _set_finalizers(self, rt: ResourceType, obj: JSON, finalizers: list[str]) -> None:
        namespace, name = self._coords(obj)
        obj["metadata"]["finalizers"] = finalizers
        self.service.update(rt, namespace, name, obj)

    def _dependents(self, obj: JSON) -> list[tuple[ResourceType, JSON]]:
        out = []
        for key in sorted(self.index.dependents.get(_uid(obj), ())):
            rt = self._rt_for_key(key)
            found = self.service.store.find(key)
            if rt is not None and found is not None:
                out.append((rt, found.obj()))
        return out

    def _orphan_dependents(self, owner: JSON) -> None:
        uid = _uid(owner)
        for rt, dep in self._dependents(owner):
            md = dep["metadata"]
            md["ownerReferences"] = [
                r for r in md.get("ownerReferences", []) if r.get("uid") != uid
            ]
            if not md["ownerReferences"]:
                del md["ownerReferences"]
            namespace, name = self._coords(dep)
            self.service.update(rt, namespace, name, dep)

    def _delete_dependents_foreground(self, owner: JSON) -> bool:
        """Deletes dependents in the foreground; True while blocking ones remain."""
        uid = _uid(owner)
        blocking = False
        for rt, dep in self._dependents(owner):
            refs = [r for r in dep["metadata"].get("ownerReferences", []) if r.get("uid") == uid]
            blocking = blocking or any(r.get("blockOwnerDeletion") for r in refs)
            if not dep["metadata"].get("deletionTimestamp"):
                namespace, name = self._coords(dep)
                self.service.delete(rt, namespace, name, propagation="Foreground")
        return blocking and any(True for _ in self._dependents(owner))

    def _drain_namespace(self, ns: JSON) -> None:
        namespace = ns["metadata"]["name"]
        remaining = 0
        for rt in self.registry.namespaced_storage_types():
            for row in self.service.scan(rt, namespace):
                remaining += 1
                if not row.obj()["metadata"].get("deletionTimestamp"):
                    self.service.delete(rt, namespace, row.obj()["metadata"]["name"])
        if remaining:
            # objects held by finalizers are waited for; their DELETED events requeue us
            return
        spec_finalizers = [
            f for f in ns.get("spec", {}).get("finalizers", []) if f != ob.NAMESPACE_FINALIZER
        ]
        ns.setdefault("spec", {})["finalizers"] = spec_finalizers
        if not spec_finalizers:
            del ns["spec"]["finalizers"]
        ns_rt = self._rt_for_key(self._namespace_key(namespace))
        assert ns_rt is not None
        self.service.update(ns_rt, "", namespace, ns)

    # --- CRDs --------------------------------------------------------------------------------

    def _register_crd(self, crd: JSON) -> None:
        name = crd["metadata"]["name"]
        self.registry.remove_owned_by(name)
        for rt in self._crd_types(crd):
            self.registry.add(rt, owner=name)

    def _sync_crd(self, key: str, crd: JSON | None) -> None:
        crd_rt = self._crd_rt()
        if crd_rt is None:
            return
        if crd is None:
            self.registry.remove_owned_by(key.rsplit("/", 1)[1])
            return
        name = crd["metadata"]["name"]
        if crd["metadata"].get("deletionTimestamp"):
            self._cleanup_crd(crd_rt, crd)
            return
        self._register_crd(crd)
        status = _established_status(crd)
        if crd.get("status") != status:
            crd["status"] = status
            self.service.update(crd_rt, "", name, crd, subresource="status")

    def _cleanup_crd(self, crd_rt: ResourceType, crd: JSON) -> None:
        name = crd["metadata"]["name"]
        types = [
            rt
            for rt in self.registry.storage_types()
            if self.registry.owner_of(rt.group, rt.plural) == name
        ]
        left = 0
        for rt in types:
            for row in self.service.scan(rt):
                left += 1
                obj = row.obj()
                if not obj["metadata"].get("deletionTimestamp"):
                    namespace, obj_name = self._coords(obj)
                    self.service.delete(rt, namespace, obj_name)
        if left:
            asyncio.get_running_loop().call_later(
                0.5, self._enqueue, f"{CRD_GROUP}/customresourcedefinitions/{name}"
            )
            return
        finalizers = [f for f in crd["metadata"].get("finalizers", []) if f != CRD_CLEANUP]
        self.registry.remove_owned_by(name)
        self._set_finalizers(crd_rt, crd, finalizers)

    # --- ClusterRole aggregation -------------------------------------------------------------

    def _aggregate_roles(self) -> None:
        rt = self.registry.kind_in_group(RBAC_GROUP, "ClusterRole")
        if rt is None:
            return
        roles = [row.obj() for row in self.service.scan(rt)]
        for name, rules in self._aggregate(roles).items():
            role = next((r for r in roles if r["metadata"]["name"] == name), None)
            if role is not None and role.get("rules", []) != rules:
                role["rules"] = rules
                self.service.update(rt, "", name, role)


def _established_status(crd: JSON) -> dict[str, Any]:
    spec = crd.get("spec", {})
    stamp = crd["metadata"].get("creationTimestamp", ob.now_rfc3339())
    stored = [v["name"] for v in spec.get("versions", []) if v.get("storage")]
    previous = crd.get("status", {})
    kept = previous.get("conditions") or []
    conditions = [
        _condition(kept, "NamesAccepted", "NoConflicts", "no conflicts found", stamp),
        _condition(
            kept,
            "Established",
            "InitialNamesAccepted",
            "the initial names have been accepted",
            stamp,
        ),
    ]
    return {
        "acceptedNames": spec.get("names", {}),
        "conditions": conditions,
        "storedVersions": sorted(set(previous.get("storedVersions", [])) | set(stored)),
    }


def _condition(kept: list[JSON], ctype: str, reason: str, message: str, stamp: str) -> JSON:
    for cond in kept:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": stamp,
    }
