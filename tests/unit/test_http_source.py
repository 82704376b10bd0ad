"""runner.sources.http: the PrismQ TaskManager adapter against the stand-in server in tests/prismq_server.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest

import runner.sources.http as http_source
from runner.config import HttpSource, WorkerConfig
from runner.protocol import ErrorInfo, Outcome, Status
from runner.sources import ClaimedTask, Finished, HeldTask, LeaseLost, SourceUnavailable
from runner.sources.http import HttpTaskSource, check_timeouts
from tests.prismq_server import API_KEY, PrismQServer, prismq_server_fixture  # noqa: F401 (pytest finds it by name)

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
    server.create_task(ECHO)
    server.create_task(STATS)

    async def scenario() -> tuple[HttpTaskSource, ClaimedTask | None]:
        tasks = source(server, [ECHO, STATS], task_types=[STATS], worker_id="prismq-worker-7")
        claimed = await tasks.claim([ECHO, STATS])
        await tasks.close()
        return tasks, claimed

    tasks, claimed = run(scenario())
    assert tasks.task_types == [STATS]
    assert tasks.worker_id == "prismq-worker-7"
    assert claimed is not None and claimed.type == STATS
    assert server.task(claimed.id).claimed_by == "prismq-worker-7"
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
    for _ in range(3):
        server.create_task(ECHO)
    server.create_task(STATS)
    server.create_task(TAGS)

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
    server.create_task(ECHO)
    server.create_task(TAGS)
    server.create_task(ECHO)
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
    server.create_task(ECHO)
    stats_task = server.create_task(STATS)

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


def test_claimed_task_has_string_ids_params_and_attempt(server: PrismQServer) -> None:
    odd = server.create_task(ECHO, {"text": "one"})  # the server answers its id as an int
    even = server.create_task(ECHO, {"text": "two"})  # ... and this one as a string

    async def scenario() -> list[ClaimedTask | None]:
        tasks = source(server)
        claims = [await tasks.claim([ECHO]), await tasks.claim([ECHO])]
        await tasks.close()
        return claims

    first, second = run(scenario())
    assert first == ClaimedTask(id=odd, type=ECHO, params={"text": "one"}, attempt=1)
    assert second == ClaimedTask(id=even, type=ECHO, params={"text": "two"}, attempt=1)
    assert (odd, even) == ("1", "2")
    assert isinstance(first.id, str) and isinstance(second.id, str)


def test_a_task_whose_params_are_not_an_object_is_failed_on_the_server(server: PrismQServer) -> None:
    bad = server.create_task(ECHO, ["not", "an", "object"])
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
    assert state.completions == [{"worker_id": HOST, "success": True, "result": {"words": 2}}]


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
    assert all(c["success"] is False and c["worker_id"] == HOST for c in state.completions)


def test_fail_without_error_info_names_the_status(server: PrismQServer) -> None:
    task_id = server.create_task(ECHO)

    async def scenario() -> None:
        tasks = source(server)
        claimed = await tasks.claim([ECHO])
        assert claimed is not None
        await tasks.fail(claimed, Finished(Outcome(Status.TIMEOUT), worker="echo"), None)
        await tasks.close()

    run(scenario())
    assert server.task(task_id).error == "WorkerFailed: the attempt ended as timeout"


def test_progress_is_recorded_and_clamped(server: PrismQServer) -> None:
    task_id = server.create_task(ECHO)

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
        {"worker_id": HOST, "progress": 42, "message": "step 2 of 5"},
        {"worker_id": HOST, "progress": 100},
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
        task_id = server.create_task(ECHO)
        again = run(scenario(server))
        state = server.task(task_id)
    assert again is not None and again.id == task_id and again.attempt == 2
    assert state.completions == [] and state.claims == [HOST, "host-2"]


def test_complete_after_another_host_settled_the_task_is_lease_lost(server: PrismQServer) -> None:
    task_id = server.create_task(ECHO)

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
    assert [c["worker_id"] for c in server.task(task_id).completions] == ["host-2"]


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
    server.create_task(ECHO)

    async def scenario() -> list[str]:
        tasks = HttpTaskSource(config(server.url, api_key=key), HOST, [ECHO])
        messages = []
        for call in (tasks.start(), tasks.claim([ECHO])):
            with pytest.raises(SourceUnavailable) as caught:
                await call
            messages.append(str(caught.value))
        await tasks.close()
        return messages

    for message in run(scenario()):
        assert "[task_manager] api_key" in message and "401" in message
        assert ("refused the API key" if key else "none is set") in message
    assert server.task(1).status == "pending"


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        ("503", "HTTP 503 with a body that is not JSON"),
        ("500", "HTTP 500: SQLSTATE"),
        ("garbage", "HTTP 200 with a body that is not JSON"),
        ("drop", "RemoteProtocolError"),
        ("hang", "no answer to POST within request_timeout (0.2s)"),
    ],
)
def test_faults_of_the_server_are_source_unavailable(server: PrismQServer, fault: str, says: str) -> None:
    server.create_task(ECHO)

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


def test_health_answers_without_the_api_key(server: PrismQServer) -> None:
    async def scenario() -> dict[str, Any]:
        tasks = source(server, [ECHO, "PrismQ.Unknown"], api_key="wrong-key")
        health = await tasks.health()
        await tasks.close()
        return health

    health = run(scenario())
    assert health["type"] == "http" and health["url"] == server.url
    assert health["reachable"] is True and health["status"] == "healthy"
    assert health["worker_id"] == HOST
    assert server.calls("GET", "/health")[0].api_key is None


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


def test_health_of_an_unhealthy_server_is_source_unavailable(server: PrismQServer) -> None:
    server.fault = "503"

    async def scenario() -> None:
        tasks = source(server)
        with pytest.raises(SourceUnavailable, match="GET answered HTTP 503"):
            await tasks.health()
        await tasks.close()

    run(scenario())


def test_renew_release_and_recover_do_not_call_the_server_and_the_source_says_so(
    server: PrismQServer, caplog: pytest.LogCaptureFixture
) -> None:
    task_id = server.create_task(ECHO)

    async def scenario() -> None:
        tasks = source(server)
        claimed = await tasks.claim([ECHO])
        assert claimed is not None
        before = len(server.requests)
        await tasks.renew(claimed)
        await tasks.release(claimed)
        await tasks.recover(HeldTask(claimed.id, "dead-host", 1))
        assert len(server.requests) == before
        # What the host reads instead of calling them: no renewal, no registry, retries its own.
        assert tasks.capabilities.renew_every is None
        assert not tasks.capabilities.registry
        assert tasks.capabilities.owns_retries and tasks.capabilities.progress
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
        task_id = server.create_task(ECHO)
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
