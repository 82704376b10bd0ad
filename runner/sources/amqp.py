"""RabbitMQ (AMQP 0-9-1) as a task source (``[task_manager] type = "amqp"``), through aio-pika.

For systems that already publish tasks on RabbitMQ. The broker carries tasks and keeps no record
of them: this source claims, reports and schedules retries, and the API's questions about a task
by id answer 501 (``NotKept``), saying that results go to ``reply_to`` or the results exchange.

The message contract (README, "RabbitMQ (AMQP)"):

- One durable queue per task type, named after the type unless ``queues`` maps it; two types
  may not share a queue. A queue that already exists with its owner's arguments is used as it is.
- A persistent message whose body is a JSON object ``{"id"?, "type", "params", "correlation_id"?,
  "traceparent"?}``; headers ``traceparent`` and ``correlation_id`` (and the AMQP
  ``correlation_id`` property) carry the trace context and correlation id too. The id is the
  body's, else the ``message_id`` property, else a new one (give one to keep it across redeliveries).
- A message that is not that (not JSON, no type, a type that is not its queue's, params that are
  not an object...) is published to ``{queue}.dead`` with the reason in the ``x-workerhost-rejected``
  header and acked: it never reaches a worker, never crashes the host.

Claims take one message with ``basic.get`` (manual ack), one task type after another, starting
from a different type each call so that none starves. Chosen over a consumer with prefetch
because the host asks for one task per call, only for types with a free slot: a get takes
exactly what the host can run now, so this host never holds more unacked deliveries than it
has free slots (a consumer's prefetch buffer would hold messages that other hosts could run).
The price is a round trip per type and claim, and polling while idle (the host backs off up to
``[host] poll_max``).

A delivery is acked only after its outcome is published (complete, fail). ``release`` (a
drain) nacks it with requeue. A host that dies, or loses its connection, has its unacked
deliveries redelivered by the broker; the attempt count travels in the ``x-workerhost-attempt``
header (absent: 1), and a message that arrives ``redelivered`` counts as the next attempt. Such a
message is held back ``redelivery_delay`` in ``{queue}.redelivered`` before it runs again, so
that a container its dead host left running has ended (or that host's restart removed it) first;
past its attempts it goes to ``{queue}.dead`` instead (a message that kills its hosts stops there).

A delivery holds only while the channel that delivered it is open: ``renew`` (every second, a
local check) raises ``LeaseLost`` when it closed, so the host stops that container (the broker
is already redelivering the message), and a report on a closed channel is ``LeaseLost`` too. An
outcome published just before the channel died is published again by the next attempt: results
are at least once, like the tasks.

Retries belong to the host (``retry_in``); this source schedules them without broker plugins: the
message is republished to ``{queue}.retry.{n}`` (n: the attempt that failed) with a per-message
TTL (``expiration``), and that queue dead-letters it back to the work queue
(``x-dead-letter-exchange`` "", ``x-dead-letter-routing-key`` the queue). One queue per retry
number keeps the TTLs in one queue close (they differ by the jitter only), since RabbitMQ expires
messages from the head of a queue only. A final failure (permanent, or retries used up) is
published to ``{queue}.dead`` with the error in headers (``x-workerhost-error-type``, ``-message``,
``-retriable``, ``x-workerhost-status`` failed or dead).

Results: the task as ``GET /tasks/{id}`` would show it, published to the message's ``reply_to``
with its ``correlation_id`` (the RPC convention), and to ``results_exchange`` (routing key: the task
type) when one is configured. Publishing uses publisher confirms, on a channel of its own: a
publish that fails never closes the channel that holds the deliveries.

Driver errors become ``SourceUnavailable`` naming the URL without its password; a closed
connection is opened again at the next call (the host backs off between claims).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, DeliveryMode

from runner import jsondata
from runner.config import AmqpSource, WorkerConfig
from runner.errors import ConfigError
from runner.protocol import Status
from runner.retries import backoff
from runner.sources import (
    Capabilities,
    ClaimedTask,
    Finished,
    LeaseLost,
    NewTask,
    NotKept,
    SourceUnavailable,
    TaskSource,
    iso_time,
)
from runner.telemetry import context

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPT = "x-workerhost-attempt"
MAX_ATTEMPTS = "x-workerhost-max-attempts"
REJECTED = "x-workerhost-rejected"
MAX_BODY = 16 * 1024**2  # a larger message is rejected, as the API refuses a larger request
PUBLISH_TIMEOUT = 15.0  # seconds for a publish and its confirm
RENEW_EVERY = 1.0  # how often a running task's channel is checked (a local check, no round trip)
_BODY_KEYS = {"id", "type", "params", "correlation_id", "traceparent"}
# RuntimeError: aiormq's "connection closed" when a channel is opened on a connection that just went.
_BROKER_ERRORS = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError, OSError,
                  TimeoutError, RuntimeError)  # fmt: skip

NOT_KEPT = (
    "the amqp task source does not keep tasks: RabbitMQ only carries them. Each task's outcome is "
    "published to its message's reply_to (with its correlation_id){exchange}; failed and dead "
    "tasks are also in the queue {{queue}}.dead with the error in headers"
)


def redact(url: str) -> str:
    """The URL without its password, as logs and errors show it."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(an AMQP URL that does not parse)"


