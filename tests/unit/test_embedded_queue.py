"""runner.sources.embedded: the SQLite queue, its leases, retries, dead letters, and several processes on one file."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from runner.protocol import ErrorInfo, Outcome, Status
from runner.sources import ClaimedTask, Finished, HeldTask, KeyConflict, LeaseLost, NewTask, Slots, SourceUnavailable
from runner.sources import embedded as embedded_module
from runner.sources.embedded import STATUSES, EmbeddedQueue

T = TypeVar("T")

OWNER = "host:1:aaaa"
OTHER = "host:2:bbbb"
ECHO, STATS = "T.Echo", "T.Stats"

COMPLETED = Outcome(Status.COMPLETED, result={"echo": "hi", "n": [1, 2]}, exit_code=0)
RETRIABLE = Outcome(Status.FAILED, retriable=True, error=ErrorInfo("Busy", "try again later"), exit_code=1)
PERMANENT = Outcome(Status.FAILED, retriable=False, error=ErrorInfo("ValueError", "bad text"), exit_code=2)
TIMEOUT = Outcome(Status.TIMEOUT, error=ErrorInfo("Timeout", "killed at the deadline after 1s"), exit_code=None)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def finished(outcome: Outcome) -> Finished:
    return Finished(outcome, worker="echo", image_id="sha256:feed", stderr_tail="last words\n", duration=0.25)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "q.db"


@pytest.fixture
def queue(path: Path) -> Iterator[EmbeddedQueue]:
    opened = EmbeddedQueue(path=path, owner=OWNER)
    yield opened
    run(opened.close())


def submit(queue: EmbeddedQueue, task_type: str = ECHO, max_attempts: int = 3, **kwargs: Any) -> str:
    task, created = queue.submit(task_type, {"text": "hi"}, max_attempts=max_attempts, **kwargs)
    assert created
    return str(task["id"])


def claim(queue: EmbeddedQueue, *task_types: str) -> ClaimedTask:
    task = queue.claim_now(list(task_types or (ECHO,)))
    assert task is not None, "expected a task to claim"
    return task


def status(queue: EmbeddedQueue, task_id: str) -> dict[str, Any]:
    task = queue.get(task_id)
    assert task is not None
    return task


class Clock:
    """The queue's wall clock, moved by hand: a lease or a retry's wait ends when a test says so,
    however slow the machine (a margin of a tenth of a second is not one on a shared machine)."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)  # the rest of the time module, as it is


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Every EmbeddedQueue in this process reads the time from this clock."""
    fake = Clock()
    monkeypatch.setattr(embedded_module, "time", fake)
    return fake


# -- the file -------------------------------------------------------------------------


def test_the_file_and_its_folder_are_created_on_first_use(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "q.db"
    queue = EmbeddedQueue(path=path, owner=OWNER)
    try:
        assert path.is_file()
        assert queue.counts() == dict.fromkeys(STATUSES, 0)
    finally:
        run(queue.close())


def test_the_file_is_in_wal_mode(queue: EmbeddedQueue, path: Path) -> None:
    submit(queue)
    with sqlite3.connect(path) as other:
        (mode,) = other.execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


# -- submit and claim -------------------------------------------------------------------


def test_submit_makes_a_pending_task_with_no_attempt(queue: EmbeddedQueue) -> None:
    task, created = queue.submit(ECHO, {"text": "hi"}, max_attempts=3, priority=2, correlation_id="corr-1")
    assert created
    assert task["type"] == ECHO
    assert task["status"] == "pending"
    assert task["attempts"] == 0
    assert task["max_attempts"] == 3
    assert task["priority"] == 2
    assert task["params"] == {"text": "hi"}
    assert task["correlation_id"] == "corr-1"
    assert "run_at" not in task  # due now
    assert "error" not in task and "result" not in task
    assert queue.get(task["id"]) == task


def test_submit_without_a_correlation_id_gets_a_new_one(queue: EmbeddedQueue) -> None:
    first, _ = queue.submit(ECHO, {}, max_attempts=1)
    second, _ = queue.submit(ECHO, {}, max_attempts=1)
    assert first["correlation_id"]
    assert first["correlation_id"] != second["correlation_id"]


def test_claim_runs_the_task_and_keeps_its_ids(queue: EmbeddedQueue) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    task_id = submit(queue, correlation_id="corr-1", traceparent=traceparent)
    task = claim(queue)
    assert task.id == task_id
    assert task.type == ECHO
    assert task.params == {"text": "hi"}
    assert task.attempt == 1
    assert task.correlation_id == "corr-1"
    assert task.traceparent == traceparent
    shown = status(queue, task_id)
    assert shown["status"] == "running"
    assert shown["attempts"] == 1
    assert "started_at" in shown
    assert queue.claim_now([ECHO]) is None, "a running task with a live lease is not claimed twice"


def test_claim_only_returns_the_requested_types(queue: EmbeddedQueue) -> None:
    stats_id = submit(queue, STATS)
    assert queue.claim_now([ECHO]) is None
    assert queue.claim_now([]) is None
    assert claim(queue, ECHO, STATS).id == stats_id
    assert status(queue, stats_id)["status"] == "running"


def test_claim_takes_higher_priority_first_then_first_in_first_out(queue: EmbeddedQueue) -> None:
    low = submit(queue, priority=0)
    high_1 = submit(queue, priority=5)
    mid = submit(queue, priority=1)
    high_2 = submit(queue, priority=5)
    negative = submit(queue, priority=-3)
    low_2 = submit(queue, priority=0)
    order = [claim(queue).id for _ in range(6)]
    assert order == [high_1, high_2, mid, low, low_2, negative]
    assert queue.claim_now([ECHO]) is None


def test_idempotency_key_returns_the_same_task(queue: EmbeddedQueue) -> None:
    first, created = queue.submit(ECHO, {"n": 1}, max_attempts=3, idempotency_key="order-42")
    assert created
    again, created_again = queue.submit(ECHO, {"n": 2}, max_attempts=3, idempotency_key="order-42")
    assert created_again is False
    assert again["id"] == first["id"]
    assert again["params"] == {"n": 1}
    assert again["idempotency_key"] == "order-42"
    other, created_other = queue.submit(ECHO, {"n": 3}, max_attempts=3, idempotency_key="order-43")
    assert created_other
    assert other["id"] != first["id"]
    # Tasks without a key never collide.
    queue.submit(ECHO, {}, max_attempts=3)
    queue.submit(ECHO, {}, max_attempts=3)
    assert sum(queue.counts().values()) == 4


# -- settling ------------------------------------------------------------------------


def test_complete_stores_the_result(queue: EmbeddedQueue) -> None:
    task_id = submit(queue)
    task = claim(queue)
    run(queue.complete(task, finished(COMPLETED)))
    shown = status(queue, task_id)
    assert shown["status"] == "completed"
    assert shown["result"] == {"echo": "hi", "n": [1, 2]}
    assert shown["outcome"] == "completed"
    assert shown["worker"] == "echo"
    assert shown["image_id"] == "sha256:feed"
    assert shown["duration"] == 0.25
    assert "finished_at" in shown
    assert "error" not in shown
    assert queue.claim_now([ECHO]) is None


def test_a_retry_waits_until_run_at(queue: EmbeddedQueue, clock: Clock) -> None:
    task_id = submit(queue)
    task = claim(queue)
    run(queue.fail(task, finished(RETRIABLE), retry_in=30))
    shown = status(queue, task_id)
    assert shown["status"] == "pending"
    assert shown["attempts"] == 1
    assert "run_at" in shown, "a pending retry shows when it runs next"
    assert shown["run_at"] > shown["updated_at"]
    assert shown["error"] == {"type": "Busy", "message": "try again later", "retriable": True}
    assert queue.claim_now([ECHO]) is None, "not claimable before run_at"
    clock.advance(29)
    assert queue.claim_now([ECHO]) is None, "not claimable before run_at"
    clock.advance(2)
    again = claim(queue)
    assert again.id == task_id
    assert again.attempt == 2


def test_a_final_retriable_failure_is_dead(queue: EmbeddedQueue) -> None:
    task_id = submit(queue)
    run(queue.fail(claim(queue), finished(RETRIABLE), retry_in=None))
    shown = status(queue, task_id)
    assert shown["status"] == "dead"
    assert shown["outcome"] == "failed"
    assert shown["error"] == {"type": "Busy", "message": "try again later", "retriable": True}
    assert shown["worker"] == "echo"
    assert shown["image_id"] == "sha256:feed"
    assert shown["stderr_tail"] == "last words\n"
    assert "finished_at" in shown
    assert "run_at" not in shown
    assert "result" not in shown
    assert queue.claim_now([ECHO]) is None


@pytest.mark.parametrize(
    ("outcome", "label"),
    [(PERMANENT, "failed"), (TIMEOUT, "timeout")],
    ids=["permanent", "timeout"],
)
def test_a_final_permanent_failure_or_timeout_is_failed(queue: EmbeddedQueue, outcome: Outcome, label: str) -> None:
    task_id = submit(queue)
    run(queue.fail(claim(queue), finished(outcome), retry_in=None))
    shown = status(queue, task_id)
    assert shown["status"] == "failed"
    assert shown["outcome"] == label
    assert outcome.error is not None
    assert shown["error"] == {"type": outcome.error.type, "message": outcome.error.message, "retriable": False}
    assert shown["worker"] == "echo"
    assert shown["image_id"] == "sha256:feed"
    assert shown["stderr_tail"] == "last words\n"
    assert queue.claim_now([ECHO]) is None


def test_retry_sends_failed_and_dead_tasks_back_to_pending(queue: EmbeddedQueue) -> None:
    failed_id = submit(queue)
    run(queue.fail(claim(queue), finished(PERMANENT), retry_in=None))
    dead_id = submit(queue)
    run(queue.fail(claim(queue), finished(RETRIABLE), retry_in=None))
    for task_id in (failed_id, dead_id):
        retried = queue.retry(task_id)
        assert retried is not None
        assert retried["id"] == task_id
        assert retried["status"] == "pending"
        assert retried["attempts"] == 0
        assert "error" not in retried and "outcome" not in retried and "finished_at" not in retried
    again = [claim(queue), claim(queue)]
    assert {t.id for t in again} == {failed_id, dead_id}
    assert [t.attempt for t in again] == [1, 1]
    assert queue.counts() == {"pending": 0, "running": 2, "completed": 0, "failed": 0, "dead": 0}


def test_retry_refuses_pending_running_completed_and_unknown_tasks(queue: EmbeddedQueue) -> None:
    pending = submit(queue, STATS)
    running = submit(queue)
    claim(queue)
    completed = submit(queue)
    run(queue.complete(claim(queue), finished(COMPLETED)))
    for task_id in (pending, running, completed, "no-such-task"):
        assert queue.retry(task_id) is None
    assert status(queue, pending)["status"] == "pending"
    assert status(queue, running)["status"] == "running"
    assert status(queue, completed)["status"] == "completed"


# -- leases ---------------------------------------------------------------------------


def test_an_expired_lease_goes_to_another_owner_and_the_first_loses_it(path: Path, clock: Clock) -> None:
    first = EmbeddedQueue(path=path, owner=OWNER, lease=30)
    second = EmbeddedQueue(path=path, owner=OTHER, lease=30)
    try:
        task_id = submit(first)
        mine = claim(first)
        clock.advance(29)
        assert second.claim_now([ECHO]) is None, "the lease is live"
        clock.advance(2)
        theirs = claim(second)
        assert theirs.id == task_id
        assert theirs.attempt == 2, "the lost attempt counts"
        assert status(second, task_id)["attempts"] == 2
        with pytest.raises(LeaseLost):
            run(first.complete(mine, finished(COMPLETED)))
        with pytest.raises(LeaseLost):
            run(first.renew(mine))
        with pytest.raises(LeaseLost):
            run(first.fail(mine, finished(RETRIABLE), retry_in=1.0))
        assert status(second, task_id)["status"] == "running"
        run(second.complete(theirs, finished(COMPLETED)))
        assert status(first, task_id)["status"] == "completed"
    finally:
        run(first.close())
        run(second.close())


def test_renew_keeps_the_lease(path: Path, clock: Clock) -> None:
    first = EmbeddedQueue(path=path, owner=OWNER, lease=30)
    second = EmbeddedQueue(path=path, owner=OTHER)
    try:
        submit(first)
        mine = claim(first)
        clock.advance(20)
        run(first.renew(mine))
        clock.advance(20)  # past the first lease (30 s), within the renewed one (50 s)
        assert second.claim_now([ECHO]) is None
        run(first.complete(mine, finished(COMPLETED)))
    finally:
        run(first.close())
        run(second.close())


def test_an_expired_lease_with_no_attempt_left_is_dead(path: Path, clock: Clock) -> None:
    first = EmbeddedQueue(path=path, owner=OWNER, lease=30)
    second = EmbeddedQueue(path=path, owner=OTHER)
    try:
        task_id = submit(first, max_attempts=1)
        mine = claim(first)
        clock.advance(31)
        assert second.claim_now([ECHO]) is None
        shown = status(second, task_id)
        assert shown["status"] == "dead"
        assert shown["attempts"] == 1
        assert shown["outcome"] == "failed"
        assert shown["error"]["type"] == "LeaseExpired"
        assert shown["error"]["retriable"] is True
        assert "finished_at" in shown
        with pytest.raises(LeaseLost):
            run(first.complete(mine, finished(COMPLETED)))
    finally:
        run(first.close())
        run(second.close())


def test_release_hands_the_task_back_without_counting_the_attempt(queue: EmbeddedQueue) -> None:
    task_id = submit(queue)
    task = claim(queue)
    run(queue.release(task))
    shown = status(queue, task_id)
    assert shown["status"] == "pending"
    assert shown["attempts"] == 0
    again = claim(queue)
    assert again.id == task_id
    assert again.attempt == 1


def test_recover_hands_back_the_task_of_a_dead_owner_only(path: Path) -> None:
    dead = EmbeddedQueue(path=path, owner=OWNER)
    alive = EmbeddedQueue(path=path, owner=OTHER)
    try:
        task_id = submit(dead)
        claim(dead)
        run(alive.recover(HeldTask(task_id, "host:9:ffff", 1)))  # not its owner: nothing happens
        assert status(alive, task_id)["status"] == "running"
        assert status(alive, task_id)["attempts"] == 1
        run(alive.recover(HeldTask(task_id, OWNER, 1)))
        shown = status(alive, task_id)
        assert shown["status"] == "pending"
        # Like an expired lease, at once: the attempt that died with its host counts.
        assert shown["attempts"] == 1
        again = claim(alive)
        assert again.id == task_id
        assert again.attempt == 2
        run(alive.recover(HeldTask(task_id, OWNER, 1)))  # now the other owner's: nothing happens
        assert status(alive, task_id)["status"] == "running"
    finally:
        run(dead.close())
        run(alive.close())


def test_recover_with_no_attempt_left_is_dead(path: Path) -> None:
    dead = EmbeddedQueue(path=path, owner=OWNER)
    alive = EmbeddedQueue(path=path, owner=OTHER)
    try:
        task_id = submit(dead, max_attempts=1)
        claim(dead)
        run(alive.recover(HeldTask(task_id, OWNER, 1)))
        shown = status(alive, task_id)
        assert shown["status"] == "dead"
        assert shown["attempts"] == 1
        assert shown["outcome"] == "failed"
        assert shown["error"]["type"] == "HostDied"
        assert shown["error"]["retriable"] is True
        assert alive.claim_now([ECHO]) is None
    finally:
        run(dead.close())
        run(alive.close())


def test_a_task_recover_sends_to_dead_has_finished_at(path: Path) -> None:
    dead = EmbeddedQueue(path=path, owner=OWNER)
    alive = EmbeddedQueue(path=path, owner=OTHER)
    try:
        task_id = submit(dead, max_attempts=1)
        claim(dead)
        run(alive.recover(HeldTask(task_id, OWNER, 1)))
        shown = status(alive, task_id)
        assert shown["status"] == "dead"
        assert "finished_at" in shown
    finally:
        run(dead.close())
        run(alive.close())


# -- counts and health -------------------------------------------------------------------


def test_counts_and_health(queue: EmbeddedQueue, path: Path) -> None:
    for _ in range(3):
        submit(queue)
    submit(queue, STATS)
    run(queue.complete(claim(queue), finished(COMPLETED)))
    run(queue.fail(claim(queue), finished(PERMANENT), retry_in=None))
    run(queue.fail(claim(queue), finished(RETRIABLE), retry_in=None))
    claim(queue, STATS)
    expected = {"pending": 0, "running": 1, "completed": 1, "failed": 1, "dead": 1}
    assert queue.counts() == expected
    health = run(queue.health())
    assert health == {"type": "embedded", "path": str(path), "reachable": True, "tasks": expected}


def test_list_filters_and_orders_newest_first(queue: EmbeddedQueue) -> None:
    ids = [submit(queue) for _ in range(3)]
    stats_id = submit(queue, STATS)
    assert [t["id"] for t in queue.list()] == [stats_id, *reversed(ids)]
    assert [t["id"] for t in queue.list(task_type=STATS)] == [stats_id]
    assert [t["id"] for t in queue.list(limit=2)] == [stats_id, ids[2]]
    claim(queue)
    assert [t["id"] for t in queue.list(status="running")] == [ids[0]]
    assert [t["id"] for t in queue.list(status="pending", task_type=ECHO)] == [ids[2], ids[1]]


# -- when SQLite says no ----------------------------------------------------------------------

NOBODY = 65534


def writes(queue: EmbeddedQueue, task: ClaimedTask) -> dict[str, Callable[[], Any]]:
    """Every call that writes, the port's and the API's, on a task that ``queue`` holds."""
    return {
        "claim": lambda: run(queue.claim([ECHO])),
        "renew": lambda: run(queue.renew(task)),
        "complete": lambda: run(queue.complete(task, finished(COMPLETED))),
        "fail": lambda: run(queue.fail(task, finished(RETRIABLE), retry_in=1.0)),
        "release": lambda: run(queue.release(task)),
        "recover": lambda: run(queue.recover(HeldTask(task.id, OWNER, task.attempt))),
        "heartbeat": lambda: run(queue.heartbeat(OWNER, "host-1")),
        "forget": lambda: run(queue.forget(OWNER)),
        "submit": lambda: queue.submit(ECHO, {"text": "more"}, max_attempts=3),
        "retry": lambda: queue.retry(task.id),
    }


def refusals(calls: dict[str, Callable[[], Any]]) -> dict[str, str]:
    """What each call raised: SourceUnavailable's message, or what else happened."""
    said = {}
    for name, call in calls.items():
        try:
            call()
        except SourceUnavailable as exc:
            said[name] = str(exc)
        else:
            said[name] = "no error"
    return said


