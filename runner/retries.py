"""When to try again, and after how long: decisions as values, and the one backoff.

The policy decides; whoever holds the task acts (``workerhost run`` sleeps,
a queue schedules the task for later). Every wait in workerhost, a task's
retry, an idle poll, a source that is down, a report that did not land, is
``backoff``: tenacity's exponential backoff with jitter, so that many tasks
and many hosts do not act in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import tenacity

from runner.config import WorkerConfig
from runner.protocol import Outcome


def backoff(failures: int, base: float, cap: float, jitter: float | None = None) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1 for the first):
    ``base * 2**(failures-1)`` plus up to ``jitter`` (default: ``base``), never more than ``cap``."""
    wait = tenacity.wait_exponential_jitter(multiplier=base, max=cap, jitter=base if jitter is None else jitter)
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, min(failures, 64))
    return float(wait(state))


@dataclass(frozen=True)
class Decision:
    """Retry after ``delay`` seconds, or stop with the outcome as it is."""

    retry: bool
    delay: float = 0.0


STOP = Decision(retry=False)


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``max_retries`` more attempts after the first, for retriable outcomes only.

    The n-th retry waits ``backoff * 2**(n-1)`` seconds plus up to ``backoff``
    seconds of jitter, never more than ``backoff_max``.
    """

    max_retries: int
    backoff: float = 1.0
    backoff_max: float = 60.0

    @classmethod
    def for_worker(cls, worker: WorkerConfig, max_attempts: int | None = None) -> RetryPolicy:
        """The worker's policy; ``max_attempts``, when the task records one, takes the place of its max_retries."""
        retries = worker.max_retries if max_attempts is None else max(0, max_attempts - 1)
        return cls(retries, worker.backoff, worker.backoff_max)

    def decide(self, outcome: Outcome, attempt: int) -> Decision:
        """What to do after ``attempt`` (1 for the first) ended with ``outcome``."""
        if not outcome.retriable or attempt > self.max_retries:
            return STOP
        return Decision(retry=True, delay=self.delay(attempt))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after ``attempt``."""
        return backoff(attempt, self.backoff, self.backoff_max)
