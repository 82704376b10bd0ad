"""The strict sandbox for real: gVisor, no network, ulimits, a small /tmp, the same protocol."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from runner.attempts import new_task, run_task
from runner.config import WorkerConfig
from runner.docker import DockerRunner
from runner.protocol import Status
from tests.conftest import unavailable

pytestmark = pytest.mark.docker

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def gvisor(docker_client: Any) -> None:
    if "runsc" not in (docker_client.info().get("Runtimes") or {}):
        unavailable("gVisor (runsc) is not registered with the engine: run `make sandbox`")


@pytest.fixture
def runner(docker_client: Any, gvisor: None, host_id: str) -> Iterator[DockerRunner]:
    with DockerRunner(docker_client, host_id) as runner:
        yield runner


def strict(image: str, **overrides: Any) -> WorkerConfig:
    fields: dict[str, Any] = {"name": "Test.Strict", "image": image, "task_types": ["Test.Strict"],
                              "sandbox": "strict", "timeout": 20, "max_retries": 0, "memory": "96m"}  # fmt: skip
    return WorkerConfig(**{**fields, **overrides})


def test_a_strict_worker_runs_under_gvisor_with_its_limits(runner: DockerRunner, behave_image: str) -> None:
    report = run_task(runner, strict(behave_image), new_task("Test.Strict", {"do": "probe"}))

    assert report.outcome.status is Status.COMPLETED, report.outcome
    probe = report.outcome.result
    assert probe["kernel"] != os.uname().release  # gVisor's own kernel, not the host's
    assert probe["interfaces"] == ["lo"]
    assert (probe["uid"], probe["root_writable"]) == (65534, False)
    assert probe["rlimit_nofile"] == 256
    assert probe["rlimit_fsize"] == 16 * MiB  # no file larger than its /tmp
    assert probe["env"]["WORKERHOST_TASK_ID"] == report.task.id


def test_the_protocol_is_the_same_under_gvisor(runner: DockerRunner, behave_image: str) -> None:
    blob = "0123456789abcdef" * (MiB // 16)
    echoed = run_task(runner, strict(behave_image), new_task("Test.Strict", {"do": "echo_blob", "blob": blob}))
    assert echoed.outcome.ok and echoed.outcome.result["blob"] == blob

    failed = run_task(runner, strict(behave_image), new_task("Test.Strict", {"do": "exit", "code": 2}))
    assert (failed.outcome.status, failed.exit_code) == (Status.FAILED, 2)

    late = run_task(runner, strict(behave_image, timeout=2), new_task("Test.Strict", {"do": "sleep", "seconds": 30}))
    assert late.outcome.status is Status.TIMEOUT
