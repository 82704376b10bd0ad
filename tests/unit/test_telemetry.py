"""runner/telemetry: the tracing hook, the hooks runner, event logs and metrics, fed events as the host emits them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from runner.config import TelemetryConfig
from runner.sidechannel import WorkerSpan
from runner.telemetry import events, logs
from runner.telemetry.events import Event, Hooks, log_hook
from runner.telemetry.metrics import Metrics
from runner.telemetry.tracing import Tracing, exporter_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CORRELATION = "corr-42"
T0 = 1_764_090_000_000_000_000  # ns
PHASES = (
    ("create", T0, T0 + 10_000_000),
    ("start", T0 + 10_000_000, T0 + 30_000_000),
    ("exchange", T0 + 30_000_000, T0 + 530_000_000),
    ("teardown", T0 + 530_000_000, T0 + 560_000_000),
)
OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
)


def event(name: str, traceparent: str | None = None, task_id: str = "task-1", attempt: int = 1, **data: Any) -> Event:
    return Event(name, task_id, "Echo", "echo", attempt, CORRELATION, data, traceparent)


def finished(outcome: str = "completed", error: str | None = None, **extra: Any) -> dict[str, Any]:
    """ATTEMPT_FINISHED's data, as the host builds it."""
    data: dict[str, Any] = {
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
    }
    data.update(extra)
    return data


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def ids(span: ReadableSpan) -> tuple[int, int]:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.trace_id, ctx.span_id


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    exporter = InMemorySpanExporter()
    tracing = Tracing(TelemetryConfig(), exporter=exporter)
    yield tracing, exporter
    tracing.shutdown()


def exported(otel: tuple[Tracing, InMemorySpanExporter]) -> list[ReadableSpan]:
    tracing, exporter = otel
    assert tracing._provider is not None
    tracing._provider.force_flush()
    return list(exporter.get_finished_spans())


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


def run_attempt(tracing: Tracing, traceparent: str | None, attempt: int = 1, **finish: Any) -> dict[str, str]:
    """One claim and attempt as ``Host._handle`` emits them; returns the attempt's carrier."""
    tracing(event(events.TASK_RECEIVED, traceparent, attempt=attempt, claim_started_ns=None))
    carrier: dict[str, str] = {}
    limits = {"cpus": 1.0, "memory": 256 * 1024**2, "pids": 64, "timeout": 30.0, "network": "none", "runtime": None}
    tracing(event(events.ATTEMPT_STARTED, traceparent, attempt=attempt, image="echo:1", limits=limits, carrier=carrier))
    tracing(event(events.ATTEMPT_FINISHED, carrier.get("traceparent"), attempt=attempt, **finished(**finish)))
    return carrier


# -- tracing ---------------------------------------------------------------------------------------------------


