"""tests/prismq_server.py: the stand-in TaskManager shares the facts of the real one (issue 10, item 10).

The adapter's tests mean something only if the stand-in answers as the real
server does; each test here is one fact seen on the real server, asked over
HTTP as the adapter asks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.prismq_server import API_KEY, NO_TASK, PrismQServer

ECHO, TAGS = "PrismQ.Example.Echo", "PrismQ.Legacy.Tags"
TAGS_SCHEMA = {"type": "object", "required": ["tags"], "properties": {"tags": {"type": "array"}}}


@pytest.fixture
def server() -> Iterator[PrismQServer]:
    with PrismQServer() as started:
        started.add_task_type(ECHO)
        started.add_task_type(TAGS, version="3.0.0", schema=TAGS_SCHEMA)
        yield started


@pytest.fixture
def api(server: PrismQServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}) as client:
        yield client


def claim(api: httpx.Client, server: PrismQServer, name: str = ECHO, worker: str = "w") -> httpx.Response:
    return api.post("/tasks/claim", json={"worker_id": worker, "task_type_id": server.type_id(name)})


def data(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_params_that_are_an_empty_object_are_refused_at_create(api: httpx.Client) -> None:
    response = api.post("/tasks", json={"type": ECHO, "params": {}})
    assert response.status_code == 400
    assert response.json()["error"] == "Field 'params' must be of type object"


def test_tasks_are_deduplicated_on_type_and_params_forever(api: httpx.Client, server: PrismQServer) -> None:
    first = data(api.post("/tasks", json={"type": ECHO, "params": {"text": "hi"}}))
    assert first["id"] == "1" and "deduplicated" not in first
    task = data(claim(api, server))
    data(api.post(f"/tasks/{task['id']}/complete", json={"worker_id": "w", "success": True, "result": {"n": 1}}))
    again = data(api.post("/tasks", json={"type": ECHO, "params": {"text": "hi"}}))
    assert again["id"] == 1 and again["deduplicated"] is True  # the completed task's id, as an integer
    other = data(api.post("/tasks", json={"type": TAGS, "params": {"tags": ["hi"]}}))
    assert other["id"] == "2"


def test_create_checks_params_against_the_types_schema(api: httpx.Client) -> None:
    response = api.post("/tasks", json={"type": TAGS, "params": {"tags": "a,b"}})
    assert response.status_code == 400
    assert response.json()["error"] == "Type mismatch at tags: expected array, got string"
    assert api.post("/tasks", json={"type": TAGS, "params": {"tags": ["a"]}}).status_code == 200


def test_unknown_types_and_tasks_are_200_with_no_items(api: httpx.Client) -> None:
    for path in ("/task-types/PrismQ.Nothing", "/tasks/999", "/tasks/abc"):
        assert data(api.get(path)) == {"items": [], "count": 0}, path


def test_path_parameters_are_not_decoded(api: httpx.Client, server: PrismQServer) -> None:
    server.add_task_type("H1 Space", version="3.0.0")
    assert data(api.get("/task-types/H1%20Space")) == {"items": [], "count": 0}


def test_an_empty_queue_and_an_unknown_type_id_are_500_no_active_transaction(
    api: httpx.Client, server: PrismQServer
) -> None:
    for type_id in (server.type_id(ECHO), 999):
        response = api.post("/tasks/claim", json={"worker_id": "w", "task_type_id": type_id})
        assert response.status_code == 500 and response.json()["error"] == NO_TASK


def test_listing_the_task_types_is_a_500(api: httpx.Client) -> None:
    response = api.get("/task-types")
    assert response.status_code == 500 and response.json()["error"].startswith("Invalid select field: ")


def test_with_the_database_down_every_route_is_500_health_included(api: httpx.Client, server: PrismQServer) -> None:
    server.fault = "500"
    for method, path in (("GET", "/health"), ("GET", f"/task-types/{ECHO}"), ("POST", "/tasks/claim")):
        response = api.request(method, path, json={})
        assert response.status_code == 500 and response.json()["error"] == "Internal server error", path


def test_a_requeued_task_keeps_its_error_message_and_completed_at(api: httpx.Client, server: PrismQServer) -> None:
    task_id = server.create_task(ECHO, {"text": "hi"})
    data(claim(api, server))
    data(api.post(f"/tasks/{task_id}/complete", json={"worker_id": "w", "success": False, "error": "Busy: x"}))
    [row] = data(api.get(f"/tasks/{task_id}"))["items"]
    assert row["status"] == "pending"
    assert row["error_message"] == "Busy: x" and row["completed_at"] is not None


@pytest.mark.parametrize("result", [{}, []])
def test_an_empty_result_is_stored_as_null(api: httpx.Client, server: PrismQServer, result: Any) -> None:
    task_id = server.create_task(ECHO, {"text": "hi"})
    data(claim(api, server))
    data(api.post(f"/tasks/{task_id}/complete", json={"worker_id": "w", "success": True, "result": result}))
    state = server.task(task_id)
    assert state.status == "completed" and state.result is None


def test_ids_are_strings_from_register_new_and_create_integers_elsewhere(
    api: httpx.Client, server: PrismQServer
) -> None:
    new = data(
        api.post("/task-types/register", json={"name": "N", "version": "1.0.0", "param_schema": {"type": "object"}})
    )
    assert isinstance(new["id"], str) and new["created"] is True
    again = data(
        api.post("/task-types/register", json={"name": "N", "version": "2.0.0", "param_schema": {"type": "object"}})
    )
    assert isinstance(again["id"], int) and again["updated"] is True  # and it replaced the type
    assert server.task_type("N") == {
        "id": again["id"],
        "name": "N",
        "version": "2.0.0",
        "param_schema": {"type": "object"},
    }
    [known] = data(api.get(f"/task-types/{ECHO}"))["items"]
    assert isinstance(known["id"], int)
    created = data(api.post("/tasks", json={"type": ECHO, "params": {"text": "a"}}))
    assert isinstance(created["id"], str)
    assert isinstance(data(api.post("/tasks", json={"type": ECHO, "params": {"text": "a"}}))["id"], int)
    assert isinstance(data(claim(api, server))["id"], int)


def test_a_401_has_no_success_field(server: PrismQServer) -> None:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": "wrong"}) as wrong:
        response = wrong.get(f"/task-types/{ECHO}")
    assert response.status_code == 401 and "success" not in response.json()
    assert response.json()["error"] == "Unauthorized"


@pytest.mark.parametrize("header", [False, True])
def test_past_100_requests_a_minute_every_request_is_429_until_the_window_ends(header: bool) -> None:
    with PrismQServer(retry_after_header=header) as server, httpx.Client(base_url=server.url) as api:
        statuses = [api.get("/health").status_code for _ in range(101)]
        assert statuses == [200] * 100 + [429]
        refused = api.get("/health")
        seconds = int(refused.json()["error"].rsplit("try again in ", 1)[1].split()[0])
        assert refused.status_code == 429 and 55 <= seconds <= 60
        assert refused.headers.get("Retry-After") == (str(seconds) if header else None)


def test_the_rate_window_starts_again_after_it_ends() -> None:
    with PrismQServer(rate_limit=2, rate_window=0.3) as server, httpx.Client(base_url=server.url) as api:
        assert [api.get("/health").status_code for _ in range(3)] == [200, 200, 429]
        time.sleep(0.35)
        assert api.get("/health").status_code == 200
