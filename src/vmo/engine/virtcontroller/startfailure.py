"""KubeVirt's crash-loop backoff for VMs whose VMIs keep failing before they ever run.

``status.startFailure`` counts consecutive early failures; the next start waits
10 s x failures^2 (plus up to half again at random), at most 5 minutes.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from vmo.engine.virtcontroller.vmstate import JSON, format_time, is_final, parse_time, phase

MAX_START_BACKOFF_SECONDS = 300
MIN_START_BACKOFF_INTERVAL = 10
# Strategies that restart a VMI by themselves, and so back off when it keeps failing to start.
RESTARTING_STRATEGIES = ("Always", "RerunOnFailure", "Once")


def start_backoff_seconds(
    fail_count: int, *, max_delay: int = MAX_START_BACKOFF_SECONDS, jitter: float = 0.0
) -> int:
    """Seconds to wait before starting again after ``fail_count`` early failures.

    ``jitter`` in [0, 1) picks the random extra (up to half the delay) that keeps many failing VMs
    from restarting in step; 0 gives the floor.
    """
    count = max(fail_count, 1)
    interval = max(max_delay // 30, MIN_START_BACKOFF_INTERVAL)
    delay = interval * count * count
    delay += int(jitter * (delay // 2 + 1))
    return min(delay, max_delay)


def was_running(vmi: JSON | None) -> bool:
    """Whether the VMI ever reached phase Running (from its phase transition timestamps)."""
    transitions = (vmi or {}).get("status", {}).get("phaseTransitionTimestamps") or []
    return phase(vmi) == "Running" or any(t.get("phase") == "Running" for t in transitions)


def failed_early(vmi: JSON | None) -> bool:
    """A final VMI that never ran: a start failure."""
    return vmi is not None and is_final(vmi) and not was_running(vmi)


def sync_start_failure(
    status: JSON, vmi: JSON | None, strategy: str, now: datetime, jitter: float
) -> None:
    """Counts VMIs that end before running; clears the count once one runs."""
    if was_running(vmi) or strategy not in RESTARTING_STRATEGIES:
        status.pop("startFailure", None)
        return
    if vmi is None or not failed_early(vmi):
        return
    previous = status.get("startFailure") or {}
    uid = vmi["metadata"].get("uid", "")
    if previous.get("lastFailedVMIUID") == uid:
        return  # this failure is already counted
    count = int(previous.get("consecutiveFailCount") or 0) + 1
    delay = start_backoff_seconds(count, jitter=jitter)
    status["startFailure"] = {
        "consecutiveFailCount": count,
        "lastFailedVMIUID": uid,
        "retryAfterTimestamp": format_time(now + timedelta(seconds=delay)),
    }


def backoff_left(status: JSON, now: datetime) -> float:
    """Seconds until the next start is allowed (0 when it is)."""
    retry = (status.get("startFailure") or {}).get("retryAfterTimestamp")
    if not retry:
        return 0.0
    return max((parse_time(str(retry)) - now).total_seconds(), 0.0)
