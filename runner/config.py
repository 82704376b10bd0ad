"""Configuration: TOML in, validated pydantic models out.

Friendly inputs are turned into one type here, at the edge: sizes ("256m",
"1g") become bytes, durations ("30s", "5m") become seconds, ``${VAR}`` and
``${VAR:-default}`` are substituted from the environment. Every mistake is
reported as one line that names the file, the worker and the field, with the
bad value; all of them at once, not the first only.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, NamedTuple, NoReturn

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from runner.errors import ConfigError

if TYPE_CHECKING:  # jsonschema is imported only for a worker with a params_schema (50 ms of every start)
    from jsonschema import Draft202012Validator

DEFAULT_PATH = "workerhost.toml"
ENV_CONFIG = "WORKERHOST_CONFIG"
ENV_TOKEN = "WORKERHOST_API_TOKEN"  # the API token the CLI sends (and the shipped config reads)

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*$", re.IGNORECASE)
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# [host] api_tokens names (they reach logs) and the tokens themselves (RFC 6750's b64token).
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
MIN_TOKEN = 16
# [host] allowed_hosts: a name, "*.name", "*" (any), or an IP literal (IPv6 in brackets or not).
_HOST_NAME = re.compile(r"^(\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[?[0-9a-f:.]+\]?)$")


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
        raise ValueError('expected seconds, or a duration like "30s", "5m", "1h", "7d"')
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
    # Who may call the API (see runner/auth.py and README "Security"). Secrets are SecretStr:
    # a repr, a dump or a log of the config shows "**********".
    api_token: SecretStr = SecretStr("")  # the bearer token named "default"; empty: none
    api_tokens: dict[str, SecretStr] = Field(default_factory=dict)  # more tokens, by the name logs show
    metrics_public: bool = False  # GET /metrics without a token (GET /health never needs one)
    allowed_hosts: list[str] = Field(default_factory=list)  # Host names besides loopback's; "*.example.com"
    # The most that warm containers (prewarmed and reused, idle or not) may hold, by their memory limits.
    warm_memory: Size = 2 * 1024**3

    @field_validator("api_tokens")
    @classmethod
    def _token_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        bad = [name for name in value if not _TOKEN_NAME.match(name)]
        if bad:
            raise ValueError(f"token names are 1-64 letters, digits, '.', '_' or '-' (got {', '.join(map(repr, bad))})")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        names = [entry.strip().lower().removesuffix(".") for entry in value]
        bad = [entry for entry, name in zip(value, names, strict=True) if not _HOST_NAME.match(name)]
        if bad:
            raise ValueError(
                'expected host names without scheme or port, like "workerhost.example.com", '
                f'"*.example.com" or "[2001:db8::1]"; not {", ".join(map(repr, bad))}'
            )
        return names

    @model_validator(mode="before")
    @classmethod
    def _secrets_are_strings(cls, data: Any) -> Any:
        # Checked here, on the whole section, so that the message cannot quote the value.
        if isinstance(data, dict):
            tokens = data.get("api_tokens", {})
            if not isinstance(data.get("api_token", ""), str):
                raise ValueError("api_token: expected a string (the value is not shown: it is a secret)")
            if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
                raise ValueError("api_tokens: expected a table of strings (the values are not shown: they are secrets)")
        return data

    @model_validator(mode="after")
    def _secrets(self) -> HostConfig:
        # Messages name a token, never show it: the error has no "got ..." for a rule on the section.
        if self.api_token.get_secret_value() and "default" in self.api_tokens:
            raise ValueError('api_tokens: "default" is the name of api_token; choose another')
        tokens = self.tokens()
        unsendable = [name for name, secret in tokens.items() if not _TOKEN.match(secret)]
        if unsendable:
            raise ValueError(f"token {', '.join(unsendable)}: use letters, digits and - . _ ~ + / (and = at the end)")
        short = [name for name, secret in tokens.items() if len(secret) < MIN_TOKEN]
        if short:
            raise ValueError(
                f"token {', '.join(short)}: shorter than {MIN_TOKEN} characters; make one with `openssl rand -hex 32`"
            )
        by_secret: dict[str, str] = {}
        for name, secret in tokens.items():
            if secret in by_secret:
                raise ValueError(f"tokens {by_secret[secret]} and {name} are the same: logs could not tell them apart")
            by_secret[secret] = name
        return self

    def tokens(self) -> dict[str, str]:
        """Every token the API accepts, by name (``api_token`` is "default"); empty ones are off."""
        named = {"default": self.api_token, **self.api_tokens}
        return {name: secret.get_secret_value() for name, secret in named.items() if secret.get_secret_value()}

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
    retention: Duration = 7 * 86400.0  # finished tasks (completed, failed, dead) are deleted this long after


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
    max_attempts: int = Field(default=3, ge=1, le=1000)  # the server's MAX_TASK_ATTEMPTS: its last is final
    # Requests a minute to the server, all types together (the server allows 100; reports may exceed it).
    max_requests_per_minute: int = Field(default=60, ge=1, le=100_000)

    # What may stand raw in a URL path segment (RFC 3986 pchar, without "%"): the server does
    # not decode its path parameters, so a name that needs encoding can never be looked up.
    _PATH_SEGMENT: ClassVar[re.Pattern[str]] = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")

    @classmethod
    def lookup_problem(cls, name: str) -> str | None:
        """Why the server cannot look up a task type of this name (``GET /task-types/{name}``), or None."""
        if name in (".", ".."):
            return f"task type {name!r} is a path step, not a name the task manager can look up"
        if cls._PATH_SEGMENT.fullmatch(name):
            return None
        odd = "".join(dict.fromkeys(c for c in name if not cls._PATH_SEGMENT.fullmatch(c)))
        return (
            f"task type {name!r} cannot be looked up on the PrismQ TaskManager: {odd!r} would need URL "
            "encoding in GET /task-types/{name} and the server does not decode it; use letters, digits "
            "and . _ ~ - (or ! $ & ' ( ) * + , ; = : @)"
        )

    @field_validator("task_types")
    @classmethod
    def _lookupable(cls, value: list[str]) -> list[str]:
        problems = [problem for name in value if (problem := cls.lookup_problem(name)) is not None]
        if problems:
            raise ValueError("; ".join(problems))
        return value


class RedisSource(_Section):
    """``[task_manager] type = "redis"``: a queue kept in Redis (6.2 or later), shared by many hosts.

    The password and TLS go through the URL: ``redis://:secret@host:6379/0``, ``rediss://...``.
    The URL is a secret (it may hold a password): logs and errors show it without the password.
    """

    type: Literal["redis"]
    url: SecretStr
    prefix: str = Field(default="workerhost", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:{}-]+$")
    lease: Duration = 30.0  # a claim's lease; renewed while the container runs, taken over past it
    retention: Duration = 7 * 86400.0  # finished tasks (completed, failed, dead) are deleted this long after

    @model_validator(mode="before")
    @classmethod
    def _url_is_a_string(cls, data: Any) -> Any:
        # Checked on the whole section, so that the message cannot quote the URL (it may hold a password).
        if isinstance(data, dict) and not isinstance(data.get("url", ""), str):
            raise ValueError('url: expected a string like "redis://host:6379/0" (the value is not shown)')
        return data

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        from urllib.parse import urlsplit

        text = value.get_secret_value()
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 (raises for a port that is not a number)
        except ValueError as exc:
            raise ValueError(f"not a Redis URL ({exc}); expected redis://[:password@]host[:port][/db]") from None
        if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
            raise ValueError("expected redis://[:password@]host[:port][/db], rediss://... or unix:///path")
        return value

    @field_validator("lease")
    @classmethod
    def _lease(cls, value: float) -> float:
        if value < 1.0:
            raise ValueError("a Redis lease is at least 1s (Redis counts idle time in milliseconds)")
        return value


class AmqpSource(_Section):
    """``[task_manager] type = "amqp"``: RabbitMQ (AMQP 0-9-1), for systems that already publish tasks there.

    The broker carries tasks and keeps no record of them (runner/sources/amqp.py, README "RabbitMQ
    (AMQP)"). The URL is a secret (it may hold a password): logs and errors show it without the password.
    """

    type: Literal["amqp"]
    url: SecretStr  # amqp://user:password@host:5672/vhost, amqps://...
    queues: dict[str, str] = Field(default_factory=dict)  # task type -> queue name; default: the type's name
    results_exchange: str = Field(default="", max_length=255)  # a durable topic exchange; results go there too
    # A message the broker delivers again (its host died, lost the broker, or drained) waits this long
    # before it runs again, so that a container a dead host left running has ended first.
    redelivery_delay: Duration = 30.0
    connect_timeout: Duration = 10.0

    @model_validator(mode="before")
    @classmethod
    def _amqp_url(cls, data: Any) -> Any:
        # Checked on the whole section, so that the message cannot quote the URL (it may hold a password).
        if not isinstance(data, dict) or "url" not in data:
            return data
        from urllib.parse import urlsplit

        expected = "expected amqp://user:password@host[:port][/vhost] or amqps://... (the value is not shown)"
        if not isinstance(data["url"], str):
            raise ValueError(f"url: {expected}")
        try:
            parts = urlsplit(data["url"])
            parts.port  # noqa: B018 (raises for a port that is not a number)
        except ValueError:
            raise ValueError(f"url: not an AMQP URL; {expected}") from None
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(f"url: {expected}")
        return data

    @field_validator("queues")
    @classmethod
    def _queue_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [f"{k!r} -> {v!r}" for k, v in value.items() if not v or len(v.encode()) > 200]
        if bad:
            raise ValueError(f"queue names are 1-200 bytes (got {', '.join(bad)})")
        return value


class TelemetryConfig(_Section):
    """``[telemetry]``: where traces go (empty endpoint: nowhere, at no cost)."""

    service_name: str = "workerhost"  # OTEL_SERVICE_NAME wins
    otlp_endpoint: str = ""  # empty: OTEL_EXPORTER_OTLP_ENDPOINT, and if that is empty too, no export
    otlp_protocol: Literal["http/protobuf", "grpc"] | None = None  # default: OTEL_EXPORTER_OTLP_PROTOCOL or http
    log_format: Literal["auto", "json", "console"] = "auto"  # auto: console on a terminal, else JSON lines
    hooks: list[str] = Field(default_factory=list)  # "package.module:function", each called with every event
    # A task's trace in a viewer: {trace_id} is replaced (Jaeger: "http://localhost:16686/trace/{trace_id}").
    trace_url: str = ""

    @field_validator("trace_url")
    @classmethod
    def _trace_url(cls, value: str) -> str:
        if value and (not re.match(r"^https?://[^\s]+$", value) or "{trace_id}" not in value):
            raise ValueError(
                'expected an http(s) URL with {trace_id} in it, like "http://localhost:16686/trace/{trace_id}"'
            )
        return value


GVISOR = "runsc"
STRICT_TMPFS = 16 * 1024**2
STRICT_MAX_TIMEOUT = 300.0  # strict workers' hard cap on wall time
# gVisor's own threads (and, on its ptrace platform, a stub process per worker
# process) count against the pids limit: below this, a few forks or busy threads
# leave it unable to make a thread, and it dies.
STRICT_MIN_PIDS = 128
STRICT_PIDS = 256
STRICT_NOFILE = 256
MAX_PREWARM = 64  # prewarmed containers per worker
MAX_REUSE = 100_000  # tasks per reused container

# What a worker must opt in to with ``allow = [...]``, and what each gives away.
OPT_INS: dict[str, str] = {
    "host-network": "the worker reaches everything the host does, this host's API included "
    "(other tasks' params and results) and whatever listens on the host's loopback",
    "container-network": "the worker shares another container's network: it reaches what that container "
    "reaches, and that container's loopback services",
    "root": "the worker runs as root inside its container (all capabilities dropped, no-new-privileges and "
    "the read-only root filesystem still hold, but root owns the image's files and a kernel bug goes further)",
}
MAX_PARAMS_PROBLEMS = 20  # lines params_problems() returns at most
MAX_SCHEMA_FILE = 1024**2
_RUNTIME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_NETWORK = re.compile(r"(?:container:)?[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
# The Docker image reference grammar (distribution/reference): [host[:port]/]path[:tag][@digest].
_DOMAIN_PART = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*)(?::[\w][\w.-]{{0,127}})?(?:@sha256:[0-9a-f]{{64}})?",
    re.ASCII,
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _runs_as_root(user: str) -> bool:
    """``user`` as Docker reads it names root: "0", "0:…", "root", "root:…", or "" (the image's user)."""
    name = user.partition(":")[0].strip()
    return name in ("", "root") or (name.isdigit() and int(name) == 0)


class _Problem(NamedTuple):
    """A broken rule about a worker: where (a field, or () for the worker), why, and the value.

    A dict as the value says "a rule about several fields" to ``_describe``,
    which then quotes no value: the message names them.
    """

    loc: tuple[str, ...]
    message: str
    value: Any


def _reject(problems: list[_Problem]) -> NoReturn:
    """Raise several problems at once, each at its own place, as pydantic reports field errors."""
    errors = []
    for problem in problems:
        # The message goes in as a parameter: braces in it are not a template's.
        kind = PydanticCustomError("worker_rule", "{message}", {"message": problem.message})
        errors.append(InitErrorDetails(type=kind, loc=problem.loc, input=problem.value))
    raise ValidationError.from_exception_data("WorkerConfig", errors)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _json_path(parts: Any) -> str:
    """``params.items[2].text`` from jsonschema's path of an error."""
    path = "params"
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENTIFIER.fullmatch(str(part)):
            path += f".{part}"
        else:
            path += f"[{json.dumps(str(part))}]"
    return path


def _read_schema(value: str, info: ValidationInfo) -> dict[str, Any]:
    """The JSON Schema in the file ``value`` names, relative to the config file's folder."""
    base = Path((info.context or {}).get("folder") or ".")
    file = base / value
    try:
        with file.open("rb") as opened:
            data = opened.read(MAX_SCHEMA_FILE + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the schema file {file}: {exc.strerror or exc}") from None
    if len(data) > MAX_SCHEMA_FILE:
        raise ValueError(f"the schema file {file} is larger than {format_size(MAX_SCHEMA_FILE)}")
    try:
        schema = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError included
        raise ValueError(f"the schema file {file} is not JSON: {_clip(str(exc))}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"the schema file {file} holds a {type(schema).__name__}, not a JSON Schema object")
    _check_schema(schema, f"the schema in {file}")
    return schema


def _check_schema(schema: dict[str, Any], what: str) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ValueError(
            f"{what} is not a valid JSON Schema (Draft 2020-12): at {where}: {_clip(exc.message)}"
        ) from None


class WorkerConfig(_Section):
    """``[[workers]]``: one worker image and the limits its containers run with.

    ``sandbox = "strict"`` is the standard isolation plus gVisor (``runsc``), no
    network whatever else says, ``nofile``/``fsize`` ulimits, a 16 MiB /tmp and
    256 pids by default, and a hard cap of 300 s on the task's wall time.

    The host's network, another container's network and root need an explicit
    ``allow = ["host-network" | "container-network" | "root"]``; ``params_schema``
    (a JSON Schema, inline or a file next to the config) describes the params
    the worker takes, and ``params_problems()`` checks params against it.
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
    allow: list[str] = Field(default_factory=list)  # opt-ins, from OPT_INS
    # Warm containers (runner/docker/pool.py): started ahead and used once, or reused by one slot.
    prewarm: int = Field(default=0, ge=0, le=MAX_PREWARM)
    prewarm_ttl: Duration = Field(default=300.0, gt=0)  # a warm container older than this is replaced
    reuse: int = Field(default=0, ge=0, le=MAX_REUSE)  # tasks per long-lived container; 0: one task each
    # A JSON Schema: a table, or (in the file) a path relative to the config file's folder.
    params_schema: dict[str, Any] | None = None
    _params_validator: Draft202012Validator | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _strict_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sandbox") == "strict":
            data = {"runtime": GVISOR, "tmpfs": STRICT_TMPFS, "pids_limit": STRICT_PIDS, **data}
        return data

    @model_validator(mode="after")
    def _rules(self) -> WorkerConfig:
        """The rules about several fields, every broken one at once."""
        problems = self._strict_problems() + self._opt_in_problems() + self._warm_problems()
        if problems:
            _reject(problems)
        if self.params_schema is not None:
            # No registry of remote schemas: a "$ref" to a URL is never fetched (it is a problem when applied).
            from jsonschema import Draft202012Validator
            from referencing import Registry

            self._params_validator = Draft202012Validator(
                self.params_schema, registry=Registry(), format_checker=Draft202012Validator.FORMAT_CHECKER
            )
        return self

    def _strict_problems(self) -> list[_Problem]:
        if self.sandbox != "strict":
            return []
        messages = {}  # field -> why it breaks strict
        if self.runtime != GVISOR:
            messages["runtime"] = (
                f'runtime = "{self.runtime}" with sandbox = "strict": strict always runs under gVisor '
                f'(runtime "{GVISOR}"); leave runtime out, or use sandbox = "standard" for another runtime'
            )
        if self.network != "none":
            messages["network"] = (
                f'network = "{self.network}" with sandbox = "strict": a strict worker has no network '
                "(untrusted code must not reach anything); use the standard sandbox for a worker that needs one"
            )
        if self.timeout > STRICT_MAX_TIMEOUT:
            messages["timeout"] = (
                f'timeout = {self.timeout:g}s with sandbox = "strict": the cap is {STRICT_MAX_TIMEOUT:g}s'
            )
        if self.pids_limit < STRICT_MIN_PIDS:
            messages["pids_limit"] = (
                f'pids_limit = {self.pids_limit} with sandbox = "strict": gVisor\'s own threads count '
                f"against it, so it must be at least {STRICT_MIN_PIDS}"
            )
        # At the worker, not the field: the rule is about two fields, and the message names both.
        return [
            _Problem((), message, {"sandbox": self.sandbox, field: getattr(self, field)})
            for field, message in messages.items()
        ]

    def _warm_problems(self) -> list[_Problem]:
        if not self.reuse:
            return []
        if self.reuse == 1:
            message = "reuse = 1 is one task per container, which is what leaving reuse out does; leave it out"
            return [_Problem(("reuse",), message, self.reuse)]
        if self.sandbox == "strict":
            message = (
                f'reuse = {self.reuse} with sandbox = "strict": a reused container keeps what one task left '
                "for the next, which untrusted code must never get; use prewarm for fast strict tasks"
            )
            return [_Problem((), message, {"sandbox": self.sandbox, "reuse": self.reuse})]
        if self.prewarm:
            message = (
                f"prewarm = {self.prewarm} with reuse = {self.reuse}: a reusing worker keeps one started "
                "container per slot already; choose one of them"
            )
            return [_Problem((), message, {"prewarm": self.prewarm, "reuse": self.reuse})]
        return []

    def warm_containers(self) -> int:
        """How many warm containers this worker keeps: its prewarmed ones, or one per slot when it reuses."""
        return self.concurrency if self.reuse else self.prewarm

    def _opt_in_problems(self) -> list[_Problem]:
        problems = []
        for opt_in, (field, value, what) in self._needs().items():
            if opt_in not in self.allow:
                message = (
                    f'{what} needs an explicit opt-in: add allow = ["{opt_in}"] to this worker if it must '
                    f"(what it gives away: {OPT_INS[opt_in]})"
                )
                problems.append(_Problem((field,), message, value))
        return problems

    def _needs(self) -> dict[str, tuple[str, str, str]]:
        """The opt-ins this worker's settings need: opt-in -> (field, value, what it is)."""
        needs = {}
        if self.network == "host":
            needs["host-network"] = ("network", self.network, "the host's network")
        elif self.network.startswith("container:"):
            needs["container-network"] = ("network", self.network, "another container's network")
        if _runs_as_root(self.user):
            what = "root" if self.user.partition(":")[0].strip() else "the image's own user (usually root)"
            needs["root"] = ("user", self.user, what)
        return needs

    def warnings(self) -> list[str]:
        """One line per opt-in in ``allow``: what it gives away, or that nothing here uses it."""
        needs = self._needs()
        lines = []
        for opt_in in self.allow:
            if opt_in in needs:
                field, value, _ = needs[opt_in]
                lines.append(f'worker {self.name}: opted in to "{opt_in}" ({field} = "{value}"): {OPT_INS[opt_in]}')
            else:
                unused = "but no setting uses it; remove it, so that a later change cannot use it unnoticed"
                lines.append(f'worker {self.name}: allows "{opt_in}" {unused}')
        return lines

    def params_problems(self, params: Any) -> list[str]:
        """What is wrong with ``params`` by ``params_schema``: one line per violation, at most
        ``MAX_PARAMS_PROBLEMS``, each naming the JSON path and the rule; [] when they conform
        (or there is no schema)."""
        if self._params_validator is None:
            return []
        try:
            errors = list(itertools.islice(self._params_validator.iter_errors(params), MAX_PARAMS_PROBLEMS + 1))
        except Exception as exc:  # a "$ref" that does not resolve, a schema too deep: refuse, never crash
            return [f"params: the worker's params_schema cannot be applied: {_clip(f'{type(exc).__name__}: {exc}')}"]
        lines = [
            f"{_json_path(e.absolute_path)}: {_clip(e.message)} "
            f"(rule: {'.'.join(str(p) for p in e.absolute_schema_path) or e.validator})"
            for e in errors
        ]
        if len(lines) > MAX_PARAMS_PROBLEMS:
            lines[MAX_PARAMS_PROBLEMS - 1 :] = [f"... and more (the first {MAX_PARAMS_PROBLEMS - 1} are shown)"]
        return lines

    @property
    def strict(self) -> bool:
        return self.sandbox == "strict"

    @field_validator("allow")
    @classmethod
    def _known_opt_ins(cls, value: list[str]) -> list[str]:
        unknown = [entry for entry in value if entry not in OPT_INS]
        if unknown:
            known = ", ".join(f'"{name}"' for name in OPT_INS)
            raise ValueError(f"unknown opt-in {', '.join(map(repr, unknown))}; the known ones are {known}")
        return list(dict.fromkeys(value))

    @field_validator("params_schema", mode="before")
    @classmethod
    def _load_schema(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            return _read_schema(value, info)
        if isinstance(value, dict):
            _check_schema(value, "the schema")
            return value
        if value is None:
            return value
        raise ValueError("expected a JSON Schema: a table, or the path of a JSON file next to the config")

    @field_validator("runtime")
    @classmethod
    def _runtime_name(cls, value: str | None) -> str | None:
        if value is not None and not _RUNTIME.fullmatch(value):
            raise ValueError('expected the name of a runtime registered with the engine, like "runc" or "runsc"')
        return value

    @field_validator("image")
    @classmethod
    def _image_reference(cls, value: str) -> str:
        match = _IMAGE.fullmatch(value)
        if not match or len(match.group("name")) > 255:
            raise ValueError(
                "expected a Docker image reference: [registry[:port]/]name[:tag][@sha256:digest], "
                'the name in lowercase, like "workerhost/echo:latest"'
            )
        return value

    @field_validator("network")
    @classmethod
    def _network_name(cls, value: str) -> str:
        if not _NETWORK.fullmatch(value):
            raise ValueError('expected "none", "bridge", "host", "container:NAME" or the name of a Docker network')
        return value

    @field_validator("env")
    @classmethod
    def _env_entries(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"the variable name {key!r} is empty or holds '=' or a NUL byte")
            if "\0" in item:
                raise ValueError(f"the value of {key} holds a NUL byte")
        return value

    @field_validator("command")
    @classmethod
    def _command_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty command; leave it out to use the image's CMD")
        if value is not None and any("\0" in part for part in value):
            raise ValueError("a command entry holds a NUL byte")
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
    task_manager: EmbeddedSource | HttpSource | RedisSource | AmqpSource = Field(
        default_factory=EmbeddedSource, discriminator="type"
    )
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


def opt_in_warnings(config: Config) -> list[str]:
    """What the workers' opt-ins (``allow``) give away, one line each: for serve, doctor and validate."""
    return [line for worker in config.workers for line in worker.warnings()]


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
    problems = [*unset.values(), *_duplicates(data, source), *_unreachable_names(data, source)]
    try:
        # The folder is where a worker's params_schema file is looked for.
        config = Config.model_validate({**data, "source": source}, context={"folder": Path(source).parent})
    except ValidationError as exc:
        # A value left empty by an unset variable is already reported once.
        problems.extend(_describe(e, raw, source) for e in exc.errors() if _loc(e) not in unset)
    if not problems:
        problems = _warm_memory(config, source)
    if problems:
        raise ConfigError(problems)
    return config


def _warm_memory(config: Config, source: str) -> list[str]:
    """The warm containers of all workers, by their memory limits, within ``[host] warm_memory``."""
    warm = [(w, w.warm_containers() * w.memory) for w in config.workers if w.warm_containers()]
    total = sum(memory for _, memory in warm)
    if total <= config.host.warm_memory:
        return []
    parts = ", ".join(f"{w.name} {w.warm_containers()} x {_human_size(w.memory)}" for w, _ in warm)
    return [
        f"{source}: host.warm_memory: the workers' warm containers may hold {_human_size(total)} ({parts}), "
        f"more than warm_memory = {_human_size(config.host.warm_memory)}; lower prewarm (or concurrency "
        "where a worker reuses), or raise warm_memory"
    ]


def _human_size(size: int) -> str:
    for unit, factor in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}b" if size < 1024 else f"{size / 1024**2:.1f}m"


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
    if loc[:1] == ("task_manager",) and loc[1:2] in (("embedded",), ("http",), ("redis",), ("amqp",)):
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
        message = f"unknown type {tag!r}; expected one of: embedded, http, redis, amqp"
    if isinstance(error.get("input"), dict):  # a rule about several fields: the message names them
        return f"{source}: {_where(loc, raw)}: {message}"
    if _SECRET_KEYS.intersection(str(part) for part in loc):  # a URL with a password, a key, a token
        return f"{source}: {_where(loc, raw)}: {message} (the value is not shown: it may hold a secret)"
    return f"{source}: {_where(loc, raw)}: {message} (got {error.get('input')!r})"


# Keys whose values are never quoted in an error: they may hold a password, a key or a token.
_SECRET_KEYS = frozenset({"url", "api_key", "api_token", "api_tokens", "password", "env"})


def _unreachable_names(data: dict[str, Any], source: str) -> list[str]:
    """With the PrismQ source, the workers' task types the server could not look up by name."""
    manager, workers = data.get("task_manager"), data.get("workers")
    if not isinstance(manager, dict) or manager.get("type") != "http" or not isinstance(workers, list):
        return []
    problems = []
    for index, worker in enumerate(workers):
        task_types = worker.get("task_types") if isinstance(worker, dict) else None
        for task_type in task_types if isinstance(task_types, list) else []:
            if isinstance(task_type, str) and (problem := HttpSource.lookup_problem(task_type)) is not None:
                problems.append(f"{source}: {_where(('workers', index), data)}.task_types: {problem}")
    return problems


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
