"""RBAC with Kubernetes semantics: request resolution, decisions, aggregation, escalation."""

from __future__ import annotations

from typing import Any

import pytest

from vmo.apiserver.bootstrap_roles import (
    bootstrap_cluster_role_bindings,
    bootstrap_cluster_roles,
)
from vmo.apiserver.errors import ApiError
from vmo.apiserver.rbac import (
    PolicyRule,
    RBACAuthorizer,
    RequestAttributes,
    RequestInfoError,
    UserInfo,
    aggregate_cluster_roles,
    check_binding_escalation,
    check_role_escalation,
    escalation_causes,
    forbidden_message,
    request_attributes,
    review_attributes,
    rule_allows,
    service_account_user,
)

JSON = dict[str, Any]

ALICE = UserInfo("alice", ("devs", "system:authenticated"))
BOB = UserInfo("bob", ("system:authenticated",))
ROOT = UserInfo("root", ("system:masters", "system:authenticated"))
NS = "virtual-machines"


# --------------------------------------------------------------------------- builders


def rule(verbs: str, groups: str, resources: str, names: str = "") -> JSON:
    out: JSON = {
        "verbs": verbs.split(),
        "apiGroups": [("" if g == '""' else g) for g in groups.split()],
        "resources": resources.split(),
    }
    if names:
        out["resourceNames"] = names.split()
    return out


def url_rule(verbs: str, urls: str) -> JSON:
    return {"verbs": verbs.split(), "nonResourceURLs": urls.split()}


def cluster_role(name: str, *rules: JSON, labels: dict[str, str] | None = None) -> JSON:
    return {
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": labels or {}},
        "rules": list(rules),
    }


def role(namespace: str, name: str, *rules: JSON) -> JSON:
    return {
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": list(rules),
    }


def subject(spec: str) -> JSON:
    """``User:alice``, ``Group:devs``, ``ServiceAccount:ns/name`` or ``ServiceAccount:name``."""
    kind, name = spec.split(":", 1)
    if kind == "ServiceAccount":
        namespace, _, sa = name.rpartition("/")
        out = {"kind": kind, "name": sa}
        if namespace:
            out["namespace"] = namespace
        return out
    return {"kind": kind, "name": name, "apiGroup": "rbac.authorization.k8s.io"}


def role_binding(namespace: str, name: str, ref: str, *subjects: str) -> JSON:
    kind, role_name = ref.split("/")
    return {
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role_name},
        "subjects": [subject(s) for s in subjects],
    }


def cluster_role_binding(name: str, role_name: str, *subjects: str) -> JSON:
    return {
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role_name,
        },
        "subjects": [subject(s) for s in subjects],
    }


def attrs(
    user: UserInfo,
    verb: str,
    resource: str,
    *,
    group: str = "kubevirt.io",
    namespace: str = NS,
    name: str = "",
    subresource: str = "",
) -> RequestAttributes:
    return RequestAttributes(
        user,
        verb,
        namespace=namespace,
        api_group=group,
        api_version="v1",
        resource=resource,
        subresource=subresource,
        name=name,
    )


def bootstrap_authorizer(*bindings: JSON, roles: tuple[JSON, ...] = ()) -> RBACAuthorizer:
    return RBACAuthorizer(
        roles=roles,
        cluster_roles=bootstrap_cluster_roles(),
        role_bindings=[b for b in bindings if b["kind"] == "RoleBinding"],
        cluster_role_bindings=[
            *bootstrap_cluster_role_bindings(),
            *(b for b in bindings if b["kind"] == "ClusterRoleBinding"),
        ],
    )


# --------------------------------------------------------------------------- request attributes

