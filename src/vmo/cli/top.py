"""``vmo top nodes`` and ``vmo top vms``: what each node's guests and each VM use now (CPU,
memory, disk and network), read from Prometheus as ``kubectl top`` reads metrics-server.

Numbers are rates over ``--window`` (1m) of the metric catalogue's counters (docs/monitoring.md)
and the latest resident memory; percentages are of the node's allocatable
(``vmo_node_allocatable``). Prometheus is the one ``vmo up`` started (the home's
``monitoring/prometheus.json``) unless ``--prometheus-url`` names another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from vmo.api.duration import parse_duration
from vmo.client.prometheus import (
    PrometheusClient,
    PrometheusConfig,
    PrometheusError,
    PrometheusNotConfigured,
    Sample,
    label_matcher,
)
from vmo.home import StateDir

__all__ = [
    "NodeUsage",
    "VMUsage",
    "add_top_commands",
    "format_bytes",
    "format_cores",
    "node_usage",
    "vm_usage",
]

UNKNOWN = "<unknown>"
DEFAULT_WINDOW = "1m"
ENV_USERNAME = "VMO_PROMETHEUS_USERNAME"
ENV_PASSWORD = "VMO_PROMETHEUS_PASSWORD"
ENV_TOKEN = "VMO_PROMETHEUS_TOKEN"


# --- what is measured --------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeUsage:
    node: str
    cpu_cores: float | None
    cpu_percent: float | None
    memory_bytes: float | None
    memory_percent: float | None
    disk_read_bytes_per_second: float | None
    disk_write_bytes_per_second: float | None
    network_receive_bytes_per_second: float | None
    network_transmit_bytes_per_second: float | None
    vmis: int | None


@dataclass(frozen=True)
class VMUsage:
    namespace: str
    name: str
    node: str
    cpu_cores: float | None
    memory_bytes: float | None
    disk_read_bytes_per_second: float | None
    disk_write_bytes_per_second: float | None
    network_receive_bytes_per_second: float | None
    network_transmit_bytes_per_second: float | None


def _node_queries(window: str) -> dict[str, str]:
    def rate(metric: str) -> str:
        return f"sum by (node) (rate({metric}[{window}]))"

    return {
        "cpu": rate("vmo_node_cpu_usage_seconds_total"),
        "memory": "sum by (node) (vmo_node_memory_resident_bytes)",
        "disk_read": rate("vmo_node_storage_read_traffic_bytes_total"),
        "disk_write": rate("vmo_node_storage_write_traffic_bytes_total"),
        "rx": rate("vmo_node_network_receive_bytes_total"),
        "tx": rate("vmo_node_network_transmit_bytes_total"),
        "vmis": "sum by (node) (vmo_node_vmis)",
        "cpu_allocatable": 'max by (node) (vmo_node_allocatable{resource="cpu"})',
        "memory_allocatable": 'max by (node) (vmo_node_allocatable{resource="memory"})',
    }


def _vm_queries(window: str, namespace: str) -> dict[str, str]:
    selector = "{" + label_matcher("namespace", namespace) + "}" if namespace else ""
    keys = "namespace, name"

    def rate(metric: str) -> str:
        return f"sum by ({keys}) (rate({metric}{selector}[{window}]))"

    return {
        "cpu": rate("kubevirt_vmi_cpu_usage_seconds_total"),
        "memory": f"sum by ({keys}) (kubevirt_vmi_memory_resident_bytes{selector})",
        "disk_read": rate("kubevirt_vmi_storage_read_traffic_bytes_total"),
        "disk_write": rate("kubevirt_vmi_storage_write_traffic_bytes_total"),
        "rx": rate("kubevirt_vmi_network_receive_bytes_total"),
        "tx": rate("kubevirt_vmi_network_transmit_bytes_total"),
        "nodes": f"group by ({keys}, node) (kubevirt_vmi_memory_resident_bytes{selector})",
    }


Key = tuple[str, ...]


async def _run_queries(
    prom: PrometheusClient, queries: Mapping[str, str], keys: Sequence[str]
) -> dict[str, dict[Key, list[Sample]]]:
    names = list(queries)
    answers = await asyncio.gather(*(prom.query(queries[n]) for n in names))
    out: dict[str, dict[Key, list[Sample]]] = {}
    for name, samples in zip(names, answers, strict=True):
        grouped: dict[Key, list[Sample]] = {}
        for sample in samples:
            grouped.setdefault(tuple(sample.labels.get(k, "") for k in keys), []).append(sample)
        out[name] = grouped
    return out


def _one(found: Mapping[Key, list[Sample]], key: Key) -> float | None:
    samples = found.get(key)
    if not samples or math.isnan(samples[0].value):
        return None
    return samples[0].value


def _percent(used: float | None, total: float | None) -> float | None:
    if used is None or not total:
        return None
    return 100.0 * used / total


async def node_usage(prom: PrometheusClient, *, window: str = DEFAULT_WINDOW) -> list[NodeUsage]:
    """Every node some series names, by name."""
    found = await _run_queries(prom, _node_queries(window), ("node",))
    nodes = sorted({key for name in ("cpu", "memory", "vmis") for key in found[name]})
    out = []
    for key in nodes:
        cpu, memory = _one(found["cpu"], key), _one(found["memory"], key)
        vmis = _one(found["vmis"], key)
        out.append(
            NodeUsage(
                node=key[0],
                cpu_cores=cpu,
                cpu_percent=_percent(cpu, _one(found["cpu_allocatable"], key)),
                memory_bytes=memory,
                memory_percent=_percent(memory, _one(found["memory_allocatable"], key)),
                disk_read_bytes_per_second=_one(found["disk_read"], key),
                disk_write_bytes_per_second=_one(found["disk_write"], key),
                network_receive_bytes_per_second=_one(found["rx"], key),
                network_transmit_bytes_per_second=_one(found["tx"], key),
                vmis=None if vmis is None else int(vmis),
            )
        )
    return out


async def vm_usage(
    prom: PrometheusClient, *, namespace: str = "", window: str = DEFAULT_WINDOW
) -> list[VMUsage]:
    """Every running VMI of ``namespace`` (all namespaces when empty), by namespace and name."""
    found = await _run_queries(prom, _vm_queries(window, namespace), ("namespace", "name"))
    out = []
    for key in sorted({*found["cpu"], *found["memory"]}):
        nodes = sorted({s.labels.get("node", "") for s in found["nodes"].get(key, [])} - {""})
        out.append(
            VMUsage(
                namespace=key[0],
                name=key[1],
                node=",".join(nodes),  # two while a migration runs
                cpu_cores=_one(found["cpu"], key),
                memory_bytes=_one(found["memory"], key),
                disk_read_bytes_per_second=_one(found["disk_read"], key),
                disk_write_bytes_per_second=_one(found["disk_write"], key),
                network_receive_bytes_per_second=_one(found["rx"], key),
                network_transmit_bytes_per_second=_one(found["tx"], key),
            )
        )
    return out


# --- how it is shown ---------------------------------------------------------------------------


def format_cores(cores: float | None) -> str:
    """Millicores as kubectl top shows CPU (``250m``)."""
    return UNKNOWN if cores is None else f"{round(cores * 1000)}m"


def format_bytes(size: float | None, *, per_second: bool = False) -> str:
    """Binary units: ``512Mi`` for memory as kubectl shows it, ``1.5Mi/s`` for rates."""
    if size is None:
        return UNKNOWN
    if not per_second:
        return f"{round(size / 1024**2)}Mi"
    for unit, scale in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size >= scale:
            return f"{size / scale:.1f}{unit}/s"
    return f"{size:.0f}B/s"


def _pct(value: float | None) -> str:
    return UNKNOWN if value is None else f"{round(value)}%"


def _sorted(rows: list[Any], sort_by: str) -> list[Any]:
    if not sort_by:
        return rows
    field = {"cpu": "cpu_cores", "memory": "memory_bytes"}[sort_by]
    return sorted(rows, key=lambda r: getattr(r, field) or 0.0, reverse=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    table = Table(*header, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    console = Console(width=None if sys.stdout.isatty() else 400, highlight=False)
    console.print(table)


def _print_nodes(rows: Sequence[NodeUsage]) -> None:
    header = ("NAME", "CPU(cores)", "CPU%", "MEMORY(bytes)", "MEMORY%", "DISK READ",
              "DISK WRITE", "NET RX", "NET TX", "VMIS")  # fmt: skip
    _table(header, [
        (r.node, format_cores(r.cpu_cores), _pct(r.cpu_percent), format_bytes(r.memory_bytes),
         _pct(r.memory_percent), format_bytes(r.disk_read_bytes_per_second, per_second=True),
         format_bytes(r.disk_write_bytes_per_second, per_second=True),
         format_bytes(r.network_receive_bytes_per_second, per_second=True),
         format_bytes(r.network_transmit_bytes_per_second, per_second=True),
         UNKNOWN if r.vmis is None else str(r.vmis))
        for r in rows
    ])  # fmt: skip


def _print_vms(rows: Sequence[VMUsage], *, all_namespaces: bool) -> None:
    header = ["NAME", "NODE", "CPU(cores)", "MEMORY(bytes)", "DISK READ", "DISK WRITE",
              "NET RX", "NET TX"]  # fmt: skip
    lines = [
        [r.name, r.node or UNKNOWN, format_cores(r.cpu_cores), format_bytes(r.memory_bytes),
         format_bytes(r.disk_read_bytes_per_second, per_second=True),
         format_bytes(r.disk_write_bytes_per_second, per_second=True),
         format_bytes(r.network_receive_bytes_per_second, per_second=True),
         format_bytes(r.network_transmit_bytes_per_second, per_second=True)]
        for r in rows
    ]  # fmt: skip
    if all_namespaces:
        header.insert(0, "NAMESPACE")
        lines = [[r.namespace, *line] for r, line in zip(rows, lines, strict=True)]
    _table(header, lines)


# --- where Prometheus is -----------------------------------------------------------------------


def prometheus_config(args: argparse.Namespace, state: StateDir) -> PrometheusConfig:
    """``--prometheus-url`` (credentials from the environment, or from the home's file when it
    names the same URL), else the home's ``prometheus.json``."""
    if not args.prometheus_url:
        config = PrometheusConfig.from_home(state)
        return replace(config, ca_file=args.prometheus_ca or config.ca_file)
    try:
        home = PrometheusConfig.from_home(state)
    except PrometheusError:
        home = None
    if home is not None and home.url.rstrip("/") == args.prometheus_url.rstrip("/"):
        return replace(home, ca_file=args.prometheus_ca or home.ca_file)
    return PrometheusConfig(
        url=args.prometheus_url,
        ca_file=args.prometheus_ca,
        username=os.environ.get(ENV_USERNAME, ""),
        password=os.environ.get(ENV_PASSWORD, ""),
        bearer_token=os.environ.get(ENV_TOKEN, ""),
    )


