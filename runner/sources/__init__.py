"""Task sources: where tasks come from and where their outcomes go, behind one narrow port.

The host loop knows only ``TaskSource``; each backend is a thin adapter in this
folder (``embedded.py``, ``http.py``) that translates its driver's errors into
``SourceUnavailable`` (try the source again later) and ``LeaseLost`` (the task
is no longer ours). The port fits a queue with leases (SQLite), an HTTP API
with claims, and message brokers with ack/nack and redelivery.

The host claims with ``claim_many``: as many tasks as it has room for, in one round trip where the
backend can (the embedded queue and Redis do; the default takes one with ``claim``).

A source says what it can do in ``capabilities`` instead of the host probing
for methods: whether and how often it renews a claim, whether it owns retries,
whether it takes progress, whether a task can be handed back, whether it keeps
a registry of the processes that hold its tasks. What a source cannot do, its
method does nothing (the base class's default), and the host does not call it.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from runner.errors import WorkerhostError
from runner.protocol import Outcome


def iso_time(moment: float | None) -> str | None:
    """A moment (seconds since the epoch) as the API shows times: ``2026-11-30T10:00:00.123Z``."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SourceUnavailable(WorkerhostError):
    """The source cannot be reached or answered with a fault; retry it with backoff.

    ``retry_after``, when the source said how long to wait (HTTP 429 and its Retry-After),
    is the least the host waits before it calls again.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LeaseLost(WorkerhostError):
    """The task is no longer this host's (its lease expired and it moved on)."""


class NotKept(WorkerhostError):
    """The source does not keep what was asked for (a broker that only carries tasks): the API
    answers 501 with this message, which says where the answer is instead."""


class KeyConflict(WorkerhostError):
    """A batch was not stored: idempotency keys in it name tasks with other content. ``conflicts``
    holds (the item's index, what its key names: ``"task {id}"`` or ``"[i] of this batch"``)."""

    def __init__(self, conflicts: list[tuple[int, str]]) -> None:
        super().__init__(f"{len(conflicts)} idempotency keys name other content")
        self.conflicts = conflicts


@dataclass(frozen=True)
class NewTask:
    """One task of a batch to submit (``TaskStore.submit_many``), with what ``submit`` takes."""

    type: str
    params: dict[str, Any]
    max_attempts: int
    priority: int = 0
    idempotency_key: str | None = None
    correlation_id: str | None = None
    traceparent: str | None = None
    task_id: str | None = None


class TaskStore(Protocol):
    """What the HTTP API needs of a source: the embedded queue and Redis keep tasks and answer all
    of it; a source that only carries tasks (AMQP, ``keeps_tasks`` False) submits one at a time and
    raises ``NotKept`` for the rest.

    Calls are synchronous and short; the API runs them in a thread. ``SourceUnavailable`` is a 503.
    """

    keeps_tasks: bool  # whether get, page, statuses... answer (False: they raise NotKept)

    def submit(
        self, task_type: str, params: dict[str, Any], max_attempts: int, priority: int = 0,
        idempotency_key: str | None = None, correlation_id: str | None = None, traceparent: str | None = None,
        task_id: str | None = None,
    ) -> tuple[dict[str, Any], bool]:  # fmt: skip
        """Store (or publish) a task; returns it as the API shows it, and whether it is new."""
        ...

    def submit_many(self, tasks: Sequence[NewTask]) -> list[tuple[dict[str, Any], bool]]:
        """Store every task in one transaction, or none: each as ``submit`` returns it, in order.
        An idempotency key follows ``submit``'s rule, within the batch too; one that names other
        content (another type, or params that are other JSON text) raises ``KeyConflict``."""
        ...

    def get(self, task_id: str) -> dict[str, Any] | None: ...

    def statuses(self, task_ids: Sequence[str]) -> dict[str, str]:
        """The status of each of these tasks that exists, in one call (what ``?wait`` polls)."""
        ...

    def page(
        self, status: str | None, task_type: str | None, limit: int, full: bool = False, budget: int | None = None,
        q: str | None = None, offset: int = 0,
    ) -> tuple[list[dict[str, Any]], bool]:  # fmt: skip
        """Tasks, newest first, past the first ``offset``; ``q``: only the task with this id or correlation id."""
        ...

    def retry(self, task_id: str, max_attempts: int | None = None) -> dict[str, Any] | None: ...

    def delete(self, task_id: str) -> tuple[bool, str | None]: ...

    def counts(self) -> dict[str, int]: ...

    def finished_per_minute(self, since: float) -> dict[tuple[int, str], int]:
        """Tasks that ended since ``since`` (seconds since the epoch), counted by the minute they ended in
        (seconds since the epoch, a multiple of 60) and their status (completed, failed or dead)."""
        ...

    def attempts(self, task_id: str) -> list[dict[str, Any]]:
        """The task's attempt records, oldest first (``record_attempt``'s, as stored)."""
        ...

    def record_attempt(self, task_id: str, record: dict[str, Any]) -> None:
        """Keep one attempt's record (a JSON object: outcome, times, phases, the worker's spans)."""
        ...