def test_submit_span_continues_an_incoming_traceparent_and_replaces_it(
    otel: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, _ = otel
    carrier = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    tracing(Event(events.TASK_SUBMITTED, "task-1", "Echo", correlation_id=CORRELATION, data={"carrier": carrier}))
    (submit,) = exported(otel)
    assert submit.name == "submit Echo"
    assert submit.kind is SpanKind.SERVER
    assert ids(submit)[0] == int(TRACE_ID, 16)
    assert parent_id(submit) == int(PARENT_ID, 16)
    assert carrier["traceparent"] == traceparent_of(submit)
    assert carrier["traceparent"] != TRACEPARENT
    assert submit.attributes is not None
    assert submit.attributes["workerhost.task.id"] == "task-1"
    assert submit.attributes["workerhost.correlation_id"] == CORRELATION


def test_submit_without_incoming_context_starts_a_trace(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, _ = otel
    carrier: dict[str, str] = {}
    tracing(Event(events.TASK_SUBMITTED, "task-1", "Echo", correlation_id=CORRELATION, data={"carrier": carrier}))
    (submit,) = exported(otel)
    assert submit.parent is None
    assert carrier == {"traceparent": traceparent_of(submit)}


def test_attempt_span_is_a_child_of_the_task_context_and_goes_into_the_carrier(
    otel: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, _ = otel
    carrier = run_attempt(tracing, TRACEPARENT)
    tracing(event(events.TASK_COMPLETED, carrier["traceparent"]))
    spans = by_name(exported(otel))
    receive, attempt = spans["receive Echo"], spans["attempt 1"]
    assert receive.kind is SpanKind.CONSUMER
    assert ids(receive)[0] == ids(attempt)[0] == int(TRACE_ID, 16)
    assert parent_id(receive) == parent_id(attempt) == int(PARENT_ID, 16)
    assert carrier == {"traceparent": traceparent_of(attempt)}
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
    assert attrs["workerhost.duration_seconds"] == 0.5
    assert attrs["workerhost.attempt"] == 1
    assert attrs["workerhost.worker"] == "echo"
    assert "workerhost.error" not in attrs


def test_phases_become_children_of_the_attempt_with_their_times(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, _ = otel
    run_attempt(tracing, TRACEPARENT)
    spans = by_name(exported(otel))
    attempt = spans["attempt 1"]
    for name, start, end in PHASES:
        phase = spans[f"container.{name}"]
        assert ids(phase)[0] == ids(attempt)[0]
        assert parent_id(phase) == ids(attempt)[1]
        assert (phase.start_time, phase.end_time) == (start, end)
        attrs = dict(phase.attributes or {})
        assert attrs["workerhost.correlation_id"] == CORRELATION
        if name == "create":
            assert "container.id" not in attrs  # there is no container before it is created
        else:
            assert attrs["container.id"] == "c0ntainer"


def test_worker_span_is_exported_with_the_workers_ids_and_times(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, _ = otel
    tracing(event(events.TASK_RECEIVED, TRACEPARENT))
    carrier: dict[str, str] = {}
    tracing(event(events.ATTEMPT_STARTED, TRACEPARENT, image="echo:1", limits={}, carrier=carrier))
    attempt_span_id = int(carrier["traceparent"].split("-")[2], 16)
    fetch = WorkerSpan(
        trace_id=int(TRACE_ID, 16),
        span_id=0x1122334455667788,
        parent_id=attempt_span_id,
        name="fetch",
        start=1764090000.25,
        end=1764090000.75,
        attributes={"url": "http://example.com", "rows": 3},
    )
    parse = WorkerSpan(
        int(TRACE_ID, 16), 0x99AABBCCDDEEFF00, fetch.span_id, "parse", 1764090000.5, 1764090000.5, {}, "ValueError: x"
    )
    for span in (fetch, parse):
        tracing(event(events.WORKER_SPAN, carrier["traceparent"], span=span))
    tracing(event(events.ATTEMPT_FINISHED, carrier["traceparent"], **finished()))
    spans = by_name(exported(otel))
    got = spans["fetch"]
    assert ids(got) == (fetch.trace_id, fetch.span_id)
    assert got.parent is not None
    assert got.parent.trace_id == fetch.trace_id
    assert parent_id(got) == attempt_span_id == ids(spans["attempt 1"])[1]
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
    tracing, _ = otel
    span = WorkerSpan(int(TRACE_ID, 16), 0xABC, None, "lonely", 1764090000.0, 1764090001.0, {})
    tracing(event(events.WORKER_SPAN, span=span))
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
    tracing, _ = otel
    run_attempt(tracing, TRACEPARENT, outcome=outcome, error=error)
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


def test_progress_becomes_an_event_of_the_attempt_span(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, _ = otel
    tracing(event(events.TASK_RECEIVED, TRACEPARENT))
    carrier: dict[str, str] = {}
    tracing(event(events.ATTEMPT_STARTED, TRACEPARENT, image="echo:1", limits={}, carrier=carrier))
    tracing(event(events.TASK_PROGRESS, carrier["traceparent"], percent=40.0, message="page 2 of 5"))
    tracing(event(events.TASK_PROGRESS, carrier["traceparent"], percent=80.0, message=None))
    tracing(event(events.ATTEMPT_FINISHED, carrier["traceparent"], **finished()))
    attempt = by_name(exported(otel))["attempt 1"]
    assert [(e.name, dict(e.attributes or {})) for e in attempt.events] == [
        ("progress", {"percent": 40.0, "message": "page 2 of 5"}),
        ("progress", {"percent": 80.0}),
    ]


def test_correlation_id_is_an_attribute_on_every_span(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, _ = otel
    carrier = {"traceparent": TRACEPARENT}
    tracing(Event(events.TASK_SUBMITTED, "task-1", "Echo", correlation_id=CORRELATION, data={"carrier": carrier}))
    tracing(event(events.TASK_RECEIVED, carrier["traceparent"]))
    attempt_carrier: dict[str, str] = {}
    tracing(event(events.ATTEMPT_STARTED, carrier["traceparent"], image="e", limits={}, carrier=attempt_carrier))
    parent = int(attempt_carrier["traceparent"].split("-")[2], 16)
    worker = WorkerSpan(int(TRACE_ID, 16), 0x1234, parent, "work", 1764090000.0, 1764090001.0, {"k": "v"})
    tracing(event(events.WORKER_SPAN, attempt_carrier["traceparent"], span=worker))
    tracing(event(events.ATTEMPT_FINISHED, attempt_carrier["traceparent"], **finished("failed", "E: x")))
    tracing(event(events.TASK_FAILED, attempt_carrier["traceparent"], outcome="failed", error="E: x"))
    spans = exported(otel)
    assert sorted(s.name for s in spans) == sorted(
        ["submit Echo", "receive Echo", "attempt 1", "work"] + [f"container.{name}" for name, _, _ in PHASES]
    )
    for span in spans:
        assert (span.attributes or {}).get("workerhost.correlation_id") == CORRELATION, span.name
        assert ids(span)[0] == int(TRACE_ID, 16), span.name


def test_task_without_traceparent_gets_a_root_task_span(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, _ = otel
    carrier = run_attempt(tracing, None)
    spans = by_name(exported(otel))
    root = spans["task Echo"]
    assert root.parent is None
    assert (root.attributes or {}).get("workerhost.correlation_id") == CORRELATION
    trace_id, root_id = ids(root)
    for name in ("receive Echo", "attempt 1"):
        assert ids(spans[name])[0] == trace_id
        assert parent_id(spans[name]) == root_id
    assert carrier["traceparent"] == traceparent_of(spans["attempt 1"])


def test_two_attempts_of_one_task_are_siblings_in_one_trace(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, _ = otel
    first = run_attempt(tracing, TRACEPARENT, attempt=1, outcome="failed", error="RetriableError: busy")
    tracing(event(events.TASK_RETRYING, first["traceparent"], delay=1.0, error="RetriableError: busy"))
    second = run_attempt(tracing, TRACEPARENT, attempt=2)
    tracing(event(events.TASK_COMPLETED, second["traceparent"], attempt=2))
    spans = exported(otel)
    attempts = {s.name: s for s in spans if s.name.startswith("attempt ")}
    one, two = attempts["attempt 1"], attempts["attempt 2"]
    assert ids(one)[0] == ids(two)[0] == int(TRACE_ID, 16)
    assert parent_id(one) == parent_id(two) == int(PARENT_ID, 16)
    assert ids(one)[1] != ids(two)[1]
    assert first["traceparent"] != second["traceparent"]
    assert one.status.status_code is StatusCode.ERROR
    assert two.status.status_code is StatusCode.UNSET
    phase_parents = {parent_id(s) for s in spans if s.name == "container.exchange"}
    assert phase_parents == {ids(one)[1], ids(two)[1]}


def test_retries_of_a_task_without_traceparent_stay_in_its_first_trace(
    otel: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, _ = otel
    first = run_attempt(tracing, None, attempt=1, outcome="failed", error="RetriableError: busy")
    tracing(event(events.TASK_RETRYING, first["traceparent"], delay=1.0))
    second = run_attempt(tracing, None, attempt=2)
    tracing(event(events.TASK_COMPLETED, second["traceparent"], attempt=2))
    spans = exported(otel)
    roots = [s for s in spans if s.name == "task Echo"]
    assert len(roots) == 1  # one trace for the task, not one per claim
    attempts = [s for s in spans if s.name.startswith("attempt ")]
    assert {ids(a)[0] for a in attempts} == {ids(roots[0])[0]}
    assert {parent_id(a) for a in attempts} == {ids(roots[0])[1]}


def test_attempt_finished_without_a_started_attempt_is_ignored(otel: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, _ = otel
    tracing(event(events.ATTEMPT_FINISHED, **finished()))
    assert exported(otel) == []


def test_without_endpoint_tracing_is_disabled_and_ignores_events(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    tracing = Tracing(TelemetryConfig())
    assert tracing.enabled is False
    assert tracing._provider is None
    submit_carrier = {"traceparent": TRACEPARENT}
    tracing(Event(events.TASK_SUBMITTED, "task-1", "Echo", data={"carrier": submit_carrier}))
    assert submit_carrier == {"traceparent": TRACEPARENT}
    tracing(event(events.TASK_RECEIVED, TRACEPARENT))
    attempt_carrier: dict[str, str] = {}
    tracing(event(events.ATTEMPT_STARTED, TRACEPARENT, image="e", limits={}, carrier=attempt_carrier))
    assert attempt_carrier == {}
    worker = WorkerSpan(int(TRACE_ID, 16), 1, None, "w", 1764090000.0, 1764090001.0, {})
    tracing(event(events.WORKER_SPAN, span=worker))
    tracing(event(events.ATTEMPT_FINISHED, **finished()))
    tracing(event(events.TASK_COMPLETED))
    assert tracing._attempts == {}
    assert tracing._parents == {}
    tracing.shutdown()


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
        hooks.emit(event(events.TASK_COMPLETED))
        hooks.emit(event(events.TASK_FAILED))
    assert seen == ["first:task_completed", "last:task_completed", "first:task_failed", "last:task_failed"]
    records = [r for r in caplog.records if r.name == "runner.telemetry.events"]
    assert len(records) == 2
    assert records[0].levelno == logging.ERROR
    assert "task_completed" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert "telemetry is down" in str(records[0].exc_info[1])


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
    attempt_tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-1122334455667788-01"
    log_hook(
        event(events.ATTEMPT_FINISHED, attempt_tp, attempt=2, **finished("failed", "ValueError: x", side_channel=None))
    )
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
    for absent in ("phases", "carrier", "span", "side_channel", "message", "logger"):
        assert absent not in line


def test_event_without_traceparent_has_no_trace_keys(event_log: tuple[logging.Handler, io.StringIO]) -> None:
    _, stream = event_log
    log_hook(event(events.TASK_RECEIVED, None, claim_started_ns=None))
    (line,) = json_lines(stream)
    assert line["event"] == "task_received"
    assert "trace_id" not in line and "span_id" not in line
    assert "claim_started_ns" not in line


@pytest.mark.parametrize(
    ("name", "level"),
    [
        (events.TASK_FAILED, "warning"),
        (events.LEASE_LOST, "warning"),
        (events.TASK_RETRYING, "warning"),
        (events.TASK_COMPLETED, "info"),
        (events.TASK_RECEIVED, "info"),
    ],
)
def test_event_levels(event_log: tuple[logging.Handler, io.StringIO], name: str, level: str) -> None:
    _, stream = event_log
    log_hook(event(name, TRACEPARENT, error="E: x"))
    (line,) = json_lines(stream)
    assert (line["event"], line["level"]) == (name, level)


def test_side_channel_problems_make_the_attempt_a_warning(event_log: tuple[logging.Handler, io.StringIO]) -> None:
    _, stream = event_log
    log_hook(event(events.ATTEMPT_FINISHED, **finished(side_channel="2 malformed side-channel lines ignored")))
    (line,) = json_lines(stream)
    assert line["level"] == "warning"
    assert line["side_channel"] == "2 malformed side-channel lines ignored"


def test_quiet_events_are_not_logged(event_log: tuple[logging.Handler, io.StringIO]) -> None:
    _, stream = event_log
    span = WorkerSpan(int(TRACE_ID, 16), 1, None, "w", 1764090000.0, 1764090001.0, {})
    log_hook(event(events.WORKER_SPAN, span=span))
    log_hook(event(events.TASK_SUBMITTED, carrier={}))
    log_hook(event(events.CONTAINER_CREATED, container_id="c"))
    assert stream.getvalue() == ""


def test_host_event_has_no_task_keys(event_log: tuple[logging.Handler, io.StringIO]) -> None:
    _, stream = event_log
    log_hook(Event(events.SOURCE_DOWN, data={"error": "connection refused"}))
    (line,) = json_lines(stream)
    assert line == {"ts": line["ts"], "level": "warning", "event": "source_down", "error": "connection refused"}


def test_console_formatter_gives_one_readable_line(event_log: tuple[logging.Handler, io.StringIO]) -> None:
    handler, stream = event_log
    handler.setFormatter(logs.ConsoleFormatter())
    log_hook(event(events.TASK_FAILED, TRACEPARENT, outcome="failed", error="ValueError: x"))
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


def worker_event(name: str, worker: str, task_id: str, **data: Any) -> Event:
    return Event(name, task_id, "Echo", worker, 1, CORRELATION, data)


def test_metrics_follow_the_events() -> None:
    metrics = Metrics()
    hooks = Hooks([metrics])
    # echo: failed, timed out, then OOM-killed and failed for good
    for outcome, oom, duration in (("failed", False, 0.3), ("timeout", False, 30.0), ("failed", True, 0.7)):
        hooks.emit(worker_event(events.ATTEMPT_STARTED, "echo", "t1", carrier={}))
        assert samples(metrics)[("workerhost_tasks_in_flight", label(worker="echo"))] == 1
        data = finished(outcome, "E: x", oom_killed=oom, duration=duration, start_latency=0.05)
        hooks.emit(worker_event(events.ATTEMPT_FINISHED, "echo", "t1", **data))
        if outcome == "failed" and oom:
            hooks.emit(worker_event(events.TASK_FAILED, "echo", "t1", outcome="failed", error="E: x"))
        else:
            hooks.emit(worker_event(events.TASK_RETRYING, "echo", "t1", delay=1.0, error="E: x"))
    # stats: two tasks, both completed
    for task_id in ("t2", "t3"):
        hooks.emit(worker_event(events.ATTEMPT_STARTED, "stats", task_id, carrier={}))
    assert samples(metrics)[("workerhost_tasks_in_flight", label(worker="stats"))] == 2
    for task_id in ("t2", "t3"):
        hooks.emit(worker_event(events.ATTEMPT_FINISHED, "stats", task_id, **finished(duration=1.5, start_latency=0)))
        hooks.emit(worker_event(events.TASK_COMPLETED, "stats", task_id))

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


def test_metrics_for_host_events() -> None:
    metrics = Metrics()
    hooks = Hooks([metrics])
    hooks.emit(Event(events.SOURCE_DOWN, data={"error": "x"}))
    hooks.emit(Event(events.ENGINE_UP))
    hooks.emit(worker_event(events.LEASE_LOST, "echo", "t1", error="gone"))
    hooks.emit(worker_event(events.TASK_RELEASED, "echo", "t2"))
    hooks.emit(worker_event(events.TASK_RELEASED, "echo", "t3"))
    got = samples(metrics)
    assert got[("workerhost_source_up", label())] == 0
    assert got[("workerhost_engine_up", label())] == 1
    assert got[("workerhost_lease_lost_total", label())] == 1
    assert got[("workerhost_tasks_released_total", label())] == 2
    hooks.emit(Event(events.SOURCE_UP))
    hooks.emit(Event(events.ENGINE_DOWN, data={"error": "x"}))
    got = samples(metrics)
    assert got[("workerhost_source_up", label())] == 1
    assert got[("workerhost_engine_up", label())] == 0


def test_two_metrics_instances_do_not_share_counts() -> None:
    first, second = Metrics(), Metrics()
    first(worker_event(events.TASK_COMPLETED, "echo", "t1"))
    assert samples(first)[("workerhost_tasks_total", label(worker="echo", outcome="completed"))] == 1
    assert ("workerhost_tasks_total", label(worker="echo", outcome="completed")) not in samples(second)
