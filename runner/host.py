"""The host loop: claim while there is room, start each task's life, and drain on the way out.

One asyncio loop claims tasks while there is room (``[host] concurrency`` in
all, each worker's ``concurrency`` for its own types, so a slow worker cannot
starve the others), as many as there is room for in one call to the source
(``claim_many``), and starts a ``TaskRun`` for each (runner/task.py: run,
classify, retry or report). Delivery is at least once: a task is reported only
after its container finished, so a host that dies before reporting leaves the
task to run again.

Side tasks run beside the loop, each named and watched: the heartbeat (when
the source keeps a registry of processes) and the janitor (engine ping, then
what dead processes left: runner/owners.py's ``Undertaker``).
A side task that fails is logged and tried again at its next turn; one that
ends for good stops the host, cleanly.

Every way out of ``run`` (``stop()``, the end of a burst, an error in the loop,
a cancellation) goes through the drain: no new claims; tasks in flight get
``[host] grace`` to finish, then their containers are killed and their tasks
handed back. A task whose container ended by itself is always reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.config import Config, WorkerConfig
from runner.docker import Reaped
from runner.errors import EngineError
from runner.owners import Undertaker, new_owner
from runner.protocol import ErrorInfo, Outcome, Status
from runner.retries import backoff
from runner.sources import ClaimedTask, Finished, LeaseLost, Slots, SourceUnavailable, TaskSource
from runner.task import Runner, Services, TaskRun
from runner.telemetry import events
from runner.telemetry.events import Hooks

log = logging.getLogger(__name__)

_RECENT = 20  # outcomes kept per worker for /workers/{name}/health
_KILL_WAIT = 60.0  # after the grace: how long killed containers get to be read and their tasks handed back


class ContainerRunner(Runner, Protocol):
    """What the host needs of the container runner beyond one task (``DockerRunner``; a fake in unit tests)."""

    def image_present(self, image: str) -> bool: ...

    def reap(self, dead: Callable[[str], bool]) -> Reaped: ...

    def ping(self) -> str | None: ...

    def warm_counts(self) -> dict[str, dict[str, Any]]: ...

    def close(self) -> None: ...


@dataclass
class WorkerState:
    """What the host knows of one worker at run time."""

    config: WorkerConfig
    in_flight: int = 0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_RECENT))


class Host:
    """Runs the loop for one ``workerhost serve`` process."""

    def __init__(
        self,
        config: Config,
        source: TaskSource,
        runner: ContainerRunner,
        hooks: Hooks | None = None,
        owner: str | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.runner = runner
        self.hooks = hooks or Hooks()
        self.owner = owner or new_owner()
        self.workers = {w.name: WorkerState(w) for w in config.workers}
        # By claim (task id and attempt): a source whose claims expire (PrismQ) may hand this host
        # a task again while its earlier attempt still runs here.
        self.in_flight: dict[tuple[str, int], TaskRun] = {}
        self.engine_error: str | None = "not checked yet"  # so that the first answer is an event
        self.alive = False
        self.stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=config.host.concurrency + 4, thread_name_prefix="workerhost-task"
        )
        self.services = Services(
            runner, source, self.hooks, self._executor, on_outcome=self._record, on_retry=self._retry_scheduled
        )
        self.undertaker = Undertaker(self.owner, config.host.id, source, runner, self._executor, self.services.health)
        self._units: set[asyncio.Task[None]] = set()
        self._side: dict[str, asyncio.Task[None]] = {}
        self._retries: dict[str, float] = {}  # task id -> when its retry is due (monotonic)

    @property
    def source_error(self) -> str | None:
        """Why the source did not answer last time, or None."""
        return self.services.health.error

    # -- public -----------------------------------------------------------------

    async def run(self, burst: bool = False) -> None:
        """Claim and run tasks until ``stop()``; with ``burst``, also when the queue is empty."""
        self.alive = True
        try:
            await self._start_source()
            if self.source.capabilities.registry:
                await self.undertaker.heartbeat()  # before any claim: siblings must know us before our leases
                self._watch("heartbeat", self.source.heartbeat_every, self.undertaker.heartbeat)
            await self.undertaker.tidy()  # before any claim: hand back what a dead predecessor left
            self._watch("janitor", self.config.host.reap_interval, self._janitor)
            await self._claim_loop(burst)
        finally:
            self.stopping.set()
            await self._drain()  # side tasks still running: the heartbeat must go on while containers do
            await self._stop_side_tasks()
            await self.undertaker.forget()
            self.alive = False
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    def stop(self) -> None:
        """Stop claiming and drain (what the first SIGTERM does)."""
        if not self.stopping.is_set():
            log.info("stopping: no new claims; waiting up to %gs for %d tasks in flight",
                     self.config.host.grace, len(self.in_flight))  # fmt: skip
        self.stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """Claim now instead of at the next poll (a task was just submitted)."""
        self._wake.set()

    def worker_health(self, name: str) -> dict[str, Any]:
        state = self.workers[name]
        return {
            "name": name,
            "image": state.config.image,
            "task_types": state.config.task_types,
            "in_flight": state.in_flight,
            "concurrency": state.config.concurrency,
            # prewarm or reuse: the warm containers as they are (idle, busy, starting), or null
            "warm": self.runner.warm_counts().get(name),
            "recent": list(state.recent),
        }

    def engine_ok(self, error: str | None) -> None:
        """Record whether the engine answers (a ping's result), with an event when that changes."""
        if (error is None) != (self.engine_error is None):
            self.hooks.emit(events.EngineUp() if error is None else events.EngineDown(error=error))
        self.engine_error = error

    # -- the loop ---------------------------------------------------------------------

    async def _claim_loop(self, burst: bool) -> None:
        idle = failures = 0
        while not self.stopping.is_set():
            self._wake.clear()  # before the claim, not after: a wake() while it is under way must count
            slots, free = self._room()
            if not slots:
                await self._pause(self.config.host.poll_max)
                continue
            claim_started = time.time_ns()
            try:
                tasks = await self.source.claim_many(slots, free)
            except Exception as exc:  # SourceUnavailable, or an adapter's bug: the host keeps serving
                failures += 1
                if not isinstance(exc, SourceUnavailable):
                    log.exception("the task source failed to claim (a bug in its adapter); backing off")
                self.services.health.down(str(exc) or type(exc).__name__)
                # At least as long as the source asked for (a 429's Retry-After), however few the failures.
                wait = max(backoff(failures, base=0.5, cap=30.0), getattr(exc, "retry_after", None) or 0.0)
                await self._pause(wait, wakeable=False)
                continue
            failures = 0
            self.services.health.up()  # an event only when that changes (the first answer is one)
            if not tasks:
                if burst and not self.in_flight and not self._retries_pending():
                    return
                idle += 1
                await self._pause(backoff(idle, base=0.05, cap=self.config.host.poll_max))
                continue
            idle = 0
            for task in tasks:
                self._start(task, claim_started)

    def _room(self) -> tuple[list[Slots], int]:
        """What to claim: each worker with a free slot, its types and free slots (never more than the
        host's), and the host's free slots in all."""
        free = self.config.host.concurrency - len(self.in_flight)
        if free <= 0:
            return [], 0
        slots = [
            Slots(tuple(w.config.task_types), min(w.config.concurrency - w.in_flight, free))
            for w in self.workers.values()
            if w.in_flight < w.config.concurrency
        ]
        return slots, free

    def _retries_pending(self) -> bool:
        """Whether a retry this host scheduled is still to come (burst mode waits for it).

        A retry that is well past due and was not claimed here went to another host.
        """
        now = time.monotonic()
        for task_id, due in list(self._retries.items()):
            if due < now - max(2.0, 2 * self.config.host.poll_max):
                del self._retries[task_id]
        return bool(self._retries)

    async def _pause(self, seconds: float, wakeable: bool = True) -> None:
        """Sleep, but wake up for a stop and, when ``wakeable``, for a freed slot or a submitted task
        (not while a source that is down or asked us to wait gets its pause)."""
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and (remaining := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)
            if wakeable:
                return
            self._wake.clear()

    def _start(self, task: ClaimedTask, claim_started: int) -> None:
        self._retries.pop(task.id, None)
        worker = next((w for w in self.workers.values() if task.type in w.config.task_types), None)
        if worker is None:  # the source handed us a type we did not ask for
            self._spawn(self._refuse(task), f"refuse-{task.id}")
            return
        if worker.in_flight >= worker.config.concurrency or len(self.in_flight) >= self.config.host.concurrency:
            # More than the room the claim asked for (an adapter's bug): the bounds hold whatever a source does.
            log.warning("task %s: the source handed over more tasks than there was room for; handing it back",
                        task.id)  # fmt: skip
            self._spawn(self._hand_back(task), f"hand-back-{task.id}")
            return
        unit = TaskRun(task, worker.config, self.services, claim_started)
        worker.in_flight += 1
        claim = (task.id, task.attempt)
        self.in_flight[claim] = unit

        async def life() -> None:
            try:
                await unit()
            finally:
                worker.in_flight -= 1
                self.in_flight.pop(claim, None)
                self._wake.set()

        self._spawn(life(), f"task-{task.id}")

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        handle: asyncio.Task[None] = asyncio.ensure_future(coro)
        handle.set_name(name)
        self._units.add(handle)
        handle.add_done_callback(self._unit_done)

    def _unit_done(self, handle: asyncio.Task[None]) -> None:
        self._units.discard(handle)
        if not handle.cancelled() and handle.exception() is not None:
            # TaskRun turns every failure into an outcome; this is a bug, and the task's lease will expire.
            log.error("%s ended with an error; its lease will expire and it will run again",
                      handle.get_name(), exc_info=handle.exception())  # fmt: skip

    async def _refuse(self, task: ClaimedTask) -> None:
        outcome = Outcome(Status.FAILED, error=ErrorInfo("UnknownTaskType", f"no worker handles {task.type!r}"))
        try:
            await asyncio.shield(self.source.fail(task, Finished(outcome, ""), None))
        except (SourceUnavailable, LeaseLost) as exc:
            log.warning("task %s of unknown type %r: could not fail it: %s", task.id, task.type, exc)

    async def _hand_back(self, task: ClaimedTask) -> None:
        try:
            await asyncio.shield(self.source.release(task))
        except (SourceUnavailable, LeaseLost) as exc:
            log.warning("task %s: could not hand it back (%s); it runs again once its claim expires", task.id, exc)

    def _record(self, worker: str, record: dict[str, Any]) -> None:
        self.workers[worker].recent.append(record)

    def _retry_scheduled(self, task_id: str, delay: float) -> None:
        self._retries[task_id] = time.monotonic() + delay

    # -- side tasks ---------------------------------------------------------------------

    def _watch(self, name: str, every: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` every ``every`` seconds beside the loop, as a named, watched side task."""

        async def turns() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await job()
                except Exception:
                    log.exception("side task %s failed; it runs again in %gs", name, every)

        def ended(handle: asyncio.Task[None]) -> None:
            if not handle.cancelled() and not self.stopping.is_set():
                log.error("side task %s ended (%r); stopping the host", name, handle.exception())
                self.stop()

        handle = asyncio.create_task(turns(), name=name)
        handle.add_done_callback(ended)
        self._side[name] = handle

    async def _stop_side_tasks(self) -> None:
        for handle in self._side.values():
            handle.cancel()
        await asyncio.gather(*self._side.values(), return_exceptions=True)
        self._side.clear()

    async def _start_source(self) -> None:
        try:
            await self.source.start()
        except SourceUnavailable as exc:  # the loop tries again with backoff at its claims
            log.warning("task source not ready: %s", exc)
            self.services.health.down(str(exc))

    async def _janitor(self) -> None:
        loop = asyncio.get_running_loop()
        self.engine_ok(await loop.run_in_executor(self._executor, self.runner.ping))
        await self.undertaker.tidy()
        try:
            pruned = await self.source.prune()
        except SourceUnavailable as exc:
            log.warning("could not prune finished tasks: %s", exc)
        else:
            if pruned:
                log.info("pruned %d finished tasks past their retention", pruned)

    # -- the way out ----------------------------------------------------------------------

    async def _drain(self) -> None:
        """Give tasks in flight the grace to finish, then kill their containers and hand them back."""
        if not self._units:
            return
        _, pending = await asyncio.wait(set(self._units), timeout=self.config.host.grace)
        if not pending:
            return
        log.warning("grace period over: killing %d containers and handing their tasks back", len(self.in_flight))
        loop = asyncio.get_running_loop()
        for task_id in {task_id for task_id, _ in self.in_flight}:
            try:
                await loop.run_in_executor(None, self.runner.cancel, task_id)
            except EngineError as exc:
                log.warning("task %s: could not kill its container: %s", task_id, exc)
        _, pending = await asyncio.wait(pending, timeout=_KILL_WAIT)
        if pending:
            log.error("%d tasks did not end %gs after their containers were killed; their leases will expire",
                      len(pending), _KILL_WAIT)  # fmt: skip
