"""One task in one container: create, attach, start, exchange, wait or kill, inspect.

What happens to the container afterwards (removal, cancellation, reaping) is
``cleanup``'s; what its end means is ``protocol.classify``'s.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from runner.config import STRICT_NOFILE, WorkerConfig
from runner.docker.engine import engine_errors
from runner.docker.labels import LABEL_ATTEMPT, LABEL_HOST, LABEL_OWNER, LABEL_POOL, LABEL_TASK, LABEL_WORKER
from runner.docker.streams import STDERR_TAIL, Demuxer, Streams, close, exchange
from runner.errors import EngineError, ImageMissing
from runner.protocol import ContainerEnd, Envelope, ErrorInfo
from runner.sidechannel import Progress, WorkerSpan

COLD, PREWARM, REUSE = "cold", "prewarm", "reuse"
ENV_MODE = "WORKERHOST_MODE"  # in every container: how it was started (contract, README "Warm containers")


@dataclass(frozen=True)
class RunResult:
    """What one container run produced, beyond its classification."""

    end: ContainerEnd
    container_id: str | None = None
    image_id: str | None = None
    start_latency: float = 0.0
    duration: float = 0.0
    stderr_bytes: int = 0
    stdin_bytes: int = 0
    # (name, start, end) in nanoseconds since the epoch: create, start, exchange, teardown
    phases: tuple[tuple[str, int, int], ...] = ()
    side_channel_problems: str | None = None
    # DockerRunner.cancel killed it: ``end`` says how it died, not how the task would have ended
    cancelled: bool = False
    mode: str = "cold"  # the container's kind: "cold" (made for the task), "prewarm" or "reuse"


@dataclass(frozen=True)
class ContainerEvent:
    """A container of a task was created or removed."""

    kind: str  # "created" or "removed"
    container_id: str


# What the runner tells its caller while a task runs (from the runner's thread):
# a worker's log line, a span or progress from the SDK's side channel, a container event.
Observed = str | WorkerSpan | Progress | ContainerEvent
Observer = Callable[[Observed], None]


class Phases:
    """Wall-clock marks of a run's phases, for the spans of an attempt."""

    def __init__(self) -> None:
        self._last = time.time_ns()
        self._phases: list[tuple[str, int, int]] = []

    def mark(self, name: str) -> None:
        now = time.time_ns()
        self._phases.append((name, self._last, now))
        self._last = now

    def done(self, name: str) -> tuple[tuple[str, int, int], ...]:
        self.mark(name)
        return tuple(self._phases)


def create(
    client: docker.APIClient,
    worker: WorkerConfig,
    task: Envelope | None,
    host_id: str,
    owner: str,
    mode: str = COLD,
) -> str:
    """A new container of ``worker`` with the worker's limits; returns its id.

    For ``task``, or (``task`` None) a warm container of ``mode`` ("prewarm" or
    "reuse") whose tasks are not known yet: its environment has no task's ids, and
    its labels name no task (``workerhost.pool`` says what it is).
    """
    host_config = client.create_host_config(
        nano_cpus=int(worker.cpus * 1e9),
        mem_limit=worker.memory,
        memswap_limit=worker.memory,  # equal to memory: no swap, so the limit is real
        pids_limit=worker.pids_limit,
        network_mode=worker.network,
        runtime=worker.runtime,
        read_only=True,
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={worker.tmpfs},mode=1777"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        # The host reads the streams through attach; a log driver would
        # only copy every byte to disk again.
        log_config={"Type": "none", "Config": {}},
        ulimits=_strict_ulimits(worker) if worker.strict else None,
    )
    labels = {LABEL_WORKER: worker.name, LABEL_HOST: host_id, LABEL_OWNER: owner}
    environment = {**worker.env, ENV_MODE: mode}
    if task is not None:
        labels |= {LABEL_TASK: task.id, LABEL_ATTEMPT: str(task.attempt)}
        environment |= task.environment()
    else:
        labels[LABEL_POOL] = mode
    with engine_errors(f"worker {worker.name}: cannot create a container of {worker.image}"):
        try:
            created = client.create_container(
                image=worker.image,
                command=worker.command,
                stdin_open=True,  # with detach=False this sets StdinOnce: EOF closes stdin
                environment=environment,
                user=worker.user or None,
                labels=labels,
                host_config=host_config,
                network_disabled=worker.network == "none",
            )
        except docker.errors.ImageNotFound:
            raise ImageMissing(worker.image, worker.name) from None
    return str(created["Id"])


