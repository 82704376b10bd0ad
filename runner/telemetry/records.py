"""Attempt records: what the host saw of each attempt, kept with the task for the dashboard.

A hook on the host's events. It gathers an attempt's worker spans (from the SDK's side channel)
and, when the attempt finishes, stores one record through the ``TaskStore``: its outcome, exit
code, image, container phases and those spans, so that a task's trace can be drawn where no
Jaeger runs. The write runs in a thread, off the event loop; a failure there is logged, never
raised: a record is telemetry and cannot fail a task. It also keeps each running task's latest
progress, in memory, for ``GET /tasks/{id}``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

from runner import jsondata
from runner.sidechannel import WorkerSpan
from runner.sources import TaskStore
from runner.telemetry import events
from runner.telemetry.events import Event

log = logging.getLogger(__name__)

MAX_SPANS = 200  # worker spans kept per attempt (the first)
_MAX_OPEN = 10_000  # attempts gathered at once; past this the oldest are forgotten
_MAX_TEXT = 4096


class AttemptRecords:
    """The hook: gathers each running attempt's worker spans and progress, stores a record at its end."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self._spans: OrderedDict[str, list[WorkerSpan]] = OrderedDict()  # task id -> its running attempt's
        self._progress: OrderedDict[str, dict[str, Any]] = OrderedDict()  # task id -> its latest progress
        self._writes: set[asyncio.Future[None] | Future[None]] = set()

    def __call__(self, event: Event) -> None:
        task_id = event.task_id
        if task_id is None:
            return
        match event:
            case events.AttemptStarted():
                _remember(self._spans, task_id, [])
                self._progress.pop(task_id, None)
            case events.WorkerSpanReceived(span=span) if span is not None:
                spans = self._spans.get(task_id)
                if spans is None:  # its start was missed (or forgotten): gather from here
                    spans = _remember(self._spans, task_id, [])
                if len(spans) < MAX_SPANS:
                    spans.append(span)
            case events.TaskProgress():
                _remember(self._progress, task_id, {"percent": event.percent, "message": event.message})
            case events.AttemptFinished():
                self._progress.pop(task_id, None)
                self._store(task_id, record(event, self._spans.pop(task_id, [])))
            case events.TaskReleased() | events.LeaseLost():
                self._spans.pop(task_id, None)
                self._progress.pop(task_id, None)

    def progress(self, task_id: str) -> dict[str, Any] | None:
        """The latest progress of the task's running attempt, as its worker reported it (None: none yet)."""
        found = self._progress.get(task_id)
        return dict(found) if found is not None else None

    def _store(self, task_id: str, kept: dict[str, Any]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the host's loop (a test emitting from its thread)
            self._write(task_id, kept)
            return
        write = loop.run_in_executor(None, self._write, task_id, kept)
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    def _write(self, task_id: str, kept: dict[str, Any]) -> None:
        try:
            self.store.record_attempt(task_id, kept)
        except Exception as exc:
            log.warning("task %s: its attempt record was not stored: %s: %s", task_id, type(exc).__name__, exc)


def record(event: events.AttemptFinished, spans: list[WorkerSpan]) -> dict[str, Any]:
    """One attempt's record, as ``GET /tasks/{id}`` shows it: times in seconds since the epoch, and
    only what reads back as JSON (a worker's text cleaned, numbers finite)."""
    start = event.start_ns / 1e9 if event.start_ns else None
    end = event.end_ns / 1e9 if event.end_ns else None
    kept = {
        "attempt": event.attempt,
        "outcome": event.outcome,
        "exit_code": event.exit_code,
        "duration": event.duration,
        "image_id": event.image_id,
        "oom_killed": event.oom_killed,
        "mode": event.mode,
        "error": event.error,
        "start": start,
        "end": end,
        "phases": [{"name": name, "start": s / 1e9, "end": e / 1e9} for name, s, e in event.phases],
        "spans": [_span(span) for span in spans],
    }
    cleaned: dict[str, Any] = _clean(kept)
    return cleaned


def _span(span: WorkerSpan) -> dict[str, Any]:
    return {
        "name": span.name,
        "span_id": f"{span.span_id:016x}",
        "parent_id": f"{span.parent_id:016x}" if span.parent_id else None,
        "start": span.start,
        "end": span.end,
        "attrs": dict(span.attributes),
        "error": span.error,
    }


def _clean(value: Any) -> Any:
    """What a worker wrote, made to read back as JSON: text without lone surrogates and bounded,
    NaN and infinities as null."""
    if isinstance(value, dict):
        return {jsondata.clean_text(str(k), 256): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str):
        return jsondata.clean_text(value, _MAX_TEXT)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _remember(kept: OrderedDict[str, Any], key: str, value: Any) -> Any:
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > _MAX_OPEN:
        kept.popitem(last=False)
    return value
