"""Per-VM access policies compiled into plain RBAC, judged by the API server's own authorizer.

The oracle is the embedded API server's RBAC (SubjectAccessReview over HTTP, and real requests
with each user's token): the table below says, independently of ``vmo.api.access``, what each
VM role must and must not allow, on the VM the policy reaches and on one it does not.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Api, make_user
from vmo.api import access, quota
from vmo.client import Client, load_kubeconfig
from vmo.controllers.access.crds import access_crds
from vmo.controllers.access.policy import VMAccessPolicyController, compile_policy, reaches
from vmo.controllers.access.quota import VMQuotaController
from vmo.controllers.crds import install
from vmo.runtime import Manager
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
NS = "access-e2e"
SUB = "subresources.kubevirt.io"
KV = "kubevirt.io"
POLICIES = f"/apis/vmo.dev/v1alpha1/namespaces/{NS}/vmaccesspolicies"
VMS = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines"
MERGE = "application/merge-patch+json"

# --- the table: (action, verb, group, resource, subresource) -----------------------------------

ACTIONS: list[tuple[str, str, str, str, str]] = [
    ("get vm", "get", KV, "virtualmachines", ""),
    ("get vmi", "get", KV, "virtualmachineinstances", ""),
    ("guest os info", "get", SUB, "virtualmachineinstances", "guestosinfo"),
    ("filesystems", "get", SUB, "virtualmachineinstances", "filesystemlist"),
    ("users", "get", SUB, "virtualmachineinstances", "userlist"),
    ("expand spec", "get", SUB, "virtualmachines", "expand-spec"),
    ("start", "update", SUB, "virtualmachines", "start"),
    ("stop", "update", SUB, "virtualmachines", "stop"),
    ("restart", "update", SUB, "virtualmachines", "restart"),
    ("pause", "update", SUB, "virtualmachineinstances", "pause"),
    ("unpause", "update", SUB, "virtualmachineinstances", "unpause"),
    ("soft reboot", "update", SUB, "virtualmachineinstances", "softreboot"),
    ("console", "get", SUB, "virtualmachineinstances", "console"),
    ("vnc", "get", SUB, "virtualmachineinstances", "vnc"),
    ("screenshot", "get", SUB, "virtualmachineinstances", "vnc/screenshot"),
    ("port-forward", "get", SUB, "virtualmachineinstances", "portforward"),
    ("vm port-forward (ssh)", "get", SUB, "virtualmachines", "portforward"),
    ("snapshot verb", "snapshot", KV, "virtualmachines", ""),
    ("backup verb", "backup", KV, "virtualmachines", ""),
    ("migrate verb", "migrate", KV, "virtualmachines", ""),
    ("migrate subresource", "update", SUB, "virtualmachines", "migrate"),
    ("clone verb", "clone", KV, "virtualmachines", ""),
    ("update vm", "update", KV, "virtualmachines", ""),
    ("patch vm", "patch", KV, "virtualmachines", ""),
    ("add volume", "update", SUB, "virtualmachines", "addvolume"),
    ("remove volume", "update", SUB, "virtualmachines", "removevolume"),
    ("memory dump", "update", SUB, "virtualmachines", "memorydump"),
    ("delete vm", "delete", KV, "virtualmachines", ""),
    ("delete vmi", "delete", KV, "virtualmachineinstances", ""),
    ("get disk", "get", "cdi.kubevirt.io", "datavolumes", ""),
    ("get claim", "get", "", "persistentvolumeclaims", ""),
    ("update disk", "update", "cdi.kubevirt.io", "datavolumes", ""),
    ("delete disk", "delete", "cdi.kubevirt.io", "datavolumes", ""),
    ("delete claim", "delete", "", "persistentvolumeclaims", ""),
    ("get secret", "get", "", "secrets", ""),
    ("list secrets", "list", "", "secrets", ""),
]

VIEW = {"get vm", "get vmi", "guest os info", "filesystems", "users", "expand spec", "get disk",
        "get claim"}  # fmt: skip
OPERATE = {"start", "stop", "restart", "pause", "unpause", "soft reboot"}
CONSOLE = {"console", "vnc", "screenshot", "port-forward", "vm port-forward (ssh)"}
EDIT = {"update vm", "patch vm", "add volume", "remove volume", "memory dump", "update disk",
        "clone verb"}  # fmt: skip
ADMIN = {"delete vm", "delete vmi", "delete disk", "delete claim"}
MAY: dict[str, set[str]] = {
    "view": VIEW,
    "operate": VIEW | OPERATE,
    "console": VIEW | CONSOLE,
    "snapshot": VIEW | {"snapshot verb"},
    "backup": VIEW | {"backup verb"},
    "migrate": VIEW | {"migrate verb", "migrate subresource"},
    "edit": VIEW | OPERATE | CONSOLE | {"snapshot verb"} | EDIT,
    "admin": VIEW
    | OPERATE
    | CONSOLE
    | EDIT
    | ADMIN
    | {"snapshot verb", "backup verb", "migrate verb", "migrate subresource"},
}
# the claim each VM's disk is: its DataVolume template's name
DISK = {"a": "a-root", "b": "b-root"}


# --- pure parts -----------------------------------------------------------------------------------


def test_a_policy_that_reaches_no_vm_grants_nothing_and_no_rule_names_nothing() -> None:
    for role in access.ROLES:
        assert access.rules_for(role, access.Reach(())) == []
        rules = access.rules_for(role, access.Reach(("a",), ("a-root",)))
        for rule in rules:
            # a rule without names grants only a create (RBAC cannot name what does not exist)
            assert rule.get("resourceNames") or rule["verbs"] == ["create"], (role, rule)
            assert "secrets" not in rule["resources"]


def test_folders_are_label_values_and_permissions_propagate_down() -> None:
    assert access.folder_label("prod/db") == "prod.db"
    assert access.folder_label("/") is None
    vm = {"metadata": {"name": "x", "labels": {access.FOLDER_LABEL: "prod.db.eu"}}}
    assert access.folder_path(vm) == "prod/db/eu"
    assert access.in_folder(vm, "prod") and access.in_folder(vm, "prod/db")
    assert not access.in_folder(vm, "prod/web") and not access.in_folder(vm, "prod/db/us")
    assert access.in_folder(vm, "/")
    with pytest.raises(access.FolderError, match="letters, digits"):
        access.folder_label("prod/d b")
    with pytest.raises(access.FolderError, match="63 characters"):
        access.folder_label("/".join(["abcdefghij"] * 7))


def test_a_policy_reaches_names_or_selector_within_folder() -> None:
    def vm(name: str, **labels: str) -> JSON:
        return {"metadata": {"name": name, "labels": labels}}

    policy = {"spec": {"virtualMachines": {"names": ["n"], "selector": {"matchLabels": {"t": "db"}},
                                           "folder": "prod"}}}  # fmt: skip
    assert reaches(policy, vm("n"))  # by name, wherever it is
    assert reaches(policy, vm("x", t="db", **{access.FOLDER_LABEL: "prod.eu"}))
    assert not reaches(policy, vm("y", t="db"))  # outside the folder
    assert not reaches(policy, vm("z", t="web", **{access.FOLDER_LABEL: "prod"}))
    assert not reaches({"spec": {"virtualMachines": {}}}, vm("n"))  # picks nothing


def test_related_objects_are_granted_by_the_vm_they_name() -> None:
    policy = {"metadata": {"name": "p", "namespace": NS, "uid": "u"},
              "spec": {"role": "backup", "subjects": [{"kind": "User", "name": "u"}],
                       "virtualMachines": {"names": ["a"]}}}  # fmt: skip
    vms = [{"metadata": {"name": n}, "spec": {}} for n in ("a", "b")]
    tracker = {
        "metadata": {"name": "t"},
        "spec": {"source": {"kind": "VirtualMachine", "name": "a"}},
    }
    related = {
        (access.BACKUP, "virtualmachinebackups"): [
            {"metadata": {"name": "via-tracker"},
             "spec": {"source": {"kind": "VirtualMachineBackupTracker", "name": "t"}}},
            {"metadata": {"name": "of-b"}, "spec": {"source": {"kind": "VirtualMachine", "name": "b"}}},
        ],
    }  # fmt: skip
    compiled = compile_policy(policy, vms, related, {("VirtualMachineBackupTracker", "t"): tracker})
    named = [r for r in compiled.role["rules"] if r["resources"] == ["virtualmachinebackups"]]
    # get and delete, each on the backup that reaches a through its tracker, never on b's
    assert sorted(r["verbs"][0] for r in named) == ["delete", "get"]
    assert all(r["resourceNames"] == ["via-tracker"] for r in named), named


# --- against the API server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def controller(apiserver: ThreadedServer) -> Iterator[Api]:
    """The access controller on the server's loop, talking to it over HTTPS like any client."""
    state: dict[str, Any] = {}

    async def start() -> None:
        client = Client(load_kubeconfig(apiserver.kubeconfig))
        await client.__aenter__()
        await install(client, access_crds())
        stop = asyncio.Event()
        manager = Manager([VMAccessPolicyController(client), VMQuotaController(client)])
        state.update(client=client, stop=stop,
                     task=asyncio.get_running_loop().create_task(manager.run(stop)))  # fmt: skip

    async def end() -> None:
        state["stop"].set()
        await state["task"]
        await state["client"].__aexit__(None, None, None)

    apiserver.call(start())
    admin = Api(apiserver.url, apiserver.ca, apiserver.admin_token)
    assert admin.post("/api/v1/namespaces", {"metadata": {"name": NS}}).status_code in (201, 409)
    wait(lambda: admin.get(POLICIES).status_code == 200, 20, "the CRD to be served")
    for name, folder in (("a", "prod.db"), ("b", "dev")):
        assert admin.post(VMS, vm(name, folder)).status_code == 201
    yield admin
    apiserver.call(end())


