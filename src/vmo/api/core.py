"""The built-in Kubernetes kinds VMO's API server serves, with VMO's own schemas of them.

Each schema lists only the fields VMO supports, with descriptions for ``kubectl explain``; the
shapes, names, scopes, short names and field selectors are upstream's. Printer columns are plain
JSONPath (no computed columns): where upstream's column is computed (a count, ``80/TCP``) the
closest plain field is shown instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from vmo.api.crd import validate_crd
from vmo.api.quantity import QUANTITY_PATTERN
from vmo.api.schema import UNSUPPORTED_KEY
from vmo.api.types import JSON, PrinterColumn, ResourceType

__all__ = ["core_resource_types"]

AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp")
CREATED_AT = PrinterColumn("Created At", "string", ".metadata.creationTimestamp")
_CREATE_ONLY = ("create",)


# --------------------------------------------------------------------------- schema vocabulary


def _described(node: JSON, description: str) -> JSON:
    if description:
        node["description"] = description
    return node


def string(description: str = "", *, enum: Sequence[str] = (), fmt: str = "", **extra: Any) -> JSON:
    node: JSON = {"type": "string", **extra}
    if enum:
        node["enum"] = list(enum)
    if fmt:
        node["format"] = fmt
    return _described(node, description)


def timestamp(description: str = "") -> JSON:
    # Go clients serialise an unset metav1.Time as null.
    return string(description, fmt="date-time", nullable=True)


def integer(description: str = "", *, fmt: str = "int32", **extra: Any) -> JSON:
    return _described({"type": "integer", "format": fmt, **extra}, description)


def boolean(description: str = "", **extra: Any) -> JSON:
    return _described({"type": "boolean", **extra}, description)


def obj(
    properties: Mapping[str, JSON],
    description: str = "",
    *,
    required: Sequence[str] = (),
    **extra: Any,
) -> JSON:
    node: JSON = {"type": "object", "properties": dict(properties), **extra}
    if required:
        node["required"] = list(required)
    return _described(node, description)


def opaque(description: str = "") -> JSON:
    return _described({"type": "object", "x-kubernetes-preserve-unknown-fields": True}, description)


def array(
    items: JSON,
    description: str = "",
    *,
    map_keys: Sequence[str] = (),
    merge_key: str = "",
    list_type: str = "",
) -> JSON:
    """A list; ``map_keys`` makes it a list-map, ``merge_key`` a strategic-merge list."""
    node: JSON = {"type": "array", "items": items}
    if map_keys:
        node["x-kubernetes-list-type"] = "map"
        node["x-kubernetes-list-map-keys"] = list(map_keys)
    elif list_type:
        node["x-kubernetes-list-type"] = list_type
    if merge_key:
        node["x-kubernetes-patch-merge-key"] = merge_key
        node["x-kubernetes-patch-strategy"] = "merge"
    return _described(node, description)


def strings(description: str = "", **extra: Any) -> JSON:
    return array(string(), description, **extra)


def string_map(description: str = "", *, fmt: str = "") -> JSON:
    node: JSON = {"type": "object", "additionalProperties": string(fmt=fmt)}
    return _described(node, description)


def quantity(description: str = "") -> JSON:
    node: JSON = {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-int-or-string": True,
        "pattern": QUANTITY_PATTERN,
    }
    return _described(node, description)


def int_or_string(description: str = "") -> JSON:
    node: JSON = {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-int-or-string": True,
    }
    return _described(node, description)


def unsupported(reason: str, description: str = "") -> JSON:
    return _described({UNSUPPORTED_KEY: reason}, description)


def resource(
    kind_description: str,
    fields: Mapping[str, JSON],
    *,
    required: Sequence[str] = (),
) -> JSON:
    """The whole-object schema: apiVersion, kind and metadata, then the kind's own fields."""
    properties: JSON = {
        "apiVersion": string(
            "APIVersion defines the versioned schema of this representation of an object."
        ),
        "kind": string(
            "Kind is a string value representing the REST resource this object represents."
        ),
        "metadata": opaque("Standard object's metadata."),
        **fields,
    }
    return obj(properties, kind_description, required=required)


