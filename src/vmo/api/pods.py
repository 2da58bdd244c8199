"""core/v1 Pod as VMO serves it: each VMI's virt-launcher Pod, written only by the engine.

The schema holds the fields the engine writes (and ``kubectl explain`` shows); users read Pods,
and their logs, but never write them (the API server's admission says so). Printer columns are
kubectl's for pods, in its order; READY, STATUS and RESTARTS are computed as kubectl's pod
printer computes them (``COMPUTED_CELLS``), their JSONPaths the closest plain fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmo.api.core import (
    AGE,
    array,
    boolean,
    conditions,
    integer,
    obj,
    quantity,
    resource,
    string,
    string_map,
    timestamp,
)
from vmo.api.types import JSON, PrinterColumn, ResourceType

__all__ = ["COMPUTE", "COMPUTED_CELLS", "CONTAINERS", "GUEST_CONSOLE_LOG", "pod"]

COMPUTE = "compute"  # QEMU's container upstream; the default container of `kubectl logs`
GUEST_CONSOLE_LOG = "guest-console-log"  # upstream's serial console log container
CONTAINERS = (COMPUTE, GUEST_CONSOLE_LOG)


def _resources() -> JSON:
    return obj(
        {
            "requests": {
                "type": "object",
                "additionalProperties": quantity(),
                "description": "Minimum amount of compute resources required.",
            },
            "limits": {
                "type": "object",
                "additionalProperties": quantity(),
                "description": "Maximum amount of compute resources allowed.",
            },
        },
        "Compute resources required by this container.",
    )


def _container() -> JSON:
    return obj(
        {
            "name": string("Name of the container, unique in the pod."),
            "image": string("Container image name."),
            "command": array(string(), "Entrypoint array."),
            "resources": _resources(),
        },
        required=("name",),
    )


def pod_spec() -> JSON:
    gate = obj({"conditionType": string("A condition type in the pod's conditions.")})
    return obj(
        {
            "containers": array(
                _container(),
                "Containers of the pod (compute and guest-console-log).",
                merge_key="name",
            ),
            "nodeName": string("The node this pod runs on."),
            "hostname": string("The hostname of the pod."),
            "restartPolicy": string(
                "Restart policy for all containers.", enum=("Always", "OnFailure", "Never")
            ),
            "terminationGracePeriodSeconds": integer(
                "Seconds the pod needs to terminate gracefully.", fmt="int64"
            ),
            "schedulerName": string("The scheduler that placed the pod."),
            "nodeSelector": string_map("Labels a node must have to run the pod."),
            "readinessGates": array(gate, "Extra conditions the pod's readiness depends on."),
        },
        "Specification of the desired behavior of the pod.",
        required=("containers",),
    )


def _container_state() -> JSON:
    return obj(
        {
            "waiting": obj(
                {"reason": string("Why it is waiting."), "message": string("Details.")},
                "The container is waiting to start.",
            ),
            "running": obj(
                {"startedAt": timestamp("When the container last started.")},
                "The container is running.",
            ),
            "terminated": obj(
                {
                    "exitCode": integer("Exit status of the container's last termination."),
                    "reason": string("Why it terminated."),
                    "message": string("Details."),
                    "startedAt": timestamp("When the container started."),
                    "finishedAt": timestamp("When the container finished."),
                },
                "The container has terminated.",
                required=("exitCode",),
            ),
        },
        "Details about the container's current condition.",
    )


def _container_status() -> JSON:
    return obj(
        {
            "name": string("The container's name."),
            "ready": boolean("Whether the container is ready."),
            "started": boolean("Whether the container has started."),
            "restartCount": integer("How many times the container has been restarted."),
            "image": string("The container's image."),
            "imageID": string("The image's ID."),
            "state": _container_state(),
        },
        required=("name", "ready", "restartCount", "image", "imageID"),
    )


def _ips(description: str) -> JSON:
    return array(obj({"ip": string("An IP address.")}, required=("ip",)), description)


def pod_status() -> JSON:
    return obj(
        {
            "phase": string(
                "The pod's lifecycle phase, following its VMI's.",
                enum=("Pending", "Running", "Succeeded", "Failed", "Unknown"),
            ),
            "conditions": conditions("Current service state of the pod."),
            "message": string("Why the pod is in this condition."),
            "reason": string("A brief CamelCase reason for the pod's state."),
            "hostIP": string("The IP of the node the pod runs on."),
            "hostIPs": _ips("The IPs of the node the pod runs on."),
            "podIP": string("The IP of the VMI on its pod network."),
            "podIPs": _ips("The IPs of the VMI on its pod network."),
            "nominatedNodeName": string("A node the pod may be placed on after preemption."),
            "startTime": timestamp("When the pod was acknowledged by its node."),
            "qosClass": string(
                "The pod's quality of service class.",
                enum=("Guaranteed", "Burstable", "BestEffort"),
            ),
            "containerStatuses": array(
                _container_status(), "The status of each container.", list_type="atomic"
            ),
        },
        "Most recently observed status of the pod.",
    )


def pod() -> ResourceType:
    return ResourceType(
        group="",
        version="v1",
        kind="Pod",
        plural="pods",
        singular="pod",
        namespaced=True,
        short_names=("po",),
        categories=("all",),
        subresources=("status",),
        printer_columns=(
            PrinterColumn("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
            PrinterColumn("Status", "string", ".status.phase"),
            PrinterColumn("Restarts", "integer", ".status.containerStatuses[0].restartCount"),
            AGE,
            PrinterColumn("IP", "string", ".status.podIP", priority=1),
            PrinterColumn("Node", "string", ".spec.nodeName", priority=1),
            PrinterColumn("Nominated Node", "string", ".status.nominatedNodeName", priority=1),
            PrinterColumn(
                "Readiness Gates", "string", ".spec.readinessGates[*].conditionType", priority=1
            ),
        ),
        schema=resource(
            "Pod is a collection of containers; here, the virt-launcher pod of one VMI.",
            {"spec": pod_spec(), "status": pod_status()},
        ),
        field_selectors={
            "spec.nodeName": ".spec.nodeName",
            "spec.restartPolicy": ".spec.restartPolicy",
            "spec.schedulerName": ".spec.schedulerName",
            "status.phase": ".status.phase",
            "status.podIP": ".status.podIP",
            "status.nominatedNodeName": ".status.nominatedNodeName",
        },
        has_generation=False,
    )


# --------------------------------------------------------------------------- computed cells


def _container_statuses(pod: JSON) -> list[JSON]:
    return list((pod.get("status") or {}).get("containerStatuses") or [])


def ready_cell(pod: JSON) -> str:
    """``2/2``: ready containers of all the pod's containers."""
    total = len((pod.get("spec") or {}).get("containers") or [])
    ready = sum(1 for c in _container_statuses(pod) if c.get("ready"))
    return f"{ready}/{total}"


def status_cell(pod: JSON) -> str:
    """What kubectl prints as STATUS: Terminating, a container's waiting or terminated reason
    (ContainerCreating, Completed, Error), else the phase."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "Terminating"
    status = pod.get("status") or {}
    reason = str(status.get("reason") or status.get("phase") or "")
    for container in _container_statuses(pod):
        state = container.get("state") or {}
        waiting, terminated = state.get("waiting") or {}, state.get("terminated")
        if waiting.get("reason"):
            reason = str(waiting["reason"])
        elif terminated is not None:
            reason = str(terminated.get("reason") or f"ExitCode:{terminated.get('exitCode', 0)}")
    return reason


def restarts_cell(pod: JSON) -> int:
    return sum(int(c.get("restartCount") or 0) for c in _container_statuses(pod))


COMPUTED_CELLS: dict[tuple[str, str, str], Callable[[JSON], Any]] = {
    ("v1", "Pod", "Ready"): ready_cell,
    ("v1", "Pod", "Status"): status_cell,
    ("v1", "Pod", "Restarts"): restarts_cell,
}
"""(apiVersion, kind, printer column) -> the cell, for columns kubectl computes, not reads."""