def vm(name: str, folder: str | None, **labels: str) -> JSON:
    if folder:
        labels[access.FOLDER_LABEL] = folder
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "runStrategy": "Halted",
            "dataVolumeTemplates": [
                {"metadata": {"name": f"{name}-root"},
                 "spec": {"source": {"blank": {}},
                          "storage": {"resources": {"requests": {"storage": "16Mi"}}}}}
            ],
            "template": {"spec": {
                "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                           "resources": {"requests": {"memory": "64Mi"}}},
                "volumes": [{"name": "root", "dataVolume": {"name": f"{name}-root"}}],
            }},
        },
    }  # fmt: skip


def policy(name: str, role: str, user: str, **pick: Any) -> JSON:
    return {
        "apiVersion": "vmo.dev/v1alpha1",
        "kind": "VMAccessPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"role": role, "subjects": [{"kind": "User", "name": user}],
                 "virtualMachines": pick},
    }  # fmt: skip


def wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def may(admin: Api, user: str, verb: str, group: str, resource: str, sub: str, name: str) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:authenticated"],
                 "resourceAttributes": {"namespace": NS, "verb": verb, "group": group,
                                        "resource": resource, "subresource": sub, "name": name}},
    }  # fmt: skip
    answer = admin.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    assert answer.status_code == 201, answer.text
    return bool(answer.json()["status"].get("allowed"))


