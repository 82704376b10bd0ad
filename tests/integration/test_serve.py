"""``workerhost serve`` on the embedded queue with real containers: limits, crashes, drain, dead letters."""

from __future__ import annotations

import asyncio
import io
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runner.docker import LABEL_HOST, LABEL_TASK
from runner.sources.embedded import EmbeddedQueue
from tests.conftest import new_host_id
from tests.engine_proxy import EngineProxy
from tests.prismq_server import PrismQServer
from tests.serving import Serve, config_text, free_port

pytestmark = pytest.mark.docker

ServeFactory = Callable[..., Serve]


@pytest.fixture
def serve(tmp_path: Path, behave_image: str, host_id: str) -> Iterator[ServeFactory]:
    """Start ``workerhost serve`` processes on one database in tmp_path, all with this test's host id
    (as restarts of one host); all are stopped at the end."""
    started: list[Serve] = []
    db = tmp_path / "queue.db"

    def start(env: dict[str, str] | None = None, port: int | None = None, **options: Any) -> Serve:
        port = port or free_port()
        config = tmp_path / f"serve-{port}.toml"
        if not config.exists():
            config.write_text(config_text(host_id, port, db, behave_image, **options))
        process = Serve(config, port, tmp_path / f"serve-{port}.log", env).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one moment."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def test_concurrency_limits_are_respected(serve: ServeFactory) -> None:
    other = """
[[workers]]
name = "Test.Other"
image = "workerhost-test/behave:latest"
task_types = ["Test.Other"]
timeout = "60s"
concurrency = 1
memory = "64m"
"""
    host = serve(concurrency=3, workers=other)
    slow = [host.submit("Test.Behave", do="sleep", seconds=1.5)["id"] for _ in range(6)]
    single = [host.submit("Test.Other", do="sleep", seconds=1.5)["id"] for _ in range(3)]

    done = {i: host.wait_for(i, ("completed",), timeout=120) for i in slow + single}

    span = {i: (t["result"]["started"], t["result"]["ended"]) for i, t in done.items()}
    assert overlap([span[i] for i in single]) == 1  # Test.Other: concurrency 1
    assert overlap(list(span.values())) <= 3  # [host] concurrency 3
    assert overlap([span[i] for i in slow]) >= 2  # the host did run tasks side by side


def test_kill_9_mid_task_then_restart_completes_the_task_once(serve: ServeFactory, docker_client: Any) -> None:
    began = time.time()
    # A lease far longer than the test: only the next start's reaping can hand the task back in time.
    first = serve(lease="300s")
    task = first.submit("Test.Behave", do="sleep", seconds=60, again=0)  # slow on attempt 1 only
    first.wait_for(task["id"], ("running",))
    orphans = {c["Id"] for c in _wait_for_containers(docker_client, task["id"])}
    assert first.proc is not None
    first.proc.kill()  # SIGKILL: no drain, no report
    first.wait_exit(10)
    assert _container_ids(docker_client, task["id"]) == orphans, "the dead host's container outlives it"

    second = serve(port=first.port)  # same config, same host id, same database
    done = second.wait_for(task["id"], ("completed", "failed", "dead"), timeout=60)

    assert (done["status"], done["attempts"]) == ("completed", 2), done  # the interrupted attempt counts
    assert (done["result"]["attempt"], done["result"]["slept"]) == (2, 0)  # run again, not attempt 1 finishing
    assert not _container_ids(docker_client, task["id"]) & orphans, "the orphan container was not reaped"
    assert len(_created(docker_client, task["id"], since=began)) == 2, "one container per attempt, no more"


def test_sigterm_lets_the_task_in_flight_finish(serve: ServeFactory) -> None:
    host = serve(grace="30s")
    task = host.submit("Test.Behave", do="sleep", seconds=2)
    host.wait_for(task["id"], ("running",))

    host.signal(signal.SIGTERM)
    assert host.wait_exit(30) == 0

    reopened = serve(port=host.port)
    done = reopened.task(task["id"])
    assert done["status"] == "completed"
    assert done["attempts"] == 1


def test_past_the_grace_period_the_container_is_killed_and_the_task_handed_back(
    serve: ServeFactory, docker_client: Any, tmp_path: Path
) -> None:
    host = serve(grace="1s")
    task = host.submit("Test.Behave", do="sleep", seconds=60)
    host.wait_for(task["id"], ("running",))
    _wait_for_containers(docker_client, task["id"])

    began = time.monotonic()
    host.signal(signal.SIGTERM)
    assert host.wait_exit(30) == 0
    assert time.monotonic() - began < 20

    left = docker_client.containers(all=True, filters={"label": f"{LABEL_TASK}={task['id']}"})
    assert left == []
    back = EmbeddedQueue(tmp_path / "queue.db", owner="pytest").get(task["id"])
    assert back is not None
    assert (back["status"], back["attempts"]) == ("pending", 0)  # handed back; the attempt does not count