def condition(description: str = "") -> JSON:
    return obj(
        {
            "type": string("Type of condition."),
            "status": string("Status of the condition: True, False or Unknown."),
            "reason": string(
                "Unique, one-word, CamelCase reason for the condition's last transition."
            ),
            "message": string("Human-readable message indicating details about last transition."),
            "lastTransitionTime": timestamp("Last time the condition transitioned."),
            "lastHeartbeatTime": timestamp("Last time the condition was probed."),
            "lastProbeTime": timestamp("Last time the condition was probed."),
            "observedGeneration": integer("The generation the condition was set for.", fmt="int64"),
        },
        description,
        required=("type", "status"),
    )


def conditions(description: str = "Current service state.") -> JSON:
    return array(condition(), description, map_keys=("type",), merge_key="type")


def object_reference(description: str = "") -> JSON:
    return obj(
        {
            "apiVersion": string("API version of the referent."),
            "kind": string("Kind of the referent."),
            "namespace": string("Namespace of the referent."),
            "name": string("Name of the referent."),
            "uid": string("UID of the referent."),
            "resourceVersion": string("Specific resourceVersion to which this reference is made."),
            "fieldPath": string("A field within the referent, e.g. spec.containers{name}."),
        },
        description,
    )


def label_selector(description: str = "") -> JSON:
    requirement = obj(
        {
            "key": string("The label key that the selector applies to."),
            "operator": string(
                "A key's relationship to a set of values.",
                enum=("In", "NotIn", "Exists", "DoesNotExist"),
            ),
            "values": strings("An array of string values."),
        },
        required=("key", "operator"),
    )
    return obj(
        {
            "matchLabels": string_map("A map of {key,value} pairs that must all match."),
            "matchExpressions": array(requirement, "A list of label selector requirements."),
        },
        description,
    )


def _columns(*columns: PrinterColumn) -> tuple[PrinterColumn, ...]:
    return (*columns, AGE)


# --------------------------------------------------------------------------- core/v1


def namespace() -> ResourceType:
    spec = obj(
        {"finalizers": strings("Finalizers that must be empty before the namespace is removed.")},
        "Spec defines the behavior of the Namespace.",
    )
    status = obj(
        {
            "phase": string("The current lifecycle phase.", enum=("Active", "Terminating")),
            "conditions": conditions("The latest available observations of the state."),
        },
        "Status describes the current status of a Namespace.",
    )
    return ResourceType(
        group="",
        version="v1",
        kind="Namespace",
        plural="namespaces",
        singular="namespace",
        namespaced=False,
        short_names=("ns",),
        subresources=("status",),
        printer_columns=_columns(PrinterColumn("Status", "string", ".status.phase")),
        schema=resource("Namespace provides a scope for names.", {"spec": spec, "status": status}),
        field_selectors={"status.phase": ".status.phase"},
    )


def node_spec() -> JSON:
    taint = obj(
        {
            "key": string("The taint key to be applied to a node."),
            "value": string("The taint value corresponding to the taint key."),
            "effect": string(
                "The effect of the taint on workloads that do not tolerate it.",
                enum=("NoSchedule", "PreferNoSchedule", "NoExecute"),
            ),
            "timeAdded": timestamp("The time at which a NoExecute taint was added."),
        },
        required=("key", "effect"),
    )
    return obj(
        {
            "podCIDR": string("The pod IP range assigned to the node."),
            "podCIDRs": strings("The IP ranges assigned to the node.", list_type="set"),
            "providerID": string("ID of the node assigned by its provider."),
            "unschedulable": boolean("Whether new workloads may be scheduled to the node."),
            "taints": array(taint, "The node's taints."),
        },
        "Spec defines the behavior of a node.",
    )


