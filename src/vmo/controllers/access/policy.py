"""The VMAccessPolicy controller: each policy compiles into one Role and one RoleBinding of plain
Kubernetes RBAC (``vmo-access-<policy>``, owned by the policy, labelled ``vmo.dev/access-policy``),
whose rules name exactly what the policy reaches now (``vmo.api.access.rules_for``).

A policy is reconciled again whenever anything that changes its reach changes: a VM created,
relabelled, moved between folders or deleted; a snapshot, backup, export, migration, clone or
restore created or deleted (their names go into the rules); its Role or RoleBinding edited by
someone else (put back). Deleting a policy deletes both at once (the ownerReference is only the
fallback). The policy's status lists the VMs it reaches and its conflicts: names that are not
VMs, and grants another policy already gives (that policy's role includes this one's, for the
same subject, on the same VM).

What the rules reach is computed from informer caches, never from a list per reconcile, so a
relabel of many VMs costs one pass per policy, not one per VM.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vmo.api import access
from vmo.api.access import reaches
from vmo.client import (
    ROLE,
    ROLEBINDING,
    VM,
    VMBACKUP,
    VMBACKUPTRACKER,
    VMCLONE,
    VMEXPORT,
    VMIM,
    VMRESTORE,
    VMSNAPSHOT,
    Client,
    Conflict,
    NotFound,
    Resource,
)
from vmo.controllers.access.crds import VMACCESSPOLICY
from vmo.controllers.crds import GROUP, VERSION
from vmo.runtime import (
    DELETED,
    Controller,
    Result,
    Watch,
    merge_conditions,
    split_key,
    timestamp,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]
RBAC_GROUP = "rbac.authorization.k8s.io"
PREFIX = "vmo-access-"
COALESCE = 1.0  # seconds a VM's or snapshot's event waits for the others of its burst
BACKUP_RESTORE = Resource(GROUP, VERSION, "backuprestores", "BackupRestore")

# the informer of each related resource (vmo.api.access.RELATED_RESOURCES)
RELATED: dict[tuple[str, str], Resource] = {
    (r.group, r.plural): r
    for r in (
        VMSNAPSHOT,
        VMRESTORE,
        VMEXPORT,
        VMBACKUP,
        VMBACKUPTRACKER,
        VMIM,
        VMCLONE,
        BACKUP_RESTORE,
    )
}


def role_name(policy: str) -> str:
    return f"{PREFIX}{policy}"


@dataclass(frozen=True)
class Compiled:
    """What a policy compiles to now."""

    vms: tuple[str, ...]
    role: JSON
    binding: JSON
    conflicts: tuple[str, ...]


def subjects_of(policy: JSON) -> list[JSON]:
    namespace = policy["metadata"]["namespace"]
    out = []
    for s in (policy.get("spec") or {}).get("subjects") or []:
        if s.get("kind") == "ServiceAccount":
            out.append({"kind": "ServiceAccount", "name": s["name"],
                        "namespace": s.get("namespace") or namespace})  # fmt: skip
        else:
            out.append({"kind": s.get("kind"), "apiGroup": RBAC_GROUP, "name": s["name"]})
    return out


def _owned(policy: JSON, kind: str, body: JSON) -> JSON:
    md = policy["metadata"]
    name = role_name(md["name"])
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": md["namespace"],
            "labels": {access.POLICY_LABEL: md["name"]},
            "ownerReferences": [
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VMAccessPolicy",
                 "name": md["name"], "uid": md["uid"], "controller": True,
                 "blockOwnerDeletion": True}
            ],
        },
        **body,
    }  # fmt: skip


def compile_policy(
    policy: JSON,
    vms: Sequence[JSON],
    related: dict[tuple[str, str], list[JSON]],
    lookup: dict[tuple[str, str], JSON],
    others: Sequence[JSON] = (),
) -> Compiled:
    """The Role and RoleBinding ``policy`` compiles to, given the namespace's VMs, its related
    objects by (group, resource), the objects they name indirectly by (kind, name) (trackers,
    snapshots, backups) and the namespace's other policies."""
    spec = policy.get("spec") or {}
    role = str(spec.get("role") or "")
    matcher = access.reach_matcher(policy)
    reached = sorted(vm["metadata"]["name"] for vm in vms if matcher(vm))
    names = set(reached)
    claims: set[str] = set()
    for vm in vms:
        if vm["metadata"]["name"] in names:
            claims |= access.vm_claims(vm)
    related_names: dict[tuple[str, str], tuple[str, ...]] = {}
    for key, objects in related.items():
        mine = [o["metadata"]["name"] for o in objects if _vm_of(key, o, lookup) in names]
        if mine:
            related_names[key] = tuple(sorted(mine))
    reach = access.Reach(tuple(reached), tuple(sorted(claims)), related_names)
    rules = access.rules_for(role, reach) if role in access.ROLE_GRANTS else []
    role_obj = _owned(policy, "Role", {"rules": rules})
    binding = _owned(
        policy,
        "RoleBinding",
        {
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": "Role",
                        "name": role_name(policy["metadata"]["name"])},
            "subjects": subjects_of(policy),
        },
    )  # fmt: skip
    return Compiled(
        tuple(reached), role_obj, binding, tuple(_conflicts(policy, names, vms, others))
    )


