"""The ClusterRoles and ClusterRoleBindings an embedded API server starts with.

Kubernetes' bootstrap policy (trimmed to the kinds VMO serves) and the roles KubeVirt's operator
installs, so that RBAC written for a real KubeVirt cluster means the same thing here. The
aggregated roles (admin/edit/view) come back already holding their aggregated rules, as a cluster
looks once the aggregation controller has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmo.apiserver.rbac import (
    AUTHENTICATED_GROUP,
    MASTERS_GROUP,
    RBAC_GROUP,
    UNAUTHENTICATED_GROUP,
    aggregate_cluster_roles,
)

JSON = dict[str, Any]

AGGREGATE_TO_ADMIN = "rbac.authorization.k8s.io/aggregate-to-admin"
AGGREGATE_TO_EDIT = "rbac.authorization.k8s.io/aggregate-to-edit"
AGGREGATE_TO_VIEW = "rbac.authorization.k8s.io/aggregate-to-view"

_BOOTSTRAP_LABELS = {"kubernetes.io/bootstrapping": "rbac-defaults"}
_AUTOUPDATE = {"rbac.authorization.kubernetes.io/autoupdate": "true"}
_KUBEVIRT_LABELS = {"kubevirt.io": ""}
# the group whose members may scrape /metrics (kube-apiserver binds system:monitoring to it)
MONITORING_GROUP = "system:monitoring"

READ = ("get", "list", "watch")
WRITE = ("create", "delete", "deletecollection", "patch", "update")
READ_WRITE = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
# KubeVirt spells its verb lists in this order
KV_ALL = ("get", "delete", "create", "update", "patch", "list", "watch", "deletecollection")
KV_EDIT = ("get", "delete", "create", "update", "patch", "list", "watch")

SUBRESOURCES = "subresources.kubevirt.io"
KUBEVIRT = "kubevirt.io"
INSTANCETYPES = (
    "virtualmachineinstancetypes",
    "virtualmachineclusterinstancetypes",
    "virtualmachinepreferences",
    "virtualmachineclusterpreferences",
)


def _rule(verbs: Sequence[str], groups: Sequence[str], resources: Sequence[str]) -> JSON:
    return {"verbs": list(verbs), "apiGroups": list(groups), "resources": list(resources)}


def _url_rule(verbs: Sequence[str], urls: Sequence[str]) -> JSON:
    return {"verbs": list(verbs), "nonResourceURLs": list(urls)}


def _cluster_role(
    name: str,
    rules: list[JSON],
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    aggregate_from: Sequence[str] = (),
) -> JSON:
    meta: JSON = {"name": name}
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    role: JSON = {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRole",
        "metadata": meta,
        "rules": rules,
    }
    if aggregate_from:
        role["aggregationRule"] = {
            "clusterRoleSelectors": [{"matchLabels": {label: "true"}} for label in aggregate_from]
        }
    return role


def _cluster_role_binding(
    name: str, role: str, groups: Sequence[str], *, labels: dict[str, str] | None = None
) -> JSON:
    meta: JSON = {"name": name, "annotations": dict(_AUTOUPDATE)}
    if labels:
        meta["labels"] = dict(labels)
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": meta,
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": g} for g in groups],
    }


def _kubernetes_role(name: str, rules: list[JSON], **labels: str) -> JSON:
    return _cluster_role(
        name, rules, labels={**_BOOTSTRAP_LABELS, **labels}, annotations=_AUTOUPDATE
    )


# --------------------------------------------------------------------------- Kubernetes


def _kubernetes_cluster_roles() -> list[JSON]:
    return [
        _kubernetes_role(
            "cluster-admin",
            [_rule(["*"], ["*"], ["*"]), _url_rule(["*"], ["*"])],
        ),
        _kubernetes_role(
            "system:discovery",
            [
                _url_rule(
                    ["get"],
                    [
                        "/api",
                        "/api/*",
                        "/apis",
                        "/apis/*",
                        "/healthz",
                        "/livez",
                        "/openapi",
                        "/openapi/*",
                        "/readyz",
                        "/version",
                        "/version/",
                    ],
                )
            ],
        ),
        _kubernetes_role(
            "system:basic-user",
            [
                _rule(
                    ["create"],
                    ["authorization.k8s.io"],
                    ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                ),
                _rule(["create"], ["authentication.k8s.io"], ["selfsubjectreviews"]),
            ],
        ),
        # what Prometheus needs of every VMO process: its /metrics and health endpoints
        _kubernetes_role(
            "system:monitoring",
            [
                _url_rule(
                    ["get"],
                    [
                        "/healthz",
                        "/healthz/*",
                        "/livez",
                        "/livez/*",
                        "/metrics",
                        "/metrics/slis",
                        "/readyz",
                        "/readyz/*",
                    ],
                )
            ],
        ),
        _kubernetes_role(
            "system:public-info-viewer",
            [_url_rule(["get"], ["/healthz", "/livez", "/readyz", "/version", "/version/"])],
        ),
        *_namespace_user_roles(),
    ]


def _namespace_user_roles() -> list[JSON]:
    """admin/edit/view and the system:aggregate-to-* roles that feed them."""
    return [
        _cluster_role(
            "admin",
            [],
            labels=_BOOTSTRAP_LABELS,
            annotations=_AUTOUPDATE,
            aggregate_from=[AGGREGATE_TO_ADMIN],
        ),
        _cluster_role(
            "edit",
            [],
            labels={**_BOOTSTRAP_LABELS, AGGREGATE_TO_ADMIN: "true"},
            annotations=_AUTOUPDATE,
            aggregate_from=[AGGREGATE_TO_EDIT],
        ),
        _cluster_role(
            "view",
            [],
            labels={**_BOOTSTRAP_LABELS, AGGREGATE_TO_EDIT: "true"},
            annotations=_AUTOUPDATE,
            aggregate_from=[AGGREGATE_TO_VIEW],
        ),
        _kubernetes_role(
            "system:aggregate-to-admin",
            [
                _rule(["create"], ["authorization.k8s.io"], ["localsubjectaccessreviews"]),
                _rule(READ_WRITE, [RBAC_GROUP], ["roles", "rolebindings"]),
            ],
            **{AGGREGATE_TO_ADMIN: "true"},
        ),
        _kubernetes_role("system:aggregate-to-edit", _edit_rules(), **{AGGREGATE_TO_EDIT: "true"}),
        _kubernetes_role("system:aggregate-to-view", _view_rules(), **{AGGREGATE_TO_VIEW: "true"}),
    ]


def _edit_rules() -> list[JSON]:
    # upstream's core-group and networking rules; apps/batch kinds are not served by VMO
    return [
        _rule(WRITE, ["networking.k8s.io"], ["networkpolicies"]),
        _rule(
            READ,
            [""],
            [
                "pods/attach",
                "pods/proxy",
                "pods/exec",
                "pods/portforward",
                "secrets",
                "services/proxy",
            ],
        ),
        _rule(["impersonate"], [""], ["serviceaccounts"]),
        _rule(WRITE, [""], ["pods", "pods/attach", "pods/proxy", "pods/exec", "pods/portforward"]),
        _rule(["create"], [""], ["pods/eviction"]),
        _rule(
            WRITE,
            [""],
            [
                "replicationcontrollers",
                "replicationcontrollers/scale",
                "serviceaccounts",
                "services",
                "services/proxy",
                "persistentvolumeclaims",
                "configmaps",
                "secrets",
            ],
        ),
        _rule(["create"], [""], ["serviceaccounts/token"]),
    ]


def _view_rules() -> list[JSON]:
    return [
        _rule(READ, ["networking.k8s.io"], ["networkpolicies"]),
        _rule(
            READ,
            [""],
            [
                "pods",
                "replicationcontrollers",
                "replicationcontrollers/scale",
                "serviceaccounts",
                "services",
                "services/status",
                "endpoints",
                "persistentvolumeclaims",
                "persistentvolumeclaims/status",
                "configmaps",
            ],
        ),
        _rule(
            READ,
            [""],
            [
                "limitranges",
                "resourcequotas",
                "bindings",
                "events",
                "pods/status",
                "resourcequotas/status",
                "namespaces/status",
                "replicationcontrollers/status",
                "pods/log",
            ],
        ),
        # read on namespaces at namespace scope lets a user read *this* namespace
        _rule(READ, [""], ["namespaces"]),
    ]


# --------------------------------------------------------------------------- KubeVirt

_VMI_GET = (
    "virtualmachineinstances/console",
    "virtualmachineinstances/vnc",
    "virtualmachineinstances/vnc/screenshot",
    "virtualmachineinstances/portforward",
    "virtualmachineinstances/guestosinfo",
    "virtualmachineinstances/filesystemlist",
    "virtualmachineinstances/userlist",
    "virtualmachineinstances/sev/fetchcertchain",
    "virtualmachineinstances/sev/querylaunchmeasurement",
    "virtualmachineinstances/usbredir",
)
_VMI_UPDATE = (
    "virtualmachineinstances/pause",
    "virtualmachineinstances/unpause",
    "virtualmachineinstances/addvolume",
    "virtualmachineinstances/removevolume",
    "virtualmachineinstances/freeze",
    "virtualmachineinstances/unfreeze",
    "virtualmachineinstances/softreboot",
    "virtualmachineinstances/reset",
    "virtualmachineinstances/sev/setupsession",
    "virtualmachineinstances/sev/injectlaunchsecret",
    "virtualmachineinstances/evacuate/cancel",
)
_VM_GET = ("virtualmachines/expand-spec", "virtualmachines/portforward")
_VM_UPDATE = (
    "virtualmachines/start",
    "virtualmachines/stop",
    "virtualmachines/restart",
    "virtualmachines/addvolume",
    "virtualmachines/removevolume",
    "virtualmachines/memorydump",
    "virtualmachines/removememorydump",
    "virtualmachines/evacuate/cancel",
)
_VIEW_GET = (
    "virtualmachines/expand-spec",
    "virtualmachineinstances/guestosinfo",
    "virtualmachineinstances/filesystemlist",
    "virtualmachineinstances/userlist",
    "virtualmachineinstances/sev/fetchcertchain",
    "virtualmachineinstances/sev/querylaunchmeasurement",
)
_VM_KINDS = (
    "virtualmachines",
    "virtualmachineinstances",
    "virtualmachineinstancepresets",
    "virtualmachineinstancereplicasets",
)


def _kubevirt_family_rules(verbs: Sequence[str]) -> list[JSON]:
    """The snapshot/export/clone/instancetype/pool rules every KubeVirt role repeats."""
    return [
        _rule(
            verbs,
            ["snapshot.kubevirt.io"],
            ["virtualmachinesnapshots", "virtualmachinesnapshotcontents", "virtualmachinerestores"],
        ),
        _rule(verbs, ["export.kubevirt.io"], ["virtualmachineexports"]),
        _rule(
            verbs,
            ["backup.kubevirt.io"],
            ["virtualmachinebackups", "virtualmachinebackuptrackers"],
        ),
        _rule(verbs, ["clone.kubevirt.io"], ["virtualmachineclones"]),
        _rule(verbs, ["instancetype.kubevirt.io"], INSTANCETYPES),
        _rule(verbs, ["pool.kubevirt.io"], ["virtualmachinepools"]),
    ]


def _kubevirt_admin_rules(*, edit: bool) -> list[JSON]:
    # since v1.9 the VNC screenshot is admin-only; edit also loses deletecollection
    vmi_get = [r for r in _VMI_GET if not (edit and r.endswith("/vnc/screenshot"))]
    verbs = KV_EDIT if edit else KV_ALL
    rules = [
        _rule(["get"], [SUBRESOURCES], vmi_get),
        _rule(["update"], [SUBRESOURCES], _VMI_UPDATE),
        _rule(["get"], [SUBRESOURCES], _VM_GET),
        _rule(["update"], [SUBRESOURCES], _VM_UPDATE),
        _rule(["update"], [SUBRESOURCES], ["expand-vm-spec"]),
        _rule(verbs, [KUBEVIRT], _VM_KINDS),
        # migrations are the cluster admin's (kubevirt.io:migrate, not aggregated) since v1.5
        _rule(READ, [KUBEVIRT], ["virtualmachineinstancemigrations"]),
        *_kubevirt_family_rules(verbs),
    ]
    if edit:
        rules.append(_rule(["get", "list"], [KUBEVIRT], ["kubevirts"]))
    rules.append(_rule(READ, ["migrations.kubevirt.io"], ["migrationpolicies"]))
    return rules


def _kubevirt_view_rules() -> list[JSON]:
    return [
        _rule(["get", "list"], [KUBEVIRT], ["kubevirts"]),
        _rule(["get"], [SUBRESOURCES], _VIEW_GET),
        _rule(["update"], [SUBRESOURCES], ["expand-vm-spec"]),
        _rule(READ, [KUBEVIRT], [*_VM_KINDS, "virtualmachineinstancemigrations"]),
        *_kubevirt_family_rules(READ),
        _rule(READ, ["migrations.kubevirt.io"], ["migrationpolicies"]),
    ]


def _kubevirt_cluster_roles() -> list[JSON]:
    return [
        _cluster_role(
            "kubevirt.io:default",
            [
                _rule(["get", "list"], [KUBEVIRT], ["kubevirts"]),
                _rule(["get", "list"], [SUBRESOURCES], ["version", "guestfs"]),
            ],
            labels={**_KUBEVIRT_LABELS, **_BOOTSTRAP_LABELS},
            annotations=_AUTOUPDATE,
        ),
        _cluster_role(
            "kubevirt.io:admin",
            _kubevirt_admin_rules(edit=False),
            labels={**_KUBEVIRT_LABELS, AGGREGATE_TO_ADMIN: "true"},
        ),
        _cluster_role(
            "kubevirt.io:edit",
            _kubevirt_admin_rules(edit=True),
            labels={**_KUBEVIRT_LABELS, AGGREGATE_TO_EDIT: "true"},
        ),
        _cluster_role(
            "kubevirt.io:view",
            _kubevirt_view_rules(),
            labels={**_KUBEVIRT_LABELS, AGGREGATE_TO_VIEW: "true"},
        ),
        _cluster_role(
            "kubevirt.io:migrate",
            [
                _rule(["update"], [SUBRESOURCES], ["virtualmachines/migrate"]),
                _rule(KV_ALL, [KUBEVIRT], ["virtualmachineinstancemigrations"]),
            ],
            labels=_KUBEVIRT_LABELS,
        ),
        _cluster_role(
            "instancetype.kubevirt.io:view",
            [
                _rule(
                    READ,
                    ["instancetype.kubevirt.io"],
                    ["virtualmachineclusterinstancetypes", "virtualmachineclusterpreferences"],
                )
            ],
            labels=_KUBEVIRT_LABELS,
        ),
    ]


def _cdi_cluster_roles() -> list[JSON]:
    """CDI's own aggregated roles, so admin/edit users may import and upload disks."""
    data = ["datavolumes", "datasources", "dataimportcrons"]
    labels = {"cdi.kubevirt.io": ""}
    write = [
        _rule(KV_ALL, ["cdi.kubevirt.io"], data),
        _rule(["create"], ["cdi.kubevirt.io"], ["datavolumes/source"]),
        _rule(KV_ALL, ["upload.cdi.kubevirt.io"], ["uploadtokenrequests"]),
    ]
    return [
        _cluster_role(
            "cdi.kubevirt.io:admin", write, labels={**labels, AGGREGATE_TO_ADMIN: "true"}
        ),
        _cluster_role("cdi.kubevirt.io:edit", write, labels={**labels, AGGREGATE_TO_EDIT: "true"}),
        _cluster_role(
            "cdi.kubevirt.io:view",
            [_rule(READ, ["cdi.kubevirt.io"], [*data, "cdiconfigs"])],
            labels={**labels, AGGREGATE_TO_VIEW: "true"},
        ),
    ]


