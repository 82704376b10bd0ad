"""Worker protocol v1: the task envelope, and how a container's end becomes an Outcome.

Pure: no I/O. ``classify`` is the outcome table of README.md ("Worker protocol v1") as one function,
so every row is unit-tested without Docker.
"""

from __future__ import annotations

import enum
import json
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from runner import jsondata

PROTOCOL_VERSION = 1


class ExitCode(enum.IntEnum):
    """What a worker's exit code means (contract)."""

    OK = 0
    RETRIABLE = 1
    PERMANENT = 2
    TIMEOUT = 3


class EngineFault(enum.StrEnum):
    """How the Docker engine failed a run, before the worker's own end could be seen.

    The kind, not the caller, decides whether another attempt can help
    (``engine_retriable``): an engine that does not answer or fails on its side
    may be back in a moment; one that refuses the container as configured, or
    lacks the image, will refuse the next attempt the same way.
    """

    UNREACHABLE = "unreachable"  # no connection, the connection dropped, or no answer in time
    SERVER = "server"  # it answered 5xx: its own trouble
    REFUSED = "refused"  # it answered 4xx: a command that does not exist, an option it rejects
    IMAGE_MISSING = "image_missing"  # the worker's image is not on the engine


_RETRIABLE_FAULTS = frozenset({EngineFault.UNREACHABLE, EngineFault.SERVER})
_IMAGE_ADVICE = "build it with `make build-images`"


def engine_retriable(fault: EngineFault) -> bool:
    """Whether an attempt that the engine failed this way may succeed later (the table's engine rows)."""
    return fault in _RETRIABLE_FAULTS


class Status(enum.StrEnum):
    """How a task ended, as users see it."""

    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class Envelope:
    """One task as a worker receives it on stdin (contract)."""

    id: str
    type: str
    params: dict[str, Any]
    attempt: int
    correlation_id: str
    traceparent: str
    deadline: datetime | None = None

    def to_json(self) -> bytes:
        """The bytes written to the container's stdin."""
        body: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "params": self.params,
            "attempt": self.attempt,
            "correlation_id": self.correlation_id,
            "traceparent": self.traceparent,
        }
        if self.deadline is not None:
            body["deadline"] = format_deadline(self.deadline)
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def environment(self) -> dict[str, str]:
        """The same trace context, for the container's environment (contract)."""
        return {
            "TRACEPARENT": self.traceparent,
            "WORKERHOST_CORRELATION_ID": self.correlation_id,
            "WORKERHOST_TASK_ID": self.id,
            "WORKERHOST_ATTEMPT": str(self.attempt),
        }


def format_deadline(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z: ``2026-11-25T17:00:30.120Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class ErrorInfo:
    """Why a task failed: a short type and a message for a person."""

    type: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}

    def __str__(self) -> str:
        """``Type: message``, as logs, events and the PrismQ API show it."""
        return f"{self.type}: {self.message}"


@dataclass(frozen=True)
class ContainerEnd:
    """What the runner observed of one container, the input of ``classify``."""

    exit_code: int | None
    stdout: bytes = b""
    oom_killed: bool = False
    deadline_hit: bool = False
    cap_hit: str | None = None  # "stdout" or "stderr" when that stream passed its cap
    cap_bytes: int = 0
    timeout: float = 0.0
    memory: int = 0
    engine_error: ErrorInfo | None = None  # what the runner was doing, and what the engine said
    engine_fault: EngineFault | None = None  # set whenever engine_error is: the kind decides the outcome
    stderr_tail: bytes = b""
    strict: bool = False  # it ran under gVisor

    def __post_init__(self) -> None:
        # Without its kind an engine error could only be passed through, which is what this field replaced.
        if self.engine_error is not None and self.engine_fault is None:
            raise ValueError("a ContainerEnd with an engine_error needs its engine_fault")


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, and whether another attempt could help."""

    status: Status
    retriable: bool = False
    result: Any = None
    error: ErrorInfo | None = None
    exit_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.COMPLETED


_QUOTE = 200
_TYPE_LIMIT = 200  # characters of a worker's error type that are kept
_MESSAGE_LIMIT = 8192  # and of its message


def classify(end: ContainerEnd) -> Outcome:
    """Turn one container's end into an outcome (the table in README.md, "Worker protocol v1")."""
    code = end.exit_code
    if end.engine_fault is not None:
        return _engine_outcome(end.engine_fault, end.engine_error, code)
    if end.deadline_hit:
        return Outcome(
            Status.TIMEOUT,
            error=ErrorInfo("Timeout", f"killed at the deadline after {end.timeout:g}s"),
            exit_code=code,
        )
    if end.cap_hit is not None:
        return _failed(
            "OutputLimitExceeded",
            f"{end.cap_hit} passed its cap of {_human(end.cap_bytes)}; the container was killed",
            retriable=False,
            code=code,
        )
    if end.oom_killed:
        limit = f" of {_human(end.memory)}" if end.memory else ""
        return _failed(
            "MemoryLimitExceeded",
            f"killed by the memory limit{limit} (OOMKilled); raise the worker's memory",
            retriable=False,
            code=code,
        )
    if code == ExitCode.TIMEOUT:
        error = _reported_error(end.stdout) or ErrorInfo("Timeout", "the worker reported a timeout (exit 3)")
        return Outcome(Status.TIMEOUT, error=error, exit_code=code)
    if code in (ExitCode.RETRIABLE, ExitCode.PERMANENT):
        retriable = code == ExitCode.RETRIABLE
        error = _reported_error(end.stdout) or ErrorInfo(
            "WorkerFailed", f"exited with code {code}{_last_line(end.stderr_tail)}{_sandbox_hint(end)}"
        )
        return Outcome(Status.FAILED, retriable=retriable, error=error, exit_code=code)
    if code == ExitCode.OK:
        return _from_stdout(end.stdout, code)
    message = f"exited with code {_describe_code(code)}{_last_line(end.stderr_tail)}"
    return _failed("WorkerCrashed", message, retriable=False, code=code)


