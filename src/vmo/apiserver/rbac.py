"""Role-based access control with Kubernetes semantics, as pure functions over stored RBAC objects.

``request_attributes`` resolves an HTTP request as kube-apiserver's RequestInfo does;
``RBACAuthorizer`` answers allow/deny from indexed Roles, ClusterRoles and their bindings;
``rules_for`` feeds SelfSubjectRulesReview; ``aggregate_cluster_roles`` is the aggregation
controller's decision; ``check_role_escalation`` / ``check_binding_escalation`` refuse grants a
user does not already hold, with kube-apiserver's messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmo.apiserver.errors import ApiError
from vmo.apiserver.selectors import SelectorError, label_selector_from_json, parse_field_selector

JSON = dict[str, Any]

RBAC_GROUP = "rbac.authorization.k8s.io"
MASTERS_GROUP = "system:masters"
AUTHENTICATED_GROUP = "system:authenticated"
UNAUTHENTICATED_GROUP = "system:unauthenticated"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"

RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")

# RequestInfo: path prefixes that carry resources, and the verbs spelled as a path segment
_API_PREFIXES = ("api", "apis")
_SPECIAL_VERBS = ("proxy", "watch")
_NAMESPACE_SUBRESOURCES = ("status", "finalize")
_METHOD_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}


class RequestInfoError(ValueError):
    """A resource URL whose kind and namespace cannot be determined (e.g. ``/api/v1/watch``)."""


# --------------------------------------------------------------------------- request attributes


@dataclass(frozen=True)
class UserInfo:
    """An authenticated user as authorizers see it."""

    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)


def service_account_user(namespace: str, name: str, uid: str = "") -> UserInfo:
    """The user a ServiceAccount token authenticates as, with the groups upstream gives it."""
    return UserInfo(
        name=f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}",
        groups=(
            SERVICE_ACCOUNTS_GROUP,
            f"{SERVICE_ACCOUNTS_GROUP}:{namespace}",
            AUTHENTICATED_GROUP,
        ),
        uid=uid,
    )


@dataclass(frozen=True)
class RequestAttributes:
    """What an authorizer decides on: Kubernetes' ``authorizer.Attributes``."""

    user: UserInfo
    verb: str
    namespace: str = ""
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    path: str = ""
    resource_request: bool = True


def request_attributes(
    method: str, path: str, query: Mapping[str, str], user: UserInfo
) -> RequestAttributes:
    """Resolve an HTTP request into authorization attributes, as kube-apiserver's RequestInfo.

    Raises ``RequestInfoError`` for ``/api/v1/watch`` or ``/api/v1/proxy`` with nothing after.
    """
    non_resource = RequestAttributes(user, method.lower(), path=path, resource_request=False)
    parts = [p for p in path.split("/") if p]
    if len(parts) < 3 or parts[0] not in _API_PREFIXES:
        return non_resource
    group = ""
    rest = parts[1:]
    if parts[0] == "apis":
        if len(rest) < 3:
            return non_resource
        group, rest = rest[0], rest[1:]
    version, rest = rest[0], rest[1:]
    verb, rest = _verb_and_rest(method, rest, path)
    namespace, rest = _namespace_and_rest(rest)
    resource, name, subresource = _resource_parts(rest, verb)
    if not name and verb == "get":
        verb, name = _collection_read(query)
    if not name and verb == "delete":
        verb = "deletecollection"
    return RequestAttributes(
        user,
        verb,
        namespace=namespace,
        api_group=group,
        api_version=version,
        resource=resource,
        subresource=subresource,
        name=name,
        path=path,
    )


def _verb_and_rest(method: str, rest: list[str], path: str) -> tuple[str, list[str]]:
    if rest and rest[0] in _SPECIAL_VERBS:
        if len(rest) < 2:
            raise RequestInfoError(f"unable to determine kind and namespace from url, {path}")
        return rest[0], rest[1:]
    return _METHOD_VERBS.get(method.upper(), ""), rest


def _namespace_and_rest(rest: list[str]) -> tuple[str, list[str]]:
    if not rest or rest[0] != "namespaces" or len(rest) < 2:
        return "", rest
    # /namespaces/{ns}/status is the namespace's own subresource, not a resource in it
    if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
        return rest[1], rest[2:]
    return rest[1], rest