def _volume_snapshot_cluster_roles() -> list[JSON]:
    """Aggregated roles for snapshot.storage.k8s.io, as distributions that serve the CSI
    snapshot kinds add them: namespace admins and editors take and delete VolumeSnapshots,
    viewers read them; contents and classes are cluster-scoped, the cluster admin's."""
    group, snapshots = ["snapshot.storage.k8s.io"], ["volumesnapshots"]
    return [
        _cluster_role(
            "snapshot.storage.k8s.io:admin",
            [_rule(READ_WRITE, group, snapshots)],
            labels={AGGREGATE_TO_ADMIN: "true"},
        ),
        _cluster_role(
            "snapshot.storage.k8s.io:edit",
            [_rule(READ_WRITE, group, snapshots)],
            labels={AGGREGATE_TO_EDIT: "true"},
        ),
        _cluster_role(
            "snapshot.storage.k8s.io:view",
            [_rule(READ, group, snapshots)],
            labels={AGGREGATE_TO_VIEW: "true"},
        ),
    ]


def _metrics_cluster_roles() -> list[JSON]:
    """metrics-server's reader role: namespace viewers, editors and admins read
    ``metrics.k8s.io`` (``kubectl top``), which VMO's API server serves from Prometheus."""
    return [
        _cluster_role(
            "system:aggregated-metrics-reader",
            [_rule(READ, ["metrics.k8s.io"], ["pods", "nodes"])],
            labels={"k8s-app": "metrics-server", AGGREGATE_TO_ADMIN: "true",
                    AGGREGATE_TO_EDIT: "true", AGGREGATE_TO_VIEW: "true"},
        ),
    ]  # fmt: skip


