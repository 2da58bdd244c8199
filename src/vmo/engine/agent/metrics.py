"""virt-handler's metrics: what each VMI on this node uses, read from its QEMU and the host.

Before each scrape the agent samples every QEMU it runs, all at once and each bounded by a
timeout, on the event loop but never holding the reconcile loop: QMP commands are multiplexed
by id, so a sample and a reconcile share one monitor connection without waiting on each other.

- CPU: ``/proc/PID/stat`` of the QEMU process (user, system); per vCPU, the threads that
  ``query-cpus-fast`` names (``/proc/PID/task/TID/stat`` and ``schedstat``).
- Memory: the guest's configured size, the process's resident set (``/proc/PID/status``).
- Storage: ``query-blockstats``, per drive (the VMI's disk name).
- Network: the host side of the VMI's taps (``/sys/class/net/TAP/statistics``), turned round to
  the guest's point of view as KubeVirt reports it (the tap's transmit is the guest's receive).
  Pod-network interfaces are QEMU's user networking, which keeps no counters.
- Migration: ``query-migrate`` while the VMI is the source of a migration (the agent's
  migration roles say when); vCPU threads are asked again every ``VCPU_THREADS_TTL`` seconds
  only, so an idle VMI costs one QMP command per scrape.

Families and labels are KubeVirt's (docs/monitoring.md lists them); labels are the VMI's
namespace and name, the node, and per device its name: never a uid or a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmo.engine.agent.runtime import VmiRuntime
from vmo.engine.network import bridge
from vmo.engine.qemu.errors import QemuError

log = logging.getLogger(__name__)
VCPU_THREADS_TTL = 30.0

SAMPLE_TIMEOUT = 2.0
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_NET_FIELDS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_errors", "tx_errors",
               "rx_dropped", "tx_dropped")  # fmt: skip
_MIGRATING = frozenset({"setup", "active", "postcopy-active", "pre-switchover", "device"})


class Agent(Protocol):
    node: str
    runtimes: dict[tuple[str, str], VmiRuntime]


@dataclass
class ProcStat:
    user: float = 0.0
    system: float = 0.0
    minflt: int = 0
    majflt: int = 0


@dataclass
class VmiSample:
    namespace: str
    name: str
    cpu: ProcStat
    resident: int
    domain_bytes: int
    vcpus: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (run, delay)
    drives: dict[str, dict[str, int]] = field(default_factory=dict)
    nics: dict[str, dict[str, int]] = field(default_factory=dict)
    migration: dict[str, float] | None = None


def proc_stat(path: Path) -> ProcStat | None:
    """A process's (or thread's) CPU times in seconds and page faults, from its ``stat``."""
    try:
        raw = path.read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # after "pid (comm) ": state ppid ... minflt(10) cminflt majflt(12) cmajflt utime(14) stime
    return ProcStat(
        user=int(fields[11]) / _TICK,
        system=int(fields[12]) / _TICK,
        minflt=int(fields[7]),
        majflt=int(fields[9]),
    )


def resident_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _schedstat_wait(path: Path) -> float:
    try:
        return int(path.read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def tap_counters(tap: str) -> dict[str, int] | None:
    base = Path("/sys/class/net") / tap / "statistics"
    out: dict[str, int] = {}
    try:
        for name in _NET_FIELDS:
            out[name] = int((base / name).read_text())
    except (OSError, ValueError):
        return None
    return out


def drive_name(entry: dict[str, Any]) -> str | None:
    """The VMI disk a ``query-blockstats`` entry belongs to (devices are ``ua-<disk>``)."""
    qdev = str(entry.get("qdev") or "")
    for part in qdev.split("/"):
        if part.startswith("ua-"):
            return part[3:]
    device = str(entry.get("device") or "")
    return device[3:] if device.startswith("ua-") else None


def _vmi_taps(runtime: VmiRuntime, node: str) -> dict[str, str]:
    """Interface name -> tap, for the VMI's Multus (bridge) networks on this node."""
    taps: dict[str, str] = {}
    for network in runtime.spec.get("networks") or []:
        if "multus" in network and network.get("name"):
            name = str(network["name"])
            taps[name] = bridge.tap_name(runtime.uid, name, runtime.node or node)
    return taps


async def _answer(value: Any) -> Any:
    """A QMP answer known already, awaitable beside the ones asked for."""
    return value


