"""The HTTP face of ``workerhost serve``: submit and inspect tasks, health, workers, metrics.

FastAPI validates requests with pydantic and serves the OpenAPI description
at ``/openapi.json`` (and a browsable one at ``/docs``). Every error is a JSON
object ``{"error": "...", "details": [...]?}`` with a 4xx status, and a
request that is refused stores nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner import __version__
from runner.errors import EngineError
from runner.host import Host
from runner.sources import SourceUnavailable
from runner.sources.embedded import STATUSES, EmbeddedQueue
from runner.telemetry import context, events
from runner.telemetry.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class TaskIn(BaseModel):
    """A task to submit."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, description="a task type that a configured worker handles")
    params: dict[str, Any] = Field(default_factory=dict, description="the task's params, a JSON object")
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=256, description="the same key returns the same task"
    )
    priority: int = Field(default=0, ge=-1000, le=1000, description="higher runs first")
    correlation_id: str | None = Field(default=None, min_length=1, max_length=128)
    traceparent: str | None = Field(
        default=None, max_length=128, description="W3C trace context to continue (the traceparent header wins)"
    )

    @field_validator("params")
    @classmethod
    def _strict_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Python's JSON reader takes NaN and Infinity; no worker's JSON parser need.
        try:
            json.dumps(value, allow_nan=False)
        except ValueError:
            raise ValueError("NaN and Infinity are not JSON numbers") from None
        return value


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        self.status = status
        self.message = message
        self.extra = extra


router = APIRouter()


def create_app(host: Host, metrics: Metrics, queue: EmbeddedQueue | None) -> FastAPI:
    """The API for one host; ``queue`` is None when tasks live in another system (PrismQ)."""
    app = FastAPI(
        title="workerhost",
        version=__version__,
        description="Run queued tasks, each in its own Docker container.",
    )
    app.state.host, app.state.metrics, app.state.queue = host, metrics, queue
    app.add_middleware(BodyLimit, limit=host.config.host.max_body)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.include_router(router)
    return app


# -- dependencies -----------------------------------------------------------------------


def _host(request: Request) -> Host:
    host: Host = request.app.state.host
    return host


def _queue(request: Request) -> EmbeddedQueue:
    queue: EmbeddedQueue | None = request.app.state.queue
    if queue is None:
        kind = request.app.state.host.config.task_manager.type
        raise ApiError(501, f"tasks live in the {kind} task manager; submit them there")
    return queue


HostDep = Annotated[Host, Depends(_host)]
QueueDep = Annotated[EmbeddedQueue, Depends(_queue)]


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A queue call, off the event loop; the queue being unavailable is a 503."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except SourceUnavailable as exc:
        raise ApiError(503, str(exc)) from None


# -- tasks ------------------------------------------------------------------------------


@router.post("/tasks", status_code=201, summary="Submit a task")
async def submit(body: TaskIn, request: Request, response: Response, host: HostDep, queue: QueueDep) -> dict[str, Any]:
    worker = host.config.worker_for(body.type)
    if worker is None:
        raise ApiError(422, f"unknown task type {body.type!r}", known=host.config.task_types())
    start_ns = time.time_ns()
    task_id = str(uuid.uuid4())
    correlation_id = body.correlation_id or uuid.uuid4().hex
    incoming = request.headers.get("traceparent") or body.traceparent
    # The submit span's context when something traces (the span is recorded only once the task is
    # stored); otherwise the caller's context goes on with the task as it came.
    traceparent = host.hooks.span_context(incoming) or incoming
    task, created = await _call(
        queue.submit, body.type, body.params, max_attempts=worker.max_retries + 1, priority=body.priority,
        idempotency_key=body.idempotency_key, correlation_id=correlation_id, traceparent=traceparent, task_id=task_id,
    )  # fmt: skip
    if not created:
        if (task["type"], task["params"]) != (body.type, body.params):
            raise ApiError(
                409, f"idempotency key {body.idempotency_key!r} already names task {task['id']} with other content"
            )
        response.status_code = 200
        return dict(task)
    host.wake()
    host.hooks.emit(
        events.TaskSubmitted(
            task_id=task_id, task_type=body.type, correlation_id=correlation_id, traceparent=traceparent,
            parent=incoming if context.parse(incoming) else None, start_ns=start_ns, end_ns=time.time_ns(),
        )
    )  # fmt: skip
    return dict(task)


