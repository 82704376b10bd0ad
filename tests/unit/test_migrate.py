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
from runner.migrate import Worker, detect_dependencies, detect_python, has_requirements, render_dockerfile

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
        task_manager={"url": "http://tm/api", "poll_interval": 5},
        logging={"level": "debug"},
    )
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 0
    assert f"note: {old}: logging, task_manager.poll_interval: not carried over" in err
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
    old = write_old(root, [good(odd, task_types=[odd, "T"])], task_manager={"url": "http://x/${HOME}", "api_key": odd})
    code, _, err = import_config(capsys, old, root / "out")
    assert code == 0, err
    config = load(root / "out" / "workerhost.toml", environ={"HOME": "/substituted"})
    assert config.workers[0].name == odd
    assert config.workers[0].task_types == [odd, "T"]
    assert config.task_manager.type == "http"
    assert (config.task_manager.url, config.task_manager.api_key) == ("http://x/${HOME}", odd)


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