def test_a_write_lock_held_past_the_timeout_is_source_unavailable_until_it_is_let_go(
    queue: EmbeddedQueue, path: Path
) -> None:
    task_id = submit(queue)
    task = claim(queue)
    before = status(queue, task_id)
    queue._db.execute("PRAGMA busy_timeout = 50")  # 30 s as shipped; 50 ms keeps this test fast
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process's write transaction, held past the timeout
    try:
        said = refusals(writes(queue, task))
        # WAL mode: a writer does not block readers, so what reads still answers.
        assert run(queue.health())["tasks"]["running"] == 1
        assert status(queue, task_id) == before
        assert [t.task_id for t in run(queue.held())] == [task_id]
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    for name, message in said.items():
        assert message.startswith(f"embedded queue {path}: "), (name, message)
        assert "database is locked" in message, (name, message)
    # Once the lock is let go the queue works again, and the refused calls changed nothing.
    assert status(queue, task_id) == before
    run(queue.renew(task))
    run(queue.complete(task, finished(COMPLETED)))
    assert status(queue, task_id)["status"] == "completed"
    assert queue.submit(ECHO, {}, max_attempts=1)[1] is True


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder that any user may enter (pytest's own are root's alone), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="workerhost-test-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


@contextmanager
def not_as_root() -> Iterator[None]:
    """File modes bind every user but root: as root, act as nobody meanwhile."""
    if os.geteuid() != 0:
        yield
        return
    run(asyncio.to_thread(int))  # the port's thread pool is imported now: nobody cannot read this Python
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


