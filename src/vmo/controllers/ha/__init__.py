"""HA restart after a node fails: an HAPolicy says which nodes are protected and how they are
fenced; each failed node gets a NodeRemediation that fences it, then restarts its VMs on
healthy nodes in priority order, or stops at ManualRecoveryRequired when fencing cannot be
confirmed (see docs/ha.md)."""
