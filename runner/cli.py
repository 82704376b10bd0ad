"""``workerhost``: the command line.

workerhost run TYPE PARAMS      run one task in a container, print its result
workerhost validate             check a config file
workerhost workers              list the workers, their images and limits
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from runner import __version__, jsondata
from runner import config as config_module
from runner.attempts import Report, new_task, run_task
from runner.config import Config, WorkerConfig, format_size
from runner.docker import STDERR_TAIL, DockerRunner, connect
from runner.errors import ConfigError, EngineError, WorkerhostError
from runner.protocol import ErrorInfo, Outcome, Status
from runner.telemetry import logs, otlp_endpoint
from runner.telemetry.events import Hooks

if TYPE_CHECKING:  # imported where used: httpx is the client commands' alone, and `run` must start fast
    from runner.client import Client
    from runner.telemetry.tracing import Tracing

log = logging.getLogger("workerhost")

EXIT_USAGE = 2
EXIT_TOKEN = 6  # the API refused the client's token (or its lack of one)
_STDERR_LINES = 20


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``workerhost`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if argv is None:  # the process's own command line: what the imports made lives until it exits
        # so the collector need not walk it again, during the command nor at the exit (50 ms of `run`).
        gc.freeze()
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        for line in exc.problems:
            _tell(line)
        return EXIT_USAGE
    except WorkerhostError as exc:  # the host cannot start: a port in use, a queue it cannot open
        from runner.client import ApiUnavailable  # here, on the way out: httpx (with rich) is 50 ms at start

        if isinstance(exc, ApiUnavailable):  # a client command's: no host answers, or it refused
            print(f"workerhost: {exc}", file=sys.stderr)
            return {404: 4, 401: EXIT_TOKEN}.get(exc.status or 0, 5)
        _tell(f"workerhost: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:
        if not logs.structured():
            raise
        # serve's stderr is log lines only (one JSON object each, in JSON): the traceback goes inside one.
        log.critical("workerhost %s stopped on an unexpected error", args.command, exc_info=True)
        return 1


def _tell(text: str) -> None:
    """Why the command stops: a log line once serve has set up its logs, else a plain line on stderr."""
    if logs.structured():
        log.error("%s", text)
    else:
        print(text, file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workerhost",
        description="Run queued tasks, each in its own ephemeral Docker container, "
        "with the limits its worker's config names.",
        epilog="The config file is ./workerhost.toml unless -c or $WORKERHOST_CONFIG names another. "
        "submit, tasks, task and retry send $WORKERHOST_API_TOKEN (else the config's [host] api_token) and "
        "exit 4 for an unknown task id, 5 when no host answers, 6 when the host refuses the token.",
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

    doctor = sub.add_parser(
        "doctor", parents=[common],
        help="report what this machine's engine offers and whether the config can run on it",
        description="Engine version, runtimes registered, cgroup version, whether strict (gVisor) "
        "workers can run (it starts one), and each worker's image. Exit 0 when the config can run, 1 when not.",
    )  # fmt: skip
    doctor.set_defaults(handler=_cmd_doctor)

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run the host: claim tasks, run each in a container, report them, serve the API",
        description="Claim tasks from the configured source ([task_manager]), run each in a fresh "
        "container of its worker, report the outcome, and serve the HTTP API at [host] http. "
        "SIGTERM or SIGINT drains (up to [host] grace); a second one exits at once.",
    )
    serve.add_argument("--burst", action="store_true", help="exit once the queue is empty and nothing runs")
    serve.set_defaults(handler=_cmd_serve)

    api = argparse.ArgumentParser(add_help=False, parents=[common])
    api.add_argument("--url", default=None, help="the API of a running host (default: http://[host] http)")

    submit = sub.add_parser(
        "submit", parents=[api], help="submit a task to a running host",
        description="Submit a task to a running `workerhost serve` and print it. With --wait, wait for "
        "its end, print it, and exit like `workerhost run`: 0 completed, 1 dead (retries used up), "
        "2 failed, 3 timeout.",
    )  # fmt: skip
    submit.add_argument("type", metavar="TYPE")
    submit.add_argument("params", metavar="PARAMS", help="a JSON object, or - for stdin")
    submit.add_argument("--wait", action="store_true", help="wait for the task to end (the host answers when it ends)")
    submit.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    submit.add_argument("--idempotency-key", default=None, help="the same key returns the same task")
    submit.add_argument("--priority", type=int, default=None, help="higher runs first")
    submit.set_defaults(handler=_cmd_submit)

    tasks = sub.add_parser("tasks", parents=[api], help="list tasks of a running host, newest first")
    tasks.add_argument("--status", default=None, help="pending, running, completed, failed or dead")
    tasks.add_argument("--type", default=None, help="only this task type")
    tasks.add_argument("--limit", type=int, default=50)
    tasks.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    tasks.set_defaults(handler=_cmd_tasks)

    task = sub.add_parser("task", parents=[api], help="show one task: status, attempts, result or error")
    task.add_argument("id", metavar="ID")
    task.set_defaults(handler=_cmd_task)

    retry = sub.add_parser("retry", parents=[api], help="send a failed or dead task back to the queue")
    retry.add_argument("id", metavar="ID")
    retry.set_defaults(handler=_cmd_retry)

    migrate = sub.add_parser(
        "import-config",
        help="turn a PrismQ WorkerHost config (venv workers) into worker images and a workerhost.toml",
        description="Read a PrismQ WorkerHost YAML config and, for each worker in it, write a Docker "
        "build context into DIR/workers/NAME: the project (without virtualenvs), a Dockerfile on "
        "workerhost/python:3.11 or :2.7 (2.7 when venv_python, metadata.python_version or the project "
        "says Python 2) that installs its requirements and metadata.dependencies, and an entry script "
        "that calls module.function(params) through the worker SDK, or runs a function that takes no "
        "parameters (the old template's main()) as it is. Then write DIR/workerhost.toml with the task "
        "manager, the old settings workerhost has a key for (each one noted) and every converted "
        "worker, and print the docker build commands to run next. A worker with a mistake is "
        "reported (file, worker, field) and the others still convert. Exit code: 0 all converted, "
        "1 some workers failed, 2 the file cannot be read or has no workers list.",
    )
    migrate.add_argument("old", metavar="OLD.yaml", help="the PrismQ WorkerHost config to convert")
    migrate.add_argument(
        "-o", "--output", metavar="DIR", default="imported", help="where to write (default: ./imported)"
    )
    migrate.set_defaults(handler=_cmd_import_config, quiet=False)
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
    problems = worker.params_problems(params)
    if problems:  # refused before any container starts, as the API refuses them
        lines = "".join(f"\n  {problem}" for problem in problems)
        return _refuse(args.type, "InvalidParams", f"PARAMS do not match worker {worker.name}'s params_schema:{lines}")
    task = new_task(args.type, params, args.correlation_id)
    try:
        client = connect()
    except EngineError as exc:
        report = Report(task, Outcome(Status.FAILED, retriable=True, error=ErrorInfo("EngineError", str(exc))), 0)
        log.error("%s", exc)
        return _print_report(report)
    tracing = _tracing(config)
    hooks = Hooks([tracing], contexts=tracing.span_context) if tracing is not None else Hooks()
    try:
        with DockerRunner(client, config.host.id) as runner:
            report = run_task(runner, worker, task, hooks=hooks)
    finally:
        if tracing is not None:
            tracing.shutdown()
    if not report.outcome.ok and report.last_run is not None:
        _show_stderr(report)
    return _print_report(report)


def _tracing(config: Config) -> Tracing | None:
    """Traced like serve when an OTLP endpoint is set (the same task unit emits the same events); else
    no tracing at all, and OpenTelemetry is not even imported (15 ms of `run`'s start)."""
    if not otlp_endpoint(config.telemetry):
        return None
    from runner.telemetry.tracing import Tracing

    return Tracing(config.telemetry)


def _read_params(text: str) -> dict[str, Any]:
    if text == "-":
        text = sys.stdin.read()
    params, problem = jsondata.loads(text, "PARAMS")
    if problem is not None:
        raise ValueError(problem.replace("PARAMS: not valid JSON", "PARAMS is not valid JSON"))
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
    # The result passed jsondata's checks; allow_nan=False says so, so that nothing printed is invalid JSON.
    print(json.dumps(report.to_dict(), ensure_ascii=False, allow_nan=False))
    return report.exit_code


def _show_stderr(report: Report) -> None:
    assert report.last_run is not None
    tail = report.last_run.end.stderr_tail[-STDERR_TAIL:].decode("utf-8", "replace").rstrip()
    if tail:
        from runner.telemetry.logs import escape

        # The worker's bytes, as text a terminal does not act on (no ESC, BEL or CR reaches it).
        lines = [escape(line) for line in tail.splitlines()[-_STDERR_LINES:]]
        log.warning("last %d lines of the worker's stderr:\n%s", len(lines), "\n".join(lines))


# -- doctor ---------------------------------------------------------------------


def _cmd_doctor(args: argparse.Namespace) -> int:
    from runner.doctor import check

    config = config_module.load(args.config)
    with DockerRunner(connect(check=False, timeout=30), config.host.id) as runner:
        report = check(config, runner)
    print(report.text())
    return 1 if report.problems else 0


# -- serve and its clients ------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    level = logging.WARNING if args.quiet else logging.INFO
    # Set up before anything can log or warn (importing serve, reading the config); the config's
    # own choice of format is known only once it is read.
    logs.configure("auto", level)
    from runner.serve import serve

    config = config_module.load(args.config)
    logs.configure(config.telemetry.log_format, level)
    return asyncio.run(serve(config, burst=args.burst))


def _client(args: argparse.Namespace) -> Client:
    """The API at --url, else at the config's [host] http; the token from $WORKERHOST_API_TOKEN, else
    (for the config's own host only: never sent to another --url) the config's [host] api_token."""
    from runner.client import Client

    token = os.environ.get(config_module.ENV_TOKEN, "").strip() or None  # a stray newline from a file
    url = args.url
    if url is None:
        try:
            host = config_module.load(args.config).host
        except ConfigError:
            url = "http://127.0.0.1:8080"
        else:
            url = "http://" + _local(host.http)
            token = token or host.api_token.get_secret_value() or None
    return Client(url, token=token)


def _local(address: str) -> str:
    """Where to reach a host that listens on every address (0.0.0.0, ::): its loopback."""
    host, _, port = address.rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
    return f"{host}:{port}"


def _cmd_submit(args: argparse.Namespace) -> int:
    from runner.client import ApiUnavailable, exit_code

    try:
        params = _read_params(args.params)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    client = _client(args)
    extra = {"idempotency_key": args.idempotency_key, "priority": args.priority}
    try:
        if args.wait:  # the host answers when the task ends (?wait), in steps until --timeout
            task = client.submit_and_wait(args.type, params, timeout=args.timeout, **extra)
        else:
            task = client.submit(args.type, params, **extra)
    except ApiUnavailable as exc:
        if exc.status == 422:  # an unknown type, params that are not an object
            print(f"workerhost: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise
    print(json.dumps(task, ensure_ascii=False))
    return exit_code(task) if args.wait else 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    found = _client(args).list(args.status, args.type, args.limit)
    if args.json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return 0
    rows = [["ID", "TYPE", "STATUS", "ATTEMPTS", "CREATED", "ERROR"]]
    for task in found:
        error = task.get("error") or {}
        message = f"{error.get('type')}: {error.get('message')}"[:60] if error else ""
        rows.append([task["id"], task["type"], task["status"], str(task["attempts"]), task["created_at"], message])
    _print_rows(rows)
    return 0


def _cmd_task(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).get(args.id), indent=2, ensure_ascii=False))
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).retry(args.id), ensure_ascii=False))
    return 0


# -- import-config --------------------------------------------------------------


def _cmd_import_config(args: argparse.Namespace) -> int:
    from runner.migrate import import_config

    return import_config(args.old, args.output)


# -- validate -----------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    print(f"{config.source}: valid ({len(config.workers)} workers, {len(config.task_types())} task types)")
    for line in config_module.opt_in_warnings(config):  # valid, but say what the opt-ins give away
        print(f"warning: {line}", file=sys.stderr)
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
        "allow": worker.allow,
        "params_schema": worker.params_schema,
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
    _print_rows(table)


def _print_rows(table: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