class NodeMetrics(Collector):
    """The node agent's collector; ``refresh`` samples, ``collect`` renders the last sample."""

    def __init__(self, agent: Agent, pools: dict[str, Path]) -> None:
        self.agent = agent
        self.pools = pools
        self.samples: dict[tuple[str, str], VmiSample] = {}
        self.duration = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        # the vCPU threads of each QEMU (pid: when asked, query-cpus-fast's answer): they change
        # only with CPU hotplug, so they are asked again only every VCPU_THREADS_TTL seconds
        self._vcpu_threads: dict[int, tuple[float, Any]] = {}

    async def refresh(self) -> None:
        """Samples every VMI; concurrent scrapes share one sampling pass."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        started = time.perf_counter()
        runtimes = [
            r
            for r in list(self.agent.runtimes.values())
            if r.process is not None and r.process.exit_status is None
        ]
        results = await asyncio.gather(
            *(self._sample(runtime) for runtime in runtimes), return_exceptions=True
        )
        live = {r.process.pid for r in runtimes if r.process is not None}
        self._vcpu_threads = {p: v for p, v in self._vcpu_threads.items() if p in live}
        samples: dict[tuple[str, str], VmiSample] = {}
        for runtime, result in zip(runtimes, results, strict=True):
            if isinstance(result, VmiSample):
                samples[runtime.key] = result
            elif isinstance(result, BaseException):
                log.debug("metrics of %s/%s: %s", *runtime.key, result)
        self.samples = samples
        self.duration = time.perf_counter() - started

    async def _sample(self, runtime: VmiRuntime) -> VmiSample | None:
        process = runtime.process
        assert process is not None
        pid = process.pid
        cpu = proc_stat(Path(f"/proc/{pid}/stat"))
        if cpu is None:
            return None
        sample = VmiSample(
            runtime.namespace,
            runtime.name,
            cpu=cpu,
            resident=resident_bytes(pid),
            domain_bytes=(runtime.domain.memory_mib if runtime.domain else runtime.memory_mib)
            * 1024
            * 1024,
        )
        for iface, tap in _vmi_taps(runtime, self.agent.node).items():
            counters = tap_counters(tap)
            if counters is not None:
                sample.nics[iface] = counters
        try:
            qmp = await asyncio.wait_for(process.qmp(), SAMPLE_TIMEOUT)
            now = time.monotonic()
            known = self._vcpu_threads.get(pid)
            fresh = known is not None and now - known[0] < VCPU_THREADS_TTL
            none: Any = None
            cpus, blocks, migrate = await asyncio.gather(
                _answer(known[1]) if fresh and known is not None
                else qmp.execute("query-cpus-fast", timeout=SAMPLE_TIMEOUT),
                qmp.execute("query-blockstats", timeout=SAMPLE_TIMEOUT),
                qmp.execute("query-migrate", timeout=SAMPLE_TIMEOUT)
                if self._may_migrate(runtime) else _answer(none),
            )  # fmt: skip
            if not fresh:
                self._vcpu_threads[pid] = (now, cpus)
        except (QemuError, OSError, TimeoutError) as exc:
            log.debug("metrics of %s/%s: QMP: %s", runtime.namespace, runtime.name, exc)
            return sample
        for cpu_info in cpus or []:
            tid = cpu_info.get("thread-id")
            task = Path(f"/proc/{pid}/task/{tid}")
            times = proc_stat(task / "stat")
            if times is not None:
                sample.vcpus[str(cpu_info.get("cpu-index", 0))] = (
                    times.user + times.system,
                    _schedstat_wait(task / "schedstat"),
                )
        for entry in blocks or []:
            drive = drive_name(entry)
            if drive is not None:
                sample.drives[drive] = dict(entry.get("stats") or {})
        sample.migration = _migration(migrate or {})
        return sample

    def _may_migrate(self, runtime: VmiRuntime) -> bool:
        """Whether the VMI may be a migration's source now: the agent's migration roles say so
        (an agent without them is always asked)."""
        outgoing = getattr(getattr(self.agent, "migrations", None), "outgoing", None)
        return outgoing is None or runtime.key in outgoing

    # --- rendering -----------------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        node = self.agent.node
        labels = ["namespace", "name", "node"]
        fam = _Families(labels)
        for sample in self.samples.values():
            key = [sample.namespace, sample.name, node]
            cpu = sample.cpu
            fam.counter("kubevirt_vmi_cpu_usage_seconds_total", "Total CPU time spent in all modes (vCPUs and hypervisor).", key, cpu.user + cpu.system)  # fmt: skip
            fam.counter("kubevirt_vmi_cpu_user_usage_seconds_total", "Total CPU time spent in user mode.", key, cpu.user)  # fmt: skip
            fam.counter("kubevirt_vmi_cpu_system_usage_seconds_total", "Total CPU time spent in system mode.", key, cpu.system)  # fmt: skip
            fam.counter("kubevirt_vmi_memory_pgmajfault_total", "Page faults that needed disk I/O.", key, cpu.majflt)  # fmt: skip
            fam.counter("kubevirt_vmi_memory_pgminfault_total", "Page faults that needed no disk I/O.", key, cpu.minflt)  # fmt: skip
            fam.gauge("kubevirt_vmi_memory_domain_bytes", "Memory allocated to the domain.", key, sample.domain_bytes)  # fmt: skip
            fam.gauge("kubevirt_vmi_memory_resident_bytes", "Resident set size of the process running the domain.", key, sample.resident)  # fmt: skip
            for vcpu, (run, delay) in sorted(sample.vcpus.items()):
                fam.counter("kubevirt_vmi_vcpu_seconds_total", "Time spent by each vCPU in each state.", [*key, vcpu, "running"], run, extra=("id", "state"))  # fmt: skip
                fam.counter("kubevirt_vmi_vcpu_delay_seconds_total", "Time each vCPU spent waiting in the run queue.", [*key, vcpu], delay, extra=("id",))  # fmt: skip
            for drive, stats in sorted(sample.drives.items()):
                dkey = [*key, drive]
                for metric, helptext, value in _drive_values(stats):
                    fam.counter(metric, helptext, dkey, value, extra=("drive",))
            for iface, counters in sorted(sample.nics.items()):
                nkey = [*key, iface]
                for metric, helptext, value in _nic_values(counters):
                    fam.counter(metric, helptext, nkey, value, extra=("interface",))
            if sample.migration is not None:
                for metric, helptext, value in _migration_values(sample.migration):
                    if metric.endswith("_total"):
                        fam.counter(metric, helptext, key, value)
                    else:
                        fam.gauge(metric, helptext, key, value)
        yield from fam.all()
        yield from self._node_families(node)

    def _node_families(self, node: str) -> Iterator[Metric]:
        samples = list(self.samples.values())

        def total(metric: str, helptext: str, value: float, *, counter: bool = True) -> Metric:
            family: Metric = (CounterMetricFamily if counter else GaugeMetricFamily)(
                metric, helptext, labels=["node"]
            )
            family.add_metric([node], value)  # type: ignore[attr-defined]
            return family

        yield total("vmo_node_cpu_usage_seconds_total", "CPU time of every QEMU on the node.",
                    sum(s.cpu.user + s.cpu.system for s in samples))  # fmt: skip
        yield total("vmo_node_memory_resident_bytes", "Resident memory of every QEMU on the node.",
                    sum(s.resident for s in samples), counter=False)  # fmt: skip
        yield total("vmo_node_network_receive_bytes_total", "Bytes the node's VMIs received.",
                    sum(n["tx_bytes"] for s in samples for n in s.nics.values()))  # fmt: skip
        yield total("vmo_node_network_transmit_bytes_total", "Bytes the node's VMIs sent.",
                    sum(n["rx_bytes"] for s in samples for n in s.nics.values()))  # fmt: skip
        yield total("vmo_node_storage_read_traffic_bytes_total", "Bytes the node's VMIs read.",
                    sum(int(d.get("rd_bytes", 0)) for s in samples for d in s.drives.values()))  # fmt: skip
        yield total("vmo_node_storage_write_traffic_bytes_total", "Bytes the node's VMIs wrote.",
                    sum(int(d.get("wr_bytes", 0)) for s in samples for d in s.drives.values()))  # fmt: skip
        yield total("vmo_node_vmis", "VMIs the node agent runs.", len(samples), counter=False)
        yield total("vmo_node_agent_scrape_duration_seconds", "How long the last sampling took.",
                    self.duration, counter=False)  # fmt: skip
        capacity = GaugeMetricFamily(
            "vmo_storage_pool_capacity_bytes", "Size of the storage pool's filesystem.",
            labels=["node", "pool"],
        )  # fmt: skip
        available = GaugeMetricFamily(
            "vmo_storage_pool_available_bytes", "Free space in the storage pool's filesystem.",
            labels=["node", "pool"],
        )  # fmt: skip
        for pool, path in sorted(self.pools.items()):
            with contextlib.suppress(OSError):
                st = os.statvfs(path)
                capacity.add_metric([node, pool], st.f_blocks * st.f_frsize)
                available.add_metric([node, pool], st.f_bavail * st.f_frsize)
        yield capacity
        yield available


class _Families:
    """Metric families by name, filled sample by sample."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self._families: dict[str, Metric] = {}

    def _family(self, kind: type, metric: str, helptext: str, extra: tuple[str, ...]) -> Any:
        name = metric.removesuffix("_total") if kind is CounterMetricFamily else metric
        family = self._families.get(name)
        if family is None:
            family = kind(name, helptext, labels=[*self.labels, *extra])
            self._families[name] = family
        return family

    def counter(
        self,
        metric: str,
        helptext: str,
        key: list[str],
        value: float,
        *,
        extra: tuple[str, ...] = (),
    ) -> None:
        self._family(CounterMetricFamily, metric, helptext, extra).add_metric(key, value)

    def gauge(
        self,
        metric: str,
        helptext: str,
        key: list[str],
        value: float,
        *,
        extra: tuple[str, ...] = (),
    ) -> None:
        self._family(GaugeMetricFamily, metric, helptext, extra).add_metric(key, value)

    def all(self) -> Iterable[Metric]:
        return self._families.values()