def _resource_parts(rest: list[str], verb: str) -> tuple[str, str, str]:
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    # proxy takes the whole remainder as a path, never a subresource
    subresource = rest[2] if len(rest) > 2 and verb != "proxy" else ""
    return resource, name, subresource


def _collection_read(query: Mapping[str, str]) -> tuple[str, str]:
    """(list|watch, name) for a GET on a collection; a metadata.name field selector names it."""
    verb = "watch" if _query_bool(query.get("watch")) else "list"
    selector = query.get("fieldSelector", "")
    if not selector:
        return verb, ""
    try:
        name = parse_field_selector(selector).value_for("metadata.name")
    except SelectorError:
        return verb, ""
    if name is None or name in (".", "..") or "/" in name or "%" in name:
        return verb, ""
    return verb, name


def _query_bool(value: str | None) -> bool:
    """Kubernetes' query-parameter bool: present and not "0"/"false" means true."""
    return value is not None and value.lower() not in ("0", "false")


def review_attributes(spec: Mapping[str, Any], user: UserInfo) -> RequestAttributes:
    """Attributes for a (Self|Local)SubjectAccessReview spec, for the user it is about."""
    non_resource = spec.get("nonResourceAttributes")
    if isinstance(non_resource, Mapping):
        return RequestAttributes(
            user,
            str(non_resource.get("verb", "")),
            path=str(non_resource.get("path", "")),
            resource_request=False,
        )
    attrs = spec.get("resourceAttributes") or {}
    return RequestAttributes(
        user,
        str(attrs.get("verb", "")),
        namespace=str(attrs.get("namespace", "")),
        api_group=str(attrs.get("group", "")),
        api_version=str(attrs.get("version", "")),
        resource=str(attrs.get("resource", "")),
        subresource=str(attrs.get("subresource", "")),
        name=str(attrs.get("name", "")),
    )


def user_from_review_spec(spec: Mapping[str, Any]) -> UserInfo:
    """The user a SubjectAccessReview asks about."""
    extra = {str(k): tuple(str(x) for x in v) for k, v in (spec.get("extra") or {}).items()}
    return UserInfo(
        name=str(spec.get("user", "")),
        groups=tuple(str(g) for g in spec.get("groups") or ()),
        uid=str(spec.get("uid", "")),
        extra=extra,
    )


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class PolicyRule:
    """One ``rules[]`` entry of a Role or ClusterRole."""

    verbs: tuple[str, ...] = ()
    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, rule: Mapping[str, Any]) -> PolicyRule:
        def strings(key: str) -> tuple[str, ...]:
            return tuple(str(v) for v in rule.get(key) or ())

        return cls(
            verbs=strings("verbs"),
            api_groups=strings("apiGroups"),
            resources=strings("resources"),
            resource_names=strings("resourceNames"),
            non_resource_urls=strings("nonResourceURLs"),
        )

    def to_json(self) -> JSON:
        out: JSON = {"verbs": list(self.verbs)}
        if self.api_groups:
            out["apiGroups"] = list(self.api_groups)
        if self.resources:
            out["resources"] = list(self.resources)
        if self.resource_names:
            out["resourceNames"] = list(self.resource_names)
        if self.non_resource_urls:
            out["nonResourceURLs"] = list(self.non_resource_urls)
        return out

    def compact_string(self) -> str:
        """Upstream's ``CompactString``: ``{APIGroups:["g"], Resources:["r"], Verbs:["get"]}``."""
        fields = (
            ("APIGroups", self.api_groups),
            ("Resources", self.resources),
            ("NonResourceURLs", self.non_resource_urls),
            ("ResourceNames", self.resource_names),
            ("Verbs", self.verbs),
        )
        return "{" + ", ".join(f"{k}:{_go_quote_list(v)}" for k, v in fields if v) + "}"


def rules_from_json(rules: Iterable[Mapping[str, Any]] | None) -> tuple[PolicyRule, ...]:
    return tuple(PolicyRule.from_json(r) for r in rules or ())


