"""Warm containers against the real engine: prewarmed (one task each) and reused (trusted workers).

Each test runs its own ``DockerRunner`` on its own host id, so that the check
after it (tests/conftest.py) names any container its pools left behind.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.config import WorkerConfig
from runner.docker import LABEL_HOST, DockerRunner, RunResult
from runner.docker.labels import LABEL_POOL
from runner.protocol import Envelope, Outcome, Status, classify
from tests.conftest import TEST_IMAGES, new_host_id, unavailable
from tests.serving import Serve, config_text, free_port

pytestmark = pytest.mark.docker

POOLED = "workerhost-test/pooled:latest"
POOLED_27 = "workerhost-test/pooled:2.7"
FLUSHED = "workerhost-test/pooled-flush:latest"  # rebuilt under the same tag by one test
READY = 60.0  # the longest a pool may take to fill on a busy machine (a bound, not a measure)


def _build(tag: str, *args: str) -> str:
    done = subprocess.run(
        ["docker", "build", "-q", "-t", tag, *args, str(TEST_IMAGES / "pooled")], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"building {tag} failed:\n{done.stderr}")
    return done.stdout.strip()


@pytest.fixture(scope="module")
def pooled_images(docker_client: Any) -> None:
    _build(POOLED)
    _build(POOLED_27, "--build-arg", "BASE=workerhost/python:2.7", "--build-arg", "PYTHON=python2.7")


@pytest.fixture
def warm_runner(docker_client: Any, pooled_images: None) -> Iterator[Callable[..., DockerRunner]]:
    """``warm_runner(*workers)``: a runner on a host id of its own, keeping those workers' warm containers."""
    runners: list[DockerRunner] = []

    def start(*workers: WorkerConfig) -> DockerRunner:
        runner = DockerRunner(docker_client, new_host_id(), owner="test-owner")
        runners.append(runner)
        runner.warm(workers)
        return runner

    yield start
    for runner in runners:
        runner.close()


def worker(image: str = POOLED, **overrides: Any) -> WorkerConfig:
    fields: dict[str, Any] = {
        "name": "Test.Pooled",
        "image": image,
        "task_types": ["Test.Pooled"],
        "timeout": 20,
        "memory": "128m",
        "cpus": 1.0,
    }
    fields.update(overrides)
    return WorkerConfig(**fields)


_numbers = iter(range(1, 1_000_000))


def envelope(params: dict[str, Any] | None = None, attempt: int = 1) -> Envelope:
    n = next(_numbers)
    return Envelope(
        id=f"warm-{n}",
        type="Test.Pooled",
        params=params or {},
        attempt=attempt,
        correlation_id=f"{n:032x}",
        traceparent=f"00-{n:032x}-{n:016x}-01",
    )


def run(runner: DockerRunner, config: WorkerConfig, params: dict[str, Any] | None = None) -> tuple[RunResult, Outcome]:
    result = runner.run(config, envelope(params))
    return result, classify(result.end)


def wait_until(what: str, check: Callable[[], bool], within: float = READY) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within:g}s: {what}")
        time.sleep(0.05)


def full(runner: DockerRunner, name: str = "Test.Pooled") -> Callable[[], bool]:
    def check() -> bool:
        counts = runner.warm_counts()[name]
        return bool(counts["idle"] == counts["target"])

    return check


def pool_containers(docker_client: Any, runner: DockerRunner, running: bool = False) -> list[dict[str, Any]]:
    labels = [f"{LABEL_HOST}={runner.host_id}", LABEL_POOL]
    return list(docker_client.containers(all=not running, filters={"label": labels}))


# -- prewarm ---------------------------------------------------------------------------------


def test_each_task_has_its_own_prewarmed_container_and_the_pool_refills(
    docker_client: Any, warm_runner: Callable[..., DockerRunner]
) -> None:
    config = worker(prewarm=2)
    runner = warm_runner(config)
    wait_until("two prewarmed containers", full(runner))
    seen = []
    for _ in range(4):
        result, outcome = run(runner, config)
        assert outcome.status is Status.COMPLETED, outcome
        assert result.mode == "prewarm"
        assert outcome.result["runs"] == 1  # the process ran this task and no other
        # It started before the task: what it wrote then is the task's, as in a cold container.
        assert b"pooled: started" in result.end.stderr_tail
        seen.append(outcome.result["container"])
        wait_until("the pool refilled", full(runner))
    assert len(set(seen)) == 4, seen

    def used_ones_left() -> set[str]:
        return {c["Id"][:12] for c in pool_containers(docker_client, runner)} & set(seen)

    wait_until("the used containers removed", lambda: not used_ones_left())