def _drive_values(stats: dict[str, int]) -> Iterator[tuple[str, str, float]]:
    yield "kubevirt_vmi_storage_read_traffic_bytes_total", "Bytes read from storage.", stats.get("rd_bytes", 0)  # fmt: skip
    yield "kubevirt_vmi_storage_write_traffic_bytes_total", "Bytes written to storage.", stats.get("wr_bytes", 0)  # fmt: skip
    yield "kubevirt_vmi_storage_iops_read_total", "I/O read operations.", stats.get("rd_operations", 0)  # fmt: skip
    yield "kubevirt_vmi_storage_iops_write_total", "I/O write operations.", stats.get("wr_operations", 0)  # fmt: skip
    yield "kubevirt_vmi_storage_read_times_seconds_total", "Time spent on reads.", stats.get("rd_total_time_ns", 0) / 1e9  # fmt: skip
    yield "kubevirt_vmi_storage_write_times_seconds_total", "Time spent on writes.", stats.get("wr_total_time_ns", 0) / 1e9  # fmt: skip
    yield "kubevirt_vmi_storage_flush_requests_total", "Storage flush requests.", stats.get("flush_operations", 0)  # fmt: skip
    yield "kubevirt_vmi_storage_flush_times_seconds_total", "Time spent on cache flushing.", stats.get("flush_total_time_ns", 0) / 1e9  # fmt: skip


