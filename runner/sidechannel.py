"""The SDK's side channel on stderr: JSON lines with a ``"workerhost"`` key (spans, progress).

Pure, no I/O. ``StderrLines`` splits a worker's stderr into lines: side-channel
lines become events, every other line is a log line. Everything is bounded,
because the worker may be hostile: a line longer than ``MAX_LINE`` is cut and
counted, a malformed side-channel line is counted and dropped, and past
``MAX_SPANS`` spans per attempt the rest are counted and dropped (past
``MAX_LOG_LINES`` log lines, ``relog()`` says no). ``problems()`` says what was dropped, for one warning.

Side channel v1 (what the SDK writes, one JSON object per line)::

    {"workerhost": "span", "trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_id": "<16 hex>",
     "name": "fetch", "start": 1764090000.123, "end": 1764090000.456,
     "attrs": {"k": "v"}, "status": "ok" | "error", "error": "message"?}
    {"workerhost": "progress", "percent": 40, "message": "page 2 of 5"?}

and, from a worker that reads tasks line by line (``reuse``, README "Reuse"), the marks
that frame its tasks::

    {"workerhost": "ready"}                  it reads tasks line by line (once, at its start)
    {"workerhost": "done", "exit_code": 0}   its task's result line is written; the code it would exit with
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MAX_LINE = 64 * 1024
MAX_SPANS = 1000
MAX_LOG_LINES = 1000
MAX_ATTRS = 64
_HEX = re.compile(r"^[0-9a-f]+$")
_MARK = b'"workerhost"'
_CLAIM = re.compile(rb'^\{\s*"workerhost"')


@dataclass(frozen=True)
class WorkerSpan:
    """A span the worker opened and closed, with its own ids and times (seconds since the epoch)."""

    trace_id: int
    span_id: int
    parent_id: int | None
    name: str
    start: float
    end: float
    attributes: dict[str, str | int | float | bool]
    error: str | None = None


@dataclass(frozen=True)
class Progress:
    percent: float
    message: str | None = None


@dataclass(frozen=True)
class Mark:
    """A line-protocol mark: ``ready`` (the worker reads tasks line by line) or ``done`` (a task's end)."""

    kind: str
    exit_code: int = 0


Item = str | WorkerSpan | Progress | Mark


@dataclass
class StderrLines:
    """Feeds on stderr bytes; yields log lines and side-channel events as whole lines arrive."""

    spans: int = 0
    log_lines: int = 0
    dropped_spans: int = 0
    dropped_lines: int = 0
    malformed: int = 0
    long_lines: int = 0
    _partial: bytearray = field(default_factory=bytearray)
    _skipping: bool = False  # inside a line that is already too long

    def feed(self, data: bytes) -> list[Item]:
        """Whatever complete lines ``data`` finishes: a str for a log line, else an event."""
        out: list[Item] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._keep(data[start:])
                return out
            self._keep(data[start:end])
            line, skipped = bytes(self._partial), self._skipping
            self._partial.clear()
            self._skipping = False
            item = self._line(line, cut=skipped)
            if item is not None:
                out.append(item)
            start = end + 1

    def flush(self) -> list[Item]:
        """The last line, if the stream ended without a newline."""
        if not self._partial and not self._skipping:
            return []
        return self.feed(b"\n")

    def problems(self) -> str | None:
        """One sentence on what was dropped or cut, or None."""
        parts = []
        if self.malformed:
            parts.append(f"{self.malformed} malformed side-channel lines ignored")
        if self.long_lines:
            parts.append(f"{self.long_lines} lines over {MAX_LINE // 1024} KiB cut")
        if self.dropped_spans:
            parts.append(f"{self.dropped_spans} spans beyond {MAX_SPANS} dropped")
        if self.dropped_lines:
            parts.append(f"{self.dropped_lines} log lines beyond {MAX_LOG_LINES} not re-logged")
        return "; ".join(parts) or None

    def _keep(self, chunk: bytes) -> None:
        if self._skipping:
            return
        room = MAX_LINE - len(self._partial)
        if len(chunk) > room:
            self._partial += chunk[:room]
            self._skipping = True
            self.long_lines += 1
        else:
            self._partial += chunk

    def _line(self, line: bytes, cut: bool) -> Item | None:
        kind, obj = _classify(line, cut)
        if kind == "side":
            event = _event(obj) if obj is not None else None
            if event is None:
                self.malformed += 1
                return None
            if isinstance(event, WorkerSpan):
                if self.spans >= MAX_SPANS:
                    self.dropped_spans += 1
                    return None
                self.spans += 1
            return event
        self.log_lines += 1
        return line.decode("utf-8", "replace").rstrip("\r")

    def relog(self) -> bool:
        """Whether the log line just returned is still within what may be re-logged."""
        if self.log_lines > MAX_LOG_LINES:
            self.dropped_lines += 1
            return False
        return True


def is_side_channel(line: bytes) -> bool:
    """Whether a stderr line belongs to the side channel (and so is not a log line)."""
    return _classify(line, cut=False)[0] == "side"


def _classify(line: bytes, cut: bool) -> tuple[str, dict[str, Any] | None]:
    """("side", the object or None when broken) or ("log", None).

    A side-channel line is a JSON object with a "workerhost" key, wherever the
    key stands; a line that begins with that key but does not parse (or was
    cut) is a broken side-channel line. Any other line, JSON or not, is a log.
    """
    stripped = line.strip()
    if not stripped.startswith(b"{") or _MARK not in stripped:
        return "log", None
    obj = None
    if not cut:
        try:
            parsed = json.loads(stripped)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        obj = parsed if isinstance(parsed, dict) else None
    if obj is not None:
        return ("side", obj) if "workerhost" in obj else ("log", None)
    return ("side", None) if _CLAIM.match(stripped) else ("log", None)


def _event(obj: dict[str, Any]) -> WorkerSpan | Progress | Mark | None:
    kind = obj.get("workerhost")
    if kind == "span":
        return _span(obj)
    if kind == "ready":
        return Mark("ready")
    if kind == "done":
        code = obj.get("exit_code", 0)
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
            return None
        return Mark("done", code)
    if kind == "progress":
        percent = obj.get("percent")
        message = obj.get("message")
        if not isinstance(percent, int | float) or isinstance(percent, bool) or not 0 <= percent <= 100:
            return None
        return Progress(float(percent), str(message)[:1000] if message is not None else None)
    return None


def _span(obj: dict[str, Any]) -> WorkerSpan | None:
    trace_id = _hex(obj.get("trace_id"), 32)
    span_id = _hex(obj.get("span_id"), 16)
    parent = obj.get("parent_id")
    parent_id = _hex(parent, 16) if parent is not None else None
    name, start, end = obj.get("name"), _number(obj.get("start")), _number(obj.get("end"))
    if trace_id is None or span_id is None or (parent is not None and parent_id is None):
        return None
    if not isinstance(name, str) or not name or start is None or end is None or end < start:
        return None
    attrs = obj.get("attrs") or {}
    if not isinstance(attrs, dict):
        return None
    attributes: dict[str, str | int | float | bool] = {}
    for key, value in list(attrs.items())[:MAX_ATTRS]:
        if isinstance(value, str | int | float | bool):
            attributes[str(key)[:256]] = value[:4096] if isinstance(value, str) else value
        else:
            attributes[str(key)[:256]] = json.dumps(value)[:4096]
    error = None
    if obj.get("status") == "error":
        error = str(obj.get("error") or "error")[:4096]
    return WorkerSpan(trace_id, span_id, parent_id, name[:256], start, end, attributes, error)


def _hex(value: Any, length: int) -> int | None:
    if not isinstance(value, str) or len(value) != length or not _HEX.match(value):
        return None
    number = int(value, 16)
    return number or None  # all zeros is invalid in W3C trace context


def _number(value: Any) -> float | None:
    """A timestamp in seconds since the epoch, or None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e11:
        return float(value)
    return None
