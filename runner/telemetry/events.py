"""Events around the host loop, and the hooks that observe them.

Each step of a task's life is a small frozen dataclass; hooks (logging,
metrics, tracing, and any a user adds with ``[telemetry] hooks``) are called
with every event. Events flow one way: a hook cannot hand anything back to
the loop (the events are frozen, and what the loop needs, a new span's trace
context, it asks for with ``Hooks.span_context``). A hook that raises
is logged and ignored: telemetry never fails a task.

Every event has ``name`` (``"attempt_finished"``), the task's stable keys
(``task_id``, ``task_type``, ``worker``, ``attempt``, ``correlation_id``; None
for the host's own events), ``traceparent`` (the trace context it belongs
to) and ``data``: its own fields as a dict, for logs and user hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from runner.sidechannel import WorkerSpan

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something that happened to a task (or to the host, when ``task_id`` is None)."""

    name: ClassVar[str] = "event"
    task_id: str | None = None
    task_type: str | None = None
    worker: str | None = None
    attempt: int | None = None
    correlation_id: str | None = None
    traceparent: str | None = None  # the trace context the event belongs to (the attempt's, in one)

    @property
    def data(self) -> dict[str, Any]:
        """The event's own fields (beyond the task keys and the trace context)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _KEYS}


_KEYS = frozenset(f.name for f in fields(Event))


@dataclass(frozen=True)
class TaskKeys:
    """The keys every event of one task carries."""

    task_id: str
    task_type: str
    worker: str | None
    attempt: int
    correlation_id: str
    traceparent: str | None = None

    def asdict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -- a task's life, in the order a task meets them --------------------------------------


@dataclass(frozen=True, kw_only=True)
class TaskSubmitted(Event):
    """Stored through the API; ``traceparent`` is the submit span's, ``parent`` the caller's."""

    name: ClassVar[str] = "task_submitted"
    parent: str | None = None
    start_ns: int = 0
    end_ns: int = 0


@dataclass(frozen=True, kw_only=True)
class TaskReceived(Event):
    """Claimed from the source. ``traceparent`` is the context its attempts hang from; ``root``
    says the host made it (no context came with the task) from the task id."""

    name: ClassVar[str] = "task_received"
    root: bool = False
    claim_started_ns: int | None = None


@dataclass(frozen=True, kw_only=True)
class AttemptStarted(Event):
    """Its container is about to be created; ``traceparent`` is the attempt's, ``parent`` the task's."""

    name: ClassVar[str] = "attempt_started"
    image: str = ""
    limits: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    start_ns: int = 0


@dataclass(frozen=True, kw_only=True)
class ContainerCreated(Event):
    name: ClassVar[str] = "container_created"
    container_id: str = ""


@dataclass(frozen=True, kw_only=True)
class WorkerLog(Event):
    """One line of the worker's stderr."""

    name: ClassVar[str] = "worker_log"
    line: str = ""


@dataclass(frozen=True, kw_only=True)
class WorkerSpanReceived(Event):
    """A span the worker sent over the SDK's side channel."""

    name: ClassVar[str] = "worker_span"
    span: WorkerSpan | None = None


@dataclass(frozen=True, kw_only=True)
class TaskProgress(Event):
    """Progress the worker reported."""

    name: ClassVar[str] = "task_progress"
    percent: float = 0.0
    message: str | None = None


@dataclass(frozen=True, kw_only=True)
class AttemptFinished(Event):
    """The container ended (or could not run) and was classified; always follows AttemptStarted."""

    name: ClassVar[str] = "attempt_finished"
    outcome: str = "failed"  # completed, failed or timeout
    exit_code: int | None = None
    oom_killed: bool = False
    error: str | None = None
    duration: float = 0.0
    start_latency: float = 0.0
    container_id: str | None = None
    image_id: str | None = None
    stdin_bytes: int = 0
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    # (name, start, end) in nanoseconds since the epoch: create, start, exchange, teardown
    phases: tuple[tuple[str, int, int], ...] = ()
    side_channel: str | None = None  # what the side channel dropped, if anything
    cancelled: bool = False  # the host killed it (shutdown past the grace, or a lost lease)
    mode: str = "cold"  # its container: "cold" (made for it), "prewarm" (started ahead) or "reuse"
    parent: str | None = None
    start_ns: int = 0
    end_ns: int = 0


@dataclass(frozen=True, kw_only=True)
class ContainerRemoved(Event):
    name: ClassVar[str] = "container_removed"
    container_id: str = ""


@dataclass(frozen=True, kw_only=True)
class TaskCompleted(Event):
    name: ClassVar[str] = "task_completed"