@router.get("/tasks/{task_id}", summary="One task: status, attempts, result or error")
async def get_task(task_id: str, queue: QueueDep) -> dict[str, Any]:
    task = await _call(queue.get, task_id)
    if task is None:
        raise ApiError(404, f"no task {task_id}")
    return dict(task)


@router.get("/tasks", summary="Tasks, newest first")
async def list_tasks(
    queue: QueueDep,
    status: str | None = Query(default=None, description=f"one of {', '.join(STATUSES)}"),
    type: str | None = Query(default=None, description="a task type"),
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[dict[str, Any]]:
    if status is not None and status not in STATUSES:
        raise ApiError(422, f"unknown status {status!r}; expected one of: {', '.join(STATUSES)}")
    return await _call(queue.list, status, type, limit)


@router.post("/tasks/{task_id}/retry", summary="Send a failed or dead task back to the queue")
async def retry(task_id: str, host: HostDep, queue: QueueDep) -> dict[str, Any]:
    existing = await _call(queue.get, task_id)
    if existing is None:
        raise ApiError(404, f"no task {task_id}")
    worker = host.config.worker_for(existing["type"])
    max_attempts = worker.max_retries + 1 if worker is not None else None  # the worker's config as it is now
    task = await _call(queue.retry, task_id, max_attempts)
    if task is None:
        raise ApiError(409, f"task {task_id} is {existing['status']}; only failed or dead tasks can be retried")
    host.wake()
    return dict(task)


# -- the host ---------------------------------------------------------------------------


@router.get("/health", summary="Liveness: the loop, the engine and the source")
async def health(host: HostDep) -> JSONResponse:
    """Reads only: asks the engine and the source now, and changes nothing in the host."""
    engine_error = await asyncio.to_thread(host.runner.ping)
    try:
        source: dict[str, Any] = await host.source.health()
    except SourceUnavailable as exc:
        source = {"type": host.config.task_manager.type, "reachable": False, "error": str(exc)}
    if host.source_error and source.get("reachable"):
        source["last_error"] = host.source_error
    engine: dict[str, Any] = {"reachable": engine_error is None}
    if engine_error:
        engine["error"] = engine_error
    healthy = host.alive and engine_error is None and bool(source.get("reachable"))
    body = {
        "status": "ok" if healthy else ("degraded" if host.alive else "down"),
        "host": {"id": host.config.host.id, "alive": host.alive, "stopping": host.stopping.is_set(),
                 "in_flight": len(host.in_flight), "concurrency": host.config.host.concurrency},
        "engine": engine,
        "source": source,
    }  # fmt: skip
    return JSONResponse(body, status_code=200 if host.alive else 503)


@router.get("/workers", summary="Every worker: image, limits, what runs now, recent outcomes")
async def workers(host: HostDep) -> list[dict[str, Any]]:
    return [await _worker(host, name) for name in host.workers]


@router.get("/workers/{name}/health", summary="One worker's health")
async def worker_health(name: str, host: HostDep) -> dict[str, Any]:
    if name not in host.workers:
        raise ApiError(404, f"no worker {name!r}", known=list(host.workers))
    return await _worker(host, name)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_text(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    queue: EmbeddedQueue | None = request.app.state.queue
    if queue is not None:
        try:
            counts = await asyncio.to_thread(queue.counts)
        except SourceUnavailable as exc:
            log.warning("metrics: queue depth not read: %s", exc)
            counts = {}
        for status, count in counts.items():
            metrics.queue_depth.labels(status).set(count)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def _worker(host: Host, name: str) -> dict[str, Any]:
    state = host.worker_health(name)
    present, error = await asyncio.to_thread(_image_present, host, state["image"])
    state["image_present"] = present
    state["engine_reachable"] = error is None
    if error:
        state["engine_error"] = error
    recent = state["recent"]
    failures = sum(1 for r in recent if r["outcome"] != "completed")
    state["healthy"] = bool(present) and error is None and (len(recent) < 3 or failures < len(recent))
    return state


def _image_present(host: Host, image: str) -> tuple[bool | None, str | None]:
    try:
        return host.runner.image_present(image), None
    except EngineError as exc:  # reported in the answer, as the runner words it
        return None, str(exc)


# -- errors -----------------------------------------------------------------------------


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
    details = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in errors]
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return JSONResponse({"error": f"invalid request: {summary}", "details": details}, status_code=422)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, whether or not they say their length."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # An HTTPException passes through FastAPI's body parsing as it is.
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is over the limit of {self.limit} bytes"

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": self._message()}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})  # fmt: skip