@dataclass(eq=False)
class Delivery:
    """A claim's receipt: the message, the channel that delivered it, and its queue."""

    message: AbstractIncomingMessage
    channel: AbstractChannel
    queue: str
    settled: bool = False


class AmqpTaskSource(TaskSource):
    """A ``TaskSource`` (and the API's ``TaskStore``) backed by RabbitMQ."""

    keeps_tasks = False  # the broker carries tasks; what became of one is not asked of it

    def __init__(self, config: AmqpSource, workers: Iterable[WorkerConfig]) -> None:
        """Raises ``ConfigError`` when two task types share a queue."""
        self._config = config
        self._url = config.url.get_secret_value()
        self.url = redact(self._url)
        workers = list(workers)
        self.types = [t for w in workers for t in w.task_types]
        self.queues = {t: config.queues.get(t, t) for t in self.types}
        self.max_attempts = {t: w.max_retries + 1 for w in workers for t in w.task_types}
        shared: dict[str, str] = {}
        problems = []
        for task_type, queue in self.queues.items():
            if queue in shared:
                problems.append(f"[task_manager] queues: task types {shared[queue]!r} and {task_type!r} share "
                                f"the queue {queue!r}; each task type needs its own queue")  # fmt: skip
            shared[queue] = task_type
        unknown = sorted(set(config.queues) - set(self.types))
        if unknown:
            problems.append(f"[task_manager] queues: no worker handles {', '.join(map(repr, unknown))}")
        if problems:
            raise ConfigError(problems)
        self.capabilities = Capabilities(renew_every=RENEW_EVERY, owns_retries=False, knows_final_attempt=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: AbstractConnection | None = None
        self._consume: AbstractChannel | None = None  # gets, acks, nacks: nothing that can fail on it
        self._publish: AbstractChannel | None = None  # publisher confirms; reopened after a failed publish
        self._declared: set[str] = set()
        self._lock: asyncio.Lock | None = None
        self._rotation = itertools.count()
        self.error: str | None = None  # why the last call to the broker failed
        self._closing = False
        self._reconnector: asyncio.Task[None] | None = None

    # -- the port -----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._ensure()

    async def claim(self, task_types: Collection[str]) -> ClaimedTask | None:
        wanted = [t for t in task_types if t in self.queues]
        if not wanted:
            return None
        channel = await self._ensure()
        first = next(self._rotation) % len(wanted)
        for task_type in wanted[first:] + wanted[:first]:
            queue_name = self.queues[task_type]
            async with self._broker(f"taking a message from {queue_name}"):
                queue = await channel.get_queue(queue_name, ensure=False)
                message = await queue.get(no_ack=False, fail=False, timeout=PUBLISH_TIMEOUT)
            if message is None:
                continue
            try:
                task = await self._accept(task_type, Delivery(message, channel, queue_name))
            except BaseException:
                # Not left unacked and held by a host that will not run it: back to the broker.
                with contextlib.suppress(*_BROKER_ERRORS):
                    await message.nack(requeue=True)
                raise
            if task is not None:
                return task
        return None

    async def renew(self, task: ClaimedTask) -> None:
        self._holds(task)

    async def complete(self, task: ClaimedTask, finished: Finished) -> None:
        delivery = self._holds(task)
        await self._publish_result(delivery, self.view(task, "completed", finished))
        await self._settle(delivery, "ack")

    async def fail(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        delivery = self._holds(task)
        outcome = finished.outcome
        if retry_in is not None:
            await self._delay(delivery, f"{delivery.queue}.retry.{task.attempt}", retry_in, task.attempt + 1, task.id)
            await self._settle(delivery, "ack")
            return
        status = "dead" if outcome.retriable else "failed"
        error = outcome.error
        headers = {
            "x-workerhost-status": status, "x-workerhost-outcome": str(outcome.status),
            "x-workerhost-error-type": error.type if error else "Unknown",
            "x-workerhost-error-message": jsondata.clean_text(error.message if error else "", 8192),
            "x-workerhost-error-retriable": outcome.retriable, ATTEMPT: task.attempt,
            "x-workerhost-worker": finished.worker,
        }  # fmt: skip
        await self._dead_letter(delivery, headers, task.id)
        await self._publish_result(delivery, self.view(task, status, finished))
        await self._settle(delivery, "ack")

    async def release(self, task: ClaimedTask) -> None:
        delivery: Delivery = task.receipt
        if delivery.settled or delivery.channel.is_closed or not self._connected():
            return  # the broker requeued it when the channel closed
        await self._settle(delivery, "nack")

    async def health(self) -> dict[str, Any]:
        if not self._connected() or self._consume is None or self._consume.is_closed:
            raise SourceUnavailable(self.error or f"RabbitMQ at {self.url}: not connected")
        return {"type": "amqp", "url": self.url, "reachable": True, "queues": dict(self.queues)}

    async def close(self) -> None:
        self._closing = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnector
        await self._drop()

    # -- the API's TaskStore: submit publishes; the rest is not kept here ----------------------

    def submit(
        self, task_type: str, params: dict[str, Any], max_attempts: int, priority: int = 0,
        idempotency_key: str | None = None, correlation_id: str | None = None, traceparent: str | None = None,
        task_id: str | None = None,
    ) -> tuple[dict[str, Any], bool]:  # fmt: skip
        """Publish the task (persistent, with a publisher confirm) and return it as pending."""
        if idempotency_key is not None:
            raise NotKept("idempotency keys need a store that remembers them; the amqp task source only "
                          "publishes (leave idempotency_key out, or deduplicate in the worker)")  # fmt: skip
        if task_type not in self.queues:
            raise ValueError(f"no worker handles {task_type!r}")
        task_id = task_id or str(uuid.uuid4())
        body = {"id": task_id, "type": task_type, "params": params}
        if correlation_id:
            body["correlation_id"] = correlation_id
        headers: dict[str, Any] = {MAX_ATTEMPTS: max_attempts}
        if correlation_id:
            headers["correlation_id"] = correlation_id
        if traceparent:
            headers["traceparent"] = traceparent
        now = time.time()
        message = aio_pika.Message(
            jsondata.dumps(body).encode(), headers=headers, content_type="application/json",
            delivery_mode=DeliveryMode.PERSISTENT, message_id=task_id, correlation_id=correlation_id,
            priority=min(priority, 255) if priority > 0 else None, timestamp=datetime.fromtimestamp(now, UTC),
        )  # fmt: skip
        self._on_loop(self._publish_to("", self.queues[task_type], message, mandatory=True))
        task = {
            "id": task_id, "type": task_type, "status": "pending", "attempts": 0, "max_attempts": max_attempts,
            "priority": priority, "correlation_id": correlation_id, "trace_id": context.trace_id_of(traceparent),
            "created_at": iso_time(now), "updated_at": iso_time(now), "params": params,
        }  # fmt: skip
        return task, True

    def submit_many(self, tasks: Sequence[NewTask]) -> list[tuple[dict[str, Any], bool]]:
        raise NotKept("a batch is stored whole or not at all, which needs a store that keeps tasks; the amqp "
                      "task source publishes them one by one (POST each task alone)")  # fmt: skip

    def get(self, task_id: str) -> dict[str, Any] | None:
        raise NotKept(self._not_kept())

    def statuses(self, task_ids: Sequence[str]) -> dict[str, str]:
        raise NotKept(self._not_kept())

    def page(
        self, status: str | None, task_type: str | None, limit: int, full: bool = False, budget: int | None = None,
        q: str | None = None, offset: int = 0,
    ) -> tuple[list[dict[str, Any]], bool]:  # fmt: skip
        raise NotKept(self._not_kept())

    def finished_per_minute(self, since: float) -> dict[tuple[int, str], int]:
        """The broker does not keep what ended: none."""
        return {}

    def attempts(self, task_id: str) -> list[dict[str, Any]]:
        raise NotKept(self._not_kept())

    def record_attempt(self, task_id: str, record: dict[str, Any]) -> None:
        """The broker does not keep tasks: does nothing."""

    def retry(self, task_id: str, max_attempts: int | None = None) -> dict[str, Any] | None:
        raise NotKept(self._not_kept() + "; to run a dead task again, move its message back to its queue")

    def delete(self, task_id: str) -> tuple[bool, str | None]:
        raise NotKept(self._not_kept())

    def counts(self) -> dict[str, int]:
        """Messages ready in the work queues (pending) and in the dead-letter queues (dead), as the
        broker counts them now: the queue depth /metrics shows."""
        return self._on_loop(self._counts())

    # -- claiming -----------------------------------------------------------------------

    async def _accept(self, task_type: str, delivery: Delivery) -> ClaimedTask | None:
        """The message as a task, or None when it was rejected, held back or dead-lettered instead."""
        message = delivery.message
        body, problem = _read_body(message.body, task_type)
        if problem is not None:
            log.warning("queue %s: rejected a message to %s.dead: %s", delivery.queue, delivery.queue, problem)
            await self._dead_letter(delivery, {REJECTED: problem, "x-workerhost-error-type": "BadMessage",
                                               "x-workerhost-error-message": problem}, None)  # fmt: skip
            await self._settle(delivery, "ack")
            return None
        headers = message.headers or {}
        task_id = body.get("id") or message.message_id or str(uuid.uuid4())
        attempt = _positive(headers.get(ATTEMPT)) or 1
        limit = _positive(headers.get(MAX_ATTEMPTS)) or self.max_attempts.get(task_type)
        if message.redelivered:
            # Delivered before without an outcome: its host died, lost the broker, or drained. That
            # counts as an attempt, and it waits before the next, for what a dead host left running.
            attempt += 1
            if limit is not None and attempt > limit:
                error = f"delivered {attempt - 1} times without an outcome (its hosts died or lost the broker)"
                log.warning("task %s: %s; dead-lettered to %s.dead", task_id, error, delivery.queue)
                dead = {"x-workerhost-status": "dead", "x-workerhost-error-type": "Redelivered",
                        "x-workerhost-error-message": error, "x-workerhost-error-retriable": True,
                        ATTEMPT: attempt - 1}  # fmt: skip
                await self._dead_letter(delivery, dead, task_id)
            else:
                log.info("task %s: redelivered; it runs again in %gs (attempt %d)",
                         task_id, self._config.redelivery_delay, attempt)  # fmt: skip
                await self._delay(delivery, f"{delivery.queue}.redelivered", self._config.redelivery_delay,
                                  attempt, task_id)  # fmt: skip
            await self._settle(delivery, "ack")
            return None
        correlation = body.get("correlation_id") or _text(headers.get("correlation_id")) or message.correlation_id
        traceparent = _text(headers.get("traceparent")) or body.get("traceparent")
        return ClaimedTask(
            id=str(task_id), type=task_type, params=body.get("params", {}), attempt=attempt,
            correlation_id=correlation or None, traceparent=traceparent if context.parse(traceparent) else None,
            max_attempts=limit, receipt=delivery,
        )  # fmt: skip

    def _holds(self, task: ClaimedTask) -> Delivery:
        """The task's delivery, while the channel that delivered it is open; else ``LeaseLost``."""
        delivery: Delivery = task.receipt
        if delivery.channel.is_closed or delivery.channel is not self._consume or not self._connected():
            raise LeaseLost(f"task {task.id}: the broker connection that delivered it closed, so RabbitMQ "
                            "redelivers it (an ack can only go on the channel that delivered the message)")  # fmt: skip
        return delivery

    async def _settle(self, delivery: Delivery, how: str) -> None:
        if delivery.settled:
            return  # twice would close the channel (and requeue every other delivery on it)
        async with self._broker(f"{how} of a message from {delivery.queue}"):
            if how == "ack":
                await delivery.message.ack()
            else:
                await delivery.message.nack(requeue=True)
        delivery.settled = True

    # -- publishing ---------------------------------------------------------------------

    async def _delay(self, delivery: Delivery, queue: str, seconds: float, attempt: int, task_id: str) -> None:
        """Republish the message to a delay queue that dead-letters it back to its queue after ``seconds``."""
        arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": delivery.queue}
        await self._declare(queue, arguments)
        message = _copy(delivery.message, {ATTEMPT: attempt}, task_id, expiration=max(seconds, 0.001))
        await self._publish_to("", queue, message, mandatory=True)

    async def _dead_letter(self, delivery: Delivery, headers: dict[str, Any], task_id: str | None) -> None:
        queue = f"{delivery.queue}.dead"
        await self._declare(queue, None)
        await self._publish_to("", queue, _copy(delivery.message, headers, task_id), mandatory=True)

    async def _publish_result(self, delivery: Delivery, task: dict[str, Any]) -> None:
        message = delivery.message
        correlation = message.correlation_id or task.get("correlation_id")
        headers = {"x-workerhost-task-id": task["id"], "x-workerhost-status": task["status"]}
        body = jsondata.dumps(task).encode()

        def result() -> aio_pika.Message:
            return aio_pika.Message(body, headers=headers, content_type="application/json", correlation_id=correlation,
                                    delivery_mode=DeliveryMode.PERSISTENT, message_id=str(uuid.uuid4()))  # fmt: skip

        if message.reply_to:
            # Not mandatory: a caller whose reply queue is gone must not fail the task.
            await self._publish_to("", message.reply_to, result(), mandatory=False)
        if self._config.results_exchange:
            await self._publish_to(self._config.results_exchange, task["type"], result(), mandatory=False)

    async def _publish_to(self, exchange: str, routing_key: str, message: aio_pika.Message, mandatory: bool) -> None:
        await self._ensure()
        async with self._broker(f"publishing to {exchange or 'the default exchange'} ({routing_key})"):
            channel = await self._publish_channel()
            target = channel.default_exchange if not exchange else await channel.get_exchange(exchange, ensure=False)
            await target.publish(message, routing_key, mandatory=mandatory, timeout=PUBLISH_TIMEOUT)

    async def _publish_channel(self) -> AbstractChannel:
        if self._publish is None or self._publish.is_closed:
            assert self._connection is not None
            self._publish = await self._connection.channel(publisher_confirms=True)
        return self._publish

    async def _declare(self, queue: str, arguments: dict[str, Any] | None) -> None:
        """Declare a durable queue once per connection, on a channel of its own (a refusal closes it).

        A queue that exists with other arguments is left as it is when it is a work queue (its
        owner's), and is an error for the delay and dead-letter queues, whose arguments matter.
        """
        if queue in self._declared:
            return
        assert self._connection is not None
        async with self._broker(f"declaring the queue {queue}"):
            channel = await self._connection.channel(publisher_confirms=False)
            try:
                await channel.declare_queue(queue, durable=True, arguments=arguments, timeout=PUBLISH_TIMEOUT)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                if arguments is not None:
                    raise SourceUnavailable(
                        f"RabbitMQ at {self.url}: the queue {queue} exists with other "
                        f"arguments than workerhost needs ({exc}); delete it"
                    ) from None
                log.info("queue %s exists with its own arguments; using it as it is", queue)
            finally:
                if not channel.is_closed:
                    await channel.close()
        self._declared.add(queue)

    async def _counts(self) -> dict[str, int]:
        await self._ensure()
        counts = {"pending": 0, "dead": 0}
        assert self._connection is not None
        for status, names in (("pending", self.queues.values()), ("dead", [f"{q}.dead" for q in self.queues.values()])):
            for name in names:
                async with self._broker(f"counting {name}"):
                    channel = await self._connection.channel(publisher_confirms=False)
                    try:
                        queue = await channel.declare_queue(name, passive=True, timeout=PUBLISH_TIMEOUT)
                        counts[status] += queue.declaration_result.message_count or 0
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        pass  # no dead letters yet
                    finally:
                        if not channel.is_closed:
                            await channel.close()
        return counts

    # -- the connection -------------------------------------------------------------------

    async def _ensure(self) -> AbstractChannel:
        """The channel that takes messages, connecting (again) first when the connection is gone."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self._connected():
                await self._connect()
            elif self._consume is None or self._consume.is_closed:
                assert self._connection is not None
                async with self._broker("opening a channel"):
                    self._consume = await self._connection.channel(publisher_confirms=False)
            assert self._consume is not None
            return self._consume

    def _connected(self) -> bool:
        # aio-pika's is_closed says only whether close() was called; ``connected`` is cleared when the
        # broker goes away.
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close_callbacks.discard(self._lost)
            if not connection.is_closed:
                with contextlib.suppress(*_BROKER_ERRORS):
                    await connection.close()

    def _lost(self, *_: Any) -> None:
        """The broker went away: connect again in the background, with backoff, so that /health and
        claims come back as soon as it does (not at the host's next claim, which backs off to 30s)."""
        if self._closing or (self._reconnector is not None and not self._reconnector.done()):
            return
        self.error = self.error or f"RabbitMQ at {self.url}: the connection closed"
        log.warning("lost the connection to RabbitMQ at %s; reconnecting", self.url)
        self._reconnector = asyncio.get_running_loop().create_task(self._reconnect(), name="amqp-reconnect")

    async def _reconnect(self) -> None:
        tries = 0
        while not self._closing and not self._connected():
            tries += 1
            await asyncio.sleep(backoff(tries, base=0.5, cap=5.0))
            try:
                await self._ensure()
            except SourceUnavailable as exc:
                log.info("RabbitMQ not back yet (try %d): %s", tries, exc)
            except ConfigError as exc:  # refused credentials: the host's claims say so; stop trying here
                log.error("RabbitMQ at %s: %s; not reconnecting in the background", self.url, exc)
                return
            except Exception:  # a bug: said once, and the host's next claim tries again
                log.exception("RabbitMQ at %s: reconnecting failed; the next claim tries again", self.url)
                return

    async def _connect(self) -> None:
        await self._drop()
        self._declared.clear()
        self._consume = self._publish = None
        try:
            self._connection = await aio_pika.connect(self._url, timeout=self._config.connect_timeout)
        except aiormq.exceptions.ProbableAuthenticationError as exc:
            self.error = (f"RabbitMQ at {self.url} refused the user and password of [task_manager] url "
                          f"(or the user may not use its virtual host): {exc}")  # fmt: skip
            raise SourceUnavailable(self.error) from None
        except _BROKER_ERRORS as exc:
            self.error = f"RabbitMQ at {self.url} ([task_manager] url) cannot be reached: {_describe(exc)}"
            raise SourceUnavailable(self.error) from None
        except ValueError as exc:  # a URL that aio-pika cannot use
            raise ConfigError([f"[task_manager] url: not a URL aio-pika can use: {exc}"]) from None
        try:
            async with self._broker("opening channels"):
                self._consume = await self._connection.channel(publisher_confirms=False)
                for queue in self.queues.values():
                    await self._declare(queue, None)
                if self._config.results_exchange:
                    channel = await self._publish_channel()
                    await channel.declare_exchange(
                        self._config.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True
                    )
        except BaseException:
            await self._drop()  # half open is not open: the next call connects again, and declares again
            raise
        self._connection.close_callbacks.add(self._lost)
        log.info("connected to RabbitMQ at %s (%d queues)", self.url, len(self.queues))
        self.error = None

    @contextlib.asynccontextmanager
    async def _broker(self, doing: str) -> AsyncIterator[None]:
        """Translate the driver's errors into ``SourceUnavailable``, naming the URL without its password."""
        try:
            yield
        except (SourceUnavailable, LeaseLost, ConfigError):
            raise
        except _BROKER_ERRORS as exc:
            self.error = f"RabbitMQ at {self.url}: {doing}: {_describe(exc)}"
            raise SourceUnavailable(self.error) from None

    def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the source's loop from another thread (the API's), and wait for it."""
        loop = self._loop
        if loop is None or loop.is_closed():
            work.close()
            raise SourceUnavailable(f"RabbitMQ at {self.url}: the task source has not started")
        future = asyncio.run_coroutine_threadsafe(work, loop)
        try:
            return future.result(timeout=PUBLISH_TIMEOUT + self._config.connect_timeout + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise SourceUnavailable(f"RabbitMQ at {self.url}: no publisher confirm in time") from None

    def _not_kept(self) -> str:
        exchange = f" and to the exchange {self._config.results_exchange!r}" if self._config.results_exchange else ""
        return NOT_KEPT.format(exchange=exchange)

    # -- the task as the API shows it ------------------------------------------------------

    def view(self, task: ClaimedTask, status: str, finished: Finished) -> dict[str, Any]:
        """The task as ``GET /tasks/{id}`` would show it, for its result message."""
        from runner.task import envelope_for  # the correlation id the worker saw, derived as the host does

        message = task.receipt.message
        outcome, now = finished.outcome, time.time()
        created = message.timestamp.timestamp() if isinstance(message.timestamp, datetime) else None
        view: dict[str, Any] = {
            "id": task.id, "type": task.type, "status": status, "attempts": task.attempt,
            "max_attempts": task.max_attempts, "priority": message.priority or 0,
            "correlation_id": envelope_for(task)[0].correlation_id, "trace_id": context.trace_id_of(task.traceparent),
            "created_at": iso_time(created), "updated_at": iso_time(now), "params": task.params,
            "outcome": str(outcome.status), "worker": finished.worker, "image_id": finished.image_id,
            "stderr_tail": finished.stderr_tail, "duration": finished.duration, "finished_at": iso_time(now),
        }  # fmt: skip
        if outcome.status is Status.COMPLETED:
            view["result"] = outcome.result
        elif outcome.error is not None:
            view["error"] = {"type": outcome.error.type, "message": outcome.error.message,
                             "retriable": outcome.retriable}  # fmt: skip
        return {k: v for k, v in view.items() if v is not None}


def _read_body(data: bytes, task_type: str) -> tuple[dict[str, Any], str | None]:
    """The body as the contract says it, or what is wrong with it."""
    if len(data) > MAX_BODY:
        return {}, f"the body is {len(data)} bytes, more than {MAX_BODY}"
    body, problem = jsondata.loads(data, "the body")
    if problem is not None:
        return {}, jsondata.clean_text(problem, 500)
    if not isinstance(body, dict):
        return {}, f"the body is a JSON {type(body).__name__}, not an object"
    unknown = sorted(set(body) - _BODY_KEYS)
    if unknown:
        return {}, f"unknown keys {', '.join(map(repr, unknown))}; a task is {{id?, type, params, correlation_id?}}"
    if body.get("type") != task_type:
        return {}, f"type {body.get('type')!r} on the queue of {task_type!r}"
    if not isinstance(body.get("params"), dict):
        return {}, "params: missing, or not a JSON object"
    for key in ("id", "correlation_id", "traceparent"):
        value = body.get(key)
        if value is not None and not (isinstance(value, str) and 0 < len(value) <= 256 and value.isprintable()):
            return {}, f"{key}: not a string of 1-256 printable characters"
    return body, None


def _copy(message: AbstractIncomingMessage, headers: dict[str, Any], task_id: str | None,
          expiration: float | None = None) -> aio_pika.Message:  # fmt: skip
    """The message again, body and properties as they came, with ``headers`` added."""
    return aio_pika.Message(
        message.body, headers={**(message.headers or {}), **headers}, content_type=message.content_type,
        delivery_mode=DeliveryMode.PERSISTENT, priority=message.priority, correlation_id=message.correlation_id,
        reply_to=message.reply_to, message_id=task_id or message.message_id, timestamp=message.timestamp,
        expiration=expiration, type=message.type, app_id=message.app_id,
    )  # fmt: skip


def _positive(value: Any) -> int | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
