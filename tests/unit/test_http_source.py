"""runner.sources.http: the PrismQ TaskManager adapter against the stand-in server in tests/prismq_server.py."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

import runner.sources.http as http_source
from runner.api import create_app
from runner.config import HttpSource, WorkerConfig, loads
from runner.errors import ConfigError
from runner.host import Host
from runner.protocol import ErrorInfo, Outcome, Status
from runner.sources import ClaimedTask, Finished, HeldTask, LeaseLost, SourceUnavailable
from runner.sources.http import HttpTaskSource, check_timeouts
from runner.sources.ratelimit import RequestBudget, retry_after
from runner.telemetry.context import trace_id_of
from runner.telemetry.events import Hooks
from runner.telemetry.metrics import Metrics
from tests.prismq_server import API_KEY, PrismQServer, prismq_server_fixture  # noqa: F401 (pytest finds it by name)
from tests.unit.test_host import FakeRunner, drive, make_config, until
from tests.unit.test_host import worker as worker_toml

T = TypeVar("T")
HOST = "host-1"
ECHO, STATS, TAGS = "PrismQ.Example.Echo", "PrismQ.IdeaInspiration.TextStats", "PrismQ.Legacy.Tags"
COMPLETED = Finished(Outcome(Status.COMPLETED, result={"words": 2}, exit_code=0), worker="echo")
RETRIABLE = Finished(
    Outcome(Status.FAILED, retriable=True, error=ErrorInfo("Busy", "try later"), exit_code=1), worker="echo"
)
PERMANENT = Finished(Outcome(Status.FAILED, error=ErrorInfo("ValueError", "bad text"), exit_code=2), worker="echo")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def server() -> Iterator[PrismQServer]:
    # A claim lasts long enough for a slow machine; the expiry tests age it on purpose.
    with PrismQServer(claim_timeout=60, max_attempts=3) as started:
        for name in (ECHO, STATS, TAGS):
            started.add_task_type(name)
        yield started


def config(url: str, **overrides: Any) -> HttpSource:
    values: dict[str, Any] = {"type": "http", "url": url, "api_key": API_KEY, "claim_timeout": 60}
    return HttpSource(**{**values, **overrides})


def source(server: PrismQServer, types: list[str] | None = None, **overrides: Any) -> HttpTaskSource:
    return HttpTaskSource(config(server.url, **overrides), HOST, types or [ECHO, STATS, TAGS])


def claimed_type_ids(server: PrismQServer) -> list[int]:
    return [r.body["task_type_id"] for r in server.calls("POST", "/tasks/claim")]


def tid(server: PrismQServer, name: str) -> int:
    type_id = server.type_id(name)
    assert type_id is not None, f"{name} is unknown to the server"
    return type_id


# -- task types ------------------------------------------------------------------


def test_start_resolves_known_types_and_skips_unknown_ones(
    server: PrismQServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[dict[str, str], ClaimedTask | None]:
        tasks = source(server, [ECHO, "PrismQ.Unknown", STATS])
        await tasks.start()
        claimed = await tasks.claim([ECHO, "PrismQ.Unknown", STATS])
        await tasks.close()
        return tasks.type_ids, claimed

    with caplog.at_level(logging.WARNING, logger="runner.sources.http"):
        type_ids, claimed = run(scenario())
    assert type_ids == {ECHO: str(tid(server, ECHO)), STATS: str(tid(server, STATS))}
    assert claimed is None
    assert server.calls("POST", "/task-types/register") == []
    assert server.type_id("PrismQ.Unknown") is None
    assert sorted(claimed_type_ids(server)) == sorted([tid(server, ECHO), tid(server, STATS)])
    assert any("PrismQ.Unknown" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_start_registers_missing_types_when_asked_to(server: PrismQServer) -> None:
    async def scenario() -> dict[str, str]:
        tasks = source(server, [ECHO, "PrismQ.New"], register_task_types=True)
        await tasks.start()
        await tasks.close()
        return tasks.type_ids

    type_ids = run(scenario())
    new_id = tid(server, "PrismQ.New")
    assert type_ids == {ECHO: str(tid(server, ECHO)), "PrismQ.New": str(new_id)}
    registered = server.calls("POST", "/task-types/register")
    assert [r.body for r in registered] == [
        {"name": "PrismQ.New", "version": "1.0.0", "param_schema": {"type": "object"}}
    ]


def test_a_type_is_registered_with_its_workers_params_schema(server: PrismQServer) -> None:
    text = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
    workers = [
        WorkerConfig(name="new", image="i", task_types=["PrismQ.New", ECHO], params_schema=text),
        WorkerConfig(name="loose", image="i", task_types=["PrismQ.Loose"], params_schema={"required": ["n"]}),
        WorkerConfig(name="plain", image="i", task_types=["PrismQ.Plain"]),
    ]
    schemas = http_source.param_schemas(workers)
    assert schemas == {"PrismQ.New": text, ECHO: text, "PrismQ.Loose": {"required": ["n"]}}

    async def scenario() -> None:
        names = [ECHO, "PrismQ.New", "PrismQ.Loose", "PrismQ.Plain"]
        tasks = HttpTaskSource(config(server.url, register_task_types=True), HOST, names, schemas=schemas)
        await tasks.start()
        await tasks.close()

    run(scenario())
    registered = {r.body["name"]: r.body["param_schema"] for r in server.calls("POST", "/task-types/register")}
    assert registered == {
        "PrismQ.New": text,
        # The server refuses a schema without a top-level "type": params are objects.
        "PrismQ.Loose": {"type": "object", "required": ["n"]},
        "PrismQ.Plain": {"type": "object"},
    }  # ECHO was known to the server already: not registered again


def test_serve_registers_the_schemas_of_its_config(server: PrismQServer) -> None:
    from runner.config import loads
    from runner.serve import open_source

    cfg = loads(
        f'[task_manager]\ntype = "http"\nurl = "{server.url}"\napi_key = "{API_KEY}"\nregister_task_types = true\n'
        '[[workers]]\nname = "w"\nimage = "i"\ntask_types = ["PrismQ.Schema"]\n'
        'params_schema = { type = "object", properties = { n = { type = "integer" } } }\n',
        environ={},
    )

    async def scenario() -> None:
        source, _ = open_source(cfg, "owner")
        await source.start()
        await source.close()

    run(scenario())
    (registered,) = server.calls("POST", "/task-types/register")
    assert registered.body["param_schema"] == {"type": "object", "properties": {"n": {"type": "integer"}}}


def test_claim_resolves_types_when_start_was_not_called(server: PrismQServer) -> None:
    task_id = server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> ClaimedTask | None:
        tasks = source(server, [ECHO])
        claimed = await tasks.claim([ECHO])
        await tasks.close()
        return claimed

    claimed = run(scenario())
    assert claimed is not None and claimed.id == task_id
    assert len(server.calls("GET", f"/task-types/{ECHO}")) == 1


def test_task_types_and_worker_id_come_from_the_config_when_set(server: PrismQServer) -> None:
    server.create_task(ECHO, {"text": "hi"})
    server.create_task(STATS, {"text": "hi"})

    async def scenario() -> tuple[HttpTaskSource, ClaimedTask | None]:
        tasks = source(server, [ECHO, STATS], task_types=[STATS], worker_id="prismq-worker-7")
        claimed = await tasks.claim([ECHO, STATS])
        await tasks.close()
        return tasks, claimed

    tasks, claimed = run(scenario())
    assert tasks.task_types == [STATS]
    assert tasks.worker_id == "prismq-worker-7"
    assert claimed is not None and claimed.type == STATS
    assert server.task(claimed.id).claimed_by == "prismq-worker-7#1"  # the claim's own worker id
    assert HttpTaskSource(config(server.url), HOST, [ECHO]).worker_id == HOST


# -- claim -----------------------------------------------------------------------


def test_claim_on_an_empty_queue_is_none_not_a_fault(server: PrismQServer) -> None:
    async def scenario() -> ClaimedTask | None:
        tasks = source(server)
        claimed = await tasks.claim([ECHO, STATS, TAGS])
        await tasks.close()
        return claimed

    assert run(scenario()) is None
    # Each type was tried exactly once, and each answer was the server's 500.
    assert sorted(claimed_type_ids(server)) == sorted(tid(server, t) for t in (ECHO, STATS, TAGS))
    assert [r.status for r in server.calls("POST", "/tasks/claim")] == [500, 500, 500]


def test_claim_cycles_over_types_round_robin(server: PrismQServer) -> None:
    for n in range(3):
        server.create_task(ECHO, {"n": n})  # the server deduplicates equal params
    server.create_task(STATS, {"n": 0})
    server.create_task(TAGS, {"n": 0})

    async def scenario() -> list[str | None]:
        tasks = source(server)
        types = []
        for _ in range(6):
            claimed = await tasks.claim([ECHO, STATS, TAGS])
            types.append(claimed.type if claimed else None)
        await tasks.close()
        return types

    # A busy Echo queue does not starve the others; once they are empty, Echo goes on.
    assert run(scenario()) == [ECHO, STATS, TAGS, ECHO, ECHO, None]


def test_claim_starts_after_the_type_it_last_claimed_from(server: PrismQServer) -> None:
    server.create_task(ECHO, {"n": 1})
    server.create_task(TAGS, {"n": 1})
    server.create_task(ECHO, {"n": 2})
    echo, stats, tags = (tid(server, t) for t in (ECHO, STATS, TAGS))

    async def scenario() -> list[list[int]]:
        tasks = source(server)
        rounds = []
        for _ in range(3):
            before = len(claimed_type_ids(server))
            await tasks.claim([ECHO, STATS, TAGS])
            rounds.append(claimed_type_ids(server)[before:])
        await tasks.close()
        return rounds

    assert run(scenario()) == [[echo], [stats, tags], [echo]]


def test_claim_only_tries_the_types_it_is_asked_for(server: PrismQServer) -> None:
    server.create_task(ECHO, {"n": 1})
    stats_task = server.create_task(STATS, {"n": 1})

    async def scenario() -> list[ClaimedTask | None]:
        tasks = source(server)
        claims = [await tasks.claim([STATS]), await tasks.claim([STATS]), await tasks.claim([])]
        await tasks.close()
        return claims

    first, second, third = run(scenario())
    assert first is not None and first.id == stats_task
    assert second is None and third is None
    assert set(claimed_type_ids(server)) == {tid(server, STATS)}
    assert server.task(1).status == "pending"


def test_claimed_task_has_string_ids_params_attempt_and_the_attempt_limit(server: PrismQServer) -> None:
    odd = server.create_task(ECHO, {"text": "one"})  # the server answers ids as strings here ...
    even = server.create_task(ECHO, {"text": "two"})  # ... and as integers in its claims

    async def scenario() -> list[ClaimedTask | None]:
        tasks = source(server)
        claims = [await tasks.claim([ECHO]), await tasks.claim([ECHO])]
        await tasks.close()
        return claims

    first, second = run(scenario())
    # max_attempts: [task_manager] max_attempts, the server's MAX_TASK_ATTEMPTS (3 by default).
    assert first == ClaimedTask(id=odd, type=ECHO, params={"text": "one"}, attempt=1, max_attempts=3)
    assert second == ClaimedTask(id=even, type=ECHO, params={"text": "two"}, attempt=1, max_attempts=3)
    assert (odd, even) == ("1", "2")
    assert isinstance(first.id, str) and isinstance(second.id, str)
    assert [type(r.answer["data"]["id"]) for r in server.calls("POST", "/tasks/claim")] == [int, int]


def test_a_task_whose_params_are_not_an_object_is_failed_on_the_server(server: PrismQServer) -> None:
    bad = server.put_task(ECHO, ["not", "an", "object"])  # the API refuses it; the database may still hold it
    good = server.create_task(STATS, {"text": "fine"})

    async def scenario() -> ClaimedTask | None:
        tasks = source(server)
        claimed = await tasks.claim([ECHO, STATS])
        await tasks.close()
        return claimed

    claimed = run(scenario())
    assert claimed is not None and claimed.id == good
    state = server.task(bad)
    assert state.completions[0]["success"] is False
    assert state.error is not None and state.error.startswith("InvalidParams:")


# -- settling --------------------------------------------------------------------


def test_complete_sends_success_and_the_result(server: PrismQServer) -> None:
    task_id = server.create_task(ECHO, {"text": "hi there"})

    async def scenario() -> None:
        tasks = source(server)
        claimed = await tasks.claim([ECHO])
        assert claimed is not None
        await tasks.complete(claimed, COMPLETED)
        await tasks.close()

    run(scenario())
    state = server.task(task_id)
    assert state.status == "completed"
    assert state.result == {"words": 2}
    assert state.completions == [{"worker_id": f"{HOST}#1", "success": True, "result": {"words": 2}}]


def test_fail_is_re_queued_by_the_server_until_its_limit(server: PrismQServer) -> None:
    task_id = server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> tuple[list[int], list[str], ClaimedTask | None]:
        tasks = source(server)
        attempts, statuses = [], []
        # retry_in is ignored; a final failure (None) is re-queued too.
        for retry_in in (5.0, None, 1.0):
            claimed = await tasks.claim([ECHO])
            assert claimed is not None and claimed.id == task_id
            attempts.append(claimed.attempt)
            await tasks.fail(claimed, RETRIABLE if retry_in else PERMANENT, retry_in)
            statuses.append(server.task(task_id).status)
        last = await tasks.claim([ECHO])
        await tasks.close()
        return attempts, statuses, last

    attempts, statuses, last = run(scenario())
    assert attempts == [1, 2, 3]
    assert statuses == ["pending", "pending", "failed"]
    assert last is None
    state = server.task(task_id)
    assert state.attempts == 3
    assert [c["error"] for c in state.completions] == ["Busy: try later", "ValueError: bad text", "Busy: try later"]
    assert all(c["success"] is False and c["worker_id"] == f"{HOST}#1" for c in state.completions)
    # The server keeps a re-queued task's error_message and completed_at until its next report.
    assert state.error == "Busy: try later" and state.completed_at is not None


def test_fail_without_error_info_names_the_status(server: PrismQServer) -> None:
    task_id = server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> None:
        tasks = source(server)
        claimed = await tasks.claim([ECHO])
        assert claimed is not None
        await tasks.fail(claimed, Finished(Outcome(Status.TIMEOUT), worker="echo"), None)
        await tasks.close()

    run(scenario())
    assert server.task(task_id).error == "WorkerFailed: the attempt ended as timeout"


def test_progress_is_recorded_and_clamped(server: PrismQServer) -> None:
    task_id = server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> list[tuple[int | None, str | None]]:
        tasks = source(server)
        claimed = await tasks.claim([ECHO])
        assert claimed is not None
        seen = []
        await tasks.progress(claimed, 42.4, "step 2 of 5")
        seen.append((server.task(task_id).progress, server.task(task_id).progress_message))
        await tasks.progress(claimed, 150)
        seen.append((server.task(task_id).progress, server.task(task_id).progress_message))
        await tasks.close()
        return seen

    assert run(scenario()) == [(42, "step 2 of 5"), (100, None)]
    bodies = [r.body for r in server.calls("POST", f"/tasks/{task_id}/progress")]
    assert bodies == [
        {"worker_id": f"{HOST}#1", "progress": 42, "message": "step 2 of 5"},
        {"worker_id": f"{HOST}#1", "progress": 100},
    ]


# -- claims that expired ---------------------------------------------------------


def test_complete_after_the_claim_expired_is_lease_lost() -> None:
    async def scenario(server: PrismQServer) -> ClaimedTask | None:
        tasks = source(server, claim_timeout=0.5)
        claimed = await tasks.claim([ECHO])
        assert claimed is not None
        await asyncio.sleep(0.7)  # past the server's claim timeout, for real
        with pytest.raises(LeaseLost, match=f"task {claimed.id}: .*HTTP 403.*claim_timeout"):
            await tasks.complete(claimed, COMPLETED)
        with pytest.raises(LeaseLost):
            await tasks.progress(claimed, 50)
        with pytest.raises(LeaseLost):
            await tasks.fail(claimed, RETRIABLE, 1.0)
        await tasks.close()
        # Anyone may claim it again now.
        other = HttpTaskSource(config(server.url), "host-2", [ECHO])
        again = await other.claim([ECHO])
        await other.close()
        return again

    with PrismQServer(claim_timeout=0.5) as server:
        server.add_task_type(ECHO)
        task_id = server.create_task(ECHO, {"text": "hi"})
        again = run(scenario(server))
        state = server.task(task_id)
    assert again is not None and again.id == task_id and again.attempt == 2
    assert state.completions == [] and state.claims == [f"{HOST}#1", "host-2#1"]


def test_complete_after_another_host_settled_the_task_is_lease_lost(server: PrismQServer) -> None:
    task_id = server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> None:
        tasks = source(server)
        claimed = await tasks.claim([ECHO])
        assert claimed is not None
        server.expire_claims()
        other = HttpTaskSource(config(server.url), "host-2", [ECHO])
        theirs = await other.claim([ECHO])
        assert theirs is not None
        await other.complete(theirs, COMPLETED)
        await other.close()
        with pytest.raises(LeaseLost, match="not in claimed state"):
            await tasks.complete(claimed, COMPLETED)
        await tasks.close()

    run(scenario())
    assert server.task(task_id).status == "completed"
    assert [c["worker_id"] for c in server.task(task_id).completions] == ["host-2#1"]


def test_a_task_the_server_does_not_know_is_lease_lost(server: PrismQServer) -> None:
    async def scenario() -> None:
        tasks = source(server)
        with pytest.raises(LeaseLost, match="404"):
            await tasks.complete(ClaimedTask(id="999", type=ECHO, params={}, attempt=1), COMPLETED)
        await tasks.close()

    run(scenario())


# -- an unhealthy server ---------------------------------------------------------


@pytest.mark.parametrize("key", ["wrong-key", ""])
def test_a_refused_api_key_is_source_unavailable_naming_the_setting(server: PrismQServer, key: str) -> None:
    server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> list[str]:
        tasks = HttpTaskSource(config(server.url, api_key=key), HOST, [ECHO])
        messages = []
        for call in (tasks.start(), tasks.claim([ECHO]), tasks.health()):
            with pytest.raises(SourceUnavailable) as caught:
                await call
            messages.append(str(caught.value))
        await tasks.close()
        return messages

    messages = run(scenario())
    assert len(messages) == 3  # health too: it asks with the key
    for message in messages:
        assert "[task_manager] api_key" in message and "401" in message
        assert ("refused the API key" if key else "none is set") in message
    assert server.task(1).status == "pending"


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        ("503", "HTTP 503 with a body that is not JSON"),
        ("500", "HTTP 500: Internal server error"),
        ("garbage", "HTTP 200 with a body that is not JSON"),
        ("drop", "RemoteProtocolError"),
        ("hang", "no answer to POST within request_timeout (0.2s)"),
    ],
)
def test_faults_of_the_server_are_source_unavailable(server: PrismQServer, fault: str, says: str) -> None:
    server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> list[SourceUnavailable]:
        tasks = source(server, [ECHO], request_timeout=0.2)
        await tasks.start()
        claimed = await tasks.claim([ECHO])
        assert claimed is not None
        server.fault = fault  # type: ignore[assignment]
        errors = []
        for call in (tasks.claim([ECHO]), tasks.complete(claimed, COMPLETED), tasks.progress(claimed, 1)):
            with pytest.raises(SourceUnavailable) as caught:
                await call
            errors.append(caught.value)
        await tasks.close()
        return errors

    errors = run(scenario())
    assert says in str(errors[0])
    assert f"{server.url}/tasks/claim" in str(errors[0])
    assert f"{server.url}/tasks/1/complete" in str(errors[1])
    assert f"{server.url}/tasks/1/progress" in str(errors[2])


def test_a_server_that_is_down_is_source_unavailable() -> None:
    with PrismQServer() as gone:
        url = gone.url  # a port that nobody listens on once the server stopped

    async def scenario() -> list[str]:
        tasks = HttpTaskSource(config(url), HOST, [ECHO])
        messages = []
        for call in (tasks.start(), tasks.claim([ECHO]), tasks.health()):
            with pytest.raises(SourceUnavailable) as caught:
                await call
            messages.append(str(caught.value))
        await tasks.close()
        return messages

    for message in run(scenario()):
        assert url in message and "cannot connect" in message


def test_a_register_the_server_refuses_is_source_unavailable_with_its_details(
    server: PrismQServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_source, "REGISTER_SCHEMA", {"properties": {}})  # no "type": refused

    async def scenario() -> None:
        tasks = source(server, ["PrismQ.New"], register_task_types=True)
        with pytest.raises(SourceUnavailable, match=r'HTTP 400: JSON schema must have a "type" property \(.*got'):
            await tasks.start()
        await tasks.close()

    run(scenario())
    assert server.type_id("PrismQ.New") is None


# -- health, the no-ops, closing ------------------------------------------------


def test_health_asks_with_the_api_key(server: PrismQServer) -> None:
    async def scenario() -> dict[str, Any]:
        tasks = source(server, [ECHO, "PrismQ.Unknown"])
        health = await tasks.health()
        await tasks.close()
        return health

    health = run(scenario())
    assert health["type"] == "http" and health["url"] == server.url
    assert health["reachable"] is True
    assert health["worker_id"] == HOST and health["max_attempts"] == 3
    # The server's own /health needs no key, so it cannot tell a wrong key: a lookup that needs it.
    [probe] = server.requests
    assert (probe.method, probe.path, probe.api_key, probe.status) == ("GET", f"/task-types/{ECHO}", API_KEY, 200)


def test_health_reports_resolved_types(server: PrismQServer) -> None:
    async def scenario() -> dict[str, Any]:
        tasks = source(server, [ECHO, "PrismQ.Unknown"])
        await tasks.start()
        health = await tasks.health()
        await tasks.close()
        return health

    health = run(scenario())
    assert health["task_types"] == {ECHO: str(tid(server, ECHO))}
    assert health["unknown_task_types"] == ["PrismQ.Unknown"]


@pytest.mark.parametrize(("fault", "says"), [("503", "GET answered HTTP 503"), ("500", "Internal server error")])
def test_health_of_an_unhealthy_server_is_source_unavailable(server: PrismQServer, fault: str, says: str) -> None:
    server.fault = fault  # type: ignore[assignment]

    async def scenario() -> None:
        tasks = source(server)
        with pytest.raises(SourceUnavailable, match=says):
            await tasks.health()
        await tasks.close()

    run(scenario())


def test_renew_release_and_recover_do_not_call_the_server_and_the_source_says_so(
    server: PrismQServer, caplog: pytest.LogCaptureFixture
) -> None:
    task_id = server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> None:
        tasks = source(server)
        claimed = await tasks.claim([ECHO])
        assert claimed is not None
        before = len(server.requests)
        await tasks.renew(claimed)
        await tasks.release(claimed)
        await tasks.recover(HeldTask(claimed.id, "dead-host", 1))
        assert len(server.requests) == before
        # What the host reads instead of calling them: no renewal, no registry, retries its own
        # up to an attempt limit that each claim names, and a report is taken for claim_timeout.
        assert tasks.capabilities.renew_every is None
        assert not tasks.capabilities.registry
        assert tasks.capabilities.owns_retries and tasks.capabilities.progress
        assert tasks.capabilities.knows_final_attempt and claimed.max_attempts == 3
        assert tasks.capabilities.claim_timeout == 60
        assert tasks.claims == []  # release freed the claim's worker id
        await tasks.close()

    with caplog.at_level(logging.INFO, logger="runner.sources.http"):
        run(scenario())
    assert server.task(task_id).status == "claimed"
    released = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and task_id in r.getMessage()]
    assert len(released) == 1 and "claim_timeout 60s" in released[0]


def test_close_closes_only_a_client_the_source_made(server: PrismQServer) -> None:
    async def scenario() -> tuple[bool, bool]:
        own = source(server)
        await own.start()
        await own.close()
        shared = httpx.AsyncClient()
        borrowed = HttpTaskSource(config(server.url), HOST, [ECHO], client=shared)
        await borrowed.start()
        await borrowed.close()
        closed = shared.is_closed
        await shared.aclose()
        return own._client.is_closed, closed

    assert run(scenario()) == (True, False)


# -- check_timeouts --------------------------------------------------------------


def worker(name: str, timeout: float, task_types: list[str]) -> WorkerConfig:
    return WorkerConfig(name=name, image=f"{name}:latest", task_types=task_types, timeout=timeout)


def test_check_timeouts_warns_of_workers_that_outlive_a_claim() -> None:
    workers = [worker("fast", 30, [ECHO]), worker("slow", 600, [STATS]), worker("exact", 300, [TAGS])]
    warnings = check_timeouts(config("http://tm/api", claim_timeout=300), workers)
    assert len(warnings) == 1
    assert warnings[0].startswith("worker slow: timeout 600s exceeds")
    assert "claim_timeout" in warnings[0] and "300s" in warnings[0]


def test_check_timeouts_leaves_out_workers_this_source_does_not_claim_for() -> None:
    workers = [worker("slow-echo", 600, [ECHO]), worker("slow-stats", 600, [STATS])]
    warnings = check_timeouts(config("http://tm/api", claim_timeout=300, task_types=[STATS]), workers)
    assert [w.split(":")[0] for w in warnings] == ["worker slow-stats"]
    assert check_timeouts(config("http://tm/api", claim_timeout=900), workers) == []


def test_the_test_server_claim_timeout_is_real() -> None:
    # The expiry tests above rely on it: a claim older than claim_timeout can be taken again.
    with PrismQServer(claim_timeout=0.2) as server:
        server.add_task_type(ECHO)
        task_id = server.create_task(ECHO, {"text": "hi"})
        type_id = tid(server, ECHO)
        body = {"worker_id": "a", "task_type_id": type_id}
        assert server.handle("POST", "/tasks/claim", body, API_KEY)[0] == 200
        assert server.handle("POST", "/tasks/claim", {**body, "worker_id": "b"}, API_KEY)[0] == 500
        time.sleep(0.3)
        assert server.handle("POST", "/tasks/claim", {**body, "worker_id": "b"}, API_KEY)[0] == 200
        assert server.task(task_id).claims == ["a", "b"]


def test_the_fixture_serves_an_api_that_the_source_can_use(prismq_server: PrismQServer) -> None:
    prismq_server.add_task_type(ECHO)
    task_id = prismq_server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> None:
        tasks = HttpTaskSource(config(prismq_server.url), HOST, [ECHO])
        claimed = await tasks.claim([ECHO])
        assert claimed is not None and claimed.id == task_id
        await tasks.complete(claimed, COMPLETED)
        await tasks.close()

    run(scenario())
    assert prismq_server.task(task_id).status == "completed"
    assert prismq_server.claim_timeout == 300.0


# -- one worker id per claim (issue 10, item 1) ----------------------------------


def test_each_claim_has_its_own_worker_id_so_a_late_report_cannot_pass_for_the_next_claims() -> None:
    # Attempt 1's claim expires while it still runs and this same host claims the task again:
    # with one worker id for both, the server took attempt 1's late report for attempt 2's.
    async def scenario(server: PrismQServer) -> tuple[ClaimedTask, ClaimedTask, list[str]]:
        tasks = source(server, [ECHO], claim_timeout=0.5)
        first = await tasks.claim([ECHO])
        assert first is not None
        await asyncio.sleep(0.6)  # past the server's claim timeout, for real
        second = await tasks.claim([ECHO])
        assert second is not None and second.id == first.id
        held = tasks.claims
        with pytest.raises(LeaseLost, match="HTTP 403"):
            await tasks.complete(first, COMPLETED)  # the late report of attempt 1
        await tasks.complete(second, Finished(Outcome(Status.COMPLETED, result={"attempt": 2}), worker="echo"))
        await tasks.close()
        return first, second, held

    with PrismQServer(claim_timeout=0.5) as server:
        server.add_task_type(ECHO)
        task_id = server.create_task(ECHO, {"text": "hi"})
        first, second, held = run(scenario(server))
        state = server.task(task_id)
    assert (first.attempt, second.attempt) == (1, 2)
    assert held == [f"{HOST}#1", f"{HOST}#2"]
    assert state.claims == [f"{HOST}#1", f"{HOST}#2"]
    assert state.status == "completed" and state.result == {"attempt": 2}
    assert [c["worker_id"] for c in state.completions] == [f"{HOST}#2"]


def test_a_settled_claim_frees_its_worker_id_for_the_next_claim(server: PrismQServer) -> None:
    for n in range(3):
        server.create_task(ECHO, {"n": n})

    async def scenario() -> list[str | None]:
        tasks = source(server, [ECHO])
        one, two = await tasks.claim([ECHO]), await tasks.claim([ECHO])
        assert one is not None and two is not None
        await tasks.fail(one, RETRIABLE, None)  # frees #1; #2 is still held
        three = await tasks.claim([ECHO])
        assert three is not None
        await tasks.complete(two, COMPLETED)
        await tasks.release(three)
        await tasks.close()
        return [server.task(t.id).claims[-1] for t in (one, two, three)] + [str(tasks.claims)]

    assert run(scenario()) == [f"{HOST}#1", f"{HOST}#2", f"{HOST}#1", "[]"]


def test_two_claims_under_one_worker_id_make_the_current_report_lease_lost() -> None:
    # The double claim as the real server showed it: two claimers with one worker id (two hosts
    # configured with the same worker_id); the late report is taken and the current one gets 400.
    async def scenario(server: PrismQServer) -> None:
        late = HttpTaskSource(config(server.url, worker_id="same"), "host-a", [ECHO])
        current = HttpTaskSource(config(server.url, worker_id="same"), "host-b", [ECHO])
        first = await late.claim([ECHO])
        await asyncio.sleep(0.6)
        second = await current.claim([ECHO])
        assert first is not None and second is not None
        await late.complete(first, COMPLETED)
        with pytest.raises(LeaseLost, match="HTTP 400: Task is not in claimed state"):
            await current.complete(second, COMPLETED)
        assert current.claims == []  # a lost claim is settled too
        await late.close()
        await current.close()

    with PrismQServer(claim_timeout=0.5) as server:
        server.add_task_type(ECHO)
        server.create_task(ECHO, {"text": "hi"})
        run(scenario(server))


# -- the attempt limit, and what the host makes of it (items 2 and 3) --------------


def test_claims_carry_the_configured_attempt_limit(server: PrismQServer) -> None:
    server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> ClaimedTask | None:
        tasks = source(server, [ECHO], max_attempts=5)
        claimed = await tasks.claim([ECHO])
        await tasks.close()
        return claimed

    claimed = run(scenario())
    assert claimed is not None and claimed.max_attempts == 5
    assert HttpSource(type="http", url="http://tm/api").max_attempts == 3  # the server's MAX_TASK_ATTEMPTS


def test_a_task_that_fails_every_attempt_keeps_one_correlation_id_and_trace_and_ends_once_in_the_metrics(
    server: PrismQServer,
) -> None:
    task_id = server.create_task(ECHO, {"exit": 1})  # the fake runner fails every attempt (retriable)
    runner, metrics = FakeRunner(), Metrics()

    drive(make_config(worker_toml("echo", [ECHO])), source(server, [ECHO]), runner, hooks=Hooks([metrics]))  # type: ignore[arg-type]

    envelopes = runner.envelopes(task_id)
    assert [e.attempt for e in envelopes] == [1, 2, 3]  # the server's limit, not the worker's max_retries
    assert server.task(task_id).status == "failed"
    assert len({e.correlation_id for e in envelopes}) == 1
    assert len({trace_id_of(e.traceparent) for e in envelopes}) == 1
    assert None not in {trace_id_of(e.traceparent) for e in envelopes}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in metrics.registry.collect() for s in f.samples
    }
    assert samples[("workerhost_tasks_total", (("outcome", "failed"), ("worker", "echo")))] == 1
    assert samples[("workerhost_retries_total", (("worker", "echo"),))] == 2


# -- health from an authenticated call (item 5) ---------------------------------


def test_health_with_a_wrong_api_key_says_unreachable_with_the_401(server: PrismQServer) -> None:
    cfg = loads(
        f'[host]\nid = "{HOST}"\n[task_manager]\ntype = "http"\nurl = "{server.url}"\napi_key = "wrong-key"\n'
        f'[[workers]]\nname = "echo"\nimage = "i"\ntask_types = ["{ECHO}"]\n',
        environ={},
    )
    host = Host(cfg, HttpTaskSource(cfg.task_manager, HOST, cfg.task_types()), FakeRunner(), owner="test:1:x")  # type: ignore[arg-type]
    host.alive = True
    with TestClient(create_app(host, Metrics(), None)) as client:
        body = client.get("/health").json()
    assert body["status"] == "degraded"
    assert body["source"]["reachable"] is False
    assert "refused the API key (HTTP 401" in body["source"]["error"]
    assert "[task_manager] api_key" in body["source"]["error"]


def test_a_health_answer_is_reused_for_a_few_seconds(server: PrismQServer) -> None:
    async def scenario() -> None:
        tasks = source(server, [ECHO])
        for _ in range(5):
            await tasks.health()
        await tasks.close()

    run(scenario())
    assert len(server.requests) == 1  # a monitor polling /health does not spend the request budget


# -- the request budget and 429 (item 6) -----------------------------------------


def test_an_idle_host_stays_within_the_servers_rate_limit_and_still_claims_a_new_task() -> None:
    # Six types and a host that polls as fast as it may: before, it sent every type's claim at
    # every poll, reached the server's 100 a minute in seconds and got 429s.
    names = [f"PrismQ.Idle{i}" for i in range(6)]
    with PrismQServer(rate_limit=100) as server:
        for name in names:
            server.add_task_type(name)
        tasks = HttpTaskSource(config(server.url, max_requests_per_minute=600), HOST, names)
        runner = FakeRunner()
        late: list[str] = []
        times: list[float] = []

        async def submit_later(host: Host) -> None:
            times.append(time.monotonic())
            await asyncio.sleep(1.5)
            late.append(server.create_task(names[3], {"text": "late"}))
            # Six types polled in turn, one every 0.2 s: the late task is claimed within about 1.2 s.
            await until(lambda: runner.started(late[0]), timeout=3.0, what="the late task to be claimed")
            times.append(time.monotonic())
            host.stop()

        workers = [worker_toml(f"w{i}", [name]) for i, name in enumerate(names)]
        drive(make_config(*workers, poll_max="10ms"), tasks, runner, burst=False, during=submit_later)  # type: ignore[arg-type]
        requests = list(server.requests)
    assert [r for r in requests if r.status == 429] == []
    claims = [r for r in requests if r.path == "/tasks/claim"]
    # 600 a minute is 10 a second; idle polls take half of it: 5 a second, one type each (plus
    # a round of every type at the start and after the late task was claimed).
    assert len(claims) <= 2 * 6 + 5 * (times[1] - times[0] + 0.5)


def test_the_budget_bounds_claims_and_progress_but_never_reports(server: PrismQServer) -> None:
    server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> list[ClaimedTask | None]:
        tasks = source(server, [ECHO, STATS, TAGS], max_requests_per_minute=5)
        await tasks.start()  # 3 lookups
        claimed = await tasks.claim([ECHO])  # 4
        assert claimed is not None
        await tasks.progress(claimed, 10)  # 5: the budget is spent
        await tasks.progress(claimed, 20)  # not sent
        nothing = [await tasks.claim([STATS, TAGS]) for _ in range(3)]  # not sent
        await tasks.complete(claimed, COMPLETED)  # a report is sent all the same
        await tasks.close()
        return nothing

    assert run(scenario()) == [None, None, None]
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in server.requests][3:] == [
        ("POST", "claim"),
        ("POST", "progress"),
        ("POST", "complete"),
    ]
    assert server.task(1).status == "completed" and server.task(1).progress == 10


def test_an_idle_source_claims_one_type_per_call_round_robin(server: PrismQServer) -> None:
    async def scenario() -> None:
        tasks = source(server, [ECHO, STATS, TAGS], max_requests_per_minute=6000)  # an idle poll every 20 ms
        await tasks.claim([ECHO, STATS, TAGS])  # finds nothing: every type once
        for _ in range(4):
            await asyncio.sleep(0.03)
            await tasks.claim([ECHO, STATS, TAGS])
        await tasks.close()

    run(scenario())
    echo, stats, tags = (tid(server, t) for t in (ECHO, STATS, TAGS))
    assert claimed_type_ids(server) == [echo, stats, tags, echo, stats, tags, echo]


def test_a_429_is_source_unavailable_with_the_wait_and_nothing_is_sent_until_then() -> None:
    async def scenario(server: PrismQServer) -> list[SourceUnavailable]:
        tasks = source(server, [ECHO])
        await tasks.start()
        errors = []
        for call in (tasks.claim([ECHO]), tasks.claim([ECHO]), tasks.health()):
            with pytest.raises(SourceUnavailable) as caught:
                await call
            errors.append(caught.value)
        await tasks.close()
        return errors

    with PrismQServer(rate_limit=1) as server:
        server.add_task_type(ECHO)
        refused, blocked, health = run(scenario(server))
        requests = list(server.requests)
    assert [r.status for r in requests] == [200, 429]  # the blocked claim and the health check sent nothing
    assert "HTTP 429" in str(refused) and "try again in" in str(refused)
    assert refused.retry_after is not None and 55 <= refused.retry_after <= 60
    assert blocked.retry_after is not None and blocked.retry_after <= refused.retry_after
    assert "rate limiting" in str(blocked) and "rate limiting" in str(health)


def test_a_429_with_retry_after_is_honoured() -> None:
    async def scenario(server: PrismQServer) -> SourceUnavailable:
        tasks = source(server, [ECHO])
        await tasks.start()
        with pytest.raises(SourceUnavailable) as caught:
            await tasks.claim([ECHO])
        await asyncio.sleep(1.05)  # past the wait: requests go out again
        assert await tasks.claim([ECHO]) is None
        await tasks.close()
        return caught.value

    with PrismQServer(rate_limit=1, rate_window=1.0, retry_after_header=True) as server:
        server.add_task_type(ECHO)
        refused = run(scenario(server))
        statuses = [r.status for r in server.requests]
    assert refused.retry_after == 1.0  # the header's (the message, too, says 1 second)
    assert statuses == [200, 429, 500]  # then an empty queue


@pytest.mark.parametrize(
    ("header", "text", "expected"),
    [
        ("35", "", 35.0),
        ("35", "try again in 10 seconds", 35.0),  # the header wins
        (None, "Rate limit exceeded. Please try again in 35 seconds.", 35.0),
        ("soon", "try again in 2 seconds", 2.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", "", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", "", 0.0),  # in the past
        ("99999999", "", 3600.0),  # bounded
        (None, "Too Many Requests", None),
    ],
)
def test_retry_after_reads_the_header_or_the_message(header: str | None, text: str, expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp()
    assert retry_after(header, text, now=now) == expected


def test_the_budget_counts_a_minute_of_requests() -> None:
    clock = [0.0]
    budget = RequestBudget(3, clock=lambda: clock[0])
    for _ in range(3):
        budget.spend()
    assert budget.left() == 0
    clock[0] = 59.9
    assert budget.left() == 0
    clock[0] = 60.0
    assert budget.left() == 3
    assert budget.poll() and not budget.poll()  # idle polls: one per 2 x 60 / 3 = 40 s
    clock[0] = 100.0
    assert budget.poll()


# -- types registered later (item 7) ---------------------------------------------


def test_a_type_registered_after_start_is_claimed_without_a_restart(
    server: PrismQServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_source, "RESOLVE_EVERY", 0.3)

    async def scenario() -> tuple[ClaimedTask | None, ClaimedTask | None, int]:
        tasks = source(server, [ECHO, "PrismQ.Later"])
        await tasks.start()
        server.add_task_type("PrismQ.Later")
        task_id = server.create_task("PrismQ.Later", {"text": "hi"})
        soon = await tasks.claim(["PrismQ.Later"])  # not looked up again yet
        lookups = len(server.calls("GET", "/task-types/PrismQ.Later"))
        await asyncio.sleep(0.35)
        later = await tasks.claim(["PrismQ.Later"])
        await tasks.close()
        assert later is None or later.id == task_id
        return soon, later, lookups

    soon, later, lookups = run(scenario())
    assert soon is None and lookups == 1
    assert later is not None and later.type == "PrismQ.Later"
    assert len(server.calls("GET", "/task-types/PrismQ.Later")) == 2


# -- names that need URL encoding (item 8) -----------------------------------------


@pytest.mark.parametrize("name", ["H1 Space", "Café", "a/b", "50%", "x?y", ".."])
def test_a_task_type_the_server_cannot_look_up_is_a_config_error_naming_it(name: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(repr(name))):
        config("http://tm/api", task_types=[name, ECHO])
    with pytest.raises(ConfigError, match=re.escape(repr(name))):
        HttpTaskSource(config("http://tm/api"), HOST, [ECHO, name])


def test_a_workers_task_type_the_server_cannot_look_up_is_a_config_error() -> None:
    text = (
        '[task_manager]\ntype = "http"\nurl = "http://tm/api"\n'
        '[[workers]]\nname = "w"\nimage = "i"\ntask_types = ["H1 Space"]\n'
    )
    # Said when the config is read (validate, serve, doctor): the worker, the field and the name.
    with pytest.raises(ConfigError, match=r"workers\[0\] \(w\)\.task_types: task type 'H1 Space' cannot be looked up"):
        loads(text, environ={})


def test_registering_never_overwrites_a_type_of_a_name_that_needs_encoding(server: PrismQServer) -> None:
    # Before: GET /task-types/H1%20Space found nothing, and the type was registered over.
    schema = {"type": "object", "required": ["text"]}
    server.add_task_type("H1 Space", version="3.0.0", schema=schema)
    with pytest.raises(ConfigError):
        source(server, ["H1 Space"], register_task_types=True)
    assert server.task_type("H1 Space") == {"id": 4, "name": "H1 Space", "version": "3.0.0", "param_schema": schema}
    assert server.requests == []


def test_a_name_with_reserved_characters_that_need_no_encoding_is_found_as_it_is(server: PrismQServer) -> None:
    server.add_task_type("PrismQ:Tags(v2)")

    async def scenario() -> dict[str, str]:
        tasks = source(server, ["PrismQ:Tags(v2)"], register_task_types=True)
        await tasks.start()
        await tasks.close()
        return tasks.type_ids

    assert run(scenario()) == {"PrismQ:Tags(v2)": str(tid(server, "PrismQ:Tags(v2)"))}
    assert [r.path for r in server.requests] == ["/task-types/PrismQ:Tags(v2)"]  # sent raw, not registered


def test_a_register_that_replaced_a_type_is_logged_as_an_error(
    server: PrismQServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Registered by someone else between the lookup and the register: the server says "updated".
    async def not_found(self: HttpTaskSource, name: str) -> str | None:
        return None

    monkeypatch.setattr(HttpTaskSource, "_type_id", not_found)

    async def scenario() -> None:
        tasks = source(server, [ECHO], register_task_types=True)
        await tasks.start()
        await tasks.close()

    with caplog.at_level(logging.ERROR, logger="runner.sources.http"):
        run(scenario())
    assert any("replaced a type of that name" in r.getMessage() for r in caplog.records)


# -- the claim's validity (item 9) -------------------------------------------------


def test_a_claim_says_when_it_was_made_and_the_source_how_long_it_is_valid(server: PrismQServer) -> None:
    server.create_task(ECHO, {"text": "hi"})

    async def scenario() -> tuple[float, ClaimedTask | None, float]:
        tasks = source(server, [ECHO], claim_timeout=45)
        await tasks.start()
        before = time.monotonic()
        claimed = await tasks.claim([ECHO])
        after = time.monotonic()
        assert tasks.capabilities.claim_timeout == 45
        await tasks.close()
        return before, claimed, after

    before, claimed, after = run(scenario())
    assert claimed is not None and before <= claimed.claimed_at <= after
    assert claimed.receipt.worker_id == f"{HOST}#1"
