"""`workerhost serve` as a subprocess, the way a user runs it, for integration and acceptance tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def executable() -> str:
    beside = Path(sys.executable).parent / "workerhost"
    found = str(beside) if beside.exists() else shutil.which("workerhost")
    if not found:
        pytest.fail("the workerhost console script is not installed (pip install -e .)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Serve:
    """One ``workerhost serve`` process, its log, and a client for its API."""

    def __init__(
        self, config: Path, port: int, log: Path, env: dict[str, str] | None = None, wrap: list[str] | None = None
    ) -> None:
        """``wrap`` runs the command through another (``unshare``, say): ``[*wrap, workerhost, "serve", ...]``."""
        self.wrap = wrap or []
        self.config = config
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def start(self, wait: float = 30.0) -> Serve:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.wrap, executable(), "serve", "-c", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env,
            )  # fmt: skip
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if self.http.get("/health").status_code in (200, 503):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"serve did not answer within {wait}s:\n{self.log.read_text()}")

    def submit(self, task_type: str, **params: Any) -> dict[str, Any]:
        response = self.http.post("/tasks", json={"type": task_type, "params": params})
        assert response.status_code == 201, response.text
        task: dict[str, Any] = response.json()
        return task

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.http.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        return task

    def wait_for(self, task_id: str, statuses: tuple[str, ...], timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            task = self.task(task_id)
            if task["status"] in statuses:
                return task
            if time.monotonic() > deadline:
                pytest.fail(f"task {task_id} still {task['status']} after {timeout}s:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop it whatever state it is in (the test's teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()


def config_text(
    host_id: str, port: int, db: Path, image: str, *, concurrency: int = 4, grace: str = "30s",
    lease: str = "30s", workers: str = "", extra_host: str = "",
) -> str:  # fmt: skip
    """A serve config with the test worker, ``extra_host`` lines added to [host], and ``workers``
    appended (more [[workers]] tables)."""
    return f"""
[host]
id = "{host_id}"
concurrency = {concurrency}
http = "127.0.0.1:{port}"
grace = "{grace}"
poll_max = "200ms"
reap_interval = "1s"
{extra_host}
[task_manager]
type = "embedded"
path = "{db}"
lease = "{lease}"

[[workers]]
name = "Test.Behave"
image = "{image}"
task_types = ["Test.Behave"]
timeout = "60s"
max_retries = 2
backoff = "100ms"
concurrency = 4
memory = "64m"
{workers}
"""
