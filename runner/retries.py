"""When to try a task again, and after how long: decisions as values.

The policy decides; whoever holds the task acts (``workerhost run`` sleeps,
a queue could schedule the task for later). Delays are tenacity's exponential
backoff with jitter, so that retries of many tasks do not arrive in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import tenacity

from runner.config import WorkerConfig
from runner.protocol import Outcome


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
    def for_worker(cls, worker: WorkerConfig) -> RetryPolicy:
        return cls(worker.max_retries, worker.backoff, worker.backoff_max)

    def decide(self, outcome: Outcome, attempt: int) -> Decision:
        """What to do after ``attempt`` (1 for the first) ended with ``outcome``."""
        if not outcome.retriable or attempt > self.max_retries:
            return STOP
        return Decision(retry=True, delay=self.delay(attempt))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after ``attempt``."""
        wait = tenacity.wait_exponential_jitter(multiplier=self.backoff, max=self.backoff_max, jitter=self.backoff)
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        return float(wait(state))
