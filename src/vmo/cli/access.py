"""``vmo vm ls``, ``vmo folder ls|mv`` and ``vmo access who-can|explain|review``: VMs, folders
and who may do what to them.

Lists show only what the caller may ``get``: a user whom RBAC denies ``list`` (every user of a
VMAccessPolicy) is answered from a SelfSubjectRulesReview, one ``get`` per VM name it grants.
``who-can`` asks the API server's own authorizer (a SubjectAccessReview per subject any binding
of the namespace names), so its answer is RBAC's, not a model of it; ``explain`` and ``review``
read the policies' status and the Roles and RoleBindings they compile to.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from vmo.api import access
from vmo.client import ROLE, ROLEBINDING, VM, ApiStatusError, Client, Credentials, Resource

JSON = dict[str, Any]
AUTHZ = "authorization.k8s.io"
SAR = Resource(AUTHZ, "v1", "subjectaccessreviews", "SubjectAccessReview", namespaced=False)
SSRR = Resource(AUTHZ, "v1", "selfsubjectrulesreviews", "SelfSubjectRulesReview", namespaced=False)
CLUSTERROLEBINDING = Resource(
    "rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
    namespaced=False,
)  # fmt: skip
POLICY = Resource("vmo.dev", "v1alpha1", "vmaccesspolicies", "VMAccessPolicy")

# who-can's verbs: what a user says -> (verb, API group, resource, subresource)
VM_VERBS: dict[str, tuple[str, str, str, str]] = {
    "get": ("get", access.KUBEVIRT, "virtualmachines", ""),
    "update": ("update", access.KUBEVIRT, "virtualmachines", ""),
    "delete": ("delete", access.KUBEVIRT, "virtualmachines", ""),
    "start": ("update", access.SUBRESOURCES, "virtualmachines", "start"),
    "stop": ("update", access.SUBRESOURCES, "virtualmachines", "stop"),
    "restart": ("update", access.SUBRESOURCES, "virtualmachines", "restart"),
    "pause": ("update", access.SUBRESOURCES, "virtualmachineinstances", "pause"),
    "unpause": ("update", access.SUBRESOURCES, "virtualmachineinstances", "unpause"),
    "soft-reboot": ("update", access.SUBRESOURCES, "virtualmachineinstances", "softreboot"),
    "console": ("get", access.SUBRESOURCES, "virtualmachineinstances", "console"),
    "vnc": ("get", access.SUBRESOURCES, "virtualmachineinstances", "vnc"),
    "screenshot": ("get", access.SUBRESOURCES, "virtualmachineinstances", "vnc/screenshot"),
    "port-forward": ("get", access.SUBRESOURCES, "virtualmachineinstances", "portforward"),
    "ssh": ("get", access.SUBRESOURCES, "virtualmachines", "portforward"),
    "snapshot": ("snapshot", access.KUBEVIRT, "virtualmachines", ""),
    "backup": ("backup", access.KUBEVIRT, "virtualmachines", ""),
    "migrate": ("migrate", access.KUBEVIRT, "virtualmachines", ""),
    "clone": ("clone", access.KUBEVIRT, "virtualmachines", ""),
    "addvolume": ("update", access.SUBRESOURCES, "virtualmachines", "addvolume"),
}


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200)


# --- what the caller may see ---------------------------------------------------------------------


async def visible_vms(client: Client, namespace: str) -> list[JSON]:
    """The namespace's VMs the caller may ``get``: a list when RBAC allows it, else one get per
    name a SelfSubjectRulesReview says it may get."""
    try:
        vms, _ = await client.list(VM, namespace)
        return sorted(vms, key=lambda v: str(v["metadata"]["name"]))
    except ApiStatusError as exc:
        if exc.code != 403:
            raise
    review = await client.create(SSRR, {"spec": {"namespace": namespace}})
    names: set[str] = set()
    for rule in (review.get("status") or {}).get("resourceRules") or []:
        groups, resources = rule.get("apiGroups") or [], rule.get("resources") or []
        if (
            ("get" in rule.get("verbs", []) or "*" in rule.get("verbs", []))
            and (access.KUBEVIRT in groups or "*" in groups)
            and ("virtualmachines" in resources or "*" in resources)
        ):
            names.update(rule.get("resourceNames") or [])
    found = []
    for name in sorted(names):
        try:
            found.append(await client.get(VM, name, namespace))
        except ApiStatusError as exc:
            if exc.code not in (403, 404):
                raise
    return found


# --- folders -------------------------------------------------------------------------------------


def folder_tree(vms: Iterable[JSON]) -> dict[str, list[str]]:
    """Folder path -> the VMs directly in it; every folder on the way is listed ("" the root)."""
    tree: dict[str, list[str]] = {"": []}
    for vm in vms:
        path = access.folder_path(vm)
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            tree.setdefault("/".join(parts[:i]), [])
        tree[path].append(str(vm["metadata"]["name"]))
    return {k: sorted(v) for k, v in sorted(tree.items())}


async def _folder_ls(client: Client, namespace: str, path: str) -> int:
    try:
        access.folder_parts(path)
    except access.FolderError as exc:
        print(f"vmo folder ls: {exc}", file=sys.stderr)
        return 2
    want = "/".join(p for p in path.split("/") if p)
    tree = folder_tree(await visible_vms(client, namespace))
    shown = {k: v for k, v in tree.items() if k == want or k.startswith(f"{want}/") or not want}
    if not shown:
        print(f"vmo folder ls: no folder {want} in namespace {namespace}", file=sys.stderr)
        return 1
    root = Tree(f"[bold]{want or '/'}[/] ({namespace})")
    nodes = {want: root}
    for folder, names in shown.items():
        if folder != want:
            parent = folder.rpartition("/")[0]
            nodes[folder] = nodes.get(parent, root).add(f"[bold]{folder.rpartition('/')[2]}/[/]")
        for name in names:
            nodes[folder].add(name)
    _console().print(root)
    return 0


async def _folder_mv(client: Client, namespace: str, vm: str, path: str) -> int:
    try:
        label = access.folder_label(path)
    except access.FolderError as exc:
        print(f"vmo folder mv: {exc}", file=sys.stderr)
        return 2
    patch = {"metadata": {"labels": {access.FOLDER_LABEL: label}}}
    try:
        await client.patch(VM, vm, patch, namespace)
    except ApiStatusError as exc:
        print(f"vmo folder mv: {exc.status.get('message') or exc}", file=sys.stderr)
        return 1
    print(f"virtualmachine/{vm} moved to /{'/'.join(access.folder_parts(path))}")
    return 0


# --- tags ----------------------------------------------------------------------------------------

_TAG = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


async def _tag(client: Client, namespace: str, vm: str, tags: list[str], *, remove: bool) -> int:
    bad = [t for t in tags if not _TAG.match(t)]
    if bad:
        print(f"vmo tag: {', '.join(bad)}: a tag is a label name (letters, digits, '-', '_', '.', "
              "at most 63)", file=sys.stderr)  # fmt: skip
        return 2
    labels = {f"{access.TAG_PREFIX}{t}": None if remove else "" for t in tags}
    try:
        await client.patch(VM, vm, {"metadata": {"labels": labels}}, namespace)
    except ApiStatusError as exc:
        print(f"vmo tag: {exc.status.get('message') or exc}", file=sys.stderr)
        return 1
    found = await client.get(VM, vm, namespace)
    now = sorted(k.removeprefix(access.TAG_PREFIX) for k in found["metadata"].get("labels") or {}
                 if k.startswith(access.TAG_PREFIX))  # fmt: skip
    print(f"virtualmachine/{vm} tags: {', '.join(now) or '(none)'}")
    return 0


# --- who can, explain, review ---------------------------------------------------------------------


def _binding_subjects(bindings: Iterable[JSON], namespace: str) -> set[tuple[str, str]]:
    found = set()
    for binding in bindings:
        for s in binding.get("subjects") or []:
            if s.get("kind") == "ServiceAccount":
                ns = s.get("namespace") or binding["metadata"].get("namespace") or namespace
                found.add(("ServiceAccount", f"{ns}/{s['name']}"))
            elif s.get("kind") in ("User", "Group"):
                found.add((str(s["kind"]), str(s["name"])))
    return found


async def who_can(client: Client, namespace: str, verb: str, vm: str) -> list[tuple[str, str]]:
    """The subjects RBAC lets do ``verb`` to ``vm``: every subject of a binding that applies in
    the namespace, asked of the authorizer one by one."""
    kverb, group, resource, sub = VM_VERBS[verb]
    bindings, _ = await client.list(ROLEBINDING, namespace)
    cluster, _ = await client.list(CLUSTERROLEBINDING)
    allowed = []
    for kind, name in sorted(_binding_subjects([*bindings, *cluster], namespace)):
        spec: JSON = {"resourceAttributes": {"namespace": namespace, "verb": kverb,
                                             "group": group, "resource": resource,
                                             "subresource": sub, "name": vm}}  # fmt: skip
        if kind == "User":
            spec["user"] = name
        elif kind == "Group":
            spec["groups"] = [name]
        else:
            sa_ns, _, sa = name.partition("/")
            spec["user"] = f"system:serviceaccount:{sa_ns}:{sa}"
            spec["groups"] = ["system:serviceaccounts", f"system:serviceaccounts:{sa_ns}"]
        answer = await client.create(SAR, {"spec": spec})
        if (answer.get("status") or {}).get("allowed"):
            allowed.append((kind, name))
    return allowed


def _names_vm(rule: JSON, vm: str) -> bool:
    return vm in (rule.get("resourceNames") or []) and "virtualmachines" in (
        rule.get("resources") or []
    )


async def explain(
    client: Client, namespace: str, user: str, groups: list[str], vm: str
) -> list[str]:
    """How ``user`` (in ``groups``) reaches ``vm``: each policy -> Role -> RoleBinding, and the
    namespace-wide bindings that name it."""
    lines = []
    policies, _ = await client.list(POLICY, namespace)
    subjects = {("User", user), *(("Group", g) for g in groups)}
    for p in sorted(policies, key=lambda x: str(x["metadata"]["name"])):
        status, spec = p.get("status") or {}, p.get("spec") or {}
        mine = {(s.get("kind"), s.get("name")) for s in spec.get("subjects") or []} & subjects
        if not mine or vm not in (status.get("virtualMachines") or []):
            continue
        pick = spec.get("virtualMachines") or {}
        how = ("by name" if vm in (pick.get("names") or []) else
               f"in folder {pick['folder']}" if pick.get("folder") else "by its labels")  # fmt: skip
        who = ", ".join(f"{k} {n}" for k, n in sorted(mine))
        role = await client.find(ROLE, str(status.get("role")), namespace)
        rules = [r for r in (role or {}).get("rules") or [] if _names_vm(r, vm)]
        verbs = sorted({v for r in rules for v in r.get("verbs") or []})
        lines.append(
            f"VMAccessPolicy {p['metadata']['name']} (role {spec.get('role')}, reaches {vm} "
            f"{how}) -> Role {status.get('role')} ({len(rules)} rules on {vm}: "
            f"{', '.join(verbs) or 'none'}) -> RoleBinding {status.get('roleBinding')} ({who})"
        )
    bindings, _ = await client.list(ROLEBINDING, namespace)
    for b in sorted(bindings, key=lambda x: str(x["metadata"]["name"])):
        if (b["metadata"].get("labels") or {}).get(access.POLICY_LABEL):
            continue
        named = {(s.get("kind"), s.get("name")) for s in b.get("subjects") or []} & subjects
        if named:
            ref = b.get("roleRef") or {}
            lines.append(
                f"RoleBinding {b['metadata']['name']} -> {ref.get('kind')} {ref.get('name')} "
                "(namespace-wide, every VM)"
            )
    return lines


async def review(client: Client, namespace: str) -> dict[str, list[str]]:
    """Every VM of the namespace -> each policy grant that reaches it."""
    vms, _ = await client.list(VM, namespace)
    policies, _ = await client.list(POLICY, namespace)
    grants: dict[str, list[str]] = {str(v["metadata"]["name"]): [] for v in vms}
    for p in sorted(policies, key=lambda x: str(x["metadata"]["name"])):
        spec = p.get("spec") or {}
        who = ", ".join(f"{s.get('kind')} {s.get('name')}" for s in spec.get("subjects") or [])
        for name in (p.get("status") or {}).get("virtualMachines") or []:
            grants.setdefault(name, []).append(
                f"{spec.get('role')}: {who} ({p['metadata']['name']})"
            )
    return dict(sorted(grants.items()))


# --- the commands --------------------------------------------------------------------------------


def add_access_commands(
    sub: Any,
    creds_of: Callable[[argparse.Namespace], Credentials],
    namespace_of: Callable[[argparse.Namespace, Credentials], str],
) -> None:
    def common(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("-n", "--namespace", default="")
        cmd.add_argument("--kubeconfig", default="")

    vm = sub.add_parser("vm", help="virtual machines").add_subparsers(
        dest="vm_command", required=True
    )
    ls = vm.add_parser("ls", help="the VMs you may see, with their folder and status")
    common(ls)
    ls.set_defaults(func=lambda a: _run(a, creds_of, namespace_of, _vm_ls))
    folder = sub.add_parser("folder", help="VM folders (the vmo.dev/folder label)")
    fverbs = folder.add_subparsers(dest="folder_command", required=True)
    fls = fverbs.add_parser("ls", help="the folder tree and the VMs in it")
    common(fls)
    fls.add_argument("path", nargs="?", default="")
    fls.set_defaults(func=lambda a: _run(a, creds_of, namespace_of,
                                         lambda c, ns: _folder_ls(c, ns, a.path)))  # fmt: skip
    mv = fverbs.add_parser("mv", help="move a VM into a folder (/ is the root)")
    common(mv)
    mv.add_argument("vm")
    mv.add_argument("path")
    mv.set_defaults(func=lambda a: _run(a, creds_of, namespace_of,
                                        lambda c, ns: _folder_mv(c, ns, a.vm, a.path)))  # fmt: skip
    tag = sub.add_parser("tag", help="VM tags (labels under tags.vmo.dev/)")
    tverbs = tag.add_subparsers(dest="tag_command", required=True)
    for verb, remove in (("add", False), ("rm", True)):
        cmd = tverbs.add_parser(verb, help=f"{verb} tags of a VM")
        common(cmd)
        cmd.add_argument("vm")
        cmd.add_argument("tags", nargs="+")
        cmd.set_defaults(func=lambda a, remove=remove: _run(
            a, creds_of, namespace_of, lambda c, ns: _tag(c, ns, a.vm, a.tags, remove=remove)))  # fmt: skip
    acc = sub.add_parser("access", help="who may do what to which VM")
    averbs = acc.add_subparsers(dest="access_command", required=True)
    who = averbs.add_parser("who-can", help="the subjects RBAC lets do VERB to VM")
    common(who)
    who.add_argument("verb", choices=sorted(VM_VERBS))
    who.add_argument("vm")
    who.set_defaults(func=lambda a: _run(a, creds_of, namespace_of, lambda c, ns: _who(c, ns, a)))
    exp = averbs.add_parser("explain", help="how USER reaches VM: policy -> Role -> RoleBinding")
    common(exp)
    exp.add_argument("user")
    exp.add_argument("vm")
    exp.add_argument("--group", action="append", default=[], help="a group of the user")
    exp.set_defaults(
        func=lambda a: _run(a, creds_of, namespace_of, lambda c, ns: _explain(c, ns, a))
    )
    rev = averbs.add_parser("review", help="every grant that reaches each VM")
    common(rev)
    rev.set_defaults(func=lambda a: _run(a, creds_of, namespace_of, _review))


def _run(
    args: argparse.Namespace,
    creds_of: Callable[[argparse.Namespace], Credentials],
    namespace_of: Callable[[argparse.Namespace, Credentials], str],
    action: Callable[[Client, str], Any],
) -> int:
    creds = creds_of(args)
    namespace = namespace_of(args, creds)

    async def go() -> int:
        async with Client(creds) as client:
            try:
                return int(await action(client, namespace))
            except ApiStatusError as exc:
                print(f"vmo {args.command}: {exc.status.get('message') or exc}", file=sys.stderr)
                return 1

    return asyncio.run(go())


async def _vm_ls(client: Client, namespace: str) -> int:
    table = Table("NAME", "FOLDER", "STATUS", "TAGS", box=None)
    for vm in await visible_vms(client, namespace):
        labels = vm["metadata"].get("labels") or {}
        tags = ",".join(sorted(k.removeprefix(access.TAG_PREFIX) for k in labels
                               if k.startswith(access.TAG_PREFIX)))  # fmt: skip
        table.add_row(str(vm["metadata"]["name"]), "/" + access.folder_path(vm),
                      str((vm.get("status") or {}).get("printableStatus") or ""), tags)  # fmt: skip
    _console().print(table)
    return 0


async def _who(client: Client, namespace: str, args: argparse.Namespace) -> int:
    found = await who_can(client, namespace, args.verb, args.vm)
    table = Table("KIND", "NAME", box=None)
    for kind, name in found:
        table.add_row(kind, name)
    _console().print(table)
    return 0


async def _explain(client: Client, namespace: str, args: argparse.Namespace) -> int:
    lines = await explain(client, namespace, args.user, list(args.group), args.vm)
    if not lines:
        print(f"{args.user} reaches {args.vm} through no policy or binding of {namespace}")
        return 1
    for line in lines:
        print(line)
    return 0


async def _review(client: Client, namespace: str) -> int:
    table = Table("VM", "GRANTS", box=None)
    for vm, grants in (await review(client, namespace)).items():
        table.add_row(vm, "\n".join(grants) or "-")
    _console().print(table)
    return 0


__all__ = [
    "VM_VERBS",
    "add_access_commands",
    "explain",
    "folder_tree",
    "review",
    "visible_vms",
    "who_can",
]
