"""The RabbitMQ task source against a real broker (a container this module starts), and
``workerhost serve`` processes on it with real worker containers.

The broker is built offline (images/services/rabbitmq) and started through testcontainers; every
test uses queues of its own (``queues`` maps the test worker's type to a fresh name).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from runner.config import AmqpSource, WorkerConfig
from runner.docker import LABEL_HOST, LABEL_TASK
from runner.errors import ConfigError
from runner.protocol import ErrorInfo, Outcome, Status
from runner.sources import ClaimedTask, Finished, LeaseLost, SourceUnavailable
from runner.sources.amqp import ATTEMPT, REJECTED, AmqpTaskSource, redact
from tests.conftest import SESSION_PREFIX, new_host_id
from tests.serving import Serve, free_port

pytestmark = [pytest.mark.docker, pytest.mark.anyio]

TYPE = "Test.Behave"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def broker(docker_client: Any) -> Iterator[Any]:
    """RabbitMQ in a container for this module; yields the Service (address, restart)."""
    from tests.services import RABBITMQ_IMAGE, build_service, service

    build_service(RABBITMQ_IMAGE, "rabbitmq")
    # Not labelled as a host's container: the per-test leak check would take this module's broker for a leak.
    labels = {"workerhost-test.session": SESSION_PREFIX}
    # A fixed host port: the hosts' URL must still hold after the broker's restart.
    with service(RABBITMQ_IMAGE, 5672, labels, timeout=90, host_port=free_port()) as started:
        asyncio.run(_wait_for_amqp(_url(started), 60))
        yield started


def _url(service: Any) -> str:
    host, port = service.address
    return f"amqp://guest:guest@{host}:{port}/"


async def _wait_for_amqp(url: str, timeout: float) -> None:
    """The port answers a few seconds before AMQP connections succeed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await aio_pika.connect(url, timeout=5)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
        else:
            await connection.close()
            return


def _worker(max_retries: int = 2) -> WorkerConfig:
    return WorkerConfig(name="Test.Behave", image="workerhost-test/behave:latest", task_types=[TYPE],
                        max_retries=max_retries, memory=64 * 1024**2)  # fmt: skip


def _config(url: str, queue: str, **extra: Any) -> AmqpSource:
    return AmqpSource.model_validate({"type": "amqp", "url": url, "queues": {TYPE: queue}, **extra})


class Client:
    """A plain aio-pika client: what a system that publishes tasks does, and a look into queues."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, channel: aio_pika.abc.AbstractChannel) -> None:
        self.connection, self.channel = connection, channel

    async def publish(self, queue: str, body: Any, raw: bytes | None = None, **properties: Any) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        message = aio_pika.Message(data, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)
        await self.channel.default_exchange.publish(message, queue)

    async def reply_queue(self) -> aio_pika.abc.AbstractQueue:
        return await self.channel.declare_queue(exclusive=True)

    async def take(self, queue: str, timeout: float = 10.0) -> aio_pika.abc.AbstractIncomingMessage:
        """The next message of a queue (acked), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        found = await self.channel.declare_queue(queue, passive=True) if isinstance(queue, str) else queue
        while True:
            message = await found.get(no_ack=True, fail=False)
            if message is not None:
                return message
            assert time.monotonic() < deadline, f"nothing in {queue} after {timeout}s"
            await asyncio.sleep(0.05)

    async def depth(self, queue: str) -> int:
        declared = await self.channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


@pytest.fixture
async def client(broker: Any) -> AsyncIterator[Client]:
    connection = await aio_pika.connect(_url(broker))
    channel = await connection.channel()
    yield Client(connection, channel)
    await connection.close()


@pytest.fixture
def queue() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def source(broker: Any, queue: str) -> AsyncIterator[AmqpTaskSource]:
    started = AmqpTaskSource(_config(_url(broker), queue, redelivery_delay="300ms"), [_worker()])
    await started.start()
    yield started
    await started.close()


async def _claim(source: AmqpTaskSource, timeout: float = 10.0) -> ClaimedTask:
    deadline = time.monotonic() + timeout
    while True:
        task = await source.claim([TYPE])
        if task is not None:
            return task
        assert time.monotonic() < deadline, f"no task claimed in {timeout}s"
        await asyncio.sleep(0.05)


