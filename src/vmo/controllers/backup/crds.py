"""The CustomResourceDefinitions of VMO's backup application (``vmo.dev/v1alpha1``), installable
on any cluster: BackupRepository (where backups go), BackupPolicy (which VMs, when, how long
they are kept) and BackupRestore (a backup back into a VM, a new one or its own). ``ensure_crds`` creates them where they are missing."""

from __future__ import annotations

from typing import Any

from vmo.client import Client
from vmo.controllers.crds import CONDITIONS, GROUP, LABEL_SELECTOR, VERSION, crd, install
from vmo.controllers.crds import integer as _int
from vmo.controllers.crds import obj as _obj
from vmo.controllers.crds import string as _str

JSON = dict[str, Any]


REPOSITORY_SPEC = _obj(
    {
        "local": _obj(
            {"path": _str(description="a directory under the controllers' backup root")},
            required=["path"],
        ),
        "s3": _obj(
            {
                "endpoint": _str(),
                "bucket": _str(),
                "prefix": _str(),
                "region": _str(),
                "credentialsSecret": _str(
                    description="a Secret with keys accessKeyId and secretAccessKey"
                ),
            },
            required=["endpoint", "bucket", "credentialsSecret"],
        ),
        "encryptionKeySecret": _str(description="a Secret whose key 'key' encrypts the chunks"),
        "verify": _obj({"schedule": _str(description="cron: when every chunk is re-hashed")}),
        "chunkSize": _int(minimum=65536, maximum=67108864),
    },
)

POLICY_SPEC = _obj(
    {
        "repository": _str(),
        "schedule": _str(description="cron, as in a CronJob"),
        "selector": LABEL_SELECTOR,
        "retention": _obj(
            {
                "keepLast": _int(minimum=0),
                "hourly": _int(minimum=0),
                "daily": _int(minimum=0),
                "weekly": _int(minimum=0),
                "monthly": _int(minimum=0),
            }
        ),
        "consistency": _str(enum=["Quiesce", "CrashConsistent"], default="Quiesce"),
        "suspend": {"type": "boolean"},
    },
    required=["repository", "schedule"],
)

RESTORE_SPEC = _obj(
    {
        "repository": _str(description="a BackupRepository in this namespace"),
        "backup": _str(description="a backup's id, or a unique prefix of it"),
        "virtualMachine": _str(description="the backed-up VM; without backup, its latest"),
        "target": _obj(
            {
                "name": _str(description="default: the backed-up VM's name"),
                "namespace": _str(description="default: this namespace"),
            }
        ),
        "volumes": {"type": "array", "items": _str(), "description": "default: every disk"},
        "volumesOnly": {"type": "boolean", "description": "restore DataVolumes, touch no VM"},
        "macAddressPolicy": _str(enum=["Keep", "Generate"], default="Keep"),
        "newMacAddresses": {"type": "object", "additionalProperties": _str()},
        "runStrategy": _str(enum=["Always", "Halted", "Manual", "RerunOnFailure", "Once"]),
    },
    required=["repository"],
)

RESTORE_VOLUME = _obj(
    {
        "name": _str(),
        "dataVolume": _str(),
        "size": _int(),
        "phase": _str(),
        "progress": _str(),
        "replaced": _str(),
    },
    required=["name"],
)

VM_STATUS = _obj(
    {
        "name": _str(),
        "lastBackup": _str(),
        "lastBackupType": _str(),
        "lastSuccessTime": _str(format="date-time"),
        "recoveryPoint": _str(format="date-time"),
        "lastFailureTime": _str(format="date-time"),
        "lastFailureReason": _str(),
        "running": {"type": "boolean"},
        "bytesSent": _int(),
    },
    required=["name"],
)


def backup_crds() -> list[JSON]:
    repository_status = _obj(
        {
            "id": _str(),
            "chunkSize": _int(),
            "encrypted": {"type": "boolean"},
            "backups": _int(),
            "lastVerifyTime": _str(format="date-time"),
            "nextVerifyTime": _str(format="date-time"),
            "verification": _obj(
                {
                    "chunks": _int(),
                    "bytes": _int(),
                    "seconds": {"type": "number"},
                    "damagedChunkCount": _int(),
                    "damagedChunks": {
                        "type": "array",
                        "items": _obj({"id": _str(), "reason": _str()}),
                    },
                    "backupsNeedingDamagedChunks": {"type": "array", "items": _str()},
                }
            ),
            "conditions": CONDITIONS,
        }
    )
    policy_status = _obj(
        {
            "lastScheduleTime": _str(format="date-time"),
            "nextScheduleTime": _str(format="date-time"),
            "virtualMachines": {"type": "array", "items": VM_STATUS},
            "conditions": CONDITIONS,
        }
    )
    restore_status = _obj(
        {
            "phase": _str(),
            "backup": _str(),
            "targetName": _str(),
            "targetNamespace": _str(),
            "createdVirtualMachine": {"type": "boolean"},
            "volumes": {"type": "array", "items": RESTORE_VOLUME},
            "startTime": _str(format="date-time"),
            "completionTime": _str(format="date-time"),
            "conditions": CONDITIONS,
        }
    )
    return [
        crd(
            "BackupRestore",
            "backuprestores",
            RESTORE_SPEC,
            restore_status,
            [
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Backup", "type": "string", "jsonPath": ".status.backup"},
                {"name": "Target", "type": "string", "jsonPath": ".status.targetName"},
            ],
        ),
        crd(
            "BackupRepository",
            "backuprepositories",
            REPOSITORY_SPEC,
            repository_status,
            [
                {"name": "Backups", "type": "integer", "jsonPath": ".status.backups"},
                {"name": "Encrypted", "type": "boolean", "jsonPath": ".status.encrypted"},
            ],
        ),
        crd(
            "BackupPolicy",
            "backuppolicies",
            POLICY_SPEC,
            policy_status,
            [
                {"name": "Schedule", "type": "string", "jsonPath": ".spec.schedule"},
                {"name": "Repository", "type": "string", "jsonPath": ".spec.repository"},
                {"name": "LastSchedule", "type": "date", "jsonPath": ".status.lastScheduleTime"},
            ],
        ),
    ]


async def ensure_crds(client: Client) -> None:
    """Creates the backup CRDs that are missing, and brings older ones up to date."""
    await install(client, backup_crds())


__all__ = ["GROUP", "VERSION", "backup_crds", "ensure_crds"]
