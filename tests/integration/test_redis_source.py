"""The Redis task source against a real Redis (a container from images/services/redis): the port's
semantics as the embedded queue has them, the API through real ``workerhost serve`` processes, and a
broker that goes away."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from runner.docker import LABEL_HOST
from runner.errors import ConfigError
from runner.protocol import ErrorInfo, Outcome, Status
from runner.sources import (
    ClaimedTask,
    Finished,
    HeldTask,
    KeyConflict,
    LeaseLost,
    NewTask,
    Owner,
    Slots,
    SourceUnavailable,
)
from runner.sources.redis import RedisQueue, shown_url
from tests.conftest import new_host_id
from tests.services import REDIS_IMAGE, Service, build_service, service
from tests.serving import Serve, config_text, free_port

pytestmark = pytest.mark.docker
T = TypeVar("T")
ECHO, OTHER = "Test.Echo", "Test.Other"
A, B = "host-a:1:aaaa", "host-b:2:bbbb"
OK = Outcome(Status.COMPLETED, result={"n": 1})
RETRIABLE = Outcome(Status.FAILED, retriable=True, error=ErrorInfo("Boom", "try again"))
PERMANENT = Outcome(Status.FAILED, retriable=False, error=ErrorInfo("Bad", "no"))


@pytest.fixture(scope="session")
def redis_image(docker_client: Any) -> str:
    return build_service(REDIS_IMAGE, "redis")


@pytest.fixture
def broker(redis_image: str) -> Iterator[Service]:
    """A Redis of this test's own (up in well under a second), removed at the end."""
    with service(redis_image, 6379, {LABEL_HOST: new_host_id()}, host_port=free_port()) as started:
        answers(started)
        yield started


