"""``workerhost``: the command line.

workerhost run TYPE PARAMS      run one task in a container, print its result
workerhost validate             check a config file
workerhost workers              list the workers, their images and limits
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from runner import __version__
from runner import config as config_module
from runner.attempts import Report, new_task, run_task
from runner.config import Config, WorkerConfig, format_size
from runner.docker import STDERR_TAIL, DockerRunner, connect
from runner.errors import ConfigError, EngineError
from runner.protocol import ErrorInfo, Outcome, Status

log = logging.getLogger("workerhost")

EXIT_USAGE = 2
_STDERR_LINES = 20


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``workerhost`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workerhost",
        description="Run queued tasks, each in its own ephemeral Docker container, "
        "with the limits its worker's config names.",
        epilog="The config file is ./workerhost.toml unless -c or $WORKERHOST_CONFIG names another.",
    )
    parser.add_argument("--version", action="version", version=f"workerhost {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=None,
        help="config file (default: $WORKERHOST_CONFIG or ./workerhost.toml)",
    )
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run one task in a fresh container and print its result",
        description="Run one task of type TYPE through its worker's container, retrying "
        "retriable failures, and print one JSON object: {id, type, status, attempts, result} "
        "or {..., error: {type, message}}. Exit code: 0 completed, 1 failed after retries, "
        "2 failed permanently (also an unknown TYPE or invalid PARAMS), 3 timeout.",
    )
    run.add_argument("type", metavar="TYPE", help="task type, as listed by `workerhost workers`")
    run.add_argument("params", metavar="PARAMS", help="the task's params as a JSON object, or - for stdin")
    run.add_argument("--correlation-id", default=None, help="carry this correlation id instead of a new one")
    run.set_defaults(handler=_cmd_run)

    validate = sub.add_parser(
        "validate",
        parents=[common],
        help="check a config file and list every mistake in it",
        description="Load and validate the config; exit 0 when it is valid, "
        "2 with one line per mistake (file, worker, field, value) when not.",
    )
    validate.set_defaults(handler=_cmd_validate)

    workers = sub.add_parser(
        "workers",
        parents=[common],
        help="list the workers: image (and whether the engine has it), limits, task types",
        description="List every configured worker with its image, whether the Docker engine "
        "has that image, its limits and the task types it handles.",
    )
    workers.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    workers.set_defaults(handler=_cmd_workers)
    return parser


# -- run ----------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    try:
        params = _read_params(args.params)
    except ValueError as exc:
        return _refuse(args.type, "InvalidParams", str(exc))
    worker = config.worker_for(args.type)
    if worker is None:
        known = ", ".join(config.task_types()) or "none"
        return _refuse(args.type, "UnknownTaskType", f"no worker handles task type {args.type!r} (known: {known})")
    task = new_task(args.type, params, args.correlation_id)
    try:
        client = connect()
    except EngineError as exc:
        report = Report(task, Outcome(Status.FAILED, retriable=True, error=ErrorInfo("EngineError", str(exc))), 0)
        log.error("%s", exc)
        return _print_report(report)
    with DockerRunner(client, config.host.id) as runner:
        report = run_task(runner, worker, task)
    if not report.outcome.ok and report.last_run is not None:
        _show_stderr(report)
    return _print_report(report)


def _read_params(text: str) -> dict[str, Any]:
    if text == "-":
        text = sys.stdin.read()
    try:
        params = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"PARAMS is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ValueError(f"PARAMS must be a JSON object, not {type(params).__name__}")
    return params


def _refuse(task_type: str, kind: str, message: str) -> int:
    print(message, file=sys.stderr)
    body = {
        "id": None,
        "type": task_type,
        "status": "failed",
        "attempts": 0,
        "error": {"type": kind, "message": message},
    }
    print(json.dumps(body))
    return EXIT_USAGE


def _print_report(report: Report) -> int:
    print(json.dumps(report.to_dict(), ensure_ascii=False))
    return report.exit_code


def _show_stderr(report: Report) -> None:
    assert report.last_run is not None
    tail = report.last_run.end.stderr_tail[-STDERR_TAIL:].decode("utf-8", "replace").rstrip()
    if tail:
        lines = tail.splitlines()[-_STDERR_LINES:]
        log.warning("last %d lines of the worker's stderr:\n%s", len(lines), "\n".join(lines))


# -- validate -----------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    print(f"{config.source}: valid ({len(config.workers)} workers, {len(config.task_types())} task types)")
    return 0


# -- workers ------------------------------------------------------------------


def _cmd_workers(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    presence = _image_presence(config)
    rows = [_worker_row(w, presence.get(w.image)) for w in config.workers]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_table(rows)
    if any(row["image_present"] is False for row in rows):
        print("\nsome images are missing: build them with `make build-images`", file=sys.stderr)
    return 0


def _image_presence(config: Config) -> dict[str, bool | None]:
    """image -> present, or None for every image when the engine does not answer."""
    try:
        runner = DockerRunner(connect(timeout=10), config.host.id)
    except EngineError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        return {}
    with runner:
        try:
            return {w.image: runner.image_present(w.image) for w in config.workers}
        except EngineError as exc:
            print(f"warning: {exc}", file=sys.stderr)
            return {}


def _worker_row(worker: WorkerConfig, present: bool | None) -> dict[str, Any]:
    return {
        "name": worker.name,
        "image": worker.image,
        "image_present": present,
        "task_types": worker.task_types,
        "timeout": worker.timeout,
        "max_retries": worker.max_retries,
        "concurrency": worker.concurrency,
        "cpus": worker.cpus,
        "memory": format_size(worker.memory),
        "pids_limit": worker.pids_limit,
        "network": worker.network,
        "runtime": worker.runtime or "default",
        "user": worker.user or "image default",
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    headers = ["NAME", "IMAGE", "PRESENT", "TIMEOUT", "RETRIES", "CPUS", "MEMORY", "PIDS", "NETWORK", "RUNTIME"]
    headers.append("TASK TYPES")
    table = [headers] + [
        [
            row["name"],
            row["image"],
            {True: "yes", False: "MISSING", None: "unknown"}[row["image_present"]],
            f"{row['timeout']:g}s",
            str(row["max_retries"]),
            f"{row['cpus']:g}",
            row["memory"],
            str(row["pids_limit"]),
            row["network"],
            row["runtime"],
            ", ".join(row["task_types"]),
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
