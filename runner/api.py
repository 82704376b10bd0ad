"""The HTTP face of ``workerhost serve``: submit and inspect tasks, health, workers, metrics.

FastAPI validates requests with pydantic and serves the OpenAPI description
at ``/openapi.json`` (and a browsable one at ``/docs``). Every error is a JSON
object ``{"error": "...", "details": [...]?}`` with a 4xx status, and a
request that is refused stores nothing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner import __version__
from runner.host import Host
from runner.sources import SourceUnavailable
from runner.sources.embedded import STATUSES, EmbeddedQueue
from runner.telemetry import events
from runner.telemetry.events import Event
from runner.telemetry.metrics import Metrics


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


def create_app(host: Host, metrics: Metrics, queue: EmbeddedQueue | None) -> FastAPI:
    """The API for one host; ``queue`` is None when tasks live in another system (PrismQ)."""
    config = host.config
    app = FastAPI(
        title="workerhost",
        version=__version__,
        description="Run queued tasks, each in its own Docker container.",
    )
    app.add_middleware(BodyLimit, limit=config.host.max_body)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
        details = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in errors]
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return JSONResponse({"error": f"invalid request: {summary}", "details": details}, status_code=422)

    def tasks() -> EmbeddedQueue:
        if queue is None:
            raise ApiError(501, f"tasks live in the {config.task_manager.type} task manager; submit them there")
        return queue

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except SourceUnavailable as exc:
            raise ApiError(503, str(exc)) from None

    @app.post("/tasks", status_code=201, summary="Submit a task")
    async def submit(body: TaskIn, request: Request, response: Response) -> dict[str, Any]:
        worker = config.worker_for(body.type)
        if worker is None:
            raise ApiError(422, f"unknown task type {body.type!r}", known=config.task_types())
        task_id = str(uuid.uuid4())
        correlation_id = body.correlation_id or uuid.uuid4().hex
        incoming = request.headers.get("traceparent") or body.traceparent
        carrier = {"traceparent": incoming} if incoming else {}
        # The tracing hook opens the submit span (continuing the caller's trace) and puts it in the carrier.
        host.hooks.emit(Event(events.TASK_SUBMITTED, task_id=task_id, task_type=body.type,
                              correlation_id=correlation_id, data={"carrier": carrier}))  # fmt: skip
        task, created = await call(
            tasks().submit,
            body.type,
            body.params,
            max_attempts=worker.max_retries + 1,
            priority=body.priority,
            idempotency_key=body.idempotency_key,
            correlation_id=correlation_id,
            traceparent=carrier.get("traceparent"),
            task_id=task_id,
        )
        if created:
            host.wake()
        elif (task["type"], task["params"]) != (body.type, body.params):
            raise ApiError(
                409, f"idempotency key {body.idempotency_key!r} already names task {task['id']} with other content"
            )
        else:
            response.status_code = 200
        return dict(task)

    @app.get("/tasks/{task_id}", summary="One task: status, attempts, result or error")
    async def get_task(task_id: str) -> dict[str, Any]:
        task = await call(tasks().get, task_id)
        if task is None:
            raise ApiError(404, f"no task {task_id}")
        return dict(task)

    @app.get("/tasks", summary="Tasks, newest first")
    async def list_tasks(
        status: str | None = Query(default=None, description=f"one of {', '.join(STATUSES)}"),
        type: str | None = Query(default=None, description="a task type"),
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> list[dict[str, Any]]:
        if status is not None and status not in STATUSES:
            raise ApiError(422, f"unknown status {status!r}; expected one of: {', '.join(STATUSES)}")
        found: list[dict[str, Any]] = await call(tasks().list, status, type, limit)
        return found

    @app.post("/tasks/{task_id}/retry", summary="Send a failed or dead task back to the queue")
    async def retry(task_id: str) -> dict[str, Any]:
        task = await call(tasks().retry, task_id)
        if task is None:
            existing = await call(tasks().get, task_id)
            if existing is None:
                raise ApiError(404, f"no task {task_id}")
            raise ApiError(409, f"task {task_id} is {existing['status']}; only failed or dead tasks can be retried")
        host.wake()
        return dict(task)

    @app.get("/health", summary="Liveness: the loop, the engine and the source")
    async def health() -> JSONResponse:
        engine_error = await asyncio.to_thread(host.runner.ping)
        host.engine_ok(engine_error)
        try:
            source: dict[str, Any] = await host.source.health()
        except SourceUnavailable as exc:
            source = {"type": config.task_manager.type, "reachable": False, "error": str(exc)}
        if host.source_error and source.get("reachable"):
            source["last_error"] = host.source_error
        engine: dict[str, Any] = {"reachable": engine_error is None}
        if engine_error:
            engine["error"] = engine_error
        healthy = host.alive and engine_error is None and bool(source.get("reachable"))
        body = {
            "status": "ok" if healthy else ("degraded" if host.alive else "down"),
            "host": {"id": config.host.id, "alive": host.alive, "stopping": host.stopping.is_set(),
                     "in_flight": len(host.in_flight), "concurrency": config.host.concurrency},
            "engine": engine,
            "source": source,
        }  # fmt: skip
        return JSONResponse(body, status_code=200 if host.alive else 503)

    @app.get("/workers", summary="Every worker: image, limits, what runs now, recent outcomes")
    async def workers() -> list[dict[str, Any]]:
        return [await _worker(name) for name in host.workers]

    @app.get("/workers/{name}/health", summary="One worker's health")
    async def worker_health(name: str) -> dict[str, Any]:
        if name not in host.workers:
            raise ApiError(404, f"no worker {name!r}", known=list(host.workers))
        return await _worker(name)

    async def _worker(name: str) -> dict[str, Any]:
        state = host.worker_health(name)
        image = state["image"]
        present, error = await asyncio.to_thread(_image_present, host, image)
        state["image_present"] = present
        state["engine_reachable"] = error is None
        if error:
            state["engine_error"] = error
        recent = state["recent"]
        failures = sum(1 for r in recent if r["outcome"] != "completed")
        state["healthy"] = bool(present) and error is None and (len(recent) < 3 or failures < len(recent))
        return state

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_text() -> Response:
        if queue is not None:
            try:
                counts = await asyncio.to_thread(queue.counts)
            except SourceUnavailable:
                counts = {}
            for status, count in counts.items():
                metrics.queue_depth.labels(status).set(count)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _image_present(host: Host, image: str) -> tuple[bool | None, str | None]:
    try:
        return host.runner.image_present(image), None
    except Exception as exc:  # an engine error, as the runner words it
        return None, str(exc)


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
