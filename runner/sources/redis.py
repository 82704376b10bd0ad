"""Redis as a task source shared by many hosts (``[task_manager] type = "redis"``).

The embedded queue's semantics over Redis 6.2 or later, so that every host's API
(submit, list, get, retry, delete, idempotency keys, dead letters, queue depth)
answers from the same state:

- one stream per task type with one consumer group (``workerhost``); each process is
  a consumer named by its owner token. A claim takes as many entries as the host has
  room for (``claim_many``): in one script, due retries back to their streams, then
  leases past their time (``XPENDING IDLE`` = the lease, taken over with ``XCLAIM``),
  then new entries; when there is none, ``XREADGROUP ... BLOCK`` waits up to ``block``
  seconds for one (no busy polling, and the host's loop stays responsive to a stop or
  a freed slot).
- the lease is the entry's idle time in the group's pending list, on Redis's own
  clock (no clock skew between hosts): ``renew`` is ``XCLAIM`` of the entry to the
  same consumer (``JUSTID``), which resets it. Another host takes an entry over
  once it has been idle for a whole lease; its attempt counts, and a lease that
  expires on the last attempt is a dead letter, as in the embedded queue.
- a batch submit (``submit_many``) is one script: every task is stored, or none.
- a record per task (a hash) with what the embedded queue keeps; reports store the
  outcome and ``XACK`` the entry in one script (runner/sources/redis_scripts.py),
  so an entry is acknowledged only once its outcome is stored. Retries wait in a
  sorted set by due time and go back to the stream from the claim script.
- finished tasks are deleted by ``prune`` (the janitor's) after the retention,
  with their index entries; their records also expire an hour later, in case no
  host prunes.

Priority is kept and shown, but a stream is first in, first out: Redis does not
order by it (README). The driver's errors are translated here: a connection that
fails is ``SourceUnavailable`` naming the URL without its password; refused
credentials say to check ``[task_manager] url``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from runner import jsondata
from runner.errors import ConfigError
from runner.sources import (
    Capabilities,
    ClaimedTask,
    Finished,
    HeldTask,
    KeyConflict,
    LeaseLost,
    NewTask,
    Owner,
    Slots,
    SourceUnavailable,
    TaskSource,
    iso_time,
)
from runner.sources import redis_scripts as lua
from runner.telemetry import context

log = logging.getLogger(__name__)

STATUSES = lua.STATUSES
# What a summary reads: everything but the params, the result and the stderr tail.
_SUMMARY = (
    "id", "type", "status", "attempts", "max_attempts", "priority", "correlation_id", "traceparent", "created_at",
    "updated_at", "idempotency_key", "outcome", "worker", "image_id", "duration", "started_at", "finished_at",
    "run_at", "error_type", "error_message", "retriable",
)  # fmt: skip
_BIG = ("params", "result", "stderr_tail")
_FORGET_AFTER = 86400.0  # registry entries of processes silent this long are dropped


def shown_url(url: str) -> str:
    """The URL as logs and errors may show it: without its password (in the user part, or the query)."""
    try:
        parts = urlsplit(url)
        if parts.query:  # redis-py also reads ?password=...: no query is shown at all
            parts = parts._replace(query="...")
        if parts.password is None:
            return urlunsplit(parts)
        user = parts.username or ""
        netloc = f"{user}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(an unreadable URL)"


class RedisQueue(TaskSource):
    """The Redis task source, plus what the HTTP API needs (``TaskStore``).

    The port's methods use redis-py's asyncio client; the API's (synchronous, run in a
    thread) use its sync client. ``block`` is how long one claim waits for a new entry.
    """

    keeps_tasks = True

    def __init__(
        self,
        url: str,
        owner: str,
        prefix: str = "workerhost",
        lease: float = 30.0,
        retention: float = 7 * 86400.0,
        block: float = 1.0,
    ) -> None:
        self.url = shown_url(url)
        self.owner = owner
        self.prefix = prefix
        self.lease = lease
        self.retention = retention
        self.block = block
        self.capabilities = Capabilities(renew_every=lease / 3, registry=True, knows_final_attempt=True)
        self.heartbeat_every = lease / 3
        options: dict[str, Any] = {
            "decode_responses": True,
            "encoding_errors": "replace",
            "socket_connect_timeout": 5,
            "socket_timeout": block + 10,  # above the blocking read's own wait
            "health_check_interval": 15,
        }
        try:
            # The host's client never has the driver send a command again: a claim whose reply was lost
            # would take a second task and leave the first held. The host's backoff tries again instead.
            self._aio = redis.asyncio.Redis.from_url(url, retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **options)
            # The API's client tries once more (a connection a restarted Redis closed): its calls are
            # reads, or a submit that knows its own id again, or changes that say what they found.
            self._sync = redis.Redis.from_url(url, retry=redis.retry.Retry(NoBackoff(), 1), **options)
        except ValueError as exc:
            raise ConfigError([f"[task_manager] url: not a Redis URL ({exc}): {self.url}"]) from None
        self._scripts = {name: self._aio.register_script(getattr(lua, name)) for name in _ASYNC_SCRIPTS}
        self._sync_scripts = {name: self._sync.register_script(getattr(lua, name)) for name in _SYNC_SCRIPTS}
        self._groups: set[str] = set()  # task types whose stream and group exist (as far as we know)
        self._turn = 0

    # -- keys -----------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _head(self, now: float | None = None) -> list[str]:
        """The arguments every script begins with."""
        return [self.prefix, repr(time.time() if now is None else now), str(int(self.retention * 1000))]

    # -- the port -----------------------------------------------------------------------

    async def start(self) -> None:
        async with self._boundary():
            await self._aio.ping()

    async def claim(self, task_types: Collection[str]) -> ClaimedTask | None:
        claimed = await self.claim_many([Slots(tuple(task_types), 1)], 1)
        return claimed[0] if claimed else None

    async def claim_many(self, slots: Sequence[Slots], limit: int) -> list[ClaimedTask]:
        open_slots = [room for room in slots if room.free > 0 and room.task_types]
        if limit < 1 or not open_slots:
            return []
        turn, self._turn = self._turn, self._turn + 1
        # Each worker, and each type of a worker, goes first in turn: none starves the others.
        groups: tuple[Slots, ...] = _rotated([Slots(_rotated(s.task_types, turn), s.free) for s in open_slots], turn)
        types = [t for room in groups for t in room.task_types]
        args = [*self._head(), self.owner, str(int(self.lease * 1000)), str(limit)]
        for room in groups:
            args += [str(room.free), str(len(room.task_types)), *room.task_types]
        async with self._boundary():
            await self._ensure_groups(types)
            got = await self._scripts["CLAIM_MANY"](args=args)
            if not got:
                one = await self._wait(types)
                got = [one] if one else []
            claimed = [await self._claimed(item) for item in got]
        return [task for task in claimed if task is not None]

    async def _ensure_groups(self, types: Sequence[str]) -> None:
        for task_type in types:
            if task_type in self._groups:
                continue
            try:
                await self._aio.xgroup_create(self._key("stream", task_type), lua.GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups.add(task_type)

    async def _wait(self, types: Sequence[str]) -> Any:
        """Block until a new entry comes (or ``block`` passes); take the first, hand back any other."""
        streams: dict[Any, Any] = {self._key("stream", t): ">" for t in types}
        try:
            block = int(self.block * 1000)
            reply: Any = await self._aio.xreadgroup(lua.GROUP, self.owner, streams, count=1, block=block)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # a stream or group went (a Redis without persistence restarted)
                self._groups.clear()
                return None
            raise
        delivered = [
            (stream.removeprefix(self._key("stream", "")), entry, fields.get("id", ""))
            for stream, entries in reply or []
            for entry, fields in entries
        ]
        if not delivered:
            return None
        # Several streams may each have had an entry when the read began: one is taken, the rest
        # go back to the end of their streams (never more claimed than asked for).
        for task_type, entry, task_id in delivered[1:]:
            await self._scripts["HAND_BACK"](args=[*self._head(), task_type, entry, task_id])
        task_type, entry, task_id = delivered[0]
        return await self._scripts["TAKE"](args=[*self._head(), self.owner, task_type, entry, task_id])

    async def _claimed(self, got: list[Any]) -> ClaimedTask | None:
        record = _pairs(got[2])
        params, problem = jsondata.loads(record.get("params", ""), "params")
        attempt = int(record["attempts"])
        task = ClaimedTask(
            id=record["id"],
            type=record["type"],
            params=params if isinstance(params, dict) else {},
            attempt=attempt,
            correlation_id=record.get("correlation_id"),
            traceparent=record.get("traceparent"),
            max_attempts=int(record["max_attempts"]),
            receipt=attempt,
        )
        if problem is None and isinstance(params, dict):
            return task
        # A record no worker could be given: failed for good, here, rather than claimed and broken again.
        fields: dict[str, str | None] = {"outcome": "failed", "retriable": "0", "error_type": "InvalidParams",
                  "error_message": f"the stored params cannot be read: {problem or 'not an object'}"}  # fmt: skip
        args = [*self._head(), self.owner, task.id, str(attempt), "failed", "", *_flat(fields)]
        settled = await self._scripts["SETTLE"](args=args)
        log.warning("task %s of type %s: %s; failed for good%s", task.id, task.type, fields["error_message"],
                    "" if settled else " (but it was no longer ours to fail)")  # fmt: skip
        return None

    async def renew(self, task: ClaimedTask) -> None:
        async with self._boundary():
            held = await self._scripts["RENEW"](args=[*self._head(), self.owner, task.id, str(task.receipt)])
        if not held:
            raise LeaseLost(f"task {task.id}: the lease was lost (it expired and the task moved on)")

    async def complete(self, task: ClaimedTask, finished: Finished) -> None:
        await self._settle(task, finished, None)

    async def fail(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        await self._settle(task, finished, retry_in)

    async def _settle(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        outcome, now = finished.outcome, time.time()
        due = ""
        if outcome.ok:
            status = "completed"
        elif retry_in is not None:
            status, due = "pending", repr(now + retry_in)
        else:
            status = "dead" if outcome.retriable else "failed"
        error = outcome.error
        fields = {
            "outcome": str(outcome.status),
            "retriable": "1" if outcome.retriable else "0",
            "result": jsondata.dumps(outcome.result) if outcome.ok else None,
            "error_type": error.type if error else None,
            "error_message": error.message if error else None,
            "worker": finished.worker,
            "image_id": finished.image_id,
            "stderr_tail": finished.stderr_tail,
            "duration": repr(finished.duration),
        }
        args = [*self._head(now), self.owner, task.id, str(task.receipt), status, due, *_flat(fields)]
        async with self._boundary():
            stored = await self._scripts["SETTLE"](args=args)
        if not stored:
            raise LeaseLost(f"task {task.id}: not reported, its lease was lost (it expired and the task moved on)")

    async def release(self, task: ClaimedTask) -> None:
        async with self._boundary():
            await self._scripts["RELEASE"](args=[*self._head(), self.owner, task.id])

    async def recover(self, held: HeldTask) -> None:
        async with self._boundary():
            await self._scripts["RECOVER"](args=[*self._head(), held.owner, held.task_id, str(held.attempt)])

    async def heartbeat(self, owner: str, host_id: str) -> None:
        """The registry: ``alive:{owner}`` expires a lease after the last beat, on Redis's clock."""
        async with self._boundary(), self._aio.pipeline(transaction=False) as pipe:
            pipe.set(self._key("alive", owner), host_id, px=int(self.lease * 1000))
            pipe.hset(self._key("owners"), owner, f"{host_id}|{time.time()!r}")
            await pipe.execute()

    async def forget(self, owner: str) -> None:
        async with self._boundary(), self._aio.pipeline(transaction=False) as pipe:
            pipe.delete(self._key("alive", owner))
            pipe.hdel(self._key("owners"), owner)
            await pipe.execute()

    async def owners(self) -> list[Owner]:
        async with self._boundary():
            seen: Any = await self._aio.hgetall(self._key("owners"))
            tokens = list(seen)
            async with self._aio.pipeline(transaction=False) as pipe:
                for token in tokens:
                    pipe.exists(self._key("alive", token))
                alive = await pipe.execute()
            found, stale = [], []
            for token, is_alive in zip(tokens, alive, strict=True):
                host_id, _, last = seen[token].rpartition("|")
                if not is_alive and _float(last) < time.time() - _FORGET_AFTER:
                    stale.append(token)
                    continue
                found.append(Owner(token, host_id, expired=not is_alive))
            if stale:
                await self._aio.hdel(self._key("owners"), *stale)
        return found

    async def held(self) -> list[HeldTask]:
        async with self._boundary():
            ids: Any = await self._aio.zrange(self._key("status", "running"), 0, -1)
            async with self._aio.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    pipe.hmget(self._key("task", task_id), ["owner", "attempts", "status"])
                rows = await pipe.execute()
        return [
            HeldTask(task_id, owner, int(attempts))
            for task_id, (owner, attempts, status) in zip(ids, rows, strict=True)
            if owner and status == "running"
        ]

    async def prune(self) -> int:
        cutoff = repr(time.time() - self.retention)
        total = 0
        async with self._boundary():
            while True:
                count = int(await self._scripts["PRUNE"](args=[*self._head(), cutoff]))
                total += count
                if count < 500:
                    return total

    async def health(self) -> dict[str, Any]:
        async with self._boundary():
            await self._aio.ping()
            async with self._aio.pipeline(transaction=False) as pipe:
                for status in STATUSES:
                    pipe.zcard(self._key("status", status))
                counts = dict(zip(STATUSES, await pipe.execute(), strict=True))
        return {"type": "redis", "url": self.url, "prefix": self.prefix, "reachable": True, "tasks": counts}

    async def close(self) -> None:
        try:
            await self._aio.aclose()
            self._sync.close()
        except RedisError as exc:  # closing a connection that is already gone: nothing is lost
            log.info("redis %s: closing the connection: %s", self.url, exc)

    # -- what the API needs (synchronous) ------------------------------------------------

    def submit(
        self,
        task_type: str,
        params: dict[str, Any],
        max_attempts: int,
        priority: int = 0,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        traceparent: str | None = None,
        task_id: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Add a task; returns it and whether it is new (an idempotency key may return an old one)."""
        problem = jsondata.problem(params, "params")
        if problem is not None:
            raise ValueError(problem)
        task_id = task_id or str(uuid.uuid4())
        args = [
            *self._head(), task_id, task_type, jsondata.dumps(params), str(priority), str(max_attempts),
            idempotency_key or "", correlation_id or uuid.uuid4().hex, traceparent or "",
        ]  # fmt: skip
        with self._sync_boundary():
            reply = self._sync_scripts["SUBMIT"](args=args)
        if int(reply[0]) < 0:
            raise ValueError(f"a task with id {task_id} exists already")
        return _public(_pairs(reply[2])), int(reply[0]) == 1

    def submit_many(self, tasks: Sequence[NewTask]) -> list[tuple[dict[str, Any], bool]]:
        """Add every task in one script, or none (``KeyConflict``: keys that name other content)."""
        args = [*self._head(), str(len(tasks))]
        for n, task in enumerate(tasks):
            if (problem := jsondata.problem(task.params, f"[{n}].params")) is not None:
                raise ValueError(problem)
            args += [
                task.task_id or str(uuid.uuid4()), task.type, jsondata.dumps(task.params), str(task.priority),
                str(task.max_attempts), task.idempotency_key or "", task.correlation_id or uuid.uuid4().hex,
                task.traceparent or "",
            ]  # fmt: skip
        with self._sync_boundary():
            reply = self._sync_scripts["SUBMIT_MANY"](args=args)
        if int(reply[0]) == 0:
            raise KeyConflict([(int(index), str(names)) for index, names in reply[1:]])
        return [(_public(_pairs(record)), int(flag) == 1) for flag, _, record in reply[1:]]

    def statuses(self, task_ids: Sequence[str]) -> dict[str, str]:
        """The status of each of these tasks that exists (one round trip)."""
        with self._sync_boundary(), self._sync.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hget(self._key("task", task_id), "status")
            found = pipe.execute()
        return {task_id: status for task_id, status in zip(task_ids, found, strict=True) if status}

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self._sync_boundary():
            record: dict[str, str] = self._sync.hgetall(self._key("task", task_id))  # type: ignore[assignment]
        return _public(record) if record else None

    def page(
        self, status: str | None, task_type: str | None, limit: int, full: bool = False, budget: int | None = None,
        q: str | None = None, offset: int = 0,
    ) -> tuple[list[dict[str, Any]], bool]:  # fmt: skip
        """Tasks, newest first, past the first ``offset``, and whether some were cut to summaries (as
        the embedded queue's ``page``). ``q`` finds a task by its id only: Redis keeps no index of
        correlation ids.

        Walks one index (the status's, the type's, or all tasks') newest first; a status and a
        type together walk the status's and skip other types.
        """
        if q:
            found = self.get(q)
            other = found is None or found["status"] != (status or found["status"])
            if other or found is None or found["type"] != (task_type or found["type"]) or offset > 0:
                return [], False
            return [found if full else {k: v for k, v in found.items() if k not in _BIG}], False
        if status:
            index = self._key("status", status)
        elif task_type:
            index = self._key("type", task_type)
        else:
            index = self._key("all")
        other_types = task_type if status and task_type else None
        tasks: list[dict[str, Any]] = []
        gone: list[str] = []
        cut = False
        start = skipped = 0
        chunk = max(limit, 50)
        # With a status and a type, the status's index is walked for the type: bounded, so that one
        # request cannot walk millions of finished tasks (what it found so far is the page).
        scan_limit = max(10 * limit, 1000) if other_types is not None else None
        with self._sync_boundary():
            while len(tasks) < limit and (scan_limit is None or start < scan_limit):
                ids: list[str] = self._sync.zrevrange(index, start, start + chunk - 1)  # type: ignore[assignment]
                if not ids:
                    break
                start += len(ids)
                for task_id, summary, size in self._summaries(ids):
                    if summary is None:
                        gone.append(task_id)
                        continue
                    if other_types is not None and summary.get("type") != other_types:
                        continue
                    if skipped < offset:
                        skipped += 1
                        continue
                    task = summary
                    if full:
                        fits = budget is None or size <= budget
                        if fits and budget is not None:
                            budget -= size
                        whole: dict[str, str] = self._sync.hgetall(self._key("task", task_id)) if fits else {}  # type: ignore[assignment]
                        if whole:
                            task = whole
                        elif not fits:
                            cut = True
                    shown = _public(task)
                    if full and task is summary:
                        shown["omitted"] = "params, result and stderr tail: over what one list carries; GET the task"
                    tasks.append(shown)
                    if len(tasks) >= limit:
                        break
            if gone:  # expired records (no janitor pruned them in time): out of the index too
                self._sync.zrem(index, *gone)
        return tasks, cut

    def _summaries(self, ids: list[str]) -> Iterator[tuple[str, dict[str, str] | None, int]]:
        """Each task's summary (None when its record is gone) and the size of its big fields."""
        with self._sync.pipeline(transaction=False) as pipe:
            for task_id in ids:
                key = self._key("task", task_id)
                pipe.hmget(key, list(_SUMMARY))
                for name in _BIG:
                    pipe.hstrlen(key, name)
            replies = pipe.execute()
        step = 1 + len(_BIG)
        for n, task_id in enumerate(ids):
            values = replies[n * step]
            summary = {k: v for k, v in zip(_SUMMARY, values, strict=True) if v is not None}
            size = sum(int(s) for s in replies[n * step + 1 : (n + 1) * step])
            yield task_id, (summary if "status" in summary else None), size

    def finished_per_minute(self, since: float) -> dict[tuple[int, str], int]:
        """Not kept for Redis (its indexes are by creation, not by end): none."""
        return {}

    def attempts(self, task_id: str) -> list[dict[str, Any]]:
        """Not kept for Redis: none (the task's own fields say its last attempt; its trace says all)."""
        return []

    def record_attempt(self, task_id: str, record: dict[str, Any]) -> None:
        """Not kept for Redis: does nothing."""

    def list(self, status: str | None = None, task_type: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Tasks, newest first, whole: for a few; the API pages with ``page``."""
        return self.page(status, task_type, limit, full=True)[0]

    def delete(self, task_id: str) -> tuple[bool, str | None]:
        """Delete a task that is not running: (deleted, its status; None when there is no such task)."""
        with self._sync_boundary():
            reply = self._sync_scripts["DELETE"](args=[*self._head(), task_id])
        return bool(int(reply[0])), (reply[1] if len(reply) > 1 else None)

    def retry(self, task_id: str, max_attempts: int | None = None) -> dict[str, Any] | None:
        """Send a failed or dead task back to pending, as new; None if it is neither failed nor dead."""
        with self._sync_boundary():
            record = self._sync_scripts["RETRY"](args=[*self._head(), task_id, str(max_attempts or "")])
        return _public(_pairs(record)) if isinstance(record, list) else None

    def counts(self) -> dict[str, int]:
        """Tasks by status (every status, zeros included)."""
        with self._sync_boundary(), self._sync.pipeline(transaction=False) as pipe:
            for status in STATUSES:
                pipe.zcard(self._key("status", status))
            return dict(zip(STATUSES, (int(n) for n in pipe.execute()), strict=True))

    # -- errors ---------------------------------------------------------------------

    def _unavailable(self, exc: RedisError) -> SourceUnavailable:
        text = str(exc)
        if isinstance(exc, AuthenticationError) or text.startswith(("WRONGPASS", "NOAUTH", "NOPERM")):
            return SourceUnavailable(
                f"Redis at {self.url} refused the credentials: {text} (check the user and password in "
                "[task_manager] url)"
            )
        return SourceUnavailable(f"Redis at {self.url} ([task_manager] url): {type(exc).__name__}: {text}")

    @asynccontextmanager
    async def _boundary(self) -> AsyncIterator[None]:
        try:
            yield
        except RedisError as exc:
            raise self._unavailable(exc) from None
        except OSError as exc:  # a socket error the driver did not wrap
            raise SourceUnavailable(f"Redis at {self.url} ([task_manager] url): {exc}") from None

    @contextmanager
    def _sync_boundary(self) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            raise self._unavailable(exc) from None
        except OSError as exc:
            raise SourceUnavailable(f"Redis at {self.url} ([task_manager] url): {exc}") from None


_ASYNC_SCRIPTS = ("CLAIM_MANY", "TAKE", "HAND_BACK", "RENEW", "SETTLE", "RELEASE", "RECOVER", "PRUNE")
_SYNC_SCRIPTS = ("SUBMIT", "SUBMIT_MANY", "RETRY", "DELETE")


def _rotated(items: Sequence[Any], turn: int) -> tuple[Any, ...]:
    first = turn % len(items)
    return (*items[first:], *items[:first])


def _flat(fields: dict[str, str | None]) -> list[str]:
    return [item for name, value in fields.items() if value is not None for item in (name, value)]


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _float(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


def _public(record: dict[str, str]) -> dict[str, Any]:
    """A task as the API shows it (a summary when the record has no params), as the embedded queue's.

    Reading never fails: a stored value that does not read back as JSON is shown as null, and
    ``unreadable`` says why.
    """
    task: dict[str, Any] = {
        "id": record.get("id"),
        "type": record.get("type"),
        "status": record.get("status"),
        "attempts": int(record.get("attempts") or 0),
        "max_attempts": int(record.get("max_attempts") or 0),
        "priority": int(record.get("priority") or 0),
        "correlation_id": record.get("correlation_id"),
        "trace_id": context.trace_of_task(str(record.get("id") or ""), record.get("traceparent")),
        "created_at": _iso(record.get("created_at")),
        "updated_at": _iso(record.get("updated_at") or record.get("created_at")),
    }
    optional = {
        "idempotency_key": record.get("idempotency_key"),
        "outcome": record.get("outcome"),
        "worker": record.get("worker"),
        "image_id": record.get("image_id"),
        "stderr_tail": record.get("stderr_tail"),
        "duration": _float(record["duration"]) if "duration" in record else None,
        "started_at": _iso(record.get("started_at")),
        "finished_at": _iso(record.get("finished_at")),
    }
    task.update({k: jsondata.clean_text(v) if isinstance(v, str) else v for k, v in optional.items() if v is not None})
    if record.get("status") == "pending" and _float(record.get("run_at")) > time.time():
        task["run_at"] = _iso(record.get("run_at"))
    unreadable: dict[str, str] = {}
    for field in ("params", "result"):
        if field in record:
            task[field], problem = jsondata.loads(record[field], field)
            if problem is not None:
                unreadable[field] = problem
    if unreadable:
        task["unreadable"] = unreadable
    if "error_type" in record:
        task["error"] = {
            "type": record["error_type"], "message": record.get("error_message", ""),
            "retriable": record.get("retriable") == "1",
        }  # fmt: skip
    return task


def _iso(moment: str | None) -> str | None:
    """A stored moment (text, as Redis keeps it) as the API shows times."""
    return iso_time(_float(moment)) if moment else None
