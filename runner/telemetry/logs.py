"""Structured logs: one JSON object per line, or a readable line on a terminal.

Stable keys on every line: ``ts``, ``level``, ``event``, and for a task's lines
``task_id``, ``correlation_id``, ``trace_id``, ``span_id``, ``worker``,
``attempt``; anything else the event carries follows. A record gets its keys
through ``extra={"fields": {...}}``.

Much of what is logged comes from outside (a worker's stderr lines, a
caller's request), so neither formatter trusts it: in JSON every line is one
object whatever the record holds, and on a terminal every character that a
terminal would act on (ESC, BEL, CR, a newline...) is written as an escape.
A formatter never raises: a record it cannot format whole would be lost.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

KEYS = ("ts", "level", "event", "task_id", "correlation_id", "trace_id", "span_id", "worker", "attempt")
# Loggers that libraries may have given handlers of their own (uvicorn's dictConfig does): ours takes them.
ROUTED = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")

# What a terminal acts on or cannot print: C0 controls, DEL, C1 controls, the line and paragraph
# separators, the bidi overrides and isolates that reorder what is shown, and lone surrogates.
_BIDI = "\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}\ud800-\udfff]")
# json.dumps escapes C0 and nothing else; these it leaves raw (a line splitter may cut at U+2028 or U+0085).
_UNSAFE_IN_JSON = re.compile(f"[\x7f-\x9f\u2028\u2029{_BIDI}\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_JSON_OPTIONS: dict[str, Any] = {"ensure_ascii": False, "allow_nan": False}


def configure(log_format: str = "auto", level: int = logging.INFO) -> None:
    """Log to stderr in ``json`` or ``console`` form (``auto``: console on a terminal).

    ``WORKERHOST_LOG_FORMAT`` overrides the config. Everything that would
    otherwise write to stderr by itself goes through the same handler:
    uvicorn's loggers, ``warnings``, and exceptions that end a thread or are
    raised where nobody can catch them (``__del__``).
    """
    chosen = (os.environ.get("WORKERHOST_LOG_FORMAT") or log_format).strip().lower()
    if chosen not in ("json", "console"):
        chosen = "console" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in ROUTED:
        routed = logging.getLogger(name)
        routed.handlers.clear()
        routed.propagate = True
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def structured() -> bool:
    """Whether ``configure`` has put its handler on the root logger (so stderr is for log lines only)."""
    return any(isinstance(h.formatter, JsonFormatter | ConsoleFormatter) for h in logging.getLogger().handlers)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record as the stable keys and the event's own, in that order."""
    message = _message(record)
    fields: Any = getattr(record, "fields", None) or {}
    if not isinstance(fields, Mapping):
        fields = {"fields": fields}
    fields = {k if isinstance(k, str) else _text(k): v for k, v in fields.items()}
    out: dict[str, Any] = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": str(record.levelname).lower(),
        "event": fields.get("event") or message,
    }
    for key in KEYS[3:]:
        if fields.get(key) is not None:
            out[key] = fields[key]
    for key, value in fields.items():
        if key not in out and key != "event" and value is not None:
            out[key] = value
    if not fields:
        out["logger"] = record.name
    elif message != out["event"]:
        out["message"] = message
    if record.exc_info:
        out["exception"] = _traceback(record)
    if record.stack_info:
        out["stack"] = record.stack_info
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object a line; a value JSON cannot hold is written as its ``repr``."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            line = _dumps(fields_of(record))
        except Exception as exc:  # a formatter that raises loses the line
            line = _dumps(_unformattable(record, exc))
        return _UNSAFE_IN_JSON.sub(_json_escape, line)


class ConsoleFormatter(logging.Formatter):
    """One readable line (and the record's traceback below it), with control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            fields = fields_of(record)
        except Exception as exc:  # a formatter that raises loses the line
            fields = _unformattable(record, exc)
        head = f"{fields.pop('ts')[11:23]} {fields.pop('level'):<7} {escape(_text(fields.pop('event')))}"
        fields.pop("trace_id", None)
        fields.pop("span_id", None)
        fields.pop("logger", None)
        below = [fields.pop(key, None) for key in ("exception", "stack")]
        message = fields.pop("message", None)
        line = (
            head
            + (f"  {escape(_text(message))}" if message else "")
            + "".join(f" {escape(k)}={escape(_text(v))}" for k, v in fields.items())
        )
        # The traceback keeps its line breaks (they are the record's own), each line escaped.
        for block in below:
            if block:
                line += "\n" + "\n".join(escape(part) for part in _text(block).split("\n"))
        return line


def escape(text: str) -> str:
    """``text`` with every character a terminal would act on written as an escape (``\\x1b``, ``\\r``)."""
    return _UNSAFE.sub(_console_escape, text)


def _console_escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escape(match: re.Match[str]) -> str:
    # Only ever inside a JSON string (everything json.dumps writes outside strings is ASCII).
    return f"\\u{ord(match.group()):04x}"


def _dumps(fields: dict[str, Any]) -> str:
    try:
        return json.dumps(fields, default=_repr, **_JSON_OPTIONS)
    except Exception:  # a cycle, NaN, a key JSON cannot hold: those fields go as their repr
        return json.dumps({k: _serialisable(v) for k, v in fields.items()}, default=_repr, **_JSON_OPTIONS)


def _serialisable(value: Any) -> Any:
    try:
        json.dumps(value, default=_repr, **_JSON_OPTIONS)
    except Exception:
        return _repr(value)
    return value


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:  # a __repr__ that raises
        return f"<unrepresentable {type(value).__name__}>"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:  # a __str__ that raises
        return _repr(value)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception as exc:  # arguments that do not fit the format: keep both
        return f"{_repr(record.msg)} % {_repr(record.args)} ({type(exc).__name__})"


def _traceback(record: logging.LogRecord) -> str:
    try:
        return logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
    except Exception as exc:
        return f"(the traceback could not be formatted: {_repr(exc)})"


def _unformattable(record: logging.LogRecord, exc: Exception) -> dict[str, Any]:
    """What is left of a record that could not be formatted: enough to find where it came from."""
    return {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": str(record.levelname).lower(),
        "event": "unformattable log record",
        "logger": record.name,
        "where": f"{record.pathname}:{record.lineno}",
        "error": _repr(exc),
    }


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value is not None else None
    logging.getLogger("workerhost").error("uncaught exception in thread %s", name, exc_info=exc_info)


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    value = unraisable.exc_value
    exc_info = (unraisable.exc_type, value, unraisable.exc_traceback) if value is not None else None
    logging.getLogger("workerhost").error(
        "%s: %s", unraisable.err_msg or "Exception ignored in", _repr(unraisable.object), exc_info=exc_info
    )
