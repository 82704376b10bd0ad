"""OpenTelemetry tracing, as a hook on the host's events.

One trace per task: the submit (continuing the producer's ``traceparent``,
if it sent one; a task that came without trace context gets a root ``task``
span instead), the claim (``receive``), then for each attempt an ``attempt``
span with the container's ``create``, ``start``, ``exchange`` and
``teardown`` as children, and the spans the worker opened inside the
container (sent over the SDK's side channel with their own ids and times) as
children of the attempt.

The hook only records. The host mints every span's context before the span
exists (``runner.telemetry.context``) and passes it in the event: the
attempt's context is what the container gets as ``TRACEPARENT``, so a worker
that exports on its own lands under the attempt too. The spans are built
whole, with those ids and the times the events carry, and handed to the
exporter's span processor; a context not sampled is not exported.

Exported with OTLP (http/protobuf by default, gRPC when asked) to
``[telemetry] otlp_endpoint`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``; with neither,
nothing is set up and the hook costs nothing.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from runner import __version__
from runner.config import TelemetryConfig
from runner.telemetry import events, otlp_endpoint
from runner.telemetry.context import TraceContext, child_of, parse
from runner.telemetry.events import Event

_SCOPE = InstrumentationScope("workerhost", __version__)
_MAX_OPEN = 10_000  # attempts started and not finished, and root spans already exported
_MAX_PROGRESS = 128  # progress events kept on one attempt span (the latest), as the SDK's span limits would


def exporter_for(config: TelemetryConfig) -> SpanExporter | None:
    """The OTLP exporter the config and the ``OTEL_*`` variables ask for, or None for no export."""
    endpoint = otlp_endpoint(config)
    if not endpoint:
        return None
    protocol = config.otlp_protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    traces = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=traces)


@dataclass
class _Open:
    """What an attempt span needs from AttemptStarted and TaskProgress until AttemptFinished."""

    started: events.AttemptStarted
    progress: deque[SpanEvent] = field(default_factory=lambda: deque(maxlen=_MAX_PROGRESS))


class Tracing:
    """The tracing hook. ``enabled`` is False (and every call returns at once) without an exporter."""

    def __init__(self, config: TelemetryConfig, exporter: SpanExporter | None = None) -> None:
        exporter = exporter if exporter is not None else exporter_for(config)
        self.enabled = exporter is not None
        self._processor: SpanProcessor | None = None
        self._attempts: OrderedDict[str, _Open] = OrderedDict()  # task id -> its attempt now running
        self._roots: OrderedDict[str, None] = OrderedDict()  # task ids whose root span is exported
        if exporter is None:
            return
        name = os.environ.get("OTEL_SERVICE_NAME") or config.service_name
        # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES.
        self._resource = Resource.create({SERVICE_NAME: name, "service.version": __version__})
        self._processor = BatchSpanProcessor(exporter, schedule_delay_millis=500)

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        match event:
            case events.TaskSubmitted():
                self._submitted(event)
            case events.TaskReceived():
                self._received(event)
            case events.AttemptStarted():
                _remember(self._attempts, event.task_id or "", _Open(event))
            case events.TaskProgress():
                self._progress(event)
            case events.WorkerSpanReceived():
                self._worker_span(event)
            case events.AttemptFinished():
                self._attempt_finished(event)
            case events.TaskCompleted() | events.TaskFailed():  # done for good: it will not be received again
                self._attempts.pop(event.task_id or "", None)
                self._roots.pop(event.task_id or "", None)
            case events.TaskRetrying() | events.TaskReturned() | events.TaskReleased() | events.LeaseLost():
                self._attempts.pop(event.task_id or "", None)  # the task may come back: keep its root

    def span_context(self, parent: str | None) -> str | None:
        """The context of a new span under ``parent`` (a new trace without one); None when disabled,
        so that the caller passes the parent's context on unchanged."""
        return str(child_of(parent)) if self.enabled else None

    def shutdown(self) -> None:
        """Export what is pending (called when the host stops)."""
        if self._processor is not None:
            self._processor.shutdown()

    # -- events -----------------------------------------------------------------

    def _submitted(self, event: events.TaskSubmitted) -> None:
        context = parse(event.traceparent)
        if context is None:
            return
        end = event.end_ns or time.time_ns()
        name, parent = f"submit {event.task_type}", parse(event.parent)
        self._export(name, context, parent, event.start_ns or end, end, _task_attributes(event), kind=SpanKind.SERVER)

    def _received(self, event: events.TaskReceived) -> None:
        task = parse(event.traceparent)
        if task is None:
            return
        now = time.time_ns()
        start = event.claim_started_ns or now
        attributes = _task_attributes(event)
        # A root made from the task id is the same on every claim: export it once, not once per retry.
        if event.root and (event.task_id or "") not in self._roots:
            _remember(self._roots, event.task_id or "", None)
            self._export(f"task {event.task_type}", task, None, start, now, attributes)
        self._export(f"receive {event.task_type}", child_of(task), task, start, now, attributes, kind=SpanKind.CONSUMER)

    def _progress(self, event: events.TaskProgress) -> None:
        opened = self._attempts.get(event.task_id or "")
        if opened is not None:
            attributes = {"percent": event.percent, "message": event.message}
            opened.progress.append(SpanEvent("progress", _present(attributes), time.time_ns()))

    def _worker_span(self, event: events.WorkerSpanReceived) -> None:
        """A span from inside the container: exported as the worker made it, ids and times included."""
        worker, attempt = event.span, parse(event.traceparent)
        if worker is None or (attempt is not None and not attempt.sampled):
            return
        context = TraceContext(f"{worker.trace_id:032x}", f"{worker.span_id:016x}")
        parent = TraceContext(context.trace_id, f"{worker.parent_id:016x}") if worker.parent_id else None
        attributes: dict[str, Any] = {**worker.attributes, **_task_attributes(event), "workerhost.source": "worker"}
        status = Status(StatusCode.ERROR, worker.error) if worker.error else Status(StatusCode.UNSET)
        start, end = int(worker.start * 1e9), int(worker.end * 1e9)
        self._export(worker.name, context, parent, start, end, attributes, status=status)

    def _attempt_finished(self, event: events.AttemptFinished) -> None:
        opened = self._attempts.pop(event.task_id or "", None)
        if opened is not None and opened.started.traceparent != event.traceparent:
            opened = None  # its start was missed: the event's own fields suffice
        context = parse(event.traceparent)
        if context is None:
            return
        started = opened.started if opened is not None else None
        end = event.end_ns or time.time_ns()
        start = event.start_ns or (started.start_ns if started is not None else 0) or end
        parent = parse(event.parent or (started.parent if started is not None else None))
        for name, phase_start, phase_end in event.phases:
            phase = {**_task_attributes(event), "container.id": event.container_id if name != "create" else None}
            self._export(f"container.{name}", child_of(context), context, phase_start, phase_end, _present(phase))
        span_events = list(opened.progress) if opened is not None else []
        status = Status(StatusCode.UNSET)
        if event.outcome != "completed":
            message = event.error or event.outcome
            status = Status(StatusCode.ERROR, message)
            kind, _, text = message.partition(": ")
            span_events.append(SpanEvent("exception", {"exception.type": kind, "exception.message": text or kind}, end))
        attributes = _attempt_attributes(event, started)
        self._export(
            f"attempt {event.attempt}", context, parent, start, end, attributes, status=status, span_events=span_events
        )

    def _export(
        self,
        name: str,
        context: TraceContext,
        parent: TraceContext | None,
        start: int,
        end: int,
        attributes: dict[str, Any],
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        status: Status | None = None,
        span_events: Sequence[SpanEvent] = (),
    ) -> None:
        """Hand a finished span with fixed ids to the exporter, unless its context says not sampled."""
        assert self._processor is not None
        if not context.sampled:
            return
        span = ReadableSpan(
            name=name,
            context=_otel(context, remote=False),
            parent=_otel(parent, remote=True) if parent is not None else None,
            resource=self._resource,
            attributes=BoundedAttributes(attributes=attributes),  # checks the values, as set_attribute would
            events=span_events,
            kind=kind,
            status=status or Status(StatusCode.UNSET),
            start_time=start,
            end_time=end,
            instrumentation_scope=_SCOPE,
        )
        self._processor.on_end(span)