def node_status() -> JSON:
    address = obj(
        {
            "type": string("Node address type: Hostname, InternalIP or ExternalIP."),
            "address": string("The node address."),
        },
        required=("type", "address"),
    )
    info_fields = [
        "machineID",
        "systemUUID",
        "bootID",
        "kernelVersion",
        "osImage",
        "containerRuntimeVersion",
        "kubeletVersion",
        "kubeProxyVersion",
        "operatingSystem",
        "architecture",
    ]
    resources = {"additionalProperties": quantity(), "type": "object"}
    return obj(
        {
            "capacity": _described(dict(resources), "Total resources of the node."),
            "allocatable": _described(dict(resources), "Resources available for scheduling."),
            "phase": string("Deprecated node lifecycle phase."),
            "conditions": array(condition(), "Conditions of the node.", merge_key="type"),
            "addresses": array(address, "Addresses reachable to the node.", merge_key="type"),
            "daemonEndpoints": obj(
                {
                    "kubeletEndpoint": obj(
                        {"Port": integer("Port number of the given endpoint.")},
                        "Endpoint on which the node agent is listening.",
                    )
                },
                "Endpoints of daemons running on the node.",
            ),
            "nodeInfo": obj(
                {name: string() for name in info_fields}, "General information about the node."
            ),
        },
        "Most recently observed status of the node.",
    )


def node() -> ResourceType:
    ready = ".status.conditions[?(@.type=='Ready')].status"
    return ResourceType(
        group="",
        version="v1",
        kind="Node",
        plural="nodes",
        singular="node",
        namespaced=False,
        short_names=("no",),
        subresources=("status",),
        printer_columns=_columns(
            PrinterColumn("Ready", "string", ready),
            PrinterColumn("Unschedulable", "boolean", ".spec.unschedulable"),
            PrinterColumn("Version", "string", ".status.nodeInfo.kubeletVersion"),
            PrinterColumn(
                "Internal-IP",
                "string",
                ".status.addresses[?(@.type=='InternalIP')].address",
                priority=1,
            ),
            PrinterColumn("OS-Image", "string", ".status.nodeInfo.osImage", priority=1),
            PrinterColumn("Kernel-Version", "string", ".status.nodeInfo.kernelVersion", priority=1),
        ),
        schema=resource(
            "Node is a worker that runs virtual machines.",
            {"spec": node_spec(), "status": node_status()},
        ),
        field_selectors={"spec.unschedulable": ".spec.unschedulable"},
    )


def service_spec() -> JSON:
    port = obj(
        {
            "name": string("The name of this port within the service."),
            "protocol": string(
                "The IP protocol for this port.", enum=("TCP", "UDP", "SCTP"), default="TCP"
            ),
            "appProtocol": string("The application protocol for this port."),
            "port": integer("The port that will be exposed by this service."),
            "targetPort": int_or_string("Number or name of the port to reach on the endpoints."),
            "nodePort": integer("The port on each node on which this service is exposed."),
        },
        required=("port",),
    )
    no_load_balancer = "VMO serves ClusterIP and NodePort services only"
    return obj(
        {
            "type": string(
                "How the Service is exposed.", enum=("ClusterIP", "NodePort"), default="ClusterIP"
            ),
            "ports": array(
                port,
                "The ports exposed by this service.",
                map_keys=("port", "protocol"),
                merge_key="port",
            ),
            "selector": string_map("Route traffic to endpoints whose labels match this selector."),
            "clusterIP": string("The IP address of the service; None for a headless service."),
            "clusterIPs": strings("IP addresses assigned to this service.", list_type="atomic"),
            "ipFamilies": strings("IP families assigned to this service.", list_type="atomic"),
            "ipFamilyPolicy": string(
                "Dual-stack-ness of this service.",
                enum=("SingleStack", "PreferDualStack", "RequireDualStack"),
            ),
            "sessionAffinity": string(
                "Session affinity.", enum=("ClientIP", "None"), default="None"
            ),
            "publishNotReadyAddresses": boolean("Publish endpoints that are not ready."),
            "internalTrafficPolicy": string(
                "How traffic from inside is routed.", enum=("Cluster", "Local")
            ),
            "externalTrafficPolicy": string(
                "How external traffic is routed.", enum=("Cluster", "Local")
            ),
            "externalIPs": unsupported(no_load_balancer),
            "externalName": unsupported(no_load_balancer),
            "loadBalancerIP": unsupported(no_load_balancer),
            "loadBalancerClass": unsupported(no_load_balancer),
            "loadBalancerSourceRanges": unsupported(no_load_balancer),
        },
        "Spec defines the behavior of a service.",
    )


