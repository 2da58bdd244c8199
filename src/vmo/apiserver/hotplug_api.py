"""The ``addvolume`` / ``removevolume`` subresources of VMs and VMIs: disk hotplug as virt-api does it.

The bodies are upstream's ``AddVolumeOptions`` and ``RemoveVolumeOptions``. On a VMI the request
changes the VMI's spec (the node agent then attaches or detaches the disk); on a VM (virtctl's
``--persist``) it changes the VM's template, and the running VMI too, as the VM controller does
with declarative hotplug. Only ``persistentVolumeClaim`` and ``dataVolume`` sources hotplug, on
the SCSI bus (q35's PCIe root has no hotplug slots for virtio-blk without spare root ports).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from vmo.api.annotations import VM_TEMPLATE_HASH
from vmo.api.types import JSON, ResourceType
from vmo.apiserver import errors
from vmo.apiserver import objects as ob
from vmo.apiserver.errors import ApiError
from vmo.apiserver.registry import Registry

__all__ = ["HOTPLUG_SUBRESOURCES", "VolumeHotplug", "add_options", "remove_options"]

HOTPLUG_SUBRESOURCES = ("addvolume", "removevolume")
HOTPLUG_BUS = "scsi"
_SOURCES = {"persistentVolumeClaim": "persistentvolumeclaims", "dataVolume": "datavolumes"}


@dataclass(frozen=True)
class AddVolume:
    name: str
    disk: JSON
    volume: JSON
    source_kind: str  # persistentVolumeClaim | dataVolume
    source_name: str


def _conflict(resource: str, name: str, message: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource}.kubevirt.io "{name}": {message}',
        kind=resource,
        group="kubevirt.io",
        name=name,
    )


def add_options(body: JSON) -> AddVolume:
    """Upstream's checks of an ``AddVolumeOptions`` body; the volume and disk it adds."""
    if not body:
        raise errors.bad_request("Request with no body, a new name is expected as the request body")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise errors.bad_request("AddVolumeOptions requires name to be set")
    disk = body.get("disk")
    if not isinstance(disk, dict):
        raise errors.bad_request("AddVolumeOptions requires disk to not be nil")
    source = body.get("volumeSource")
    if not isinstance(source, dict):
        raise errors.bad_request("AddVolumeOptions requires VolumeSource to not be nil")
    kinds = [k for k in _SOURCES if isinstance(source.get(k), dict)]
    if len(kinds) != 1 or set(source) - set(_SOURCES):
        raise errors.bad_request(
            "AddVolumeOptions.volumeSource must have exactly one of persistentVolumeClaim "
            "or dataVolume: only claims can be hotplugged"
        )
    kind = kinds[0]
    src = dict(source[kind])
    key = "claimName" if kind == "persistentVolumeClaim" else "name"
    if not isinstance(src.get(key), str) or not src[key]:
        raise errors.bad_request(f"AddVolumeOptions.volumeSource.{kind}.{key} is required")
    src["hotpluggable"] = True
    return AddVolume(name, _hotplug_disk(name, disk), {"name": name, kind: src}, kind, src[key])


def _hotplug_disk(name: str, disk: JSON) -> JSON:
    disk = copy.deepcopy(disk)
    disk["name"] = name
    for other in ("cdrom", "lun"):
        if other in disk:
            raise errors.bad_request(f"hotplugged Disk {name} must be a disk, not a {other}")
    target = disk.setdefault("disk", {})
    if not isinstance(target, dict):
        raise errors.bad_request(f"AddVolumeOptions.disk.disk of {name} must be an object")
    bus = target.setdefault("bus", HOTPLUG_BUS)
    if bus != HOTPLUG_BUS:
        raise errors.bad_request(f"hotplugged Disk {name} does not use a scsi bus")
    if disk.get("bootOrder") is not None:
        raise errors.bad_request(f"hotplugged Disk {name} cannot have a bootOrder")
    return disk


def remove_options(body: JSON) -> str:
    if not body:
        raise errors.bad_request("Request with no body, a new name is expected as the request body")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise errors.bad_request("RemoveVolumeOptions requires name to be set")
    return name


def _source_name(volume: JSON) -> str:
    for kind, key in (("persistentVolumeClaim", "claimName"), ("dataVolume", "name")):
        if isinstance(volume.get(kind), dict):
            return str(volume[kind].get(key) or "")
    return ""


def _hotpluggable(volume: JSON) -> bool:
    return any(
        isinstance(volume.get(kind), dict) and volume[kind].get("hotpluggable") is True
        for kind in _SOURCES
    )


def verify_add(volumes: list[JSON], request: AddVolume) -> str | None:
    """Why ``request`` cannot be added to ``volumes``, or None."""
    for volume in volumes:
        if volume.get("name") == request.name:
            return (
                f"Unable to add volume [{request.name}] because volume with that name "
                "already exists"
            )
        if _source_name(volume) == request.source_name:
            return f"Unable to add volume source [{request.source_name}] because it already exists"
    return None


def verify_remove(volumes: list[JSON], name: str) -> str | None:
    for volume in volumes:
        if volume.get("name") == name or _source_name(volume) == name:
            if not _hotpluggable(volume):
                return (
                    f"Unable to remove volume [{volume.get('name')}] because it is not hotpluggable"
                )
            return None
    return f"Unable to remove volume [{name}] because it does not exist"


