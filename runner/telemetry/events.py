"""Events around the host loop, and the hooks that observe them.

The host emits an ``Event`` at each step of a task's life; hooks (logging,
metrics, later tracing, and any a user adds) observe them. A hook that raises
is logged and ignored: telemetry never fails a task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# The events, in the order a task meets them.
TASK_SUBMITTED = "task_submitted"  # through the API; data["carrier"] holds (and gets) its trace context
TASK_RECEIVED = "task_received"  # claimed from the source
ATTEMPT_STARTED = "attempt_started"  # its container is about to be created
CONTAINER_CREATED = "container_created"
WORKER_LOG = "worker_log"  # one line of the worker's stderr
WORKER_SPAN = "worker_span"  # a span the worker sent over the SDK's side channel
TASK_PROGRESS = "task_progress"  # progress the worker reported
ATTEMPT_FINISHED = "attempt_finished"  # the container ended and was classified
CONTAINER_REMOVED = "container_removed"
TASK_COMPLETED = "task_completed"
TASK_RETRYING = "task_retrying"  # failed, will be tried again after data["delay"]
TASK_FAILED = "task_failed"  # failed for good (failed, timeout or dead)
TASK_RETURNED = "task_returned"  # failed, reported to a source that retries by its own rules
TASK_RELEASED = "task_released"  # handed back unfinished (shutdown)
LEASE_LOST = "lease_lost"  # the source gave the task to someone else meanwhile
SOURCE_DOWN = "source_down"
SOURCE_UP = "source_up"
ENGINE_DOWN = "engine_down"
ENGINE_UP = "engine_up"


@dataclass(frozen=True)
class Event:
    """Something that happened to a task (or to the host, when ``task_id`` is None)."""

    name: str
    task_id: str | None = None
    task_type: str | None = None
    worker: str | None = None
    attempt: int | None = None
    correlation_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    traceparent: str | None = None  # the trace context the event belongs to (the attempt's, in one)


Hook = Callable[[Event], None]


class Hooks:
    """Calls every hook for every event; a failing hook is logged, never raised."""

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self._hooks = list(hooks)

    def add(self, hook: Hook) -> None:
        self._hooks.append(hook)

    def emit(self, event: Event) -> None:
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                log.exception("hook %r failed on %s; ignored", hook, event.name)


_WARNINGS = {TASK_FAILED, TASK_RETURNED, TASK_RETRYING, LEASE_LOST, SOURCE_DOWN, ENGINE_DOWN}
_QUIET = {WORKER_SPAN, CONTAINER_CREATED, CONTAINER_REMOVED, TASK_SUBMITTED}
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
    fields: dict[str, Any] = {
        "event": event.name,
        "task_id": event.task_id,
        "type": event.task_type,
        "correlation_id": event.correlation_id,
        "trace_id": trace_id,
        "span_id": span_id,
        "worker": event.worker,
        "attempt": event.attempt,
    }
    fields.update({k: v for k, v in event.data.items() if k not in ("carrier", "phases", "span")})
    level = logging.WARNING if event.name in _WARNINGS or event.data.get("side_channel") else logging.INFO
    _events_log.log(level, event.name, extra={"fields": fields})