def _nic_values(c: dict[str, int]) -> Iterator[tuple[str, str, float]]:
    # the tap's transmit is what the guest receives
    yield "kubevirt_vmi_network_receive_bytes_total", "Bytes received.", c["tx_bytes"]
    yield "kubevirt_vmi_network_transmit_bytes_total", "Bytes transmitted.", c["rx_bytes"]
    yield "kubevirt_vmi_network_receive_packets_total", "Packets received.", c["tx_packets"]
    yield "kubevirt_vmi_network_transmit_packets_total", "Packets transmitted.", c["rx_packets"]
    yield "kubevirt_vmi_network_receive_errors_total", "Receive errors.", c["tx_errors"]
    yield "kubevirt_vmi_network_transmit_errors_total", "Transmit errors.", c["rx_errors"]
    yield "kubevirt_vmi_network_receive_packets_dropped_total", "Received packets dropped.", c["tx_dropped"]  # fmt: skip
    yield "kubevirt_vmi_network_transmit_packets_dropped_total", "Transmitted packets dropped.", c["rx_dropped"]  # fmt: skip


def _migration(info: dict[str, Any]) -> dict[str, float] | None:
    """The source's view of a running migration, or None when the VMI is not migrating."""
    if info.get("status") not in _MIGRATING:
        return None
    ram = info.get("ram") or {}
    disk = info.get("disk") or {}
    page = int(ram.get("page-size") or _PAGE)
    return {
        "processed": float(ram.get("transferred", 0)) + float(disk.get("transferred", 0)),
        "remaining": float(ram.get("remaining", 0)) + float(disk.get("remaining", 0)),
        "total": float(ram.get("total", 0)) + float(disk.get("total", 0)),
        "dirty": float(ram.get("dirty-pages-rate", 0)) * page,
        "rate": float(ram.get("mbps", 0)) * 1e6 / 8,
    }


def _migration_values(m: dict[str, float]) -> Iterator[tuple[str, str, float]]:
    yield "kubevirt_vmi_migration_data_processed_bytes", "Guest data migrated so far.", m["processed"]  # fmt: skip
    yield "kubevirt_vmi_migration_data_remaining_bytes", "Guest data left to migrate.", m["remaining"]  # fmt: skip
    yield "kubevirt_vmi_migration_data_bytes_total", "Guest data to migrate in all.", m["total"]  # fmt: skip
    yield "kubevirt_vmi_migration_dirty_memory_rate_bytes", "Rate the guest dirties memory at.", m["dirty"]  # fmt: skip
    yield "kubevirt_vmi_migration_memory_transfer_rate_bytes", "Rate memory is transferred at.", m["rate"]  # fmt: skip
