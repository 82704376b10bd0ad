"""runner.protocol: the outcome table of README.md ("Worker protocol v1"), row by row, and the task envelope."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from runner.protocol import (
    ContainerEnd,
    EngineFault,
    Envelope,
    ErrorInfo,
    ExitCode,
    Outcome,
    Status,
    classify,
    format_deadline,
    parse_reply,
)

MiB = 1024**2


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _failure(kind: str = "ValueError", message: str = "bad input", retriable: bool | None = None) -> bytes:
    error: dict[str, object] = {"type": kind, "message": message}
    if retriable is not None:
        error["retriable"] = retriable
    return _json({"success": False, "error": error})


# -- completed -------------------------------------------------------------------


def test_exit_0_and_success_true_is_completed_with_result() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=_json({"success": True, "result": {"length": 5}}) + b"\n"))
    assert outcome.status is Status.COMPLETED
    assert outcome.ok
    assert outcome.result == {"length": 5}
    assert outcome.error is None
    assert outcome.retriable is False
    assert outcome.exit_code == 0


def test_completed_without_result_has_none() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=b'{"success": true}'))
    assert outcome.status is Status.COMPLETED
    assert outcome.result is None


@pytest.mark.parametrize("result", [[1, 2], "text", 0, False, None, {"nested": {"a": [1]}}])
def test_any_json_result_is_passed_through(result: object) -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=_json({"success": True, "result": result})))
    assert outcome.ok
    assert outcome.result == result


# -- failed, retriable -------------------------------------------------------------


def test_exit_1_is_failed_retriable() -> None:
    outcome = classify(ContainerEnd(exit_code=1))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is True
    assert not outcome.ok
    assert outcome.exit_code == 1
    assert outcome.error is not None
    assert outcome.error.type == "WorkerFailed"
    assert "exited with code 1" in outcome.error.message


def test_exit_1_takes_type_and_message_from_the_workers_json() -> None:
    outcome = classify(ContainerEnd(exit_code=1, stdout=_failure("ServiceBusy", "try later", retriable=True)))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is True
    assert outcome.error == ErrorInfo("ServiceBusy", "try later")


def test_exit_1_without_json_quotes_the_last_stderr_line() -> None:
    outcome = classify(ContainerEnd(exit_code=1, stderr_tail=b"starting\nconnection refused\n"))
    assert outcome.error is not None
    assert outcome.error.message == "exited with code 1: connection refused"


def test_exit_0_success_false_retriable_true_is_failed_retriable() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=_failure("Busy", "locked", retriable=True)))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is True
    assert outcome.error == ErrorInfo("Busy", "locked")


# -- failed, permanent ------------------------------------------------------------------


def test_exit_2_is_failed_permanent() -> None:
    outcome = classify(ContainerEnd(exit_code=2))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.exit_code == 2
    assert outcome.error is not None
    assert outcome.error.type == "WorkerFailed"
    assert "exited with code 2" in outcome.error.message


def test_exit_2_takes_type_and_message_from_the_workers_json() -> None:
    outcome = classify(ContainerEnd(exit_code=2, stdout=_failure("KeyError", "'text'", retriable=False)))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error == ErrorInfo("KeyError", "'text'")


def test_exit_2_wins_over_a_json_that_claims_retriable() -> None:
    outcome = classify(ContainerEnd(exit_code=2, stdout=_failure("X", "y", retriable=True)))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False


@pytest.mark.parametrize("retriable", [None, False, "yes", 1])
def test_exit_0_success_false_without_retriable_true_is_permanent(retriable: object) -> None:
    error: dict[str, object] = {"type": "ValueError", "message": "nope"}
    if retriable is not None:
        error["retriable"] = retriable
    outcome = classify(ContainerEnd(exit_code=0, stdout=_json({"success": False, "error": error})))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error == ErrorInfo("ValueError", "nope")


def test_success_false_with_a_string_error_or_none() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=_json({"success": False, "error": "disk full"})))
    assert outcome.error == ErrorInfo("WorkerError", "disk full")
    outcome = classify(ContainerEnd(exit_code=0, stdout=_json({"success": False})))
    assert outcome.status is Status.FAILED
    assert outcome.error is not None
    assert outcome.error.type == "WorkerError"
    assert outcome.error.message


def test_success_false_error_object_without_type() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=_json({"success": False, "error": {"message": "m"}})))
    assert outcome.error == ErrorInfo("WorkerError", "m")


# -- the exit code wins over the JSON -------------------------------------------------------------


def test_exit_1_wins_over_a_json_that_says_not_retriable_keeping_its_error() -> None:
    outcome = classify(ContainerEnd(exit_code=1, stdout=_failure("KeyError", "'text'", retriable=False)))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is True
    assert outcome.exit_code == 1
    assert outcome.error == ErrorInfo("KeyError", "'text'")


def test_exit_1_wins_over_a_json_that_says_success() -> None:
    outcome = classify(ContainerEnd(exit_code=1, stdout=_json({"success": True, "result": {"n": 1}})))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is True
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.type == "WorkerFailed"
    assert "exited with code 1" in outcome.error.message


def test_exit_3_wins_over_a_json_that_says_success() -> None:
    outcome = classify(ContainerEnd(exit_code=3, stdout=_json({"success": True, "result": {"n": 1}})))
    assert outcome.status is Status.TIMEOUT
    assert outcome.retriable is False
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.type == "Timeout"


# -- timeout ---------------------------------------------------------------------------------


def test_exit_3_is_timeout() -> None:
    outcome = classify(ContainerEnd(exit_code=3))
    assert outcome.status is Status.TIMEOUT
    assert outcome.retriable is False
    assert outcome.exit_code == 3
    assert outcome.error is not None
    assert outcome.error.type == "Timeout"


def test_exit_3_takes_the_workers_error() -> None:
    outcome = classify(ContainerEnd(exit_code=3, stdout=_failure("TaskTimeout", "gave up after 5s")))
    assert outcome.status is Status.TIMEOUT
    assert outcome.error == ErrorInfo("TaskTimeout", "gave up after 5s")


@pytest.mark.parametrize(("timeout", "shown"), [(30.0, "30s"), (0.5, "0.5s"), (120.0, "120s")])
def test_deadline_hit_is_timeout_naming_the_seconds(timeout: float, shown: str) -> None:
    outcome = classify(ContainerEnd(exit_code=137, deadline_hit=True, timeout=timeout))
    assert outcome.status is Status.TIMEOUT
    assert outcome.retriable is False
    assert outcome.error is not None
    assert outcome.error.type == "Timeout"
    assert shown in outcome.error.message
    assert "deadline" in outcome.error.message


def test_deadline_hit_wins_over_a_successful_stdout() -> None:
    outcome = classify(
        ContainerEnd(exit_code=0, stdout=_json({"success": True, "result": 1}), deadline_hit=True, timeout=10)
    )
    assert outcome.status is Status.TIMEOUT


# -- memory limit ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("memory", "shown"), [(128 * MiB, "128 MiB"), (1024**3, "1 GiB"), (1536 * 1024, "1.5 MiB")])
def test_oom_killed_is_permanent_naming_the_limit(memory: int, shown: str) -> None:
    outcome = classify(ContainerEnd(exit_code=137, oom_killed=True, memory=memory))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error is not None
    assert outcome.error.type == "MemoryLimitExceeded"
    assert shown in outcome.error.message
    assert "OOMKilled" in outcome.error.message


def test_oom_killed_beats_exit_code_and_stdout() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=_json({"success": True}), oom_killed=True, memory=64 * MiB))
    assert outcome.status is Status.FAILED
    assert outcome.error is not None
    assert outcome.error.type == "MemoryLimitExceeded"


def test_deadline_beats_oom() -> None:
    outcome = classify(ContainerEnd(exit_code=137, oom_killed=True, memory=64 * MiB, deadline_hit=True, timeout=5))
    assert outcome.status is Status.TIMEOUT
    assert outcome.error is not None
    assert "5s" in outcome.error.message


# -- invalid stdout ----------------------------------------------------------------------------------


def test_stdout_not_json_is_invalid_output_quoting_it() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=b"hello from print\n"))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error is not None
    assert outcome.error.type == "InvalidOutput"
    assert "hello from print" in outcome.error.message


def test_stdout_with_a_stray_line_before_the_json_is_invalid() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=b'debug\n{"success": true}\n'))
    assert outcome.error is not None
    assert outcome.error.type == "InvalidOutput"
    assert "debug" in outcome.error.message


def test_two_json_objects_are_invalid() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=b'{"success": true}\n{"success": true}\n'))
    assert outcome.error is not None
    assert outcome.error.type == "InvalidOutput"


@pytest.mark.parametrize("stdout", [b"", b"   \n", b"\n\n"])
def test_empty_stdout_is_invalid_output(stdout: bytes) -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=stdout))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error is not None
    assert outcome.error.type == "InvalidOutput"
    assert "nothing" in outcome.error.message


def test_json_array_is_invalid_output() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=b'[{"success": true}]'))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error is not None
    assert outcome.error.type == "InvalidOutput"
    assert "not an object" in outcome.error.message
    assert '[{"success": true}]' in outcome.error.message


@pytest.mark.parametrize("stdout", [b'{"result": 1}', b'{"success": "true"}', b'{"success": 1}', b'{"success": null}'])
def test_object_without_boolean_success_is_invalid_output(stdout: bytes) -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=stdout))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error is not None
    assert outcome.error.type == "InvalidOutput"
    assert '"success"' in outcome.error.message
    assert stdout.decode() in outcome.error.message


def test_invalid_output_quotes_only_the_first_bytes() -> None:
    stdout = b"A" * 150 + b"B" * 100 + b"C" * 5000
    outcome = classify(ContainerEnd(exit_code=0, stdout=stdout))
    assert outcome.error is not None
    assert outcome.error.type == "InvalidOutput"
    message = outcome.error.message
    assert "A" * 150 in message
    assert "C" not in message
    assert str(len(stdout)) in message
    assert len(message) < 400


def test_non_utf8_stdout_is_invalid_output() -> None:
    outcome = classify(ContainerEnd(exit_code=0, stdout=b"\xff\xfe\x00garbage"))
    assert outcome.error is not None
    assert outcome.error.type == "InvalidOutput"


def test_parse_reply() -> None:
    reply, problem = parse_reply(b'{"success": true, "result": 2}\n')
    assert reply == {"success": True, "result": 2}
    assert problem == ""
    reply, problem = parse_reply(b"nope")
    assert reply is None
    assert "nope" in problem


# -- output caps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stream", "cap", "shown"), [("stdout", 10 * MiB, "10 MiB"), ("stderr", 2048, "2 KiB")])
def test_cap_hit_is_permanent_output_limit_exceeded(stream: str, cap: int, shown: str) -> None:
    outcome = classify(ContainerEnd(exit_code=137, cap_hit=stream, cap_bytes=cap))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error is not None
    assert outcome.error.type == "OutputLimitExceeded"
    assert stream in outcome.error.message
    assert shown in outcome.error.message


def test_cap_hit_beats_a_successful_stdout_and_oom() -> None:
    outcome = classify(
        ContainerEnd(exit_code=0, stdout=_json({"success": True}), cap_hit="stderr", cap_bytes=100, oom_killed=True)
    )
    assert outcome.error is not None
    assert outcome.error.type == "OutputLimitExceeded"
    assert "100 bytes" in outcome.error.message


# -- engine errors: the kind decides ----------------------------------------------------------------


def _engine_end(fault: EngineFault, message: str = "worker W: cannot start its container: boom") -> ContainerEnd:
    return ContainerEnd(exit_code=None, engine_error=ErrorInfo("EngineError", message), engine_fault=fault)


def test_an_engine_that_does_not_answer_is_retriable() -> None:
    message = "worker W: cannot create a container of img: the Docker engine does not answer: no connection"
    outcome = classify(_engine_end(EngineFault.UNREACHABLE, message))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is True
    assert outcome.error == ErrorInfo("EngineError", message)


def test_an_engine_failing_with_a_5xx_is_retriable() -> None:
    outcome = classify(_engine_end(EngineFault.SERVER, "worker W: cannot start its container: driver failed"))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is True
    assert outcome.error == ErrorInfo("EngineError", "worker W: cannot start its container: driver failed")


def test_an_engine_refusing_the_container_with_a_4xx_is_permanent_and_says_what_it_refused() -> None:
    refused = 'worker W: cannot start its container: exec: "/no/such/binary": no such file or directory'
    outcome = classify(_engine_end(EngineFault.REFUSED, refused))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error == ErrorInfo("EngineError", refused)


def test_a_missing_image_is_permanent_and_says_how_to_build_it() -> None:
    message = "worker W: image workerhost/w:latest is not on the Docker engine"
    end = ContainerEnd(
        exit_code=None, engine_error=ErrorInfo("ImageMissing", message), engine_fault=EngineFault.IMAGE_MISSING
    )
    outcome = classify(end)
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error is not None
    assert outcome.error.type == "ImageMissing"
    assert outcome.error.message == f"{message}; build it with `make build-images`"


def test_an_image_missing_fault_is_named_so_whatever_the_error_type_given() -> None:
    outcome = classify(
        _engine_end(EngineFault.IMAGE_MISSING, "worker W: cannot create a container of x: No such image")
    )
    assert outcome.error is not None
    assert outcome.error.type == "ImageMissing"
    assert "make build-images" in outcome.error.message


def test_every_engine_fault_has_a_decision() -> None:
    decided = {fault: classify(_engine_end(fault)).retriable for fault in EngineFault}
    assert decided == {
        EngineFault.UNREACHABLE: True,
        EngineFault.SERVER: True,
        EngineFault.REFUSED: False,
        EngineFault.IMAGE_MISSING: False,
    }


def test_an_engine_error_without_its_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="engine_fault"):
        ContainerEnd(exit_code=None, engine_error=ErrorInfo("EngineError", "gone"))


def test_engine_error_beats_everything() -> None:
    error = ErrorInfo("EngineError", "engine went away")
    end = ContainerEnd(
        exit_code=0,
        stdout=_json({"success": True, "result": 1}),
        oom_killed=True,
        deadline_hit=True,
        cap_hit="stdout",
        cap_bytes=10,
        timeout=1,
        memory=MiB * 64,
        engine_error=error,
        engine_fault=EngineFault.UNREACHABLE,
    )
    outcome = classify(end)
    assert outcome.status is Status.FAILED
    assert outcome.retriable is True
    assert outcome.error == error


# -- crashes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "signal_name"), [(139, "SIGSEGV"), (134, "SIGABRT"), (137, "SIGKILL")])
def test_unknown_exit_code_is_permanent_naming_the_signal(code: int, signal_name: str) -> None:
    outcome = classify(ContainerEnd(exit_code=code, stderr_tail=b"Segmentation fault\n"))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.exit_code == code
    assert outcome.error is not None
    assert outcome.error.type == "WorkerCrashed"
    assert str(code) in outcome.error.message
    assert signal_name in outcome.error.message
    assert "Segmentation fault" in outcome.error.message


@pytest.mark.parametrize("code", [4, 42, 127, 255, None])
def test_other_exit_codes_are_permanent_crashes(code: int | None) -> None:
    outcome = classify(ContainerEnd(exit_code=code))
    assert outcome.status is Status.FAILED
    assert outcome.retriable is False
    assert outcome.error is not None
    assert outcome.error.type == "WorkerCrashed"
    assert (str(code) if code is not None else "unknown") in outcome.error.message


def test_exit_codes_enum_matches_the_contract() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3]
    assert [str(s) for s in Status] == ["completed", "failed", "timeout"]


def test_outcome_ok_only_when_completed() -> None:
    assert Outcome(Status.COMPLETED).ok
    assert not Outcome(Status.FAILED).ok
    assert not Outcome(Status.TIMEOUT).ok


# -- the envelope -------------------------------------------------------------------------------------


def _envelope(**overrides: object) -> Envelope:
    fields: dict[str, object] = {
        "id": "task-123",
        "type": "PrismQ.Example.Echo",
        "params": {"text": "hi"},
        "attempt": 2,
        "correlation_id": "c0ffee",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    fields.update(overrides)
    return Envelope(**fields)  # type: ignore[arg-type]


def test_envelope_to_json_has_the_contracts_fields() -> None:
    deadline = datetime(2026, 11, 25, 17, 0, 30, tzinfo=UTC)
    body = json.loads(_envelope(deadline=deadline).to_json())
    assert body == {
        "id": "task-123",
        "type": "PrismQ.Example.Echo",
        "params": {"text": "hi"},
        "attempt": 2,
        "correlation_id": "c0ffee",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "deadline": "2026-11-25T17:00:30.000Z",
    }


def test_envelope_to_json_is_compact_utf8_bytes() -> None:
    data = _envelope(params={"text": "žluťoučký kůň"}).to_json()
    assert isinstance(data, bytes)
    assert b"\n" not in data
    assert "žluťoučký kůň".encode() in data
    assert json.loads(data)["params"] == {"text": "žluťoučký kůň"}


def test_envelope_without_deadline_has_no_deadline_key() -> None:
    body = json.loads(_envelope().to_json())
    assert "deadline" not in body


def test_deadline_is_converted_to_utc_with_milliseconds() -> None:
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(2026, 11, 25, 19, 0, 30, 120_999, tzinfo=plus_two)
    assert format_deadline(moment) == "2026-11-25T17:00:30.120Z"
    body = json.loads(_envelope(deadline=moment).to_json())
    assert body["deadline"] == "2026-11-25T17:00:30.120Z"


def test_envelope_environment_carries_the_trace_context() -> None:
    env = _envelope().environment()
    assert env["TRACEPARENT"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert env["WORKERHOST_CORRELATION_ID"] == "c0ffee"
    assert env["WORKERHOST_TASK_ID"] == "task-123"
    assert all(isinstance(v, str) for v in env.values())


def test_exit_2_with_nothing_said_under_gvisor_names_the_pids_limit() -> None:
    strict = classify(ContainerEnd(exit_code=2, stderr_tail=b"working\n", strict=True))
    assert strict.error is not None
    assert strict.error.message == (
        'exited with code 2: working; under sandbox = "strict" this is also how gVisor dies when it hits pids_limit'
    )
    standard = classify(ContainerEnd(exit_code=2, stderr_tail=b"working\n"))
    assert standard.error is not None and "gVisor" not in standard.error.message
    spoken = classify(ContainerEnd(exit_code=2, stdout=b'{"success": false, "error": {"type": "Bad"}}', strict=True))
    assert spoken.error is not None and spoken.error.type == "Bad"
