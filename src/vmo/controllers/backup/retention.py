"""Which backups a retention policy keeps: keep-last, hourly, daily, weekly and monthly, with the
meaning Proxmox Backup Server and restic give them. Each rule walks the backups newest first and
keeps the newest backup of each period (hour, day, ISO week, month) until it has kept that many
periods; a backup is kept when any rule keeps it. Pure: times in, names out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

Period = Callable[[datetime], tuple[int, ...]]

PERIODS: dict[str, Period] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
}


@dataclass(frozen=True)
class Retention:
    keep_last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> Retention:
        """From a policy's ``retention`` (``keepLast``, ``hourly``, ...; unset means 0)."""
        spec = spec or {}
        return cls(
            keep_last=int(spec.get("keepLast") or 0),
            hourly=int(spec.get("hourly") or 0),
            daily=int(spec.get("daily") or 0),
            weekly=int(spec.get("weekly") or 0),
            monthly=int(spec.get("monthly") or 0),
        )

    @property
    def keeps_all(self) -> bool:
        """A policy with no rule at all prunes nothing (as PBS does)."""
        return not any((self.keep_last, self.hourly, self.daily, self.weekly, self.monthly))


def kept(backups: Sequence[tuple[str, datetime]], retention: Retention) -> dict[str, list[str]]:
    """Backup name -> the rules that keep it, for the kept ones; the others may be pruned."""
    if retention.keeps_all:
        return {name: ["no retention rule"] for name, _ in backups}
    newest_first = sorted(backups, key=lambda b: b[1], reverse=True)
    reasons: dict[str, list[str]] = {}
    for name, _ in newest_first[: retention.keep_last]:
        reasons.setdefault(name, []).append("keep-last")
    for rule, period in PERIODS.items():
        limit = getattr(retention, rule)
        seen: set[tuple[int, ...]] = set()
        for name, created in newest_first:
            if len(seen) >= limit:
                break
            key = period(created)
            if key not in seen:
                seen.add(key)
                reasons.setdefault(name, []).append(rule)
    return reasons


__all__ = ["Retention", "kept"]
