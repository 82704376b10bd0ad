"""The PrismQ TaskManager HTTP API as a task source (``[task_manager] type = "http"``).

The server speaks JSON over HTTP with an ``X-API-Key`` header (every call but
``GET /health``). Its shape, and its quirks, as this adapter relies on them:

- A task type is claimed by its numeric id, one id per call. ``start()``
  resolves the ids of the configured task types (``GET /task-types/{name}``)
  and, with ``register_task_types = true``, registers the missing ones
  (version "1.0.0", param_schema: the worker's ``params_schema``, or
  ``{"type": "object"}`` without one; the server wants a "type" at the top, so
  a schema without one gets ``"type": "object"``); an unknown type that
  is not registered is logged as a warning, and looked up again at most every
  ``RESOLVE_EVERY`` seconds at a claim, so that a type registered later is
  claimed without a restart.
- The server does not decode path parameters, and registering a name that
  exists replaces that type. A name that needs URL encoding could never be
  found, and registering it would overwrite the type of that name: such names
  are refused at construction (a ``ConfigError``; ``HttpSource`` refuses them
  in ``[task_manager] task_types`` too), and a name is sent as it is.
- An empty queue is answered with HTTP 500 "There is no active transaction"
  (the server rolls back twice); that, and a 404 "No available tasks" from a
  server without the bug, mean "no task", not a fault. An unknown type or task
  is a 200 with no items.
- Ids come back as strings from some calls and as integers from others: they
  are normalised to ``str``.
- ``attempts`` in a claim counts the claim itself (the server's ``task_claim``
  increments it before it answers: 1 for a fresh task), so it is
  ``ClaimedTask.attempt`` as it is; a 0 or a missing value is read as 1.

Each claim is made under its own worker id, ``<worker_id>#<slot>`` with the
lowest slot that no unsettled claim of this host holds: the server tells a
task's claimer by its worker id alone, so with one id for the whole host, a
report from an attempt whose claim expired would be taken for the report of
the host's next claim of the same task. A slot is free again once its claim is
settled (complete, fail, or release).

Retries belong to the server. Each claim is one attempt; ``fail()`` reports
``success: false`` with ``error`` = "<type>: <message>" and the server puts the
task back in its queue until its own attempt limit, whatever ``retry_in`` says:
the host's retry delay is not used. A permanent failure is re-queued the same
way, because the API has no way to say "do not retry". The limit is
``[task_manager] max_attempts`` (the server's ``MAX_TASK_ATTEMPTS``, 3), which
each claim carries, so that the host knows which failure is the last.

There are no leases either. A claim expires after the server's claim timeout
(``claim_timeout``, 300 s by default), after which anyone may claim the task
again; a report that comes later is refused (403, or 400 "not in claimed state"
once the other claimer has settled it) and becomes ``LeaseLost``. So the
source declares no renewal and no registry (the host never renews, and never
hands back a dead process's tasks: their claims expire), but says how long a
claim is valid (``Capabilities.claim_timeout``); ``release()`` only logs when
the claim will expire; ``check_timeouts`` lists the workers whose timeout
outlives a claim.

The server allows 100 requests a minute. The adapter keeps to
``max_requests_per_minute`` for the source as a whole (runner/sources/ratelimit.py):
claims and progress wait for the budget (a claim then finds nothing), reports
are always sent; an idle host claims one type per call. A 429 becomes
``SourceUnavailable`` with ``retry_after`` (from ``Retry-After``, or "try
again in N seconds"), and nothing is sent until then. Every httpx error becomes
``SourceUnavailable``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import httpx

from runner import __version__, jsondata
from runner.config import HttpSource, WorkerConfig
from runner.errors import ConfigError
from runner.sources import Capabilities, ClaimedTask, Finished, LeaseLost, SourceUnavailable, TaskSource
from runner.sources.ratelimit import RequestBudget, retry_after
from runner.telemetry.context import parse as parse_traceparent

log = logging.getLogger(__name__)

REGISTER_VERSION = "1.0.0"
REGISTER_SCHEMA: dict[str, Any] = {"type": "object"}
RESOLVE_EVERY = 60.0  # seconds between lookups of the task types the server did not know
HEALTH_FRESH = 5.0  # seconds a health check's answer is reused (a probe costs a request of the budget)
RATE_LIMITED_WAIT = 60.0  # a 429 that does not say how long: the server's window
_QUOTE = 200


@dataclass(eq=False)
class Claim:
    """A claim's receipt: the worker id it was made under (its reports go under the same) and its slot."""

    worker_id: str
    slot: int


