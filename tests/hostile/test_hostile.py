"""A hostile worker against one ``workerhost serve``, under both sandbox profiles.

Every attack is checked three ways: (1) the task ends with the right outcome and
an error that says what happened; (2) the host stays healthy and serves other
workers meanwhile: a well-behaved task submitted while the attack runs
completes, and /health answers; (3) nothing is left behind: the engine has no
container of the task, and no host process belongs to it.

These tests send no traffic anywhere but the container's own loopback: the way
out is judged from the container's interfaces and routes, not by trying it.
"""

from __future__ import annotations

import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from runner.docker import LABEL_TASK
from tests.hostile.conftest import BEHAVE, STANDARD, STRICT, TIMEOUT
from tests.serving import Serve

pytestmark = pytest.mark.docker

MiB = 1024 * 1024
BOTH = [STANDARD, STRICT]
ENDED = ("completed", "failed", "dead")

# gVisor's sentry is a Go program whose threads, and (on the ptrace platform that
# Debian 12's runsc uses) one stub process per process of the worker, count against
# the container's pids limit; with too few (64) a handful of forks or busy threads
# left it unable to make a thread ("failed to create new OS thread", exit 2). So a
# strict worker needs at least 128 pids, and gets 256 by default.


# -- the three checks -----------------------------------------------------------------


class Attack:
    """One hostile task, from submit to the end, with a well-behaved task run while it lasts."""

    def __init__(self, host: Serve, docker_client: Any, worker: str, do: str, **params: Any) -> None:
        self.host = host
        self.docker = docker_client
        self.began = time.time()
        self.id = host.submit(worker, do=do, **params)["id"]
        host.wait_for(self.id, ("running", *ENDED), timeout=30)
        # The well-behaved task, submitted while the attack runs.
        self.behave_id = host.submit(BEHAVE, do="ok")["id"]
        self.behave = host.wait_for(self.behave_id, ENDED, timeout=30)
        self.health_during = host.http.get("/health")
        self.task = host.wait_for(self.id, ENDED, timeout=4 * TIMEOUT + 30)
        self.health_after = host.http.get("/health")
        self.containers = self._created(self.id)

    @property
    def still_running_then(self) -> bool:
        """Whether the well-behaved task ended before the attack could have been killed.

        Judged from the host's own clock, not from when this test happened to look:
        the attack was claimed before its container started, so its claim plus the
        timeout is no later than its deadline.
        """
        deadline = _moment(self.task["started_at"]) + TIMEOUT
        return _moment(self.behave["finished_at"]) < deadline

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.task.get("error") or {}
        return error

    @property
    def result(self) -> Any:
        return self.task.get("result")

    def check_host(self) -> None:
        """(2) the host kept serving while the attack ran."""
        if self.behave["status"] != "completed" or self.behave["result"]["params"] != {"do": "ok"}:
            pytest.fail(f"the well-behaved task did not complete during the attack: {self.behave}")
        for health in (self.health_during, self.health_after):
            if health.status_code != 200 or health.json()["status"] != "ok":
                pytest.fail(f"/health: {health.status_code} {health.text}")
        if self.host.proc is None or self.host.proc.poll() is not None:
            pytest.fail(f"serve died:\n{self.host.log.read_text()[-4000:]}")

    def check_nothing_left(self) -> None:
        """(3) no container of the task remains, and no host process belongs to one."""
        if not self.containers:
            pytest.fail(f"the engine never reported a container of task {self.id}")
        deadline = time.monotonic() + 30  # removal is off the task's path
        while True:
            left = self._containers(self.id) + self._containers(self.behave_id)
            processes = _host_processes(self.containers)
            if not left and not processes:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"left behind: containers {[c['Id'][:12] for c in left]}, processes {processes}")
            time.sleep(0.2)

    def check(self, outcome: str, status: str = "failed") -> None:
        """All three: the host served, nothing is left, and the task ended as ``status``/``outcome``."""
        self.check_host()
        self.check_nothing_left()
        self.ended_as(outcome, status)

    def ended_as(self, outcome: str, status: str = "failed") -> None:
        assert (self.task["status"], self.task.get("outcome")) == (status, outcome), self.task
        assert self.task["attempts"] == 1

    def _containers(self, task_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.docker.containers(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})
        return found

    def _created(self, task_id: str) -> list[str]:
        """Ids of the containers the engine created for the task (from its event log)."""
        # "until" now: the engine sends what it has and closes the stream at once.
        events = self.docker.events(
            since=f"{self.began - 1:.6f}", until=f"{time.time():.6f}",
            filters={"label": f"{LABEL_TASK}={task_id}", "event": "create"}, decode=True,
        )  # fmt: skip
        return [event["id"] for event in events]


