"""The embedded queue's registry of processes and its hand-backs: what the host's janitor relies on."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.protocol import ErrorInfo, Outcome, Status
from runner.sources import Finished, HeldTask, Owner, SourceUnavailable
from runner.sources.embedded import EmbeddedQueue

A, B = "host-a:1:aaaa", "host-b:2:bbbb"


@pytest.fixture
def queues(tmp_path: Path) -> Iterator[tuple[EmbeddedQueue, EmbeddedQueue]]:
    """Two processes on one database: A with a short lease, B with a long one."""
    a = EmbeddedQueue(tmp_path / "q.db", owner=A, lease=0.3)
    b = EmbeddedQueue(tmp_path / "q.db", owner=B, lease=30)
    yield a, b
    for queue in (a, b):
        asyncio.run(queue.close())


def test_the_capabilities_follow_the_lease(queues: tuple[EmbeddedQueue, EmbeddedQueue]) -> None:
    a, b = queues
    assert a.capabilities.renew_every == pytest.approx(0.1)
    assert b.capabilities.renew_every == pytest.approx(10)
    assert b.heartbeat_every == pytest.approx(10)
    assert b.capabilities.registry and b.capabilities.knows_final_attempt and not b.capabilities.owns_retries


def test_a_heartbeat_promises_the_next_within_the_writers_own_lease(
    queues: tuple[EmbeddedQueue, EmbeddedQueue],
) -> None:
    a, b = queues
    asyncio.run(a.heartbeat(A, "host-1"))
    asyncio.run(b.heartbeat(B, "host-1"))
    assert sorted(asyncio.run(b.owners()), key=lambda o: o.token) == [
        Owner(A, "host-1", expired=False),
        Owner(B, "host-1", expired=False),
    ]
    deadline = time.monotonic() + 5
    while not next(o for o in asyncio.run(b.owners()) if o.token == A).expired:  # A's lease is 0.3 s
        assert time.monotonic() < deadline, "A's heartbeat never expired"
        time.sleep(0.05)
    assert not next(o for o in asyncio.run(b.owners()) if o.token == B).expired  # B's lease is 30 s
    asyncio.run(a.heartbeat(A, "host-1"))
    assert not next(o for o in asyncio.run(b.owners()) if o.token == A).expired
    asyncio.run(a.forget(A))
    assert [o.token for o in asyncio.run(b.owners())] == [B]


def test_held_lists_running_tasks_with_their_holder_and_attempt(queues: tuple[EmbeddedQueue, EmbeddedQueue]) -> None:
    a, b = queues
    first, _ = b.submit("T", {}, max_attempts=3)
    b.submit("T", {}, max_attempts=3)  # pending: not held
    claimed = a.claim_now(["T"])
    assert claimed is not None and claimed.id == first["id"]
    assert asyncio.run(b.held()) == [HeldTask(first["id"], A, 1)]


def test_recover_hands_back_only_the_attempt_it_names(queues: tuple[EmbeddedQueue, EmbeddedQueue]) -> None:
    a, b = queues
    task, _ = b.submit("T", {}, max_attempts=3)
    claimed = a.claim_now(["T"])
    assert claimed is not None
    asyncio.run(b.recover(HeldTask(task["id"], A, 2)))  # a stale view: not the attempt A holds now
    assert b.get(task["id"])["status"] == "running"  # type: ignore[index]
    asyncio.run(b.recover(HeldTask(task["id"], B, 1)))  # not its holder
    assert b.get(task["id"])["status"] == "running"  # type: ignore[index]
    asyncio.run(b.recover(HeldTask(task["id"], A, 1)))
    back = b.get(task["id"])
    assert back is not None and (back["status"], back["attempts"]) == ("pending", 1)  # the attempt counts
    again = b.claim_now(["T"])
    assert again is not None and again.attempt == 2


def test_recover_on_the_last_attempt_is_a_dead_letter(queues: tuple[EmbeddedQueue, EmbeddedQueue]) -> None:
    a, b = queues
    task, _ = b.submit("T", {}, max_attempts=1)
    assert a.claim_now(["T"]) is not None
    asyncio.run(b.recover(HeldTask(task["id"], A, 1)))
    dead = b.get(task["id"])
    assert dead is not None and dead["status"] == "dead"
    assert dead["error"]["type"] == "HostDied"


def test_a_claim_carries_the_tasks_own_max_attempts(queues: tuple[EmbeddedQueue, EmbeddedQueue]) -> None:
    _, b = queues
    b.submit("T", {}, max_attempts=7)
    claimed = b.claim_now(["T"])
    assert claimed is not None and claimed.max_attempts == 7


def test_retry_takes_max_attempts_from_the_config_as_it_is_now(queues: tuple[EmbeddedQueue, EmbeddedQueue]) -> None:
    _, b = queues
    task, _ = b.submit("T", {}, max_attempts=2)
    claimed = b.claim_now(["T"])
    assert claimed is not None
    failed = Outcome(Status.FAILED, retriable=True, error=ErrorInfo("Busy", "x"), exit_code=1)
    asyncio.run(b.fail(claimed, Finished(failed, "w"), retry_in=None))
    retried = b.retry(task["id"], max_attempts=5)
    assert retried is not None and (retried["status"], retried["max_attempts"]) == ("pending", 5)
    assert b.retry(task["id"]) is None  # pending now: nothing to retry


class _FailingCommit:
    """The queue's connection, with its next COMMIT failing as a busy database's can."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.failures = 1

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def test_a_commit_that_fails_leaves_no_transaction_open(queues: tuple[EmbeddedQueue, EmbeddedQueue]) -> None:
    _, b = queues
    real = b._db
    b._db = _FailingCommit(real)  # type: ignore[assignment]
    with pytest.raises(SourceUnavailable, match="database is locked") as refused:
        b.submit("T", {"n": 1}, max_attempts=1)
    assert str(b.path) in str(refused.value)
    assert not real.in_transaction
    _, created = b.submit("T", {"n": 2}, max_attempts=1)  # the next write works
    assert created and b.counts()["pending"] == 1  # the failed one was rolled back
    b._db = real
