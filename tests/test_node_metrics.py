"""The node agent's metrics without a guest: what it reads from /proc and QMP replies, and the
families it renders from a sample (KubeVirt's names, bounded labels)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vmo.engine.agent.metrics import (
    NodeMetrics,
    ProcStat,
    VmiSample,
    _migration,
    drive_name,
    proc_stat,
    resident_bytes,
)
from vmo.engine.agent.runtime import VmiRuntime


def test_proc_stat_reads_this_process_cpu_times() -> None:
    before = proc_stat(Path(f"/proc/{os.getpid()}/stat"))
    sum(i * i for i in range(2_000_000))
    after = proc_stat(Path(f"/proc/{os.getpid()}/stat"))
    assert before is not None and after is not None
    assert after.user + after.system > before.user + before.system
    assert after.minflt >= before.minflt
    assert resident_bytes(os.getpid()) > 10 * 1024 * 1024
    assert proc_stat(Path("/proc/0/stat")) is None


def test_drive_names_come_from_the_qdev_ids() -> None:
    assert drive_name({"qdev": "/machine/peripheral/ua-rootdisk/virtio-backend"}) == "rootdisk"
    assert drive_name({"qdev": "ua-data", "device": ""}) == "data"
    assert drive_name({"qdev": "", "device": "ua-cd"}) == "cd"
    assert drive_name({"qdev": "/machine/unattached/device[3]", "device": ""}) is None


def test_migration_figures_only_while_migrating() -> None:
    assert _migration({"status": "completed", "ram": {"transferred": 5}}) is None
    assert _migration({}) is None
    info = {
        "status": "active",
        "ram": {"transferred": 100, "remaining": 50, "total": 150, "dirty-pages-rate": 10,
                "page-size": 4096, "mbps": 80.0},
        "disk": {"transferred": 1000, "remaining": 0, "total": 1000},
    }  # fmt: skip
    m = _migration(info)
    assert m == {"processed": 1100, "remaining": 50, "total": 1150, "dirty": 40960,
                 "rate": 10_000_000}  # fmt: skip


@dataclass
class _Agent:
    node: str = "node-7"
    runtimes: dict[tuple[str, str], VmiRuntime] = field(default_factory=dict)


def test_families_and_labels(tmp_path: Path) -> None:
    collector = NodeMetrics(_Agent(), {"local": tmp_path})
    collector.samples = {
        ("ns", "vm1"): VmiSample(
            "ns", "vm1", cpu=ProcStat(user=3.0, system=1.5, minflt=7, majflt=1),
            resident=200 * 2**20, domain_bytes=256 * 2**20,
            vcpus={"0": (2.0, 0.25)},
            drives={"data": {"rd_bytes": 10, "wr_bytes": 64 * 2**20, "wr_operations": 64}},
            nics={"l2": {"rx_bytes": 11, "tx_bytes": 22, "rx_packets": 1, "tx_packets": 2,
                         "rx_errors": 0, "tx_errors": 0, "rx_dropped": 0, "tx_dropped": 0}},
        )
    }  # fmt: skip
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    base = (("name", "vm1"), ("namespace", "ns"), ("node", "node-7"))
    assert samples[("kubevirt_vmi_cpu_usage_seconds_total", base)] == 4.5
    assert samples[("kubevirt_vmi_cpu_user_usage_seconds_total", base)] == 3.0
    assert samples[("kubevirt_vmi_memory_domain_bytes", base)] == 256 * 2**20
    vcpu = tuple(sorted((*base, ("id", "0"), ("state", "running"))))
    assert samples[("kubevirt_vmi_vcpu_seconds_total", vcpu)] == 2.0
    drive = tuple(sorted((*base, ("drive", "data"))))
    assert samples[("kubevirt_vmi_storage_write_traffic_bytes_total", drive)] == 64 * 2**20
    iface = tuple(sorted((*base, ("interface", "l2"))))
    # the tap's transmit is the guest's receive
    assert samples[("kubevirt_vmi_network_receive_bytes_total", iface)] == 22
    assert samples[("kubevirt_vmi_network_transmit_bytes_total", iface)] == 11
    node = (("node", "node-7"),)
    assert samples[("vmo_node_cpu_usage_seconds_total", node)] == 4.5
    assert samples[("vmo_node_vmis", node)] == 1
    pool = (("node", "node-7"), ("pool", "local"))
    assert samples[("vmo_storage_pool_capacity_bytes", pool)] > 0
    assert samples[("vmo_storage_pool_available_bytes", pool)] > 0
    assert not any(name.startswith("kubevirt_vmi_migration") for name, _ in samples)