def _window(text: str) -> str:
    """A PromQL range for ``--window`` (a Go duration such as 30s, 1m or 1m30s)."""
    try:
        seconds = parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the window must be positive")
    return f"{round(seconds * 1000)}ms"


def _kubeconfig_namespace(args: argparse.Namespace, state: StateDir) -> str:
    """The current context's namespace, as kubectl defaults it (read without authenticating)."""
    path = Path(args.kubeconfig or os.environ.get("KUBECONFIG") or state.kubeconfig)
    try:
        config = yaml.safe_load(path.read_text()) or {}
        current = config.get("current-context", "")
        context = next(c["context"] for c in config.get("contexts") or [] if c["name"] == current)
        return str(context.get("namespace") or "default")
    except (OSError, yaml.YAMLError, StopIteration, KeyError, TypeError, AttributeError):
        return "default"


# --- the commands ------------------------------------------------------------------------------


def _run(
    args: argparse.Namespace, state: StateDir, action: Callable[[PrometheusClient], Any]
) -> int:
    try:
        config = prometheus_config(args, state)
    except PrometheusNotConfigured as exc:
        print(
            f"vmo top: {exc}; start it with `vmo up`, or name one with --prometheus-url",
            file=sys.stderr,
        )
        return 1
    except PrometheusError as exc:
        print(f"vmo top: {exc}", file=sys.stderr)
        return 1

    async def go() -> int:
        async with PrometheusClient(config) as prom:
            return int(await action(prom))

    try:
        return asyncio.run(go())
    except PrometheusError as exc:
        print(f"vmo top: {exc}", file=sys.stderr)
        return 1


