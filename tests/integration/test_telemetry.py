"""Tracing, logs and metrics of `serve` with real containers, exported to a real OTLP receiver."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, new_host_id
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.serving import Serve, config_text, free_port

pytestmark = pytest.mark.docker

WORKERS = """
[[workers]]
name = "PrismQ.IdeaInspiration.TextStats"
image = "workerhost/text-stats:latest"
task_types = ["PrismQ.IdeaInspiration.TextStats"]
memory = "128m"

[[workers]]
name = "PrismQ.Legacy.NormalizeTags"
image = "workerhost/legacy-tags:latest"
task_types = ["PrismQ.Legacy.NormalizeTags"]
memory = "64m"

[[workers]]
name = "Test.Slow"
image = "workerhost-test/behave:latest"
task_types = ["Test.Slow"]
timeout = "2s"

[[workers]]
name = "Test.Small"
image = "workerhost-test/behave:latest"
task_types = ["Test.Small"]
memory = "32m"
"""


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory, behave_image: str, example_images: None
) -> Iterator[tuple[Serve, OtlpReceiver]]:
    """One host exporting to a receiver, with a hook that always raises, logging JSON lines."""
    tmp = tmp_path_factory.mktemp("traced")
    with OtlpReceiver() as receiver:
        port = free_port()
        config = tmp / "traced.toml"
        telemetry = f'\n[telemetry]\notlp_endpoint = "{receiver.endpoint}"\nhooks = ["tests.hooks:explode"]\n'
        config.write_text(config_text(new_host_id(), port, tmp / "q.db", behave_image, workers=WORKERS + telemetry))
        env = {"WORKERHOST_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)}
        host = Serve(config, port, tmp / "serve.log", env).start()
        yield host, receiver
        host.stop()


def submit(host: Serve, task_type: str, params: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Submit with a trace context of our own, as a producer that traces would."""
    trace_id = secrets.token_hex(16)
    response = host.http.post(
        "/tasks", json={"type": task_type, "params": params},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    )  # fmt: skip
    assert response.status_code == 201, response.text
    return response.json(), trace_id


def log_lines(host: Serve, task_id: str) -> list[dict[str, Any]]:
    lines = []
    for raw in host.log.read_text().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if line.get("task_id") == task_id:
            lines.append(line)
    return lines


def spans_named(spans: list[ReceivedSpan], prefix: str) -> list[ReceivedSpan]:
    return sorted((s for s in spans if s.name.startswith(prefix)), key=lambda s: s.start)


@pytest.mark.parametrize(
    ("task_type", "params", "worker_spans"),
    [
        (
            "PrismQ.IdeaInspiration.TextStats",
            {"text": "Spans from inside. Without a network."},
            {"tokenize", "keywords"},
        ),
        ("PrismQ.Legacy.NormalizeTags", {"tags": ["Python 2", "python_2"]}, {"normalise"}),
    ],
    ids=["python3", "python2.7"],
)
def test_one_trace_from_submit_to_the_workers_own_spans(
    traced: tuple[Serve, OtlpReceiver], task_type: str, params: dict[str, Any], worker_spans: set[str]
) -> None:
    host, receiver = traced
    task, trace_id = submit(host, task_type, params)
    done = host.wait_for(task["id"], ("completed", "failed", "dead"))
    assert done["status"] == "completed", done
    receiver.wait_for(lambda: worker_spans <= {s.name for s in receiver.trace(trace_id)})

    spans = receiver.trace(trace_id)
    names = {s.name for s in spans}
    assert {f"submit {task_type}", f"receive {task_type}", "attempt 1"} <= names
    assert {"container.create", "container.start", "container.exchange", "container.teardown"} <= names
    # The incoming trace is continued: every span is in it, and none starts a trace of its own.
    assert all(s.trace_id == trace_id for s in spans)
    submit_span = spans_named(spans, "submit")[0]
    attempt = spans_named(spans, "attempt")[0]
    assert attempt.parent_id == submit_span.span_id
    assert attempt.attributes["workerhost.outcome"] == "completed"
    assert attempt.attributes["container.image.id"].startswith("sha256:")
    assert attempt.attributes["workerhost.limits.memory"] > 0
    for name in worker_spans:
        (inside,) = [s for s in spans if s.name == name]
        assert inside.parent_id == attempt.span_id, f"{name} is not a child of the attempt"
        assert inside.attributes["workerhost.source"] == "worker"
        assert attempt.start <= inside.start <= inside.end <= attempt.end
    # One correlation id on every span and every log line of the task.
    correlation = done["correlation_id"]
    assert {s.attributes.get("workerhost.correlation_id") for s in spans} == {correlation}
    lines = log_lines(host, task["id"])
    assert {line["event"] for line in lines} >= {
        "task_received",
        "attempt_started",
        "attempt_finished",
        "task_completed",
    }
    assert {line.get("correlation_id") for line in lines} == {correlation}
    assert {line.get("trace_id") for line in lines} == {trace_id}