SUB = "/apis/subresources.kubevirt.io/v1/namespaces/vms"
RESOLUTION = [
    # method, path, query, "verb namespace group version resource subresource name" ("-" empty)
    ("GET", "/api/v1/namespaces/ns/pods/p1", {}, "get ns - v1 pods - p1"),
    ("GET", "/api/v1/namespaces/ns/pods", {}, "list ns - v1 pods - -"),
    ("GET", "/api/v1/namespaces/ns/pods", {"watch": "true"}, "watch ns - v1 pods - -"),
    ("GET", "/api/v1/namespaces/ns/pods", {"watch": "1"}, "watch ns - v1 pods - -"),
    ("GET", "/api/v1/namespaces/ns/pods", {"watch": "false"}, "list ns - v1 pods - -"),
    ("GET", "/api/v1/pods", {}, "list - - v1 pods - -"),
    ("POST", "/api/v1/namespaces/ns/pods", {}, "create ns - v1 pods - -"),
    ("PUT", "/api/v1/namespaces/ns/pods/p1/status", {}, "update ns - v1 pods status p1"),
    ("PATCH", "/api/v1/namespaces/ns/pods/p1", {}, "patch ns - v1 pods - p1"),
    ("DELETE", "/api/v1/namespaces/ns/pods/p1", {}, "delete ns - v1 pods - p1"),
    ("DELETE", "/api/v1/namespaces/ns/pods", {}, "deletecollection ns - v1 pods - -"),
    ("HEAD", "/api/v1/namespaces/ns/pods/p1", {}, "get ns - v1 pods - p1"),
    # namespaces themselves, and their own subresources
    ("GET", "/api/v1/namespaces", {}, "list - - v1 namespaces - -"),
    ("GET", "/api/v1/namespaces/ns", {}, "get ns - v1 namespaces - ns"),
    ("PUT", "/api/v1/namespaces/ns/finalize", {}, "update ns - v1 namespaces finalize ns"),
    ("GET", "/api/v1/namespaces/ns/status", {}, "get ns - v1 namespaces status ns"),
    # groups, cluster scope
    ("GET", "/apis/kubevirt.io/v1/namespaces/vms/virtualmachines/vm1", {},
     "get vms kubevirt.io v1 virtualmachines - vm1"),
    ("GET", "/apis/kubevirt.io/v1/virtualmachines", {},
     "list - kubevirt.io v1 virtualmachines - -"),
    ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/admin", {},
     "get - rbac.authorization.k8s.io v1 clusterroles - admin"),
    ("PUT", SUB + "/virtualmachines/vm1/start", {},
     "update vms subresources.kubevirt.io v1 virtualmachines start vm1"),
    ("GET", SUB + "/virtualmachineinstances/vm1/console", {},
     "get vms subresources.kubevirt.io v1 virtualmachineinstances console vm1"),
    # only the first segment after the name is the subresource (vnc/screenshot -> vnc)
    ("GET", SUB + "/virtualmachineinstances/v/vnc/screenshot", {},
     "get vms subresources.kubevirt.io v1 virtualmachineinstances vnc v"),
    # legacy watch prefix
    ("GET", "/api/v1/watch/namespaces/ns/pods", {}, "watch ns - v1 pods - -"),
    ("GET", "/api/v1/watch/namespaces/ns/pods/p1", {}, "watch ns - v1 pods - p1"),
    ("GET", "/apis/kubevirt.io/v1/watch/virtualmachines", {},
     "watch - kubevirt.io v1 virtualmachines - -"),
    # proxy takes the rest as a path, never a subresource
    ("GET", "/api/v1/proxy/namespaces/ns/services/s1/x/y", {}, "proxy ns - v1 services - s1"),
    # a metadata.name field selector names the object for list and watch
    ("GET", "/api/v1/namespaces/ns/pods", {"fieldSelector": "metadata.name=p1"},
     "list ns - v1 pods - p1"),
    ("GET", "/api/v1/namespaces/ns/pods", {"fieldSelector": "metadata.name==p1", "watch": "true"},
     "watch ns - v1 pods - p1"),
    ("GET", "/api/v1/namespaces/ns/pods", {"fieldSelector": "metadata.name!=p1"},
     "list ns - v1 pods - -"),
    ("GET", "/api/v1/namespaces/ns/pods", {"fieldSelector": "spec.nodeName=n1"},
     "list ns - v1 pods - -"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "query", "expected"), RESOLUTION)
def test_request_attributes_resolve_like_request_info(
    method: str, path: str, query: dict[str, str], expected: str
) -> None:
    got = request_attributes(method, path, query, ALICE)
    assert got.resource_request
    fields = [got.verb, got.namespace, got.api_group, got.api_version]
    fields += [got.resource, got.subresource, got.name]
    assert " ".join(f or "-" for f in fields) == expected


@pytest.mark.parametrize(
    ("method", "path", "verb"),
    [
        ("GET", "/healthz", "get"),
        ("GET", "/version", "get"),
        ("GET", "/openapi/v3/apis/kubevirt.io/v1", "get"),
        ("GET", "/api", "get"),
        ("GET", "/api/v1", "get"),
        ("GET", "/apis", "get"),
        ("GET", "/apis/kubevirt.io", "get"),
        ("GET", "/apis/kubevirt.io/v1", "get"),
        ("POST", "/logs", "post"),
        ("PUT", "/metrics", "put"),
    ],
)
def test_non_resource_paths_keep_the_lowercased_method(method: str, path: str, verb: str) -> None:
    got = request_attributes(method, path, {}, ALICE)
    assert not got.resource_request
    assert (got.verb, got.path) == (verb, path)


def test_bare_watch_prefix_is_an_error() -> None:
    with pytest.raises(RequestInfoError):
        request_attributes("GET", "/api/v1/watch", {}, ALICE)


