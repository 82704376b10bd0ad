"""The HTTP face of ``workerhost serve``: submit and inspect tasks, health, workers, metrics.

``POST /tasks`` takes one task or a batch (a JSON array, stored whole or not at all), and
with ``?wait=SECONDS`` answers once the tasks have ended (200) or the wait is over (202), as
``GET /tasks/{id}?wait=`` does for one: a waiter is woken by the host's own events, and by one
slow poll of the store for what another host settles (runner/waiting.py).

FastAPI validates requests with pydantic and serves the OpenAPI description
at ``/openapi.json`` (and a browsable one at ``/docs``), exact for this host:
every status each route answers, the configured task types and their params
schemas. Every error is a JSON object ``{"error": "...", "details": [...]?}``
(a bug of ours too, as a 500), a request that is refused stores nothing, and
only what reads back as JSON is stored (``runner.jsondata``). In front of the
routes, ``runner.auth.Guard`` checks the Host, the Origin and the token.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner import __version__, dashboard, jsondata
from runner.auth import Guard, Sessions, Tokens, public_health, shows_details
from runner.config import Config, WorkerConfig
from runner.errors import EngineError
from runner.host import Host
from runner.sources import KeyConflict, NewTask, NotKept, SourceUnavailable, TaskStore
from runner.telemetry import context, events
from runner.telemetry.metrics import Metrics
from runner.telemetry.records import AttemptRecords
from runner.waiting import FINAL, Waiters, hung_up

log = logging.getLogger(__name__)
T = TypeVar("T")


LIST_BUDGET = 8 * 1024**2  # bytes of stored params, results and stderr that one full list may carry
MAX_BATCH = 1000  # tasks in one POST /tasks
MAX_WAIT = 300.0  # seconds that one ?wait may hold a request
TRACEPARENT = r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$"  # W3C, version 00, ids not zero
CORRELATION_ID = r"^[\x21-\x7e]{1,128}$"  # printable ASCII without spaces: safe in logs, headers and env


def _whole(value: Any) -> Any:
    """A JSON integer: 5 and 5.0 (JSON Schema's integers), not true, "5" or 5.5."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class TaskIn(BaseModel):
    """A task to submit. Only what reads back as JSON is accepted (README, "HTTP API")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: str = Field(min_length=1, max_length=256, description="a task type that a configured worker handles")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description=f"the task's params: a JSON object, nested at most {jsondata.MAX_DEPTH} levels, "
        "no NaN or Infinity, no lone surrogates",
    )
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=256, description="the same key returns the same task"
    )
    priority: Annotated[int, BeforeValidator(_whole)] = Field(
        default=0, ge=-1000, le=1000, description="higher runs first"
    )
    correlation_id: str | None = Field(
        default=None, pattern=CORRELATION_ID, description="printable ASCII without spaces, up to 128 characters"
    )
    traceparent: str | None = Field(
        default=None,
        max_length=55,
        description="W3C trace context to continue (the traceparent header wins)",
        json_schema_extra={"pattern": TRACEPARENT},
    )

    @field_validator("params")
    @classmethod
    def _reads_back(cls, value: dict[str, Any]) -> dict[str, Any]:
        problem = jsondata.problem(value, "params")
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("idempotency_key", "type")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and jsondata.problem(value, "") is not None:
            raise ValueError("a lone surrogate is not text")
        return value

    @field_validator("traceparent")
    @classmethod
    def _w3c(cls, value: str | None) -> str | None:
        if value is not None and context.parse(value) is None:
            raise ValueError('not a W3C traceparent ("00-<32 hex>-<16 hex>-<2 hex>", ids not all zero)')
        return value


class ErrorDetails(BaseModel):
    """Why a task failed."""

    type: str
    message: str
    retriable: bool


class PhaseOut(BaseModel):
    """A container phase of an attempt (create, start, exchange, teardown; take for a warm container)."""

    name: str
    start: float = Field(description="seconds since the epoch")
    end: float


class SpanOut(BaseModel):
    """A span the worker opened inside its container (sent over the SDK's side channel)."""

    name: str
    span_id: str
    parent_id: str | None = None
    start: float | None = None
    end: float | None = None
    attrs: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class AttemptOut(BaseModel):
    """One attempt as the host saw it (times in seconds since the epoch)."""

    attempt: int | None = None
    outcome: str | None = None
    exit_code: int | None = None
    duration: float | None = None
    image_id: str | None = None
    oom_killed: bool = False
    mode: str | None = None
    error: str | None = None
    start: float | None = None
    end: float | None = None
    phases: list[PhaseOut] = Field(default_factory=list)
    spans: list[SpanOut] = Field(default_factory=list)


class ProgressOut(BaseModel):
    percent: float
    message: str | None = None


class TaskOut(BaseModel):
    """A task as the API shows it (lists show a summary: no params, result or stderr_tail, unless full)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: str
    status: Literal["pending", "running", "completed", "failed", "dead"]
    attempts: int
    max_attempts: int
    priority: int
    correlation_id: str
    trace_id: str | None = Field(
        default=None, description="the trace its attempts belong to: the one it came with, else one derived from its id"
    )
    trace_url: str | None = Field(default=None, description="its trace in a viewer, from [telemetry] trace_url")
    created_at: str
    updated_at: str
    params: dict[str, Any] | None = None
    idempotency_key: str | None = None
    outcome: str | None = None
    worker: str | None = None
    image_id: str | None = None
    stderr_tail: str | None = None
    duration: float | None = None
    started_at: str | None = None
    finished_at: str | None = None
    run_at: str | None = None
    result: Any = None
    error: ErrorDetails | None = None
    unreadable: dict[str, str] | None = Field(default=None, description="stored values that could not be shown")
    omitted: str | None = Field(default=None, description="in a full list: what was left out, and why")
    attempt_records: list[AttemptOut] | None = Field(
        default=None, description="one task: its attempts as this host recorded them, oldest first (the latest 50)"
    )
    progress: ProgressOut | None = Field(
        default=None, description="one running task: the latest progress its worker reported to this host"
    )


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        self.status = status
        self.message = message
        self.extra = extra


router = APIRouter()


def create_app(host: Host, metrics: Metrics, queue: TaskStore | None) -> FastAPI:
    """The API for one host; ``queue`` is None when tasks live in another system (PrismQ)."""
    app = FastAPI(
        title="workerhost",
        version=__version__,
        description="Run queued tasks, each in its own Docker container.",
        docs_url=None,  # served by _api_docs, from files in the installed package: no CDN
        redoc_url=None,
    )
    app.state.host, app.state.metrics, app.state.queue = host, metrics, queue
    app.state.waiters = app.state.records = None
    if queue is not None:
        app.state.waiters = Waiters(lambda ids: asyncio.to_thread(queue.statuses, ids))
        host.hooks.add(app.state.waiters)  # woken by the host's own TaskCompleted and TaskFailed
        app.state.records = AttemptRecords(queue)
        host.hooks.add(app.state.records)  # each attempt's record, kept with its task
    _api_docs(app)
    sessions = Sessions()
    dashboard.mount(app, Tokens(host.config.host.tokens()), sessions)
    app.add_middleware(BodyLimit, limit=host.config.host.max_body)
    # Added last, so outermost: the Host check and the token come before a body is read. The routes
    # name a refused request in the audit (an included router is one opaque entry of app.routes).
    routes = [*app.routes, *router.routes, *dashboard.router.routes]
    app.add_middleware(Guard, config=host.config.host, metrics=metrics, routes=routes, sessions=sessions)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crashed)
    app.include_router(router)
    app.openapi = _described(app, host.config)  # type: ignore[method-assign]
    return app


DOCS_ASSETS = "/docs-assets"  # Swagger UI's and ReDoc's files, from the fastapi-offline package


def _api_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with every file they load served here: they work offline,
    and the browser sends no request beyond this host (ReDoc without Google's fonts)."""
    static = importlib.resources.files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(static)), name="docs-assets")
    favicon = f"{DOCS_ASSETS}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="workerhost API", swagger_favicon_url=favicon,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        )  # fmt: skip

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json", title="workerhost API", redoc_favicon_url=favicon,
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js", with_google_fonts=False,
        )  # fmt: skip