def _failed(retriable: bool) -> Finished:
    error = ErrorInfo("Boom", "it broke")
    return Finished(Outcome(Status.FAILED, retriable=retriable, error=error, exit_code=1), "Test.Behave")


# -- the adapter ------------------------------------------------------------------------------


async def test_claim_and_complete_publishes_the_result_to_reply_to(
    source: AmqpTaskSource, client: Client, queue: str
) -> None:
    replies = await client.reply_queue()
    body = {"id": "t-1", "type": TYPE, "params": {"n": 1}, "correlation_id": "corr-1"}
    traceparent = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
    headers = {"traceparent": traceparent}
    await client.publish(queue, body, reply_to=replies.name, correlation_id="rpc-7", headers=headers)

    task = await _claim(source)
    assert (task.id, task.type, task.params, task.attempt, task.max_attempts) == ("t-1", TYPE, {"n": 1}, 1, 3)
    assert task.correlation_id == "corr-1"
    assert task.traceparent == "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
    assert await source.claim([TYPE]) is None  # one delivery, held by us
    await source.complete(task, Finished(Outcome(Status.COMPLETED, result={"ok": True}), "Test.Behave"))

    reply = await client.take(replies.name)
    assert reply.correlation_id == "rpc-7"
    result = json.loads(reply.body)
    assert result["id"] == "t-1" and result["status"] == "completed" and result["result"] == {"ok": True}
    assert result["attempts"] == 1 and result["correlation_id"] == "corr-1"
    assert result["trace_id"] == "0123456789abcdef0123456789abcdef"
    assert await client.depth(queue) == 0
    await source.close()  # acked: closing does not bring it back
    assert await client.depth(queue) == 0


async def test_a_retriable_failure_goes_through_the_delay_queue_and_counts_the_attempt(
    source: AmqpTaskSource, client: Client, queue: str
) -> None:
    await client.publish(queue, {"id": "t-2", "type": TYPE, "params": {}})
    task = await _claim(source)
    started = time.monotonic()
    await source.fail(task, _failed(retriable=True), retry_in=0.5)
    assert await client.depth(f"{queue}.retry.1") == 1
    assert await source.claim([TYPE]) is None  # not before its delay

    again = await _claim(source)
    assert time.monotonic() - started >= 0.45
    assert (again.id, again.attempt) == ("t-2", 2)
    await source.complete(again, Finished(Outcome(Status.COMPLETED, result=1), "Test.Behave"))


async def test_final_failures_are_dead_lettered_with_the_error(
    source: AmqpTaskSource, client: Client, queue: str
) -> None:
    replies = await client.reply_queue()
    for name in ("exhausted", "permanent"):
        await client.publish(queue, {"id": name, "type": TYPE, "params": {}}, reply_to=replies.name)
    first, second = await _claim(source), await _claim(source)
    await source.fail(first, _failed(retriable=True), retry_in=None)  # retries used up: dead
    await source.fail(second, _failed(retriable=False), retry_in=None)  # permanent: failed

    dead = [await client.take(f"{queue}.dead") for _ in range(2)]
    by_id = {m.message_id: m.headers for m in dead}
    assert by_id["exhausted"]["x-workerhost-status"] == "dead"
    assert by_id["permanent"]["x-workerhost-status"] == "failed"
    for headers in by_id.values():
        assert headers["x-workerhost-error-type"] == "Boom"
        assert headers["x-workerhost-error-message"] == "it broke"
    results = {json.loads(m.body)["id"]: json.loads(m.body) for m in [await client.take(replies.name)
                                                                     for _ in range(2)]}  # fmt: skip
    assert results["exhausted"]["status"] == "dead" and results["permanent"]["status"] == "failed"
    assert results["permanent"]["error"] == {"type": "Boom", "message": "it broke", "retriable": False}
    assert await client.depth(queue) == 0