def test_review_attributes_read_resource_and_non_resource_specs() -> None:
    spec = {"resourceAttributes": {"verb": "get", "group": "kubevirt.io", "resource": "vms"}}
    assert review_attributes(spec, ALICE).resource == "vms"
    got = review_attributes({"nonResourceAttributes": {"path": "/x", "verb": "get"}}, ALICE)
    assert (got.resource_request, got.path) == (False, "/x")


# --------------------------------------------------------------------------- rule matching

MATCHING = [
    # rule, request (verb resource/sub group name), allowed
    (rule("get", "kubevirt.io", "virtualmachines"),
     ("get", "virtualmachines", "kubevirt.io", "vm1"), True),
    (rule("get", "kubevirt.io", "virtualmachines"),
     ("list", "virtualmachines", "kubevirt.io", ""), False),
    (rule("*", "kubevirt.io", "virtualmachines"),
     ("delete", "virtualmachines", "kubevirt.io", "x"), True),
    (rule("get", "*", "virtualmachines"), ("get", "virtualmachines", "other.io", "x"), True),
    (rule("get", "kubevirt.io", "*"), ("get", "virtualmachines/status", "kubevirt.io", "x"), True),
    # a resource rule does not grant its subresources, nor the reverse
    (rule("get", "kubevirt.io", "virtualmachines"),
     ("get", "virtualmachines/status", "kubevirt.io", "x"), False),
    (rule("get", "kubevirt.io", "virtualmachines/status"),
     ("get", "virtualmachines", "kubevirt.io", "x"), False),
    (rule("get", "kubevirt.io", "*/status"),
     ("get", "virtualmachines/status", "kubevirt.io", "x"), True),
    (rule("get", "kubevirt.io", "*/status"), ("get", "virtualmachines", "kubevirt.io", "x"), False),
    # resourceNames: only requests that carry a name
    (rule("get list watch", "kubevirt.io", "virtualmachines", "vm1"),
     ("get", "virtualmachines", "kubevirt.io", "vm1"), True),
    (rule("get list watch", "kubevirt.io", "virtualmachines", "vm1"),
     ("get", "virtualmachines", "kubevirt.io", "vm2"), False),
    (rule("get list watch", "kubevirt.io", "virtualmachines", "vm1"),
     ("list", "virtualmachines", "kubevirt.io", ""), False),
    (rule("get list watch", "kubevirt.io", "virtualmachines", "vm1"),
     ("watch", "virtualmachines", "kubevirt.io", "vm1"), True),
    (rule("create", "kubevirt.io", "virtualmachines", "vm1"),
     ("create", "virtualmachines", "kubevirt.io", ""), False),
    (rule("deletecollection", "kubevirt.io", "virtualmachines", "vm1"),
     ("deletecollection", "virtualmachines", "kubevirt.io", ""), False),
    # the core group is the empty string
    (rule("get", '""', "pods"), ("get", "pods", "", "p"), True),
    (rule("get", '""', "pods"), ("get", "pods", "apps", "p"), False),
]  # fmt: skip


@pytest.mark.parametrize(("policy", "request_", "allowed"), MATCHING)
def test_rule_matching_follows_upstream(
    policy: JSON, request_: tuple[str, str, str, str], allowed: bool
) -> None:
    verb, combined, group, name = request_
    resource, _, sub = combined.partition("/")
    got = rule_allows(
        attrs(ALICE, verb, resource, group=group, name=name, subresource=sub),
        PolicyRule.from_json(policy),
    )
    assert got is allowed


@pytest.mark.parametrize(
    ("urls", "path", "allowed"),
    [
        ("/healthz", "/healthz", True),
        ("/healthz", "/healthz/ping", False),
        ("/apis/*", "/apis/kubevirt.io/v1", True),
        ("/apis/*", "/apis", False),
        ("/apis*", "/apis", True),
        ("*", "/anything", True),
    ],
)
def test_non_resource_urls_match_exactly_or_by_star_prefix(
    urls: str, path: str, allowed: bool
) -> None:
    request = RequestAttributes(ALICE, "get", path=path, resource_request=False)
    assert rule_allows(request, PolicyRule.from_json(url_rule("get", urls))) is allowed


def test_non_resource_rule_needs_the_verb() -> None:
    request = RequestAttributes(ALICE, "post", path="/healthz", resource_request=False)
    assert not rule_allows(request, PolicyRule.from_json(url_rule("get", "/healthz")))


# --------------------------------------------------------------------------- decisions


def test_system_masters_is_always_allowed() -> None:
    authorizer = RBACAuthorizer()
    assert authorizer.authorize(attrs(ROOT, "delete", "virtualmachines", name="x")).allowed


