"""One task in one fresh container: create, attach, start, feed, read, kill, inspect, remove.

The runner supervises and reports what it saw (a ``ContainerEnd``); deciding
what that means is ``protocol.classify``'s job. It uses docker-py's low-level
``APIClient`` because the high-level one cannot attach before start, which is
the only way to see every byte a short-lived container writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from runner.config import STRICT_NOFILE, WorkerConfig
from runner.errors import EngineError, ImageMissing
from runner.protocol import ContainerEnd, Envelope, ErrorInfo
from runner.sidechannel import Progress, StderrLines, WorkerSpan

log = logging.getLogger(__name__)

LABEL_TASK = "workerhost.task_id"
LABEL_WORKER = "workerhost.worker"
LABEL_HOST = "workerhost.host_id"
LABEL_ATTEMPT = "workerhost.attempt"
LABEL_OWNER = "workerhost.owner"
API_VERSION = "1.41"

STDOUT, STDERR = 1, 2
STDERR_TAIL = 64 * 1024
_CHUNK = 256 * 1024


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


class Demuxer:
    """Splits docker's multiplexed attach stream into (stream, bytes) frames.

    Each frame is an 8-byte header (stream id, 3 zero bytes, big-endian size)
    followed by that many bytes. ``feed`` takes whatever ``recv`` returned.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames: list[tuple[int, bytes]] = []
        offset = 0
        buffer = self._buffer
        while len(buffer) - offset >= 8:
            size = int.from_bytes(buffer[offset + 4 : offset + 8], "big")
            if len(buffer) - offset - 8 < size:
                break
            frames.append((buffer[offset], bytes(buffer[offset + 8 : offset + 8 + size])))
            offset += 8 + size
        del buffer[:offset]
        return frames


@dataclass(frozen=True)
class ContainerEvent:
    """A container of a task was created or removed."""

    kind: str  # "created" or "removed"
    container_id: str


# What the runner tells its caller while a task runs (from the runner's thread):
# a worker's log line, a span or progress from the SDK's side channel, a container event.
Observed = str | WorkerSpan | Progress | ContainerEvent
Observer = Callable[[Observed], None]


class _Streams:
    """stdout kept whole up to its cap; stderr counted up to its cap, split into log lines
    (their tail kept, each passed on) and the SDK's side channel."""

    def __init__(
        self, max_stdout: int, max_stderr: int, tail: int = STDERR_TAIL, observe: Observer | None = None
    ) -> None:
        self.stdout = bytearray()
        self.stderr_tail = bytearray()
        self.stderr_bytes = 0
        self.max_stdout = max_stdout
        self.max_stderr = max_stderr
        self.tail = tail
        self.cap_hit: str | None = None
        self.lines = StderrLines()
        self.observe = observe

    def add(self, stream: int, data: bytes) -> None:
        if self.cap_hit:
            return
        if stream == STDOUT:
            if len(self.stdout) + len(data) > self.max_stdout:
                self.cap_hit = "stdout"
                return
            self.stdout += data
        elif stream == STDERR:
            self.stderr_bytes += len(data)
            if self.stderr_bytes > self.max_stderr:
                self.cap_hit = "stderr"
                return
            for item in self.lines.feed(data):
                self._take(item)

    def finish(self) -> None:
        """The stream ended: take a last line that had no newline."""
        for item in self.lines.flush():
            self._take(item)

    def _take(self, item: str | WorkerSpan | Progress) -> None:
        if isinstance(item, str):
            self.stderr_tail += item.encode("utf-8", "replace") + b"\n"
            if len(self.stderr_tail) > 2 * self.tail:
                del self.stderr_tail[: -self.tail]
            if not self.lines.relog():
                return
        if self.observe is not None:
            self.observe(item)

    def cap_bytes(self) -> int:
        return self.max_stdout if self.cap_hit == "stdout" else self.max_stderr