def _go_quote_list(values: Sequence[str]) -> str:
    """Go's ``%q`` of a ``[]string``: ``["a" "b"]``."""
    return "[" + " ".join(json.dumps(v, ensure_ascii=False) for v in values) + "]"


def rule_allows(attrs: RequestAttributes, rule: PolicyRule) -> bool:
    """Whether one rule grants the request (upstream ``RuleAllows``)."""
    if not _verb_matches(rule, attrs.verb):
        return False
    if not attrs.resource_request:
        return _non_resource_url_matches(rule, attrs.path)
    combined = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    return (
        _group_matches(rule, attrs.api_group)
        and _resource_matches(rule, combined, attrs.subresource)
        and _resource_name_matches(rule, attrs.name)
    )


def _verb_matches(rule: PolicyRule, verb: str) -> bool:
    return "*" in rule.verbs or verb in rule.verbs


def _group_matches(rule: PolicyRule, group: str) -> bool:
    return "*" in rule.api_groups or group in rule.api_groups


def _resource_matches(rule: PolicyRule, combined: str, subresource: str) -> bool:
    for allowed in rule.resources:
        if allowed in ("*", combined):
            return True
        if subresource and allowed == f"*/{subresource}":
            return True
    return False


def _resource_name_matches(rule: PolicyRule, name: str) -> bool:
    # A rule naming objects never matches a request without a name (list, create, ...)
    return not rule.resource_names or name in rule.resource_names


def _non_resource_url_matches(rule: PolicyRule, path: str) -> bool:
    return any(_url_covers(allowed, path) for allowed in rule.non_resource_urls)


def _url_covers(allowed: str, path: str) -> bool:
    if allowed in ("*", path):
        return True
    return allowed.endswith("*") and path.startswith(allowed.rstrip("*"))


# --------------------------------------------------------------------------- bindings


@dataclass(frozen=True)
class Subject:
    kind: str
    name: str
    namespace: str = ""


@dataclass(frozen=True)
class _Binding:
    kind: str  # RoleBinding or ClusterRoleBinding
    namespace: str
    name: str
    role_kind: str
    role_name: str
    subjects: tuple[Subject, ...]

    @classmethod
    def from_json(cls, kind: str, obj: Mapping[str, Any]) -> _Binding:
        meta = obj.get("metadata") or {}
        ref = obj.get("roleRef") or {}
        subjects = tuple(
            Subject(str(s.get("kind", "")), str(s.get("name", "")), str(s.get("namespace", "")))
            for s in obj.get("subjects") or ()
        )
        return cls(
            kind=kind,
            namespace=str(meta.get("namespace", "")) if kind == "RoleBinding" else "",
            name=str(meta.get("name", "")),
            role_kind=str(ref.get("kind", "")),
            role_name=str(ref.get("name", "")),
            subjects=subjects,
        )

    def subject_keys(self) -> Iterator[tuple[str, str]]:
        """Index keys of the users this binding can apply to."""
        for subject in self.subjects:
            key = _subject_key(subject, self.namespace)
            if key is not None:
                yield key

    def first_applying(self, user: UserInfo) -> Subject | None:
        keys = _user_keys(user)
        for subject in self.subjects:
            if _subject_key(subject, self.namespace) in keys:
                return subject
        return None

    def describe(self, subject: Subject) -> str:
        """Upstream's binding describer, used in ``RBAC: allowed by ...`` reasons."""
        if self.kind == "RoleBinding":
            # upstream writes name/namespace here, the reverse of the usual order
            who = f"{self.name}/{self.namespace}"
            return (
                f"RoleBinding {_go_quote(who)} of {self.role_kind} {_go_quote(self.role_name)}"
                f" to {_describe_subject(subject, self.namespace)}"
            )
        return (
            f"ClusterRoleBinding {_go_quote(self.name)} of {self.role_kind}"
            f" {_go_quote(self.role_name)} to {_describe_subject(subject, '')}"
        )


def _go_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _describe_subject(subject: Subject, binding_namespace: str) -> str:
    if subject.kind == "ServiceAccount":
        namespace = subject.namespace or binding_namespace
        return f"{subject.kind} {_go_quote(subject.name + '/' + namespace)}"
    return f"{subject.kind} {_go_quote(subject.name)}"


