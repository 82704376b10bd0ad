"""Prometheus metrics, kept up to date by a hook on the host's events."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from runner.telemetry import events
from runner.telemetry.events import Event

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


class Metrics:
    """The host's metrics in their own registry (so that several hosts in one process do not clash)."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series are noise here
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Counter(
            "workerhost_tasks", "Tasks finished, by worker and final outcome", ["worker", "outcome"], registry=r
        )
        self.attempts = Counter(
            "workerhost_attempts", "Attempts finished, by worker and outcome", ["worker", "outcome"], registry=r
        )
        self.retries = Counter("workerhost_retries", "Attempts that will be retried", ["worker"], registry=r)
        self.duration = Histogram(
            "workerhost_task_duration_seconds", "Container run time of an attempt", ["worker"],
            buckets=_DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.start_latency = Histogram(
            "workerhost_container_start_seconds", "From create to started", ["worker"],
            buckets=_START_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("workerhost_tasks_in_flight", "Tasks running now", ["worker"], registry=r)
        self.oom_kills = Counter(
            "workerhost_oom_kills", "Attempts killed by their memory limit", ["worker"], registry=r
        )
        self.timeouts = Counter("workerhost_timeouts", "Attempts that timed out", ["worker"], registry=r)
        self.lease_lost = Counter("workerhost_lease_lost", "Outcomes not reported: lease lost", registry=r)
        self.released = Counter("workerhost_tasks_released", "Tasks handed back unfinished", registry=r)
        self.source_up = Gauge("workerhost_source_up", "1 when the task source answers", registry=r)
        self.engine_up = Gauge("workerhost_engine_up", "1 when the Docker engine answers", registry=r)
        self.queue_depth = Gauge("workerhost_queue_tasks", "Tasks in the queue, by status", ["status"], registry=r)
        # Kept by the API's guard (runner/auth.py), not by events: a request is not a host event.
        self.api_requests = Counter(
            "workerhost_api_requests", "API requests answered, by route template, method and status",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.auth_failures = Counter(
            "workerhost_auth_failures", "API requests refused for their token (missing or invalid)", ["reason"],
            registry=r,
        )  # fmt: skip

    def __call__(self, event: Event) -> None:
        worker = event.worker or ""
        match event:
            case events.AttemptStarted():
                self.in_flight.labels(worker).inc()
            case events.AttemptFinished():
                self.in_flight.labels(worker).dec()
                self.attempts.labels(worker, event.outcome).inc()
                if event.oom_killed:
                    self.oom_kills.labels(worker).inc()
                if event.outcome == "timeout":
                    self.timeouts.labels(worker).inc()
                self.duration.labels(worker).observe(event.duration)
                if event.start_latency:  # 0: the container never started
                    self.start_latency.labels(worker).observe(event.start_latency)
            case events.TaskCompleted():
                self.tasks.labels(worker, "completed").inc()
            case events.TaskFailed():
                self.tasks.labels(worker, event.outcome).inc()
            case events.TaskRetrying() | events.TaskReturned():
                # TaskReturned: a source that retries by itself (PrismQ) got a failure it will hand out
                # again (a failure on the attempt its claim names as the last is TaskFailed).
                self.retries.labels(worker).inc()
            case events.LeaseLost():
                self.lease_lost.inc()
            case events.TaskReleased():
                self.released.inc()
            case events.SourceUp() | events.SourceDown():
                self.source_up.set(1 if isinstance(event, events.SourceUp) else 0)
            case events.EngineUp() | events.EngineDown():
                self.engine_up.set(1 if isinstance(event, events.EngineUp) else 0)

    def render(self) -> bytes:
        """The text exposition format, for GET /metrics."""
        return generate_latest(self.registry)
