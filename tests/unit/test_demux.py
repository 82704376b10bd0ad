"""runner.docker.streams: the Demuxer of docker attach frames and the output caps of Streams, without Docker."""

from __future__ import annotations

import struct

import pytest

from runner.docker.streams import STDERR, STDERR_TAIL, STDOUT, Demuxer, Streams


def frame(stream: int, payload: bytes) -> bytes:
    """One docker attach frame: stream byte, 3 zero bytes, 4-byte big-endian size, payload."""
    return bytes([stream, 0, 0, 0]) + struct.pack(">I", len(payload)) + payload


FRAMES = [
    (STDOUT, b'{"success": true'),
    (STDERR, b"log line 1\n"),
    (STDOUT, b', "result": 1}\n'),
    (STDERR, b""),
    (STDERR, bytes(range(256)) * 3),  # binary, and a size above 255 to exercise the big-endian length
    (STDOUT, b"x" * 70_000),  # a size above 65535
]
STREAM = b"".join(frame(s, p) for s, p in FRAMES)


def _merge(frames: list[tuple[int, bytes]]) -> dict[int, bytes]:
    out: dict[int, bytes] = {STDOUT: b"", STDERR: b""}
    for stream, data in frames:
        out[stream] += data
    return out


def test_frame_header_layout() -> None:
    assert frame(STDERR, b"abc") == b"\x02\x00\x00\x00\x00\x00\x00\x03abc"
    assert frame(STDOUT, b"x" * 258)[:8] == b"\x01\x00\x00\x00\x00\x00\x01\x02"


def test_whole_stream_at_once() -> None:
    demux = Demuxer()
    assert demux.feed(STREAM) == FRAMES


def test_byte_by_byte() -> None:
    demux = Demuxer()
    got: list[tuple[int, bytes]] = []
    for i in range(len(STREAM)):
        got.extend(demux.feed(STREAM[i : i + 1]))
    assert got == FRAMES


def test_nothing_until_a_frame_is_complete() -> None:
    demux = Demuxer()
    data = frame(STDOUT, b"hello")
    for i in range(len(data) - 1):
        assert demux.feed(data[i : i + 1]) == []
    assert demux.feed(data[-1:]) == [(STDOUT, b"hello")]
    assert demux.feed(b"") == []


@pytest.mark.parametrize("cut", [1, 3, 4, 7, 8, 9, 12])
def test_split_inside_and_around_a_header(cut: int) -> None:
    first = frame(STDOUT, b"abcd")
    second = frame(STDERR, b"efgh")
    data = first + second
    split = len(first) + cut - 4  # cuts around and inside the second header
    demux = Demuxer()
    got = demux.feed(data[:split]) + demux.feed(data[split:])
    assert got == [(STDOUT, b"abcd"), (STDERR, b"efgh")]


@pytest.mark.parametrize("chunk", [2, 5, 7, 8, 13, 1000, 65_536])
def test_arbitrary_chunk_sizes(chunk: int) -> None:
    demux = Demuxer()
    got: list[tuple[int, bytes]] = []
    for i in range(0, len(STREAM), chunk):
        got.extend(demux.feed(STREAM[i : i + chunk]))
    assert got == FRAMES
    assert _merge(got) == _merge(FRAMES)


def test_several_frames_and_a_partial_one_in_one_chunk() -> None:
    demux = Demuxer()
    data = frame(STDOUT, b"a") + frame(STDERR, b"b") + frame(STDOUT, b"ccc")
    assert demux.feed(data[:-2]) == [(STDOUT, b"a"), (STDERR, b"b")]
    assert demux.feed(data[-2:]) == [(STDOUT, b"ccc")]


def test_feed_accepts_bytes_and_returns_bytes() -> None:
    demux = Demuxer()
    ((stream, data),) = demux.feed(bytearray(frame(STDOUT, b"ok")))
    assert stream == STDOUT
    assert type(data) is bytes


# -- Streams ------------------------------------------------------------------------------


def test_stdout_kept_whole_up_to_its_cap() -> None:
    streams = Streams(max_stdout=10, max_stderr=100)
    streams.add(STDOUT, b"12345")
    streams.add(STDOUT, b"67890")
    assert bytes(streams.stdout) == b"1234567890"
    assert streams.cap_hit is None


def test_stdout_beyond_its_cap_sets_cap_hit() -> None:
    streams = Streams(max_stdout=10, max_stderr=100)
    streams.add(STDOUT, b"12345")
    streams.add(STDOUT, b"678901")
    assert streams.cap_hit == "stdout"
    assert len(streams.stdout) <= 10
    assert bytes(streams.stdout) == b"12345"
    assert streams.cap_bytes() == 10