def _moment(iso: str) -> float:
    """A timestamp of the API ("2026-11-25T17:00:30.123Z") as seconds since the epoch."""
    return datetime.fromisoformat(iso).timestamp()


def _host_processes(container_ids: list[str]) -> list[str]:
    """Host processes of these containers: their shim or gVisor's sandbox and gofer name the
    container id; under runc the worker's own processes are host processes too."""
    if os.environ.get("DOCKER_HOST", "unix://").split("://")[0] not in ("unix", ""):
        return []  # a remote engine: its processes are not ours to see
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "/app/hostile.py" in cmdline or any(cid in cmdline for cid in container_ids):
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def attack(host: Serve, docker_client: Any, worker: str, do: str, **params: Any) -> Attack:
    return Attack(host, docker_client, worker, do, **params)


# -- attacks on the host: the host must stop them ----------------------------------------


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_fork_bomb(host: Serve, docker_client: Any, worker: str) -> None:
    a = attack(host, docker_client, worker, "fork_bomb")
    a.check_host()
    a.check_nothing_left()
    if worker == STANDARD:
        # fork fails with EAGAIN at pids_limit; the bomb keeps its children and never
        # answers, so the deadline ends it: a timeout, with the EAGAIN in its log.
        assert a.still_running_then, "the well-behaved task did not run during the bomb"
        a.ended_as("timeout")
        assert a.error == {"type": "Timeout", "message": "killed at the deadline after 5s", "retriable": False}
        forked = re.search(r"forked (\d+) children, then fork failed with EAGAIN", a.task["stderr_tail"])
        assert forked and int(forked.group(1)) < 64, a.task["stderr_tail"]
    else:
        # Under gVisor each process also costs the sandbox memory: the bomb runs into the
        # memory limit before the pids limit, and is OOM-killed (seen here: ~11 processes).
        # Either way the error says which limit ended it.
        if a.task.get("outcome") == "timeout":
            assert a.error["message"] == "killed at the deadline after 5s"
        else:
            a.ended_as("failed")
            assert a.error["type"] == "MemoryLimitExceeded", a.task


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_memory_bomb(host: Serve, docker_client: Any, worker: str) -> None:
    a = attack(host, docker_client, worker, "memory_bomb")
    # Under gVisor too the engine reports OOMKilled (cgroup v1 here): the sandbox's
    # memory is the container's, and the kernel's OOM killer ends it at 64 MiB.
    a.check("failed")
    assert a.error == {
        "type": "MemoryLimitExceeded",
        "message": "killed by the memory limit of 64 MiB (OOMKilled); raise the worker's memory",
        "retriable": False,
    }
    assert "holding 16 MiB" in a.task["stderr_tail"]  # it did get going


