"""`workerhost serve` with the shipped config, and the client commands, as a user runs them."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, new_host_id
from tests.serving import Serve, config_text, executable, free_port

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory, example_images: None) -> Iterator[Serve]:
    """The shipped workerhost.toml, with its database and address moved by its own variables."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {"WORKERHOST_DB": str(tmp / "queue.db"), "WORKERHOST_HTTP": f"127.0.0.1:{port}",
           "WORKERHOST_HOST_ID": new_host_id()}  # fmt: skip
    host = Serve(ROOT / "workerhost.toml", port, tmp / "serve.log", env).start()
    yield host
    host.stop()


# A worker of the test image that times out after 2 s and is retried once.
HASTY = """
[[workers]]
name = "Test.Hasty"
image = "{image}"
task_types = ["Test.Hasty"]
timeout = "2s"
max_retries = 1
backoff = "100ms"
memory = "64m"
"""


@pytest.fixture(scope="module")
def behaving(tmp_path_factory: pytest.TempPathFactory, behave_image: str) -> Iterator[Serve]:
    """A host with the test worker, whose tasks end as they are told to."""
    tmp = tmp_path_factory.mktemp("behave")
    port = free_port()
    config = tmp / "behave.toml"
    workers = HASTY.format(image=behave_image)
    config.write_text(config_text(new_host_id(), port, tmp / "queue.db", behave_image, workers=workers))
    host = Serve(config, port, tmp / "serve.log")
    try:
        yield host.start()
    finally:
        host.stop()


def cli(host: Serve, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """A client command against ``host``, with its own stdin (empty unless given): PARAMS "-"
    must never read pytest's, which is a terminal under ``pytest -s``."""
    return subprocess.run(
        [executable(), *args, "--url", host.url], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120
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
    # PARAMS "-" reads stdin; it is empty here, so it is refused plainly.
    assert submitted.returncode == 2
    assert "PARAMS is not valid JSON" in submitted.stderr
    assert "Traceback" not in submitted.stderr

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


def test_submit_reads_params_from_stdin(shipped: Serve) -> None:
    done = cli(shipped, "submit", "PrismQ.Example.Echo", "-", "--wait", stdin='{"text": "from stdin"}')

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["text"] == "FROM STDIN"


@pytest.mark.parametrize("command", ["task", "retry"])
def test_an_unknown_task_id_exits_4(shipped: Serve, command: str) -> None:
    done = cli(shipped, command, "no-such-task")

    assert done.returncode == 4, done.stdout + done.stderr
    assert done.stdout == ""
    assert "no-such-task" in done.stderr  # it names the id it did not find
    assert "Traceback" not in done.stderr


def test_submit_wait_exits_3_when_the_task_times_out(behaving: Serve) -> None:
    done = cli(behaving, "submit", "Test.Hasty", '{"do": "sleep", "seconds": 30}', "--wait")

    assert done.returncode == 3, done.stderr
    task = json.loads(done.stdout)
    assert (task["status"], task["outcome"], task["attempts"]) == ("failed", "timeout", 1)  # not retried
    assert task["error"]["type"] == "Timeout"


def test_submit_wait_exits_1_when_the_retries_are_used_up(behaving: Serve) -> None:
    done = cli(behaving, "submit", "Test.Hasty", '{"do": "exit", "code": 1}', "--wait")

    assert done.returncode == 1, done.stderr
    task = json.loads(done.stdout)
    assert (task["status"], task["attempts"]) == ("dead", 2)  # max_retries = 1: two attempts, then dead
    assert task["error"]["retriable"] is True


def test_an_unknown_type_is_refused_with_exit_2(shipped: Serve) -> None:
    done = cli(shipped, "submit", "No.Such.Type", "{}")
    assert done.returncode == 2
    assert "unknown task type 'No.Such.Type'" in done.stderr


def test_a_host_that_is_not_running_is_said_plainly(tmp_path: Path) -> None:
    done = subprocess.run(
        [executable(), "tasks", "--url", f"http://127.0.0.1:{free_port()}"], input="", capture_output=True, text=True
    )
    assert done.returncode == 5
    assert "is `workerhost serve` running?" in done.stderr
    assert "Traceback" not in done.stderr