def test_no_bindings_means_denied_without_reason() -> None:
    decision = RBACAuthorizer().authorize(attrs(ALICE, "get", "virtualmachines", name="x"))
    assert (decision.allowed, decision.reason) == (False, "")


def test_namespaced_binding_to_cluster_role_does_not_leak_to_other_namespaces() -> None:
    authorizer = bootstrap_authorizer(
        role_binding(NS, "alice-admin", "ClusterRole/kubevirt.io:admin", "User:alice")
    )
    assert authorizer.authorize(attrs(ALICE, "create", "virtualmachines")).allowed
    other = attrs(ALICE, "create", "virtualmachines", namespace="other")
    assert not authorizer.authorize(other).allowed
    assert not authorizer.authorize(attrs(ALICE, "list", "virtualmachines", namespace="")).allowed


def test_allowed_reason_names_the_binding() -> None:
    authorizer = bootstrap_authorizer(
        role_binding(NS, "alice-admin", "ClusterRole/kubevirt.io:admin", "User:alice")
    )
    decision = authorizer.authorize(attrs(ALICE, "get", "virtualmachines", name="vm1"))
    assert decision.reason == (
        'RBAC: allowed by RoleBinding "alice-admin/virtual-machines" of ClusterRole'
        ' "kubevirt.io:admin" to User "alice"'
    )


def test_cluster_role_binding_grants_everywhere() -> None:
    authorizer = bootstrap_authorizer(cluster_role_binding("v", "kubevirt.io:view", "User:alice"))
    for namespace in (NS, "other", ""):
        request = attrs(ALICE, "list", "virtualmachines", namespace=namespace)
        assert authorizer.authorize(request).allowed


SUBRESOURCE_CASES = [
    # role, verb, resource/sub, allowed
    ("kubevirt.io:admin", "update", "virtualmachines/start", True),
    ("kubevirt.io:admin", "update", "virtualmachines/migrate", False),
    ("kubevirt.io:admin", "get", "virtualmachineinstances/console", True),
    ("kubevirt.io:admin", "get", "virtualmachineinstances/vnc", True),
    ("kubevirt.io:edit", "update", "virtualmachines/stop", True),
    ("kubevirt.io:edit", "get", "virtualmachineinstances/console", True),
    ("kubevirt.io:view", "update", "virtualmachines/start", False),
    ("kubevirt.io:view", "get", "virtualmachineinstances/console", False),
    ("kubevirt.io:view", "get", "virtualmachineinstances/guestosinfo", True),
    ("kubevirt.io:migrate", "update", "virtualmachines/migrate", True),
    ("admin", "update", "virtualmachines/start", True),
    ("edit", "get", "virtualmachineinstances/vnc", True),
    ("view", "get", "virtualmachineinstances/vnc", False),
]


@pytest.mark.parametrize(("role_name", "verb", "combined", "allowed"), SUBRESOURCE_CASES)
def test_kubevirt_subresources_are_granted_per_role(
    role_name: str, verb: str, combined: str, allowed: bool
) -> None:
    authorizer = bootstrap_authorizer(
        role_binding(NS, "b", f"ClusterRole/{role_name}", "User:alice")
    )
    resource, sub = combined.split("/")
    request = attrs(
        ALICE, verb, resource, group="subresources.kubevirt.io", name="vm1", subresource=sub
    )
    assert authorizer.authorize(request).allowed is allowed


def test_per_vm_role_with_resource_names() -> None:
    per_vm = role(
        NS,
        "vm1-operator",
        rule(
            "update",
            "subresources.kubevirt.io",
            "virtualmachines/start virtualmachines/stop",
            "vm1",
        ),
        rule("get", "kubevirt.io", "virtualmachines", "vm1"),
    )
    authorizer = bootstrap_authorizer(
        role_binding(NS, "b", "Role/vm1-operator", "User:alice"), roles=(per_vm,)
    )

    def may(verb: str, resource: str, name: str, sub: str = "") -> bool:
        group = "subresources.kubevirt.io" if sub else "kubevirt.io"
        request = attrs(ALICE, verb, resource, group=group, name=name, subresource=sub)
        return authorizer.authorize(request).allowed

    assert may("update", "virtualmachines", "vm1", "start")
    assert not may("update", "virtualmachines", "vm2", "start")
    assert not may("update", "virtualmachines", "vm1", "restart")
    assert may("get", "virtualmachines", "vm1")
    assert not may("list", "virtualmachines", "")


def test_group_subject_grants_members_only() -> None:
    authorizer = bootstrap_authorizer(
        role_binding(NS, "devs", "ClusterRole/kubevirt.io:edit", "Group:devs")
    )
    assert authorizer.authorize(attrs(ALICE, "create", "virtualmachines")).allowed
    assert not authorizer.authorize(attrs(BOB, "create", "virtualmachines")).allowed


