"""Go ``time.Duration`` strings (``1h30m``, ``90s``, ``1.5h``), as KubeVirt fields carry them
(export ``ttlDuration``, snapshot ``failureDeadline``). Written by hand: no maintained Python
library parses Go's exact grammar (units ns..h, fractions, a sign, bare ``0``)."""

from __future__ import annotations

import datetime as dt
import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> dt.timedelta:
    """A Go ``time.Duration`` string as a timedelta; ValueError names what is wrong."""
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body.lstrip("+-")
    if body == "0":
        return dt.timedelta(0)
    pos, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(body):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(body) or not body:
        raise ValueError(f"invalid duration {text!r}: expected e.g. 2h, 90m or 1h30m")
    return dt.timedelta(seconds=sign * seconds)
