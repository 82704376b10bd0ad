"""One task's life on this host: envelope -> run -> classify -> retry or report, with its events.

``TaskRun`` is the unit that ``Host`` starts for each claimed task and that
``workerhost run`` drives attempt after attempt. It never raises for the
task's sake: whatever happens inside one attempt (the runner raising, a
reply that cannot be read) becomes that attempt's outcome, reported at once,
and ``AttemptFinished`` always follows ``AttemptStarted``.

Reports are shielded from cancellation and retried while the source is down;
a lease is renewed while the container runs (when the source renews), and a
lease found lost stops the container: the task is someone else's now.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from runner.config import WorkerConfig
from runner.docker import STDERR_TAIL, ContainerEvent, Observed, Observer, RunResult
from runner.errors import EngineError
from runner.protocol import ContainerEnd, Envelope, ErrorInfo, Outcome, Status, classify
from runner.retries import RetryPolicy, backoff
from runner.sidechannel import Progress, WorkerSpan
from runner.sources import ClaimedTask, Finished, LeaseLost, SourceUnavailable, TaskSource
from runner.telemetry import context, events
from runner.telemetry.events import Event, Hooks, TaskKeys

log = logging.getLogger(__name__)

REPORT_TRIES = 8  # a report that fails this many times in a row is given up (logged)


class Runner(Protocol):
    """What a task's life needs of the container runner (``DockerRunner``; a fake in unit tests)."""

    def run(self, worker: WorkerConfig, task: Envelope, observe: Observer | None = None) -> RunResult: ...

    def cancel(self, task_id: str) -> bool: ...


class SourceHealth:
    """Whether the source answers, as the last call to it said; events when that changes."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks
        self.error: str | None = None
        self._known = False  # until the first answer, neither up nor down: that answer is an event

    def down(self, error: str) -> None:
        if self.error is None:
            self.hooks.emit(events.SourceDown(error=error))
        self.error, self._known = error, True

    def up(self) -> None:
        if self.error is not None or not self._known:
            self.error, self._known = None, True
            self.hooks.emit(events.SourceUp())


@dataclass
class Services:
    """What a task's life runs against: the same for every task of a host."""

    runner: Runner
    source: TaskSource
    hooks: Hooks
    executor: Executor | None = None  # where containers run (a thread each); None: the loop's default
    health: SourceHealth = field(init=False)
    report_tries: int = REPORT_TRIES
    # Told of each attempt's end (worker name, a record for /workers) and of each retry scheduled here.
    on_outcome: Callable[[str, dict[str, Any]], None] = lambda worker, record: None
    on_retry: Callable[[str, float], None] = lambda task_id, delay: None

    def __post_init__(self) -> None:
        self.health = SourceHealth(self.hooks)


def envelope_for(task: ClaimedTask) -> tuple[Envelope, context.TraceContext, bool]:
    """The task as its worker will see it (before the attempt's own trace context is set),
    the trace context its attempts hang from, and whether that context was made here.

    A task that came without a correlation id or trace context gets both derived
    from its id, so that every attempt, on any host, carries the same ones.
    """
    parent = context.parse(task.traceparent)
    root = parent is None
    if parent is None:
        parent = context.root_for(task.id)
    derived = hashlib.sha256(f"workerhost-correlation:{task.id}".encode()).hexdigest()[:32]
    correlation_id = task.correlation_id or derived
    envelope = Envelope(task.id, task.type, task.params, task.attempt, correlation_id, str(parent))
    return envelope, parent, root