def _described(app: FastAPI, config: Config) -> Callable[[], dict[str, Any]]:
    """The OpenAPI description, exact for this host: the task types it takes, its bearer token
    (where one is set), and links from a submitted task to what can be done with it."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        # The body is one task or a batch of them: read by the route itself (_read_body), described here.
        schema["components"]["schemas"]["TaskIn"] = TaskIn.model_json_schema(ref_template=_REF)
        one = {"$ref": _REF.format(model="TaskIn")}
        batch = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_BATCH, "title": "TaskIn batch",
                 "description": f"1 to {MAX_BATCH} tasks, stored together or not at all"}  # fmt: skip
        submit = schema["paths"]["/tasks"]["post"]
        submit["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"oneOf": [one, batch]}}}}
        for operation in (submit, schema["paths"]["/tasks/{task_id}"]["get"]):
            for parameter in operation["parameters"]:
                if parameter["name"] == "wait":  # a number when given (not "number or null": it is left out)
                    parameter["schema"] = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT}
        task_in = schema["components"]["schemas"]["TaskIn"]
        task_in["properties"]["type"]["enum"] = config.task_types()
        typed = _typed_params(task_in, config)
        if typed is not None:
            schema["components"]["schemas"]["TaskIn"] = typed
        if config.host.tokens():
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            public = [("/health", "get"), ("/session", "get"), ("/login", "post")]
            public += [("/metrics", "get")] if config.host.metrics_public else []
            for path, method in public:
                schema["paths"][path][method]["security"] = []
            for operations in schema["paths"].values():
                for operation in operations.values():
                    if operation.get("security") != []:
                        operation["responses"].setdefault("401", {"description": _MEANINGS[401],
                                                                  "content": _error_content()})  # fmt: skip
        by_id = {"task_id": "$response.body#/id"}
        submit["responses"]["201"]["links"] = {
            name: {"operationId": operation, "parameters": by_id}
            for name, operation in (("GetTask", "get_task"), ("RetryTask", "retry_task"), ("DeleteTask", "delete_task"))
        }
        app.openapi_schema = schema
        return schema

    return openapi


# -- dependencies -----------------------------------------------------------------------


class ErrorOut(BaseModel):
    """Every refusal: what is wrong, and details where there are several things."""

    error: str
    details: list[dict[str, Any]] | None = None
    known: list[str] | None = None


_MEANINGS = {
    400: "the body is not valid JSON",
    401: "no token, or a wrong one",
    404: "no such task or worker",
    409: "the task's state, or an idempotency key that names another task, does not allow it",
    413: "the body is over [host] max_body",
    422: "the request is invalid: each problem with its field (in a batch, with its index: [3].params)",
    501: "tasks live in another task manager, or it does not keep what was asked for",
    503: "the task queue does not answer",
}
_REF = "#/components/schemas/{model}"


def _typed_params(task_in: dict[str, Any], config: Config) -> dict[str, Any] | None:
    """TaskIn as one variant per task type, with its worker's ``params_schema`` where one fits in
    the description (one that refers to its own parts, ``$ref``, is left out: it would not resolve there)."""
    schemas = {t: w.params_schema for w in config.workers for t in w.task_types if w.params_schema is not None}
    fitting = {t: s for t, s in schemas.items() if "$ref" not in json.dumps(s)}
    if not fitting:
        return None
    variants = []
    for task_type in config.task_types():
        properties = {**task_in["properties"], "type": {"const": task_type}}
        if task_type in fitting:
            properties["params"] = {**fitting[task_type], "description": task_in["properties"]["params"]["description"]}
        variants.append({**task_in, "title": f"TaskIn ({task_type})", "properties": properties})
    return {"title": "TaskIn", "description": task_in.get("description", ""), "oneOf": variants}


def _error_content() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the refusals a route answers with, all ``ErrorOut``."""
    return {code: {"model": ErrorOut, "description": _MEANINGS[code]} for code in codes}


