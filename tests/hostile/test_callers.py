"""Hostile callers and hostile results against a real ``workerhost serve``: nothing a caller or a
worker sends can break the host or its records, and nothing it serves or prints is invalid JSON.

Beside test_hostile.py (workers that attack the machine): here the attacks are on the records.
An independent fuzzer, schemathesis, runs against the live API with every check on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, new_host_id
from tests.serving import Serve, config_text, executable, free_port

pytestmark = pytest.mark.docker

BEHAVE = "Test.Behave"
TOKEN = "callers-" + "c4" * 16


@pytest.fixture(scope="module")
def callers_host(tmp_path_factory: pytest.TempPathFactory, behave_image: str) -> Iterator[Serve]:
    """One host for the module, behind a token (the fuzzer then tries the API with and without it)."""
    folder = tmp_path_factory.mktemp("callers")
    port = free_port()
    config = folder / "serve.toml"
    text = config_text(new_host_id(), port, folder / "queue.db", behave_image, extra_host=f'api_token = "{TOKEN}"\n')
    config.write_text(text)
    host = Serve(config, port, folder / "serve.log").start()
    host.http.headers["Authorization"] = f"Bearer {TOKEN}"
    yield host
    host.stop()


def strict_json(content: bytes) -> Any:
    """JSON as the RFC has it: UTF-8, no NaN or Infinity, no lone surrogates."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    text = content.decode("utf-8")
    value = json.loads(text, parse_constant=refuse)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return value


def total(host: Serve) -> int:
    return len(host.http.get("/tasks", params={"limit": 1000}).json())


