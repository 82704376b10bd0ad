"""The files ``import-config`` writes, as text: the entry script, the Dockerfile, the config."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from runner.migrate.plan import BASES, CERT, ENTRY, INTERPRETERS, MARKER, TaskManager, Worker, one_line

# -- rendering -----------------------------------------------------------------------


def render_entry(worker: Worker, source: Path) -> str:
    """The entry script: Python 2.7 and 3 alike, ``function(task.params)`` through ``sdk.run``."""
    return f"""# -*- coding: utf-8 -*-
{MARKER} from {one_line(str(source))}, {one_line(worker.where)}.
# Runs the PrismQ worker {worker.module}:{worker.function} under workerhost's protocol v1:
# the task's params go to the function, what it returns is the result, and an
# exception is a failure by the SDK's rules. Python 2.7 and 3 alike.
import importlib
import os
import sys

import workerhost_sdk as sdk

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "project")
MODULE = {json.dumps(worker.module)}
FUNCTION = {json.dumps(worker.function)}


def handle(task):
    # Imported here, not at the top, so that a missing dependency or a broken
    # module is reported as the task's failure rather than as an empty stdout.
    target = importlib.import_module(MODULE)
    for name in FUNCTION.split("."):
        target = getattr(target, name)
    return target(task.params)


if __name__ == "__main__":
    sys.path[:0] = [p for p in (PROJECT, os.path.join(PROJECT, "src")) if os.path.isdir(p)]
    sdk.run(handle)
"""


def render_dockerfile(worker: Worker, source: Path) -> str:
    """The worker's Dockerfile on its base image, with a pip stage only when there is something to install."""
    base = BASES[worker.python.version]
    python = INTERPRETERS[worker.python.version]
    lines = [
        f"{MARKER} from {one_line(str(source))}, {one_line(worker.where)}.",
        f"# The PrismQ worker {worker.module}:{worker.function} on Python {worker.python.version}, run under",
        f"# workerhost's protocol v1 by {ENTRY}.",
    ]
    if worker.dependencies != "none":
        what = "-r requirements.txt" if worker.dependencies == "requirements" else "."
        lines += [
            "#",
            "# Dependencies are installed as root in a throwaway stage; only /usr/local, where",
            "# pip puts them, is carried into the image, so pip, apt's lists and pip's CA",
            f"# bundle stay out of it. The CA bundle is {CERT} in this folder, if there is one",
            "# (import-config copies the host's $PIP_CERT or /etc/ssl/certs/ca-certificates.crt",
            "# here): the classic builder has no build secrets, and a build arg would keep it",
            "# in the image's history. Without the file pip trusts its own bundle.",
            f"FROM {base} AS deps",
            "USER root",
            *_pip_install(worker.python.version, what),
            "",
        ]
    lines += [f"FROM {base}"]
    if worker.dependencies != "none":
        lines += ["COPY --from=deps /usr/local /usr/local"]
    lines += [
        "COPY project /app/project",
        f"COPY {ENTRY} /app/{ENTRY}",
        "# The old host ran workers in their project folder: relative reads keep working.",
        "WORKDIR /app/project",
        "USER 65534:65534",
        f'CMD ["{python}", "/app/{ENTRY}"]',
    ]
    return "\n".join(lines) + "\n"


def _pip_install(version: str, what: str) -> list[str]:
    cert = f"if [ -f /tmp/pip/{CERT} ]; then export PIP_CERT=/tmp/pip/{CERT}; fi"
    copy = [
        "COPY project /app/project",
        f"# The [m] makes the bundle optional: the COPY always matches {ENTRY}.",
        f"COPY {ENTRY} {CERT[:-1]}[{CERT[-1]}] /tmp/pip/",
        "WORKDIR /app/project",
    ]
    if version == "2.7":
        return [
            "# bullseye has no pip for Python 2.7: pip 20.3.4, its last, runs from Debian's wheel.",
            "RUN python2.7 -m pip --version >/dev/null 2>&1 || (apt-get update \\",
            "    && apt-get install -y --no-install-recommends python-pip-whl python-setuptools)",
            *copy,
            f"RUN {cert} \\",
            "    && if python2.7 -m pip --version >/dev/null 2>&1; then set -- -m pip; \\",
            '       else set -- /usr/share/python-wheels/pip-*.whl; set -- "$1/pip"; fi \\',
            f'    && python2.7 "$@" install --disable-pip-version-check {what}',
        ]
    return [
        "RUN python3 -m pip --version >/dev/null 2>&1 || (apt-get update \\",
        "    && apt-get install -y --no-install-recommends python3-pip)",
        *copy,
        f"RUN {cert} \\",
        "    && PIP_ROOT_USER_ACTION=ignore python3 -m pip install --disable-pip-version-check \\",
        f"       --break-system-packages {what}",
    ]


def render_config(source: Path, task_manager: TaskManager | None, workers: Iterable[Worker], broken: bool) -> str:
    """A complete ``workerhost.toml``: the task manager and one ``[[workers]]`` table each."""
    lines = [
        f"{MARKER} from {one_line(str(source))}.",
        '# Reference: README.md, "Configuration". Every key left out has its default; in',
        '# particular workers run with network = "none" and memory = "256m".',
        "",
        "[host]",
        "# Containers are labelled with this id; empty means the machine's hostname.",
        'id = "${WORKERHOST_HOST_ID:-}"',
        "",
        "[task_manager]",
    ]
    if task_manager is not None:
        lines += [
            'type = "http"',
            f"url = {_toml_string(task_manager.url)}",
            f"api_key = {_toml_string(task_manager.api_key)}",
            f"worker_id = {_toml_string(task_manager.worker_id)}",
        ]
    else:
        if broken:
            lines.append("# The old task_manager could not be converted (see import-config's output).")
        lines.append('type = "embedded"')
    for worker in workers:
        lines += [
            "",
            f"# {one_line(worker.where)}: {worker.module}:{worker.function} from {one_line(str(worker.project))}",
            "[[workers]]",
            f"name = {_toml_string(worker.name)}",
            f"image = {_toml_string(worker.image)}",
            f"task_types = [{', '.join(_toml_string(t) for t in worker.task_types)}]",
            f"timeout = {_toml_number(worker.timeout)}",
            f"max_retries = {worker.max_retries}",
        ]
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    """A TOML basic string that reads back as ``value``: JSON's escapes are TOML's, and
    ``$`` is doubled so that workerhost does not take it for a ``${VAR}``."""
    return json.dumps(value.replace("$", "$$"), ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
