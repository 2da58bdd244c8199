"""VMO's Grafana dashboards: well-formed (schema 39, a Prometheus datasource variable, unique
panel ids and titles, an expr in every target), naming only metrics of docs/monitoring.md, and
every query, Grafana's variables substituted, parsed by a real Prometheus."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmo.apiserver import pki
from vmo.client.prometheus import PrometheusClient, PrometheusQueryError
from vmo.testing.dashboards import (
    DASHBOARDS,
    catalogue_metrics,
    dashboard_queries,
    load_dashboards,
    metric_names,
    panels,
    substitute,
    templating_expr,
)
from vmo.testing.prometheus import PrometheusServer

BOARDS = load_dashboards()
WANTED = {"backup.json", "cluster.json", "migrations.json", "node.json", "storage.json",
          "vm.json"}  # fmt: skip


def test_every_dashboard_is_there() -> None:
    assert set(BOARDS) == WANTED


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_dashboard_is_well_formed(name: str) -> None:
    board = BOARDS[name]
    assert board["schemaVersion"] == 39
    assert board["uid"] and board["title"].startswith("VMO / ")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    every = list(panels(board))
    ids = [p["id"] for p in every]
    titles = [p["title"] for p in every]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    assert len(titles) == len(set(titles)), f"duplicate panel titles in {name}"
    for panel in every:
        assert panel["type"] in ("timeseries", "stat", "table", "row")
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{name} / {panel['title']}: no targets"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{name} / {panel['title']}: empty expr"
            assert target["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_query_variables_read_label_values_from_prometheus(name: str) -> None:
    for variable in BOARDS[name]["templating"]["list"]:
        if variable["type"] != "query":
            continue
        assert variable["datasource"]["uid"] == "${datasource}"
        assert variable["definition"].startswith("label_values(")
        assert templating_expr(variable["definition"]) is not None


def _uses(board: dict[str, Any]) -> set[str]:
    text = "\n".join(t["expr"] for p in panels(board) for t in p.get("targets") or []) + "\n".join(
        str(v.get("definition", "")) for v in board["templating"]["list"]
    )
    return set(re.findall(r"\$\{?(\w+)", text)) - {"__rate_interval", "__interval", "__range"}


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_variable_used_is_defined(name: str) -> None:
    defined = {v["name"] for v in BOARDS[name]["templating"]["list"]}
    assert _uses(BOARDS[name]) <= defined


def test_rates_use_grafanas_rate_interval() -> None:
    for board in BOARDS.values():
        for panel in panels(board):
            for target in panel.get("targets") or []:
                for window in re.findall(r"rate\([^\[]*\[([^\]]*)\]", target["expr"]):
                    assert window == "$__rate_interval", (panel["title"], target["expr"])


def test_catalogue_names_every_documented_metric() -> None:
    names = catalogue_metrics()
    assert {
        "kubevirt_vmi_network_transmit_bytes_total",
        "kubevirt_vmi_storage_flush_times_seconds_total",
        "kubevirt_vmi_storage_iops_write_total",
        "kubevirt_vmi_migrations_in_scheduling_phase",
        "kubevirt_vmi_memory_pgminfault_total",
        "vmo_node_storage_write_traffic_bytes_total",
        "vmo_apiserver_request_duration_seconds_bucket",
        "vmo_node_requested",
    } <= names
    assert "kubevirt_vmi_network_transmit_total" not in names


def test_metric_names_leave_functions_labels_and_keywords_out() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, verb) (rate(foo_bucket{verb!="watch"}[1m]))) '
        "/ on (verb) group_left bar or vector(0) > bool baz_total offset 5m"
    )
    assert metric_names(expr) == {"foo_bucket", "bar", "baz_total"}


def test_every_metric_named_is_in_the_catalogue() -> None:
    documented = catalogue_metrics()
    unknown = {
        f"{q.dashboard} / {q.panel}: {name}"
        for q in dashboard_queries()
        for name in metric_names(q.expr)
        if name not in documented
    }
    assert not unknown, "metrics missing from docs/monitoring.md:\n" + "\n".join(sorted(unknown))


def test_variables_are_substituted_regex_safe_or_as_given() -> None:
    expr = 'rate(x{node=~"$node", namespace=~"${namespace}", name=~"[[vm]]"}[$__rate_interval])'
    assert substitute(expr) == 'rate(x{node=~".+", namespace=~".+", name=~".+"}[1m])'
    assert substitute(expr, {"vm": "db", "node": "node-1"}) == (
        'rate(x{node=~"node-1", namespace=~".+", name=~"db"}[1m])'
    )
    assert templating_expr("label_values(vmo_node_vmis, node)") == "vmo_node_vmis"
    assert templating_expr("label_values(namespace)") == '{namespace!=""}'


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Debian's prometheus with no scrape targets: it parses and evaluates, over nothing."""
    workdir: Path = tmp_path_factory.mktemp("dashboards-prometheus")
    ca = pki.ensure_ca(workdir)
    with PrometheusServer(workdir / "prometheus", ca=ca) as server:
        yield server


async def _refusals(server: PrometheusServer, values: dict[str, str]) -> list[str]:
    refused = []
    async with PrometheusClient(server.config) as prom:
        for query in dashboard_queries(values):
            try:
                await prom.query(query.expr)
            except PrometheusQueryError as exc:
                refused.append(f"{query.dashboard} / {query.panel}: {exc}")
    return refused


@pytest.mark.parametrize(
    "values",
    [{}, {"node": "node-1", "namespace": "virtual-machines", "vm": "db", "policy": "nightly"}],
    ids=["every value", "one of each"],
)
def test_every_query_parses_on_a_real_prometheus(
    prometheus: PrometheusServer, values: dict[str, str]
) -> None:
    refused = asyncio.run(_refusals(prometheus, values))
    assert not refused, "\n".join(refused)


def test_queries_can_be_taken_from_some_dashboards_only() -> None:
    queries = dashboard_queries(only={"node"}, templating=False)
    assert queries and {q.dashboard for q in queries} == {BOARDS["node.json"]["title"]}
    assert not any(q.panel.startswith("variable ") for q in queries)


def test_the_dashboards_directory_is_the_repositorys() -> None:
    assert DASHBOARDS.name == "dashboards" and (DASHBOARDS.parent / "pyproject.toml").exists()
