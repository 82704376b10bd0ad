"""``workerhost import-config``: PrismQ's YAML in, build contexts and a workerhost.toml out, no Docker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner import cli, migrate
from runner.config import WorkerConfig, load
from runner.errors import ConfigError
from runner.migrate import (
    Calling,
    Worker,
    detect_calling,
    detect_dependencies,
    detect_python,
    has_requirements,
    render_dockerfile,
)

SDK = Path(__file__).resolve().parents[2] / "images" / "sdk"


# -- helpers ---------------------------------------------------------------------------


def make_project(root: Path, files: dict[str, str] | None = None) -> Path:
    """A project folder with a module ``tasks.run(params)`` unless ``files`` says otherwise."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (files if files is not None else {"tasks.py": TASKS}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


TASKS = """\
import sys


def run(params):
    if "fail" in params:
        raise ValueError("asked to fail")
    return {"echo": params, "python": sys.version}


class Handler(object):
    @staticmethod
    def go(params):
        return "went"
"""


def good(name: str = "Good", project: str = "good", **overrides: Any) -> dict[str, Any]:
    worker: dict[str, Any] = {
        "name": name,
        "project_path": project,
        "venv_python": f"{project}/.venv/bin/python3.11",
        "module": "tasks",
        "function": "run",
        "task_types": [name],
        "timeout": 60,
        "max_retries": 2,
    }
    worker.update(overrides)
    return {k: v for k, v in worker.items() if v is not None}


