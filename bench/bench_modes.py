"""Cold, prewarmed and reused containers, ``POST /tasks?wait`` and ``workerhost run``, each against
baselines measured in the same run.

One trivial task (the text-stats worker, which uses the SDK, on a one-word text) through:

- ``docker run --rm -i`` (the docker CLI), and ``workerhost run``, alternating;
- the started-ahead ideal: bare docker-py, the container created, attached and started (and its
  worker blocked on stdin) before the clock; the clock covers writing the task and reading the result
  (its line on stdout);
- the raw engine's cold capacity: bare create/attach/start/write/read/wait/remove, 4 threads;
- ``POST /tasks?wait`` through a real ``workerhost serve``: cold, ``prewarm = 4`` and ``reuse = 1000``,
  p50 and p99 one at a time, and the throughput of one batch at concurrency 4;
- the same under ``sandbox = "strict"`` (gVisor), cold and prewarmed;
- the cold path against the code at ``--before`` (86f7c0e), both hosts up at once, alternating.

Targets: prewarmed p50 <= 1.5x the started-ahead ideal and < 0.3x ``docker run --rm -i``; strict
prewarmed p50 < 0.5x strict cold; reuse throughput >= 20x the raw engine's cold capacity;
``workerhost run`` <= 1.3x ``docker run --rm -i``; the cold path no slower than before.
A section that cannot run says ``n/a`` and why, and the others go on. Every container and
``serve`` the bench starts is removed or stopped at its end, failed or not.

    python bench/bench_modes.py [--quick] [--before REV]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from bare import host_config

from runner.attempts import new_task
from runner.config import WorkerConfig
from runner.docker import LABEL_HOST, STDOUT, Demuxer, connect

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "workerhost/text-stats:latest"
TYPE = "Bench.Trivial"
PARAMS = {"text": "hi"}
BEFORE = "86f7c0e"
# Everything this run starts carries its token: containers it makes by hand in LABEL, serve's and
# run's containers in their host id (TOKEN-<mode>). The pid keeps another run's apart.
TOKEN = f"bench-modes-{os.getpid()}"
LABEL = "workerhost.bench"
FINAL = ("completed", "failed", "dead")
WORKER = WorkerConfig(name=TYPE, image=IMAGE, task_types=[TYPE], cpus=1.0, memory=128 * 1024**2)


class NotAvailable(Exception):
    """A section that cannot run here (yet): the message says why."""


# -- baselines: the docker CLI, bare docker-py ------------------------------------------------


def docker_run_command() -> list[str]:
    """``docker run --rm -i`` with the limits workerhost applies (bare.host_config's)."""
    w = WORKER
    return [
        "docker", "run", "--rm", "-i", "--label", f"{LABEL}={TOKEN}", "--network", "none",
        f"--cpus={w.cpus}", f"--memory={w.memory}", f"--memory-swap={w.memory}", f"--pids-limit={w.pids_limit}",
        "--read-only", "--tmpfs", f"/tmp:rw,nosuid,nodev,size={w.tmpfs},mode=1777", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--log-driver", "none", *(["--user", w.user] if w.user else []),
        IMAGE, *(w.command or []),
    ]  # fmt: skip


def timed(command: list[str], stdin: bytes = b"", env: dict[str, str] | None = None) -> float:
    began = time.perf_counter()
    done = subprocess.run(command, input=stdin, capture_output=True, cwd=ROOT, env=env, timeout=120)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise NotAvailable(f"`{' '.join(command[:3])} …` exited {done.returncode}: {_last(done.stderr)}")
    return elapsed


def started(client: Any, config: dict[str, Any]) -> tuple[str, socket.socket]:
    """A container of the trivial worker, created, attached and started: blocked on stdin."""
    container: str = client.create_container(
        IMAGE, WORKER.command, stdin_open=True, user=WORKER.user, host_config=config, network_disabled=True,
        labels={LABEL: TOKEN},
    )["Id"]  # fmt: skip
    streams = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
    sock: socket.socket = client.attach_socket(container, params=streams)._sock
    client.start(container)
    return container, sock


def exchange(sock: socket.socket, payload: bytes, to_end: bool = True) -> bytes:
    """Write the task, half-close, read its stdout to the end of the output (the container's exit), or
    (``to_end`` False) only until the result's whole line is read."""
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    demux, stdout = Demuxer(), b""
    while chunk := sock.recv(65536):
        stdout += b"".join(data for stream, data in demux.feed(chunk) if stream == STDOUT)
        if not to_end and stdout.endswith(b"\n"):
            break
    return stdout


def finish(client: Any, container: str, sock: socket.socket) -> None:
    client.wait(container)
    sock.close()
    client.remove_container(container, force=True)


def ideal_once(client: Any, config: dict[str, Any], payload: bytes, to_end: bool) -> float:
    container, sock = started(client, config)
    try:
        time.sleep(0.3)  # as in a pool: its interpreter started and its imports done, blocked reading stdin
        began = time.perf_counter()
        out = exchange(sock, payload, to_end)
        elapsed = time.perf_counter() - began
    finally:
        finish(client, container, sock)
    if b'"success":true' not in out.replace(b" ", b""):
        raise NotAvailable(f"the started-ahead worker did not succeed: {out[-200:]!r}")
    return elapsed


def cold_once(client: Any, config: dict[str, Any], payload: bytes) -> None:
    container, sock = started(client, config)
    try:
        exchange(sock, payload)
    finally:
        finish(client, container, sock)


def raw_capacity(client: Any, config: dict[str, Any], payload: bytes, total: int, concurrency: int = 4) -> float:
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: cold_once(client, config, payload), range(concurrency)))  # warm up
        began = time.perf_counter()
        list(pool.map(lambda _: cold_once(client, config, payload), range(total)))
        return total / (time.perf_counter() - began)


