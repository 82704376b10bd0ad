"""``workerhost import-config`` end to end: a PrismQ WorkerHost setup in, images built, one task through each.

Two setups: a small one (a Python 3 and a Python 2.7 function of the params, and a broken
worker), and one shaped like PrismQ WorkerHost's published config, with workers written
from its template (``main()`` reads the task and writes the result itself).
"""

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


def workerhost(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "WORKERHOST_HOST_ID": new_host_id(), **(env or {})}
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
        build(root / "imported", tags, done)
        retag(root / "imported" / "workerhost.toml", tags, root / "test.toml")
        yield Imported(root, root / "test.toml", done)
    finally:
        subprocess.run(["docker", "rmi", "-f", *tags.values()], capture_output=True)


def build(imported: Path, tags: dict[str, str], done: subprocess.CompletedProcess[str]) -> None:
    """Build each imported worker folder (slug -> tag)."""
    for slug, tag in tags.items():
        build = subprocess.run(
            ["docker", "build", "-q", "--force-rm", "-t", tag, str(imported / "workers" / slug)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if build.returncode != 0:
            pytest.fail(f"building {tag} failed:\n{done.stdout}\n{done.stderr}\n{build.stderr}")


def retag(config: Path, tags: dict[str, str], to: Path) -> None:
    """The imported config with the test images in it."""
    text = config.read_text()
    for slug, tag in tags.items():
        assert f'image = "workerhost/{slug}:latest"' in text
        text = text.replace(f'image = "workerhost/{slug}:latest"', f'image = "{tag}"')
    to.write_text(text)


def run(
    imported: Imported, task_type: str, params: dict[str, Any], env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    config = str(imported.config)
    done = workerhost("run", task_type, json.dumps(params), "-c", config, "-q", cwd=imported.root, env=env)
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


# -- a config shaped like PrismQ WorkerHost's published one ------------------------------------------

# A function of the params whose imports come from metadata.dependencies only; it also says
# what memory limit its container got (cgroup v2 or v1).
CLASSIFIER = '''\
"""Classifies a host name; needs six and idna, which only metadata.dependencies names."""
import idna
import six


def memory_limit():
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                return file.read().strip()
        except OSError:
            pass
    return None


def classify(params):
    return {"host": idna.encode(params["host"]).decode("ascii"), "six": six.__version__, "memory": memory_limit()}
'''

# Written as PrismQ WorkerHost's worker template shows: main() takes nothing, reads the task
# from stdin, prints the result and exits with its own code.
TEMPLATE = """\
#!/usr/bin/env python3
import sys
import json


def process_task(task):
    if task["params"].get("fail"):
        error = {"type": "Refused", "message": "asked to fail", "retriable": False}
        print(json.dumps({"success": False, "error": error}))
        sys.exit(2)
    return {"processed": task["id"], "type": task["type"], "params": task["params"], "python": sys.version}


def main():
    # 1. Read task from stdin
    task = json.loads(sys.stdin.read())
    # 2. Execute business logic
    result = process_task(task)
    # 3. Write result to stdout
    output = {"success": True, "result": result}
    print(json.dumps(output))
    # 4. Exit with success code
    sys.exit(0)


if __name__ == "__main__":
    main()
"""

# The same template in Python 2 only (a print statement): import-config cannot parse it, so
# the entry script decides from main's signature on Python 2.7 itself.
TEMPLATE_PY2 = """\
import json
import sys


def main():
    task = json.loads(sys.stdin.read())
    print json.dumps({"success": True, "result": {"processed": task["id"], "python": sys.version}})
    sys.exit(0)
"""

PUBLISHED_WORKERS = {
    "prismq-classifier": "PrismQ.Classifier",
    "prismq-template": "PrismQ.Template",
    "prismq-legacy-template": "PrismQ.Legacy.Template",
}
API_KEY = {"TASKMANAGER_API_KEY": "key-from-the-environment"}


@pytest.fixture(scope="module")
def published(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Imported]:
    """The published config's shape imported, built as workerhost-test/imported-*, and a config naming them."""
    root = tmp_path_factory.mktemp("published")
    write(root / "Classifier/src/__init__.py", "")
    write(root / "Classifier/src/workers/__init__.py", "")
    write(root / "Classifier/src/workers/classifier.py", CLASSIFIER)
    write(root / "Template/worker.py", TEMPLATE)
    write(root / "Legacy/worker.py", TEMPLATE_PY2)
    old = {
        "version": "1.0",
        "task_manager": {
            "type": "http",
            "url": "http://taskmanager.local/api",
            "api_key": "${TASKMANAGER_API_KEY}",
            "poll_interval": 5,
            "timeout": 30,
            "max_retries": 3,
            "retry_backoff": 2,
        },
        "workers": [
            {
                "name": "PrismQ.Classifier",
                "project_path": "./Classifier",
                "venv_python": "C:\\PrismQ\\Classifier\\venv\\Scripts\\python.exe",
                "module": "src.workers.classifier",
                "function": "classify",
                "task_types": ["PrismQ.Classify"],
                "timeout": 120,
                "max_retries": 2,
                "metadata": {"description": "host names", "python_version": "3.10", "dependencies": ["six", "idna"]},
            },
            {
                "name": "PrismQ.Template",
                "project_path": "./Template",
                "venv_python": "./Template/venv/bin/python",
                "module": "worker",
                "function": "main",
                "task_types": ["PrismQ.Template"],
                "timeout": 60,
                "max_retries": 0,
                "metadata": {"python_version": "3.11", "dependencies": []},
            },
            {
                "name": "PrismQ.Legacy.Template",
                "project_path": "./Legacy",
                "module": "worker",
                "function": "main",
                "task_types": ["PrismQ.Legacy.Template"],
                "metadata": {"python_version": "2.7"},
            },
        ],
        "monitoring": {
            "enable_health_check": True,
            "health_check_port": 8080,
            "enable_metrics": True,
            "metrics_port": 9090,
        },
        "advanced": {
            "worker_pool": {"enabled": False, "min_workers": 1, "max_workers": 4},
            "resource_limits": {"max_memory_mb": 2048},
        },
    }
    write(root / "workerhost_config.yaml", yaml.safe_dump(old))
    done = workerhost("import-config", "workerhost_config.yaml", "-o", "imported", cwd=root)
    if done.returncode != 0:
        pytest.fail(f"import-config failed:\n{done.stdout}\n{done.stderr}")

    tags = {slug: f"workerhost-test/imported-{slug}:latest" for slug in PUBLISHED_WORKERS}
    try:
        build(root / "imported", tags, done)
        retag(root / "imported" / "workerhost.toml", tags, root / "test.toml")
        yield Imported(root, root / "test.toml", done)
    finally:
        subprocess.run(["docker", "rmi", "-f", *tags.values()], capture_output=True)


def test_the_published_config_imports_with_its_settings(published: Imported) -> None:
    out, err = published.done.stdout, published.done.stderr
    assert "Converted 3 of 3 workers from workerhost_config.yaml into imported:" in out
    assert (
        "PrismQ.Classifier -> workerhost/prismq-classifier:latest on workerhost/python:3.11 "
        "(metadata.python_version asks for 3.10; the Python 3 base is 3.11; "
        "pip installs metadata.dependencies (six, idna); calls classify(params))"
    ) in out
    assert "PrismQ.Template -> workerhost/prismq-template:latest on workerhost/python:3.11" in out
    assert "runs main(), which reads the task and writes the result itself" in out
    assert "PrismQ.Legacy.Template -> workerhost/prismq-legacy-template:latest on workerhost/python:2.7" in out
    for note in (
        "task_manager.poll_interval 5s is [host] poll_max",
        "task_manager.timeout 30s is [task_manager] request_timeout",
        "task_manager.retry_backoff 2s is every worker's backoff",
        'health check port 8080 is [host] http = "127.0.0.1:8080"',
        "metrics port 9090 is not a port of its own",
        'max_memory_mb 2048 is every worker\'s memory = "2048m"',
        "advanced.worker_pool (disabled): not carried over",
        "is a Windows path",
    ):
        assert note in err, note
    assert "task_manager.type" not in err
    text = (published.root / "imported" / "workerhost.toml").read_text()
    assert 'api_key = "${TASKMANAGER_API_KEY}"' in text
    # The reference is one: without the variable the config does not load, with it it does.
    validate = workerhost("validate", "-c", "imported/workerhost.toml", cwd=published.root, env=API_KEY)
    assert validate.returncode == 0, validate.stderr
    unset = {k: v for k, v in os.environ.items() if k != "TASKMANAGER_API_KEY"}
    missing = subprocess.run(
        [executable(), "validate", "-c", "imported/workerhost.toml"],
        capture_output=True,
        text=True,
        cwd=published.root,
        env=unset,
        timeout=60,
    )
    assert missing.returncode != 0
    assert "environment variable TASKMANAGER_API_KEY is not set" in missing.stderr, missing.stderr


def test_metadata_dependencies_are_in_the_image_and_the_memory_limit_is_the_old_one(published: Imported) -> None:
    code, report = run(published, "PrismQ.Classify", {"host": "bücher.example"}, env=API_KEY)
    assert code == 0, report
    assert report["status"] == "completed"
    result = report["result"]
    assert result["host"] == "xn--bcher-kva.example"  # idna, installed from metadata.dependencies
    assert result["six"]
    assert result["memory"] == str(2048 * 1024**2)  # advanced.resource_limits.max_memory_mb, in the container


def test_a_template_worker_runs_as_it_is(published: Imported) -> None:
    code, report = run(published, "PrismQ.Template", {"text": "hi"}, env=API_KEY)
    assert code == 0, report
    assert report["status"] == "completed"
    result = report["result"]
    # It read workerhost's envelope from stdin, as it read the old host's.
    assert (result["processed"], result["type"], result["params"]) == (report["id"], "PrismQ.Template", {"text": "hi"})
    assert result["python"].startswith("3.11.")


def test_a_template_worker_keeps_its_own_failure_and_exit_code(published: Imported) -> None:
    code, report = run(published, "PrismQ.Template", {"fail": True}, env=API_KEY)
    assert code == 2, report
    assert report["status"] == "failed"
    assert report["attempts"] == 1
    assert report["error"]["type"] == "Refused"
    assert report["error"]["message"] == "asked to fail"


def test_a_python2_template_worker_is_recognised_at_run_time(published: Imported) -> None:
    entry = (published.root / "imported/workers/prismq-legacy-template/workerhost_entry.py").read_text()
    assert 'CALLING = "auto"' in entry
    code, report = run(published, "PrismQ.Legacy.Template", {}, env=API_KEY)
    assert code == 0, report
    assert report["status"] == "completed"
    assert report["result"]["processed"] == report["id"]
    assert report["result"]["python"].startswith("2.7.")
