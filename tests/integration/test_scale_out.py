"""Many hosts, one broker: three ``workerhost serve`` processes on one Redis, real containers, one host
killed with SIGKILL mid-run and started again."""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.docker import LABEL_HOST, LABEL_TASK
from runner.sources.redis import RedisQueue
from tests.conftest import new_host_id
from tests.integration.test_redis_source import start_serve, url_of
from tests.services import REDIS_IMAGE, Service, build_service, service
from tests.serving import Serve, free_port

pytestmark = pytest.mark.docker

TASKS = 300


@pytest.fixture
def broker(docker_client: Any) -> Iterator[Service]:
    image = build_service(REDIS_IMAGE, "redis")
    with service(image, 6379, {LABEL_HOST: new_host_id()}, host_port=free_port()) as started:
        yield started


def test_three_hosts_one_killed_mid_run_every_task_completes_once_at_a_time(
    tmp_path: Path, broker: Service, behave_image: str, docker_client: Any
) -> None:
    url = url_of(broker)
    host_ids = [new_host_id() for _ in range(3)]
    # Watched live: the engine keeps only its last ~1000 events, fewer than this run makes.
    events = docker_client.events(
        filters={"type": "container", "event": ["start", "die"], "label": LABEL_TASK}, decode=True
    )
    seen: list[dict[str, Any]] = []
    watcher = threading.Thread(target=lambda: seen.extend(events), daemon=True)
    watcher.start()
    started: list[Serve] = []
    try:
        for host_id in host_ids:
            started.append(start_serve(tmp_path, url, behave_image, host_id=host_id, lease="10s"))
        rng = random.Random(11)
        ids = [
            started[i % 3].submit("Test.Behave", do="sleep", seconds=round(rng.uniform(0.2, 1.0), 2))["id"]
            for i in range(TASKS)
        ]
        counts = RedisQueue(url, owner="test:0:0").counts
        _wait(lambda: counts()["completed"] >= TASKS // 5, "a fifth of the tasks to complete")
        victim = started[2]
        assert counts()["running"] > 0
        victim.signal(signal.SIGKILL)  # mid-run: its containers and its claims stay behind
        victim.wait_exit(10)
        again = Serve(victim.config, victim.port, victim.log).start()  # the same host id and config
        started.append(again)
        _wait(lambda: counts()["completed"] == TASKS, f"all {TASKS} tasks to complete", timeout=150)
        finished = [started[0].task(i) for i in ids]
        assert {t["status"] for t in finished} == {"completed"}
        # The killed host's tasks ran again (the attempt counts), and only those.
        assert max(t["attempts"] for t in finished) == 2
        # What the killed process left is gone: its restart removed it.
        host_filter = {"label": f"{LABEL_HOST}={host_ids[2]}"}
        _wait(lambda: not docker_client.containers(all=True, filters=host_filter), "the killed host's leftovers")
    finally:
        for process in started:
            process.stop()
        events.close()
        watcher.join(timeout=10)
    # No task's containers ran at the same time, on one host or two (the engine's own record).
    runs = _container_runs(list(seen), set(host_ids))
    assert set(runs) >= set(ids)
    for task_id, spans in runs.items():
        spans.sort()
        for (_, end, host), (start, _, other) in itertools.pairwise(spans):
            assert end <= start, f"task {task_id}: containers on {host} and {other} overlapped"
    hosts_used = {host for spans in runs.values() for _, _, host in spans}
    assert hosts_used == set(host_ids)  # every host took its share


def _container_runs(events: list[dict[str, Any]], host_ids: set[str]) -> dict[str, list[tuple[int, int, str]]]:
    """Per task: (start, die, host id) of each of its containers, in nanoseconds, from the engine's events."""
    starts: dict[str, tuple[int, str, str]] = {}
    runs: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for event in events:
        labels = event["Actor"]["Attributes"]
        host = labels.get(LABEL_HOST, "")
        if host not in host_ids:
            continue
        if event["Action"] == "start":
            starts[event["id"]] = (event["timeNano"], labels[LABEL_TASK], host)
        elif event["id"] in starts:
            start, task_id, host = starts.pop(event["id"])
            runs[task_id].append((start, event["timeNano"], host))
    for start, task_id, host in starts.values():  # killed without a die event seen: open-ended
        runs[task_id].append((start, time.time_ns(), host))
    return runs


def _wait(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout}s for {what}")
        time.sleep(0.2)
