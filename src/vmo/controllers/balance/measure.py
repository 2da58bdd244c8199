"""Usage as the balancer weighs it, from Prometheus's query API: per VMI, a percentile over a
window of its CPU rate, resident memory and network rate (smoothed, not a point sample), and the
migration bandwidth recent migrations reached. The same queries work on the embedded Prometheus
``vmo up`` starts and on a cluster's own, since both hold KubeVirt's metric names.

When Prometheus cannot be asked, ``measure()`` raises ``MeasurementError`` (the controller then
decides nothing and says why); a VMI that has no series yet is simply absent from the result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from vmo.client.prometheus import PrometheusClient, PrometheusError, Sample, go_duration
from vmo.controllers.balance.policy import Measurement

log = logging.getLogger(__name__)

# KubeVirt's metric names (docs/monitoring.md)
CPU = "kubevirt_vmi_cpu_usage_seconds_total"
MEMORY = "kubevirt_vmi_memory_resident_bytes"
NET_RX = "kubevirt_vmi_network_receive_bytes_total"
NET_TX = "kubevirt_vmi_network_transmit_bytes_total"
TRANSFER_RATE = "kubevirt_vmi_migration_memory_transfer_rate_bytes"
BANDWIDTH_HISTORY = 6 * 3600.0


class MeasurementError(Exception):
    """Prometheus could not answer: nothing is decided on guesses."""


@dataclass(frozen=True)
class Usage:
    cpu: float  # cores
    memory: float  # bytes
    network: float | None = None  # bytes per second


@dataclass(frozen=True)
class Measurements:
    usage: Mapping[tuple[str, str], Usage]  # (namespace, VMI name) -> usage
    bandwidth: float | None  # bytes per second recent migrations reached; None: none measured
    queries: tuple[str, ...] = field(default=())


def queries(m: Measurement) -> dict[str, str]:
    """The PromQL ``measure()`` asks, by what it reads."""
    q = m.percentile / 100
    window, step, rate = go_duration(m.window), go_duration(m.step), go_duration(m.rate_interval)
    by = "sum by (namespace, name)"
    return {
        "cpu": f"quantile_over_time({q:g}, ({by} (rate({CPU}[{rate}])))[{window}:{step}])",
        "memory": f"max by (namespace, name) (quantile_over_time({q:g}, {MEMORY}[{window}]))",
        "network": (
            f"quantile_over_time({q:g}, ({by} (rate({NET_RX}[{rate}])) + "
            f"{by} (rate({NET_TX}[{rate}])))[{window}:{step}])"
        ),
        "bandwidth": (f"avg(avg_over_time({TRANSFER_RATE}[{go_duration(BANDWIDTH_HISTORY)}]) > 0)"),
    }


def _by_vmi(samples: list[Sample]) -> dict[tuple[str, str], float]:
    out = {}
    for s in samples:
        ns, name = s.labels.get("namespace"), s.labels.get("name")
        if ns and name and s.value == s.value:  # NaN is no measurement
            out[(ns, name)] = s.value
    return out


async def measure(client: PrometheusClient, m: Measurement, *, network: bool) -> Measurements:
    asked = queries(m)
    try:
        cpu = _by_vmi(await client.query(asked["cpu"]))
        memory = _by_vmi(await client.query(asked["memory"]))
        net = _by_vmi(await client.query(asked["network"])) if network else {}
        bw = await client.query(asked["bandwidth"])
    except PrometheusError as exc:
        raise MeasurementError(str(exc)) from exc
    usage = {
        key: Usage(cpu=max(cores, 0.0), memory=memory[key], network=net.get(key))
        for key, cores in cpu.items()
        if key in memory
    }
    bandwidth = bw[0].value if bw and bw[0].value > 0 else None
    used = ("cpu", "memory", "network", "bandwidth") if network else ("cpu", "memory", "bandwidth")
    return Measurements(usage, bandwidth, tuple(asked[k] for k in used))


__all__ = ["MeasurementError", "Measurements", "Usage", "measure", "queries"]