def template_hash(vm: JSON) -> str:
    """The VM controller's digest of ``spec.template`` (engine.virtcontroller.vmi_template): a
    VMI recording the VM's current digest needs no restart."""
    template = vm.get("spec", {}).get("template") or {}
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def apply_add(spec: JSON, request: AddVolume) -> None:
    spec.setdefault("volumes", []).append(copy.deepcopy(request.volume))
    devices = spec.setdefault("domain", {}).setdefault("devices", {})
    devices.setdefault("disks", []).append(copy.deepcopy(request.disk))


def apply_remove(spec: JSON, name: str) -> None:
    volumes = spec.get("volumes") or []
    gone = {str(v.get("name")) for v in volumes if v.get("name") == name or _source_name(v) == name}
    spec["volumes"] = [v for v in volumes if v.get("name") not in gone]
    devices = (spec.get("domain") or {}).get("devices") or {}
    if "disks" in devices:
        devices["disks"] = [d for d in devices["disks"] if d.get("name") not in gone]


@dataclass
class VolumeHotplug:
    """Applies one add/remove request to a VM or VMI (``resource`` is their plural)."""

    service: ob.ObjectService
    registry: Registry

    def resource_type(self, plural: str) -> ResourceType:
        rt = self.registry.lookup("kubevirt.io", "v1", plural)
        if rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rt

    def handle(self, *, resource: str, action: str, namespace: str, name: str, body: JSON) -> None:
        dry_run = body.get("dryRun") == ["All"]
        if body.get("dryRun") not in (None, [], ["All"]):
            raise errors.bad_request(f'Invalid dryRun {body.get("dryRun")!r}: only ["All"]')
        if action == "addvolume":
            request = add_options(body)
            self._check_source(namespace, request)
            change: Callable[[JSON], None] = lambda spec: apply_add(spec, request)  # noqa: E731
            verify: Callable[[list[JSON]], str | None] = lambda vs: verify_add(vs, request)  # noqa: E731
        else:
            removed = remove_options(body)
            change = lambda spec: apply_remove(spec, removed)  # noqa: E731
            verify = lambda vs: verify_remove(vs, removed)  # noqa: E731
        if resource == "virtualmachineinstances":
            self._vmi(namespace, name, change, verify, dry_run=dry_run)
        else:
            self._vm(namespace, name, change, verify, dry_run=dry_run)

    def _check_source(self, namespace: str, request: AddVolume) -> None:
        plural = _SOURCES[request.source_kind]
        pvc = plural == "persistentvolumeclaims"
        group, version = ("", "v1") if pvc else ("cdi.kubevirt.io", "v1beta1")
        rt = self.registry.lookup(group, version, plural)
        if rt is None:
            return  # a kind this server does not serve: the node agent reports the volume
        if self.service.find(rt, namespace, request.source_name) is None:
            raise ApiError(
                404,
                "NotFound",
                f"Unable to add volume [{request.name}]: {plural} "
                f'"{request.source_name}" not found',
                kind=plural,
                group=group,
                name=request.source_name,
            )

    def _vmi(
        self,
        namespace: str,
        name: str,
        change: Callable[[JSON], None],
        verify: Callable[[list[JSON]], str | None],
        *,
        dry_run: bool,
        template_hashes: tuple[str, str] | None = None,
    ) -> None:
        rt = self.resource_type("virtualmachineinstances")
        current = self.service.row(rt, namespace, name)
        vmi = current.obj()
        if (vmi.get("status") or {}).get("phase") != "Running":
            raise _conflict("virtualmachineinstance", name, "VMI is not running")
        spec = vmi.setdefault("spec", {})
        problem = verify(list(spec.get("volumes") or []))
        if problem:
            raise _conflict("virtualmachineinstance", name, problem)
        devices = (spec.get("domain") or {}).get("devices") or {}
        if devices.get("disableHotplug") is True:
            raise _conflict(
                "virtualmachineinstance",
                name,
                "hotplug is disabled for this VMI (spec.domain.devices.disableHotplug)",
            )
        change(spec)
        annotations = vmi["metadata"].setdefault("annotations", {})
        if template_hashes and annotations.get(VM_TEMPLATE_HASH) == template_hashes[0]:
            # the VMI follows its VM's new template by hotplug: no restart is required for it
            annotations[VM_TEMPLATE_HASH] = template_hashes[1]
        self.service.replace(rt, current, vmi, caller=ob.Caller(dry_run=dry_run))

    def _vm(
        self,
        namespace: str,
        name: str,
        change: Callable[[JSON], None],
        verify: Callable[[list[JSON]], str | None],
        *,
        dry_run: bool,
    ) -> None:
        rt = self.resource_type("virtualmachines")
        current = self.service.row(rt, namespace, name)
        vm = current.obj()
        template = vm.setdefault("spec", {}).setdefault("template", {}).setdefault("spec", {})
        problem = verify(list(template.get("volumes") or []))
        if problem:
            raise _conflict("virtualmachine", name, problem)
        vmi = self.service.find(self.resource_type("virtualmachineinstances"), namespace, name)
        running = vmi is not None and (vmi.get("status") or {}).get("phase") == "Running"
        owned = vmi is not None and any(
            ref.get("uid") == vm["metadata"].get("uid")
            for ref in vmi["metadata"].get("ownerReferences") or []
        )
        vmi_problem = (
            verify(list((vmi or {}).get("spec", {}).get("volumes") or []))
            if running and owned
            else "not running"
        )
        old_hash = template_hash(vm)
        change(template)
        self.service.replace(rt, current, vm, caller=ob.Caller(dry_run=dry_run))
        if vmi_problem is None:
            # what the VM controller does with a template change of a hotpluggable volume
            hashes = (old_hash, template_hash(vm))
            self._vmi(namespace, name, change, verify, dry_run=dry_run, template_hashes=hashes)
