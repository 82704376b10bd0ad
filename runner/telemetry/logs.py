"""Structured logs: one JSON object per line, or a readable line on a terminal.

Stable keys on every line: ``ts``, ``level``, ``event``, and for a task's lines
``task_id``, ``correlation_id``, ``trace_id``, ``span_id``, ``worker``,
``attempt``; anything else the event carries follows. A record gets its keys
through ``extra={"fields": {...}}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

KEYS = ("ts", "level", "event", "task_id", "correlation_id", "trace_id", "span_id", "worker", "attempt")


def configure(log_format: str = "auto", level: int = logging.INFO) -> None:
    """Log to stderr in ``json`` or ``console`` form (``auto``: console on a terminal).

    ``WORKERHOST_LOG_FORMAT`` overrides the config.
    """
    chosen = os.environ.get("WORKERHOST_LOG_FORMAT") or log_format
    if chosen == "auto":
        chosen = "console" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record as the stable keys and the event's own, in that order."""
    fields: dict[str, Any] = getattr(record, "fields", None) or {}
    out: dict[str, Any] = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record.levelname.lower(),
        "event": fields.get("event") or record.getMessage(),
    }
    for key in KEYS[3:]:
        if fields.get(key) is not None:
            out[key] = fields[key]
    for key, value in fields.items():
        if key not in out and key != "event" and value is not None:
            out[key] = value
    if not fields:
        out["logger"] = record.name
    elif record.getMessage() != out["event"]:
        out["message"] = record.getMessage()
    if record.exc_info:
        out["exception"] = logging.Formatter().formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(fields_of(record), ensure_ascii=False, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = fields_of(record)
        head = f"{fields.pop('ts')[11:23]} {fields.pop('level'):<7} {fields.pop('event')}"
        fields.pop("trace_id", None)
        fields.pop("span_id", None)
        exception = fields.pop("exception", None)
        message = fields.pop("message", None)
        line = (
            head
            + (f"  {message}" if message else "")
            + "".join(f" {k}={v}" for k, v in fields.items() if k != "logger")
        )
        return line + (f"\n{exception}" if exception else "")
