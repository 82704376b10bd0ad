"""The host loop: claim -> run -> report, with bounded concurrency, retries, drain and reaping.

One asyncio loop claims tasks while there is room (``[host] concurrency`` in
all, each worker's ``concurrency`` for its own types, so a slow worker cannot
starve the others), runs each task's container in a thread, and reports the
outcome back to the source. Delivery is at least once: a task is reported
only after its container finished, so a host that dies before reporting
leaves the task to run again (the embedded queue's lease expires; the next
start reaps the orphan container and hands the task back at once).

Shutdown: ``stop()`` (the first SIGTERM or SIGINT) stops claiming and waits
up to ``[host] grace`` for tasks in flight, then kills their containers and
hands their tasks back. A report to the source runs shielded from
cancellation, so it is never cut in half.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import tenacity

from runner.attempts import Runner, new_task
from runner.config import Config, WorkerConfig
from runner.docker import STDERR_TAIL, Observed, Observer, RunResult
from runner.errors import EngineError
from runner.protocol import Envelope, ErrorInfo, Outcome, Status, classify
from runner.retries import RetryPolicy
from runner.sidechannel import Progress, WorkerSpan
from runner.sources import ClaimedTask, Finished, LeaseLost, SourceUnavailable, TaskSource
from runner.telemetry import events
from runner.telemetry.events import Event, Hooks

log = logging.getLogger(__name__)

_RECENT = 20  # outcomes kept per worker for /workers/{name}/health
_REPORT_TRIES = 8


class ContainerRunner(Runner, Protocol):
    """What the host needs of the container runner (``DockerRunner``; a fake in unit tests)."""

    def kill_task(self, task_id: str) -> int: ...

    def image_present(self, image: str) -> bool: ...

    def reap(self, alive: Callable[[str], bool]) -> list[tuple[str, str]]: ...

    def ping(self) -> str | None: ...

    def close(self) -> None: ...


def new_owner() -> str:
    """A token for this process: host name, pid and a random part (``host:pid:abcd1234``)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_alive(owner: str) -> bool:
    """Whether the process behind a lease token still runs (only decidable on this machine)."""
    hostname, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if hostname != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # a token of ours that is not this instance's: an earlier process with our pid
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    # `workerhost serve`, or `python -m runner serve`
    return b"workerhost" in cmdline or b"runner\x00serve" in cmdline


@dataclass
class WorkerState:
    """What the host knows of one worker at run time."""

    config: WorkerConfig
    in_flight: int = 0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_RECENT))


