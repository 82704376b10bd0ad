"""``workerhost import-config``: PrismQ WorkerHost's venv workers become worker images.

PrismQ WorkerHost ran each worker in its own virtualenv, as ``module.function``
in a project folder: either a function of the params, or a ``main()`` that
takes none and speaks the protocol itself (its worker template). This module
reads that host's YAML config and writes, for every worker it can convert, a
Docker build context (the project, a Dockerfile on the matching base image
that pip-installs its requirements and ``metadata.dependencies``, and an
entry script that runs the function under protocol v1), plus one
``workerhost.toml`` for all of them, with the old host-wide settings that
workerhost has a key for (``settings.py``). ``calling.py`` decides how the
entry script calls each function.

Each worker is checked on its own: a worker with a mistake is reported (the
file, the worker, the field) and the rest still convert. ``plan.py`` reads and
decides, ``render.py`` makes the files' text, and this module writes them:
``convert`` writes, ``import_config`` is the command.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from runner import config as config_module
from runner.errors import ConfigError
from runner.migrate.calling import Calling, detect_calling
from runner.migrate.plan import (
    BASES,
    CERT,
    DEFAULT_CA_BUNDLE,
    DEFAULT_OUTPUT,
    ENTRY,
    MARKER,
    PACKAGES,
    SKIP,
    Plan,
    Python,
    Worker,
    detect_dependencies,
    detect_python,
    has_requirements,
    one_line,
    plan,
    slug,
)
from runner.migrate.render import render_config, render_dockerfile, render_entry

__all__ = [
    "ENTRY",
    "Calling",
    "Plan",
    "Python",
    "Result",
    "Worker",
    "convert",
    "copy_project",
    "detect_calling",
    "detect_dependencies",
    "detect_python",
    "has_requirements",
    "import_config",
    "plan",
    "render_config",
    "render_dockerfile",
    "render_entry",
    "slug",
    "summary",
]


# -- writing -------------------------------------------------------------------------


@dataclass
class Result:
    """What was written: the converted workers, and every failure with its reason."""

    plan: Plan
    output: Path
    converted: list[Worker]
    failures: list[str]
    rejected: list[str]
    certs: list[Worker]

    @property
    def exit_code(self) -> int:
        return 1 if self.failures or not self.converted else 0


def convert(plan: Plan, output: str | os.PathLike[str], ca_bundle: Path | None = None) -> Result:
    """Write each worker's build context and the config into ``output``.

    Folders that import-config did not make are never overwritten. ``ca_bundle``
    is copied next to a Dockerfile that runs pip (see ``render_dockerfile``).
    """
    out = Path(output)
    config_path = out / "workerhost.toml"
    if config_path.exists() and not _ours(config_path):
        raise ConfigError([f"{config_path}: exists and was not written by import-config; choose another -o DIR"])
    converted: list[Worker] = []
    failures = list(plan.failures)
    rejected = list(plan.rejected)
    certs: list[Worker] = []
    for worker in plan.workers:
        folder = out / "workers" / worker.slug
        try:
            wrote_cert = _write_worker(worker, plan.source, folder, out, ca_bundle)
        except (OSError, shutil.Error) as exc:
            failures.append(f"{plan.source}: {worker.where}: cannot write {folder}: {_describe(exc)}")
            rejected.append(worker.where)
            continue
        converted.append(worker)
        if wrote_cert:
            certs.append(worker)
    if converted:
        text = render_config(plan.source, plan.task_manager, converted, plan.task_manager_broken, plan.settings)
        config_path.write_text(text, encoding="utf-8")
        # What we write must load; a ConfigError here is our bug. The variables the task manager
        # reads (${TASKMANAGER_API_KEY}) need not be set yet: they are where workerhost runs.
        variables = plan.task_manager.variables if plan.task_manager is not None else []
        config_module.load(config_path, environ={**dict.fromkeys(variables, "set"), **os.environ})
    return Result(plan, out, converted, failures, rejected, certs)


def _write_worker(worker: Worker, source: Path, folder: Path, out: Path, ca_bundle: Path | None) -> bool:
    if folder.exists():
        if not _ours(folder / "Dockerfile"):
            raise OSError(f"{folder} exists and was not written by import-config")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    copy_project(worker.project, folder / "project", exclude=[p for p in (out, worker.venv) if p is not None])
    (folder / ENTRY).write_text(render_entry(worker, source), encoding="utf-8")
    (folder / "Dockerfile").write_text(render_dockerfile(worker, source), encoding="utf-8")
    if worker.packages:
        lines = [f"# metadata.dependencies of {one_line(worker.where)}, installed by the Dockerfile", *worker.packages]
        (folder / PACKAGES).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if worker.installs and ca_bundle is not None and ca_bundle.is_file():
        shutil.copyfile(ca_bundle, folder / CERT)
        return True
    return False


def copy_project(source: Path, destination: Path, exclude: Iterable[Path] = ()) -> None:
    """Copy a project as a build context: no virtualenvs, VCS data or bytecode, and
    readable by everyone (workers run as nobody)."""
    excluded = {p.resolve() for p in exclude}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {
            name
            for name in names
            if name in SKIP
            or name.endswith((".pyc", ".pyo"))
            or (Path(folder, name).resolve() in excluded)
            or _is_virtualenv(Path(folder, name))
        }

    shutil.copytree(source, destination, ignore=ignore, ignore_dangling_symlinks=True)
    for root, folders, files in os.walk(destination):
        for name in folders:
            os.chmod(Path(root, name), Path(root, name).stat().st_mode | 0o555)
        for name in files:
            os.chmod(Path(root, name), Path(root, name).stat().st_mode | 0o444)


def _is_virtualenv(path: Path) -> bool:
    return path.is_dir() and ((path / "pyvenv.cfg").is_file() or (path / "bin" / "activate").is_file())


def _ours(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            return file.readline().startswith(MARKER)
    except OSError:
        return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        first = exc.args[0][0]
        return f"{len(exc.args[0])} files could not be copied; the first, {first[0]}: {first[-1]}"
    return str(exc)


# -- the command ---------------------------------------------------------------------


def import_config(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] = DEFAULT_OUTPUT,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``workerhost import-config``: convert, write, print a summary; return the exit code
    (0 all converted, 1 some failed; an unreadable file raises ``ConfigError``)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    env = os.environ if environ is None else environ
    result = convert(plan(path), output, Path(env.get("PIP_CERT") or DEFAULT_CA_BUNDLE))
    for note in result.plan.notes:
        print(f"note: {note}", file=err)
    print(summary(result), file=out, end="")
    out.flush()
    if result.failures:
        rejected = result.rejected
        heading = f"Not converted: {', '.join(rejected)}" if rejected else "Not converted"
        print(f"\n{heading}:", file=err)
        for line in result.failures:
            print(line, file=err)
    return result.exit_code


def summary(result: Result) -> str:
    """What was converted, to which base, and the commands that come next."""
    plan, out = result.plan, result.output
    lines = [f"Converted {len(result.converted)} of {plan.total} workers from {plan.source}"]
    if not result.converted:
        return lines[0] + "; nothing written.\n"
    lines[0] += f" into {out}:"
    for worker in result.converted:
        lines.append(
            f"  {worker.name} -> {worker.image} on {BASES[worker.python.version]}"
            f" ({worker.python.reason}; {_installs(worker)}; {_calls(worker)})"
        )
    manager = plan.task_manager
    if manager is not None:
        lines.append(f"Tasks come from the PrismQ TaskManager at {manager.url} ([task_manager] type http).")
        if manager.variables:
            names = ", ".join(manager.variables)
            them = "it" if len(manager.variables) == 1 else "them"
            lines.append(
                f"It reads {names} from the environment, as the old host did: set {them} where workerhost runs."
            )
        elif manager.api_key:
            lines.append("Its api_key is written out as the old file had it; to keep it out of the file,")
            lines.append('write api_key = "${PRISMQ_API_KEY}" there and set that variable.')
    if result.certs:
        lines.append(f"pip will trust the host's CA bundle ({CERT} in the worker's folder; not in the image).")
    lines.append('Workers run without a network (network = "none"): give one that calls out network = "bridge".')
    lines += ["", "Next: build the images, check the config, serve:"]
    lines += [f"  docker build -t {w.image} {shlex.quote(str(out / 'workers' / w.slug))}" for w in result.converted]
    config = shlex.quote(str(out / "workerhost.toml"))
    lines += [f"  workerhost validate -c {config}", f"  workerhost serve -c {config}"]
    return "\n".join(lines) + "\n"


def _installs(worker: Worker) -> str:
    what = {"requirements": ["requirements.txt"], "project": ["the project"], "none": []}[worker.dependencies]
    if worker.packages:
        what.append(f"metadata.dependencies ({', '.join(worker.packages)})")
    return f"pip installs {' and '.join(what)}" if what else "nothing to install"


def _calls(worker: Worker) -> str:
    function = worker.function
    return {
        "params": f"calls {function}(params)",
        "protocol": f"runs {function}(), which reads the task and writes the result itself",
        "auto": f"{function}(params) or {function}() by its signature, decided at start",
    }[worker.calling.mode]
