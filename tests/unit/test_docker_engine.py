"""runner.docker.engine: a driver's error becomes an EngineError of the right kind, saying what was being done."""

from __future__ import annotations

import docker.errors
import pytest
import requests
import requests.exceptions

from runner.docker.engine import engine_errors
from runner.errors import EngineError, ImageMissing
from runner.protocol import EngineFault

DOING = "worker W: cannot start its container"


def api_error(status: int, explanation: str) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError(f"{status} error", response=response, explanation=explanation)


def translated(exc: BaseException) -> EngineError:
    with pytest.raises(EngineError) as raised, engine_errors(DOING):
        raise exc
    return raised.value


@pytest.mark.parametrize(
    ("status", "explanation", "fault", "retriable"),
    [
        (400, 'exec: "/no/such/binary": stat /no/such/binary: no such file or directory', EngineFault.REFUSED, False),
        (404, "No such container: 0123abcd", EngineFault.REFUSED, False),
        (409, "Container 0123abcd is not running", EngineFault.REFUSED, False),
        (500, "failed to create shim task: context deadline exceeded", EngineFault.SERVER, True),
        (503, "the daemon is shutting down", EngineFault.SERVER, True),
    ],
)
def test_an_api_error_is_classified_by_its_status(
    status: int, explanation: str, fault: EngineFault, retriable: bool
) -> None:
    error = translated(api_error(status, explanation))

    assert error.fault is fault
    assert error.retriable is retriable
    assert str(error) == f"{DOING}: {explanation}"


def test_a_missing_image_is_its_own_kind() -> None:
    response = requests.Response()
    response.status_code = 404
    exc = docker.errors.ImageNotFound("404", response=response, explanation="No such image: workerhost/x:latest")

    error = translated(exc)

    assert error.fault is EngineFault.IMAGE_MISSING
    assert not error.retriable
    assert str(error) == f"{DOING}: No such image: workerhost/x:latest"


def test_no_connection_is_unreachable_and_says_so() -> None:
    error = translated(requests.exceptions.ConnectionError("[Errno 2] No such file or directory"))

    assert error.fault is EngineFault.UNREACHABLE
    assert error.retriable
    assert str(error) == f"{DOING}: the Docker engine does not answer: no connection"


def test_no_answer_in_time_is_unreachable_and_says_so() -> None:
    error = translated(requests.exceptions.ReadTimeout("Read timed out. (read timeout=60)"))

    assert error.fault is EngineFault.UNREACHABLE
    assert error.retriable
    assert str(error).startswith(f"{DOING}: the Docker engine does not answer in time")
    assert "read timeout=60" in str(error)


def test_the_drivers_exception_is_not_chained() -> None:
    error = translated(api_error(500, "boom"))

    assert error.__cause__ is None
    assert error.__suppress_context__


def test_an_engine_error_raised_inside_passes_through_as_it_is() -> None:
    missing = ImageMissing("workerhost/x:latest", "W")

    assert translated(missing) is missing
    assert missing.fault is EngineFault.IMAGE_MISSING


def test_other_exceptions_are_not_the_engines() -> None:
    with pytest.raises(KeyError), engine_errors(DOING):
        raise KeyError("Id")


def test_an_engine_error_made_without_a_kind_is_unreachable_and_retriable() -> None:
    error = EngineError("the Docker engine at unix:///x does not answer")

    assert error.fault is EngineFault.UNREACHABLE
    assert error.retriable
