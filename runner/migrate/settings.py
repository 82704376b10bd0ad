"""The old config's host-wide settings that workerhost has a key for: what each becomes, and the note that says so.

PrismQ WorkerHost kept these beside its workers: the task manager's
``poll_interval``, ``timeout``, ``retry_backoff`` and ``max_retries``;
``monitoring`` (a health check port, a metrics port); ``advanced``
(``resource_limits``, ``worker_pool``). Each one either lands on a
workerhost key, and a note names the key, or is left out, and a note says
why. A value that is not what its key needs is one problem line; the
workers still convert.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Keys of task_manager read here (plan.py reads the connection's own).
TASK_MANAGER_KEYS = frozenset({"poll_interval", "timeout", "retry_backoff", "max_retries"})
_MONITORING = ("health_check", "metrics")


@dataclass(frozen=True)
class Settings:
    """What the old file's host-wide settings become; None: the key keeps workerhost's default."""

    poll_max: float | None = None  # [host] poll_max, from task_manager.poll_interval
    http: str | None = None  # [host] http, from monitoring's health check (or metrics) port
    request_timeout: float | None = None  # [task_manager] request_timeout, from task_manager.timeout
    backoff: float | None = None  # every worker's backoff, from task_manager.retry_backoff
    memory: str | None = None  # every worker's memory, from advanced.resource_limits.max_memory_mb


def read_settings(data: dict[str, Any], source: Path, http_source: bool) -> tuple[Settings, list[str], list[str]]:
    """``(settings, problems, notes)`` from the old file; ``http_source``: its task manager converts."""
    problems: list[str] = []
    notes: list[str] = []

    def bad(key: str, message: str) -> None:
        problems.append(f"{source}: {key}: {message}")

    def note(text: str) -> None:
        notes.append(f"{source}: {text}")

    manager = data.get("task_manager")
    values = _task_manager(manager if isinstance(manager, dict) else {}, http_source, bad, note)
    values.update(_monitoring(data.get("monitoring"), bad, note))
    values.update(_advanced(data.get("advanced"), bad, note))
    return Settings(**values), problems, notes


def _task_manager(
    raw: dict[str, Any], http_source: bool, bad: Callable[[str, str], None], note: Callable[[str], None]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    poll = _seconds(raw, "poll_interval", bad)
    if poll is not None:
        values["poll_max"] = poll
        note(
            f"task_manager.poll_interval {poll:g}s is [host] poll_max: the longest pause between "
            "claims while there is nothing to do (while tasks keep coming, workerhost claims again at once)"
        )
    timeout = _seconds(raw, "timeout", bad)
    if timeout is not None and http_source:
        values["request_timeout"] = timeout
        note(
            f"task_manager.timeout {timeout:g}s is [task_manager] request_timeout: the longest a request to it may take"
        )
    elif timeout is not None:
        note("task_manager.timeout: not carried over: the task manager could not be converted")
    backoff = _seconds(raw, "retry_backoff", bad)
    if backoff is not None:
        values["backoff"] = backoff
        text = f"task_manager.retry_backoff {backoff:g}s is every worker's backoff (the first retry's delay, doubling)"
        if http_source:
            text += (
                "; the TaskManager server owns retries, so it counts only when these workers take tasks "
                "from another source"
            )
        note(text)
    if "max_retries" in raw:
        note(
            "task_manager.max_retries: not carried over: the TaskManager server owns retries (its own attempt "
            "limit decides); each worker's max_retries is kept, for other sources"
        )
    return values


def _monitoring(raw: Any, bad: Callable[[str, str], None], note: Callable[[str], None]) -> dict[str, Any]:
    """The health check's port (or, without one, the metrics'): workerhost serves both on ``[host] http``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        bad("monitoring", f"expected a mapping (got {raw!r})"[:200])
        return {}
    ports: dict[str, int] = {}
    known: set[str] = set()
    for what in _MONITORING:
        nested = raw.get(what)
        if isinstance(nested, dict):  # health_check: {enabled: true, port: 8080}
            known.add(what)
            enabled, port, where = nested.get("enabled", True), nested.get("port"), f"monitoring.{what}"
            other = sorted(str(k) for k in nested if k not in ("enabled", "port"))
            if other:
                note(f"{', '.join(f'{where}.{k}' for k in other)}: not carried over (no such setting in workerhost)")
        else:  # enable_health_check: true, health_check_port: 8080
            known |= {f"enable_{what}", f"{what}_port"}
            enabled, port, where = raw.get(f"enable_{what}", True), raw.get(f"{what}_port"), "monitoring"
        key = f"{where}.port" if where != "monitoring" else f"monitoring.{what}_port"
        if port is None:
            continue
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            bad(key, f"expected a port number from 1 to 65535 (got {port!r})"[:200])
        elif enabled is not False:
            ports[what] = port
    other = sorted(str(k) for k in raw if k not in known)
    if other:
        note(f"{', '.join(f'monitoring.{k}' for k in other)}: not carried over (no such setting in workerhost)")
    port = ports.get("health_check", ports.get("metrics"))
    if port is None:
        return {}
    http = f"127.0.0.1:{port}"
    if "health_check" in ports:
        note(
            f'monitoring\'s health check port {port} is [host] http = "{http}": `workerhost serve` answers '
            'GET /health there, on loopback only until [host] api_token is set (README "Security")'
        )
    if "metrics" in ports:
        note(
            f"monitoring's metrics port {ports['metrics']} is not a port of its own: `workerhost serve` "
            f"serves Prometheus metrics at GET /metrics on [host] http ({http}), with the API's token "
            "unless [host] metrics_public = true"
        )
    return {"http": http}


