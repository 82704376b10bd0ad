"""``workerhost serve`` benchmarks, each against a baseline measured in the same run.

1. Submitting 10,000 tasks to the embedded queue (in process), and 2,000 through the HTTP API.
2. End-to-end throughput of trivial tasks through ``serve`` against the raw engine's
   capacity at the same concurrency (parallel bare docker-py loops). Target: >= 0.85x.
3. The host's resident memory with 50 tasks in flight (target: under 150 MB), and
   after 2,000 tasks against after the first 200 (target: no growth beyond 10%).
4. The host's peak resident memory while it serves ``GET /tasks`` (summaries, then full)
   over 20 stored tasks of 15 MB each, against its idle resident memory (target: under 2x).

    python bench/bench_serve.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from bare import bare_task, host_config

from runner.attempts import new_task
from runner.config import WorkerConfig
from runner.docker import connect
from runner.sources.embedded import EmbeddedQueue

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "workerhost/python:3.11"
TRIVIAL = ["/bin/sh", "-c", 'cat >/dev/null; echo \'{"success": true, "result": {}}\'']
SLEEPER = ["/bin/sh", "-c", 'cat >/dev/null; sleep 20; echo \'{"success": true, "result": {}}\'']


def submit_rate(count: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        queue = EmbeddedQueue(Path(tmp) / "q.db", owner="bench")
        began = time.perf_counter()
        for i in range(count):
            queue.submit("Bench.Trivial", {"n": i}, max_attempts=1)
        return count / (time.perf_counter() - began)


def raw_engine_rate(concurrency: int, total: int) -> float:
    """Parallel bare create/attach/start/write/read/wait/remove loops: what the engine can do."""
    client = connect()
    payload = new_task("Bench.Trivial", {}).to_json()
    worker = WorkerConfig(name="Bench.Trivial", image=IMAGE, command=TRIVIAL, task_types=["Bench.Trivial"],
                          memory="64m")  # fmt: skip
    config = host_config(client, worker)

    def once(_: int) -> None:
        bare_task(client, worker, payload, config)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(once, range(concurrency)))  # warm up
        began = time.perf_counter()
        list(pool.map(once, range(total)))
        return total / (time.perf_counter() - began)


class ServeProcess:
    def __init__(self, tmp: Path, concurrency: int, command: list[str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "bench.toml"
        config.write_text(f"""
[host]
id = "bench-{os.getpid()}"
concurrency = {concurrency}
http = "127.0.0.1:{self.port}"
poll_max = "200ms"

[task_manager]
type = "embedded"
path = "{tmp / "bench.db"}"

