"""runner/telemetry/logs: both formatters take hostile records (a worker's control characters, values
JSON cannot hold, arguments that do not fit the format) and still write one safe line; configure()
sends everything that would write to stderr by itself through them."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
import unicodedata
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner import cli
from runner.telemetry import logs

# A worker's stderr line at its worst: set the window title, clear the screen, move the cursor,
# ring the bell, return to the start of the line, C1 controls (NEL, CSI), the separators a line
# splitter cuts at, a bidi override, DEL, NUL, and lone surrogates.
HOSTILE = (
    "title \x1b]0;pwned\x07 clear \x1b[2J\x1b[H bell \x07 cr \r overwritten \x00 del \x7f "
    "nel \x85 csi \x9b31m sep \u2028\u2029 rtl \u202egnp.exe tab \t lone \ud800 \udcff end"
)
RAW = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def record(
    msg: object = "something happened",
    *args: object,
    fields: Any = None,
    name: str = "workerhost.events",
    level: int = logging.INFO,
    exc_info: Any = None,
) -> logging.LogRecord:
    extra = {"fields": fields} if fields is not None else None
    return logging.getLogger(name).makeRecord(name, level, __file__, 1, msg, args, exc_info, extra=extra)


def as_json(rec: logging.LogRecord) -> dict[str, Any]:
    """The JSON formatter's line for ``rec``: one line, strict JSON (no NaN), valid UTF-8, one object."""
    line = logs.JsonFormatter().format(rec)
    assert line.split("\n") == [line] and line.splitlines() == [line]
    assert not RAW.search(line), line
    line.encode("utf-8")  # strict: no lone surrogate reaches the stream

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    obj = json.loads(line, parse_constant=no_constants)
    assert isinstance(obj, dict)
    return obj


