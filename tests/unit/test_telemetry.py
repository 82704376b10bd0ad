"""runner/telemetry: the tracing hook, the hooks runner, event logs and metrics, fed events as the host emits them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from runner.config import TelemetryConfig
from runner.sidechannel import WorkerSpan
from runner.telemetry import logs, tracing
from runner.telemetry.context import TraceContext, child_of, root_for
from runner.telemetry.events import (
    AttemptFinished,
    AttemptStarted,
    ContainerCreated,
    ContainerRemoved,
    EngineDown,
    EngineUp,
    Event,
    Hooks,
    LeaseLost,
    SourceDown,
    SourceUp,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TaskReceived,
    TaskReleased,
    TaskRetrying,
    TaskSubmitted,
    WorkerSpanReceived,
    log_hook,
)
from runner.telemetry.metrics import Metrics
from runner.telemetry.tracing import Tracing, exporter_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"  # the caller's
CORRELATION = "corr-42"
T0 = 1_764_090_000_000_000_000  # ns
PHASES = (
    ("create", T0, T0 + 10_000_000),
    ("start", T0 + 10_000_000, T0 + 30_000_000),
    ("exchange", T0 + 30_000_000, T0 + 530_000_000),
    ("teardown", T0 + 530_000_000, T0 + 560_000_000),
)
ATTEMPT_END = T0 + 600_000_000
OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
)
LIMITS = {"cpus": 1.0, "memory": 256 * 1024**2, "pids": 64, "timeout": 30.0, "network": "none", "runtime": None}


def keys(task_id: str = "task-1", attempt: int = 1, worker: str = "echo") -> dict[str, Any]:
    """The task keys every event of one task carries."""
    return {
        "task_id": task_id,
        "task_type": "Echo",
        "worker": worker,
        "attempt": attempt,
        "correlation_id": CORRELATION,
    }


def started(attempt: TraceContext, task: TraceContext, number: int = 1, **extra: Any) -> AttemptStarted:
    """AttemptStarted as the host emits it: ``attempt`` minted as a child of the task's context."""
    fields: dict[str, Any] = {"image": "echo:1", "limits": LIMITS, "start_ns": T0 - 1_000_000, **extra}
    return AttemptStarted(**keys(attempt=number), traceparent=str(attempt), parent=str(task), **fields)


def finished(
    attempt: TraceContext | None = None,
    task: TraceContext | None = None,
    outcome: str = "completed",
    error: str | None = None,
    number: int = 1,
    **extra: Any,
) -> AttemptFinished:
    """AttemptFinished as the host emits it."""
    fields: dict[str, Any] = {
        "outcome": outcome,
        "exit_code": 0 if outcome == "completed" else 2,
        "oom_killed": False,
        "error": error,
        "duration": 0.5,
        "start_latency": 0.02,
        "container_id": "c0ntainer",
        "image_id": "sha256:abc",
        "stdin_bytes": 100,
        "stdout_bytes": 40,
        "stderr_bytes": 0,
        "phases": PHASES,
        "side_channel": None,
        "start_ns": T0 - 1_000_000,
        "end_ns": ATTEMPT_END,
        **extra,
    }
    traceparent = str(attempt) if attempt else None
    return AttemptFinished(
        **keys(attempt=number), traceparent=traceparent, parent=str(task) if task else None, **fields
    )


def submitted(submit: TraceContext, caller: str | None) -> TaskSubmitted:
    """TaskSubmitted as the API emits it: ``submit`` minted as a child of the caller's traceparent."""
    return TaskSubmitted(
        task_id="task-1", task_type="Echo", correlation_id=CORRELATION, traceparent=str(submit), parent=caller,
        start_ns=T0 - 9_000_000, end_ns=T0 - 7_000_000,
    )  # fmt: skip


def received(task: TraceContext, number: int = 1, root: bool = False) -> TaskReceived:
    return TaskReceived(**keys(attempt=number), traceparent=str(task), root=root, claim_started_ns=T0 - 5_000_000)


def ids(span: ReadableSpan) -> tuple[int, int]:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.trace_id, ctx.span_id


def ids_of(context: TraceContext) -> tuple[int, int]:
    return int(context.trace_id, 16), int(context.span_id, 16)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    exporter = InMemorySpanExporter()
    hook = Tracing(TelemetryConfig(), exporter=exporter)
    yield hook, exporter
    hook.shutdown()


