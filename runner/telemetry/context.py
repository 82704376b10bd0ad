"""W3C trace context (``traceparent``), minted and read without a tracer.

The host decides every span's ids itself, before the span is recorded: the
container gets its attempt's context at start, a refused submit never makes a
span, and the tracing hook only records what the events say. A task that came
without trace context gets a root derived from its id, so every attempt of it,
on any host, lands in one trace.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
SAMPLED = 0x01


@dataclass(frozen=True)
class TraceContext:
    """One span's place in a trace."""

    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits, not all zero
    flags: int = SAMPLED

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def parse(traceparent: str | None) -> TraceContext | None:
    """A ``traceparent`` of version 00 as a context, or None when it is missing or malformed."""
    if not traceparent:
        return None
    match = _TRACEPARENT.match(traceparent.strip())
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16))


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id a ``traceparent`` names, or None."""
    found = parse(traceparent)
    return found.trace_id if found is not None else None


def trace_of_task(task_id: str, traceparent: str | None) -> str:
    """The trace a task's attempts belong to: the one it came with, else the one derived from its id."""
    return trace_id_of(traceparent) or root_for(task_id).trace_id


def child_of(parent: str | TraceContext | None) -> TraceContext:
    """A new span's context: in ``parent``'s trace (with its flags), or in a new trace without one."""
    context = parse(parent) if isinstance(parent, str) or parent is None else parent
    if context is None:
        return TraceContext(_nonzero(16), _nonzero(8))
    return TraceContext(context.trace_id, _nonzero(8), context.flags)


def root_for(task_id: str) -> TraceContext:
    """The root of a task that came without trace context: the same for every attempt, on every host."""
    digest = hashlib.sha256(f"workerhost-task:{task_id}".encode()).hexdigest()
    trace_id, span_id = digest[:32], digest[32:48]
    return TraceContext(trace_id if trace_id.strip("0") else "1" * 32, span_id if span_id.strip("0") else "1" * 16)


def _nonzero(size: int) -> str:
    while True:
        value = secrets.token_hex(size)
        if value.strip("0"):
            return value