async def test_a_bad_message_is_dead_lettered_with_the_reason(
    source: AmqpTaskSource, client: Client, queue: str
) -> None:
    await client.publish(queue, None, raw=b"not json at all")
    await client.publish(queue, {"type": "Other.Type", "params": {}})
    await client.publish(queue, {"type": TYPE, "params": [1]})
    await client.publish(queue, {"id": "good", "type": TYPE, "params": {}})

    task = await _claim(source)
    assert task.id == "good"
    reasons = [(await client.take(f"{queue}.dead")).headers[REJECTED] for _ in range(3)]
    assert "not valid JSON" in str(reasons[0])
    assert "'Other.Type' on the queue of 'Test.Behave'" in str(reasons[1])
    assert "params" in str(reasons[2])


async def test_release_requeues_and_a_redelivery_counts_as_an_attempt(
    source: AmqpTaskSource, client: Client, queue: str
) -> None:
    await client.publish(queue, {"id": "t-r", "type": TYPE, "params": {}})
    task = await _claim(source)
    await source.release(task)
    again = await _claim(source)  # held back redelivery_delay (300ms) in {queue}.redelivered
    assert (again.id, again.attempt) == ("t-r", 2)
    await source.complete(again, Finished(Outcome(Status.COMPLETED, result=1), "Test.Behave"))


async def test_a_killed_consumers_delivery_is_redelivered(broker: Any, client: Client, queue: str) -> None:
    config = _config(_url(broker), queue, redelivery_delay="200ms")
    first, second = AmqpTaskSource(config, [_worker()]), AmqpTaskSource(config, [_worker()])
    await first.start()
    await second.start()
    try:
        await client.publish(queue, {"id": "t-k", "type": TYPE, "params": {}}, headers={ATTEMPT: 1})
        held = await _claim(first)
        assert await second.claim([TYPE]) is None
        await first.close()  # the consumer goes away without an ack (a host killed)
        with pytest.raises(LeaseLost):
            await first.renew(held)  # the host would stop its container now
        again = await _claim(second)
        assert (again.id, again.attempt) == ("t-k", 2)
        await second.complete(again, Finished(Outcome(Status.COMPLETED, result=1), "Test.Behave"))
    finally:
        await first.close()
        await second.close()


async def test_a_message_the_source_fails_to_handle_goes_back_to_the_broker(
    source: AmqpTaskSource, client: Client, queue: str
) -> None:
    # {queue}.redelivered exists with other arguments: holding a redelivered message back fails.
    await client.channel.declare_queue(f"{queue}.redelivered", durable=True, arguments={"x-max-length": 5})
    await client.publish(queue, {"id": "t-h", "type": TYPE, "params": {}})
    task = await _claim(source)
    await source.release(task)  # comes back redelivered
    with pytest.raises(SourceUnavailable):
        for _ in range(100):
            await source.claim([TYPE])
            await asyncio.sleep(0.05)
    # Not held unacked by a host that will not run it: back in the queue (nacked, or requeued by the
    # broker as the failed declare closed the channel), soon.
    deadline = time.monotonic() + 10
    while (await client.channel.declare_queue(queue, passive=True)).declaration_result.message_count != 1:
        assert time.monotonic() < deadline, "the message stayed held by the source"
        await asyncio.sleep(0.1)


async def test_a_message_redelivered_past_its_attempts_is_dead(
    source: AmqpTaskSource, client: Client, queue: str
) -> None:
    await client.publish(queue, {"id": "t-p", "type": TYPE, "params": {}}, headers={ATTEMPT: 3})
    task = await _claim(source)
    await source.release(task)  # redelivered as attempt 4 of 3
    assert await source.claim([TYPE]) is None
    dead = await client.take(f"{queue}.dead")
    assert dead.headers["x-workerhost-error-type"] == "Redelivered"


async def test_errors_name_the_url_without_its_password(broker: Any, queue: str) -> None:
    host, port = broker.address
    bad = AmqpTaskSource(_config(f"amqp://guest:wrong@{host}:{port}/", queue), [_worker()])
    with pytest.raises(SourceUnavailable) as refused:
        await bad.start()
    assert "[task_manager] url" in str(refused.value) and "wrong" not in str(refused.value)
    with pytest.raises(SourceUnavailable):
        await bad.health()
    port = free_port()
    nobody = AmqpTaskSource(_config(f"amqp://u:secret@127.0.0.1:{port}/", queue), [_worker()])
    with pytest.raises(SourceUnavailable) as unreachable:
        await nobody.start()
    assert "secret" not in str(unreachable.value) and f"u:***@127.0.0.1:{port}" in str(unreachable.value)
    assert redact("amqp://a:b@h:1/v") == "amqp://a:***@h:1/v"
    with pytest.raises(ConfigError, match="share the queue"):
        AmqpTaskSource(_config("amqp://h/", "q", queues={TYPE: "q", "Other": "q"}),
                       [WorkerConfig(name="W", image="w:1", task_types=[TYPE, "Other"])])  # fmt: skip


