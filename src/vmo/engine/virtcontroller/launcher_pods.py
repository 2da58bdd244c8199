"""virt-launcher Pods: one core/v1 Pod per VMI, as virt-controller keeps on a KubeVirt cluster.

VMO runs no pods; the Pod is the record of where and how the VMI runs, so ``kubectl get pods -o
wide`` shows nodes and IPs and ``kubectl logs`` reads its containers (``compute``: QEMU's log;
``guest-console-log``: the serial console). ``launcher_pod`` (pure) decides the Pod from the VMI;
``LauncherPodController`` creates it, keeps its nodeName and status following the VMI (a
migrated VMI's Pod moves to the target node: VMO keeps no separate target pod), deletes Pods of
VMIs that are gone or replaced, and, as upstream, stops a VMI whose Pod a user deleted. The VMI's
``status.activePods`` (Pod uid -> node) records which Pod it had, so that last is level-based.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from vmo.client import NODE, VMI, Conflict, NotFound, Resource
from vmo.engine.virtcontroller.scheduler import InvalidRequest, vmi_request
from vmo.runtime import Controller, EventRecorder, Result, Selector, Watch, split_key, timestamp

log = logging.getLogger(__name__)

__all__ = ["POD", "LauncherPodController", "launcher_pod", "pod_name"]

JSON = dict[str, Any]

POD = Resource("", "v1", "pods", "Pod")
APP_LABEL = "kubevirt.io"
APP = "virt-launcher"
CREATED_BY = "kubevirt.io/created-by"
VMI_NAME = "vm.kubevirt.io/name"
DOMAIN_ANNOTATION = "kubevirt.io/domain"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"  # `kubectl logs POD` reads compute
IMAGE = "vmo.dev/virt-launcher:embedded"
COMPUTE = "compute"
GUEST_CONSOLE_LOG = "guest-console-log"
_POD_PHASES = {
    "Running": "Running",
    "Succeeded": "Succeeded",
    "Failed": "Failed",
    "Unknown": "Unknown",
}
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' generateName alphabet
_MAX_GENERATED_BASE = 58  # as Kubernetes truncates a generateName base


def pod_name(vmi_name: str) -> str:
    """``virt-launcher-<vmi>-<5 random>``, the base cut as a generateName's would be."""
    base = f"virt-launcher-{vmi_name}-"[:_MAX_GENERATED_BASE]
    return base + "".join(secrets.choice(_ALPHABET) for _ in range(5))


def _pod_network_ip(vmi: JSON) -> str | None:
    """The IP the VMI reports on its pod network (the first interface when none is named)."""
    networks = (vmi.get("spec") or {}).get("networks") or []
    pod_nets = {n.get("name") for n in networks if "pod" in n}
    interfaces = (vmi.get("status") or {}).get("interfaces") or []
    for iface in interfaces:
        if iface.get("name") in pod_nets and iface.get("ipAddress"):
            return str(iface["ipAddress"])
    if not networks and interfaces and interfaces[0].get("ipAddress"):
        return str(interfaces[0]["ipAddress"])
    return None


def _vmi_ready(vmi: JSON) -> bool:
    status = vmi.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    running = status.get("phase") == "Running"
    return running and (ready is None or ready.get("status") == "True")


def _started_at(vmi: JSON) -> str:
    for entry in (vmi.get("status") or {}).get("phaseTransitionTimestamps") or []:
        if entry.get("phase") == "Running":
            return str(entry.get("phaseTransitionTimestamp"))
    return str(vmi["metadata"].get("creationTimestamp"))


def _container_state(vmi: JSON, phase: str) -> JSON:
    if phase == "Running":
        return {"running": {"startedAt": _started_at(vmi)}}
    if phase in ("Succeeded", "Failed"):
        code, reason = (0, "Completed") if phase == "Succeeded" else (1, "Error")
        return {"terminated": {"exitCode": code, "reason": reason}}
    return {"waiting": {"reason": "ContainerCreating"}}


def _resources(vmi: JSON) -> JSON:
    try:
        request = vmi_request(vmi)
    except InvalidRequest:
        return {}
    return {"requests": {"cpu": f"{request.cpu_millis}m", "memory": str(request.memory_bytes)}}


