"""`workerhost serve` with the shipped config, and the client commands, as a user runs them."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import HOST_ID, ROOT
from tests.serving import Serve, executable, free_port

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory, example_images: None) -> Iterator[Serve]:
    """The shipped workerhost.toml, with its database and address moved by its own variables."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {"WORKERHOST_DB": str(tmp / "queue.db"), "WORKERHOST_HTTP": f"127.0.0.1:{port}",
           "WORKERHOST_HOST_ID": HOST_ID}  # fmt: skip
    host = Serve(ROOT / "workerhost.toml", port, tmp / "serve.log", env).start()
    yield host
    host.stop()


def cli(host: Serve, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [executable(), *args, "--url", host.url], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_submit_wait_prints_the_result_and_exits_0(shipped: Serve) -> None:
    done = cli(shipped, "submit", "PrismQ.IdeaInspiration.TextStats", '{"text": "One sentence here."}', "--wait")

    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)
    assert task["status"] == "completed"
    assert task["result"]["words"] == 3
    assert task["worker"] == "PrismQ.IdeaInspiration.TextStats"
    assert task["image_id"].startswith("sha256:")


def test_submit_wait_exits_2_for_a_permanent_failure(shipped: Serve) -> None:
    done = cli(shipped, "submit", "PrismQ.Legacy.NormalizeTags", '{"tags": 7}', "--wait")

    assert done.returncode == 2, done.stderr
    task = json.loads(done.stdout)
    assert task["status"] == "failed"
    assert task["error"]["message"] == "params.tags must be a list of strings"
    assert "PermanentError" in task["stderr_tail"]  # the worker's traceback, kept with the task


def test_submit_without_wait_then_task_and_tasks(shipped: Serve) -> None:
    submitted = cli(shipped, "submit", "PrismQ.Example.Echo", "-", "--idempotency-key", "echo-1")
    # PARAMS "-" reads stdin; there is none here, so it is refused plainly.
    assert submitted.returncode == 2

    first = cli(shipped, "submit", "PrismQ.Example.Echo", '{"text": "x"}', "--idempotency-key", "echo-1")
    again = cli(shipped, "submit", "PrismQ.Example.Echo", '{"text": "x"}', "--idempotency-key", "echo-1")
    assert first.returncode == 0 and again.returncode == 0
    task_id = json.loads(first.stdout)["id"]
    assert json.loads(again.stdout)["id"] == task_id

    shown = cli(shipped, "task", task_id)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == task_id
    listed = cli(shipped, "tasks", "--type", "PrismQ.Example.Echo")
    assert listed.returncode == 0
    assert task_id in listed.stdout and "STATUS" in listed.stdout


def test_an_unknown_type_is_refused_with_exit_2(shipped: Serve) -> None:
    done = cli(shipped, "submit", "No.Such.Type", "{}")
    assert done.returncode == 2
    assert "unknown task type 'No.Such.Type'" in done.stderr


def test_a_host_that_is_not_running_is_said_plainly(tmp_path: Path) -> None:
    done = subprocess.run(
        [executable(), "tasks", "--url", f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True
    )
    assert done.returncode == 5
    assert "is `workerhost serve` running?" in done.stderr
    assert "Traceback" not in done.stderr
