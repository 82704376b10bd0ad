"""One task, attempt after attempt, each in a fresh container, until its outcome is final."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from runner.config import WorkerConfig
from runner.docker import RunResult
from runner.protocol import Envelope, ErrorInfo, Outcome, Status
from runner.retries import RetryPolicy
from runner.sources import ClaimedTask, Finished, TaskSource
from runner.task import Runner, Services, TaskRun
from runner.telemetry.events import Hooks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """A task's final word: what users see from ``workerhost run``."""

    task: Envelope
    outcome: Outcome
    attempts: int
    last_run: RunResult | None = None

    @property
    def exit_code(self) -> int:
        """0 completed, 1 failed after retries, 2 failed permanently, 3 timeout."""
        if self.outcome.status is Status.COMPLETED:
            return 0
        if self.outcome.status is Status.TIMEOUT:
            return 3
        return 1 if self.outcome.retriable else 2

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.task.id,
            "type": self.task.type,
            "status": str(self.outcome.status),
            "attempts": self.attempts,
        }
        if self.outcome.ok:
            body["result"] = self.outcome.result
        else:
            error = self.outcome.error or ErrorInfo("Unknown", "no error was reported")
            body["error"] = error.to_dict()
        return body


def new_task(task_type: str, params: dict[str, Any], correlation_id: str | None = None) -> Envelope:
    """A fresh envelope for a first attempt, with new ids and trace context."""
    return Envelope(
        id=str(uuid.uuid4()),
        type=task_type,
        params=params,
        attempt=1,
        correlation_id=correlation_id or uuid.uuid4().hex,
        traceparent=f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
    )


def run_task(
    runner: Runner,
    worker: WorkerConfig,
    task: Envelope,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    hooks: Hooks | None = None,
) -> Report:
    """Run ``task`` on ``worker`` until it completes or the policy stops retrying.

    Each attempt is the same ``TaskRun`` as in ``serve`` (runner/task.py), with the
    same events, so ``hooks`` (tracing, say) see it as they see a served task.
    """
    if policy is not None:
        worker = worker.model_copy(
            update={"max_retries": policy.max_retries, "backoff": policy.backoff, "backoff_max": policy.backoff_max}
        )
    source = OneTask(task)
    services = Services(runner, source, hooks or Hooks())
    while True:
        claimed = source.claim_next()
        unit = TaskRun(claimed, worker, services)
        outcome = asyncio.run(unit())
        assert outcome is not None  # OneTask never loses a lease nor takes a task back
        current = replace(task, attempt=claimed.attempt)
        _log_attempt(current, worker, outcome, unit.result.duration)
        if source.retry_in is None:
            return Report(current, outcome, claimed.attempt, unit.result)
        log.info("task %s: attempt %d failed (retriable), next attempt in %.2fs", task.id, claimed.attempt,
                 source.retry_in)  # fmt: skip
        sleep(source.retry_in)


class OneTask(TaskSource):
    """The task of ``workerhost run`` as a source of one: attempts report to it, and it keeps the last word."""

    def __init__(self, task: Envelope) -> None:
        self.task = task
        self.attempt = task.attempt - 1
        self.last: Finished | None = None
        self.retry_in: float | None = None

    def claim_next(self) -> ClaimedTask:
        self.attempt += 1
        task = self.task
        return ClaimedTask(task.id, task.type, task.params, self.attempt, task.correlation_id, task.traceparent)

    async def complete(self, task: ClaimedTask, finished: Finished) -> None:
        self.last, self.retry_in = finished, None

    async def fail(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        self.last, self.retry_in = finished, retry_in

    async def health(self) -> dict[str, Any]:
        return {"type": "run", "reachable": True}


def _log_attempt(task: Envelope, worker: WorkerConfig, outcome: Outcome, duration: float) -> None:
    level = logging.INFO if outcome.ok else logging.WARNING
    error = f" {outcome.error}" if outcome.error else ""
    log.log(level, "task %s (%s) attempt %d on %s: %s in %.3fs%s",
            task.id, task.type, task.attempt, worker.name, outcome.status, duration, error)  # fmt: skip