def test_a_read_only_database_file_refuses_every_write_and_says_where(open_folder: Path) -> None:
    path = open_folder / "q.db"
    made = EmbeddedQueue(path=path, owner=OWNER)
    task_id = submit(made)
    task = claim(made)
    before = status(made, task_id)
    run(made.close())
    path.chmod(0o444)
    open_folder.chmod(0o777)  # the folder lets anyone make the WAL files: only the database is read-only

    with not_as_root():
        queue = EmbeddedQueue(path=path, owner=OWNER)  # it opens: reading is allowed
        try:
            said = refusals(writes(queue, task))
            shown = queue.get(task_id)
            health = run(queue.health())
        finally:
            run(queue.close())

    for name, message in said.items():
        assert message.startswith(f"embedded queue {path}: "), (name, message)
        assert "readonly database" in message, (name, message)
    assert shown == before
    assert health["tasks"]["running"] == 1


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "new"])
def test_a_queue_in_a_read_only_folder_cannot_be_opened_and_says_where(open_folder: Path, exists: bool) -> None:
    path = open_folder / "q.db"
    if exists:
        run(EmbeddedQueue(path=path, owner=OWNER).close())
        path.chmod(0o666)  # the database itself is writable: its WAL files cannot be made beside it
    open_folder.chmod(0o555)

    with not_as_root(), pytest.raises(SourceUnavailable) as raised:
        EmbeddedQueue(path=path, owner=OWNER)

    assert str(raised.value).startswith(f"cannot open the embedded queue at {path}: "), raised.value


