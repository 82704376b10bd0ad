"""The embedded queue: SQLite in WAL mode, the default task source.

Statuses: ``pending`` (waiting, maybe until ``run_at`` for a retry), ``running``
(claimed under a lease), ``completed``, ``failed`` (permanently, or timed out)
and ``dead`` (retriable failures that used up their attempts: the dead-letter
list). A claim takes a lease that the host renews while the container runs; a
task whose lease expired (its host died) is claimable again, its attempt
counted, and goes to ``dead`` when no attempt is left.

Every write is one ``BEGIN IMMEDIATE`` transaction, so several ``serve``
processes can share one file without running a task twice at the same time;
a batch claim (``claim_many``) and a batch submit (``submit_many``) are one each.
SQLite calls are short and run in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from runner import jsondata
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
from runner.telemetry import context

T = TypeVar("T")

STATUSES = ("pending", "running", "completed", "failed", "dead")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id              TEXT PRIMARY KEY,
    type            TEXT NOT NULL,
    params          TEXT NOT NULL,
    status          TEXT NOT NULL,
    priority        INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,
    correlation_id  TEXT NOT NULL,
    traceparent     TEXT,
    run_at          REAL NOT NULL,
    lease_owner     TEXT,
    lease_expires   REAL,
    outcome         TEXT,
    retriable       INTEGER,
    result          TEXT,
    error_type      TEXT,
    error_message   TEXT,
    worker          TEXT,
    image_id        TEXT,
    stderr_tail     TEXT,
    duration        REAL,
    created_at      REAL NOT NULL,
    started_at      REAL,
    finished_at     REAL,
    updated_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_claim ON tasks (status, type, run_at);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_at);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at);
CREATE INDEX IF NOT EXISTS tasks_correlation ON tasks (correlation_id);
CREATE TABLE IF NOT EXISTS attempts (
    id      INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    record  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_task ON attempts (task_id, id);
CREATE TABLE IF NOT EXISTS owners (
    owner      TEXT PRIMARY KEY,
    host_id    TEXT NOT NULL,
    seen_at    REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""
_FORGET_AFTER = 86400.0  # registry rows of processes silent this long are dropped
_CHUNK = 500  # ids per statement (SQLite's variables per statement: 999 before 3.32)
MAX_ATTEMPT_RECORDS = 50  # attempt records kept per task (the latest)


class EmbeddedQueue(TaskSource):
    """The SQLite task source, plus what the HTTP API needs: submit, get, list, retry.

    Each task records its ``max_attempts`` (set at submit, and again at retry,
    from the worker's ``max_retries``); the host's retry decisions follow it.
    Processes that hold tasks heartbeat into the ``owners`` table every third of
    a lease, promising the next beat within a lease.
    """

    keeps_tasks = True

    def __init__(self, path: str | Path, owner: str, lease: float = 30.0, retention: float = 7 * 86400.0) -> None:
        self.path = Path(path)
        self.owner = owner  # this process's lease token
        self.lease = lease
        self.retention = retention
        self.capabilities = Capabilities(renew_every=lease / 3, registry=True, knows_final_attempt=True)
        self.heartbeat_every = lease / 3
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise SourceUnavailable(f"cannot open the embedded queue at {self.path}: {exc}") from None

    # -- the port -----------------------------------------------------------------

    async def claim(self, task_types: Collection[str]) -> ClaimedTask | None:
        return await self._async(self.claim_now, list(task_types))

    async def claim_many(self, slots: Sequence[Slots], limit: int) -> list[ClaimedTask]:
        return await self._async(self.claim_batch, list(slots), limit)

    async def renew(self, task: ClaimedTask) -> None:
        await self._async(self._renew, task)

    async def complete(self, task: ClaimedTask, finished: Finished) -> None:
        await self._async(self._settle, task, finished, None)

    async def fail(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        await self._async(self._settle, task, finished, retry_in)

    async def release(self, task: ClaimedTask) -> None:
        await self._async(self._release, task.id, self.owner)

    async def recover(self, held: HeldTask) -> None:
        await self._async(self._recover, held)

    async def heartbeat(self, owner: str, host_id: str) -> None:
        await self._async(self._heartbeat, owner, host_id)

    async def forget(self, owner: str) -> None:
        await self._async(self._forget, owner)

    async def owners(self) -> list[Owner]:
        return await self._async(self._owners)

    async def held(self) -> list[HeldTask]:
        return await self._async(self._held)

    async def health(self) -> dict[str, Any]:
        counts = await self._async(self.counts)
        return {"type": "embedded", "path": str(self.path), "reachable": True, "tasks": counts}

    async def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- claiming and settling ------------------------------------------------------

    def claim_now(self, task_types: list[str]) -> ClaimedTask | None:
        """Claim the next ready task of these types (pending and due, or with an expired lease)."""
        claimed = self.claim_batch([Slots(tuple(task_types), 1)], 1)
        return claimed[0] if claimed else None

    def claim_batch(self, slots: Sequence[Slots], limit: int) -> list[ClaimedTask]:
        """Claim up to ``limit`` ready tasks, at most ``free`` of each ``Slots``' types, highest
        priority first, then the longest due: one transaction, whatever the number."""
        groups = [(list(room.task_types), room.free) for room in slots if room.free > 0 and room.task_types]
        if limit < 1 or not groups:
            return []
        now = time.time()
        claimed: list[ClaimedTask] = []
        with self._write() as db:
            self._bury_expired(db, [t for types, _ in groups for t in types], now)
            # The best of each worker's types (as many as it has room for), then the best of those.
            ready: dict[str, tuple[int, float, int]] = {}
            for types, free in groups:
                marks = ",".join("?" * len(types))
                rows = db.execute(
                    f"""SELECT id, priority, run_at, rowid AS seq FROM tasks
                        WHERE type IN ({marks})
                          AND ((status = 'pending' AND run_at <= ?) OR (status = 'running' AND lease_expires < ?))
                        ORDER BY priority DESC, run_at, rowid LIMIT ?""",
                    (*types, now, now, min(free, limit)),
                ).fetchall()
                ready.update((row["id"], (-row["priority"], row["run_at"], row["seq"])) for row in rows)
            for task_id in sorted(ready, key=ready.__getitem__)[:limit]:
                task = self._take(db, task_id, now)
                if task is not None:
                    claimed.append(task)
        return claimed

    def _bury_expired(self, db: sqlite3.Connection, task_types: list[str], now: float) -> None:
        """Leases that expired with no attempt left: the dead-letter list."""
        marks = ",".join("?" * len(task_types))
        db.execute(
            f"""UPDATE tasks SET status = 'dead', outcome = 'failed', retriable = 1,
                    error_type = 'LeaseExpired',
                    error_message = 'its host stopped renewing the lease and no attempt is left',
                    lease_owner = NULL, finished_at = ?, updated_at = ?
                WHERE status = 'running' AND lease_expires < ? AND attempts >= max_attempts
                  AND type IN ({marks})""",
            (now, now, now, *task_types),
        )

    def _take(self, db: sqlite3.Connection, task_id: str, now: float) -> ClaimedTask | None:
        """Claim one ready task, inside the caller's transaction."""
        claimed = db.execute(
            """UPDATE tasks SET status = 'running', attempts = attempts + 1, lease_owner = ?,
                    lease_expires = ?, started_at = ?, updated_at = ?
                WHERE id = ? RETURNING *""",
            (self.owner, now + self.lease, now, now, task_id),
        ).fetchone()
        params, problem = jsondata.loads(claimed["params"], "params")
        if problem is not None or not isinstance(params, dict):
            # A row an older version stored that no worker could be given: failed for good, here,
            # rather than claimed and broken again at every attempt.
            db.execute(
                """UPDATE tasks SET status = 'failed', outcome = 'failed', retriable = 0,
                        error_type = 'InvalidParams', error_message = ?, lease_owner = NULL,
                        lease_expires = NULL, finished_at = ?, updated_at = ? WHERE id = ?""",
                (f"the stored params cannot be read: {problem or 'not an object'}", now, now, task_id),
            )
            return None
        return ClaimedTask(
            id=claimed["id"],
            type=claimed["type"],
            params=params,
            attempt=claimed["attempts"],
            correlation_id=claimed["correlation_id"],
            traceparent=claimed["traceparent"],
            max_attempts=claimed["max_attempts"],
            receipt=claimed["attempts"],
        )

    def _renew(self, task: ClaimedTask) -> None:
        now = time.time()
        with self._write() as db:
            cursor = db.execute(
                """UPDATE tasks SET lease_expires = ?, updated_at = ?
                    WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?""",
                (now + self.lease, now, task.id, self.owner, task.receipt),
            )
        if cursor.rowcount == 0:
            raise LeaseLost(f"task {task.id}: the lease was lost (it expired and the task moved on)")

    def _settle(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        outcome = finished.outcome
        now = time.time()
        if outcome.ok:
            status, run_at = "completed", None
        elif retry_in is not None:
            status, run_at = "pending", now + retry_in
        else:
            status, run_at = ("dead" if outcome.retriable else "failed"), None
        error = outcome.error
        with self._write() as db:
            cursor = db.execute(
                """UPDATE tasks SET status = ?, run_at = COALESCE(?, run_at), lease_owner = NULL,
                        lease_expires = NULL, outcome = ?, retriable = ?, result = ?, error_type = ?,
                        error_message = ?, worker = ?, image_id = ?, stderr_tail = ?, duration = ?,
                        finished_at = ?, updated_at = ?
                    WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?""",
                (
                    status,
                    run_at,
                    str(outcome.status),
                    int(outcome.retriable),
                    jsondata.dumps(outcome.result).encode() if outcome.ok else None,
                    error.type if error else None,
                    error.message if error else None,
                    finished.worker,
                    finished.image_id,
                    finished.stderr_tail,
                    finished.duration,
                    None if status == "pending" else now,
                    now,
                    task.id,
                    self.owner,
                    task.receipt,
                ),
            )
        if cursor.rowcount == 0:
            raise LeaseLost(f"task {task.id}: not reported, its lease was lost (it expired and the task moved on)")

    def _release(self, task_id: str, owner: str) -> None:
        now = time.time()
        with self._write() as db:
            db.execute(
                """UPDATE tasks SET status = 'pending', attempts = MAX(attempts - 1, 0), lease_owner = NULL,
                        lease_expires = NULL, run_at = ?, updated_at = ?
                    WHERE id = ? AND status = 'running' AND lease_owner = ?""",
                (now, now, task_id, owner),
            )

    def _recover(self, held: HeldTask) -> None:
        """Like an expired lease, at once: the attempt counts, and none left means dead."""
        now = time.time()
        with self._write() as db:
            db.execute(
                """UPDATE tasks SET
                        status = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'pending' END,
                        outcome = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE outcome END,
                        retriable = CASE WHEN attempts >= max_attempts THEN 1 ELSE retriable END,
                        error_type = CASE WHEN attempts >= max_attempts THEN 'HostDied' ELSE error_type END,
                        error_message = CASE WHEN attempts >= max_attempts
                            THEN 'its host died while it ran, and no attempt is left' ELSE error_message END,
                        finished_at = CASE WHEN attempts >= max_attempts THEN ? ELSE finished_at END,
                        lease_owner = NULL, lease_expires = NULL, run_at = ?, updated_at = ?
                    WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?""",
                (now, now, now, held.task_id, held.owner, held.attempt),
            )

    def _heartbeat(self, owner: str, host_id: str) -> None:
        now = time.time()
        with self._write() as db:
            db.execute(
                """INSERT INTO owners (owner, host_id, seen_at, expires_at) VALUES (?, ?, ?, ?)
                    ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at, expires_at = excluded.expires_at""",
                (owner, host_id, now, now + self.lease),
            )
            db.execute("DELETE FROM owners WHERE expires_at < ?", (now - _FORGET_AFTER,))

    def _forget(self, owner: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM owners WHERE owner = ?", (owner,))

    def _owners(self) -> list[Owner]:
        now = time.time()
        with self._read() as db:
            rows = db.execute("SELECT owner, host_id, expires_at FROM owners").fetchall()
        return [Owner(row["owner"], row["host_id"], row["expires_at"] < now) for row in rows]

    def _held(self) -> list[HeldTask]:
        with self._read() as db:
            rows = db.execute(
                "SELECT id, lease_owner, attempts FROM tasks WHERE status = 'running' AND lease_owner IS NOT NULL"
            ).fetchall()
        return [HeldTask(row["id"], row["lease_owner"], row["attempts"]) for row in rows]

    # -- what the API needs ---------------------------------------------------------

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
        """Add a task; returns it and whether it is new (an idempotency key may return an old one).

        Raises ValueError for params that would not read back as JSON (the API refuses them first).
        """
        task = NewTask(task_type, params, max_attempts, priority, idempotency_key, correlation_id, traceparent, task_id)
        problem = jsondata.problem(params, "params")
        if problem is not None:
            raise ValueError(problem)
        with self._write() as db:
            row, created = self._insert(db, task, time.time())
        return _public(row), created

    def submit_many(self, tasks: Sequence[NewTask]) -> list[tuple[dict[str, Any], bool]]:
        """Add every task in one transaction, or none (``KeyConflict``: keys that name other content).

        Raises ValueError for params that would not read back as JSON (the API refuses them first).
        """
        for n, task in enumerate(tasks):
            if (problem := jsondata.problem(task.params, f"[{n}].params")) is not None:
                raise ValueError(problem)
        now = time.time()
        stored: list[tuple[dict[str, Any], bool]] = []
        conflicts: list[tuple[int, str]] = []
        first_with: dict[str, int] = {}  # an idempotency key -> the first item of this batch that made it
        with self._write() as db:
            for n, task in enumerate(tasks):
                row, created = self._insert(db, task, now)
                key = task.idempotency_key
                if created and key is not None:
                    first_with[key] = n
                elif not created and not _same_content(row, task):
                    named = f"[{first_with[key]}] of this batch" if key in first_with else f"task {row['id']}"
                    conflicts.append((n, named))
                stored.append((_public(row), created))
            if conflicts:
                raise KeyConflict(conflicts)  # rolled back: nothing of the batch is kept
        return stored

    def _insert(self, db: sqlite3.Connection, task: NewTask, now: float) -> tuple[sqlite3.Row, bool]:
        """Insert one task, inside the caller's transaction: its row, and whether it is new (else
        the row its idempotency key names)."""
        task_id = task.task_id or str(uuid.uuid4())
        cursor = db.execute(
            """INSERT INTO tasks (id, type, params, status, priority, max_attempts, idempotency_key,
                    correlation_id, traceparent, run_at, created_at, updated_at)
                VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (idempotency_key) DO NOTHING""",
            (
                task_id,
                task.type,
                jsondata.dumps(task.params).encode(),
                task.priority,
                task.max_attempts,
                task.idempotency_key,
                task.correlation_id or uuid.uuid4().hex,
                task.traceparent,
                now,
                now,
                now,
            ),
        )
        if cursor.rowcount == 1:
            return db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone(), True
        return db.execute("SELECT * FROM tasks WHERE idempotency_key = ?", (task.idempotency_key,)).fetchone(), False

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return _public(row) if row else None

    def statuses(self, task_ids: Sequence[str]) -> dict[str, str]:
        """The status of each of these tasks that exists."""
        found: dict[str, str] = {}
        with self._read() as db:
            for start in range(0, len(task_ids), _CHUNK):
                chunk = list(task_ids[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT id, status FROM tasks WHERE id IN ({marks})", chunk).fetchall()
                found.update((row["id"], row["status"]) for row in rows)
        return found

    def page(
        self, status: str | None, task_type: str | None, limit: int, full: bool = False, budget: int | None = None,
        q: str | None = None, offset: int = 0,
    ) -> tuple[list[dict[str, Any]], bool]:  # fmt: skip
        """Tasks, newest first, past the first ``offset``, and whether some were cut to summaries;
        ``q``: only the task with this id, or those with this correlation id.

        Without ``full``, summaries: no params, result or stderr tail, none of them
        even read from the file. With it, whole tasks while their stored params,
        results and tails fit in ``budget`` bytes; the rest as summaries that say so.
        """
        clauses, args = [], []
        if status:
            clauses.append("status = ?")
            args.append(status)
        if task_type:
            clauses.append("type = ?")
            args.append(task_type)
        if q:
            clauses.append("(id = ? OR correlation_id = ?)")
            args += [q, q]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?"
        with self._read() as db:
            if not full or budget is None:
                columns = "*" if full else _SUMMARY
                rows = db.execute(f"SELECT {columns} FROM tasks {where} {order}", (*args, limit, offset)).fetchall()
                return [_public(row) for row in rows], False
            # Sizes first (params and results are stored as BLOBs, whose length SQLite reads from
            # the record's header, not the content), then only the rows that fit: a page over big
            # tasks never holds more than the budget.
            sizes = db.execute(
                f"""SELECT id, length(params) + coalesce(length(result), 0)
                        + coalesce(length(stderr_tail), 0) AS size FROM tasks {where} {order}""",
                (*args, limit, offset),
            ).fetchall()
            tasks: list[dict[str, Any]] = []
            cut = False
            for row in sizes:
                fits = row["size"] <= budget
                budget -= row["size"] if fits else 0
                columns = "*" if fits else _SUMMARY
                found = db.execute(f"SELECT {columns} FROM tasks WHERE id = ?", (row["id"],)).fetchone()
                if found is None:
                    continue
                task = _public(found)
                if not fits:
                    cut = True
                    task["omitted"] = "params, result and stderr tail: over what one list carries; GET the task"
                tasks.append(task)
        return tasks, cut

    def finished_per_minute(self, since: float) -> dict[tuple[int, str], int]:
        """Tasks that ended since ``since``, by (the minute they ended in, their status): one query."""
        with self._read() as db:
            rows = db.execute(
                """SELECT CAST(finished_at / 60 AS INTEGER) * 60 AS minute, status, COUNT(*) AS n FROM tasks
                    WHERE finished_at >= ? AND status IN ('completed', 'failed', 'dead')
                    GROUP BY minute, status""",
                (since,),
            ).fetchall()
        return {(row["minute"], row["status"]): row["n"] for row in rows}

    def attempts(self, task_id: str) -> list[dict[str, Any]]:
        """The task's attempt records, oldest first; one that does not read back is left out."""
        with self._read() as db:
            rows = db.execute("SELECT record FROM attempts WHERE task_id = ? ORDER BY id", (task_id,)).fetchall()
        found = [jsondata.loads(row["record"], "an attempt record") for row in rows]
        return [record for record, problem in found if problem is None and isinstance(record, dict)]

    def record_attempt(self, task_id: str, record: dict[str, Any]) -> None:
        """Keep one attempt's record, and the latest ``MAX_ATTEMPT_RECORDS`` of the task's.

        Raises ValueError for a record that would not read back as JSON.
        """
        if (problem := jsondata.problem(record, "the attempt record")) is not None:
            raise ValueError(problem)
        text = jsondata.dumps(record)
        with self._write() as db:
            db.execute("INSERT INTO attempts (task_id, record) VALUES (?, ?)", (task_id, text))
            db.execute(
                """DELETE FROM attempts WHERE task_id = ? AND id NOT IN
                    (SELECT id FROM attempts WHERE task_id = ? ORDER BY id DESC LIMIT ?)""",
                (task_id, task_id, MAX_ATTEMPT_RECORDS),
            )

    def list(self, status: str | None = None, task_type: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Tasks, newest first, whole (params, result, stderr tail): for a few; the API pages with ``page``."""
        return self.page(status, task_type, limit, full=True)[0]

    def delete(self, task_id: str) -> tuple[bool, str | None]:
        """Delete a task that is not running: (deleted, its status; None when there is no such task)."""
        with self._write() as db:
            row = db.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None or row["status"] == "running":
                return False, row["status"] if row else None
            db.execute("DELETE FROM tasks WHERE id = ? AND status != 'running'", (task_id,))
            db.execute("DELETE FROM attempts WHERE task_id = ?", (task_id,))
        return True, row["status"]

    async def prune(self) -> int:
        return await self._async(self._prune)

    def _prune(self) -> int:
        """Delete finished tasks whose end is older than the retention."""
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM tasks WHERE status IN ('completed', 'failed', 'dead') AND finished_at < ?",
                (time.time() - self.retention,),
            )
            db.execute("DELETE FROM attempts WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.id = attempts.task_id)")
        return cursor.rowcount

    def retry(self, task_id: str, max_attempts: int | None = None) -> dict[str, Any] | None:
        """Send a failed or dead task back to pending, as new (with ``max_attempts`` from the
        worker's current config, when given); None if it is neither failed nor dead."""
        now = time.time()
        with self._write() as db:
            row = db.execute(
                """UPDATE tasks SET status = 'pending', attempts = 0, run_at = ?, updated_at = ?,
                        outcome = NULL, retriable = NULL, result = NULL, error_type = NULL,
                        error_message = NULL, finished_at = NULL, max_attempts = COALESCE(?, max_attempts)
                    WHERE id = ? AND status IN ('failed', 'dead') RETURNING *""",
                (now, now, max_attempts, task_id),
            ).fetchone()
        return _public(row) if row else None

    def counts(self) -> dict[str, int]:
        """Tasks by status (every status, zeros included)."""
        with self._read() as db:
            rows = db.execute("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status").fetchall()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({row["status"]: row["n"] for row in rows})
        return counts

    # -- plumbing -------------------------------------------------------------------

    async def _async(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                finally:
                    # Whatever failed, the body or the COMMIT itself (SQLITE_BUSY leaves the
                    # transaction open): never leave the connection inside a transaction.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise SourceUnavailable(f"embedded queue {self.path}: {exc}") from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise SourceUnavailable(f"embedded queue {self.path}: {exc}") from None


# What a summary reads: everything but the params, the result and the stderr tail.
_SUMMARY = (
    "id, type, status, attempts, max_attempts, priority, correlation_id, traceparent, created_at, updated_at, "
    "idempotency_key, "
    "outcome, worker, image_id, duration, started_at, finished_at, run_at, error_type, error_message, retriable"
)


def _public(row: sqlite3.Row) -> dict[str, Any]:
    """A task as the API shows it (a summary when the row has no params).

    Reading never fails: a stored value that does not read back as JSON (a row
    an older version stored) is shown as null, and ``unreadable`` says why.
    """
    columns = set(row.keys())
    task: dict[str, Any] = {
        "id": row["id"],
        "type": _text(row["type"]),
        "status": row["status"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "priority": row["priority"],
        "correlation_id": _text(row["correlation_id"]),
        "trace_id": context.trace_of_task(row["id"], row["traceparent"]),
        "created_at": iso_time(row["created_at"]),
        "updated_at": iso_time(row["updated_at"]),
    }
    optional = {
        "idempotency_key": _text(row["idempotency_key"]),
        "outcome": row["outcome"],
        "worker": row["worker"],
        "image_id": row["image_id"],
        "stderr_tail": _text(row["stderr_tail"]) if "stderr_tail" in columns else None,
        "duration": row["duration"],
        "started_at": iso_time(row["started_at"]),
        "finished_at": iso_time(row["finished_at"]),
    }
    task.update({k: v for k, v in optional.items() if v is not None})
    if row["status"] == "pending" and row["run_at"] > time.time():
        task["run_at"] = iso_time(row["run_at"])
    unreadable: dict[str, str] = {}
    for field in ("params", "result"):
        if field in columns and row[field] is not None:
            task[field], problem = jsondata.loads(row[field], field)
            if problem is not None:
                unreadable[field] = problem
    if unreadable:
        task["unreadable"] = unreadable
    if row["error_type"] is not None:
        retriable = bool(row["retriable"])
        task["error"] = {
            "type": _text(row["error_type"]), "message": _text(row["error_message"]), "retriable": retriable,
        }  # fmt: skip
    return task


def _same_content(row: sqlite3.Row, task: NewTask) -> bool:
    """Whether a stored task is this one: its type, and its params as the same JSON text
    ({"a": true}, {"a": 1.0} and {"a": 1} are three different tasks)."""
    params, problem = jsondata.loads(row["params"], "params")
    return problem is None and row["type"] == task.type and jsondata.dumps(params) == jsondata.dumps(task.params)


def _text(value: str | None) -> str | None:
    return jsondata.clean_text(value) if isinstance(value, str) else value
