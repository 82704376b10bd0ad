"""runner.retries and runner.attempts: when to try again, and a task's attempts against a fake runner."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest

from runner.attempts import Report, new_task, run_task
from runner.config import WorkerConfig
from runner.docker import Observer, RunResult
from runner.protocol import ContainerEnd, EngineFault, Envelope, ErrorInfo, Outcome, Status
from runner.retries import STOP, Decision, RetryPolicy

RETRIABLE = Outcome(Status.FAILED, retriable=True, error=ErrorInfo("Busy", "try later"), exit_code=1)
PERMANENT = Outcome(Status.FAILED, retriable=False, error=ErrorInfo("Bad", "no"), exit_code=2)
TIMEOUT = Outcome(Status.TIMEOUT, error=ErrorInfo("Timeout", "late"), exit_code=3)
COMPLETED = Outcome(Status.COMPLETED, result={"ok": 1}, exit_code=0)


# -- RetryPolicy.decide ----------------------------------------------------------


@pytest.mark.parametrize("max_retries", [0, 1, 3, 5])
def test_retriable_is_retried_while_attempt_le_max_retries(max_retries: int) -> None:
    policy = RetryPolicy(max_retries=max_retries, backoff=0.01, backoff_max=1.0)
    for attempt in range(1, max_retries + 1):
        decision = policy.decide(RETRIABLE, attempt)
        assert decision.retry is True, attempt
        assert decision.delay > 0
    assert policy.decide(RETRIABLE, max_retries + 1) == STOP
    assert policy.decide(RETRIABLE, max_retries + 2).retry is False


@pytest.mark.parametrize("outcome", [PERMANENT, TIMEOUT, COMPLETED], ids=["permanent", "timeout", "completed"])
def test_non_retriable_outcomes_are_never_retried(outcome: Outcome) -> None:
    policy = RetryPolicy(max_retries=10)
    for attempt in (1, 2, 5):
        assert policy.decide(outcome, attempt) == Decision(retry=False)


@pytest.mark.parametrize("backoff", [0.01, 0.5, 1.0])
def test_delays_grow_exponentially_with_bounded_jitter(backoff: float) -> None:
    policy = RetryPolicy(max_retries=8, backoff=backoff, backoff_max=1e6)
    for attempt in range(1, 9):
        base = backoff * 2 ** (attempt - 1)
        for _ in range(30):
            delay = policy.decide(RETRIABLE, attempt).delay
            assert base <= delay <= base + backoff, (attempt, delay)


def test_delays_are_jittered() -> None:
    policy = RetryPolicy(max_retries=3, backoff=1.0, backoff_max=60.0)
    delays = {policy.delay(1) for _ in range(50)}
    assert len(delays) > 1


def test_delays_never_exceed_backoff_max() -> None:
    policy = RetryPolicy(max_retries=100, backoff=1.0, backoff_max=5.0)
    for attempt in range(1, 101):
        for _ in range(5):
            delay = policy.decide(RETRIABLE, attempt).delay
            assert 0 < delay <= 5.0, (attempt, delay)
    # Far past the cap, the delay is the cap itself.
    assert policy.delay(20) == 5.0


def test_policy_for_worker() -> None:
    worker = WorkerConfig(name="w", image="i", task_types=["T"], max_retries=7, backoff=0.25, backoff_max=9.0)
    assert RetryPolicy.for_worker(worker) == RetryPolicy(7, 0.25, 9.0)


# -- run_task with a fake runner ---------------------------------------------------------


class FakeRunner:
    """Returns canned container ends in order (the last one forever) and records each envelope."""

    def __init__(self, ends: Iterable[ContainerEnd]) -> None:
        self.ends = list(ends)
        self.envelopes: list[Envelope] = []
        self.workers: list[WorkerConfig] = []

    def run(self, worker: WorkerConfig, task: Envelope, observe: Observer | None = None) -> RunResult:
        self.workers.append(worker)
        self.envelopes.append(task)
        end = self.ends[min(len(self.envelopes), len(self.ends)) - 1]
        return RunResult(end, container_id=f"c{len(self.envelopes)}", duration=0.001)


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def _worker(max_retries: int = 3) -> WorkerConfig:
    return WorkerConfig(name="W", image="img", task_types=["T.A"], max_retries=max_retries, backoff=0.01)


def _task() -> Envelope:
    return new_task("T.A", {"text": "hi"}, correlation_id="corr-1")


def _success(result: object) -> ContainerEnd:
    return ContainerEnd(exit_code=0, stdout=json.dumps({"success": True, "result": result}).encode())


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_always_retriable_runs_max_retries_plus_one_attempts(max_retries: int) -> None:
    runner = FakeRunner([ContainerEnd(exit_code=1)])
    sleep = Sleeps()
    task = _task()
    worker = _worker(max_retries)
    report = run_task(runner, worker, task, sleep=sleep)

    assert report.attempts == max_retries + 1
    assert len(runner.envelopes) == max_retries + 1
    assert [e.attempt for e in runner.envelopes] == list(range(1, max_retries + 2))
    assert {e.id for e in runner.envelopes} == {task.id}
    assert {e.correlation_id for e in runner.envelopes} == {"corr-1"}
    assert {e.traceparent for e in runner.envelopes} == {task.traceparent}
    assert all(w is worker for w in runner.workers)
    assert report.outcome.status is Status.FAILED
    assert report.outcome.retriable is True
    assert report.exit_code == 1
    assert report.task.attempt == max_retries + 1
    assert report.last_run is not None and report.last_run.container_id == f"c{max_retries + 1}"

    assert len(sleep.calls) == max_retries
    for n, delay in enumerate(sleep.calls, start=1):
        base = 0.01 * 2 ** (n - 1)
        assert base <= delay <= base + 0.01


def test_exit_2_is_one_attempt_and_exit_code_2() -> None:
    runner = FakeRunner([ContainerEnd(exit_code=2)])
    sleep = Sleeps()
    report = run_task(runner, _worker(5), _task(), sleep=sleep)
    assert report.attempts == 1
    assert len(runner.envelopes) == 1
    assert sleep.calls == []
    assert report.outcome.status is Status.FAILED
    assert report.exit_code == 2


@pytest.mark.parametrize(
    "end",
    [ContainerEnd(exit_code=3), ContainerEnd(exit_code=137, deadline_hit=True, timeout=1.0)],
    ids=["exit-3", "deadline"],
)
def test_timeout_is_one_attempt_and_exit_code_3(end: ContainerEnd) -> None:
    runner = FakeRunner([end])
    sleep = Sleeps()
    report = run_task(runner, _worker(5), _task(), sleep=sleep)
    assert report.attempts == 1
    assert len(runner.envelopes) == 1
    assert sleep.calls == []
    assert report.outcome.status is Status.TIMEOUT
    assert report.exit_code == 3


def test_retriable_then_success_completes_on_attempt_2() -> None:
    runner = FakeRunner([ContainerEnd(exit_code=1), _success({"length": 2})])
    sleep = Sleeps()
    report = run_task(runner, _worker(3), _task(), sleep=sleep)
    assert report.attempts == 2
    assert [e.attempt for e in runner.envelopes] == [1, 2]
    assert len(sleep.calls) == 1
    assert report.outcome.status is Status.COMPLETED
    assert report.outcome.result == {"length": 2}
    assert report.exit_code == 0
    assert report.task.attempt == 2


def test_success_first_time_does_not_sleep() -> None:
    runner = FakeRunner([_success(1)])
    sleep = Sleeps()
    report = run_task(runner, _worker(3), _task(), sleep=sleep)
    assert report.attempts == 1
    assert sleep.calls == []
    assert report.exit_code == 0


def test_retriable_then_permanent_stops() -> None:
    runner = FakeRunner([ContainerEnd(exit_code=1), ContainerEnd(exit_code=2), _success(1)])
    report = run_task(runner, _worker(5), _task(), sleep=Sleeps())
    assert report.attempts == 2
    assert report.exit_code == 2


def test_engine_error_is_retried_when_retriable() -> None:
    engine = ContainerEnd(
        exit_code=None, engine_error=ErrorInfo("EngineError", "busy"), engine_fault=EngineFault.SERVER
    )
    runner = FakeRunner([engine, _success("ok")])
    report = run_task(runner, _worker(2), _task(), sleep=Sleeps())
    assert report.attempts == 2
    assert report.outcome.ok


def test_explicit_policy_overrides_the_workers() -> None:
    runner = FakeRunner([ContainerEnd(exit_code=1)])
    sleep = Sleeps()
    report = run_task(runner, _worker(5), _task(), policy=RetryPolicy(max_retries=1, backoff=0.5), sleep=sleep)
    assert report.attempts == 2
    assert len(sleep.calls) == 1
    assert 0.5 <= sleep.calls[0] <= 1.0


def test_attempts_continue_from_the_envelopes_attempt() -> None:
    # A task already tried twice elsewhere: numbering carries on, and the policy counts from there.
    runner = FakeRunner([ContainerEnd(exit_code=1)])
    task = Envelope(
        id="t-9",
        type="T.A",
        params={},
        attempt=3,
        correlation_id="c",
        traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
    )
    report = run_task(runner, _worker(3), task, sleep=Sleeps())
    assert [e.attempt for e in runner.envelopes] == [3, 4]
    assert report.attempts == 4


def test_new_task_makes_fresh_ids_and_trace_context() -> None:
    a = new_task("T.A", {"x": 1})
    b = new_task("T.A", {"x": 1})
    assert a.attempt == 1
    assert a.id != b.id
    assert a.correlation_id != b.correlation_id
    parts = a.traceparent.split("-")
    assert [len(p) for p in parts] == [2, 32, 16, 2]
    assert parts[0] == "00"
    assert a.deadline is None
    assert new_task("T.A", {}, correlation_id="given").correlation_id == "given"


# -- Report ----------------------------------------------------------------------------------


def test_report_to_dict_when_completed() -> None:
    task = _task()
    report = run_task(FakeRunner([_success({"n": 3})]), _worker(), task, sleep=Sleeps())
    assert report.to_dict() == {
        "id": task.id,
        "type": "T.A",
        "status": "completed",
        "attempts": 1,
        "result": {"n": 3},
    }
    json.dumps(report.to_dict())


def test_report_to_dict_when_failed() -> None:
    task = _task()
    end = ContainerEnd(exit_code=2, stdout=b'{"success": false, "error": {"type": "KeyError", "message": "text"}}')
    report = run_task(FakeRunner([end]), _worker(), task, sleep=Sleeps())
    body = report.to_dict()
    assert body == {
        "id": task.id,
        "type": "T.A",
        "status": "failed",
        "attempts": 1,
        "error": {"type": "KeyError", "message": "text"},
    }
    assert type(body["status"]) is str


def test_report_to_dict_when_timed_out() -> None:
    report = run_task(FakeRunner([ContainerEnd(exit_code=3)]), _worker(), _task(), sleep=Sleeps())
    body = report.to_dict()
    assert body["status"] == "timeout"
    assert set(body) == {"id", "type", "status", "attempts", "error"}
    assert set(body["error"]) == {"type", "message"}


@pytest.mark.parametrize(
    ("outcome", "code"),
    [(COMPLETED, 0), (RETRIABLE, 1), (PERMANENT, 2), (TIMEOUT, 3), (Outcome(Status.FAILED), 2)],
)
def test_report_exit_code(outcome: Outcome, code: int) -> None:
    assert Report(_task(), outcome, attempts=1).exit_code == code


def test_report_without_error_still_has_an_error_object() -> None:
    body = Report(_task(), Outcome(Status.FAILED), attempts=1).to_dict()
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"]


def test_run_task_is_traced_like_serve_when_a_tracer_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from runner.config import TelemetryConfig
    from runner.telemetry.events import Hooks
    from runner.telemetry.tracing import Tracing

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    exporter = InMemorySpanExporter()
    tracing = Tracing(TelemetryConfig(), exporter=exporter)
    runner = FakeRunner([ContainerEnd(exit_code=1), _success("ok")])
    task = _task()

    report = run_task(runner, _worker(2), task, sleep=Sleeps(), hooks=Hooks([tracing], contexts=tracing.span_context))
    tracing.shutdown()

    assert report.outcome.ok
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {"attempt 1", "attempt 2", "receive T.A"} <= set(spans)
    trace_id = task.traceparent.split("-")[1]
    for attempt, envelope in zip(("attempt 1", "attempt 2"), runner.envelopes, strict=True):
        context = spans[attempt].get_span_context()
        assert context is not None
        # The container got its attempt's own span context, in the task's trace.
        assert envelope.traceparent == f"00-{trace_id}-{context.span_id:016x}-01"
        assert f"{context.trace_id:032x}" == trace_id
