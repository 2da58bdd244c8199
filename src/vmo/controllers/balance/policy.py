"""A BalancePolicy's spec, read into typed settings with its defaults; each problem names its
field (``spec.cooldown.minimum``), so that the policy's status can say what to fix. Pure: no I/O.

Which VMs a policy balances: those whose labels its ``vmSelector`` matches (every VM without
one), in namespaces its ``namespaceSelector`` matches (every namespace without one), minus
those ``exclude`` selects. A VM that two policies select is balanced by neither (``overlaps``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from croniter import croniter

from vmo.api.duration import parse_duration
from vmo.api.selectors import selector_matches
from vmo.controllers.balance.model import Settings

JSON = dict[str, Any]

MIN_COOLDOWN = 15 * 60.0
MAX_COOLDOWN = 6 * 3600.0
DEFAULT_INTERVAL = 300.0
DEFAULT_WINDOW = 1800.0
DEFAULT_STEP = 60.0
DEFAULT_RATE_INTERVAL = 120.0
DEFAULT_PER_NODE = 2
DEFAULT_TOTAL = 5


class InvalidPolicy(ValueError):
    """The spec cannot be used; ``problems`` are (field, message) pairs."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{f}: {m}" for f, m in self.problems))


@dataclass(frozen=True)
class Window:
    """A maintenance window: opens at each of ``schedule``'s times, for ``seconds``."""

    schedule: str
    seconds: float

    def open_at(self, when: datetime) -> bool:
        start = croniter(self.schedule, when + timedelta(seconds=1)).get_prev(datetime)
        return bool(when < start + timedelta(seconds=self.seconds))


@dataclass(frozen=True)
class Measurement:
    window: float = DEFAULT_WINDOW
    percentile: int = 95
    step: float = DEFAULT_STEP
    rate_interval: float = DEFAULT_RATE_INTERVAL


@dataclass(frozen=True)
class PolicySpec:
    name: str
    automation: str = "Manual"
    settings: Settings = field(default_factory=Settings)
    limits_given: tuple[bool, bool] = (False, False)  # perNode, total set by the user
    vm_selector: JSON | None = None
    namespace_selector: JSON | None = None
    exclude_vms: JSON | None = None
    exclude_namespaces: JSON | None = None
    cooldown_minimum: float = MIN_COOLDOWN
    cooldown_maximum: float = MAX_COOLDOWN
    windows: tuple[Window, ...] = ()
    interval: float = DEFAULT_INTERVAL
    measurement: Measurement = field(default_factory=Measurement)
    suspend: bool = False

    @property
    def places(self) -> bool:
        """Initial placement follows the policy's score (Partial and Full)."""
        return self.automation in ("Partial", "Full")

    @property
    def migrates(self) -> bool:
        """Recommendations are carried out without approval (Full)."""
        return self.automation == "Full"

    def in_window(self, when: datetime) -> bool:
        """Whether automatic migrations may start now (always, without windows)."""
        return not self.windows or any(w.open_at(when) for w in self.windows)

    def selects(self, vm_labels: Mapping[str, str], namespace_labels: Mapping[str, str]) -> bool:
        def matches(selector: JSON | None, labels: Mapping[str, str], default: bool) -> bool:
            return default if selector is None else selector_matches(labels, selector)

        return (
            matches(self.vm_selector, vm_labels, True)
            and matches(self.namespace_selector, namespace_labels, True)
            and not matches(self.exclude_vms, vm_labels, False)
            and not matches(self.exclude_namespaces, namespace_labels, False)
        )

    def with_migration_limits(self, per_node: int, total: int) -> PolicySpec:
        """The limits bounded by the cluster's (the KubeVirt CR's migration configuration):
        the defaults become the cluster's where it allows fewer."""
        s = self.settings
        given_node, given_total = self.limits_given
        node = min(s.max_per_node if given_node else DEFAULT_PER_NODE, per_node)
        all_ = min(s.max_total if given_total else DEFAULT_TOTAL, total)
        return _replace_settings(self, max_per_node=node, max_total=all_)


def _replace_settings(spec: PolicySpec, **changes: Any) -> PolicySpec:
    return replace(spec, settings=replace(spec.settings, **changes))


def _seconds(spec: JSON, path: str, default: float, problems: list[tuple[str, str]]) -> float:
    node: Any = spec
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node in (None, ""):
        return default
    try:
        value = parse_duration(str(node)).total_seconds()
    except ValueError as exc:
        problems.append((f"spec.{path}", str(exc)))
        return default
    if value <= 0:
        problems.append((f"spec.{path}", f"must be positive, not {node!r}"))
        return default
    return value


def _int(value: object, field_path: str, default: int, problems: list[tuple[str, str]]) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append((field_path, f"must be an integer, not {value!r}"))
        return default
    return value