def as_console(rec: logging.LogRecord) -> str:
    """The console formatter's text for ``rec``; only a traceback may add lines, and no line has a control."""
    text = logs.ConsoleFormatter().format(rec)
    for line in text.split("\n"):
        assert not RAW.search(line), line
        assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in line)
    text.encode("utf-8")
    return text


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque \x1b[31m>"


def awkward_values() -> dict[str, Any]:
    cycle: list[Any] = []
    cycle.append(cycle)
    return {
        "obj": Opaque(),
        "unprintable": Unprintable(),
        "set": {1},
        "bytes": b"\xff\x1b",
        "cycle": cycle,
        "nan": math.nan,
        "inf": [math.inf],
        "tuple_keys": {(1, 2): "x"},
        "plain": "still here",
    }


# -- JSON ----------------------------------------------------------------------------------------------------------


def test_json_keeps_hostile_text_exactly_and_escapes_all_of_it() -> None:
    line = as_json(record("worker_log", fields={"event": "worker_log", "task_id": "t1", "line": HOSTILE}))
    assert line["line"] == HOSTILE  # escaped on the way out, the same string on the way back
    assert (line["event"], line["task_id"]) == ("worker_log", "t1")


def test_json_escapes_a_hostile_message_and_its_arguments() -> None:
    line = as_json(record("got %s from %r", HOSTILE, "\ud83d"))
    assert line["event"] == f"got {HOSTILE} from '\\ud83d'"
    assert line["logger"] == "workerhost.events"


def test_json_keeps_non_ascii_text_readable() -> None:
    text = logs.JsonFormatter().format(record("Příliš žluťoučký kůň 🐎"))
    assert "Příliš žluťoučký kůň 🐎" in text


def test_json_writes_a_value_it_cannot_serialise_as_its_repr() -> None:
    line = as_json(record("x", fields={"event": "x", **awkward_values()}))
    assert line["obj"] == "<Opaque \x1b[31m>"
    assert line["unprintable"] == "<unrepresentable Unprintable>"
    assert line["set"] == "{1}"
    assert line["bytes"] == repr(b"\xff\x1b")
    assert line["cycle"] == "[[...]]"
    assert (line["nan"], line["inf"]) == ("nan", "[inf]")
    assert line["tuple_keys"] == "{(1, 2): 'x'}"
    assert line["plain"] == "still here"


def test_json_takes_keys_that_are_not_strings_and_fields_that_are_not_a_dict() -> None:
    assert as_json(record("x", fields={"event": "x", 7: "seven", None: 1}))["7"] == "seven"
    line = as_json(record("x", fields=["not", "a", "dict"]))
    assert (line["event"], line["fields"]) == ("x", ["not", "a", "dict"])


def test_arguments_that_do_not_fit_the_format_do_not_lose_the_line() -> None:
    line = as_json(record("%d tasks from %s", "many"))
    assert line["event"] == "'%d tasks from %s' % ('many',) (TypeError)"
    text = as_console(record(Unprintable(), 1))
    assert "<unrepresentable Unprintable> % (1,)" in text


def raised(message: str) -> Any:
    try:
        raise ValueError(message)
    except ValueError:
        return sys.exc_info()


def test_json_puts_the_traceback_inside_the_object() -> None:
    line = as_json(record("it failed", level=logging.ERROR, exc_info=raised(f"bad\n{HOSTILE}")))
    assert line["event"] == "it failed" and line["level"] == "error"
    assert line["exception"].startswith("Traceback (most recent call last):\n")
    assert line["exception"].endswith(f"ValueError: bad\n{HOSTILE}")


def test_json_puts_stack_info_inside_the_object() -> None:
    rec = record("where am I")
    rec.stack_info = "Stack (most recent call last):\n  File x"
    assert as_json(rec)["stack"] == "Stack (most recent call last):\n  File x"


def test_a_uvicorn_record_is_one_json_object() -> None:
    rec = record("Invalid HTTP request received.", name="uvicorn.error", level=logging.WARNING)
    rec.color_message = "\x1b[33mInvalid\x1b[0m"  # uvicorn's own extra: not ours to write
    line = as_json(rec)
    assert line == {
        "ts": line["ts"], "level": "warning", "event": "Invalid HTTP request received.", "logger": "uvicorn.error"
    }  # fmt: skip
    access = record('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/\x1b[2J", "1.1", 200, name="uvicorn.access")
    assert as_json(access)["event"] == '127.0.0.1:5 - "GET /\x1b[2J HTTP/1.1" 200'


# -- console -------------------------------------------------------------------------------------------------------


def test_console_escapes_every_control_character_of_a_field() -> None:
    text = as_console(record("worker_log", fields={"event": "worker_log", "task_id": "t1", "line": HOSTILE}))
    assert "\n" not in text
    assert "line=title \\x1b]0;pwned\\x07 clear \\x1b[2J\\x1b[H bell \\x07 cr \\r overwritten \\x00 del \\x7f" in text
    assert "nel \\x85 csi \\x9b31m sep \\u2028\\u2029 rtl \\u202egnp.exe tab \\t lone \\ud800 \\udcff end" in text
    assert " task_id=t1" in text


def test_console_escapes_newlines_in_a_message_and_in_keys() -> None:
    text = as_console(record("first\nsecond\r\x1b[1Afake line", fields={"event": "e", "k\x1b\n": "v\nw"}))
    assert "\n" not in text
    assert "  first\\nsecond\\r\\x1b[1Afake line k\\x1b\\n=v\\nw" in text


def test_console_escapes_a_plain_message() -> None:
    text = as_console(record("got %s", HOSTILE, name="runner.host", level=logging.WARNING))
    assert text.split()[1:3] == ["warning", "got"]
    assert "\\x1b]0;pwned\\x07" in text and "\n" not in text


def test_console_renders_any_value() -> None:
    text = as_console(record("x", fields={"event": "x", **awkward_values()}))
    assert "obj=<Opaque \\x1b[31m>" in text
    assert "unprintable=<unrepresentable Unprintable>" in text
    assert "cycle=[[...]]" in text and "nan=nan" in text and "plain=still here" in text


def test_console_keeps_the_traceback_block_but_escapes_each_of_its_lines() -> None:
    text = as_console(record("it failed\nreally", level=logging.ERROR, exc_info=raised(f"bad\x1b[2J\n{HOSTILE}")))
    head, *block = text.split("\n")
    assert head.endswith("error   it failed\\nreally")
    assert block[0] == "Traceback (most recent call last):"
    assert block[-2:] == ["ValueError: bad\\x1b[2J", logs.escape(HOSTILE)]


def test_escape_leaves_ordinary_text_alone() -> None:
    text = "plain ASCII, Příliš žluťoučký kůň, 日本語, emoji 🐎, a backslash \\ and quotes \"'"
    assert logs.escape(text) == text


# -- configure: everything through one handler ------------------------------------------------------------------------


class Stderr:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Stderr]:
    """What goes to sys.stderr (not a terminal); the logging set-up and the hooks configure() changes, restored.

    (capsys, not a StringIO patched in: pytest puts its own sys.stderr back when the test starts.)
    """
    root = logging.getLogger()
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate)
             for logger in [root, *map(logging.getLogger, (*logs.ROUTED, "httpx", "workerhost"))]]  # fmt: skip
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.delenv("WORKERHOST_LOG_FORMAT", raising=False)
    yield Stderr(capsys)
    logging.captureWarnings(False)
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def json_lines(text: str) -> list[dict[str, Any]]:
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert text.splitlines() == lines
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(line, dict) for line in parsed)
    return parsed