def test_the_deadline_counts_from_the_write_not_from_the_start(warm_runner: Callable[..., DockerRunner]) -> None:
    config = worker(prewarm=1, timeout=1.5)
    runner = warm_runner(config)
    wait_until("a prewarmed container", full(runner))
    time.sleep(2.0)  # the container now started longer ago than the task's whole timeout
    written = time.time()
    result, outcome = run(runner, config, {"do": "sleep", "seconds": 0.3})
    assert outcome.status is Status.COMPLETED, outcome
    assert result.mode == "prewarm"
    # The envelope's deadline is the write plus the timeout, not the container's start plus it.
    remaining = outcome.result["remaining"]
    assert remaining is not None and remaining > 0
    assert outcome.result["answered"] + remaining >= written + 1.5 - 0.05


def test_a_container_that_died_idle_is_replaced_and_no_task_sees_it(
    docker_client: Any, warm_runner: Callable[..., DockerRunner]
) -> None:
    config = worker(prewarm=1)
    runner = warm_runner(config)
    wait_until("a prewarmed container", full(runner))
    [victim] = pool_containers(docker_client, runner, running=True)
    docker_client.kill(victim["Id"])
    docker_client.wait(victim["Id"])
    _, outcome = run(runner, config)  # at once: before or after the warmer saw it die
    assert outcome.status is Status.COMPLETED, outcome
    assert outcome.result["container"] != victim["Id"][:12]
    wait_until("a new prewarmed container", full(runner))
    assert victim["Id"] not in {c["Id"] for c in pool_containers(docker_client, runner, running=True)}


def test_an_image_rebuilt_under_the_same_tag_flushes_the_pool(
    docker_client: Any, warm_runner: Callable[..., DockerRunner]
) -> None:
    first = _build(FLUSHED, "--build-arg", "VERSION=first")
    config = worker(FLUSHED, prewarm=2)
    runner = warm_runner(config)
    wait_until("two prewarmed containers", full(runner))
    second = _build(FLUSHED, "--build-arg", "VERSION=second")
    assert first != second

    def renewed() -> bool:
        running = pool_containers(docker_client, runner, running=True)
        return len(running) == 2 and all(c["ImageID"] == second for c in running) and full(runner)()

    wait_until("the pool runs the new image only", renewed)
    result, outcome = run(runner, config)
    assert outcome.status is Status.COMPLETED, outcome
    assert outcome.result["version"] == "second"
    assert result.image_id == second


def test_warm_containers_are_replaced_after_prewarm_ttl(
    docker_client: Any, warm_runner: Callable[..., DockerRunner]
) -> None:
    config = worker(prewarm=1, prewarm_ttl=1.0)
    runner = warm_runner(config)
    wait_until("a prewarmed container", full(runner))
    [first] = pool_containers(docker_client, runner, running=True)

    def replaced() -> bool:
        running = pool_containers(docker_client, runner, running=True)
        return bool(running) and first["Id"] not in {c["Id"] for c in running}

    wait_until("the old one replaced", replaced)


def test_closing_the_runner_removes_every_warm_container(docker_client: Any, pooled_images: None) -> None:
    runner = DockerRunner(docker_client, new_host_id(), owner="test-owner")
    runner.warm([worker(prewarm=2), worker(name="Test.Reused", task_types=["Test.Reused"], reuse=5, concurrency=2)])
    wait_until("both pools full", lambda: full(runner)() and full(runner, "Test.Reused")())
    assert len(pool_containers(docker_client, runner)) == 4
    runner.close()
    assert pool_containers(docker_client, runner) == []


def test_a_warm_task_can_be_cancelled(warm_runner: Callable[..., DockerRunner]) -> None:
    config = worker(prewarm=1)
    runner = warm_runner(config)
    wait_until("a prewarmed container", full(runner))
    task = envelope({"do": "sleep", "seconds": 30})
    results: list[RunResult] = []
    thread = threading.Thread(target=lambda: results.append(runner.run(config, task)))
    thread.start()
    wait_until("the task running", lambda: runner.warm_counts()["Test.Pooled"]["busy"] == 1)
    wait_until("the kill delivered", lambda: runner.cancel(task.id))
    thread.join(30)
    assert results and results[0].cancelled and results[0].mode == "prewarm"