# -- workerhost serve ----------------------------------------------------------------------


def config_text(host_id: str, port: int, db: Path, worker_extra: str = "") -> str:
    return f"""
[host]
id = "{host_id}"
concurrency = 4
http = "127.0.0.1:{port}"
poll_max = "200ms"

[task_manager]
type = "embedded"
path = "{db}"

[[workers]]
name = "{TYPE}"
image = "{IMAGE}"
task_types = ["{TYPE}"]
concurrency = 4
timeout = "60s"
cpus = {WORKER.cpus}
memory = "128m"
max_retries = 0
{worker_extra}
"""


class Serve:
    """A ``workerhost serve`` subprocess on its own port, queue and host id (``code``: another checkout)."""

    def __init__(self, tmp: Path, mode: str, worker_extra: str = "", code: Path = ROOT) -> None:
        self.host_id = f"{TOKEN}-{mode}"
        self.port = _free_port()
        config = tmp / f"{mode}.toml"
        config.write_text(config_text(self.host_id, self.port, tmp / f"{mode}.db", worker_extra))
        self.log = tmp / f"{mode}.log"
        env = {**os.environ, "PYTHONPATH": str(code)}
        # -m runner from the checkout's folder: its runner comes first on the path.
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runner", "serve", "-c", str(config), "-q"], cwd=code, env=env, stderr=log
            )
        _serving.append(self)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=180)
        try:
            self._wait_until_up(mode)
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self, mode: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NotAvailable(f"serve ({mode}) exited {self.proc.returncode}: {_last(self.log.read_bytes())}")
            try:
                self.http.get("/health")
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise NotAvailable(f"serve ({mode}) did not answer in 60 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()


_serving: list[Serve] = []


@contextmanager
def serving(tmp: Path, mode: str, worker_extra: str = "", code: Path = ROOT) -> Iterator[Serve]:
    host = Serve(tmp, mode, worker_extra, code)
    try:
        yield host
    finally:
        host.stop()


def task_body(n: int) -> dict[str, Any]:
    return {"type": TYPE, "params": {**PARAMS, "n": n}}


def waited(host: Serve, n: int) -> float:
    """``POST /tasks?wait=30``, one task: the time until the answer with the finished task."""
    began = time.perf_counter()
    response = host.http.post("/tasks", params={"wait": 30}, json=task_body(n))
    elapsed = time.perf_counter() - began
    if response.status_code == 201:
        raise NotAvailable("POST /tasks?wait is not there: it answered 201 (stored, not waited for)")
    if response.status_code != 200:
        raise NotAvailable(f"POST /tasks?wait answered {response.status_code}: {response.text[:200]}")
    _completed([response.json()])
    return elapsed


def polled(host: Serve, n: int) -> float:
    """``POST /tasks``, then ``GET /tasks/{id}`` every 5 ms until it ended (what any version answers);
    the time from its creation to its end as the host recorded them (so the polling does not count)."""
    response = host.http.post("/tasks", json=task_body(n))
    response.raise_for_status()
    task = response.json()
    while task["status"] not in FINAL:
        time.sleep(0.005)
        task = host.http.get(f"/tasks/{task['id']}").json()
    _completed([task])
    return _epoch(task["finished_at"]) - _epoch(task["created_at"])


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def batch_rate(host: Serve, count: int) -> float:
    """One batch of ``count`` tasks in one ``POST /tasks?wait``: tasks per second until all ended."""
    began = time.perf_counter()
    response = host.http.post("/tasks", params={"wait": 150}, json=[task_body(n) for n in range(count)])
    if response.status_code not in (200, 202):
        raise NotAvailable(f"a batch POST /tasks?wait answered {response.status_code}: {response.text[:200]}")
    tasks = response.json()
    if not isinstance(tasks, list) or len(tasks) != count:
        raise NotAvailable(f"a batch POST answered {type(tasks).__name__}, not the {count} tasks in a list")
    for i, task in enumerate(tasks):  # a 202: follow what had not ended
        while task["status"] not in FINAL:
            task = tasks[i] = host.http.get(f"/tasks/{task['id']}", params={"wait": 30}).json()
    elapsed = time.perf_counter() - began
    _completed(tasks)
    return count / elapsed


def _completed(tasks: list[dict[str, Any]]) -> None:
    bad = [t for t in tasks if t.get("status") != "completed"]
    if bad:
        raise NotAvailable(f"{len(bad)} trivial tasks did not complete, e.g. {json.dumps(bad[0])[:300]}")


def latencies(measure: Callable[[int], float], count: int, warm: int, ready: Callable[[], None]) -> list[float]:
    """``count`` requests one at a time, each when ``ready`` says the host is idle again."""
    for n in range(warm):
        measure(n)
    times = []
    for n in range(count):
        ready()
        times.append(measure(warm + n))
    return times


def settled(host: Serve) -> Callable[[], None]:
    """Wait until the worker's warm containers (if any) are all started again, and their workers'
    imports done: latency at a rate the host sustains, as a user sees it between bursts (back to
    back, faster than the engine starts containers, prewarmed tasks would run cold). The same pause
    in every mode, so that no mode is measured while the engine finishes the previous task's work."""

    def ready() -> None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            health = host.http.get(f"/workers/{TYPE}/health").json()
            warm = health.get("warm")
            if not warm or warm["idle"] >= warm["target"] or warm.get("broken"):
                break
            time.sleep(0.02)
        time.sleep(0.3)  # as for the ideal: the newest container's interpreter started and its imports done

    return ready


# -- the sections ----------------------------------------------------------------------------


class Figures:
    """What each section measured, or why it could not."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.missing: dict[str, str] = {}

    def section(self, names: list[str], title: str, body: Callable[[], None]) -> None:
        try:
            body()
        except NotAvailable as exc:
            why = str(exc)
        except (httpx.HTTPError, OSError, subprocess.SubprocessError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # docker-py's errors, a bad answer: the other sections still run
            why = f"{type(exc).__name__}: {exc}"
        else:
            return
        print(f"  {title}: n/a: {why}")
        for name in names:
            self.missing.setdefault(name, why)

    def ratio(self, label: str, name: str, base: str, bound: str, target: float) -> None:
        """``name`` / ``base`` against ``target`` (``bound`` is "<=", "<" or ">="); n/a when one is missing."""
        gone = [n for n in (name, base) if n not in self.values]
        if gone:
            print(f"  {label}: n/a ({gone[0]}: {self.missing.get(gone[0], 'not measured')})")
            return
        value = self.values[name] / self.values[base]
        ok = {"<=": value <= target, "<": value < target, ">=": value >= target}[bound]
        print(f"  {label}: {value:.2f}x (target {bound} {target}x) {'PASS' if ok else 'MISS'}")


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, math.ceil(0.99 * len(values)) - 1)]


def ms(value: float) -> str:
    return f"{value * 1000:7.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--before", default=BEFORE, help=f"git revision of the cold path to compare ({BEFORE})")
    args = parser.parse_args()
    n = _Counts(args.quick)
    signal.signal(signal.SIGTERM, _interrupted)
    figures = Figures()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-modes-") as tmp:
            run_sections(figures, Path(tmp), n, args.before)
    except KeyboardInterrupt:
        print("interrupted: stopping what this run started", file=sys.stderr)
        return 130
    finally:
        cleanup()
    print("targets:")
    figures.ratio("prewarmed p50 / started-ahead ideal (to the end of output)", "prewarm_p50", "ideal", "<=", 1.5)
    got = figures.values
    if {"prewarm_p50", "ideal_line", "reuse_p50"} <= got.keys():
        print(f"  (prewarmed p50 / the floor, to the result line: {got['prewarm_p50'] / got['ideal_line']:.2f}x; "
              f"serve's own cost per task, HTTP, queue, claim, report, is about the reuse p50, "
              f"{ms(got['reuse_p50'])})")  # fmt: skip
    figures.ratio("prewarmed p50 / docker run --rm -i", "prewarm_p50", "docker_run", "<", 0.3)
    figures.ratio("strict prewarmed p50 / strict cold p50", "strict_prewarm_p50", "strict_cold_p50", "<", 0.5)
    figures.ratio("reuse throughput / raw engine cold capacity", "reuse_rate", "raw_rate", ">=", 20)
    figures.ratio("workerhost run p50 / docker run --rm -i p50", "workerhost_run", "docker_run", "<=", 1.3)
    figures.ratio(f"cold created-to-finished p50, now / at {args.before}", "cold_now", "cold_before", "<=", 1.0)
    return 0


class _Counts:
    def __init__(self, quick: bool) -> None:
        self.docker_run = 8 if quick else 20
        self.ideal = 8 if quick else 20
        self.raw = 16 if quick else 40
        self.sequential = 15 if quick else 50
        self.warm = 3 if quick else 5
        self.batch = 40 if quick else 100
        self.reuse_batch = 200 if quick else 1000
        self.strict = 8 if quick else 25
        self.before = 12 if quick else 40


def run_sections(figures: Figures, tmp: Path, n: _Counts, before: str) -> None:
    values = figures.values
    payload = new_task(TYPE, PARAMS).to_json()
    print(f"modes: a trivial task ({IMAGE}, the SDK), baselines measured in this run")

    def docker_and_run() -> None:
        run_config = tmp / "run.toml"
        run_config.write_text(config_text(f"{TOKEN}-run", _free_port(), tmp / "run.db"))
        run = [str(Path(sys.executable).parent / "workerhost"), "run", "-q", "-c", str(run_config), TYPE,
               json.dumps(PARAMS)]  # fmt: skip
        # An install keeps its bytecode; where this shell forbids writing it, every run would time
        # compiling workerhost's sources too, which no user's `workerhost run` pays.
        run_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        docker: list[float] = []
        ours: list[float] = []
        why = ""
        timed(docker_run_command(), payload)  # warm up
        try:
            timed(run, env=run_env)  # warm up, and write its bytecode
        except NotAvailable as exc:
            why = str(exc)
        for _ in range(n.docker_run):
            docker.append(timed(docker_run_command(), payload))
            if not why:  # alternating, so that the machine's drift hits both alike
                try:
                    ours.append(timed(run, env=run_env))
                except NotAvailable as exc:
                    why = str(exc)
        values["docker_run"] = p50(docker)
        print(f"  docker run --rm -i            p50 {ms(values['docker_run'])}  (baseline, {len(docker)} runs)")
        if why:
            raise NotAvailable(f"workerhost run: {why}")
        values["workerhost_run"] = p50(ours)
        print(f"  workerhost run                p50 {ms(values['workerhost_run'])}  "
              f"{values['workerhost_run'] / values['docker_run']:.2f}x docker run")  # fmt: skip

    figures.section(["docker_run", "workerhost_run"], "docker run --rm -i / workerhost run", docker_and_run)

    client = connect()
    config = host_config(client, WORKER)

    def ideal() -> None:
        ideal_once(client, config, payload, True)  # warm up
        pairs = [(ideal_once(client, config, payload, True), ideal_once(client, config, payload, False))
                 for _ in range(n.ideal)]  # fmt: skip
        values["ideal"], values["ideal_line"] = p50([a for a, _ in pairs]), p50([b for _, b in pairs])
        print(f"  started-ahead ideal           p50 {ms(values['ideal'])}  (bare docker-py, to the end of output)")
        print(f"    to the result line only     p50 {ms(values['ideal_line'])}  (the floor: no exit waited for)")

    figures.section(["ideal"], "started-ahead ideal", ideal)

    def raw() -> None:
        rate = raw_capacity(client, config, payload, n.raw)
        values["raw_rate"] = rate
        print(f"  raw engine cold capacity      {rate:7.1f} tasks/s  (bare docker-py, 4 threads, {n.raw} tasks)")

    figures.section(["raw_rate"], "raw engine cold capacity", raw)

    modes = {"cold": "", "prewarm": "prewarm = 4", "reuse": "reuse = 1000"}
    for mode, extra in modes.items():

        def serve_mode(mode: str = mode, extra: str = extra) -> None:
            with serving(tmp, mode, extra) as host:
                times = latencies(lambda i: waited(host, i), n.sequential, n.warm, settled(host))
                values[f"{mode}_p50"], values[f"{mode}_p99"] = p50(times), p99(times)
                docker = values.get("docker_run")
                against = f"  {values[f'{mode}_p50'] / docker:.2f}x docker run" if docker else ""
                print(f"  POST ?wait {mode:<8}           p50 {ms(p50(times))}  p99 {ms(p99(times))}{against}")
                rate = batch_rate(host, n.reuse_batch if mode == "reuse" else n.batch)
                values[f"{mode}_rate"] = rate
                raw = values.get("raw_rate")
                against = f"  {rate / raw:.2f}x raw engine cold" if raw else ""
                print(f"  batch at concurrency 4, {mode:<8}{rate:7.1f} tasks/s{against}")

        figures.section([f"{mode}_p50", f"{mode}_rate"], f"serve, {mode}", serve_mode)

    strict_modes = {"strict_cold": 'sandbox = "strict"', "strict_prewarm": 'sandbox = "strict"\nprewarm = 4'}
    for mode, extra in strict_modes.items():

        def strict_mode(mode: str = mode, extra: str = extra) -> None:
            if "runsc" not in (client.info().get("Runtimes") or {}):
                raise NotAvailable("gVisor (runsc) is not registered with the engine: `make sandbox`")
            with serving(tmp, mode, extra) as host:
                times = latencies(lambda i: waited(host, i), n.strict, n.warm, settled(host))
                values[f"{mode}_p50"] = p50(times)
                print(f"  POST ?wait {mode:<15}    p50 {ms(p50(times))}  p99 {ms(p99(times))}")

        figures.section([f"{mode}_p50"], f"serve, {mode}", strict_mode)

    def cold_before() -> None:
        code = _checkout(before, tmp / "before")
        with serving(tmp, "cold-now") as now, serving(tmp, "cold-before", code=code) as then:
            for i in range(n.warm):
                polled(now, i)
                polled(then, i)
            pairs = [(polled(now, i), polled(then, i)) for i in range(n.before)]
        values["cold_now"] = p50([a for a, _ in pairs])
        values["cold_before"] = p50([b for _, b in pairs])
        print(f"  cold, created to finished as recorded: now p50 {ms(values['cold_now'])}, at {before} "
              f"p50 {ms(values['cold_before'])} (alternating)")  # fmt: skip

    figures.section(["cold_now", "cold_before"], f"cold path at {before}", cold_before)


def _checkout(revision: str, into: Path) -> Path:
    """The ``runner`` package at ``revision``, unpacked from git (the working tree is not touched)."""
    archive = subprocess.run(["git", "archive", revision, "runner"], cwd=ROOT, capture_output=True, timeout=60)
    if archive.returncode != 0:
        raise NotAvailable(f"git archive {revision}: {_last(archive.stderr)}")
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as f:
        f.write(archive.stdout)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    return into


# -- clean-up -----------------------------------------------------------------------------------


def cleanup() -> None:
    """Stop every serve this run started, then remove every container it left (by its token only)."""
    for host in _serving:
        try:
            host.stop()
        except Exception as exc:
            print(f"warning: could not stop serve {host.host_id}: {exc}", file=sys.stderr)
    try:
        client = connect(timeout=30)
        ours = {c["Id"] for c in client.containers(all=True, filters={"label": f"{LABEL}={TOKEN}"})}
        for c in client.containers(all=True, filters={"label": LABEL_HOST}):
            if (c.get("Labels") or {}).get(LABEL_HOST, "").startswith(f"{TOKEN}-"):
                ours.add(c["Id"])
        for container in ours:
            client.remove_container(container, force=True)
        if ours:
            print(f"cleanup: removed {len(ours)} containers this run left", file=sys.stderr)
    except Exception as exc:
        print(f"warning: clean-up of this run's containers failed: {exc}", file=sys.stderr)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the finally blocks stop serve and remove the containers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _last(text: bytes | str, lines: int = 3) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " | ".join(text.strip().splitlines()[-lines:]) or "(nothing on stderr)"


if __name__ == "__main__":
    sys.exit(main())
