"""``workerhost run`` starts fast: it imports what one task needs, not serve's API, sources or exporters.

Each test runs the command in a subprocess through ``runner.cli.main`` (as the
console script does) and reads which modules it had loaded when it ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, new_host_id
from tests.otlp_receiver import OtlpReceiver

# What only serve, the client commands or an OTLP export need.
NOT_FOR_RUN = (
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",
    "prometheus_client",
    "opentelemetry",
    "sqlite3",
    "redis",
    "aio_pika",
    "aiormq",
    "runner.api",
    "runner.auth",
    "runner.client",
    "runner.host",
    "runner.serve",
    "runner.telemetry.metrics",
    "runner.telemetry.tracing",
)
# The source port (runner.sources) is what ``run``'s one-task source implements; the adapters are not.
SOURCE_ADAPTERS = "runner.sources."

# The console script's way in (argv from the command line), then the modules it loaded, into a file.
LAUNCH = """
import json, sys
modules_file = sys.argv.pop(1)
from runner.cli import main
try:
    code = main()
finally:
    with open(modules_file, "w") as f:
        json.dump(sorted(sys.modules), f)
raise SystemExit(code)
"""


def run(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    modules_file = tmp_path / "modules.json"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environment.update({"WORKERHOST_HOST_ID": new_host_id(), **(env or {})})
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(modules_file), "run", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=120,
    )
    return done, set(json.loads(modules_file.read_text()))


def unwanted(modules: set[str]) -> list[str]:
    return sorted(
        m
        for m in modules
        if m.startswith(SOURCE_ADAPTERS) or any(m == name or m.startswith(name + ".") for name in NOT_FOR_RUN)
    )


def test_run_imports_no_api_source_or_exporter_even_when_the_engine_is_away(tmp_path: Path) -> None:
    done, modules = run(
        tmp_path, "PrismQ.Example.Echo", '{"text": "hi"}', env={"DOCKER_HOST": f"unix://{tmp_path}/nothing.sock"}
    )

    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["error"]["type"] == "EngineError"
    assert unwanted(modules) == []


@pytest.mark.docker
def test_a_whole_run_imports_no_api_source_or_exporter(tmp_path: Path, example_images: None) -> None:
    done, modules = run(tmp_path, "PrismQ.Example.Echo", '{"text": "hi"}')

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["text"] == "HI"
    assert unwanted(modules) == []
    assert "runner.docker" in modules  # the check sees the run's own modules


@pytest.mark.docker
def test_run_still_exports_its_trace_when_an_endpoint_is_set(tmp_path: Path, example_images: None) -> None:
    with OtlpReceiver() as receiver:
        done, modules = run(
            tmp_path, "PrismQ.Example.Echo", '{"text": "hi"}', env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        )
        assert done.returncode == 0, done.stderr
        spans = receiver.of_task(json.loads(done.stdout)["id"])

    assert "runner.telemetry.tracing" in modules
    assert {"attempt 1", "container.start"} <= {span.name for span in spans}
