"""Per-task cost of workerhost's runner against a bare docker-py loop, measured in one run.

Both run the same image and command (a shell that reads the task and prints a
result) with the same limits; the bare loop does create/attach/start/write/
read/wait/remove by hand, as lean as docker-py allows. Runs alternate, so
that the machine's drift hits both alike. Prints the median per-task time of
each and their ratio (target: workerhost within 1.15x of the bare loop).

    python bench/bench_runner.py [--tasks 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from bare import bare_task, host_config

from runner.attempts import new_task
from runner.config import WorkerConfig
from runner.docker import DockerRunner, connect
from runner.protocol import Status, classify

IMAGE = "workerhost/python:3.11"
COMMAND = ["/bin/sh", "-c", 'cat >/dev/null; echo \'{"success": true, "result": {"ok": 1}}\'']
TARGET = 1.15


def bare_once(client: Any, worker: WorkerConfig, payload: bytes, config: dict[str, Any]) -> float:
    began = time.perf_counter()
    bare_task(client, worker, payload, config)
    return time.perf_counter() - began


def workerhost_once(runner: DockerRunner, worker: WorkerConfig) -> float:
    began = time.perf_counter()
    result = runner.run(worker, new_task("Bench.Trivial", {"n": 1}))
    elapsed = time.perf_counter() - began
    outcome = classify(result.end)
    if outcome.status is not Status.COMPLETED:
        sys.exit(f"the trivial task did not complete: {outcome}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40, help="tasks per contender (default 40)")
    args = parser.parse_args()

    client = connect()
    worker = WorkerConfig(
        name="Bench.Trivial", image=IMAGE, command=COMMAND, task_types=["Bench.Trivial"], cpus=1.0, memory="64m"
    )
    config = host_config(client, worker)
    payload = new_task("Bench.Trivial", {"n": 1}).to_json()
    bare: list[float] = []
    ours: list[float] = []
    with DockerRunner(client, "bench") as runner:
        for _ in range(3):  # warm up both paths
            bare_once(client, worker, payload, config)
            workerhost_once(runner, worker)
        for _ in range(args.tasks):
            bare.append(bare_once(client, worker, payload, config))
            ours.append(workerhost_once(runner, worker))

    bare_median = statistics.median(bare)
    ours_median = statistics.median(ours)
    ratio = ours_median / bare_median
    print(f"runner benchmark: {args.tasks} trivial tasks each, {IMAGE}, same limits, alternating")
    print(f"  bare docker-py loop   median {bare_median * 1000:7.1f} ms/task")
    print(f"  workerhost runner     median {ours_median * 1000:7.1f} ms/task")
    verdict = "within" if ratio <= TARGET else "OVER"
    print(f"  ratio workerhost/bare {ratio:.2f}x ({verdict} the {TARGET}x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