def _host(request: Request) -> Host:
    host: Host = request.app.state.host
    return host


def _queue(request: Request) -> TaskStore:
    queue: TaskStore | None = request.app.state.queue
    if queue is None:
        kind = request.app.state.host.config.task_manager.type
        raise ApiError(501, f"tasks live in the {kind} task manager; submit them there")
    return queue


HostDep = Annotated[Host, Depends(_host)]
QueueDep = Annotated[TaskStore, Depends(_queue)]


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A queue call, off the event loop; the queue being unavailable is a 503, a question it does not
    keep the answer to (a broker that only carries tasks) a 501 that says where the answer is."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except SourceUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    except NotKept as exc:
        raise ApiError(501, str(exc)) from None


# -- tasks ------------------------------------------------------------------------------


Wait = Annotated[
    float | None,
    Query(
        gt=0, le=MAX_WAIT, allow_inf_nan=False,
        description=f"answer once the task has ended (200), or after this many seconds (202), {MAX_WAIT:g} at most",
    ),
]  # fmt: skip
OneOrMany = TaskOut | list[TaskOut]


@router.post(
    "/tasks", status_code=201, summary="Submit a task, or a batch of tasks", operation_id="submit_task",
    response_model=None,
    responses={201: {"model": OneOrMany, "description": "the task (a batch: every task, in order), stored"},
               200: {"model": OneOrMany, "description": "with wait: the task (every task of a batch) ended; "
                     "without: the task each idempotency key already names, unchanged"},
               202: {"model": OneOrMany, "description": "with wait: stored, and not ended when the wait was over"},
               **_errors(400, 409, 413, 422, 501, 503)},
)  # fmt: skip
async def submit(
    body: Annotated[Any, Body()],
    request: Request,
    response: Response,
    host: HostDep,
    queue: QueueDep,
    wait: Wait = None,
) -> Any:
    """One task, or a JSON array of 1 to 1000 stored in one transaction or not at all (every error listed)."""
    if isinstance(body, bytes):  # sent without a JSON Content-Type (curl -d): JSON all the same
        body = _read_body(body)
    if wait is not None and not queue.keeps_tasks:
        raise ApiError(501, f"the {host.config.task_manager.type} task manager does not keep tasks: submit "
                       "without wait, and follow the task where its results go")  # fmt: skip
    if isinstance(body, list):
        tasks, created = await _submit_batch(body, request, host, queue)
    else:
        task, created = await _submit_one(_task_in(body), request, host, queue)
        tasks = [task]
    if wait is None:
        response.status_code = 201 if created else 200
        return tasks if isinstance(body, list) else tasks[0]
    waited = [found or stored for found, stored in zip(await _waited(request, queue, tasks, wait), tasks, strict=True)]
    response.status_code = 200 if all(t["status"] in FINAL for t in waited) else 202
    return waited if isinstance(body, list) else waited[0]