def write_old(tmp_path: Path, workers: Any, task_manager: Any = None, **other: Any) -> Path:
    data: dict[str, Any] = dict(other)
    if task_manager is not None:
        data["task_manager"] = task_manager
    if workers is not None:
        data["workers"] = workers
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def import_config(capsys: pytest.CaptureFixture[str], old: Path, out: Path) -> tuple[int, str, str]:
    code = cli.main(["import-config", str(old), "-o", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the YAML's projects; the working directory is elsewhere, on purpose."""
    make_project(tmp_path / "good")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PIP_CERT", str(tmp_path / "no-such-bundle.pem"))
    return tmp_path


def problem_lines(err: str, old: Path) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{old}: ")]


# -- the whole command ---------------------------------------------------------------


def test_the_brief_example_converts_both_workers(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(root / "srv/summarize", {"summarize/__init__.py": "", "summarize/tasks.py": TASKS})
    make_project(root / "srv/tags", {"tags.py": "def handle(params):\n    print 'py2'\n"})
    old = write_old(
        root,
        [
            good("PrismQ.Text.Summarize", "srv/summarize", module="summarize.tasks", timeout=60, max_retries=3),
            {
                "name": "PrismQ.Legacy.Tags",
                "project_path": "srv/tags",
                "venv_python": "/srv/workers/tags/venv/bin/python2.7",
                "module": "tags",
                "function": "handle",
                "task_types": ["PrismQ.Legacy.Tags"],
            },
        ],
        task_manager={"api_url": "http://localhost/api", "api_key": "secret", "worker_id": "host-1"},
    )
    code, out, err = import_config(capsys, old, root / "imported")

    assert code == 0, err
    assert problem_lines(err, old) == []
    folder = root / "imported" / "workers"
    assert sorted(p.name for p in folder.iterdir()) == ["prismq-legacy-tags", "prismq-text-summarize"]
    for slug in ("prismq-legacy-tags", "prismq-text-summarize"):
        assert {p.name for p in (folder / slug).iterdir()} == {"Dockerfile", "workerhost_entry.py", "project"}
    assert (folder / "prismq-text-summarize/project/summarize/tasks.py").read_text() == TASKS
    assert "FROM workerhost/python:3.11" in (folder / "prismq-text-summarize/Dockerfile").read_text()
    assert "FROM workerhost/python:2.7" in (folder / "prismq-legacy-tags/Dockerfile").read_text()

    assert "PrismQ.Text.Summarize -> workerhost/prismq-text-summarize:latest on workerhost/python:3.11" in out
    assert "PrismQ.Legacy.Tags -> workerhost/prismq-legacy-tags:latest on workerhost/python:2.7" in out
    assert f"docker build -t workerhost/prismq-text-summarize:latest {folder / 'prismq-text-summarize'}" in out
    assert f"docker build -t workerhost/prismq-legacy-tags:latest {folder / 'prismq-legacy-tags'}" in out
    assert f"workerhost validate -c {root / 'imported' / 'workerhost.toml'}" in out

    config = load(root / "imported" / "workerhost.toml", environ={})
    assert config.task_manager.type == "http"
    assert (config.task_manager.url, config.task_manager.api_key, config.task_manager.worker_id) == (
        "http://localhost/api",
        "secret",
        "host-1",
    )
    summarize, tags = config.workers
    assert (summarize.name, summarize.image, summarize.task_types) == (
        "PrismQ.Text.Summarize",
        "workerhost/prismq-text-summarize:latest",
        ["PrismQ.Text.Summarize"],
    )
    assert (summarize.timeout, summarize.max_retries) == (60.0, 3)
    defaults = WorkerConfig(name="x", image="x", task_types=["x"])
    assert (tags.timeout, tags.max_retries) == (defaults.timeout, defaults.max_retries)
    # Every other key at its default: the containers stay as locked down as any worker's.
    for key in ("network", "memory", "user", "cpus", "pids_limit", "concurrency", "command", "env"):
        assert getattr(summarize, key) == getattr(defaults, key), key


def test_the_default_output_folder_is_imported(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(root, [good(project=str(root / "good"))])
    assert cli.main(["import-config", str(old)]) == 0
    assert load(root / "cwd" / "imported" / "workerhost.toml", environ={}).workers[0].name == "Good"


def test_help_explains_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "import-config" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["import-config", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("PrismQ WorkerHost", "OLD.yaml", "-o DIR", "2.7", "0 all converted", "1 some workers failed"):
        assert words in text


# -- each worker on its own ------------------------------------------------------------

MISTAKES = [
    ({"name": None}, "workers[1].name: required but missing"),
    ({"name": 42}, "workers[1].name: expected a non-empty string (got 42)"),
    ({"name": "  "}, "workers[1].name: expected a non-empty string (got '  ')"),
    ({"module": None}, "workers[1] (Bad).module: required but missing"),
    (
        {"module": "my-tasks"},
        "workers[1] (Bad).module: expected a Python name like pkg.module (got 'my-tasks')",
    ),
    ({"function": None}, "workers[1] (Bad).function: required but missing"),
    ({"function": "run()"}, "workers[1] (Bad).function: expected a Python name"),
    ({"task_types": None}, "workers[1] (Bad).task_types: required but missing"),
    ({"task_types": "Bad"}, "workers[1] (Bad).task_types: expected a list of task type names (got 'Bad')"),
    ({"task_types": ["Bad", 3]}, "workers[1] (Bad).task_types: expected a list of task type names (got ['Bad', 3])"),
    ({"task_types": []}, "workers[1] (Bad).task_types: expected at least one task type"),
    ({"project_path": None}, "workers[1] (Bad).project_path: required but missing"),
    ({"project_path": "nowhere"}, "workers[1] (Bad).project_path: {root}/nowhere does not exist"),
    ({"project_path": "good/tasks.py"}, "workers[1] (Bad).project_path: {root}/good/tasks.py is not a folder"),
    ({"venv_python": 3}, "workers[1] (Bad).venv_python: expected a non-empty string (got 3)"),
    ({"timeout": "60s"}, "workers[1] (Bad).timeout: expected a number of seconds (got '60s')"),
    ({"timeout": True}, "workers[1] (Bad).timeout: expected a number of seconds (got True)"),
    ({"timeout": 0}, "workers[1] (Bad).timeout: expected a positive number (got 0)"),
    ({"max_retries": 1.5}, "workers[1] (Bad).max_retries: expected a whole number (got 1.5)"),
    ({"max_retries": -1}, "workers[1] (Bad).max_retries: expected a number >= 0 (got -1)"),
    ({"max_retries": 1000}, "workers[1] (Bad).max_retries: Input should be less than or equal to 100 (got 1000)"),
]


@pytest.mark.parametrize(("change", "message"), MISTAKES, ids=[m for _, m in MISTAKES])
def test_a_bad_worker_is_reported_and_the_rest_still_convert(
    root: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], message: str
) -> None:
    bad = {**good("Bad"), **change}
    old = write_old(root, [good(), {k: v for k, v in bad.items() if v is not None}, good("Also", "good")])
    code, out, err = import_config(capsys, old, root / "out")

    assert code == 1
    lines = problem_lines(err, old)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{old}: {message.format(root=root)}"), err
    assert "Not converted: workers[1]" in err
    assert "Converted 2 of 3 workers" in out
    assert [w.name for w in load(root / "out" / "workerhost.toml", environ={}).workers] == ["Good", "Also"]


def test_a_worker_that_is_not_a_mapping(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(root, [good(), "PrismQ.Text.Summarize"])
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 1
    assert problem_lines(err, old) == [f"{old}: workers[1]: expected a mapping of keys, got 'PrismQ.Text.Summarize'"]


def test_every_mistake_of_a_worker_is_listed_not_only_the_first(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(root, [good(module=None, task_types="X", timeout="1m", project_path="nowhere")])
    code, out, err = import_config(capsys, old, root / "out")
    fields = [line.split(": ")[1].rsplit(".", 1)[1] for line in problem_lines(err, old)]
    assert fields == ["module", "task_types", "project_path", "timeout"]
    assert code == 1
    assert "Converted 0 of 1 workers" in out and "nothing written" in out
    assert not (root / "out").exists()


def test_names_and_task_types_must_stay_unique(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(
        root,
        [good("A", task_types=["T1"]), good("A", task_types=["T2"]), good("B", task_types=["T3", "T1"])],
    )
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 1
    assert problem_lines(err, old) == [
        f"{old}: workers[1] (A).name: a second worker with this name (workers[0] (A) has it)",
        f"{old}: workers[2] (B).task_types: task type 'T1' already belongs to A",
    ]
    assert [w.name for w in load(root / "out" / "workerhost.toml", environ={}).workers] == ["A"]


def test_a_failed_worker_does_not_claim_its_name_or_task_types(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(root, [good("A", module=None), good("A")])
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 1
    assert len(problem_lines(err, old)) == 1
    assert [w.name for w in load(root / "out" / "workerhost.toml", environ={}).workers] == ["A"]


def test_keys_with_no_counterpart_are_noted_not_failed(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(
        root,
        [good(enabled=True)],
        task_manager={"url": "http://tm/api", "type": "http", "poll_interval": 5, "queue": "q"},
        logging={"level": "debug"},
        version="1.0",
    )
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 0
    # type and poll_interval are carried over (their notes say where), version is the file's own.
    assert f"note: {old}: logging, task_manager.queue: not carried over" in err
    assert f"note: {old}: workers[0] (Good): enabled: not carried over" in err


def test_a_module_missing_from_the_project_is_noted(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(root, [good(module="somewhere.else")])
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 0
    assert "module: somewhere.else is not in" in err


# -- the file itself -------------------------------------------------------------------

FATAL = [
    ("missing", None, "no such file"),
    ("invalid", "workers: [\n", "invalid YAML"),
    ("list", "- a\n- b\n", "expected a mapping with a workers list, got list"),
    ("empty file", "", "expected a mapping with a workers list, got NoneType"),
    ("no workers", "task_manager: {url: x}\n", "workers: expected a list of workers, got nothing"),
    ("workers a mapping", "workers: {name: A}\n", "workers: expected a list of workers, got {'name': 'A'}"),
    ("no worker", "workers: []\n", "workers: expected a list of workers, got []"),
]


@pytest.mark.parametrize(("case", "text", "message"), FATAL, ids=[c for c, _, _ in FATAL])
def test_a_file_that_cannot_be_used_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, text: str | None, message: str
) -> None:
    old = tmp_path / "old.yaml"
    if text is not None:
        old.write_text(text)
    code, _, err = import_config(capsys, old, tmp_path / "out")
    assert code == 2
    assert err.strip().startswith(f"{old}: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_existing_config_that_is_not_ours_is_never_overwritten(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (root / "out").mkdir()
    (root / "out" / "workerhost.toml").write_text("# mine\n")
    old = write_old(root, [good()])
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 2
    assert "was not written by import-config" in err
    assert (root / "out" / "workerhost.toml").read_text() == "# mine\n"
    assert not (root / "out" / "workers").exists()


def test_a_worker_folder_that_is_not_ours_is_left_alone(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = root / "out" / "workers" / "good"
    mine.mkdir(parents=True)
    (mine / "Dockerfile").write_text("FROM scratch\n")
    old = write_old(root, [good(), good("Other")])
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 1
    assert f"{old}: workers[0] (Good): cannot write {mine}: {mine} exists and was not written by import-config" in err
    assert (mine / "Dockerfile").read_text() == "FROM scratch\n"
    assert [w.name for w in load(root / "out" / "workerhost.toml", environ={}).workers] == ["Other"]


def test_importing_again_replaces_what_it_wrote(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (root / "good" / "old_module.py").write_text("x = 1\n")
    old = write_old(root, [good()])
    assert import_config(capsys, old, root / "out")[0] == 0
    (root / "good" / "old_module.py").unlink()
    old = write_old(root, [good(timeout=5)])
    assert import_config(capsys, old, root / "out")[0] == 0
    assert not (root / "out" / "workers" / "good" / "project" / "old_module.py").exists()
    assert load(root / "out" / "workerhost.toml", environ={}).workers[0].timeout == 5.0


# -- the task manager and the TOML ---------------------------------------------------------


@pytest.mark.parametrize("key", ["api_url", "url"])
def test_the_task_manager_url_may_be_api_url_or_url(root: Path, capsys: pytest.CaptureFixture[str], key: str) -> None:
    old = write_old(root, [good()], task_manager={key: "http://tm:8000/api", "api_key": 12345})
    assert import_config(capsys, old, root / "out")[0] == 0
    source = load(root / "out" / "workerhost.toml", environ={}).task_manager
    assert source.type == "http"
    assert (source.url, source.api_key, source.worker_id) == ("http://tm:8000/api", "12345", "")


def test_without_a_task_manager_the_embedded_queue_is_used(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(root, [good()])
    assert import_config(capsys, old, root / "out")[0] == 0
    config = load(root / "out" / "workerhost.toml", environ={"WORKERHOST_HOST_ID": "h-7"})
    assert config.task_manager.type == "embedded"
    assert config.host.id == "h-7"


@pytest.mark.parametrize(
    ("task_manager", "message"),
    [
        ({"api_key": "k"}, "task_manager.api_url: required but missing (or url)"),
        ({"api_url": "http://a", "url": "http://b"}, "task_manager.url: differs from api_url; keep one"),
        ({"url": ["x"]}, "task_manager.api_url: expected a URL (got ['x'])"),
        ({"url": "http://a", "worker_id": {"x": 1}}, "task_manager.worker_id: expected a string (got {'x': 1})"),
        ("http://a", "task_manager: expected a mapping (got 'http://a')"),
    ],
)
def test_a_bad_task_manager_is_reported_and_the_workers_still_convert(
    root: Path, capsys: pytest.CaptureFixture[str], task_manager: Any, message: str
) -> None:
    old = write_old(root, [good()], task_manager=task_manager)
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 1
    assert problem_lines(err, old) == [f"{old}: {message}"]
    text = (root / "out" / "workerhost.toml").read_text()
    assert "The old task_manager could not be converted" in text
    assert load(root / "out" / "workerhost.toml", environ={}).task_manager.type == "embedded"


def test_strings_reach_the_config_exactly(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    odd = 'Café ☕ "quoted" back\\slash tab\t del\x7f $HOME ${HOME} $$ 😀'
    plain = "T.$&'()*+,;=:@!~"  # odd, but a PrismQ TaskManager can look it up as it is
    old = write_old(
        root, [good(odd, task_types=[plain, "T"])], task_manager={"url": "http://x/${HOME}", "api_key": odd}
    )
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 0, err
    config = load(root / "out" / "workerhost.toml", environ={"HOME": "/substituted"})
    assert config.workers[0].name == odd
    assert config.workers[0].task_types == [plain, "T"]
    assert config.task_manager.type == "http"
    # The task manager's ${VAR} stay references, read as the old host read them; every other $ is itself.
    substituted = odd.replace("${HOME}", "/substituted")
    assert (config.task_manager.url, config.task_manager.api_key) == ("http://x//substituted", substituted)


def test_slugs_are_image_names_and_stay_distinct(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert migrate.slug("PrismQ.Text.Summarize") == "prismq-text-summarize"
    assert migrate.slug("  Ünïcode__Name!! ") == "n-code-name"
    assert migrate.slug("...") == "worker"
    old = write_old(root, [good("A.B", task_types=["T1"]), good("a-b", task_types=["T2"])])
    assert import_config(capsys, old, root / "out")[0] == 0
    images = [w.image for w in load(root / "out" / "workerhost.toml", environ={}).workers]
    assert images == ["workerhost/a-b:latest", "workerhost/a-b-2:latest"]
    assert (root / "out" / "workers" / "a-b-2" / "Dockerfile").is_file()


# -- which Python ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("venv_python", "version"),
    [
        ("/srv/w/venv/bin/python2.7", "2.7"),
        ("/srv/w/venv/bin/python2", "2.7"),
        ("/srv/w/.venv/bin/python3.11", "3.11"),
        ("/srv/w/.venv/bin/python3.9", "3.11"),
        ("/srv/w/.venv/bin/python3", "3.11"),
        ("/srv/w/.venv/bin/python", "3.11"),
        (None, "3.11"),
    ],
)
def test_python_from_the_venv_interpreter_name(tmp_path: Path, venv_python: str | None, version: str) -> None:
    assert detect_python(venv_python, make_project(tmp_path / "p")).version == version


def test_python_from_the_virtualenv_itself(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    new = project / ".venv"
    (new / "bin").mkdir(parents=True)
    (new / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 2.7.18\n")
    assert detect_python(str(new / "bin" / "python"), project) == migrate.Python(
        "2.7", f"{new} is a Python 2 virtualenv"
    )
    old = project / "ve"  # virtualenv < 20 wrote no pyvenv.cfg
    (old / "lib" / "python2.7").mkdir(parents=True)
    assert detect_python(str(old / "bin" / "python"), project).version == "2.7"
    linked = project / "linked" / "bin"
    linked.mkdir(parents=True)
    (linked / "python2.7").write_text("")
    (linked / "python").symlink_to("python2.7")
    assert detect_python(str(linked / "python"), project) == migrate.Python("2.7", "venv_python is python2.7")


@pytest.mark.parametrize(
    ("files", "version"),
    [
        ({"setup.cfg": "[options]\npython_requires = >=2.7, <3\n"}, "2.7"),
        ({"setup.cfg": "[options]\npython_requires = >=3.8\n"}, "3.11"),
        ({"setup.py": "setup(name='x', python_requires='==2.7.*')\n"}, "2.7"),
        ({"pyproject.toml": '[project]\nname = "x"\nrequires-python = "~=2.7"\n'}, "2.7"),
        ({"pyproject.toml": '[project]\nname = "x"\nrequires-python = ">=2.7"\n'}, "3.11"),
        ({"pyproject.toml": '[project]\nname = "x"\nrequires-python = ">=3.8,<3.12"\n'}, "3.11"),
        ({"pyproject.toml": '[tool.poetry.dependencies]\npython = "^2.7"\n'}, "2.7"),
        ({".python-version": "2.7.18\n"}, "2.7"),
        ({".python-version": "3.11.7\n"}, "3.11"),
        ({"pyproject.toml": "not [toml"}, "3.11"),
    ],
)
def test_python_from_the_project(tmp_path: Path, files: dict[str, str], version: str) -> None:
    project = make_project(tmp_path / "p", files)
    assert detect_python(None, project).version == version
    assert detect_python("/srv/w/.venv/bin/python3", project).version == "3.11"  # the venv's own word wins


# -- dependencies and the Dockerfile ------------------------------------------------------


def worker(project: Path, version: str = "3.11") -> Worker:
    return Worker(
        index=0,
        name="W",
        slug="w",
        project=project,
        venv=None,
        module="tasks",
        function="run",
        task_types=("W",),
        timeout=30.0,
        max_retries=3,
        python=migrate.Python(version, "test"),
        dependencies=detect_dependencies(project),
    )


def stages(dockerfile: str) -> list[list[str]]:
    """The Dockerfile's instructions, without comments, split at each FROM."""
    found: list[list[str]] = []
    for line in dockerfile.splitlines():
        if line.startswith("FROM "):
            found.append([])
        if line.strip() and not line.startswith("#"):
            found[-1].append(line)
    return found


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, "none"),
        ({"requirements.txt": ""}, "none"),
        ({"requirements.txt": "# pinned later\n\n   # nothing yet\n"}, "none"),
        ({"requirements.txt": "# deps\nrequests==2.31\n"}, "requirements"),
        ({"requirements.txt": "-r base.txt\n"}, "requirements"),
        ({"pyproject.toml": '[project]\nname = "x"\nversion = "1"\n'}, "project"),
        ({"pyproject.toml": "[tool.black]\nline-length = 100\n"}, "none"),
        ({"setup.py": "from setuptools import setup\nsetup()\n"}, "project"),
        ({"setup.py": "", "requirements.txt": "# none\n"}, "project"),
        ({"setup.py": "", "requirements.txt": "six\n"}, "requirements"),
    ],
)
def test_what_pip_installs(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    assert detect_dependencies(make_project(tmp_path / "p", files)) == expected


def test_has_requirements() -> None:
    assert not has_requirements("")
    assert not has_requirements("\n  \n# a\n   # b\n")
    assert has_requirements("# a\nsix\n")


@pytest.mark.parametrize("version", ["3.11", "2.7"])
def test_no_requirements_means_no_pip_step(tmp_path: Path, version: str) -> None:
    project = make_project(tmp_path / "p", {"tasks.py": TASKS, "requirements.txt": "# nothing\n"})
    text = render_dockerfile(worker(project, version), tmp_path / "old.yaml")
    assert "pip" not in text.lower()
    python = "python3" if version == "3.11" else "python2.7"
    assert stages(text) == [
        [
            f"FROM workerhost/python:{version}",
            "COPY project /app/project",
            "COPY workerhost_entry.py /app/workerhost_entry.py",
            "WORKDIR /app/project",
            "USER 65534:65534",
            f'CMD ["{python}", "/app/workerhost_entry.py"]',
        ]
    ]


def test_requirements_on_python_3_11(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"requirements.txt": "six\n"})
    deps, final = stages(render_dockerfile(worker(project), tmp_path / "old.yaml"))
    assert deps[:2] == ["FROM workerhost/python:3.11 AS deps", "USER root"]
    text = "\n".join(deps)
    assert "apt-get install -y --no-install-recommends python3-pip" in text
    assert "--break-system-packages -r requirements.txt" in text
    assert "export PIP_CERT=/tmp/pip/pip-cert.pem" in text
    assert final[:2] == ["FROM workerhost/python:3.11", "COPY --from=deps /usr/local /usr/local"]
    assert final[-2:] == ["USER 65534:65534", 'CMD ["python3", "/app/workerhost_entry.py"]']
    assert not any("pip" in line for line in final)  # neither pip nor its CA bundle reach the image


def test_requirements_on_python_2_7(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"requirements.txt": "six==1.16.0\n"})
    deps, final = stages(render_dockerfile(worker(project, "2.7"), tmp_path / "old.yaml"))
    text = "\n".join(deps)
    assert deps[:2] == ["FROM workerhost/python:2.7 AS deps", "USER root"]
    assert "apt-get install -y --no-install-recommends python-pip-whl" in text
    assert "/usr/share/python-wheels/pip-*.whl" in text
    assert '"$1/pip"' in text  # a glob cannot reach inside the wheel: take the file, then its pip
    assert 'python2.7 "$@" install --disable-pip-version-check -r requirements.txt' in text
    assert final[0] == "FROM workerhost/python:2.7"
    assert final[-1] == 'CMD ["python2.7", "/app/workerhost_entry.py"]'
    assert not any("pip" in line for line in final)


def test_a_project_without_requirements_is_installed_itself(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"pyproject.toml": '[project]\nname = "x"\nversion = "1"\n'})
    deps, _ = stages(render_dockerfile(worker(project), tmp_path / "old.yaml"))
    assert deps[-1].strip() == "--break-system-packages ."


def test_the_ca_bundle_goes_next_to_a_dockerfile_that_runs_pip_only(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = root / "bundle.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("PIP_CERT", str(bundle))
    make_project(root / "deps", {"tasks.py": TASKS, "requirements.txt": "six\n"})
    old = write_old(root, [good(), good("Deps", "deps")])
    code, out, _ = import_config(capsys, old, root / "out")
    assert code == 0
    assert (root / "out" / "workers" / "deps" / "pip-cert.pem").read_text() == bundle.read_text()
    assert not (root / "out" / "workers" / "good" / "pip-cert.pem").exists()
    assert "pip will trust the host's CA bundle" in out


# -- the entry script -------------------------------------------------------------------------


def entry_for(tmp_path: Path, function: str = "run", module: str = "tasks") -> Path:
    """A written worker folder, as import-config leaves it: entry script beside project/."""
    project = make_project(tmp_path / "p")
    folder = tmp_path / "w"
    folder.mkdir()
    migrate.copy_project(project, folder / "project")
    entry = folder / migrate.ENTRY
    converted = replace(worker(project), function=function, module=module)
    entry.write_text(migrate.render_entry(converted, tmp_path / "old.yaml"))
    return entry


def run_entry(entry: Path, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    envelope = {"id": "t-1", "type": "W", "params": params, "attempt": 1}
    done = subprocess.run(
        [sys.executable, str(entry)],
        input=json.dumps(envelope),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SDK)},
        cwd=entry.parent.parent,
        timeout=60,
    )
    body: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, body


def test_the_entry_script_compiles_and_names_the_function(tmp_path: Path) -> None:
    text = entry_for(tmp_path, "Handler.go", "pkg.tasks").read_text()
    compile(text, "workerhost_entry.py", "exec")
    assert "import workerhost_sdk as sdk" in text
    assert 'MODULE = "pkg.tasks"' in text and 'FUNCTION = "Handler.go"' in text
    assert "f'" not in text and 'f"' not in text  # Python 2.7 has no f-strings


def test_the_entry_script_calls_the_function_with_the_params(tmp_path: Path) -> None:
    code, body = run_entry(entry_for(tmp_path), {"text": "hi"})
    assert code == 0
    assert body["success"] is True
    assert body["result"]["echo"] == {"text": "hi"}


def test_the_entry_script_reaches_a_dotted_function(tmp_path: Path) -> None:
    assert run_entry(entry_for(tmp_path, "Handler.go"), {}) == (0, {"success": True, "result": "went"})


def test_exceptions_follow_the_sdk_rules(tmp_path: Path) -> None:
    code, body = run_entry(entry_for(tmp_path), {"fail": True})
    assert code == 2
    assert body["error"] == {"type": "ValueError", "message": "asked to fail", "retriable": False}


def test_a_module_that_does_not_import_is_the_task_failure(tmp_path: Path) -> None:
    code, body = run_entry(entry_for(tmp_path, module="no_such_module"), {})
    assert code == 2
    assert body["success"] is False
    assert body["error"]["type"] == "ModuleNotFoundError"


# -- the project copy ----------------------------------------------------------------------


def test_the_copy_leaves_out_virtualenvs_caches_and_git(tmp_path: Path) -> None:
    project = make_project(
        tmp_path / "p",
        {
            "tasks.py": TASKS,
            "tasks.pyc": "bytecode",
            "pkg/__init__.py": "",
            "pkg/__pycache__/x.cpython-311.pyc": "",
            "env/__init__.py": "# a package named env is code",
            "data/words.txt": "a b",
            ".venv/bin/python3": "",
            "venv/lib/python2.7/site.py": "",
            ".git/HEAD": "ref",
            "py27env/pyvenv.cfg": "version = 2.7.18",
            "ve/bin/activate": "# virtualenv < 20",
        },
    )
    (project / "tasks.py").chmod(0o600)
    migrate.copy_project(project, tmp_path / "copy")
    copied = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*"))
    assert copied == ["data", "data/words.txt", "env", "env/__init__.py", "pkg", "pkg/__init__.py", "tasks.py"]
    assert (tmp_path / "copy" / "tasks.py").stat().st_mode & 0o444 == 0o444  # containers run as nobody


def test_an_output_folder_inside_the_project_is_not_copied_into_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_project(tmp_path)
    monkeypatch.setenv("PIP_CERT", str(tmp_path / "none"))
    old = write_old(tmp_path, [good(project=".")])
    code, _, err = import_config(capsys, old, tmp_path / "imported")
    assert code == 0, err
    copied = tmp_path / "imported" / "workers" / "good" / "project"
    assert (copied / "tasks.py").is_file()
    assert (copied / "old.yaml").is_file()
    assert not (copied / "imported").exists()


# -- PrismQ WorkerHost's published config ----------------------------------------------------
#
# Shaped like its workerhost_config.yaml: an http task manager whose api_key is a ${VAR},
# poll_interval, timeout, max_retries and retry_backoff; workers with metadata (python_version,
# dependencies), one with a Windows venv_python; monitoring; advanced resource limits and pool.

CLASSIFIER = """\
import idna
import six


def classify(params):
    return {"host": idna.encode(params["host"]).decode("ascii"), "six": six.__version__}
"""

# PrismQ WorkerHost's worker template: main() takes nothing, reads the task from stdin,
# prints the result and exits with its own code. Python 2.7 and 3 alike.
TEMPLATE = """\
#!/usr/bin/env python3
import sys
import json


def process_task(task):
    if task["params"].get("fail"):
        error = {"type": "Refused", "message": "asked to fail", "retriable": False}
        print(json.dumps({"success": False, "error": error}))
        sys.exit(2)
    return {"processed": task["id"], "type": task["type"], "params": task["params"]}


def main():
    # 1. Read task from stdin
    task = json.loads(sys.stdin.read())
    # 2. Execute business logic
    result = process_task(task)
    # 3. Write result to stdout
    print(json.dumps({"success": True, "result": result}))
    # 4. Exit with success code
    sys.exit(0)


if __name__ == "__main__":
    main()
"""

WINDOWS_PYTHON = "C:\\PrismQ\\Classifier\\venv\\Scripts\\python.exe"


def published_workers() -> list[dict[str, Any]]:
    return [
        {
            "name": "PrismQ.Classifier",
            "project_path": "./Classifier",
            "venv_python": WINDOWS_PYTHON,
            "module": "src.workers.classifier",
            "function": "classify",
            "task_types": ["PrismQ.Classify"],
            "timeout": 300,
            "max_retries": 2,
            "metadata": {"description": "Classifies", "python_version": "3.10", "dependencies": ["six", "idna"]},
        },
        {
            "name": "PrismQ.Template",
            "project_path": "./Template",
            "venv_python": "./Template/venv/bin/python",
            "module": "worker",
            "function": "main",
            "task_types": ["PrismQ.Template"],
            "timeout": 60,
            "max_retries": 3,
            "metadata": {"python_version": "3.11", "dependencies": []},
        },
    ]


PUBLISHED: dict[str, Any] = {
    "version": "1.0",
    "task_manager": {
        "type": "http",
        "url": "https://api.prismq.nomoos.cz/api",
        "api_key": "${TASKMANAGER_API_KEY}",
        "poll_interval": 5,
        "timeout": 30,
        "max_retries": 3,
        "retry_backoff": 2,
    },
    "monitoring": {
        "enable_health_check": True,
        "health_check_port": 8080,
        "enable_metrics": True,
        "metrics_port": 9090,
        "log_level": "INFO",
    },
    "advanced": {
        "worker_pool": {"enabled": False, "min_workers": 1, "max_workers": 4},
        "resource_limits": {"max_memory_mb": 2048, "max_cpu_percent": 80},
    },
}


def published(root: Path, **changes: Any) -> Path:
    """The published config and its two projects under ``root``; ``changes`` replace top-level keys."""
    make_project(
        root / "Classifier",
        {"src/__init__.py": "", "src/workers/__init__.py": "", "src/workers/classifier.py": CLASSIFIER},
    )
    make_project(root / "Template", {"worker.py": TEMPLATE})
    data = {**PUBLISHED, "workers": published_workers(), **changes}
    path = root / "workerhost_config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


def test_the_published_config_carries_every_setting_workerhost_has(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = published(root)
    code, out, err = import_config(capsys, old, root / "out")
    assert code == 0, err
    assert problem_lines(err, old) == []
    config = load(root / "out" / "workerhost.toml", environ={"TASKMANAGER_API_KEY": "from-env"})
    assert config.host.http == "127.0.0.1:8080"  # monitoring's health check port
    assert config.host.poll_max == 5.0  # task_manager.poll_interval
    manager = config.task_manager
    assert manager.type == "http"
    assert (manager.url, manager.api_key, manager.request_timeout) == (
        "https://api.prismq.nomoos.cz/api",
        "from-env",
        30.0,
    )
    classifier, template = config.workers
    for worker in (classifier, template):
        assert worker.backoff == 2.0  # task_manager.retry_backoff
        assert worker.memory == 2048 * 1024**2  # advanced.resource_limits.max_memory_mb
        assert worker.network == "none"
    assert (classifier.timeout, classifier.max_retries) == (300.0, 2)
    assert (template.timeout, template.max_retries) == (60.0, 3)

    assert (
        "PrismQ.Classifier -> workerhost/prismq-classifier:latest on workerhost/python:3.11 "
        "(metadata.python_version asks for 3.10; the Python 3 base is 3.11; "
        "pip installs metadata.dependencies (six, idna); calls classify(params))"
    ) in out
    assert (
        "PrismQ.Template -> workerhost/prismq-template:latest on workerhost/python:3.11 "
        "(metadata.python_version asks for 3.11; nothing to install; "
        "runs main(), which reads the task and writes the result itself)"
    ) in out
    assert "It reads TASKMANAGER_API_KEY from the environment, as the old host did: set it" in out
    assert "the default: nothing says Python 2" not in out


def test_each_carried_setting_is_noted_with_its_workerhost_key(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = published(root)
    _, _, err = import_config(capsys, old, root / "out")
    notes = [line.removeprefix(f"note: {old}: ") for line in err.splitlines() if line.startswith("note: ")]
    expected = [
        "task_manager.poll_interval 5s is [host] poll_max",
        "task_manager.timeout 30s is [task_manager] request_timeout",
        "task_manager.retry_backoff 2s is every worker's backoff",
        "task_manager.max_retries: not carried over: the TaskManager server owns retries",
        "monitoring.log_level: not carried over",
        'monitoring\'s health check port 8080 is [host] http = "127.0.0.1:8080"',
        "monitoring's metrics port 9090 is not a port of its own: `workerhost serve` serves Prometheus "
        "metrics at GET /metrics on [host] http (127.0.0.1:8080)",
        'advanced.resource_limits.max_memory_mb 2048 is every worker\'s memory = "2048m"',
        "advanced.resource_limits.max_cpu_percent: not carried over",
        "advanced.worker_pool (disabled): not carried over: workerhost has no pool of workers",
        "workers[0] (PrismQ.Classifier).metadata.description: not carried over",
        f"workers[0] (PrismQ.Classifier).venv_python: {WINDOWS_PYTHON} is a Windows path",
    ]
    for start in expected:
        assert sum(note.startswith(start) for note in notes) == 1, (start, notes)
    assert len(notes) == len(expected), notes
    assert "prewarming" in err  # what worker_pool maps to, once workerhost has it
    # What is carried over (task_manager.type among it) is never listed as not carried over.
    dropped = {k for note in notes if ": not carried over" in note for k in note.split(": ")[0].split(", ")}
    assert dropped == {
        "task_manager.max_retries",
        "monitoring.log_level",
        "advanced.resource_limits.max_cpu_percent",
        "advanced.worker_pool (disabled)",
        "workers[0] (PrismQ.Classifier).metadata.description",
    }


def test_the_retry_backoff_note_says_when_it_counts(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = published(root)
    _, _, err = import_config(capsys, old, root / "out")
    assert "the TaskManager server owns retries, so it counts only when these workers take tasks" in err
    manager = {k: v for k, v in PUBLISHED["task_manager"].items() if k != "url"}  # cannot convert
    old = published(root, task_manager=manager)
    code, _, err = import_config(capsys, old, root / "out2")
    assert code == 1
    assert (
        f"note: {old}: task_manager.retry_backoff 2s is every worker's backoff (the first retry's delay, doubling)\n"
        in err
    )
    assert f"note: {old}: task_manager.timeout: not carried over: the task manager could not be converted" in err
    config = load(root / "out2" / "workerhost.toml", environ={})
    assert config.task_manager.type == "embedded"
    assert config.workers[0].backoff == 2.0 and config.host.poll_max == 5.0


def test_the_api_key_reference_stays_a_reference(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = published(root)
    code, _, err = import_config(capsys, old, root / "out")  # TASKMANAGER_API_KEY need not be set here
    assert code == 0, err
    text = (root / "out" / "workerhost.toml").read_text()
    assert 'api_key = "${TASKMANAGER_API_KEY}"' in text
    assert "$${" not in text
    with pytest.raises(ConfigError, match="environment variable TASKMANAGER_API_KEY is not set"):
        load(root / "out" / "workerhost.toml", environ={})
    assert load(root / "out" / "workerhost.toml", environ={"TASKMANAGER_API_KEY": "k"}).task_manager.api_key == "k"


@pytest.mark.parametrize(
    ("api_key", "environ", "read"),
    [
        ("${TASKMANAGER_API_KEY}", {"TASKMANAGER_API_KEY": "k1"}, "k1"),
        ("${TASKMANAGER_API_KEY:-fallback}", {}, "fallback"),
        ("pa$word-${KEY}", {"KEY": "x"}, "pa$word-x"),  # a lone $ is itself, as it was
        ("$${KEY} $5 ${not a var}", {"KEY": "x"}, "$x $5 ${not a var}"),
        ("plain", {}, "plain"),
    ],
)
def test_task_manager_strings_keep_references_and_nothing_else(
    root: Path, capsys: pytest.CaptureFixture[str], api_key: str, environ: dict[str, str], read: str
) -> None:
    old = write_old(
        root, [good()], task_manager={"url": "http://tm/api", "api_key": api_key, "worker_id": "${HOST:-h}"}
    )
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 0, err
    manager = load(root / "out" / "workerhost.toml", environ=environ).task_manager
    assert (manager.api_key, manager.worker_id) == (read, "h")


def test_a_task_manager_that_is_not_http_is_reported(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(root, [good()], task_manager={"type": "amqp", "url": "amqp://mq"})
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 1
    assert problem_lines(err, old) == [f"{old}: task_manager.type: only an http task manager converts (got 'amqp')"]
    assert load(root / "out" / "workerhost.toml", environ={}).task_manager.type == "embedded"
    old = write_old(root, [good()], task_manager={"type": "HTTP", "url": "http://tm"})
    assert import_config(capsys, old, root / "out")[0] == 0


@pytest.mark.parametrize(
    ("monitoring", "http", "notes"),
    [
        (
            {"health_check": {"enabled": True, "port": 8081}, "metrics": {"enabled": True, "port": 9091}},
            "127.0.0.1:8081",
            2,
        ),
        ({"enable_health_check": False, "health_check_port": 8080, "metrics_port": 9090}, "127.0.0.1:9090", 1),
        ({"health_check": {"enabled": False, "port": 8080}, "metrics": {"enabled": False, "port": 9090}}, None, 0),
        ({"health_check_port": 8080}, "127.0.0.1:8080", 1),
        ({}, None, 0),
    ],
)
def test_the_monitoring_port_becomes_the_api_port(
    root: Path, capsys: pytest.CaptureFixture[str], monitoring: dict[str, Any], http: str | None, notes: int
) -> None:
    old = write_old(root, [good()], monitoring=monitoring)
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 0, err
    config = load(root / "out" / "workerhost.toml", environ={})
    assert config.host.http == (http or "127.0.0.1:8080")  # None: workerhost's default
    assert ('http = "' in (root / "out" / "workerhost.toml").read_text()) == (http is not None)
    assert err.count("monitoring's") == notes


def test_a_pool_that_was_enabled_is_noted_too(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(root, [good()], advanced={"worker_pool": {"enabled": True, "max_workers": 8}, "retries": 1})
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 0
    assert f"note: {old}: advanced.worker_pool (enabled): not carried over" in err and "prewarming" in err
    assert f"note: {old}: advanced.retries: not carried over" in err
    assert load(root / "out" / "workerhost.toml", environ={}).workers[0].memory == 256 * 1024**2


BAD_SETTINGS = [
    (
        {"task_manager": {"url": "http://tm", "poll_interval": "5s"}},
        "task_manager.poll_interval: expected a positive number of seconds (got '5s')",
    ),
    (
        {"task_manager": {"url": "http://tm", "timeout": 0}},
        "task_manager.timeout: expected a positive number of seconds (got 0)",
    ),
    (
        {"task_manager": {"url": "http://tm", "retry_backoff": True}},
        "task_manager.retry_backoff: expected a positive number of seconds (got True)",
    ),
    (
        {"monitoring": {"health_check_port": 70000}},
        "monitoring.health_check_port: expected a port number from 1 to 65535 (got 70000)",
    ),
    (
        {"monitoring": {"metrics": {"port": "9090"}}},
        "monitoring.metrics.port: expected a port number from 1 to 65535 (got '9090')",
    ),
    ({"monitoring": "on"}, "monitoring: expected a mapping (got 'on')"),
    (
        {"advanced": {"resource_limits": {"max_memory_mb": "2GB"}}},
        "advanced.resource_limits.max_memory_mb: expected a whole number of MiB (got '2GB')",
    ),
    (
        {"advanced": {"resource_limits": {"max_memory_mb": 0}}},
        "advanced.resource_limits.max_memory_mb: expected a whole number of MiB (got 0)",
    ),
    ({"advanced": {"resource_limits": 2048}}, "advanced.resource_limits: expected a mapping (got 2048)"),
]


@pytest.mark.parametrize(("other", "message"), BAD_SETTINGS, ids=[m.split(":")[0] for _, m in BAD_SETTINGS])
def test_a_bad_setting_is_reported_and_the_workers_still_convert(
    root: Path, capsys: pytest.CaptureFixture[str], other: dict[str, Any], message: str
) -> None:
    task_manager = other.pop("task_manager", None)
    old = write_old(root, [good()], task_manager=task_manager, **other)
    code, out, err = import_config(capsys, old, root / "out")
    assert code == 1
    assert problem_lines(err, old) == [f"{old}: {message}"]
    assert "Converted 1 of 1 workers" in out
    config = load(root / "out" / "workerhost.toml", environ={})
    defaults = WorkerConfig(name="x", image="x", task_types=["x"])
    assert (config.workers[0].memory, config.workers[0].backoff) == (defaults.memory, defaults.backoff)


# -- metadata: python_version and dependencies ----------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "version", "reason"),
    [
        ("3.10", "3.11", "metadata.python_version asks for 3.10; the Python 3 base is 3.11"),
        ("3.11", "3.11", "metadata.python_version asks for 3.11"),
        ("3.11.4", "3.11", "metadata.python_version asks for 3.11.4"),
        ("3.12", "3.11", "metadata.python_version asks for 3.12; the Python 3 base is 3.11"),
        ("3", "3.11", "metadata.python_version asks for 3"),
        ("2.7", "2.7", "metadata.python_version asks for 2.7"),
        ("2", "2.7", "metadata.python_version asks for 2"),
        ("2.6", "2.7", "metadata.python_version asks for 2.6; the Python 2 base is 2.7"),
    ],
)
def test_python_from_metadata_says_what_was_asked_and_what_runs(
    tmp_path: Path, asked: str, version: str, reason: str
) -> None:
    project = make_project(tmp_path / "p", {"setup.cfg": "[options]\npython_requires = >=2.7, <3\n"})
    assert detect_python(None, project, asked=asked) == migrate.Python(version, reason)  # above the project's word
    assert detect_python("venv/bin/python", project, tmp_path, asked) == migrate.Python(version, reason)


def test_the_virtualenv_speaks_before_metadata(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    assert detect_python("/srv/venv/bin/python2.7", project, asked="3.10") == migrate.Python(
        "2.7", "venv_python is python2.7"
    )
    assert detect_python("/srv/venv/bin/python3.9", project, asked="3.10") == migrate.Python(
        "3.11", "venv_python is python3.9; the Python 3 base is 3.11"
    )


def test_a_windows_venv_python(tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = make_project(tmp_path / "p")
    assert detect_python(WINDOWS_PYTHON, project, asked="3.10").version == "3.11"
    assert detect_python("C:\\Python27\\venv\\Scripts\\python2.7.exe", project).reason == "venv_python is python2.7"
    assert detect_python(WINDOWS_PYTHON, project).reason == "the default: nothing says Python 2"
    # A relative one is looked for on this machine, like a POSIX one.
    venv = make_project(root / "good" / "venv", {"pyvenv.cfg": "version = 2.7.18\n", "Scripts/python.exe": ""})
    old = write_old(root, [good(venv_python="good\\venv\\Scripts\\python.exe")])
    code, out, err = import_config(capsys, old, root / "out")
    assert code == 0, err
    assert f"on workerhost/python:2.7 ({venv} is a Python 2 virtualenv" in out
    assert "Windows path" not in err  # it is here
    assert not (root / "out" / "workers" / "good" / "project" / "venv").exists()


def test_a_version_written_as_a_number_is_noted(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old(root, [good(metadata={"python_version": 3.1})])
    code, out, err = import_config(capsys, old, root / "out")
    assert code == 0
    assert "YAML reads 3.10 as 3.1: quote it" in err
    assert "on workerhost/python:3.11 (venv_python is python3.11;" in out  # the venv speaks first


METADATA_MISTAKES = [
    (
        {"python_version": "banana"},
        'metadata.python_version: expected a Python version like "3.10" or "2.7" (got \'banana\')',
    ),
    ({"python_version": 4}, 'metadata.python_version: expected a Python version like "3.10" or "2.7" (got 4)'),
    ({"python_version": True}, "metadata.python_version: expected a Python version"),
    (
        {"dependencies": "six idna"},
        "metadata.dependencies: expected a list of requirements like \"six>=1.16\" (got 'six idna')",
    ),
    ({"dependencies": ["six", 1]}, "metadata.dependencies: expected a list of requirements"),
    (
        {"dependencies": ["-e ."]},
        "metadata.dependencies: expected requirements, not pip options or blank lines (got '-e .')",
    ),
    (
        {"dependencies": ["six", "--index-url=http://evil"]},
        "metadata.dependencies: expected requirements, not pip options",
    ),
    ({"dependencies": ["six\n-r /etc/passwd"]}, "metadata.dependencies: expected requirements, not pip options"),
    (
        {"dependencies": ["  "]},
        "metadata.dependencies: expected requirements, not pip options or blank lines (got '  ')",
    ),
]


@pytest.mark.parametrize(("metadata", "message"), METADATA_MISTAKES, ids=[m for _, m in METADATA_MISTAKES])
def test_bad_metadata_fails_its_worker(
    root: Path, capsys: pytest.CaptureFixture[str], metadata: dict[str, Any], message: str
) -> None:
    old = write_old(root, [good(), good("Bad", metadata=metadata)])
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 1
    lines = problem_lines(err, old)
    assert len(lines) == 1 and lines[0].startswith(f"{old}: workers[1] (Bad).{message}"), err
    old = write_old(root, [good(metadata="x")])
    assert problem_lines(import_config(capsys, old, root / "out")[2], old) == [
        f"{old}: workers[0] (Good).metadata: expected a mapping (got 'x')"
    ]


def test_metadata_dependencies_are_pip_installed(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = root / "bundle.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("PIP_CERT", str(bundle))
    make_project(root / "reqs", {"tasks.py": TASKS, "requirements.txt": "six\n"})
    old = write_old(
        root,
        [
            good(metadata={"dependencies": ["idna>=3", "six; python_version >= '3'"]}),
            good("Reqs", "reqs", metadata={"dependencies": ["idna"]}),
            good("Py2", metadata={"dependencies": ["six==1.16.0"]}, venv_python="/srv/venv/bin/python2.7"),
            good("None", metadata={"dependencies": []}),
        ],
    )
    code, out, err = import_config(capsys, old, root / "out")
    assert code == 0, err
    folder = root / "out" / "workers"
    assert (folder / "good" / "metadata-requirements.txt").read_text().splitlines()[1:] == [
        "idna>=3",
        "six; python_version >= '3'",
    ]
    assert (folder / "good" / "pip-cert.pem").is_file()  # the CA bundle goes where pip runs
    deps, final = stages((folder / "good" / "Dockerfile").read_text())
    assert "COPY workerhost_entry.py metadata-requirements.txt pip-cert.pe[m] /tmp/pip/" in deps
    assert deps[-1].strip() == "--break-system-packages -r /tmp/pip/metadata-requirements.txt"
    assert final[1] == "COPY --from=deps /usr/local /usr/local"
    assert not any("pip" in line or "metadata-requirements" in line for line in final)
    deps, _ = stages((folder / "reqs" / "Dockerfile").read_text())
    assert deps[-1].strip() == "--break-system-packages -r requirements.txt -r /tmp/pip/metadata-requirements.txt"
    deps, _ = stages((folder / "py2" / "Dockerfile").read_text())
    assert 'python2.7 "$@" install --disable-pip-version-check -r /tmp/pip/metadata-requirements.txt' in "\n".join(deps)
    assert len(stages((folder / "none" / "Dockerfile").read_text())) == 1  # nothing to install: no pip stage
    assert not (folder / "none" / "metadata-requirements.txt").exists()
    assert (
        "Good -> workerhost/good:latest on workerhost/python:3.11 (venv_python is python3.11; pip installs "
        "metadata.dependencies (idna>=3, six; python_version >= '3'); calls run(params))" in out
    )
    assert "pip installs requirements.txt and metadata.dependencies (idna)" in out
    assert (
        "None -> workerhost/none:latest on workerhost/python:3.11 (venv_python is python3.11; nothing to install" in out
    )


# -- how the function is called ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "function", "mode"),
    [
        (TEMPLATE, "main", "protocol"),
        ("def main(*, verbose=False):\n    pass\n", "main", "protocol"),
        ("def run(params):\n    pass\n", "run", "params"),
        ("def run(params, /):\n    pass\n", "run", "params"),
        ("def run(*args):\n    pass\n", "run", "params"),
        ("def main(argv=None):\n    pass\n", "main", "params"),  # it can take them: it gets them
        ("import functools\n@functools.lru_cache\ndef main():\n    pass\n", "main", "auto"),
        ("def main():\n    pass\nmain = lambda params: params\n", "main", "auto"),
        ("try:\n    from fast import main\nexcept ImportError:\n    def main():\n        pass\n", "main", "auto"),
        ("from elsewhere import main\n", "main", "auto"),
        ("class main(object):\n    pass\n", "main", "auto"),
        ("def main():\n    print 'python 2'\n", "main", "auto"),  # not Python 3: by its signature at run time
        ("def other():\n    pass\n", "main", "auto"),
    ],
)
def test_how_the_function_is_called_from_its_source(tmp_path: Path, source: str, function: str, mode: str) -> None:
    project = make_project(tmp_path / "p", {"worker.py": source})
    assert detect_calling(project, "worker", function).mode == mode


def test_what_cannot_be_read_is_decided_at_run_time(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"pkg/__init__.py": "", "pkg/tasks.py": TASKS})
    assert detect_calling(project, "pkg.tasks", "run") == Calling("params", "run() takes the params")
    assert detect_calling(project, "pkg.tasks", "Handler.go").mode == "auto"
    assert detect_calling(project, "installed.elsewhere", "run").mode == "auto"


def entry_with(tmp_path: Path, source: str, function: str = "main", mode: str | None = None) -> Path:
    """A worker folder for ``worker.py`` holding ``source``; how it is called decided as import-config does."""
    project = make_project(tmp_path / "p", {"worker.py": source})
    folder = tmp_path / "w"
    folder.mkdir()
    migrate.copy_project(project, folder / "project")
    calling = detect_calling(project, "worker", function)
    converted = replace(
        worker(project), module="worker", function=function, calling=Calling(mode, "test") if mode else calling
    )
    entry = folder / migrate.ENTRY
    entry.write_text(migrate.render_entry(converted, tmp_path / "old.yaml"))
    return entry


def run_raw(entry: Path, params: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    envelope = {"id": "t-1", "type": "W", "params": params, "attempt": 1}
    return subprocess.run(
        [sys.executable, str(entry)],
        input=json.dumps(envelope),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SDK)},
        cwd=entry.parent.parent,
        timeout=60,
    )


def test_a_template_main_runs_as_it_is(tmp_path: Path) -> None:
    entry = entry_with(tmp_path, TEMPLATE)
    assert 'CALLING = "protocol"' in entry.read_text()
    done = run_raw(entry, {"text": "hi"})
    assert done.returncode == 0, done.stderr
    # Its stdout, byte for byte: the envelope it read is workerhost's (id, type, params, ...).
    result = {"processed": "t-1", "type": "W", "params": {"text": "hi"}}
    assert done.stdout == json.dumps({"success": True, "result": result}) + "\n"


def test_a_template_main_keeps_its_own_failure_and_exit_code(tmp_path: Path) -> None:
    done = run_raw(entry_with(tmp_path, TEMPLATE), {"fail": True})
    assert done.returncode == 2
    error = {"type": "Refused", "message": "asked to fail", "retriable": False}
    assert done.stdout == json.dumps({"success": False, "error": error}) + "\n"


def test_a_number_main_returns_is_its_exit_code(tmp_path: Path) -> None:
    source = "import sys\n\ndef main():\n    sys.stdin.read()\n    print('{\"success\": false}')\n    return 3\n"
    done = run_raw(entry_with(tmp_path, source), {})
    assert (done.returncode, done.stdout) == (3, '{"success": false}\n')


AUTO = """\
import functools
import json
import sys


def wrapped(function):
    @functools.wraps(function)
    def wrapper(*args):
        return function(*args)
    return wrapper


@wrapped
def main():
    task = json.load(sys.stdin)
    print(json.dumps({"success": True, "result": "main read " + task["id"]}))


@wrapped
def run(params):
    return {"run got": params}
"""


@pytest.mark.parametrize(
    ("function", "body"),
    [
        ("main", {"success": True, "result": "main read t-1"}),
        ("run", {"success": True, "result": {"run got": {"a": 1}}}),
    ],
)
def test_auto_goes_by_the_signature_of_what_imports(tmp_path: Path, function: str, body: dict[str, Any]) -> None:
    entry = entry_with(tmp_path, AUTO, function)
    assert 'CALLING = "auto"' in entry.read_text()  # decorated: the source cannot tell
    done = run_raw(entry, {"a": 1})
    assert (done.returncode, json.loads(done.stdout)) == (0, body), done.stderr


@pytest.mark.parametrize("function", ["main", "run"])
def test_what_a_module_prints_as_it_imports_goes_to_stderr(tmp_path: Path, function: str) -> None:
    source = "print('importing')\n" + TEMPLATE + "\n\ndef run(params):\n    return 'ran'\n"
    done = run_raw(entry_with(tmp_path, source, function), {})
    assert done.returncode == 0
    assert json.loads(done.stdout)["success"] is True
    assert "importing" in done.stderr


def test_a_protocol_main_that_does_not_import_fails_by_the_sdk_rules(tmp_path: Path) -> None:
    done = run_raw(entry_with(tmp_path, "import no_such_module\n\ndef main():\n    pass\n"), {})
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"]["type"] == "ModuleNotFoundError"


def test_a_task_type_the_task_manager_cannot_look_up_is_that_workers_problem(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = write_old(root, [good("Spaced", task_types=["H1 Space"]), good("Fine", task_types=["T"])])
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 1  # some workers failed; the others still convert
    assert "workers[0] (Spaced).task_types: task type 'H1 Space' cannot be looked up" in err
    assert [w.name for w in load(root / "out" / "workerhost.toml", environ={}).workers] == ["Fine"]