def test_stdout_one_chunk_over_the_cap() -> None:
    streams = Streams(max_stdout=4, max_stderr=100)
    streams.add(STDOUT, b"12345")
    assert streams.cap_hit == "stdout"
    assert len(streams.stdout) <= 4


def test_stderr_does_not_count_against_stdout() -> None:
    streams = Streams(max_stdout=4, max_stderr=1000)
    streams.add(STDERR, b"x" * 500)
    streams.add(STDOUT, b"1234")
    assert streams.cap_hit is None
    assert bytes(streams.stdout) == b"1234"


def test_stdout_is_not_in_stderr_and_vice_versa() -> None:
    streams = Streams(max_stdout=100, max_stderr=100)
    streams.add(STDOUT, b"out")
    streams.add(STDERR, b"err\n")
    assert bytes(streams.stdout) == b"out"
    assert bytes(streams.stderr_tail) == b"err\n"
    assert streams.stderr_bytes == 4


def test_a_last_stderr_line_without_newline_is_kept_at_the_end() -> None:
    streams = Streams(max_stdout=100, max_stderr=100)
    streams.add(STDERR, b"first\nlast")
    assert bytes(streams.stderr_tail) == b"first\n"
    streams.finish()
    assert bytes(streams.stderr_tail) == b"first\nlast\n"


def test_side_channel_lines_are_not_logs_and_reach_the_observer() -> None:
    seen: list[object] = []
    streams = Streams(max_stdout=100, max_stderr=10_000, observe=seen.append)
    streams.add(STDERR, b'log one\n{"workerhost": "progress", "percent": 50}\nlog two\n')
    assert bytes(streams.stderr_tail) == b"log one\nlog two\n"
    assert [type(x).__name__ for x in seen] == ["str", "Progress", "str"]


def test_stderr_keeps_only_its_tail() -> None:
    tail = 16
    streams = Streams(max_stdout=100, max_stderr=10_000, tail=tail)
    everything = b""
    for i in range(200):
        chunk = f"line {i}\n".encode()
        everything += chunk
        streams.add(STDERR, chunk)
        # Bounded memory, whatever was written.
        assert len(streams.stderr_tail) <= 2 * tail + len(chunk)
        # What the runner reports (the last ``tail`` bytes) is exactly the end of stderr.
        assert bytes(streams.stderr_tail[-tail:]) == everything[-tail:]
    assert streams.stderr_bytes == len(everything)
    assert streams.cap_hit is None


def test_stderr_tail_with_the_default_size() -> None:
    streams = Streams(max_stdout=100, max_stderr=10 * STDERR_TAIL)
    data = b"".join(f"log line number {i}\n".encode() for i in range(3 * STDERR_TAIL // 16))
    for i in range(0, len(data), 4096):
        streams.add(STDERR, data[i : i + 4096])
    assert len(streams.stderr_tail) <= 2 * STDERR_TAIL + 4096
    assert bytes(streams.stderr_tail[-STDERR_TAIL:]) == data[-STDERR_TAIL:]
    assert streams.stderr_bytes == len(data)
    assert streams.cap_hit is None


def test_stderr_up_to_its_cap_is_fine() -> None:
    streams = Streams(max_stdout=100, max_stderr=50)
    streams.add(STDERR, b"x" * 50)
    assert streams.cap_hit is None


def test_stderr_past_its_cap_sets_cap_hit() -> None:
    streams = Streams(max_stdout=100, max_stderr=50)
    streams.add(STDERR, b"x" * 30)
    assert streams.cap_hit is None
    streams.add(STDERR, b"y" * 21)
    assert streams.cap_hit == "stderr"
    assert streams.stderr_bytes == 51
    assert streams.cap_bytes() == 50


def test_demuxed_frames_into_streams() -> None:
    demux = Demuxer()
    streams = Streams(max_stdout=1_000_000, max_stderr=1_000_000)
    for i in range(0, len(STREAM), 777):
        for stream, data in demux.feed(STREAM[i : i + 777]):
            streams.add(stream, data)
    streams.finish()
    expected = _merge(FRAMES)
    assert bytes(streams.stdout) == expected[STDOUT]
    # stderr is kept as log lines (text, each ending in a newline).
    lines = expected[STDERR].decode("utf-8", "replace").replace("\r", "").splitlines()
    assert bytes(streams.stderr_tail).decode().replace("\r", "").splitlines() == lines
    assert streams.cap_hit is None