def _read_body(data: bytes) -> Any:
    value, problem = jsondata.loads(data, "the body")
    if problem is not None:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": problem, "input": None}])
    return value


def _task_in(body: Any) -> TaskIn:
    """One task, checked as FastAPI checks a body (its errors are the same 422)."""
    try:
        return TaskIn.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


async def _submit_one(body: TaskIn, request: Request, host: Host, queue: TaskStore) -> tuple[dict[str, Any], bool]:
    worker = host.config.worker_for(body.type)
    if worker is None:
        raise ApiError(422, f"unknown task type {body.type!r}", known=host.config.task_types())
    problems = worker.params_problems(body.params)
    if problems:
        details = [{"field": line.partition(":")[0], "message": line} for line in problems]
        raise ApiError(422, f"params do not fit {body.type}'s params_schema: {'; '.join(problems)}", details=details)
    start_ns = time.time_ns()
    new = _new_task(body, worker, request, host)
    task, created = await _call(
        queue.submit, new.type, new.params, max_attempts=new.max_attempts, priority=new.priority,
        idempotency_key=new.idempotency_key, correlation_id=new.correlation_id, traceparent=new.traceparent,
        task_id=new.task_id,
    )  # fmt: skip
    if not created:
        # Compared as JSON text: {"a": true}, {"a": 1.0} and {"a": 1} are three different tasks.
        if (task["type"], jsondata.dumps(task["params"])) != (body.type, jsondata.dumps(body.params)):
            raise ApiError(
                409, f"idempotency key {body.idempotency_key!r} already names task {task['id']} with other content"
            )
        return dict(task), False
    host.wake()
    _submitted(host, new, _incoming(body, request), start_ns)
    return dict(task), True


