"""images/sdk/workerhost_sdk.py: protocol v1 as a worker sees it, run under the host's python3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

SDK_DIR = Path(__file__).resolve().parents[2] / "images" / "sdk"

ENVELOPE: dict[str, Any] = {
    "id": "task-123",
    "type": "PrismQ.Example.Echo",
    "params": {"text": "hello"},
    "attempt": 2,
    "correlation_id": "c0ffee",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}


def run_worker(
    tmp_path: Path,
    body: str,
    stdin: bytes | None = None,
    retry_on: str = "()",
    mode: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Write a handler script around ``body`` (the handler's body) and run it with ``stdin``."""
    script = tmp_path / "worker.py"
    handler = textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")
    script.write_text(
        "import json, os, sys, time\n"
        "import workerhost_sdk as sdk\n\n"
        f"def handle(task):\n{handler}\n\n"
        f"if __name__ == '__main__':\n    sdk.run(handle, retry_on={retry_on})\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(SDK_DIR)
    env["PYTHONIOENCODING"] = "utf-8"
    for name in ("WORKERHOST_MODE", "TRACEPARENT", "WORKERHOST_TASK_ID", "WORKERHOST_CORRELATION_ID"):
        env.pop(name, None)
    if mode is not None:
        env["WORKERHOST_MODE"] = mode
    data = json.dumps(ENVELOPE).encode() if stdin is None else stdin
    return subprocess.run(
        [sys.executable, str(script)], input=data, capture_output=True, env=env, timeout=60, check=False
    )


def reply(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The one JSON line on stdout (anything else fails the test)."""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.endswith(b"\n")
    body = json.loads(lines[0])
    assert isinstance(body, dict)
    return body


def test_sdk_file_exists() -> None:
    assert (SDK_DIR / "workerhost_sdk.py").is_file()


def test_success_writes_one_json_line_and_exits_0(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, 'return {"length": len(task.params["text"]), "id": task.id}')
    assert proc.returncode == 0, proc.stderr
    assert reply(proc) == {"success": True, "result": {"length": 5, "id": "task-123"}}


def test_task_fields_come_from_the_envelope(tmp_path: Path) -> None:
    proc = run_worker(
        tmp_path,
        """
        return {"id": task.id, "type": task.type, "params": task.params, "attempt": task.attempt,
                "correlation_id": task.correlation_id, "traceparent": task.traceparent,
                "deadline": task.deadline, "raw": task.raw}
        """,
    )
    assert proc.returncode == 0, proc.stderr
    result = reply(proc)["result"]
    assert result == {**ENVELOPE, "deadline": None, "raw": ENVELOPE}


def test_print_in_the_handler_goes_to_stderr(tmp_path: Path) -> None:
    proc = run_worker(
        tmp_path,
        """
        print("stray print")
        sys.stdout.write("stray write\\n")
        os.write(1, b"stray fd write\\n")
        return "done"
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert reply(proc) == {"success": True, "result": "done"}
    assert b"stray" not in proc.stdout
    assert b"stray print" in proc.stderr
    assert b"stray write" in proc.stderr
    assert b"stray fd write" in proc.stderr


def test_subprocess_output_goes_to_stderr(tmp_path: Path) -> None:
    proc = run_worker(
        tmp_path,
        """
        import subprocess
        subprocess.check_call([sys.executable, "-c", "print('from a child')"])
        return 1
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert reply(proc) == {"success": True, "result": 1}
    assert b"from a child" in proc.stderr


def test_non_ascii_result_is_escaped_and_round_trips(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, 'return {"text": "žluťoučký kůň ☃"}')
    assert proc.returncode == 0, proc.stderr
    proc.stdout.decode("ascii")
    assert reply(proc)["result"] == {"text": "žluťoučký kůň ☃"}


def test_retriable_error_exits_1(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, 'raise sdk.RetriableError("service busy")')
    assert proc.returncode == 1
    assert reply(proc) == {
        "success": False,
        "error": {"type": "RetriableError", "message": "service busy", "retriable": True},
    }
    assert b"Traceback" in proc.stderr


def test_permanent_error_exits_2(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, 'raise sdk.PermanentError("params.text is required")')
    assert proc.returncode == 2
    assert reply(proc) == {
        "success": False,
        "error": {"type": "PermanentError", "message": "params.text is required", "retriable": False},
    }


def test_plain_exception_exits_2_not_retriable(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, 'raise ValueError("bad number")')
    assert proc.returncode == 2
    assert reply(proc) == {
        "success": False,
        "error": {"type": "ValueError", "message": "bad number", "retriable": False},
    }
    assert b"ValueError: bad number" in proc.stderr


def test_ioerror_is_permanent_by_default(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, 'raise IOError("disk on fire")')
    assert proc.returncode == 2
    assert reply(proc)["error"]["retriable"] is False


def test_retry_on_makes_ioerror_retriable(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, 'raise IOError("disk on fire")', retry_on="(IOError,)")
    assert proc.returncode == 1
    error = reply(proc)["error"]
    assert error["retriable"] is True
    assert error["message"] == "disk on fire"


def test_retry_on_does_not_make_other_errors_retriable(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, 'raise KeyError("x")', retry_on="(IOError,)")
    assert proc.returncode == 2
    assert reply(proc)["error"]["retriable"] is False


def test_exception_with_a_true_retriable_attribute_is_retriable(tmp_path: Path) -> None:
    proc = run_worker(
        tmp_path,
        """
        exc = RuntimeError("lock lost")
        exc.retriable = True
        raise exc
        """,
    )
    assert proc.returncode == 1
    assert reply(proc)["error"] == {"type": "RuntimeError", "message": "lock lost", "retriable": True}


def test_exception_without_message_is_named_by_its_type(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, "raise RuntimeError()")
    assert proc.returncode == 2
    assert reply(proc)["error"]["message"] == "RuntimeError"


def test_task_timeout_exits_3(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, 'raise sdk.TaskTimeout("no time left")')
    assert proc.returncode == 3
    body = reply(proc)
    assert body["success"] is False
    assert body["error"]["type"] == "TaskTimeout"
    assert body["error"]["message"] == "no time left"
    assert body["error"]["retriable"] is False


@pytest.mark.parametrize("stdin", [b"", b"   \n"])
def test_empty_stdin_is_invalid_task(tmp_path: Path, stdin: bytes) -> None:
    proc = run_worker(tmp_path, "raise AssertionError('the handler must not run')", stdin=stdin)
    assert proc.returncode == 2
    body = reply(proc)
    assert body["success"] is False
    assert body["error"]["type"] == "InvalidTask"
    assert body["error"]["retriable"] is False
    assert b"must not run" not in proc.stderr


@pytest.mark.parametrize(
    "stdin",
    [b"[1, 2]", b'"task"', b"42", b"null", b"{not json", b'{"id": "t", "params": [1]}'],
    ids=["array", "string", "number", "null", "broken", "params-not-object"],
)
def test_non_object_task_is_invalid_task(tmp_path: Path, stdin: bytes) -> None:
    proc = run_worker(tmp_path, "raise AssertionError('the handler must not run')", stdin=stdin)
    assert proc.returncode == 2
    body = reply(proc)
    assert body["success"] is False
    assert body["error"]["type"] == "InvalidTask"
    assert body["error"]["retriable"] is False


@pytest.mark.parametrize("value", ["object()", "{1, 2}", 'float("nan")', "b'bytes'"])
def test_non_serialisable_result_exits_2(tmp_path: Path, value: str) -> None:
    proc = run_worker(tmp_path, f"return {{'value': {value}}}")
    assert proc.returncode == 2
    body = reply(proc)
    assert body["success"] is False
    assert body["error"]["retriable"] is False
    assert "JSON" in body["error"]["message"]


def test_remaining_with_a_deadline(tmp_path: Path) -> None:
    deadline = datetime.now(UTC) + timedelta(seconds=120)
    envelope = {**ENVELOPE, "deadline": deadline.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"}
    proc = run_worker(tmp_path, "return task.remaining()", stdin=json.dumps(envelope).encode())
    assert proc.returncode == 0, proc.stderr
    remaining = reply(proc)["result"]
    assert isinstance(remaining, float)
    assert 60 < remaining <= 120.5


def test_remaining_without_milliseconds(tmp_path: Path) -> None:
    deadline = datetime.now(UTC) + timedelta(seconds=300)
    envelope = {**ENVELOPE, "deadline": deadline.strftime("%Y-%m-%dT%H:%M:%SZ")}
    proc = run_worker(tmp_path, "return task.remaining()", stdin=json.dumps(envelope).encode())
    assert proc.returncode == 0, proc.stderr
    assert 240 < reply(proc)["result"] <= 300.5


def test_remaining_is_zero_after_the_deadline(tmp_path: Path) -> None:
    envelope = {**ENVELOPE, "deadline": "2001-01-01T00:00:00.000Z"}
    proc = run_worker(tmp_path, "return task.remaining()", stdin=json.dumps(envelope).encode())
    assert proc.returncode == 0, proc.stderr
    assert reply(proc)["result"] == 0.0


@pytest.mark.parametrize("deadline", [None, "", "not a date"])
def test_remaining_is_none_without_a_usable_deadline(tmp_path: Path, deadline: str | None) -> None:
    envelope = {**ENVELOPE, "deadline": deadline}
    proc = run_worker(tmp_path, "return task.remaining()", stdin=json.dumps(envelope).encode())
    assert proc.returncode == 0, proc.stderr
    assert reply(proc)["result"] is None


def test_log_writes_to_stderr(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, 'sdk.log("working", step=2, item="a")\nreturn None')
    assert proc.returncode == 0, proc.stderr
    assert reply(proc) == {"success": True, "result": None}
    assert b"working item=a step=2\n" in proc.stderr


# -- the task's environment, and the line protocol of reused containers ---------------------------

ENV_BODY = """
return {k: os.environ.get(k) for k in
        ("TRACEPARENT", "WORKERHOST_TASK_ID", "WORKERHOST_CORRELATION_ID", "WORKERHOST_ATTEMPT")}
"""


def test_the_tasks_ids_are_set_in_the_environment_from_the_envelope(tmp_path: Path) -> None:
    """A prewarmed container was started before its task: the SDK sets what a cold one has from its start."""
    proc = run_worker(tmp_path, ENV_BODY, mode="prewarm")
    assert proc.returncode == 0, proc.stderr
    assert reply(proc)["result"] == {
        "TRACEPARENT": ENVELOPE["traceparent"],
        "WORKERHOST_TASK_ID": "task-123",
        "WORKERHOST_CORRELATION_ID": "c0ffee",
        "WORKERHOST_ATTEMPT": "2",
    }


def lines_of(*envelopes: dict[str, Any] | bytes) -> bytes:
    return b"".join(e if isinstance(e, bytes) else json.dumps(e).encode() + b"\n" for e in envelopes)


def marks(stderr: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith(b'{"workerhost"')]


def test_reuse_mode_answers_one_line_per_task_line_with_a_done_mark_each(tmp_path: Path) -> None:
    second = {**ENVELOPE, "id": "task-124", "params": {"text": "fail"}, "attempt": 1}
    third = {**ENVELOPE, "id": "task-125", "traceparent": None}
    body = """
    if task.params["text"] == "fail":
        raise sdk.RetriableError("busy")
    return {k: os.environ.get(k) for k in ("WORKERHOST_TASK_ID", "TRACEPARENT", "WORKERHOST_ATTEMPT")}
    """
    proc = run_worker(tmp_path, body, stdin=lines_of(ENVELOPE, second, b"\n", b"not json\n", third), mode="reuse")
    assert proc.returncode == 0, proc.stderr  # stdin ended: the worker is done
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert replies[0]["result"] == {
        "WORKERHOST_TASK_ID": "task-123", "TRACEPARENT": ENVELOPE["traceparent"], "WORKERHOST_ATTEMPT": "2",
    }  # fmt: skip
    assert replies[1]["error"] == {"type": "RetriableError", "message": "busy", "retriable": True}
    assert replies[2]["error"]["type"] == "InvalidTask"
    # The third task carries no traceparent: it must not inherit the first task's.
    assert replies[3]["result"] == {"WORKERHOST_TASK_ID": "task-125", "TRACEPARENT": None, "WORKERHOST_ATTEMPT": "2"}
    assert marks(proc.stderr) == [
        {"workerhost": "ready", "protocol": 1},
        {"workerhost": "done", "exit_code": 0},
        {"workerhost": "done", "exit_code": 1},
        {"workerhost": "done", "exit_code": 2},
        {"workerhost": "done", "exit_code": 0},
    ]


def test_reuse_mode_puts_a_tasks_stderr_before_its_done_mark(tmp_path: Path) -> None:
    body = """
    print("printed by " + task.id)
    sys.stderr.write("written by " + task.id + "\\n")
    return 1
    """
    proc = run_worker(tmp_path, body, stdin=lines_of(ENVELOPE, {**ENVELOPE, "id": "task-2"}), mode="reuse")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode().splitlines()[1:] == [
        "printed by task-123", "written by task-123", '{"workerhost":"done","exit_code":0}',
        "printed by task-2", "written by task-2", '{"workerhost":"done","exit_code":0}',
    ]  # fmt: skip


def test_reuse_mode_ends_with_the_process_when_the_handler_exits(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, "sys.exit(7)", stdin=lines_of(ENVELOPE, ENVELOPE), mode="reuse")
    assert proc.returncode == 7
    assert proc.stdout == b""
    assert marks(proc.stderr) == [{"workerhost": "ready", "protocol": 1}]


def test_a_worker_run_by_the_host_marks_its_tasks_end_after_its_result(tmp_path: Path) -> None:
    """So that the host need not wait for the container's exit (README "Worker protocol v1")."""
    proc = run_worker(tmp_path, 'raise sdk.RetriableError("busy")', mode="prewarm")
    assert proc.returncode == 1
    assert reply(proc)["error"]["retriable"] is True
    assert marks(proc.stderr) == [{"workerhost": "done", "exit_code": 1}]
    cold = run_worker(tmp_path, "return 1", mode="cold")
    assert marks(cold.stderr) == [{"workerhost": "done", "exit_code": 0}]
    elsewhere = run_worker(tmp_path, "return 1")  # not run by a host (no WORKERHOST_MODE): no marks
    assert marks(elsewhere.stderr) == []