def test_the_worker_logs_are_relogged_with_the_tasks_keys(traced: tuple[Serve, OtlpReceiver]) -> None:
    host, _ = traced
    task, _ = submit(host, "PrismQ.Legacy.NormalizeTags", {"tags": ["a", "b", "a"]})
    host.wait_for(task["id"], ("completed",))
    relogged = [line for line in log_lines(host, task["id"]) if line["event"] == "worker_log"]
    assert [line["line"] for line in relogged] == ["normalised 3 tags into 2 (0 dropped)"]
    assert relogged[0]["worker"] == "PrismQ.Legacy.NormalizeTags"


def test_retries_are_sibling_attempts_in_one_trace(traced: tuple[Serve, OtlpReceiver]) -> None:
    host, receiver = traced
    task, trace_id = submit(host, "Test.Behave", {"do": "exit", "code": 1})
    assert host.wait_for(task["id"], ("dead", "failed", "completed"))["status"] == "dead"
    receiver.wait_for(lambda: len(spans_named(receiver.trace(trace_id), "attempt")) == 3)

    attempts = spans_named(receiver.trace(trace_id), "attempt")
    assert [a.name for a in attempts] == ["attempt 1", "attempt 2", "attempt 3"]
    assert len({a.parent_id for a in attempts}) == 1  # siblings, under the submit span
    assert all(a.status == 2 for a in attempts)  # ERROR


@pytest.mark.parametrize(
    ("task_type", "params", "reason"),
    [
        ("Test.Slow", {"do": "sleep", "seconds": 30}, "Timeout: killed at the deadline after 2s"),
        ("Test.Small", {"do": "alloc", "mb": 200}, "MemoryLimitExceeded: killed by the memory limit of 32 MiB"),
    ],
    ids=["timeout", "oom"],
)
def test_a_timeout_and_an_oom_kill_are_errors_with_the_reason(
    traced: tuple[Serve, OtlpReceiver], task_type: str, params: dict[str, Any], reason: str
) -> None:
    host, receiver = traced
    task, trace_id = submit(host, task_type, params)
    host.wait_for(task["id"], ("failed", "dead", "completed"))
    receiver.wait_for(lambda: bool(spans_named(receiver.trace(trace_id), "attempt")))

    (attempt,) = spans_named(receiver.trace(trace_id), "attempt")
    assert attempt.status == 2
    assert attempt.status_message.startswith(reason)
    assert any(name == "exception" for name, _ in attempt.events)


