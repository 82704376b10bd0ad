"""A small client for the HTTP API of a running ``workerhost serve`` (what the CLI uses)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from runner.config import ENV_TOKEN
from runner.errors import WorkerhostError

FINAL = ("completed", "failed", "dead")
WAIT_STEP = 60.0  # seconds that one request with ?wait holds at most (the host takes up to 300)


class ApiUnavailable(WorkerhostError):
    """The API did not answer, or answered with an error; the message says which."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class Client:
    """``submit``, ``get``, ``list``, ``retry`` and ``wait`` against ``base_url``, with ``token`` if given
    (``transport``: httpx's, for tests)."""

    def __init__(
        self, base_url: str, timeout: float = 30.0, token: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self._token = bool(token)
        self._timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)

    def submit(self, task_type: str, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return self._object("POST", "/tasks", json=_body(task_type, params, extra))

    def submit_and_wait(
        self, task_type: str, params: dict[str, Any], timeout: float | None = None, **extra: Any
    ) -> dict[str, Any]:
        """Submit, and wait until the task is completed, failed or dead (``POST /tasks?wait``, then
        ``wait``); ApiUnavailable when ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        task = self._object("POST", "/tasks", json=_body(task_type, params, extra), **self._step(deadline))
        if task["status"] in FINAL:
            return task
        return self._until_final(task["id"], deadline, timeout)

    def get(self, task_id: str) -> dict[str, Any]:
        return self._object("GET", f"/tasks/{task_id}")

    def list(self, status: str | None = None, task_type: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"status": status, "type": task_type, "limit": limit}.items() if v is not None}
        found: list[dict[str, Any]] = self._call("GET", "/tasks", params=params)
        return found

    def retry(self, task_id: str) -> dict[str, Any]:
        return self._object("POST", f"/tasks/{task_id}/retry")

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Until the task is completed, failed or dead (ApiUnavailable when ``timeout`` passes first)."""
        return self._until_final(task_id, None if timeout is None else time.monotonic() + timeout, timeout)

    def _until_final(self, task_id: str, deadline: float | None, timeout: float | None) -> dict[str, Any]:
        """``GET /tasks/{id}?wait=``, again and again: the host answers the moment the task ends, and each
        request holds at most WAIT_STEP seconds (no poll of our own)."""
        while True:
            step = self._step(deadline)
            asked = time.monotonic()
            task = self._object("GET", f"/tasks/{task_id}", **step)
            if task["status"] in FINAL:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise ApiUnavailable(f"task {task_id} is still {task['status']} after {timeout:g}s")
            if time.monotonic() - asked < step["params"]["wait"] / 2:
                # Answered at once, not ended: a host from before ?wait. Ask it again in a while, not at once.
                time.sleep(0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic())))

    def _step(self, deadline: float | None) -> dict[str, Any]:
        """The next request's ?wait (WAIT_STEP at most, and no further than the deadline), and its timeout."""
        seconds = WAIT_STEP if deadline is None else min(WAIT_STEP, deadline - time.monotonic())
        seconds = round(max(seconds, 0.001), 3)  # the host takes 0 < wait <= 300
        return {"params": {"wait": seconds}, "timeout": self._timeout + seconds}

    def close(self) -> None:
        self._http.close()

    def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body = self._call(method, path, **kwargs)
        if not isinstance(body, dict):
            raise ApiUnavailable(f"{method} {path}: expected a JSON object")
        return body

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiUnavailable(
                f"workerhost at {self.base_url} does not answer ({exc.__class__.__name__}: {exc}); "
                "is `workerhost serve` running? (--url or [host] http names it)"
            ) from None
        try:
            body = response.json()
        except ValueError:
            raise ApiUnavailable(
                f"{method} {path}: HTTP {response.status_code}, not JSON", response.status_code
            ) from None
        if response.status_code == 401:
            raise ApiUnavailable(self._refused(body), 401)
        if response.is_error:
            message = body.get("error") if isinstance(body, dict) else None
            raise ApiUnavailable(f"{method} {path}: {message or response.reason_phrase}", response.status_code)
        return body

    def _refused(self, body: Any) -> str:
        said = body.get("error") if isinstance(body, dict) else None
        sent = "the token sent was refused" if self._token else "it asks for a token and none was sent"
        return (
            f"workerhost at {self.base_url} refused the request: {sent} ({said or 'HTTP 401'}); "
            f"set {ENV_TOKEN} to one of its tokens ([host] api_token or api_tokens)"
        )


def _body(task_type: str, params: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {"type": task_type, "params": params, **{k: v for k, v in extra.items() if v is not None}}


def exit_code(task: dict[str, Any]) -> int:
    """The exit code ``workerhost run`` would give: 0 completed, 1 dead, 2 failed, 3 timeout."""
    status = task.get("status")
    if status == "completed":
        return 0
    if task.get("outcome") == "timeout":
        return 3
    if status == "dead":
        return 1
    return 2
