"""``workerhost`` as a user runs it: a subprocess, its stdout, its stderr, its exit code."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, new_host_id
from tests.serving import Serve, config_text, executable, free_port

SHIPPED = ROOT / "workerhost.toml"


def workerhost(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """One command, with its own stdin (empty unless given) and a host id of its own."""
    environment = {**os.environ, "WORKERHOST_HOST_ID": new_host_id(), **(env or {})}
    return subprocess.run(
        [executable(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=timeout,
    )


def output(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {done.stdout!r} (stderr: {done.stderr})"
    body: dict[str, Any] = json.loads(lines[0])
    return body


def said(stderr: str) -> str:
    """What a command told its user on stderr: plain lines as they are, JSON log lines by their text."""
    lines = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        lines.append(str(record.get("event", line)) if isinstance(record, dict) else line)
    return "\n".join(lines)


# -- without an engine ----------------------------------------------------------


def test_help_describes_every_command() -> None:
    done = workerhost("--help")
    assert done.returncode == 0
    for command in ("run", "validate", "workers"):
        assert command in done.stdout
    run_help = workerhost("run", "--help")
    assert "PARAMS" in run_help.stdout and "3 timeout" in run_help.stdout


def test_validate_accepts_the_shipped_config() -> None:
    done = workerhost("validate")
    assert done.returncode == 0, done.stderr
    assert "workerhost.toml: valid (3 workers, 3 task types)" in done.stdout


def test_validate_lists_every_mistake_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        """
[host]
concurency = 4

[[workers]]
name = "A"
image = "a:1"
task_types = ["T"]
memory = "lots"

[[workers]]
name = "B"
image = "b:1"
task_types = ["T"]
timeout = "${NO_SUCH_VARIABLE_HERE}"
"""
    )
    done = workerhost("validate", "-c", str(bad))

    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert f"{bad}: host.concurency: unknown key" in lines
    assert any(line.startswith(f"{bad}: workers[0] (A).memory:") and "'lots'" in line for line in lines)
    assert any("workers[1] (B).timeout" in line and "NO_SUCH_VARIABLE_HERE" in line for line in lines)
    assert any("workers[1] (B).task_types" in line and "already belongs to A" in line for line in lines)
    assert "Traceback" not in done.stderr


def test_the_config_path_comes_from_workerhost_config(tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere.toml"
    done = workerhost("validate", env={"WORKERHOST_CONFIG": str(missing)})
    assert done.returncode == 2
    assert f"{missing}: no such file" in done.stderr


def test_an_unknown_task_type_exits_2_with_a_json_error() -> None:
    done = workerhost("run", "No.Such.Type", "{}")
    assert done.returncode == 2
    body = output(done)
    assert body["status"] == "failed"
    assert body["error"]["type"] == "UnknownTaskType"
    assert "PrismQ.Example.Echo" in body["error"]["message"]  # it lists the known ones


@pytest.mark.parametrize("params", ["{not json", "[1, 2]", '"text"'])
def test_invalid_params_exit_2(params: str) -> None:
    done = workerhost("run", "PrismQ.Example.Echo", params)
    assert done.returncode == 2
    assert output(done)["error"]["type"] == "InvalidParams"


def test_an_unreachable_engine_is_said_plainly(tmp_path: Path) -> None:
    params = '{"text": "hi"}'
    done = workerhost("run", "PrismQ.Example.Echo", params, env={"DOCKER_HOST": f"unix://{tmp_path}/nothing.sock"})
    assert done.returncode == 1
    body = output(done)
    assert body["error"]["type"] == "EngineError"
    assert "does not answer" in body["error"]["message"]
    assert "Traceback" not in done.stderr


# -- with the engine ------------------------------------------------------------


@pytest.mark.docker
def test_workers_lists_images_limits_and_task_types(example_images: None) -> None:
    done = workerhost("workers", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    legacy = rows["PrismQ.Legacy.NormalizeTags"]
    assert legacy["image"] == "workerhost/legacy-tags:latest"
    assert legacy["image_present"] is True
    assert (legacy["memory"], legacy["pids_limit"], legacy["network"]) == ("64m", 16, "none")
    assert legacy["task_types"] == ["PrismQ.Legacy.NormalizeTags"]
    assert (legacy["params_schema"], legacy["allow"]) == (None, [])
    assert rows["PrismQ.Example.Echo"]["params_schema"]["required"] == ["text"]
    table = workerhost("workers")
    assert "MEMORY" in table.stdout and "workerhost/text-stats:latest" in table.stdout


@pytest.mark.docker
def test_run_the_python_3_worker(example_images: None) -> None:
    params = {"title": "Tasks in containers", "text": "Containers isolate tasks. Tasks run anywhere."}
    done = workerhost("run", "PrismQ.IdeaInspiration.TextStats", json.dumps(params))

    assert done.returncode == 0, done.stderr
    body = output(done)
    assert set(body) == {"id", "type", "status", "attempts", "result"}
    assert (body["status"], body["attempts"], body["type"]) == ("completed", 1, "PrismQ.IdeaInspiration.TextStats")
    assert body["result"]["words"] == 6
    assert body["result"]["sentences"] == 2
    assert body["result"]["keywords"][:2] == ["tasks", "containers"]


@pytest.mark.docker
def test_run_the_python_2_7_worker(example_images: None) -> None:
    done = workerhost("run", "PrismQ.Legacy.NormalizeTags", '{"tags": ["A b", "a_B", "c"]}')

    assert done.returncode == 0, done.stderr
    result = output(done)["result"]
    assert result["python"].startswith("2.7")
    assert result["tags"] == [{"tag": "a-b", "count": 2}, {"tag": "c", "count": 1}]


@pytest.mark.docker
def test_run_the_shell_worker_with_params_on_stdin(example_images: None) -> None:
    done = workerhost("run", "PrismQ.Example.Echo", "-", stdin='{"text": "quiet please"}')

    assert done.returncode == 0, done.stderr
    result = output(done)["result"]
    assert result["text"] == "QUIET PLEASE"
    assert result["shell"] == "POSIX sh + jq"


@pytest.fixture
def behave_config(tmp_path: Path, behave_image: str, host_id: str) -> Path:
    config = tmp_path / "behave.toml"
    config.write_text(
        f"""