@pytest.mark.parametrize(
    ("worker", "processes", "threads"),
    [
        (STANDARD, 4, 8),
        (STRICT, 4, 8),
        (STRICT, 1, 4),  # as many busy threads as gVisor's pids budget allows
    ],
    indirect=["worker"],
    ids=["standard-4x8", "strict-4x8", "strict-1x4"],
)
def test_cpu_spin(host: Serve, docker_client: Any, worker: str, processes: int, threads: int) -> None:
    a = attack(host, docker_client, worker, "cpu_spin", processes=processes, threads=threads)
    a.check_host()
    assert a.still_running_then, "the well-behaved task did not complete while the spinner spun"
    a.check("timeout")
    assert a.error["message"] == "killed at the deadline after 5s"
    assert TIMEOUT <= a.task["duration"] < 2 * TIMEOUT  # killed at the deadline, not when something else gave


@pytest.mark.parametrize("stream", ["stdout", "stderr", "side"])
@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_gigabytes_of_output_are_cut_at_the_cap(host: Serve, docker_client: Any, worker: str, stream: str) -> None:
    a = attack(host, docker_client, worker, "flood", stream=stream)
    a.check("failed")
    named = "stdout" if stream == "stdout" else "stderr"  # the side channel is stderr
    assert a.error == {
        "type": "OutputLimitExceeded",
        "message": f"{named} passed its cap of 1 MiB; the container was killed",
        "retriable": False,
    }
    assert a.task["duration"] < TIMEOUT, "killed at the cap, not at the deadline"


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_never_exiting_with_stdout_open_is_a_timeout(host: Serve, docker_client: Any, worker: str) -> None:
    a = attack(host, docker_client, worker, "sleep_forever", partial=True)  # half a result, then nothing
    assert a.still_running_then
    a.check("timeout")
    assert a.error == {"type": "Timeout", "message": "killed at the deadline after 5s", "retriable": False}
    assert TIMEOUT <= a.task["duration"] < 2 * TIMEOUT  # killed at the deadline, not when something else gave


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_ignoring_a_large_stdin_does_not_deadlock(host: Serve, docker_client: Any, worker: str) -> None:
    a = attack(host, docker_client, worker, "ignore_stdin", blob="x" * (4 * MiB))
    a.check("completed", status="completed")
    assert 0 < a.result["read"] <= 4096  # of a task over 4 MiB
    assert a.task["duration"] < TIMEOUT


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_a_child_that_outlives_the_worker_goes_with_its_container(host: Serve, docker_client: Any, worker: str) -> None:
    # The sleeper keeps stdout and stderr open; the container ends with its main process all the same.
    a = attack(host, docker_client, worker, "outlive")
    a.check("completed", status="completed")
    assert a.result["main"] == 1 and a.result["sleeper"] > 1
    assert a.task["duration"] < TIMEOUT, "the host waited for the sleeper"


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_a_result_far_beyond_the_cap(host: Serve, docker_client: Any, worker: str) -> None:
    a = attack(host, docker_client, worker, "big_result", size=5 * MiB)
    a.check("failed")
    assert a.error == {
        "type": "OutputLimitExceeded",
        "message": "stdout passed its cap of 1 MiB; the container was killed",
        "retriable": False,
    }


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_invalid_utf8_on_stdout(host: Serve, docker_client: Any, worker: str) -> None:
    a = attack(host, docker_client, worker, "bad_utf8")
    a.check("failed")
    assert a.error["type"] == "InvalidOutput"
    assert a.error["message"] == "stdout is not one JSON object: '\\xff\\xfe not utf-8 \\xc3('"
    assert a.error["retriable"] is False


# -- attacks on the sandbox: the worker reports what it got --------------------------------


