"""The container runner against the real Docker engine: every outcome, produced for real."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from runner.attempts import Report, new_task, run_task
from runner.config import WorkerConfig
from runner.docker import (
    API_VERSION,
    LABEL_ATTEMPT,
    LABEL_HOST,
    LABEL_OWNER,
    LABEL_TASK,
    LABEL_WORKER,
    DockerRunner,
    Orphan,
    RunResult,
)
from runner.errors import EngineError
from runner.protocol import EngineFault, Envelope, Status, classify
from tests.conftest import HOST_ID
from tests.engine_proxy import EngineProxy

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


# -- cancel ------------------------------------------------------------------------------------------


def owner_token(name: str) -> str:
    return f"pytest-{name}:{uuid.uuid4().hex[:8]}"


class Background:
    """One ``runner.run`` in a thread, for a test that acts on the task while it runs.

    Leaving the ``with`` cancels the run if it still goes (a failed assertion must
    not leave a container sleeping) and waits for it, before its runner closes.
    """

    def __init__(self, runner: DockerRunner, config: WorkerConfig, **params: Any) -> None:
        self.runner = runner
        self.task: Envelope = new_task("Test.Behave", params)
        self.result: RunResult | None = None
        self._thread = threading.Thread(target=self._run, args=(config,), daemon=True)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(EngineError):
                self.runner.cancel(self.task.id)
            self._thread.join(60)

    def _run(self, config: WorkerConfig) -> None:
        self.result = self.runner.run(config, self.task)

    def finish(self, within: float = 60) -> RunResult:
        self._thread.join(within)
        assert self.result is not None, f"the run of {self.task.id} did not end within {within}s"
        return self.result


def containers_of(client: Any, task_id: str, everything: bool = True) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.containers(all=everything, filters={"label": f"{LABEL_TASK}={task_id}"})
    return found


def running_container(client: Any, task_id: str) -> dict[str, Any]:
    """The task's container once it runs (the run in its thread is past start)."""
    for _ in range(600):
        found = containers_of(client, task_id, everything=False)
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no running container for task {task_id} within 30s")


def test_cancel_kills_the_running_container_and_its_run_says_cancelled(docker_client: Any, behave_image: str) -> None:
    config = worker(behave_image, timeout=120)
    began = time.monotonic()
    with (
        DockerRunner(docker_client, HOST_ID, owner_token("cancel")) as runner,
        Background(runner, config, do="sleep", seconds=90) as sleeper,
    ):
        running_container(docker_client, sleeper.task.id)

        assert runner.cancel(sleeper.task.id) is True
        result = sleeper.finish()

    assert result.cancelled is True
    assert result.end.exit_code == 137  # SIGKILL: how it died, not an answer of the worker
    assert time.monotonic() - began < 60  # nowhere near the 90 s it would have slept
    assert containers_of(docker_client, sleeper.task.id) == []  # close() waited for its removal


def test_cancel_leaves_alone_a_container_of_the_same_task_owned_by_another_runner(
    docker_client: Any, behave_image: str
) -> None:
    config = worker(behave_image, timeout=120)
    with (
        DockerRunner(docker_client, HOST_ID, owner_token("owner")) as owner,
        DockerRunner(docker_client, HOST_ID, owner_token("sibling")) as sibling,
        Background(owner, config, do="sleep", seconds=90) as sleeper,
    ):
        running_container(docker_client, sleeper.task.id)

        assert sibling.cancel(sleeper.task.id) is False  # same host id, but not its container
        assert len(containers_of(docker_client, sleeper.task.id, everything=False)) == 1
        assert owner.cancel(sleeper.task.id) is True
        assert sleeper.finish().cancelled is True


def test_cancel_of_a_task_whose_container_has_exited_is_false(docker_client: Any, behave_image: str) -> None:
    owner = owner_token("exited")
    with DockerRunner(docker_client, HOST_ID, owner) as runner:
        report = run_task(runner, worker(behave_image), new_task("Test.Behave", {"do": "ok"}))
        assert report.last_run is not None and report.last_run.cancelled is False

        assert runner.cancel(report.task.id) is False

        # An exited container that is still there (its removal is off the critical path) is no different.
        task_id = f"exited-{uuid.uuid4().hex[:8]}"
        labels = {LABEL_TASK: task_id, LABEL_HOST: HOST_ID, LABEL_OWNER: owner}
        container = docker_client.create_container(behave_image, command=["true"], labels=labels)["Id"]
        try:
            docker_client.start(container)
            docker_client.wait(container, timeout=30)
            assert runner.cancel(task_id) is False
            assert docker_client.inspect_container(container)["State"]["ExitCode"] == 0
        finally:
            docker_client.remove_container(container, force=True)