def _vm_of(key: tuple[str, str], obj: JSON, lookup: dict[tuple[str, str], JSON]) -> str:
    """The VM a related object names, following trackers, snapshots and backups once."""
    named = access.related_vm(key[0], key[1], obj)
    if named is None:
        return ""
    how, name = named
    if how == "vm":
        return name
    kinds = {"tracker": "VirtualMachineBackupTracker", "snapshot": "VirtualMachineSnapshot",
             "backup": "VirtualMachineBackup"}  # fmt: skip
    target = lookup.get((kinds[how], name))
    if target is None:
        return ""
    group = access.BACKUP if how in ("tracker", "backup") else access.SNAPSHOT
    inner = access.named_vm(group, kinds[how], target)
    if inner is None:
        return ""
    if inner[0] == "tracker":
        tracker = lookup.get(("VirtualMachineBackupTracker", inner[1]))
        found = access.named_vm(access.BACKUP, "VirtualMachineBackupTracker", tracker or {})
        return found[1] if tracker is not None and found else ""
    return inner[1] if inner[0] == "vm" else ""


def _subject_keys(policy: JSON) -> set[tuple[str, str, str]]:
    return {(s["kind"], s.get("namespace", ""), s["name"]) for s in subjects_of(policy)}


def _conflicts(
    policy: JSON, reached: set[str], vms: Sequence[JSON], others: Sequence[JSON]
) -> Iterable[str]:
    spec = policy.get("spec") or {}
    existing = {vm["metadata"]["name"] for vm in vms}
    pick = spec.get("virtualMachines") or {}
    for i, name in enumerate(pick.get("names") or []):
        if name not in existing:
            yield f"virtualMachines.names[{i}]: there is no VM {name} in this namespace"
    role = str(spec.get("role") or "")
    if role not in access.ROLE_GRANTS:
        return
    mine = _subject_keys(policy)
    for other in others:
        if other["metadata"]["name"] == policy["metadata"]["name"]:
            continue
        other_role = str((other.get("spec") or {}).get("role") or "")
        if other_role not in access.ROLE_GRANTS or not access.includes(other_role, role):
            continue
        shared = sorted(reached & set((other.get("status") or {}).get("virtualMachines") or []))
        both = sorted(f"{k} {n}" for k, _ns, n in mine & _subject_keys(other))
        if shared and both:
            yield (
                f"policy {other['metadata']['name']} already grants {other_role} to "
                f"{', '.join(both)} on {', '.join(shared[:5])}"
                + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
            )