def _engine_outcome(fault: EngineFault, error: ErrorInfo | None, code: int | None) -> Outcome:
    """The engine rows of the table: the fault's kind decides; the runner's words say what failed."""
    if error is None:
        error = ErrorInfo("EngineError", f"the Docker engine failed ({fault})")
    if fault is EngineFault.IMAGE_MISSING:
        error = ErrorInfo("ImageMissing", f"{error.message}; {_IMAGE_ADVICE}")
    return Outcome(Status.FAILED, retriable=engine_retriable(fault), error=error, exit_code=code)


def _from_stdout(stdout: bytes, code: int) -> Outcome:
    reply, problem = parse_reply(stdout)
    if reply is None:
        return _failed("InvalidOutput", problem, retriable=False, code=code)
    if reply["success"] is True:
        result = reply.get("result")
        # What cannot be stored and read back as JSON is not a result: NaN, a lone surrogate, a bomb.
        unreadable = jsondata.problem(result, "result")
        if unreadable is not None:
            return _failed("InvalidOutput", f"the result cannot be stored as JSON: {unreadable}", False, code)
        return Outcome(Status.COMPLETED, result=result, exit_code=code)
    error = _error_info(reply)
    return Outcome(Status.FAILED, retriable=_retriable(reply), error=error, exit_code=code)


def parse_reply(stdout: bytes) -> tuple[dict[str, Any] | None, str]:
    """The worker's result object, or None and what is wrong with stdout."""
    if not stdout.strip():
        return None, "the worker wrote nothing on stdout (expected one JSON object)"
    try:
        reply = json.loads(stdout)
    except RecursionError:
        return None, f"stdout is JSON nested too deep to read: {_quote(stdout)}"
    except (ValueError, UnicodeDecodeError):
        return None, f"stdout is not one JSON object: {_quote(stdout)}"
    if not isinstance(reply, dict):
        return None, f"stdout is JSON but not an object: {_quote(stdout)}"
    if not isinstance(reply.get("success"), bool):
        return None, f'the result object has no boolean "success": {_quote(stdout)}'
    return reply, ""


def _reported_error(stdout: bytes) -> ErrorInfo | None:
    reply, _ = parse_reply(stdout)
    if reply is None or reply["success"] is not False:
        return None
    return _error_info(reply)


def _error_info(reply: dict[str, Any]) -> ErrorInfo:
    error = reply.get("error")
    if isinstance(error, dict):
        kind = error.get("type")
        message = error.get("message")
        return ErrorInfo(
            _text(kind, _TYPE_LIMIT) if kind else "WorkerError",
            _text(message, _MESSAGE_LIMIT) if message is not None else "the worker reported a failure",
        )
    if isinstance(error, str):
        return ErrorInfo("WorkerError", _text(error, _MESSAGE_LIMIT))
    return ErrorInfo("WorkerError", "the worker reported a failure without details")


def _text(value: Any, limit: int) -> str:
    """A worker's word as text that can be stored and shown: any JSON value, no lone surrogates, bounded."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)[: limit * 2]
    return jsondata.clean_text(text, limit)


def _retriable(reply: dict[str, Any]) -> bool:
    error = reply.get("error")
    return isinstance(error, dict) and error.get("retriable") is True


def _failed(kind: str, message: str, retriable: bool, code: int | None) -> Outcome:
    return Outcome(Status.FAILED, retriable=retriable, error=ErrorInfo(kind, message), exit_code=code)


def _quote(data: bytes) -> str:
    head = data[:_QUOTE]
    more = f" ... ({len(data)} bytes)" if len(data) > _QUOTE else ""
    return repr(head)[1:] + more


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return f": {lines[-1][:_QUOTE]}" if lines else ""


def _sandbox_hint(end: ContainerEnd) -> str:
    # gVisor itself exits 2 when it cannot make a thread (pids_limit): say so when nothing else spoke.
    if end.strict and end.exit_code == ExitCode.PERMANENT and not end.stdout.strip():
        return '; under sandbox = "strict" this is also how gVisor dies when it hits pids_limit'
    return ""


def _describe_code(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code > 128:
        try:
            return f"{code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return str(code)


def _human(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            value = size / factor
            return f"{value:g} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"
