"""The dashboard's backend: its page, the login and its cookie, attempt records, the overview, search and pages.

Against a real embedded queue and the fake container runner of test_api.py; no Docker.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from runner.api import create_app
from runner.config import Config, loads
from runner.host import Host
from runner.protocol import ErrorInfo, Outcome, Status
from runner.sidechannel import WorkerSpan
from runner.sources import Finished
from runner.sources.embedded import MAX_ATTEMPT_RECORDS, EmbeddedQueue
from runner.telemetry import events
from runner.telemetry.metrics import Metrics
from runner.telemetry.records import MAX_SPANS, AttemptRecords
from tests.unit.test_api import CONFIG, ECHO, OWNER, FakeRunner

TOKEN = "t" * 40
CSRF = {"X-Workerhost-CSRF": "1"}
TRACE = "0af7651916cd43dd8448eb211c80319c"
ATTEMPT_TP = f"00-{TRACE}-b7ad6b7169203331-01"


@dataclass
class Env:
    client: TestClient
    queue: EmbeddedQueue
    host: Host
    metrics: Metrics

    def submit(self, **body: Any) -> dict[str, Any]:
        response = self.client.post("/tasks", json={"type": ECHO, **body}, headers=CSRF)
        assert response.status_code == 201, response.text
        task: dict[str, Any] = response.json()
        return task

    def settle(self, ok: bool) -> str:
        """A task that completed (or failed for good), the way the host reports it."""
        task_id = str(self.submit(priority=1000)["id"])
        claimed = self.queue.claim_now([ECHO])
        assert claimed is not None and claimed.id == task_id
        if ok:
            outcome = Outcome(Status.COMPLETED, result={"ok": True}, exit_code=0)
            asyncio.run(self.queue.complete(claimed, Finished(outcome, worker="echo")))
        else:
            outcome = Outcome(Status.FAILED, error=ErrorInfo("ValueError", "bad"), exit_code=2)
            asyncio.run(self.queue.fail(claimed, Finished(outcome, worker="echo"), retry_in=None))
        return task_id


def make_env(tmp_path: Path, token: str | None) -> Iterator[Env]:
    text = CONFIG.format(path=tmp_path / "q.db")
    if token is not None:
        text = text.replace("[host]\n", f'[host]\napi_token = "{token}"\n', 1)
    config: Config = loads(text, source="test.toml", environ={})
    queue = EmbeddedQueue(path=tmp_path / "q.db", owner=OWNER)
    host = Host(config, queue, FakeRunner(), owner=OWNER)
    host.alive = True
    metrics = Metrics()
    with TestClient(create_app(host, metrics, queue)) as client:
        yield Env(client, queue, host, metrics)
    asyncio.run(queue.close())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, None)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, TOKEN)


def log_in(env: Env) -> str:
    response = env.client.post("/login", json={"token": TOKEN})
    assert response.status_code == 204, response.text
    cookie: str = response.headers["set-cookie"]
    return cookie


# -- the page -------------------------------------------------------------------------------


def test_the_page_and_its_files_are_served_without_a_token(guarded: Env) -> None:
    page = guarded.client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert guarded.client.get("/static/dashboard/index.html").status_code == 200
    assert guarded.client.get("/static/dashboard/%2e%2e/dashboard.py").status_code == 404  # nothing beside it
    assert guarded.client.get("/static/dashboard/..%2f..%2fapi.py").status_code == 404
    assert guarded.client.get("/tasks").status_code == 401  # the data is not public


def test_the_page_routes_are_not_in_the_api_description(env: Env) -> None:
    paths = env.client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert {"/login", "/logout", "/session", "/overview"} <= set(paths)


# -- login --------------------------------------------------------------------------------


def test_a_wrong_token_is_refused_counted_and_sets_no_cookie(guarded: Env, caplog: pytest.LogCaptureFixture) -> None:
    response = guarded.client.post("/login", json={"token": "x" * 40})
    assert response.status_code == 401
    assert response.json()["error"]
    assert "set-cookie" not in response.headers
    assert guarded.metrics.auth_failures.labels("invalid")._value.get() == 1
    assert any("refused: invalid" in r.getMessage() for r in caplog.records)
    assert guarded.client.get("/tasks").status_code == 401
    assert guarded.client.get("/session").json() == {"auth_required": True, "logged_in": False}


def test_login_sets_an_httponly_samesite_strict_cookie_that_lets_the_page_read(
    guarded: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="runner.auth")
    cookie = log_in(guarded)
    parts = [part.strip().lower() for part in cookie.split(";")]
    assert parts[0].startswith("workerhost_session=") and len(parts[0]) > 40
    assert TOKEN not in cookie
    assert {"httponly", "samesite=strict", "path=/"} <= set(parts)
    assert any("POST /login 204 by token default" in r.getMessage() for r in caplog.records)
    assert guarded.client.get("/tasks").status_code == 200
    assert guarded.client.get("/session").json() == {"auth_required": True, "logged_in": True}
    assert guarded.client.get("/health").json()["host"]["concurrency"] == 3  # details: a logged-in caller


def test_a_change_by_cookie_needs_the_csrf_header(guarded: Env) -> None:
    log_in(guarded)
    refused = guarded.client.post("/tasks", json={"type": ECHO})
    assert refused.status_code == 403
    assert "X-Workerhost-CSRF" in refused.json()["error"] or "x-workerhost-csrf" in refused.json()["error"]
    assert sum(guarded.queue.counts().values()) == 0
    assert guarded.client.post("/tasks", json={"type": ECHO}, headers={"X-Workerhost-CSRF": "0"}).status_code == 403
    task = guarded.submit()  # with the header
    assert guarded.client.delete(f"/tasks/{task['id']}").status_code == 403
    assert guarded.client.delete(f"/tasks/{task['id']}", headers=CSRF).status_code == 204


def test_a_cross_site_request_with_the_cookie_and_header_is_still_refused(guarded: Env) -> None:
    log_in(guarded)
    response = guarded.client.post("/tasks", json={"type": ECHO}, headers={**CSRF, "Origin": "https://evil.example"})
    assert response.status_code == 403
    assert sum(guarded.queue.counts().values()) == 0


def test_a_bearer_token_needs_no_csrf_header(guarded: Env) -> None:
    response = guarded.client.post("/tasks", json={"type": ECHO}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 201


def test_logout_ends_the_session_and_a_made_up_cookie_is_refused(guarded: Env) -> None:
    cookie = log_in(guarded)
    value = cookie.split(";")[0].split("=", 1)[1]
    assert guarded.client.post("/logout", headers=CSRF).status_code == 204
    assert guarded.client.get("/tasks").status_code == 401
    guarded.client.cookies.set("workerhost_session", value)  # the old one, kept by someone
    assert guarded.client.get("/tasks").status_code == 401
    guarded.client.cookies.set("workerhost_session", "made-up")
    assert guarded.client.get("/tasks").status_code == 401
    assert guarded.client.get("/session").json()["logged_in"] is False


def test_an_expired_session_is_refused(guarded: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    log_in(guarded)
    later = time.monotonic() + 13 * 3600
    monkeypatch.setattr("runner.auth.time.monotonic", lambda: later)
    assert guarded.client.get("/tasks").status_code == 401


def test_without_a_token_everything_works_without_login(env: Env) -> None:
    assert env.client.get("/session").json() == {"auth_required": False, "logged_in": True}
    assert env.client.post("/tasks", json={"type": ECHO}).status_code == 201  # no CSRF header, no cookie
    login = env.client.post("/login", json={"token": "anything"})
    assert login.status_code == 204
    assert "set-cookie" not in login.headers
    assert env.client.get("/overview").status_code == 200


def test_login_refuses_a_body_that_is_not_a_token(guarded: Env) -> None:
    assert guarded.client.post("/login", json={"token": ""}).status_code == 422
    assert guarded.client.post("/login", json={"token": 5}).status_code == 422
    assert guarded.client.post("/login", json={"token": TOKEN, "extra": 1}).status_code == 422


# -- attempt records ----------------------------------------------------------------------


def worker_span(n: int, **overrides: Any) -> WorkerSpan:
    values: dict[str, Any] = {
        "trace_id": int(TRACE, 16), "span_id": 0x1000 + n, "parent_id": 0xB7AD6B7169203331, "name": "normalise",
        "start": 1764500000.2, "end": 1764500000.3, "attributes": {"rows": n}, "error": None,
    }  # fmt: skip
    return WorkerSpan(**{**values, **overrides})


def run_attempt(env: Env, task_id: str, spans: list[WorkerSpan], attempt: int = 1) -> None:
    keys = {"task_id": task_id, "task_type": ECHO, "worker": "echo", "attempt": attempt, "traceparent": ATTEMPT_TP}
    hooks = env.host.hooks
    hooks.emit(events.AttemptStarted(**keys, image="workerhost/echo:latest", start_ns=1764500000_000_000_000))
    for span in spans:
        hooks.emit(events.WorkerSpanReceived(**keys, span=span))
    hooks.emit(events.TaskProgress(**keys, percent=40.0, message="halfway <b>"))
    phases = (
        ("create", 1764500000_000_000_000, 1764500000_050_000_000),
        ("start", 1764500000_050_000_000, 1764500000_100_000_000),
        ("exchange", 1764500000_100_000_000, 1764500000_400_000_000),
        ("teardown", 1764500000_400_000_000, 1764500000_450_000_000),
    )
    hooks.emit(
        events.AttemptFinished(
            **keys, outcome="completed", exit_code=0, duration=0.45, image_id="sha256:abc", phases=phases,
            mode="cold", start_ns=1764500000_000_000_000, end_ns=1764500000_450_000_000,
        )
    )  # fmt: skip


def test_an_attempt_is_recorded_with_its_phases_and_worker_spans(env: Env) -> None:
    task_id = env.submit()["id"]
    run_attempt(env, task_id, [worker_span(1)])
    task = env.client.get(f"/tasks/{task_id}").json()
    [record] = task["attempt_records"]
    assert record["attempt"] == 1
    assert record["outcome"] == "completed"
    assert record["exit_code"] == 0
    assert record["image_id"] == "sha256:abc"
    assert record["oom_killed"] is False
    assert record["mode"] == "cold"
    assert record["error"] is None
    assert record["start"] == pytest.approx(1764500000.0)
    assert record["end"] == pytest.approx(1764500000.45)
    assert [p["name"] for p in record["phases"]] == ["create", "start", "exchange", "teardown"]
    assert record["phases"][2]["start"] == pytest.approx(1764500000.1)
    assert record["spans"] == [
        {"name": "normalise", "span_id": f"{0x1001:016x}", "parent_id": "b7ad6b7169203331",
         "start": 1764500000.2, "end": 1764500000.3, "attrs": {"rows": 1}, "error": None}
    ]  # fmt: skip
    assert "progress" not in task  # the attempt has ended


def test_progress_of_a_running_task_is_shown(env: Env) -> None:
    task_id = env.submit()["id"]
    assert env.queue.claim_now([ECHO]) is not None
    keys = {"task_id": task_id, "task_type": ECHO, "worker": "echo", "attempt": 1}
    env.host.hooks.emit(events.AttemptStarted(**keys))
    assert "progress" not in env.client.get(f"/tasks/{task_id}").json()
    env.host.hooks.emit(events.TaskProgress(**keys, percent=40.0, message="rows"))
    task = env.client.get(f"/tasks/{task_id}").json()
    assert task["status"] == "running"
    assert task["progress"] == {"percent": 40.0, "message": "rows"}
    assert "attempt_records" not in task  # none has ended


def test_a_worker_span_that_would_not_read_back_is_cleaned_and_spans_are_bounded(env: Env) -> None:
    task_id = env.submit()["id"]
    hostile = worker_span(0, name="\ud800<script>", attributes={"nan": float("nan"), "\udfff": "x"}, error="e" * 10_000)
    run_attempt(env, task_id, [hostile] + [worker_span(n) for n in range(1, MAX_SPANS + 50)])
    [record] = env.client.get(f"/tasks/{task_id}").json()["attempt_records"]
    assert len(record["spans"]) == MAX_SPANS
    first = record["spans"][0]
    assert "<script>" in first["name"] and "\ud800" not in first["name"]
    assert first["attrs"]["nan"] is None
    assert len(first["error"]) < 4200


def test_attempt_records_are_bounded_and_go_with_their_task(env: Env) -> None:
    task_id = env.submit()["id"]
    for n in range(1, MAX_ATTEMPT_RECORDS + 6):
        run_attempt(env, task_id, [], attempt=n)
    records = env.client.get(f"/tasks/{task_id}").json()["attempt_records"]
    assert [r["attempt"] for r in records] == list(range(6, MAX_ATTEMPT_RECORDS + 6))
    assert env.client.delete(f"/tasks/{task_id}").status_code == 204
    assert env.queue.attempts(task_id) == []


def test_a_store_that_fails_does_not_break_the_hook(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def record_attempt(self, task_id: str, record: dict[str, Any]) -> None:
            raise OSError("disk full")

    hook = AttemptRecords(Broken())  # type: ignore[arg-type]
    hook(events.AttemptFinished(task_id="t1", attempt=1))
    assert any("disk full" in r.getMessage() for r in caplog.records)


def test_an_existing_database_gets_the_attempts_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    asyncio.run(EmbeddedQueue(path, owner=OWNER).close())
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE attempts")  # as a database from before the dashboard
    queue = EmbeddedQueue(path, owner=OWNER)
    queue.record_attempt("t1", {"attempt": 1})
    assert queue.attempts("t1") == [{"attempt": 1}]
    asyncio.run(queue.close())


# -- the overview ---------------------------------------------------------------------------


def test_the_overview_counts_tasks_and_what_ended_per_minute(env: Env) -> None:
    env.submit()
    env.settle(ok=True)
    env.settle(ok=True)
    env.settle(ok=False)
    old = env.settle(ok=True)
    with sqlite3.connect(env.queue.path) as db:  # ended two hours ago: outside the chart
        db.execute("UPDATE tasks SET finished_at = ? WHERE id = ?", (time.time() - 7200, old))
    body = env.client.get("/overview").json()
    assert body["tasks"] == {"pending": 1, "running": 0, "completed": 3, "failed": 1, "dead": 0}
    minutes = body["per_minute"]
    assert len(minutes) == 60
    assert minutes[-1]["minute"] == time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime())
    assert minutes[0]["minute"] < minutes[-1]["minute"]
    assert sum(m["completed"] for m in minutes) == 2
    assert sum(m["failed"] for m in minutes) == 1
    assert body["engine"] == {"ok": True, "error": None}
    assert body["source"] == {"ok": True, "error": None}
    assert body["trace_url"] is None
    [echo, _] = body["workers"]
    assert echo["name"] == "echo" and echo["concurrency"] == 2
    assert {"cpus", "memory", "pids_limit", "sandbox", "timeout", "prewarm", "reuse"} <= set(echo)
    assert echo["memory"] == 256 * 1024**2 and echo["sandbox"] == "standard" and echo["timeout"] == 30.0


def test_workers_show_their_limits_and_pool_settings(env: Env) -> None:
    [echo, _] = env.client.get("/workers").json()
    assert (echo["cpus"], echo["pids_limit"], echo["prewarm"], echo["reuse"]) == (1.0, 64, 0, 0)


def test_the_overview_says_when_the_engine_does_not_answer(env: Env) -> None:
    env.host.runner.ping_error = "no engine"  # type: ignore[attr-defined]
    assert env.client.get("/overview").json()["engine"] == {"ok": False, "error": "no engine"}


# -- search and pages ---------------------------------------------------------------------


def test_tasks_are_found_by_id_or_correlation_id_and_paged(env: Env) -> None:
    ids = [env.submit(correlation_id=f"order-{n % 2}")["id"] for n in range(5)]  # newest last
    newest_first = ids[::-1]
    found = env.client.get("/tasks", params={"q": ids[2]}).json()
    assert [t["id"] for t in found] == [ids[2]]
    assert [t["id"] for t in env.client.get("/tasks", params={"q": "order-1"}).json()] == [ids[3], ids[1]]
    assert env.client.get("/tasks", params={"q": "nothing"}).json() == []
    assert env.client.get("/tasks", params={"q": ids[2], "status": "completed"}).json() == []
    page = env.client.get("/tasks", params={"limit": 2, "offset": 2}).json()
    assert [t["id"] for t in page] == newest_first[2:4]
    full = env.client.get("/tasks", params={"limit": 2, "offset": 4, "full": "true"}).json()
    assert [t["id"] for t in full] == newest_first[4:]
    assert env.client.get("/tasks", params={"offset": -1}).status_code == 422