def reached(admin: Api, name: str, expected: list[str]) -> JSON:
    def done() -> JSON | None:
        found = admin.get(f"{POLICIES}/{name}").json()
        status = found.get("status") or {}
        ok = status.get("virtualMachines") == expected
        ok = ok and status.get("observedGeneration") == found["metadata"].get("generation")
        return found if ok else None

    found: JSON = wait(done, 10, f"policy {name} to reach {expected}")
    return found


def test_every_role_allows_exactly_its_verbs_on_its_vm_and_nothing_on_another(
    controller: Api,
) -> None:
    admin = controller
    for role in access.ROLES:
        assert admin.post(POLICIES, policy(f"only-a-{role}", role, f"u-{role}",
                                           names=["a"])).status_code == 201  # fmt: skip
    for role in access.ROLES:
        found = reached(admin, f"only-a-{role}", ["a"])
        assert found["status"]["conflicts"] == []
    checked = 0
    for role in access.ROLES:
        for action, verb, group, resource, sub in ACTIONS:
            for target in ("a", "b"):
                name = (
                    DISK[target]
                    if resource in ("datavolumes", "persistentvolumeclaims")
                    else target
                )
                name = "" if action == "list secrets" else name
                want = target == "a" and action in MAY[role]
                got = may(admin, f"u-{role}", verb, group, resource, sub, name)
                assert got == want, f"{role} {action} on {target}: {got}, expected {want}"
                checked += 1
    assert checked == len(access.ROLES) * len(ACTIONS) * 2
    for role in access.ROLES:
        assert admin.delete(f"{POLICIES}/only-a-{role}").status_code == 200