[host]
id = "{host_id}"

[[workers]]
name = "Test.Behave"
image = "{behave_image}"
task_types = ["Test.Behave"]
timeout = "2s"
max_retries = 1
backoff = "50ms"
"""
    )
    return config


@pytest.mark.docker
@pytest.mark.parametrize(
    ("params", "code", "status", "attempts"),
    [
        ({"do": "exit", "code": 1}, 1, "failed", 2),
        ({"do": "exit", "code": 2}, 2, "failed", 1),
        ({"do": "sleep", "seconds": 30}, 3, "timeout", 1),
    ],
)
def test_run_exit_codes_follow_the_outcome(
    behave_config: Path, params: dict[str, Any], code: int, status: str, attempts: int
) -> None:
    done = workerhost("run", "Test.Behave", json.dumps(params), "-c", str(behave_config))

    assert done.returncode == code, done.stderr
    body = output(done)
    assert (body["status"], body["attempts"]) == (status, attempts)
    assert set(body["error"]) == {"type", "message"}
    assert "result" not in body


def test_serve_on_a_port_in_use_says_so_and_claims_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(
            f'[host]\nid = "{new_host_id()}"\nhttp = "127.0.0.1:{port}"\n'
            f'[task_manager]\npath = "{tmp_path / "q.db"}"\n'
            '[[workers]]\nname = "W"\nimage = "w:1"\ntask_types = ["W"]\n'
        )
        done = workerhost("serve", "-c", str(config), timeout=60)

    assert done.returncode == 1
    assert f"cannot serve the API on 127.0.0.1:{port} ([host] http)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "q.db").exists()  # it stopped before opening the queue


def test_serve_with_a_queue_it_cannot_open_says_so_and_exits_1(tmp_path: Path) -> None:
    # A file where the queue's folder should be: no user, root included, can create the database there.
    (tmp_path / "var").write_text("not a folder\n")
    db = tmp_path / "var" / "q.db"
    config = tmp_path / "queue.toml"
    config.write_text(
        f'[host]\nid = "{new_host_id()}"\nhttp = "127.0.0.1:{free_port()}"\n[task_manager]\npath = "{db}"\n'
        '[[workers]]\nname = "W"\nimage = "w:1"\ntask_types = ["W"]\n'
    )
    done = workerhost("serve", "-c", str(config), timeout=60)

    assert done.returncode == 1, done.stderr
    assert f"cannot open the embedded queue at {db}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.docker
def test_doctor_reports_the_engine_and_whether_strict_workers_can_run(docker_client: Any) -> None:
    done = workerhost("doctor")
    runtimes = sorted((docker_client.info().get("Runtimes") or {}).keys())

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Docker " in done.stdout and "cgroups" in done.stdout
    assert all(runtime in done.stdout for runtime in runtimes)
    strict_line = next(line for line in done.stdout.splitlines() if line.startswith("strict workers"))
    if "runsc" in runtimes:
        assert "yes: a container under gVisor ran in" in strict_line
    else:
        assert "make sandbox" in strict_line


@pytest.mark.docker
def test_serve_refuses_a_worker_whose_runtime_the_engine_lacks(tmp_path: Path, docker_client: Any) -> None:
    # A strict worker can only lack gVisor itself (see test_doctor.py); any other runtime says the same.
    config = tmp_path / "odd.toml"
    config.write_text(
        f'[host]\nid = "{new_host_id()}"\nhttp = "127.0.0.1:{free_port()}"\n'
        f'[task_manager]\npath = "{tmp_path / "q.db"}"\n'
        '[[workers]]\nname = "Odd"\nimage = "workerhost/python:3.11"\ntask_types = ["U"]\n'
        'runtime = "runsc-not-registered"\n'
    )
    done = workerhost("serve", "-c", str(config))

    assert done.returncode == 1
    assert "worker Odd: it needs the runtime 'runsc-not-registered'" in done.stderr
    assert "Traceback" not in done.stderr
    doctor = workerhost("doctor", "-c", str(config))
    assert doctor.returncode == 1
    assert "runsc-not-registered" in doctor.stdout


def test_a_strict_worker_on_another_runtime_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "strict.toml"
    config.write_text(
        f'[task_manager]\npath = "{tmp_path / "q.db"}"\n'
        '[[workers]]\nname = "Untrusted"\nimage = "workerhost/python:3.11"\ntask_types = ["U"]\n'
        'sandbox = "strict"\nruntime = "runc"\n'
    )
    for command in ("serve", "validate", "doctor"):
        done = workerhost(command, "-c", str(config))
        assert done.returncode == 2, (command, done.stderr)
        assert (
            f'{config}: workers[0] (Untrusted): runtime = "runc" with sandbox = "strict": strict always runs '
            'under gVisor (runtime "runsc")' in said(done.stderr)
        ), command
    assert not (tmp_path / "q.db").exists()  # serve stopped before it opened anything


# -- opt-ins and params_schema ----------------------------------------------------

OPTED_IN = """
[[workers]]
name = "Net"
image = "workerhost/python:3.11"
task_types = ["Net"]
network = "host"
user = "0:0"
allow = ["host-network", "root"]

