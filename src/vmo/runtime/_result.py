"""What a reconcile returns or raises, and so what the work queue does next.

```
Exception
 └── ReconcileError          a reconcile failed in a way it understands
      ├── TemporaryError     retried: after ``delay`` if given, else with per-key backoff
      └── PermanentError     not retried until an event brings the key back
```
Any other exception is a bug or an outage: it is logged and retried with per-key backoff.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    """A successful pass; ``requeue_after`` asks for another pass after that many seconds."""

    requeue_after: float | None = None

    @classmethod
    def after(cls, seconds: float) -> Result:
        return cls(requeue_after=max(seconds, 0.0))


DONE = Result()


class ReconcileError(Exception):
    """A failure the reconcile understood; subclasses say whether to retry."""


class TemporaryError(ReconcileError):
    """Worth retrying: after ``delay`` seconds, or with the queue's backoff when ``delay`` is None."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(ReconcileError):
    """Retrying cannot help (bad spec, missing prerequisite the user must add); the key waits for
    its next event."""
