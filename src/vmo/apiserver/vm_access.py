"""Admission of what names a VM (snapshots, restores, backups and their trackers, exports,
migrations, clones, BackupRestores): RBAC let the caller create that kind in the namespace, and
this check decides whether on *that* VM (``vmo.api.access``).

Allowed when the caller holds the kind's verb (``snapshot``, ``backup``, ``migrate``, ``clone``)
on ``kubevirt.io`` ``virtualmachines`` by the VM's name, or may ``update`` every VM of the
namespace (a namespace editor keeps what upstream KubeVirt lets it do). Refused with 403 and a
message naming the VM, the verb and the field that named it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmo.api import access
from vmo.api.types import JSON, ResourceType
from vmo.apiserver import objects as ob
from vmo.apiserver import rbac
from vmo.apiserver.authz import RbacAuthorization, user_info
from vmo.apiserver.errors import ApiError
from vmo.apiserver.registry import Registry

_LOOKUP = {
    "tracker": (access.BACKUP, "v1alpha1", "virtualmachinebackuptrackers", "VirtualMachineBackupTracker"),
    "snapshot": (access.SNAPSHOT, "v1beta1", "virtualmachinesnapshots", "VirtualMachineSnapshot"),
    "backup": (access.BACKUP, "v1alpha1", "virtualmachinebackups", "VirtualMachineBackup"),
}  # fmt: skip

_FIELD = {
    ("vmo.dev", "BackupRestore"): "spec.virtualMachine",
    (access.SNAPSHOT, "VirtualMachineRestore"): "spec.target.name",
    (access.KUBEVIRT, "VirtualMachineInstanceMigration"): "spec.vmiName",
}


@dataclass
class VMAccessAdmission:
    service: ob.ObjectService
    registry: Registry
    authz: RbacAuthorization

    def admit(self, rt: ResourceType, obj: JSON, old: JSON | None, caller: ob.Caller) -> None:
        if old is not None:
            return  # only a create names a VM anew (KubeVirt refuses changes of these specs)
        verb = access.required_vm_verb(rt.group, rt.kind)
        if verb is None:
            return
        namespace = str((obj.get("metadata") or {}).get("namespace") or "")
        vm = self._vm(namespace, access.named_vm(rt.group, rt.kind, obj))
        if not vm:
            return  # names no VM (an export of a bare claim) or one that is not there
        user = user_info(caller.name, caller.groups)
        named = rbac.RequestAttributes(user, verb, namespace, access.KUBEVIRT,
                                       resource="virtualmachines", name=vm)  # fmt: skip
        if self.authz.allowed(named).allowed:
            return
        editor = rbac.RequestAttributes(user, "update", namespace, access.KUBEVIRT,
                                        resource="virtualmachines")  # fmt: skip
        if self.authz.allowed(editor).allowed:
            return
        where = _FIELD.get((rt.group, rt.kind), "spec.source.name")
        raise ApiError(
            403,
            "Forbidden",
            f'{rt.plural}.{rt.group} is forbidden: User "{caller.name}" cannot {verb} '
            f'virtualmachine "{vm}" (named by {where}) in the namespace "{namespace}": '
            f"creating a {rt.kind} of a VM needs the {verb} verb on that VM "
            f"(a VMAccessPolicy role that includes it)",
            kind=rt.plural,
            group=rt.group,
        )

    def admit_policy(
        self, rt: ResourceType, obj: JSON, old: JSON | None, caller: ob.Caller
    ) -> None:
        """No escalation: whoever writes a VMAccessPolicy must hold what it grants now (its
        role's rules on the VMs it reaches and their disks), as RBAC's escalate check asks of a
        Role's author."""
        if (rt.group, rt.kind) != (access.GROUP, "VMAccessPolicy"):
            return
        md = obj.get("metadata") or {}
        if md.get("deletionTimestamp") or (old is not None and old.get("spec") == obj.get("spec")):
            return  # a status write, a finalizer going: nothing new is granted
        role = str((obj.get("spec") or {}).get("role") or "")
        if role not in access.ROLE_GRANTS:
            return  # the schema refuses it
        user = user_info(caller.name, caller.groups)
        if rbac.MASTERS_GROUP in user.groups:
            return  # holds everything
        namespace = str(md.get("namespace") or "")
        vm_rt = self.registry.lookup(access.KUBEVIRT, "v1", "virtualmachines")
        assert vm_rt is not None
        vms = [row.obj() for row in self.service.scan(vm_rt, namespace)]
        reached = [vm for vm in vms if access.reaches(obj, vm)]
        claims: set[str] = set()
        for vm in reached:
            claims |= access.vm_claims(vm)
        reach = access.Reach(
            tuple(sorted(v["metadata"]["name"] for v in reached)), tuple(sorted(claims))
        )
        rules = rbac.rules_from_json(access.rules_for(role, reach))
        authorizer = self.authz.loaded()
        causes = rbac.escalation_causes(user, authorizer, namespace, rules)
        if not causes:
            return
        _owned, errors = authorizer.policy_rules(user, namespace)
        name = str(md.get("name") or "")
        raise ApiError(
            403,
            "Forbidden",
            f'vmaccesspolicies.vmo.dev "{name}" is forbidden: a policy may grant only what its '
            f"author holds: {rbac.escalation_message(user, causes, errors)}",
            kind="vmaccesspolicies",
            group=access.GROUP,
            name=name,
        )

    def _vm(self, namespace: str, named: tuple[str, str] | None) -> str:
        """The VM's name, following a tracker, snapshot or backup the object names."""
        for _ in range(3):
            if named is None or not named[1]:
                return ""
            how, name = named
            if how == "vm":
                return name
            group, version, plural, kind = _LOOKUP[how]
            rt = self.registry.lookup(group, version, plural)
            found = self.service.find(rt, namespace, name) if rt is not None else None
            if found is None:
                return ""
            named = access.named_vm(group, kind, found)
        return ""


__all__ = ["VMAccessAdmission"]