def test_a_strict_worker_runs_prewarmed_under_gvisor(
    docker_client: Any, warm_runner: Callable[..., DockerRunner]
) -> None:
    if "runsc" not in (docker_client.info().get("Runtimes") or {}):
        unavailable("gVisor (runsc) is not registered with the engine: run `make sandbox`")
    config = worker(prewarm=1, sandbox="strict")
    runner = warm_runner(config)
    wait_until("a prewarmed gVisor container", full(runner))
    [warm] = pool_containers(docker_client, runner, running=True)
    assert docker_client.inspect_container(warm["Id"])["HostConfig"]["Runtime"] == "runsc"
    result, outcome = run(runner, config)
    assert outcome.status is Status.COMPLETED, outcome
    assert result.mode == "prewarm" and outcome.result["container"] == warm["Id"][:12]


# -- reuse -----------------------------------------------------------------------------------


def test_a_reused_container_runs_n_tasks_then_is_replaced(warm_runner: Callable[..., DockerRunner]) -> None:
    config = worker(reuse=3, concurrency=1)
    runner = warm_runner(config)
    wait_until("a reusable container", full(runner))
    answers = [run(runner, config)[1].result for _ in range(4)]
    assert [a["runs"] for a in answers] == [1, 2, 3, 1]
    assert len({a["container"] for a in answers[:3]}) == 1
    assert answers[3]["container"] != answers[0]["container"]


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"do": "fail"}, Status.FAILED),
        ({"do": "retry"}, Status.FAILED),
        ({"do": "exit", "code": 1}, Status.FAILED),
    ],
    ids=["permanent", "retriable", "exit"],
)
def test_a_reused_container_is_replaced_after_a_failure(
    warm_runner: Callable[..., DockerRunner], params: dict[str, Any], status: Status
) -> None:
    config = worker(reuse=10, concurrency=1)
    runner = warm_runner(config)
    wait_until("a reusable container", full(runner))
    first = run(runner, config)[1].result
    result, outcome = run(runner, config, params)
    assert outcome.status is status
    assert outcome.retriable is (params["do"] in ("retry", "exit"))
    assert result.mode == "reuse"
    after = run(runner, config)[1].result
    assert after["container"] != first["container"] and after["runs"] == 1


def test_a_reused_container_is_killed_and_replaced_at_the_deadline(
    docker_client: Any, warm_runner: Callable[..., DockerRunner]
) -> None:
    config = worker(reuse=10, concurrency=1, timeout=1)
    runner = warm_runner(config)
    wait_until("a reusable container", full(runner))
    first = run(runner, config)[1].result
    _, outcome = run(runner, config, {"do": "sleep", "seconds": 30})
    assert outcome.status is Status.TIMEOUT
    assert outcome.error is not None and "deadline" in outcome.error.message
    after = run(runner, config)[1].result
    assert after["container"] != first["container"]
    assert first["container"] not in {c["Id"][:12] for c in pool_containers(docker_client, runner, running=True)}


def test_each_reused_task_has_its_own_stderr(warm_runner: Callable[..., DockerRunner]) -> None:
    config = worker(reuse=10, concurrency=1)
    runner = warm_runner(config)
    wait_until("a reusable container", full(runner))
    first, _ = run(runner, config, {"lines": ["alpha one", "alpha two"]})
    second, outcome = run(runner, config, {"do": "fail", "lines": ["beta"]})
    assert first.end.stderr_tail == b"alpha one\nalpha two\n"
    assert b"beta\n" in second.end.stderr_tail and b"alpha" not in second.end.stderr_tail
    assert b"PermanentError: asked to fail" in second.end.stderr_tail
    assert outcome.error is not None and outcome.error.type == "PermanentError"


def test_reuse_of_a_worker_that_does_not_read_lines_falls_back_to_fresh_containers(
    docker_client: Any, behave_image: str, warm_runner: Callable[..., DockerRunner]
) -> None:
    config = worker(behave_image, reuse=5, concurrency=1, timeout=2)
    runner = warm_runner(config)
    result, outcome = run(runner, config)  # the pool is not ready: the task runs cold, and completes
    assert outcome.status is Status.COMPLETED and result.mode == "cold"
    wait_until("the worker found not to read lines", lambda: runner.warm_counts()["Test.Pooled"]["broken"] is not None)
    assert "ready" in runner.warm_counts()["Test.Pooled"]["broken"]
    result, outcome = run(runner, config)
    assert outcome.status is Status.COMPLETED and result.mode == "cold"
    wait_until("its warm container removed", lambda: not pool_containers(docker_client, runner))


# -- the SDK's environment, from the envelope ---------------------------------------------------