@pytest.mark.parametrize(
    ("subject_spec", "binding_ns", "allowed"),
    [
        ("ServiceAccount:ci/deployer", NS, True),
        ("ServiceAccount:deployer", "ci", True),  # namespace defaults to the binding's
        ("ServiceAccount:deployer", NS, False),  # ...so it names ns/deployer, not ci/deployer
        ("ServiceAccount:other/deployer", NS, False),
        ("Group:system:serviceaccounts", NS, True),
        ("Group:system:serviceaccounts:ci", NS, True),
        ("Group:system:serviceaccounts:other", NS, False),
        ("User:system:serviceaccount:ci:deployer", NS, True),
    ],
)
def test_service_account_subjects(subject_spec: str, binding_ns: str, allowed: bool) -> None:
    deployer = service_account_user("ci", "deployer")
    authorizer = bootstrap_authorizer(
        role_binding(binding_ns, "sa", "ClusterRole/edit", subject_spec)
    )
    request = attrs(deployer, "create", "configmaps", group="", namespace=binding_ns)
    assert authorizer.authorize(request).allowed is allowed


def test_cluster_role_binding_ignores_service_account_without_namespace() -> None:
    deployer = service_account_user("ci", "deployer")
    authorizer = bootstrap_authorizer(cluster_role_binding("sa", "edit", "ServiceAccount:deployer"))
    assert not authorizer.authorize(attrs(deployer, "create", "configmaps", group="")).allowed


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/healthz", True),
        ("/version", True),
        ("/api", True),
        ("/apis/kubevirt.io/v1", True),
        ("/openapi/v3", True),
        ("/metrics", False),
        ("/logs", False),
    ],
)
def test_every_authenticated_user_may_discover(path: str, allowed: bool) -> None:
    request = RequestAttributes(BOB, "get", path=path, resource_request=False)
    assert bootstrap_authorizer().authorize(request).allowed is allowed


def test_every_authenticated_user_may_review_itself() -> None:
    authorizer = bootstrap_authorizer()
    for resource in ("selfsubjectaccessreviews", "selfsubjectrulesreviews"):
        request = attrs(BOB, "create", resource, group="authorization.k8s.io", namespace="")
        assert authorizer.authorize(request).allowed
    request = attrs(
        BOB, "list", "virtualmachineclusterinstancetypes", group="instancetype.kubevirt.io"
    )
    assert authorizer.authorize(request).allowed


def test_unauthenticated_user_gets_only_public_info() -> None:
    anonymous = UserInfo("system:anonymous", ("system:unauthenticated",))
    authorizer = bootstrap_authorizer()

    def may_get(path: str) -> bool:
        request = RequestAttributes(anonymous, "get", path=path, resource_request=False)
        return authorizer.authorize(request).allowed

    assert may_get("/healthz")
    assert not may_get("/apis")


def test_missing_role_is_reported_as_the_reason() -> None:
    authorizer = bootstrap_authorizer(role_binding(NS, "b", "ClusterRole/ghost", "User:alice"))
    decision = authorizer.authorize(attrs(ALICE, "get", "virtualmachines", name="x"))
    assert decision == type(decision)(
        False, 'RBAC: clusterrole.rbac.authorization.k8s.io "ghost" not found'
    )


def test_updates_take_effect_without_rebuilding() -> None:
    authorizer = bootstrap_authorizer()
    request = attrs(ALICE, "get", "virtualmachines", name="x")
    assert not authorizer.authorize(request).allowed
    authorizer.upsert("RoleBinding", role_binding(NS, "b", "ClusterRole/view", "User:alice"))
    assert authorizer.authorize(request).allowed
    authorizer.remove("RoleBinding", NS, "b")
    assert not authorizer.authorize(request).allowed
    authorizer.upsert("RoleBinding", role_binding(NS, "b", "ClusterRole/view", "User:alice"))
    authorizer.replace("ClusterRole", [])
    assert not authorizer.authorize(request).allowed


def test_rebinding_to_other_subjects_drops_the_old_subject() -> None:
    authorizer = bootstrap_authorizer(role_binding(NS, "b", "ClusterRole/view", "User:alice"))
    authorizer.upsert("RoleBinding", role_binding(NS, "b", "ClusterRole/view", "User:bob"))
    assert not authorizer.authorize(attrs(ALICE, "list", "virtualmachines")).allowed
    assert authorizer.authorize(attrs(BOB, "list", "virtualmachines")).allowed


