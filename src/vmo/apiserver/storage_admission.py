"""Admission of claims and volumes, as kube-apiserver's storage admission plugins decide.

- DefaultStorageClass: a claim that names no class gets the default one (the newest of those
  annotated ``storageclass.kubernetes.io/is-default-class: "true"``).
- StorageObjectInUseProtection: every claim gets ``kubernetes.io/pvc-protection`` and every
  volume ``kubernetes.io/pv-protection``; the provisioner removes them once nothing uses them.
- PersistentVolumeClaimResize: a claim grows only when bound and its class allows expansion.
- A class that lists the access modes it gives (parameter ``accessModes``, comma-separated, as
  VMO's own classes do) refuses a claim asking for another, naming the field; upstream leaves
  that to the provisioner, which would keep the claim Pending for ever.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmo.api.storage import (
    DEFAULT_CLASS_ANNOTATION,
    PV_PROTECTION,
    PVC_PROTECTION,
    claim_request,
)
from vmo.api.types import JSON, Cause, ResourceType
from vmo.apiserver import errors
from vmo.apiserver import objects as ob
from vmo.apiserver.registry import Registry

ACCESS_MODES_PARAMETER = "accessModes"


@dataclass
class StorageAdmission:
    service: ob.ObjectService
    registry: Registry

    def admit(self, rt: ResourceType, obj: JSON, old: JSON | None, caller: ob.Caller) -> None:
        if rt.group != "" or rt.kind not in ("PersistentVolumeClaim", "PersistentVolume"):
            return
        md = obj.setdefault("metadata", {})
        if old is None and not md.get("deletionTimestamp"):
            protection = PVC_PROTECTION if rt.kind == "PersistentVolumeClaim" else PV_PROTECTION
            finalizers = list(md.get("finalizers") or [])
            if protection not in finalizers:
                md["finalizers"] = [*finalizers, protection]
        if old is None:
            # kube-apiserver starts both kinds Pending, whatever the request said
            obj["status"] = {"phase": "Pending"}
        if rt.kind != "PersistentVolumeClaim":
            return
        spec = obj.setdefault("spec", {})
        if old is None:
            spec.setdefault("volumeMode", "Filesystem")
            if spec.get("storageClassName") is None:
                default = self._default_class()
                if default is not None:
                    spec["storageClassName"] = default["metadata"]["name"]
        sc = self._class(spec.get("storageClassName"))
        name = str(md.get("name", ""))
        if old is None and sc is not None:
            causes = access_mode_causes(spec, sc)
            if causes:
                raise errors.invalid(rt.kind, rt.group, name, causes)
        if old is not None:
            before, after = claim_request(old), claim_request(obj)
            if before is not None and after is not None and after > before:
                cause = resize_cause(old, sc)
                if cause is not None:
                    raise errors.invalid(rt.kind, rt.group, name, [cause])

    def _classes(self) -> list[JSON]:
        rt = self.registry.lookup("storage.k8s.io", "v1", "storageclasses")
        assert rt is not None
        return [row.obj() for row in self.service.scan(rt)]

    def _class(self, name: object) -> JSON | None:
        if not name:
            return None
        rt = self.registry.lookup("storage.k8s.io", "v1", "storageclasses")
        assert rt is not None
        return self.service.find(rt, "", str(name))

    def _default_class(self) -> JSON | None:
        defaults = [
            sc
            for sc in self._classes()
            if (sc["metadata"].get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION) == "true"
        ]
        defaults.sort(key=lambda sc: str(sc["metadata"].get("creationTimestamp", "")))
        return defaults[-1] if defaults else None


def class_access_modes(sc: JSON) -> list[str] | None:
    """The access modes a class says it gives, or None when it does not say."""
    listed = (sc.get("parameters") or {}).get(ACCESS_MODES_PARAMETER)
    if not listed:
        return None
    return [m.strip() for m in str(listed).split(",") if m.strip()]


def access_mode_causes(spec: JSON, sc: JSON) -> list[Cause]:
    given = class_access_modes(sc)
    if given is None:
        return []
    name = sc["metadata"]["name"]
    return [
        Cause(
            f"spec.accessModes[{index}]",
            f'Unsupported value: "{mode}": StorageClass "{name}" provides only ' + ", ".join(given),
            "FieldValueNotSupported",
        )
        for index, mode in enumerate(spec.get("accessModes") or [])
        if mode not in given
    ]


def resize_cause(old: JSON, sc: JSON | None) -> Cause | None:
    """Why growing the claim ``old`` is refused, or None."""
    field = "spec.resources.requests.storage"
    if (old.get("status") or {}).get("phase") != "Bound":
        return Cause(
            field,
            "Forbidden: only bound persistent volume claims can be expanded",
            "FieldValueForbidden",
        )
    if sc is None or not sc.get("allowVolumeExpansion"):
        return Cause(
            field,
            "Forbidden: only dynamically provisioned pvc can be resized and the storageclass "
            "that provisions the pvc must support resize",
            "FieldValueForbidden",
        )
    return None
