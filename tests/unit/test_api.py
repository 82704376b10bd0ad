"""runner.api: the HTTP face of `workerhost serve`, against a real embedded queue and a fake container runner."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from runner.api import create_app
from runner.config import Config, TelemetryConfig, WorkerConfig, loads
from runner.docker import Observer, Reaped, RunResult
from runner.errors import EngineError
from runner.host import Host
from runner.protocol import Envelope, ErrorInfo, Outcome, Status
from runner.sources import ClaimedTask, Finished, NotKept, TaskSource
from runner.sources.embedded import EmbeddedQueue
from runner.telemetry import context, events
from runner.telemetry.events import Hooks
from runner.telemetry.metrics import Metrics
from runner.telemetry.tracing import Tracing

ECHO, UPPER, STATS = "T.Echo", "T.Upper", "T.Stats"
OWNER = "host:1:aaaa"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
LIMIT = 64 * 1024

CONFIG = """
[host]
id = "test-host"
concurrency = 3
max_body = "64k"

[task_manager]
type = "embedded"
path = "{path}"

[[workers]]
name = "echo"
image = "workerhost/echo:latest"
task_types = ["T.Echo", "T.Upper"]
max_retries = 2
concurrency = 2

[[workers]]
name = "stats"
image = "workerhost/stats:latest"
task_types = ["T.Stats"]
"""

PRISMQ_CONFIG = """
[host]
id = "test-host"

[task_manager]
type = "http"
url = "http://taskmanager.invalid/api"

[[workers]]
name = "echo"
image = "workerhost/echo:latest"
task_types = ["T.Echo"]
"""


class FakeRunner:
    """What the API asks of the container runner, with answers the test sets."""

    def __init__(self) -> None:
        self.ping_error: str | None = None
        self.images: set[str] = {"workerhost/echo:latest"}
        self.image_error: str | None = None

    def ping(self) -> str | None:
        return self.ping_error

    def warm_counts(self) -> dict[str, dict[str, Any]]:
        return {"echo": {"mode": "prewarm", "target": 2, "idle": 1, "busy": 1, "starting": 0, "broken": None}}

    def image_present(self, image: str) -> bool:
        if self.image_error is not None:
            raise EngineError(self.image_error)
        return image in self.images

    def run(self, worker: WorkerConfig, task: Envelope, observe: Observer | None = None) -> RunResult:
        raise AssertionError("the API never runs a container")

    def cancel(self, task_id: str) -> bool:
        return False

    def reap(self, dead: Callable[[str], bool]) -> Reaped:
        return Reaped([], frozenset())

    def close(self) -> None:
        pass


class StubSource(TaskSource):
    """A task source that is not the embedded queue (the PrismQ case)."""

    async def claim(self, task_types: Any) -> ClaimedTask | None:
        return None

    async def renew(self, task: ClaimedTask) -> None:
        pass

    async def complete(self, task: ClaimedTask, finished: Finished) -> None:
        pass

    async def fail(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        pass

    async def release(self, task: ClaimedTask) -> None:
        pass

    async def health(self) -> dict[str, Any]:
        return {"type": "http", "reachable": True}

    async def close(self) -> None:
        pass


@dataclass
class Env:
    client: TestClient
    queue: EmbeddedQueue
    host: Host
    runner: FakeRunner

    def total(self) -> int:
        return sum(self.queue.counts().values())

    def submit(self, task_type: str = ECHO, **body: Any) -> dict[str, Any]:
        response = self.client.post("/tasks", json={"type": task_type, **body})
        assert response.status_code == 201, response.text
        task: dict[str, Any] = response.json()
        return task

    def fail(self, task_type: str = ECHO) -> str:
        """A task that failed for good, the way the host would report it."""
        task_id = self.submit(task_type, priority=1000)["id"]  # claimed before any other
        claimed = self.queue.claim_now([task_type])
        assert claimed is not None and claimed.id == task_id
        outcome = Outcome(Status.FAILED, error=ErrorInfo("ValueError", "bad text"), exit_code=2)
        asyncio.run(self.queue.fail(claimed, Finished(outcome, worker="echo"), retry_in=None))
        return str(task_id)


def config_for(tmp_path: Path) -> Config:
    return loads(CONFIG.format(path=tmp_path / "q.db"), source="test.toml", environ={})


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    config = config_for(tmp_path)
    queue = EmbeddedQueue(path=tmp_path / "q.db", owner=OWNER)
    runner = FakeRunner()
    host = Host(config, queue, runner, owner=OWNER)
    host.alive = True  # as if the loop ran; it does not in these tests
    with TestClient(create_app(host, Metrics(), queue)) as client:
        yield Env(client, queue, host, runner)
    asyncio.run(queue.close())


def error_of(response: Any) -> str:
    """The JSON error every refusal carries."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    message: str = body["error"]
    return message


# -- submit ---------------------------------------------------------------------------


def test_submit_returns_the_new_pending_task(env: Env) -> None:
    response = env.client.post(
        "/tasks", json={"type": ECHO, "params": {"text": "hi"}, "correlation_id": "corr-1", "priority": 7}
    )
    assert response.status_code == 201, response.text
    task = response.json()
    assert isinstance(task["id"], str) and task["id"]
    assert task["type"] == ECHO
    assert task["status"] == "pending"
    assert task["attempts"] == 0
    assert task["max_attempts"] == 3  # max_retries + 1
    assert task["priority"] == 7
    assert task["params"] == {"text": "hi"}
    assert task["correlation_id"] == "corr-1"
    assert env.queue.get(task["id"]) == task
    assert env.total() == 1


def test_submit_without_params_or_correlation_id(env: Env) -> None:
    task = env.submit(STATS)
    assert task["params"] == {}
    assert task["correlation_id"], "a correlation id is made up when none is given"
    assert task["max_attempts"] == 4  # the default max_retries is 3