def _subject_key(subject: Subject, binding_namespace: str) -> tuple[str, str] | None:
    if subject.kind in ("User", "Group"):
        return subject.kind, subject.name
    if subject.kind == "ServiceAccount":
        # a RoleBinding's ServiceAccount subject defaults to the binding's namespace
        namespace = subject.namespace or binding_namespace
        if not namespace:
            return None
        return "User", f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{subject.name}"
    return None


def _user_keys(user: UserInfo) -> set[tuple[str, str]]:
    return {("User", user.name), *(("Group", g) for g in user.groups)}


# --------------------------------------------------------------------------- authorizer


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


@dataclass(frozen=True)
class SubjectRules:
    """What SelfSubjectRulesReview reports; unpacks as (resource, non-resource, incomplete)."""

    resource_rules: list[JSON]
    non_resource_rules: list[JSON]
    incomplete: bool
    evaluation_error: str = ""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.resource_rules, self.non_resource_rules, self.incomplete))

    def to_status(self) -> JSON:
        status: JSON = {
            "resourceRules": self.resource_rules,
            "nonResourceRules": self.non_resource_rules,
            "incomplete": self.incomplete,
        }
        if self.evaluation_error:
            status["evaluationError"] = self.evaluation_error
        return status


class _BindingIndex:
    """Bindings of one kind, found by the subjects they name rather than by scanning."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str], _Binding] = {}  # (namespace, name) -> binding
        self.by_subject: dict[tuple[str, str, str], set[tuple[str, str]]] = {}

    def add(self, binding: _Binding) -> None:
        key = (binding.namespace, binding.name)
        self.remove(key)
        self.by_key[key] = binding
        for kind, name in binding.subject_keys():
            self.by_subject.setdefault((binding.namespace, kind, name), set()).add(key)

    def remove(self, key: tuple[str, str]) -> None:
        old = self.by_key.pop(key, None)
        if old is None:
            return
        for kind, name in old.subject_keys():
            holders = self.by_subject.get((old.namespace, kind, name))
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self.by_subject[(old.namespace, kind, name)]

    def applying(self, user: UserInfo, namespace: str) -> list[tuple[_Binding, Subject]]:
        keys: set[tuple[str, str]] = set()
        for kind, name in _user_keys(user):
            keys |= self.by_subject.get((namespace, kind, name), set())
        found = []
        for key in sorted(keys):
            binding = self.by_key[key]
            subject = binding.first_applying(user)
            if subject is not None:
                found.append((binding, subject))
        return found


class RBACAuthorizer:
    """Kubernetes' RBAC authorizer over indexed objects; cheap to update one object at a time.

    A request looks up only the bindings naming the user, their groups or their ServiceAccount,
    so unrelated objects cost nothing per request. Members of ``system:masters`` are always
    allowed, as kube-apiserver's privileged-group authorizer does ahead of RBAC.
    """

    def __init__(
        self,
        *,
        roles: Iterable[Mapping[str, Any]] = (),
        cluster_roles: Iterable[Mapping[str, Any]] = (),
        role_bindings: Iterable[Mapping[str, Any]] = (),
        cluster_role_bindings: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        self._roles: dict[tuple[str, str], tuple[PolicyRule, ...]] = {}
        self._cluster_roles: dict[str, tuple[PolicyRule, ...]] = {}
        self._role_bindings = _BindingIndex()
        self._cluster_role_bindings = _BindingIndex()
        self.replace("Role", roles)
        self.replace("ClusterRole", cluster_roles)
        self.replace("RoleBinding", role_bindings)
        self.replace("ClusterRoleBinding", cluster_role_bindings)

    # ---- keeping the index current

    def replace(self, kind: str, objects: Iterable[Mapping[str, Any]]) -> None:
        """Drop every object of ``kind`` and index ``objects`` instead."""
        _check_kind(kind)
        if kind == "Role":
            self._roles = {}
        elif kind == "ClusterRole":
            self._cluster_roles = {}
        elif kind == "RoleBinding":
            self._role_bindings = _BindingIndex()
        else:
            self._cluster_role_bindings = _BindingIndex()
        for obj in objects:
            self.upsert(kind, obj)

    def upsert(self, kind: str, obj: Mapping[str, Any]) -> None:
        """Index one object that was created or changed."""
        _check_kind(kind)
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        if kind == "Role":
            self._roles[(namespace, name)] = rules_from_json(obj.get("rules"))
        elif kind == "ClusterRole":
            self._cluster_roles[name] = rules_from_json(obj.get("rules"))
        elif kind == "RoleBinding":
            self._role_bindings.add(_Binding.from_json(kind, obj))
        else:
            self._cluster_role_bindings.add(_Binding.from_json(kind, obj))

    def remove(self, kind: str, namespace: str, name: str) -> None:
        """Forget one deleted object."""
        _check_kind(kind)
        if kind == "Role":
            self._roles.pop((namespace, name), None)
        elif kind == "ClusterRole":
            self._cluster_roles.pop(name, None)
        elif kind == "RoleBinding":
            self._role_bindings.remove((namespace, name))
        else:
            self._cluster_role_bindings.remove(("", name))

    # ---- decisions

    def authorize(self, attrs: RequestAttributes) -> Decision:
        if MASTERS_GROUP in attrs.user.groups:
            return Decision(True)
        errors: list[str] = []
        for source, rules, error in self._visit(attrs.user, attrs.namespace):
            if error:
                errors.append(error)
            for rule in rules:
                if rule_allows(attrs, rule):
                    return Decision(True, f"RBAC: allowed by {source}")
        return Decision(False, f"RBAC: {_aggregate(errors)}" if errors else "")

    def policy_rules(self, user: UserInfo, namespace: str) -> tuple[list[PolicyRule], list[str]]:
        """Every rule that applies to the user in the namespace, and role resolution errors."""
        rules: list[PolicyRule] = []
        errors: list[str] = []
        for _source, found, error in self._visit(user, namespace):
            rules.extend(found)
            if error:
                errors.append(error)
        return rules, errors

    def rules_for(self, user: UserInfo, namespace: str) -> SubjectRules:
        """The rules SelfSubjectRulesReview reports for the user in the namespace."""
        rules, errors = self.policy_rules(user, namespace)
        resource_rules = [_resource_rule_json(r) for r in rules if r.resources]
        non_resource_rules = [
            {"verbs": list(r.verbs), "nonResourceURLs": list(r.non_resource_urls)}
            for r in rules
            if r.non_resource_urls
        ]
        return SubjectRules(
            resource_rules,
            non_resource_rules,
            incomplete=bool(errors),
            evaluation_error=_aggregate(errors) if errors else "",
        )

    def _visit(
        self, user: UserInfo, namespace: str
    ) -> Iterator[tuple[str, tuple[PolicyRule, ...], str]]:
        """(source description, rules, resolution error) per applying binding, cluster first."""
        bindings = self._cluster_role_bindings.applying(user, "")
        if namespace:
            bindings += self._role_bindings.applying(user, namespace)
        for binding, subject in bindings:
            rules, error = self._role_rules(binding.role_kind, binding.role_name, binding.namespace)
            yield binding.describe(subject), rules, error

    def _role_rules(
        self, kind: str, name: str, namespace: str
    ) -> tuple[tuple[PolicyRule, ...], str]:
        if kind == "ClusterRole":
            rules = self._cluster_roles.get(name)
            missing = f'clusterrole.{RBAC_GROUP} "{name}" not found'
        elif kind == "Role":
            rules = self._roles.get((namespace, name))
            missing = f'role.{RBAC_GROUP} "{name}" not found'
        else:
            return (), f'unsupported role reference kind: "{kind}"'
        return (rules, "") if rules is not None else ((), missing)

    def role_reference_rules(self, kind: str, name: str, namespace: str) -> tuple[PolicyRule, ...]:
        """The rules a binding's roleRef grants; ``ApiError`` NotFound when the role is missing."""
        rules, error = self._role_rules(kind, name, namespace)
        if error:
            # upstream's listers report the singular resource: clusterrole.rbac... "x" not found
            resource = kind.lower() if kind in ("Role", "ClusterRole") else ""
            raise ApiError(404, "NotFound", error, kind=resource, group=RBAC_GROUP, name=name)
        return rules