@dataclass(frozen=True)
class Capabilities:
    """What a source can do; the host acts on these, never on the source's type."""

    # Seconds between lease renewals while a container runs; None: claims cannot be
    # renewed (they expire on the source's own clock), so the host never calls renew().
    renew_every: float | None = None
    # The source re-queues a failed task by its own rules (PrismQ's TaskManager):
    # the host reports every failure with retry_in=None and does not retry itself.
    owns_retries: bool = False
    # progress() forwards a worker's progress to the source.
    progress: bool = False
    # heartbeat(), owners(), held() and recover(): the source keeps a registry of the
    # processes that hold its tasks, so that a sibling can tell a dead one from a live
    # one and hand a dead one's tasks back at once (otherwise their claims just expire).
    registry: bool = False
    # Whether a claim says how many attempts the task may have (ClaimedTask.max_attempts),
    # so that the host knows the final attempt even where the source owns retries.
    knows_final_attempt: bool = False
    # Seconds after its claim that a task's report is still accepted, for a source whose claims
    # cannot be renewed (PrismQ's claim timeout): the host keeps trying a report until then.
    claim_timeout: float | None = None


@dataclass(frozen=True)
class ClaimedTask:
    """A task this host holds, as the source handed it over."""

    id: str
    type: str
    params: dict[str, Any]
    attempt: int  # this attempt's number, 1 for the first
    correlation_id: str | None = None
    traceparent: str | None = None
    # The most attempts the task may have, as the source records it (the embedded queue
    # keeps it with the task; None: the worker's max_retries + 1 decides).
    max_attempts: int | None = None
    # Whatever the backend needs to settle the task (a lease token, a delivery tag).
    receipt: Any = field(default=None, compare=False)
    claimed_at: float = field(default_factory=time.monotonic, compare=False)  # when it was claimed (monotonic)


@dataclass(frozen=True)
class Slots:
    """Room for tasks: ``free`` more of ``task_types`` (one worker's types and free slots)."""

    task_types: tuple[str, ...]
    free: int


@dataclass(frozen=True)
class Finished:
    """One attempt's end, as the host reports it to the source."""

    outcome: Outcome
    worker: str
    image_id: str | None = None
    stderr_tail: str = ""
    duration: float = 0.0


@dataclass(frozen=True)
class Owner:
    """A process in a source's registry, as its last heartbeat left it."""

    token: str
    host_id: str
    expired: bool  # its heartbeat is older than the time it promised the next one by


@dataclass(frozen=True)
class HeldTask:
    """A running task and the process that holds it."""

    task_id: str
    owner: str
    attempt: int


class TaskSource:
    """The port between the host loop and a backend.

    ``claim``, ``complete``, ``fail``, ``health`` and ``close`` are required;
    ``claim_many`` takes one with ``claim`` unless the backend can take several
    at once; the rest are optional capabilities (see ``Capabilities``) whose
    defaults do nothing.
    """

    capabilities = Capabilities()
    heartbeat_every: float = 10.0  # with a registry: how often the host calls heartbeat()

    async def start(self) -> None:
        """Prepare before the first claim (resolve ids, register); raise SourceUnavailable to be retried."""

    async def claim(self, task_types: Collection[str]) -> ClaimedTask | None:
        """Take one task of these types, or None when none is ready."""
        raise NotImplementedError

    async def claim_many(self, slots: Sequence[Slots], limit: int) -> list[ClaimedTask]:
        """Take up to ``limit`` ready tasks in all, and at most ``free`` of each ``Slots``' types, in
        the source's order (the host asks with each worker's free slots and its own). A backend
        that can take several in one round trip does; this default takes one with ``claim``."""
        types = [t for room in slots if room.free > 0 for t in room.task_types]
        if limit < 1 or not types:
            return []
        task = await self.claim(types)
        return [] if task is None else [task]

    async def renew(self, task: ClaimedTask) -> None:
        """Extend the task's lease while its container runs; raise LeaseLost if it moved on."""

    async def complete(self, task: ClaimedTask, finished: Finished) -> None:
        """The task completed; record its result."""
        raise NotImplementedError

    async def fail(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        """The attempt failed: try again after ``retry_in`` seconds, or, when None, this is final."""
        raise NotImplementedError

    async def progress(self, task: ClaimedTask, percent: float, message: str | None) -> None:
        """Tell the source how far the task got (0..100)."""

    async def release(self, task: ClaimedTask) -> None:
        """Hand the task back unfinished (shutdown); the attempt does not count."""

    async def recover(self, held: HeldTask) -> None:
        """Hand back a task that a dead process left running; the attempt counts."""

    async def heartbeat(self, owner: str, host_id: str) -> None:
        """Say that ``owner`` (this process) is alive, and will say so again within the source's
        ``heartbeat_ttl``; past that, its siblings take it for dead."""

    async def forget(self, owner: str) -> None:
        """``owner`` stops cleanly: remove it from the registry."""

    async def owners(self) -> list[Owner]:
        """Every process in the registry."""
        return []

    async def held(self) -> list[HeldTask]:
        """Every task held (running) now, with its holder."""
        return []

    async def prune(self) -> int:
        """Drop finished tasks older than the source's retention; how many (a source that keeps none: 0)."""
        return 0

    async def health(self) -> dict[str, Any]:
        """What the source says of itself; raise SourceUnavailable when it does not answer."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""
