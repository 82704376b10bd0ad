"""The host's lifecycle with real containers: siblings sharing a host id, what dead processes leave,
a failed start-up check, an attempt the host itself fails, and max_attempts kept with the task."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runner.config import loads
from runner.docker import LABEL_TASK
from runner.errors import WorkerhostError
from runner.serve import serve as serve_in_process
from runner.sources.embedded import EmbeddedQueue
from tests.serving import Serve, config_text, free_port

pytestmark = pytest.mark.docker

ServeFactory = Callable[..., Serve]


@pytest.fixture
def serve(tmp_path: Path, behave_image: str, host_id: str) -> Iterator[ServeFactory]:
    """``workerhost serve`` processes on one database, all with this test's host id."""
    started: list[Serve] = []
    db = tmp_path / "queue.db"

    def start(*, hostname: str | None = None, **options: Any) -> Serve:
        port = free_port()
        config = tmp_path / f"serve-{port}.toml"
        config.write_text(config_text(host_id, port, db, behave_image, **options))
        # Another hostname in the same pid namespace: what two containers of one compose service look like
        # to each other (neither can see the other's processes by its token's hostname).
        wrap = ["unshare", "--uts", "sh", "-c", f'hostname {hostname} && exec "$0" "$@"'] if hostname else None
        process = Serve(config, port, tmp_path / f"serve-{port}.log", wrap=wrap).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def containers_of(client: Any, task_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.containers(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})
    return found


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout}s waiting for {what}" + (f":\n{log.read_text()[-4000:]}" if log else "")
            )
        time.sleep(0.1)


class CreateWatcher:
    """Counts the containers created per task on the engine (docker events), while it runs."""

    def __init__(self, client: Any) -> None:
        self.created: dict[str, int] = {}
        self._stream = client.events(filters={"event": "create", "label": LABEL_TASK}, decode=True)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            for event in self._stream:
                task_id = event["Actor"]["Attributes"].get(LABEL_TASK, "")
                self.created[task_id] = self.created.get(task_id, 0) + 1
        except Exception:  # the stream was closed: the watch is over
            return

    def close(self) -> None:
        self._stream.close()


def test_a_sibling_on_another_hostname_leaves_a_live_hosts_containers_and_takes_over_a_dead_ones(
    serve: ServeFactory, docker_client: Any
) -> None:
    watcher = CreateWatcher(docker_client)
    try:
        a = serve(lease="3s")
        # Two tasks on A: one that finishes while both hosts run, one that A is killed in the middle of.
        done_early = a.submit("Test.Behave", do="sleep", seconds=4)["id"]
        orphaned = a.submit("Test.Behave", do="sleep", seconds=60, again=0.5)["id"]
        for task_id in (done_early, orphaned):
            a.wait_for(task_id, ("running",))
            wait_until(lambda t=task_id: bool(containers_of(docker_client, t)), 30, f"a container of {task_id}")

        b = serve(lease="3s", hostname="sibling-b")  # same host id, same database, another hostname
        # B's start (and its janitor every second) sees A's containers: A is alive, so they stay.
        finished = b.wait_for(done_early, ("completed", "failed", "dead"), timeout=60)
        assert finished["status"] == "completed"
        assert finished["attempts"] == 1, "the task was handed back while its host was alive, and ran twice"
        assert watcher.created.get(done_early) == 1
        assert b.task(orphaned)["status"] == "running"
        [left] = containers_of(docker_client, orphaned)
        assert left["State"] == "running"

        assert a.proc is not None
        a.proc.kill()  # SIGKILL: no drain, no report; its heartbeat stops
        a.wait_exit(10)
        # B cannot see A's process. A's heartbeat and its task's lease both lapse 3 s after A's last
        # renewal: B may claim the task first (its lease expired) and run it (0.5 s the second time);
        # B's janitor (every second) removes A's container once the heartbeat has lapsed.
        done = b.wait_for(orphaned, ("completed", "failed", "dead"), timeout=60)
        assert done["status"] == "completed"
        assert done["attempts"] == 2  # the attempt A was killed in counts
        wait_until(
            lambda: left["Id"] not in {c["Id"] for c in containers_of(docker_client, orphaned)}, 15,
            "B's janitor to remove the container A left", b.log,
        )  # fmt: skip
        assert f"removed a container of task {orphaned}" in b.log.read_text()
    finally:
        watcher.close()


