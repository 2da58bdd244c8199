"""The QEMU processes a test or benchmark left behind: found by the directory their command
line names (a guest's QEMU outlives the engine that started it, by design)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

__all__ = ["kill_qemus_under", "qemus_under"]


def qemus_under(root: Path) -> list[int]:
    """The pids of the QEMU processes whose command line names ``root``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and str(root).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def kill_qemus_under(root: Path) -> list[int]:
    """SIGKILLs those processes; their pids."""
    pids = qemus_under(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids
