# -*- coding: utf-8 -*-
"""workerhost worker SDK: protocol v1 in one call, for Python 2.7 and 3.x.

A worker is a function from a task to a JSON-serialisable result::

    import workerhost_sdk as sdk

    def handle(task):
        if not task.params.get("text"):
            raise sdk.PermanentError("params.text is required")
        return {"length": len(task.params["text"])}

    if __name__ == "__main__":
        sdk.run(handle)

``run`` reads the task (one JSON object on stdin), calls the handler, writes
one JSON result object on stdout and exits with the protocol's code:

* the handler returns             -> ``{"success": true, "result": ...}``, exit 0
* it raises ``RetriableError``    -> ``retriable: true``, exit 1 (the host retries)
* it raises ``TaskTimeout``       -> exit 3 (reported as a timeout, not retried)
* it raises anything else         -> ``retriable: false``, exit 2 (not retried),
  unless the exception is an instance of one of ``run(..., retry_on=(...))``
  or carries a true ``retriable`` attribute.

While the handler runs, anything written to stdout (``print``, a subprocess)
goes to stderr instead, so that stray output can never corrupt the result.

Before the handler runs, ``run`` sets ``TRACEPARENT``, ``WORKERHOST_TASK_ID``,
``WORKERHOST_CORRELATION_ID`` and ``WORKERHOST_ATTEMPT`` from the task, so that
they are right in a container started before its task (``prewarm``) and in one
that runs many (``reuse``: there ``run`` reads one task per line, writes one
result per line, and marks each task's end on stderr; the handler is the same).

Tracing without a network: ``with sdk.span("fetch", {"url": u}):`` times a
piece of work and sends it to the host on stderr's side channel (one JSON
line with a ``"workerhost"`` key); the host turns it into an OpenTelemetry
span, a child of the attempt's span, in the task's trace. Spans nest.
``sdk.progress(40, "page 2 of 5")`` reports progress the same way.

The module uses the standard library only and is a single file, so it can be
copied into any image.
"""
from __future__ import print_function

import binascii
import json
import os
import sys
import threading
import time
import traceback

__all__ = [
    "Task", "RetriableError", "PermanentError", "TaskTimeout",
    "run", "log", "span", "progress", "EXIT_OK", "EXIT_RETRIABLE", "EXIT_PERMANENT", "EXIT_TIMEOUT",
]

PROTOCOL_VERSION = 1
EXIT_OK = 0
EXIT_RETRIABLE = 1
EXIT_PERMANENT = 2
EXIT_TIMEOUT = 3

# Enough of a failing task's message for a person; the host caps what it stores.
_MAX_MESSAGE = 4000
_CHUNK = 65536


class RetriableError(Exception):
    """The task failed for a reason that may pass (a busy service, a lost lock)."""

    retriable = True


class PermanentError(Exception):
    """The task cannot succeed as given (bad params, missing data)."""

    retriable = False


class TaskTimeout(Exception):
    """The worker gave up because the task's deadline passed (exit code 3)."""


class Task(object):
    """One task as the host sent it.

    ``id``, ``type``, ``params`` (a dict), ``attempt`` (1 for the first run),
    ``correlation_id``, ``traceparent`` and ``deadline`` (an ISO 8601 UTC
    string, or None) come straight from the envelope; ``raw`` is the whole of it.
    """

    def __init__(self, envelope):
        self.raw = envelope
        self.id = envelope.get("id")
        self.type = envelope.get("type")
        self.params = envelope.get("params") or {}
        self.attempt = envelope.get("attempt", 1)
        self.correlation_id = envelope.get("correlation_id")
        self.traceparent = envelope.get("traceparent")
        self.deadline = envelope.get("deadline")

    def remaining(self):
        """Seconds left before the host's deadline, or None when there is none."""
        if not self.deadline:
            return None
        try:
            end = _parse_utc(self.deadline)
        except ValueError:
            return None
        return max(0.0, end - time.time())

    def __repr__(self):
        return "Task(id=%r, type=%r, attempt=%r)" % (self.id, self.type, self.attempt)