class VMAccessPolicyController(Controller):
    """Keeps every policy's Role and RoleBinding exact.

    An event queues only the policies it can change: a VM's, those that reached it at their
    last compile or reach it now; a snapshot's or backup's, those that reach the VM it names.
    The controller's own writes (a Role, a binding, a policy's status) do not queue the policy
    again, only the namespace's other policies sharing a subject (their conflicts may change)."""

    name = "vm-access"
    workers = 4

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self._reach: dict[str, set[str]] = {}  # policy key -> the VMs its last compile reached
        self._written: dict[tuple[str, str], str] = {}  # (kind, key) -> resourceVersion we wrote
        self._matchers: dict[str, tuple[str, Callable[[JSON], bool]]] = {}  # by policy generation

    def watches(self) -> Sequence[Watch]:
        return [
            Watch(VMACCESSPOLICY, self._policy_changed),
            Watch(VM, self._coalesced(self._policies_of_vm)),
            *(
                Watch(res, self._coalesced(self._policies_of_related(key)))
                for key, res in RELATED.items()
            ),
            Watch(ROLE, self._policy_of_rbac("Role")),
            Watch(ROLEBINDING, self._policy_of_rbac("RoleBinding")),
        ]

    def _coalesced(
        self, keys_of: Callable[[str, JSON], list[str]]
    ) -> Callable[[str, JSON], list[str]]:
        """The keys queued ``COALESCE`` seconds later, once for a burst: a bulk relabel of many
        VMs recompiles each policy it touches a few times, not once per VM."""

        def keys(etype: str, obj: JSON) -> list[str]:
            for key in keys_of(etype, obj):
                self.queue.add_after(key, COALESCE)
            return []

        return keys

    def _ours(self, kind: str, obj: JSON) -> bool:
        md = obj["metadata"]
        key = f"{md.get('namespace', '')}/{md['name']}"
        return bool(self._written.get((kind, key)) == md.get("resourceVersion"))

    def _policy_changed(self, etype: str, obj: JSON) -> list[str]:
        """The policy itself (unless the event is its status as this controller wrote it), and
        the namespace's policies sharing a subject with it (their conflicts may change)."""
        md = obj["metadata"]
        namespace = md.get("namespace", "")
        keys = [] if etype != DELETED and self._ours("VMAccessPolicy", obj) else [
            f"{namespace}/{md['name']}"
        ]  # fmt: skip
        mine = _subject_keys(obj)
        keys += [
            f"{namespace}/{p['metadata']['name']}"
            for p in self.informer(VMACCESSPOLICY).items(namespace)
            if p["metadata"]["name"] != md["name"] and mine & _subject_keys(p)
        ]
        return keys

    def _matcher(self, policy: JSON) -> Callable[[JSON], bool]:
        md = policy["metadata"]
        key = f"{md.get('namespace', '')}/{md['name']}"
        rv = str(md.get("generation") or md.get("resourceVersion") or "")
        cached = self._matchers.get(key)
        if cached is None or cached[0] != rv:
            cached = self._matchers[key] = (rv, access.reach_matcher(policy))
        return cached[1]

    def _policies_of_vm(self, etype: str, vm: JSON) -> list[str]:
        namespace, name = vm["metadata"].get("namespace", ""), vm["metadata"]["name"]
        keys = []
        for p in self.informer(VMACCESSPOLICY).items(namespace):
            key = f"{namespace}/{p['metadata']['name']}"
            if name in self._reach.get(key, ()) or (etype != DELETED and self._matcher(p)(vm)):
                keys.append(key)
        return keys

    def _policies_of_related(self, resource: tuple[str, str]) -> Callable[[str, JSON], list[str]]:
        def keys(_etype: str, obj: JSON) -> list[str]:
            namespace = obj["metadata"].get("namespace", "")
            named = access.related_vm(resource[0], resource[1], obj)
            policies = self.informer(VMACCESSPOLICY).items(namespace)
            if named is not None and named[0] == "vm":
                vm = self.informer(VM).get(named[1], namespace)
                policies = [
                    p for p in policies
                    if named[1] in self._reach.get(f"{namespace}/{p['metadata']['name']}", ())
                    or (vm is not None and self._matcher(p)(vm))
                ]  # fmt: skip
            return [f"{namespace}/{p['metadata']['name']}" for p in policies]

        return keys

    def _policy_of_rbac(self, kind: str) -> Callable[[str, JSON], list[str]]:
        def keys(etype: str, obj: JSON) -> list[str]:
            if etype != DELETED and self._ours(kind, obj):
                return []
            return _policy_of_rbac(etype, obj)

        return keys

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        policy = self.informer(VMACCESSPOLICY).get(name, namespace)
        if policy is None or policy["metadata"].get("deletionTimestamp"):
            self._reach.pop(key, None)
            await self._revoke(namespace, name)
            return None
        vms = self.informer(VM).items(namespace)
        related = {k: self.informer(res).items(namespace) for k, res in RELATED.items()}
        lookup = {
            (res.kind, o["metadata"]["name"]): o
            for res in (VMSNAPSHOT, VMBACKUP, VMBACKUPTRACKER)
            for o in self.informer(res).items(namespace)
        }
        others = self.informer(VMACCESSPOLICY).items(namespace)
        compiled = compile_policy(policy, vms, related, lookup, others)
        self._reach[key] = set(compiled.vms)
        written = await self._apply(ROLE, compiled.role, namespace)
        written = await self._apply(ROLEBINDING, compiled.binding, namespace) and written
        written = await self._write_status(policy, compiled) and written
        # a write refused as stale (this controller's cache behind its own last write, whose
        # event it does not queue): again, once the cache has caught up
        return None if written else Result.after(0.1)

    def _wrote(self, kind: str, obj: JSON) -> None:
        md = obj["metadata"]
        self._written[(kind, f"{md.get('namespace', '')}/{md['name']}")] = md["resourceVersion"]

    async def _apply(self, res: Resource, want: JSON, namespace: str) -> bool:
        """Makes the object say ``want``; False when a write was refused as stale."""
        name = want["metadata"]["name"]
        found = await self.client.find(res, name, namespace)  # fresh: the cache lags our writes
        if found is None:
            try:
                self._wrote(res.kind, await self.client.create(res, want, namespace))
            except Conflict:
                return False
            return True
        keys = ("rules",) if res is ROLE else ("roleRef", "subjects")
        md = found["metadata"]
        same_meta = (md.get("labels") or {}).get(access.POLICY_LABEL) == want["metadata"]["labels"][
            access.POLICY_LABEL
        ] and md.get("ownerReferences") == want["metadata"]["ownerReferences"]
        if same_meta and all(found.get(k) == want.get(k) for k in keys):
            return True
        if res is ROLEBINDING and found.get("roleRef") != want.get("roleRef"):
            # a binding's roleRef cannot change: it is made again
            with contextlib.suppress(NotFound):
                await self.client.delete(res, name, namespace)
            try:
                self._wrote(res.kind, await self.client.create(res, want, namespace))
            except Conflict:
                return False
            return True
        body = {**found, **{k: want.get(k) for k in keys}}
        body["metadata"] = {**md, "labels": {**(md.get("labels") or {}),
                                             **want["metadata"]["labels"]},
                            "ownerReferences": want["metadata"]["ownerReferences"]}  # fmt: skip
        try:
            self._wrote(res.kind, await self.client.replace(res, body))
        except NotFound:
            return False
        except Conflict:
            return False  # changed meanwhile (or our cache is behind): again
        return True

    async def _revoke(self, namespace: str, policy: str) -> None:
        for res in (ROLEBINDING, ROLE):
            found = await self.client.find(res, role_name(policy), namespace)
            if found is None:
                continue
            if (found["metadata"].get("labels") or {}).get(access.POLICY_LABEL) != policy:
                continue  # not ours: never touched
            with contextlib.suppress(NotFound):
                await self.client.delete(res, role_name(policy), namespace)

    async def _write_status(self, policy: JSON, compiled: Compiled) -> bool:
        md = policy["metadata"]
        old = policy.get("status") or {}
        rules = len(compiled.role.get("rules") or [])
        spec = policy.get("spec") or {}
        if str(spec.get("role") or "") not in access.ROLE_GRANTS:
            ready = {"type": "Ready", "status": "False", "reason": "InvalidSpec",
                     "message": f"spec.role: {spec.get('role')!r} is not one of "
                                f"{', '.join(access.ROLES)}"}  # fmt: skip
        elif not compiled.vms:
            ready = {"type": "Ready", "status": "True", "reason": "NothingReached",
                     "message": "the policy reaches no VM: its Role grants nothing"}  # fmt: skip
        else:
            ready = {"type": "Ready", "status": "True", "reason": "Compiled",
                     "message": f"{len(compiled.vms)} VMs reached, {rules} rules"}  # fmt: skip
        status = {
            "virtualMachines": list(compiled.vms),
            "reached": len(compiled.vms),
            "role": compiled.role["metadata"]["name"],
            "roleBinding": compiled.binding["metadata"]["name"],
            "rules": rules,
            "conflicts": list(compiled.conflicts),
            "observedGeneration": md.get("generation", 1),
            "conditions": merge_conditions(old.get("conditions"), [ready], timestamp()),
        }
        if status == old:
            return True
        body = {**policy, "status": status}
        try:
            written = await self.client.replace(VMACCESSPOLICY, body, subresource="status")
        except NotFound:
            return True  # deleted: its own event revokes
        except Conflict:
            return False
        self._wrote("VMAccessPolicy", written)
        return True


def _policy_of_rbac(_etype: str, obj: JSON) -> list[str]:
    policy = (obj["metadata"].get("labels") or {}).get(access.POLICY_LABEL)
    return [f"{obj['metadata'].get('namespace', '')}/{policy}"] if policy else []


__all__ = ["VMAccessPolicyController", "compile_policy", "reaches", "role_name"]
