"""What tracing costs per task: the same trivial tasks through the host loop with OTLP export on
(to an in-process OTLP receiver that decodes every request) and off, in alternating rounds.

Target: tracing adds under 5% to per-task time.

    python bench/bench_tracing.py [--tasks 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.config import loads  # noqa: E402
from runner.docker import DockerRunner, connect  # noqa: E402
from runner.host import Host  # noqa: E402
from runner.sources.embedded import EmbeddedQueue  # noqa: E402
from runner.telemetry.events import Hooks  # noqa: E402
from runner.telemetry.tracing import Tracing  # noqa: E402
from tests.otlp_receiver import OtlpReceiver  # noqa: E402

TRIVIAL = ["/bin/sh", "-c", 'cat >/dev/null; echo \'{"success": true, "result": {}}\'']
CONFIG = """
[host]
id = "bench-tracing"
concurrency = 1
poll_max = "50ms"

[[workers]]
name = "Bench.Trivial"
image = "workerhost/python:3.11"
command = COMMAND
task_types = ["Bench.Trivial"]
memory = "64m"
max_retries = 0
"""


def one_round(tasks: int, endpoint: str | None) -> float:
    """Seconds per task for ``tasks`` trivial tasks, one at a time, with or without export."""
    config = loads(CONFIG.replace("COMMAND", json.dumps(TRIVIAL)), environ={})
    with tempfile.TemporaryDirectory() as tmp:
        queue = EmbeddedQueue(Path(tmp) / "q.db", owner="bench")
        for i in range(tasks):
            queue.submit("Bench.Trivial", {"n": i}, max_attempts=1)
        telemetry = config.telemetry.model_copy(update={"otlp_endpoint": endpoint or ""})
        tracing = Tracing(telemetry) if endpoint else None
        runner = DockerRunner(connect(), "bench-tracing", "bench")
        hooks = Hooks([tracing], contexts=tracing.span_context) if tracing else Hooks()
        host = Host(config, queue, runner, hooks, owner="bench")
        began = time.perf_counter()
        asyncio.run(host.run(burst=True))
        elapsed = time.perf_counter() - began
        if tracing is not None:
            tracing.shutdown()
        runner.close()
        done = queue.counts()["completed"]
        if done != tasks:
            raise SystemExit(f"only {done} of {tasks} tasks completed")
        return elapsed / tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    off: list[float] = []
    on: list[float] = []
    with OtlpReceiver() as receiver:
        one_round(5, None)  # warm up the engine and the image
        for _ in range(args.rounds):
            off.append(one_round(args.tasks, None))
            on.append(one_round(args.tasks, receiver.endpoint))
        spans = len(receiver.spans)
    off_median, on_median = statistics.median(off), statistics.median(on)
    ratio = on_median / off_median
    print(f"tracing: {args.rounds} alternating rounds of {args.tasks} trivial tasks, one at a time")
    print(f"  export off  {off_median * 1000:7.1f} ms/task")
    print(f"  export on   {on_median * 1000:7.1f} ms/task  ({spans} spans received and decoded)")
    verdict = "within" if ratio <= 1.05 else "OVER"
    print(f"  ratio on/off {ratio:.3f}x ({verdict} the +5% target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