def connect(timeout: float = 60.0, check: bool = True) -> docker.APIClient:
    """A low-level client for the engine that ``DOCKER_HOST`` (or the default socket) names.

    With ``check``, the engine must answer now (EngineError otherwise); without,
    the client is made all the same, for a host that waits for its engine.
    """
    kwargs = docker.utils.kwargs_from_env()
    # A fixed API version (Docker 20.10's) needs no round trip to build the client,
    # and every engine since speaks it.
    client = docker.APIClient(version=API_VERSION, timeout=timeout, max_pool_size=256, **kwargs)
    if check:
        try:
            client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"{_unreachable()} ({_reason(exc)})") from None
    return client


def _unreachable() -> str:
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    return (
        f"the Docker engine at {where} does not answer; start it (scripts/engine.sh does, as root) or set DOCKER_HOST"
    )


class DockerRunner:
    """Runs tasks, each in a fresh container, with the worker's limits."""

    def __init__(self, client: docker.APIClient, host_id: str, owner: str = "") -> None:
        self.client = client
        self.host_id = host_id
        self.owner = owner  # this process, so that a later one can tell its orphans from a live sibling's
        self._unremoved: set[str] = set()
        self._reaper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="workerhost-remove")

    # -- public -----------------------------------------------------------------

    def run(self, worker: WorkerConfig, task: Envelope, observe: Observer | None = None) -> RunResult:
        """Run ``task`` in a new container of ``worker`` and report how it ended.

        ``observe``, when given, is called from this thread with each log line
        of the worker, each span and progress report it sends, and container
        events; it must be quick. Never raises for the task's or the engine's
        sake: an engine failure is reported in the result's ``end.engine_error``.
        """
        began = time.monotonic()
        phases = _Phases()
        try:
            container = self._create(worker, task)
        except EngineError as exc:
            return RunResult(_engine_end(exc), duration=time.monotonic() - began, phases=phases.done("create"))
        phases.mark("create")
        if observe is not None:
            observe(ContainerEvent("created", container))
        try:
            return self._supervise(container, worker, task, began, phases, observe)
        except EngineError as exc:
            return RunResult(
                _engine_end(exc), container_id=container, duration=time.monotonic() - began,
                phases=phases.done("teardown"),
            )  # fmt: skip
        finally:
            self._remove_later(container, observe)

    def image_present(self, image: str) -> bool:
        """Whether the engine has ``image`` (raises EngineError when it does not answer)."""
        try:
            self.client.inspect_image(image)
        except docker.errors.ImageNotFound:
            return False
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"cannot inspect image {image}: {_reason(exc)}") from None
        return True

    def ping(self) -> str | None:
        """None when the engine answers, else why not."""
        try:
            self.client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            return f"{_unreachable()} ({_reason(exc)})"
        return None

    def engine_info(self) -> dict[str, Any]:
        """What the engine says of itself: version, runtimes, cgroup version, kernel (EngineError if silent)."""
        try:
            info = self.client.info()
            version = self.client.version()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"{_unreachable()} ({_reason(exc)})") from None
        return {
            "version": version.get("Version", "?"),
            "api_version": version.get("ApiVersion", "?"),
            "kernel": info.get("KernelVersion", "?"),
            "os": info.get("OperatingSystem", "?"),
            "cgroup_version": str(info.get("CgroupVersion", "1")),
            "cgroup_driver": info.get("CgroupDriver", "?"),
            "runtimes": sorted((info.get("Runtimes") or {}).keys()),
            "default_runtime": info.get("DefaultRuntime", "runc"),
        }

    def kill_task(self, task_id: str) -> int:
        """Kill this host's containers of a task (shutdown past its grace); returns how many."""
        killed = 0
        for container in self._containers({LABEL_TASK: task_id, LABEL_HOST: self.host_id}, running=True):
            with contextlib.suppress(EngineError):
                self._kill(container["Id"])
                killed += 1
        return killed

    def reap(self, alive: Callable[[str], bool]) -> list[tuple[str, str]]:
        """Remove the containers a dead instance of this host left behind, and our own
        whose removal failed earlier.

        ``alive(owner)`` tells whether the process that owns a container still
        runs (a sibling ``serve`` sharing this host id keeps its containers).
        Returns (task id, owner) for each container removed.
        """
        for leftover in list(self._unremoved):  # ours, whose removal failed (the engine was away)
            self._remove(leftover)
        reaped = []
        for container in self._containers({LABEL_HOST: self.host_id}, running=False):
            labels = container.get("Labels") or {}
            owner = labels.get(LABEL_OWNER, "")
            if owner == self.owner or (owner and alive(owner)):
                continue
            self._remove(container["Id"])
            reaped.append((labels.get(LABEL_TASK, ""), owner))
        return reaped

    def _containers(self, labels: dict[str, str], running: bool) -> list[dict[str, Any]]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        try:
            found: list[dict[str, Any]] = self.client.containers(all=not running, filters=filters)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _translate(exc, "cannot list containers") from None
        return found

    def close(self) -> None:
        """Wait for the removals still under way."""
        self._reaper.shutdown(wait=True)

    def __enter__(self) -> DockerRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steps ------------------------------------------------------------------

    def _create(self, worker: WorkerConfig, task: Envelope) -> str:
        host_config = self.client.create_host_config(
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
        labels = {
            LABEL_TASK: task.id,
            LABEL_WORKER: worker.name,
            LABEL_HOST: self.host_id,
            LABEL_ATTEMPT: str(task.attempt),
            LABEL_OWNER: self.owner,
        }
        environment = {**worker.env, **task.environment()}
        try:
            created = self.client.create_container(
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
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _translate(exc, f"worker {worker.name}: cannot create a container of {worker.image}") from None
        return str(created["Id"])

    def _supervise(
        self,
        container: str,
        worker: WorkerConfig,
        task: Envelope,
        began: float,
        phases: _Phases,
        observe: Observer | None,
    ) -> RunResult:
        # Attach before start: output written before an attach would be lost.
        try:
            attach = self.client.attach_socket(container, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _translate(exc, f"worker {worker.name}: cannot attach to its container") from None
        sock: socket.socket = getattr(attach, "_sock", attach)
        try:
            self.client.start(container)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            _close(sock, attach)
            raise _translate(exc, f"worker {worker.name}: cannot start its container") from None
        started = time.monotonic()
        phases.mark("start")
        # The deadline counts from start, so that engine latency is not the worker's time.
        deadline = started + worker.timeout
        task = replace(task, deadline=datetime.now(UTC) + timedelta(seconds=worker.timeout))
        streams = _Streams(worker.max_stdout, worker.max_stderr, observe=observe)
        payload = task.to_json()
        try:
            deadline_hit = _exchange(sock, payload, streams, deadline)
            streams.finish()
            phases.mark("exchange")
            if deadline_hit or streams.cap_hit:
                # Close the socket first, so that dockerd stops copying output
                # to us while the kill is delivered.
                _close(sock, attach)
                self._kill(container)
            else:
                deadline_hit = not self._wait(container, deadline)
        finally:
            _close(sock, attach)
        state, image_id = self._inspect(container)
        end = ContainerEnd(
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
        return RunResult(
            end,
            container_id=container,
            image_id=image_id,
            start_latency=started - began,
            duration=time.monotonic() - started,
            stderr_bytes=streams.stderr_bytes,
            stdin_bytes=len(payload),
            phases=phases.done("teardown"),
            side_channel_problems=streams.lines.problems(),
        )

    def _wait(self, container: str, deadline: float) -> bool:
        """Wait for the container to exit by the deadline; kill it and say False if it did not.

        Its output has ended, but a worker may close stdout and keep running.
        """
        remaining = deadline - time.monotonic()
        if remaining > 0:
            try:
                self.client.wait(container, timeout=remaining + 0.5)
                return True
            except requests.exceptions.ReadTimeout:
                pass
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise _translate(exc, "lost the container while waiting for it") from None
        if self._exited(container):
            return True
        self._kill(container)
        return False

    def _exited(self, container: str) -> bool:
        state, _ = self._inspect(container)
        return not state.get("Running", False)

    def _kill(self, container: str) -> None:
        try:
            self.client.kill(container)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: it had already stopped
                raise _translate(exc, "cannot kill the container") from None
        except requests.exceptions.RequestException as exc:
            raise _translate(exc, "cannot kill the container") from None
        # A kill is delivered asynchronously; inspect must see the final state.
        try:
            self.client.wait(container, timeout=30)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _translate(exc, "the killed container did not stop") from None

    def _inspect(self, container: str) -> tuple[dict[str, Any], str | None]:
        try:
            info = self.client.inspect_container(container)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _translate(exc, "cannot inspect the container") from None
        return info.get("State", {}), info.get("Image")

    def _remove_later(self, container: str, observe: Observer | None = None) -> None:
        """Remove the container off the critical path; ``close`` waits for it."""
        self._reaper.submit(self._remove, container, observe)

    def _remove(self, container: str, observe: Observer | None = None) -> None:
        try:
            self.client.remove_container(container, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("could not remove container %s (will try again): %s", container[:12], _reason(exc))
            self._unremoved.add(container)
            return
        self._unremoved.discard(container)
        if observe is not None:
            observe(ContainerEvent("removed", container))


def _strict_ulimits(worker: WorkerConfig) -> list[docker.types.Ulimit]:
    """Open files, and the largest file a strict worker may write (no bigger than its /tmp)."""
    return [
        docker.types.Ulimit(name="nofile", soft=STRICT_NOFILE, hard=STRICT_NOFILE),
        docker.types.Ulimit(name="fsize", soft=worker.tmpfs, hard=worker.tmpfs),
    ]


class _Phases:
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


def _exchange(sock: socket.socket, payload: bytes, streams: _Streams, deadline: float) -> bool:
    """Write the task to stdin (then half-close) while reading the output frames.

    One non-blocking loop does both, so a large task and a large result cannot
    deadlock each other, and a worker that never reads stdin cannot block us.
    Returns when the output ends or a cap is passed (False), or when the
    deadline passes (True).
    """
    sock.setblocking(False)
    demux = Demuxer()
    pending = memoryview(payload)
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        writing = True
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            for _, mask in selector.select(remaining):
                if writing and mask & selectors.EVENT_WRITE:
                    pending, writing = _send_some(sock, pending)
                    if not writing:
                        selector.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(_CHUNK)
                    except (BlockingIOError, ssl.SSLWantReadError):
                        continue
                    except OSError:
                        return False  # the connection went away; inspect tells how the container ended
                    if not data:
                        return False
                    for stream, chunk in demux.feed(data):
                        streams.add(stream, chunk)
                    if streams.cap_hit:
                        return False


def _send_some(sock: socket.socket, pending: memoryview) -> tuple[memoryview, bool]:
    """Send what the socket takes now; half-close stdin once all is sent. Returns (rest, still writing)."""
    try:
        if pending:
            pending = pending[sock.send(pending[:_CHUNK]) :]
        if not pending:
            sock.shutdown(socket.SHUT_WR)  # EOF on the worker's stdin
            return pending, False
    except (BlockingIOError, ssl.SSLWantWriteError):
        pass
    except OSError:
        return pending, False  # the worker exited or closed stdin; its output tells the rest
    return pending, True


def _close(sock: socket.socket, attach: Any) -> None:
    # shutdown acts on the connection whatever other references to it remain
    # (docker-py keeps a buffered reader over the same socket).
    for step in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close, getattr(attach, "close", _noop)):
        with contextlib.suppress(OSError):
            step()


def _noop() -> None:
    pass


def _engine_end(exc: EngineError) -> ContainerEnd:
    return ContainerEnd(
        exit_code=None, engine_error=ErrorInfo(type(exc).__name__, str(exc)), engine_retriable=exc.retriable
    )


def _translate(exc: BaseException, what: str) -> EngineError:
    """A driver's error as ours: unreachable or 5xx is retriable, a 4xx refusal is not."""
    status = getattr(exc, "status_code", None)
    refused = isinstance(status, int) and 400 <= status < 500
    return EngineError(f"{what}: {_reason(exc)}", retriable=not refused)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "the Docker engine does not answer: no connection"
    return str(exc) or type(exc).__name__
