"""runner.auth: the Host and Origin checks, bearer tokens and the audit trail, on a small app, no Docker."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.requests import Request

from runner import auth
from runner.auth import Guard, HostPolicy, Tokens, bearer, beyond_loopback, check_listener, host_name
from runner.config import HostConfig, loads
from runner.errors import ConfigError, WorkerhostError
from runner.telemetry.metrics import Metrics

CI = "c" * 40
OPS = "o" * 40


def config(**values: Any) -> HostConfig:
    return HostConfig.model_validate(values)


# -- the Host header ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost", "localhost"),
        ("LOCALHOST:8080", "localhost"),
        ("localhost.:8080", "localhost"),
        ("127.0.0.1:1", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("api.example.com", "api.example.com"),
        ("::1", None),  # IPv6 without brackets: the port cannot be told from the address
        ("[not-v6]:80", None),
        ("localhost:80x", None),
        ("localhost:123456", None),
        ("evil.example/x", None),
        ("", None),
        (None, None),
    ],
)
def test_host_name(header: str | None, name: str | None) -> None:
    assert host_name(header) == name


def test_loopback_names_pass_with_any_port_and_nothing_else_by_default() -> None:
    policy = HostPolicy.from_config(config())
    for header in ("localhost", "localhost:8080", "127.0.0.1:9", "127.8.9.10", "[::1]:80", "[::ffff:127.0.0.1]"):
        assert policy.allows(host_name(header)), header
    for header in ("evil.example", "evil.example:8080", "localhost.evil.example", "10.0.0.5:8080", "[::2]"):
        assert not policy.allows(host_name(header), "127.0.0.1"), header


def test_allowed_hosts_exact_and_wildcard_names() -> None:
    policy = HostPolicy.from_config(config(allowed_hosts=["workerhost.example.com", "*.corp.example", "[2001:db8::1]"]))
    assert policy.allows(host_name("workerhost.example.com:443"))
    assert policy.allows(host_name("WorkerHost.Example.Com"))
    assert policy.allows(host_name("a.corp.example"))
    assert policy.allows(host_name("a.b.corp.example:8080"))
    assert policy.allows(host_name("[2001:db8::1]:8080"))
    assert policy.allows(host_name("localhost:1"))  # loopback names always
    assert not policy.allows(host_name("corp.example"))  # "*." is subdomains, not the name itself
    assert not policy.allows(host_name("evilcorp.example"))
    assert not policy.allows(host_name("example.com"))
    assert not policy.allows(host_name("workerhost.example.com.evil.example"))
    # With allowed_hosts set, the address a connection arrived at is not enough.
    assert not policy.allows(host_name("10.0.0.5:8080"), "10.0.0.5")


def test_star_allows_any_host() -> None:
    assert HostPolicy.from_config(config(allowed_hosts=["*"])).allows(host_name("anything.example"))


def test_without_allowed_hosts_the_listen_host_and_the_arrival_address_pass() -> None:
    policy = HostPolicy.from_config(config(http="0.0.0.0:8080", api_token=CI))
    assert policy.allows(host_name("0.0.0.0:8080"))
    assert policy.allows(host_name("10.0.0.5:8080"), "10.0.0.5")
    assert policy.allows(host_name("[fd00::5]:8080"), "fd00::5")
    assert not policy.allows(host_name("10.0.0.6:8080"), "10.0.0.5")
    assert not policy.allows(host_name("evil.example"), "10.0.0.5")
    named = HostPolicy.from_config(config(http="workerhost.internal:8080", api_token=CI))
    assert named.allows(host_name("workerhost.internal:8080"))


def test_allowed_hosts_are_checked_in_the_config() -> None:
    with pytest.raises(ConfigError) as caught:
        loads('[host]\nallowed_hosts = ["https://example.com", "example.com:8080", "ok.example"]\n')
    (line,) = caught.value.problems
    assert "host.allowed_hosts" in line and "'https://example.com'" in line and "'example.com:8080'" in line
    assert "'ok.example'," not in line.split("(got")[1]


# -- tokens ---------------------------------------------------------------------------------


def test_tokens_are_compared_with_compare_digest_on_equal_length_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    tokens = Tokens({"ci": CI, "ops": OPS})
    assert tokens.identify(OPS) == "ops"
    assert len(calls) == 2  # every token, even after the match
    assert tokens.identify("short") is None
    assert tokens.identify(CI + "x") is None
    assert all(isinstance(a, bytes) and isinstance(b, bytes) and len(a) == len(b) == 32 for a, b in calls)
    assert CI.encode() not in {b for _, b in calls}  # digests, never the token itself


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (None, False)),
        (f"Bearer {CI}", (CI, False)),
        (f"bearer   {CI} ", (CI, False)),
        (f"Basic {CI}", (None, True)),
        ("Bearer", (None, True)),
        ("Bearer " + "x" * 5000, (None, True)),
    ],
)
def test_bearer(header: str | None, expected: tuple[str | None, bool]) -> None:
    assert bearer(header) == expected


def test_token_config_names_problems_without_showing_the_token() -> None:
    secret = "abc~def"  # short
    with pytest.raises(ConfigError) as caught:
        loads(f'[host]\napi_token = "{secret}"\n')
    assert "default" in caught.value.problems[0] and "16" in caught.value.problems[0]
    assert secret not in "\n".join(caught.value.problems)
    for text, words in [
        (f'api_token = "{CI}"\napi_tokens = {{ default = "{OPS}" }}', ['"default" is the name of api_token']),
        (f'api_tokens = {{ ci = "{CI}", ops = "{CI}" }}', ["ci and ops are the same"]),
        (f'api_tokens = {{ ci = "{CI} x" }}', ["token ci: use letters"]),
        (f'api_tokens = {{ "c i" = "{CI}" }}', ["token names"]),
        ("api_token = 12345678901234567890", ["api_token: expected a string", "not shown"]),
        ("api_tokens = { ci = 12345678901234567890 }", ["api_tokens: expected a table of strings"]),
    ]:
        with pytest.raises(ConfigError) as caught:
            loads(f"[host]\n{text}\n")
        shown = "\n".join(caught.value.problems)
        assert all(word in shown for word in words), shown
        assert CI not in shown and OPS not in shown and "1234567890" not in shown, shown


def test_a_token_never_shows_in_a_repr_or_a_dump() -> None:
    host = loads(f'[host]\napi_token = "{CI}"\napi_tokens = {{ ops = "{OPS}" }}\n').host
    assert host.tokens() == {"default": CI, "ops": OPS}
    for shown in (repr(host), str(host), host.model_dump_json(), str(host.model_dump())):
        assert CI not in shown and OPS not in shown
    assert loads('[host]\napi_token = ""\napi_tokens = { ci = "" }\n').host.tokens() == {}  # empty: off


# -- where it listens -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "beyond"),
    [
        ("127.0.0.1:8080", False),
        ("127.0.0.2:8080", False),
        ("localhost:8080", False),
        ("[::1]:8080", False),
        (":8080", False),
        ("0.0.0.0:8080", True),
        ("[::]:8080", True),
        ("10.0.0.5:8080", True),
        ("workerhost.internal:8080", True),
    ],
)
def test_beyond_loopback(address: str, beyond: bool) -> None:
    assert beyond_loopback(address) is beyond


def test_serving_beyond_loopback_needs_a_token() -> None:
    with pytest.raises(WorkerhostError, match=r"\[host\] http = 0.0.0.0:8080 listens beyond loopback; set \[host\] "
                       r"api_token \(for example api_token = \"\$\{WORKERHOST_API_TOKEN\}\"\)"):  # fmt: skip
        check_listener(config(http="0.0.0.0:8080"))
    check_listener(config(http="0.0.0.0:8080", api_tokens={"ci": CI}))
    check_listener(config(http="127.0.0.1:8080"))


# -- the middleware on a small app ----------------------------------------------------------


def small_app(host: HostConfig, metrics: Metrics) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        body = {
            "status": "ok",
            "host": {"id": "h", "alive": True, "in_flight": 0, "concurrency": 4},
            "engine": {"reachable": True},
            "source": {"type": "embedded", "path": "/x.db", "reachable": True},
        }
        return body if auth.shows_details(request) else auth.public_health(body)

    @app.get("/metrics")
    async def metrics_text() -> dict[str, Any]:
        return {"metrics": True}

    @app.post("/tasks", status_code=201)
    async def submit() -> dict[str, Any]:
        return {"id": "task-1", "type": "T"}

    @app.get("/tasks/{task_id}")
    async def get_task(task_id: str, request: Request) -> dict[str, Any]:
        who = auth.caller(request)
        return {"id": task_id, "caller": who.token if who else None}

    @app.post("/tasks/{task_id}/retry")
    async def retry(task_id: str) -> dict[str, Any]:
        return {"id": task_id}

    app.add_middleware(Guard, config=host, metrics=metrics, routes=app.routes)
    return app


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def client(metrics: Metrics) -> Iterator[TestClient]:
    host = config(api_token=CI, api_tokens={"ops": OPS}, allowed_hosts=["testserver"])
    with TestClient(small_app(host, metrics)) as client:
        yield client


def as_(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_no_token_wrong_token_and_a_malformed_header_are_401_with_a_challenge(
    client: TestClient, metrics: Metrics
) -> None:
    for headers, reason in [
        ({}, "missing"),
        (as_(OPS[:-1] + "x"), "invalid"),
        (as_("x"), "invalid"),  # another length
        ({"Authorization": f"Basic {CI}"}, "malformed"),
    ]:
        answer = client.get("/tasks/abc", headers=headers)
        assert answer.status_code == 401, headers
        assert answer.headers["www-authenticate"].startswith('Bearer realm="workerhost"')
        assert answer.json()["error"]
        assert count(metrics, "workerhost_auth_failures_total", reason=reason) >= 1
    assert count(metrics, "workerhost_api_requests_total", route="/tasks/{task_id}", method="GET", status="401") == 4


def test_each_token_acts_under_its_own_name(client: TestClient) -> None:
    assert client.get("/tasks/abc", headers=as_(CI)).json() == {"id": "abc", "caller": "default"}
    assert client.get("/tasks/abc", headers=as_(OPS)).json() == {"id": "abc", "caller": "ops"}


def test_health_needs_no_token_and_then_shows_no_path_or_id(client: TestClient) -> None:
    public = client.get("/health").json()
    assert public == {"status": "ok", "host": {"alive": True, "in_flight": 0}, "engine": {"reachable": True},
                      "source": {"reachable": True}}  # fmt: skip
    assert client.get("/health", headers=as_(CI)).json()["source"]["path"] == "/x.db"
    assert client.get("/health", headers=as_("wrong-token-wrong-token")).status_code == 401


def test_metrics_and_the_openapi_description_need_the_token(client: TestClient) -> None:
    for path in ("/metrics", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=as_(CI)).status_code == 200, path


def test_metrics_public_opens_metrics_only(metrics: Metrics) -> None:
    with TestClient(small_app(config(api_token=CI, metrics_public=True, allowed_hosts=["testserver"]), metrics)) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/tasks/abc").status_code == 401
        assert c.post("/metrics").status_code == 401  # GET only


def test_a_foreign_host_or_origin_is_refused_before_the_token(client: TestClient, metrics: Metrics) -> None:
    refused = client.get("/tasks/abc", headers={**as_(CI), "Host": "evil.example:8080"})
    assert refused.status_code == 400
    assert "allowed_hosts" in refused.json()["error"]
    assert client.get("/health", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/tasks/abc", headers={**as_(CI), "Host": "localhost:8080"}).status_code == 200
    assert client.get("/tasks/abc", headers={**as_(CI), "Host": "[::1]:8080"}).status_code == 200
    cross = client.post("/tasks", headers={**as_(CI), "Origin": "http://evil.example"})
    assert cross.status_code == 403
    assert client.post("/tasks", headers={**as_(CI), "Origin": "null"}).status_code == 403
    assert client.post("/tasks", headers={**as_(CI), "Origin": "http://localhost:8080"}).status_code == 201
    assert count(metrics, "workerhost_api_requests_total", route="/tasks/{task_id}", method="GET", status="400") == 1
    assert count(metrics, "workerhost_auth_failures_total", reason="missing") == 0


def test_without_tokens_everything_is_open_but_the_host_check_holds(metrics: Metrics) -> None:
    with TestClient(small_app(config(), metrics)) as c:  # TestClient's "testserver" is the arrival address
        assert c.get("/tasks/abc").json() == {"id": "abc", "caller": None}
        assert c.get("/health").json()["source"]["path"] == "/x.db"
        assert c.get("/tasks/abc", headers={"Host": "evil.example"}).status_code == 400
        assert c.post("/tasks", headers={"Origin": "https://evil.example"}).status_code == 403


def test_changes_and_refusals_are_audited_by_token_name_never_the_token(
    client: TestClient, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="runner.auth")
    client.post("/tasks", headers=as_(OPS))
    client.post("/tasks/t-9/retry", headers=as_(CI))
    client.post("/tasks/t-9/retry", headers=as_("not-the-token-at-all"))
    client.get("/tasks/t-1", headers=as_(CI))  # a read: counted, not logged
    client.get("/tasks/t-1%0A", headers={"Host": "evil.example"})  # a newline: escaped in the log
    fields = [record.fields for record in caplog.records if record.name == "runner.auth"]  # type: ignore[attr-defined]
    assert [(f["token"], f["method"], f["path"], f["status"], f["task_id"], f["refused"]) for f in fields] == [
        ("ops", "POST", "/tasks", 201, "task-1", None),
        ("default", "POST", "/tasks/t-9/retry", 200, "t-9", None),
        ("-", "POST", "/tasks/t-9/retry", 401, "t-9", "invalid"),
        ("-", "GET", "/tasks/t-1\\n", 400, "t-1\\n", "host"),
    ]
    assert all(f["peer"] == "testclient:50000" for f in fields)
    assert [r.levelname for r in caplog.records if r.name == "runner.auth"] == ["INFO", "INFO", "WARNING", "WARNING"]
    assert CI not in caplog.text and OPS not in caplog.text and "not-the-token-at-all" not in caplog.text
    assert count(metrics, "workerhost_api_requests_total", route="/tasks", method="POST", status="201") == 1
    assert count(metrics, "workerhost_api_requests_total", route="/tasks/{task_id}", method="GET", status="200") == 1


def test_a_large_answer_still_gives_its_task_keys() -> None:
    exchange = auth._Exchange({"method": "POST"})
    exchange.status = 201
    exchange.whole = False
    exchange.body = bytearray(b'{"id": "big-1", "correlation_id": "c-1", "params": {"x": "' + b"y" * 100)
    assert exchange.task_keys() == {"id": "big-1", "correlation_id": "c-1"}


def test_the_audit_line_of_a_submit_carries_the_tasks_correlation_id() -> None:
    exchange = auth._Exchange({"method": "POST"})
    exchange.status = 201
    exchange.body = bytearray(b'{"id": "t-1", "correlation_id": "corr-7", "trace_id": "ab", "params": {}}')
    assert exchange.task_keys() == {"id": "t-1", "correlation_id": "corr-7", "trace_id": "ab"}
    exchange.status = 409
    assert exchange.task_keys() == {}  # a refusal names no task of its own