def launcher_pod(vmi: JSON, *, name: str, host_ip: str | None) -> JSON:
    """The virt-launcher Pod of ``vmi``, as it should be now (spec, metadata and status)."""
    md, status = vmi["metadata"], vmi.get("status") or {}
    node = str(status.get("nodeName") or "")
    phase = _POD_PHASES.get(str(status.get("phase") or ""), "Pending")
    ready = _vmi_ready(vmi)
    labels = {
        **(md.get("labels") or {}),
        APP_LABEL: APP,
        CREATED_BY: md["uid"],
        VMI_NAME: md["name"],
    }
    owner = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "name": md["name"],
        "uid": md["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    containers: list[JSON] = [
        {"name": COMPUTE, "image": IMAGE, "resources": _resources(vmi)},
        {"name": GUEST_CONSOLE_LOG, "image": IMAGE},
    ]
    spec: JSON = {
        "containers": containers,
        "hostname": md["name"],
        "restartPolicy": "Never",
        "schedulerName": "default-scheduler",
        "terminationGracePeriodSeconds": int(
            (vmi.get("spec") or {}).get("terminationGracePeriodSeconds") or 30
        ),
    }
    if node:
        spec["nodeName"] = node
    pod_status: JSON = {
        "phase": phase,
        "conditions": [
            {"type": "PodScheduled", "status": "True" if node else "False"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ],
        "qosClass": "Burstable",
        "containerStatuses": [
            {
                "name": c["name"],
                "ready": ready,
                "started": phase == "Running",
                "restartCount": 0,
                "image": IMAGE,
                "imageID": "",
                "state": _container_state(vmi, phase),
            }
            for c in containers
        ],
    }
    ip = _pod_network_ip(vmi)
    if ip and phase == "Running":
        pod_status["podIP"], pod_status["podIPs"] = ip, [{"ip": ip}]
    if host_ip and node:
        pod_status["hostIP"], pod_status["hostIPs"] = host_ip, [{"ip": host_ip}]
    if node:
        pod_status["startTime"] = str(md.get("creationTimestamp"))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": md["namespace"],
            "labels": labels,
            "annotations": {DOMAIN_ANNOTATION: md["name"], DEFAULT_CONTAINER: COMPUTE},
            "ownerReferences": [owner],
        },
        "spec": spec,
        "status": pod_status,
    }


def _stamped(
    conditions: Sequence[Mapping[str, Any]], old: Sequence[Mapping[str, Any]]
) -> list[JSON]:
    """Conditions with ``lastTransitionTime`` kept while a status is unchanged."""
    now = timestamp()
    before = {str(c.get("type")): c for c in old}
    out = []
    for cond in conditions:
        prior = before.get(str(cond["type"]))
        same = prior is not None and prior.get("status") == cond["status"]
        stamp = str(prior.get("lastTransitionTime")) if same and prior else now
        out.append({**cond, "lastProbeTime": None, "lastTransitionTime": stamp})
    return out


def _owner_uid(pod: JSON) -> str:
    refs = pod["metadata"].get("ownerReferences") or []
    return next((str(r.get("uid")) for r in refs if r.get("kind") == "VirtualMachineInstance"), "")


def _owner_name(pod: JSON) -> str:
    refs = pod["metadata"].get("ownerReferences") or []
    return next((str(r.get("name")) for r in refs if r.get("kind") == "VirtualMachineInstance"), "")