def test_many_unrelated_bindings_are_not_scanned() -> None:
    unrelated = [
        role_binding(f"ns{i}", f"b{i}", "ClusterRole/view", f"User:user{i}") for i in range(10_000)
    ]
    authorizer = RBACAuthorizer(cluster_roles=bootstrap_cluster_roles(), role_bindings=unrelated)
    # every binding now raises if touched while deciding for alice
    for binding in authorizer._role_bindings.by_key.values():
        object.__setattr__(binding, "subjects", _Exploding())
    assert not authorizer.authorize(attrs(ALICE, "get", "virtualmachines", name="x")).allowed


class _Exploding(tuple[Any, ...]):
    def __iter__(self) -> Any:
        raise AssertionError("an unrelated binding was scanned")


# --------------------------------------------------------------------------- rules review


def test_rules_for_lists_cluster_and_namespace_rules() -> None:
    authorizer = bootstrap_authorizer(
        role_binding(NS, "b", "ClusterRole/kubevirt.io:migrate", "User:alice")
    )
    resource_rules, non_resource_rules, incomplete = authorizer.rules_for(ALICE, NS)
    assert {
        "verbs": ["update"],
        "apiGroups": ["subresources.kubevirt.io"],
        "resources": ["virtualmachines/migrate"],
    } in resource_rules
    assert any("/apis/*" in r["nonResourceURLs"] for r in non_resource_rules)
    assert not incomplete
    elsewhere, _, _ = authorizer.rules_for(ALICE, "other")
    assert not any("virtualmachines/migrate" in r["resources"] for r in elsewhere)


def test_rules_for_is_incomplete_when_a_role_is_missing() -> None:
    authorizer = bootstrap_authorizer(role_binding(NS, "b", "Role/ghost", "User:alice"))
    review = authorizer.rules_for(ALICE, NS)
    assert review.incomplete
    assert review.evaluation_error == 'role.rbac.authorization.k8s.io "ghost" not found'


# --------------------------------------------------------------------------- aggregation


def _rule_set(rules: list[JSON]) -> set[PolicyRule]:
    return {PolicyRule.from_json(r) for r in rules}


def test_admin_aggregates_kubevirt_admin_rules() -> None:
    roles = {r["metadata"]["name"]: r for r in bootstrap_cluster_roles()}
    assert _rule_set(roles["kubevirt.io:admin"]["rules"]) <= _rule_set(roles["admin"]["rules"])
    assert _rule_set(roles["kubevirt.io:edit"]["rules"]) <= _rule_set(roles["edit"]["rules"])
    assert _rule_set(roles["kubevirt.io:view"]["rules"]) <= _rule_set(roles["view"]["rules"])


def test_aggregation_is_transitive_through_aggregated_roles() -> None:
    roles = {r["metadata"]["name"]: r for r in bootstrap_cluster_roles()}
    # view is labelled aggregate-to-edit, edit aggregate-to-admin
    assert _rule_set(roles["view"]["rules"]) <= _rule_set(roles["edit"]["rules"])
    assert _rule_set(roles["edit"]["rules"]) <= _rule_set(roles["admin"]["rules"])
    assert _rule_set(roles["kubevirt.io:view"]["rules"]) <= _rule_set(roles["admin"]["rules"])


def test_migrate_is_not_aggregated_into_admin() -> None:
    roles = {r["metadata"]["name"]: r for r in bootstrap_cluster_roles()}
    admin = _rule_set(roles["admin"]["rules"])
    assert not any("virtualmachines/migrate" in r.resources for r in admin)


def test_aggregation_honours_match_expressions_and_drops_duplicates() -> None:
    shared = rule("get", "kubevirt.io", "virtualmachines")
    roles = [
        {
            "kind": "ClusterRole",
            "metadata": {"name": "target"},
            "aggregationRule": {
                "clusterRoleSelectors": [
                    {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}
                ]
            },
        },
        cluster_role("a", shared, labels={"tier": "a"}),
        cluster_role("b", shared, rule("list", "kubevirt.io", "x"), labels={"tier": "b"}),
        cluster_role("c", rule("delete", "*", "*"), labels={"tier": "c"}),
    ]
    assert aggregate_cluster_roles(roles) == {
        "target": [
            {"verbs": ["get"], "apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"]},
            {"verbs": ["list"], "apiGroups": ["kubevirt.io"], "resources": ["x"]},
        ]
    }