def service() -> ResourceType:
    status = obj(
        {
            "loadBalancer": opaque("The current status of the load-balancer, if one is present."),
            "conditions": conditions(),
        },
        "Most recently observed status of the service.",
    )
    return ResourceType(
        group="",
        version="v1",
        kind="Service",
        plural="services",
        singular="service",
        namespaced=True,
        short_names=("svc",),
        categories=("all",),
        subresources=("status",),
        printer_columns=_columns(
            PrinterColumn("Type", "string", ".spec.type"),
            PrinterColumn("Cluster-IP", "string", ".spec.clusterIP"),
            PrinterColumn("Port(s)", "string", ".spec.ports[*].port"),
            PrinterColumn("Selector", "string", ".spec.selector", priority=1),
        ),
        schema=resource(
            "Service is a named abstraction of software service.",
            {"spec": service_spec(), "status": status},
        ),
        field_selectors={"spec.clusterIP": ".spec.clusterIP", "spec.type": ".spec.type"},
    )


def endpoints() -> ResourceType:
    address = obj(
        {
            "ip": string("The IP of this endpoint."),
            "hostname": string("The hostname of this endpoint."),
            "nodeName": string("Node hosting this endpoint."),
            "targetRef": object_reference("Reference to the object providing the endpoint."),
        },
        required=("ip",),
    )
    port = obj(
        {
            "name": string("The name of this port."),
            "port": integer("The port number of the endpoint."),
            "protocol": string(
                "The IP protocol for this port.", enum=("TCP", "UDP", "SCTP"), default="TCP"
            ),
            "appProtocol": string("The application protocol for this port."),
        },
        required=("port",),
    )
    subset = obj(
        {
            "addresses": array(
                address, "IP addresses which offer the related ports and are ready."
            ),
            "notReadyAddresses": array(address, "IP addresses which are not ready yet."),
            "ports": array(port, "Port numbers available on the related IP addresses."),
        }
    )
    return ResourceType(
        group="",
        version="v1",
        kind="Endpoints",
        plural="endpoints",
        singular="endpoints",
        namespaced=True,
        short_names=("ep",),
        printer_columns=_columns(
            PrinterColumn("Endpoints", "string", ".subsets[*].addresses[*].ip"),
        ),
        schema=resource(
            "Endpoints is a collection of endpoints that implement the actual service.",
            {"subsets": array(subset, "The sets of addresses and ports that comprise a service.")},
        ),
    )


def config_map() -> ResourceType:
    return ResourceType(
        group="",
        version="v1",
        kind="ConfigMap",
        plural="configmaps",
        singular="configmap",
        namespaced=True,
        short_names=("cm",),
        printer_columns=(AGE,),
        schema=resource(
            "ConfigMap holds configuration data for workloads to consume.",
            {
                "data": string_map("Configuration data: UTF-8 values by key."),
                "binaryData": string_map("Binary data, base64-encoded, by key.", fmt="byte"),
                "immutable": boolean("If true, data cannot be updated."),
            },
        ),
    )


def secret() -> ResourceType:
    return ResourceType(
        group="",
        version="v1",
        kind="Secret",
        plural="secrets",
        singular="secret",
        namespaced=True,
        printer_columns=_columns(PrinterColumn("Type", "string", ".type")),
        schema=resource(
            "Secret holds secret data of a certain type.",
            {
                "data": string_map("Secret data, base64-encoded, by key.", fmt="byte"),
                "stringData": string_map(
                    "Write-only convenience: plain-text values merged into data on write."
                ),
                "type": string(
                    "Used to facilitate programmatic handling of secret data.", default="Opaque"
                ),
                "immutable": boolean("If true, data cannot be updated."),
            },
        ),
        field_selectors={"type": ".type"},
    )


def service_account() -> ResourceType:
    local_ref = obj({"name": string("Name of the referent.")})
    return ResourceType(
        group="",
        version="v1",
        kind="ServiceAccount",
        plural="serviceaccounts",
        singular="serviceaccount",
        namespaced=True,
        short_names=("sa",),
        printer_columns=(AGE,),
        schema=resource(
            "ServiceAccount binds an identity that clients and controllers can act as.",
            {
                "secrets": array(
                    object_reference(),
                    "Secrets allowed to be used by this account.",
                    merge_key="name",
                ),
                "imagePullSecrets": array(local_ref, "Secrets for pulling images."),
                "automountServiceAccountToken": boolean(
                    "Whether a token is mounted automatically."
                ),
            },
        ),
    )