class LauncherPodController(Controller):
    """Keeps one virt-launcher Pod per VMI, following it; keys are the VMI's ``ns/name``."""

    name = "launcher-pod-controller"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events = EventRecorder(self.client, component="virt-controller")

    def watches(self) -> Sequence[Watch]:
        launchers = Selector(POD, label_selector=f"{APP_LABEL}={APP}")
        return [Watch(VMI), Watch(launchers, self._vmi_of_pod)]

    @staticmethod
    def _vmi_of_pod(_etype: str, pod: JSON) -> list[str]:
        name = _owner_name(pod)
        return [f"{pod['metadata'].get('namespace', '')}/{name}"] if name else []

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        vmi = await self.client.find(VMI, name, namespace)
        pods, _ = await self.client.list(POD, namespace, label_selector=f"{APP_LABEL}={APP}")
        mine = [p for p in pods if _owner_name(p) == name]
        uid = vmi["metadata"]["uid"] if vmi else None
        for stale in (p for p in mine if _owner_uid(p) != uid):
            with contextlib.suppress(NotFound):
                await self.client.delete(POD, stale["metadata"]["name"], namespace)
        current = [p for p in mine if _owner_uid(p) == uid]
        if vmi is None:
            return None
        if not current:
            await self._without_pod(vmi)
            return None
        await self._update(vmi, current[0])
        return None

    async def _without_pod(self, vmi: JSON) -> None:
        md, status = vmi["metadata"], vmi.get("status") or {}
        if md.get("deletionTimestamp"):
            return
        if status.get("activePods"):
            # it had a Pod, and someone deleted it: upstream, that kills the VMI
            if status.get("phase") not in ("Succeeded", "Failed"):
                log.info(
                    "virt-launcher Pod of VMI %s/%s deleted: deleting the VMI",
                    md["namespace"],
                    md["name"],
                )
                await self.events.record(
                    vmi, "SuccessfulDelete", "The virt-launcher Pod was deleted: stopping the VMI"
                )
                with contextlib.suppress(NotFound):
                    await self.client.delete(VMI, md["name"], md["namespace"])
            return
        await self._create(vmi)

    async def _create(self, vmi: JSON) -> None:
        md = vmi["metadata"]
        desired = launcher_pod(vmi, name=pod_name(md["name"]), host_ip=await self._host_ip(vmi))
        status = desired.pop("status")
        try:
            created = await self.client.create(POD, desired, md["namespace"])
        except Conflict:
            self.enqueue(f"{md['namespace']}/{md['name']}", after=0.2)  # name taken: retry
            return
        created["status"] = {**status, "conditions": _stamped(status["conditions"], [])}
        await self.client.replace(POD, created, subresource="status")
        node = str((vmi.get("status") or {}).get("nodeName") or "")
        await self._record_active(vmi, created["metadata"]["uid"], node)

    async def _record_active(self, vmi: JSON, pod_uid: str, node: str) -> None:
        active = (vmi.get("status") or {}).get("activePods") or {}
        if active == {pod_uid: node}:
            return
        patch: JSON = {k: None for k in active if k != pod_uid}
        patch[pod_uid] = node
        md = vmi["metadata"]
        with contextlib.suppress(NotFound):
            await self.client.patch(
                VMI, md["name"], {"status": {"activePods": patch}}, md["namespace"]
            )

    async def _update(self, vmi: JSON, pod: JSON) -> None:
        md = pod["metadata"]
        desired = launcher_pod(vmi, name=md["name"], host_ip=await self._host_ip(vmi))
        status = desired["status"]
        status["conditions"] = _stamped(
            status["conditions"], (pod.get("status") or {}).get("conditions") or []
        )
        if "startTime" in status and (pod.get("status") or {}).get("startTime"):
            status["startTime"] = pod["status"]["startTime"]
        wanted_md = {
            k: desired["metadata"][k] for k in ("labels", "annotations", "ownerReferences")
        }
        if any(md.get(k) != v for k, v in wanted_md.items()) or pod.get("spec") != {
            **(pod.get("spec") or {}),
            **desired["spec"],
        }:
            pod = await self.client.replace(
                POD,
                {
                    **pod,
                    "metadata": {**md, **wanted_md},
                    "spec": {**(pod.get("spec") or {}), **desired["spec"]},
                },
            )
        if pod.get("status") != status:
            await self.client.replace(POD, {**pod, "status": status}, subresource="status")
        node = str((vmi.get("status") or {}).get("nodeName") or "")
        await self._record_active(vmi, pod["metadata"]["uid"], node)

    async def _host_ip(self, vmi: JSON) -> str | None:
        node_name = (vmi.get("status") or {}).get("nodeName")
        if not node_name:
            return None
        node = await self.client.find(NODE, str(node_name))
        addresses = ((node or {}).get("status") or {}).get("addresses") or []
        return next((str(a["address"]) for a in addresses if a.get("type") == "InternalIP"), None)
