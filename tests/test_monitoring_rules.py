"""VMO's alert rules: promtool accepts them and their unit tests pass, every alert has its labels,
annotations, runbook and firing and silent cases, the rules read only catalogued metrics, and the
cluster-mode objects (PrometheusRule, ServiceMonitors) carry the same rules and scrape jobs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmo.api import monitoring

ROOT = Path(__file__).resolve().parent.parent
RULE_FILE = ROOT / "src" / "vmo" / "api" / "monitoring" / "rules.yaml"
UNIT_TESTS = ROOT / "tests" / "monitoring" / "rules_test.yaml"
RUNBOOKS = ROOT / "docs" / "runbooks"
CATALOGUE = ROOT / "docs" / "monitoring.md"
PROMTOOL_TIMEOUT = 300.0

RUNBOOK_SECTIONS = ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation")
SEVERITIES = {"critical", "warning", "info"}
HEALTH_IMPACTS = {"none", "warning", "critical"}
# about the whole cluster: no labels for a description to name
CLUSTER_WIDE_ALERTS = {"KubeVirtNoAvailableNodesToRunVMs"}
NODE_AGENT_ALERTS = {
    "VMONodeAgentDown",
    "OrphanedVirtualMachineInstances",
    "VMOStoragePoolFillingUp",
    "VMOStoragePoolAlmostFull",
}

# PromQL, reduced to the names of the series it selects (see metric_names)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}
_NOT_CATALOGUED = {"up"}  # Prometheus's own
_CATALOGUED = re.compile(r"`([a-z_:][a-z0-9_:]*)`")

JSON = dict[str, Any]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: no functions, keywords or label names."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names - _NOT_CATALOGUED


def alerts() -> list[JSON]:
    return [rule for group in monitoring.rules()["groups"] for rule in group["rules"]]


def alert_ids() -> list[str]:
    return monitoring.alert_names()


def unit_tests() -> JSON:
    loaded = yaml.safe_load(UNIT_TESTS.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `make install` installs it (Debian's prometheus)")
    return path


def run(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")


# --- promtool ----------------------------------------------------------------------------------


def test_promtool_accepts_the_rule_file(tmp_path: Path) -> None:
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text(monitoring.rules_yaml(), encoding="utf-8")
    run([promtool(), "check", "rules", str(rule_file)], tmp_path)


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    # rules_test.yaml names "rules.yaml" beside itself
    (tmp_path / "rules.yaml").write_text(monitoring.rules_yaml(), encoding="utf-8")
    shutil.copyfile(UNIT_TESTS, tmp_path / "rules_test.yaml")
    run([promtool(), "test", "rules", "rules_test.yaml"], tmp_path)


# --- the rule file -----------------------------------------------------------------------------


def test_the_module_serves_the_packaged_rule_file() -> None:
    assert monitoring.rules_yaml() == RULE_FILE.read_text(encoding="utf-8")
    assert monitoring.rules() == yaml.safe_load(RULE_FILE.read_text(encoding="utf-8"))


def test_the_rule_file_ships_as_package_data() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package_data = pyproject["tool"]["setuptools"]["package-data"]
    assert "rules.yaml" in package_data["vmo.api.monitoring"]


def test_alert_names_are_unique_and_in_file_order() -> None:
    names = monitoring.alert_names()
    assert names == [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))


def test_node_agent_alerts_follow_the_global_evaluation_interval() -> None:
    groups = {group["name"]: group for group in monitoring.rules()["groups"]}
    node_agent = groups["vmo-node-agent"]
    assert "interval" not in node_agent
    assert {rule["alert"] for rule in node_agent["rules"]} == NODE_AGENT_ALERTS


@pytest.mark.parametrize("alert", alerts(), ids=alert_ids())
def test_every_alert_has_severity_impact_and_annotations(alert: JSON) -> None:
    name = alert["alert"]
    assert alert["labels"]["severity"] in SEVERITIES
    assert alert["labels"]["operator_health_impact"] in HEALTH_IMPACTS
    annotations = alert["annotations"]
    assert annotations["summary"].strip()
    names_labels = "{{ $labels." in annotations["description"]
    assert names_labels is (name not in CLUSTER_WIDE_ALERTS)
    assert annotations["runbook_url"] == f"docs/runbooks/{name}.md"


@pytest.mark.parametrize("name", alert_ids())
def test_every_alert_has_a_runbook_with_the_four_sections(name: str) -> None:
    runbook = RUNBOOKS / f"{name}.md"
    assert runbook.is_file(), f"{runbook} is missing"
    lines = runbook.read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"# {name}"
    headings = [line for line in lines if line.startswith("## ")]
    assert headings == list(RUNBOOK_SECTIONS)


def test_the_runbook_index_lists_every_alert_and_nothing_else() -> None:
    index = (RUNBOOKS / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([A-Za-z]+)\.md\)", index))
    pages = {path.stem for path in RUNBOOKS.glob("*.md")} - {"README"}
    assert linked >= set(alert_ids())
    assert pages == set(alert_ids())


@pytest.mark.parametrize("name", alert_ids())
def test_every_alert_has_a_unit_test_that_fires_it_and_one_where_it_is_silent(name: str) -> None:
    cases = [
        case
        for test in unit_tests()["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == name
    ]
    assert any(case.get("exp_alerts") for case in cases), f"no unit test fires {name}"
    assert any(not case.get("exp_alerts") for case in cases), f"no unit test keeps {name} silent"


def test_unit_tests_read_the_rule_file_beside_them() -> None:
    assert unit_tests()["rule_files"] == ["rules.yaml"]


# --- metrics -----------------------------------------------------------------------------------


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'sum by (namespace, vmi) (rate(foo_total{code=~"5..", job="x"}[5m] offset 5m)) '
        "/ on (job) group_left () bar_seconds > 0.05 and time() - baz > 1e3 or up == 0"
    )
    assert metric_names(expr) == {"foo_total", "bar_seconds", "baz"}


@pytest.mark.parametrize("alert", alerts(), ids=alert_ids())
def test_every_metric_an_alert_reads_is_in_the_catalogue(alert: JSON) -> None:
    catalogue = set(_CATALOGUED.findall(CATALOGUE.read_text(encoding="utf-8")))
    used = metric_names(alert["expr"])
    assert used or "up{" in alert["expr"], "no metric found: is the extraction broken?"
    assert used <= catalogue, f"not in docs/monitoring.md: {sorted(used - catalogue)}"


# --- cluster mode ------------------------------------------------------------------------------


def test_prometheus_rule_carries_the_rule_groups() -> None:
    rule = monitoring.prometheus_rule("monitoring")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == "vmo-alert-rules"
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"] == {
        "prometheus": "k8s",
        "role": "alert-rules",
        "app.kubernetes.io/part-of": "vmo",
    }
    assert rule["spec"] == {"groups": monitoring.rules()["groups"]}
    assert monitoring.prometheus_rule()["metadata"]["namespace"] == "vmo-system"


def test_service_monitors_scrape_the_three_jobs_over_https_with_a_token() -> None:
    monitors = monitoring.service_monitors("monitoring")
    assert [m["metadata"]["name"] for m in monitors] == [
        "vmo-apiserver",
        "vmo-node-agent",
        "vmo-controllers",
    ]
    for monitor in monitors:
        job = monitor["metadata"]["name"]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["kind"] == "ServiceMonitor"
        assert monitor["metadata"]["namespace"] == "monitoring"
        assert monitor["metadata"]["labels"]["app.kubernetes.io/part-of"] == "vmo"
        spec = monitor["spec"]
        assert spec["selector"] == {"matchLabels": {"app.kubernetes.io/component": job}}
        assert spec["jobLabel"] == "app.kubernetes.io/component"
        assert spec["namespaceSelector"] == {"matchNames": ["monitoring"]}
        [endpoint] = spec["endpoints"]
        assert endpoint["scheme"] == "https"
        assert endpoint["path"] == "/metrics"
        assert endpoint["bearerTokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
        assert endpoint["tlsConfig"] == {
            "caFile": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
            "serverName": f"{job}.monitoring.svc",
        }


def test_only_node_agent_targets_are_labelled_with_their_node() -> None:
    endpoints = {
        m["metadata"]["name"]: m["spec"]["endpoints"][0] for m in monitoring.service_monitors()
    }
    assert endpoints["vmo-node-agent"]["relabelings"] == [
        {
            "action": "replace",
            "sourceLabels": ["__meta_kubernetes_pod_node_name"],
            "targetLabel": "node",
        }
    ]
    assert "relabelings" not in endpoints["vmo-apiserver"]
    assert "relabelings" not in endpoints["vmo-controllers"]