def event_fields() -> JSON:
    return {
        "involvedObject": object_reference("The object that this event is about."),
        "reason": string("Short, machine understandable reason for the transition."),
        "message": string("A human-readable description of the status of this operation."),
        "source": obj(
            {
                "component": string("Component from which the event is generated."),
                "host": string("Node name on which the event is generated."),
            },
            "The component reporting this event.",
        ),
        "firstTimestamp": timestamp("The time at which the event was first recorded."),
        "lastTimestamp": timestamp("The time of the most recent occurrence."),
        "count": integer("The number of times this event has occurred."),
        "type": string("Type of this event (Normal, Warning)."),
        "eventTime": string(
            "Time when this event was first observed.", fmt="date-time", nullable=True
        ),
        "series": obj(
            {
                "count": integer("Number of occurrences in this series up to the last heartbeat."),
                "lastObservedTime": timestamp("Time of the last occurrence observed."),
            },
            "Data about the event series this event represents.",
        ),
        "action": string("What action was taken or failed regarding the object."),
        "related": object_reference("Optional secondary object for more complex actions."),
        "reportingComponent": string("Name of the controller that emitted this event."),
        "reportingInstance": string("ID of the controller instance."),
    }


def event() -> ResourceType:
    return ResourceType(
        group="",
        version="v1",
        kind="Event",
        plural="events",
        singular="event",
        namespaced=True,
        short_names=("ev",),
        printer_columns=(
            PrinterColumn("Last Seen", "date", ".lastTimestamp"),
            PrinterColumn("Type", "string", ".type"),
            PrinterColumn("Reason", "string", ".reason"),
            PrinterColumn("Object", "string", ".involvedObject.name"),
            PrinterColumn("Message", "string", ".message"),
            PrinterColumn("Source", "string", ".source.component", priority=1),
            PrinterColumn("Count", "integer", ".count", priority=1),
        ),
        schema=resource(
            "Event is a report of an event somewhere in the cluster.",
            event_fields(),
            required=("involvedObject",),
        ),
        field_selectors={
            **{
                f"involvedObject.{name}": f".involvedObject.{name}"
                for name in (
                    "kind",
                    "namespace",
                    "name",
                    "uid",
                    "apiVersion",
                    "resourceVersion",
                    "fieldPath",
                )
            },
            "reason": ".reason",
            "reportingComponent": ".reportingComponent",
            "source": ".source.component",
            "type": ".type",
        },
    )


# ---------------------------------------------------------------- rbac.authorization.k8s.io/v1

RBAC = "rbac.authorization.k8s.io"


def policy_rule() -> JSON:
    return obj(
        {
            "verbs": strings("Verbs that apply to all resources in this rule; '*' is all verbs."),
            "apiGroups": strings("API groups of the resources; '' is the core group."),
            "resources": strings("Resources this rule applies to; '*' is all resources."),
            "resourceNames": strings("Optional allow-list of object names."),
            "nonResourceURLs": strings("Partial URLs a user may access (cluster roles only)."),
        },
        "A rule: the actions allowed on a set of resources.",
        required=("verbs",),
    )


def rules() -> JSON:
    return array(policy_rule(), "The rules of this role.", list_type="atomic")


def _rbac_kind(
    kind: str,
    plural: str,
    *,
    namespaced: bool,
    description: str,
    fields: Mapping[str, JSON],
    columns: Iterable[PrinterColumn] = (),
    required: Sequence[str] = (),
) -> ResourceType:
    return ResourceType(
        group=RBAC,
        version="v1",
        kind=kind,
        plural=plural,
        singular=kind.lower(),
        namespaced=namespaced,
        printer_columns=(*columns, AGE) if columns else (CREATED_AT,),
        schema=resource(description, fields, required=required),
    )


def role_ref() -> JSON:
    return obj(
        {
            "apiGroup": string("Group of the referenced role."),
            "kind": string("Kind of the referenced role.", enum=("Role", "ClusterRole")),
            "name": string("Name of the referenced role."),
        },
        "The Role or ClusterRole the binding grants; it cannot be changed.",
        required=("apiGroup", "kind", "name"),
    )


