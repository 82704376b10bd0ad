"""Hostile callers of the API: no token, a wrong one, a rebinding page, a listener open to the network.

A real ``workerhost serve`` as a subprocess, with a token from the environment
(``api_token = "${WORKERHOST_API_TOKEN}"``) and a named one (``ci``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, new_host_id
from tests.serving import Serve, config_text, executable, free_port

pytestmark = pytest.mark.docker

TOKEN = "t0ken-" + "a1" * 16  # the default one, from WORKERHOST_API_TOKEN
CI = "ci-" + "b2" * 16
WRONG = TOKEN[:-1] + "z"  # the same length, one character off
TOKENS = f'api_token = "${{WORKERHOST_API_TOKEN}}"\napi_tokens = {{ ci = "{CI}" }}\n'
BEHAVE = "Test.Behave"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def start(folder: Path, host_id: str, image: str, extra_host: str, env: dict[str, str] | None = None) -> Serve:
    port = free_port()
    config = folder / "serve.toml"
    config.write_text(config_text(host_id, port, folder / "queue.db", image, extra_host=extra_host))
    return Serve(config, port, folder / "serve.log", env={"WORKERHOST_API_TOKEN": TOKEN, **(env or {})}).start()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, behave_image: str) -> Iterator[Serve]:
    serve = start(tmp_path_factory.mktemp("guarded"), new_host_id(), behave_image, TOKENS)
    try:
        yield serve
    finally:
        serve.stop()


def log_lines(serve: Serve) -> list[dict[str, Any]]:
    lines = []
    for line in serve.log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            lines.append(record)
    return lines


def audit_line(serve: Serve, match: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
    """The first audit line that ``match``es (written just after its answer: waited for)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in log_lines(serve) if r.get("event") == "api_request" and match(r)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no such audit line in:\n{serve.log.read_text()[-4000:]}")
        time.sleep(0.1)


def metric(serve: Serve, name: str, **labels: str) -> float:
    answer = serve.http.get("/metrics", headers=bearer(TOKEN))
    assert answer.status_code == 200, answer.text
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def cli(serve: Serve, *args: str, env: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return subprocess.run(
        [executable(), *args], input="", capture_output=True, text=True, cwd=ROOT, env=environ, timeout=120
    )


# -- tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/tasks"), ("POST", "/tasks"), ("GET", "/tasks/x"), ("POST", "/tasks/x/retry"), ("GET", "/workers"),
     ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/tasks/x?wait=5"),
     ("POST", "/tasks?wait=5")],
)  # fmt: skip
@pytest.mark.parametrize(
    "headers", [{}, bearer(WRONG), bearer("short"), bearer(TOKEN + TOKEN)], ids=["none", "wrong", "short", "long"]
)
def test_no_token_or_a_wrong_one_is_401(guarded: Serve, method: str, path: str, headers: dict[str, str]) -> None:
    task = {"type": BEHAVE, "params": {"do": "ok"}}
    body: Any = ([task, task] if "wait" in path else task) if method == "POST" else None  # a batch, waited for
    answer = guarded.http.request(method, path, headers=headers, json=body)

    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]
    assert TOKEN not in answer.text


def test_a_refused_submit_stores_nothing(guarded: Serve) -> None:
    def ids() -> set[str]:
        return {task["id"] for task in guarded.http.get("/tasks", headers=bearer(TOKEN)).json()}

    before = ids()
    refused = guarded.http.post("/tasks", json={"type": BEHAVE, "params": {"n": 1}}, headers=bearer(WRONG))
    assert refused.status_code == 401
    assert ids() == before


def test_the_right_tokens_submit_list_get_and_retry(guarded: Serve) -> None:
    submitted = guarded.http.post("/tasks", json={"type": BEHAVE, "params": {"do": "exit", "code": 2}},
                                  headers=bearer(CI))  # fmt: skip
    assert submitted.status_code == 201, submitted.text
    task_id = submitted.json()["id"]
    guarded.http.headers.update(bearer(TOKEN))  # wait_for reads the task through the module's client
    try:
        assert guarded.wait_for(task_id, ("failed",))["status"] == "failed"
    finally:
        del guarded.http.headers["Authorization"]
    listed = guarded.http.get("/tasks", params={"type": BEHAVE}, headers=bearer(TOKEN))
    assert task_id in [task["id"] for task in listed.json()]
    assert guarded.http.get(f"/tasks/{task_id}", headers=bearer(CI)).json()["id"] == task_id
    retried = guarded.http.post(f"/tasks/{task_id}/retry", headers=bearer(TOKEN))
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "pending"