def test_edit_has_no_deletecollection_or_screenshot_but_admin_does() -> None:
    authorizer = bootstrap_authorizer(
        role_binding(NS, "e", "ClusterRole/edit", "User:alice"),
        role_binding(NS, "a", "ClusterRole/admin", "User:bob"),
    )
    collection = attrs(ALICE, "deletecollection", "virtualmachines")
    assert not authorizer.authorize(collection).allowed
    assert authorizer.authorize(attrs(BOB, "deletecollection", "virtualmachines")).allowed
    kubevirt_edit = {r["metadata"]["name"]: r for r in bootstrap_cluster_roles()}[
        "kubevirt.io:edit"
    ]
    assert not any(
        "virtualmachineinstances/vnc/screenshot" in r["resources"] for r in kubevirt_edit["rules"]
    )


# --------------------------------------------------------------------------- escalation


def _role_obj(kind: str, *rules: JSON, aggregated: bool = False) -> JSON:
    obj: JSON = {"kind": kind, "metadata": {"name": "new"}, "rules": list(rules)}
    if kind == "Role":
        obj["metadata"]["namespace"] = NS
    if aggregated:
        obj["aggregationRule"] = {"clusterRoleSelectors": [{"matchLabels": {"x": "y"}}]}
    return obj


def test_creating_a_role_within_held_permissions_is_allowed() -> None:
    authorizer = bootstrap_authorizer(role_binding(NS, "a", "ClusterRole/admin", "User:alice"))
    check_role_escalation(
        ALICE,
        authorizer,
        role=_role_obj("Role", rule("get list", "kubevirt.io", "virtualmachines")),
    )


def test_creating_a_role_beyond_held_permissions_is_forbidden_with_upstream_message() -> None:
    authorizer = bootstrap_authorizer(role_binding(NS, "a", "ClusterRole/admin", "User:alice"))
    wanted = _role_obj(
        "Role",
        rule("update", "subresources.kubevirt.io", "virtualmachines/migrate"),
        rule("get list", "kubevirt.io", "virtualmachines"),
    )
    with pytest.raises(ApiError) as refused:
        check_role_escalation(ALICE, authorizer, role=wanted)
    assert refused.value.code == 403
    assert refused.value.message == (
        'roles.rbac.authorization.k8s.io "new" is forbidden: user "alice"'
        ' (groups=["devs" "system:authenticated"]) is attempting to grant RBAC permissions'
        " not currently held:\n"
        '{APIGroups:["subresources.kubevirt.io"], Resources:["virtualmachines/migrate"],'
        ' Verbs:["update"]}'
    )


def test_escalation_causes_are_compacted_per_resource() -> None:
    authorizer = bootstrap_authorizer()
    causes = escalation_causes(
        BOB, authorizer, NS, [rule("get list", "kubevirt.io", "virtualmachines a")]
    )
    assert causes == [
        '{APIGroups:["kubevirt.io"], Resources:["a"], Verbs:["get" "list"]}',
        '{APIGroups:["kubevirt.io"], Resources:["virtualmachines"], Verbs:["get" "list"]}',
    ]


def test_escalate_verb_permits_granting_more() -> None:
    escalator = cluster_role("escalator", rule("escalate", "rbac.authorization.k8s.io", "roles"))
    authorizer = bootstrap_authorizer(role_binding(NS, "e", "ClusterRole/escalator", "User:alice"))
    authorizer.upsert("ClusterRole", escalator)
    check_role_escalation(ALICE, authorizer, role=_role_obj("Role", rule("*", "*", "*")))


def test_escalate_limited_by_name_does_not_apply_to_create() -> None:
    escalator = cluster_role(
        "escalator", rule("escalate", "rbac.authorization.k8s.io", "roles", "new")
    )
    authorizer = bootstrap_authorizer(role_binding(NS, "e", "ClusterRole/escalator", "User:alice"))
    authorizer.upsert("ClusterRole", escalator)
    wanted = _role_obj("Role", rule("*", "*", "*"))
    with pytest.raises(ApiError):
        check_role_escalation(ALICE, authorizer, role=wanted)
    check_role_escalation(ALICE, authorizer, role=wanted, request_name="new")


def test_aggregated_cluster_role_needs_full_authority() -> None:
    authorizer = bootstrap_authorizer(cluster_role_binding("a", "admin", "User:alice"))
    with pytest.raises(ApiError):
        check_role_escalation(ALICE, authorizer, role=_role_obj("ClusterRole", aggregated=True))
    check_role_escalation(ROOT, authorizer, role=_role_obj("ClusterRole", aggregated=True))


def test_binding_a_held_role_is_allowed() -> None:
    authorizer = bootstrap_authorizer(role_binding(NS, "a", "ClusterRole/admin", "User:alice"))
    binding = role_binding(NS, "give-bob", "ClusterRole/kubevirt.io:edit", "User:bob")
    check_binding_escalation(ALICE, authorizer, binding=binding)


