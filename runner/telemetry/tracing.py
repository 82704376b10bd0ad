"""OpenTelemetry tracing, as a hook on the host's events.

One trace per task: the submit (or the producer's own span, from an incoming
``traceparent``), then for each attempt an ``attempt`` span with the
container's ``create``, ``start``, ``exchange`` and ``teardown`` as children,
and the spans the worker opened inside the container (sent over the SDK's
side channel with their own ids and times) as children of the attempt. The
attempt's context is what the container gets as ``TRACEPARENT``, so a worker
that exports on its own lands in the same trace.

Exported with OTLP (http/protobuf by default, gRPC when asked) to
``[telemetry] otlp_endpoint`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``; with neither,
nothing is set up and the hook costs nothing.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from runner import __version__
from runner.config import TelemetryConfig
from runner.sidechannel import WorkerSpan
from runner.telemetry import events
from runner.telemetry.events import Event

log = logging.getLogger(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()
_SCOPE = "workerhost"
_MAX_TASKS = 10_000  # task contexts kept for retries


def exporter_for(config: TelemetryConfig) -> SpanExporter | None:
    """The OTLP exporter the config and the ``OTEL_*`` variables ask for, or None for no export."""
    endpoint = config.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not endpoint:
        return None
    protocol = config.otlp_protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    traces = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=traces)


class Tracing:
    """The tracing hook. ``enabled`` is False (and every call returns at once) without an exporter."""

    def __init__(self, config: TelemetryConfig, exporter: SpanExporter | None = None) -> None:
        exporter = exporter if exporter is not None else exporter_for(config)
        self.enabled = exporter is not None
        self._provider: TracerProvider | None = None
        self._processor: SpanProcessor | None = None
        self._attempts: dict[str, trace.Span] = {}
        # task id -> the context its attempts hang from; kept across retries (bounded)
        self._parents: OrderedDict[str, Context] = OrderedDict()
        if exporter is None:
            return
        name = os.environ.get("OTEL_SERVICE_NAME") or config.service_name
        # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES.
        resource = Resource.create({SERVICE_NAME: name, "service.version": __version__})
        self._provider = TracerProvider(resource=resource)
        self._processor = BatchSpanProcessor(exporter, schedule_delay_millis=500)
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer(_SCOPE, __version__)

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        handler = _HANDLERS.get(event.name)
        if handler is not None:
            handler(self, event)

    def shutdown(self) -> None:
        """Export what is pending (called when the host stops)."""
        if self._provider is not None:
            self._provider.shutdown()

    # -- events -----------------------------------------------------------------

    def _submitted(self, event: Event) -> None:
        carrier: dict[str, str] = event.data["carrier"]
        parent = _PROPAGATOR.extract(carrier)
        span = self._tracer.start_span(
            f"submit {event.task_type}", context=parent, kind=SpanKind.SERVER, attributes=_task_attributes(event)
        )
        span.end()
        carrier.clear()
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))

    def _received(self, event: Event) -> None:
        assert event.task_id is not None
        parent = _PROPAGATOR.extract({"traceparent": event.traceparent} if event.traceparent else {})
        if not trace.get_current_span(parent).get_span_context().is_valid:
            if event.task_id in self._parents:  # a retry of a task that came without trace context
                parent = self._parents[event.task_id]
            else:  # no trace context came with the task: it starts here
                root = self._tracer.start_span(f"task {event.task_type}", attributes=_task_attributes(event))
                root.end()
                parent = trace.set_span_in_context(root)
        claimed = event.data.get("claim_started_ns")
        span = self._tracer.start_span(
            f"receive {event.task_type}", context=parent, kind=SpanKind.CONSUMER,
            attributes=_task_attributes(event), start_time=claimed,
        )  # fmt: skip
        span.end()
        self._parents[event.task_id] = parent
        self._parents.move_to_end(event.task_id)
        while len(self._parents) > _MAX_TASKS:
            self._parents.popitem(last=False)

    def _attempt_started(self, event: Event) -> None:
        assert event.task_id is not None
        parent = self._parents.get(event.task_id, Context())
        attributes = {**_task_attributes(event), **_prefixed(event.data.get("limits", {}), "workerhost.limits.")}
        attributes["workerhost.image"] = event.data.get("image", "")
        span = self._tracer.start_span(f"attempt {event.attempt}", context=parent, attributes=attributes)
        self._attempts[event.task_id] = span
        _PROPAGATOR.inject(event.data["carrier"], context=trace.set_span_in_context(span))

    def _attempt_finished(self, event: Event) -> None:
        assert event.task_id is not None
        span = self._attempts.pop(event.task_id, None)
        if span is None:
            return
        data = event.data
        context = trace.set_span_in_context(span)
        for name, start, end in data.get("phases", ()):
            child = self._tracer.start_span(f"container.{name}", context=context, start_time=start)
            if name != "create" and data.get("container_id"):
                child.set_attribute("container.id", data["container_id"])
            child.set_attribute("workerhost.correlation_id", event.correlation_id or "")
            child.end(end_time=end)
        for key, value in data.items():
            if key in _ATTEMPT_ATTRIBUTES and value is not None:
                span.set_attribute(_ATTEMPT_ATTRIBUTES[key], value)
        if data.get("outcome") != "completed":
            message = data.get("error") or data.get("outcome", "failed")
            span.set_status(Status(StatusCode.ERROR, message))
            kind, _, text = str(message).partition(": ")
            span.add_event("exception", {"exception.type": kind, "exception.message": text or kind})
        span.end()

    def _worker_span(self, event: Event) -> None:
        """A span from inside the container: exported as the worker made it, ids and times included."""
        assert self._processor is not None and self._provider is not None
        worker: WorkerSpan = event.data["span"]
        context = SpanContext(
            worker.trace_id, worker.span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)
        )
        parent = (
            SpanContext(worker.trace_id, worker.parent_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
            if worker.parent_id
            else None
        )
        attributes: dict[str, Any] = {**worker.attributes, **_task_attributes(event), "workerhost.source": "worker"}
        status = Status(StatusCode.ERROR, worker.error) if worker.error else Status(StatusCode.UNSET)
        span = ReadableSpan(
            name=worker.name,
            context=context,
            parent=parent,
            resource=self._provider.resource,
            attributes=attributes,
            kind=SpanKind.INTERNAL,
            status=status,
            start_time=int(worker.start * 1e9),
            end_time=int(worker.end * 1e9),
            instrumentation_scope=InstrumentationScope(_SCOPE, __version__),
        )
        self._processor.on_end(span)

    def _progress(self, event: Event) -> None:
        span = self._attempts.get(event.task_id or "")
        if span is not None:
            span.add_event("progress", {k: v for k, v in event.data.items() if v is not None})

    def _attempt_over(self, event: Event) -> None:
        """The attempt ended but the task may be tried again: keep its context for the next attempt."""
        self._attempts.pop(event.task_id or "", None)

    def _done(self, event: Event) -> None:
        self._parents.pop(event.task_id or "", None)
        self._attempts.pop(event.task_id or "", None)


_HANDLERS = {
    events.TASK_SUBMITTED: Tracing._submitted,
    events.TASK_RECEIVED: Tracing._received,
    events.ATTEMPT_STARTED: Tracing._attempt_started,
    events.ATTEMPT_FINISHED: Tracing._attempt_finished,
    events.WORKER_SPAN: Tracing._worker_span,
    events.TASK_PROGRESS: Tracing._progress,
    events.TASK_COMPLETED: Tracing._done,
    events.TASK_FAILED: Tracing._done,
    events.TASK_RETRYING: Tracing._attempt_over,
    events.TASK_RETURNED: Tracing._attempt_over,
    events.TASK_RELEASED: Tracing._attempt_over,
    events.LEASE_LOST: Tracing._attempt_over,
}

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
}


def _task_attributes(event: Event) -> dict[str, Any]:
    attributes = {
        "workerhost.task.id": event.task_id,
        "workerhost.task.type": event.task_type,
        "workerhost.correlation_id": event.correlation_id,
        "workerhost.worker": event.worker,
        "workerhost.attempt": event.attempt,
    }
    return {k: v for k, v in attributes.items() if v is not None}


def _prefixed(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in values.items() if v is not None}