async def _top_nodes(prom: PrometheusClient, args: argparse.Namespace) -> int:
    rows = _sorted(await node_usage(prom, window=args.window), args.sort_by)
    if args.output == "json":
        print(json.dumps({"window": args.window, "items": [asdict(r) for r in rows]}, indent=2))
    elif not rows:
        print("No node metrics found (is a node agent running and scraped?)", file=sys.stderr)
    else:
        _print_nodes(rows)
    return 0


async def _top_vms(prom: PrometheusClient, args: argparse.Namespace, namespace: str) -> int:
    rows = _sorted(await vm_usage(prom, namespace=namespace, window=args.window), args.sort_by)
    if args.output == "json":
        print(json.dumps({"window": args.window, "items": [asdict(r) for r in rows]}, indent=2))
    elif not rows:
        where = "any namespace" if not namespace else f"namespace {namespace}"
        print(f"No running VMs with metrics found in {where}", file=sys.stderr)
    else:
        _print_vms(rows, all_namespaces=not namespace)
    return 0


def add_top_commands(sub: Any, state_of: Callable[[argparse.Namespace], StateDir]) -> None:
    top = sub.add_parser("top", help="CPU, memory, disk and network use of nodes and VMs")
    kinds = top.add_subparsers(dest="top_command", required=True)

    def common(cmd: Any) -> None:
        cmd.add_argument("--window", type=_window, default=_window(DEFAULT_WINDOW),
                         help="the rate window, e.g. 30s or 5m (default 1m)")  # fmt: skip
        cmd.add_argument("--sort-by", choices=["cpu", "memory"], default="",
                         help="sort by this, highest first (default: by name)")  # fmt: skip
        cmd.add_argument("-o", "--output", choices=["table", "json"], default="table")
        cmd.add_argument("--prometheus-url", default="",
                         help="default: the Prometheus vmo up started (the home's "
                              "monitoring/prometheus.json)")  # fmt: skip
        cmd.add_argument("--prometheus-ca", default="",
                         help="the CA that signed its certificate")  # fmt: skip

    nodes = kinds.add_parser("nodes", aliases=["node"], help="use by node (its guests' QEMUs)")
    common(nodes)
    nodes.set_defaults(func=lambda a: _run(a, state_of(a), lambda p: _top_nodes(p, a)))
    vms = kinds.add_parser("vms", aliases=["vm"], help="use by running VM")
    common(vms)
    scope = vms.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", default="")
    scope.add_argument("-A", "--all-namespaces", action="store_true")
    vms.add_argument("--kubeconfig", default="", help="whose context names the namespace")

    def run_vms(args: argparse.Namespace) -> int:
        state = state_of(args)
        namespace = "" if args.all_namespaces else (
            args.namespace or _kubeconfig_namespace(args, state)
        )  # fmt: skip
        return _run(args, state, lambda p: _top_vms(p, args, namespace))

    vms.set_defaults(func=run_vms)