@pytest.mark.parametrize("image", [POOLED, POOLED_27], ids=["python3", "python2.7"])
@pytest.mark.parametrize("mode", ["prewarm", "reuse"])
def test_the_sdk_sets_the_tasks_environment_from_the_envelope(
    warm_runner: Callable[..., DockerRunner], image: str, mode: str
) -> None:
    config = worker(image, **({"prewarm": 1} if mode == "prewarm" else {"reuse": 5, "concurrency": 1}))
    runner = warm_runner(config)
    wait_until("a warm container", full(runner))
    for attempt in (1, 2):  # twice: a reused container's second task must not see the first's ids
        task = envelope(attempt=attempt)
        result = runner.run(config, task)
        outcome = classify(result.end)
        assert outcome.status is Status.COMPLETED, outcome
        assert result.mode == mode
        assert outcome.result["python"] == ("2.7" if image == POOLED_27 else "3.11")
        assert outcome.result["env"] == {
            "TRACEPARENT": task.traceparent,
            "WORKERHOST_TASK_ID": task.id,
            "WORKERHOST_CORRELATION_ID": task.correlation_id,
            "WORKERHOST_ATTEMPT": str(attempt),
            "WORKERHOST_MODE": mode,
        }
        wait_until("the pool full again", full(runner))


def test_a_cold_container_says_it_is_cold(docker_client: Any, pooled_images: None) -> None:
    with DockerRunner(docker_client, new_host_id()) as runner:
        result, outcome = run(runner, worker())
    assert result.mode == "cold"
    assert outcome.result["env"]["WORKERHOST_MODE"] == "cold"


# -- through serve: the pools' lifecycle --------------------------------------------------------

WARM_WORKERS = """
[[workers]]
name = "Test.Prewarmed"
image = "workerhost-test/pooled:latest"
task_types = ["Test.Prewarmed"]
prewarm = 2
memory = "64m"

[[workers]]
name = "Test.Reused"
image = "workerhost-test/pooled:latest"
task_types = ["Test.Reused"]
reuse = 100
concurrency = 2
memory = "64m"
"""


def _serve(tmp_path: Path, host_id: str, behave_image: str) -> Serve:
    port = free_port()
    config = tmp_path / "workerhost.toml"
    config.write_text(config_text(host_id, port, tmp_path / "q.db", behave_image, workers=WARM_WORKERS))
    return Serve(config, port, tmp_path / "serve.log")


def _host_containers(docker_client: Any, host_id: str) -> list[dict[str, Any]]:
    return list(docker_client.containers(all=True, filters={"label": f"{LABEL_HOST}={host_id}"}))


def _warm_ready(docker_client: Any, host_id: str) -> Callable[[], bool]:
    def check() -> bool:
        running = docker_client.containers(filters={"label": [f"{LABEL_HOST}={host_id}", LABEL_POOL]})
        return len(running) == 4  # two prewarmed, two reusable (one per slot)

    return check


def test_serve_runs_warm_tasks_and_sigterm_leaves_no_container(
    docker_client: Any, tmp_path: Path, host_id: str, behave_image: str, pooled_images: None
) -> None:
    serve = _serve(tmp_path, host_id, behave_image).start()
    try:
        wait_until("the warm containers started", _warm_ready(docker_client, host_id))
        for task_type in ("Test.Prewarmed", "Test.Reused", "Test.Prewarmed", "Test.Reused"):
            task = serve.submit(task_type)
            done = serve.wait_for(task["id"], ("completed", "failed"))
            assert done["status"] == "completed", done
        serve.signal(signal.SIGTERM)
        assert serve.wait_exit(60) == 0
        assert _host_containers(docker_client, host_id) == []  # at once: removed before the exit
    finally:
        serve.stop()


def test_warm_containers_left_by_a_killed_serve_are_removed_by_the_next_start(
    docker_client: Any, tmp_path: Path, host_id: str, behave_image: str, pooled_images: None
) -> None:
    first = _serve(tmp_path, host_id, behave_image).start()
    try:
        wait_until("the warm containers started", _warm_ready(docker_client, host_id))
        left = {c["Id"] for c in _host_containers(docker_client, host_id)}
        assert first.proc is not None
        first.proc.kill()  # kill -9: no drain, no removal
        first.proc.wait()
    finally:
        first.stop()
    assert left <= {c["Id"] for c in _host_containers(docker_client, host_id)}  # still there
    second = _serve(tmp_path, host_id, behave_image).start()
    try:
        wait_until(
            "the killed serve's containers removed",
            lambda: not left & {c["Id"] for c in _host_containers(docker_client, host_id)},
        )
        wait_until("the new warm containers started", _warm_ready(docker_client, host_id))
        task = second.submit("Test.Reused")
        assert second.wait_for(task["id"], ("completed", "failed"))["status"] == "completed"
    finally:
        second.stop()
    assert _host_containers(docker_client, host_id) == []