class HttpTaskSource(TaskSource):
    """A ``TaskSource`` backed by a PrismQ TaskManager server."""

    def __init__(
        self,
        config: HttpSource,
        host_id: str,
        task_types: list[str],
        client: httpx.AsyncClient | None = None,
        schemas: Mapping[str, dict[str, Any]] | None = None,
    ) -> None:
        """``task_types`` are the host's; ``config.task_types``, when set, takes their place.

        Pass ``client`` to share one; otherwise the source makes its own and
        ``close()`` closes it. ``schemas`` (task type -> JSON Schema of its
        params, see ``param_schemas``) is what a type is registered with.
        Raises ``ConfigError`` for a task type the server could not look up.
        """
        self._config = config
        self._schemas = dict(schemas or {})
        self._url = config.url.rstrip("/")
        self.worker_id = config.worker_id or host_id
        self.task_types = list(config.task_types or task_types)
        problems = [p for name in self.task_types if (p := HttpSource.lookup_problem(name)) is not None]
        if problems:
            raise ConfigError(problems)
        # The server re-queues a failed task itself (up to max_attempts, which each claim carries) and keeps
        # progress; claims cannot be renewed, and a report is accepted for claim_timeout after the claim.
        self.capabilities = Capabilities(
            renew_every=None, owns_retries=True, progress=True, knows_final_attempt=True,
            claim_timeout=config.claim_timeout,
        )  # fmt: skip
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=config.request_timeout, headers={"User-Agent": f"workerhost/{__version__}"}
        )
        self._budget = RequestBudget(config.max_requests_per_minute)
        self._blocked_until = 0.0  # monotonic: a 429 asked for no requests until then
        self._type_ids: dict[str, str] = {}  # name -> the server's id, for the types we claim
        self._unknown: list[str] = []
        self._resolved_at = 0.0  # monotonic: when the unknown types were last looked up
        self._started = False
        self._starting = asyncio.Lock()
        self._next = 0  # where the next claim starts, an index in self._type_ids
        self._idle = False  # the last claim found nothing: the next one tries a single type
        self._slots: dict[int, Claim] = {}  # the unsettled claims, by slot
        self._health: tuple[float, str | None] | None = None  # when the last probe answered, and its error

    @property
    def type_ids(self) -> dict[str, str]:
        """The resolved task types: name -> the server's id."""
        return dict(self._type_ids)

    @property
    def claims(self) -> list[str]:
        """The worker ids of this host's unsettled claims."""
        return [self._slots[slot].worker_id for slot in sorted(self._slots)]

    async def start(self) -> None:
        """Resolve the id of every task type, registering the missing ones if configured to."""
        async with self._starting:
            if self._started:
                return
            self._type_ids, self._unknown = await self._resolve(self.task_types)
            self._resolved_at, self._started = time.monotonic(), True

    async def claim(self, task_types: Collection[str]) -> ClaimedTask | None:
        """One task of these types, round-robin from the type after the last one claimed.

        While tasks come, each known type is tried at most once per call; once a
        call found nothing, a call tries one type, and only when an idle poll is
        due (``RequestBudget.poll``). Nothing is sent when the request budget is spent.
        """
        if not self._started:
            await self.start()
        await self._resolve_again()
        if self._idle and not self._budget.poll():
            return None
        claimable = list(self._type_ids)
        order = [(self._next + step) % len(claimable) for step in range(len(claimable))]
        wanted = [index for index in order if claimable[index] in task_types]
        for index in wanted[: 1 if self._idle else None]:
            if self._budget.left() <= 0:
                log.debug("request budget spent (%d a minute): no claim now", self._budget.per_minute)
                return None
            self._next = (index + 1) % len(claimable)
            task = await self._claim_type(claimable[index])
            if task is not None:
                self._idle = False
                return task
        self._idle = True
        return None

    async def complete(self, task: ClaimedTask, finished: Finished) -> None:
        """Report success with the outcome's result; raise LeaseLost if the claim moved on."""
        body: dict[str, Any] = {"worker_id": self._worker_of(task), "success": True}
        if finished.outcome.result is not None:
            body["result"] = finished.outcome.result
        await self._settle(task, body)

    async def fail(self, task: ClaimedTask, finished: Finished, retry_in: float | None) -> None:
        """Report a failure; the server re-queues the task until its own attempt limit.

        ``retry_in`` is not used, and a final failure (None) is re-queued too:
        the API has no way to say "do not retry".
        """
        outcome = finished.outcome
        if outcome.error is not None:
            error = str(outcome.error)
        else:
            error = f"WorkerFailed: the attempt ended as {outcome.status.value}"
        await self._settle(task, {"worker_id": self._worker_of(task), "success": False, "error": error})

    async def progress(self, task: ClaimedTask, percent: float, message: str | None = None) -> None:
        """Report how far the task got (0..100); raise LeaseLost if the claim moved on.

        Progress can wait: with the request budget spent, it is not sent (the next one will be).
        """
        if self._budget.left() <= 0:
            log.debug("task %s: progress %g%% not sent: the request budget is spent", task.id, percent)
            return
        body: dict[str, Any] = {"worker_id": self._worker_of(task), "progress": max(0, min(100, round(percent)))}
        if message is not None:
            body["message"] = message
        await self._on_task(task, "progress", body)

    async def release(self, task: ClaimedTask) -> None:
        """The API cannot hand a task back: log when its claim expires, free its slot, and return."""
        self._free(task)
        left = max(0.0, self._config.claim_timeout - (time.monotonic() - task.claimed_at))
        log.info(
            "task %s: the task manager cannot take a task back; its claim expires in %.0fs "
            "(claim_timeout %gs) and then anyone may claim it again",
            task.id,
            left,
            self._config.claim_timeout,
        )

    async def health(self) -> dict[str, Any]:
        """What this source resolved, once an authenticated call answered; SourceUnavailable if none did.

        The server's own ``GET /health`` needs no key, so it cannot tell a wrong key:
        this looks up a configured task type instead. An answer is reused for
        ``HEALTH_FRESH`` seconds, so that a monitor polling /health does not spend
        the request budget.
        """
        now = time.monotonic()
        if self._health is None or now - self._health[0] >= HEALTH_FRESH:
            probe = self.task_types[0] if self.task_types else "workerhost"
            try:
                await self._type_id(probe)
            except SourceUnavailable as exc:
                self._health = (now, str(exc))
            else:
                self._health = (now, None)
        error = self._health[1]
        if error is not None:
            raise SourceUnavailable(error)
        return {
            "type": "http",
            "url": self._url,
            "reachable": True,
            "worker_id": self.worker_id,
            "claims": self.claims,
            "task_types": self.type_ids,
            "unknown_task_types": list(self._unknown),
            "claim_timeout": self._config.claim_timeout,
            "max_attempts": self._config.max_attempts,
            "requests_last_minute": self._budget.used(),
            "max_requests_per_minute": self._budget.per_minute,
        }

    async def close(self) -> None:
        """Close the HTTP client, if this source made it."""
        if self._owns_client:
            await self._client.aclose()

    # -- task types --------------------------------------------------------------

    async def _resolve(self, names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        """The ids of these types (registering the missing ones if configured to), and those still unknown."""
        type_ids: dict[str, str] = {}
        unknown: list[str] = []
        for name in names:
            type_id = await self._type_id(name)
            if type_id is None and self._config.register_task_types:
                type_id = await self._register(name)
            if type_id is None:
                log.warning(
                    "task type %s is unknown to the task manager at %s: it is not claimed, and looked up "
                    "again every %gs (register it there, or set [task_manager] register_task_types = true)",
                    name,
                    self._url,
                    RESOLVE_EVERY,
                )
                unknown.append(name)
            else:
                type_ids[name] = type_id
        return type_ids, unknown

    async def _resolve_again(self) -> None:
        """Look the unknown types up again, at most every RESOLVE_EVERY seconds and within the budget."""
        now = time.monotonic()
        if not self._unknown or now - self._resolved_at < RESOLVE_EVERY:
            return
        if self._budget.left() < len(self._unknown):
            return  # at a later claim
        self._resolved_at = now
        found, self._unknown = await self._resolve(self._unknown)
        for name, type_id in found.items():
            log.info("task type %s is known to the task manager now (id %s): claiming it", name, type_id)
        self._type_ids.update(found)

    async def _type_id(self, name: str) -> str | None:
        path = f"/task-types/{name}"  # as it is: the server does not decode it (names are checked at start)
        status, payload = await self._send("GET", path)
        if status == 404:  # older servers: "Task type not found"
            return None
        data = self._data("GET", path, status, payload)
        if isinstance(data, dict) and isinstance(data.get("items"), list):
            items = data["items"]
            return self._id(items[0], "GET", path) if items else None
        return self._id(data, "GET", path)  # older servers: the type itself

    async def _register(self, name: str) -> str:
        # The server refuses a schema without a "type" at the top; params are objects anyway.
        schema = {**REGISTER_SCHEMA, **self._schemas.get(name, {})}
        body = {"name": name, "version": REGISTER_VERSION, "param_schema": schema}
        path = "/task-types/register"
        status, payload = await self._send("POST", path, body)
        data = self._data("POST", path, status, payload)
        if isinstance(data, dict) and data.get("updated"):
            # Registering replaces a type that exists: the lookup just before said it did not.
            log.error(
                "task type %s: the task manager says registering it replaced a type of that name "
                "(registered meanwhile by someone else?); check its version and param_schema there",
                name,
            )
        else:
            log.info("registered task type %s with the task manager", name)
        try:
            return self._id(data, "POST", path)
        except SourceUnavailable:
            # The id is missing from the answer: read it back.
            type_id = await self._type_id(name)
            if type_id is None:
                raise
            return type_id

    # -- tasks -------------------------------------------------------------------

    async def _claim_type(self, name: str) -> ClaimedTask | None:
        path = "/tasks/claim"
        type_id = self._type_ids[name]
        claim = self._take_slot()
        # The server wants a positive integer; the ids it hands out are.
        body = {"worker_id": claim.worker_id, "task_type_id": int(type_id) if type_id.isdigit() else type_id}
        sent_at = time.monotonic()  # the claim's clock starts on the server after this
        try:
            status, payload = await self._send("POST", path, body)
            data = None if _is_no_task(status, payload) else self._data("POST", path, status, payload)
            if data and not isinstance(data, dict):
                raise self._unexpected("POST", path, data)
            task_id = self._id(data, "POST", path) if data else None
        except BaseException:
            self._slots.pop(claim.slot, None)
            raise
        if task_id is None or not isinstance(data, dict):
            self._slots.pop(claim.slot, None)
            return None
        task = ClaimedTask(
            id=task_id, type=name, params={}, attempt=_attempt(data.get("attempts")),
            max_attempts=self._config.max_attempts, receipt=claim, claimed_at=sent_at,
        )  # fmt: skip
        params = _params(data.get("params"))
        if params is None:
            # Nothing a worker could run: fail it on the server rather than leave it claimed.
            log.warning("task %s of type %s has params that are not an object: reported as failed", task_id, name)
            error = f"InvalidParams: params must be a JSON object, got {_quote(data.get('params'))}"
            try:
                await self._settle(task, {"worker_id": claim.worker_id, "success": False, "error": error})
            except LeaseLost as exc:  # claim() raises nothing but SourceUnavailable
                log.warning("task %s: could not report its invalid params: %s", task_id, exc)
            return None
        # A producer may carry its trace context in the task (no field of the API holds it otherwise);
        # one that is not W3C is ignored, as the W3C says.
        traceparent = data.get("traceparent") or params.get("traceparent")
        valid = isinstance(traceparent, str) and parse_traceparent(traceparent) is not None
        return replace(task, params=params, traceparent=traceparent if valid else None)

    def _take_slot(self) -> Claim:
        slot = next(s for s in itertools.count(1) if s not in self._slots)
        claim = self._slots[slot] = Claim(f"{self.worker_id}#{slot}", slot)
        return claim

    def _free(self, task: ClaimedTask) -> None:
        claim = task.receipt
        if isinstance(claim, Claim) and self._slots.get(claim.slot) is claim:
            del self._slots[claim.slot]

    def _worker_of(self, task: ClaimedTask) -> str:
        """The worker id the task was claimed under (the host's own for a task this source did not claim)."""
        return task.receipt.worker_id if isinstance(task.receipt, Claim) else self.worker_id

    async def _settle(self, task: ClaimedTask, body: dict[str, Any]) -> None:
        """Complete the claim; its slot is free once the server took the report or said the task is not ours."""
        try:
            await self._on_task(task, "complete", body)
        except LeaseLost:
            self._free(task)
            raise
        self._free(task)

    async def _on_task(self, task: ClaimedTask, action: str, body: dict[str, Any]) -> None:
        path = f"/tasks/{quote(task.id, safe='')}/{action}"
        status, payload = await self._send("POST", path, body)
        # 403: claimed by another worker since ours expired; 400 "not in claimed
        # state": that other worker already settled it; 404: the task is gone.
        if status in (403, 404) or (status == 400 and "claimed state" in _error_text(payload).lower()):
            raise LeaseLost(
                f"task {task.id}: the task manager refused {action} (HTTP {status}: {_error_text(payload)}); "
                f"its claim expires after claim_timeout ({self._config.claim_timeout:g}s) and it may "
                "have been claimed again"
            )
        self._data("POST", path, status, payload)

    # -- one call ----------------------------------------------------------------

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, auth: bool = True
    ) -> tuple[int, dict[str, Any]]:
        """One request: its status and JSON object, every httpx error as SourceUnavailable."""
        url = self._url + path
        wait = self._blocked_until - time.monotonic()
        if wait > 0:
            raise SourceUnavailable(
                f"task manager at {self._url} is rate limiting this host: no requests for another {wait:.0f}s",
                retry_after=wait,
            )
        headers = {"X-API-Key": self._config.api_key} if auth else {}
        self._budget.spend()
        try:
            response = await self._client.request(method, url, json=body, headers=headers)
        except httpx.TimeoutException:
            raise SourceUnavailable(
                f"task manager at {url}: no answer to {method} within "
                f"request_timeout ({self._config.request_timeout:g}s)"
            ) from None
        except httpx.ConnectError as exc:
            raise SourceUnavailable(f"task manager at {url}: cannot connect: {exc}") from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise SourceUnavailable(f"task manager at {url}: {method} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code == 401:
            key = "refused the API key" if self._config.api_key else "needs an API key and none is set"
            raise SourceUnavailable(
                f"task manager at {self._url} {key} (HTTP 401 on {method} {path}); check [task_manager] api_key"
            )
        if response.status_code == 429:
            raise self._rate_limited(method, path, response)
        try:
            payload = response.json()
        except ValueError:
            raise SourceUnavailable(
                f"task manager at {url}: {method} answered HTTP {response.status_code} "
                f"with a body that is not JSON: {_quote(response.content)}"
            ) from None
        if not isinstance(payload, dict):
            raise self._unexpected(method, path, payload, response.status_code)
        return response.status_code, payload

    def _rate_limited(self, method: str, path: str, response: httpx.Response) -> SourceUnavailable:
        """A 429: send nothing more until the time it names (RATE_LIMITED_WAIT when it names none)."""
        try:
            payload = response.json()
        except ValueError:
            payload = None
        text = _error_text(payload) if isinstance(payload, dict) else response.text[:_QUOTE]
        wait = retry_after(response.headers.get("Retry-After"), text)
        wait = RATE_LIMITED_WAIT if wait is None else wait
        self._blocked_until = time.monotonic() + wait
        log.warning(
            "the task manager at %s refused %s %s for too many requests (%s); sending nothing for %.0fs "
            "(lower [task_manager] max_requests_per_minute if this recurs)",
            self._url,
            method,
            path,
            text,
            wait,
        )
        return SourceUnavailable(
            f"task manager at {self._url} is rate limiting this host (HTTP 429 on {method} {path}: {text}); "
            f"trying again in {wait:.0f}s",
            retry_after=wait,
        )

    def _data(self, method: str, path: str, status: int, payload: dict[str, Any]) -> Any:
        """The ``data`` of a successful answer; anything else is a fault of the source."""
        if 200 <= status < 300 and payload.get("success") is not False:
            return payload.get("data")
        details = payload.get("details")
        more = f" ({_quote(details)})" if details else ""
        raise SourceUnavailable(
            f"task manager at {self._url + path}: {method} answered HTTP {status}: {_error_text(payload)}{more}"
        )

    def _id(self, data: Any, method: str, path: str) -> str:
        value = data.get("id") if isinstance(data, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise self._unexpected(method, path, data)

    def _unexpected(self, method: str, path: str, data: Any, status: int = 200) -> SourceUnavailable:
        return SourceUnavailable(
            f"task manager at {self._url + path}: {method} answered HTTP {status} with an unexpected body: "
            f"{_quote(data)}"
        )


def check_timeouts(source_config: HttpSource, workers: Iterable[WorkerConfig]) -> list[str]:
    """One warning for each worker whose ``timeout`` outlives the server's claim.

    Such a task can be claimed again by another host while it still runs, and
    this host's report is then refused. Workers none of whose task types this
    source claims (``[task_manager] task_types``, when set) are left out.
    """
    served = set(source_config.task_types)
    limit = source_config.claim_timeout
    return [
        f"worker {worker.name}: timeout {worker.timeout:g}s exceeds the task manager's claim timeout "
        f"({limit:g}s, [task_manager] claim_timeout): a task still running after {limit:g}s can be "
        "claimed again by another host and this host's report will be refused; lower the worker's "
        "timeout or raise the server's claim timeout"
        for worker in workers
        if worker.timeout > limit and (not served or served.intersection(worker.task_types))
    ]


def param_schemas(workers: Iterable[WorkerConfig]) -> dict[str, dict[str, Any]]:
    """Task type -> its worker's ``params_schema``, for the workers that have one."""
    return {t: worker.params_schema for worker in workers if worker.params_schema for t in worker.task_types}


def _attempt(attempts: Any) -> int:
    """This attempt's number: the claim's ``attempts`` already counts this claim (1 when fresh)."""
    if isinstance(attempts, str) and attempts.strip().isdigit():
        attempts = int(attempts)
    if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 1:
        return attempts
    return 1


def _params(value: Any) -> dict[str, Any] | None:
    """A task's params as an object (None, or a JSON string of one, is accepted), or None if they are not."""
    if value is None:
        return {}
    if isinstance(value, str):
        value, problem = jsondata.loads(value, "params")
        if problem is not None:
            return None
    # Only what can be written to a worker's stdin and stored: no NaN, no lone surrogates, no bombs.
    return value if isinstance(value, dict) and jsondata.problem(value) is None else None


def _is_no_task(status: int, payload: dict[str, Any]) -> bool:
    text = _error_text(payload).lower()
    return (status == 500 and "no active transaction" in text) or (status == 404 and "no available task" in text)


def _error_text(payload: dict[str, Any]) -> str:
    parts = [str(payload[key]) for key in ("error", "message") if payload.get(key)]
    return ": ".join(dict.fromkeys(parts)) or "no error message"


def _quote(value: Any) -> str:
    if value == b"":
        return "(empty)"
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else repr(value)
    return text[:_QUOTE] + (f" ... ({len(text)} characters)" if len(text) > _QUOTE else "")