def test_real_requests_follow_the_grants_and_creating_what_names_a_vm_needs_its_verb(
    apiserver: ThreadedServer, controller: Api
) -> None:
    admin = controller
    for role in ("operate", "snapshot", "migrate"):
        assert admin.post(POLICIES, policy(f"req-{role}", role, f"r-{role}", names=["a"])).ok
        reached(admin, f"req-{role}", ["a"])
    operate = Api(apiserver.url, apiserver.ca, make_user(apiserver, "r-operate")[0])
    subs = f"/apis/subresources.kubevirt.io/v1/namespaces/{NS}"
    denied = operate.put(f"{subs}/virtualmachines/b/start", {})
    assert denied.status_code == 403, denied.text
    assert operate.get(f"{subs}/virtualmachineinstances/a/vnc/screenshot").status_code == 403
    assert operate.get(f"/api/v1/namespaces/{NS}/secrets").status_code == 403
    assert operate.get(f"{VMS}/a").status_code == 200
    assert operate.get(f"{VMS}/b").status_code == 403
    # a snapshot of a by the snapshot role; of b refused, naming b and the field
    snap = Api(apiserver.url, apiserver.ca, make_user(apiserver, "r-snapshot")[0])
    snapshots = f"/apis/snapshot.kubevirt.io/v1beta1/namespaces/{NS}/virtualmachinesnapshots"

    def snapshot(name: str, of: str) -> JSON:
        return {"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine",
                                    "name": of}}}  # fmt: skip

    assert snap.post(snapshots, snapshot("snap-a", "a")).status_code == 201
    refused = snap.post(snapshots, snapshot("snap-b", "b"))
    assert refused.status_code == 403, refused.text
    message = refused.json()["message"]
    assert 'virtualmachine "b"' in message and "spec.source.name" in message, message
    assert snap.get(f"{snapshots}/snap-b").status_code in (403, 404)
    assert admin.get(f"{snapshots}/snap-b").status_code == 404  # nothing half-made
    # the snapshot it made is the user's to read: its name went into the Role
    wait(lambda: snap.get(f"{snapshots}/snap-a").status_code == 200, 5, "snap-a to be readable")
    # migrate only with the migrate role
    migrations = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstancemigrations"
    body = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "mig-a", "namespace": NS}, "spec": {"vmiName": "a"}}  # fmt: skip
    assert snap.post(migrations, body).status_code == 403
    migrate = Api(apiserver.url, apiserver.ca, make_user(apiserver, "r-migrate")[0])
    assert migrate.post(migrations, {**body, "spec": {"vmiName": "b"}}).status_code == 403
    # a namespace editor (upstream's kubevirt.io:edit) keeps what KubeVirt lets it do
    editor_binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                      "metadata": {"name": "editor", "namespace": NS},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "kubevirt.io:edit"},
                      "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                    "name": "r-editor"}]}  # fmt: skip
    assert admin.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings",
                      editor_binding).status_code == 201  # fmt: skip
    editor = Api(apiserver.url, apiserver.ca, make_user(apiserver, "r-editor")[0])
    assert editor.post(snapshots, snapshot("snap-b-editor", "b")).status_code == 201
    for role in ("operate", "snapshot", "migrate"):
        assert admin.delete(f"{POLICIES}/req-{role}").status_code == 200