# --------------------------------------------------------------------------- public


def bootstrap_cluster_roles() -> list[JSON]:
    """Every bootstrap ClusterRole, aggregated roles already holding their aggregated rules."""
    roles = _kubernetes_cluster_roles() + _kubevirt_cluster_roles() + _cdi_cluster_roles()
    roles += _volume_snapshot_cluster_roles()
    roles += _metrics_cluster_roles()
    aggregated = aggregate_cluster_roles(roles)
    for role in roles:
        name = role["metadata"]["name"]
        if name in aggregated:
            role["rules"] = aggregated[name]
    return roles


def bootstrap_cluster_role_bindings() -> list[JSON]:
    """The bindings that give every authenticated user discovery and self-review access."""
    return [
        _cluster_role_binding(
            "cluster-admin", "cluster-admin", [MASTERS_GROUP], labels=_BOOTSTRAP_LABELS
        ),
        _cluster_role_binding(
            "system:discovery", "system:discovery", [AUTHENTICATED_GROUP], labels=_BOOTSTRAP_LABELS
        ),
        _cluster_role_binding(
            "system:basic-user",
            "system:basic-user",
            [AUTHENTICATED_GROUP],
            labels=_BOOTSTRAP_LABELS,
        ),
        _cluster_role_binding(
            "system:monitoring", "system:monitoring", [MONITORING_GROUP], labels=_BOOTSTRAP_LABELS
        ),
        _cluster_role_binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            [AUTHENTICATED_GROUP, UNAUTHENTICATED_GROUP],
            labels=_BOOTSTRAP_LABELS,
        ),
        _cluster_role_binding(
            "kubevirt.io:default",
            "kubevirt.io:default",
            [AUTHENTICATED_GROUP],
            labels=_KUBEVIRT_LABELS,
        ),
        _cluster_role_binding(
            "instancetype.kubevirt.io:view",
            "instancetype.kubevirt.io:view",
            [AUTHENTICATED_GROUP],
            labels=_KUBEVIRT_LABELS,
        ),
    ]
