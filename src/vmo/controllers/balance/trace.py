"""Cluster traces for the balancer's simulator: nodes, plus VMs with usage over time.

A trace is JSON, version 1::

    {"version": 1,
     "stepSeconds": 60, "steps": 1440,
     "nodes": [{"name": "node-1", "cpu": 48, "memory": 206158430208}],
     "series": {"day": [0.4, 0.41, ...]},
     "vms": [{"name": "tenant-a/vm-1",
              "requests": {"cpu": 2, "memory": 8589934592},
              "memorySize": 8589934592,
              "arrive": 0, "depart": null, "node": "node-1",
              "usage": {"cpu": {"base": 0.8, "series": "day", "shift": 120,
                                "bursts": [[300, 330, 3.0]]},
                        "memory": 6442450944}}]}

- ``nodes``: allocatable cores and bytes (``network`` bytes/s optional, ``schedulable``
  optional, default true).
- ``vms[].requests``: cores and bytes requested; ``memorySize``: the guest memory a live
  migration copies (default: the memory request); ``arrive``: the step the VM starts;
  ``depart``: the step it stops, or null; ``node``: where it runs at ``arrive`` when the trace
  records it (else the balancer under test places it); ``allowed`` (node names) and
  ``antiAffinity`` (group names) are optional.
- ``vms[].usage.cpu`` and ``.memory``: a number (constant), an explicit array (one value per
  step from ``arrive``; the last value holds after its end), or the compact form
  ``{"base": b, "series": name, "shift": k, "bursts": [[from, to, factor], ...]}``, meaning
  ``b * series[(step + k) % len(series)]``, times ``factor`` on the steps ``from <= step < to``.
  Without ``series`` the multiplier is 1. Usage is capped at the request.

``load`` validates and raises ``TraceError`` naming the field (``vms[3].usage.cpu.series``).
The generators ``diurnal``, ``hot_spot`` and ``bursty`` build traces from a fixed seed with
``random.Random(seed)``, each with seeded random arrivals and departures.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmo.controllers.balance.model import Node

VERSION = 1
GIB = 1024**3


class TraceError(ValueError):
    """A trace that does not follow the format; ``field`` names where."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class Usage:
    """One resource's usage over a VM's life, in the compact or the explicit form."""

    base: float = 0.0
    series: str | None = None
    shift: int = 0
    bursts: tuple[tuple[int, int, float], ...] = ()
    values: tuple[float, ...] | None = None

    def at(self, step: int, arrive: int, series: Mapping[str, Sequence[float]]) -> float:
        if self.values is not None:
            if not self.values:
                return 0.0
            return self.values[min(len(self.values) - 1, max(0, step - arrive))]
        value = self.base
        if self.series is not None:
            curve = series[self.series]
            value *= curve[(step + self.shift) % len(curve)]
        for start, end, factor in self.bursts:
            if start <= step < end:
                value *= factor
        return value

    def to_json(self) -> Any:
        if self.values is not None:
            return list(self.values)
        if self.series is None and not self.bursts and not self.shift:
            return self.base
        out: dict[str, Any] = {"base": self.base}
        if self.series is not None:
            out["series"] = self.series
        if self.shift:
            out["shift"] = self.shift
        if self.bursts:
            out["bursts"] = [list(b) for b in self.bursts]
        return out


@dataclass(frozen=True)
class TraceVm:
    name: str
    cpu_request: float
    memory_request: float
    memory_size: float
    arrive: int
    depart: int | None
    cpu: Usage
    memory: Usage
    node: str | None = None
    allowed: frozenset[str] | None = None
    anti_affinity: frozenset[str] = frozenset()

    def alive(self, step: int) -> bool:
        return self.arrive <= step and (self.depart is None or step < self.depart)


