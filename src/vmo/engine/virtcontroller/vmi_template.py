"""The VirtualMachineInstance a VirtualMachine's template describes, as KubeVirt's VM controller builds it.

Pure: the caller reads the referenced instancetype and preference and passes them in.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from vmo.api.annotations import VM_TEMPLATE_HASH
from vmo.api.kubevirt.core import START_PAUSED

JSON = dict[str, Any]

GENERATION_ANNOTATION = "kubevirt.io/vm-generation"
# KubeVirt keeps the template a VMI was started from in a ControllerRevision; VMO keeps its hash
# on the VMI instead, which is all the RestartRequired comparison needs.
TEMPLATE_HASH_ANNOTATION = VM_TEMPLATE_HASH

# Deprecated v1beta1 spellings of preferredCPUTopology and what they mean now.
_TOPOLOGY_ALIASES = {
    "preferSockets": "sockets",
    "preferCores": "cores",
    "preferThreads": "threads",
    "preferSpread": "spread",
    "preferAny": "any",
}
_DEFAULT_SPREAD_RATIO = 2
# Annotations KubeVirt puts on a VMI started from a VM with an instancetype or preference.
_REF_ANNOTATIONS = {
    "virtualmachineinstancetype": "kubevirt.io/instancetype-name",
    "virtualmachineclusterinstancetype": "kubevirt.io/cluster-instancetype-name",
    "virtualmachinepreference": "kubevirt.io/preference-name",
    "virtualmachineclusterpreference": "kubevirt.io/cluster-preference-name",
}


def template_hash(vm: JSON) -> str:
    """A short digest of ``spec.template``: equal digests mean a VMI needs no restart."""
    template = vm.get("spec", {}).get("template") or {}
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def owner_reference(vm: JSON) -> JSON:
    md = vm["metadata"]
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "name": md["name"],
        "uid": md.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_vmi(
    vm: JSON,
    *,
    instancetype: JSON | None = None,
    preference: JSON | None = None,
    start_paused: bool = False,
) -> JSON:
    """The VMI to create for ``vm``: its template with the instancetype and preference applied."""
    md = vm["metadata"]
    template = copy.deepcopy(vm.get("spec", {}).get("template") or {})
    tmd = template.get("metadata") or {}
    annotations = dict(tmd.get("annotations") or {})
    annotations[GENERATION_ANNOTATION] = str(md.get("generation", 1))
    annotations[TEMPLATE_HASH_ANNOTATION] = template_hash(vm)
    spec: JSON = template.get("spec") or {}
    if instancetype is not None:
        apply_instancetype(spec, instancetype, preference)
        _annotate_ref(annotations, vm, "instancetype")
        annotations = {**(instancetype.get("spec", {}).get("annotations") or {}), **annotations}
    if preference is not None:
        apply_preference(spec, preference)
        _annotate_ref(annotations, vm, "preference")
    if start_paused:
        spec["startStrategy"] = START_PAUSED
    metadata: JSON = {
        "name": md["name"],
        "namespace": md.get("namespace", ""),
        "annotations": annotations,
        "ownerReferences": [owner_reference(vm)],
    }
    if tmd.get("labels"):
        metadata["labels"] = dict(tmd["labels"])
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": metadata,
        "spec": spec,
    }


def _annotate_ref(annotations: dict[str, str], vm: JSON, key: str) -> None:
    matcher = vm.get("spec", {}).get(key) or {}
    kind = str(matcher.get("kind") or f"virtualmachinecluster{key}").lower()
    name = _REF_ANNOTATIONS.get(kind)
    if name and matcher.get("name"):
        annotations[name] = str(matcher["name"])


def preferred_topology(preference: JSON | None) -> str:
    """The preference's CPU topology, normalised to the current names; ``sockets`` by default."""
    spec = (preference or {}).get("spec") or {}
    chosen = str((spec.get("cpu") or {}).get("preferredCPUTopology") or "sockets")
    return _TOPOLOGY_ALIASES.get(chosen, chosen)


def guest_topology(vcpus: int, preference: JSON | None) -> JSON:
    """Sockets, cores and threads for ``vcpus`` guest CPUs, laid out as the preference asks."""
    topology = preferred_topology(preference)
    if topology in ("cores", "any"):
        return {"sockets": 1, "cores": vcpus, "threads": 1}
    if topology == "threads":
        return {"sockets": 1, "cores": 1, "threads": vcpus}
    if topology == "spread":
        spread = ((preference or {}).get("spec", {}).get("cpu") or {}).get("spreadOptions") or {}
        ratio = int(spread.get("ratio") or _DEFAULT_SPREAD_RATIO)
        if ratio > 0 and vcpus % ratio == 0:
            return {"sockets": vcpus // ratio, "cores": ratio, "threads": 1}
    return {"sockets": vcpus, "cores": 1, "threads": 1}


def apply_instancetype(spec: JSON, instancetype: JSON, preference: JSON | None) -> None:
    """Guest CPUs and memory (and node selector) of the instancetype, into a VMI spec in place."""
    it_spec = instancetype.get("spec") or {}
    domain = spec.setdefault("domain", {})
    cpu_spec = it_spec.get("cpu") or {}
    if cpu_spec.get("guest"):
        cpu = domain.setdefault("cpu", {})
        cpu.update(guest_topology(int(cpu_spec["guest"]), preference))
        for key in ("model", "dedicatedCpuPlacement", "isolateEmulatorThread", "maxSockets"):
            source = "dedicatedCPUPlacement" if key == "dedicatedCpuPlacement" else key
            if cpu_spec.get(source) is not None:
                cpu[key] = cpu_spec[source]
    memory_spec = it_spec.get("memory") or {}
    if memory_spec.get("guest"):
        memory = domain.setdefault("memory", {})
        memory["guest"] = memory_spec["guest"]
        if memory_spec.get("hugepages"):
            memory["hugepages"] = memory_spec["hugepages"]
    if it_spec.get("nodeSelector") and not spec.get("nodeSelector"):
        spec["nodeSelector"] = dict(it_spec["nodeSelector"])


def apply_preference(spec: JSON, preference: JSON) -> None:
    """Preferred disk bus, interface model and machine type, where the VM left them unset."""
    pref = preference.get("spec") or {}
    devices_pref = pref.get("devices") or {}
    domain = spec.setdefault("domain", {})
    devices = domain.setdefault("devices", {})
    bus = devices_pref.get("preferredDiskBus")
    if bus:
        for disk in devices.get("disks") or []:
            if not any(kind in disk for kind in ("disk", "cdrom", "lun")):
                disk["disk"] = {}
            for kind in ("disk", "cdrom", "lun"):
                if isinstance(disk.get(kind), dict):
                    disk[kind].setdefault("bus", bus)
    model = devices_pref.get("preferredInterfaceModel")
    if model:
        for iface in devices.get("interfaces") or []:
            iface.setdefault("model", model)
    machine_type = (pref.get("machine") or {}).get("preferredMachineType")
    if machine_type:
        machine = domain.setdefault("machine", {})
        # the VM's admission fills in q35, so a preference only replaces that default
        if not machine.get("type") or machine.get("type") == "q35":
            machine["type"] = machine_type