def launch(client: docker.APIClient, container: str, worker: WorkerConfig) -> tuple[socket.socket, Any]:
    """Attach to the container, then start it; returns the attach socket and its connection."""
    # Attach before start: output written before an attach would be lost.
    with engine_errors(f"worker {worker.name}: cannot attach to its container"):
        attach = client.attach_socket(container, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
    sock: socket.socket = getattr(attach, "_sock", attach)
    try:
        with engine_errors(f"worker {worker.name}: cannot start its container"):
            client.start(container)
    except EngineError:
        close(sock, attach)
        raise
    return sock, attach


def supervise(
    client: docker.APIClient,
    container: str,
    worker: WorkerConfig,
    task: Envelope,
    began: float,
    phases: Phases,
    observe: Observer | None,
) -> RunResult:
    """Attach, start, exchange stdin and stdout up to the deadline or a cap, then read how it ended."""
    sock, attach = launch(client, container, worker)
    phases.mark("start")
    try:
        # Now, while its worker starts up (a task written meanwhile waits in the pipe): the image
        # it runs, for a run that ends without waiting for the container's exit.
        _, image_id = inspect_state(client, container)
    except EngineError:
        close(sock, attach)
        raise
    return single_use(client, container, sock, attach, worker, task, began, phases, observe, image_id=image_id)


def single_use(
    client: docker.APIClient,
    container: str,
    sock: socket.socket,
    attach: Any,
    worker: WorkerConfig,
    task: Envelope,
    began: float,
    phases: Phases,
    observe: Observer | None,
    *,
    demux: Demuxer | None = None,
    early: Sequence[tuple[int, bytes]] = (),
    mode: str = COLD,
    image_id: str | None = None,
) -> RunResult:
    """The task into a started container (then EOF), its output up to the deadline or a cap, and its end.

    ``early`` is what a warm container wrote before its task (on ``demux``'s connection), and
    ``image_id`` the image it runs. A worker that marks its task's end (the SDK's
    ``{"workerhost": "done", "exit_code": N}`` on stderr after its result line) is not waited
    for: its result and its code are whole, and its exit happens off the task's path (the
    container is removed, killed if need be, as always). Any other is read to the end of its
    output, then its exit code and OOMKilled come from the engine.
    """
    started = time.monotonic()
    # The deadline counts from now (the start, or a warm container's write), so that engine latency
    # is not the worker's time.
    deadline = started + worker.timeout
    task = replace(task, deadline=datetime.now(UTC) + timedelta(seconds=worker.timeout))
    streams = Streams(worker.max_stdout, worker.max_stderr, observe=observe)
    for stream, chunk in early:
        streams.add(stream, chunk)
    before = streams.stderr_bytes
    payload = task.to_json()
    written_ns = time.time_ns()
    try:
        deadline_hit = exchange(sock, payload, streams, deadline, demux=demux, until=streams.replied)
        phases.mark("exchange")
        if not deadline_hit and not streams.cap_hit and streams.replied():
            return result_of(marked_end(streams, worker), streams, container, image_id, started, began, phases,
                             len(payload), mode)  # fmt: skip
        state, image_id, deadline_hit = settle(client, container, sock, attach, streams, deadline, deadline_hit)
    finally:
        close(sock, attach)
    if mode != COLD and not streams.stdout and streams.stderr_bytes == before and ended_before(state, written_ns):
        raise DiedIdle(container, state.get("ExitCode"))
    end = ended(state, streams, worker, deadline_hit=deadline_hit)
    return result_of(end, streams, container, image_id, started, began, phases, len(payload), mode)


def marked_end(streams: Streams, worker: WorkerConfig) -> ContainerEnd:
    """The end of a task whose worker marked it done: its result line and the code it gave (no exit waited for)."""
    return ContainerEnd(
        exit_code=streams.done,
        stdout=bytes(streams.stdout),
        timeout=worker.timeout,
        memory=worker.memory,
        stderr_tail=bytes(streams.stderr_tail[-STDERR_TAIL:]),
        strict=worker.strict,
    )


def settle(
    client: docker.APIClient,
    container: str,
    sock: socket.socket,
    attach: Any,
    streams: Streams,
    deadline: float,
    deadline_hit: bool,
) -> tuple[dict[str, Any], str | None, bool]:
    """After an exchange without a done mark: kill the container at the deadline or a cap, else see it
    exit by the deadline. Returns its state (an inspect's ``State``), its image, and whether the deadline hit."""
    streams.finish()
    if deadline_hit or streams.cap_hit:
        # Close the socket first, so that dockerd stops copying output to us while the kill is delivered.
        close(sock, attach)
        kill(client, container)
        state, image_id = inspect_state(client, container)
        return state, image_id, deadline_hit
    # The output ended; the engine has usually seen the exit by now, and an inspect is
    # cheaper than a wait. A worker may close stdout and keep running: then wait for it.
    state, image_id = inspect_state(client, container)
    if state.get("Running", False):
        deadline_hit = not wait_exit(client, container, deadline)
        state, image_id = inspect_state(client, container)
    return state, image_id, deadline_hit


def result_of(
    end: ContainerEnd,
    streams: Streams,
    container: str,
    image_id: str | None,
    started: float,
    began: float,
    phases: Phases,
    stdin_bytes: int,
    mode: str,
) -> RunResult:
    return RunResult(
        end,
        container_id=container,
        image_id=image_id,
        start_latency=started - began,
        duration=time.monotonic() - started,
        stderr_bytes=streams.stderr_bytes,
        stdin_bytes=stdin_bytes,
        phases=phases.done("teardown"),
        side_channel_problems=streams.lines.problems(),
        mode=mode,
    )


def ended(state: dict[str, Any], streams: Streams, worker: WorkerConfig, *, deadline_hit: bool) -> ContainerEnd:
    """What the container's state (``State`` of an inspect) and its streams say of how a task ended."""
    return ContainerEnd(
        exit_code=state.get("ExitCode"),
        stdout=bytes(streams.stdout),
        oom_killed=bool(state.get("OOMKilled")),
        deadline_hit=deadline_hit,
        cap_hit=streams.cap_hit,
        cap_bytes=streams.cap_bytes() if streams.cap_hit else 0,
        timeout=worker.timeout,
        memory=worker.memory,
        stderr_tail=bytes(streams.stderr_tail[-STDERR_TAIL:]),
        strict=worker.strict,
    )


class DiedIdle(Exception):
    """A warm container had ended before its task was written: no task saw it, another may run the task."""

    def __init__(self, container: str, exit_code: int | None) -> None:
        super().__init__(f"warm container {container[:12]} had ended (exit code {exit_code}) before its task")
        self.container = container
        self.exit_code = exit_code


def ended_before(state: dict[str, Any], moment_ns: int) -> bool:
    """Whether the container had finished before ``moment_ns`` (ns since the epoch), by the engine's clock."""
    finished = _epoch_ns(state.get("FinishedAt"))
    return not state.get("Running", False) and finished is not None and finished < moment_ns


def _epoch_ns(stamp: Any) -> int | None:
    """Docker's RFC 3339 time with nanoseconds (``2026-11-30T12:00:00.123456789Z``) in ns, or None."""
    if not isinstance(stamp, str) or not stamp.endswith("Z") or stamp.startswith("0001-"):
        return None
    whole, _, fraction = stamp[:-1].partition(".")
    try:
        seconds = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None
    digits = (fraction if fraction.isdigit() else "0")[:9].ljust(9, "0")
    return int(seconds) * 1_000_000_000 + int(digits)


def engine_end(exc: EngineError) -> ContainerEnd:
    """The end of a run that the engine failed: what was being done, and what kind of failure."""
    return ContainerEnd(exit_code=None, engine_error=ErrorInfo(type(exc).__name__, str(exc)), engine_fault=exc.fault)


def signal_kill(client: docker.APIClient, container: str) -> bool:
    """Send SIGKILL; False when the container was no longer running (or is gone), so nothing was killed."""
    with engine_errors("cannot kill the container"):
        try:
            client.kill(container)
        except docker.errors.APIError as exc:
            if exc.status_code in (404, 409):  # 409: it had already stopped; 404: already removed
                return False
            raise
    return True


def kill(client: docker.APIClient, container: str) -> None:
    """Kill the container and wait until the engine says it stopped."""
    signal_kill(client, container)
    # A kill is delivered asynchronously; inspect must see the final state.
    with engine_errors("the killed container did not stop"):
        client.wait(container, timeout=30)


def wait_exit(client: docker.APIClient, container: str, deadline: float) -> bool:
    """Wait for the container to exit by the deadline; kill it and say False if it did not.

    Its output has ended, but a worker may close stdout and keep running.
    """
    remaining = deadline - time.monotonic()
    if remaining > 0:
        with engine_errors("lost the container while waiting for it"):
            try:
                client.wait(container, timeout=remaining + 0.5)
                return True
            except requests.exceptions.ReadTimeout:
                pass
    if _exited(client, container):
        return True
    kill(client, container)
    return False


def _exited(client: docker.APIClient, container: str) -> bool:
    state, _ = inspect_state(client, container)
    return not state.get("Running", False)


def inspect_state(client: docker.APIClient, container: str) -> tuple[dict[str, Any], str | None]:
    with engine_errors("cannot inspect the container"):
        info = client.inspect_container(container)
    return info.get("State", {}), info.get("Image")


def _strict_ulimits(worker: WorkerConfig) -> list[docker.types.Ulimit]:
    """Open files, and the largest file a strict worker may write (no bigger than its /tmp)."""
    return [
        docker.types.Ulimit(name="nofile", soft=STRICT_NOFILE, hard=STRICT_NOFILE),
        docker.types.Ulimit(name="fsize", soft=worker.tmpfs, hard=worker.tmpfs),
    ]