[[workers]]
name = "Sidecar"
image = "workerhost/python:3.11"
task_types = ["Sidecar"]
network = "container:proxy"
allow = ["container-network"]
"""


def test_validate_refuses_a_dangerous_setting_without_its_opt_in(tmp_path: Path) -> None:
    config = tmp_path / "root.toml"
    config.write_text('[[workers]]\nname = "Admin"\nimage = "workerhost/python:3.11"\ntask_types = ["A"]\n'
                      'user = "root"\n')  # fmt: skip
    done = workerhost("validate", "-c", str(config))

    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"{config}: workers[0] (Admin).user: root needs an explicit opt-in: ")
    assert 'add allow = ["root"] to this worker if it must' in line
    assert line.endswith("(got 'root')")


def test_validate_prints_what_each_opt_in_gives_away_and_exits_0(tmp_path: Path) -> None:
    config = tmp_path / "opted.toml"
    config.write_text(OPTED_IN)
    done = workerhost("validate", "-c", str(config))

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{config}: valid (2 workers, 2 task types)"
    warnings = done.stderr.strip().splitlines()
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith('warning: worker Net: opted in to "host-network" (network = "host"): ')
    assert "this host's API included" in warnings[0]
    assert warnings[1].startswith('warning: worker Net: opted in to "root" (user = "0:0"): ')
    assert "runs as root inside its container (all capabilities dropped, no-new-privileges" in warnings[1]
    assert warnings[2].startswith(
        'warning: worker Sidecar: opted in to "container-network" (network = "container:proxy"): '
    )


def test_validate_of_the_shipped_config_warns_about_nothing() -> None:
    done = workerhost("validate")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr


@pytest.mark.docker
def test_doctor_shows_each_opt_in(tmp_path: Path, docker_client: Any) -> None:
    config = tmp_path / "opted.toml"
    config.write_text(OPTED_IN)
    done = workerhost("doctor", "-c", str(config))

    opt_ins = [line for line in done.stdout.splitlines() if line.startswith("opt-in")]
    assert len(opt_ins) == 3, done.stdout
    assert 'worker Net: opted in to "host-network" (network = "host")' in opt_ins[0]
    assert 'worker Net: opted in to "root" (user = "0:0")' in opt_ins[1]
    assert 'worker Sidecar: opted in to "container-network"' in opt_ins[2]
    # Opt-ins are warnings, not problems: the engine answers and the image is there, so the config can run.
    assert done.returncode == 0, done.stdout + done.stderr
    assert "problems:" not in done.stdout


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ("{}", "params: 'text' is a required property (rule: required)"),
        ('{"text": 5}', "params.text: 5 is not of type 'string' (rule: properties.text.type)"),
    ],
)
def test_run_refuses_params_against_the_schema_before_the_engine(tmp_path: Path, params: str, says: str) -> None:
    # No engine answers here: a refusal that came after connecting would be an EngineError, exit 1.
    done = workerhost("run", "PrismQ.Example.Echo", params, env={"DOCKER_HOST": f"unix://{tmp_path}/nothing.sock"})

    assert done.returncode == 2, done.stderr
    error = output(done)["error"]
    assert error["type"] == "InvalidParams"
    assert error["message"] == f"PARAMS do not match worker PrismQ.Example.Echo's params_schema:\n  {says}"
    assert says in done.stderr


@pytest.mark.docker
def test_run_refuses_bad_params_and_starts_no_container(docker_client: Any, example_images: None) -> None:
    host = new_host_id()
    began = int(time.time())
    done = workerhost("run", "PrismQ.Example.Echo", '{"txt": "typo"}', env={"WORKERHOST_HOST_ID": host})
    assert done.returncode == 2, done.stderr
    assert "params: 'text' is a required property" in output(done)["error"]["message"]
    # The same command with good params does create one, which the events below must see.
    done = workerhost("run", "PrismQ.Example.Echo", '{"text": "typo fixed"}', env={"WORKERHOST_HOST_ID": host})
    assert done.returncode == 0, done.stderr

    events = docker_client.events(
        since=began, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": "create", "label": f"workerhost.host_id={host}"},
    )  # fmt: skip
    assert len(list(events)) == 1


@pytest.mark.docker
def test_serve_warns_at_start_about_each_opt_in(tmp_path: Path, behave_image: str) -> None:
    port = free_port()
    config = tmp_path / "opted.toml"
    workers = OPTED_IN.replace("workerhost/python:3.11", behave_image)
    config.write_text(config_text(new_host_id(), port, tmp_path / "q.db", behave_image, workers=workers))
    host = Serve(config, port, tmp_path / "serve.log")
    try:
        host.start()
        log = said(host.log.read_text())
    finally:
        host.stop()

    warnings = [line for line in log.splitlines() if "opted in to" in line]
    assert len(warnings) == 3, log
    assert warnings[0].startswith('worker Net: opted in to "host-network" (network = "host"): the worker reaches ')
    assert "this host's API included" in warnings[0]
    assert warnings[1].startswith('worker Net: opted in to "root" (user = "0:0"): ')
    assert warnings[2].startswith('worker Sidecar: opted in to "container-network" (network = "container:proxy")')
    levels = [json.loads(line)["level"] for line in host.log.read_text().splitlines() if "opted in to" in line]
    assert levels == ["warning"] * 3