def test_hostile_side_channel_lines_are_bounded_and_ignored(traced: tuple[Serve, OtlpReceiver]) -> None:
    host, receiver = traced
    task, trace_id = submit(host, "Test.Behave", {"do": "abuse_side_channel", "spans": 3000})
    done = host.wait_for(task["id"], ("completed", "failed", "dead"), timeout=120)
    assert done["status"] == "completed", done
    receiver.wait_for(lambda: len([s for s in receiver.trace(trace_id) if s.name.startswith("flood")]) >= 1000)

    flood = [s for s in receiver.trace(trace_id) if s.name.startswith("flood")]
    assert len(flood) == 1000  # the rest are counted, not exported
    lines = log_lines(host, task["id"])
    warning = next(line for line in lines if line["event"] == "attempt_finished")
    assert warning["level"] == "warning"
    # Two lines of bad JSON, and the 2 MiB line, which is cut and so malformed too.
    assert "3 malformed side-channel lines ignored" in warning["side_channel"]
    assert "1 lines over 64 KiB cut" in warning["side_channel"]
    assert "2000 spans beyond 1000 dropped" in warning["side_channel"]
    assert any(line.get("line") == "a plain log line after all that" for line in lines)
    assert host.http.get("/health").json()["status"] == "ok"


def test_a_hook_that_raises_is_logged_and_changes_nothing(traced: tuple[Serve, OtlpReceiver]) -> None:
    host, _ = traced
    task, _ = submit(host, "Test.Behave", {"do": "ok"})
    assert host.wait_for(task["id"], ("completed", "failed", "dead"))["status"] == "completed"
    assert "this hook always fails (task_completed)" in host.log.read_text()


def test_metrics_count_what_ran(tmp_path: Path, behave_image: str, host_id: str) -> None:
    port = free_port()
    config = tmp_path / "metrics.toml"
    config.write_text(config_text(host_id, port, tmp_path / "q.db", behave_image, workers=WORKERS))
    host = Serve(config, port, tmp_path / "serve.log").start()
    try:
        ids = [host.submit("Test.Behave", do="ok")["id"] for _ in range(3)]
        ids.append(host.submit("Test.Behave", do="exit", code=2)["id"])
        ids.append(host.submit("Test.Behave", do="exit", code=1)["id"])  # 3 attempts, then dead
        ids.append(host.submit("Test.Small", do="alloc", mb=200)["id"])
        ids.append(host.submit("Test.Slow", do="sleep", seconds=30)["id"])
        for task_id in ids:
            host.wait_for(task_id, ("completed", "failed", "dead"), timeout=90)
        families = {f.name: f for f in text_string_to_metric_families(host.http.get("/metrics").text)}
    finally:
        host.stop()

    def value(family: str, sample: str, **labels: str) -> float:
        found = [s.value for s in families[family].samples if s.name == sample and s.labels == labels]
        return found[0] if found else 0.0

    assert value("workerhost_tasks", "workerhost_tasks_total", worker="Test.Behave", outcome="completed") == 3
    assert value("workerhost_tasks", "workerhost_tasks_total", worker="Test.Behave", outcome="failed") == 2
    assert value("workerhost_attempts", "workerhost_attempts_total", worker="Test.Behave", outcome="failed") == 4
    assert value("workerhost_retries", "workerhost_retries_total", worker="Test.Behave") == 2
    assert value("workerhost_oom_kills", "workerhost_oom_kills_total", worker="Test.Small") == 1
    assert value("workerhost_timeouts", "workerhost_timeouts_total", worker="Test.Slow") == 1
    assert value("workerhost_tasks", "workerhost_tasks_total", worker="Test.Slow", outcome="timeout") == 1
    assert (
        value("workerhost_task_duration_seconds", "workerhost_task_duration_seconds_count", worker="Test.Behave") == 7
    )
    assert value("workerhost_tasks_in_flight", "workerhost_tasks_in_flight", worker="Test.Behave") == 0
    assert value("workerhost_queue_tasks", "workerhost_queue_tasks", status="completed") == 3
    assert value("workerhost_queue_tasks", "workerhost_queue_tasks", status="dead") == 1
    assert value("workerhost_engine_up", "workerhost_engine_up") == 1