# AttemptFinished's fields, and the attributes they become on the attempt span.
_ATTEMPT_ATTRIBUTES = {
    "outcome": "workerhost.outcome",
    "exit_code": "process.exit.code",
    "oom_killed": "workerhost.oom_killed",
    "container_id": "container.id",
    "image_id": "container.image.id",
    "stdin_bytes": "workerhost.stdin.bytes",
    "stdout_bytes": "workerhost.stdout.bytes",
    "stderr_bytes": "workerhost.stderr.bytes",
    "error": "workerhost.error",
    "duration": "workerhost.duration_seconds",
    "mode": "workerhost.container.mode",
}


def _attempt_attributes(event: events.AttemptFinished, started: events.AttemptStarted | None) -> dict[str, Any]:
    attributes = _task_attributes(event)
    if started is not None:
        attributes["workerhost.image"] = started.image
        attributes.update({f"workerhost.limits.{k}": v for k, v in _present(started.limits).items()})
    attributes.update(_present({key: getattr(event, name) for name, key in _ATTEMPT_ATTRIBUTES.items()}))
    if event.cancelled:
        attributes["workerhost.cancelled"] = True
    return attributes


def _task_attributes(event: Event) -> dict[str, Any]:
    return _present({
        "workerhost.task.id": event.task_id,
        "workerhost.task.type": event.task_type,
        "workerhost.correlation_id": event.correlation_id,
        "workerhost.worker": event.worker,
        "workerhost.attempt": event.attempt,
    })  # fmt: skip


def _present(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _otel(context: TraceContext, remote: bool) -> SpanContext:
    flags = TraceFlags(context.flags)
    return SpanContext(int(context.trace_id, 16), int(context.span_id, 16), is_remote=remote, trace_flags=flags)


def _remember(kept: OrderedDict[str, Any], key: str, value: Any) -> None:
    """Keep ``key`` as the newest entry, forgetting the oldest past ``_MAX_OPEN``."""
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > _MAX_OPEN:
        kept.popitem(last=False)