def subjects() -> JSON:
    subject = obj(
        {
            "kind": string("Kind of subject.", enum=("User", "Group", "ServiceAccount")),
            "apiGroup": string("API group of the subject."),
            "name": string("Name of the subject."),
            "namespace": string("Namespace of a ServiceAccount subject."),
        },
        required=("kind", "name"),
    )
    return array(subject, "The subjects the role applies to.", list_type="atomic")


def rbac_types() -> list[ResourceType]:
    aggregation = obj(
        {
            "clusterRoleSelectors": array(
                label_selector(), "Selects the ClusterRoles whose rules are aggregated."
            )
        },
        "How to build the rules of this role from other ClusterRoles.",
    )
    binding_columns = (PrinterColumn("Role", "string", ".roleRef.name"),)
    return [
        _rbac_kind(
            "Role",
            "roles",
            namespaced=True,
            description="Role is a namespaced set of rules.",
            fields={"rules": rules()},
        ),
        _rbac_kind(
            "ClusterRole",
            "clusterroles",
            namespaced=False,
            description="ClusterRole is a cluster-wide set of rules.",
            fields={"rules": rules(), "aggregationRule": aggregation},
        ),
        _rbac_kind(
            "RoleBinding",
            "rolebindings",
            namespaced=True,
            description="RoleBinding grants a role's permissions in a namespace.",
            fields={"subjects": subjects(), "roleRef": role_ref()},
            columns=binding_columns,
            required=("roleRef",),
        ),
        _rbac_kind(
            "ClusterRoleBinding",
            "clusterrolebindings",
            namespaced=False,
            description="ClusterRoleBinding grants a ClusterRole's permissions cluster-wide.",
            fields={"subjects": subjects(), "roleRef": role_ref()},
            columns=binding_columns,
            required=("roleRef",),
        ),
    ]


# --------------------------------------------------------------------------- reviews


def _review_kind(
    group: str,
    kind: str,
    *,
    namespaced: bool = False,
    description: str,
    spec: JSON,
    status: JSON,
) -> ResourceType:
    return ResourceType(
        group=group,
        version="v1",
        kind=kind,
        plural=kind.lower() + "s",
        singular=kind.lower(),
        namespaced=namespaced,
        verbs=_CREATE_ONLY,
        schema=resource(description, {"spec": spec, "status": status}, required=("spec",)),
    )


def resource_attributes() -> JSON:
    names = ["namespace", "verb", "group", "version", "resource", "subresource", "name"]
    return obj(
        {name: string(f"The {name} of the request.") for name in names},
        "The resource request being checked.",
    )


def non_resource_attributes() -> JSON:
    return obj(
        {"path": string("The URL path of the request."), "verb": string("The HTTP verb.")},
        "The non-resource request being checked.",
    )


def access_review_status() -> JSON:
    return obj(
        {
            "allowed": boolean("Whether the action is allowed."),
            "denied": boolean("Whether the action is explicitly denied."),
            "reason": string("Why the action is allowed or denied."),
            "evaluationError": string("An error that occurred while checking."),
        },
        "The outcome of the check.",
        required=("allowed",),
    )


def subject_access_review_spec() -> JSON:
    return obj(
        {
            "resourceAttributes": resource_attributes(),
            "nonResourceAttributes": non_resource_attributes(),
            "user": string("The user to check."),
            "groups": strings("The groups to check."),
            "uid": string("The UID of the user."),
            "extra": {
                "type": "object",
                "additionalProperties": strings(),
                "description": "Extra attributes of the user.",
            },
        },
        "The request to check.",
    )


def rules_review_status() -> JSON:
    resource_rule = obj(
        {name: strings() for name in ("verbs", "apiGroups", "resources", "resourceNames")},
        required=("verbs",),
    )
    non_resource_rule = obj({"verbs": strings(), "nonResourceURLs": strings()}, required=("verbs",))
    return obj(
        {
            "resourceRules": array(resource_rule, "What the user may do with resources."),
            "nonResourceRules": array(non_resource_rule, "What the user may do with URLs."),
            "incomplete": boolean("True when the rules could not all be evaluated."),
            "evaluationError": string("An error that occurred while evaluating."),
        },
        "The user's rules in the namespace.",
        required=("resourceRules", "nonResourceRules", "incomplete"),
    )


