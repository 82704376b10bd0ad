"""One task, attempt after attempt, each in a fresh container, until its outcome is final."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from runner.config import WorkerConfig
from runner.docker import Observer, RunResult
from runner.protocol import Envelope, ErrorInfo, Outcome, Status, classify
from runner.retries import RetryPolicy

log = logging.getLogger(__name__)


class Runner(Protocol):
    """Runs one attempt of a task; ``DockerRunner`` is the real one."""

    def run(self, worker: WorkerConfig, task: Envelope, observe: Observer | None = None) -> RunResult: ...


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
) -> Report:
    """Run ``task`` on ``worker`` until it completes or the policy stops retrying."""
    policy = policy or RetryPolicy.for_worker(worker)
    attempt = task.attempt
    while True:
        current = replace(task, attempt=attempt)
        result = runner.run(worker, current)
        outcome = classify(result.end)
        _log_attempt(current, worker, outcome, result)
        decision = policy.decide(outcome, attempt)
        if not decision.retry:
            return Report(current, outcome, attempt, result)
        log.info(
            "task %s: attempt %d failed (retriable), next attempt in %.2fs",
            task.id,
            attempt,
            decision.delay,
        )
        sleep(decision.delay)
        attempt += 1


def _log_attempt(task: Envelope, worker: WorkerConfig, outcome: Outcome, result: RunResult) -> None:
    level = logging.INFO if outcome.ok else logging.WARNING
    error = f" {outcome.error}" if outcome.error else ""
    log.log(
        level,
        "task %s (%s) attempt %d on %s: %s in %.3fs%s",
        task.id,
        task.type,
        task.attempt,
        worker.name,
        outcome.status,
        result.duration,
        error,
    )
