"""Warm containers: started before their tasks, so that a task waits for no engine.

Two kinds, per worker (README "Warm containers"):

* ``prewarm = N``: N containers created, attached and started ahead, each
  worker process blocked reading stdin. A task takes one, and it is that task's
  alone, as a cold one would be: the task, EOF, the result, the exit, removal.
  Never reused.
* ``reuse = N``: one long-lived container per slot that reads tasks line by
  line (one task line in; one result line out and a ``done`` mark on stderr).
  It runs up to N tasks in turn and is replaced after N, after any task that did
  not complete, and after ``prewarm_ttl``.

The ``Warmer`` keeps every pool full from a thread of its own, and replaces a
container that died idle, one older than ``prewarm_ttl``, and every idle one
when the worker's image tag moves to another image. Tasks never wait for it:
with no warm container at hand, a task runs in a cold one.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import docker

from runner.config import WorkerConfig
from runner.docker.cleanup import Janitor
from runner.docker.engine import engine_errors
from runner.docker.run import (
    PREWARM,
    REUSE,
    DiedIdle,
    Observer,
    Phases,
    RunResult,
    create,
    ended,
    ended_before,
    inspect_state,
    launch,
    marked_end,
    result_of,
    settle,
)
from runner.docker.streams import STDERR, Demuxer, Streams, close, exchange
from runner.errors import EngineError, ImageMissing
from runner.protocol import Envelope, Status, classify
from runner.retries import backoff

log = logging.getLogger(__name__)

_TICK = 0.25  # how often the warmer looks at idle containers (a take or a return wakes it at once)
_IMAGE_EVERY = 2.0  # how often it asks whether a worker's image tag has moved
_EARLY_MAX = 64 * 1024  # what a prewarmed container may write before its task, kept for the task
_FILLERS = 2  # containers started at once, beside the tasks
_READY_MIN = 2.0  # a reusing container has its timeout (at least this) to say it reads lines


class NotReady(Exception):
    """A reusing container did not say it reads tasks line by line; ``lasting`` when it never will."""

    def __init__(self, message: str, lasting: bool) -> None:
        super().__init__(message)
        self.lasting = lasting


@dataclass(eq=False)
class Warm:
    """One warm container: started, attached, and (until its task) idle."""

    worker: str
    mode: str  # PREWARM or REUSE
    container: str
    sock: socket.socket
    attach: Any
    started: float  # monotonic
    image_id: str | None = None
    demux: Demuxer = field(default_factory=Demuxer)
    early: list[tuple[int, bytes]] = field(default_factory=list)  # prewarm: its output before the task
    early_bytes: int = 0
    tasks: int = 0  # reuse: tasks it ran

    def poll(self) -> bool:
        """Read, without blocking, what it wrote while idle; False when its output ended (it is gone)."""
        while True:
            try:
                readable, _, _ = select.select([self.sock], [], [], 0)
            except (OSError, ValueError):
                return False
            if not readable:
                return True
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                return True
            except OSError:
                return False
            if not data:
                return False
            for stream, chunk in self.demux.feed(data):
                self._idle_output(stream, chunk)

    def _idle_output(self, stream: int, chunk: bytes) -> None:
        if self.mode == PREWARM:
            # What it wrote before the task (its imports' logs) is the task's, as in a cold container.
            if self.early_bytes + len(chunk) <= _EARLY_MAX:
                self.early.append((stream, chunk))
                self.early_bytes += len(chunk)
            return
        # Between two tasks of a reused container: no task's; logged, so that it is not lost.
        if stream == STDERR:
            for line in chunk.decode("utf-8", "replace").splitlines():
                log.info("worker %s (container %s, between tasks): %s", self.worker, self.container[:12], line)

    def age(self) -> float:
        return time.monotonic() - self.started


@dataclass(eq=False)
class Pool:
    """The warm containers of one worker, and how the filling goes."""

    worker: WorkerConfig
    mode: str
    target: int
    idle: deque[Warm] = field(default_factory=deque)
    busy: int = 0  # running a task (prewarm: until its run ends; reuse: until it is given back)
    starting: int = 0
    image_id: str | None = None  # what the worker's image tag named when last asked
    failures: int = 0
    retry_at: float = 0.0
    broken: str | None = None  # reuse: why this worker's containers cannot be reused

    def wanted(self) -> int:
        if self.broken is not None:
            return 0
        return max(0, self.target - len(self.idle) - self.busy - self.starting)

    def stale(self, warm: Warm) -> bool:
        moved = self.image_id is not None and warm.image_id is not None and warm.image_id != self.image_id
        return moved or warm.age() > self.worker.prewarm_ttl


class Warmer:
    """Keeps each worker's warm containers ready; hands them to tasks, takes reused ones back."""

    def __init__(self, client: docker.APIClient, host_id: str, owner: str, janitor: Janitor) -> None:
        self.client = client
        self.host_id = host_id
        self.owner = owner
        self._janitor = janitor
        self._pools: dict[str, Pool] = {}
        self._lock = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._fillers = ThreadPoolExecutor(max_workers=_FILLERS, thread_name_prefix="workerhost-warm")

    def start(self, workers: Iterable[WorkerConfig]) -> None:
        """Start keeping warm containers for each worker with ``prewarm`` or ``reuse``."""
        with self._lock:
            for worker in workers:
                if worker.warm_containers():
                    mode = REUSE if worker.reuse else PREWARM
                    self._pools[worker.name] = Pool(worker, mode, worker.warm_containers())
            if self._pools and self._thread is None:
                self._thread = threading.Thread(target=self._tend, name="workerhost-warmer", daemon=True)
                self._thread.start()

    def take(self, worker: WorkerConfig) -> Warm | None:
        """A ready warm container of ``worker`` for one task, or None (the task runs cold)."""
        with self._lock:
            pool = self._pools.get(worker.name)
            if pool is None or pool.broken is not None or self._closed:
                return None
            while pool.idle:
                warm = pool.idle.popleft()
                if pool.stale(warm):
                    self._discard(warm)
                    continue
                if not warm.poll():
                    log.warning("worker %s: warm container %s died idle; replaced", worker.name, warm.container[:12])
                    self._discard(warm)
                    continue
                # Counted until its run ends, and replaced only then: a container started beside
                # the task's exchange would take the engine's (and the machine's) time from it.
                pool.busy += 1
                return warm
            return None

    def give_back(self, warm: Warm, keep: bool, observe: Observer | None = None) -> None:
        """A reused container's task ended: keep it for the next task, or (``keep`` False, spent, stale) replace it."""
        with self._lock:
            pool = self._pools[warm.worker]
            pool.busy -= 1
            if keep and not self._closed and warm.tasks < pool.worker.reuse and not pool.stale(warm):
                pool.idle.append(warm)
            else:
                self._discard(warm, observe)
            self._lock.notify_all()

    def discard(self, warm: Warm, observe: Observer | None = None) -> None:
        """A prewarmed container's run ended (or it could not run its task): remove it, and start another."""
        with self._lock:
            self._pools[warm.worker].busy -= 1
            self._discard(warm, observe)
            self._lock.notify_all()

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per worker: its mode, target, idle, busy and starting containers, and why it is broken if it is."""
        with self._lock:
            return {name: _counts(p) for name, p in self._pools.items()}

    def close(self) -> None:
        """Stop filling and remove every idle warm container now (those lent out are their runs' to remove)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._fillers.shutdown(wait=True)  # a fill under way ends, and its container goes (closed)
        with self._lock:
            leftovers = [warm for pool in self._pools.values() for warm in pool.idle]
            for pool in self._pools.values():
                pool.idle.clear()
        for warm in leftovers:
            close(warm.sock, warm.attach)
            self._janitor.remove_now(warm.container)

    # -- the warmer's thread ----------------------------------------------------------------

    def _tend(self) -> None:
        images_asked = 0.0
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                for pool in self._pools.values():
                    self._sweep(pool)
                    if now >= pool.retry_at:
                        for _ in range(pool.wanted()):
                            pool.starting += 1
                            self._fillers.submit(self._fill, pool)
                self._lock.wait(_TICK)
            if time.monotonic() - images_asked >= _IMAGE_EVERY:
                images_asked = time.monotonic()
                self._check_images()

    def _sweep(self, pool: Pool) -> None:
        """Replace idle containers that died, grew old or run an image the tag no longer names."""
        for warm in list(pool.idle):
            if pool.stale(warm):
                why = "its image tag moved" if warm.age() <= pool.worker.prewarm_ttl else "past prewarm_ttl"
                log.info("worker %s: warm container %s replaced (%s)", pool.worker.name, warm.container[:12], why)
            elif warm.poll():
                continue
            else:
                log.warning("worker %s: warm container %s died idle; replaced", pool.worker.name, warm.container[:12])
            pool.idle.remove(warm)
            self._discard(warm)

    def _check_images(self) -> None:
        for pool in list(self._pools.values()):
            try:
                with engine_errors("cannot inspect the image"):
                    image_id = self.client.inspect_image(pool.worker.image).get("Id")
            except (EngineError, docker.errors.NotFound):
                continue  # a missing image or a silent engine: the fills say so
            with self._lock:
                if pool.image_id is not None and image_id != pool.image_id:
                    log.info("worker %s: image %s now names %s; replacing its warm containers",
                             pool.worker.name, pool.worker.image, str(image_id)[:19])  # fmt: skip
                pool.image_id = image_id
                self._lock.notify_all()

    def _fill(self, pool: Pool) -> None:
        warm: Warm | None = None
        try:
            warm = self._make(pool)
        except (EngineError, NotReady) as exc:
            self._failed(pool, exc)
        except Exception:  # a bug: never let the warmer's filler die silently
            log.exception("worker %s: starting a warm container failed", pool.worker.name)
            self._failed(pool, None)
        with self._lock:
            pool.starting -= 1
            if warm is not None:
                if pool.failures:
                    log.info("worker %s: warm containers start again", pool.worker.name)
                pool.failures = 0
                if self._closed or pool.broken is not None or pool.stale(warm):
                    self._discard(warm)
                else:
                    pool.idle.append(warm)
            self._lock.notify_all()

    def _failed(self, pool: Pool, exc: Exception | None) -> None:
        with self._lock:
            pool.failures += 1
            wait = 30.0 if isinstance(exc, ImageMissing) else backoff(pool.failures, base=0.5, cap=30.0)
            pool.retry_at = time.monotonic() + wait
            if isinstance(exc, NotReady) and exc.lasting:
                pool.broken = str(exc)
                log.error("worker %s: %s; its tasks run in fresh containers", pool.worker.name, exc)
            elif pool.failures == 1 and exc is not None:
                log.warning("worker %s: cannot start a warm container (%s); its tasks run in fresh containers "
                            "until one starts (next try in %.1fs)", pool.worker.name, exc, wait)  # fmt: skip

    def _make(self, pool: Pool) -> Warm:
        worker = pool.worker
        container = create(self.client, worker, None, self.host_id, self.owner, pool.mode)
        try:
            sock, attach = launch(self.client, container, worker)
        except EngineError:
            self._janitor.remove_later(container)
            raise
        sock.setblocking(False)
        warm = Warm(worker.name, pool.mode, container, sock, attach, time.monotonic())
        try:
            if pool.mode == REUSE:
                self._await_ready(warm, worker)
            with engine_errors("cannot inspect the warm container"):
                warm.image_id = self.client.inspect_container(container).get("Image")
        except BaseException:
            self._discard(warm)
            raise
        return warm

    def _await_ready(self, warm: Warm, worker: WorkerConfig) -> None:
        """Read until the container says it reads tasks line by line (``{"workerhost": "ready"}`` on stderr)."""
        wait = max(_READY_MIN, worker.timeout)
        streams = Streams(worker.max_stdout, worker.max_stderr, observe=None)
        deadline = time.monotonic() + wait
        gone = False
        while not (streams.ready or gone or self._closed or streams.cap_hit or time.monotonic() >= deadline):
            # In slices, so that a close does not wait for a worker that never says it is ready.
            step = min(deadline, time.monotonic() + _TICK)
            gone = not exchange(warm.sock, b"", streams, step, demux=warm.demux, half_close=False,
                                 until=lambda: streams.ready)  # fmt: skip
        if streams.ready:
            return
        if self._closed:
            raise NotReady("the host is stopping", lasting=False)
        last = bytes(streams.stderr_tail).decode("utf-8", "replace").strip().splitlines()[-1:]
        said = f"; its last line: {last[0][:300]!r}" if last else ""
        if streams.stdout or streams.cap_hit:
            raise NotReady(f"reuse = {worker.reuse}, but its container wrote to stdout before any task "
                           f"(a worker that reuses must read tasks line by line){said}", lasting=True)  # fmt: skip
        if gone:  # its output ended: it exited
            state, _ = inspect_state(self.client, warm.container)
            raise NotReady(f"its reusable container exited (code {state.get('ExitCode')}) before its first task"
                           f"{said}", lasting=False)  # fmt: skip
        raise NotReady(
            f'reuse = {worker.reuse}, but its container did not say it reads tasks line by line ({{"workerhost": '
            f'"ready"}} on stderr) within {wait:g}s: run the handler with the SDK\'s run(), or see README '
            f'"Warm containers" for the line protocol{said}',
            lasting=True,
        )

    def _discard(self, warm: Warm, observe: Observer | None = None) -> None:
        close(warm.sock, warm.attach)
        self._janitor.remove_later(warm.container, observe)


def _counts(pool: Pool) -> dict[str, Any]:
    return {
        "mode": pool.mode,
        "target": pool.target,
        "idle": len(pool.idle),
        "busy": pool.busy,
        "starting": pool.starting,
        "broken": pool.broken,
    }


def run_reused(
    client: docker.APIClient,
    warm: Warm,
    worker: WorkerConfig,
    task: Envelope,
    began: float,
    phases: Phases,
    observe: Observer | None,
) -> tuple[RunResult, bool]:
    """One task through a reused container: its line in, its result line and ``done`` mark out.

    Returns the run and whether the container may take another task: only after
    a task that completed, with the container still running. After anything
    else (a failure, the deadline, a cap, its exit) it is not reused; at the
    deadline or a cap it is killed first.
    """
    started = time.monotonic()
    deadline = started + worker.timeout
    task = replace(task, deadline=datetime.now(UTC) + timedelta(seconds=worker.timeout))
    streams = Streams(worker.max_stdout, worker.max_stderr, observe=observe)
    payload = task.to_json() + b"\n"  # JSON text holds no raw newline: one line
    written_ns = time.time_ns()
    deadline_hit = exchange(
        warm.sock, payload, streams, deadline, demux=warm.demux, half_close=False, until=streams.replied
    )
    phases.mark("exchange")
    warm.tasks += 1
    if not deadline_hit and not streams.cap_hit and streams.replied():
        end = marked_end(streams, worker)
        result = result_of(end, streams, warm.container, warm.image_id, started, began, phases, len(payload), REUSE)
        return result, classify(end).status is Status.COMPLETED
    # Not a whole reply: the container is done with, one way or another.
    try:
        state, image_id, deadline_hit = settle(
            client, warm.container, warm.sock, warm.attach, streams, deadline, deadline_hit
        )
    finally:
        close(warm.sock, warm.attach)
    if not streams.stdout and not streams.stderr_bytes and ended_before(state, written_ns):
        raise DiedIdle(warm.container, state.get("ExitCode"))
    end = ended(state, streams, worker, deadline_hit=deadline_hit)
    return result_of(end, streams, warm.container, image_id, started, began, phases, len(payload), REUSE), False