def test_a_second_signal_exits_at_once(serve: ServeFactory, docker_client: Any, tmp_path: Path) -> None:
    # A lease far longer than the test: only the next start's reaping can hand the task back in time.
    host = serve(grace="60s", lease="300s")
    task = host.submit("Test.Behave", do="sleep", seconds=60, again=0)  # slow on attempt 1 only
    host.wait_for(task["id"], ("running",))
    left = {c["Id"] for c in _wait_for_containers(docker_client, task["id"])}

    host.signal(signal.SIGTERM)
    _wait_until(lambda: host.http.get("/health").json()["host"]["stopping"], "the first SIGTERM to start the drain")
    began = time.monotonic()
    host.signal(signal.SIGTERM)
    code = host.wait_exit(30)

    assert code == 128 + signal.SIGTERM
    assert time.monotonic() - began < 10  # at once: not after the 60 s grace, nor the task's 60 s
    # It exited as it stood: its container still there, the task claimed by it (attempt 1).
    assert _container_ids(docker_client, task["id"]) == left
    queue = EmbeddedQueue(tmp_path / "queue.db", owner="pytest")
    try:
        stood = queue.get(task["id"])
    finally:
        asyncio.run(queue.close())
    assert stood is not None and (stood["status"], stood["attempts"]) == ("running", 1)

    # The next start (same database, same host id) reaps that container and runs the task again.
    again = serve(grace="1s", lease="300s")
    done = again.wait_for(task["id"], ("completed", "failed", "dead"), timeout=60)
    assert (done["status"], done["attempts"]) == ("completed", 2), done
    assert done["result"]["attempt"] == 2
    assert not _container_ids(docker_client, task["id"]) & left, "the container it left was not reaped"


def test_dead_letters_then_retry_after_the_worker_is_fixed(
    serve: ServeFactory, docker_client: Any, behave_image: str
) -> None:
    broken = "workerhost-test/flaky:latest"
    _build(docker_client, f"FROM {behave_image}\nENV TEST_FAIL=1\n", broken)
    flaky = f"""
[[workers]]
name = "Test.Flaky"
image = "{broken}"
task_types = ["Test.Flaky"]
max_retries = 2
backoff = "100ms"
memory = "64m"
"""
    try:
        host = serve(workers=flaky)
        task = host.submit("Test.Flaky", do="ok")
        dead = host.wait_for(task["id"], ("dead", "failed", "completed"), timeout=60)
        assert dead["status"] == "dead"
        assert dead["attempts"] == 3
        assert dead["error"] == {"type": "Broken", "message": "TEST_FAIL=1", "retriable": True}
        listed = host.http.get("/tasks", params={"status": "dead"}).json()
        assert [t["id"] for t in listed] == [task["id"]]

        docker_client.tag(behave_image, "workerhost-test/flaky", "latest", force=True)  # the fix is deployed
        retried = host.http.post(f"/tasks/{task['id']}/retry")
        assert retried.status_code == 200 and retried.json()["status"] == "pending"
        done = host.wait_for(task["id"], ("completed", "dead"), timeout=60)
        assert done["status"] == "completed"
        assert done["attempts"] == 1
    finally:
        docker_client.remove_image(broken, force=True)


def test_the_engine_going_away_mid_run(serve: ServeFactory, tmp_path: Path, docker_client: Any, host_id: str) -> None:
    proxy = EngineProxy(tmp_path / "engine.sock")
    proxy.start()
    patient = """
[[workers]]
name = "Test.Patient"
image = "workerhost-test/behave:latest"
task_types = ["Test.Patient"]
max_retries = 6
backoff = "1s"
memory = "64m"
"""
    host = serve(env={"DOCKER_HOST": proxy.docker_host}, workers=patient)
    try:
        task = host.submit("Test.Patient", do="sleep", seconds=3)
        host.wait_for(task["id"], ("running",))
        _wait_for_containers(docker_client, task["id"])  # mid-run: its container runs

        proxy.stop()
        _wait_until(lambda: host.http.get("/health").json()["status"] != "ok", "/health to see the engine gone")
        health = host.http.get("/health")
        assert health.status_code == 200  # the host is up
        body = health.json()
        assert body["status"] == "degraded"
        assert body["engine"]["reachable"] is False
        assert "does not answer" in body["engine"]["error"]
        meanwhile = host.task(task["id"])
        assert meanwhile["status"] in ("pending", "running")  # failed retriably, waiting for its retry

        proxy.start()
        done = host.wait_for(task["id"], ("completed", "dead", "failed"), timeout=90)
        assert done["status"] == "completed"
        assert done["attempts"] >= 2
        assert host.http.get("/health").json()["engine"]["reachable"] is True
        # The host's janitor removes what it could not while the engine was away.
        ours = {"label": f"{LABEL_HOST}={host_id}"}
        _wait_until(lambda: not docker_client.containers(all=True, filters=ours), "the janitor to remove the rest")
    finally:
        if not proxy.running:
            proxy.start()


