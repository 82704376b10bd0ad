"""Per-task time under ``sandbox = "strict"`` (gVisor) against ``"standard"`` (runc), in one run.

The same trivial task through workerhost's runner, alternating the two profiles;
prints the median per-task time of each and their ratio. gVisor is expected to
cost more: this says how much.

    python bench/bench_sandbox.py [--tasks 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench_runner import COMMAND, IMAGE, workerhost_once

from runner.config import WorkerConfig
from runner.docker import DockerRunner, connect


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30)
    args = parser.parse_args()
    client = connect()
    if "runsc" not in (client.info().get("Runtimes") or {}):
        sys.exit("gVisor (runsc) is not registered with the engine: run `make sandbox`")
    profiles = {
        name: WorkerConfig(name=name, image=IMAGE, command=COMMAND, task_types=["Bench.Trivial"], sandbox=name)
        for name in ("standard", "strict")
    }
    times: dict[str, list[float]] = {name: [] for name in profiles}
    with DockerRunner(client, "bench-sandbox") as runner:
        for worker in profiles.values():
            workerhost_once(runner, worker)  # warm up
        for _ in range(args.tasks):
            for name, worker in profiles.items():
                times[name].append(workerhost_once(runner, worker))
    standard, strict = (statistics.median(times[n]) for n in ("standard", "strict"))
    print(f"sandbox: {args.tasks} trivial tasks under each profile, alternating")
    print(f"  standard (runc)    median {standard * 1000:7.1f} ms/task")
    print(f"  strict (gVisor)    median {strict * 1000:7.1f} ms/task")
    print(f"  ratio strict/standard {strict / standard:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
