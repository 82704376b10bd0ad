"""runner.doctor without an engine: what it says about runtimes and opt-ins."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from runner.config import OPT_INS, loads
from runner.doctor import check, missing_runtimes, warn_opt_ins
from runner.errors import EngineError

STRICT = '[[workers]]\nname = "Untrusted"\nimage = "i"\ntask_types = ["U"]\nsandbox = "strict"\n'
HOST_NETWORK = '[[workers]]\nname = "Net"\nimage = "i"\ntask_types = ["N"]\nnetwork = "host"\n' + (
    'allow = ["host-network"]\n'
)


class NoEngine:
    def engine_info(self) -> Any:
        raise EngineError("the Docker engine at unix:///nothing does not answer")


def test_a_strict_worker_without_gvisor_says_how_to_get_it() -> None:
    (line,) = missing_runtimes(loads(STRICT, environ={}), ["runc"])
    assert line.startswith("worker Untrusted: its sandbox is strict, which needs the runtime 'runsc', ")
    assert "(it has: runc)" in line and "make sandbox" in line
    assert missing_runtimes(loads(STRICT, environ={}), ["runc", "runsc"]) == []


def test_doctor_lists_opt_ins_even_when_the_engine_does_not_answer() -> None:
    report = check(loads(HOST_NETWORK, environ={}), NoEngine())  # type: ignore[arg-type]
    assert ("engine", "does not answer") in report.lines
    (line,) = [value for key, value in report.lines if key == "opt-in"]
    assert line == f'worker Net: opted in to "host-network" (network = "host"): {OPT_INS["host-network"]}'
    assert not any("opted in" in problem for problem in report.problems)  # a warning, not a problem
    assert "opt-in" in report.text()


def test_serve_logs_one_warning_per_worker_and_opt_in(caplog: pytest.LogCaptureFixture) -> None:
    text = HOST_NETWORK.replace('"host-network"]', '"host-network", "root"]\nuser = "root"') + STRICT
    logger = logging.getLogger("test.serve")
    with caplog.at_level(logging.WARNING, logger="test.serve"):
        warn_opt_ins(loads(text, environ={}), logger)
    assert [(r.levelno, r.getMessage().partition(": the worker")[0]) for r in caplog.records] == [
        (logging.WARNING, 'worker Net: opted in to "host-network" (network = "host")'),
        (logging.WARNING, 'worker Net: opted in to "root" (user = "root")'),
    ]
