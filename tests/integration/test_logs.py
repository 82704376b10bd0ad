"""`serve`'s stderr under hostile input: uvicorn's own lines, a bad request, a worker writing terminal
controls and invalid UTF-8. In JSON every line is one object; on a console nothing reaches the
terminal raw."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.serving import Serve, config_text, free_port

pytestmark = pytest.mark.docker

# Set the window title, clear the screen, home the cursor, ring the bell, return and overwrite,
# C1 controls in UTF-8 (NEL, CSI), a U+2028 line separator, invalid UTF-8, a UTF-8-encoded surrogate.
HOSTILE = (
    b"title \x1b]0;pwned\x07 clear \x1b[2J\x1b[H bell \x07 cr \r overwritten"
    b" nel \xc2\x85 csi \xc2\x9b31m sep \xe2\x80\xa8 bad \xff\xfe surrogate \xed\xa0\x80 end\n"
)
RAW_CONTROLS = (b"\x1b", b"\x07", b"\r", b"\xc2\x85", b"\xc2\x9b", b"\xe2\x80\xa8")


def bad_request(port: int) -> bytes:
    """Not HTTP at all: uvicorn logs "Invalid HTTP request received." itself, and answers 400."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x1b[2J NOT HTTP \x07\r\n\r\n")
        return sock.recv(4096)


def serve_hostile(tmp_path: Path, host_id: str, image: str, log_format: str) -> bytes:
    """Run one hostile task and a bad request through a host, stop it with SIGTERM; its log, as bytes."""
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(config_text(host_id, port, tmp_path / "q.db", image))
    host = Serve(config, port, tmp_path / "serve.log", {"WORKERHOST_LOG_FORMAT": log_format})
    try:
        host.start()
        assert bad_request(port).startswith(b"HTTP/1.1 400")
        task = host.submit("Test.Behave", do="stderr", hex=HOSTILE.hex())
        done = host.wait_for(task["id"], ("completed", "failed", "dead"))
        assert done["status"] == "completed", done
        host.signal(signal.SIGTERM)
        assert host.wait_exit(60) == 0
    finally:
        host.stop()
    return host.log.read_bytes()


def test_every_line_of_a_json_log_is_one_object(tmp_path: Path, host_id: str, behave_image: str) -> None:
    log = serve_hostile(tmp_path, host_id, behave_image, "json")

    for raw in RAW_CONTROLS:
        assert raw not in log
    text = log.decode("utf-8")  # strict: nothing invalid was written
    assert text.endswith("\n")
    lines: list[dict[str, Any]] = []
    for raw_line in text[:-1].split("\n"):
        line = json.loads(raw_line)
        assert isinstance(line, dict), raw_line
        lines.append(line)
    assert text.splitlines() == text[:-1].split("\n")  # no other character a line splitter cuts at

    assert any(line.get("logger") == "uvicorn.error" and line["event"] == "Invalid HTTP request received."
               for line in lines), text  # fmt: skip
    relogged = [line["line"] for line in lines if line["event"] == "worker_log" and "pwned" in line.get("line", "")]
    assert relogged == [
        "title \x1b]0;pwned\x07 clear \x1b[2J\x1b[H bell \x07 cr \r overwritten"
        " nel \x85 csi \x9b31m sep \u2028 bad \ufffd\ufffd surrogate \ufffd\ufffd\ufffd end"
    ]  # the worker's line, whole: escaped in the file, not changed


def test_a_console_log_has_no_raw_control_characters(tmp_path: Path, host_id: str, behave_image: str) -> None:
    log = serve_hostile(tmp_path, host_id, behave_image, "console")

    for raw in RAW_CONTROLS:
        assert raw not in log
    text = log.decode("utf-8")
    assert "Invalid HTTP request received." in text
    assert "line=title \\x1b]0;pwned\\x07 clear \\x1b[2J\\x1b[H bell \\x07 cr \\r overwritten" in text
    assert " nel \\x85 csi \\x9b31m sep \\u2028 bad" in text
