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
import socket
import statistics
import sys
import time
from typing import Any

from runner.attempts import new_task
from runner.config import WorkerConfig
from runner.docker import DockerRunner, connect
from runner.protocol import Status, classify

IMAGE = "workerhost/python:3.11"
COMMAND = ["/bin/sh", "-c", 'cat >/dev/null; echo \'{"success": true, "result": {"ok": 1}}\'']
TARGET = 1.15


def bare_once(client: Any, payload: bytes, host_config: dict[str, Any]) -> float:
    began = time.perf_counter()
    container = client.create_container(
        IMAGE, COMMAND, stdin_open=True, user="65534:65534", host_config=host_config, network_disabled=True
    )["Id"]
    attach = client.attach_socket(container, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
    sock = attach._sock
    client.start(container)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass
    client.wait(container)
    sock.close()
    client.remove_container(container, force=True)
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
    host_config = client.create_host_config(
        nano_cpus=int(worker.cpus * 1e9),
        mem_limit=worker.memory,
        memswap_limit=worker.memory,
        pids_limit=worker.pids_limit,
        network_mode="none",
        read_only=True,
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={worker.tmpfs},mode=1777"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        log_config={"Type": "none", "Config": {}},
    )
    payload = new_task("Bench.Trivial", {"n": 1}).to_json()
    bare: list[float] = []
    ours: list[float] = []
    with DockerRunner(client, "bench") as runner:
        for _ in range(3):  # warm up both paths
            bare_once(client, payload, host_config)
            workerhost_once(runner, worker)
        for _ in range(args.tasks):
            bare.append(bare_once(client, payload, host_config))
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
