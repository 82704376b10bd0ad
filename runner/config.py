"""Configuration: TOML in, validated pydantic models out.

Friendly inputs are turned into one type here, at the edge: sizes ("256m",
"1g") become bytes, durations ("30s", "5m") become seconds, ``${VAR}`` and
``${VAR:-default}`` are substituted from the environment. Every mistake is
reported as one line that names the file, the worker and the field, with the
bad value; all of them at once, not the first only.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.errors import ConfigError

DEFAULT_PATH = "workerhost.toml"
ENV_CONFIG = "WORKERHOST_CONFIG"

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*$", re.IGNORECASE)
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like "256m", "1g", "512KiB" (binary units)."""
    if isinstance(value, bool):
        raise ValueError('expected a size like "256m"')
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be positive")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
            if size > 0:
                return size
    raise ValueError('expected a size like "256m", "1g" or a number of bytes')


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like "30s", "5m", "1h", "500ms"."""
    if isinstance(value, bool):
        raise ValueError('expected a duration like "30s"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    else:
        raise ValueError('expected seconds, or a duration like "30s", "5m", "1h"')
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def format_size(size: int) -> str:
    """The shortest exact spelling of a size: 268435456 -> "256m"."""
    for unit in ("t", "g", "m", "k"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}b"


Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    # strict: `concurrency = true` or `cpus = "2"` are mistakes, not 1 and 2.0.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class HostConfig(_Section):
    """``[host]``: this host's identity and capacity."""

    id: str = Field(default_factory=socket.gethostname)
    concurrency: int = Field(default=4, ge=1, le=1024)
    http: str = "127.0.0.1:8080"
    grace: Duration = 30.0  # on shutdown, how long tasks in flight may finish
    poll_max: Duration = 2.0  # the longest pause between claims when the queue is idle
    max_body: Size = 16 * 1024**2  # the largest request the HTTP API accepts
    reap_interval: Duration = 30.0  # how often to look for containers left behind

    @field_validator("http")
    @classmethod
    def _address(cls, value: str) -> str:
        _, colon, port = value.rpartition(":")
        if not colon or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError('expected HOST:PORT, like "127.0.0.1:8080"')
        return value

    @field_validator("id")
    @classmethod
    def _default_id(cls, value: str) -> str:
        # An empty id (say, from "${WORKERHOST_HOST_ID:-}") means the hostname.
        return value.strip() or socket.gethostname()


class EmbeddedSource(_Section):
    """``[task_manager] type = "embedded"``: the SQLite queue shipped with the host."""

    type: Literal["embedded"] = "embedded"
    path: str = "var/workerhost.db"
    lease: Duration = 30.0  # a claim's lease; renewed while the container runs


class HttpSource(_Section):
    """``[task_manager] type = "http"``: a PrismQ TaskManager HTTP API."""

    type: Literal["http"]
    url: str = Field(min_length=1)  # base URL of the API, e.g. "http://taskmanager/api"
    api_key: str = ""
    worker_id: str = ""  # defaults to the host id
    task_types: list[str] = Field(default_factory=list)  # defaults to every configured task type
    claim_timeout: Duration = 300.0  # the server's claim timeout: a claim expires after it
    register_task_types: bool = False  # register configured task types the server does not know
    request_timeout: Duration = 10.0


class TelemetryConfig(_Section):
    """``[telemetry]``: where traces go (empty endpoint: nowhere, at no cost)."""

    service_name: str = "workerhost"  # OTEL_SERVICE_NAME wins
    otlp_endpoint: str = ""  # empty: OTEL_EXPORTER_OTLP_ENDPOINT, and if that is empty too, no export
    otlp_protocol: Literal["http/protobuf", "grpc"] | None = None  # default: OTEL_EXPORTER_OTLP_PROTOCOL or http
    log_format: Literal["auto", "json", "console"] = "auto"  # auto: console on a terminal, else JSON lines
    hooks: list[str] = Field(default_factory=list)  # "package.module:function", each called with every event