@dataclass(frozen=True)
class Trace:
    step_seconds: float
    steps: int
    nodes: tuple[Node, ...]
    vms: tuple[TraceVm, ...]
    series: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    name: str = "trace"

    def usage(self, vm: TraceVm, step: int) -> tuple[float, float]:
        """``vm``'s CPU cores and memory bytes used at ``step``, capped at its requests."""
        cpu = vm.cpu.at(step, vm.arrive, self.series)
        memory = vm.memory.at(step, vm.arrive, self.series)
        return min(cpu, vm.cpu_request), min(memory, vm.memory_request)


# --- JSON ------------------------------------------------------------------------------------


def _number(value: Any, where: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TraceError(where, f"must be a number, not {value!r}")
    if value < minimum:
        raise TraceError(where, f"must be >= {minimum:g}, not {value!r}")
    return float(value)


def _integer(value: Any, where: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(where, f"must be an integer, not {value!r}")
    if value < minimum:
        raise TraceError(where, f"must be >= {minimum}, not {value!r}")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise TraceError(where, f"must be an object, not {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise TraceError(where, f"must be an array, not {type(value).__name__}")
    return value


def _required(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise TraceError(f"{where}.{key}" if where else key, "is required")
    return data[key]


def _usage(value: Any, where: str, series: Mapping[str, Sequence[float]]) -> Usage:
    if isinstance(value, list):
        return Usage(values=tuple(_number(v, f"{where}[{i}]") for i, v in enumerate(value)))
    if not isinstance(value, dict):
        return Usage(base=_number(value, where))
    base = _number(_required(value, "base", where), f"{where}.base")
    name = value.get("series")
    if name is not None and name not in series:
        raise TraceError(f"{where}.series", f"unknown series {name!r}")
    shift = _integer(value.get("shift", 0), f"{where}.shift")
    bursts = []
    for i, burst in enumerate(_list(value.get("bursts", []), f"{where}.bursts")):
        at = f"{where}.bursts[{i}]"
        if not isinstance(burst, list) or len(burst) != 3:
            raise TraceError(at, "must be [from, to, factor]")
        start, end = _integer(burst[0], f"{at}[0]"), _integer(burst[1], f"{at}[1]")
        if end < start:
            raise TraceError(f"{at}[1]", "must not be before its start")
        bursts.append((start, end, _number(burst[2], f"{at}[2]")))
    return Usage(base, name, shift, tuple(bursts))


def _node(data: Any, where: str) -> Node:
    data = _mapping(data, where)
    name = _required(data, "name", where)
    if not isinstance(name, str) or not name:
        raise TraceError(f"{where}.name", "must be a non-empty string")
    network = data.get("network")
    schedulable = data.get("schedulable", True)
    if not isinstance(schedulable, bool):
        raise TraceError(f"{where}.schedulable", "must be true or false")
    return Node(
        name=name,
        cpu=_number(_required(data, "cpu", where), f"{where}.cpu", minimum=1e-9),
        memory=_number(_required(data, "memory", where), f"{where}.memory", minimum=1),
        schedulable=schedulable,
        network=None if network is None else _number(network, f"{where}.network"),
    )


def _names(value: Any, where: str) -> frozenset[str]:
    items = _list(value, where)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TraceError(f"{where}[{i}]", "must be a string")
    return frozenset(items)


def _vm(data: Any, where: str, trace: dict[str, Any]) -> TraceVm:
    data = _mapping(data, where)
    name = _required(data, "name", where)
    if not isinstance(name, str) or not name:
        raise TraceError(f"{where}.name", "must be a non-empty string")
    requests = _mapping(_required(data, "requests", where), f"{where}.requests")
    cpu_request = _number(_required(requests, "cpu", f"{where}.requests"), f"{where}.requests.cpu")
    memory_request = _number(
        _required(requests, "memory", f"{where}.requests"), f"{where}.requests.memory"
    )
    arrive = _integer(data.get("arrive", 0), f"{where}.arrive")
    depart = data.get("depart")
    if depart is not None:
        depart = _integer(depart, f"{where}.depart")
        if depart <= arrive:
            raise TraceError(f"{where}.depart", f"must be after arrive ({arrive}), not {depart}")
    node = data.get("node")
    if node is not None and node not in trace["node_names"]:
        raise TraceError(f"{where}.node", f"unknown node {node!r}")
    usage = _mapping(_required(data, "usage", where), f"{where}.usage")
    series = trace["series"]
    allowed = data.get("allowed")
    return TraceVm(
        name=name,
        cpu_request=cpu_request,
        memory_request=memory_request,
        memory_size=_number(data.get("memorySize", memory_request), f"{where}.memorySize"),
        arrive=arrive,
        depart=depart,
        cpu=_usage(_required(usage, "cpu", f"{where}.usage"), f"{where}.usage.cpu", series),
        memory=_usage(
            _required(usage, "memory", f"{where}.usage"), f"{where}.usage.memory", series
        ),
        node=node,
        allowed=None if allowed is None else _names(allowed, f"{where}.allowed"),
        anti_affinity=_names(data.get("antiAffinity", []), f"{where}.antiAffinity"),
    )


def parse(data: Any, *, name: str = "trace") -> Trace:
    """A trace from its decoded JSON; raises ``TraceError`` naming the field."""
    data = _mapping(data, "trace")
    version = _required(data, "version", "")
    if version != VERSION:
        raise TraceError("version", f"must be {VERSION}, not {version!r}")
    step_seconds = _number(_required(data, "stepSeconds", ""), "stepSeconds", minimum=1e-9)
    steps = _integer(_required(data, "steps", ""), "steps", minimum=1)
    nodes = tuple(
        _node(n, f"nodes[{i}]") for i, n in enumerate(_list(_required(data, "nodes", ""), "nodes"))
    )
    if not nodes:
        raise TraceError("nodes", "must list at least one node")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise TraceError("nodes", "node names must be unique")
    series: dict[str, tuple[float, ...]] = {}
    for key, values in _mapping(data.get("series", {}), "series").items():
        curve = tuple(
            _number(v, f"series.{key}[{i}]") for i, v in enumerate(_list(values, f"series.{key}"))
        )
        if not curve:
            raise TraceError(f"series.{key}", "must not be empty")
        series[key] = curve
    context = {"node_names": set(names), "series": series}
    vms = tuple(
        _vm(v, f"vms[{i}]", context) for i, v in enumerate(_list(_required(data, "vms", ""), "vms"))
    )
    keys = [v.name for v in vms]
    if len(set(keys)) != len(keys):
        raise TraceError("vms", "VM names must be unique")
    return Trace(step_seconds, steps, nodes, vms, series, name)


def load(path: str | Path) -> Trace:
    """Read and validate a trace file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TraceError("trace", f"{path} is not JSON: {e}") from e
    return parse(data, name=path.stem)


def to_json(trace: Trace) -> dict[str, Any]:
    nodes = []
    for n in trace.nodes:
        node: dict[str, Any] = {"name": n.name, "cpu": n.cpu, "memory": n.memory}
        if not n.schedulable:
            node["schedulable"] = False
        if n.network is not None:
            node["network"] = n.network
        nodes.append(node)
    vms = []
    for v in trace.vms:
        vm: dict[str, Any] = {
            "name": v.name,
            "requests": {"cpu": v.cpu_request, "memory": v.memory_request},
            "memorySize": v.memory_size,
            "arrive": v.arrive,
            "depart": v.depart,
            "usage": {"cpu": v.cpu.to_json(), "memory": v.memory.to_json()},
        }
        if v.node is not None:
            vm["node"] = v.node
        if v.allowed is not None:
            vm["allowed"] = sorted(v.allowed)
        if v.anti_affinity:
            vm["antiAffinity"] = sorted(v.anti_affinity)
        vms.append(vm)
    return {
        "version": VERSION,
        "stepSeconds": trace.step_seconds,
        "steps": trace.steps,
        "nodes": nodes,
        "series": {k: list(v) for k, v in trace.series.items()},
        "vms": vms,
    }


def dump(trace: Trace, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_json(trace), separators=(",", ":")))


# --- generators -------------------------------------------------------------------------------

# KubeVirt common-instancetypes' u1 sizes (cores, GiB) and how often each is picked
SIZES = ((1, 2, 0.30), (1, 4, 0.35), (2, 8, 0.25), (4, 16, 0.10))
STEP = 60  # seconds per step
DAY = 1440  # steps per day at one-minute steps


@dataclass(frozen=True)
class _Shape:
    """What the three generators share: cluster size, how full, and churn."""

    nodes: int = 12
    vms: int = 240
    steps: int = DAY
    node_cpu: float = 48.0
    node_memory: float = 192.0 * GIB
    # nodes back from maintenance, empty at the start of the trace
    empty: int = 1
    # the share of VMs running when the trace starts; the rest arrive over the trace
    initial: float = 0.85
    # the share of VMs that depart before the trace ends
    departing: float = 0.2


def _size(rng: random.Random) -> tuple[float, float]:
    pick = rng.random()
    for cores, gib, weight in SIZES:
        if pick < weight:
            return float(cores), gib * float(GIB)
        pick -= weight
    cores, gib, _ = SIZES[-1]
    return float(cores), gib * float(GIB)


def _lifetimes(rng: random.Random, shape: _Shape) -> list[tuple[int, int | None]]:
    """(arrive, depart) per VM: most running at step 0, seeded arrivals and departures."""
    out: list[tuple[int, int | None]] = []
    for _ in range(shape.vms):
        arrive = 0 if rng.random() < shape.initial else rng.randrange(1, shape.steps)
        depart = None
        if rng.random() < shape.departing and arrive < shape.steps - 2:
            depart = rng.randrange(arrive + 1, shape.steps)
        out.append((arrive, depart))
    return out


def _recorded_placement(
    nodes: Sequence[Node], sizes: Sequence[tuple[float, float]], running: Sequence[bool], empty: int
) -> list[str | None]:
    """Where the VMs running at step 0 were placed before the trace: least allocated by
    requests, on all but the ``empty`` nodes (they were in maintenance)."""
    used = {n.name: [0.0, 0.0] for n in nodes[empty:]}
    out: list[str | None] = []
    for (cpu, memory), up in zip(sizes, running, strict=True):
        if not up:
            out.append(None)
            continue
        best = min(
            (n for n in nodes[empty:] if used[n.name][0] + cpu <= n.cpu
             and used[n.name][1] + memory <= n.memory),
            key=lambda n: (used[n.name][0] / n.cpu + used[n.name][1] / n.memory, n.name),
        )  # fmt: skip
        used[best.name][0] += cpu
        used[best.name][1] += memory
        out.append(best.name)
    return out


def _cluster(shape: _Shape) -> tuple[Node, ...]:
    return tuple(
        Node(f"node-{i + 1:02d}", shape.node_cpu, shape.node_memory) for i in range(shape.nodes)
    )


def _build(
    name: str,
    shape: _Shape,
    rng: random.Random,
    usage: Any,
    series: Mapping[str, Sequence[float]],
) -> Trace:
    """The trace whose VMs' usage ``usage(rng, index, cpu, memory, node)`` describes."""
    nodes = _cluster(shape)
    sizes = [_size(rng) for _ in range(shape.vms)]
    lives = _lifetimes(rng, shape)
    placed = _recorded_placement(nodes, sizes, [a == 0 for a, _ in lives], shape.empty)
    vms = []
    for i, ((cpu, memory), (arrive, depart), node) in enumerate(
        zip(sizes, lives, placed, strict=True)
    ):
        cpu_usage, memory_usage = usage(rng, i, cpu, memory, node)
        vms.append(
            TraceVm(
                name=f"tenant-{i % 5}/vm-{i:04d}",
                cpu_request=cpu,
                memory_request=memory,
                memory_size=memory,
                arrive=arrive,
                depart=depart,
                cpu=cpu_usage,
                memory=memory_usage,
                node=node,
            )
        )
    curves = {k: tuple(round(x, 4) for x in v) for k, v in series.items()}
    return Trace(STEP, shape.steps, nodes, tuple(vms), curves, name)


def _day_curve(steps: int = DAY) -> list[float]:
    """Business hours: low at night, a morning ramp, a midday dip, an evening tail (0.2..1)."""
    out = []
    for step in range(steps):
        hour = step * 24 / steps
        day = math.exp(-(((hour - 11) / 3.5) ** 2)) + 0.6 * math.exp(-(((hour - 16) / 2.5) ** 2))
        out.append(0.2 + 0.8 * min(1.0, day))
    return out


def diurnal(seed: int, *, nodes: int = 12, vms: int = 240, steps: int = DAY) -> Trace:
    """Each tenant follows the working day in its own time zone (shifts of 0, 6, 9, 14 and
    18 h), so nodes whose VMs share a zone peak together."""
    rng = random.Random(seed)
    shape = _Shape(nodes=nodes, vms=vms, steps=steps)
    shifts = (0, 6 * 60, 9 * 60, 14 * 60, 18 * 60)

    def usage(
        rng: random.Random, i: int, cpu: float, memory: float, node: str | None
    ) -> tuple[Usage, Usage]:
        return (
            Usage(base=cpu * rng.betavariate(1.5, 1.5), series="day", shift=shifts[i % 5]),
            Usage(base=memory * rng.uniform(0.4, 0.9), series="memory-day", shift=shifts[i % 5]),
        )

    day = _day_curve()
    series = {"day": day, "memory-day": [0.85 + 0.15 * x for x in day]}
    return _build(f"diurnal-{seed}", shape, rng, usage, series)


def hot_spot(seed: int, *, nodes: int = 12, vms: int = 240, steps: int = DAY) -> Trace:
    """Mostly quiet VMs; an application whose VMs were placed together on two nodes runs hot
    (near its full vCPUs) for hours, twice a day, with a gentle day curve under all of it."""
    rng = random.Random(seed)
    shape = _Shape(nodes=nodes, vms=vms, steps=steps, empty=2)
    hot_nodes = {f"node-{shape.empty + 1:02d}", f"node-{shape.empty + 2:02d}"}
    windows = []
    for _ in range(2):
        start = rng.randrange(0, max(1, steps - 240))
        windows.append((start, start + rng.randrange(120, 300)))

    def usage(
        rng: random.Random, i: int, cpu: float, memory: float, node: str | None
    ) -> tuple[Usage, Usage]:
        hot = node in hot_nodes and rng.random() < 0.6
        base = rng.uniform(0.1, 0.35)
        bursts = tuple((a, b, 0.95 / base) for a, b in windows) if hot else ()
        return (
            Usage(base=cpu * base, series="day", bursts=bursts),
            Usage(base=memory * rng.uniform(0.4, 0.9)),
        )

    series = {"day": [0.7 + 0.3 * x for x in _day_curve()]}
    return _build(f"hot-spot-{seed}", shape, rng, usage, series)


def bursty(seed: int, *, nodes: int = 12, vms: int = 240, steps: int = DAY) -> Trace:
    """Low baselines with random bursts: each VM bursts a few times a day, for 5 to 60
    minutes, to 3-5x its baseline (capped at its vCPUs)."""
    rng = random.Random(seed)
    shape = _Shape(nodes=nodes, vms=vms, steps=steps)

    def usage(
        rng: random.Random, i: int, cpu: float, memory: float, node: str | None
    ) -> tuple[Usage, Usage]:
        bursts = []
        for _ in range(rng.randrange(1, 6)):
            start = rng.randrange(0, steps)
            bursts.append((start, start + rng.randrange(5, 60), rng.uniform(3.0, 5.0)))
        return (
            Usage(base=cpu * rng.uniform(0.1, 0.3), bursts=tuple(sorted(bursts))),
            Usage(base=memory * rng.uniform(0.4, 0.9)),
        )

    return _build(f"bursty-{seed}", shape, rng, usage, {})


GENERATORS = {"diurnal": diurnal, "hot-spot": hot_spot, "bursty": bursty}
