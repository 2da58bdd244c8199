"""VMO's Grafana dashboards (``dashboards/*.json``) as queries a real Prometheus can answer: every
panel target's ``expr`` and every templating query, Grafana's variables substituted.

``dashboard_queries(values)`` is the entry point: ``values`` gives a variable's value (``node``,
``namespace``, ``vm``, ...); others become ``.+`` (every variable is matched with ``=~``), and
Grafana's own (``$__rate_interval``, ``$__interval``, ``$__range``) fixed durations.
``metric_names`` and ``catalogue_metrics`` let a test check each query names only metrics
docs/monitoring.md lists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "BUILTINS",
    "CATALOGUE",
    "DASHBOARDS",
    "DashboardQuery",
    "catalogue_metrics",
    "dashboard_queries",
    "load_dashboards",
    "metric_names",
    "panels",
    "substitute",
    "templating_expr",
]

_ROOT = Path(__file__).resolve().parents[3]
DASHBOARDS = _ROOT / "dashboards"
CATALOGUE = _ROOT / "docs" / "monitoring.md"
# Grafana's global variables, as a query over the last hour at a 15 s scrape would see them
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
ANY = ".+"


class DashboardQuery(NamedTuple):
    dashboard: str  # the dashboard's title
    panel: str  # the panel's title, or ``variable NAME`` for a templating query
    expr: str  # PromQL, ready to send


def load_dashboards(directory: Path = DASHBOARDS) -> dict[str, dict[str, Any]]:
    """Every dashboard of ``directory``, by file name (``node.json``)."""
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows included."""
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str] | None = None) -> str:
    """``expr`` with Grafana's variables replaced: BUILTINS, then ``values``, else ``.+``."""
    given = {**BUILTINS, **(values or {})}

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return given.get(name, ANY)

    return _VARIABLE.sub(value, expr)


_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.S
)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$", re.S)


def templating_expr(query: str) -> str | None:
    """The PromQL a Prometheus templating query runs: ``label_values(SELECTOR, label)`` reads
    the series of SELECTOR, ``label_values(label)`` those with the label, ``query_result(E)``
    E; None for queries that are not PromQL (``label_names()``, ``metrics(...)``)."""
    match = _LABEL_VALUES.match(query)
    if match is not None:
        return match["selector"] or "{" + match["label"] + '!=""}'
    match = _QUERY_RESULT.match(query)
    return match["expr"] if match is not None else None


def _variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, Mapping):
        return str(query.get("query") or "")
    return str(query or variable.get("definition") or "")


def dashboard_queries(
    values: Mapping[str, str] | None = None,
    *,
    directory: Path = DASHBOARDS,
    templating: bool = True,
    only: Collection[str] = (),
) -> list[DashboardQuery]:
    """Every panel target's expr (and, with ``templating``, every query variable's query) of
    every dashboard (``only`` those named, by file stem: ``node``, ``vm``), with variables
    substituted (see ``substitute``)."""
    out = []
    for file_name, board in load_dashboards(directory).items():
        if only and file_name.removesuffix(".json") not in only:
            continue
        title = str(board.get("title", ""))
        for panel in panels(board):
            for target in panel.get("targets") or []:
                expr = substitute(str(target.get("expr", "")), values)
                out.append(DashboardQuery(title, str(panel.get("title", "")), expr))
        for variable in (board.get("templating") or {}).get("list") or []:
            if not templating or variable.get("type") != "query":
                continue
            query = templating_expr(_variable_query(variable))
            if query is not None:
                name = f"variable {variable['name']}"
                out.append(DashboardQuery(title, name, substitute(query, values)))
    return out


# --- metric names ----------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(?!\w)(\s*\()?")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
     "group_left", "group_right", "inf", "nan", "atan2"}
)  # fmt: skip
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (function names, keywords, label names and
    durations left out)."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("", text)
    text = _BRACKETS.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


_ROW_NAMES = re.compile(r"^\|\s*((?:`[^`]+`(?:\s*/\s*)?)+)\s*\|")
_CODE = re.compile(r"`([^`]+)`")


def _expand(first: str, short: str) -> str:
    """A table cell's ``first / short`` pair: ``short`` replaces first's tail, from the token
    they share when they share one (``flush_requests_total`` / ``flush_times_seconds_total``),
    else as many tokens as it has (``receive_bytes_total`` / ``transmit_bytes_total``)."""
    if short.startswith(("vmo_", "kubevirt_")):
        return short
    tokens, tail = first.split("_"), short.strip("_").split("_")
    at = tokens.index(tail[0]) if tail[0] in tokens else len(tokens) - len(tail)
    return "_".join(tokens[:at] + tail)


def catalogue_metrics(text: str | None = None) -> set[str]:
    """Every metric docs/monitoring.md's catalogue names (a histogram's series included)."""
    names: set[str] = set()
    for line in (text if text is not None else CATALOGUE.read_text()).splitlines():
        match = _ROW_NAMES.match(line)
        if match is None:
            continue
        cells = _CODE.findall(match.group(1))
        if not cells or not cells[0].startswith(("vmo_", "kubevirt_")):
            continue
        names.update(_expand(cells[0], cell) for cell in cells)
        kind = line.split("|")[2].strip()
        if kind == "histogram":
            names.update(cells[0] + s for s in HISTOGRAM_SUFFIXES)
    return names
