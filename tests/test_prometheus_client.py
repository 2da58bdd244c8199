"""``vmo.client.prometheus`` against Debian's prometheus (TLS from VMO's CA, basic auth) scraping
a synthetic exporter: instant vectors and scalars, ranges, label values and series, and each
failure as its own error."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vmo.apiserver import pki
from vmo.client import (
    PrometheusClient,
    PrometheusConfig,
    PrometheusNotConfigured,
    PrometheusQueryError,
    PrometheusUnavailable,
)
from vmo.client.prometheus import go_duration, label_matcher, prometheus_file
from vmo.home import StateDir
from vmo.testing.prometheus import PrometheusServer, ScrapeJob, SyntheticExporter, wait_for_samples

CPU = "vmo_node_cpu_usage_seconds_total"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    workdir = tmp_path_factory.mktemp("prometheus-client")
    with SyntheticExporter() as exporter:
        exporter.counter(CPU, {"node": "node-1"}, rate=0.75)
        exporter.counter(CPU, {"node": "node-2"}, rate=0.25)
        exporter.gauge("vmo_node_vmis", {"node": "node-1"}, 3)
        jobs = [ScrapeJob("vmo-node-agent", [exporter.target])]
        with PrometheusServer(workdir / "p", ca=pki.ensure_ca(workdir), jobs=jobs) as server:
            yield server


@pytest.fixture
async def prom(prometheus: PrometheusServer) -> AsyncIterator[PrometheusClient]:
    await wait_for_samples(prometheus.config, f"count_over_time({CPU}[1m]) >= 4")
    async with PrometheusClient(prometheus.config) as client:
        yield client


async def test_an_instant_vector_carries_labels_and_values(prom: PrometheusClient) -> None:
    samples = await prom.query(f"sum by (node) (rate({CPU}[3s]))")
    rates = {s.labels["node"]: s.value for s in samples}
    assert rates == pytest.approx({"node-1": 0.75, "node-2": 0.25}, rel=1e-4)
    [gauge] = await prom.query('vmo_node_vmis{job="vmo-node-agent"}')
    assert gauge.metric == "vmo_node_vmis" and gauge.value == 3
    assert abs(gauge.timestamp - time.time()) < 60


async def test_a_scalar_is_one_sample_without_labels(prom: PrometheusClient) -> None:
    [sample] = await prom.query("scalar(sum(vmo_node_vmis)) * 2", time=time.time())
    assert sample.labels == {} and sample.value == 6


async def test_a_range_query_returns_points_in_time_order(prom: PrometheusClient) -> None:
    end = time.time()
    [series] = await prom.query_range("sum(vmo_node_vmis)", end - 3, end, 1)
    stamps = [t for t, _ in series.points]
    assert stamps == sorted(stamps) and len(stamps) >= 3
    assert {v for _, v in series.points} == {3.0}


async def test_label_values_and_series_of_matching_series(prom: PrometheusClient) -> None:
    assert await prom.label_values("node", match=[CPU]) == ["node-1", "node-2"]
    found = await prom.series([f"{CPU}{{{label_matcher('node', 'node-2')}}}"])
    assert [s["node"] for s in found] == ["node-2"]


async def test_a_bad_query_raises_the_servers_error_type(prom: PrometheusClient) -> None:
    with pytest.raises(PrometheusQueryError) as caught:
        await prom.query("rate(vmo_node_vmis[")
    assert caught.value.error_type == "bad_data" and caught.value.code == 400
    assert "parse error" in caught.value.error


async def test_a_range_vector_is_not_an_instant_answer(prom: PrometheusClient) -> None:
    with pytest.raises(PrometheusQueryError, match="matrix"):
        await prom.query("vmo_node_vmis[10s]")


async def test_healthy_only_with_the_right_credentials(prometheus: PrometheusServer) -> None:
    async with PrometheusClient(prometheus.config) as good:
        assert await good.healthy()
    wrong = dataclasses.replace(prometheus.config, password="wrong")
    async with PrometheusClient(wrong) as bad:
        assert not await bad.healthy()
        with pytest.raises(PrometheusUnavailable, match="credentials were refused"):
            await bad.query("1")


async def test_an_untrusted_certificate_is_unavailable(prometheus: PrometheusServer) -> None:
    async with PrometheusClient(dataclasses.replace(prometheus.config, ca_file="")) as client:
        with pytest.raises(PrometheusUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await client.query("1")


def test_the_home_file_configures_the_client(prometheus: PrometheusServer, tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    with pytest.raises(PrometheusNotConfigured):
        PrometheusConfig.from_home(state)
    path = prometheus.write_home_file(state)
    assert path == prometheus_file(state) and path.stat().st_mode & 0o777 == 0o600
    assert PrometheusConfig.from_home(state) == prometheus.config
    assert prometheus.config.password not in repr(prometheus.config)
    token = {"url": "https://p:9090", "bearer_token": "t0ken"}
    path.write_text(json.dumps(token))
    assert PrometheusConfig.from_file(path).headers() == {"Authorization": "Bearer t0ken"}


def test_durations_are_written_as_go_writes_them() -> None:
    assert [go_duration(s) for s in (0, 5, 60, 90.5, 3600)] == [
        "0s", "5s", "1m0s", "1m30.5s", "1h0m0s",
    ]  # fmt: skip


def test_label_values_are_quoted_as_promql_strings() -> None:
    assert label_matcher("name", 'a"b\\c') == r'name="a\"b\\c"'
    assert label_matcher("node", "n.*", "=~") == 'node=~"n.*"'