def _check_kind(kind: str) -> None:
    if kind not in RBAC_KINDS:
        raise ValueError(f"not an RBAC kind: {kind!r}")


def _aggregate(errors: Sequence[str]) -> str:
    """utilerrors.NewAggregate's text: the error alone, or ``[a, b]``."""
    return errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"


def _resource_rule_json(rule: PolicyRule) -> JSON:
    out: JSON = {"verbs": list(rule.verbs)}
    if rule.api_groups:
        out["apiGroups"] = list(rule.api_groups)
    out["resources"] = list(rule.resources)
    if rule.resource_names:
        out["resourceNames"] = list(rule.resource_names)
    return out


def rules_for(authorizer: RBACAuthorizer, user: UserInfo, namespace: str) -> SubjectRules:
    """Module-level spelling of ``RBACAuthorizer.rules_for``."""
    return authorizer.rules_for(user, namespace)


# --------------------------------------------------------------------------- forbidden messages


def forbidden_message(attrs: RequestAttributes, reason: str = "") -> str:
    """The ``Status.message`` kube-apiserver sends when authorization refuses a request."""
    user = _go_quote(attrs.user.name)
    if not attrs.resource_request:
        detail = f"User {user} cannot {attrs.verb} path {_go_quote(attrs.path)}"
    else:
        resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
        scope = (
            f"in the namespace {_go_quote(attrs.namespace)}"
            if attrs.namespace
            else "at the cluster scope"
        )
        detail = (
            f"User {user} cannot {attrs.verb} resource {_go_quote(resource)}"
            f" in API group {_go_quote(attrs.api_group)} {scope}"
        )
    if reason:
        detail = f"{detail}: {reason}"
    return _forbidden_prefix(attrs.resource, attrs.api_group, attrs.name) + detail


