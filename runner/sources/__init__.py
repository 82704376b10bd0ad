"""Task sources: where tasks come from and where their outcomes go, behind one narrow port.

The host loop knows only ``TaskSource``; each backend is a thin adapter in this
folder (``embedded.py``, ``http.py``) that translates its driver's errors into
``SourceUnavailable`` (try the source again later) and ``LeaseLost`` (the task
is no longer ours). The port fits a queue with leases (SQLite), an HTTP API
with claims, and message brokers with ack/nack and redelivery.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.errors import WorkerhostError
from runner.protocol import Outcome


class SourceUnavailable(WorkerhostError):
    """The source cannot be reached or answered with a fault; retry it with backoff."""


class LeaseLost(WorkerhostError):
    """The task is no longer this host's (its lease expired and it moved on)."""


@dataclass(frozen=True)
class ClaimedTask:
    """A task this host holds, as the source handed it over."""

    id: str
    type: str
    params: dict[str, Any]
    attempt: int  # this attempt's number, 1 for the first
    correlation_id: str | None = None
    traceparent: str | None = None
    # Whatever the backend needs to settle the task (a lease token, a delivery tag).
    receipt: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class Finished:
    """One attempt's end, as the host reports it to the source."""

    outcome: Outcome
    worker: str
    image_id: str | None = None
    stderr_tail: str = ""
    duration: float = 0.0


class TaskSource(Protocol):
    """The port between the host loop and a backend."""

    # True when the backend re-queues a failed task by its own rules (PrismQ's
    # TaskManager): the host then reports every failure as final and leaves
    # retries to it, so that they do not multiply.
    retries_by_source: bool

    async def claim(self, task_types: Collection[str]) -> ClaimedTask | None:
        """Take one task of these types, or None when none is ready."""
        ...

    async def renew(self, task: ClaimedTask) -> None:
        """Extend the task's lease while its container runs; raise LeaseLost if it moved on."""
        ...

    async def complete(self, task: ClaimedTask, finished: Finished) -> None:
        """The task completed; record its result."""
        ...

    async def fail(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        """The attempt failed: try again after ``retry_in`` seconds, or, when None, this is final."""
        ...

    async def release(self, task: ClaimedTask) -> None:
        """Hand the task back unfinished (shutdown); the attempt does not count."""
        ...

    async def recover(self, task_id: str, owner: str) -> None:
        """Hand back a task that a dead instance of this host (``owner``) left running."""
        ...

    async def health(self) -> dict[str, Any]:
        """What the source says of itself; raise SourceUnavailable when it does not answer."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