# -- several processes on one file -----------------------------------------------------------


def _claim_until_empty(path: str, owner: str, start: Any, results: Any) -> None:
    """A child process: claim and complete until nothing is left, then report what it got."""
    queue = EmbeddedQueue(path=path, owner=owner, lease=120)
    claimed: list[str] = []
    try:
        start.wait(timeout=60)
        while (task := queue.claim_now([ECHO])) is not None:
            claimed.append(task.id)
            time.sleep(0.002)  # a little work, so that the others get their turn
            run(queue.complete(task, Finished(COMPLETED, worker=owner)))
    finally:
        results.put((owner, claimed))
        run(queue.close())


def test_processes_sharing_one_file_never_claim_the_same_task(queue: EmbeddedQueue, path: Path) -> None:
    submitted = {submit(queue) for _ in range(200)}
    processes = 4
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes)
    results = ctx.Queue()
    children = [
        ctx.Process(target=_claim_until_empty, args=(str(path), f"host:{100 + i}:cccc", start, results))
        for i in range(processes)
    ]
    for child in children:
        child.start()
    try:
        reports = dict(results.get(timeout=120) for _ in children)
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    assert [child.exitcode for child in children] == [0] * processes
    claims = Counter(task_id for ids in reports.values() for task_id in ids)
    twice = [task_id for task_id, n in claims.items() if n > 1]
    assert not twice, f"claimed more than once: {twice}"
    assert set(claims) == submitted, "every task was claimed"
    assert sum(1 for ids in reports.values() if ids) >= 2, f"the processes did not compete: {reports.keys()}"
    done = queue.list(status="completed", limit=1000)
    assert len(done) == 200
    assert {t["attempts"] for t in done} == {1}
    claimer = {task_id: owner for owner, ids in reports.items() for task_id in ids}
    assert all(t["worker"] == claimer[t["id"]] for t in done), "each task was completed by its claimer"