def _forbidden_prefix(resource: str, group: str, name: str) -> str:
    """``NewForbidden``'s lead: ``forbidden: ``, ``res.group is forbidden: `` or with a name."""
    if not resource and not group:
        return "forbidden: "
    qualified = f"{resource}.{group}" if group else resource
    if not name:
        return f"{qualified} is forbidden: "
    return f"{qualified} {_go_quote(name)} is forbidden: "


def forbidden(attrs: RequestAttributes, reason: str = "") -> ApiError:
    """The 403 ``ApiError`` for a refused request."""
    return ApiError(
        403,
        "Forbidden",
        forbidden_message(attrs, reason),
        kind=attrs.resource,
        group=attrs.api_group,
        name=attrs.name,
    )


# --------------------------------------------------------------------------- aggregation


def aggregate_cluster_roles(cluster_roles: Sequence[Mapping[str, Any]]) -> dict[str, list[JSON]]:
    """For each ClusterRole with an ``aggregationRule``, the rules it must hold.

    Rules of the selected roles are concatenated in selector order, roles by name, duplicates
    dropped, as the clusterrole-aggregation controller does. Aggregated roles that are themselves
    selected (``edit`` into ``admin``) contribute their aggregated rules: iterate to a fixpoint.
    """
    current = {_name(r): list(rules_from_json(r.get("rules"))) for r in cluster_roles}
    labels = {_name(r): dict((r.get("metadata") or {}).get("labels") or {}) for r in cluster_roles}
    aggregated = sorted(
        (_name(r), tuple((r.get("aggregationRule") or {}).get("clusterRoleSelectors") or ()))
        for r in cluster_roles
        if r.get("aggregationRule") is not None
    )
    for _ in range(len(aggregated) + 1):
        changed = False
        for name, selectors in aggregated:
            rules = _aggregate_rules(name, selectors, current, labels)
            if rules != current[name]:
                current[name], changed = rules, True
        if not changed:
            break
    return {name: [r.to_json() for r in current[name]] for name, _ in aggregated}


def _aggregate_rules(
    name: str,
    selectors: Sequence[Mapping[str, Any]],
    current: Mapping[str, list[PolicyRule]],
    labels: Mapping[str, Mapping[str, str]],
) -> list[PolicyRule]:
    rules: list[PolicyRule] = []
    for selector_json in selectors:
        selector = label_selector_from_json(dict(selector_json))
        for other in sorted(current):
            if other == name or not selector.matches(labels[other]):
                continue
            rules.extend(r for r in current[other] if r not in rules)
    return rules


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