@pytest.mark.parametrize(
    ("worker", "file_mib", "expected"),
    [
        (STANDARD, 0, "ENOSPC"),
        (STANDARD, 4, "ENOSPC"),
        (STRICT, 0, "EFBIG"),  # one file: the fsize ulimit (= the /tmp size) comes first
        (STRICT, 4, "ENOSPC"),  # files of 4 MiB: the tmpfs is full first
    ],
    indirect=["worker"],
    ids=["standard-one-file", "standard-4m-files", "strict-one-file", "strict-4m-files"],
)
def test_filling_tmp(host: Serve, docker_client: Any, worker: str, file_mib: int, expected: str) -> None:
    a = attack(host, docker_client, worker, "fill_tmp", file_mib=file_mib)
    a.check("completed", status="completed")
    assert a.result["error"] == expected, a.result
    assert 15 * MiB <= a.result["written"] <= 16 * MiB, a.result


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_writing_to_the_read_only_root(host: Serve, docker_client: Any, worker: str) -> None:
    a = attack(host, docker_client, worker, "write_root")
    a.check("completed", status="completed")
    refused = a.result
    # /app/data belongs to nobody, the worker's user: only the read-only mount can refuse.
    assert [refused[k] for k in ("create /app/data/x", "mkdir /app/data/d", "chmod /app/data")] == ["EROFS"] * 3
    # Elsewhere, permissions may answer first (gVisor checks them before the mount: EACCES for /x).
    assert set(refused.values()) <= {"EROFS", "EACCES"}, refused


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_the_network(host: Serve, docker_client: Any, worker: str) -> None:
    a = attack(host, docker_client, worker, "network", port=host.port)
    a.check("completed", status="completed")
    net = a.result
    assert net["if_nameindex"] == net["sys_class_net"] == ["lo"]
    # The host's serve port on 127.0.0.1: the container's loopback is its own.
    assert net["loopback"]["error"] == "ECONNREFUSED", net
    # No way out: no route at all (a default route would read destination 00000000).
    assert net["routes"] == [], net


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_the_docker_socket_and_the_hosts_files_and_processes(host: Serve, docker_client: Any, worker: str) -> None:
    assert host.proc is not None
    a = attack(host, docker_client, worker, "escape", serve_pid=host.proc.pid)
    a.check("completed", status="completed")
    seen = a.result
    assert seen["docker_sock_exists"] == [False, False]
    assert seen["docker_sock_connect"] == "ENOENT"
    assert seen["etc_hostname"] != Path("/etc/hostname").read_text().strip()
    assert seen["etc_hostname"] in a.containers[0]  # its own: the container id's first 12 characters
    assert len(seen["pids"]) < 10, seen["pids"]
    assert seen["pid_1"] == "python3 /app/hostile.py"
    assert seen["serve_pid_visible"] is False


@pytest.mark.parametrize("worker", BOTH, indirect=True)
def test_gaining_privileges(host: Serve, docker_client: Any, worker: str) -> None:
    assert host.proc is not None
    a = attack(host, docker_client, worker, "privileges", serve_pid=host.proc.pid)
    a.check("completed", status="completed")
    got = a.result
    assert got["tried"] == {
        "setuid(0)": "EPERM",
        "setgid(0)": "EPERM",
        "mount tmpfs": "EPERM",
        "remount / rw": "EPERM",
        "raw socket": "EPERM",
        "ptrace serve": "ESRCH",  # a pid it cannot see
        "ptrace pid 1": "EPERM",  # itself: pid 1 is the worker
        "chroot": "EPERM",
    }, got
    assert got["uid"] == 65534 and got["pid"] == 1
    assert int(got["status"]["CapEff"], 16) == 0 and int(got["status"]["CapBnd"], 16) == 0
    if worker == STANDARD:
        assert got["status"]["NoNewPrivs"] == "1" and got["status"]["Seccomp"] == "2"
        # Docker's seccomp profile refuses new namespaces to a worker without CAP_SYS_ADMIN.
        assert got["namespaces"] == {"unshare mount ns": "EPERM", "unshare user ns": "EPERM"}
    else:
        # gVisor lets a worker make namespaces: they are the sentry's, not the host kernel's
        # (recorded so that a change is noticed; not a way out by itself).
        assert got["namespaces"] == {"unshare mount ns": "ok", "unshare user ns": "ok"}
