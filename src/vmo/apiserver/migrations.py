"""Admission of VirtualMachineInstanceMigrations, as KubeVirt's migration webhooks decide.

A migration may be created only for a VMI that exists, is not final, is live-migratable (its
``LiveMigratable`` condition is not False) and has no migration in flight; its spec never
changes afterwards. Messages are upstream's, prefixed as a webhook denial reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmo.api.types import JSON, ResourceType
from vmo.apiserver import errors
from vmo.apiserver import objects as ob
from vmo.apiserver.registry import Registry

CREATE_WEBHOOK = "migration-create-validator.kubevirt.io"
UPDATE_WEBHOOK = "migration-update-validator.kubevirt.io"


def _denied(webhook: str, message: str) -> errors.ApiError:
    return errors.bad_request(f'admission webhook "{webhook}" denied the request: {message}')


def migration_refusal(vmim: JSON, vmi: JSON | None, others: list[JSON] | None = None) -> str | None:
    """Why a new migration of ``vmi`` is refused, or None; ``others`` are the namespace's
    migrations (one not yet final for the same VMI refuses the new one)."""
    namespace = str(vmim.get("metadata", {}).get("namespace", ""))
    name = str((vmim.get("spec") or {}).get("vmiName", ""))
    if vmi is None:
        return f'the VMI "{namespace}/{name}" does not exist'
    status = vmi.get("status") or {}
    phase = status.get("phase") or ""
    if phase in ("Succeeded", "Failed"):
        return "Cannot migrate VMI in finalized state."
    if phase != "Running":
        return f"Cannot migrate VMI {name}: it is not running (phase {phase or 'Pending'})"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "LiveMigratable" and cond.get("status") == "False":
            return (
                f"Cannot migrate VMI, Reason: {cond.get('reason', '')}, "
                f"Message: {cond.get('message', '')}"
            )
    for other in others or []:
        phase = (other.get("status") or {}).get("phase")
        if (other.get("spec") or {}).get("vmiName") == name and phase not in (
            "Succeeded",
            "Failed",
        ):
            return (
                f"in-flight migration detected. Active migration job "
                f"({other['metadata'].get('uid', '')}) is currently already in progress for "
                f"VMI {name}."
            )
    state = status.get("migrationState") or {}
    if state.get("migrationUid") and not state.get("completed") and not state.get("failed"):
        return (
            f"in-flight migration detected. Active migration job ({state['migrationUid']}) "
            f"is currently already in progress for VMI {name}."
        )
    return None


@dataclass
class MigrationAdmission:
    service: ob.ObjectService
    registry: Registry

    def admit(self, rt: ResourceType, obj: JSON, old: JSON | None, caller: ob.Caller) -> None:
        if rt.group != "kubevirt.io" or rt.plural != "virtualmachineinstancemigrations":
            return
        if old is not None:
            if (obj.get("spec") or {}) != (old.get("spec") or {}):
                raise _denied(UPDATE_WEBHOOK, "update of Migration object's spec is restricted")
            return
        vmi_type = self.registry.lookup("kubevirt.io", "v1", "virtualmachineinstances")
        assert vmi_type is not None
        namespace = str(obj.get("metadata", {}).get("namespace", ""))
        name = str((obj.get("spec") or {}).get("vmiName", ""))
        vmi = self.service.find(vmi_type, namespace, name) if name else None
        others = [row.obj() for row in self.service.scan(rt, namespace)]
        refusal = migration_refusal(obj, vmi, others)
        if refusal is not None:
            raise _denied(CREATE_WEBHOOK, refusal)