GVISOR = "runsc"
STRICT_TMPFS = 16 * 1024**2
STRICT_MAX_TIMEOUT = 300.0  # strict workers' hard cap on wall time
# gVisor's own threads (and, on its ptrace platform, a stub process per worker
# process) count against the pids limit: below this, a few forks or busy threads
# leave it unable to make a thread, and it dies.
STRICT_MIN_PIDS = 128
STRICT_PIDS = 256
STRICT_NOFILE = 256


class WorkerConfig(_Section):
    """``[[workers]]``: one worker image and the limits its containers run with.

    ``sandbox = "strict"`` is the standard isolation plus gVisor (``runsc``), no
    network whatever else says, ``nofile``/``fsize`` ulimits, a 16 MiB /tmp and
    256 pids by default, and a hard cap of 300 s on the task's wall time.
    """

    name: str = Field(min_length=1)
    image: str = Field(min_length=1)
    command: list[str] | None = None
    task_types: list[str] = Field(min_length=1)
    timeout: Duration = 30.0
    max_retries: int = Field(default=3, ge=0, le=100)
    backoff: Duration = 1.0
    backoff_max: Duration = 60.0
    concurrency: int = Field(default=1, ge=1, le=1024)
    cpus: float = Field(default=1.0, gt=0, le=1024)
    memory: Size = 256 * 1024**2
    pids_limit: int = Field(default=64, ge=1)
    network: str = Field(default="none", min_length=1)
    runtime: str | None = None
    user: str = "65534:65534"
    tmpfs: Size = 64 * 1024**2
    max_stdout: Size = 10 * 1024**2
    max_stderr: Size = 10 * 1024**2
    env: dict[str, str] = Field(default_factory=dict)
    sandbox: Literal["standard", "strict"] = "standard"

    @model_validator(mode="before")
    @classmethod
    def _strict_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sandbox") == "strict":
            data = {"runtime": GVISOR, "tmpfs": STRICT_TMPFS, "pids_limit": STRICT_PIDS, **data}
        return data

    @model_validator(mode="after")
    def _strict_rules(self) -> WorkerConfig:
        if self.sandbox != "strict":
            return self
        if self.network != "none":
            raise ValueError(
                f'network = "{self.network}" with sandbox = "strict": a strict worker has no network '
                "(untrusted code must not reach anything); use the standard sandbox for a worker that needs one"
            )
        if self.timeout > STRICT_MAX_TIMEOUT:
            raise ValueError(f'timeout = {self.timeout:g}s with sandbox = "strict": the cap is {STRICT_MAX_TIMEOUT:g}s')
        if self.pids_limit < STRICT_MIN_PIDS:
            raise ValueError(
                f'pids_limit = {self.pids_limit} with sandbox = "strict": gVisor\'s own threads count '
                f"against it, so it must be at least {STRICT_MIN_PIDS}"
            )
        return self

    @property
    def strict(self) -> bool:
        return self.sandbox == "strict"

    @field_validator("command")
    @classmethod
    def _command_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty command; leave it out to use the image's CMD")
        return value

    @field_validator("memory")
    @classmethod
    def _memory_floor(cls, value: int) -> int:
        # The engine refuses anything below 6 MiB; say so here instead of per task.
        if value < 6 * 1024**2:
            raise ValueError("the engine needs at least 6m of memory")
        return value


class Config(_Section):
    """The whole configuration, as loaded from one file."""

    host: HostConfig = Field(default_factory=HostConfig)
    task_manager: EmbeddedSource | HttpSource = Field(default_factory=EmbeddedSource, discriminator="type")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    workers: list[WorkerConfig] = Field(default_factory=list)
    source: str = Field(default=DEFAULT_PATH, exclude=True)

    def worker_for(self, task_type: str) -> WorkerConfig | None:
        """The worker that owns ``task_type``, or None."""
        for worker in self.workers:
            if task_type in worker.task_types:
                return worker
        return None

    def task_types(self) -> list[str]:
        """Every task type that some worker handles, in config order."""
        return [t for worker in self.workers for t in worker.task_types]


