"""The DataVolumes of a VM: created from its ``dataVolumeTemplates``, awaited before it starts."""

from __future__ import annotations

import copy
from collections.abc import Mapping

from vmo.engine.virtcontroller.vmi_template import owner_reference
from vmo.engine.virtcontroller.vmstate import JSON

# DataVolume phases a VMI may start on (WaitForFirstConsumer waits for the VMI itself).
DV_READY_PHASES = ("Succeeded", "WaitForFirstConsumer", "PendingPopulation")
DV_FAILED_PHASES = ("Failed",)


def template_data_volume_names(vm: JSON) -> list[str]:
    return [
        str(t["metadata"]["name"])
        for t in vm.get("spec", {}).get("dataVolumeTemplates") or []
        if t.get("metadata", {}).get("name")
    ]


def referenced_data_volumes(vm: JSON) -> list[str]:
    """DataVolume names the template's volumes use (``dataVolume.name``)."""
    volumes = vm.get("spec", {}).get("template", {}).get("spec", {}).get("volumes") or []
    return [
        str(v["dataVolume"]["name"]) for v in volumes if (v.get("dataVolume") or {}).get("name")
    ]


def template_claim_names(vm: JSON) -> list[str]:
    """Claim names the template's ``persistentVolumeClaim`` and ephemeral volumes use; a claim a
    DataVolume of the same name owns is awaited like a ``dataVolume`` volume, as upstream."""
    volumes = vm.get("spec", {}).get("template", {}).get("spec", {}).get("volumes") or []
    names = []
    for volume in volumes:
        pvc = volume.get("persistentVolumeClaim") or (volume.get("ephemeral") or {}).get(
            "persistentVolumeClaim"
        )
        name = (pvc or {}).get("claimName")
        if name:
            names.append(str(name))
    return names


def _awaited(vm: JSON, dvs: Mapping[str, JSON]) -> list[str]:
    """The DataVolumes a VM's volumes wait for: by ``dataVolume`` or by their claim."""
    return [*referenced_data_volumes(vm), *(n for n in template_claim_names(vm) if n in dvs)]


def build_data_volume(vm: JSON, template: JSON) -> JSON:
    """A DataVolume from one of the VM's ``dataVolumeTemplates``, owned by the VM."""
    tmd = template.get("metadata") or {}
    metadata: JSON = {
        "name": tmd["name"],
        "namespace": vm["metadata"].get("namespace", ""),
        "ownerReferences": [owner_reference(vm)],
    }
    for key in ("labels", "annotations"):
        if tmd.get(key):
            metadata[key] = dict(tmd[key])
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": metadata,
        "spec": copy.deepcopy(template.get("spec") or {}),
    }


def missing_data_volumes(vm: JSON, existing: Mapping[str, JSON]) -> list[JSON]:
    return [
        build_data_volume(vm, t)
        for t in vm.get("spec", {}).get("dataVolumeTemplates") or []
        if t.get("metadata", {}).get("name") and t["metadata"]["name"] not in existing
    ]


def _dv_phase(dvs: Mapping[str, JSON], name: str) -> str:
    return str((dvs.get(name) or {}).get("status", {}).get("phase") or "")


def data_volumes_ready(vm: JSON, dvs: Mapping[str, JSON]) -> bool:
    """Every DataVolume the VM creates or uses exists and can be attached."""
    names = set(template_data_volume_names(vm)) | set(_awaited(vm, dvs))
    return all(name in dvs and _dv_phase(dvs, name) in DV_READY_PHASES for name in names)


def data_volume_error(vm: JSON, dvs: Mapping[str, JSON]) -> bool:
    return any(_dv_phase(dvs, n) in DV_FAILED_PHASES for n in _awaited(vm, dvs))


def data_volume_provisioning(vm: JSON, dvs: Mapping[str, JSON]) -> bool:
    """Some DataVolume of the VM is still being imported (or not yet created from its template)."""
    templated = set(template_data_volume_names(vm))
    for name in _awaited(vm, dvs):
        if name not in dvs:
            if name in templated:
                return True
            continue
        if _dv_phase(dvs, name) not in (*DV_READY_PHASES, *DV_FAILED_PHASES):
            return True
    return False
