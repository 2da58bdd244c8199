"""``metav1.LabelSelector`` matching, as apimachinery's ``LabelSelectorAsSelector`` decides, for
the controllers and the CLI (the API server has its own, for ``?labelSelector=`` strings)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JSON = dict[str, Any]


def requirement_matches(labels: Mapping[str, str], expr: Mapping[str, Any]) -> bool:
    key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
    present = key in labels
    if op == "In":
        return present and labels[str(key)] in values
    if op == "NotIn":
        return not present or labels[str(key)] not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    return False  # an operator apimachinery does not know selects nothing


def selector_matches(labels: Mapping[str, str], selector: Mapping[str, Any] | None) -> bool:
    """Whether ``labels`` satisfy ``selector``: an empty selector selects everything, a missing
    one (None) nothing."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(requirement_matches(labels, e) for e in selector.get("matchExpressions") or [])


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


__all__ = ["labels_of", "requirement_matches", "selector_matches"]
