"""Whether a VMI can be live-migrated: the ``LiveMigratable`` condition's rules, as upstream.

KubeVirt refuses to live-migrate a VMI bound to the pod network with ``bridge`` (its address
belongs to the source pod) unless the VMI carries the
``kubevirt.io/allow-pod-bridge-network-live-migration`` annotation, and a VMI whose disks cannot
follow it. VMO copies node-local volumes during the migration, so the disks that cannot follow
are the ones two VMs share (``shareable``) on a node-local volume, and host disks.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]

ALLOW_POD_BRIDGE = "kubevirt.io/allow-pod-bridge-network-live-migration"
INTERFACE_NOT_MIGRATABLE = "InterfaceNotLiveMigratable"
DISKS_NOT_MIGRATABLE = "DisksNotLiveMigratable"
POD_BRIDGE_MESSAGE = (
    "cannot migrate VMI which does not use masquerade, bridge with "
    f"{ALLOW_POD_BRIDGE} VM annotation or a migratable plugin to connect to the pod network"
)


@dataclass(frozen=True)
class Migratability:
    migratable: bool
    reason: str = ""
    message: str = ""

    def condition(self, now: str) -> JSON:
        cond: JSON = {
            "type": "LiveMigratable",
            "status": "True" if self.migratable else "False",
            "lastProbeTime": None,
            "lastTransitionTime": now,
        }
        if not self.migratable:
            cond |= {"reason": self.reason, "message": self.message}
        return cond


def _pod_network_names(spec: JSON) -> set[str]:
    return {str(n.get("name")) for n in spec.get("networks") or [] if "pod" in n}


def live_migratable(vmi: JSON, *, shared_claims: Collection[str] = ()) -> Migratability:
    """The VMI's migratability; ``shared_claims`` names its volumes on shared storage."""
    spec = vmi.get("spec") or {}
    annotations = (vmi.get("metadata") or {}).get("annotations") or {}
    pod = _pod_network_names(spec)
    devices = (spec.get("domain") or {}).get("devices") or {}
    for iface in devices.get("interfaces") or []:
        if iface.get("name") in pod and "bridge" in iface and ALLOW_POD_BRIDGE not in annotations:
            return Migratability(False, INTERFACE_NOT_MIGRATABLE, POD_BRIDGE_MESSAGE)
    disks = {str(d.get("name")): d for d in devices.get("disks") or []}
    for volume in spec.get("volumes") or []:
        name = str(volume.get("name"))
        if "hostDisk" in volume:
            return Migratability(
                False,
                DISKS_NOT_MIGRATABLE,
                f"cannot migrate VMI: volume {name} is a hostDisk, which stays on its node",
            )
        claim = claim_name(volume)
        if claim and disks.get(name, {}).get("shareable") and claim not in shared_claims:
            return Migratability(
                False,
                DISKS_NOT_MIGRATABLE,
                f"cannot migrate VMI: PVC {claim} is not shared, live migration requires that "
                "all PVCs must be shared (using ReadWriteMany access mode)",
            )
    return Migratability(True)


def claim_name(volume: JSON) -> str:
    """The claim (pool volume) a ``dataVolume`` or ``persistentVolumeClaim`` volume names."""
    if "dataVolume" in volume:
        return str((volume["dataVolume"] or {}).get("name", ""))
    if "persistentVolumeClaim" in volume:
        return str((volume["persistentVolumeClaim"] or {}).get("claimName", ""))
    return ""


def vmi_claim_names(vmi: JSON) -> list[str]:
    """Every claim a VMI's volumes name: DataVolumes, claims, and ephemeral claims' bases."""
    names = []
    for volume in (vmi.get("spec") or {}).get("volumes") or []:
        if "ephemeral" in volume:
            pvc = (volume["ephemeral"] or {}).get("persistentVolumeClaim") or {}
            names.append(str(pvc.get("claimName", "")))
        elif claim_name(volume):
            names.append(claim_name(volume))
    return names


def migration_method(vmi: JSON, *, shared_claims: Collection[str] = ()) -> str:
    """``LiveMigration`` when every disk is on shared storage, else ``BlockMigration``."""
    for volume in (vmi.get("spec") or {}).get("volumes") or []:
        if "cloudInitNoCloud" in volume or "cloudInitConfigDrive" in volume:
            continue  # regenerated on the target
        claim = claim_name(volume)
        if not claim or claim not in shared_claims:
            return "BlockMigration"
    return "LiveMigration"
