"""images/sdk/workerhost_sdk.py: spans and progress on stderr's side channel, as the host parses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from runner.sidechannel import Progress, StderrLines, WorkerSpan

SDK_DIR = Path(__file__).resolve().parents[2] / "images" / "sdk"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def run_script(
    tmp_path: Path, code: str, traceparent: str | None = TRACEPARENT, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run ``code`` (with ``sdk`` imported) under this interpreter, TRACEPARENT set as asked."""
    script = tmp_path / "script.py"
    script.write_text(
        "import json, os, sys, time\nimport workerhost_sdk as sdk\n\n" + textwrap.dedent(code).strip() + "\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRACEPARENT")}
    env["PYTHONPATH"] = str(SDK_DIR)
    env["PYTHONIOENCODING"] = "utf-8"
    if traceparent is not None:
        env["TRACEPARENT"] = traceparent
    return subprocess.run(
        [sys.executable, str(script)], input=stdin, capture_output=True, env=env, timeout=60, check=False
    )


def parse(stderr: bytes) -> tuple[list[WorkerSpan], list[Progress], list[str], StderrLines]:
    lines = StderrLines()
    items = lines.feed(stderr) + lines.flush()
    spans = [i for i in items if isinstance(i, WorkerSpan)]
    progress = [i for i in items if isinstance(i, Progress)]
    logs = [i for i in items if isinstance(i, str)]
    return spans, progress, logs, lines


