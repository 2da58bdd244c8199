"""Per-VM access: the VM roles of a ``vmo.dev/v1alpha1`` VMAccessPolicy, what each grants as
plain Kubernetes RBAC rules, folders, and the per-VM checks that RBAC alone cannot make.

Defined here, below every layer, because three parts read the same table: the access
controller (``vmo.controllers.access``) that compiles policies into Roles, the embedded API
server's admission, and the CLI that explains grants.

**What a role grants.** Every rule names its objects (``resourceNames``): the VMs a policy
reaches, and their VMIs (KubeVirt names a VMI after its VM); the DataVolumes and claims their
volumes use; and the snapshots, restores, exports, backups, migrations and clones that name
those VMs. A rule is never emitted with an empty name list, which RBAC would read as "every
name": a policy that reaches nothing grants nothing.

**Creating what names a VM.** RBAC cannot limit ``create`` by name (the object has none yet),
so a role that snapshots, backs up, migrates or clones grants ``create`` on that kind in the
namespace, and a custom verb on each VM it reaches (``snapshot``, ``backup``, ``migrate``,
``clone`` on ``kubevirt.io`` ``virtualmachines``, by name). Admission then allows such an object
only when its creator holds that verb on the VM it names, or may ``update`` every VM of the
namespace (a namespace editor, as KubeVirt's own ``kubevirt.io:edit`` is, keeps what upstream
lets it do). VMO's policies never grant the latter, so a grant on one VM never carries over to
another. (``required_vm_verb`` names the check; a ValidatingAdmissionPolicy with CEL
``authorizer`` checks does the same on a cluster.)

**Folders.** A VM's folder is its label ``vmo.dev/folder``. A label value cannot hold ``/``, so
the path ``prod/db`` is stored as ``prod.db``: folder names are letters, digits, ``-`` and
``_``, and the whole path fits a label value (63 characters). A policy on a folder reaches the
VMs in it and in every folder below it, as a vSphere permission propagates. Tags are labels
under ``tags.vmo.dev/``, selected as any label is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmo.api.selectors import selector_matches

JSON = dict[str, Any]

GROUP = "vmo.dev"
FOLDER_LABEL = "vmo.dev/folder"
TAG_PREFIX = "tags.vmo.dev/"
POLICY_LABEL = "vmo.dev/access-policy"  # on the Roles and RoleBindings a policy compiles to

KUBEVIRT = "kubevirt.io"
SUBRESOURCES = "subresources.kubevirt.io"
SNAPSHOT = "snapshot.kubevirt.io"
EXPORT = "export.kubevirt.io"
BACKUP = "backup.kubevirt.io"
CLONE = "clone.kubevirt.io"
CDI = "cdi.kubevirt.io"

ROLES = ("view", "operate", "console", "snapshot", "backup", "migrate", "edit", "admin")

# what a rule's names are: the VMs (and VMIs), their claims, or the objects of that resource that
# name those VMs; "create" rules carry no names (RBAC cannot limit a create by name)
VMS, CLAIMS, RELATED, UNNAMED = "vms", "claims", "related", "unnamed"


@dataclass(frozen=True)
class Grant:
    group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    names: str


def _g(group: str, resources: Iterable[str], verbs: Iterable[str], names: str) -> Grant:
    return Grant(group, tuple(resources), tuple(verbs), names)


# the objects that name a VM, by (group, resource): a role's RELATED rules list those of its VMs
RELATED_RESOURCES: tuple[tuple[str, str], ...] = (
    (SNAPSHOT, "virtualmachinesnapshots"),
    (SNAPSHOT, "virtualmachinerestores"),
    (EXPORT, "virtualmachineexports"),
    (BACKUP, "virtualmachinebackups"),
    (BACKUP, "virtualmachinebackuptrackers"),
    (KUBEVIRT, "virtualmachineinstancemigrations"),
    (CLONE, "virtualmachineclones"),
    (GROUP, "backuprestores"),
)

_VIEW = (
    _g(KUBEVIRT, ["virtualmachines", "virtualmachineinstances"], ["get"], VMS),
    _g(SUBRESOURCES, ["virtualmachines/expand-spec", "virtualmachineinstances/guestosinfo",
                      "virtualmachineinstances/filesystemlist",
                      "virtualmachineinstances/userlist"], ["get"], VMS),
    _g(CDI, ["datavolumes"], ["get"], CLAIMS),
    _g("", ["persistentvolumeclaims"], ["get"], CLAIMS),
    *(_g(group, [resource], ["get"], RELATED) for group, resource in RELATED_RESOURCES),
)  # fmt: skip
_OPERATE = (
    _g(SUBRESOURCES, ["virtualmachines/start", "virtualmachines/stop", "virtualmachines/restart",
                      "virtualmachineinstances/pause", "virtualmachineinstances/unpause",
                      "virtualmachineinstances/softreboot"], ["update"], VMS),
)  # fmt: skip
_CONSOLE = (
    _g(SUBRESOURCES, ["virtualmachineinstances/console", "virtualmachineinstances/vnc",
                      "virtualmachineinstances/vnc/screenshot",
                      "virtualmachineinstances/portforward", "virtualmachines/portforward"],
       ["get"], VMS),
)  # fmt: skip
_SNAPSHOT = (
    _g(SNAPSHOT, ["virtualmachinesnapshots", "virtualmachinerestores"], ["create"], UNNAMED),
    _g(SNAPSHOT, ["virtualmachinesnapshots"], ["delete"], RELATED),
    _g(SNAPSHOT, ["virtualmachinerestores"], ["delete"], RELATED),
    _g(KUBEVIRT, ["virtualmachines"], ["snapshot"], VMS),
)
_BACKUP = (
    _g(BACKUP, ["virtualmachinebackups", "virtualmachinebackuptrackers"], ["create"], UNNAMED),
    _g(EXPORT, ["virtualmachineexports"], ["create"], UNNAMED),
    _g(GROUP, ["backuprestores"], ["create"], UNNAMED),
    _g(BACKUP, ["virtualmachinebackups"], ["delete"], RELATED),
    _g(BACKUP, ["virtualmachinebackuptrackers"], ["delete"], RELATED),
    _g(EXPORT, ["virtualmachineexports"], ["delete"], RELATED),
    _g(GROUP, ["backuprestores"], ["delete"], RELATED),
    _g(KUBEVIRT, ["virtualmachines"], ["backup"], VMS),
)
_MIGRATE = (
    _g(KUBEVIRT, ["virtualmachineinstancemigrations"], ["create"], UNNAMED),
    _g(KUBEVIRT, ["virtualmachineinstancemigrations"], ["delete"], RELATED),
    _g(SUBRESOURCES, ["virtualmachines/migrate"], ["update"], VMS),
    _g(KUBEVIRT, ["virtualmachines"], ["migrate"], VMS),
)
_EDIT = (
    _g(KUBEVIRT, ["virtualmachines", "virtualmachineinstances"], ["update", "patch"], VMS),
    _g(SUBRESOURCES, ["virtualmachines/addvolume", "virtualmachines/removevolume",
                      "virtualmachineinstances/addvolume", "virtualmachineinstances/removevolume",
                      "virtualmachines/memorydump", "virtualmachines/removememorydump"],
       ["update"], VMS),
    _g(CDI, ["datavolumes"], ["update", "patch"], CLAIMS),
    _g("", ["persistentvolumeclaims"], ["update", "patch"], CLAIMS),
    _g(CLONE, ["virtualmachineclones"], ["create"], UNNAMED),
    _g(CLONE, ["virtualmachineclones"], ["delete"], RELATED),
    _g(KUBEVIRT, ["virtualmachines"], ["clone"], VMS),
)  # fmt: skip
_ADMIN = (
    _g(KUBEVIRT, ["virtualmachines", "virtualmachineinstances"], ["delete"], VMS),
    _g(CDI, ["datavolumes"], ["delete"], CLAIMS),
    _g("", ["persistentvolumeclaims"], ["delete"], CLAIMS),
)

ROLE_GRANTS: dict[str, tuple[Grant, ...]] = {
    "view": _VIEW,
    "operate": _VIEW + _OPERATE,
    "console": _VIEW + _CONSOLE,
    "snapshot": _VIEW + _SNAPSHOT,
    "backup": _VIEW + _BACKUP,
    "migrate": _VIEW + _MIGRATE,
    "edit": _VIEW + _OPERATE + _CONSOLE + _SNAPSHOT + _EDIT,
    "admin": _VIEW + _OPERATE + _CONSOLE + _SNAPSHOT + _BACKUP + _MIGRATE + _EDIT + _ADMIN,
}

ROLE_SUMMARY = {
    "view": "read the VM, its VMI, disks, snapshots, backups and migrations",
    "operate": "view, and start, stop, restart, pause, unpause, soft-reboot",
    "console": "view, and the serial console, VNC, screenshots, port-forward and ssh",
    "snapshot": "view, and take, restore and delete snapshots",
    "backup": "view, and back up, export and restore from backup",
    "migrate": "view, and live-migrate",
    "edit": "operate, console and snapshot, and change the VM, hot-plug disks, clone",
    "admin": "everything above, and delete the VM and its disks",
}


def includes(role: str, other: str) -> bool:
    """Whether ``role`` grants everything ``other`` does."""
    return set(ROLE_GRANTS[other]) <= set(ROLE_GRANTS[role])


# --- compiling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reach:
    """What one policy reaches: VM names, their claims, and the related objects' names by
    (group, resource)."""

    vms: tuple[str, ...]
    claims: tuple[str, ...] = ()
    related: Mapping[tuple[str, str], tuple[str, ...]] | None = None


def rules_for(role: str, reach: Reach) -> list[JSON]:
    """The RBAC rules that give ``role`` on what ``reach`` names; none when it names no VM."""
    if not reach.vms:
        return []
    rules: list[JSON] = []
    related = reach.related or {}
    for grant in ROLE_GRANTS[role]:
        if grant.names == UNNAMED:
            rules.append(_rule(grant.group, grant.resources, grant.verbs, ()))
            continue
        if grant.names == RELATED:
            for resource in grant.resources:
                names = related.get((grant.group, resource), ())
                if names:
                    rules.append(_rule(grant.group, (resource,), grant.verbs, names))
            continue
        names = reach.vms if grant.names == VMS else reach.claims
        if names:
            rules.append(_rule(grant.group, grant.resources, grant.verbs, names))
    return rules


def _rule(group: str, resources: Sequence[str], verbs: Sequence[str], names: Sequence[str]) -> JSON:
    rule: JSON = {"apiGroups": [group], "resources": list(resources), "verbs": list(verbs)}
    if names:
        rule["resourceNames"] = sorted(set(names))
    return rule


def vm_claims(vm: Mapping[str, Any]) -> set[str]:
    """The DataVolumes and claims a VM's volumes name (its templates' included)."""
    spec = vm.get("spec") or {}
    names = {
        str((t.get("metadata") or {}).get("name"))
        for t in spec.get("dataVolumeTemplates") or []
        if (t.get("metadata") or {}).get("name")
    }
    for volume in ((spec.get("template") or {}).get("spec") or {}).get("volumes") or []:
        for key, field in (("dataVolume", "name"), ("persistentVolumeClaim", "claimName")):
            name = (volume.get(key) or {}).get(field)
            if name:
                names.add(str(name))
    return names


def reach_matcher(policy: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    """``reaches`` for one policy, its names, selector and folder parsed once (what a compile
    over thousands of VMs, or an event tested against every policy, calls)."""
    pick = (policy.get("spec") or {}).get("virtualMachines") or {}
    names = set(pick.get("names") or [])
    selector, folder = pick.get("selector"), pick.get("folder")
    try:
        prefix = folder_label(str(folder)) if folder else None
    except FolderError:
        return lambda vm: (vm.get("metadata") or {}).get("name") in names
    if selector is None and not folder:
        return lambda vm: (vm.get("metadata") or {}).get("name") in names

    def matches(vm: Mapping[str, Any]) -> bool:
        md = vm.get("metadata") or {}
        if md.get("name") in names:
            return True
        labels = md.get("labels") or {}
        if selector is not None and not selector_matches(labels, selector):
            return False
        if prefix is not None:
            value = str(labels.get(FOLDER_LABEL) or "")
            return value == prefix or value.startswith(prefix + ".")
        return True

    return matches


def reaches(policy: Mapping[str, Any], vm: Mapping[str, Any]) -> bool:
    """Whether a VMAccessPolicy reaches ``vm``: listed by name, or matching its selector and
    inside its folder (each where given; a policy that gives neither reaches only its names)."""
    return reach_matcher(policy)(vm)


# --- what an object names: its VM ----------------------------------------------------------------


def named_vm(group: str, kind: str, obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(how the object names a VM, directly, as a VM name or as another object to look up);
    ("vm", name) for a VM, ("snapshot" | "backup" | "tracker", name) when its VM is that
    object's. None when the object names no VM (an export of a bare PVC, say)."""
    spec = obj.get("spec") or {}
    source = spec.get("source") or {}
    if (group, kind) == (SNAPSHOT, "VirtualMachineSnapshot"):
        return (
            ("vm", str(source.get("name") or ""))
            if source.get("kind") == "VirtualMachine"
            else None
        )
    if (group, kind) == (SNAPSHOT, "VirtualMachineRestore"):
        target = spec.get("target") or {}
        return ("vm", str(target.get("name") or ""))
    if (group, kind) == (BACKUP, "VirtualMachineBackupTracker"):
        return ("vm", str(source.get("name") or ""))
    if (group, kind) == (BACKUP, "VirtualMachineBackup"):
        if source.get("kind") == "VirtualMachineBackupTracker":
            return ("tracker", str(source.get("name") or ""))
        return ("vm", str(source.get("name") or ""))
    if (group, kind) == (EXPORT, "VirtualMachineExport"):
        by_kind = {"VirtualMachine": "vm", "VirtualMachineSnapshot": "snapshot",
                   "VirtualMachineBackup": "backup"}  # fmt: skip
        how = by_kind.get(str(source.get("kind") or ""))
        return (how, str(source.get("name") or "")) if how else None
    if (group, kind) == (KUBEVIRT, "VirtualMachineInstanceMigration"):
        return ("vm", str(spec.get("vmiName") or ""))
    if (group, kind) == (CLONE, "VirtualMachineClone"):
        if source.get("kind") == "VirtualMachineSnapshot":
            return ("snapshot", str(source.get("name") or ""))
        return ("vm", str(source.get("name") or ""))
    if (group, kind) == (GROUP, "BackupRestore"):
        return ("vm", str(spec.get("virtualMachine") or ""))
    return None


