"""``workerhost doctor``: what this machine's engine offers, and whether the config can run on it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from runner.attempts import new_task
from runner.config import GVISOR, Config, WorkerConfig, opt_in_warnings
from runner.docker import DockerRunner
from runner.errors import EngineError, WorkerhostError
from runner.protocol import Status, classify

FIX_SANDBOX = "run `make sandbox` (scripts/engine.sh --sandbox) to install gVisor and register it"


@dataclass
class Report:
    """Lines for a person, and the problems that stop the config from running."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, key: str, value: str) -> None:
        self.lines.append((key, value))

    def text(self) -> str:
        width = max((len(k) for k, _ in self.lines), default=0)
        body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in self.lines)
        if self.problems:
            body += "\n\nproblems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        return body


def missing_runtimes(config: Config, runtimes: list[str]) -> list[str]:
    """One problem for each worker whose runtime the engine does not have."""
    problems = []
    for worker in config.workers:
        if worker.runtime and worker.runtime not in runtimes:
            why = "its sandbox is strict, which" if worker.strict else "it"
            fix = (
                FIX_SANDBOX if worker.runtime == GVISOR else f"register the runtime {worker.runtime!r} with the engine"
            )
            problems.append(
                f"worker {worker.name}: {why} needs the runtime {worker.runtime!r}, which the engine does not "
                f"have (it has: {', '.join(runtimes) or 'none'}); {fix}"
            )
    return problems


def check(config: Config, runner: DockerRunner, probe_image: str = "workerhost/python:3.11") -> Report:
    """Look at the engine and the config's needs; try a strict container when gVisor is there."""
    report = Report()
    try:
        info = runner.engine_info()
    except EngineError as exc:
        report.add("engine", "does not answer")
        report.problems.append(str(exc))
        _add_opt_ins(report, config)
        return report
    report.add("engine", f"Docker {info['version']} (API {info['api_version']}), {info['os']}")
    report.add("kernel", info["kernel"])
    report.add("cgroups", f"v{info['cgroup_version']} ({info['cgroup_driver']} driver)")
    runtimes = info["runtimes"]
    report.add("runtimes", ", ".join(f"{r} (default)" if r == info["default_runtime"] else r for r in runtimes))
    report.add("strict workers", _strict_verdict(runner, runtimes, probe_image))
    report.problems.extend(missing_runtimes(config, runtimes))
    for worker in config.workers:
        report.add(f"worker {worker.name}", _worker_line(runner, worker, report))
    _add_opt_ins(report, config)
    return report


def _add_opt_ins(report: Report, config: Config) -> None:
    # A warning, not a problem: the config opted in on purpose, and can run.
    for line in opt_in_warnings(config):
        report.add("opt-in", line)


def _strict_verdict(runner: DockerRunner, runtimes: list[str], image: str) -> str:
    if GVISOR not in runtimes:
        return f"no: gVisor ({GVISOR}) is not registered with the engine; {FIX_SANDBOX}"
    try:
        if not runner.image_present(image):
            return f"gVisor is registered (not tried: {image} is missing; make build-images)"
    except EngineError as exc:
        return f"gVisor is registered (not tried: {exc})"
    worker = WorkerConfig(
        name="doctor", image=image, task_types=["doctor"], sandbox="strict", timeout=30,
        command=["/bin/sh", "-c", 'cat >/dev/null; echo \'{"success": true, "result": {}}\''],
    )  # fmt: skip
    began = time.monotonic()
    result = runner.run(worker, new_task("doctor", {}))
    outcome = classify(result.end)
    if outcome.status is not Status.COMPLETED:
        error = outcome.error.message if outcome.error else outcome.status
        return f"no: a container under gVisor did not run: {error}"
    return f"yes: a container under gVisor ran in {time.monotonic() - began:.2f}s"


def _worker_line(runner: DockerRunner, worker: WorkerConfig, report: Report) -> str:
    try:
        present = runner.image_present(worker.image)
    except EngineError:
        present = False
    if not present:
        report.problems.append(
            f"worker {worker.name}: image {worker.image} is missing; build it with `make build-images`"
        )
    runtime = worker.runtime or "default"
    return f"{worker.sandbox} sandbox, runtime {runtime}, image {'present' if present else 'MISSING'}"


def warn_opt_ins(config: Config, logger: logging.Logger) -> None:
    """For ``serve``: one warning per worker and opt-in (``allow``), saying what it gives away."""
    for line in opt_in_warnings(config):
        logger.warning("%s", line)


def require_runtimes(config: Config, runner: DockerRunner) -> None:
    """For ``serve``: refuse to start with a worker whose runtime the engine lacks (if the engine answers)."""
    try:
        runtimes = runner.engine_info()["runtimes"]
    except EngineError:
        return  # checked again when tasks run; the host waits for its engine
    problems = missing_runtimes(config, runtimes)
    if problems:
        raise WorkerhostError("cannot serve this config:\n  " + "\n  ".join(problems))
