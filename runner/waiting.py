"""Waiting for tasks to end: what ``?wait`` on the HTTP API stands on.

A waiter is woken the moment this process settles its task: the API adds ``Waiters``
to the host's hooks, and the host emits ``TaskCompleted`` or ``TaskFailed`` once the
outcome is stored (runner/task.py). What ends a task out of this process's sight
(another host on the same Redis or SQLite file, a lease that expired on its last
attempt, a delete) is found by one poll of the store for all waiters together, every
``every`` seconds while anyone waits. An idle waiter costs an entry in a dict: no
thread, no timer and no query of its own; one whose caller hangs up is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive

from runner.telemetry import events
from runner.telemetry.events import Event

log = logging.getLogger(__name__)

FINAL = frozenset({"completed", "failed", "dead"})
_ENDS = (events.TaskCompleted, events.TaskFailed)  # the events after which a task is final

Statuses = Callable[[list[str]], Awaitable[dict[str, str]]]
Read = Callable[[], Awaitable[dict[str, Any] | None]]
ReadById = Callable[[str], Awaitable[dict[str, Any] | None]]


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event

    def set(self) -> None:
        """Wake it from any thread (hooks run on the host's loop; a test may emit from another)."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is self.loop:
            self.event.set()
            return
        with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.event.set)


class Waiters:
    """Who waits for which task; a hook for the host's events, and the poll for the rest.

    ``statuses`` answers the status of many tasks at once (``TaskStore.statuses``, off the loop).
    """

    def __init__(self, statuses: Statuses, every: float = 1.0) -> None:
        self._statuses = statuses
        self.every = every
        self._waiting: dict[str, set[_Waiter]] = {}
        self._poll: asyncio.Task[None] | None = None

    def __call__(self, event: Event) -> None:
        """The hook: a task this process settled for good wakes its waiters."""
        if isinstance(event, _ENDS) and event.task_id is not None:
            self._wake(event.task_id)

    def waiting(self) -> int:
        """How many waiters there are now."""
        return sum(len(waiters) for waiters in list(self._waiting.values()))

    async def until_all_final(
        self, task_ids: list[str], seconds: float, read: ReadById, gone: Callable[[], Awaitable[None]]
    ) -> list[dict[str, Any] | None] | None:
        """Each task once it has ended, or its last reading when ``seconds`` have passed (None: it is
        gone); None when ``gone()`` returns first (the caller hung up: its waits end with it)."""
        deadline = asyncio.get_running_loop().time() + seconds

        async def every() -> list[dict[str, Any] | None]:
            # One after another against one deadline: a task that ended meanwhile is read once, and done.
            return [await self.until_final(task_id, deadline, functools.partial(read, task_id)) for task_id in task_ids]

        waiting = asyncio.ensure_future(every())
        hung_up = asyncio.ensure_future(gone())
        try:
            await asyncio.wait((waiting, hung_up), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hung_up.cancel()
            if not waiting.done():
                waiting.cancel()
            await asyncio.gather(waiting, hung_up, return_exceptions=True)
        return None if waiting.cancelled() else waiting.result()

    async def until_final(self, task_id: str, deadline: float, read: Read) -> dict[str, Any] | None:
        """Read the task until it is final or gone, or until ``deadline`` (the loop's clock)
        passes: its last reading (None: it is gone)."""
        loop = asyncio.get_running_loop()
        with self._watch(task_id) as ended:
            while True:
                ended.clear()  # before the read: an end between the read and the wait is not lost
                task = await read()
                if task is None or task["status"] in FINAL:
                    return task
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return task
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), remaining)

    @contextlib.contextmanager
    def _watch(self, task_id: str) -> Iterator[asyncio.Event]:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, asyncio.Event())
        self._waiting.setdefault(task_id, set()).add(waiter)
        if self._poll is None or self._poll.done() or self._poll.get_loop() is not loop:
            self._poll = loop.create_task(self._polling(), name="wait-poll")
        try:
            yield waiter.event
        finally:
            waiters = self._waiting.get(task_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiting[task_id]
            if not self._waiting and self._poll is not None and self._poll.get_loop() is loop:
                self._poll.cancel()  # nobody waits: no poll
                self._poll = None

    def _wake(self, task_id: str) -> None:
        for waiter in list(self._waiting.get(task_id, ())):
            waiter.set()

    async def _polling(self) -> None:
        """Every ``every`` seconds while anyone waits: wake the waiters of tasks that are final or gone."""
        while self._waiting:
            await asyncio.sleep(self.every)
            watched = list(self._waiting)
            try:
                found = await self._statuses(watched)
            except Exception as exc:  # the store does not answer: each wait still ends at its deadline
                log.debug("?wait: the store's statuses were not read: %s", exc)
                continue
            for task_id in watched:
                status = found.get(task_id)
                if status is None or status in FINAL:  # gone, or ended out of our sight
                    self._wake(task_id)


async def hung_up(receive: Receive) -> None:
    """Returns when the HTTP caller hangs up: once a request's body is read, the next ASGI message is
    ``http.disconnect``, which the server sends when the connection closes (or the answer is sent)."""
    while (await receive())["type"] != "http.disconnect":
        continue