def test_health_needs_no_token_and_then_shows_no_path_or_url(guarded: Serve) -> None:
    public = guarded.http.get("/health")

    assert public.status_code == 200
    body = public.json()
    assert body["status"] in ("ok", "degraded")
    assert body["host"]["alive"] is True and "in_flight" in body["host"]
    text = public.text
    assert "queue.db" not in text and "path" not in text and "url" not in text and "http" not in text
    assert set(body["host"]) == {"alive", "stopping", "in_flight"}  # not even the host id
    full = guarded.http.get("/health", headers=bearer(TOKEN)).json()
    assert full["source"]["path"].endswith("queue.db")


# -- the Host header and the Origin -----------------------------------------------------


def test_a_rebinding_host_is_refused_and_localhost_works(guarded: Serve) -> None:
    for host in ("evil.example", f"evil.example:{guarded.port}", f"localhost.evil.example:{guarded.port}"):
        refused = guarded.http.get("/tasks", headers={**bearer(TOKEN), "Host": host})
        assert refused.status_code == 400, host
        assert "allowed_hosts" in refused.json()["error"]
        assert guarded.http.get("/health", headers={"Host": host}).status_code == 400
    for host in (f"localhost:{guarded.port}", "localhost", f"127.0.0.1:{guarded.port}"):
        assert guarded.http.get("/tasks", headers={**bearer(TOKEN), "Host": host}).status_code == 200, host


def test_a_page_from_another_origin_cannot_submit(guarded: Serve) -> None:
    answer = guarded.http.post("/tasks", json={"type": BEHAVE, "params": {}},
                               headers={**bearer(TOKEN), "Origin": "http://evil.example"})  # fmt: skip
    assert answer.status_code == 403


# -- the command line ---------------------------------------------------------------------