def test_grants_follow_folders_and_labels_and_go_with_the_policy(controller: Api) -> None:
    admin = controller
    assert admin.post(POLICIES, policy("prod-console", "console", "f-user", folder="prod")).ok
    reached(admin, "prod-console", ["a"])
    assert may(admin, "f-user", "get", SUB, "virtualmachineinstances", "vnc", "a")
    assert not may(admin, "f-user", "get", SUB, "virtualmachineinstances", "vnc", "b")
    # b moves into prod/web: the folder's permission reaches it within 2 s
    move = {"metadata": {"labels": {access.FOLDER_LABEL: "prod.web"}}}
    assert admin.patch(f"{VMS}/b", move, MERGE).ok
    started = time.monotonic()
    wait(lambda: may(admin, "f-user", "get", SUB, "virtualmachineinstances", "vnc", "b"), 2,
         "the grant to follow b into prod")  # fmt: skip
    assert time.monotonic() - started <= 2
    # a clone of a under a new name is in the same folder: the folder policy selects it; a
    # policy that named a does not carry over
    assert admin.post(POLICIES, policy("just-a", "admin", "n-user", names=["a"])).ok
    assert admin.post(VMS, vm("a-clone", "prod.db")).status_code == 201
    reached(admin, "prod-console", ["a", "a-clone", "b"])
    reached(admin, "just-a", ["a"])
    assert may(admin, "f-user", "get", SUB, "virtualmachineinstances", "console", "a-clone")
    assert not may(admin, "n-user", "get", KV, "virtualmachines", "", "a-clone")
    # back to dev: revoked within 2 s
    assert admin.patch(f"{VMS}/b", {"metadata": {"labels": {access.FOLDER_LABEL: "dev"}}}, MERGE).ok
    wait(lambda: not may(admin, "f-user", "get", SUB, "virtualmachineinstances", "vnc", "b"), 2,
         "the grant on b to go")  # fmt: skip
    # deleting the policy revokes within 2 s, and its Role and RoleBinding go
    assert admin.delete(f"{POLICIES}/prod-console").status_code == 200
    wait(lambda: not may(admin, "f-user", "get", SUB, "virtualmachineinstances", "vnc", "a"), 2,
         "the policy's grants to go")  # fmt: skip
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}"
    wait(lambda: admin.get(f"{rbac}/roles/vmo-access-prod-console").status_code == 404, 2, "Role")
    assert admin.get(f"{rbac}/rolebindings/vmo-access-prod-console").status_code == 404
    assert admin.delete(f"{POLICIES}/just-a").status_code == 200
    assert admin.delete(f"{VMS}/a-clone").status_code == 200


def test_status_names_conflicts_and_bad_policies_are_refused_naming_the_field(
    controller: Api,
) -> None:
    admin = controller
    assert admin.post(POLICIES, policy("wide", "admin", "c-user", folder="prod")).ok
    assert admin.post(POLICIES, policy("narrow", "view", "c-user", names=["a", "ghost"])).ok
    reached(admin, "wide", ["a"])

    def conflicts() -> list[str] | None:
        found = admin.get(f"{POLICIES}/narrow").json()
        listed: list[str] = (found.get("status") or {}).get("conflicts") or []
        return listed if len(listed) == 2 else None

    listed = wait(conflicts, 10, "narrow's conflicts")
    assert "virtualMachines.names[1]: there is no VM ghost in this namespace" in listed
    assert "policy wide already grants admin to User c-user on a" in listed
    bad = admin.post(POLICIES, policy("bad-role", "root", "x", names=["a"]))
    assert bad.status_code == 422 and "spec.role" in bad.text, bad.text
    bad = admin.post(POLICIES, policy("bad-folder", "view", "x", folder="prod/d b"))
    assert bad.status_code == 422 and "spec.virtualMachines.folder" in bad.text, bad.text
    for name in ("wide", "narrow"):
        assert admin.delete(f"{POLICIES}/{name}").status_code == 200