def test_the_same_idempotency_key_returns_the_same_task(env: Env) -> None:
    first = env.client.post("/tasks", json={"type": ECHO, "params": {"n": 1}, "idempotency_key": "order-42"})
    assert first.status_code == 201
    again = env.client.post("/tasks", json={"type": ECHO, "params": {"n": 1}, "idempotency_key": "order-42"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert env.total() == 1


def test_an_idempotency_key_reused_for_other_content_is_a_conflict(env: Env) -> None:
    first = env.client.post("/tasks", json={"type": ECHO, "params": {"n": 1}, "idempotency_key": "order-42"})
    other = env.client.post("/tasks", json={"type": ECHO, "params": {"n": 2}, "idempotency_key": "order-42"})
    assert other.status_code == 409
    assert first.json()["id"] in error_of(other)
    assert env.queue.get(first.json()["id"])["params"] == {"n": 1}  # type: ignore[index]
    assert env.total() == 1


def test_the_traceparent_header_is_stored(env: Env) -> None:
    response = env.client.post("/tasks", json={"type": ECHO}, headers={"traceparent": TRACEPARENT})
    assert response.status_code == 201
    claimed = env.queue.claim_now([ECHO])
    assert claimed is not None
    assert claimed.id == response.json()["id"]
    assert claimed.traceparent == TRACEPARENT


def test_without_a_traceparent_header_none_is_stored(env: Env) -> None:
    env.submit()
    claimed = env.queue.claim_now([ECHO])
    assert claimed is not None
    assert claimed.traceparent is None


# -- refusals store nothing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"type": "T.Echo",', 400, ["JSON"]),
        (b"", 422, []),
        (b"[1, 2]", 422, []),
        (b'"T.Echo"', 422, []),
        (b"null", 422, []),
        (b'{"type": "T.Nope"}', 422, ["T.Nope"]),
        (b'{"type": "T.Echo", "params": [1, 2]}', 422, ["params"]),
        (b'{"type": "T.Echo", "params": "text"}', 422, ["params"]),
        (b'{"type": "T.Echo", "colour": "red"}', 422, ["colour"]),
        (b'{"params": {}}', 422, ["type"]),
        (b'{"type": ""}', 422, ["type"]),
        (b'{"type": 7}', 422, ["type"]),
        (b'{"type": "T.Echo", "priority": 5000}', 422, ["priority"]),
        (b'{"type": "T.Echo", "idempotency_key": ""}', 422, ["idempotency_key"]),
    ],
    ids=[
        "invalid-json",
        "empty",
        "array",
        "string",
        "null",
        "unknown-type",
        "params-array",
        "params-string",
        "extra-field",
        "missing-type",
        "empty-type",
        "type-not-string",
        "priority-out-of-range",
        "empty-idempotency-key",
    ],
)
def test_a_bad_submission_is_refused_with_a_json_error_and_stores_nothing(
    env: Env, body: bytes, status: int, says: list[str]
) -> None:
    response = env.client.post("/tasks", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    message = error_of(response)
    for word in says:
        assert word in message, f"{word!r} not in {message!r}"
    assert env.total() == 0


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_params_that_are_not_json_numbers_are_refused(env: Env, token: str) -> None:
    body = b'{"type": "T.Echo", "params": {"x": %s}}' % token.encode()
    response = env.client.post("/tasks", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422), response.text
    error_of(response)
    assert env.total() == 0


def test_an_unknown_task_type_lists_the_known_ones(env: Env) -> None:
    response = env.client.post("/tasks", json={"type": "T.Nope"})
    assert response.status_code == 422
    assert "T.Nope" in error_of(response)
    assert response.json()["known"] == [ECHO, UPPER, STATS]
    assert env.total() == 0


def test_a_validation_error_lists_the_fields(env: Env) -> None:
    response = env.client.post("/tasks", json={"type": ECHO, "params": [1], "colour": "red"})
    assert response.status_code == 422
    error_of(response)
    fields = {d["field"] for d in response.json()["details"]}
    assert fields == {"body.params", "body.colour"}


def test_an_oversized_body_with_a_content_length_is_413(env: Env) -> None:
    body = json.dumps({"type": ECHO, "params": {"text": "x" * LIMIT}}).encode()
    response = env.client.post("/tasks", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert str(LIMIT) in error_of(response)
    assert env.total() == 0


def test_an_oversized_chunked_body_is_413(env: Env) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"type": "T.Echo", "params": {"text": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}}'

    response = env.client.post("/tasks", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert str(LIMIT) in error_of(response)
    assert env.total() == 0


def test_a_body_just_under_the_limit_is_accepted(env: Env) -> None:
    envelope = json.dumps({"type": ECHO, "params": {"text": ""}}).encode()
    text = "x" * (LIMIT - len(envelope))
    body = json.dumps({"type": ECHO, "params": {"text": text}}).encode()
    assert len(body) == LIMIT
    response = env.client.post("/tasks", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 201, response.text
    assert env.total() == 1


# -- inspect and retry ------------------------------------------------------------------------


def test_get_a_task(env: Env) -> None:
    task = env.submit(params={"text": "hi"})
    response = env.client.get(f"/tasks/{task['id']}")
    assert response.status_code == 200
    assert response.json() == task


def test_get_an_unknown_task_is_404(env: Env) -> None:
    response = env.client.get("/tasks/no-such-task")
    assert response.status_code == 404
    assert "no-such-task" in error_of(response)


def test_list_tasks_filters_and_limits(env: Env) -> None:
    echo_1 = env.submit(ECHO)["id"]
    stats = env.submit(STATS)["id"]
    failed = env.fail(ECHO)
    echo_2 = env.submit(UPPER)["id"]

    def ids(query: str) -> list[str]:
        response = env.client.get(f"/tasks{query}")
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()]

    assert ids("") == [echo_2, failed, stats, echo_1]
    assert ids("?status=pending") == [echo_2, stats, echo_1]
    assert ids("?status=failed") == [failed]
    assert ids("?type=T.Stats") == [stats]
    assert ids("?type=T.Echo&status=pending") == [echo_1]
    assert ids("?type=T.Echo&status=failed") == [failed]
    assert ids("?limit=2") == [echo_2, failed]
    assert ids("?status=dead") == []
    assert ids("?type=T.Nope") == []


@pytest.mark.parametrize("query", ["?status=bogus", "?limit=0", "?limit=1001", "?limit=many"])
def test_list_tasks_refuses_a_bad_query(env: Env, query: str) -> None:
    response = env.client.get(f"/tasks{query}")
    assert response.status_code == 422, response.text
    message = error_of(response)
    if "status" in query:
        assert "bogus" in message
        assert "pending" in message, "the known statuses are listed"
    else:
        assert "limit" in message


def test_retry_a_failed_task(env: Env) -> None:
    failed = env.fail()
    assert env.queue.counts()["failed"] == 1
    response = env.client.post(f"/tasks/{failed}/retry")
    assert response.status_code == 200, response.text
    task = response.json()
    assert task["id"] == failed
    assert task["status"] == "pending"
    assert task["attempts"] == 0
    assert env.queue.counts()["failed"] == 0
    assert env.queue.counts()["pending"] == 1


def test_retry_a_pending_task_is_409(env: Env) -> None:
    task_id = env.submit()["id"]
    response = env.client.post(f"/tasks/{task_id}/retry")
    assert response.status_code == 409
    assert "pending" in error_of(response)
    assert env.client.get(f"/tasks/{task_id}").json()["status"] == "pending"


def test_retry_an_unknown_task_is_404(env: Env) -> None:
    response = env.client.post("/tasks/no-such-task/retry")
    assert response.status_code == 404
    assert "no-such-task" in error_of(response)


# -- description, health, workers, metrics -------------------------------------------------------


def test_openapi_is_served(env: Env) -> None:
    response = env.client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/tasks" in paths
    assert "post" in paths["/tasks"] and "get" in paths["/tasks"]
    assert "/tasks/{task_id}" in paths
    assert "/health" in paths


def test_health_ok(env: Env) -> None:
    env.submit()
    env.submit(STATS)
    response = env.client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["host"] == {"id": "test-host", "alive": True, "stopping": False, "in_flight": 0, "concurrency": 3}
    assert body["engine"] == {"reachable": True}
    source = body["source"]
    assert source["type"] == "embedded"
    assert source["reachable"] is True
    assert source["tasks"] == {"pending": 2, "running": 0, "completed": 0, "failed": 0, "dead": 0}


def test_health_is_degraded_without_the_engine(env: Env) -> None:
    env.runner.ping_error = "cannot reach /var/run/docker.sock"
    response = env.client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["engine"] == {"reachable": False, "error": "cannot reach /var/run/docker.sock"}
    assert body["source"]["reachable"] is True


def test_health_is_503_when_the_loop_is_not_alive(env: Env) -> None:
    env.host.alive = False
    response = env.client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down"
    assert body["host"]["alive"] is False


def test_health_shows_the_last_source_error(env: Env) -> None:
    env.host.services.health.down("database is locked")
    body = env.client.get("/health").json()
    assert body["source"]["last_error"] == "database is locked"


def test_workers(env: Env) -> None:
    response = env.client.get("/workers")
    assert response.status_code == 200
    echo, stats = response.json()
    assert echo["name"] == "echo"
    assert echo["image"] == "workerhost/echo:latest"
    assert echo["task_types"] == [ECHO, UPPER]
    assert echo["concurrency"] == 2
    assert echo["in_flight"] == 0
    assert echo["recent"] == []
    assert echo["image_present"] is True
    assert echo["engine_reachable"] is True
    assert echo["healthy"] is True
    assert stats["name"] == "stats"
    assert stats["image_present"] is False
    assert stats["healthy"] is False


def test_one_workers_health(env: Env) -> None:
    response = env.client.get("/workers/echo/health")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "echo"
    assert body["image_present"] is True
    assert body["in_flight"] == 0
    assert body["recent"] == []
    assert body["healthy"] is True
    # Its warm containers as the runner has them (null for a worker without prewarm or reuse).
    assert body["warm"] == {"mode": "prewarm", "target": 2, "idle": 1, "busy": 1, "starting": 0, "broken": None}


def test_an_unknown_workers_health_is_404(env: Env) -> None:
    response = env.client.get("/workers/nope/health")
    assert response.status_code == 404
    assert "nope" in error_of(response)
    assert response.json()["known"] == ["echo", "stats"]


def test_a_worker_whose_recent_runs_all_failed_is_unhealthy(env: Env) -> None:
    recent = env.host.workers["echo"].recent
    for i in range(3):
        recent.append({"task_id": f"t{i}", "outcome": "failed", "at": 0.0, "duration": 0.1})
    body = env.client.get("/workers/echo/health").json()
    assert len(body["recent"]) == 3
    assert body["recent"][0]["outcome"] == "failed"
    assert body["healthy"] is False
    recent.append({"task_id": "t3", "outcome": "completed", "at": 0.0, "duration": 0.1})
    assert env.client.get("/workers/echo/health").json()["healthy"] is True


def test_a_worker_health_says_when_the_engine_fails(env: Env) -> None:
    env.runner.image_error = "engine gone"
    body = env.client.get("/workers/echo/health").json()
    assert body["image_present"] is None
    assert body["engine_reachable"] is False
    assert body["engine_error"] == "engine gone"
    assert body["healthy"] is False


def test_metrics_count_the_queue(env: Env) -> None:
    env.submit()
    env.submit()
    env.fail()
    response = env.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert "workerhost_queue_tasks" in families
    depth = {s.labels["status"]: s.value for s in families["workerhost_queue_tasks"].samples}
    assert depth == {"pending": 2.0, "running": 0.0, "completed": 0.0, "failed": 1.0, "dead": 0.0}
    assert "workerhost_engine_up" in families


# -- tasks that live elsewhere ------------------------------------------------------------------


def test_without_the_embedded_queue_tasks_are_501(tmp_path: Path) -> None:
    config = loads(PRISMQ_CONFIG, source="test.toml", environ={})
    host = Host(config, StubSource(), FakeRunner(), owner=OWNER)
    host.alive = True
    with TestClient(create_app(host, Metrics(), None)) as client:
        response = client.post("/tasks", json={"type": ECHO})
        assert response.status_code == 501
        assert "http" in error_of(response)
        for path in ("/tasks", "/tasks/some-id"):
            got = client.get(path)
            assert got.status_code == 501, path
            error_of(got)
        assert client.post("/tasks/some-id/retry").status_code == 501
        assert client.get("/health").json()["status"] == "ok"
        metrics = client.get("/metrics")
        assert metrics.status_code == 200


def test_a_traceparent_in_the_body_is_kept_when_no_header_carries_one(env: Env) -> None:
    response = env.client.post("/tasks", json={"type": ECHO, "traceparent": TRACEPARENT})
    assert response.status_code == 201
    claimed = env.queue.claim_now([ECHO])
    assert claimed is not None and claimed.traceparent == TRACEPARENT


# -- the submit span ------------------------------------------------------------------------


def test_only_a_stored_submit_makes_a_span(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(TelemetryConfig(), exporter=exporter)
    queue = EmbeddedQueue(path=tmp_path / "q.db", owner=OWNER)
    host = Host(config_for(tmp_path), queue, FakeRunner(), Hooks([tracing], contexts=tracing.span_context), OWNER)
    with TestClient(create_app(host, Metrics(), queue)) as client:
        body = {"type": ECHO, "params": {"n": 1}, "idempotency_key": "k-1"}
        stored = client.post("/tasks", json=body, headers={"traceparent": TRACEPARENT})
        claimed = queue.claim_now([ECHO])
        again = client.post("/tasks", json=body)  # the same task: 200, not a new submit
        conflict = client.post("/tasks", json={**body, "params": {"n": 2}})
        unknown = client.post("/tasks", json={"type": "T.Nobody"})
        asyncio.run(queue.close())  # the queue goes away: 503
        unavailable = client.post("/tasks", json={"type": ECHO})
    tracing.shutdown()

    assert [r.status_code for r in (stored, again, conflict, unknown, unavailable)] == [201, 200, 409, 422, 503]
    [span] = exporter.get_finished_spans()
    assert span.name == f"submit {ECHO}"
    context = span.get_span_context()
    assert context is not None
    # The task carries the submit span's own context, in the caller's trace.
    assert stored.json()["id"] == span.attributes["workerhost.task.id"]
    assert claimed is not None and claimed.id == stored.json()["id"]
    assert claimed.traceparent == f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
    assert f"{context.trace_id:032x}" == TRACEPARENT.split("-")[1]
    assert span.parent is not None and f"{span.parent.span_id:016x}" == TRACEPARENT.split("-")[2]


def test_health_reads_and_changes_nothing(env: Env) -> None:
    seen: list[str] = []
    env.host.hooks.add(lambda event: seen.append(event.name))
    env.host.engine_ok(None)
    seen.clear()
    env.runner.ping_error = "the Docker engine does not answer"

    body = env.client.get("/health").json()

    assert body["engine"] == {"reachable": False, "error": "the Docker engine does not answer"}
    assert body["status"] == "degraded"
    assert env.host.engine_error is None  # what the janitor last saw stays as it was
    assert seen == []  # no engine_down from a read


# -- only what reads back as JSON: refused at submit, shown safely when stored before -------------


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (json.dumps({"type": ECHO, "params": _nested(255)}).encode(), "params.a.a"),
        (b'{"type": "T.Echo", "params": {"a": "\\ud800"}}', "params.a: a lone surrogate"),
        (b'{"type": "T.Echo", "params": {"a": "\xed\xa0\x80"}}', "params.a: a lone surrogate"),
        (b'{"type": "T.Echo", "params": {"\\udfff": 1}}', "params: a key a lone surrogate"),
        (b'{"type": "T.Echo", "params": {"a": [1, Infinity]}}', "params.a[1]"),
        (b'{"type": "T.Echo", "correlation_id": "a\\u0000b"}', "correlation_id"),
        (b'{"type": "T.Echo", "correlation_id": "has space"}', "correlation_id"),
        (b'{"type": "T.Echo", "traceparent": "00-abc-def-01"}', "traceparent"),
        (json.dumps({"type": ECHO, "traceparent": "x" * 8192}).encode(), "traceparent"),
        (b'{"type": "T.Echo", "priority": true}', "priority"),
        (b'{"type": "T.Echo", "priority": "5"}', "priority"),
    ],
    ids=[
        "nested-255", "surrogate-escaped", "surrogate-raw-bytes", "surrogate-key", "infinity",
        "correlation-nul", "correlation-space", "traceparent-malformed", "traceparent-8k",
        "priority-bool", "priority-string",
    ],
)  # fmt: skip
def test_what_would_not_read_back_is_refused_with_its_path_and_stores_nothing(env: Env, body: bytes, says: str) -> None:
    response = env.client.post("/tasks", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert says in error_of(response)
    assert env.total() == 0


def test_a_traceparent_header_that_is_not_w3c_is_ignored_not_stored(env: Env) -> None:
    response = env.client.post("/tasks", json={"type": ECHO}, headers={"traceparent": "x" * 8192})
    assert response.status_code == 201
    claimed = env.queue.claim_now([ECHO])
    assert claimed is not None and claimed.traceparent is None  # the trace starts at the host


def test_a_body_sent_without_a_json_content_type_is_read_as_json(env: Env) -> None:
    # What `curl host/tasks -d '{...}'` sends: application/x-www-form-urlencoded.
    body = b'{"type": "T.Echo", "params": {"text": "hi"}}'
    response = env.client.post("/tasks", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 201, response.text
    assert response.json()["params"] == {"text": "hi"}
    broken = env.client.post("/tasks", content=b"{", headers={"content-type": "application/x-www-form-urlencoded"})
    assert broken.status_code == 400
    assert "not valid JSON" in error_of(broken)


@pytest.mark.parametrize("other", [{"a": True}, {"a": 1.0}, {"a": "1"}])
def test_an_idempotency_key_compares_params_as_json_text(env: Env, other: dict[str, Any]) -> None:
    first = env.client.post("/tasks", json={"type": ECHO, "params": {"a": 1}, "idempotency_key": "k"})
    assert first.status_code == 201
    again = env.client.post("/tasks", json={"type": ECHO, "params": {"a": 1}, "idempotency_key": "k"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    conflict = env.client.post("/tasks", json={"type": ECHO, "params": other, "idempotency_key": "k"})
    assert conflict.status_code == 409, conflict.text


def _store_raw(env: Env, params: str, result: str | None = None, error_message: str | None = None) -> str:
    """A row as an older version could have stored it, written straight into the file."""
    task, _ = env.queue.submit(ECHO, {}, max_attempts=1)
    with sqlite3.connect(env.queue.path) as db:
        db.execute(
            "UPDATE tasks SET params = ?, result = ?, status = ?, error_type = ?, error_message = ? WHERE id = ?",
            (params, result, "completed" if result else "pending", "E" if error_message else None, error_message,
             task["id"]),
        )  # fmt: skip
    return str(task["id"])


@pytest.mark.parametrize(
    ("params", "result", "unreadable"),
    [
        ('{"a": "\\ud800"}', None, {"params"}),
        ("[" * 300 + "]" * 300, None, {"params"}),
        ('{"x": NaN}', '{"deep": ' + "[" * 100_000 + "]" * 100_000 + "}", {"params", "result"}),
        ("{}", '{"n": Infinity}', {"result"}),
    ],
    ids=["surrogate", "nested-300", "nan-and-a-bomb", "infinity-result"],
)
def test_reading_never_fails_on_a_row_an_older_version_stored(
    env: Env, params: str, result: str | None, unreadable: set[str]
) -> None:
    task_id = _store_raw(env, params, result)

    one = env.client.get(f"/tasks/{task_id}")
    listed = env.client.get("/tasks", params={"full": "true"})
    summaries = env.client.get("/tasks")

    for response in (one, listed, summaries):
        assert response.status_code == 200, response.text
        json.loads(response.content, parse_constant=_no_constants)  # strict JSON: no NaN, no Infinity
    body = one.json()
    assert set(body["unreadable"]) == unreadable
    assert all(body[field] is None for field in unreadable)
    assert [t["id"] for t in listed.json()] == [task_id]


def test_a_claim_of_a_stored_row_no_worker_could_be_given_fails_it_for_good(env: Env) -> None:
    task_id = _store_raw(env, '{"a": "\\ud800"}')
    assert env.queue.claim_now([ECHO]) is None
    failed = env.client.get(f"/tasks/{task_id}").json()
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "InvalidParams"
    assert "lone surrogate" in failed["error"]["message"]


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")


# -- memory: summaries, bounded pages, delete ------------------------------------------------


def test_lists_are_summaries_unless_asked_for_more(env: Env) -> None:
    task_id = env.submit(params={"text": "x" * 1000})["id"]
    [summary] = env.client.get("/tasks").json()
    assert summary["id"] == task_id and "params" not in summary and "result" not in summary
    [full] = env.client.get("/tasks", params={"full": "true"}).json()
    assert full["params"] == {"text": "x" * 1000}


def test_a_full_list_carries_whole_tasks_up_to_its_budget_and_summaries_after(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runner.api.LIST_BUDGET", 2500)
    ids = [env.submit(params={"text": str(i) * 1000})["id"] for i in range(4)]
    response = env.client.get("/tasks", params={"full": "true"})
    assert response.status_code == 200
    listed = response.json()
    assert [t["id"] for t in listed] == ids[::-1]  # newest first, all of them
    assert [("params" in t, "omitted" in t) for t in listed] == [(True, False)] * 2 + [(False, True)] * 2
    assert "X-Workerhost-Omitted" in response.headers
    first_two = env.client.get("/tasks", params={"full": "true", "limit": 2})
    assert "X-Workerhost-Omitted" not in first_two.headers


def test_delete_removes_a_task_that_is_not_running(env: Env) -> None:
    pending = env.submit()["id"]
    assert env.client.delete(f"/tasks/{pending}").status_code == 204
    assert env.client.get(f"/tasks/{pending}").status_code == 404
    assert env.client.delete(f"/tasks/{pending}").status_code == 404
    running = env.submit()["id"]
    assert env.queue.claim_now([ECHO]) is not None
    refused = env.client.delete(f"/tasks/{running}")
    assert refused.status_code == 409 and "running" in error_of(refused)
    assert env.client.get(f"/tasks/{running}").json()["status"] == "running"


# -- the contract ------------------------------------------------------------------------------


def test_an_empty_filter_means_any(env: Env) -> None:
    env.submit()
    response = env.client.get("/tasks", params={"status": "", "type": ""})
    assert response.status_code == 200 and len(response.json()) == 1


def test_a_wrong_method_says_which_are_allowed(env: Env) -> None:
    response = env.client.put("/tasks")
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}
    assert error_of(response)


def test_a_bug_is_answered_as_json_500(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(task_id: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(env.queue, "get", broken)
    with TestClient(env.client.app, raise_server_exceptions=False) as client:
        response = client.get("/tasks/x")
    assert response.status_code == 500
    assert "RuntimeError" in error_of(response)


def test_the_openapi_description_lists_what_each_route_answers(env: Env) -> None:
    paths = env.client.get("/openapi.json").json()["paths"]
    assert {"200", "201", "400", "409", "413", "422", "503"} <= set(paths["/tasks"]["post"]["responses"])
    assert {"200", "404", "503"} <= set(paths["/tasks/{task_id}"]["get"]["responses"])
    assert {"204", "404", "409"} <= set(paths["/tasks/{task_id}"]["delete"]["responses"])
    assert {"200", "404", "409"} <= set(paths["/tasks/{task_id}/retry"]["post"]["responses"])


# -- params_schema ----------------------------------------------------------------------------


SCHEMA_CONFIG = CONFIG.replace(
    'task_types = ["T.Stats"]',
    'task_types = ["T.Stats"]\n'
    'params_schema = { type = "object", required = ["text"], additionalProperties = false, '
    'properties = { text = { type = "string", maxLength = 10 } } }',
)


@pytest.fixture
def schema_env(tmp_path: Path) -> Iterator[Env]:
    config = loads(SCHEMA_CONFIG.replace("{path}", str(tmp_path / "q.db")), source="test.toml", environ={})
    queue = EmbeddedQueue(path=tmp_path / "q.db", owner=OWNER)
    runner = FakeRunner()
    host = Host(config, queue, runner, owner=OWNER)
    host.alive = True
    with TestClient(create_app(host, Metrics(), queue)) as client:
        yield Env(client, queue, host, runner)
    asyncio.run(queue.close())


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({}, "'text' is a required property"),
        ({"text": 5}, "params.text: 5 is not of type 'string'"),
        ({"text": "x" * 11}, "params.text"),
        ({"text": "ok", "colour": "red"}, "colour"),
    ],
    ids=["missing", "wrong-type", "too-long", "extra"],
)
def test_params_that_break_the_workers_schema_are_refused_naming_the_path_and_rule(
    schema_env: Env, params: dict[str, Any], says: str
) -> None:
    response = schema_env.client.post("/tasks", json={"type": STATS, "params": params})
    assert response.status_code == 422, response.text
    assert says in error_of(response)
    assert response.json()["details"]
    assert schema_env.total() == 0


def test_params_that_fit_the_schema_are_stored(schema_env: Env) -> None:
    assert schema_env.client.post("/tasks", json={"type": STATS, "params": {"text": "hi"}}).status_code == 201
    assert schema_env.client.post("/tasks", json={"type": ECHO, "params": {"any": 1}}).status_code == 201


def test_the_openapi_shows_each_types_params_schema(schema_env: Env) -> None:
    task_in = schema_env.client.get("/openapi.json").json()["components"]["schemas"]["TaskIn"]
    variants = {v["properties"]["type"]["const"]: v["properties"]["params"] for v in task_in["oneOf"]}
    assert set(variants) == {ECHO, UPPER, STATS}
    assert variants[STATS]["required"] == ["text"]
    assert variants[STATS]["properties"]["text"] == {"type": "string", "maxLength": 10}
    assert variants[ECHO]["type"] == "object" and "required" not in variants[ECHO]


# -- ?wait: answered when the task ends -------------------------------------------------------


def settle_later(env: Env, after: float, task_type: str = ECHO, tell: bool = True) -> threading.Thread:
    """Complete the first task of ``task_type`` that is stored, ``after`` seconds from now or once
    there is one, as a host would (``tell``: with the event the host emits once the outcome is
    stored; without it, as another host would, unseen here)."""

    def settle() -> None:
        time.sleep(after)
        deadline = time.monotonic() + 5
        while (claimed := env.queue.claim_now([task_type])) is None:
            assert time.monotonic() < deadline, "nothing to settle"
            time.sleep(0.002)
        done = Finished(Outcome(Status.COMPLETED, result={"done": claimed.id}), worker="echo")
        asyncio.run(env.queue.complete(claimed, done))
        if tell:
            env.host.hooks.emit(events.TaskCompleted(task_id=claimed.id, task_type=task_type))

    thread = threading.Thread(target=settle)
    thread.start()
    return thread


def test_submit_with_wait_answers_200_with_the_finished_task_as_soon_as_it_is_settled(env: Env) -> None:
    started = time.monotonic()
    thread = settle_later(env, 0.05)
    response = env.client.post("/tasks", params={"wait": 10}, json={"type": ECHO, "params": {"n": 1}})
    elapsed = time.monotonic() - started
    thread.join()

    assert response.status_code == 200, response.text
    task = response.json()
    assert (task["status"], task["result"]) == ("completed", {"done": task["id"]})
    assert elapsed < 0.8, f"woken by the settle, not by the next poll ({elapsed:.2f}s)"


def test_submit_with_wait_answers_202_with_the_pending_task_when_the_wait_ends(env: Env) -> None:
    started = time.monotonic()
    response = env.client.post("/tasks", params={"wait": 0.3}, json={"type": ECHO})
    elapsed = time.monotonic() - started

    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending"
    assert env.queue.get(response.json()["id"]) is not None
    assert 0.3 <= elapsed < 2.0


def test_get_with_wait_answers_at_once_for_a_final_task_and_202_when_the_wait_ends(env: Env) -> None:
    failed = env.fail()
    started = time.monotonic()
    final = env.client.get(f"/tasks/{failed}", params={"wait": 30})
    assert final.status_code == 200 and final.json()["status"] == "failed"
    assert time.monotonic() - started < 1.0
    pending = env.submit()["id"]
    waited = env.client.get(f"/tasks/{pending}", params={"wait": 0.2})
    assert waited.status_code == 202 and waited.json()["status"] == "pending"
    assert env.client.get("/tasks/no-such-task", params={"wait": 30}).status_code == 404


def test_get_with_wait_is_woken_by_the_settle(env: Env) -> None:
    task_id = env.submit()["id"]
    started = time.monotonic()
    thread = settle_later(env, 0.05)
    response = env.client.get(f"/tasks/{task_id}", params={"wait": 10})
    elapsed = time.monotonic() - started
    thread.join()
    assert response.status_code == 200 and response.json()["status"] == "completed"
    assert elapsed < 0.8, f"woken by the settle, not by the next poll ({elapsed:.2f}s)"


def test_a_task_another_host_settles_is_seen_by_the_slow_poll(env: Env) -> None:
    task_id = env.submit()["id"]
    started = time.monotonic()
    thread = settle_later(env, 0.05, tell=False)
    response = env.client.get(f"/tasks/{task_id}", params={"wait": 10})
    elapsed = time.monotonic() - started
    thread.join()
    assert response.status_code == 200 and response.json()["status"] == "completed"
    assert elapsed < 3.0


@pytest.mark.parametrize("wait", ["0", "-1", "301", "1e9", "abc", "nan", "inf", ""])
def test_a_bad_wait_is_refused_naming_it_and_stores_nothing(env: Env, wait: str) -> None:
    posted = env.client.post(f"/tasks?wait={wait}", json={"type": ECHO})
    got = env.client.get(f"/tasks/some-id?wait={wait}")
    for response in (posted, got):
        assert response.status_code == 422, response.text
        assert "wait" in error_of(response)
    assert env.total() == 0


def test_a_waiter_whose_client_went_away_is_dropped(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    queue = EmbeddedQueue(path=tmp_path / "q.db", owner=OWNER)
    host = Host(config, queue, FakeRunner(), owner=OWNER)
    host.alive = True
    app = create_app(host, Metrics(), queue)
    task_id = queue.submit(ECHO, {}, max_attempts=1)[0]["id"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        caller = socket.create_connection(("127.0.0.1", port))
        caller.sendall(f"GET /tasks/{task_id}?wait=60 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        _until(lambda: app.state.waiters.waiting() == 1, "the waiter")
        caller.close()
        _until(lambda: app.state.waiters.waiting() == 0, "the waiter to go with its client")
    finally:
        server.should_exit = True
        thread.join(10)
        asyncio.run(queue.close())


def _until(predicate: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- batches: all stored in one transaction, or none --------------------------------------------


def test_a_batch_is_stored_in_order_and_answered_201_with_every_task(env: Env) -> None:
    batch = [{"type": ECHO, "params": {"n": i}} for i in range(4)] + [{"type": STATS, "priority": 3}]
    response = env.client.post("/tasks", json=batch)

    assert response.status_code == 201, response.text
    tasks = response.json()
    assert [t["params"] for t in tasks] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}, {}]
    assert [t["status"] for t in tasks] == ["pending"] * 5
    assert [t["max_attempts"] for t in tasks] == [3, 3, 3, 3, 4]
    assert len({t["id"] for t in tasks}) == 5
    assert all(env.queue.get(t["id"]) == t for t in tasks)
    assert env.total() == 5


def test_a_batch_with_bad_items_is_refused_whole_with_every_error_by_index(env: Env) -> None:
    batch = [
        {"type": ECHO},
        {"type": "T.Nope"},
        {"type": ECHO, "params": [1]},
        "not a task",
        {"type": ECHO, "colour": "red", "priority": 5000},
        {"type": ECHO, "params": {"a": "\ud800"}},
    ]
    body = json.dumps(batch).encode()  # escaped: the lone surrogate travels as \ud800
    response = env.client.post("/tasks", content=body, headers={"content-type": "application/json"})

    assert response.status_code == 422, response.text
    fields = [d["field"] for d in response.json()["details"]]
    assert fields == ["[1].type", "[2].params", "[3]", "[4].priority", "[4].colour", "[5].params"]
    assert "T.Nope" in error_of(response) and response.json()["known"] == [ECHO, UPPER, STATS]
    assert env.total() == 0


def test_a_batch_item_that_breaks_its_workers_schema_is_named_by_index(schema_env: Env) -> None:
    batch = [{"type": STATS, "params": {"text": "ok"}}, {"type": STATS, "params": {"text": 5}}]
    response = schema_env.client.post("/tasks", json=batch)
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["details"]] == ["[1].params.text"]
    assert "[1].params.text: 5 is not of type 'string'" in error_of(response)
    assert schema_env.total() == 0


@pytest.mark.parametrize(("size", "says"), [(0, "empty"), (1001, "1000")])
def test_an_empty_batch_or_one_over_1000_is_refused(env: Env, size: int, says: str) -> None:
    response = env.client.post("/tasks", json=[{"type": ECHO}] * size)
    assert response.status_code == 422, response.text
    assert says in error_of(response)
    assert env.total() == 0


def test_a_batch_keeps_the_idempotency_rule_and_a_resent_batch_is_200(env: Env) -> None:
    batch = [{"type": ECHO, "params": {"n": 1}, "idempotency_key": "a"}, {"type": ECHO},
             {"type": ECHO, "params": {"n": 1}, "idempotency_key": "a"}]  # fmt: skip
    first = env.client.post("/tasks", json=batch)
    assert first.status_code == 201, first.text
    ids = [t["id"] for t in first.json()]
    assert ids[0] == ids[2] and ids[1] != ids[0]
    again = env.client.post("/tasks", json=[batch[0], batch[2]])
    assert again.status_code == 200 and [t["id"] for t in again.json()] == [ids[0], ids[0]]
    assert env.total() == 2


def test_a_batch_whose_key_names_other_content_is_refused_whole_409(env: Env) -> None:
    old = env.client.post("/tasks", json={"type": ECHO, "params": {"n": 1}, "idempotency_key": "k"}).json()
    batch = [{"type": ECHO}, {"type": ECHO, "params": {"n": 2}, "idempotency_key": "k"}]
    response = env.client.post("/tasks", json=batch)
    assert response.status_code == 409, response.text
    assert [d["field"] for d in response.json()["details"]] == ["[1].idempotency_key"]
    assert old["id"] in error_of(response)
    assert env.total() == 1


def test_a_batch_with_wait_answers_202_until_every_task_ended_then_200(env: Env) -> None:
    batch = [{"type": ECHO, "idempotency_key": "e"}, {"type": STATS, "idempotency_key": "s"}]
    thread = settle_later(env, 0.05)  # the first; the second is left pending
    first = env.client.post("/tasks", params={"wait": 0.5}, json=batch)
    thread.join()
    assert first.status_code == 202, first.text
    assert [t["status"] for t in first.json()] == ["completed", "pending"]
    claimed = env.queue.claim_now([STATS])
    assert claimed is not None
    asyncio.run(env.queue.fail(claimed, Finished(Outcome(Status.FAILED, error=ErrorInfo("E", "x")), "stats"), None))

    again = env.client.post("/tasks", params={"wait": 10}, json=batch)  # the same tasks, by their keys

    assert again.status_code == 200, again.text
    assert [t["status"] for t in again.json()] == ["completed", "failed"]


def test_a_batch_submit_is_traced_and_wakes_the_host_once_per_task(env: Env) -> None:
    seen: list[str] = []
    env.host.hooks.add(lambda event: seen.append(event.name))
    response = env.client.post("/tasks", json=[{"type": ECHO}, {"type": ECHO}])
    assert response.status_code == 201
    assert seen == [events.TASK_SUBMITTED] * 2
    assert env.host._wake.is_set()


def test_the_openapi_describes_the_batch_body_and_the_wait(env: Env) -> None:
    paths = env.client.get("/openapi.json").json()["paths"]
    post, get = paths["/tasks"]["post"], paths["/tasks/{task_id}"]["get"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    one, many = body["oneOf"]
    assert one == {"$ref": "#/components/schemas/TaskIn"}
    assert many["items"] == one and (many["minItems"], many["maxItems"]) == (1, 1000)
    for operation in (post, get):
        [wait] = [p for p in operation["parameters"] if p["name"] == "wait"]
        assert wait["in"] == "query" and wait["schema"]["exclusiveMinimum"] == 0 and wait["schema"]["maximum"] == 300
        assert "202" in operation["responses"]
    assert {"200", "201", "202"} <= set(post["responses"])


class CarryingStore:
    """A store that only carries tasks (RabbitMQ's): one at a time, and nothing kept to read back."""

    keeps_tasks = False

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(
        self, task_type: str, params: dict[str, Any], max_attempts: int, **_: Any
    ) -> tuple[dict[str, Any], bool]:
        self.submitted.append(task_type)
        now = "2026-01-01T00:00:00.000Z"
        task = {"id": f"t-{len(self.submitted)}", "type": task_type, "status": "pending", "attempts": 0,
                "max_attempts": max_attempts, "priority": 0, "correlation_id": "c", "created_at": now,
                "updated_at": now, "params": params}  # fmt: skip
        return task, True

    def submit_many(self, tasks: Any) -> Any:
        raise NotKept("the amqp task source publishes tasks one by one")

    def get(self, task_id: str) -> Any:
        raise NotKept("results go to reply_to")

    def statuses(self, task_ids: Any) -> Any:
        raise NotKept("results go to reply_to")


def test_a_store_that_only_carries_tasks_refuses_wait_and_batches_before_sending_any(tmp_path: Path) -> None:
    store = CarryingStore()
    host = Host(config_for(tmp_path), StubSource(), FakeRunner(), owner=OWNER)
    with TestClient(create_app(host, Metrics(), store)) as client:  # type: ignore[arg-type]
        waited = client.post("/tasks", params={"wait": 5}, json={"type": ECHO})
        batch = client.post("/tasks", json=[{"type": ECHO}, {"type": ECHO}])
        one = client.post("/tasks", json={"type": ECHO})
    assert waited.status_code == 501 and "wait" in error_of(waited)
    assert batch.status_code == 501 and "one by one" in error_of(batch)
    assert one.status_code == 201
    assert store.submitted == [ECHO]  # only the one sent without wait


# -- /docs and /redoc: every file they load is served here -----------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_everything_from_this_host(env: Env, page: str) -> None:
    """On a machine without internet a page that loads Swagger UI or ReDoc from a CDN is blank."""
    response = env.client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    urls = re.findall(r"""(?:src|href|url)\s*[=:(]\s*['"]([^'"]+)['"]""", html)
    assert urls, html
    outside = [u for u in urls if not u.startswith("/") or u.startswith("//")]
    assert outside == [], f"{page} loads from elsewhere: {outside}"
    assert "fonts.googleapis" not in html and "cdn.jsdelivr" not in html
    for url in urls:
        asset = env.client.get(url)
        assert asset.status_code == 200, url
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"] and len(asset.content) > 100_000
        elif url.endswith(".css"):
            assert asset.headers["content-type"].startswith("text/css")
    assert "/openapi.json" in urls


# -- a task's trace ----------------------------------------------------------------------------------


def test_a_task_without_trace_context_shows_the_trace_its_attempts_get(env: Env) -> None:
    task = env.client.post("/tasks", json={"type": "T.Echo", "params": {}}).json()
    shown = env.client.get(f"/tasks/{task['id']}").json()
    # The host derives it from the id for every attempt on every host (runner/task.py, envelope_for).
    assert shown["trace_id"] == context.root_for(task["id"]).trace_id
    assert "trace_url" not in shown  # no [telemetry] trace_url: no link


def test_a_task_links_to_its_trace_when_trace_url_is_set(tmp_path: Path) -> None:
    text = (
        CONFIG.format(path=tmp_path / "q.db") + '\n[telemetry]\ntrace_url = "http://localhost:16686/trace/{trace_id}"\n'
    )
    config = loads(text, source="test.toml", environ={})
    queue = EmbeddedQueue(path=tmp_path / "q.db", owner=OWNER)
    host = Host(config, queue, FakeRunner(), owner=OWNER)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        with TestClient(create_app(host, Metrics(), queue)) as client:
            task = client.post("/tasks", json={"type": "T.Echo", "params": {}, "traceparent": traceparent}).json()
            shown = client.get(f"/tasks/{task['id']}").json()
    finally:
        asyncio.run(queue.close())
    assert shown["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert shown["trace_url"] == "http://localhost:16686/trace/0af7651916cd43dd8448eb211c80319c"
