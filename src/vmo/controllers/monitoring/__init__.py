"""Monitoring from VMO's controllers process: the cluster-state collector, which exports
virt-controller's object-derived metrics and VMO's own (docs/monitoring.md) from informer
caches, to the process's ``/metrics``."""

from vmo.controllers.monitoring.state import (
    ClusterStateCollector,
    Durations,
    StateMetrics,
    run_state_collector,
)

__all__ = ["ClusterStateCollector", "Durations", "StateMetrics", "run_state_collector"]