def vmo(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmo.cli.main", *args, "-n", NS, "--kubeconfig", str(kubeconfig)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_cli_lists_what_each_user_may_see_moves_folders_and_explains_grants(
    apiserver: ThreadedServer, controller: Api
) -> None:
    admin = controller
    assert admin.post(POLICIES, policy("cli-view", "view", "cli-u", names=["a"])).ok
    assert admin.post(POLICIES, policy("cli-console", "console", "cli-c", folder="prod")).ok
    reached(admin, "cli-view", ["a"])
    reached(admin, "cli-console", ["a"])
    _, viewer = make_user(apiserver, "cli-u")
    listed = vmo(viewer, "vm", "ls")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip()]
    assert names == ["a"], listed.stdout  # not b: the user may not get it
    assert "/prod/db" in listed.stdout
    root = apiserver.kubeconfig
    moved = vmo(root, "folder", "mv", "b", "prod/web")
    assert moved.returncode == 0 and "moved to /prod/web" in moved.stdout, moved.stderr
    tree = vmo(root, "folder", "ls", "prod")
    assert tree.returncode == 0, tree.stderr
    assert "db/" in tree.stdout and "web/" in tree.stdout and "b" in tree.stdout, tree.stdout
    bad = vmo(root, "folder", "mv", "b", "prod/we b")
    assert bad.returncode == 2 and "letters, digits" in bad.stderr
    reached(admin, "cli-console", ["a", "b"])
    who = vmo(root, "access", "who-can", "console", "b")
    assert who.returncode == 0, who.stderr
    assert "cli-c" in who.stdout and "cli-u" not in who.stdout, who.stdout
    explained = vmo(root, "access", "explain", "cli-c", "b")
    assert explained.returncode == 0, explained.stderr
    assert ("VMAccessPolicy cli-console (role console, reaches b in folder prod) -> "
            "Role vmo-access-cli-console") in explained.stdout, explained.stdout  # fmt: skip
    assert "RoleBinding vmo-access-cli-console (User cli-c)" in explained.stdout
    assert vmo(root, "access", "explain", "cli-u", "b").returncode == 1
    reviewed = vmo(root, "access", "review")
    assert reviewed.returncode == 0, reviewed.stderr
    assert "console: User cli-c (cli-console)" in reviewed.stdout
    assert "view: User cli-u (cli-view)" in reviewed.stdout
    assert vmo(root, "folder", "mv", "b", "dev").returncode == 0
    # tags are labels: shown in the list, and a policy selects them as any label
    tagged = vmo(root, "tag", "add", "a", "pci", "gold")
    assert tagged.returncode == 0 and "tags: gold, pci" in tagged.stdout, tagged.stderr
    by_tag = policy("cli-pci", "view", "cli-t",
                    selector={"matchExpressions": [{"key": "tags.vmo.dev/pci",
                                                    "operator": "Exists"}]})  # fmt: skip
    assert admin.post(POLICIES, by_tag).ok
    reached(admin, "cli-pci", ["a"])
    assert "gold,pci" in vmo(root, "vm", "ls").stdout
    assert vmo(root, "tag", "rm", "a", "pci").returncode == 0
    reached(admin, "cli-pci", [])
    assert vmo(root, "tag", "add", "a", "no/slash").returncode == 2
    assert vmo(root, "tag", "rm", "a", "gold").returncode == 0
    for name in ("cli-view", "cli-console", "cli-pci"):
        assert admin.delete(f"{POLICIES}/{name}").status_code == 200


def test_the_example_policies_are_accepted_and_compile(controller: Api) -> None:
    examples = Path(__file__).resolve().parent.parent / "examples" / "access-policy.yaml"
    for doc in yaml.safe_load_all(examples.read_text()):
        doc["metadata"]["namespace"] = NS
        doc["spec"]["virtualMachines"] = {**doc["spec"]["virtualMachines"], "names": ["a"]}
        created = controller.post(POLICIES, doc)
        assert created.status_code == 201, created.text
        reached(controller, doc["metadata"]["name"], ["a"])
        assert controller.delete(f"{POLICIES}/{doc['metadata']['name']}").status_code == 200