def test_the_cli_sends_the_token_from_the_environment_and_exits_6_without_it(guarded: Serve, tmp_path: Path) -> None:
    url = ["--url", guarded.url]
    done = cli(guarded, "tasks", *url, env={"WORKERHOST_API_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    submitted = cli(guarded, "submit", BEHAVE, '{"do": "ok"}', "--wait", *url, env={"WORKERHOST_API_TOKEN": CI})
    assert submitted.returncode == 0, submitted.stderr

    for command in (["tasks"], ["task", "x"], ["retry", "x"], ["submit", BEHAVE, "{}"]):
        refused = cli(guarded, *command, *url, env={"WORKERHOST_API_TOKEN": None})
        assert refused.returncode == 6, refused.stderr
        assert "WORKERHOST_API_TOKEN" in refused.stderr and "none was sent" in refused.stderr
        assert "Traceback" not in refused.stderr
    wrong = cli(guarded, "tasks", *url, env={"WORKERHOST_API_TOKEN": WRONG})
    assert wrong.returncode == 6 and "the token sent was refused" in wrong.stderr
    assert WRONG not in wrong.stderr

    # Without --url, the config names the host and, failing the environment, the token.
    client_config = tmp_path / "client.toml"
    client_config.write_text(f'[host]\nhttp = "127.0.0.1:{guarded.port}"\napi_token = "{TOKEN}"\n')
    from_config = cli(guarded, "tasks", "-c", str(client_config), env={"WORKERHOST_API_TOKEN": None})
    assert from_config.returncode == 0, from_config.stderr
    # ... but never to another --url: the config's token is for the config's host.
    elsewhere = cli(guarded, "tasks", "-c", str(client_config), *url, env={"WORKERHOST_API_TOKEN": None})
    assert elsewhere.returncode == 6


# -- listening beyond loopback ----------------------------------------------------------


def test_serve_beyond_loopback_without_a_token_refuses_to_start(
    tmp_path: Path, host_id: str, behave_image: str
) -> None:
    port = free_port()
    config = tmp_path / "open.toml"
    config.write_text(config_text(host_id, port, tmp_path / "queue.db", behave_image)
                      .replace(f'http = "127.0.0.1:{port}"', f'http = "0.0.0.0:{port}"'))  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k != "WORKERHOST_API_TOKEN"}
    done = subprocess.run([executable(), "serve", "-c", str(config)], input="", capture_output=True, text=True,
                          cwd=ROOT, env=environ, timeout=120)  # fmt: skip

    assert done.returncode == 1, done.stderr
    assert f"0.0.0.0:{port} listens beyond loopback" in done.stderr
    assert "api_token" in done.stderr
    assert not (tmp_path / "queue.db").exists()  # refused before anything opened
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_serve_beyond_loopback_with_a_token_starts(tmp_path: Path, host_id: str, behave_image: str) -> None:
    port = free_port()
    config = tmp_path / "open.toml"
    config.write_text(config_text(host_id, port, tmp_path / "queue.db", behave_image, extra_host=TOKENS)
                      .replace(f'http = "127.0.0.1:{port}"', f'http = "0.0.0.0:{port}"'))  # fmt: skip
    serve = Serve(config, port, tmp_path / "serve.log", env={"WORKERHOST_API_TOKEN": TOKEN}).start()
    try:
        assert serve.http.get("/tasks").status_code == 401
        assert serve.http.get("/tasks", headers=bearer(TOKEN)).status_code == 200
        # The listen address's own host passes the Host check when allowed_hosts is empty.
        assert serve.http.get("/tasks", headers={**bearer(TOKEN), "Host": f"0.0.0.0:{port}"}).status_code == 200
        assert serve.http.get("/tasks", headers={**bearer(TOKEN), "Host": "evil.example"}).status_code == 400
    finally:
        serve.stop()


def test_metrics_public_opens_metrics_and_nothing_else(tmp_path: Path, host_id: str, behave_image: str) -> None:
    serve = start(tmp_path, host_id, behave_image, TOKENS + "metrics_public = true\n")
    try:
        assert serve.http.get("/metrics").status_code == 200
        assert serve.http.get("/tasks").status_code == 401
        assert serve.http.get("/openapi.json").status_code == 401
    finally:
        serve.stop()


# -- the audit trail ----------------------------------------------------------------------


def test_audit_lines_and_counters_name_the_token_never_show_it(guarded: Serve) -> None:
    failures = metric(guarded, "workerhost_auth_failures_total", reason="invalid")
    refused = guarded.http.post("/tasks", json={"type": BEHAVE, "params": {}}, headers=bearer(WRONG))
    assert refused.status_code == 401
    submitted = guarded.http.post("/tasks", json={"type": BEHAVE, "params": {"do": "ok", "audit": 1}},
                                  headers=bearer(CI))  # fmt: skip
    assert submitted.status_code == 201
    task_id = submitted.json()["id"]
    missing = guarded.http.post(f"/tasks/{task_id}/retry")
    assert missing.status_code == 401

    change = audit_line(guarded, lambda r: r.get("task_id") == task_id and r.get("status") == 201)
    assert (change["token"], change["method"], change["path"], change["level"]) == ("ci", "POST", "/tasks", "info")
    assert change["peer"].startswith("127.0.0.1:")
    failed = audit_line(guarded, lambda r: r.get("refused") == "missing" and r.get("task_id") == task_id)
    assert (failed["token"], failed["method"], failed["path"], failed["status"], failed["level"]) == (
        "-", "POST", f"/tasks/{task_id}/retry", 401, "warning",
    )  # fmt: skip
    wrong = audit_line(guarded, lambda r: r.get("refused") == "invalid" and r.get("path") == "/tasks")
    assert wrong["status"] == 401 and wrong["peer"].startswith("127.0.0.1:")

    assert metric(guarded, "workerhost_auth_failures_total", reason="invalid") == failures + 1
    assert metric(guarded, "workerhost_api_requests_total", route="/tasks", method="POST", status="201") >= 1
    assert metric(guarded, "workerhost_api_requests_total", route="/tasks/{task_id}/retry", method="POST",
                  status="401") >= 1  # fmt: skip

    log = guarded.log.read_text(errors="replace")
    for secret in (TOKEN, CI, WRONG):
        assert secret not in log
