"""runner.client: `workerhost submit --wait` and `Client.wait` let the host answer when the task ends
(``?wait``), in bounded steps, instead of polling; against a fake host (httpx's MockTransport)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from runner.client import WAIT_STEP, ApiUnavailable, Client

PENDING = {"id": "t-1", "type": "T", "status": "pending"}
DONE = {**PENDING, "status": "completed", "result": {"n": 1}}


class FakeHost:
    """Answers ``POST /tasks`` and ``GET /tasks/t-1`` as ``answer(request, n)`` says, recording each request."""

    def __init__(self, answer: Callable[[httpx.Request, int], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request, len(self.requests))

    def seen(self) -> list[tuple[str, str, float | None]]:
        return [
            (r.method, r.url.path, float(r.url.params["wait"]) if "wait" in r.url.params else None)
            for r in self.requests
        ]


def client_of(host: FakeHost) -> Client:
    return Client("http://host.invalid", transport=httpx.MockTransport(host))


def test_submit_and_wait_asks_the_host_to_answer_when_the_task_ends() -> None:
    # The host holds each ?wait: 202 twice (the task still runs), then 200 with the finished task.
    host = FakeHost(lambda request, n: httpx.Response(202 if n < 3 else 200, json=PENDING if n < 3 else DONE))

    task = client_of(host).submit_and_wait("T", {"x": 1}, priority=3)

    assert task == DONE
    assert host.seen() == [
        ("POST", "/tasks", WAIT_STEP),
        ("GET", "/tasks/t-1", WAIT_STEP),
        ("GET", "/tasks/t-1", WAIT_STEP),
    ]
    assert host.requests[0].read() == b'{"type":"T","params":{"x":1},"priority":3}'
    assert host.requests[0].extensions["timeout"]["read"] > WAIT_STEP  # the request outlives its wait


def test_a_task_that_ends_within_the_submit_is_one_request() -> None:
    host = FakeHost(lambda request, n: httpx.Response(200, json=DONE))
    assert client_of(host).submit_and_wait("T", {}) == DONE
    assert host.seen() == [("POST", "/tasks", WAIT_STEP)]


def test_the_callers_timeout_bounds_every_wait_and_ends_it() -> None:
    def answer(request: httpx.Request, n: int) -> httpx.Response:
        time.sleep(float(request.url.params["wait"]))  # as the host does: hold the request, then 202
        return httpx.Response(202, json=PENDING)

    host = FakeHost(answer)
    started = time.monotonic()
    with pytest.raises(ApiUnavailable, match=r"still pending after 0\.5s"):
        client_of(host).submit_and_wait("T", {}, timeout=0.5)
    assert time.monotonic() - started < 1.5
    assert all(wait is not None and 0 < wait <= 0.5 for _, _, wait in host.seen())
    assert len(host.requests) <= 3


def test_a_host_from_before_wait_is_not_asked_again_at_once() -> None:
    host = FakeHost(lambda request, n: httpx.Response(200 if n > 1 else 201, json=PENDING))  # ?wait ignored
    with pytest.raises(ApiUnavailable, match="still pending"):
        client_of(host).wait("t-1", timeout=1.5)
    assert 2 <= len(host.requests) <= 5  # a pause between requests, not a busy loop
