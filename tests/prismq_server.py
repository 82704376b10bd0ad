"""A stand-in PrismQ TaskManager: a real HTTP server on 127.0.0.1, state in memory.

It follows the API as the real server (its PHP backend with MariaDB) answers
it, quirks included, as they were seen when the real one was tried:

- every call but ``GET /health`` needs ``X-API-Key``; a missing or wrong key is
  a 401 ``{"error": "Unauthorized", "message": ...}`` without ``success``;
- path parameters are not URL-decoded: ``GET /task-types/H1%20Space`` looks up
  a type named "H1%20Space", and finds nothing;
- an unknown ``GET /task-types/{name}`` or ``GET /tasks/{id}`` answers 200
  ``{"items": [], "count": 0}`` (the server's docs say 404);
  ``GET /task-types`` answers 500 "Invalid select field: ...";
- registering a name that exists replaces that type (version and schema);
- ``POST /tasks`` refuses ``params: {}`` ("Field 'params' must be of type
  object": PHP cannot tell it from ``[]``), checks the params against the
  type's ``param_schema`` (400 "Type mismatch at tags: expected array, got
  string"), and deduplicates on type and params forever: the same type and
  params again answer the old task's id with ``deduplicated: true``, whatever
  became of that task;
- an empty queue answers ``POST /tasks/claim`` with HTTP 500 "There is no
  active transaction", and so does a claim of a type id that does not exist;
- ids are strings from ``POST /task-types/register`` of a new type and from
  ``POST /tasks``; integers from ``GET /task-types/{name}``, the register of a
  type that exists, a deduplicated ``POST /tasks`` and every claim;
- a claim expires after ``claim_timeout`` seconds: the task can then be claimed
  again by anyone, and a report on the expired claim gets 403; a report on a
  task that is no longer claimed gets 400 "Task is not in claimed state";
  a worker id that claims the task again holds the new claim, so that a late
  report under that id is taken for the new claim's;
- a claim answers ``attempts`` = the number of claims including this one (1
  the first time), as the real server's ``task_claim`` does; ``success:
  false`` re-queues the task until ``max_attempts`` claims, then the task is
  failed; a re-queued task keeps its ``error_message`` and ``completed_at``;
- a result that PHP reads as empty (``{}``, ``[]``) is stored as NULL;
- at most ``rate_limit`` requests (100) in a window of ``rate_window`` seconds
  (60) that starts with the window's first request; past it, 429 "Rate limit
  exceeded: try again in N seconds" (N: until the window ends), with a
  ``Retry-After`` header only when ``retry_after_header`` is set;
- ``fault = "500"`` plays the database being down: 500 "Internal server
  error" on every route, ``/health`` included.

Tests drive it directly too: ``add_task_type`` (or ``add_task_type(name,
schema=...)``), ``create_task`` (what ``POST /tasks`` does, its refusals and
its deduplication included), ``put_task`` (a task as something other than
the API may have written it: any params), ``task`` (a snapshot of one task's
state), ``expire_claims``, ``requests`` (what it received, with what it
answered) and ``fault``, to play an unhealthy server: "500" (the database is
down), "503" (an HTML page), "drop" (the connection closed unanswered),
"garbage" (HTTP 200 that is not JSON) or "hang" (an answer after ``hang``
seconds). Use it as a context manager, or as the ``prismq_server`` fixture
(import ``prismq_server_fixture`` into a test module)::

    with PrismQServer(claim_timeout=0.5) as server:
        server.add_task_type("PrismQ.Example.Echo")
        task_id = server.create_task("PrismQ.Example.Echo", {"text": "hi"})
"""

from __future__ import annotations

import copy
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest

API_KEY = "test-api-key"
NO_TASK = "There is no active transaction"
INTERNAL = "Internal server error"
_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"), (dict, "object"),
)  # fmt: skip

Fault = Literal["500", "503", "drop", "garbage", "hang"]