def log(message, **fields):
    """Write one log line to stderr; the host re-logs it with the task's ids."""
    if fields:
        message = "%s %s" % (message, " ".join("%s=%s" % kv for kv in sorted(fields.items())))
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class span(object):
    """Time a piece of work as a span of the task's trace: ``with sdk.span("name", attrs):``.

    The span is sent to the host when it ends, with its own start and end
    times; an exception inside marks it as an error (and is not swallowed).
    ``attrs`` maps names to strings, numbers or booleans; ``set(key, value)``
    adds one while the span is open. Without trace context (no TRACEPARENT),
    nothing is sent.
    """

    def __init__(self, name, attrs=None):
        self.name = name
        self.attrs = dict(attrs or {})
        self.span_id = None
        self.parent_id = None
        self.start = None

    def set(self, key, value):
        self.attrs[key] = value
        return self

    def __enter__(self):
        stack = _stack()
        self.parent_id = stack[-1].span_id if stack else _trace()[1]
        self.span_id = binascii.hexlify(os.urandom(8)).decode("ascii")
        self.start = time.time()
        stack.append(self)
        return self

    def __exit__(self, kind, value, tb):
        end = time.time()
        stack = _stack()
        if stack and stack[-1] is self:
            stack.pop()
        trace_id = _trace()[0]
        if trace_id:
            record = {
                "workerhost": "span", "trace_id": trace_id, "span_id": self.span_id,
                "parent_id": self.parent_id, "name": self.name, "start": self.start, "end": end,
                "attrs": self.attrs, "status": "ok" if kind is None else "error",
            }
            if kind is not None:
                record["error"] = "%s: %s" % (kind.__name__, _message(value))
            _side_channel(record)
        return False


def progress(percent, message=None):
    """Report how far the task has come (0 to 100), with an optional message."""
    record = {"workerhost": "progress", "percent": max(0, min(100, percent))}
    if message is not None:
        record["message"] = message
    _side_channel(record)


_local = threading.local()


def _stack():
    if not hasattr(_local, "spans"):
        _local.spans = []
    return _local.spans


def _trace():
    """(trace id, parent span id) from TRACEPARENT, or (None, None)."""
    parts = (os.environ.get("TRACEPARENT") or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return parts[1], parts[2]
    return None, None


def _side_channel(record):
    try:
        line = json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run(handler, retry_on=(), stdin=None, stdout=None, lines=None):
    """Run ``handler(task)`` under protocol v1 and exit with the protocol's code.

    ``retry_on`` is a tuple of exception classes that count as retriable
    besides ``RetriableError`` (for example ``(IOError,)``).
    ``stdin``/``stdout`` are binary streams for tests; by default the process's own.

    In a container the host reuses (``WORKERHOST_MODE=reuse``, or ``lines=True``)
    it reads tasks line by line instead, one result line each, until stdin ends.
    """
    if lines is None:
        lines = os.environ.get("WORKERHOST_MODE") == "reuse"
    code = (_serve_lines if lines else _run)(handler, tuple(retry_on), stdin, stdout)
    sys.exit(code)


def _run(handler, retry_on, stdin, stdout):
    out = stdout if stdout is not None else _claim_stdout()
    stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)
    code, body = _one(handler, retry_on, stream.read())
    _emit(out, body)
    if os.environ.get("WORKERHOST_MODE") in ("cold", "prewarm"):
        # Run by a host that reads it: the host then has the result and its code at once, and
        # leaves the exit off the task's path.
        sys.stdout.flush()
        _side_channel({"workerhost": "done", "exit_code": code})
    return code


def _serve_lines(handler, retry_on, stdin, stdout):
    """The line protocol: say "ready", then per line of stdin one result line and a "done" mark."""
    out = stdout if stdout is not None else _claim_stdout()
    stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)
    _side_channel({"workerhost": "ready", "protocol": PROTOCOL_VERSION})
    while True:
        line = stream.readline()
        if not line:
            return EXIT_OK
        if not line.strip():
            continue
        code, body = _one(handler, retry_on, line)
        _emit(out, body)
        sys.stdout.flush()  # what the handler printed (now on stderr) is this task's: before the mark
        _side_channel({"workerhost": "done", "exit_code": code})