def authorization_types() -> list[ResourceType]:
    group = "authorization.k8s.io"
    self_spec = obj(
        {
            "resourceAttributes": resource_attributes(),
            "nonResourceAttributes": non_resource_attributes(),
        },
        "The request to check for the calling user.",
    )
    return [
        _review_kind(
            group,
            "SubjectAccessReview",
            description="Checks whether a user or group can perform an action.",
            spec=subject_access_review_spec(),
            status=access_review_status(),
        ),
        _review_kind(
            group,
            "LocalSubjectAccessReview",
            namespaced=True,
            description="Checks whether a user or group can perform an action in a namespace.",
            spec=subject_access_review_spec(),
            status=access_review_status(),
        ),
        _review_kind(
            group,
            "SelfSubjectAccessReview",
            description="Checks whether the calling user can perform an action.",
            spec=self_spec,
            status=access_review_status(),
        ),
        _review_kind(
            group,
            "SelfSubjectRulesReview",
            description="Lists the actions the calling user can perform in a namespace.",
            spec=obj({"namespace": string("The namespace to evaluate rules for.")}),
            status=rules_review_status(),
        ),
    ]


def user_info() -> JSON:
    return obj(
        {
            "username": string("The name that uniquely identifies this user."),
            "uid": string("A unique value that identifies this user across time."),
            "groups": strings("The groups this user is a part of."),
            "extra": {"type": "object", "additionalProperties": strings()},
        },
        "Information about the user.",
    )


def authentication_types() -> list[ResourceType]:
    group = "authentication.k8s.io"
    token_review = _review_kind(
        group,
        "TokenReview",
        description="Authenticates a token.",
        spec=obj(
            {
                "token": string("The opaque bearer token."),
                "audiences": strings("Audiences to check."),
            }
        ),
        status=obj(
            {
                "authenticated": boolean("Whether the token could be authenticated."),
                "user": user_info(),
                "audiences": strings("Audiences the token is valid for."),
                "error": string("Why the token could not be checked."),
            }
        ),
    )
    whoami = ResourceType(
        group=group,
        version="v1",
        kind="SelfSubjectReview",
        plural="selfsubjectreviews",
        singular="selfsubjectreview",
        namespaced=False,
        verbs=_CREATE_ONLY,
        schema=resource(
            "Returns the user information the server sees for the caller.",
            {"status": obj({"userInfo": user_info()})},
        ),
    )
    return [token_review, whoami]


# --------------------------------------------------------------------------- coordination.k8s.io/v1


def lease() -> ResourceType:
    spec = obj(
        {
            "holderIdentity": string("The identity of the current holder."),
            "leaseDurationSeconds": integer(
                "How long candidates wait before taking the lease over."
            ),
            "acquireTime": timestamp("When the current lease was acquired."),
            "renewTime": timestamp("When the current holder last renewed the lease."),
            "leaseTransitions": integer("How many times the lease changed holders."),
            "strategy": string("The strategy for picking the leader in coordinated elections."),
            "preferredHolder": string("Signals a holder to release the lease."),
        },
        "Specification of the Lease.",
    )
    return ResourceType(
        group="coordination.k8s.io",
        version="v1",
        kind="Lease",
        plural="leases",
        singular="lease",
        namespaced=True,
        printer_columns=_columns(PrinterColumn("Holder", "string", ".spec.holderIdentity")),
        schema=resource("Lease defines a lease concept.", {"spec": spec}),
    )


# --------------------------------------------------------------------- apiextensions.k8s.io/v1


def crd_names(description: str) -> JSON:
    return obj(
        {
            "plural": string("The plural name of the resource, in lower case."),
            "singular": string("The singular name of the resource, in lower case."),
            "shortNames": strings("Short names for the resource, as kubectl accepts them."),
            "kind": string("The serialized kind of the resource, in CamelCase."),
            "listKind": string("The serialized kind of the list; defaults to `kind`List."),
            "categories": strings("Grouped resources this one belongs to (e.g. 'all')."),
        },
        description,
        required=("plural", "kind"),
    )


