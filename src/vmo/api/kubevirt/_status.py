"""Status schemas of VMs, VMIs and migrations: every field KubeVirt's controllers write.

VMO's engine writes these with upstream's names and values; a misspelt field is refused.
"""

from __future__ import annotations

from vmo.api.kubevirt._builders import (
    JSON,
    any_object,
    arr,
    boolean,
    integer,
    obj,
    quantity,
    string,
    string_map,
    strings,
)
from vmo.api.kubevirt._common import kubevirt_condition, phase_transition_timestamps

RUN_STRATEGIES = ("Always", "RerunOnFailure", "Manual", "Halted", "Once", "WaitAsReceiver")
PRINTABLE_STATUSES = (
    "Stopped",
    "Provisioning",
    "Starting",
    "Running",
    "Paused",
    "Stopping",
    "Terminating",
    "CrashLoopBackOff",
    "Migrating",
    "Unknown",
    "ErrorUnschedulable",
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrorPvcNotFound",
    "DataVolumeError",
    "WaitingForVolumeBinding",
    "WaitingForReceiver",
)
VMI_PHASES = (
    "Pending",
    "Scheduling",
    "Scheduled",
    "Running",
    "Succeeded",
    "Failed",
    "WaitingForSync",
    "Unknown",
)
MIGRATION_PHASES = (
    "Pending",
    "Scheduling",
    "Scheduled",
    "PreparingTarget",
    "TargetReady",
    "Running",
    "Succeeded",
    "Failed",
    "WaitingForSync",
    "Synchronizing",
)


def vm_status() -> JSON:
    revision_ref = obj(
        {"name": string(), "kind": string(), "controllerRevisionRef": obj({"name": string()})},
        preserve=True,
    )
    return obj(
        {
            "printableStatus": string(enum=PRINTABLE_STATUSES, default="Stopped"),
            "ready": boolean(),
            "created": boolean(),
            "conditions": arr(kubevirt_condition()),
            "runStrategy": string(enum=RUN_STRATEGIES),
            "observedGeneration": integer(),
            "desiredGeneration": integer(),
            "volumeSnapshotStatuses": arr(
                obj(
                    {"name": string(), "enabled": boolean(), "reason": string()},
                    required=("name", "enabled"),
                )
            ),
            "instancetypeRef": revision_ref,
            "preferenceRef": revision_ref,
            "startFailure": obj(
                {
                    "consecutiveFailCount": integer(),
                    "lastFailedVMIUID": string(),
                    "retryAfterTimestamp": string(),
                }
            ),
            "stateChangeRequests": arr(
                obj(
                    {
                        "action": string(enum=("Start", "Stop")),
                        "data": string_map(),
                        "uid": string(),
                    },
                    required=("action",),
                )
            ),
            "snapshotInProgress": string(),
            "restoreInProgress": string(),
            "memoryDumpRequest": any_object(),
            "volumeRequests": arr(any_object()),
            "volumeUpdateState": any_object(),
            "changedBlockTracking": any_object(),
        }
    )


def vmi_interface_status() -> JSON:
    return obj(
        {
            "name": string(),
            "interfaceName": string(),
            "ipAddress": string(),
            "ipAddresses": strings(),
            "mac": string(),
            "podInterfaceName": string(),
            "infoSource": string(),
            "queueCount": integer(),
            "linkState": string(),
        }
    )


def migration_state() -> JSON:
    names = (
        "abortStatus",
        "endTimestamp",
        "failureReason",
        "migrationNetworkType",
        "migrationPolicyName",
        "migrationUid",
        "mode",
        "sourceNode",
        "sourcePersistentStatePVCName",
        "sourcePod",
        "startTimestamp",
        "targetAttachmentPodUID",
        "targetNode",
        "targetNodeAddress",
        "targetNodeDomainReadyTimestamp",
        "targetNodeTopology",
        "targetPersistentStatePVCName",
        "targetPod",
    )
    properties: dict[str, JSON] = {name: string() for name in names}
    properties["abortStatus"] = string(enum=("Succeeded", "Failed", "Aborting"))
    properties["mode"] = string(enum=("PreCopy", "PostCopy", "Paused"))
    for flag in ("abortRequested", "completed", "failed", "targetNodeDomainDetected"):
        properties[flag] = boolean()
    for sub in ("migrationConfiguration", "sourceState", "targetState"):
        properties[sub] = any_object()
    properties["targetCPUSet"] = arr(integer())
    properties["targetDirectMigrationNodePorts"] = {
        "type": "object",
        "additionalProperties": {"type": "integer"},
    }
    properties["targetMemoryOverhead"] = quantity()
    return obj(properties)


def vmi_status() -> JSON:
    return obj(
        {
            "phase": string(enum=VMI_PHASES),
            "reason": string(),
            "nodeName": string(),
            "conditions": arr(kubevirt_condition()),
            "interfaces": arr(vmi_interface_status()),
            "migrationState": migration_state(),
            "migrationMethod": string(enum=("BlockMigration", "LiveMigration")),
            "migrationTransport": string(),
            "evacuationNodeName": string(),
            "phaseTransitionTimestamps": phase_transition_timestamps(),
            "guestOSInfo": obj(
                {
                    name: string()
                    for name in (
                        "id",
                        "kernelRelease",
                        "kernelVersion",
                        "machine",
                        "name",
                        "prettyName",
                        "version",
                        "versionId",
                    )
                }
            ),
            "memory": obj(
                {
                    "guestAtBoot": quantity(),
                    "guestCurrent": quantity(),
                    "guestRequested": quantity(),
                    "memoryOverhead": quantity(),
                }
            ),
            "currentCPUTopology": obj(
                {"sockets": integer(), "cores": integer(), "threads": integer()}
            ),
            "machine": obj({"type": string()}),
            "qosClass": string(),
            "activePods": string_map(),
            "volumeStatus": arr(any_object()),
            "migratedVolumes": arr(any_object()),
            "fsFreezeStatus": string(),
            "launcherContainerImageVersion": string(),
            "virtualMachineRevisionName": string(),
            "selinuxContext": string(),
            "runtimeUser": integer(),
            "VSOCKCID": integer(),
            "topologyHints": any_object(),
            "kernelBootStatus": any_object(),
            "changedBlockTracking": any_object(),
        }
    )


def vmim_status() -> JSON:
    return obj(
        {
            "phase": string(enum=MIGRATION_PHASES),
            "phaseTransitionTimestamps": phase_transition_timestamps(),
            "conditions": arr(kubevirt_condition()),
            "migrationState": migration_state(),
            "synchronizationAddresses": strings(),
        }
    )