def test_binding_an_unheld_role_is_forbidden() -> None:
    authorizer = bootstrap_authorizer(role_binding(NS, "a", "ClusterRole/admin", "User:alice"))
    binding = role_binding(NS, "give-bob", "ClusterRole/kubevirt.io:migrate", "User:bob")
    with pytest.raises(ApiError) as refused:
        check_binding_escalation(ALICE, authorizer, binding=binding)
    assert refused.value.message.startswith(
        'rolebindings.rbac.authorization.k8s.io "give-bob" is forbidden: user "alice"'
    )
    assert "virtualmachineinstancemigrations" in refused.value.message


def test_bind_verb_on_the_named_role_permits_binding() -> None:
    binder = cluster_role(
        "binder", rule("bind", "rbac.authorization.k8s.io", "clusterroles", "kubevirt.io:migrate")
    )
    authorizer = bootstrap_authorizer(role_binding(NS, "b", "ClusterRole/binder", "User:alice"))
    authorizer.upsert("ClusterRole", binder)
    migrate = role_binding(NS, "m", "ClusterRole/kubevirt.io:migrate", "User:bob")
    check_binding_escalation(ALICE, authorizer, binding=migrate)
    cluster_admin = role_binding(NS, "c", "ClusterRole/cluster-admin", "User:bob")
    with pytest.raises(ApiError):
        check_binding_escalation(ALICE, authorizer, binding=cluster_admin)


def test_namespace_admin_cannot_create_cluster_role_binding() -> None:
    authorizer = bootstrap_authorizer(role_binding(NS, "a", "ClusterRole/admin", "User:alice"))
    binding = cluster_role_binding("everywhere", "view", "User:bob")
    with pytest.raises(ApiError):
        check_binding_escalation(ALICE, authorizer, binding=binding)


def test_binding_a_missing_role_is_not_found() -> None:
    authorizer = bootstrap_authorizer()
    with pytest.raises(ApiError) as refused:
        check_binding_escalation(
            BOB, authorizer, binding=role_binding(NS, "x", "Role/ghost", "User:bob")
        )
    assert refused.value.code == 404


# --------------------------------------------------------------------------- forbidden messages

FORBIDDEN = [
    (
        attrs(ALICE, "get", "virtualmachines", name="vm1"),
        'virtualmachines.kubevirt.io "vm1" is forbidden: User "alice" cannot get resource'
        ' "virtualmachines" in API group "kubevirt.io" in the namespace "virtual-machines"',
    ),
    (
        attrs(ALICE, "list", "virtualmachines"),
        'virtualmachines.kubevirt.io is forbidden: User "alice" cannot list resource'
        ' "virtualmachines" in API group "kubevirt.io" in the namespace "virtual-machines"',
    ),
    (
        attrs(
            ALICE,
            "update",
            "virtualmachines",
            group="subresources.kubevirt.io",
            name="vm1",
            subresource="start",
        ),
        'virtualmachines.subresources.kubevirt.io "vm1" is forbidden: User "alice" cannot update'
        ' resource "virtualmachines/start" in API group "subresources.kubevirt.io" in the'
        ' namespace "virtual-machines"',
    ),
    (
        attrs(ALICE, "list", "nodes", group="", namespace=""),
        'nodes is forbidden: User "alice" cannot list resource "nodes" in API group ""'
        " at the cluster scope",
    ),
    (
        RequestAttributes(ALICE, "get", path="/metrics", resource_request=False),
        'forbidden: User "alice" cannot get path "/metrics"',
    ),
]


@pytest.mark.parametrize(("request_", "message"), FORBIDDEN)
def test_forbidden_message_matches_kube_apiserver(
    request_: RequestAttributes, message: str
) -> None:
    assert forbidden_message(request_) == message


def test_forbidden_message_appends_the_authorizer_reason() -> None:
    message = forbidden_message(attrs(ALICE, "list", "virtualmachines"), "RBAC: boom")
    assert message.endswith('in the namespace "virtual-machines": RBAC: boom')


def test_holding_a_rule_for_named_objects_covers_only_those_names() -> None:
    per_vm = role(NS, "vm1-viewer", rule("get", "kubevirt.io", "virtualmachines", "vm1"))
    authorizer = bootstrap_authorizer(
        role_binding(NS, "b", "Role/vm1-viewer", "User:alice"), roles=(per_vm,)
    )
    named = rule("get", "kubevirt.io", "virtualmachines", "vm1")
    assert escalation_causes(ALICE, authorizer, NS, [named]) == []
    other = rule("get", "kubevirt.io", "virtualmachines", "vm2")
    assert escalation_causes(ALICE, authorizer, NS, [other]) != []
    unnamed = rule("get", "kubevirt.io", "virtualmachines")
    assert escalation_causes(ALICE, authorizer, NS, [unnamed]) != []