# -- workerhost serve on the broker ------------------------------------------------------------


def _serve_config(tmp_path: Path, host_id: str, port: int, url: str, queue: str, *, concurrency: int = 4,
                  results: str = "", redelivery: str = "5s") -> Path:  # fmt: skip
    config = tmp_path / f"serve-{port}.toml"
    config.write_text(f"""
[host]
id = "{host_id}"
concurrency = {concurrency}
http = "127.0.0.1:{port}"
grace = "20s"
poll_max = "200ms"
reap_interval = "1s"

[task_manager]
type = "amqp"
url = "{url}"
queues = {{ "{TYPE}" = "{queue}" }}
results_exchange = "{results}"
redelivery_delay = "{redelivery}"

[[workers]]
name = "Test.Behave"
image = "workerhost-test/behave:latest"
task_types = ["{TYPE}"]
timeout = "60s"
max_retries = 2
backoff = "100ms"
concurrency = {concurrency}
memory = "64m"
""")
    return config


ServeFactory = Callable[..., Serve]


@pytest.fixture
def serve(tmp_path: Path, behave_image: str, broker: Any, queue: str) -> Iterator[ServeFactory]:
    started: list[Serve] = []

    def start(host_id: str | None = None, port: int | None = None, **options: Any) -> Serve:
        port = port or free_port()
        config = tmp_path / f"serve-{port}.toml"
        if not config.exists():
            url = options.pop("url", None) or _url(broker)
            config = _serve_config(tmp_path, host_id or new_host_id(), port, url, queue, **options)
        process = Serve(config, port, tmp_path / f"serve-{port}.log").start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


async def _results_queue(client: Client, exchange: str) -> aio_pika.abc.AbstractQueue:
    """A durable queue bound to the results exchange (declared here too: the hosts may not be up yet)."""
    declared = await client.channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    results = await client.channel.declare_queue(f"{exchange}.all", durable=True)
    await results.bind(declared, "#")
    return results


async def _collect(results: aio_pika.abc.AbstractQueue, ids: set[str], timeout: float,
                   logs: Callable[[], str] = str) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Result messages until every id in ``ids`` has one (every result kept, by id, last wins)."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while not ids <= set(seen):
        try:
            message = await results.get(no_ack=True, fail=False)
        except Exception:  # the broker restarting under us
            message = None
            await asyncio.sleep(0.5)
        if message is None:
            missing = len(ids - set(seen))
            assert time.monotonic() < deadline, f"{missing} results missing after {timeout}s\n{logs()[-3000:]}"
            await asyncio.sleep(0.1)
            continue
        task = json.loads(message.body)
        seen[task["id"]] = task
    return seen


async def test_serve_publishes_with_confirms_and_answers_501_for_what_it_does_not_keep(
    serve: ServeFactory, client: Client, queue: str
) -> None:
    exchange = f"{queue}.results"
    results = await _results_queue(client, exchange)
    host = serve(results=exchange)

    task = host.submit(TYPE, do="ok", n=1)
    assert task["status"] == "pending" and task["attempts"] == 0
    done = await _collect(results, {task["id"]}, timeout=60, logs=host.log.read_text)
    assert done[task["id"]]["status"] == "completed"
    assert done[task["id"]]["result"]["params"] == {"do": "ok", "n": 1}

    for method, path in (("GET", f"/tasks/{task['id']}"), ("GET", "/tasks"), ("POST", f"/tasks/{task['id']}/retry"),
                         ("DELETE", f"/tasks/{task['id']}")):  # fmt: skip
        answer = host.http.request(method, path)
        assert answer.status_code == 501, (method, path, answer.text)
        assert "reply_to" in answer.json()["error"] and exchange in answer.json()["error"]
    keyed = host.http.post("/tasks", json={"type": TYPE, "params": {}, "idempotency_key": "k"})
    assert keyed.status_code == 501
    health = host.http.get("/health").json()
    assert health["status"] == "ok" and health["source"]["type"] == "amqp"
    assert "guest:guest" not in json.dumps(health)
    metrics = host.http.get("/metrics").text
    assert 'workerhost_queue_tasks{status="pending"}' in metrics  # the broker's own count of the queue


