"""Small readers of VM and VMI objects shared by the VM controller's pieces."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

JSON = dict[str, Any]

FINAL_PHASES = ("Succeeded", "Failed")
STARTING_PHASES = ("", "Pending", "Scheduling", "Scheduled")


def run_strategy(vm: JSON) -> str:
    """``spec.runStrategy``, or what the deprecated ``spec.running`` means; Halted when neither."""
    spec = vm.get("spec") or {}
    if spec.get("runStrategy"):
        return str(spec["runStrategy"])
    return "Always" if spec.get("running") else "Halted"


def phase(vmi: JSON | None) -> str:
    return str((vmi or {}).get("status", {}).get("phase") or "")


def is_final(vmi: JSON | None) -> bool:
    return phase(vmi) in FINAL_PHASES


def deleting(obj: JSON | None) -> bool:
    return bool((obj or {}).get("metadata", {}).get("deletionTimestamp"))


def condition(obj: JSON | None, ctype: str) -> JSON | None:
    for cond in (obj or {}).get("status", {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return dict(cond)
    return None


def has_condition(obj: JSON | None, ctype: str, status: str = "True", reason: str = "") -> bool:
    cond = condition(obj, ctype)
    return (
        cond is not None
        and cond.get("status") == status
        and (not reason or cond.get("reason") == reason)
    )


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def state_change_requests(status: JSON) -> list[JSON]:
    return list(status.get("stateChangeRequests") or [])


def has_start_request(status: JSON) -> bool:
    requests = state_change_requests(status)
    return bool(requests) and requests[0].get("action") == "Start"


def has_start_paused_request(status: JSON) -> bool:
    requests = state_change_requests(status)
    return has_start_request(status) and (requests[0].get("data") or {}).get("paused") == "true"


def has_stop_request_for(status: JSON, vmi: JSON | None) -> bool:
    requests = state_change_requests(status)
    if vmi is None or not requests or requests[0].get("action") != "Stop":
        return False
    return bool(requests[0].get("uid") == vmi["metadata"].get("uid"))
