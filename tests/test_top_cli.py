"""``vmo top nodes`` and ``vmo top vms`` against a real Prometheus (TLS from VMO's CA, basic
auth) scraping a synthetic exporter whose counters grow at known rates: the numbers printed are
the rates and sizes the exporter implies; without Prometheus the command fails in one line."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmo.apiserver import pki
from vmo.cli.main import main
from vmo.client.prometheus import prometheus_file
from vmo.home import StateDir
from vmo.testing.prometheus import PrometheusServer, ScrapeJob, SyntheticExporter, wait_for_samples

GIB, MIB, KIB = 1024**3, 1024**2, 1024
WINDOW = "5s"
NS = "virtual-machines"
NODES: dict[str, dict[str, float]] = {
    "node-1": {"cpu": 1.5, "memory": 3 * GIB, "read": 1.5 * MIB, "write": 2.5 * MIB,
               "rx": 100 * KIB, "tx": 200 * KIB, "vmis": 2, "cpus": 6, "ram": 12 * GIB},
    "node-2": {"cpu": 0.25, "memory": 1 * GIB, "read": 0, "write": 512 * KIB,
               "rx": 0, "tx": 10 * KIB, "vmis": 1, "cpus": 2, "ram": 4 * GIB},
}  # fmt: skip
VMIS: dict[tuple[str, str], dict[str, Any]] = {
    (NS, "db"): {"node": "node-1", "cpu": 1.0, "memory": 2 * GIB, "read": 1.5 * MIB,
                 "write": 2 * MIB, "rx": 60 * KIB, "tx": 150 * KIB},
    (NS, "web"): {"node": "node-1", "cpu": 0.5, "memory": 1 * GIB, "read": 0,
                  "write": 0.5 * MIB, "rx": 40 * KIB, "tx": 50 * KIB},
    ("other", "app"): {"node": "node-2", "cpu": 0.25, "memory": 1 * GIB, "read": 0,
                       "write": 512 * KIB, "rx": 0, "tx": 10 * KIB},
}  # fmt: skip


def synthetic_cluster(exporter: SyntheticExporter) -> None:
    """The series two node agents and the controllers would export for NODES and VMIS."""
    for node, v in NODES.items():
        labels = {"node": node}
        exporter.counter("vmo_node_cpu_usage_seconds_total", labels, rate=v["cpu"])
        exporter.gauge("vmo_node_memory_resident_bytes", labels, v["memory"])
        exporter.counter("vmo_node_storage_read_traffic_bytes_total", labels, rate=v["read"])
        exporter.counter("vmo_node_storage_write_traffic_bytes_total", labels, rate=v["write"])
        exporter.counter("vmo_node_network_receive_bytes_total", labels, rate=v["rx"])
        exporter.counter("vmo_node_network_transmit_bytes_total", labels, rate=v["tx"])
        exporter.gauge("vmo_node_vmis", labels, v["vmis"])
        for resource, unit, value in (("cpu", "cores", v["cpus"]), ("memory", "bytes", v["ram"])):
            exporter.gauge(
                "vmo_node_allocatable",
                {"node": node, "resource": resource, "unit": unit},
                value,
            )
    for (namespace, name), v in VMIS.items():
        labels = {"namespace": namespace, "name": name, "node": v["node"]}
        exporter.counter("kubevirt_vmi_cpu_usage_seconds_total", labels, rate=v["cpu"])
        exporter.gauge("kubevirt_vmi_memory_resident_bytes", labels, v["memory"])
        drive = {**labels, "drive": "rootdisk"}
        exporter.counter("kubevirt_vmi_storage_read_traffic_bytes_total", drive, rate=v["read"])
        exporter.counter("kubevirt_vmi_storage_write_traffic_bytes_total", drive, rate=v["write"])
        iface = {**labels, "interface": "default"}
        exporter.counter("kubevirt_vmi_network_receive_bytes_total", iface, rate=v["rx"])
        exporter.counter("kubevirt_vmi_network_transmit_bytes_total", iface, rate=v["tx"])


def wait_for_history(prometheus: PrometheusServer, *, seconds: int) -> None:
    """Until every series has samples for longer than a ``seconds`` window back."""
    expr = f"count_over_time(vmo_node_cpu_usage_seconds_total[1m]) >= {seconds + 3}"
    asyncio.run(wait_for_samples(prometheus.config, expr, timeout=90))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StateDir]:
    state = StateDir(tmp_path_factory.mktemp("top-home"))
    state.prepare()
    ca = pki.ensure_ca(state.pki)
    with SyntheticExporter() as exporter:
        synthetic_cluster(exporter)
        job = ScrapeJob("vmo-node-agent", [exporter.target])
        with PrometheusServer(state.root / "prometheus", ca=ca, jobs=[job]) as prometheus:
            prometheus.write_home_file(state)
            wait_for_history(prometheus, seconds=5)
            yield state


def top(state: StateDir, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--home", str(state.root), "top", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def top_json(state: StateDir, capsys: pytest.CaptureFixture[str], *argv: str) -> list[Any]:
    code, out, err = top(state, capsys, *argv, "--window", WINDOW, "-o", "json")
    assert code == 0, err
    items: list[Any] = json.loads(out)["items"]
    return items


def close(actual: float | None, expected: float) -> bool:
    return actual is not None and abs(actual - expected) <= 1e-4 * max(abs(expected), 1.0)


def test_top_nodes_reports_each_nodes_rates_sizes_and_shares(
    home: StateDir, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = {r["node"]: r for r in top_json(home, capsys, "nodes")}
    assert sorted(rows) == sorted(NODES)
    for node, v in NODES.items():
        row = rows[node]
        assert close(row["cpu_cores"], v["cpu"]), row
        assert close(row["cpu_percent"], 100 * v["cpu"] / v["cpus"]), row
        assert close(row["memory_bytes"], v["memory"]), row
        assert close(row["memory_percent"], 100 * v["memory"] / v["ram"]), row
        assert close(row["disk_read_bytes_per_second"], v["read"]), row
        assert close(row["disk_write_bytes_per_second"], v["write"]), row
        assert close(row["network_receive_bytes_per_second"], v["rx"]), row
        assert close(row["network_transmit_bytes_per_second"], v["tx"]), row
        assert row["vmis"] == v["vmis"]


def test_top_nodes_prints_a_table_in_kubectl_units(
    home: StateDir, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = top(home, capsys, "nodes", "--window", WINDOW)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["NAME", "CPU(cores)", "CPU%", "MEMORY(bytes)", "MEMORY%"]
    assert lines[1].split() == [
        "node-1", "1500m", "25%", "3072Mi", "25%", "1.5Mi/s", "2.5Mi/s", "100.0Ki/s",
        "200.0Ki/s", "2",
    ]  # fmt: skip
    assert "\x1b[" not in out  # plain text when stdout is not a terminal


def test_top_vms_in_a_namespace_reports_its_vms_only(
    home: StateDir, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = top_json(home, capsys, "vms", "-n", NS)
    assert [(r["namespace"], r["name"]) for r in rows] == [(NS, "db"), (NS, "web")]
    for row in rows:
        v = VMIS[(row["namespace"], row["name"])]
        assert row["node"] == v["node"]
        assert close(row["cpu_cores"], v["cpu"]), row
        assert close(row["memory_bytes"], v["memory"]), row
        assert close(row["disk_read_bytes_per_second"], v["read"]), row
        assert close(row["disk_write_bytes_per_second"], v["write"]), row
        assert close(row["network_receive_bytes_per_second"], v["rx"]), row
        assert close(row["network_transmit_bytes_per_second"], v["tx"]), row


def test_top_vms_all_namespaces_sorted_by_cpu(
    home: StateDir, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = top_json(home, capsys, "vms", "-A", "--sort-by", "cpu")
    assert [r["name"] for r in rows] == ["db", "web", "app"]
    code, out, _ = top(home, capsys, "vms", "-A", "--sort-by", "memory", "--window", WINDOW)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAMESPACE", "NAME", "NODE", "CPU(cores)"]
    assert lines[1].split()[:5] == [NS, "db", "node-1", "1000m", "2048Mi"]


def test_top_names_the_prometheus_by_url_and_ca(
    home: StateDir, capsys: pytest.CaptureFixture[str]
) -> None:
    access = json.loads(prometheus_file(home).read_text())
    code, out, err = top(
        home, capsys, "nodes", "-o", "json", "--prometheus-url", access["url"],
        "--prometheus-ca", access["ca_file"],
    )  # fmt: skip
    assert code == 0, err
    assert {r["node"] for r in json.loads(out)["items"]} == set(NODES)


def _vmo(
    home: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmo.cli.main", "--home", str(home), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_without_prometheus_top_fails_in_one_line_naming_vmo_up(tmp_path: Path) -> None:
    done = _vmo(tmp_path, "top", "nodes")
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "prometheus.json" in done.stderr and "vmo up" in done.stderr
    assert "--prometheus-url" in done.stderr


def test_an_unreachable_prometheus_fails_in_one_line(tmp_path: Path) -> None:
    done = _vmo(tmp_path, "top", "vms", "-A", "--prometheus-url", "https://127.0.0.1:1")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "https://127.0.0.1:1 is unavailable" in done.stderr


def test_refused_credentials_fail_in_one_line(home: StateDir, tmp_path: Path) -> None:
    access = json.loads(prometheus_file(home).read_text())
    done = _vmo(
        tmp_path, "top", "nodes", "--prometheus-url", access["url"], "--prometheus-ca",
        access["ca_file"], env={"VMO_PROMETHEUS_USERNAME": "vmo",
                                "VMO_PROMETHEUS_PASSWORD": "wrong"},
    )  # fmt: skip
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "credentials were refused" in done.stderr
