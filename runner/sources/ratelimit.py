"""Requests per minute for a source behind a rate limit, and how long a 429 asks us to wait.

PrismQ's TaskManager allows 100 requests a minute and answers past that with
HTTP 429 "... try again in N seconds". A host that polls several task types
reaches that alone, so the adapter keeps its own, lower count
(``RequestBudget``) and, when it is refused all the same, reads how long to
wait from the answer (``retry_after``).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime

WINDOW = 60.0  # seconds: the budget is per minute, in any minute
MAX_WAIT = 3600.0  # an answer cannot make us wait longer than this
_TRY_AGAIN = re.compile(r"try again in\s+(\d+(?:\.\d+)?)\s*(?:seconds?|secs?|s)\b", re.IGNORECASE)


class RequestBudget:
    """At most ``per_minute`` requests in any 60 seconds, for the requests that can wait.

    Every request counts (``spend``); those that can wait (a claim, a progress
    report) go out only while ``left()`` is positive. A report of a finished
    task cannot wait: it is sent regardless, and counts, so the budget is
    exceeded by at most the reports of the tasks in flight. Polling an idle
    queue is spread out (``poll``) so that it takes at most half the budget:
    otherwise a host that polls fast spends a minute's budget in its first
    seconds, and a task that comes then waits for the rest of the minute.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.poll_every = 2 * WINDOW / per_minute  # seconds between idle polls: half the budget
        self._clock = clock
        self._sent: deque[float] = deque()  # when each request of the last minute went out
        self._next_poll = 0.0

    def poll(self) -> bool:
        """Whether an idle poll may go out now (and if so, the next one waits ``poll_every``)."""
        now = self._clock()
        if now < self._next_poll or self.left() <= 0:
            return False
        self._next_poll = now + self.poll_every
        return True

    def spend(self) -> None:
        """Count one request, now."""
        now = self._clock()
        self._forget(now)
        self._sent.append(now)

    def used(self) -> int:
        """Requests sent in the last minute."""
        self._forget(self._clock())
        return len(self._sent)

    def left(self) -> int:
        """How many more requests may go out now."""
        return max(0, self.per_minute - self.used())

    def _forget(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - WINDOW:
            self._sent.popleft()


def retry_after(header: str | None, text: str, now: float | None = None) -> float | None:
    """Seconds to wait, from a ``Retry-After`` header (seconds or an HTTP date) or else from
    "try again in N seconds" in the answer's text; None when neither says. Bounded to 0..MAX_WAIT.
    """
    seconds: float | None = None
    value = (header or "").strip()
    if value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError, OverflowError):
                seconds = None
            else:  # an HTTP date is GMT, whether it says so or not
                when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
                seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds is None or seconds != seconds:  # NaN
        match = _TRY_AGAIN.search(text)
        seconds = float(match.group(1)) if match else None
    return None if seconds is None else min(MAX_WAIT, max(0.0, seconds))