# --------------------------------------------------------------------------- escalation

# What an aggregated ClusterRole may come to hold; writing one needs every permission.
FULL_AUTHORITY = (
    PolicyRule(verbs=("*",), api_groups=("*",), resources=("*",)),
    PolicyRule(verbs=("*",), non_resource_urls=("*",)),
)


def escalation_causes(
    user: UserInfo,
    authorizer: RBACAuthorizer,
    namespace: str,
    new_rules: Iterable[PolicyRule | Mapping[str, Any]],
) -> list[str]:
    """The compacted rules in ``new_rules`` the user does not hold in ``namespace``, as strings.

    Empty means granting ``new_rules`` is no escalation. Strings are upstream's CompactString
    form, sorted, as they appear in the Forbidden message.
    """
    owned, _errors = authorizer.policy_rules(user, namespace)
    wanted = [r if isinstance(r, PolicyRule) else PolicyRule.from_json(r) for r in new_rules]
    missing = [sub for rule in wanted for sub in breakdown_rule(rule) if not _covered(owned, sub)]
    return sorted({r.compact_string() for r in compact_rules(missing)})


def escalation_message(user: UserInfo, causes: Sequence[str], errors: Sequence[str] = ()) -> str:
    """``user "x" (groups=[...]) is attempting to grant RBAC permissions not currently held:``."""
    message = (
        f"user {_go_quote(user.name)} (groups={_go_quote_list(user.groups)}) is attempting to"
        " grant RBAC permissions not currently held:\n" + "\n".join(causes)
    )
    if errors:
        message += f"; resolution errors: [{_aggregate(errors)}]"
    return message


def breakdown_rule(rule: PolicyRule) -> list[PolicyRule]:
    """Split a rule into single (group, resource, verb[, name]) and (url, verb) rules."""
    out: list[PolicyRule] = []
    names: tuple[tuple[str, ...], ...] = tuple((n,) for n in rule.resource_names) or ((),)
    for group in rule.api_groups:
        for resource in rule.resources:
            for verb in rule.verbs:
                out.extend(
                    PolicyRule((verb,), (group,), (resource,), resource_names=n) for n in names
                )
    for url in rule.non_resource_urls:
        out.extend(PolicyRule((verb,), non_resource_urls=(url,)) for verb in rule.verbs)
    return out


def _covered(owned: Sequence[PolicyRule], sub: PolicyRule) -> bool:
    return any(_rule_covers(owner, sub) for owner in owned)


def _rule_covers(owner: PolicyRule, sub: PolicyRule) -> bool:
    """Upstream ``ruleCovers``: owner covers an atomic rule from ``breakdown_rule``."""
    return (
        _has_all_or_star(owner.verbs, sub.verbs)
        and _has_all_or_star(owner.api_groups, sub.api_groups)
        and _resources_cover(owner.resources, sub.resources)
        and _urls_cover(owner.non_resource_urls, sub.non_resource_urls)
        and _names_cover(owner.resource_names, sub.resource_names)
    )


def _urls_cover(owner: Sequence[str], wanted: Sequence[str]) -> bool:
    return all(any(_url_covers(o, url) for o in owner) for url in wanted)


def _has_all_or_star(owner: Sequence[str], wanted: Sequence[str]) -> bool:
    return "*" in owner or set(wanted) <= set(owner)


def _resources_cover(owner: Sequence[str], wanted: Sequence[str]) -> bool:
    if "*" in owner:
        return True
    for resource in wanted:
        if resource in owner:
            continue
        if "/" not in resource or "*/" + resource.split("/", 1)[1] not in owner:
            return False
    return True


def _names_cover(owner: Sequence[str], wanted: Sequence[str]) -> bool:
    if not owner:
        return True
    return bool(wanted) and set(wanted) <= set(owner)


def compact_rules(rules: Sequence[PolicyRule]) -> list[PolicyRule]:
    """Merge single-group, single-resource, at-most-one-name rules that differ only in verbs."""
    simple: dict[tuple[str, str, str], PolicyRule] = {}
    compacted: list[PolicyRule] = []
    for rule in rules:
        simple_key = _simple_key(rule)
        if simple_key is None:
            compacted.append(rule)
        elif simple_key in simple:
            held = simple[simple_key]
            simple[simple_key] = PolicyRule(
                held.verbs + rule.verbs, held.api_groups, held.resources, held.resource_names
            )
        else:
            simple[simple_key] = rule
    return compacted + list(simple.values())