# -- reap ---------------------------------------------------------------------------------------------


def test_a_removal_that_failed_is_retried_by_the_next_reap(
    docker_client: Any, behave_image: str, tmp_path: Path
) -> None:
    proxy = EngineProxy(tmp_path / "engine.sock")
    proxy.start()
    client = docker.APIClient(base_url=proxy.docker_host, version=API_VERSION, timeout=30)
    runner = DockerRunner(client, HOST_ID, owner_token("removal"))
    sleeper = Background(runner, worker(behave_image, timeout=120), do="sleep", seconds=90)
    try:
        with sleeper:
            running_container(docker_client, sleeper.task.id)
            proxy.stop()  # the engine goes away mid-run: the run ends, and its removal fails
            result = sleeper.finish()
        runner.close()  # waits for that removal
        assert result.end.engine_fault is EngineFault.UNREACHABLE
        assert classify(result.end).retriable
        assert len(containers_of(docker_client, sleeper.task.id)) == 1  # left behind

        proxy.start()
        reaped = runner.reap(lambda owner: False)  # nobody is dead: only our own leftover goes

        assert containers_of(docker_client, sleeper.task.id) == []
        assert reaped.removed == []  # its run reported it: not an orphan
        assert sleeper.task.id not in reaped.kept
    finally:
        proxy.stop()
        runner.close()
        for container in containers_of(docker_client, sleeper.task.id):
            docker_client.remove_container(container["Id"], force=True)


def test_reap_keeps_a_live_owners_container_and_removes_a_dead_owners(docker_client: Any, behave_image: str) -> None:
    config = worker(behave_image, timeout=120)
    alive_owner, dead_owner = owner_token("alive"), owner_token("dead")
    with (
        DockerRunner(docker_client, HOST_ID, alive_owner) as alive,
        DockerRunner(docker_client, HOST_ID, dead_owner) as gone,
        DockerRunner(docker_client, HOST_ID, owner_token("reaper")) as reaper,
        Background(alive, config, do="sleep", seconds=90) as kept,
        Background(gone, config, do="sleep", seconds=90) as orphaned,
    ):
        running_container(docker_client, kept.task.id)
        running_container(docker_client, orphaned.task.id)

        reaped = reaper.reap(lambda owner: owner == dead_owner)

        assert reaped.removed == [Orphan(orphaned.task.id, dead_owner, 1, worker="Test.Behave")]
        assert kept.task.id in reaped.kept
        assert orphaned.task.id not in reaped.kept
        assert containers_of(docker_client, orphaned.task.id) == []
        assert len(containers_of(docker_client, kept.task.id, everything=False)) == 1  # still running
        orphaned.finish()  # its run (its owner was alive after all, in this test) lost its container and ended
        assert alive.cancel(kept.task.id) is True
        assert kept.finish().cancelled is True


def test_reap_never_removes_its_own_runners_containers(docker_client: Any, behave_image: str) -> None:
    config = worker(behave_image, timeout=120)
    with (
        DockerRunner(docker_client, HOST_ID, owner_token("mine")) as mine,
        Background(mine, config, do="sleep", seconds=90) as sleeper,
    ):
        running_container(docker_client, sleeper.task.id)

        reaped = mine.reap(lambda owner: True)  # even told that every owner is dead

        assert sleeper.task.id in reaped.kept
        assert all(orphan.task_id != sleeper.task.id for orphan in reaped.removed)
        assert len(containers_of(docker_client, sleeper.task.id, everything=False)) == 1
        assert mine.cancel(sleeper.task.id) is True
        assert sleeper.finish().cancelled is True


def test_reap_asks_about_a_container_without_an_owner_as_the_empty_owner(docker_client: Any, behave_image: str) -> None:
    task_id = f"ownerless-{uuid.uuid4().hex[:8]}"
    labels = {LABEL_TASK: task_id, LABEL_HOST: HOST_ID, LABEL_ATTEMPT: "3"}
    container = docker_client.create_container(behave_image, command=["true"], labels=labels)["Id"]
    try:
        with DockerRunner(docker_client, HOST_ID, owner_token("reaper")) as reaper:
            asked: list[str] = []

            def nobody_dead(owner: str) -> bool:
                asked.append(owner)
                return False

            kept = reaper.reap(nobody_dead)
            assert "" in asked
            assert task_id in kept.kept
            assert len(containers_of(docker_client, task_id)) == 1

            reaped = reaper.reap(lambda owner: owner == "")

            assert Orphan(task_id, "", 3) in reaped.removed
            assert containers_of(docker_client, task_id) == []
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.remove_container(container, force=True)