def _one(handler, retry_on, data):
    """One task from its JSON text: (exit code, result body)."""
    try:
        envelope = _parse_envelope(data)
    except ValueError as exc:
        return EXIT_PERMANENT, _failure("InvalidTask", str(exc), False)
    _adopt(envelope)
    try:
        result = handler(Task(envelope))
        body = _dumps({"success": True, "result": result})
    except TaskTimeout as exc:
        return EXIT_TIMEOUT, _failure("TaskTimeout", _message(exc), False)
    except Exception as exc:  # the handler's failures are the protocol's business
        retriable = isinstance(exc, retry_on) or bool(getattr(exc, "retriable", False))
        traceback.print_exc(file=sys.stderr)
        return (EXIT_RETRIABLE if retriable else EXIT_PERMANENT), _failure(type(exc).__name__, _message(exc), retriable)
    return EXIT_OK, body


def _parse_envelope(data):
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    if not data.strip():
        raise ValueError("no task on stdin (expected one JSON object)")
    envelope = json.loads(data)
    if not isinstance(envelope, dict):
        raise ValueError("the task is not a JSON object")
    if not isinstance(envelope.get("params", {}), dict):
        raise ValueError("the task's params are not a JSON object")
    return envelope


# The task's ids in the environment, as a cold container has them from its start: a warm
# container (prewarmed or reused) was started before its task was known.
_ENVIRONMENT = (
    ("traceparent", "TRACEPARENT"),
    ("correlation_id", "WORKERHOST_CORRELATION_ID"),
    ("id", "WORKERHOST_TASK_ID"),
    ("attempt", "WORKERHOST_ATTEMPT"),
)


_adopted = set()  # the names _adopt set, so that a reused container's next task cannot inherit them


def _adopt(envelope):
    """Set the task's ids in the environment from its envelope.

    What the envelope lacks stays as the container's environment has it, unless
    an earlier task of this process set it (then it is removed).
    """
    for key, name in _ENVIRONMENT:
        value = envelope.get(key)
        text = None
        if value is not None and not isinstance(value, (dict, list)):
            text = u"%s" % (value,)
            if str is bytes:  # Python 2: the environment holds byte strings
                text = text.encode("utf-8")
            if "\0" in text:
                text = None
        if text is not None:
            os.environ[name] = text
            _adopted.add(name)
        elif name in _adopted:
            os.environ.pop(name, None)
            _adopted.discard(name)


def _claim_stdout():
    """Keep fd 1 for the result and point fd 1 (and sys.stdout) at stderr.

    Done at the file-descriptor level so that subprocesses and C extensions
    that print cannot write into the result either.
    """
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "wb")


def _emit(out, body):
    if not isinstance(body, bytes):
        body = body.encode("ascii")
    body += b"\n"
    # In pieces no larger than a pipe's buffer: gVisor (runsc, as Debian 12 ships it)
    # reports a larger write to stdout as done but delivers only its first 64 KiB.
    for start in range(0, len(body), _CHUNK):
        out.write(body[start:start + _CHUNK])
        out.flush()


def _dumps(obj):
    # ensure_ascii keeps the output identical on Python 2 and 3.
    try:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PermanentError("the handler's result is not JSON-serialisable: %s" % exc)


def _failure(kind, message, retriable):
    error = {"type": kind, "message": message, "retriable": retriable}
    return json.dumps({"success": False, "error": error}, ensure_ascii=True)


def _message(exc):
    try:
        text = u"%s" % (exc,)
    except Exception:  # a broken __str__ must not hide the failure
        text = repr(exc)
    return text[:_MAX_MESSAGE] or type(exc).__name__


def _parse_utc(value):
    import calendar

    whole, _, frac = value.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(whole[:19], "%Y-%m-%dT%H:%M:%S"))
    return seconds + (float("0." + frac) if frac.isdigit() else 0.0)