def parse_policy(policy: JSON) -> PolicySpec:
    """The policy's settings; InvalidPolicy lists every problem (not just the first)."""
    spec = policy.get("spec") or {}
    name = str((policy.get("metadata") or {}).get("name") or "")
    problems: list[tuple[str, str]] = []
    automation = str(spec.get("automationLevel") or "Manual")
    if automation not in ("Manual", "Partial", "Full"):
        problems.append(("spec.automationLevel", f"must be Manual, Partial or Full, not {automation!r}"))  # fmt: skip
    threshold = _int(spec.get("migrationThreshold"), "spec.migrationThreshold", 3, problems)
    resources = tuple(str(r) for r in spec.get("resources") or ("cpu", "memory"))
    limits = spec.get("limits") or {}
    per_node = _int(limits.get("perNode"), "spec.limits.perNode", DEFAULT_PER_NODE, problems)
    total = _int(limits.get("total"), "spec.limits.total", DEFAULT_TOTAL, problems)
    headroom = _int(spec.get("headroom"), "spec.headroom", 90, problems)
    if not 10 <= headroom <= 100:
        problems.append(("spec.headroom", f"must be from 10 to 100 (percent), not {headroom}"))
        headroom = 90
    settings = Settings(threshold, resources, per_node, total, headroom / 100)
    problems += settings.validate()
    minimum = _seconds(spec, "cooldown.minimum", MIN_COOLDOWN, problems)
    maximum = _seconds(spec, "cooldown.maximum", MAX_COOLDOWN, problems)
    if minimum < MIN_COOLDOWN:
        problems.append(("spec.cooldown.minimum", "must be at least 15m"))
    if maximum < minimum:
        problems.append(("spec.cooldown.maximum", "must not be below spec.cooldown.minimum"))
    windows = []
    for i, item in enumerate(spec.get("maintenanceWindows") or []):
        schedule = str((item or {}).get("schedule") or "")
        if not croniter.is_valid(schedule):
            problems.append((f"spec.maintenanceWindows[{i}].schedule", f"not a cron schedule: {schedule!r}"))  # fmt: skip
            continue
        seconds = _seconds(item, "duration", 0.0, problems)
        if seconds <= 0:
            problems.append((f"spec.maintenanceWindows[{i}].duration", "is required"))
            continue
        windows.append(Window(schedule, seconds))
    measurement = spec.get("measurement") or {}
    percentile = _int(measurement.get("percentile"), "spec.measurement.percentile", 95, problems)
    if not 1 <= percentile <= 100:
        problems.append(("spec.measurement.percentile", f"must be from 1 to 100, not {percentile}"))  # fmt: skip
    measured = Measurement(
        window=_seconds(spec, "measurement.window", DEFAULT_WINDOW, problems),
        percentile=percentile,
        step=_seconds(spec, "measurement.step", DEFAULT_STEP, problems),
        rate_interval=_seconds(spec, "measurement.rateInterval", DEFAULT_RATE_INTERVAL, problems),
    )
    if measured.step > measured.window:
        problems.append(("spec.measurement.step", "must not exceed spec.measurement.window"))
    interval = _seconds(spec, "interval", DEFAULT_INTERVAL, problems)
    if problems:
        raise InvalidPolicy(problems)
    exclude = spec.get("exclude") or {}
    return PolicySpec(
        name=name,
        automation=automation,
        settings=settings,
        limits_given=("perNode" in limits, "total" in limits),
        vm_selector=spec.get("vmSelector"),
        namespace_selector=spec.get("namespaceSelector"),
        exclude_vms=exclude.get("vmSelector"),
        exclude_namespaces=exclude.get("namespaceSelector"),
        cooldown_minimum=minimum,
        cooldown_maximum=maximum,
        windows=tuple(windows),
        interval=interval,
        measurement=measured,
        suspend=bool(spec.get("suspend")),
    )


def overlaps(
    specs: Iterable[PolicySpec],
    vms: Iterable[tuple[str, Mapping[str, str], Mapping[str, str]]],
) -> dict[str, list[str]]:
    """VM key -> the policies that select it, for the VMs more than one policy selects;
    ``vms`` are (key, VM labels, namespace labels)."""
    specs = list(specs)
    found: dict[str, list[str]] = {}
    for key, labels, ns_labels in vms:
        names = sorted(s.name for s in specs if s.selects(labels, ns_labels))
        if len(names) > 1:
            found[key] = names
    return found


def now_utc() -> datetime:
    return datetime.now(UTC)


__all__ = [
    "InvalidPolicy",
    "Measurement",
    "PolicySpec",
    "Window",
    "now_utc",
    "overlaps",
    "parse_policy",
]
