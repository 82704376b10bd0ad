"""A property of the API: whatever it accepts reads back, as valid JSON, whole or listed.

hypothesis sends params that mix what JSON holds with what Python's json
module lets through (NaN, Infinity, lone surrogates, deep nesting, odd keys);
a submit is either refused with a JSON error or stored, and a stored task
always reads back 200 and strict JSON, equal to what was sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.api import create_app
from runner.host import Host
from runner.sources.embedded import EmbeddedQueue
from runner.telemetry.metrics import Metrics
from tests.unit.test_api import ECHO, OWNER, FakeRunner, config_for

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20),
)
_json_like = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=40,
)


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


_params = st.one_of(
    st.dictionaries(st.text(max_size=8), _json_like, max_size=5),
    st.integers(min_value=50, max_value=80).map(lambda depth: {"deep": _deep(depth)}),
)


def _strict(content: bytes) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(content.decode("utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp: Path = tmp_path_factory.mktemp("property")
    queue = EmbeddedQueue(path=tmp / "q.db", owner=OWNER)
    host = Host(config_for(tmp), queue, FakeRunner(), owner=OWNER)
    host.alive = True
    with TestClient(create_app(host, Metrics(), queue)) as test_client:
        yield test_client


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=_params)
def test_whatever_is_accepted_reads_back_as_json(client: TestClient, params: dict[str, Any]) -> None:
    # Sent as Python's json writes it, NaN and lone surrogates included: what a careless client sends.
    body = json.dumps({"type": ECHO, "params": params}, allow_nan=True).encode()
    response = client.post("/tasks", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (201, 422), response.text
    answer = _strict(response.content)
    if response.status_code == 422:
        assert isinstance(answer["error"], str) and answer["error"]
        return
    task_id = answer["id"]
    one = client.get(f"/tasks/{task_id}")
    assert one.status_code == 200
    assert _strict(one.content)["params"] == json.loads(json.dumps(params))
    for query in ({}, {"full": "true", "limit": "1000"}):
        listed = client.get("/tasks", params=query)
        assert listed.status_code == 200
        assert task_id in {t["id"] for t in _strict(listed.content)}
