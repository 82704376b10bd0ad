"""A container's streams through one attach socket: the frames, the caps, and the exchange.

The task goes in on stdin while stdout and stderr come back, in one
non-blocking loop; stdout is kept whole up to its cap, stderr is counted up
to its cap and split into log lines and the SDK's side channel.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from runner.sidechannel import Mark, Progress, StderrLines, WorkerSpan

STDOUT, STDERR = 1, 2
STDERR_TAIL = 64 * 1024
_CHUNK = 256 * 1024


class Demuxer:
    """Splits docker's multiplexed attach stream into (stream, bytes) frames.

    Each frame is an 8-byte header (stream id, 3 zero bytes, big-endian size)
    followed by that many bytes. ``feed`` takes whatever ``recv`` returned.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames: list[tuple[int, bytes]] = []
        offset = 0
        buffer = self._buffer
        while len(buffer) - offset >= 8:
            size = int.from_bytes(buffer[offset + 4 : offset + 8], "big")
            if len(buffer) - offset - 8 < size:
                break
            frames.append((buffer[offset], bytes(buffer[offset + 8 : offset + 8 + size])))
            offset += 8 + size
        del buffer[:offset]
        return frames


class Streams:
    """stdout kept whole up to its cap; stderr counted up to its cap, split into log lines
    (their tail kept, each passed on) and the SDK's side channel."""

    def __init__(
        self,
        max_stdout: int,
        max_stderr: int,
        tail: int = STDERR_TAIL,
        observe: Callable[[str | WorkerSpan | Progress], None] | None = None,
    ) -> None:
        self.stdout = bytearray()
        self.stderr_tail = bytearray()
        self.stderr_bytes = 0
        self.max_stdout = max_stdout
        self.max_stderr = max_stderr
        self.tail = tail
        self.cap_hit: str | None = None
        self.lines = StderrLines()
        self.observe = observe
        self.ready = False  # the worker said it reads tasks line by line
        self.done: int | None = None  # the exit code of a line-protocol task's "done" mark

    def add(self, stream: int, data: bytes) -> None:
        if self.cap_hit:
            return
        if stream == STDOUT:
            if len(self.stdout) + len(data) > self.max_stdout:
                self.cap_hit = "stdout"
                return
            self.stdout += data
        elif stream == STDERR:
            self.stderr_bytes += len(data)
            if self.stderr_bytes > self.max_stderr:
                self.cap_hit = "stderr"
                return
            for item in self.lines.feed(data):
                self._take(item)

    def finish(self) -> None:
        """The stream ended: take a last line that had no newline."""
        for item in self.lines.flush():
            self._take(item)

    def replied(self) -> bool:
        """A line-protocol task's reply is whole: its result line, and its "done" mark."""
        return self.done is not None and self.stdout.endswith(b"\n")

    def _take(self, item: str | WorkerSpan | Progress | Mark) -> None:
        if isinstance(item, Mark):
            if item.kind == "ready":
                self.ready = True
            else:
                self.done = item.exit_code
            return
        if isinstance(item, str):
            self.stderr_tail += item.encode("utf-8", "replace") + b"\n"
            if len(self.stderr_tail) > 2 * self.tail:
                del self.stderr_tail[: -self.tail]
            if not self.lines.relog():
                return
        if self.observe is not None:
            self.observe(item)

    def cap_bytes(self) -> int:
        return self.max_stdout if self.cap_hit == "stdout" else self.max_stderr


def exchange(
    sock: socket.socket,
    payload: bytes,
    streams: Streams,
    deadline: float,
    *,
    demux: Demuxer | None = None,
    half_close: bool = True,
    until: Callable[[], bool] | None = None,
) -> bool:
    """Write the task to stdin (then half-close, unless told not to) while reading the output frames.

    One non-blocking loop does both, so a large task and a large result cannot
    deadlock each other, and a worker that never reads stdin cannot block us.
    Returns when the output ends, a cap is passed or ``until()`` says the reply
    is whole (False), or when the deadline passes (True). ``demux`` carries
    frames split across calls on one connection (a reused container's).
    """
    sock.setblocking(False)
    demux = demux or Demuxer()
    pending = memoryview(payload)
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        writing = True
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            for _, mask in selector.select(remaining):
                if writing and mask & selectors.EVENT_WRITE:
                    pending, writing = _send_some(sock, pending, half_close)
                    if not writing:
                        selector.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(_CHUNK)
                    except (BlockingIOError, ssl.SSLWantReadError):
                        continue
                    except OSError:
                        return False  # the connection went away; inspect tells how the container ended
                    if not data:
                        return False
                    for stream, chunk in demux.feed(data):
                        streams.add(stream, chunk)
                    if streams.cap_hit or (until is not None and not writing and until()):
                        return False


def _send_some(sock: socket.socket, pending: memoryview, half_close: bool) -> tuple[memoryview, bool]:
    """Send what the socket takes now; half-close stdin once all is sent. Returns (rest, still writing)."""
    try:
        if pending:
            pending = pending[sock.send(pending[:_CHUNK]) :]
        if not pending:
            if half_close:
                sock.shutdown(socket.SHUT_WR)  # EOF on the worker's stdin
            return pending, False
    except (BlockingIOError, ssl.SSLWantWriteError):
        pass
    except OSError:
        return pending, False  # the worker exited or closed stdin; its output tells the rest
    return pending, True


def close(sock: socket.socket, attach: Any) -> None:
    """Close the attach connection for good (twice is harmless)."""
    # shutdown acts on the connection whatever other references to it remain
    # (docker-py keeps a buffered reader over the same socket).
    for step in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close, getattr(attach, "close", _noop)):
        with contextlib.suppress(OSError):
            step()


def _noop() -> None:
    pass