# the custom verb on the VM that creating each kind needs
REQUIRED_VERB: dict[tuple[str, str], str] = {
    (SNAPSHOT, "VirtualMachineSnapshot"): "snapshot",
    (SNAPSHOT, "VirtualMachineRestore"): "snapshot",
    (BACKUP, "VirtualMachineBackup"): "backup",
    (BACKUP, "VirtualMachineBackupTracker"): "backup",
    (EXPORT, "VirtualMachineExport"): "backup",
    (GROUP, "BackupRestore"): "backup",
    (KUBEVIRT, "VirtualMachineInstanceMigration"): "migrate",
    (CLONE, "VirtualMachineClone"): "clone",
}


def required_vm_verb(group: str, kind: str) -> str | None:
    return REQUIRED_VERB.get((group, kind))


def related_vm(group: str, resource: str, obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """``named_vm`` for an object known by its resource (what a Role's RELATED rules list)."""
    kinds = {
        "virtualmachinesnapshots": "VirtualMachineSnapshot",
        "virtualmachinerestores": "VirtualMachineRestore",
        "virtualmachineexports": "VirtualMachineExport",
        "virtualmachinebackups": "VirtualMachineBackup",
        "virtualmachinebackuptrackers": "VirtualMachineBackupTracker",
        "virtualmachineinstancemigrations": "VirtualMachineInstanceMigration",
        "virtualmachineclones": "VirtualMachineClone",
        "backuprestores": "BackupRestore",
    }
    return named_vm(group, kinds.get(resource, ""), obj)


# --- folders -------------------------------------------------------------------------------------

_FOLDER_PART = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?$")


class FolderError(ValueError):
    pass


def folder_parts(path: str) -> list[str]:
    """``prod/db`` (or ``/prod/db/``) as ["prod", "db"]; FolderError naming what is wrong."""
    parts = [p for p in path.strip().split("/") if p]
    for part in parts:
        if not _FOLDER_PART.match(part):
            raise FolderError(
                f"folder name {part!r}: letters, digits, '-' and '_' only, starting and ending "
                "with a letter or digit"
            )
    if len(".".join(parts)) > 63:
        raise FolderError(f"folder path {path!r} is longer than a label value (63 characters)")
    return parts


def folder_label(path: str) -> str | None:
    """The ``vmo.dev/folder`` label value for ``path`` (None: the root, no label)."""
    parts = folder_parts(path)
    return ".".join(parts) if parts else None


def folder_path(vm: Mapping[str, Any]) -> str:
    """The VM's folder as a path (``prod/db``), "" at the root."""
    value = ((vm.get("metadata") or {}).get("labels") or {}).get(FOLDER_LABEL) or ""
    return "/".join(p for p in str(value).split(".") if p)


def in_folder(vm: Mapping[str, Any], path: str) -> bool:
    """Whether the VM is in ``path`` or in a folder below it (the root holds every VM)."""
    want = folder_parts(path)
    have = [p for p in folder_path(vm).split("/") if p]
    return have[: len(want)] == want


__all__ = [
    "FOLDER_LABEL",
    "POLICY_LABEL",
    "RELATED_RESOURCES",
    "ROLES",
    "ROLE_GRANTS",
    "ROLE_SUMMARY",
    "TAG_PREFIX",
    "FolderError",
    "Grant",
    "Reach",
    "folder_label",
    "folder_parts",
    "folder_path",
    "in_folder",
    "includes",
    "named_vm",
    "reach_matcher",
    "reaches",
    "related_vm",
    "required_vm_verb",
    "rules_for",
    "vm_claims",
]
