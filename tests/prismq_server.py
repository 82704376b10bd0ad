"""A stand-in PrismQ TaskManager: a real HTTP server on 127.0.0.1, state in memory.

It follows the API as the real server answers it, quirks included:

- every call but ``GET /health`` needs ``X-API-Key``; a missing or wrong key is
  a 401 ``{"error": "Unauthorized", "message": ...}`` without ``success``;
- an empty queue answers ``POST /tasks/claim`` with HTTP 500 "There is no
  active transaction";
- ids are integers in some answers (``GET /task-types/{name}``, claims of odd
  task ids) and strings in others (``POST /task-types/register``, claims of
  even task ids, ``POST /tasks``);
- a claim expires after ``claim_timeout`` seconds: the task can then be claimed
  again by anyone, and a report on the expired claim gets 403; a report on a
  task that is no longer claimed gets 400 "Task is not in claimed state";
- a claim answers ``attempts`` = the number of claims including this one (1
  the first time), as the real server's ``task_claim`` does; ``success:
  false`` re-queues the task until ``max_attempts`` claims, then the task is
  failed.

Tests drive it directly too: ``add_task_type``, ``create_task``, ``task`` (a
snapshot of one task's state), ``expire_claims``, ``requests`` (what it
received, with what it answered) and ``fault``, to play an unhealthy server:
"500" (a database error), "503" (an HTML page), "drop" (the connection closed
unanswered), "garbage" (HTTP 200 that is not JSON) or "hang" (an answer after
``hang`` seconds). Use it as a context manager, or as the ``prismq_server``
fixture (import ``prismq_server_fixture`` into a test module)::

    with PrismQServer(claim_timeout=0.5) as server:
        server.add_task_type("PrismQ.Example.Echo")
        task_id = server.create_task("PrismQ.Example.Echo", {"text": "hi"})
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import pytest

API_KEY = "test-api-key"
NO_TASK = "There is no active transaction"

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
    error: str | None = None
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


class PrismQServer:
    """The server and its state; ``start()`` / ``stop()`` or ``with``."""

    def __init__(
        self,
        api_key: str = API_KEY,
        claim_timeout: float = 300.0,
        max_attempts: int = 3,
        hang: float = 2.0,
    ) -> None:
        self.api_key = api_key
        self.claim_timeout = claim_timeout
        self.max_attempts = max_attempts
        self.hang = hang  # how long a "hang" fault sleeps before answering
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

    def add_task_type(self, name: str, version: str = "1.0.0") -> int:
        """Register a task type (or return the id it has)."""
        with self._lock:
            return int(self._register(name, version, {"type": "object"})["id"])

    def type_id(self, name: str) -> int | None:
        """The id of a task type, or None when unknown."""
        with self._lock:
            known = self._types.get(name)
            return None if known is None else int(known["id"])

    def create_task(self, task_type: str, params: Any = None, priority: int = 0) -> str:
        """A new pending task of a known type; its id as a string."""
        with self._lock:
            if task_type not in self._types:
                raise KeyError(f"unknown task type {task_type!r}: add_task_type first")
            task_id = len(self._tasks) + 1
            params = {} if params is None else params
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

    def handle(self, method: str, path: str, body: Any, api_key: str | None) -> tuple[int, dict[str, Any]]:
        """One request's status and JSON answer (the HTTP part is in ``_Handler``)."""
        with self._lock:
            status, answer = self._route(method, path, body, api_key)
            self.requests.append(Request(method, path, body, api_key, status))
            return status, answer

    def _route(self, method: str, path: str, body: Any, api_key: str | None) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path == "/health":
            return _ok({"status": "healthy", "timestamp": int(time.time()), "database": "connected"})
        if api_key != self.api_key:
            return 401, {"error": "Unauthorized", "message": "Invalid or missing API key", "timestamp": _now()}
        parts = path.strip("/").split("/")
        if method == "GET" and len(parts) == 2 and parts[0] == "task-types":
            return self._get_type(unquote(parts[1]))
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

    def _post_register(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        for key in ("name", "version", "param_schema"):
            if not body.get(key):
                return _error(400, f"Missing required field: {key}")
        schema = body["param_schema"]
        if not isinstance(schema, dict) or "type" not in schema:
            return _error(400, 'JSON schema must have a "type" property', details=[f"got {schema!r}"])
        created = body["name"] not in self._types
        known = self._register(str(body["name"]), str(body["version"]), schema)
        data = {"id": str(known["id"]), "name": known["name"], "version": known["version"]}
        return _ok({**data, "created": True} if created else {**data, "updated": True})

    def _post_task(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if body.get("type") not in self._types:
            return _error(404, "Task type not found")
        task_id = len(self._tasks) + 1
        self._tasks[task_id] = ServerTask(task_id, body["type"], body.get("params") or {})
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
        task_id: int | str = task.id if task.id % 2 else str(task.id)
        data = {"id": task_id, "type": task.type, "params": task.params, "attempts": task.attempts}
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
        if body["success"]:
            task.status, task.result = "completed", body.get("result")
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
        if fault == "500":
            answer = {"success": False, "error": "SQLSTATE[HY000] [2002] Connection refused", "timestamp": _now()}
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
        status, answer = self.app.handle(method, path.removeprefix("/api"), body, self.headers.get("X-API-Key"))
        self._send(status, json.dumps(answer).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def _now() -> int:
    return int(time.time())


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