[[workers]]
name = "Bench.Trivial"
image = "{IMAGE}"
command = {json.dumps(command)}
task_types = ["Bench.Trivial"]
concurrency = {concurrency}
timeout = "60s"
memory = "64m"
max_retries = 0
""")
        workerhost = Path(sys.executable).parent / "workerhost"
        self.proc = subprocess.Popen([str(workerhost), "serve", "-c", str(config), "-q"], cwd=ROOT)
        self.http = httpx.Client(base_url=self.url, timeout=30)
        for _ in range(300):
            try:
                self.http.get("/health")
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise SystemExit("serve did not start")

    def submit(self, count: int) -> None:
        for i in range(count):
            self.http.post("/tasks", json={"type": "Bench.Trivial", "params": {"n": i}}).raise_for_status()

    def counts(self) -> dict[str, int]:
        tasks: dict[str, int] = self.http.get("/health").json()["source"]["tasks"]
        return tasks

    def wait_until(self, predicate: Any, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.counts()):
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out; counts {self.counts()}")
            time.sleep(0.05)

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory now (VmRSS), or the most it has been (VmHWM), in MB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def serve_rate(concurrency: int, total: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        host = ServeProcess(Path(tmp), concurrency, TRIVIAL)
        try:
            host.submit(concurrency)  # warm up
            host.wait_until(lambda c: c["completed"] == concurrency)
            submitter = threading.Thread(target=host.submit, args=(total,))
            began = time.perf_counter()
            submitter.start()
            host.wait_until(lambda c: c["completed"] + c["failed"] + c["dead"] >= concurrency + total)
            elapsed = time.perf_counter() - began
            submitter.join()
            failed = host.counts()["failed"] + host.counts()["dead"]
            if failed:
                raise SystemExit(f"{failed} trivial tasks failed")
            return total / elapsed
        finally:
            host.stop()


def memory(in_flight: int, soak: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        host = ServeProcess(Path(tmp), in_flight, SLEEPER)
        try:
            host.submit(in_flight)
            host.wait_until(lambda c: c["running"] == in_flight, timeout=300)
            time.sleep(2)  # every container started and attached
            peak = host.rss_mb()
        finally:
            host.stop()
    with tempfile.TemporaryDirectory() as tmp:
        host = ServeProcess(Path(tmp), 4, TRIVIAL)
        try:
            host.submit(200)
            host.wait_until(lambda c: c["completed"] >= 200)
            warm = host.rss_mb()
            host.submit(soak - 200)
            host.wait_until(lambda c: c["completed"] >= soak)
            after = host.rss_mb()
        finally:
            host.stop()
    return peak, warm, after


def big_tasks(count: int = 20, size: int = 15 * 1024**2) -> tuple[float, float, list[str]]:
    """Idle RSS, then peak RSS (VmHWM) after serving lists over ``count`` stored tasks of ``size`` bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        queue = EmbeddedQueue(Path(tmp) / "bench.db", owner="bench")
        blob = "x" * size
        for i in range(count):  # a type no worker takes: they stay stored, pending
            queue.submit("Bench.Stored", {"n": i, "blob": blob}, max_attempts=1)
        del blob
        import asyncio

        asyncio.run(queue.close())
        host = ServeProcess(Path(tmp), 1, TRIVIAL)
        try:
            for _ in range(20):  # warm: the API's first requests, the queue's first reads
                host.http.get("/tasks", params={"limit": 1})
            idle = host.rss_mb()
            served = []
            for params in ({"limit": count}, {"limit": count, "full": "true"}):
                response = host.http.get("/tasks", params=params)
                response.raise_for_status()
                more = " (some as summaries)" if "x-workerhost-omitted" in response.headers else ""
                served.append(f"{len(response.json())} tasks, {len(response.content) / 1024**2:.1f} MB{more}")
            return idle, host.rss_mb("VmHWM"), served
        finally:
            host.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    args = parser.parse_args()
    concurrency = 4
    total = 60 if args.quick else 240
    soak = 400 if args.quick else 2000

    rate = submit_rate(2000 if args.quick else 10000)
    print(f"submit: {rate:,.0f} tasks/s into the embedded queue (in process)")
    with tempfile.TemporaryDirectory() as tmp:
        host = ServeProcess(Path(tmp), 1, TRIVIAL)
        try:
            host.http.get("/tasks", params={"limit": 1})  # warm the server up
            count = 500 if args.quick else 2000
            began = time.perf_counter()
            for i in range(count):
                host.http.post("/tasks", json={"type": "Bench.Trivial", "params": {"n": i}, "priority": -1})
            print(f"submit: {count / (time.perf_counter() - began):,.0f} tasks/s through POST /tasks (one client)")
        finally:
            host.stop()

    raw = raw_engine_rate(concurrency, total)
    ours = serve_rate(concurrency, total)
    verdict = "meets" if ours / raw >= 0.85 else "MISSES"
    print(f"throughput at concurrency {concurrency}, {total} trivial tasks:")
    print(f"  raw engine (bare docker-py loops) {raw:6.1f} tasks/s")
    print(f"  workerhost serve (submit -> done) {ours:6.1f} tasks/s")
    print(f"  ratio {ours / raw:.2f}x ({verdict} the 0.85x target)")

    peak, warm, after = memory(50, soak)
    print(f"memory: {peak:.0f} MB resident with 50 tasks in flight ({'under' if peak < 150 else 'OVER'} 150 MB)")
    growth = (after - warm) / warm
    print(f"memory: {warm:.0f} MB after 200 tasks, {after:.0f} MB after {soak}: {growth:+.1%} "
          f"({'within' if growth <= 0.10 else 'OVER'} +10%)")  # fmt: skip

    idle, peak, served = big_tasks()
    print(f"memory: GET /tasks over 20 stored tasks of 15 MB: {'; '.join(served)}")
    print(f"memory: {idle:.0f} MB idle, {peak:.0f} MB at the peak: {peak / idle:.2f}x "
          f"({'under' if peak < 2 * idle else 'OVER'} the 2x target)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