# -- retention ---------------------------------------------------------------------------------


def test_finished_tasks_are_pruned_after_the_retention_and_nothing_else(path: Path, clock: Clock) -> None:
    queue = EmbeddedQueue(path=path, owner=OWNER, retention=3600)
    try:
        done, failed, running, pending = (submit(queue) for _ in range(4))
        for task_id, outcome in ((done, Outcome(Status.COMPLETED, result=1)),
                                 (failed, Outcome(Status.FAILED, error=ErrorInfo("E", "x")))):  # fmt: skip
            claimed = claim(queue, ECHO)
            assert claimed.id == task_id
            run(queue.complete(claimed, Finished(outcome, "w")) if outcome.ok else queue.fail(
                claimed, Finished(outcome, "w"), None))  # fmt: skip
        assert claim(queue, ECHO).id == running  # and the last stays pending
        clock.advance(3599)
        assert run(queue.prune()) == 0  # not yet
        clock.advance(2)
        assert run(queue.prune()) == 2
        assert queue.get(done) is None and queue.get(failed) is None
        assert [queue.get(t)["status"] for t in (running, pending)] == ["running", "pending"]  # type: ignore[index]
    finally:
        run(queue.close())


# -- batches: several claims, and several submits, in one transaction -------------------------


def transactions(queue: EmbeddedQueue) -> list[str]:
    """Start recording the statements the queue sends to SQLite; the list fills as it goes."""
    sent: list[str] = []
    queue._db.set_trace_callback(sent.append)
    return sent