def test_a_task_claimed_by_a_process_killed_before_its_container_existed_is_handed_back_at_once(
    serve: ServeFactory, tmp_path: Path, host_id: str
) -> None:
    # What a `kill -9` between a claim and its container leaves: a running task under a long lease,
    # held by a process of this machine that is gone, registered with this host id, and no container.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = f"{socket.gethostname()}:{gone.pid}:dead0001"
    queue = EmbeddedQueue(tmp_path / "queue.db", owner=dead, lease=600)
    task, _ = queue.submit("Test.Behave", {"do": "ok"}, max_attempts=3)
    assert queue.claim_now(["Test.Behave"]) is not None
    asyncio.run(queue.heartbeat(dead, host_id))
    asyncio.run(queue.close())

    host = serve()  # the next start, long before the 600 s lease would expire

    done = host.wait_for(task["id"], ("completed", "failed", "dead"), timeout=30)
    assert done["status"] == "completed"
    assert done["attempts"] == 2
    assert "handing it back" in host.log.read_text()


def test_a_failed_start_up_check_leaves_nothing_open(tmp_path: Path, behave_image: str) -> None:
    port = free_port()
    config = loads(
        config_text("pytest-startup", port, tmp_path / "q.db", behave_image)
        + f'''
[[workers]]
name = "Test.Odd"
image = "{behave_image}"
task_types = ["Test.Odd"]
runtime = "no-such-runtime"
''',
        environ={},
    )
    fds_before = set(os.listdir("/proc/self/fd"))
    threads_before = {t.ident for t in threading.enumerate()}

    with pytest.raises(WorkerhostError, match="no-such-runtime") as refused:
        asyncio.run(serve_in_process(config))

    leaked = set(os.listdir("/proc/self/fd")) - fds_before
    assert not leaked, f"left open: {[os.readlink(f'/proc/self/fd/{fd}') for fd in leaked if _exists(fd)]}"
    assert {t.ident for t in threading.enumerate() if t.is_alive()} <= threads_before
    with socket.socket() as again:  # the API's port is free again
        again.bind(("127.0.0.1", port))
    assert refused.value is not None


def _exists(fd: str) -> bool:
    return os.path.exists(f"/proc/self/fd/{fd}")


def test_a_stored_task_no_worker_could_be_given_ends_at_once_with_its_reason(
    serve: ServeFactory, tmp_path: Path
) -> None:
    # A lone surrogate in params (a row an older version stored, before submit refused them) cannot
    # be written to a container's stdin: the claim fails it for good, instead of a task that breaks
    # at every attempt until its lease gives up on it.
    queue = EmbeddedQueue(tmp_path / "queue.db", owner="pytest:0:reader")
    try:
        task_id = queue.submit("Test.Behave", {"a": "placeholder"}, max_attempts=3)[0]["id"]
        with sqlite3.connect(tmp_path / "queue.db") as db:
            db.execute("UPDATE tasks SET params = ? WHERE id = ?", ('{"a": "\\ud800"}', task_id))
        host = serve()
        fine = host.submit("Test.Behave", do="ok")["id"]
        wait_until(
            lambda: (queue.get(task_id) or {}).get("status") in ("failed", "dead", "completed"), 30,
            "the task's end", host.log,
        )  # fmt: skip
        failed = queue.get(task_id)
    finally:
        asyncio.run(queue.close())
    assert failed is not None and failed["status"] == "failed"
    assert failed["attempts"] == 1  # not retried, not left to a lease
    assert failed["error"]["type"] == "InvalidParams"
    assert "lone surrogate" in failed["error"]["message"]
    assert host.wait_for(fine, ("completed",))["status"] == "completed"
    shown = host.http.get(f"/tasks/{task_id}")
    assert shown.status_code == 200 and shown.json()["unreadable"]["params"].startswith("params.a: a lone surrogate")
    families = {f.name: f for f in text_string_to_metric_families(host.http.get("/metrics").text)}
    in_flight = [s.value for s in families["workerhost_tasks_in_flight"].samples]
    assert all(v == 0 for v in in_flight)


def test_a_task_keeps_the_max_attempts_it_was_submitted_with(
    serve: ServeFactory, tmp_path: Path, behave_image: str
) -> None:
    # Submitted when its worker allowed 2 retries; the host now runs with a config that allows none.
    queue = EmbeddedQueue(tmp_path / "queue.db", owner="pytest:0:submitter")
    task, _ = queue.submit("Test.Once", {"do": "exit", "code": 1}, max_attempts=3)
    asyncio.run(queue.close())
    once = f'''
[[workers]]
name = "Test.Once"
image = "{behave_image}"
task_types = ["Test.Once"]
max_retries = 0
backoff = "100ms"
memory = "64m"
'''
    host = serve(workers=once)

    dead = host.wait_for(task["id"], ("dead", "failed", "completed"), timeout=60)
    assert (dead["status"], dead["attempts"], dead["max_attempts"]) == ("dead", 3, 3)
