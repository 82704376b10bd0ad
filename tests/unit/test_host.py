"""runner.host: the real host loop against an in-memory source and a fake container runner.

No Docker and no network: ``InMemorySource`` implements the ``TaskSource`` port
over a dict and records every call; ``FakeRunner`` stands in for
``DockerRunner``, blocking its thread for as long as a task's params say and
ending the way they say. Each test runs ``Host.run`` in ``asyncio.run``,
usually in burst mode, so that it finishes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runner.config import Config, WorkerConfig, loads
from runner.docker import Observer, Orphan, Reaped, RunResult
from runner.errors import EngineError
from runner.host import Host
from runner.owners import owner_alive
from runner.protocol import ContainerEnd, EngineFault, Envelope, ErrorInfo
from runner.sidechannel import Progress
from runner.sources import (
    Capabilities,
    ClaimedTask,
    Finished,
    HeldTask,
    LeaseLost,
    Owner,
    Slots,
    SourceUnavailable,
    TaskSource,
)
from runner.telemetry import events
from runner.telemetry.events import Event, Hooks
from runner.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
OWNER = "test:1:x"
LIMIT = 8.0  # no test may hang: the host loop is stopped after this many seconds


# -- the in-memory source ------------------------------------------------------------


@dataclass
class Call:
    """One call the host made to the source."""

    name: str
    at: float  # time.monotonic()
    args: tuple[Any, ...]


@dataclass
class StoredTask:
    id: str
    type: str
    params: dict[str, Any]
    correlation_id: str | None = None
    traceparent: str | None = None
    status: str = "pending"  # pending, running, completed or failed (final)
    attempts: int = 0
    max_attempts: int | None = None
    owner: str | None = None  # the process that holds it while running
    run_at: float = 0.0  # time.monotonic() from which a pending task may be claimed
    finished: Finished | None = None


class InMemorySource(TaskSource):
    """The ``TaskSource`` port over a dict of tasks, recording every call.

    ``down`` makes every call but ``close`` raise ``SourceUnavailable``;
    ``complete_outages[id] = n`` makes the next n ``complete`` calls of that
    task raise it; ``lease_lost_on_complete`` holds the ids whose ``complete``
    raises ``LeaseLost``. ``ignore_types`` hands out tasks of any type (a
    misbehaving backend); ``claim_delay`` makes a claim take that long after
    it has picked its task (a round trip to a remote queue), ``report_delay``
    a ``complete`` or ``fail`` before it lands. ``retries_by_source`` says that
    the backend retries failed tasks by its own rules (as PrismQ's does); ``renew_every`` that it
    renews leases that often; ``registry`` that it keeps a registry of processes (``registered``),
    as the embedded queue does.
    """

    def __init__(
        self,
        *,
        ignore_types: bool = False,
        claim_delay: float = 0.0,
        retries_by_source: bool = False,
        renew_every: float | None = None,
        registry: bool = False,
        claim_timeout: float | None = None,
    ) -> None:
        self.capabilities = Capabilities(
            renew_every=renew_every, owns_retries=retries_by_source, progress=True, registry=registry,
            claim_timeout=claim_timeout,
        )  # fmt: skip
        self.heartbeat_every = 0.05
        self.registered: dict[str, Owner] = {}
        self.renew_error: BaseException | None = None  # raised by every renew()
        self.claim_error: BaseException | None = None  # raised by every claim()
        self.progress_calls: list[tuple[str, float, str | None]] = []
        self.tasks: dict[str, StoredTask] = {}
        self.calls: list[Call] = []
        self.down = False
        self.complete_outages: dict[str, int] = {}
        self.lease_lost_on_complete: set[str] = set()
        self.ignore_types = ignore_types
        self.claim_delay = claim_delay
        self.report_delay = 0.0
        self.claiming = False
        self.violations: list[str] = []  # reports of tasks the host did not hold
        self.outages: set[str] = set()  # the next call of each of these methods raises SourceUnavailable

    def add(
        self,
        task_id: str,
        task_type: str = "a",
        correlation_id: str | None = None,
        status: str = "pending",
        max_attempts: int | None = None,
        owner: str | None = None,
        **params: Any,
    ) -> None:
        attempts = 1 if status == "running" else 0
        self.tasks[task_id] = StoredTask(
            task_id, task_type, params, correlation_id, status=status, attempts=attempts,
            max_attempts=max_attempts, owner=owner,
        )  # fmt: skip

    # -- what the tests read --

    def named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    def completes(self, task_id: str) -> list[Call]:
        return [c for c in self.named("complete") if c.args[0] == task_id]

    def fails(self, task_id: str) -> list[Call]:
        return [c for c in self.named("fail") if c.args[0] == task_id]

    def status(self, task_id: str) -> str:
        return self.tasks[task_id].status

    def settled(self, *task_ids: str) -> bool:
        return all(self.tasks[t].status in ("completed", "failed") for t in task_ids)

    # -- the port --

    async def claim(self, task_types: Collection[str]) -> ClaimedTask | None:
        types = list(task_types)
        self._enter("claim", types)
        if self.claim_error is not None:
            raise self.claim_error
        now = time.monotonic()
        found = next(
            (
                t
                for t in self.tasks.values()
                if t.status == "pending" and t.run_at <= now and (self.ignore_types or t.type in types)
            ),
            None,
        )
        if found is not None:
            found.status = "running"
            found.attempts += 1
            found.owner = OWNER
        if self.claim_delay:
            self.claiming = True
            try:
                await asyncio.sleep(self.claim_delay)
            finally:
                self.claiming = False
        if found is None:
            return None
        return ClaimedTask(
            found.id,
            found.type,
            dict(found.params),
            found.attempts,
            found.correlation_id,
            found.traceparent,
            max_attempts=found.max_attempts,
            receipt=found.attempts,
        )

    async def renew(self, task: ClaimedTask) -> None:
        self._enter("renew", task.id)
        if self.renew_error is not None:
            raise self.renew_error

    async def complete(self, task: ClaimedTask, finished: Finished) -> None:
        self._enter("complete", task.id, finished)
        if self.complete_outages.get(task.id, 0) > 0:
            self.complete_outages[task.id] -= 1
            raise SourceUnavailable("the in-memory source blinked")
        if task.id in self.lease_lost_on_complete:
            raise LeaseLost(f"task {task.id}: the lease was lost")
        await asyncio.sleep(self.report_delay)
        self._settle(task, finished, "completed", None)

    async def fail(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        self._enter("fail", task.id, finished, retry_in)
        await asyncio.sleep(self.report_delay)
        self._settle(task, finished, "failed" if retry_in is None else "pending", retry_in)

    async def release(self, task: ClaimedTask) -> None:
        self._enter("release", task.id)
        stored = self._held(task)
        stored.status = "pending"
        stored.owner = None
        stored.attempts -= 1  # a released attempt does not count

    async def recover(self, held: HeldTask) -> None:
        self._enter("recover", held.task_id, held.owner)
        stored = self.tasks.get(held.task_id)
        if stored is not None and stored.status == "running" and stored.owner == held.owner:
            stored.status = "pending"
            stored.owner = None

    async def progress(self, task: ClaimedTask, percent: float, message: str | None) -> None:
        self._enter("progress", task.id)
        self.progress_calls.append((task.id, percent, message))

    async def heartbeat(self, owner: str, host_id: str) -> None:
        self._enter("heartbeat", owner)
        self.registered[owner] = Owner(owner, host_id, expired=False)

    async def forget(self, owner: str) -> None:
        self._enter("forget", owner)
        self.registered.pop(owner, None)

    async def owners(self) -> list[Owner]:
        self._enter("owners")
        return list(self.registered.values())

    async def held(self) -> list[HeldTask]:
        self._enter("held")
        return [HeldTask(t.id, t.owner or "", t.attempts) for t in self.tasks.values() if t.status == "running"]

    async def health(self) -> dict[str, Any]:
        self._enter("health")
        return {"type": "memory", "reachable": True}

    async def close(self) -> None:
        self.calls.append(Call("close", time.monotonic(), ()))

    # -- helpers --

    def _enter(self, name: str, *args: Any) -> None:
        self.calls.append(Call(name, time.monotonic(), args))
        if self.down:
            raise SourceUnavailable("the in-memory source is down")
        if name in self.outages:
            self.outages.discard(name)
            raise SourceUnavailable(f"the in-memory source blinked on {name}")

    def _held(self, task: ClaimedTask) -> StoredTask:
        stored = self.tasks[task.id]
        if stored.status != "running" or stored.attempts != task.receipt:
            self.violations.append(f"{task.id}: reported while {stored.status} (attempt {task.receipt})")
        return stored

    def _settle(self, task: ClaimedTask, finished: Finished, status: str, retry_in: float | None) -> None:
        stored = self._held(task)
        stored.status = status
        stored.owner = None
        stored.finished = finished
        if retry_in is not None:
            stored.run_at = time.monotonic() + retry_in


# -- the fake runner -------------------------------------------------------------------


@dataclass
class Run:
    """One container run as the fake runner saw it."""

    task_id: str
    worker: str
    envelope: Envelope
    start: float
    end: float = 0.0
    killed: bool = False


@dataclass
class FakeRunner:
    """``DockerRunner``'s place: each run blocks for ``params["sleep"]`` and ends as the params say.

    ``params["exit"]`` is the exit code of every attempt (0 by default, with
    ``params["result"]`` as the result); ``params["script"]`` gives one step
    per attempt (the last repeats): an exit code, ``"timeout"`` (killed at the
    deadline), ``"engine"`` (a retriable engine error) or ``"raise"`` (the
    runner itself raises). ``params["late"]`` makes a cancel come too late: the
    container has already ended, so the kill finds nothing and the run ends as
    it would have. ``params["progress"]`` is reported through the observer.
    ``containers`` maps a task id to the owner of a container left on the
    engine, for ``reap``; ``reap_error`` is raised by every ``reap``.
    """

    containers: dict[str, str] = field(default_factory=dict)
    reap_error: BaseException | None = None
    runs: list[Run] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    reap_calls: list[Callable[[str], bool]] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    pings: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stops: dict[str, threading.Event] = {}
        self._released = False

    def run(self, worker: WorkerConfig, envelope: Envelope, observe: Observer | None = None) -> RunResult:
        stop = threading.Event()
        record = Run(envelope.id, worker.name, envelope, time.monotonic())
        with self._lock:
            self.runs.append(record)
            self._stops[envelope.id] = stop
            if self._released:
                stop.set()
        if "progress" in envelope.params and observe is not None:
            observe(Progress(float(envelope.params["progress"]), "halfway"))
        killed = stop.wait(float(envelope.params.get("sleep", 0.0)))
        record.end = time.monotonic()
        with self._lock:
            self._stops.pop(envelope.id, None)
        duration = record.end - record.start
        if killed and not envelope.params.get("late"):
            record.killed = True
            return RunResult(
                ContainerEnd(exit_code=137), container_id=f"c-{envelope.id}", duration=duration, cancelled=True
            )
        if _step(envelope) == "raise":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return RunResult(_end(envelope), container_id=f"c-{envelope.id}", image_id="sha256:fake", duration=duration)

    def cancel(self, task_id: str) -> bool:
        with self._lock:
            self.killed.append(task_id)
            stop = self._stops.get(task_id)
            late = any(r.task_id == task_id and r.envelope.params.get("late") for r in self.runs)
        if stop is None:
            return False
        stop.set()
        return not late

    def reap(self, dead: Callable[[str], bool]) -> Reaped:
        self.reap_calls.append(dead)
        if self.reap_error is not None:
            raise self.reap_error
        removed = [Orphan(t, o, 1) for t, o in self.containers.items() if dead(o)]
        kept = frozenset(t for t, o in self.containers.items() if not dead(o))
        for orphan in removed:
            del self.containers[orphan.task_id]
        return Reaped(removed, kept)

    def ping(self) -> str | None:
        self.pings += 1
        return None

    def image_present(self, image: str) -> bool:
        return True

    def warm_counts(self) -> dict[str, dict[str, Any]]:
        return {}

    def close(self) -> None:
        self.closed = True
        self.release_all()

    def release_all(self) -> None:
        """End every run now and every later one at once (so that no thread outlives a failed test)."""
        with self._lock:
            self._released = True
            stops = list(self._stops.values())
        for stop in stops:
            stop.set()

    # -- what the tests read --

    def envelopes(self, task_id: str) -> list[Envelope]:
        return [r.envelope for r in self.runs if r.task_id == task_id]

    def started(self, task_id: str) -> bool:
        return any(r.task_id == task_id for r in self.runs)


def _step(envelope: Envelope) -> Any:
    params = envelope.params
    script = params.get("script", [params.get("exit", 0)])
    return script[min(envelope.attempt, len(script)) - 1]


def _end(envelope: Envelope) -> ContainerEnd:
    params = envelope.params
    step = _step(envelope)
    if step == "timeout":
        return ContainerEnd(exit_code=137, deadline_hit=True, timeout=5.0)
    if step == "engine":
        return ContainerEnd(
            exit_code=None,
            engine_error=ErrorInfo("EngineError", "the engine went away"),
            engine_fault=EngineFault.UNREACHABLE,
        )
    if step == 0:
        result = params.get("result", {"id": envelope.id, "attempt": envelope.attempt})
        return ContainerEnd(exit_code=0, stdout=json.dumps({"success": True, "result": result}).encode())
    error = {"type": "Busy" if step == 1 else "Bad", "message": f"exit {step}"}
    return ContainerEnd(exit_code=int(step), stdout=json.dumps({"success": False, "error": error}).encode())


# -- driving the host --------------------------------------------------------------------


class Recorder:
    """A hook that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def names(self, task_id: str | None = None) -> list[str]:
        return [e.name for e in self.events if task_id is None or e.task_id == task_id]

    def of(self, task_id: str) -> list[Event]:
        return [e for e in self.events if e.task_id == task_id]


def worker(
    name: str, types: list[str] | None = None, concurrency: int = 1, max_retries: int = 2, backoff: str = "10ms"
) -> str:
    return f"""
[[workers]]
name = "{name}"
image = "fake/{name}:1"
task_types = {json.dumps(types or [name])}
concurrency = {concurrency}
max_retries = {max_retries}
backoff = "{backoff}"
"""


def make_config(
    *workers: str, concurrency: int = 2, grace: str = "2s", poll_max: str = "100ms", reap_interval: str = "30s"
) -> Config:
    host = f"""
[host]
id = "test-host"
concurrency = {concurrency}
grace = "{grace}"
poll_max = "{poll_max}"
reap_interval = "{reap_interval}"
"""
    return loads(host + "".join(workers or (worker("a"),)), environ={})


During = Callable[[Host], Awaitable[None]]


def drive(
    config: Config,
    source: InMemorySource,
    runner: FakeRunner,
    *,
    hooks: Hooks | None = None,
    burst: bool = True,
    during: During | None = None,
    setup: Callable[[Host], None] | None = None,
) -> Host:
    """Run the real host until ``run()`` returns, with ``during`` running beside it
    (``setup`` is called with the host before it runs)."""

    async def main() -> Host:
        host = Host(config, source, runner, hooks, owner=OWNER)
        if setup is not None:
            setup(host)
        loop = asyncio.create_task(host.run(burst=burst), name="host")
        try:
            if during is not None:
                await asyncio.wait_for(during(host), LIMIT)
            await asyncio.wait_for(asyncio.shield(loop), LIMIT)
        finally:
            if not loop.done():  # a failed test: stop the loop, end the runs, and do not hang
                host.stop()
                runner.release_all()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(loop, 5)
        return host

    return asyncio.run(main())


async def until(predicate: Callable[[], bool], timeout: float = 3.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def stop_when(predicate: Callable[[], bool], what: str) -> During:
    """A ``during`` that stops the host once ``predicate`` holds (for runs that are not bursts)."""

    async def during(host: Host) -> None:
        await until(predicate, timeout=5.0, what=what)
        host.stop()

    return during


def max_overlap(runs: Iterable[Run]) -> int:
    """The most runs that were under way at one moment."""
    edges = sorted((t, delta) for r in runs for t, delta in ((r.start, 1), (r.end, -1)))  # ends sort first
    current = peak = 0
    for _, delta in edges:
        current += delta
        peak = max(peak, current)
    return peak


# -- claiming, running, reporting ----------------------------------------------------------


def test_every_task_completes_and_is_reported_once_with_its_result() -> None:
    source, runner = InMemorySource(), FakeRunner()
    ids = [f"t-{i}" for i in range(5)]
    for i, task_id in enumerate(ids):
        source.add(task_id, sleep=0.02, result={"n": i})

    drive(make_config(worker("a", concurrency=2)), source, runner)

    for i, task_id in enumerate(ids):
        [call] = source.completes(task_id)
        finished: Finished = call.args[1]
        assert finished.outcome.ok
        assert finished.outcome.result == {"n": i}
        assert finished.worker == "a"
        assert finished.image_id == "sha256:fake"
        assert source.status(task_id) == "completed"
        assert len(runner.envelopes(task_id)) == 1
    assert source.named("fail") == []
    assert source.violations == []


def test_host_concurrency_bounds_runs_across_workers() -> None:
    source, runner = InMemorySource(), FakeRunner()
    for i in range(6):
        source.add(f"t-{i}", sleep=0.1)

    drive(make_config(worker("a", concurrency=5), concurrency=2), source, runner)

    assert len(runner.runs) == 6
    assert max_overlap(runner.runs) == 2  # never more than the host's 2, and the 2 were used
    assert source.settled(*source.tasks)
    assert all(source.status(t) == "completed" for t in source.tasks)


def test_each_worker_keeps_to_its_concurrency_and_a_slow_one_starves_no_other() -> None:
    source, runner = InMemorySource(), FakeRunner()
    for i in range(3):  # first in the queue, so a host that ignored per-worker bounds would fill up with them
        source.add(f"slow-{i}", "a", sleep=0.3)
    for i in range(6):
        source.add(f"fast-{i}", "b", sleep=0.05)
    config = make_config(worker("a", concurrency=1), worker("b", concurrency=2), concurrency=3)

    drive(config, source, runner)

    slow = [r for r in runner.runs if r.worker == "a"]
    fast = [r for r in runner.runs if r.worker == "b"]
    assert len(slow) == 3 and len(fast) == 6
    assert max_overlap(slow) == 1
    assert max_overlap(fast) == 2
    assert max_overlap(runner.runs) <= 3
    assert max(r.end for r in fast) < max(r.end for r in slow)
    assert all(source.status(t) == "completed" for t in source.tasks)


# -- failures and retries --------------------------------------------------------------------


def test_retriable_failures_are_retried_through_the_source_then_reported_final() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", correlation_id="corr-1", exit=1)
    recorder = Recorder()

    drive(
        make_config(worker("a", max_retries=2, backoff="10ms")),
        source,
        runner,
        hooks=Hooks([recorder]),
        burst=False,
        during=stop_when(lambda: source.settled("t-1"), "t-1's final failure"),
    )

    fails = source.fails("t-1")
    retry_ins = [c.args[2] for c in fails]
    assert len(retry_ins) == 3  # the first attempt and max_retries = 2 more
    assert 0.01 <= retry_ins[0] <= 0.02  # backoff * 2**(n-1), plus up to one backoff of jitter
    assert 0.02 <= retry_ins[1] <= 0.03
    assert retry_ins[2] is None
    assert all(not c.args[1].outcome.ok and c.args[1].outcome.error.type == "Busy" for c in fails)
    assert source.status("t-1") == "failed"
    envelopes = runner.envelopes("t-1")
    assert [e.attempt for e in envelopes] == [1, 2, 3]
    assert {e.correlation_id for e in envelopes} == {"corr-1"}
    assert source.completes("t-1") == []
    assert recorder.names("t-1").count(events.TASK_RETRYING) == 2
    assert recorder.names("t-1").count(events.TASK_FAILED) == 1
    assert source.violations == []


@pytest.mark.parametrize(
    ("params", "error_type"),
    [({"exit": 2}, "Bad"), ({"script": ["timeout"]}, "Timeout")],
    ids=["permanent", "timeout"],
)
def test_permanent_failures_and_timeouts_are_final_at_once(params: dict[str, Any], error_type: str) -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", **params)

    drive(make_config(worker("a", max_retries=3)), source, runner)

    [call] = source.fails("t-1")
    finished: Finished = call.args[1]
    assert call.args[2] is None
    assert finished.outcome.error is not None and finished.outcome.error.type == error_type
    assert len(runner.runs) == 1
    assert source.status("t-1") == "failed"


def test_a_retriable_engine_error_is_retried() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", script=["engine", 0], result="second time lucky")

    drive(
        make_config(worker("a", max_retries=2)),
        source,
        runner,
        burst=False,
        during=stop_when(lambda: source.settled("t-1"), "t-1's outcome"),
    )

    [failed] = source.fails("t-1")
    assert failed.args[2] is not None and failed.args[2] > 0
    assert failed.args[1].outcome.error == ErrorInfo("EngineError", "the engine went away")
    [completed] = source.completes("t-1")
    assert completed.args[1].outcome.result == "second time lucky"
    assert [e.attempt for e in runner.envelopes("t-1")] == [1, 2]


def test_a_source_that_retries_by_itself_gets_every_failure_as_final() -> None:
    source, runner = InMemorySource(retries_by_source=True), FakeRunner()
    source.add("t-1", exit=1)
    recorder = Recorder()

    drive(make_config(worker("a", max_retries=3)), source, runner, hooks=Hooks([recorder]))

    [call] = source.fails("t-1")
    assert call.args[2] is None  # no retry_in: the backend's rules decide, so that retries do not multiply
    assert call.args[1].outcome.retriable
    assert len(runner.runs) == 1
    assert recorder.names("t-1")[-1] == events.TASK_RETURNED
    assert events.TASK_RETRYING not in recorder.names("t-1")


def test_burst_waits_for_a_retry_that_is_due() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", script=[1, 0])

    drive(make_config(worker("a", max_retries=2, backoff="100ms")), source, runner)

    assert len(source.completes("t-1")) == 1
    assert source.status("t-1") == "completed"


# -- the source misbehaving --------------------------------------------------------------------


def test_the_loop_backs_off_while_the_source_is_down_and_resumes_when_it_is_back() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1")
    source.add("t-2")
    source.down = True
    recorder = Recorder()

    async def outage(host: Host) -> None:
        await until(lambda: len(source.named("claim")) >= 3, timeout=5.0, what="three claims while down")
        first, second, third = (c.at for c in source.named("claim")[:3])
        # Backoff: 0.5-1 s after the first failure, 1-1.5 s after the second (0.5 * 2**(n-1) plus jitter).
        assert second - first >= 0.5 and third - second >= 1.0, "no backoff: the loop hammers a source that is down"
        assert host.source_error is not None and "down" in host.source_error
        assert recorder.names() == [events.SOURCE_DOWN]
        source.down = False

    host = drive(make_config(), source, runner, hooks=Hooks([recorder]), during=outage)

    assert source.status("t-1") == source.status("t-2") == "completed"
    assert host.source_error is None
    host_events = [e.name for e in recorder.events if e.task_id is None]
    assert host_events == [events.SOURCE_DOWN, events.SOURCE_UP]


def test_a_report_the_source_refuses_for_a_while_is_retried_until_it_lands() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", result={"kept": True})
    source.add("t-2")
    source.complete_outages["t-1"] = 2

    drive(make_config(), source, runner)

    calls = source.completes("t-1")
    assert len(calls) == 3
    assert all(c.args[1].outcome.result == {"kept": True} for c in calls)
    assert source.status("t-1") == "completed"
    assert source.tasks["t-1"].finished is not None
    assert source.tasks["t-1"].finished.outcome.result == {"kept": True}
    assert source.status("t-2") == "completed"
    assert len(runner.envelopes("t-1")) == 1  # the outcome was reported again, not the task run again


def test_the_source_is_up_again_once_a_refused_report_lands() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1")
    source.complete_outages["t-1"] = 1
    recorder = Recorder()

    host = drive(make_config(), source, runner, hooks=Hooks([recorder]))

    assert source.status("t-1") == "completed"
    assert recorder.names(None).count(events.SOURCE_DOWN) == 1
    assert host.source_error is None
    # Up at its first answer, down when the report is refused, up again once it lands.
    assert [e.name for e in recorder.events if e.task_id is None] == [
        events.SOURCE_UP, events.SOURCE_DOWN, events.SOURCE_UP,
    ]  # fmt: skip


def test_a_lost_lease_on_complete_is_an_event_and_the_loop_goes_on() -> None:
    source, runner = InMemorySource(), FakeRunner()
    for task_id in ("t-1", "t-2", "t-3"):
        source.add(task_id, sleep=0.02)
    source.lease_lost_on_complete.add("t-1")
    recorder = Recorder()

    drive(make_config(worker("a", concurrency=1), concurrency=1), source, runner, hooks=Hooks([recorder]))

    assert recorder.names("t-1")[-1] == events.LEASE_LOST
    assert events.TASK_COMPLETED not in recorder.names("t-1")
    assert len(source.completes("t-1")) == 1  # not retried: the task is someone else's now
    assert source.fails("t-1") == []
    assert source.status("t-2") == source.status("t-3") == "completed"


def test_a_task_of_a_type_no_worker_handles_is_failed_for_good() -> None:
    source, runner = InMemorySource(ignore_types=True), FakeRunner()
    source.add("t-odd", "nobody.handles.this")
    source.add("t-1")

    drive(make_config(), source, runner)

    [call] = source.fails("t-odd")
    finished: Finished = call.args[1]
    assert call.args[2] is None
    assert finished.outcome.error is not None and finished.outcome.error.type == "UnknownTaskType"
    assert source.status("t-odd") == "failed"
    assert not runner.started("t-odd")
    assert source.status("t-1") == "completed"


# -- drain and shutdown ------------------------------------------------------------------------


def test_stop_drains_a_task_in_flight_and_claims_nothing_more() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-long", sleep=0.5)
    source.report_delay = 0.2  # the report, too, is part of the task in flight
    stopped: list[float] = []

    async def stop_while_running(host: Host) -> None:
        await until(lambda: runner.started("t-long"), what="t-long to start")
        stopped.append(time.monotonic())
        host.stop()
        source.add("t-late")  # ready at once, but the host is stopping

    drive(make_config(worker("a", concurrency=2), grace="5s"), source, runner, burst=False, during=stop_while_running)
    returned = time.monotonic()

    assert [c for c in source.named("claim") if c.at >= stopped[0]] == []
    assert not runner.started("t-late")
    assert source.status("t-late") == "pending"
    assert len(source.completes("t-long")) == 1
    assert source.status("t-long") == "completed"
    assert runner.killed == []  # it finished within the grace: nothing was killed
    assert not runner.runs[0].killed
    assert source.named("release") == []
    assert runner.runs[0].end <= returned


def test_past_the_grace_period_the_container_is_killed_and_the_task_released() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", sleep=30)
    recorder = Recorder()
    stopped: list[float] = []

    async def stop_while_running(host: Host) -> None:
        await until(lambda: runner.started("t-1"), what="t-1 to start")
        stopped.append(time.monotonic())
        host.stop()

    drive(make_config(grace="300ms"), source, runner, hooks=Hooks([recorder]), burst=False, during=stop_while_running)
    returned = time.monotonic()

    assert runner.killed == ["t-1"]
    assert runner.runs[0].killed  # killed, not left to run its 30 s
    assert runner.runs[0].end - stopped[0] >= 0.3  # not before the grace was over
    assert [c.args[0] for c in source.named("release")] == ["t-1"]
    assert source.named("complete") == source.named("fail") == []
    assert source.status("t-1") == "pending"
    assert source.tasks["t-1"].attempts == 0  # handed back: the attempt does not count
    assert recorder.names("t-1")[-1] == events.TASK_RELEASED
    assert runner.runs[0].end <= returned


# -- start-up, hooks, events, wake ------------------------------------------------------------


def dead_token() -> str:
    """The owner token of a process of this machine that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return token(child.pid)


def test_what_dead_processes_left_is_handed_back_before_any_claim_and_nothing_of_the_living() -> None:
    source, runner = InMemorySource(registry=True), FakeRunner()
    dead_here = dead_token()  # this machine, and its pid is gone: dead at once
    expired = "elsewhere:7:x"  # another machine whose heartbeat expired
    alive = "elsewhere:8:y"  # another machine, heartbeating
    unknown = "elsewhere:9:z"  # another machine the registry has never seen
    elsewhere = "elsewhere:6:w"  # dead too, but of another host id: its containers are not ours to see
    for owner, host_id, gone in [(dead_here, "test-host", False), (expired, "test-host", True),
                                 (alive, "test-host", False), (elsewhere, "other-host", True)]:  # fmt: skip
        source.registered[owner] = Owner(owner, host_id, expired=gone)
    source.add("left-container", status="running", owner=dead_here)
    source.add("no-container-yet", status="running", owner=dead_here)  # claimed, killed before its container
    source.add("expired", status="running", owner=expired)
    source.add("live", status="running", owner=alive, sleep=0)
    source.add("unknown", status="running", owner=unknown)
    source.add("other-host", status="running", owner=elsewhere)
    source.add("fresh")
    runner.containers = {"left-container": dead_here, "expired": expired, "live": alive, "unknown": unknown}

    drive(make_config(), source, runner)

    names = [c.name for c in source.calls]
    first_claim = names.index("claim")
    recovered = [c.args[0] for c in source.named("recover")]
    assert sorted(recovered) == ["expired", "left-container", "no-container-yet"]
    assert all(names.index("recover") < first_claim for _ in recovered)
    assert set(runner.containers) == {"live", "unknown"}  # the living and the unknown keep theirs
    assert source.status("live") == source.status("unknown") == source.status("other-host") == "running"
    for task_id in ("left-container", "no-container-yet", "expired", "fresh"):
        assert source.status(task_id) == "completed"


def test_a_live_sibling_hands_back_a_dead_siblings_tasks_within_a_janitor_turn() -> None:
    source, runner = InMemorySource(registry=True), FakeRunner()
    sibling = "elsewhere:7:x"
    source.registered[sibling] = Owner(sibling, "test-host", expired=False)
    source.add("t-1", status="running", owner=sibling)
    runner.containers = {"t-1": sibling}

    async def sibling_dies(host: Host) -> None:
        await until(lambda: len(source.named("held")) >= 2, what="a janitor turn")
        assert source.status("t-1") == "running" and "t-1" in runner.containers  # alive: untouched
        source.registered[sibling] = Owner(sibling, "test-host", expired=True)  # its heartbeat stops
        await until(lambda: source.status("t-1") == "completed", what="t-1 handed back and run here")
        host.stop()

    drive(make_config(reap_interval="50ms"), source, runner, burst=False, during=sibling_dies)

    assert runner.containers == {}
    assert [c.args for c in source.named("recover")] == [("t-1", sibling)]


def test_a_hook_that_always_raises_changes_no_outcome() -> None:
    source, runner = InMemorySource(), FakeRunner()
    for i in range(4):
        source.add(f"t-{i}", exit=0 if i else 2)
    recorder = Recorder()
    calls: list[str] = []

    def broken(event: Event) -> None:
        calls.append(event.name)
        raise RuntimeError("telemetry is broken")

    drive(make_config(), source, runner, hooks=Hooks([broken, recorder]))

    assert calls, "the broken hook was never called"
    assert source.status("t-0") == "failed"
    assert all(source.status(f"t-{i}") == "completed" for i in (1, 2, 3))
    assert all(len(source.completes(f"t-{i}")) == 1 for i in (1, 2, 3))
    assert recorder.names("t-1")[-1] == events.TASK_COMPLETED  # later hooks still see every event


def test_a_completed_task_meets_its_events_in_order_with_its_keys() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", correlation_id="corr-9")
    source.add("t-2")  # no correlation id: the host makes one, the same for its worker and its events
    recorder = Recorder()

    drive(make_config(worker("a", concurrency=1), concurrency=1), source, runner, hooks=Hooks([recorder]))

    expected = [events.TASK_RECEIVED, events.ATTEMPT_STARTED, events.ATTEMPT_FINISHED, events.TASK_COMPLETED]
    for task_id in ("t-1", "t-2"):
        assert recorder.names(task_id) == expected
        [envelope] = runner.envelopes(task_id)
        for event in recorder.of(task_id):
            assert (event.task_id, event.task_type, event.worker, event.attempt) == (task_id, "a", "a", 1)
            assert event.correlation_id == envelope.correlation_id
    assert {e.correlation_id for e in recorder.of("t-1")} == {"corr-9"}
    finished = next(e for e in recorder.of("t-1") if e.name == events.ATTEMPT_FINISHED)
    assert finished.data["outcome"] == "completed"
    assert finished.data["exit_code"] == 0


def test_wake_makes_an_idle_host_claim_at_once() -> None:
    source, runner = InMemorySource(), FakeRunner()
    woken: list[float] = []

    async def submit(host: Host) -> None:
        # After the 6th empty claim the idle pause is 1.6-1.65 s (0.05 * 2**5, poll_max 60 s).
        await until(lambda: len(source.named("claim")) >= 6, timeout=5.0, what="the host to idle")
        source.add("t-1")
        woken.append(time.monotonic())
        host.wake()
        await until(lambda: source.settled("t-1"), what="t-1 to complete")
        host.stop()

    drive(make_config(poll_max="60s"), source, runner, burst=False, during=submit)

    [run] = runner.runs
    assert run.start - woken[0] < 1.5  # woken, not after the pause
    assert source.status("t-1") == "completed"


def test_a_wake_during_a_claim_is_not_lost() -> None:
    source, runner = InMemorySource(claim_delay=0.05), FakeRunner()
    woken: list[float] = []

    async def submit_during_a_claim(host: Host) -> None:
        # The 6th claim's pause would be 1.6-1.65 s (0.05 * 2**5, poll_max 60 s).
        await until(lambda: len(source.named("claim")) >= 6 and source.claiming, timeout=5.0, what="a claim under way")
        source.add("t-1")  # the claim under way has already looked, and comes back empty
        woken.append(time.monotonic())
        host.wake()
        await until(lambda: source.settled("t-1"), what="t-1 to complete")
        host.stop()

    drive(make_config(poll_max="60s"), source, runner, burst=False, during=submit_during_a_claim)

    [run] = runner.runs
    assert run.start - woken[0] < 1.5  # woken, not after the pause


# -- owner_alive ------------------------------------------------------------------------------


@contextlib.contextmanager
def process(*argv: str) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(argv)
    try:
        # Until it has exec'd, the child's cmdline is its parent's.
        deadline = time.monotonic() + 5
        while b"sleep" not in Path(f"/proc/{child.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.01)
        yield child
    finally:
        child.kill()
        child.wait()


def token(pid: int, hostname: str | None = None) -> str:
    return f"{hostname or socket.gethostname()}:{pid}:abcd1234"


def test_owner_alive_for_a_live_host_process_on_this_machine() -> None:
    with process(sys.executable, "-c", "import time; time.sleep(30)", "runner", "serve") as child:
        assert owner_alive(token(child.pid))
        assert not owner_alive(token(child.pid, hostname="another-" + socket.gethostname()))


def test_owner_alive_is_false_for_a_process_that_is_not_a_host() -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    with process(sleep, "30") as child:
        assert not owner_alive(token(child.pid))
    # Another program's pid that happens to mention "runner" (a CI runner, say) is no host either.
    with process(sys.executable, "-c", "import time; time.sleep(30)", "gitlab-runner", "run") as child:
        assert not owner_alive(token(child.pid))


def test_owner_alive_is_false_for_a_dead_process() -> None:
    with process(sys.executable, "-c", "import time; time.sleep(30)", "runner", "serve") as child:
        pid = child.pid
    assert not owner_alive(token(pid))


def test_owner_alive_is_false_for_our_own_pid() -> None:
    # Asked from a process whose cmdline says "runner", so that only the own-pid rule can say no.
    code = "import os; from runner.owners import owner_alive, new_owner; print(owner_alive(new_owner()))"
    done = subprocess.run(
        [sys.executable, "-c", code, "runner", "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.strip() == "False"
    assert not owner_alive(token(os.getpid()))


@pytest.mark.parametrize("owner", ["", "garbage", f"{socket.gethostname()}:notapid:x", f"{socket.gethostname()}"])
def test_owner_alive_is_false_for_malformed_tokens(owner: str) -> None:
    assert not owner_alive(owner)


# -- the core's lifecycle: every way out drains, side tasks are watched -----------------------


def test_an_error_in_the_claim_loop_still_drains_the_tasks_in_flight() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", sleep=0.3, result="kept")

    async def main() -> Host:
        host = Host(make_config(), source, runner, owner=OWNER)
        real = host._room

        def broken() -> tuple[list[Slots], int]:
            if runner.started("t-1"):
                raise RuntimeError("a bug in the loop")
            return real()

        host._room = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="a bug in the loop"):
            await asyncio.wait_for(host.run(), LIMIT)
        return host

    host = asyncio.run(main())

    assert source.status("t-1") == "completed"  # it finished and was reported before run() gave up
    assert source.tasks["t-1"].finished is not None and source.tasks["t-1"].finished.outcome.result == "kept"
    assert not runner.runs[0].killed
    assert host.in_flight == {} and not host.alive


def test_a_cancelled_host_still_drains_the_tasks_in_flight() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", sleep=0.3)

    async def main() -> None:
        host = Host(make_config(grace="5s"), source, runner, owner=OWNER)
        loop = asyncio.create_task(host.run(burst=False))
        await until(lambda: runner.started("t-1"), what="t-1 to start")
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(loop, LIMIT)

    asyncio.run(main())

    assert source.status("t-1") == "completed"
    assert len(source.completes("t-1")) == 1
    assert runner.killed == []


def test_a_janitor_turn_that_fails_is_logged_and_the_next_one_runs(caplog: pytest.LogCaptureFixture) -> None:
    source, runner = InMemorySource(), FakeRunner()
    pings = [RuntimeError("the ping exploded"), None, None]
    real_reap = runner.reap

    def ping() -> str | None:
        outcome = pings.pop(0) if pings else None
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    runner.ping = ping  # type: ignore[method-assign]

    drive(
        make_config(reap_interval="20ms"), source, runner, burst=False,
        during=stop_when(lambda: len(runner.reap_calls) >= 3, "janitor turns after the failure"),
    )  # fmt: skip

    assert real_reap is not None
    failures = [r for r in caplog.records if "side task janitor failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "the ping exploded" in str(failures[0].exc_info[1])


def test_the_lease_is_renewed_while_the_container_runs() -> None:
    source, runner = InMemorySource(renew_every=0.05), FakeRunner()
    source.add("t-1", sleep=0.5)
    recorder = Recorder()

    drive(make_config(), source, runner, hooks=Hooks([recorder]))

    renewals = source.named("renew")
    assert len(renewals) >= 3
    [completed] = source.completes("t-1")
    assert all(c.at < completed.at for c in renewals)  # only while the task was held (run, then report)
    assert sum(c.at < runner.runs[0].end for c in renewals) >= 3  # and all along the run
    assert source.status("t-1") == "completed"
    assert events.SOURCE_DOWN not in recorder.names(None)


def test_a_source_that_cannot_renew_is_never_renewed_and_not_counted_up() -> None:
    source, runner = InMemorySource(renew_every=None), FakeRunner()
    source.add("t-1", sleep=0.3)
    source.down = True  # only until the first claim fails: then back
    recorder = Recorder()

    async def back(host: Host) -> None:
        await until(lambda: len(source.named("claim")) >= 1, what="a first claim")
        source.down = False

    drive(make_config(), source, runner, hooks=Hooks([recorder]), during=back)

    assert source.named("renew") == []
    assert [e.name for e in recorder.events if e.task_id is None] == [events.SOURCE_DOWN, events.SOURCE_UP]


def test_a_lost_lease_stops_the_container_and_reports_nothing() -> None:
    source, runner = InMemorySource(renew_every=0.05), FakeRunner()
    source.add("t-1", sleep=30)
    source.renew_error = LeaseLost("task t-1: the lease was lost (it expired and the task moved on)")
    recorder = Recorder()

    drive(make_config(), source, runner, hooks=Hooks([recorder]))

    assert runner.killed == ["t-1"] and runner.runs[0].killed  # not left to run its 30 s for nobody
    assert source.named("complete") == source.named("fail") == source.named("release") == []
    assert recorder.names("t-1")[-1] == events.LEASE_LOST
    assert "lease was lost" in recorder.of("t-1")[-1].data["error"]


def test_renewal_during_an_outage_marks_the_source_down_then_up(caplog: pytest.LogCaptureFixture) -> None:
    source, runner = InMemorySource(renew_every=0.05), FakeRunner()
    source.add("t-1", sleep=0.6)
    recorder = Recorder()

    async def blink(host: Host) -> None:
        await until(lambda: len(source.named("renew")) >= 1, what="a first renewal")
        source.outages.add("renew")
        await until(lambda: host.source_error is not None, what="the outage to be seen")

    drive(make_config(), source, runner, hooks=Hooks([recorder]), during=blink)

    assert [e.name for e in recorder.events if e.task_id is None] == [
        events.SOURCE_UP, events.SOURCE_DOWN, events.SOURCE_UP,
    ]  # fmt: skip
    assert source.status("t-1") == "completed"


def test_an_unexpected_renewal_error_is_logged_and_renewal_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    source, runner = InMemorySource(renew_every=0.05), FakeRunner()
    source.add("t-1", sleep=0.4)
    source.renew_error = RuntimeError("the adapter has a bug")

    drive(make_config(), source, runner)

    assert len(source.named("renew")) >= 3  # tried again at each turn
    logged = [r for r in caplog.records if "renewing its lease failed" in r.getMessage()]
    assert logged and all("t-1" in r.getMessage() and r.exc_info for r in logged)
    assert source.status("t-1") == "completed"


def test_a_runner_that_raises_ends_the_attempt_with_a_named_reason_reported_at_once() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", script=["raise"])
    source.add("t-2")
    recorder = Recorder()
    metrics = Metrics()

    drive(make_config(worker("a", max_retries=3)), source, runner, hooks=Hooks([recorder, metrics]))

    assert recorder.names("t-1") == [
        events.TASK_RECEIVED, events.ATTEMPT_STARTED, events.ATTEMPT_FINISHED, events.TASK_FAILED,
    ]  # fmt: skip
    [call] = source.fails("t-1")
    finished: Finished = call.args[1]
    assert call.args[2] is None  # permanent: the same input would fail the same way
    assert finished.outcome.error is not None and finished.outcome.error.type == "HostError"
    assert "UnicodeEncodeError" in finished.outcome.error.message
    assert source.status("t-2") == "completed"  # the host went on
    assert metrics.in_flight.labels("a")._value.get() == 0


def test_a_container_that_ended_as_the_grace_ran_out_is_reported_not_thrown_away() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", sleep=30, late=True, result="done just in time")

    async def stop_while_running(host: Host) -> None:
        await until(lambda: runner.started("t-1"), what="t-1 to start")
        host.stop()

    drive(make_config(grace="200ms"), source, runner, burst=False, during=stop_while_running)

    assert runner.killed == ["t-1"]  # the kill was sent, and found the container already gone
    assert source.named("release") == []
    assert source.status("t-1") == "completed"
    assert source.tasks["t-1"].finished is not None
    assert source.tasks["t-1"].finished.outcome.result == "done just in time"


@pytest.mark.parametrize(("max_attempts", "max_retries", "runs"), [(3, 0, 3), (1, 5, 1)])
def test_the_tasks_own_max_attempts_decides_its_retries(max_attempts: int, max_retries: int, runs: int) -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", exit=1, max_attempts=max_attempts)

    drive(make_config(worker("a", max_retries=max_retries)), source, runner)

    assert [e.attempt for e in runner.envelopes("t-1")] == list(range(1, runs + 1))
    assert source.status("t-1") == "failed"
    assert source.fails("t-1")[-1].args[2] is None


def test_progress_is_forwarded_to_a_source_that_keeps_it() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", progress=50, sleep=0.1)
    recorder = Recorder()

    drive(make_config(), source, runner, hooks=Hooks([recorder]))

    assert source.progress_calls == [("t-1", 50.0, "halfway")]
    [progress] = [e for e in recorder.of("t-1") if e.name == events.TASK_PROGRESS]
    assert (progress.data["percent"], progress.data["message"]) == (50.0, "halfway")


def test_progress_that_cannot_be_forwarded_is_logged_and_the_task_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", progress=50)
    source.outages.add("progress")

    drive(make_config(), source, runner)

    assert source.status("t-1") == "completed"
    [logged] = [r for r in caplog.records if "not forwarded" in r.getMessage()]
    assert "t-1" in logged.getMessage() and "blinked on progress" in logged.getMessage()


def test_a_report_that_never_lands_is_logged_once_and_the_host_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1")
    source.add("t-2")
    source.complete_outages["t-1"] = 1000

    def few_tries(host: Host) -> None:
        host.services.report_tries = 3

    drive(make_config(), source, runner, setup=few_tries)

    assert len(source.completes("t-1")) == 3
    assert source.status("t-1") == "running"  # not reported: its lease will expire and it runs again
    [logged] = [r for r in caplog.records if "was not reported" in r.getMessage()]
    assert "t-1" in logged.getMessage() and "3 tries" in logged.getMessage()
    assert source.status("t-2") == "completed"
    assert len(runner.envelopes("t-1")) == 1  # not run again here


def test_a_reap_the_engine_refuses_at_start_is_logged_and_the_host_serves(caplog: pytest.LogCaptureFixture) -> None:
    source, runner = InMemorySource(), FakeRunner(reap_error=EngineError("the Docker engine does not answer"))
    source.add("t-1")

    drive(make_config(), source, runner)

    assert source.status("t-1") == "completed"
    [logged] = [r for r in caplog.records if "could not look for what dead processes left" in r.getMessage()]
    assert "does not answer" in logged.getMessage()


def test_an_adapter_bug_in_claim_is_logged_and_the_host_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1")
    source.claim_error = TypeError("the adapter has a bug")

    async def fixed(host: Host) -> None:
        await until(lambda: len(source.named("claim")) >= 2, what="two claims")
        source.claim_error = None

    host = drive(make_config(), source, runner, during=fixed)

    assert source.status("t-1") == "completed"
    logged = [r for r in caplog.records if "failed to claim" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert host.source_error is None


def test_the_heartbeat_goes_on_while_the_drain_waits_and_stops_with_a_goodbye() -> None:
    source, runner = InMemorySource(registry=True), FakeRunner()
    source.add("t-1", sleep=0.5)
    stopped: list[float] = []

    async def stop_while_running(host: Host) -> None:
        await until(lambda: runner.started("t-1"), what="t-1 to start")
        stopped.append(time.monotonic())
        host.stop()

    drive(make_config(grace="5s"), source, runner, burst=False, during=stop_while_running)

    beats = [c.at for c in source.named("heartbeat")]
    assert beats[0] < source.named("claim")[0].at  # registered before the first claim
    assert any(stopped[0] < at < runner.runs[0].end for at in beats)  # a sibling still sees it alive
    assert source.named("forget") and source.named("forget")[0].at >= runner.runs[0].end
    assert source.registered == {}
    assert source.status("t-1") == "completed"


class _Fatal(BaseException):
    """Not an Exception: what a side task's turn does not catch."""


def test_a_side_task_that_ends_for_good_stops_the_host_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    source, runner = InMemorySource(registry=True), FakeRunner()
    source.add("t-1", sleep=0.3)
    beats = 0
    real = source.heartbeat

    async def heartbeat(owner: str, host_id: str) -> None:
        nonlocal beats
        beats += 1
        if beats == 3:
            raise _Fatal("the heartbeat is gone for good")
        await real(owner, host_id)

    source.heartbeat = heartbeat  # type: ignore[method-assign]

    host = drive(make_config(), source, runner, burst=False)  # stops by itself, or drive times out

    assert host.stopping.is_set() and not host.alive
    assert source.status("t-1") == "completed"  # drained, not abandoned
    [logged] = [r for r in caplog.records if "side task heartbeat ended" in r.getMessage()]
    assert "the heartbeat is gone for good" in logged.getMessage()


def test_a_source_that_retries_by_itself_and_names_the_attempt_limit_ends_the_task_on_the_last() -> None:
    source, runner = InMemorySource(retries_by_source=True), FakeRunner()
    source.add("last", exit=1, max_attempts=1)  # this claim is its last attempt
    source.add("more", exit=1, max_attempts=3)  # the source will hand it out again
    recorder = Recorder()

    drive(make_config(), source, runner, hooks=Hooks([recorder]))

    assert recorder.names("last")[-1] == events.TASK_FAILED
    assert recorder.names("more")[-1] == events.TASK_RETURNED
    assert source.fails("last")[0].args[2] is None and source.fails("more")[0].args[2] is None


def test_a_source_that_answers_is_up_from_its_first_answer() -> None:
    source, runner = InMemorySource(), FakeRunner()
    metrics = Metrics()

    drive(make_config(), source, runner, hooks=Hooks([metrics]))

    assert metrics.source_up._value.get() == 1  # not 0 while it answers (it had never been down)


def test_a_source_that_asks_for_a_pause_gets_it_whatever_wakes_the_host() -> None:
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1")
    asked: list[float] = []

    async def claim(task_types: Collection[str]) -> ClaimedTask | None:
        if not asked:
            asked.append(time.monotonic())
            raise SourceUnavailable("429 Too Many Requests: try again in 1 seconds", retry_after=1.0)
        return await InMemorySource.claim(source, task_types)

    source.claim = claim  # type: ignore[method-assign]

    async def submit_meanwhile(host: Host) -> None:
        await until(lambda: bool(asked), what="the 429")
        for _ in range(5):  # submits wake the host; they must not cut the pause short
            host.wake()
            await asyncio.sleep(0.05)

    drive(make_config(), source, runner, during=submit_meanwhile)

    [run] = runner.runs
    assert run.start - asked[0] >= 1.0  # a backoff alone would be 0.5-1 s
    assert source.status("t-1") == "completed"


def test_a_report_is_tried_again_while_the_claim_can_still_be_accepted(caplog: pytest.LogCaptureFixture) -> None:
    # PrismQ's claims cannot be renewed but hold for claim_timeout: the report goes on past report_tries.
    source, runner = InMemorySource(claim_timeout=60.0), FakeRunner()
    source.add("t-1")
    source.complete_outages["t-1"] = 3

    def few_tries(host: Host) -> None:
        host.services.report_tries = 2

    drive(make_config(), source, runner, setup=few_tries)

    assert len(source.completes("t-1")) == 4  # two more than report_tries
    assert source.status("t-1") == "completed"
    assert not [r for r in caplog.records if "was not reported" in r.getMessage()]


def test_a_report_gives_up_when_the_claim_would_expire_before_the_next_try(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, runner = InMemorySource(claim_timeout=1.5), FakeRunner()
    source.add("t-1")
    source.complete_outages["t-1"] = 1000

    drive(make_config(), source, runner)

    tries = source.completes("t-1")
    assert 2 <= len(tries) <= 4  # 0.5-1 s, then 1-1.5 s: the claim is over by the third wait
    assert tries[-1].at - source.named("claim")[0].at < 1.5
    [logged] = [r for r in caplog.records if "was not reported" in r.getMessage()]
    assert "the claim expires before the next try" in logged.getMessage()


def test_a_renewable_lease_is_renewed_while_the_report_waits_for_the_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, runner = InMemorySource(renew_every=0.05), FakeRunner()
    source.add("t-1")
    source.complete_outages["t-1"] = 3

    def few_tries(host: Host) -> None:
        host.services.report_tries = 1  # not what decides: the lease does

    drive(make_config(), source, runner, setup=few_tries)

    completes = source.completes("t-1")
    assert len(completes) == 4 and source.status("t-1") == "completed"
    assert [c for c in source.named("renew") if completes[0].at < c.at < completes[-1].at]  # renewed meanwhile


def test_a_task_claimed_again_while_its_first_attempt_runs_is_two_claims_in_flight() -> None:
    # A source whose claims expire (PrismQ) may hand this host the task again meanwhile.
    source, runner = InMemorySource(), FakeRunner()
    source.add("t-1", sleep=0.4)
    seen: list[int] = []

    async def expire_the_claim(host: Host) -> None:
        await until(lambda: runner.started("t-1"), what="the first attempt")
        source.tasks["t-1"].status = "pending"  # its claim expired on the source's clock
        await until(lambda: len(runner.envelopes("t-1")) == 2, what="the second claim")
        seen.append(len(host.in_flight))

    host = drive(make_config(worker("a", concurrency=2)), source, runner, during=expire_the_claim)

    assert seen == [2]  # both attempts held, neither entry overwriting the other
    assert [e.attempt for e in runner.envelopes("t-1")] == [1, 2]
    assert host.in_flight == {}
    assert host.workers["a"].in_flight == 0


# -- batch claims -------------------------------------------------------------------------------


class BatchSource(InMemorySource):
    """An in-memory source that claims several tasks per call (``claim_many``), in the order they
    were added, keeping to the room it is given; each call's batch is recorded. ``greedy`` hands
    out every ready task of the types asked for, whatever the room (a misbehaving backend)."""

    def __init__(self, greedy: bool = False) -> None:
        super().__init__()
        self.greedy = greedy
        self.batches: list[tuple[list[Slots], int, list[str]]] = []

    async def claim_many(self, slots: Sequence[Slots], limit: int) -> list[ClaimedTask]:
        self._enter("claim_many", list(slots), limit)
        free = [s.free for s in slots]
        taken: list[ClaimedTask] = []
        for task in self.tasks.values():
            group = next((i for i, s in enumerate(slots) if task.type in s.task_types), None)
            if task.status != "pending" or task.run_at > time.monotonic() or group is None:
                continue
            if not self.greedy and (len(taken) >= limit or free[group] <= 0):
                continue
            free[group] -= 1
            task.status, task.owner = "running", OWNER
            task.attempts += 1
            taken.append(ClaimedTask(task.id, task.type, dict(task.params), task.attempts, receipt=task.attempts))
        self.batches.append((list(slots), limit, [t.id for t in taken]))
        return taken


def test_the_host_claims_as_many_as_it_has_room_for_in_one_call_and_never_more() -> None:
    source, runner = BatchSource(), FakeRunner()
    for i in range(8):
        source.add(f"a-{i}", "a", sleep=0.15)
        source.add(f"b-{i}", "b", sleep=0.15)
    config = make_config(worker("a", concurrency=3), worker("b", concurrency=2), concurrency=4)

    drive(config, source, runner)

    slots, limit, first = source.batches[0]
    assert (slots, limit) == ([Slots(("a",), 3), Slots(("b",), 2)], 4)  # each worker's free slots, the host's
    assert first == ["a-0", "b-0", "a-1", "b-1"]  # four in one round trip
    assert source.named("claim") == []
    assert max_overlap(r for r in runner.runs if r.worker == "a") <= 3
    assert max_overlap(r for r in runner.runs if r.worker == "b") <= 2
    assert max_overlap(runner.runs) == 4
    for slots, limit, _ in source.batches:  # every later call asked only for what was free then
        assert 1 <= limit <= 4 and all(1 <= s.free <= limit for s in slots)
    assert all(source.status(t) == "completed" for t in source.tasks)
    assert source.violations == []


def test_tasks_a_source_hands_out_beyond_the_room_go_back_and_the_bounds_hold() -> None:
    source, runner = BatchSource(greedy=True), FakeRunner()
    for i in range(6):
        source.add(f"a-{i}", "a", sleep=0.1)
        source.add(f"b-{i}", "b", sleep=0.1)
    config = make_config(worker("a", concurrency=2), worker("b", concurrency=2), concurrency=3)

    drive(config, source, runner)

    assert max_overlap(r for r in runner.runs if r.worker == "a") <= 2
    assert max_overlap(r for r in runner.runs if r.worker == "b") <= 2
    assert max_overlap(runner.runs) <= 3
    assert source.named("release")  # what did not fit went back...
    assert all(source.status(t) == "completed" for t in source.tasks)  # ...and ran later,
    assert {len(runner.envelopes(t)) for t in source.tasks} == {1}  # once each,
    assert {t.attempts for t in source.tasks.values()} == {1}  # a handed-back claim not counted
    assert source.violations == []