def default_path() -> Path:
    """``$WORKERHOST_CONFIG`` if set, else ``./workerhost.toml``."""
    return Path(os.environ.get(ENV_CONFIG) or DEFAULT_PATH)


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate a config file; raise ``ConfigError`` listing every mistake."""
    file = Path(path) if path is not None else default_path()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such file (pass -c FILE or set {ENV_CONFIG})"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read: {exc}"]) from None
    return loads(text, source=str(file), environ=environ)


def loads(text: str, source: str = DEFAULT_PATH, environ: Mapping[str, str] | None = None) -> Config:
    """Like ``load``, from a string; ``source`` names it in messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
    unset: dict[tuple[str | int, ...], str] = {}
    data = _substitute(raw, os.environ if environ is None else environ, (), raw, source, unset)
    if isinstance(data.get("task_manager"), dict):
        data["task_manager"].setdefault("type", "embedded")  # the default source needs no type
    problems = [*unset.values(), *_duplicates(data, source)]
    try:
        config = Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        # A value left empty by an unset variable is already reported once.
        problems.extend(_describe(e, raw, source) for e in exc.errors() if _loc(e) not in unset)
    if problems:
        raise ConfigError(problems)
    return config


def _substitute(
    value: Any,
    environ: Mapping[str, str],
    loc: tuple[str | int, ...],
    raw: dict[str, Any],
    source: str,
    unset: dict[tuple[str | int, ...], str],
) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``.

    A variable that is not set is recorded in ``unset`` (location -> message).
    """
    if isinstance(value, dict):
        return {k: _substitute(v, environ, (*loc, k), raw, source, unset) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, environ, (*loc, i), raw, source, unset) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        current = environ.get(name)
        if current:
            return current
        if default is not None:  # as in the shell: ":-" covers unset and empty
            return default
        if current is not None:
            return current
        unset[loc] = (
            f"{source}: {_where(loc, raw)}: environment variable {name} is not set "
            f"(in {value!r}; write ${{{name}:-default}} to give a default)"
        )
        return ""

    return _VARIABLE.sub(replace, value)


def _where(loc: tuple[str | int, ...], raw: dict[str, Any]) -> str:
    """A location as a person reads it: ``workers[1] (PrismQ.Echo).memory``."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            label = f"[{part}]"
            if loc[:i] == ("workers",):
                workers = raw.get("workers")
                if isinstance(workers, list) and part < len(workers) and isinstance(workers[part], dict):
                    name = workers[part].get("name")
                    if isinstance(name, str) and name:
                        label += f" ({name})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "(top level)"


def _loc(error: Any) -> tuple[str | int, ...]:
    loc = tuple(error["loc"])
    if loc[:1] == ("task_manager",) and loc[1:2] in (("embedded",), ("http",)):
        loc = loc[:1] + loc[2:]  # the union's tag is not a place in the file
    return loc


def _describe(error: Any, raw: dict[str, Any], source: str) -> str:
    loc = _loc(error)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{source}: {_where(loc, raw)}: unknown key"
    if kind == "missing":
        return f"{source}: {_where(loc, raw)}: required but missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "union_tag_invalid":
        tag = (error.get("ctx") or {}).get("tag")
        message = f"unknown type {tag!r}; expected one of: embedded, http"
    if isinstance(error.get("input"), dict):  # a rule about several fields: the message names them
        return f"{source}: {_where(loc, raw)}: {message}"
    return f"{source}: {_where(loc, raw)}: {message} (got {error.get('input')!r})"


def _duplicates(data: dict[str, Any], source: str) -> list[str]:
    """Task types claimed twice and names used twice, checked on the raw data so that
    they are reported together with every other mistake."""
    workers = data.get("workers")
    if not isinstance(workers, list):
        return []
    owners: dict[str, str] = {}
    names: set[str] = set()
    problems = []
    for index, worker in enumerate(workers):
        if not isinstance(worker, dict):
            continue
        name = str(worker.get("name", f"workers[{index}]"))
        where = _where(("workers", index), data)
        if name in names:
            problems.append(f"{source}: {where}.name: a second worker with this name")
        names.add(name)
        task_types = worker.get("task_types")
        for task_type in task_types if isinstance(task_types, list) else []:
            if not isinstance(task_type, str):
                continue
            if task_type in owners:
                owner = owners[task_type]
                problems.append(f"{source}: {where}.task_types: task type {task_type!r} already belongs to {owner}")
            else:
                owners[task_type] = name
    return problems