def answers(broker: Service, timeout: float = 30.0) -> None:
    """Wait until Redis itself answers: the published port takes connections (the engine's proxy)
    before Redis listens behind it, and those are reset (on a busy machine, for a while)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with redis.Redis.from_url(url_of(broker), socket_timeout=2, socket_connect_timeout=2) as client:
                client.ping()
                return
        except redis.RedisError:
            assert time.monotonic() < deadline, f"Redis did not answer within {timeout}s"
            time.sleep(0.05)


def url_of(broker: Service) -> str:
    host, port = broker.address
    return f"redis://{host}:{port}/0"


Body = Callable[..., Awaitable[T]]


def run(broker: Service, body: Body[T], lease: float = 30.0, owners: tuple[str, ...] = (A, B)) -> T:
    """Run ``body(*queues)`` on one loop, one queue per owner (processes sharing the broker)."""

    async def main() -> T:
        queues = [RedisQueue(url_of(broker), owner=o, lease=lease, block=0.2) for o in owners]
        try:
            return await body(*queues)
        finally:
            for queue in queues:
                await queue.close()

    return asyncio.run(main())


def done(outcome: Outcome) -> Finished:
    return Finished(outcome, worker="W", image_id="sha256:abc", stderr_tail="tail", duration=0.5)


def submit(queue: RedisQueue, task_type: str = ECHO, max_attempts: int = 3, **kwargs: Any) -> str:
    task, created = queue.submit(task_type, {"x": 1}, max_attempts=max_attempts, **kwargs)
    assert created
    return str(task["id"])


async def claim(queue: RedisQueue, *types: str) -> ClaimedTask:
    task = await queue.claim(list(types or (ECHO,)))
    assert task is not None
    return task


# -- the port ---------------------------------------------------------------------------


def test_submit_claim_complete_keeps_what_the_embedded_queue_keeps(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        assert a.capabilities.renew_every == pytest.approx(10) and a.capabilities.registry
        assert a.capabilities.knows_final_attempt and not a.capabilities.owns_retries
        tid = submit(a, correlation_id="corr-1", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
        pending = a.get(tid)
        assert pending is not None and pending["status"] == "pending" and pending["attempts"] == 0
        assert pending["params"] == {"x": 1} and pending["max_attempts"] == 3
        task = await claim(b)
        assert (task.id, task.type, task.params, task.attempt, task.max_attempts) == (tid, ECHO, {"x": 1}, 1, 3)
        assert task.correlation_id == "corr-1" and task.traceparent is not None
        assert await a.claim([ECHO]) is None  # never twice
        assert [h for h in await a.held()] == [HeldTask(tid, B, 1)]
        await b.complete(task, done(OK))
        await b.complete(task, done(OK))  # the same report again (a reply lost): stored once, no error
        shown = a.get(tid)
        assert shown is not None
        assert shown["status"] == "completed" and shown["result"] == {"n": 1} and shown["worker"] == "W"
        assert shown["image_id"] == "sha256:abc" and shown["stderr_tail"] == "tail" and shown["duration"] == 0.5
        assert shown["trace_id"] == "a" * 32 and "finished_at" in shown and "started_at" in shown
        assert a.counts() == {"pending": 0, "running": 0, "completed": 1, "failed": 0, "dead": 0}
        health = await a.health()
        assert health["reachable"] and health["tasks"]["completed"] == 1 and health["type"] == "redis"

    run(broker, body)


def test_claims_only_the_types_asked_for_and_one_at_a_time(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        first = submit(a, OTHER)
        assert await a.claim([ECHO]) is None
        second = submit(a, ECHO)
        third = submit(a, ECHO)
        got = [await claim(a, ECHO, OTHER) for _ in range(3)]
        assert sorted(t.id for t in got) == sorted([first, second, third])
        assert [t.id for t in got if t.type == ECHO] == [second, third]  # first in, first out per type
        assert await a.claim([ECHO, OTHER]) is None

    run(broker, body)


def test_a_blocked_claim_takes_a_task_submitted_meanwhile(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        await a.claim([ECHO, OTHER])  # the groups exist
        a.block = 5.0
        waiting = asyncio.create_task(a.claim([ECHO, OTHER]))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        tid = await asyncio.to_thread(submit, b)
        task = await waiting
        assert task is not None and task.id == tid and task.attempt == 1
        assert time.monotonic() - started < 2.5  # woken by the entry, not at the end of the 5 s block

    run(broker, body)


def test_retry_with_backoff_then_dead_after_max_attempts(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        tid = submit(a, max_attempts=2)
        task = await claim(a)
        await a.fail(task, done(RETRIABLE), retry_in=0.5)
        shown = a.get(tid)
        assert shown is not None and shown["status"] == "pending" and "run_at" in shown
        assert shown["error"] == {"type": "Boom", "message": "try again", "retriable": True}
        assert await b.claim([ECHO]) is None  # not due yet
        await asyncio.sleep(0.6)
        again = await claim(b)
        assert again.attempt == 2 and again.max_attempts == 2
        await b.fail(again, done(RETRIABLE), retry_in=None)
        shown = a.get(tid)
        assert shown is not None and shown["status"] == "dead" and shown["attempts"] == 2
        # The API's retry: as new, with max_attempts from the config as it is now.
        retried = a.retry(tid, max_attempts=5)
        assert retried is not None and retried["status"] == "pending" and retried["attempts"] == 0
        assert retried["max_attempts"] == 5 and "error" not in retried and "finished_at" not in retried
        assert a.retry(tid) is None  # pending: not retried
        third = await claim(a)
        await a.fail(third, done(PERMANENT), retry_in=None)
        assert a.get(tid)["status"] == "failed"  # type: ignore[index]

    run(broker, body)


def test_release_hands_back_without_counting_the_attempt(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        tid = submit(a)
        task = await claim(a)
        await a.release(task)
        assert a.get(tid)["status"] == "pending"  # type: ignore[index]
        again = await claim(b)
        assert again.id == tid and again.attempt == 1
        with pytest.raises(LeaseLost):
            await a.complete(task, done(OK))  # no longer a's

    run(broker, body)


def test_an_expired_lease_is_taken_over_and_renewal_keeps_it(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        kept, lapsed = submit(a), submit(a)
        first = await claim(a)
        second = await claim(a)
        assert (first.id, second.id) == (kept, lapsed)
        for _ in range(6):  # 1.5 s: a renews the one, not the other
            await asyncio.sleep(0.25)
            await a.renew(first)
        taken = await claim(b)
        assert taken.id == lapsed and taken.attempt == 2  # the attempt counts
        assert await b.claim([ECHO]) is None  # the renewed one stays a's
        with pytest.raises(LeaseLost):
            await a.renew(second)
        with pytest.raises(LeaseLost):
            await a.complete(second, done(OK))
        await a.complete(first, done(OK))
        await b.complete(taken, done(OK))
        assert a.counts()["completed"] == 2

    run(broker, body, lease=1.0)


def test_an_expired_lease_behind_hundreds_of_live_ones_is_taken_over(broker: Service) -> None:
    # XAUTOCLAIM looks at a few pending entries per call: a lapsed lease behind 600 live ones
    # was never found. The claim asks the server for the idle ones instead.
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        ids = [submit(a) for _ in range(601)]
        held = [await claim(a) for _ in ids]
        assert [t.id for t in held] == ids
        await asyncio.sleep(1.2)  # every lease is past its time...
        for task in held[:-1]:
            await a.renew(task)  # ...and all but the last renewed
        taken = await claim(b)
        assert taken.id == ids[-1] and taken.attempt == 2

    run(broker, body, lease=1.0)


def test_a_lost_reply_to_a_claim_is_not_sent_again(broker: Service) -> None:
    # The scripts are not idempotent: the driver must not send one again whose reply it lost.
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        assert a._aio.get_connection_kwargs()["retry"].get_retries() == 0
        # The API's client may send a submit again: the same id and content is the same task, created once.
        task_id = str(uuid.uuid4())
        first, created = a.submit(ECHO, {"x": 1}, max_attempts=3, task_id=task_id)
        again, created_again = a.submit(ECHO, {"x": 1}, max_attempts=3, task_id=task_id)
        assert created and created_again and again["id"] == first["id"] == task_id
        assert a.counts()["pending"] == 1
        with pytest.raises(ValueError, match="exists already"):
            a.submit(ECHO, {"x": 2}, max_attempts=3, task_id=task_id)

    run(broker, body)


def test_an_expired_lease_with_no_attempt_left_is_dead(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        tid = submit(a, max_attempts=1)
        await claim(a)
        await asyncio.sleep(1.2)
        assert await b.claim([ECHO]) is None
        shown = a.get(tid)
        assert shown is not None and shown["status"] == "dead" and shown["error"]["type"] == "LeaseExpired"

    run(broker, body, lease=1.0)


def test_registry_heartbeat_owners_held_and_recover(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        await a.heartbeat(A, "host-1")
        await b.heartbeat(B, "host-1")
        assert sorted(await b.owners(), key=lambda o: o.token) == [Owner(A, "host-1", False), Owner(B, "host-1", False)]
        once, last = submit(a, max_attempts=3), submit(a, max_attempts=1)
        await claim(a)
        await claim(a)
        held = sorted(await b.held(), key=lambda h: h.task_id)
        assert {h.task_id for h in held} == {once, last} and {h.owner for h in held} == {A}
        await asyncio.sleep(1.1)  # A's heartbeat expires (lease 1 s), B's is renewed
        await b.heartbeat(B, "host-1")
        assert {o.token: o.expired for o in await b.owners()} == {A: True, B: False}
        await b.recover(HeldTask(once, A, 2))  # not the attempt it holds: nothing
        assert b.get(once)["status"] == "running"  # type: ignore[index]
        for h in held:
            await b.recover(h)
        assert b.get(once)["status"] == "pending"  # type: ignore[index]
        dead = b.get(last)
        assert dead is not None and dead["status"] == "dead" and dead["error"]["type"] == "HostDied"
        assert await b.held() == []
        await a.forget(A)
        assert [o.token for o in await b.owners()] == [B]

    run(broker, body, lease=1.0)


def test_idempotency_keys_lists_summaries_delete_and_prune(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        first, created = a.submit(ECHO, {"big": "x" * 1000}, max_attempts=3, idempotency_key="k1")
        again, created_again = b.submit(ECHO, {"other": 1}, max_attempts=3, idempotency_key="k1")
        assert created and not created_again and again["id"] == first["id"] and again["params"] == {"big": "x" * 1000}
        ids = [first["id"]] + [submit(a, OTHER if i % 2 else ECHO) for i in range(5)]
        tasks, cut = a.page(None, None, 100)
        assert [t["id"] for t in tasks] == ids[::-1] and not cut  # newest first
        assert all("params" not in t for t in tasks)  # summaries
        whole, cut = a.page(None, None, 100, full=True, budget=200)
        assert cut and whole[-1]["omitted"] and "params" not in whole[-1] and whole[0]["params"]
        assert [t["id"] for t in a.page(None, OTHER, 100)[0]] == [ids[4], ids[2]]
        assert [t["id"] for t in a.page(None, None, 2)[0]] == ids[:-3:-1]
        task = await claim(a, ECHO)  # the oldest ECHO: first
        assert [t["id"] for t in a.page("running", None, 10)[0]] == [first["id"]]
        assert [t["id"] for t in a.page("pending", ECHO, 10)[0]] == [ids[5], ids[3], ids[1]]
        assert a.delete(first["id"]) == (False, "running")
        assert a.delete("nope") == (False, None)
        await a.complete(task, done(OK))
        assert a.delete(ids[1]) == (True, "pending")
        assert await a.claim([ECHO]) is not None and a.get(ids[1]) is None  # the deleted one is never claimed
        a.retention = 0.0
        assert await a.prune() == 1  # the completed one
        assert a.get(first["id"]) is None
        assert a.counts()["completed"] == 0
        fresh, created = a.submit(ECHO, {}, max_attempts=3, idempotency_key="k1")  # the key went with it
        assert created and fresh["id"] != first["id"]

    run(broker, body)


def scripts_run(queue: RedisQueue) -> int:
    """How many scripts this Redis has run so far (EVALSHA's count in INFO commandstats)."""
    stats: dict[str, Any] = queue._sync.info("commandstats")  # type: ignore[assignment]
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_claim_many_takes_several_in_one_script_within_each_workers_slots(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        echo = [submit(a, ECHO) for _ in range(4)]
        other = [submit(a, OTHER) for _ in range(3)]
        await a.claim_many([Slots((ECHO,), 1), Slots((OTHER,), 1)], 2)  # the groups exist; two taken
        before = scripts_run(a)

        got = await a.claim_many([Slots((ECHO,), 2), Slots((OTHER,), 5)], 4)

        assert scripts_run(a) - before == 1  # one round trip
        assert [t.id for t in got if t.type == ECHO] == echo[1:3]  # first in, first out; 2 at most
        assert sorted(t.id for t in got if t.type == OTHER) == sorted(other[1:3])  # and 4 in all
        assert all(a.get(t.id)["status"] == "running" and t.attempt == 1 for t in got)  # type: ignore[index]
        assert sorted(h.task_id for h in await b.held()) == sorted([echo[0], other[0], *(t.id for t in got)])
        rest = await b.claim_many([Slots((ECHO, OTHER), 10)], 10)
        assert sorted(t.id for t in rest) == [echo[3]]
        assert await b.claim_many([Slots((ECHO, OTHER), 10)], 10) == []  # after a blocked read of 0.2 s

    run(broker, body)


def test_submit_many_stores_every_task_in_order_or_none(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        old, _ = a.submit(ECHO, {"n": 1}, max_attempts=3, idempotency_key="old")
        batch = [NewTask(ECHO, {"n": i}, 3, priority=i) for i in range(3)] + [
            NewTask(ECHO, {"n": 1}, 3, idempotency_key="old"),  # the task this key already names
            NewTask(OTHER, {"k": 1}, 2, idempotency_key="new"),
            NewTask(OTHER, {"k": 1}, 2, idempotency_key="new"),  # again in this batch: the same task
        ]
        stored = b.submit_many(batch)
        assert [created for _, created in stored] == [True, True, True, False, True, False]
        assert [t["params"] for t, _ in stored[:3]] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert stored[3][0]["id"] == old["id"] and stored[4][0]["id"] == stored[5][0]["id"]
        assert a.counts()["pending"] == 5
        assert b.statuses([stored[0][0]["id"], old["id"], "gone"]) == {stored[0][0]["id"]: "pending",
                                                                        old["id"]: "pending"}  # fmt: skip

        refused = [NewTask(ECHO, {}, 3), NewTask(ECHO, {"n": 1.0}, 3, idempotency_key="old"),
                   NewTask(ECHO, {}, 3, idempotency_key="x"), NewTask(OTHER, {}, 3, idempotency_key="x")]  # fmt: skip
        with pytest.raises(KeyConflict) as raised:
            a.submit_many(refused)
        assert raised.value.conflicts == [(1, f"task {old['id']}"), (3, "[2] of this batch")]
        assert a.counts()["pending"] == 5  # nothing of it was stored
        assert [t.id for t in await a.claim_many([Slots((ECHO,), 10)], 10)] == [old["id"]] + [
            t["id"] for t, _ in stored[:3]
        ]  # in the order they were stored: none of the refused batch is in the stream

    run(broker, body)


def test_bad_urls_and_a_broker_that_is_not_there_are_clear_errors(broker: Service) -> None:
    with pytest.raises(ConfigError, match=r"\[task_manager\] url"):
        RedisQueue("http://nowhere", owner=A)
    assert shown_url("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    port = free_port()

    async def body(queue: RedisQueue) -> None:
        with pytest.raises(
            SourceUnavailable, match=rf"Redis at redis://user:\*\*\*@127.0.0.1:{port}/0 \(\[task_manager\] url\)"
        ):
            await queue.claim([ECHO])
        with pytest.raises(SourceUnavailable) as refused:
            await asyncio.to_thread(queue.counts)
        assert "s3cret" not in str(refused.value)

    async def nowhere() -> None:
        queue = RedisQueue(f"redis://user:s3cret@127.0.0.1:{port}/0", owner=A)
        try:
            await body(queue)
        finally:
            await queue.close()

    asyncio.run(nowhere())

    import redis

    host, bound = broker.address
    redis.Redis(host=host, port=bound).config_set("requirepass", "right-password")

    async def wrong_password() -> None:
        queue = RedisQueue(f"redis://default:wrong@{host}:{bound}/0", owner=A)
        try:
            with pytest.raises(SourceUnavailable, match=r"credentials.*\[task_manager\] url"):
                await queue.claim([ECHO])
        finally:
            await queue.close()

    asyncio.run(wrong_password())


def test_a_broker_restart_loses_nothing_and_claims_resume(broker: Service) -> None:
    async def body(a: RedisQueue, b: RedisQueue) -> None:
        ids = [submit(a) for _ in range(5)]
        task = await claim(a)
        await asyncio.to_thread(broker.restart)
        # The first call after the restart may meet the old connection: the driver tries once more.
        for _ in range(20):
            try:
                await a.complete(task, done(OK))
                break
            except SourceUnavailable:
                await asyncio.sleep(0.2)
        got = [await claim(b) for _ in range(4)]
        assert sorted(t.id for t in got) == sorted(ids[1:])
        assert a.get(ids[0])["status"] == "completed"  # type: ignore[index]

    run(broker, body)


# -- `workerhost serve` on Redis ------------------------------------------------------------


def redis_config(host_id: str, port: int, url: str, image: str, lease: str = "30s", **options: Any) -> str:
    """A serve config (tests.serving's) with the Redis source instead of the embedded queue."""
    text = config_text(host_id, port, Path("unused.db"), image, lease=lease, **options)
    embedded = text[text.index("[task_manager]") : text.index("[[workers]]")]
    return text.replace(embedded, f'[task_manager]\ntype = "redis"\nurl = "{url}"\nlease = "{lease}"\n\n')


def start_serve(tmp_path: Path, url: str, image: str, host_id: str | None = None, **options: Any) -> Serve:
    port = free_port()
    config = tmp_path / f"serve-{port}.toml"
    config.write_text(redis_config(host_id or new_host_id(), port, url, image, **options))
    return Serve(config, port, tmp_path / f"serve-{port}.log").start()


@pytest.fixture
def hosts(tmp_path: Path, broker: Service, behave_image: str) -> Iterator[Callable[..., Serve]]:
    """Start ``serve`` processes on this test's Redis (each its own host id unless given); all are
    stopped at the end, before the broker."""
    started: list[Serve] = []

    def start(**options: Any) -> Serve:
        process = start_serve(tmp_path, url_of(broker), behave_image, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def test_the_api_of_every_host_answers_from_the_shared_queue(hosts: Callable[..., Serve]) -> None:
    a, b = hosts(), hosts()
    health = b.http.get("/health").json()
    assert health["status"] == "ok" and health["source"]["type"] == "redis" and health["source"]["reachable"]
    task = a.submit("Test.Behave", do="ok", value=7)
    seen = b.task(task["id"])  # submitted through A, read through B
    assert seen["params"] == {"do": "ok", "value": 7} and seen["id"] == task["id"]
    finished = b.wait_for(task["id"], ("completed",))
    assert a.task(task["id"]) == finished
    assert finished["attempts"] == 1 and finished["worker"] == "Test.Behave"
    listed = b.http.get("/tasks", params={"status": "completed"}).json()
    assert [t["id"] for t in listed] == [task["id"]] and "params" not in listed[0]
    assert b.http.get("/tasks", params={"full": "true"}).json()[0]["result"] == finished["result"]
    # An idempotency key names the same task through any host.
    first = a.http.post("/tasks", json={"type": "Test.Behave", "params": {"do": "ok"}, "idempotency_key": "k"})
    second = b.http.post("/tasks", json={"type": "Test.Behave", "params": {"do": "ok"}, "idempotency_key": "k"})
    assert (first.status_code, second.status_code) == (201, 200) and first.json()["id"] == second.json()["id"]
    # A dead letter, retried through the other host.
    failing = a.submit("Test.Behave", do="exit", code=1)
    dead = b.wait_for(failing["id"], ("dead",))
    assert dead["attempts"] == 3 and dead["error"]["retriable"]
    retried = b.http.post(f"/tasks/{failing['id']}/retry")
    assert retried.status_code == 200 and retried.json()["status"] == "pending"
    a.wait_for(failing["id"], ("dead",))
    assert b.http.delete(f"/tasks/{failing['id']}").status_code == 204
    assert a.http.get(f"/tasks/{failing['id']}").status_code == 404
    a.wait_for(first.json()["id"], ("completed",))
    depth = [line for line in a.http.get("/metrics").text.splitlines() if line.startswith("workerhost_queue_tasks")]
    assert 'workerhost_queue_tasks{status="completed"} 2.0' in depth, depth


def test_a_broker_that_goes_away_degrades_health_and_nothing_is_lost(
    hosts: Callable[..., Serve], broker: Service
) -> None:
    host = hosts(lease="10s")
    ids = [host.submit("Test.Behave", do="sleep", seconds=0.5)["id"] for _ in range(12)]
    host.wait_for(ids[0], ("running", "completed"))
    container = broker.container.get_wrapped_container()
    container.stop(timeout=5)  # appendonly: what was written is on disk
    deadline = time.monotonic() + 20
    while (health := host.http.get("/health")).json()["status"] != "degraded":
        assert time.monotonic() < deadline, health.text
        time.sleep(0.2)
    assert health.json()["source"]["reachable"] is False and "[task_manager] url" in health.json()["source"]["error"]
    assert host.http.get(f"/tasks/{ids[0]}").status_code == 503
    time.sleep(2)  # reports and claims fail meanwhile, and are tried again
    container.start()
    deadline = time.monotonic() + 30  # while Redis starts (and reads its file), the API answers 503
    while host.http.get("/health").json()["status"] != "ok":
        assert time.monotonic() < deadline, "Redis did not come back"
        time.sleep(0.2)
    finished = [host.wait_for(i, ("completed",), timeout=90) for i in ids]
    assert all(t["attempts"] == 1 for t in finished)  # nothing ran twice: the reports landed late
    assert host.http.get("/health").json()["status"] == "ok"