def test_configure_sends_uvicorn_warnings_and_stray_exceptions_through_the_json_handler(
    stderr: Stderr,
) -> None:
    import uvicorn.config

    logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)  # uvicorn's own set-up, handlers and all
    logs.configure("json")
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    logging.getLogger("uvicorn").error("Exception in ASGI application\n", exc_info=raised("boom"))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # catch_warnings put back the original showwarning
        warnings.warn(f"deprecated {HOSTILE}", DeprecationWarning, stacklevel=1)
    thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
    thread.start()
    thread.join()

    class Leaky:
        def __del__(self) -> None:
            raise ValueError("in __del__ \x1b[2J")

    Leaky()

    lines = json_lines(stderr.getvalue())
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("uvicorn.error", "warning"), ("uvicorn", "error"), ("py.warnings", "warning"),
        ("workerhost", "error"), ("workerhost", "error"),
    ]  # fmt: skip
    assert lines[0]["event"] == "Invalid HTTP request received."
    assert lines[1]["exception"].endswith("ValueError: boom")
    assert HOSTILE in lines[2]["event"]
    assert lines[3]["event"] == "uncaught exception in thread doomed"
    assert lines[3]["exception"].endswith("ZeroDivisionError: division by zero")
    assert lines[4]["exception"].endswith("ValueError: in __del__ \x1b[2J")


def test_configure_takes_the_environment_over_the_config(stderr: Stderr, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERHOST_LOG_FORMAT", "Console")
    logs.configure("json")
    assert logs.structured()
    logging.getLogger("runner.host").warning("bell \x07")
    assert stderr.getvalue().endswith("bell \\x07\n")
    monkeypatch.setenv("WORKERHOST_LOG_FORMAT", "nonsense")  # not a terminal: auto is JSON
    logs.configure("console")
    logging.getLogger("runner.host").warning("bell \x07")
    assert json_lines(stderr.getvalue())[0]["event"] == "bell \x07"


# -- the command line: an error that ends serve is a log line too ----------------------------------------------------


@pytest.fixture
def serve_config(tmp_path: Path) -> Path:
    config = tmp_path / "serve.toml"
    config.write_text(
        '[host]\nid = "unit-logs"\nhttp = "127.0.0.1:1"\n'
        f'[task_manager]\npath = "{tmp_path / "q.db"}"\n'
        '[[workers]]\nname = "W"\nimage = "w:1"\ntask_types = ["W"]\n'
    )
    return config


def failing_serve(error: BaseException) -> Any:
    async def serve(config: Any, burst: bool = False) -> int:
        logging.getLogger("runner.serve").info("starting")
        raise error

    return serve


def test_an_unexpected_error_that_ends_serve_is_one_json_line(
    stderr: Stderr, monkeypatch: pytest.MonkeyPatch, serve_config: Path
) -> None:
    monkeypatch.setattr("runner.serve.serve", failing_serve(RuntimeError("boom \x1b[2J")))
    assert cli.main(["serve", "-c", str(serve_config)]) == 1
    starting, failed = json_lines(stderr.getvalue())
    assert starting["event"] == "starting"
    assert (failed["level"], failed["event"]) == ("critical", "workerhost serve stopped on an unexpected error")
    assert failed["exception"].startswith("Traceback") and failed["exception"].endswith("RuntimeError: boom \x1b[2J")


def test_an_unexpected_error_that_ends_serve_is_escaped_on_a_console(
    stderr: Stderr, monkeypatch: pytest.MonkeyPatch, serve_config: Path
) -> None:
    monkeypatch.setenv("WORKERHOST_LOG_FORMAT", "console")
    monkeypatch.setattr("runner.serve.serve", failing_serve(RuntimeError("boom \x1b[2J")))
    assert cli.main(["serve", "-c", str(serve_config)]) == 1
    text = stderr.getvalue()
    assert "\x1b" not in text
    assert "Traceback (most recent call last):" in text and "RuntimeError: boom \\x1b[2J" in text


def test_a_host_that_cannot_start_says_so_in_one_json_line(
    stderr: Stderr, monkeypatch: pytest.MonkeyPatch, serve_config: Path
) -> None:
    from runner.errors import WorkerhostError

    monkeypatch.setattr("runner.serve.serve", failing_serve(WorkerhostError("cannot serve the API on 127.0.0.1:1")))
    assert cli.main(["serve", "-c", str(serve_config)]) == 1
    assert json_lines(stderr.getvalue())[-1]["event"] == "workerhost: cannot serve the API on 127.0.0.1:1"


def test_a_config_mistake_in_serve_is_json_lines(stderr: Stderr, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[host]\nid = "x"\nconcurrency = "lots"\n[[workers]]\nname = "W"\n')
    assert cli.main(["serve", "-c", str(bad)]) == cli.EXIT_USAGE
    lines = json_lines(stderr.getvalue())
    assert lines and all(line["level"] == "error" for line in lines)
