"""VMO's own annotation and label keys (``vmo.dev/*``), defined once.

They live here, below every layer, so that the engine, the API server, the CLI and VMO's
controllers all name them without importing each other."""

from __future__ import annotations

# Node: the unix socket of the node agent that registered it.
AGENT_SOCKET = "vmo.dev/agent-socket"

# VMI: host ports forwarding the guest's ports, "proto:guest:host,..." (survives agent restarts).
HOST_FORWARDS = "vmo.dev/host-forwards"

# VMI: hash of the VM template it was made from (RestartRequired when they differ).
VM_TEMPLATE_HASH = "vmo.dev/vm-template-hash"

# DataVolume: the node whose pool holds the volume.
STORAGE_NODE = "vmo.dev/storage-node"

# DataVolume made by a clone: "full" for an independent copy, else a linked clone.
CLONE_MODE = "vmo.dev/clone-mode"

# VirtualMachineSnapshotContent: the node that took (and removes) its volume snapshots.
SNAPSHOT_NODE = "vmo.dev/snapshot-node"

# VirtualMachineSnapshotContent: the indications (Online, GuestAgent, ...) the node reported.
SNAPSHOT_INDICATIONS = "vmo.dev/snapshot-indications"

# VirtualMachineBackup: the node whose agent runs it (where the VMI is).
BACKUP_NODE = "vmo.dev/backup-node"

# VirtualMachine: "<backup>@<node>" while that node backs up the stopped VM's disks; the VM does
# not start until the backup ends (a lock whose backup is gone or ended is stale).
BACKUP_LOCK = "vmo.dev/backup-in-progress"

# VirtualMachineExport: the node serving it.
EXPORT_NODE = "vmo.dev/export-node"

# Node label set while `vmo node drain` evacuates it.
DRAIN_NODE = "vmo.dev/drain-node"

# VirtualMachine label: the node its VMI runs on (vmo.controllers.example).
NODE = "vmo.dev/node"