def crd_version() -> JSON:
    column = obj(
        {
            "name": string("A human readable name for the column."),
            "type": string(
                "The OpenAPI type of the column.",
                enum=("integer", "number", "string", "boolean", "date"),
            ),
            "format": string("The OpenAPI format of the column."),
            "description": string("A human readable description of the column."),
            "priority": integer("0 shows in standard view; above 0 only in wide view."),
            "jsonPath": string("A simple JSON path evaluated against each object."),
        },
        required=("name", "type", "jsonPath"),
    )
    scale = obj(
        {
            "specReplicasPath": string("JSON path to the desired replicas, under .spec."),
            "statusReplicasPath": string("JSON path to the observed replicas, under .status."),
            "labelSelectorPath": string("JSON path to the serialized label selector."),
        },
        "Serves a scale subresource.",
        required=("specReplicasPath", "statusReplicasPath"),
    )
    return obj(
        {
            "name": string("The version name, e.g. v1 or v1alpha1."),
            "served": boolean("Whether this version is served by REST APIs."),
            "storage": boolean("Whether this version is the one stored; exactly one is."),
            "deprecated": boolean("Whether this version is deprecated."),
            "deprecationWarning": string("Warning returned to clients of a deprecated version."),
            "schema": obj(
                {
                    "openAPIV3Schema": opaque(
                        "The structural OpenAPI v3 schema objects of this version must follow."
                    )
                },
                "Schema used for validation, pruning and defaulting of this version.",
            ),
            "subresources": obj(
                {
                    "status": obj({}, "Serves a status subresource."),
                    "scale": scale,
                },
                "The subresources this version serves.",
            ),
            "additionalPrinterColumns": array(column, "Additional columns `kubectl get` shows."),
            "selectableFields": array(
                obj({"jsonPath": string("A JSON path to a field usable as a field selector.")}),
                "Fields that may be used as field selectors.",
            ),
        },
        "A version of the custom resource.",
        required=("name", "served", "storage"),
    )


def crd_spec() -> JSON:
    return obj(
        {
            "group": string("The API group of the resources, e.g. vmo.dev."),
            "names": crd_names("The resource and kind names of the custom resource."),
            "scope": string(
                "Whether the resources are namespaced.", enum=("Cluster", "Namespaced")
            ),
            "versions": array(crd_version(), "The versions served.", list_type="atomic"),
            "conversion": obj(
                {
                    "strategy": string(
                        "How objects are converted between versions.",
                        enum=("None",),
                        default="None",
                    ),
                    "webhook": unsupported("VMO does not call conversion webhooks"),
                },
                "How objects are converted between versions.",
            ),
            "preserveUnknownFields": boolean("Deprecated; must be false.", enum=[False]),
        },
        "The resource a user wants to add.",
        required=("group", "names", "scope", "versions"),
    )


def crd_status() -> JSON:
    return obj(
        {
            "conditions": conditions("The observed state of the definition."),
            "acceptedNames": crd_names("The names actually being served."),
            "storedVersions": strings("Versions objects have ever been stored in."),
        },
        "The observed state of the CustomResourceDefinition.",
    )


def custom_resource_definition() -> ResourceType:
    return ResourceType(
        group="apiextensions.k8s.io",
        version="v1",
        kind="CustomResourceDefinition",
        plural="customresourcedefinitions",
        singular="customresourcedefinition",
        namespaced=False,
        short_names=("crd", "crds"),
        categories=("api-extensions",),
        subresources=("status",),
        printer_columns=(CREATED_AT,),
        schema=resource(
            "CustomResourceDefinition declares a resource served by the API server.",
            {"spec": crd_spec(), "status": crd_status()},
            required=("spec",),
        ),
        validate=validate_crd,
    )


# --------------------------------------------------------------------------- all of them


def core_resource_types() -> list[ResourceType]:
    """Every built-in kind, in discovery order (the core group first).

    Only the CRD carries ``metadata.generation``; upstream's core kinds served here do not.
    """
    plain = [
        namespace(),
        node(),
        service(),
        endpoints(),
        config_map(),
        secret(),
        service_account(),
        event(),
        *rbac_types(),
        *authorization_types(),
        *authentication_types(),
        lease(),
    ]
    return [replace(rt, has_generation=False) for rt in plain] + [custom_resource_definition()]