@dataclass
class InFlight:
    task: ClaimedTask
    worker: WorkerState
    aborted: bool = False


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
        self.in_flight: dict[str, InFlight] = {}
        self.source_error: str | None = None
        self.engine_error: str | None = "not checked yet"  # so that the first answer is an event
        self.alive = False
        self.stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=config.host.concurrency + 4, thread_name_prefix="workerhost-task"
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._retries: dict[str, float] = {}  # task id -> when its retry is due (monotonic)

    # -- public -----------------------------------------------------------------

    async def run(self, burst: bool = False) -> None:
        """Claim and run tasks until ``stop()``; with ``burst``, also when the queue is empty."""
        self.alive = True
        janitor = None
        try:
            await self._reap()
            janitor = asyncio.create_task(self._janitor(), name="janitor")
            await self._claim_loop(burst)
            await self._drain()
        finally:
            if janitor is not None:
                janitor.cancel()
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
            "recent": list(state.recent),
        }

    # -- the loop -----------------------------------------------------------------

    async def _claim_loop(self, burst: bool) -> None:
        idle = 0
        source_failures = 0
        while not self.stopping.is_set():
            # Cleared before the claim, not after: a wake() while it is under way must count.
            self._wake.clear()
            types = self._claimable_types()
            if not types:
                await self._pause(self.config.host.poll_max)
                continue
            try:
                claim_started = time.time_ns()
                task = await self.source.claim(types)
            except SourceUnavailable as exc:
                source_failures += 1
                self._source_down(str(exc))
                await self._pause(_backoff(source_failures, cap=30.0))
                continue
            if source_failures:
                source_failures = 0
                self._source_up()
            if task is None:
                if burst and not self.in_flight and not self._retries_pending():
                    return
                idle += 1
                await self._pause(_backoff(idle, cap=self.config.host.poll_max, base=0.05))
                continue
            idle = 0
            self._start(task, claim_started)

    def _claimable_types(self) -> list[str]:
        if len(self.in_flight) >= self.config.host.concurrency:
            return []
        return [t for w in self.workers.values() if w.in_flight < w.config.concurrency for t in w.config.task_types]

    def _retries_pending(self) -> bool:
        """Whether a retry this host scheduled is still to come (burst mode waits for it).

        A retry that is well past due and was not claimed here went to another host.
        """
        now = time.monotonic()
        for task_id, due in list(self._retries.items()):
            if due < now - max(2.0, 2 * self.config.host.poll_max):
                del self._retries[task_id]
        return bool(self._retries)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up for a stop, a freed slot or a submitted task."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _start(self, task: ClaimedTask, claim_started: int = 0) -> None:
        self._retries.pop(task.id, None)
        worker = next((w for w in self.workers.values() if task.type in w.config.task_types), None)
        if worker is None:  # the source handed us a type we did not ask for
            coro: Coroutine[Any, Any, None] = self._refuse(task)
        else:
            worker.in_flight += 1
            self.in_flight[task.id] = InFlight(task, worker)
            coro = self._handle(self.in_flight[task.id], claim_started)
        handle = asyncio.create_task(coro, name=f"task-{task.id}")
        self._tasks.add(handle)
        handle.add_done_callback(self._tasks.discard)

    async def _handle(self, flight: InFlight, claim_started: int = 0) -> None:
        task, worker = flight.task, flight.worker.config
        envelope = self._envelope(task)
        emit = self._emitter(Event("", task.id, task.type, worker.name, task.attempt, envelope.correlation_id))
        emit(events.TASK_RECEIVED, _traceparent=task.traceparent, claim_started_ns=claim_started or None)
        try:
            carrier: dict[str, str] = {}
            limits = {"cpus": worker.cpus, "memory": worker.memory, "pids": worker.pids_limit,
                      "timeout": worker.timeout, "network": worker.network, "runtime": worker.runtime}  # fmt: skip
            emit(events.ATTEMPT_STARTED, _traceparent=task.traceparent, image=worker.image, limits=limits,
                 carrier=carrier)  # fmt: skip
            # The tracing hook put the attempt's span context in the carrier: the container continues it.
            envelope = replace(envelope, traceparent=carrier.get("traceparent") or envelope.traceparent)
            emit = self._emitter(
                Event("", task.id, task.type, worker.name, task.attempt, envelope.correlation_id,
                      traceparent=envelope.traceparent)
            )  # fmt: skip
            renewer = asyncio.create_task(self._renew(task))
            try:
                loop = asyncio.get_running_loop()
                observe = self._observer(loop, task, emit)
                result = await loop.run_in_executor(self._executor, self._run, worker, envelope, observe)
            finally:
                renewer.cancel()
            outcome = classify(result.end)
            error = str(outcome.error) if outcome.error else None
            emit(
                events.ATTEMPT_FINISHED, outcome=_outcome_label(outcome), exit_code=outcome.exit_code,
                oom_killed=result.end.oom_killed, error=error, duration=result.duration,
                start_latency=result.start_latency, container_id=result.container_id, image_id=result.image_id,
                stdin_bytes=result.stdin_bytes, stdout_bytes=len(result.end.stdout),
                stderr_bytes=result.stderr_bytes, phases=result.phases, side_channel=result.side_channel_problems,
            )  # fmt: skip
            if flight.aborted:
                await asyncio.shield(self.source.release(task))
                emit(events.TASK_RELEASED)
                return
            await self._report(flight, result, outcome, emit)
        except LeaseLost as exc:
            emit(events.LEASE_LOST, error=str(exc))
        except Exception:
            log.exception("task %s: the host failed to handle it; its lease will expire and it will run again", task.id)
        finally:
            flight.worker.in_flight -= 1
            self.in_flight.pop(task.id, None)
            self._wake.set()

    def _run(self, worker: WorkerConfig, envelope: Envelope, observe: Observer) -> RunResult:
        return self.runner.run(worker, envelope, observe=observe)

    def _observer(self, loop: asyncio.AbstractEventLoop, task: ClaimedTask, emit: Callable[..., None]) -> Observer:
        """What the runner sees live (in its thread), turned into events on the loop."""

        def on_loop(item: Observed) -> None:
            if isinstance(item, str):
                emit(events.WORKER_LOG, line=item)
            elif isinstance(item, WorkerSpan):
                emit(events.WORKER_SPAN, span=item)
            elif isinstance(item, Progress):
                emit(events.TASK_PROGRESS, percent=item.percent, message=item.message)
                self._forward_progress(task, item)
            else:
                name = events.CONTAINER_CREATED if item.kind == "created" else events.CONTAINER_REMOVED
                emit(name, container_id=item.container_id)

        def observe(item: Observed) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (a forced exit)
                loop.call_soon_threadsafe(on_loop, item)

        return observe

    def _forward_progress(self, task: ClaimedTask, progress: Progress) -> None:
        """Tell a source that keeps progress (PrismQ); never waited for, never fatal."""
        forward = getattr(self.source, "progress", None)
        if forward is None:
            return

        async def send() -> None:
            with contextlib.suppress(Exception):
                await forward(task, progress.percent, progress.message)

        handle = asyncio.create_task(send())
        self._tasks.add(handle)
        handle.add_done_callback(self._tasks.discard)

    async def _report(self, flight: InFlight, result: RunResult, outcome: Outcome, emit: Callable[..., None]) -> None:
        task, worker = flight.task, flight.worker
        finished = Finished(
            outcome, worker.config.name, result.image_id,
            result.end.stderr_tail[-STDERR_TAIL:].decode("utf-8", "replace"), result.duration,
        )  # fmt: skip
        worker.recent.append(
            {"task_id": task.id, "outcome": _outcome_label(outcome), "at": time.time(), "duration": result.duration}
        )
        if outcome.ok:
            await self._settle(lambda: self.source.complete(task, finished))
            emit(events.TASK_COMPLETED)
            return
        error = str(outcome.error or ErrorInfo("Unknown", "no error was reported"))
        if self.source.retries_by_source:
            await self._settle(lambda: self.source.fail(task, finished, None))
            emit(events.TASK_RETURNED, outcome=_outcome_label(outcome), error=error)
            return
        decision = RetryPolicy.for_worker(worker.config).decide(outcome, task.attempt)
        retry_in = decision.delay if decision.retry else None
        await self._settle(lambda: self.source.fail(task, finished, retry_in))
        if decision.retry:
            self._retries[task.id] = time.monotonic() + decision.delay
            emit(events.TASK_RETRYING, delay=round(decision.delay, 3), error=error)
        else:
            emit(events.TASK_FAILED, outcome=_outcome_label(outcome), error=error)

    async def _settle(self, report: Callable[[], Awaitable[None]]) -> None:
        """Report to the source, shielded from cancellation, retried while the source is down."""
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(_REPORT_TRIES),
            wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=10),
            retry=tenacity.retry_if_exception_type(SourceUnavailable),
            before_sleep=lambda state: self._source_down(str(state.outcome.exception() if state.outcome else "")),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await asyncio.shield(report())
        self._source_up()

    async def _renew(self, task: ClaimedTask) -> None:
        """Renew the task's lease while its container runs (a third of the lease, each time)."""
        period = max(1.0, getattr(self.config.task_manager, "lease", 30.0) / 3)
        while True:
            await asyncio.sleep(period)
            try:
                await self.source.renew(task)
                self._source_up()
            except LeaseLost as exc:
                log.warning("task %s: %s", task.id, exc)
                return
            except SourceUnavailable as exc:
                self._source_down(str(exc))

    async def _refuse(self, task: ClaimedTask) -> None:
        outcome = Outcome(Status.FAILED, error=ErrorInfo("UnknownTaskType", f"no worker handles {task.type!r}"))
        with contextlib.suppress(SourceUnavailable, LeaseLost):
            await asyncio.shield(self.source.fail(task, Finished(outcome, ""), None))

    # -- start and stop -------------------------------------------------------------

    async def _reap(self) -> None:
        """Remove containers a dead instance of this host left, and hand their tasks back."""
        loop = asyncio.get_running_loop()
        try:
            reaped = await loop.run_in_executor(self._executor, self.runner.reap, owner_alive)
        except EngineError as exc:
            log.warning("could not look for orphan containers: %s", exc)
            return
        for task_id, owner in reaped:
            log.warning("reaped an orphan container of task %s (left by %s); handing the task back", task_id, owner)
            if task_id:
                with contextlib.suppress(SourceUnavailable):
                    await self.source.recover(task_id, owner)

    async def _janitor(self) -> None:
        """From time to time: see whether the engine answers, and reap what removals missed."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.host.reap_interval)
            self.engine_ok(await loop.run_in_executor(self._executor, self.runner.ping))
            await self._reap()

    def engine_ok(self, error: str | None) -> None:
        """Record whether the engine answers (a ping's result), with an event when that changes."""
        if (error is None) != (self.engine_error is None):
            self.hooks.emit(Event(events.ENGINE_UP if error is None else events.ENGINE_DOWN, data={"error": error}))
        self.engine_error = error

    async def _drain(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.host.grace)
        if not pending:
            return
        log.warning("grace period over: killing %d containers and handing their tasks back", len(self.in_flight))
        loop = asyncio.get_running_loop()
        for flight in list(self.in_flight.values()):
            flight.aborted = True
            with contextlib.suppress(EngineError):
                await loop.run_in_executor(None, self.runner.kill_task, flight.task.id)
        await asyncio.wait(pending, timeout=60)

    # -- helpers --------------------------------------------------------------------

    def _envelope(self, task: ClaimedTask) -> Envelope:
        fresh = new_task(task.type, task.params, task.correlation_id)  # new ids where the task has none
        return replace(fresh, id=task.id, attempt=task.attempt, traceparent=task.traceparent or fresh.traceparent)

    def _emitter(self, base: Event) -> Callable[..., None]:
        """Emits events that carry ``base``'s task keys (``_traceparent=`` overrides its trace context)."""

        def emit(name: str, _traceparent: str | None = None, **data: Any) -> None:
            traceparent = _traceparent if _traceparent is not None else base.traceparent
            self.hooks.emit(replace(base, name=name, data=data, traceparent=traceparent))

        return emit

    def _source_down(self, error: str) -> None:
        if self.source_error is None:
            self.hooks.emit(Event(events.SOURCE_DOWN, data={"error": error}))
        self.source_error = error

    def _source_up(self) -> None:
        if self.source_error is not None:
            self.source_error = None
            self.hooks.emit(Event(events.SOURCE_UP))


def _outcome_label(outcome: Outcome) -> str:
    """completed, failed or timeout."""
    return str(outcome.status)


def _backoff(failures: int, cap: float, base: float = 0.5) -> float:
    """Exponential with full jitter, so that idle hosts do not poll in step."""
    ceiling = min(cap, base * 2 ** min(failures, 16))
    return random.uniform(ceiling / 2, ceiling)