def test_a_policy_author_cannot_grant_what_they_do_not_hold(
    apiserver: ThreadedServer, controller: Api
) -> None:
    admin = controller
    assert admin.post(POLICIES, policy("delegator-admin", "admin", "delegator", names=["a"])).ok
    reached(admin, "delegator-admin", ["a"])
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}"
    may_write = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                 "metadata": {"name": "policy-writer", "namespace": NS},
                 "rules": [{"apiGroups": ["vmo.dev"], "resources": ["vmaccesspolicies"],
                            "verbs": ["create", "get", "update", "delete"]}]}  # fmt: skip
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "policy-writer", "namespace": NS},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                           "name": "policy-writer"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                             "name": "delegator"}]}  # fmt: skip
    assert admin.post(f"{rbac}/roles", may_write).status_code == 201
    assert admin.post(f"{rbac}/rolebindings", binding).status_code == 201
    delegator = Api(apiserver.url, apiserver.ca, make_user(apiserver, "delegator")[0])
    # what it holds, it may hand on: view on a, or admin on a folder that holds only a
    assert delegator.post(POLICIES, policy("friend-view", "view", "friend", names=["a"])).ok
    assert delegator.post(POLICIES, policy("friend-prod", "admin", "friend", folder="prod/db")).ok
    # what it does not: the console of b
    refused = delegator.post(POLICIES, policy("friend-b", "console", "friend", names=["b"]))
    assert refused.status_code == 403, refused.text
    message = refused.json()["message"]
    assert "a policy may grant only what its author holds" in message
    assert 'Resources:["virtualmachineinstances/console"], ResourceNames:["b"]' in message, message
    assert admin.get(f"{POLICIES}/friend-b").status_code == 404
    reached(admin, "friend-view", ["a"])
    for name in ("friend-view", "friend-prod", "delegator-admin"):
        assert admin.delete(f"{POLICIES}/{name}").status_code == 200


# --- VMQuota ---------------------------------------------------------------------------------------

QUOTAS = f"/apis/vmo.dev/v1alpha1/namespaces/{NS}/vmquotas"


def test_a_vm_counts_what_it_declares_instancetype_included() -> None:
    sized = vm("s", None)
    sized["spec"]["template"]["spec"]["domain"]["cpu"] = {"sockets": 2, "cores": 2}
    usage = quota.vm_usage(sized)
    assert usage == quota.Usage(vms=1, vcpus=4, memory=64 << 20, storage=16 << 20)
    typed = {"spec": {"instancetype": {"name": "big"}, "template": {"spec": {"domain": {}}}}}
    big = {"spec": {"cpu": {"guest": 8}, "memory": {"guest": "2Gi"}}}
    assert quota.vm_usage(typed, big) == quota.Usage(vms=1, vcpus=8, memory=2 << 30)
    assert quota.instancetype_ref(typed) == ("VirtualMachineClusterInstancetype", "big")
    q = {"metadata": {"name": "q"}, "spec": {"hard": {"vcpus": 6, "memory": "1Gi"}}}
    assert quota.exceeded(q, quota.Usage(vcpus=6), quota.Usage(vcpus=1, memory=1)) == (
        "exceeded quota: q, requested: vcpus=1, used: vcpus=6, limited: vcpus=6"
    )
    assert quota.exceeded(q, quota.Usage(vcpus=9), quota.Usage(memory=1)) is None  # adds no CPU


