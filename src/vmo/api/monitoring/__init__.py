"""VMO's alert rules (``rules.yaml``, shipped with this package) and the Prometheus Operator
objects that carry them and VMO's scrape jobs to a cluster.

`vmo up` hands the rule file to its embedded Prometheus as it is; in cluster mode the same groups
go into a PrometheusRule, and the ServiceMonitors stand in for the embedded scrape config.
Pure: the only thing read is this package's own data.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

__all__ = [
    "JOBS",
    "PART_OF",
    "SERVICE_ACCOUNT_TOKEN",
    "RuleFileError",
    "alert_names",
    "prometheus_rule",
    "rules",
    "rules_yaml",
    "service_monitors",
]

JSON = dict[str, Any]

PROMETHEUS_OPERATOR_API = "monitoring.coreos.com/v1"
PART_OF = "vmo"
RULE_NAME = "vmo-alert-rules"
# the scrape jobs, as docs/monitoring.md names them; each is also its Service's component label
JOBS = ("vmo-apiserver", "vmo-node-agent", "vmo-controllers")
NODE_AGENT_JOB = "vmo-node-agent"
COMPONENT_LABEL = "app.kubernetes.io/component"
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
# the Service port every VMO process serves /metrics on
METRICS_PORT = "metrics"
# in a cluster the metrics endpoints serve certificates of the cluster's CA, which Prometheus's
# own pod holds beside its token
CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


class RuleFileError(ValueError):
    """The packaged rule file is not a Prometheus rule file (a packaging mistake)."""


@functools.cache
def rules_yaml() -> str:
    """The rule file's text, exactly as shipped."""
    return resources.files(__name__).joinpath("rules.yaml").read_text(encoding="utf-8")


def rules() -> JSON:
    """The rule file parsed: ``{"groups": [...]}``. A fresh copy each call, free to change."""
    parsed = yaml.safe_load(rules_yaml())
    if not isinstance(parsed, dict) or not isinstance(parsed.get("groups"), list):
        raise RuleFileError("rules.yaml has no list of groups")
    return parsed


def alert_names() -> list[str]:
    """Every alert's name, in file order."""
    return [
        rule["alert"] for group in rules()["groups"] for rule in group["rules"] if "alert" in rule
    ]


def _labels(component: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/part-of": PART_OF}
    if component is not None:
        labels[COMPONENT_LABEL] = component
    return labels


def prometheus_rule(namespace: str = "vmo-system") -> JSON:
    """A PrometheusRule with the rule file's groups, labelled so kube-prometheus picks it up."""
    return {
        "apiVersion": PROMETHEUS_OPERATOR_API,
        "kind": "PrometheusRule",
        "metadata": {
            "name": RULE_NAME,
            "namespace": namespace,
            "labels": {"prometheus": "k8s", "role": "alert-rules", **_labels()},
        },
        "spec": {"groups": rules()["groups"]},
    }


def service_monitors(namespace: str = "vmo-system") -> list[JSON]:
    """One ServiceMonitor per scrape job, selecting the Services labelled with that component."""
    return [_service_monitor(job, namespace) for job in JOBS]


def _service_monitor(job: str, namespace: str) -> JSON:
    return {
        "apiVersion": PROMETHEUS_OPERATOR_API,
        "kind": "ServiceMonitor",
        "metadata": {"name": job, "namespace": namespace, "labels": _labels(job)},
        "spec": {
            # the Service's component label is the job name, as in the embedded scrape config
            "jobLabel": COMPONENT_LABEL,
            "selector": {"matchLabels": {COMPONENT_LABEL: job}},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [_endpoint(job, namespace)],
        },
    }


def _endpoint(job: str, namespace: str) -> JSON:
    endpoint: JSON = {
        "port": METRICS_PORT,
        "scheme": "https",
        "path": "/metrics",
        "bearerTokenFile": SERVICE_ACCOUNT_TOKEN,
        # the token goes only to a server whose certificate the cluster's CA issued for the
        # Service's name (targets are pod addresses, which certificates do not name)
        "tlsConfig": {"caFile": CLUSTER_CA, "serverName": f"{job}.{namespace}.svc"},
    }
    if job == NODE_AGENT_JOB:
        endpoint["relabelings"] = [
            {
                "action": "replace",
                "sourceLabels": ["__meta_kubernetes_pod_node_name"],
                "targetLabel": "node",
            }
        ]
        # the agent's series carry the same node label; Prometheus would keep theirs as
        # exported_node beside the target's
        endpoint["metricRelabelings"] = [{"action": "labeldrop", "regex": "exported_node"}]
    return endpoint