def _nested(depth: int, inner: str = "{}") -> str:
    return '{"a": ' * depth + inner + "}" * depth


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (f'{{"type": "{BEHAVE}", "params": {_nested(255)}}}'.encode(), "nested deeper than"),
        (b'{"type": "Test.Behave", "params": {"a": "\\ud800"}}', "lone surrogate"),
        (b'{"type": "Test.Behave", "params": {"a": "\xed\xa0\x80"}}', "lone surrogate"),
        (b'{"type": "Test.Behave", "params": {"n": NaN}}', "NaN"),
        (b'{"type": "Test.Behave", "correlation_id": "a\\u0000b"}', "correlation_id"),
        (b'{"type": "Test.Behave", "traceparent": "00-' + b"0" * 8000 + b'"}', "traceparent"),
    ],
    ids=["nested-255", "surrogate-escaped", "surrogate-raw", "nan", "correlation-nul", "traceparent-8k"],
)
def test_a_submit_that_would_not_read_back_is_refused_and_nothing_is_stored(
    callers_host: Serve, body: bytes, says: str
) -> None:
    before = total(callers_host)
    response = callers_host.http.post("/tasks", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert says in strict_json(response.content)["error"]
    assert total(callers_host) == before

    # The same task in a batch, after a good one: the batch is refused whole, naming it by its index.
    batch = b'[{"type": "Test.Behave", "params": {"do": "ok"}}, ' + body + b"]"
    response = callers_host.http.post("/tasks", content=batch, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    refused = strict_json(response.content)
    assert says in refused["error"] and [d["field"][:4] for d in refused["details"]] == ["[1]."]
    assert total(callers_host) == before


@pytest.mark.parametrize(
    ("stdout", "says"),
    [
        ('{"success": true, "result": {"a": "\\ud800"}}', "result.a: a lone surrogate"),
        ('{"success": true, "result": ' + "[" * 900 + "]" * 900 + "}", "nested deeper than"),
        ('{"success": true, "result": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deep"),
        ('{"success": true, "result": {"big": 1e400}}', "result.big: inf"),
        ('{"success": true, "result": [NaN]}', "result[0]: nan"),
    ],
    ids=["surrogate", "nested-900", "nested-100k", "1e400", "nan"],
)
def test_a_result_that_cannot_be_stored_is_invalid_output_and_every_read_is_json(
    callers_host: Serve, stdout: str, says: str
) -> None:
    task = callers_host.submit(BEHAVE, do="exit", code=0, stdout=stdout)
    done = callers_host.wait_for(task["id"], ("completed", "failed", "dead"))

    assert done["status"] == "failed"
    assert done["attempts"] == 1  # permanent: the same worker would write the same
    assert done["error"]["type"] == "InvalidOutput"
    assert says in done["error"]["message"]
    for path, params in ((f"/tasks/{task['id']}", {}), ("/tasks", {"full": "true"}), ("/tasks", {})):
        response = callers_host.http.get(path, params=params)
        assert response.status_code == 200
        strict_json(response.content)


def test_a_hostile_error_message_is_stored_as_text(callers_host: Serve) -> None:
    error = {"type": "X" * 10_000, "message": {"nested": ["\\ud800"]}, "retriable": False}
    task = callers_host.submit(BEHAVE, do="exit", code=2, stdout=json.dumps({"success": False, "error": error}))
    done = callers_host.wait_for(task["id"], ("failed", "dead", "completed"))
    assert done["status"] == "failed"
    assert len(done["error"]["type"]) < 300  # cut, and said so
    assert isinstance(done["error"]["message"], str)
    strict_json(callers_host.http.get(f"/tasks/{task['id']}").content)


def test_a_traceparent_header_of_8k_is_ignored(callers_host: Serve) -> None:
    response = callers_host.http.post(
        "/tasks", json={"type": BEHAVE, "params": {"do": "ok"}}, headers={"traceparent": "00-" + "a" * 8192}
    )
    assert response.status_code == 201
    done = callers_host.wait_for(response.json()["id"], ("completed",))
    sent = done["result"]["task"]["traceparent"]  # what the worker got
    assert len(sent) == 55 and "a" * 40 not in sent


def test_the_readme_curl_examples_work_as_printed(callers_host: Serve, tmp_path: Path, behave_image: str) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed to run the README's examples"
    lines = [line.removeprefix("$ ") for line in (ROOT / "README.md").read_text().splitlines()]
    examples = [
        line for line in lines if line.startswith(("curl -s localhost:8080/tasks", "curl -s 'localhost:8080/tasks"))
    ]
    assert len(examples) >= 4, "the README's curl examples moved"  # one task, with a token, with ?wait, a batch
    # The shipped config has no token: the plain example runs against a host without one.
    port = free_port()
    config = tmp_path / "plain.toml"
    config.write_text(config_text(new_host_id(), port, tmp_path / "q.db", behave_image))
    plain = Serve(config, port, tmp_path / "plain.log").start()
    try:
        for example in examples:
            host = callers_host if "Authorization" in example else plain
            command = example.replace("localhost:8080", f"127.0.0.1:{host.port}")
            command = command.replace("PrismQ.Example.Echo", BEHAVE).replace('{"text": "hi"}', '{"do": "ok"}')
            done = subprocess.run(
                ["sh", "-c", command], capture_output=True, text=True, timeout=30,
                env={"PATH": "/usr/bin:/bin", "WORKERHOST_API_TOKEN": TOKEN},
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            answer = strict_json(done.stdout.encode())
            tasks = answer if isinstance(answer, list) else [answer]
            status = "completed" if "?wait=" in example else "pending"
            assert [(t["type"], t["status"]) for t in tasks] == [(BEHAVE, status)] * len(tasks), (example, answer)
    finally:
        plain.stop()


def test_workerhost_run_prints_json_and_no_traceback_for_a_hostile_result(tmp_path: Path, behave_image: str) -> None:
    config = tmp_path / "run.toml"
    config.write_text(config_text(new_host_id(), free_port(), tmp_path / "q.db", behave_image))
    for stdout in ('{"success": true, "result": [NaN]}', '{"success": true, "result": ' + "[" * 100_000 + "]}"):
        params = json.dumps({"do": "exit", "code": 0, "stdout": stdout})
        done = subprocess.run(
            [executable(), "run", "-c", str(config), BEHAVE, "-"], input=params, capture_output=True, text=True,
            timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr  # permanent
        assert "Traceback" not in done.stderr
        report = strict_json(done.stdout.encode())
        assert report["error"]["type"] == "InvalidOutput"


def test_schemathesis_finds_nothing_in_the_live_api(callers_host: Serve) -> None:
    schemathesis = Path(sys.executable).parent / "schemathesis"
    assert schemathesis.exists(), "schemathesis is a dev dependency (pip install -e '.[dev]')"
    # Every route, the batch body and ?wait included; valid waits and batches kept short (the hooks' docstring).
    hooks = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.hostile.schemathesis_hooks"}
    done = subprocess.run(
        [str(schemathesis), "run", f"{callers_host.url}/openapi.json", "--checks", "all", "--max-examples", "40",
         "--seed", "1", "--no-color", "--header", f"Authorization: Bearer {TOKEN}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=hooks,
    )  # fmt: skip
    summary = done.stdout[-3000:]
    assert done.returncode == 0, summary
    assert "passed" in summary and "failed" not in summary.split("SUMMARY")[-1]
    health = callers_host.http.get("/health")
    assert health.status_code == 200, "the host is still up after the fuzzing"
    listed = httpx.get(f"{callers_host.url}/tasks", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert isinstance(listed.json(), list)


def test_finished_tasks_go_after_the_retention_and_delete_works(tmp_path: Path, behave_image: str) -> None:
    port = free_port()
    config = tmp_path / "serve.toml"
    text = config_text(new_host_id(), port, tmp_path / "queue.db", behave_image, grace="1s")
    config.write_text(text.replace('lease = "30s"', 'lease = "30s"\nretention = "2s"'))
    host = Serve(config, port, tmp_path / "serve.log").start()
    try:
        done = host.submit(BEHAVE, do="ok")["id"]
        kept = host.submit(BEHAVE, do="sleep", seconds=30)["id"]
        host.wait_for(done, ("completed",))
        host.wait_for(kept, ("running",))
        deadline = time.monotonic() + 30
        while host.http.get(f"/tasks/{done}").status_code != 404:  # the janitor prunes every second
            assert time.monotonic() < deadline, "a finished task outlived its retention"
            time.sleep(0.2)
        assert host.task(kept)["status"] == "running"  # a running task is never pruned...
        refused = host.http.delete(f"/tasks/{kept}")
        assert refused.status_code == 409  # ...nor deleted
        assert "pruned 1 finished tasks" in host.log.read_text()
    finally:
        host.stop()


def test_workerhost_run_shows_a_failed_workers_stderr_without_terminal_controls(
    tmp_path: Path, behave_image: str
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(config_text(new_host_id(), free_port(), tmp_path / "q.db", behave_image))
    hostile = b"\x1b[2J\x1b]0;owned\x07\rfake prompt $ ".hex()
    params = json.dumps({"do": "stderr", "hex": hostile, "code": 2})
    done = subprocess.run(
        [executable(), "run", "-c", str(config), BEHAVE, params], capture_output=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 2, done.stderr  # exit 2: failed, permanently
    assert b"\\x1b[2J" in done.stderr  # shown, as text
    for raw in (b"\x1b", b"\x07", b"\r"):
        assert raw not in done.stderr