def test_vms_over_quota_are_refused_with_the_numbers_and_migrations_never_count(
    controller: Api,
) -> None:
    admin = controller
    body = {"apiVersion": "vmo.dev/v1alpha1", "kind": "VMQuota",
            "metadata": {"name": "ns-quota", "namespace": NS},
            "spec": {"hard": {"virtualMachines": 5, "vcpus": 6, "memory": "1Gi"}}}  # fmt: skip
    assert admin.post(QUOTAS, body).status_code == 201

    def used(name: str, want: JSON) -> JSON:
        def done() -> JSON | None:
            found = admin.get(f"{QUOTAS}/{name}").json()
            return found if (found.get("status") or {}).get("used") == want else None

        found: JSON = wait(done, 10, f"quota {name} to count {want}")
        return found

    used("ns-quota", {"virtualMachines": 2, "vcpus": 2, "memory": "128Mi", "storage": "32Mi"})
    wide = vm("wide", "dev")
    wide["spec"]["template"]["spec"]["domain"]["cpu"] = {"cores": 4}
    assert admin.post(VMS, wide).status_code == 201  # 6 vCPUs: at the limit, not past it
    refused = admin.post(VMS, vm("one-more", "dev"))
    assert refused.status_code == 403, refused.text
    assert refused.json()["message"] == (
        'virtualmachines.kubevirt.io "one-more" is forbidden: exceeded quota: ns-quota, '
        "requested: vcpus=1, used: vcpus=6, limited: vcpus=6"
    )
    assert admin.get(f"{VMS}/one-more").status_code == 404
    # an instancetype counts as the VM declares it
    big = {"apiVersion": "instancetype.kubevirt.io/v1beta1", "kind": "VirtualMachineInstancetype",
           "metadata": {"name": "big", "namespace": NS},
           "spec": {"cpu": {"guest": 1}, "memory": {"guest": "2Gi"}}}  # fmt: skip
    assert admin.post(f"/apis/instancetype.kubevirt.io/v1beta1/namespaces/{NS}/"
                      "virtualmachineinstancetypes", big).status_code == 201  # fmt: skip
    typed = vm("typed", "dev")
    typed["spec"]["instancetype"] = {"kind": "VirtualMachineInstancetype", "name": "big"}
    del typed["spec"]["template"]["spec"]["domain"]["resources"]
    refused = admin.post(VMS, typed)
    assert refused.status_code == 403, refused.text
    assert "requested: vcpus=1,memory=2Gi, used: vcpus=6,memory=192Mi" in refused.json()["message"]
    # growing a VM is judged by what it adds; a change that adds nothing passes
    grow = {"spec": {"template": {"spec": {"domain": {"cpu": {"cores": 5}}}}}}
    assert admin.patch(f"{VMS}/wide", grow, MERGE).status_code == 403
    assert admin.patch(f"{VMS}/wide", {"metadata": {"labels": {"x": "y"}}}, MERGE).ok
    # a migration is no VM: with the quota full, it is not refused, and nothing more is counted
    migrations = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstancemigrations"
    mig = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
           "metadata": {"name": "quota-mig", "namespace": NS}, "spec": {"vmiName": "wide"}}  # fmt: skip
    created = admin.post(migrations, mig)
    assert "exceeded quota" not in created.text
    used("ns-quota", {"virtualMachines": 3, "vcpus": 6, "memory": "192Mi", "storage": "48Mi"})
    # a lowered limit: Exceeded, and nothing running is touched
    assert admin.patch(f"{QUOTAS}/ns-quota", {"spec": {"hard": {"vcpus": 4}}}, MERGE).ok

    def exceeded() -> JSON | None:
        found = admin.get(f"{QUOTAS}/ns-quota").json()
        conds = {c["type"]: c for c in (found.get("status") or {}).get("conditions") or []}
        return found if conds.get("Exceeded", {}).get("status") == "True" else None

    assert "vcpus 6 > 4" in wait(exceeded, 10, "Exceeded")["status"]["conditions"][0]["message"]
    assert admin.delete(f"{QUOTAS}/ns-quota").status_code == 200
    assert admin.post(VMS, vm("one-more", "dev")).status_code == 201  # no quota: no limit
    for name in ("wide", "one-more"):
        assert admin.delete(f"{VMS}/{name}").status_code == 200
    admin.delete(migrations + "/quota-mig")


def test_a_folder_quota_counts_the_folder_and_refuses_a_move_into_it(controller: Api) -> None:
    admin = controller
    body = {"apiVersion": "vmo.dev/v1alpha1", "kind": "VMQuota",
            "metadata": {"name": "prod-quota", "namespace": NS},
            "spec": {"folder": "prod", "hard": {"virtualMachines": 1}}}  # fmt: skip
    assert admin.post(QUOTAS, body).status_code == 201
    refused = admin.patch(f"{VMS}/b", {"metadata": {"labels": {access.FOLDER_LABEL: "prod.web"}}},
                          MERGE)  # fmt: skip
    assert refused.status_code == 403, refused.text
    assert "exceeded quota: prod-quota, requested: virtualMachines=1, used: virtualMachines=1, " \
           "limited: virtualMachines=1" in refused.json()["message"]  # fmt: skip
    assert admin.get(f"{VMS}/b").json()["metadata"]["labels"][access.FOLDER_LABEL] == "dev"
    assert admin.post(VMS, vm("elsewhere", "dev")).status_code == 201  # outside the folder
    assert admin.delete(f"{VMS}/elsewhere").status_code == 200
    assert admin.delete(f"{QUOTAS}/prod-quota").status_code == 200