@dataclass
class ServerTask:
    """One task as the server holds it; ``PrismQServer.task`` hands out copies."""

    id: int
    type: str
    params: Any
    priority: int = 0
    status: str = "pending"  # pending | claimed | completed | failed
    attempts: int = 0  # claims so far
    claimed_by: str | None = None
    claimed_at: float | None = None
    result: Any = None
    error: str | None = None  # the server's error_message: kept when the task is re-queued
    completed_at: float | None = None  # set by every report, a failure's too; kept when re-queued
    progress: int | None = None
    progress_message: str | None = None
    completions: list[dict[str, Any]] = field(default_factory=list)  # every accepted complete body
    claims: list[str] = field(default_factory=list)  # worker ids, one per claim


@dataclass(frozen=True)
class Request:
    """One request the server received."""

    method: str
    path: str
    body: Any
    api_key: str | None
    status: int  # what the server answered (faults aside)
    answer: dict[str, Any] = field(default_factory=dict, compare=False)  # ... and its JSON body


class PrismQServer:
    """The server and its state; ``start()`` / ``stop()`` or ``with``."""

    def __init__(
        self,
        api_key: str = API_KEY,
        claim_timeout: float = 300.0,
        max_attempts: int = 3,
        hang: float = 2.0,
        rate_limit: int | None = 100,
        rate_window: float = 60.0,
        retry_after_header: bool = False,
    ) -> None:
        self.api_key = api_key
        self.claim_timeout = claim_timeout
        self.max_attempts = max_attempts
        self.hang = hang  # how long a "hang" fault sleeps before answering
        self.rate_limit = rate_limit  # requests per window; None: no limit
        self.rate_window = rate_window
        self.retry_after_header = retry_after_header
        self._window: tuple[float, int] = (0.0, 0)  # when the rate window started, requests in it
        self._dedup: dict[tuple[str, str], int] = {}  # (type, params as JSON) -> the task's id
        self.fault: Fault | None = None
        self.requests: list[Request] = []
        self._types: dict[str, dict[str, Any]] = {}  # name -> {"id", "name", "version", "param_schema"}
        self._tasks: dict[int, ServerTask] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life --------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The API's base URL, as ``[task_manager] url`` takes it."""
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> PrismQServer:
        """Listen on a free port and serve in a background thread."""
        handler = type("Handler", (_Handler,), {"app": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        serve = self._httpd.serve_forever
        self._thread = threading.Thread(target=serve, args=(0.05,), name="prismq-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (the port then refuses connections)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> PrismQServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------------

    def add_task_type(self, name: str, version: str = "1.0.0", schema: dict[str, Any] | None = None) -> int:
        """Register a task type, as ``POST /task-types/register`` does (a name that exists is replaced)."""
        with self._lock:
            return int(self._register(name, version, schema or {"type": "object"})["id"])

    def task_type(self, name: str) -> dict[str, Any] | None:
        """A task type as the server holds it (id, name, version, param_schema), or None."""
        with self._lock:
            known = self._types.get(name)
            return None if known is None else copy.deepcopy(known)

    def type_id(self, name: str) -> int | None:
        """The id of a task type, or None when unknown."""
        with self._lock:
            known = self._types.get(name)
            return None if known is None else int(known["id"])

    def create_task(self, task_type: str, params: Any, priority: int = 0) -> str:
        """What ``POST /tasks`` does: the id of a new pending task, or of the task with the same
        type and params (deduplicated); ``ValueError`` with the server's error for a refusal."""
        with self._lock:
            status, answer = self._post_task({"type": task_type, "params": params, "priority": priority})
        if status != 200:
            raise ValueError(answer["error"])
        return str(answer["data"]["id"])

    def put_task(self, task_type: str, params: Any, priority: int = 0) -> str:
        """A pending task as something other than the API may have written it: any params, no deduplication."""
        with self._lock:
            if task_type not in self._types:
                raise KeyError(f"unknown task type {task_type!r}: add_task_type first")
            task_id = len(self._tasks) + 1
            self._tasks[task_id] = ServerTask(task_id, task_type, params, priority)
            return str(task_id)

    def task(self, task_id: str | int) -> ServerTask:
        """A snapshot of one task's state."""
        with self._lock:
            return copy.deepcopy(self._tasks[int(task_id)])

    def expire_claims(self) -> None:
        """Age every claim past the claim timeout, as if it had passed."""
        with self._lock:
            for task in self._tasks.values():
                if task.claimed_at is not None:
                    task.claimed_at -= self.claim_timeout + 1

    def calls(self, method: str, path: str) -> list[Request]:
        """The requests received for one route (path below /api)."""
        return [r for r in self.requests if r.method == method and r.path == path]

    # -- the API -----------------------------------------------------------------

    def handle(
        self, method: str, path: str, body: Any, api_key: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """One request's status, JSON answer and extra headers (the HTTP part is in ``_Handler``)."""
        with self._lock:
            headers: dict[str, str] = {}
            wait = self._rate_limited()
            if wait is not None:
                status, answer = _error(429, f"Rate limit exceeded: try again in {wait} seconds")
                if self.retry_after_header:
                    headers["Retry-After"] = str(wait)
            else:
                status, answer = self._route(method, path, body, api_key)
            self.requests.append(Request(method, path, body, api_key, status, answer))
            return status, answer, headers

    def _rate_limited(self) -> int | None:
        """None while this request is within the window's limit; else the seconds until the window ends."""
        if self.rate_limit is None:
            return None
        now = time.monotonic()
        started, count = self._window
        if now - started >= self.rate_window:
            started, count = now, 0
        self._window = (started, count + 1)
        if count < self.rate_limit:
            return None
        return max(1, math.ceil(started + self.rate_window - now))

    def _route(self, method: str, path: str, body: Any, api_key: str | None) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path == "/health":
            return _ok({"status": "healthy", "timestamp": int(time.time()), "database": "connected"})
        if api_key != self.api_key:
            return 401, {"error": "Unauthorized", "message": "Invalid or missing API key", "timestamp": _now()}
        # Path parameters are used as they come: the server does not decode them.
        parts = path.strip("/").split("/")
        if method == "GET" and parts == ["task-types"]:
            return _error(500, "Invalid select field: param_schema_json")  # the real server's bug
        if method == "GET" and len(parts) == 2 and parts[0] == "task-types":
            return self._get_type(parts[1])
        if method == "GET" and len(parts) == 2 and parts[0] == "tasks":
            return self._get_task(parts[1])
        if not isinstance(body, dict):
            return _error(400, "Invalid JSON in request body")
        if method == "POST" and parts == ["task-types", "register"]:
            return self._post_register(body)
        if method == "POST" and parts == ["tasks"]:
            return self._post_task(body)
        if method == "POST" and parts == ["tasks", "claim"]:
            return self._claim(body)
        if method == "POST" and len(parts) == 3 and parts[0] == "tasks" and parts[2] in ("complete", "progress"):
            if not parts[1].isdigit() or int(parts[1]) not in self._tasks:
                return _error(404, "Task not found")
            task = self._tasks[int(parts[1])]
            return self._complete(task, body) if parts[2] == "complete" else self._progress(task, body)
        return _error(404, "Endpoint not found")

    def _register(self, name: str, version: str, schema: dict[str, Any]) -> dict[str, Any]:
        known = self._types.get(name)
        if known is None:
            known = self._types[name] = {"id": len(self._types) + 1, "name": name}
        known.update(version=version, param_schema=schema)
        return known

    def _get_type(self, name: str) -> tuple[int, dict[str, Any]]:
        known = self._types.get(name)
        items = [] if known is None else [{**known, "is_active": True}]
        return _ok({"items": items, "count": len(items)})

    def _get_task(self, task_id: str) -> tuple[int, dict[str, Any]]:
        task = self._tasks.get(int(task_id)) if task_id.isdigit() else None
        if task is None:
            return _ok({"items": [], "count": 0})
        row = {
            "id": task.id, "type": task.type, "status": task.status, "params": task.params,
            "attempts": task.attempts, "claimed_by": task.claimed_by, "result": task.result,
            "error_message": task.error, "completed_at": task.completed_at, "priority": task.priority,
        }  # fmt: skip
        return _ok({"items": [row], "count": 1})

    def _post_register(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        for key in ("name", "version", "param_schema"):
            if not body.get(key):
                return _error(400, f"Missing required field: {key}")
        schema = body["param_schema"]
        if not isinstance(schema, dict) or "type" not in schema:
            return _error(400, 'JSON schema must have a "type" property', details=[f"got {schema!r}"])
        created = body["name"] not in self._types
        known = self._register(str(body["name"]), str(body["version"]), schema)
        if created:
            return _ok({"id": str(known["id"]), "name": known["name"], "version": known["version"], "created": True})
        # An existing type is replaced, version and schema, and its id comes back as an integer.
        return _ok({"id": known["id"], "name": known["name"], "version": known["version"], "updated": True})

    def _post_task(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if body.get("type") not in self._types:
            return _error(404, "Task type not found")
        params = body.get("params")
        # PHP decodes {} and [] alike, into an empty array: not "an object" to its check.
        if not isinstance(params, dict) or not params:
            return _error(400, "Field 'params' must be of type object")
        problem = _schema_problem(params, self._types[body["type"]]["param_schema"], "")
        if problem is not None:
            return _error(400, problem)
        key = (body["type"], json.dumps(params, sort_keys=True))
        if key in self._dedup:  # forever: whatever became of that task
            return _ok({"id": self._dedup[key], "type": body["type"], "deduplicated": True})
        task_id = len(self._tasks) + 1
        priority = body.get("priority")
        self._tasks[task_id] = ServerTask(task_id, body["type"], params, priority if isinstance(priority, int) else 0)
        self._dedup[key] = task_id
        return _ok({"id": str(task_id), "type": body["type"], "status": "pending"})

    def _claim(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        worker_id, type_id = body.get("worker_id"), body.get("task_type_id")
        if not worker_id or type_id is None:
            return _error(400, "Missing required field: worker_id or task_type_id")
        if not isinstance(type_id, int) or isinstance(type_id, bool) or type_id <= 0:
            return _error(400, "task_type_id must be a positive integer")
        names = [name for name, known in self._types.items() if known["id"] == type_id]
        ready = [
            task
            for task in self._tasks.values()
            if task.type in names and (task.status == "pending" or (task.status == "claimed" and self._expired(task)))
        ]
        if not ready:
            return _error(500, NO_TASK)  # the real server rolls back twice
        task = min(ready, key=lambda t: (-t.priority, t.id))
        task.status, task.claimed_by, task.claimed_at = "claimed", str(worker_id), time.monotonic()
        task.attempts += 1  # as the real task_claim does: the answer counts this claim
        task.claims.append(str(worker_id))
        data = {"id": task.id, "type": task.type, "params": task.params, "attempts": task.attempts}
        return _ok({**data, "priority": task.priority})

    def _owned(self, task: ServerTask, body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """The refusal of a report on ``task``, or None when ``body``'s worker holds it."""
        if not body.get("worker_id"):
            return _error(400, "Missing required field: worker_id")
        if task.status != "claimed":
            return _error(400, "Task is not in claimed state")
        if task.claimed_by != body["worker_id"] or self._expired(task):
            return _error(403, "Task is claimed by another worker or its claim expired")
        return None

    def _complete(self, task: ServerTask, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        refused = self._owned(task, body)
        if refused is not None:
            return refused
        if not isinstance(body.get("success"), bool):
            return _error(400, "Missing required field: success")
        task.completions.append(body)
        task.claimed_by = task.claimed_at = None
        task.completed_at = time.time()
        if body["success"]:
            result = body.get("result")
            # PHP reads an empty object or list as false: NULL is stored.
            task.status, task.result = "completed", None if result in ({}, []) else result
        else:
            task.error = body.get("error")
            task.status = "pending" if task.attempts < self.max_attempts else "failed"
        status = "pending (retry)" if task.status == "pending" else task.status
        return _ok({"id": task.id, "status": status})

    def _progress(self, task: ServerTask, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        refused = self._owned(task, body)
        if refused is not None:
            return refused
        progress = body.get("progress")
        if not isinstance(progress, int) or isinstance(progress, bool) or not 0 <= progress <= 100:
            return _error(400, "Progress must be between 0 and 100")
        task.progress, task.progress_message = progress, body.get("message")
        return _ok({"id": str(task.id), "progress": progress})

    def _expired(self, task: ServerTask) -> bool:
        return task.claimed_at is not None and time.monotonic() - task.claimed_at > self.claim_timeout


class _Handler(BaseHTTPRequestHandler):
    app: PrismQServer
    protocol_version = "HTTP/1.1"
    # One write per answer (headers and body together), so that no answer
    # waits on the client's delayed ACK.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self, method: str) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.app.fault
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "hang":
            time.sleep(self.app.hang)
        if fault == "503":
            self._send(503, b"<html><body>503 Service Unavailable</body></html>", "text/html")
            return
        if fault == "500":  # the database is down: every route, /health included
            answer = {"success": False, "error": INTERNAL, "timestamp": _now()}
            self._send(500, json.dumps(answer).encode(), "application/json")
            return
        if fault == "garbage":
            self._send(200, b"<?php echo 'oops'; Fatal error", "text/html")
            return
        path = urlsplit(self.path).path
        if not path.startswith("/api/"):
            self._send(404, b"not found", "text/plain")
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = path.removeprefix("/api")
        status, answer, headers = self.app.handle(method, path, body, self.headers.get("X-API-Key"))
        self._send(status, json.dumps(answer).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def _now() -> int:
    return int(time.time())


def _json_type(value: Any) -> str:
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), "null")


def _schema_problem(value: Any, schema: Any, at: str) -> str | None:
    """The server's own check of params against a type's schema: type, required, properties, items.

    "Type mismatch at tags: expected array, got string" is the real server's wording;
    the wording for a missing field is this stand-in's.
    """
    if not isinstance(schema, dict):
        return None
    expected, actual = schema.get("type"), _json_type(value)
    if isinstance(expected, str) and expected != actual and not (expected == "number" and actual == "integer"):
        return f"Type mismatch at {at or 'root'}: expected {expected}, got {actual}"
    if isinstance(value, dict):
        for name in schema.get("required") or []:
            if name not in value:
                return f"Missing required field: {at + '.' if at else ''}{name}"
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                problem = _schema_problem(value[name], sub, f"{at}.{name}" if at else name)
                if problem is not None:
                    return problem
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problem = _schema_problem(item, schema["items"], f"{at}[{index}]")
            if problem is not None:
                return problem
    return None


def _ok(data: Any, message: str = "Success") -> tuple[int, dict[str, Any]]:
    return 200, {"success": True, "message": message, "data": data, "timestamp": _now()}


def _error(status: int, error: str, details: list[str] | None = None) -> tuple[int, dict[str, Any]]:
    answer: dict[str, Any] = {"success": False, "error": error, "timestamp": _now()}
    if details:
        answer["details"] = details
    return status, answer


@pytest.fixture(name="prismq_server")
def prismq_server_fixture() -> Iterator[PrismQServer]:
    """A started server with the default claim timeout; import this fixture into a test module to use it.

    Tests that need a claim to expire build their own with a short ``claim_timeout``
    or call ``expire_claims()``.
    """
    with PrismQServer() as server:
        yield server