async def _submit_batch(
    items: list[Any], request: Request, host: Host, queue: TaskStore
) -> tuple[list[dict[str, Any]], bool]:
    """Every task checked (every problem listed, by index), then stored in one transaction."""
    if not items:
        raise ApiError(422, f"an empty batch: send 1 to {MAX_BATCH} tasks")
    if len(items) > MAX_BATCH:
        raise ApiError(422, f"a batch holds at most {MAX_BATCH} tasks; this one has {len(items)}")
    checked: list[tuple[TaskIn, WorkerConfig]] = []
    details: list[dict[str, Any]] = []
    unknown = False
    for n, item in enumerate(items):
        try:
            body = TaskIn.model_validate(item)
        except ValidationError as exc:
            details += [{"field": f"[{n}]" + "".join(f".{p}" for p in e["loc"]), "message": e["msg"] + _got(e)}
                        for e in exc.errors()]  # fmt: skip
            continue
        worker = host.config.worker_for(body.type)
        if worker is None:
            unknown = True
            details.append({"field": f"[{n}].type", "message": f"unknown task type {body.type!r}"})
            continue
        for line in worker.params_problems(body.params):
            field, _, message = line.partition(":")
            details.append({"field": f"[{n}].{field}", "message": message.strip()})
        checked.append((body, worker))
    if details:
        known = {"known": host.config.task_types()} if unknown else {}
        raise ApiError(422, _listed("invalid batch, nothing stored", details), details=details, **known)
    start_ns = time.time_ns()
    new = [_new_task(body, worker, request, host) for body, worker in checked]
    try:
        stored = await _call(queue.submit_many, new)
    except KeyConflict as exc:
        details = [{"field": f"[{n}].idempotency_key",
                    "message": f"{new[n].idempotency_key!r} already names {names} with other content"}
                   for n, names in exc.conflicts]  # fmt: skip
        raise ApiError(409, _listed("idempotency keys that name other content, nothing stored", details),
                       details=details) from None  # fmt: skip
    fresh = [n for n, (_, created) in enumerate(stored) if created]
    if fresh:
        host.wake()
    for n in fresh:
        _submitted(host, new[n], _incoming(checked[n][0], request), start_ns)
    return [dict(task) for task, _ in stored], bool(fresh)


def _incoming(body: TaskIn, request: Request) -> str | None:
    """The trace context the caller sent: a W3C traceparent header, else the body's field (a header
    that is not W3C is ignored, as the W3C says: the trace starts here)."""
    header = request.headers.get("traceparent")
    return (header if context.parse(header) else None) or body.traceparent


def _new_task(body: TaskIn, worker: WorkerConfig, request: Request, host: Host) -> NewTask:
    incoming = _incoming(body, request)
    # The submit span's context when something traces (the span is recorded only once the task is
    # stored); otherwise the caller's context goes on with the task as it came.
    traceparent = host.hooks.span_context(incoming) or incoming
    return NewTask(
        body.type, body.params, worker.max_retries + 1, body.priority, body.idempotency_key,
        body.correlation_id or uuid.uuid4().hex, traceparent, str(uuid.uuid4()),
    )  # fmt: skip


def _submitted(host: Host, task: NewTask, incoming: str | None, start_ns: int) -> None:
    host.hooks.emit(
        events.TaskSubmitted(
            task_id=task.task_id, task_type=task.type, correlation_id=task.correlation_id,
            traceparent=task.traceparent, parent=incoming if context.parse(incoming) else None, start_ns=start_ns,
            end_ns=time.time_ns(),
        )
    )  # fmt: skip


def _listed(what: str, details: list[dict[str, Any]], shown: int = 20) -> str:
    """``what``, then the first problems (every one is in ``details``)."""
    listed = "; ".join(f"{d['field']}: {d['message']}" for d in details[:shown])
    more = f"; and {len(details) - shown} more (see details)" if len(details) > shown else ""
    return f"{what}: {listed}{more}"