def _simple_key(rule: PolicyRule) -> tuple[str, str, str] | None:
    if rule.non_resource_urls or len(rule.api_groups) != 1 or len(rule.resources) != 1:
        return None
    if len(rule.resource_names) > 1 or not rule.verbs:
        return None
    name = rule.resource_names[0] if rule.resource_names else ""
    return rule.api_groups[0], rule.resources[0], name


def _may(authorizer: RBACAuthorizer, attrs: RequestAttributes) -> bool:
    return authorizer.authorize(attrs).allowed


def check_role_escalation(
    user: UserInfo,
    authorizer: RBACAuthorizer,
    *,
    role: Mapping[str, Any],
    request_name: str = "",
) -> None:
    """Refuse (403) writing a Role/ClusterRole with rules the user does not hold.

    Allowed for ``system:masters``, for users with ``escalate`` on the resource (upstream checks
    the request's own name, so on create a rule limited by resourceNames does not apply), and for
    rules the user already holds. An aggregated ClusterRole counts as full authority.
    """
    if MASTERS_GROUP in user.groups:
        return
    kind = str(role.get("kind", "Role"))
    resource = "clusterroles" if kind == "ClusterRole" else "roles"
    meta = role.get("metadata") or {}
    namespace = str(meta.get("namespace", "")) if kind == "Role" else ""
    escalate = RequestAttributes(
        user,
        "escalate",
        namespace=namespace,
        api_group=RBAC_GROUP,
        api_version="*",
        resource=resource,
        name=request_name,
    )
    if _may(authorizer, escalate):
        return
    rules: Sequence[PolicyRule] = rules_from_json(role.get("rules"))
    if kind == "ClusterRole" and role.get("aggregationRule") is not None:
        rules = FULL_AUTHORITY
    _refuse_escalation(user, authorizer, namespace, rules, resource, str(meta.get("name", "")))


def check_binding_escalation(
    user: UserInfo, authorizer: RBACAuthorizer, *, binding: Mapping[str, Any]
) -> None:
    """Refuse (403) a RoleBinding/ClusterRoleBinding to a role whose permissions the user lacks.

    Allowed for ``system:masters``, for users with ``bind`` on the referenced role (by name), and
    for users already holding every rule of the role in the binding's namespace.
    """
    if MASTERS_GROUP in user.groups:
        return
    kind = str(binding.get("kind", "RoleBinding"))
    resource = "clusterrolebindings" if kind == "ClusterRoleBinding" else "rolebindings"
    meta = binding.get("metadata") or {}
    namespace = str(meta.get("namespace", "")) if kind == "RoleBinding" else ""
    ref = binding.get("roleRef") or {}
    ref_kind, ref_name = str(ref.get("kind", "")), str(ref.get("name", ""))
    if ref_kind in ("Role", "ClusterRole"):
        bind = RequestAttributes(
            user,
            "bind",
            namespace=namespace,
            api_group=str(ref.get("apiGroup", RBAC_GROUP)),
            resource="clusterroles" if ref_kind == "ClusterRole" else "roles",
            name=ref_name,
        )
        if _may(authorizer, bind):
            return
    rules = authorizer.role_reference_rules(ref_kind, ref_name, namespace)
    _refuse_escalation(user, authorizer, namespace, rules, resource, str(meta.get("name", "")))


def _refuse_escalation(
    user: UserInfo,
    authorizer: RBACAuthorizer,
    namespace: str,
    rules: Sequence[PolicyRule],
    resource: str,
    name: str,
) -> None:
    causes = escalation_causes(user, authorizer, namespace, rules)
    if not causes:
        return
    _owned, errors = authorizer.policy_rules(user, namespace)
    message = _forbidden_prefix(resource, RBAC_GROUP, name) + escalation_message(
        user, causes, errors
    )
    raise ApiError(403, "Forbidden", message, kind=resource, group=RBAC_GROUP, name=name)
