"""``workerhost import-config`` end to end: a PrismQ WorkerHost setup in, images built, one task through each."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import new_host_id
from tests.serving import executable

pytestmark = pytest.mark.docker

SUMMARIZE = '''\
"""A Python 3 PrismQ worker: counts words."""
import sys


def run(params: dict) -> dict:
    words = params["text"].split()
    print(f"counted {len(words)} words", file=sys.stderr)
    return {"words": len(words), "python": sys.version}
'''

# Genuine Python 2: the print statement and dict.iteritems make it a SyntaxError
# or an AttributeError on Python 3.
TAGS = '''\
"""A legacy PrismQ worker, never ported to Python 3."""
import sys


def handle(params):
    counts = params.get("counts")
    if not isinstance(counts, dict):
        raise ValueError("params.counts must be an object")
    kept = sorted(tag for tag, count in counts.iteritems() if count >= 2)
    print >>sys.stderr, "kept %d of %d tags" % (len(kept), len(counts))
    return {"kept": kept, "python": sys.version}
'''

WORKERS = {"prismq-text-summarize": "PrismQ.Text.Summarize", "prismq-legacy-tags": "PrismQ.Legacy.Tags"}


@dataclass
class Imported:
    root: Path
    config: Path
    done: subprocess.CompletedProcess[str]


def workerhost(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "WORKERHOST_HOST_ID": new_host_id()}
    return subprocess.run([executable(), *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=300)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture(scope="module")
def imported(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Imported]:
    """The sample setup imported, its images built as workerhost-test/imported-*, and a config naming them."""
    root = tmp_path_factory.mktemp("prismq")
    write(root / "workers/summarize/summarize/__init__.py", "")
    write(root / "workers/summarize/summarize/tasks.py", SUMMARIZE)
    write(root / "workers/summarize/requirements.txt", "")
    write(root / "workers/summarize/.venv/bin/python3.11", "")  # left behind by the copy
    write(root / "workers/tags/tags.py", TAGS)
    write(root / "workers/tags/requirements.txt", "# nothing beyond the standard library\n")
    old = {
        "task_manager": {"api_url": "http://taskmanager.local/api", "api_key": "secret", "worker_id": "host-1"},
        "workers": [
            {
                "name": "PrismQ.Text.Summarize",
                "project_path": str(root / "workers/summarize"),
                "venv_python": str(root / "workers/summarize/.venv/bin/python3.11"),
                "module": "summarize.tasks",
                "function": "run",
                "task_types": ["PrismQ.Text.Summarize"],
                "timeout": 60,
                "max_retries": 3,
            },
            {
                "name": "PrismQ.Legacy.Tags",
                "project_path": "workers/tags",
                "venv_python": "/srv/workers/tags/venv/bin/python2.7",
                "module": "tags",
                "function": "handle",
                "task_types": ["PrismQ.Legacy.Tags"],
            },
            {"name": "PrismQ.Broken", "project_path": "workers/gone", "module": "x", "function": "y"},
        ],
    }
    write(root / "old.yaml", yaml.safe_dump(old))
    done = workerhost("import-config", "old.yaml", "-o", "imported", cwd=root)

    tags = {slug: f"workerhost-test/imported-{slug}:latest" for slug in WORKERS}
    try:
        for slug, tag in tags.items():
            build = subprocess.run(
                ["docker", "build", "-q", "--force-rm", "-t", tag, str(root / "imported" / "workers" / slug)],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if build.returncode != 0:
                pytest.fail(f"building {tag} failed:\n{done.stdout}\n{done.stderr}\n{build.stderr}")
        text = (root / "imported" / "workerhost.toml").read_text()
        for slug, tag in tags.items():
            assert f'image = "workerhost/{slug}:latest"' in text
            text = text.replace(f'image = "workerhost/{slug}:latest"', f'image = "{tag}"')
        config = root / "test.toml"
        config.write_text(text)
        yield Imported(root, config, done)
    finally:
        subprocess.run(["docker", "rmi", "-f", *tags.values()], capture_output=True)


def run(imported: Imported, task_type: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    done = workerhost("run", task_type, json.dumps(params), "-c", str(imported.config), "-q", cwd=imported.root)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {done.stdout!r}; stderr:\n{done.stderr}"
    report: dict[str, Any] = json.loads(lines[0])
    return done.returncode, report


def test_import_converts_the_good_workers_and_names_the_bad_one(imported: Imported) -> None:
    done = imported.done
    assert done.returncode == 1, done.stderr
    assert "Converted 2 of 3 workers from old.yaml into imported:" in done.stdout
    assert "PrismQ.Legacy.Tags -> workerhost/prismq-legacy-tags:latest on workerhost/python:2.7" in done.stdout
    assert "docker build -t workerhost/prismq-legacy-tags:latest imported/workers/prismq-legacy-tags" in done.stdout
    assert "old.yaml: workers[2] (PrismQ.Broken).task_types: required but missing" in done.stderr
    project = imported.root / "imported" / "workers" / "prismq-text-summarize" / "project"
    assert (project / "summarize" / "tasks.py").is_file()
    assert not (project / ".venv").exists()
    validate = workerhost("validate", "-c", "imported/workerhost.toml", cwd=imported.root)
    assert validate.returncode == 0, validate.stderr


def test_the_python3_worker_runs_its_function(imported: Imported) -> None:
    code, report = run(imported, "PrismQ.Text.Summarize", {"text": "one two three"})
    assert code == 0, report
    assert report["status"] == "completed"
    assert report["result"]["words"] == 3
    assert report["result"]["python"].startswith("3.11.")


def test_the_python27_worker_runs_untouched_python2_code(imported: Imported) -> None:
    code, report = run(imported, "PrismQ.Legacy.Tags", {"counts": {"cafe": 2, "tea": 1, "big-data": 5}})
    assert code == 0, report
    assert report["status"] == "completed"
    assert report["result"]["kept"] == ["big-data", "cafe"]
    assert report["result"]["python"].startswith("2.7.")


def test_an_exception_in_the_old_code_is_a_permanent_failure(imported: Imported) -> None:
    code, report = run(imported, "PrismQ.Legacy.Tags", {"counts": "not an object"})
    assert code == 2, report
    assert report["status"] == "failed"
    assert report["attempts"] == 1
    assert report["error"]["type"] == "ValueError"
    assert "params.counts must be an object" in report["error"]["message"]