@router.get(
    "/tasks/{task_id}", summary="One task: status, attempts, params, result or error", operation_id="get_task",
    response_model=None,
    responses={200: {"model": TaskOut, "description": "the task (with wait: it has ended)"},
               202: {"model": TaskOut, "description": "with wait: the task, not ended when the wait was over"},
               **_errors(404, 422, 501, 503)},
)  # fmt: skip
async def get_task(
    task_id: str, request: Request, response: Response, queue: QueueDep, wait: Wait = None
) -> dict[str, Any]:
    task = await _call(queue.get, task_id)
    if task is None:
        raise ApiError(404, f"no task {task_id}")
    if wait is not None and task["status"] not in FINAL:
        [task] = await _waited(request, queue, [task], wait)
        if task is None:
            raise ApiError(404, f"no task {task_id} (it was deleted while waited for)")
        response.status_code = 200 if task["status"] in FINAL else 202
    shown = _with_trace_url(dict(task), request.app.state.host.config)
    # Left out when there are none, like every other field a task has not got (yet).
    if attempt_records := await _call(queue.attempts, task_id):
        shown["attempt_records"] = attempt_records
    records: AttemptRecords | None = request.app.state.records
    if records is not None and task["status"] == "running" and (progress := records.progress(task_id)):
        shown["progress"] = progress
    return shown


def _with_trace_url(task: dict[str, Any], config: Config) -> dict[str, Any]:
    template = config.telemetry.trace_url
    if template and task.get("trace_id"):
        task["trace_url"] = template.replace("{trace_id}", task["trace_id"])
    return task


async def _waited(
    request: Request, queue: TaskStore, tasks: list[dict[str, Any]], seconds: float
) -> list[dict[str, Any] | None]:
    """Each task once it has ended, or as it is when ``seconds`` have passed (None: it is gone).
    A caller that hangs up ends the wait: the tasks as given."""
    waiters: Waiters = request.app.state.waiters
    found = await waiters.until_all_final(
        [t["id"] for t in tasks], seconds, functools.partial(_call, queue.get), lambda: hung_up(request.receive)
    )
    return list(tasks) if found is None else found


@router.delete("/tasks/{task_id}", status_code=204, summary="Delete a task that is not running",
               operation_id="delete_task", responses=_errors(404, 409, 503))  # fmt: skip
async def delete_task(task_id: str, queue: QueueDep) -> Response:
    deleted, status = await _call(queue.delete, task_id)
    if status is None:
        raise ApiError(404, f"no task {task_id}")
    if not deleted:
        raise ApiError(409, f"task {task_id} is {status}; a running task cannot be deleted (wait for it, or stop it)")
    return Response(status_code=204)


@router.get(
    "/tasks", summary="Tasks, newest first", operation_id="list_tasks", response_model=None,
    responses={200: {"model": list[TaskOut]}, **_errors(422, 503)},
)  # fmt: skip
async def list_tasks(
    response: Response,
    queue: QueueDep,
    status: Literal["", "pending", "running", "completed", "failed", "dead"] | None = Query(
        default=None, description="only tasks with this status (empty: any)"
    ),
    type: str | None = Query(default=None, description="a task type (empty: any)"),
    q: str | None = Query(
        default=None, max_length=256, description="only the task with this id, or those with this correlation id"
    ),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=100_000, description="skip this many (the next page)"),
    full: bool = Query(
        default=False,
        description="with params, result and stderr tail, for as many tasks as fit in 8 MiB of them; the "
        "rest as summaries marked `omitted` (the header X-Workerhost-Omitted says so)",
    ),
) -> list[dict[str, Any]]:
    found, more = await _call(
        queue.page, status or None, type or None, limit, full, LIST_BUDGET if full else None, q=q or None, offset=offset
    )
    if more:
        response.headers["X-Workerhost-Omitted"] = "some tasks are summaries: a full list carries 8 MiB at most"
    return found


@router.post("/tasks/{task_id}/retry", summary="Send a failed or dead task back to the queue",
             operation_id="retry_task", response_model=None,
             responses={200: {"model": TaskOut}, **_errors(404, 409, 503)})  # fmt: skip
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
async def health(host: HostDep, request: Request) -> JSONResponse:
    """Reads only: asks the engine and the source now, and changes nothing in the host.

    Without a token, when the API has tokens, only whether it is up and how busy (runner/auth.py).
    """
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
    shown = body if shows_details(request) else public_health(body)
    return JSONResponse(shown, status_code=200 if host.alive else 503)


@router.get("/workers", summary="Every worker: image, limits, what runs now, recent outcomes")
async def workers(host: HostDep) -> list[dict[str, Any]]:
    return [await _worker(host, name) for name in host.workers]


class MinuteOut(BaseModel):
    minute: str = Field(description="the minute's start, UTC")
    completed: int
    failed: int = Field(description="failed and dead")


class HealthOut(BaseModel):
    ok: bool
    error: str | None = None