def test_two_hosts_on_one_database_never_run_a_task_twice(
    serve: ServeFactory, docker_client: Any, behave_image: str, host_id: str
) -> None:
    created: Counter[str] = Counter()
    stop = threading.Event()

    def watch() -> None:
        events = docker_client.events(filters={"label": f"{LABEL_HOST}={host_id}", "event": "create"}, decode=True)
        for event in events:
            created[event["Actor"]["Attributes"][LABEL_TASK]] += 1
            if stop.is_set():
                break
        events.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    a = serve(concurrency=3)
    b = serve(concurrency=3)
    ids = [(a if i % 2 else b).submit("Test.Behave", do="sleep", seconds=0.3)["id"] for i in range(24)]
    finished = [a.wait_for(i, ("completed",), timeout=120) for i in ids]
    stop.set()
    a.submit("Test.Behave", do="ok")  # one more event, to let the watcher see stop
    watcher.join(timeout=30)

    assert all(t["attempts"] == 1 for t in finished)
    for side in (a, b):  # both hosts took their share
        families = {f.name: f for f in text_string_to_metric_families(side.http.get("/metrics").text)}
        assert sum(s.value for s in families["workerhost_tasks"].samples if s.name.endswith("_total")) > 0
    assert {i: created[i] for i in ids} == dict.fromkeys(ids, 1)
    assert {t["worker"] for t in finished} == {"Test.Behave"}


def _container_ids(client: Any, task_id: str) -> set[str]:
    """Ids of the task's containers on the engine, running or not."""
    return {c["Id"] for c in client.containers(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})}


def _created(client: Any, task_id: str, since: float) -> list[str]:
    """Ids of the containers the engine created for the task since then (from its event log)."""
    # "until" now: the engine sends what it has and closes the stream at once.
    events = client.events(
        since=f"{since - 1:.6f}", until=f"{time.time():.6f}",
        filters={"label": f"{LABEL_TASK}={task_id}", "event": "create"}, decode=True,
    )  # fmt: skip
    return [event["id"] for event in events]


def _wait_until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout}s for {what}")
        time.sleep(0.1)


def _wait_for_containers(client: Any, task_id: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The task's running containers, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        found: list[dict[str, Any]] = client.containers(filters={"label": f"{LABEL_TASK}={task_id}"})
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"no container of task {task_id} runs after {timeout}s")
        time.sleep(0.1)


def _build(client: Any, dockerfile: str, tag: str) -> None:
    for _ in client.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, decode=True):
        pass


def test_serve_claims_and_completes_a_prismq_taskmanagers_tasks(
    tmp_path: Path, behave_image: str, docker_client: Any
) -> None:
    with PrismQServer(max_attempts=2) as manager:
        port = free_port()
        config = tmp_path / "prismq.toml"
        config.write_text(f"""
[host]
id = "{new_host_id()}"
http = "127.0.0.1:{port}"
poll_max = "200ms"

[task_manager]
type = "http"
url = "{manager.url}"
api_key = "{manager.api_key}"
register_task_types = true
max_attempts = 2

[[workers]]
name = "Test.Behave"
image = "{behave_image}"
task_types = ["Test.Behave"]
max_retries = 5
memory = "64m"
""")
        host = Serve(config, port, tmp_path / "prismq.log").start()
        try:
            assert manager.type_id("Test.Behave") is not None  # registered at start
            ok = manager.create_task("Test.Behave", {"do": "ok", "n": 1})
            broken = manager.create_task("Test.Behave", {"do": "exit", "code": 2})
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if manager.task(ok).status == "completed" and manager.task(broken).status == "failed":
                    break
                time.sleep(0.2)
            done, failed = manager.task(ok), manager.task(broken)
            assert done.status == "completed", host.log.read_text()[-3000:]
            assert done.result["params"] == {"do": "ok", "n": 1}
            assert done.result["attempt"] == 1
            # The server owns retries: two attempts (its limit), not 2 x (max_retries + 1).
            assert failed.status == "failed"
            assert failed.attempts == 2
            assert all(c["success"] is False for c in failed.completions)
            assert "WorkerFailed" in (failed.error or "")
            # Each claim under its own worker id; the last attempt counted as the task's end, the other as a retry.
            host_id = config.read_text().split('id = "', 1)[1].split('"', 1)[0]
            assert set(done.claims + failed.claims) <= {f"{host_id}#1", f"{host_id}#2"}
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(host.http.get("/metrics").text)
                for s in f.samples
            }
            worker = (("worker", "Test.Behave"),)
            assert samples[("workerhost_tasks_total", (("outcome", "failed"), *worker))] == 1
            assert samples[("workerhost_tasks_total", (("outcome", "completed"), *worker))] == 1
            assert samples[("workerhost_retries_total", worker)] == 1
            assert [r for r in manager.requests if r.status == 429] == []
            source = host.http.get("/health").json()["source"]
            assert source["reachable"] is True and source["max_attempts"] == 2
        finally:
            host.stop()