def test_claim_many_takes_several_in_priority_order_in_one_transaction(queue: EmbeddedQueue) -> None:
    low = submit(queue, priority=0)
    high = submit(queue, priority=5)
    mid = submit(queue, priority=2)
    low_2 = submit(queue, priority=0)
    stats = submit(queue, STATS, priority=9)  # not asked for
    sent = transactions(queue)

    claimed = run(queue.claim_many([Slots((ECHO,), 3)], 10))

    assert [t.id for t in claimed] == [high, mid, low]
    assert [s for s in sent if s.startswith("BEGIN")] == ["BEGIN IMMEDIATE"]
    assert all(t.attempt == 1 and t.receipt == 1 for t in claimed)
    assert [status(queue, t)["status"] for t in (high, mid, low, low_2, stats)] == ["running"] * 3 + ["pending"] * 2


def test_claim_many_keeps_each_worker_to_its_free_slots_and_all_to_the_limit(queue: EmbeddedQueue) -> None:
    echo = [submit(queue, ECHO, priority=1) for _ in range(4)]
    stats = [submit(queue, STATS) for _ in range(4)]

    claimed = run(queue.claim_many([Slots((ECHO,), 2), Slots((STATS,), 3)], 4))

    assert [t.id for t in claimed] == echo[:2] + stats[:2]  # priority first, then age; 2 echo at most
    assert run(queue.claim_many([Slots((ECHO,), 5)], 0)) == []
    assert run(queue.claim_many([Slots((ECHO, STATS), 0)], 5)) == []
    assert queue.counts()["running"] == 4