class TaskRun:
    """One claimed task on one worker: a single attempt, then its report."""

    def __init__(
        self, task: ClaimedTask, worker: WorkerConfig, services: Services, claim_started_ns: int | None = None
    ) -> None:
        self.task = task
        self.worker = worker
        self.services = services
        self.claim_started_ns = claim_started_ns
        self.lease_lost: str | None = None
        self.result = RunResult(ContainerEnd(exit_code=None))  # the attempt's, once it ran
        envelope, parent, self.root = envelope_for(task)
        self.parent = str(parent)
        # The attempt's own span when something traces; otherwise the container continues the task's context.
        self.attempt_context = services.hooks.span_context(self.parent) or self.parent
        self.envelope = replace(envelope, traceparent=self.attempt_context)
        self.keys = TaskKeys(task.id, task.type, worker.name, task.attempt, envelope.correlation_id)
        self._side: set[asyncio.Task[None]] = set()

    async def __call__(self) -> Outcome | None:
        """Run the attempt and report it; returns its outcome (None when it was handed back or lost)."""
        source = self.services.source
        self._emit(events.TaskReceived, root=self.root, claim_started_ns=self.claim_started_ns)
        # The lease is renewed while the container runs and while its outcome is being reported.
        renewer = self._start_renewer()
        try:
            result, outcome = await self._attempt()
            self.result = result
            if result.cancelled:
                if self.lease_lost is not None:
                    self._emit(events.LeaseLost, error=self.lease_lost)
                    return None
                await asyncio.shield(source.release(self.task))
                self._emit(events.TaskReleased)
                return None
            await self._report(result, outcome)
        except LeaseLost as exc:
            self._emit(events.LeaseLost, error=str(exc))
            return None
        except SourceUnavailable as exc:
            log.error("task %s: could not hand it back (%s); it runs again once its claim expires", self.task.id, exc)
            return None
        finally:
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            await self._stop_side_tasks()
        return outcome

    # -- the attempt ------------------------------------------------------------------

    async def _attempt(self) -> tuple[RunResult, Outcome]:
        worker, start_ns = self.worker, time.time_ns()
        limits = {"cpus": worker.cpus, "memory": worker.memory, "pids": worker.pids_limit,
                  "timeout": worker.timeout, "network": worker.network, "runtime": worker.runtime}  # fmt: skip
        self._emit(events.AttemptStarted, image=worker.image, limits=limits, parent=self.parent, start_ns=start_ns)
        loop = asyncio.get_running_loop()
        result = RunResult(ContainerEnd(exit_code=None))
        outcome = _host_failure("the attempt was interrupted")
        try:
            result = await loop.run_in_executor(self.services.executor, self._run, self._observer(loop))
            outcome = classify(result.end)
        except Exception as exc:  # a bug of ours or of a driver: this attempt's outcome, never a lost task
            log.exception("task %s: the host failed while running this attempt", self.task.id)
            outcome = _host_failure(f"{type(exc).__name__}: {exc}")
        finally:
            self._finished(result, outcome, start_ns)
        return result, outcome

    def _run(self, observe: Observer) -> RunResult:
        return self.services.runner.run(self.worker, self.envelope, observe=observe)

    def _finished(self, result: RunResult, outcome: Outcome, start_ns: int) -> None:
        end = result.end
        self._emit(
            events.AttemptFinished, outcome=str(outcome.status), exit_code=outcome.exit_code,
            oom_killed=end.oom_killed, error=str(outcome.error) if outcome.error else None,
            duration=result.duration, start_latency=result.start_latency, container_id=result.container_id,
            image_id=result.image_id, stdin_bytes=result.stdin_bytes, stdout_bytes=len(end.stdout),
            stderr_bytes=result.stderr_bytes, phases=result.phases, side_channel=result.side_channel_problems,
            cancelled=result.cancelled, mode=result.mode, parent=self.parent, start_ns=start_ns,
            end_ns=time.time_ns(),
        )  # fmt: skip
        record = {"task_id": self.task.id, "outcome": str(outcome.status), "at": time.time()}
        self.services.on_outcome(self.worker.name, {**record, "duration": result.duration})

    # -- the report -------------------------------------------------------------------

    async def _report(self, result: RunResult, outcome: Outcome) -> None:
        source, task = self.services.source, self.task
        finished = Finished(
            outcome, self.worker.name, result.image_id,
            result.end.stderr_tail[-STDERR_TAIL:].decode("utf-8", "replace"), result.duration,
        )  # fmt: skip
        if outcome.ok:
            if await self._settle(lambda: source.complete(task, finished)):
                self._emit(events.TaskCompleted)
            return
        error = str(outcome.error or ErrorInfo("Unknown", "no error was reported"))
        label = str(outcome.status)
        if source.capabilities.owns_retries:
            if not await self._settle(lambda: source.fail(task, finished, None)):
                return
            # The source re-queues as it sees fit; a claim that says how many attempts it allows
            # tells the last one apart, so that metrics count it as the task's end.
            if task.max_attempts is not None and task.attempt >= task.max_attempts:
                self._emit(events.TaskFailed, outcome=label, error=error)
            else:
                self._emit(events.TaskReturned, outcome=label, error=error)
            return
        decision = RetryPolicy.for_worker(self.worker, task.max_attempts).decide(outcome, task.attempt)
        retry_in = decision.delay if decision.retry else None
        if not await self._settle(lambda: source.fail(task, finished, retry_in)):
            return
        if decision.retry:
            self.services.on_retry(task.id, decision.delay)
            self._emit(events.TaskRetrying, delay=round(decision.delay, 3), error=error)
        else:
            self._emit(events.TaskFailed, outcome=label, error=error)

    async def _settle(self, report: Callable[[], Awaitable[None]]) -> bool:
        """Report to the source, shielded from cancellation, retried while the source is down and the
        claim can still be accepted.

        Returns whether it landed. LeaseLost is raised; a report that can no longer land is logged
        (the task runs again once its claim expires).
        """
        health = self.services.health
        tries = 0
        while True:
            tries += 1
            try:
                await asyncio.shield(report())
            except SourceUnavailable as exc:
                health.down(str(exc))
                wait = max(backoff(tries, base=0.5, cap=10.0), exc.retry_after or 0.0)
                why_not = self._why_no_retry(tries, wait)
                if why_not is not None:
                    log.error("task %s: its outcome was not reported after %d tries (%s): %s; it will run again "
                              "once its claim expires", self.task.id, tries, exc, why_not)  # fmt: skip
                    return False
                await asyncio.sleep(wait)
            else:
                health.up()
                return True

    def _why_no_retry(self, tries: int, wait: float) -> str | None:
        """Why a report that failed ``tries`` times should not be tried again after ``wait``, or None."""
        if self.lease_lost is not None:
            return "the lease was lost meanwhile"
        capabilities = self.services.source.capabilities
        if capabilities.renew_every is not None:
            return None  # the lease is renewed meanwhile: it holds as long as the source says so
        if capabilities.claim_timeout is not None:
            expires = self.task.claimed_at + capabilities.claim_timeout
            return "the claim expires before the next try" if time.monotonic() + wait >= expires else None
        return f"{tries} tries" if tries >= self.services.report_tries else None

    # -- side tasks: lease renewal, progress ------------------------------------------

    def _start_renewer(self) -> asyncio.Task[None] | None:
        period = self.services.source.capabilities.renew_every
        if period is None:
            return None
        return asyncio.create_task(self._renew(period), name=f"renew-{self.task.id}")

    async def _renew(self, period: float) -> None:
        """Renew the lease every ``period`` while the container runs; a lost lease stops the container."""
        source, health = self.services.source, self.services.health
        while True:
            await asyncio.sleep(period)
            try:
                await source.renew(self.task)
            except LeaseLost as exc:
                self.lease_lost = str(exc)
                log.warning("task %s: %s; stopping its container", self.task.id, exc)
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self.services.runner.cancel, self.task.id)
                except EngineError as engine:
                    log.warning("task %s: could not stop its container: %s", self.task.id, engine)
                return
            except SourceUnavailable as exc:
                health.down(str(exc))
            except Exception:
                log.exception("task %s: renewing its lease failed; trying again in %gs", self.task.id, period)
            else:
                health.up()

    def _observer(self, loop: asyncio.AbstractEventLoop) -> Observer:
        """What the runner sees live (in its thread), turned into events on the loop."""

        def on_loop(item: Observed) -> None:
            if isinstance(item, str):
                self._emit(events.WorkerLog, line=item)
            elif isinstance(item, WorkerSpan):
                self._emit(events.WorkerSpanReceived, span=item)
            elif isinstance(item, Progress):
                self._emit(events.TaskProgress, percent=item.percent, message=item.message)
                self._forward_progress(item)
            elif isinstance(item, ContainerEvent):
                kind = events.ContainerCreated if item.kind == "created" else events.ContainerRemoved
                self._emit(kind, container_id=item.container_id)

        def observe(item: Observed) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (a forced exit)
                loop.call_soon_threadsafe(on_loop, item)

        return observe

    def _forward_progress(self, progress: Progress) -> None:
        """Tell a source that keeps progress (PrismQ); never waited for by the task, never fatal."""
        source = self.services.source
        if not source.capabilities.progress:
            return

        async def send() -> None:
            try:
                await source.progress(self.task, progress.percent, progress.message)
            except (SourceUnavailable, LeaseLost) as exc:
                log.warning("task %s: progress %g%% not forwarded: %s", self.task.id, progress.percent, exc)
            except Exception:
                log.exception("task %s: forwarding progress failed", self.task.id)

        handle = asyncio.create_task(send(), name=f"progress-{self.task.id}")
        self._side.add(handle)
        handle.add_done_callback(self._side.discard)

    async def _stop_side_tasks(self) -> None:
        """Let progress reports under way land (briefly), so none outlives its task."""
        if self._side:
            _, pending = await asyncio.wait(set(self._side), timeout=5)
            for handle in pending:
                handle.cancel()

    def _emit(self, kind: type[Event], **data: Any) -> None:
        keys = self.keys.asdict()
        # The receive hangs from the task, beside the attempts; the rest belong to the attempt.
        keys["traceparent"] = self.parent if kind is events.TaskReceived else self.attempt_context
        self.services.hooks.emit(kind(**keys, **data))


def _host_failure(message: str) -> Outcome:
    return Outcome(Status.FAILED, retriable=False, error=ErrorInfo("HostError", f"the host failed: {message}"))