# -- ?wait and batches, through a real serve ---------------------------------------------------


def test_submit_with_wait_answers_with_the_result_or_202_while_it_runs(serve: ServeFactory) -> None:
    host = serve()
    done = host.http.post("/tasks", params={"wait": 60}, json={"type": "Test.Behave", "params": {"do": "ok", "n": 1}})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "completed" and done.json()["result"]["params"] == {"do": "ok", "n": 1}

    slow = {"type": "Test.Behave", "params": {"do": "sleep", "seconds": 3}}
    started = host.http.post("/tasks", params={"wait": 0.5}, json=slow)
    assert started.status_code == 202, started.text
    assert started.json()["status"] in ("pending", "running")
    task_id = started.json()["id"]
    still = host.http.get(f"/tasks/{task_id}", params={"wait": 0.5})
    assert still.status_code == 202 and still.json()["status"] in ("pending", "running")
    ended = host.http.get(f"/tasks/{task_id}", params={"wait": 60})
    answered = time.time()
    assert ended.status_code == 200 and ended.json()["status"] == "completed"
    assert ended.json()["result"]["slept"] == 3
    finished = datetime.fromisoformat(ended.json()["finished_at"].replace("Z", "+00:00")).timestamp()
    assert answered - finished < 0.5, "answered when the host stored the outcome, not at a later poll"
    assert host.http.get(f"/tasks/{task_id}", params={"wait": 60}).status_code == 200  # final: at once


@pytest.mark.parametrize("wait", ["0", "-1", "301", "nan", "soon"])
def test_a_bad_wait_is_refused_and_nothing_is_stored(serve: ServeFactory, wait: str) -> None:
    host = serve()
    response = host.http.post(f"/tasks?wait={wait}", json={"type": "Test.Behave", "params": {"do": "ok"}})
    assert response.status_code == 422, response.text
    assert "wait" in response.json()["error"]
    assert host.http.get("/tasks").json() == []


def test_a_batch_is_stored_in_order_and_every_task_runs(serve: ServeFactory) -> None:
    host = serve()
    batch = [{"type": "Test.Behave", "params": {"do": "ok", "n": n}} for n in range(6)]
    response = host.http.post("/tasks", params={"wait": 120}, json=batch)

    assert response.status_code == 200, response.text  # every one ended within the wait
    tasks = response.json()
    assert [t["params"]["n"] for t in tasks] == list(range(6))
    assert [t["status"] for t in tasks] == ["completed"] * 6
    assert [t["result"]["params"]["n"] for t in tasks] == list(range(6))
    assert sorted(t["id"] for t in host.http.get("/tasks").json()) == sorted(t["id"] for t in tasks)


def test_a_bad_batch_is_refused_whole_and_nothing_is_stored(serve: ServeFactory) -> None:
    host = serve()
    host.submit("Test.Behave", do="ok")
    before = len(host.http.get("/tasks", params={"limit": 1000}).json())
    good = {"type": "Test.Behave", "params": {"do": "ok"}}
    batch = [good, {"type": "Test.Nope"}, good, {"type": "Test.Behave", "params": 7}, good,
             {"type": "Test.Behave", "priority": 10**9}]  # fmt: skip

    refused = host.http.post("/tasks", json=batch)
    too_many = host.http.post("/tasks", json=[good] * 1001)

    assert refused.status_code == 422, refused.text
    assert [d["field"] for d in refused.json()["details"]] == ["[1].type", "[3].params", "[5].priority"]
    assert too_many.status_code == 422 and "1000" in too_many.json()["error"]
    assert len(host.http.get("/tasks", params={"limit": 1000}).json()) == before