@dataclass(frozen=True, kw_only=True)
class TaskRetrying(Event):
    """Failed; will be tried again after ``delay`` seconds."""

    name: ClassVar[str] = "task_retrying"
    delay: float = 0.0
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class TaskFailed(Event):
    """Failed for good (failed, timeout or dead)."""

    name: ClassVar[str] = "task_failed"
    outcome: str = "failed"
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class TaskReturned(Event):
    """Failed, reported to a source that retries by its own rules."""

    name: ClassVar[str] = "task_returned"
    outcome: str = "failed"
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class TaskReleased(Event):
    """Handed back unfinished (shutdown); the attempt does not count."""

    name: ClassVar[str] = "task_released"


@dataclass(frozen=True, kw_only=True)
class LeaseLost(Event):
    """The source gave the task to someone else meanwhile; this attempt's outcome is not reported."""

    name: ClassVar[str] = "lease_lost"
    error: str | None = None


# -- the host's own -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SourceDown(Event):
    name: ClassVar[str] = "source_down"
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class SourceUp(Event):
    name: ClassVar[str] = "source_up"


@dataclass(frozen=True, kw_only=True)
class EngineDown(Event):
    name: ClassVar[str] = "engine_down"
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class EngineUp(Event):
    name: ClassVar[str] = "engine_up"


# The names, for hooks that switch on them.
TASK_SUBMITTED = TaskSubmitted.name
TASK_RECEIVED = TaskReceived.name
ATTEMPT_STARTED = AttemptStarted.name
CONTAINER_CREATED = ContainerCreated.name
WORKER_LOG = WorkerLog.name
WORKER_SPAN = WorkerSpanReceived.name
TASK_PROGRESS = TaskProgress.name
ATTEMPT_FINISHED = AttemptFinished.name
CONTAINER_REMOVED = ContainerRemoved.name
TASK_COMPLETED = TaskCompleted.name
TASK_RETRYING = TaskRetrying.name
TASK_FAILED = TaskFailed.name
TASK_RETURNED = TaskReturned.name
TASK_RELEASED = TaskReleased.name
LEASE_LOST = LeaseLost.name
SOURCE_DOWN = SourceDown.name
SOURCE_UP = SourceUp.name
ENGINE_DOWN = EngineDown.name
ENGINE_UP = EngineUp.name


Hook = Callable[[Event], None]


class Hooks:
    """Calls every hook for every event; a failing hook is logged (one line each time), never raised.

    ``contexts``, when something traces, gives the trace context of a new span
    under a parent (``Tracing.span_context``): the loop asks for it explicitly,
    before the span's event, and hands it to the container or stores it.
    """

    def __init__(self, hooks: Iterable[Hook] = (), contexts: Callable[[str | None], str | None] | None = None) -> None:
        self._hooks = list(hooks)
        self._contexts = contexts

    def span_context(self, parent: str | None) -> str | None:
        """A new span's trace context under ``parent``, or None when nothing traces (keep the parent's)."""
        return self._contexts(parent) if self._contexts is not None else None

    def add(self, hook: Hook) -> None:
        self._hooks.append(hook)

    def emit(self, event: Event) -> None:
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                log.exception("hook %r failed on %s (task %s); ignored", hook, event.name, event.task_id)


_WARNINGS = {TASK_FAILED, TASK_RETURNED, TASK_RETRYING, LEASE_LOST, SOURCE_DOWN, ENGINE_DOWN}
_QUIET = {WORKER_SPAN, CONTAINER_CREATED, CONTAINER_REMOVED, TASK_SUBMITTED}
_NOT_LOGGED = ("phases", "span", "parent", "start_ns", "end_ns", "claim_started_ns")
_events_log = logging.getLogger("workerhost.events")


def log_hook(event: Event) -> None:
    """Log each event as one line with the task's stable keys (see ``runner.telemetry.logs``)."""
    if event.name in _QUIET:
        return
    trace_id = span_id = None
    if event.traceparent:
        parts = event.traceparent.split("-")
        if len(parts) == 4:
            trace_id, span_id = parts[1], parts[2]
    fields_: dict[str, Any] = {
        "event": event.name,
        "task_id": event.task_id,
        "type": event.task_type,
        "correlation_id": event.correlation_id,
        "trace_id": trace_id,
        "span_id": span_id,
        "worker": event.worker,
        "attempt": event.attempt,
    }
    data = event.data
    fields_.update({k: v for k, v in data.items() if k not in _NOT_LOGGED})
    level = logging.WARNING if event.name in _WARNINGS or data.get("side_channel") else logging.INFO
    _events_log.log(level, event.name, extra={"fields": fields_})