def test_claim_many_skips_a_row_no_worker_could_be_given_and_fails_it(queue: EmbeddedQueue) -> None:
    bad, good = submit(queue, priority=1), submit(queue)
    with sqlite3.connect(queue.path) as db:
        db.execute("UPDATE tasks SET params = ? WHERE id = ?", ('{"a": NaN}', bad))

    claimed = run(queue.claim_many([Slots((ECHO,), 2)], 2))

    assert [t.id for t in claimed] == [good]
    assert status(queue, bad)["status"] == "failed"


def test_submit_many_stores_every_task_in_order_in_one_transaction(queue: EmbeddedQueue) -> None:
    sent = transactions(queue)
    stored = queue.submit_many([NewTask(ECHO, {"n": i}, max_attempts=3, priority=i) for i in range(5)])

    assert [(task["params"], created) for task, created in stored] == [({"n": i}, True) for i in range(5)]
    assert [s for s in sent if s.startswith("BEGIN")] == ["BEGIN IMMEDIATE"]
    assert [status(queue, task["id"])["priority"] for task, _ in stored] == [0, 1, 2, 3, 4]


def test_submit_many_keeps_the_idempotency_rule_inside_the_batch_and_against_the_queue(queue: EmbeddedQueue) -> None:
    existing, _ = queue.submit(ECHO, {"n": 1}, max_attempts=3, idempotency_key="old")
    batch = [
        NewTask(ECHO, {"n": 1}, 3, idempotency_key="old"),  # the same content: the task already made
        NewTask(ECHO, {"n": 2}, 3, idempotency_key="new"),
        NewTask(ECHO, {"n": 2}, 3, idempotency_key="new"),  # again in this batch: the same task
    ]

    stored = queue.submit_many(batch)

    assert [created for _, created in stored] == [False, True, False]
    assert stored[0][0]["id"] == existing["id"]
    assert stored[1][0]["id"] == stored[2][0]["id"]
    assert sum(queue.counts().values()) == 2


def test_submit_many_stores_nothing_when_a_key_names_other_content(queue: EmbeddedQueue) -> None:
    existing, _ = queue.submit(ECHO, {"n": 1}, max_attempts=3, idempotency_key="old")
    batch = [
        NewTask(ECHO, {"n": 0}, 3),
        NewTask(ECHO, {"n": 1.0}, 3, idempotency_key="old"),  # other JSON text: other content
        NewTask(STATS, {"n": 2}, 3, idempotency_key="new"),
        NewTask(ECHO, {"n": 2}, 3, idempotency_key="new"),  # the same key, another type, in this batch
    ]

    with pytest.raises(KeyConflict) as raised:
        queue.submit_many(batch)

    assert raised.value.conflicts == [(1, f"task {existing['id']}"), (3, "[2] of this batch")]
    assert sum(queue.counts().values()) == 1  # [0] and [2] were not stored either


def test_statuses_answers_for_many_ids_at_once(queue: EmbeddedQueue) -> None:
    pending, running = submit(queue), submit(queue)
    assert claim(queue).id == pending
    ids = [pending, running, "gone"] + [f"x-{i}" for i in range(1200)]  # past SQLite's variables per statement

    found = queue.statuses(ids)

    assert found == {pending: "running", running: "pending"}
