"""runner/sidechannel.py: a worker's stderr split into log lines and side-channel events, all bounded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runner.sidechannel import (
    MAX_ATTRS,
    MAX_LINE,
    MAX_LOG_LINES,
    MAX_SPANS,
    Mark,
    Progress,
    StderrLines,
    WorkerSpan,
    is_side_channel,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "00f067aa0ba902b7"
PARENT_ID = "b7ad6b7169203331"
START = 1764090000.125
END = 1764090000.5
_DROP = object()


def span_record(**changes: Any) -> dict[str, Any]:
    """A valid span record as the SDK writes it; a change to ``_DROP`` removes the key."""
    record: dict[str, Any] = {
        "workerhost": "span",
        "trace_id": TRACE_ID,
        "span_id": SPAN_ID,
        "parent_id": PARENT_ID,
        "name": "fetch",
        "start": START,
        "end": END,
        "attrs": {"url": "http://example.com", "rows": 3},
        "status": "ok",
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not _DROP}


def span_line(**changes: Any) -> bytes:
    return json.dumps(span_record(**changes), separators=(",", ":")).encode() + b"\n"


def progress_line(percent: Any = 40, message: Any = "page 2 of 5") -> bytes:
    record: dict[str, Any] = {"workerhost": "progress", "percent": percent}
    if message is not None:
        record["message"] = message
    return json.dumps(record).encode() + b"\n"


def feed_all(lines: StderrLines, *chunks: bytes) -> list[str | WorkerSpan | Progress]:
    out: list[str | WorkerSpan | Progress] = []
    for chunk in chunks:
        out += lines.feed(chunk)
    return out + lines.flush()


# -- separating log lines from the side channel ---------------------------------------------------


def test_log_lines_and_side_channel_lines_are_separated() -> None:
    lines = StderrLines()
    out = lines.feed(b"starting\n" + span_line() + b"half way\n" + progress_line() + b"done\n")
    assert [type(item) for item in out] == [str, WorkerSpan, str, Progress, str]
    assert [item for item in out if isinstance(item, str)] == ["starting", "half way", "done"]
    assert (lines.log_lines, lines.spans, lines.malformed) == (3, 1, 0)
    assert lines.problems() is None


def test_span_line_becomes_a_worker_span() -> None:
    (item,) = StderrLines().feed(span_line())
    assert item == WorkerSpan(
        trace_id=int(TRACE_ID, 16),
        span_id=int(SPAN_ID, 16),
        parent_id=int(PARENT_ID, 16),
        name="fetch",
        start=START,
        end=END,
        attributes={"url": "http://example.com", "rows": 3},
        error=None,
    )
    assert isinstance(item.trace_id, int)
    assert isinstance(item.span_id, int)


def test_span_with_status_error_carries_the_error() -> None:
    lines = StderrLines()
    failed, unnamed = lines.feed(
        span_line(status="error", error="ValueError: boom") + span_line(status="error", error=_DROP)
    )
    assert isinstance(failed, WorkerSpan)
    assert failed.error == "ValueError: boom"
    assert isinstance(unnamed, WorkerSpan)
    assert unnamed.error == "error"


def test_span_without_parent_has_parent_none() -> None:
    (item,) = StderrLines().feed(span_line(parent_id=_DROP))
    assert isinstance(item, WorkerSpan)
    assert item.parent_id is None


def test_span_with_a_zero_duration_is_kept() -> None:
    (item,) = StderrLines().feed(span_line(start=START, end=START))
    assert isinstance(item, WorkerSpan)
    assert item.start == item.end == START


def test_progress_line_becomes_progress() -> None:
    lines = StderrLines()
    out = lines.feed(progress_line(40, "page 2 of 5") + progress_line(12.5, None) + progress_line(100, None))
    assert out == [Progress(40.0, "page 2 of 5"), Progress(12.5, None), Progress(100.0, None)]
    assert lines.spans == 0
    assert lines.log_lines == 0


@pytest.mark.parametrize("percent", [101, -1, "40", True, None])
def test_progress_out_of_range_or_not_a_number_is_malformed(percent: Any) -> None:
    lines = StderrLines()
    assert lines.feed(progress_line(percent, None)) == []
    assert lines.malformed == 1
    assert lines.log_lines == 0


def test_side_channel_line_with_spaces_and_leading_whitespace_is_parsed() -> None:
    record = json.dumps(span_record(), indent=None, separators=(", ", " : "))
    (item,) = StderrLines().feed(b"   " + record.encode() + b"  \n")
    assert isinstance(item, WorkerSpan)
    assert item.name == "fetch"


def test_is_side_channel_agrees_with_the_parser() -> None:
    assert is_side_channel(span_line())
    assert is_side_channel(progress_line())
    assert is_side_channel(b'{"workerhost": "metric"}')
    assert not is_side_channel(b"a log line mentioning workerhost")
    assert not is_side_channel(b'["workerhost"]')


# -- lines across feeds ------------------------------------------------------------------------------


def test_lines_split_across_feeds_come_out_once_complete() -> None:
    data = b"first\n" + span_line() + b"second\n" + progress_line()
    lines = StderrLines()
    out: list[str | WorkerSpan | Progress] = []
    for i in range(len(data)):
        out += lines.feed(data[i : i + 1])
    assert [type(item) for item in out] == [str, WorkerSpan, str, Progress]
    assert out[0] == "first"
    assert out[2] == "second"
    assert lines.flush() == []


def test_a_feed_without_newline_yields_nothing_until_the_line_ends() -> None:
    lines = StderrLines()
    assert lines.feed(b"no newline yet") == []
    assert lines.feed(b", still none") == []
    assert lines.feed(b" - now\nnext") == ["no newline yet, still none - now"]
    assert lines.flush() == ["next"]


def test_crlf_line_endings_are_stripped() -> None:
    lines = StderrLines()
    out = lines.feed(b"windows log\r\n" + span_line().rstrip(b"\n") + b"\r\n" + progress_line().rstrip(b"\n") + b"\r\n")
    assert out[0] == "windows log"
    assert isinstance(out[1], WorkerSpan)
    assert isinstance(out[2], Progress)
    assert lines.malformed == 0


def test_flush_returns_the_last_line_without_newline() -> None:
    lines = StderrLines()
    assert lines.feed(b"one\ntwo") == ["one"]
    assert lines.flush() == ["two"]
    assert lines.flush() == []


def test_flush_parses_a_last_side_channel_line_without_newline() -> None:
    lines = StderrLines()
    assert lines.feed(span_line().rstrip(b"\n")) == []
    (item,) = lines.flush()
    assert isinstance(item, WorkerSpan)


def test_flush_on_an_empty_stream_returns_nothing() -> None:
    lines = StderrLines()
    assert lines.flush() == []
    assert lines.feed(b"") == []
    assert lines.flush() == []
    assert lines.log_lines == 0


def test_invalid_utf8_in_a_log_line_is_replaced_not_raised() -> None:
    (line,) = StderrLines().feed(b"caf\xe9 \xff\n")
    assert line == "caf\ufffd \ufffd"


# -- malformed side-channel lines ---------------------------------------------------------------------

MALFORMED: dict[str, bytes] = {
    "bad json": b'{"workerhost": "span", "trace_id": \n',
    "truncated json": span_line()[:-20] + b"\n",
    "invalid utf-8": b'{"workerhost": "progress", "percent": 40, "message": "\xff\xfe"}\n',
    "trace id too short": span_line(trace_id=TRACE_ID[:-1]),
    "trace id too long": span_line(trace_id=TRACE_ID + "0"),
    "span id too short": span_line(span_id=SPAN_ID[:-2]),
    "parent id too long": span_line(parent_id=PARENT_ID + "00"),
    "trace id not hex": span_line(trace_id="z" * 32),
    "span id not hex": span_line(span_id="0123456789abcdeg"),
    "parent id not hex": span_line(parent_id="-123456789abcdef"),
    "trace id not a string": span_line(trace_id=12345),
    "trace id all zeros": span_line(trace_id="0" * 32),
    "span id all zeros": span_line(span_id="0" * 16),
    "parent id all zeros": span_line(parent_id="0" * 16),
    "trace id missing": span_line(trace_id=_DROP),
    "span id missing": span_line(span_id=_DROP),
    "end before start": span_line(start=END, end=START),
    "start not a number": span_line(start="yesterday"),
    "end not a number": span_line(end=None),
    "start a boolean": span_line(start=True),
    "start absurd": span_line(start=1e20, end=1e20 + 1),
    "end absurd": span_line(end=1e300),
    "start negative": span_line(start=-5.0),
    "start zero": span_line(start=0),
    "end infinite": json.dumps(span_record()).replace(str(END), "Infinity").encode() + b"\n",
    "start NaN": json.dumps(span_record()).replace(str(START), "NaN").encode() + b"\n",
    "name missing": span_line(name=_DROP),
    "name empty": span_line(name=""),
    "name not a string": span_line(name=42),
    "attrs a list": span_line(attrs=["a", "b"]),
    "attrs a string": span_line(attrs="k=v"),
    "attrs a number": span_line(attrs=7),
    "unknown kind": b'{"workerhost": "metric", "name": "rows", "value": 3}\n',
    "kind not a string": b'{"workerhost": 1}\n',
    "kind null": b'{"workerhost": null}\n',
    "not an object at top level": b'{"workerhost" "span"}\n',
}


@pytest.mark.parametrize("line", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_side_channel_line_is_dropped_and_counted(line: bytes) -> None:
    lines = StderrLines()
    out = lines.feed(b"before\n" + line + b"after\n")
    assert out == ["before", "after"]  # dropped, and never turned into a log line
    assert lines.malformed == 1
    assert lines.spans == 0
    assert lines.log_lines == 2
    assert lines.problems() == "1 malformed side-channel lines ignored"


def test_malformed_lines_are_counted_together() -> None:
    lines = StderrLines()
    out = lines.feed(b"".join(MALFORMED.values()) + span_line())
    assert len(out) == 1
    assert lines.malformed == len(MALFORMED)
    assert lines.problems() == f"{len(MALFORMED)} malformed side-channel lines ignored"


def test_json_object_with_workerhost_key_late_in_the_line_is_not_a_log_line() -> None:
    record = {"attrs": {"url": "http://example.com/" + "x" * 300}, **span_record(attrs=_DROP)}
    line = json.dumps(record).encode()
    assert line.index(b'"workerhost"') > 256
    out = StderrLines().feed(line + b"\n")
    assert not any(isinstance(item, str) for item in out)


def test_json_log_line_with_workerhost_only_as_a_value_is_a_log_line() -> None:
    lines = StderrLines()
    line = b'{"service": "workerhost", "msg": "connected"}'
    assert lines.feed(line + b"\n") == [line.decode()]
    assert lines.malformed == 0


# -- bounds -----------------------------------------------------------------------------------------------


def test_long_log_line_is_cut_to_max_line_and_counted() -> None:
    lines = StderrLines()
    out = lines.feed(b"x" * (MAX_LINE + 10) + b"\nnext\n")
    assert out == ["x" * MAX_LINE, "next"]
    assert lines.long_lines == 1
    assert lines.problems() == f"1 lines over {MAX_LINE // 1024} KiB cut"


def test_line_of_exactly_max_line_is_not_cut() -> None:
    lines = StderrLines()
    assert lines.feed(b"y" * MAX_LINE + b"\n") == ["y" * MAX_LINE]
    assert lines.long_lines == 0
    assert lines.problems() is None


def test_long_log_line_split_across_feeds_is_cut_once() -> None:
    lines = StderrLines()
    out = feed_all(lines, b"a" * (MAX_LINE - 1), b"bbb", b"c" * MAX_LINE, b"\n")
    assert out == ["a" * (MAX_LINE - 1) + "b"]
    assert lines.long_lines == 1


def test_long_side_channel_line_is_malformed_and_counted_as_cut() -> None:
    lines = StderrLines()
    out = lines.feed(span_line(attrs={"blob": "z" * MAX_LINE}) + b"after\n")
    assert out == ["after"]
    assert lines.long_lines == 1
    assert lines.malformed == 1
    assert lines.spans == 0
    problems = lines.problems()
    assert problems is not None
    assert "1 malformed side-channel lines ignored" in problems
    assert "1 lines over 64 KiB cut" in problems


def test_memory_stays_bounded_without_a_newline() -> None:
    lines = StderrLines()
    chunk = b"q" * 4096
    for _ in range(5 * 1024 * 1024 // len(chunk)):
        assert lines.feed(chunk) == []
        assert len(lines._partial) <= MAX_LINE
    assert lines.feed(b"tail\nok\n") == ["q" * MAX_LINE, "ok"]
    assert len(lines._partial) == 0
    assert lines.long_lines == 1


def test_memory_stays_bounded_for_a_side_channel_line_without_newline() -> None:
    lines = StderrLines()
    assert lines.feed(b'{"workerhost": "span", "attrs": {"blob": "') == []
    for _ in range(5 * 1024):
        lines.feed(b"w" * 1024)
        assert len(lines._partial) <= MAX_LINE
    assert lines.flush() == []
    assert (lines.malformed, lines.long_lines, lines.log_lines) == (1, 1, 0)


def test_spans_past_max_spans_are_dropped_and_counted() -> None:
    lines = StderrLines()
    out = lines.feed(span_line() * (MAX_SPANS + 5) + progress_line() + b"log\n")
    assert sum(isinstance(item, WorkerSpan) for item in out) == MAX_SPANS
    assert isinstance(out[-2], Progress)  # progress and logs are not spans: still delivered
    assert out[-1] == "log"
    assert lines.spans == MAX_SPANS
    assert lines.dropped_spans == 5
    assert lines.problems() == f"5 spans beyond {MAX_SPANS} dropped"


def test_log_lines_past_max_log_lines_are_not_relogged() -> None:
    lines = StderrLines()
    verdicts = []
    for i in range(MAX_LOG_LINES + 3):
        (line,) = lines.feed(f"line {i}\n".encode())
        assert line == f"line {i}"
        verdicts.append(lines.relog())
    assert verdicts == [True] * MAX_LOG_LINES + [False] * 3
    assert lines.dropped_lines == 3
    assert lines.problems() == f"3 log lines beyond {MAX_LOG_LINES} not re-logged"


def test_side_channel_lines_do_not_count_as_log_lines() -> None:
    lines = StderrLines()
    for _ in range(MAX_LOG_LINES):
        lines.feed(progress_line())
    assert lines.feed(b"a log line\n") == ["a log line"]
    assert lines.relog() is True
    assert lines.log_lines == 1


def test_problems_lists_everything_dropped() -> None:
    lines = StderrLines()
    lines.feed(b"{not json, workerhost\n")  # no key: a log line
    lines.feed(b'{"workerhost": "nope"}\n' + b"x" * (MAX_LINE + 1) + b"\n")
    problems = lines.problems()
    assert problems == f"1 malformed side-channel lines ignored; 1 lines over {MAX_LINE // 1024} KiB cut"


# -- attributes ---------------------------------------------------------------------------------------------


def test_attributes_are_capped_at_max_attrs() -> None:
    attrs = {f"k{i:03}": i for i in range(MAX_ATTRS + 10)}
    (item,) = StderrLines().feed(span_line(attrs=attrs))
    assert isinstance(item, WorkerSpan)
    assert item.attributes == {f"k{i:03}": i for i in range(MAX_ATTRS)}


def test_long_attribute_strings_keys_and_names_are_cut() -> None:
    (item,) = StderrLines().feed(span_line(name="n" * 1000, attrs={"k" * 1000: "v" * 10_000}))
    assert isinstance(item, WorkerSpan)
    assert item.name == "n" * 256
    assert item.attributes == {"k" * 256: "v" * 4096}


def test_long_error_message_is_cut() -> None:
    (item,) = StderrLines().feed(span_line(status="error", error="e" * 10_000))
    assert isinstance(item, WorkerSpan)
    assert item.error == "e" * 4096


def test_scalar_attributes_keep_their_type_and_others_are_json_encoded() -> None:
    attrs = {
        "s": "text",
        "i": 7,
        "f": 2.5,
        "b": True,
        "list": [1, "two"],
        "dict": {"a": 1},
        "none": None,
        "long list": list(range(5000)),
    }
    (item,) = StderrLines().feed(span_line(attrs=attrs))
    assert isinstance(item, WorkerSpan)
    got = item.attributes
    assert got["s"] == "text"
    assert got["i"] == 7 and type(got["i"]) is int
    assert got["f"] == 2.5
    assert got["b"] is True
    assert got["list"] == '[1, "two"]'
    assert got["dict"] == '{"a": 1}'
    assert got["none"] == "null"
    long_list = got["long list"]
    assert isinstance(long_list, str) and len(long_list) == 4096
    assert long_list.startswith("[0, 1, 2")


def test_missing_or_empty_attrs_mean_no_attributes() -> None:
    first, second = StderrLines().feed(span_line(attrs=_DROP) + span_line(attrs={}))
    assert isinstance(first, WorkerSpan) and first.attributes == {}
    assert isinstance(second, WorkerSpan) and second.attributes == {}


def test_progress_message_is_cut() -> None:
    (item,) = StderrLines().feed(progress_line(50, "m" * 5000))
    assert item == Progress(50.0, "m" * 1000)


def test_line_protocol_marks_are_side_channel_events() -> None:
    lines = StderrLines()
    items = lines.feed(b'{"workerhost":"ready","protocol":1}\nlog\n{"workerhost":"done","exit_code":3}\n')
    assert items == [Mark("ready"), "log", Mark("done", 3)]


@pytest.mark.parametrize("code", ['"0"', "true", "-1", "256", "1.5"])
def test_a_done_mark_with_a_bad_exit_code_is_malformed(code: str) -> None:
    lines = StderrLines()
    assert lines.feed(b'{"workerhost":"done","exit_code":' + code.encode() + b"}\n") == []
    assert lines.malformed == 1
