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
TASK_RECEIVED = "task_received"  # claimed from the source
ATTEMPT_STARTED = "attempt_started"  # its container is about to be created
ATTEMPT_FINISHED = "attempt_finished"  # the container ended and was classified
TASK_COMPLETED = "task_completed"
TASK_RETRYING = "task_retrying"  # failed, will be tried again after data["delay"]
TASK_FAILED = "task_failed"  # failed for good (failed, timeout or dead)
TASK_RETURNED = "task_returned"  # failed, reported to a source that retries by its own rules
TASK_RELEASED = "task_released"  # handed back unfinished (shutdown)
LEASE_LOST = "lease_lost"  # the source gave the task to someone else meanwhile
SOURCE_DOWN = "source_down"
SOURCE_UP = "source_up"


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


def log_hook(event: Event) -> None:
    """Log each event with the task's keys."""
    if event.task_id is None:
        log.log(logging.WARNING if event.name == SOURCE_DOWN else logging.INFO, "%s %s", event.name, event.data)
        return
    level = logging.WARNING if event.name in (TASK_FAILED, TASK_RETURNED, LEASE_LOST, TASK_RETRYING) else logging.INFO
    detail = " ".join(f"{k}={v}" for k, v in event.data.items() if k not in ("result",))
    log.log(
        level,
        "%s task=%s type=%s worker=%s attempt=%s correlation_id=%s %s",
        event.name, event.task_id, event.task_type, event.worker, event.attempt, event.correlation_id, detail,
    )  # fmt: skip
