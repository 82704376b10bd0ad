"""The files ``import-config`` writes, as text: the entry script, the Dockerfile, the config."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from runner.migrate.plan import BASES, CERT, ENTRY, INTERPRETERS, MARKER, PACKAGES, TaskManager, Worker, one_line
from runner.migrate.settings import Settings

# A ``${VAR}`` or ``${VAR:-default}`` (what workerhost substitutes, as the old host did), or a lone ``$``.
_DOLLAR = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}|\$")

# -- rendering -----------------------------------------------------------------------


def render_entry(worker: Worker, source: Path) -> str:
    """The entry script, Python 2.7 and 3 alike: ``function(task.params)`` through ``sdk.run``, or a
    function that takes no parameters run as the protocol-speaking program it is."""
    return f"""# -*- coding: utf-8 -*-
{MARKER} from {one_line(str(source))}, {one_line(worker.where)}.
# Runs the PrismQ worker {worker.module}:{worker.function} under workerhost's protocol v1,
# on Python 2.7 and 3 alike. CALLING says how ({one_line(worker.calling.reason)}):
#   "params"    the function takes the task's params; what it returns is the result,
#               an exception a failure by the SDK's rules;
#   "protocol"  the function takes no parameters, like main() in PrismQ WorkerHost's
#               worker template: it reads the task (JSON) from stdin, writes its result
#               to stdout and exits with its own code; all three are left to it;
#   "auto"      one of the two, by the signature of what imports.
import importlib
import inspect
import os
import sys

import workerhost_sdk as sdk

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "project")
MODULE = {json.dumps(worker.module)}
FUNCTION = {json.dumps(worker.function)}
CALLING = {json.dumps(worker.calling.mode)}


def load():
    # With fd 1 pointed at stderr: what the module prints as it imports cannot reach the result.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        target = importlib.import_module(MODULE)
        for name in FUNCTION.split("."):
            target = getattr(target, name)
        return target
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def takes_params(target):
    # Whether target can be called with one argument; when nothing says, as before: yes.
    if hasattr(inspect, "signature"):
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return True
        try:
            signature.bind(None)
        except TypeError:
            return False
        return True
    if inspect.isfunction(target) or inspect.ismethod(target):  # Python 2.7
        try:
            inspect.getcallargs(target, None)
        except TypeError:
            return False
    return True


def fail(error):
    # A module that does not import, or a missing dependency, is the task's failure (by
    # the SDK's rules, with a result on stdout) rather than an empty stdout.
    def handle(task):
        raise error

    sdk.run(handle)


def main():
    sys.path[:0] = [p for p in (PROJECT, os.path.join(PROJECT, "src")) if os.path.isdir(p)]
    try:
        target = load()
    except Exception:
        fail(sys.exc_info()[1])
    if CALLING == "params" or (CALLING == "auto" and takes_params(target)):
        sdk.run(lambda task: target(task.params))
    # It speaks the protocol itself: stdin, stdout and the exit code are its own. A number it
    # returns is the exit code, as with sys.exit(main()); it usually calls sys.exit itself.
    code = target()
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


if __name__ == "__main__":
    main()
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
    if worker.installs:
        what = {"requirements": ["-r requirements.txt"], "project": ["."], "none": []}[worker.dependencies]
        if worker.packages:  # metadata.dependencies, one a line (a shell would read ">" in "six>=1")
            what.append(f"-r /tmp/pip/{PACKAGES}")
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
            *_pip_install(worker.python.version, " ".join(what), bool(worker.packages)),
            "",
        ]
    lines += [f"FROM {base}"]
    if worker.installs:
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


def _pip_install(version: str, what: str, packages: bool) -> list[str]:
    cert = f"if [ -f /tmp/pip/{CERT} ]; then export PIP_CERT=/tmp/pip/{CERT}; fi"
    copy = [
        "COPY project /app/project",
        f"# The [m] makes the bundle optional: the COPY always matches {ENTRY}.",
        f"COPY {ENTRY} {PACKAGES + ' ' if packages else ''}{CERT[:-1]}[{CERT[-1]}] /tmp/pip/",
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


def render_config(
    source: Path,
    task_manager: TaskManager | None,
    workers: Iterable[Worker],
    broken: bool,
    settings: Settings | None = None,
) -> str:
    """A complete ``workerhost.toml``: the host, the task manager and one ``[[workers]]`` table each.

    The task manager's strings keep their ``${VAR}`` references (the old host read them the
    same way); every other ``$`` is written so that it reads back as itself.
    """
    settings = settings or Settings()
    memory = settings.memory or "256m"
    lines = [
        f"{MARKER} from {one_line(str(source))}.",
        '# Reference: README.md, "Configuration". Every key left out has its default; in',
        f'# particular workers run with network = "none" and memory = "{memory}".',
        "",
        "[host]",
        "# Containers are labelled with this id; empty means the machine's hostname.",
        'id = "${WORKERHOST_HOST_ID:-}"',
    ]
    if settings.http is not None:
        lines.append(f"http = {_toml_string(settings.http)}  # the old monitoring port: API, /health, /metrics")
    if settings.poll_max is not None:
        lines.append(f"poll_max = {_toml_number(settings.poll_max)}  # task_manager.poll_interval")
    lines += ["", "[task_manager]"]
    if task_manager is not None:
        lines += [
            'type = "http"',
            f"url = {_toml_string(task_manager.url, references=True)}",
            f"api_key = {_toml_string(task_manager.api_key, references=True)}",
            f"worker_id = {_toml_string(task_manager.worker_id, references=True)}",
        ]
        if settings.request_timeout is not None:
            lines.append(f"request_timeout = {_toml_number(settings.request_timeout)}  # task_manager.timeout")
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
        if worker.backoff is not None:
            lines.append(f"backoff = {_toml_number(worker.backoff)}  # task_manager.retry_backoff")
        if worker.memory is not None:
            lines.append(f"memory = {_toml_string(worker.memory)}  # advanced.resource_limits.max_memory_mb")
    return "\n".join(lines) + "\n"


def _toml_string(value: str, references: bool = False) -> str:
    """A TOML basic string that reads back as ``value``: JSON's escapes are TOML's, and
    ``$`` is doubled so that workerhost does not take it for a ``${VAR}``; with
    ``references``, a ``${VAR}`` stays one and only the other ``$`` are doubled."""
    if references:
        text = _DOLLAR.sub(lambda m: "$$" if m.group(0) == "$" else m.group(0), value)
    else:
        text = value.replace("$", "$$")
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