class OverviewOut(BaseModel):
    """What the dashboard's first page shows, in one call."""

    tasks: dict[str, int] | None = Field(description="tasks by status (null: the source keeps no tasks)")
    per_minute: list[MinuteOut] = Field(description="tasks that ended in each of the last 60 minutes, oldest first")
    workers: list[dict[str, Any]] = Field(description="as GET /workers")
    engine: HealthOut
    source: HealthOut
    trace_url: str | None = Field(description="[telemetry] trace_url: a trace in a viewer, {trace_id} in it")


@router.get("/overview", summary="Tasks by status, ended per minute, workers, engine and source: the dashboard's",
            operation_id="overview", response_model=OverviewOut)  # fmt: skip
async def overview(host: HostDep, request: Request) -> dict[str, Any]:
    queue: TaskStore | None = request.app.state.queue
    engine_error = await asyncio.to_thread(host.runner.ping)
    source_error: str | None = None
    try:
        await host.source.health()
    except SourceUnavailable as exc:
        source_error = str(exc)
    counts: dict[str, int] | None = None
    ended: dict[tuple[int, str], int] = {}
    now = int(time.time()) // 60 * 60
    minutes = [now - 60 * n for n in range(59, -1, -1)]
    if queue is not None:
        try:
            statuses = ("pending", "running", "completed", "failed", "dead")
            counts = dict.fromkeys(statuses, 0) | await asyncio.to_thread(queue.counts)
            ended = await asyncio.to_thread(queue.finished_per_minute, float(minutes[0]))
        except (SourceUnavailable, NotKept) as exc:
            source_error = source_error or str(exc)
    per_minute = [
        {"minute": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(minute)),
         "completed": ended.get((minute, "completed"), 0),
         "failed": ended.get((minute, "failed"), 0) + ended.get((minute, "dead"), 0)}
        for minute in minutes
    ]  # fmt: skip
    return {
        "tasks": counts,
        "per_minute": per_minute,
        "workers": [await _worker(host, name) for name in host.workers],
        "engine": {"ok": engine_error is None, "error": engine_error},
        "source": {"ok": (source_error or host.source_error) is None, "error": source_error or host.source_error},
        "trace_url": host.config.telemetry.trace_url or None,
    }


@router.get("/workers/{name}/health", summary="One worker's health", responses=_errors(404))
async def worker_health(name: str, host: HostDep) -> dict[str, Any]:
    if name not in host.workers:
        raise ApiError(404, f"no worker {name!r}", known=list(host.workers))
    return await _worker(host, name)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_text(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    queue: TaskStore | None = request.app.state.queue
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
    config = host.workers[name].config
    state.update(
        cpus=config.cpus, memory=config.memory, pids_limit=config.pids_limit, sandbox=config.sandbox,
        timeout=config.timeout, prewarm=config.prewarm, reuse=config.reuse,
    )  # fmt: skip
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


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # Its headers too: a 401 says how to authenticate. A 405 says which methods are allowed, all of
    # them (Starlette's names only those of the first route on the path).
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        methods = {m for route in router.routes if _on_path(route, request) for m in getattr(route, "methods", ())}
        headers["Allow"] = ", ".join(sorted(methods - {"HEAD"} | ({"HEAD"} if "GET" in methods else set())))
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)


def _on_path(route: Any, request: Request) -> bool:
    match, _ = route.matches(request.scope)
    return bool(match is not Match.NONE and getattr(route, "methods", None))


async def _crashed(request: Request, exc: Exception) -> JSONResponse:
    """A bug of ours: logged with its traceback, answered as JSON like every other error."""
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc, exc_info=exc)
    return JSONResponse({"error": f"the host failed to answer ({type(exc).__name__}); see its log"}, status_code=500)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
    details = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"] + _got(e)} for e in errors]
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return JSONResponse({"error": f"invalid request: {summary}", "details": details}, status_code=422)


def _got(error: Any) -> str:
    """What was sent, for a scalar that was refused (quoted, escaped, short)."""
    value = error.get("input")
    if isinstance(value, str | int | float) and not isinstance(value, bool) and error.get("type") != "json_invalid":
        text = repr(value)
        return f" (got {text[:60]}{'...' if len(text) > 60 else ''})"
    return ""


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
