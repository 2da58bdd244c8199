"""Status helpers: timestamps, conditions that keep their transition time, observedGeneration.

A condition's ``lastTransitionTime`` is when its ``status`` last changed, not when its reason
or message did (Kubernetes API conventions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

JSON = dict[str, Any]

_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def timestamp(when: datetime | None = None) -> str:
    """An RFC 3339 ``metav1.Time`` in UTC, to the second."""
    return (when or datetime.now(UTC)).astimezone(UTC).strftime(_FORMAT)


def micro_timestamp(when: datetime | None = None) -> str:
    """An RFC 3339 ``metav1.MicroTime`` (Lease renewTime) in UTC, to the microsecond."""
    return (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def condition(ctype: str, status: bool | str, reason: str = "", message: str = "") -> JSON:
    """A condition without timestamps (``set_condition`` adds them)."""
    text = status if isinstance(status, str) else ("True" if status else "False")
    return {"type": ctype, "status": text, "reason": reason, "message": message}


def find_condition(conditions: Sequence[Mapping[str, Any]] | None, ctype: str) -> JSON | None:
    return next((dict(c) for c in conditions or [] if c.get("type") == ctype), None)


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None, cond: Mapping[str, Any], now: str
) -> list[JSON]:
    """``conditions`` with ``cond`` in place of the one of its type (appended if new).

    ``lastTransitionTime`` is kept from the old condition while the status is unchanged.
    """
    old = find_condition(conditions, str(cond["type"]))
    stamp = now
    if old is not None and old.get("status") == cond.get("status"):
        stamp = str(old.get("lastTransitionTime") or now)
    new = {**cond, "lastTransitionTime": stamp}
    if old is None:
        return [*(dict(c) for c in conditions or []), new]
    return [new if c.get("type") == cond["type"] else dict(c) for c in conditions or []]


def merge_conditions(
    old: Sequence[Mapping[str, Any]] | None,
    new: Sequence[Mapping[str, Any]],
    now: str,
    *,
    keep_others: bool = False,
) -> list[JSON]:
    """Every condition of ``new``, each keeping its old transition time while its status is
    unchanged; old conditions of other types are dropped unless ``keep_others``."""
    merged = [dict(c) for c in old or []] if keep_others else []
    for cond in new:
        before = find_condition(old, str(cond["type"]))
        fresh = set_condition([before] if before else [], cond, now)[0]
        merged = [c for c in merged if c.get("type") != cond["type"]] + [fresh]
    if keep_others:  # keep the old order for the types that were there
        order = {str(c.get("type")): i for i, c in enumerate(old or [])}
        merged.sort(key=lambda c: order.get(str(c.get("type")), len(order)))
    return merged


def observed_generation(obj: Mapping[str, Any]) -> int:
    """The generation a status written now reports as observed."""
    return int((obj.get("metadata") or {}).get("generation") or 0)