def _advanced(raw: Any, bad: Callable[[str, str], None], note: Callable[[str], None]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        bad("advanced", f"expected a mapping (got {raw!r})"[:200])
        return {}
    values: dict[str, Any] = {}
    limits = raw.get("resource_limits")
    if limits is not None and not isinstance(limits, dict):
        bad("advanced.resource_limits", f"expected a mapping (got {limits!r})"[:200])
    elif limits is not None:
        megabytes = limits.get("max_memory_mb")
        if megabytes is not None:
            if isinstance(megabytes, bool) or not isinstance(megabytes, int) or megabytes <= 0:
                bad("advanced.resource_limits.max_memory_mb", f"expected a whole number of MiB (got {megabytes!r})")
            else:
                values["memory"] = f"{megabytes}m"
                note(
                    f"advanced.resource_limits.max_memory_mb {megabytes} is every worker's memory = "
                    f'"{megabytes}m" (workerhost\'s default is 256m); a worker past it is killed (OOMKilled) '
                    "and its task fails for good: lower it per worker where less will do"
                )
        other = sorted(str(k) for k in limits if k != "max_memory_mb")
        if other:
            keys = ", ".join(f"advanced.resource_limits.{k}" for k in other)
            note(f"{keys}: not carried over (set cpus or pids_limit per worker)")
    pool = raw.get("worker_pool")
    if pool is not None:
        enabled = isinstance(pool, dict) and pool.get("enabled") is True
        state = "enabled" if enabled else "disabled"
        note(
            f"advanced.worker_pool ({state}): not carried over: workerhost has no pool of workers; "
            "every task runs in a fresh container (about 100-180 ms to start). It maps to prewarming "
            "(containers started ahead of time) once workerhost has it"
        )
    other = sorted(str(k) for k in raw if k not in ("resource_limits", "worker_pool"))
    if other:
        note(f"{', '.join(f'advanced.{k}' for k in other)}: not carried over (no such setting in workerhost)")
    return values


def _seconds(raw: dict[str, Any], key: str, bad: Callable[[str, str], None]) -> float | None:
    """``task_manager.KEY`` as a positive number of seconds, or None."""
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        bad(f"task_manager.{key}", f"expected a positive number of seconds (got {value!r})"[:200])
        return None
    return float(value)