def test_nested_spans_continue_the_trace_from_traceparent(tmp_path: Path) -> None:
    proc = run_script(
        tmp_path,
        """
        with sdk.span("outer", {"k": 1}):
            time.sleep(0.01)
            with sdk.span("inner"):
                time.sleep(0.01)
            time.sleep(0.01)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stderr.splitlines()) == 2
    spans, progress, logs, lines = parse(proc.stderr)
    assert (progress, logs, lines.problems()) == ([], [], None)
    inner, outer = spans  # a span is sent when it ends: the inner one first
    assert (outer.name, inner.name) == ("outer", "inner")
    assert outer.trace_id == inner.trace_id == int(TRACE_ID, 16)
    assert outer.parent_id == int(PARENT_ID, 16)
    assert inner.parent_id == outer.span_id
    assert len({outer.span_id, inner.span_id, int(PARENT_ID, 16)}) == 3
    assert outer.attributes == {"k": 1}
    assert inner.attributes == {}
    assert outer.error is None and inner.error is None
    assert outer.start <= inner.start <= inner.end <= outer.end
    assert outer.start < outer.end


def test_sibling_spans_share_the_parent(tmp_path: Path) -> None:
    proc = run_script(
        tmp_path,
        """
        with sdk.span("outer"):
            with sdk.span("a"):
                pass
            with sdk.span("b"):
                pass
        with sdk.span("after"):
            pass
        """,
    )
    assert proc.returncode == 0, proc.stderr
    spans, _, _, _ = parse(proc.stderr)
    a, b, outer, after = spans
    assert [s.name for s in spans] == ["a", "b", "outer", "after"]
    assert a.parent_id == b.parent_id == outer.span_id
    assert after.parent_id == outer.parent_id == int(PARENT_ID, 16)
    assert a.end <= b.start


def test_exception_marks_the_span_as_error_and_propagates(tmp_path: Path) -> None:
    proc = run_script(
        tmp_path,
        """
        try:
            with sdk.span("outer"):
                with sdk.span("work", {"step": "parse"}):
                    raise ValueError("bad row 7")
        except ValueError as exc:
            sys.stderr.write("caught: %s\\n" % exc)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    spans, _, logs, lines = parse(proc.stderr)
    work, outer = spans
    assert work.error == "ValueError: bad row 7"
    assert outer.error == "ValueError: bad row 7"  # it went through the outer span too
    assert work.attributes == {"step": "parse"}
    assert logs == ["caught: bad row 7"]
    assert lines.malformed == 0


def test_uncaught_exception_in_a_span_still_fails_the_script(tmp_path: Path) -> None:
    proc = run_script(tmp_path, 'with sdk.span("work"):\n    raise KeyError("missing")')
    assert proc.returncode == 1
    spans, _, logs, _ = parse(proc.stderr)
    (work,) = spans
    assert work.error == "KeyError: 'missing'"
    assert any("KeyError" in line for line in logs)


def test_set_adds_attributes_while_the_span_is_open(tmp_path: Path) -> None:
    proc = run_script(
        tmp_path,
        """
        with sdk.span("query", {"table": "users"}) as s:
            s.set("rows", 42).set("cached", False)
            s.set("tags", ["a", "b"])
        """,
    )
    assert proc.returncode == 0, proc.stderr
    (query,), _, _, _ = parse(proc.stderr)
    assert query.attributes == {"table": "users", "rows": 42, "cached": False, "tags": '["a", "b"]'}


def test_progress_writes_a_progress_line_clamped_to_0_100(tmp_path: Path) -> None:
    proc = run_script(
        tmp_path,
        """
        sdk.progress(40, "page 2 of 5")
        sdk.progress(150)
        sdk.progress(-5, "before start")
        sdk.progress(62.5)
        """,
        traceparent=None,  # progress needs no trace context
    )
    assert proc.returncode == 0, proc.stderr
    spans, progress, logs, lines = parse(proc.stderr)
    assert (spans, logs, lines.malformed) == ([], [], 0)
    assert progress == [
        Progress(40.0, "page 2 of 5"),
        Progress(100.0, None),
        Progress(0.0, "before start"),
        Progress(62.5, None),
    ]


def test_without_traceparent_no_span_line_is_written(tmp_path: Path) -> None:
    code = """
        with sdk.span("outer", {"k": 1}) as s:
            s.set("x", 2)
            with sdk.span("inner"):
                pass
        print("body ran")
        """
    for traceparent in (None, "", "not-a-traceparent", "00-short-ids-01"):
        proc = run_script(tmp_path, code, traceparent=traceparent)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == b"", (traceparent, proc.stderr)
        assert proc.stdout == b"body ran\n"


def test_span_lines_are_single_json_lines_with_the_documented_keys(tmp_path: Path) -> None:
    proc = run_script(tmp_path, 'with sdk.span("fetch", {"url": "http://example.com/\\u00e9\\n"}):\n    pass')
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.splitlines()
    line.decode("ascii")
    record: dict[str, Any] = json.loads(line)
    assert set(record) == {"workerhost", "trace_id", "span_id", "parent_id", "name", "start", "end", "attrs", "status"}
    assert record["workerhost"] == "span"
    assert record["status"] == "ok"
    assert record["attrs"] == {"url": "http://example.com/\u00e9\n"}


def test_spans_inside_run_do_not_touch_stdout(tmp_path: Path) -> None:
    envelope = {"id": "task-1", "type": "Echo", "params": {"text": "hi"}, "traceparent": TRACEPARENT}
    proc = run_script(
        tmp_path,
        """
        def handle(task):
            with sdk.span("handle", {"task": task.id}):
                print("stray print")
                with sdk.span("step"):
                    sdk.progress(50, "half")
            return {"text": task.params["text"]}

        sdk.run(handle)
        """,
        stdin=json.dumps(envelope).encode(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b'{"success":true,"result":{"text":"hi"}}\n'
    spans, progress, logs, lines = parse(proc.stderr)
    step, handle = spans
    assert handle.parent_id == int(PARENT_ID, 16)
    assert step.parent_id == handle.span_id
    assert handle.attributes == {"task": "task-1"}
    assert progress == [Progress(50.0, "half")]
    assert logs == ["stray print"]
    assert lines.problems() is None


def test_failing_handler_inside_a_span_reports_on_stdout_and_marks_the_span(tmp_path: Path) -> None:
    envelope = {"id": "task-2", "type": "Echo", "params": {}}
    proc = run_script(
        tmp_path,
        """
        def handle(task):
            with sdk.span("handle"):
                raise sdk.RetriableError("service busy")

        sdk.run(handle)
        """,
        stdin=json.dumps(envelope).encode(),
    )
    assert proc.returncode == 1
    (line,) = proc.stdout.splitlines()
    assert json.loads(line)["error"] == {"type": "RetriableError", "message": "service busy", "retriable": True}
    spans, _, _, _ = parse(proc.stderr)
    (handle,) = spans
    assert handle.error == "RetriableError: service busy"
