"""The container runner against the real Docker engine: every outcome, produced for real."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest

from runner.attempts import Report, new_task, run_task
from runner.config import WorkerConfig
from runner.docker import LABEL_ATTEMPT, LABEL_HOST, LABEL_TASK, LABEL_WORKER, DockerRunner, RunResult
from runner.protocol import Status
from tests.conftest import HOST_ID

pytestmark = pytest.mark.docker

MiB = 1024 * 1024


@pytest.fixture
def runner(docker_client: Any) -> Iterator[DockerRunner]:
    with DockerRunner(docker_client, HOST_ID) as runner:
        yield runner


def worker(image: str, **overrides: Any) -> WorkerConfig:
    fields: dict[str, Any] = {
        "name": "Test.Behave",
        "image": image,
        "task_types": ["Test.Behave"],
        "timeout": 20,
        "max_retries": 0,
        "backoff": 0.05,
        "cpus": 1.0,
        "memory": "128m",
        "pids_limit": 64,
    }
    fields.update(overrides)
    return WorkerConfig(**fields)


class CountingRunner:
    """The real runner, counting the containers it ran."""

    def __init__(self, inner: DockerRunner) -> None:
        self.inner = inner
        self.runs: list[RunResult] = []

    def run(self, worker: WorkerConfig, task: Any, observe: Any = None) -> RunResult:
        result = self.inner.run(worker, task, observe)
        self.runs.append(result)
        return result


def run(runner: DockerRunner, config: WorkerConfig, **params: Any) -> tuple[Report, CountingRunner]:
    counting = CountingRunner(runner)
    report = run_task(counting, config, new_task("Test.Behave", params))
    return report, counting


def test_success_returns_the_result_and_the_envelope(runner: DockerRunner, behave_image: str) -> None:
    report, counting = run(runner, worker(behave_image), do="ok", text="héllo")

    assert report.outcome.status is Status.COMPLETED
    assert report.exit_code == 0
    assert report.attempts == 1
    result = report.outcome.result
    assert result["params"] == {"do": "ok", "text": "héllo"}
    envelope = result["task"]
    assert envelope["id"] == report.task.id
    assert envelope["attempt"] == 1
    assert envelope["correlation_id"] == report.task.correlation_id
    assert envelope["traceparent"].startswith("00-")
    assert envelope["deadline"].endswith("Z")
    assert counting.runs[0].image_id and counting.runs[0].image_id.startswith("sha256:")


def test_exit_1_is_retried_exactly_max_retries_times(runner: DockerRunner, behave_image: str) -> None:
    report, counting = run(runner, worker(behave_image, max_retries=2), do="exit", code=1)

    assert report.outcome.status is Status.FAILED
    assert report.outcome.retriable
    assert report.attempts == 3
    assert len(counting.runs) == 3
    assert len({r.container_id for r in counting.runs}) == 3  # a fresh container each time
    assert report.exit_code == 1
    assert b"attempt 3" in counting.runs[-1].end.stderr_tail


def test_exit_2_is_not_retried(runner: DockerRunner, behave_image: str) -> None:
    failure = json.dumps({"success": False, "error": {"type": "BadInput", "message": "no such record"}})
    report, counting = run(runner, worker(behave_image, max_retries=3), do="exit", code=2, stdout=failure)

    assert len(counting.runs) == 1
    assert report.exit_code == 2
    assert report.outcome.error is not None
    assert (report.outcome.error.type, report.outcome.error.message) == ("BadInput", "no such record")


def test_a_worker_past_its_timeout_is_killed_near_the_deadline(runner: DockerRunner, behave_image: str) -> None:
    began = time.monotonic()
    report, counting = run(runner, worker(behave_image, timeout=2, max_retries=2), do="sleep", seconds=60)
    elapsed = time.monotonic() - began

    assert report.outcome.status is Status.TIMEOUT
    assert report.exit_code == 3
    assert len(counting.runs) == 1  # timeouts are not retried
    assert report.outcome.error is not None and "2s" in report.outcome.error.message
    assert 2 <= counting.runs[0].duration < 10, counting.runs[0].duration
    assert elapsed < 20  # nowhere near the 60 s the worker asked for


def test_closing_stdout_and_running_on_is_still_a_timeout(runner: DockerRunner, behave_image: str) -> None:
    report, _ = run(runner, worker(behave_image, timeout=2), do="close_stdout_and_sleep", seconds=60)

    assert report.outcome.status is Status.TIMEOUT


def test_memory_beyond_the_limit_is_oom_killed_and_permanent(runner: DockerRunner, behave_image: str) -> None:
    report, counting = run(runner, worker(behave_image, memory="32m", max_retries=2), do="alloc", mb=200)

    assert report.outcome.status is Status.FAILED
    assert not report.outcome.retriable
    assert len(counting.runs) == 1
    assert counting.runs[0].end.oom_killed
    assert report.outcome.error is not None
    assert report.outcome.error.type == "MemoryLimitExceeded"
    assert "32 MiB" in report.outcome.error.message


def test_a_fork_bomb_stops_at_pids_limit(runner: DockerRunner, behave_image: str) -> None:
    report, _ = run(runner, worker(behave_image, pids_limit=20), do="fork_bomb")

    assert report.outcome.status is Status.COMPLETED, report.outcome
    assert report.outcome.result["forked"] < 20
    assert "Resource temporarily unavailable" in report.outcome.result["error"]
    # The host is unharmed: the next task runs as usual.
    after, _ = run(runner, worker(behave_image), do="ok")
    assert after.outcome.ok


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("this is not json", "not one JSON object: 'this is not json'"),
        ("", "wrote nothing on stdout"),
        ('{"success": true} {"success": true}', "not one JSON object"),
        ("[1, 2]", "not an object"),
    ],
)
def test_bad_stdout_is_a_permanent_failure_quoting_it(
    runner: DockerRunner, behave_image: str, stdout: str, expected: str
) -> None:
    report, counting = run(runner, worker(behave_image, max_retries=2), do="raw", stdout=stdout)

    assert report.outcome.status is Status.FAILED
    assert len(counting.runs) == 1
    assert report.outcome.error is not None
    assert report.outcome.error.type == "InvalidOutput"
    assert expected in report.outcome.error.message


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_beyond_its_cap_is_killed(runner: DockerRunner, behave_image: str, stream: str) -> None:
    config = worker(behave_image, max_stdout="1m", max_stderr="1m", timeout=60)
    report, counting = run(runner, config, do="flood", stream=stream, mb=200)

    assert report.outcome.status is Status.FAILED
    assert not report.outcome.retriable
    assert report.outcome.error is not None
    assert report.outcome.error.type == "OutputLimitExceeded"
    assert f"{stream} passed its cap of 1 MiB" in report.outcome.error.message
    assert len(counting.runs[0].end.stdout) <= MiB
    assert len(counting.runs[0].end.stderr_tail) <= 64 * 1024


def test_five_mib_in_and_five_mib_back(runner: DockerRunner, behave_image: str) -> None:
    blob = "0123456789abcdef" * (5 * MiB // 16)
    report, _ = run(runner, worker(behave_image), do="echo_blob", blob=blob)

    assert report.outcome.ok, report.outcome
    assert report.outcome.result["length"] == len(blob)
    assert report.outcome.result["blob"] == blob


def test_a_worker_that_ignores_a_large_stdin_does_not_deadlock(runner: DockerRunner, behave_image: str) -> None:
    config = worker(behave_image, env={"TEST_IGNORE_STDIN": "1"}, timeout=10)
    report, _ = run(runner, config, do="ok", blob="x" * (4 * MiB))

    assert report.outcome.ok, report.outcome


def test_the_container_sees_the_configured_limits(runner: DockerRunner, behave_image: str) -> None:
    config = worker(behave_image, memory="96m", pids_limit=42, cpus=0.5, env={"TEST_FLAVOUR": "mint"})
    report, _ = run(runner, config, do="probe")

    assert report.outcome.ok, report.outcome
    probe = report.outcome.result
    assert int(probe["memory_limit"]) == 96 * MiB
    if probe["memsw_limit"] not in (None, "0"):  # v1: memory+swap equals memory; v2: swap.max is 0
        assert int(probe["memsw_limit"]) == 96 * MiB
    assert probe["pids_limit"] == "42"
    if probe["cpu_max"]:
        quota, period = probe["cpu_max"].split()
    else:
        quota, period = probe["cfs_quota"], probe["cfs_period"]
    assert int(quota) / int(period) == pytest.approx(0.5)
    assert (probe["uid"], probe["gid"]) == (65534, 65534)
    assert probe["root_writable"] is False
    assert probe["interfaces"] == ["lo"]
    assert probe["status"] == {"CapEff": "0000000000000000", "NoNewPrivs": "1"}
    env = probe["env"]
    assert env["TEST_FLAVOUR"] == "mint"
    assert env["WORKERHOST_TASK_ID"] == report.task.id
    assert env["WORKERHOST_CORRELATION_ID"] == report.task.correlation_id
    assert env["TRACEPARENT"] == report.task.traceparent


def test_containers_are_labelled_and_removed(runner: DockerRunner, behave_image: str, docker_client: Any) -> None:
    seen: list[dict[str, Any]] = []

    def watch() -> None:
        for _ in range(100):
            seen.extend(docker_client.containers(filters={"label": f"{LABEL_HOST}={HOST_ID}"}))
            if seen:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    report, _ = run(runner, worker(behave_image), do="sleep", seconds=3)
    watcher.join()

    assert report.outcome.ok
    assert seen, "the running container was not found by its host label"
    labels = seen[0]["Labels"]
    assert labels[LABEL_TASK] == report.task.id
    assert labels[LABEL_WORKER] == "Test.Behave"
    assert labels[LABEL_ATTEMPT] == "1"
    runner.close()  # waits for removals, which happen off the critical path
    left = docker_client.containers(all=True, filters={"label": f"{LABEL_TASK}={report.task.id}"})
    assert left == []


def test_the_python_2_7_worker_runs_its_legacy_code(runner: DockerRunner, example_images: None) -> None:
    config = worker("workerhost/legacy-tags:latest", memory="64m")
    task = new_task("PrismQ.Legacy.NormalizeTags", {"tags": ["Café", "cafe", "Big Data", "big_data", "solo"]})
    report = run_task(runner, config, task)

    assert report.outcome.ok, report.outcome
    result = report.outcome.result
    assert result["python"].startswith("2.7.")
    assert result["tags"] == [{"tag": "big-data", "count": 2}, {"tag": "cafe", "count": 2}, {"tag": "solo", "count": 1}]
    assert report.last_run is not None
    assert b"normalised 5 tags into 3" in report.last_run.end.stderr_tail


def test_a_missing_image_says_how_to_build_it(runner: DockerRunner, docker_client: Any) -> None:
    config = worker("workerhost-test/no-such-image:never", max_retries=3)
    report, counting = run(runner, config, do="ok")

    assert report.outcome.status is Status.FAILED
    assert len(counting.runs) == 1  # retrying cannot build an image
    assert report.outcome.error is not None
    assert report.outcome.error.type == "ImageMissing"
    assert "workerhost-test/no-such-image:never" in report.outcome.error.message
    assert "make build-images" in report.outcome.error.message


def test_an_unreachable_engine_is_a_retriable_failure_not_a_crash(behave_image: str, tmp_path: Any) -> None:
    client = docker.APIClient(base_url=f"unix://{tmp_path}/no-engine.sock", version="1.41", timeout=5)
    with DockerRunner(client, HOST_ID) as runner:
        report, counting = run(runner, worker(behave_image, max_retries=1), do="ok")

    assert report.outcome.status is Status.FAILED
    assert report.outcome.retriable
    assert len(counting.runs) == 2
    assert report.outcome.error is not None
    assert report.outcome.error.type == "EngineError"
    assert "does not answer" in report.outcome.error.message


def test_a_command_that_cannot_start_is_a_permanent_engine_refusal(runner: DockerRunner, behave_image: str) -> None:
    report, counting = run(runner, worker(behave_image, command=["/no/such/binary"], max_retries=2))

    assert report.outcome.status is Status.FAILED
    assert not report.outcome.retriable
    assert len(counting.runs) == 1
    assert report.outcome.error is not None
    assert report.outcome.error.type == "EngineError"
    assert "cannot start its container" in report.outcome.error.message
    assert "/no/such/binary" in report.outcome.error.message


def test_the_sdk_maps_a_permanent_error_on_python_2_7(runner: DockerRunner, example_images: None) -> None:
    config = worker("workerhost/legacy-tags:latest", memory="64m", max_retries=2)
    report = run_task(runner, config, new_task("PrismQ.Legacy.NormalizeTags", {"tags": "not a list"}))

    assert report.outcome.status is Status.FAILED
    assert report.attempts == 1
    assert report.outcome.error is not None
    assert report.outcome.error.type == "PermanentError"
    assert report.outcome.error.message == "params.tags must be a list of strings"