async def test_the_broker_restarted_mid_run_loses_nothing(
    serve: ServeFactory, client: Client, queue: str, broker: Any
) -> None:
    exchange = f"{queue}.results"
    await _results_queue(client, exchange)
    host = serve(results=exchange, redelivery="1s")
    ids = {host.submit(TYPE, do="sleep", seconds=0.3)["id"] for _ in range(16)}
    time.sleep(1.0)  # some done, some running, most queued

    await client.connection.close()
    broker.restart()
    await _wait_for_amqp(_url(broker), 60)
    deadline = time.monotonic() + 30
    while host.http.get("/health").json()["status"] != "ok":  # degraded while it was gone, then back
        assert time.monotonic() < deadline, host.log.read_text()[-3000:]
        time.sleep(0.2)
    connection = await aio_pika.connect(_url(broker))
    try:
        channel = await connection.channel()
        durable = await channel.declare_queue(f"{exchange}.all", durable=True)
        done = await _collect(durable, ids, timeout=90, logs=host.log.read_text)
    finally:
        await connection.close()
    assert {done[i]["status"] for i in ids} == {"completed"}


async def test_three_hosts_share_one_broker_and_one_is_killed(
    serve: ServeFactory, client: Client, queue: str, docker_client: Any
) -> None:
    exchange = f"{queue}.results"
    results = await _results_queue(client, exchange)
    host_ids = [new_host_id() for _ in range(3)]
    # Read live: the engine replays only its last 256 events, fewer than this run makes.
    wanted = {"type": "container", "event": ["start", "die"], "label": [LABEL_TASK]}
    stream = docker_client.events(since=int(time.time()) - 1, decode=True, filters=wanted)
    seen: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: seen.extend(stream), daemon=True)
    reader.start()
    hosts = [serve(host_id=h, results=exchange, redelivery="3s", concurrency=3) for h in host_ids]
    ids = {hosts[i % 3].submit(TYPE, do="sleep", seconds=0.2 + (i % 5) * 0.2)["id"] for i in range(300)}

    time.sleep(3.0)
    victim = hosts[0]
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    done = await _collect(results, ids, timeout=300, logs=hosts[1].log.read_text)
    assert {done[i]["status"] for i in ids} == {"completed"}
    assert any(done[i]["attempts"] > 1 for i in ids), "the killed host held no task: nothing was redelivered"
    serve(port=victim.port)  # its restart removes what it left (the leak check after this test says so)
    time.sleep(2.0)
    stream.close()
    reader.join(10)

    spans: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    opened: dict[str, tuple[str, str, float]] = {}
    for event in list(seen):
        labels = event.get("Actor", {}).get("Attributes", {})
        if labels.get(LABEL_HOST) not in host_ids:
            continue
        moment = event["timeNano"] / 1e9
        if event["Action"] == "start":
            opened[event["id"]] = (labels[LABEL_TASK], labels[LABEL_HOST], moment)
        elif event["id"] in opened:
            task_id, host_id, began = opened.pop(event["id"])
            spans[task_id].append((host_id, began, moment))
    for task_id, host_id, began in opened.values():
        spans[task_id].append((host_id, began, time.time()))
    assert ids <= set(spans)
    for task_id, runs in spans.items():
        for a in runs:
            for b in runs:
                if a is not b and a[0] != b[0]:
                    assert a[2] <= b[1] or b[2] <= a[1], f"task {task_id} ran on two hosts at once: {runs}"


def test_serve_with_bad_credentials_is_degraded_and_names_the_setting(serve: ServeFactory, broker: Any) -> None:
    host, port = broker.address
    started = serve(url=f"amqp://guest:nope@{host}:{port}/")
    health = started.http.get("/health").json()
    assert health["status"] == "degraded"
    assert "[task_manager] url" in health["source"]["error"] and "nope" not in json.dumps(health)