def exported(otel: tuple[Tracing, InMemorySpanExporter]) -> list[ReadableSpan]:
    hook, exporter = otel
    assert hook._processor is not None
    hook._processor.force_flush()
    return list(exporter.get_finished_spans())


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


def run_attempt(hook: Tracing, task: TraceContext, number: int = 1, root: bool = False, **finish: Any) -> TraceContext:
    """One claim and attempt as the host emits them; returns the attempt's context (the container's TRACEPARENT)."""
    hook(received(task, number, root))
    attempt = child_of(task)
    hook(started(attempt, task, number))
    hook(finished(attempt, task, number=number, **finish))
    return attempt


# -- tracing ---------------------------------------------------------------------------------------------------


def test_submit_span_has_the_minted_ids_and_the_caller_as_parent(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    hook, _ = otel
    submit_context = child_of(TRACEPARENT)
    hook(submitted(submit_context, TRACEPARENT))
    (submit,) = exported(otel)
    assert submit.name == "submit Echo"
    assert submit.kind is SpanKind.SERVER
    assert ids(submit) == ids_of(submit_context)
    assert ids(submit)[0] == int(TRACE_ID, 16)  # the caller's trace, continued
    assert submit.parent is not None and submit.parent.is_remote
    assert (submit.parent.trace_id, submit.parent.span_id) == (int(TRACE_ID, 16), int(PARENT_ID, 16))
    assert (submit.start_time, submit.end_time) == (T0 - 9_000_000, T0 - 7_000_000)
    attrs = dict(submit.attributes or {})
    assert attrs["workerhost.task.id"] == "task-1"
    assert attrs["workerhost.correlation_id"] == CORRELATION


def test_submit_without_a_caller_starts_a_trace(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    hook, _ = otel
    submit_context = child_of(None)
    hook(submitted(submit_context, None))
    (submit,) = exported(otel)
    assert submit.parent is None
    assert ids(submit) == ids_of(submit_context)


def test_attempt_span_has_exactly_the_attempt_context_and_hangs_from_the_task(
    otel: tuple[Tracing, InMemorySpanExporter],
) -> None:
    hook, _ = otel
    task = child_of(TRACEPARENT)  # the submit span's context, stored with the task
    attempt_context = run_attempt(hook, task)
    hook(TaskCompleted(**keys(), traceparent=str(attempt_context)))
    spans = by_name(exported(otel))
    receive, attempt = spans["receive Echo"], spans["attempt 1"]
    assert receive.kind is SpanKind.CONSUMER
    assert ids(receive)[0] == int(TRACE_ID, 16)
    assert parent_id(receive) == parent_id(attempt) == int(task.span_id, 16)
    assert ids(receive)[1] not in (int(task.span_id, 16), int(attempt_context.span_id, 16))
    assert receive.start_time == T0 - 5_000_000
    # The container got attempt_context as TRACEPARENT: the attempt span is exactly that span.
    assert ids(attempt) == ids_of(attempt_context)
    assert (attempt.start_time, attempt.end_time) == (T0 - 1_000_000, ATTEMPT_END)
    assert attempt.status.status_code is StatusCode.UNSET
    assert attempt.events == ()
    attrs = dict(attempt.attributes or {})
    assert attrs["workerhost.image"] == "echo:1"
    assert attrs["workerhost.limits.cpus"] == 1.0
    assert attrs["workerhost.limits.memory"] == 256 * 1024**2
    assert attrs["workerhost.limits.network"] == "none"
    assert "workerhost.limits.runtime" not in attrs
    assert attrs["workerhost.outcome"] == "completed"
    assert attrs["process.exit.code"] == 0
    assert attrs["workerhost.oom_killed"] is False
    assert attrs["container.id"] == "c0ntainer"
    assert attrs["container.image.id"] == "sha256:abc"
    assert attrs["workerhost.stdin.bytes"] == 100
    assert attrs["workerhost.duration_seconds"] == 0.5
    assert attrs["workerhost.attempt"] == 1
    assert attrs["workerhost.worker"] == "echo"
    assert "workerhost.error" not in attrs
    assert "workerhost.cancelled" not in attrs
    assert hook._attempts == {}


def test_phases_become_children_of_the_attempt_with_their_times(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    hook, _ = otel
    run_attempt(hook, child_of(TRACEPARENT))
    spans = by_name(exported(otel))
    attempt = spans["attempt 1"]
    for name, start, end in PHASES:
        phase = spans[f"container.{name}"]
        assert ids(phase)[0] == ids(attempt)[0]
        assert parent_id(phase) == ids(attempt)[1]
        assert (phase.start_time, phase.end_time) == (start, end)
        attrs = dict(phase.attributes or {})
        assert attrs["workerhost.correlation_id"] == CORRELATION
        assert attrs["workerhost.task.id"] == "task-1"
        if name == "create":
            assert "container.id" not in attrs  # there is no container before it is created
        else:
            assert attrs["container.id"] == "c0ntainer"


def test_worker_spans_hang_under_the_attempt_with_the_workers_ids_and_times(
    otel: tuple[Tracing, InMemorySpanExporter],
) -> None:
    hook, _ = otel
    task = child_of(TRACEPARENT)
    hook(received(task))
    attempt_context = child_of(task)
    hook(started(attempt_context, task))
    fetch = WorkerSpan(
        trace_id=int(TRACE_ID, 16),
        span_id=0x1122334455667788,
        parent_id=int(attempt_context.span_id, 16),  # the worker's parent is its TRACEPARENT
        name="fetch",
        start=1764090000.25,
        end=1764090000.75,
        attributes={"url": "http://example.com", "rows": 3},
    )
    parse = WorkerSpan(
        int(TRACE_ID, 16), 0x99AABBCCDDEEFF00, fetch.span_id, "parse", 1764090000.5, 1764090000.5, {}, "ValueError: x"
    )
    for span in (fetch, parse):
        hook(WorkerSpanReceived(**keys(), traceparent=str(attempt_context), span=span))
    hook(finished(attempt_context, task))
    spans = by_name(exported(otel))
    got = spans["fetch"]
    assert ids(got) == (fetch.trace_id, fetch.span_id)
    assert got.parent is not None
    assert got.parent.trace_id == fetch.trace_id
    assert parent_id(got) == ids(spans["attempt 1"])[1] == int(attempt_context.span_id, 16)
    # Float seconds near 1.76e9 resolve to about 240 ns: the same instant to well within a microsecond.
    assert got.start_time is not None and abs(got.start_time - 1_764_090_000_250_000_000) <= 1000
    assert got.end_time is not None and abs(got.end_time - 1_764_090_000_750_000_000) <= 1000
    assert got.status.status_code is StatusCode.UNSET
    attrs = dict(got.attributes or {})
    assert attrs["url"] == "http://example.com"
    assert attrs["rows"] == 3
    assert attrs["workerhost.source"] == "worker"
    assert attrs["workerhost.correlation_id"] == CORRELATION
    failed = spans["parse"]
    assert ids(failed) == (parse.trace_id, parse.span_id)
    assert parent_id(failed) == fetch.span_id
    assert failed.start_time == failed.end_time
    assert failed.start_time is not None and abs(failed.start_time - 1_764_090_000_500_000_000) <= 1000
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError: x"


def test_worker_span_without_parent_is_a_root(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    hook, _ = otel
    span = WorkerSpan(int(TRACE_ID, 16), 0xABC, None, "lonely", 1764090000.0, 1764090001.0, {})
    hook(WorkerSpanReceived(**keys(), span=span))
    (got,) = exported(otel)
    assert got.parent is None
    assert ids(got) == (int(TRACE_ID, 16), 0xABC)


@pytest.mark.parametrize(
    ("outcome", "error", "description", "kind", "message"),
    [
        ("failed", "ValueError: bad row 7", "ValueError: bad row 7", "ValueError", "bad row 7"),
        ("timeout", "Timeout: no result after 30s", "Timeout: no result after 30s", "Timeout", "no result after 30s"),
        ("failed", None, "failed", "failed", "failed"),
    ],
)
def test_failed_outcome_marks_the_attempt_span_as_error(
    otel: tuple[Tracing, InMemorySpanExporter],
    outcome: str,
    error: str | None,
    description: str,
    kind: str,
    message: str,
) -> None:
    hook, _ = otel
    run_attempt(hook, child_of(TRACEPARENT), outcome=outcome, error=error)
    attempt = by_name(exported(otel))["attempt 1"]
    assert attempt.status.status_code is StatusCode.ERROR
    assert attempt.status.description == description
    (exception,) = attempt.events
    assert exception.name == "exception"
    assert dict(exception.attributes or {}) == {"exception.type": kind, "exception.message": message}
    attrs = dict(attempt.attributes or {})
    assert attrs["workerhost.outcome"] == outcome
    assert attrs["process.exit.code"] == 2
    if error:
        assert attrs["workerhost.error"] == error


def test_a_cancelled_attempt_says_so(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    hook, _ = otel
    run_attempt(hook, child_of(TRACEPARENT), outcome="failed", error="Cancelled: host shutting down", cancelled=True)
    attrs = dict(by_name(exported(otel))["attempt 1"].attributes or {})
    assert attrs["workerhost.cancelled"] is True


def test_progress_becomes_an_event_of_the_attempt_span(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    hook, _ = otel
    task = child_of(TRACEPARENT)
    hook(received(task))
    attempt_context = child_of(task)
    hook(started(attempt_context, task))
    hook(TaskProgress(**keys(), traceparent=str(attempt_context), percent=40.0, message="page 2 of 5"))
    hook(TaskProgress(**keys(), traceparent=str(attempt_context), percent=80.0, message=None))
    hook(finished(attempt_context, task))
    attempt = by_name(exported(otel))["attempt 1"]
    assert [(e.name, dict(e.attributes or {})) for e in attempt.events] == [
        ("progress", {"percent": 40.0, "message": "page 2 of 5"}),
        ("progress", {"percent": 80.0}),
    ]


def test_correlation_id_is_an_attribute_on_every_span(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    hook, _ = otel
    task = child_of(TRACEPARENT)
    hook(submitted(task, TRACEPARENT))
    hook(received(task))
    attempt_context = child_of(task)
    hook(started(attempt_context, task))
    worker = WorkerSpan(
        int(TRACE_ID, 16), 0x1234, int(attempt_context.span_id, 16), "work", 1764090000.0, 1764090001.0, {"k": "v"}
    )
    hook(WorkerSpanReceived(**keys(), traceparent=str(attempt_context), span=worker))
    hook(finished(attempt_context, task, "failed", "E: x"))
    hook(TaskFailed(**keys(), traceparent=str(attempt_context), outcome="failed", error="E: x"))
    spans = exported(otel)
    assert sorted(s.name for s in spans) == sorted(
        ["submit Echo", "receive Echo", "attempt 1", "work"] + [f"container.{name}" for name, _, _ in PHASES]
    )
    for span in spans:
        assert (span.attributes or {}).get("workerhost.correlation_id") == CORRELATION, span.name
        assert ids(span)[0] == int(TRACE_ID, 16), span.name


def test_task_without_traceparent_gets_a_root_task_span(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    hook, _ = otel
    root_context = root_for("task-1")
    attempt_context = run_attempt(hook, root_context, root=True)
    spans = by_name(exported(otel))
    root = spans["task Echo"]
    assert root.parent is None
    assert ids(root) == ids_of(root_context)
    assert (root.attributes or {}).get("workerhost.correlation_id") == CORRELATION
    trace_id, root_id = ids(root)
    for name in ("receive Echo", "attempt 1"):
        assert ids(spans[name])[0] == trace_id
        assert parent_id(spans[name]) == root_id
    assert ids(spans["attempt 1"]) == ids_of(attempt_context)


def test_two_attempts_of_one_task_are_siblings_in_one_trace(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    hook, _ = otel
    task = child_of(TRACEPARENT)
    first = run_attempt(hook, task, 1, outcome="failed", error="RetriableError: busy")
    hook(TaskRetrying(**keys(), traceparent=str(first), delay=1.0, error="RetriableError: busy"))
    second = run_attempt(hook, task, 2)
    hook(TaskCompleted(**keys(attempt=2), traceparent=str(second)))
    spans = exported(otel)
    attempts = {s.name: s for s in spans if s.name.startswith("attempt ")}
    one, two = attempts["attempt 1"], attempts["attempt 2"]
    assert (ids(one), ids(two)) == (ids_of(first), ids_of(second))
    assert ids(one)[0] == ids(two)[0] == int(TRACE_ID, 16)
    assert parent_id(one) == parent_id(two) == int(task.span_id, 16)
    assert ids(one)[1] != ids(two)[1]
    assert one.status.status_code is StatusCode.ERROR
    assert two.status.status_code is StatusCode.UNSET
    phase_parents = {parent_id(s) for s in spans if s.name == "container.exchange"}
    assert phase_parents == {ids(one)[1], ids(two)[1]}


def test_retries_of_a_root_task_stay_in_one_trace_with_one_root_span(
    otel: tuple[Tracing, InMemorySpanExporter],
) -> None:
    hook, _ = otel
    # Every claim of the task gets the same root from the host: root_for(task id).
    first = run_attempt(hook, root_for("task-1"), 1, root=True, outcome="failed", error="RetriableError: busy")
    hook(TaskRetrying(**keys(), traceparent=str(first), delay=1.0))
    second = run_attempt(hook, root_for("task-1"), 2, root=True)
    hook(TaskCompleted(**keys(attempt=2), traceparent=str(second)))
    spans = exported(otel)
    roots = [s for s in spans if s.name == "task Echo"]
    assert len(roots) == 1  # one trace for the task, not one per claim
    attempts = [s for s in spans if s.name.startswith("attempt ")]
    assert len(attempts) == 2
    assert {ids(a)[0] for a in attempts} == {ids(roots[0])[0]}
    assert {parent_id(a) for a in attempts} == {ids(roots[0])[1]}
    assert hook._roots == {}  # done for good: nothing kept


def test_a_context_not_sampled_exports_nothing(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    hook, _ = otel
    caller = f"00-{TRACE_ID}-{PARENT_ID}-00"
    task = child_of(caller)
    assert not task.sampled
    hook(submitted(task, caller))
    hook(received(task))
    attempt_context = child_of(task)
    hook(started(attempt_context, task))
    hook(TaskProgress(**keys(), traceparent=str(attempt_context), percent=50.0))
    worker = WorkerSpan(int(TRACE_ID, 16), 0x1234, int(attempt_context.span_id, 16), "work", 1.0, 2.0, {})
    hook(WorkerSpanReceived(**keys(), traceparent=str(attempt_context), span=worker))
    hook(finished(attempt_context, task, "failed", "E: x"))
    assert exported(otel) == []


def test_attempt_finished_without_attempt_started_still_exports_the_attempt(
    otel: tuple[Tracing, InMemorySpanExporter],
) -> None:
    hook, _ = otel
    task = child_of(TRACEPARENT)
    attempt_context = child_of(task)
    hook(finished(attempt_context, task, "failed", "EngineError: cannot create", phases=()))
    (attempt,) = exported(otel)
    assert attempt.name == "attempt 1"
    assert ids(attempt) == ids_of(attempt_context)
    assert parent_id(attempt) == int(task.span_id, 16)
    assert (attempt.start_time, attempt.end_time) == (T0 - 1_000_000, ATTEMPT_END)
    assert attempt.status.status_code is StatusCode.ERROR
    assert attempt.status.description == "EngineError: cannot create"
    attrs = dict(attempt.attributes or {})
    assert attrs["workerhost.outcome"] == "failed"
    assert attrs["workerhost.task.id"] == "task-1"
    assert "workerhost.image" not in attrs  # only AttemptStarted knew it


def test_what_tracing_keeps_is_freed_and_bounded(
    otel: tuple[Tracing, InMemorySpanExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    hook, _ = otel
    task = child_of(TRACEPARENT)
    hook(started(child_of(task), task))
    hook(TaskReleased(**keys()))
    assert hook._attempts == {}
    monkeypatch.setattr(tracing, "_MAX_OPEN", 2)
    for n in range(3):
        hook(AttemptStarted(**keys(task_id=f"t{n}"), traceparent=str(child_of(task)), parent=str(task)))
        hook(TaskReceived(**keys(task_id=f"r{n}"), traceparent=str(root_for(f"r{n}")), root=True))
    assert list(hook._attempts) == ["t1", "t2"]
    assert list(hook._roots) == ["r1", "r2"]


def test_without_endpoint_tracing_is_disabled_and_ignores_events(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    hook = Tracing(TelemetryConfig())
    assert hook.enabled is False
    assert hook._processor is None
    task = child_of(TRACEPARENT)
    attempt_context = child_of(task)
    hook(submitted(task, TRACEPARENT))
    hook(received(root_for("task-1"), root=True))
    hook(started(attempt_context, task))
    worker = WorkerSpan(int(TRACE_ID, 16), 1, None, "w", 1764090000.0, 1764090001.0, {})
    hook(WorkerSpanReceived(**keys(), span=worker))
    assert hook._attempts == {}  # nothing kept, either
    assert hook._roots == {}
    hook(finished(attempt_context, task))
    hook.shutdown()


def test_endpoint_from_the_environment_enables_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    exporter = exporter_for(TelemetryConfig())
    assert exporter is not None
    assert type(exporter).__module__.endswith(".http.trace_exporter")
    assert exporter._endpoint == "http://collector:4318/v1/traces"  # type: ignore[attr-defined]
    exporter.shutdown()


@pytest.mark.parametrize(
    "endpoint",
    ["http://collector:4318", "http://collector:4318/", "http://collector:4318/v1/traces"],
)
def test_exporter_for_http_appends_v1_traces(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    exporter = exporter_for(TelemetryConfig(otlp_endpoint=endpoint))
    assert exporter is not None
    assert type(exporter).__name__ == "OTLPSpanExporter"
    assert type(exporter).__module__ == "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    assert exporter._endpoint == "http://collector:4318/v1/traces"  # type: ignore[attr-defined]
    exporter.shutdown()


@pytest.mark.parametrize("from_env", [False, True])
def test_exporter_for_grpc(monkeypatch: pytest.MonkeyPatch, from_env: bool) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if from_env:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        config = TelemetryConfig(otlp_endpoint="http://collector:4317")
    else:
        config = TelemetryConfig(otlp_endpoint="http://collector:4317", otlp_protocol="grpc")
    exporter = exporter_for(config)
    assert exporter is not None
    assert type(exporter).__name__ == "OTLPSpanExporter"
    assert type(exporter).__module__ == "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
    exporter.shutdown()


def test_exporter_for_without_endpoint_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert exporter_for(TelemetryConfig()) is None


# -- hooks -------------------------------------------------------------------------------------------------------


def test_a_failing_hook_is_logged_and_the_next_hooks_still_run(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def broken(e: Event) -> None:
        raise RuntimeError("telemetry is down")

    hooks = Hooks([lambda e: seen.append("first:" + e.name), broken])
    hooks.add(lambda e: seen.append("last:" + e.name))
    with caplog.at_level(logging.ERROR, logger="runner.telemetry.events"):
        hooks.emit(TaskCompleted(**keys()))
        hooks.emit(TaskFailed(**keys()))
    assert seen == ["first:task_completed", "last:task_completed", "first:task_failed", "last:task_failed"]
    records = [r for r in caplog.records if r.name == "runner.telemetry.events"]
    assert len(records) == 2
    assert records[0].levelno == logging.ERROR
    assert "task_completed" in records[0].getMessage()
    assert "task-1" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert "telemetry is down" in str(records[0].exc_info[1])


def test_events_are_frozen_and_data_holds_their_own_fields() -> None:
    event = TaskRetrying(**keys(), traceparent=TRACEPARENT, delay=2.0, error="E: x")
    assert event.name == "task_retrying"
    assert event.data == {"delay": 2.0, "error": "E: x"}
    with pytest.raises(AttributeError):
        event.delay = 3.0  # type: ignore[misc]


# -- event logs --------------------------------------------------------------------------------------------------


@pytest.fixture
def event_log() -> Iterator[tuple[logging.Handler, io.StringIO]]:
    """The "workerhost.events" logger writing to a string, in JSON (the formatter can be swapped)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("workerhost.events")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler, stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_task_event_becomes_one_json_line_with_the_stable_keys(
    event_log: tuple[logging.Handler, io.StringIO],
) -> None:
    _, stream = event_log
    attempt = TraceContext(TRACE_ID, "1122334455667788")
    log_hook(finished(attempt, child_of(TRACEPARENT), "failed", "ValueError: x", number=2))
    (line,) = json_lines(stream)
    assert list(line)[:9] == list(logs.KEYS)
    datetime.fromisoformat(line["ts"])
    assert line["ts"].endswith("Z")
    assert line["level"] == "info"
    assert line["event"] == "attempt_finished"
    assert line["task_id"] == "task-1"
    assert line["correlation_id"] == CORRELATION
    assert line["trace_id"] == TRACE_ID
    assert line["span_id"] == "1122334455667788"
    assert line["worker"] == "echo"
    assert line["attempt"] == 2
    assert line["type"] == "Echo"
    assert line["outcome"] == "failed"
    assert line["error"] == "ValueError: x"
    assert line["exit_code"] == 2
    assert line["oom_killed"] is False
    assert line["container_id"] == "c0ntainer"
    # Trace plumbing and bulky fields are for the tracing hook, not for the log line.
    for absent in ("phases", "span", "parent", "start_ns", "end_ns", "side_channel", "message", "logger"):
        assert absent not in line


def test_event_without_traceparent_has_no_trace_keys(event_log: tuple[logging.Handler, io.StringIO]) -> None:
    _, stream = event_log
    log_hook(TaskReceived(**keys(), claim_started_ns=T0))
    (line,) = json_lines(stream)
    assert line["event"] == "task_received"
    assert "trace_id" not in line and "span_id" not in line
    assert "claim_started_ns" not in line


@pytest.mark.parametrize(
    ("event", "level"),
    [
        (TaskFailed(**keys(), traceparent=TRACEPARENT, error="E: x"), "warning"),
        (LeaseLost(**keys(), traceparent=TRACEPARENT, error="E: x"), "warning"),
        (TaskRetrying(**keys(), traceparent=TRACEPARENT, error="E: x"), "warning"),
        (TaskCompleted(**keys(), traceparent=TRACEPARENT), "info"),
        (TaskReceived(**keys(), traceparent=TRACEPARENT), "info"),
    ],
    ids=lambda value: value.name if isinstance(value, Event) else value,
)
def test_event_levels(event_log: tuple[logging.Handler, io.StringIO], event: Event, level: str) -> None:
    _, stream = event_log
    log_hook(event)
    (line,) = json_lines(stream)
    assert (line["event"], line["level"]) == (event.name, level)


def test_side_channel_problems_make_the_attempt_a_warning(event_log: tuple[logging.Handler, io.StringIO]) -> None:
    _, stream = event_log
    log_hook(finished(side_channel="2 malformed side-channel lines ignored"))
    (line,) = json_lines(stream)
    assert line["level"] == "warning"
    assert line["side_channel"] == "2 malformed side-channel lines ignored"


def test_quiet_events_are_not_logged(event_log: tuple[logging.Handler, io.StringIO]) -> None:
    _, stream = event_log
    span = WorkerSpan(int(TRACE_ID, 16), 1, None, "w", 1764090000.0, 1764090001.0, {})
    log_hook(WorkerSpanReceived(**keys(), span=span))
    log_hook(TaskSubmitted(**keys(), traceparent=TRACEPARENT))
    log_hook(ContainerCreated(**keys(), container_id="c"))
    log_hook(ContainerRemoved(**keys(), container_id="c"))
    assert stream.getvalue() == ""


def test_host_event_has_no_task_keys(event_log: tuple[logging.Handler, io.StringIO]) -> None:
    _, stream = event_log
    log_hook(SourceDown(error="connection refused"))
    (line,) = json_lines(stream)
    assert line == {"ts": line["ts"], "level": "warning", "event": "source_down", "error": "connection refused"}


def test_console_formatter_gives_one_readable_line(event_log: tuple[logging.Handler, io.StringIO]) -> None:
    handler, stream = event_log
    handler.setFormatter(logs.ConsoleFormatter())
    log_hook(TaskFailed(**keys(), traceparent=TRACEPARENT, outcome="failed", error="ValueError: x"))
    text = stream.getvalue()
    assert text.count("\n") == 1
    line = text.rstrip("\n")
    clock, level, name = line.split()[:3]
    assert len(clock) == 12 and clock[2] == ":" and clock[8] == "."
    assert (level, name) == ("warning", "task_failed")
    for part in ("task_id=task-1", f"correlation_id={CORRELATION}", "worker=echo", "attempt=1", "error=ValueError: x"):
        assert part in line
    assert TRACE_ID not in line  # ids are for machines: the JSON form has them
    assert "{" not in line


# -- metrics -----------------------------------------------------------------------------------------------------


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def label(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def test_metrics_follow_the_events() -> None:
    metrics = Metrics()
    hooks = Hooks([metrics])
    echo = keys(task_id="t1", worker="echo")
    # echo: failed, timed out, then OOM-killed and failed for good
    for outcome, oom, duration in (("failed", False, 0.3), ("timeout", False, 30.0), ("failed", True, 0.7)):
        hooks.emit(AttemptStarted(**echo))
        assert samples(metrics)[("workerhost_tasks_in_flight", label(worker="echo"))] == 1
        attempt = finished(outcome=outcome, error="E: x", oom_killed=oom, duration=duration, start_latency=0.05)
        hooks.emit(replace(attempt, **echo))
        if outcome == "failed" and oom:
            hooks.emit(TaskFailed(**echo, outcome="failed", error="E: x"))
        else:
            hooks.emit(TaskRetrying(**echo, delay=1.0, error="E: x"))
    # stats: two tasks, both completed
    stats = [keys(task_id=task_id, worker="stats") for task_id in ("t2", "t3")]
    for task in stats:
        hooks.emit(AttemptStarted(**task))
    assert samples(metrics)[("workerhost_tasks_in_flight", label(worker="stats"))] == 2
    for task in stats:
        hooks.emit(AttemptFinished(**task, outcome="completed", duration=1.5, start_latency=0))
        hooks.emit(TaskCompleted(**task))

    got = samples(metrics)
    assert got[("workerhost_tasks_total", label(worker="echo", outcome="failed"))] == 1
    assert got[("workerhost_tasks_total", label(worker="stats", outcome="completed"))] == 2
    assert ("workerhost_tasks_total", label(worker="echo", outcome="completed")) not in got
    assert got[("workerhost_attempts_total", label(worker="echo", outcome="failed"))] == 2
    assert got[("workerhost_attempts_total", label(worker="echo", outcome="timeout"))] == 1
    assert got[("workerhost_attempts_total", label(worker="stats", outcome="completed"))] == 2
    assert got[("workerhost_oom_kills_total", label(worker="echo"))] == 1
    assert ("workerhost_oom_kills_total", label(worker="stats")) not in got
    assert got[("workerhost_timeouts_total", label(worker="echo"))] == 1
    assert got[("workerhost_retries_total", label(worker="echo"))] == 2
    assert got[("workerhost_tasks_in_flight", label(worker="echo"))] == 0
    assert got[("workerhost_tasks_in_flight", label(worker="stats"))] == 0

    assert got[("workerhost_task_duration_seconds_count", label(worker="echo"))] == 3
    assert got[("workerhost_task_duration_seconds_sum", label(worker="echo"))] == pytest.approx(31.0)
    assert got[("workerhost_task_duration_seconds_bucket", label(worker="echo", le="0.5"))] == 1
    assert got[("workerhost_task_duration_seconds_bucket", label(worker="echo", le="1.0"))] == 2
    assert got[("workerhost_task_duration_seconds_bucket", label(worker="echo", le="30.0"))] == 3
    assert got[("workerhost_task_duration_seconds_count", label(worker="stats"))] == 2
    assert got[("workerhost_task_duration_seconds_bucket", label(worker="stats", le="1.0"))] == 0
    assert got[("workerhost_task_duration_seconds_bucket", label(worker="stats", le="2.5"))] == 2
    # a start latency of 0 (the container never started) is not observed
    assert got[("workerhost_container_start_seconds_count", label(worker="echo"))] == 3
    assert ("workerhost_container_start_seconds_count", label(worker="stats")) not in got


def test_in_flight_returns_to_zero_after_a_failed_attempt() -> None:
    """AttemptFinished always follows AttemptStarted, even when the runner raised and no container ran."""
    metrics = Metrics()
    hooks = Hooks([metrics])
    hooks.emit(AttemptStarted(**keys(), image="echo:1"))
    assert samples(metrics)[("workerhost_tasks_in_flight", label(worker="echo"))] == 1
    hooks.emit(AttemptFinished(**keys(), outcome="failed", error="EngineError: cannot create", start_latency=0.0))
    hooks.emit(TaskRetrying(**keys(), delay=1.0, error="EngineError: cannot create"))
    got = samples(metrics)
    assert got[("workerhost_tasks_in_flight", label(worker="echo"))] == 0
    assert got[("workerhost_attempts_total", label(worker="echo", outcome="failed"))] == 1
    assert got[("workerhost_retries_total", label(worker="echo"))] == 1


def test_metrics_for_host_events() -> None:
    metrics = Metrics()
    hooks = Hooks([metrics])
    hooks.emit(SourceDown(error="x"))
    hooks.emit(EngineUp())
    hooks.emit(LeaseLost(**keys(task_id="t1"), error="gone"))
    hooks.emit(TaskReleased(**keys(task_id="t2")))
    hooks.emit(TaskReleased(**keys(task_id="t3")))
    got = samples(metrics)
    assert got[("workerhost_source_up", label())] == 0
    assert got[("workerhost_engine_up", label())] == 1
    assert got[("workerhost_lease_lost_total", label())] == 1
    assert got[("workerhost_tasks_released_total", label())] == 2
    hooks.emit(SourceUp())
    hooks.emit(EngineDown(error="x"))
    got = samples(metrics)
    assert got[("workerhost_source_up", label())] == 1
    assert got[("workerhost_engine_up", label())] == 0


def test_two_metrics_instances_do_not_share_counts() -> None:
    first, second = Metrics(), Metrics()
    first(TaskCompleted(**keys(task_id="t1")))
    assert samples(first)[("workerhost_tasks_total", label(worker="echo", outcome="completed"))] == 1
    assert ("workerhost_tasks_total", label(worker="echo", outcome="completed")) not in samples(second)
