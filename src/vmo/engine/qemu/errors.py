"""Every exception the QEMU layer raises, in one tree.

QemuError                      base of everything below
├── UnsupportedSpec            a VMI field that cannot be mapped to QEMU (names the field)
├── QemuNotFound               the QEMU binary cannot be run at all
├── ProcessError               a QEMU process could not be launched, adopted or confined
│   ├── LaunchError            QEMU exited or never answered QMP while starting (carries stderr)
│   └── WorkdirEscape          a runtime path lies outside the VM's working directory
└── ProtocolError              QMP or guest-agent failures
    ├── QMPError               the server answered a command with an error (class, desc, command)
    ├── QMPTimeout             no answer within the command's timeout
    ├── QMPConnectionLost      the socket closed or could not be opened
    ├── QMPProtocolError       the peer sent something that is not the protocol
    └── StateError             an operation needs another client Runstate (current, required)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "LaunchError",
    "ProcessError",
    "ProtocolError",
    "QMPConnectionLost",
    "QMPError",
    "QMPProtocolError",
    "QMPTimeout",
    "QemuError",
    "QemuNotFound",
    "StateError",
    "UnsupportedSpec",
    "WorkdirEscape",
]


class QemuError(Exception):
    """Base of every error raised by ``vmo.engine.qemu``."""


class UnsupportedSpec(QemuError):
    """A VMI spec field that VMO's QEMU layer cannot realise."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class QemuNotFound(QemuError):
    """The QEMU executable is missing or does not run."""


class ProcessError(QemuError):
    """A QEMU process could not be launched, adopted or controlled."""


class LaunchError(ProcessError):
    """QEMU exited, or never answered on QMP, while starting."""

    def __init__(self, message: str, *, stderr_lines: Sequence[str] = ()) -> None:
        detail = "; ".join(stderr_lines)
        super().__init__(f"{message}: {detail}" if detail else message)
        self.stderr_lines = tuple(stderr_lines)


class WorkdirEscape(ProcessError):
    """A socket, pidfile or log path is not inside the VM's working directory."""


class ProtocolError(QemuError):
    """Base of QMP and guest-agent failures."""


class QMPError(ProtocolError):
    """The server answered a command with ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(
        self, error_class: str, desc: str, *, command: str, arguments: dict[str, Any] | None
    ) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc
        self.command = command
        self.arguments = arguments


class QMPTimeout(ProtocolError):
    """No answer to a command within its timeout."""

    def __init__(self, command: str, timeout: float) -> None:
        super().__init__(f"{command}: no answer within {timeout:g} s")
        self.command = command
        self.timeout = timeout


class QMPConnectionLost(ProtocolError):
    """The socket could not be opened, or closed while a command was waiting."""


class QMPProtocolError(ProtocolError):
    """The peer sent bytes that are not a QMP message, or an unexpected message."""

    def __init__(self, message: str, *, received: bytes | None = None) -> None:
        super().__init__(message if received is None else f"{message}: {received[:200]!r}")
        self.received = received


class StateError(ProtocolError):
    """The client is in the wrong Runstate for the operation."""

    def __init__(self, operation: str, *, current: str, required: str) -> None:
        super().__init__(f"{operation} needs runstate {required}, client is {current}")
        self.operation = operation
        self.current = current
        self.required = required
