"""Who may call the API, and from where: bearer tokens, the Host check, and the audit trail.

``Guard`` is an ASGI middleware in front of every route. In order, it refuses:

- a ``Host`` header that is not a loopback name, one of ``[host] allowed_hosts``
  or (with no allowed_hosts) the address the host listens or was reached on:
  400. A page in a browser that rebinds its own name to 127.0.0.1 still sends
  its own name, so this is what stops DNS rebinding;
- an ``Origin`` header (a browser's cross-origin request) naming any other host:
  403. Without it, a page could POST a task to a loopback API that has no token;
- with tokens configured, a request without ``Authorization: Bearer <token>`` or
  with a token that is not one of them: 401 with ``WWW-Authenticate: Bearer``.
  ``GET /health`` (and ``GET /metrics`` with ``[host] metrics_public``) need no
  token; ``/health`` then says only whether the host is up and how busy;
- a session cookie (``POST /login`` trades a token for one, for the dashboard) counts
  as that token wherever a token is asked for, but a change (POST, PUT, PATCH,
  DELETE) made with it must carry ``X-Workerhost-CSRF: 1``, which a page on another
  site cannot send without the Origin check seeing it: 403 otherwise. The cookie is
  SameSite=Strict too, so another site's page does not send it at all.
  The dashboard's page and files, ``GET /session`` and ``POST /login`` need no token.

After the answer it counts every request (``workerhost_api_requests_total``,
``workerhost_auth_failures_total``) and logs one audit line for every change
(POST, PUT, PATCH, DELETE) and every refusal above: the token's name (never
the token), the peer, method, path, status and task id.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.config import ENV_TOKEN, HostConfig
from runner.errors import WorkerhostError
from runner.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

CALLER = "workerhost.caller"  # the key of the request's Caller in the ASGI scope's state
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_MAX_TOKEN = 4096  # longer than any token the config accepts: refused unread
_BODY_KEPT = 1024**2  # a change's answer read for its task id up to this size; past it, its opening
# A task's keys come before its params and result in the API's answer: found there in a long one.
_KEY_EARLY = {
    key: re.compile(rb'"' + key.encode() + rb'"\s*:\s*"([^"\\]{1,128})"')
    for key in ("id", "correlation_id", "trace_id")
}
_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$")
_PORT = re.compile(r"^(:[0-9]{1,5})?$")
_REALM = 'Bearer realm="workerhost"'
SESSION_COOKIE = "workerhost_session"
CSRF_HEADER = "x-workerhost-csrf"
REFUSED = "workerhost.refused"  # a route that refuses a credential itself (POST /login) says why here
SESSION_TTL = 12 * 3600.0
_MAX_SESSIONS = 10_000  # past this, the oldest sessions end
_DASHBOARD_FILES = "/static/dashboard/"


# -- where it listens -----------------------------------------------------------------------


def listen_host(address: str) -> str:
    """The host part of ``[host] http``, without brackets: "[::1]:8080" -> "::1"."""
    return address.rpartition(":")[0].strip("[]").lower()


def is_loopback(name: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (also as ::ffff:127.x.y.z)."""
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def beyond_loopback(address: str) -> bool:
    """Whether ``[host] http`` can be reached from other machines (no host part: serve binds 127.0.0.1)."""
    host = listen_host(address)
    return bool(host) and not is_loopback(host)


def check_listener(config: HostConfig) -> None:
    """Refuse to serve beyond loopback without a token; say who may call."""
    tokens = sorted(config.tokens())
    if beyond_loopback(config.http) and not tokens:
        raise WorkerhostError(
            f"[host] http = {config.http} listens beyond loopback; set [host] api_token "
            f'(for example api_token = "${{{ENV_TOKEN}}}") or listen on 127.0.0.1'
        )
    if tokens:
        log.info("the API asks for a token (%s)", ", ".join(tokens))
    else:
        log.info("the API has no token: anyone on this machine may call it ([host] api_token sets one)")


# -- the Host check -------------------------------------------------------------------------


def host_name(value: str | None) -> str | None:
    """The name in a Host header, lowercased, without port, brackets or a final dot; None if malformed."""
    if not value:
        return None
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, port = value[1:].partition("]")
        if not bracket or not _is_ipv6(name):
            return None
    else:
        name, colon, rest = value.partition(":")
        port = colon + rest
        name = name.removesuffix(".")
        if not _NAME.match(name):
            return None
    return name if _PORT.match(port) else None


def origin_host(origin: str) -> str | None:
    """The host an ``Origin`` header names ("null", from a sandboxed page or a file, names none)."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https"):
        return None
    return host_name(parts.netloc)


def _is_ipv6(name: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(name), ipaddress.IPv6Address)
    except ValueError:
        return False


@dataclass(frozen=True)
class HostPolicy:
    """The names the API answers to, besides loopback's (any port)."""

    names: frozenset[str]
    suffixes: tuple[str, ...] = ()  # "*.example.com" -> ".example.com": subdomains, not the name itself
    anything: bool = False  # "*": no check (something in front checks it)
    own_address: bool = True  # no allowed_hosts: the address a connection arrived at counts too

    @classmethod
    def from_config(cls, config: HostConfig) -> HostPolicy:
        entries = [entry.strip("[]") for entry in config.allowed_hosts]
        names = {entry for entry in entries if not entry.startswith("*")}
        if not entries:
            names.add(listen_host(config.http))  # "0.0.0.0", "10.0.0.5", "workerhost.internal"
        return cls(
            names=frozenset(names - {""}),
            suffixes=tuple(entry[1:] for entry in entries if entry.startswith("*.")),
            anything="*" in entries,
            own_address=not entries,
        )

    def allows(self, name: str | None, server: str | None = None) -> bool:
        """Whether a Host header's name (from ``host_name``) is one to answer; ``server`` is the
        address the connection arrived at (the ASGI scope's ``server``)."""
        if name is None:
            return False
        if self.anything or name in self.names or is_loopback(name):
            return True
        if any(name.endswith(suffix) for suffix in self.suffixes):
            return True
        # An address, not a name: a page cannot make a browser send it for a name it rebinds.
        return self.own_address and server is not None and name == server.lower().strip("[]")


# -- tokens ---------------------------------------------------------------------------------


class Tokens:
    """The API's tokens by name, kept as SHA-256 digests.

    A presented token is hashed and compared with every digest by
    ``hmac.compare_digest``: equal lengths, so neither a token's length nor how
    much of it is right shows in the time an answer takes.
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._digests = [(name, _digest(secret)) for name, secret in tokens.items()]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def identify(self, presented: str) -> str | None:
        """The name of the token presented, or None."""
        digest = _digest(presented)
        found = None
        for name, expected in self._digests:  # every one: the time does not say which matched
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class Sessions:
    """The dashboard's logins in this process: an opaque random id -> the token's name, until it expires.

    Only the id's SHA-256 digest is kept, so a dump of the process's memory holds no cookie that
    works; a restart logs everyone out.
    """

    def __init__(self, ttl: float = SESSION_TTL) -> None:
        self.ttl = ttl
        self._open: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def open(self, token_name: str) -> str:
        """A new session for the holder of ``token_name``'s token: the cookie's value."""
        session = secrets.token_urlsafe(32)
        self._open[_digest(session)] = (token_name, time.monotonic() + self.ttl)
        while len(self._open) > _MAX_SESSIONS:
            self._open.popitem(last=False)
        return session

    def identify(self, session: str | None) -> str | None:
        """The token name of a live session, or None (unknown or expired)."""
        if not session or len(session) > _MAX_TOKEN:
            return None
        key = _digest(session)
        found = self._open.get(key)
        if found is None:
            return None
        if found[1] < time.monotonic():
            del self._open[key]
            return None
        return found[0]

    def close(self, session: str | None) -> None:
        if session:
            self._open.pop(_digest(session), None)


def bearer(header: str | None) -> tuple[str | None, bool]:
    """(token, malformed) from an ``Authorization`` header: ``Bearer <token>``, the scheme in any case."""
    if header is None:
        return None, False
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN:
        return None, True
    return token, False


# -- what the routes see --------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who called: the token's name (None: no token), and whether the API asks for tokens."""

    token: str | None
    required: bool


def caller(connection: HTTPConnection) -> Caller | None:
    """The request's caller, as the guard admitted it (None: no guard ran)."""
    found: Caller | None = connection.scope.get("state", {}).get(CALLER)
    return found


def shows_details(connection: HTTPConnection) -> bool:
    """Whether this caller may see paths, URLs, ids and errors: a token, or an API without tokens."""
    who = caller(connection)
    return who is not None and (who.token is not None or not who.required)


def public_health(body: Mapping[str, Any]) -> dict[str, Any]:
    """``/health`` for a caller without a token: up or not, and how busy; no names, paths, URLs or errors."""
    host = body.get("host") or {}
    return {
        "status": body.get("status"),
        "host": {key: host[key] for key in ("alive", "stopping", "in_flight") if key in host},
        "engine": {"reachable": bool((body.get("engine") or {}).get("reachable"))},
        "source": {"reachable": bool((body.get("source") or {}).get("reachable"))},
    }


# -- the middleware -------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    reason: str  # host, origin, missing, malformed, invalid, csrf
    challenge: str | None = None

    async def send(self, send: Send) -> None:
        body = json.dumps({"error": self.message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if self.challenge:
            headers.append((b"www-authenticate", self.challenge.encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Exchange:
    """One request as the audit sees it: the status sent, and the opening of a change's answer."""

    def __init__(self, scope: Scope) -> None:
        self.status: int | None = None
        self.keep = scope["method"] in CHANGES
        self.body = bytearray()
        self.whole = True

    def watch(self, send: Send) -> Send:
        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message["type"] == "http.response.body" and self.keep:
                chunk = message.get("body", b"")
                if len(self.body) + len(chunk) > _BODY_KEPT:
                    self.whole, self.keep = False, False
                self.body += chunk[: _BODY_KEPT - len(self.body)]
            await send(message)

        return watched

    def task_keys(self) -> dict[str, str]:
        """The task answered (a submit's, a retry's): its ``id``, ``correlation_id`` and ``trace_id``."""
        if not self.body or self.status is None or self.status >= 300:
            return {}
        if not self.whole:  # too long to parse here: the task's keys come first
            found = {key: pattern.search(self.body[:4096]) for key, pattern in _KEY_EARLY.items()}
            return {key: m.group(1).decode("utf-8", "replace") for key, m in found.items() if m}
        try:
            answer = json.loads(self.body)
        except ValueError:
            return {}
        if not isinstance(answer, dict):
            return {}
        return {key: answer[key] for key in _KEY_EARLY if isinstance(answer.get(key), str)}


class Guard:
    """Host and Origin checks, bearer tokens, and the audit trail, in front of every route."""

    def __init__(
        self, app: ASGIApp, config: HostConfig, metrics: Metrics, routes: Sequence[BaseRoute],
        sessions: Sessions | None = None,
    ) -> None:  # fmt: skip
        self.app = app
        self.tokens = Tokens(config.tokens())
        self.sessions = sessions or Sessions()
        self.hosts = HostPolicy.from_config(config)
        self.public = {("GET", "/health"), ("GET", "/"), ("GET", "/session"), ("POST", "/login")} | (
            {("GET", "/metrics")} if config.metrics_public else set()
        )
        self.metrics = metrics
        self.routes = routes  # to name the route of a request refused before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admitted = self._admit(scope, Headers(scope=scope))
        exchange = _Exchange(scope)
        try:
            if isinstance(admitted, Refusal):
                exchange.status = admitted.status
                await admitted.send(send)
            else:
                scope.setdefault("state", {})[CALLER] = admitted
                await self.app(scope, receive, exchange.watch(send))
        finally:
            self._record(scope, admitted, exchange)

    def _admit(self, scope: Scope, headers: Headers) -> Caller | Refusal:
        server = (scope.get("server") or (None,))[0]
        if not self.hosts.allows(host_name(headers.get("host")), server):
            shown = _printable(headers.get("host", ""))
            return Refusal(400, f"this API does not answer to Host {shown!r}: add the name to [host] allowed_hosts",
                           "host")  # fmt: skip
        origin = headers.get("origin")
        if origin is not None and not self.hosts.allows(origin_host(origin), server):
            return Refusal(403, f"cross-origin request from {_printable(origin)!r} refused", "origin")
        if not self.tokens:
            return Caller(None, required=False)
        presented, malformed = bearer(headers.get("authorization"))
        if malformed:
            return Refusal(401, "the Authorization header is not 'Bearer <token>'", "malformed",
                           f'{_REALM}, error="invalid_request"')  # fmt: skip
        if presented is None:
            return self._by_session(scope, headers)
        name = self.tokens.identify(presented)
        if name is None:
            return Refusal(401, "the token is not valid", "invalid", f'{_REALM}, error="invalid_token"')
        return Caller(name, required=True)

    def _by_session(self, scope: Scope, headers: Headers) -> Caller | Refusal:
        """A request without a bearer token: its session cookie, or none (public routes only)."""
        method, path = scope["method"], scope["path"]
        public = (method, path) in self.public or (method == "GET" and path.startswith(_DASHBOARD_FILES))
        cookie = HTTPConnection(scope).cookies.get(SESSION_COOKIE)
        name = self.sessions.identify(cookie)
        if name is not None and method in CHANGES and headers.get(CSRF_HEADER) != "1":
            if public:  # POST /login: the cookie is not what it relies on
                return Caller(None, required=True)
            return Refusal(403, f"a change made with the session cookie needs the header {CSRF_HEADER}: 1", "csrf")
        if name is not None:
            return Caller(name, required=True)
        if public:
            return Caller(None, required=True)
        if cookie:
            return Refusal(401, "the session has ended: log in again (or send Authorization: Bearer <token>)",
                           "invalid", f'{_REALM}, error="invalid_token"')  # fmt: skip
        return Refusal(401, "a token is required: Authorization: Bearer <token>", "missing", _REALM)

    def _record(self, scope: Scope, admitted: Caller | Refusal, exchange: _Exchange) -> None:
        """Count the request and, for a change or a refusal, log it; never fails the request."""
        try:
            route, params = self._route(scope)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            status = exchange.status or 500  # nothing sent: the app raised, and the error page says 500
            self.metrics.api_requests.labels(route, method, str(status)).inc()
            state = scope.get("state") or {}
            admitted = state.get(CALLER, admitted) if isinstance(admitted, Caller) else admitted  # a login's
            refused = admitted.reason if isinstance(admitted, Refusal) else state.get(REFUSED)
            if refused in ("missing", "malformed", "invalid", "csrf"):
                self.metrics.auth_failures.labels(refused).inc()
            if method not in CHANGES and refused is None:
                return
            answered = exchange.task_keys()
            task_id = params.get("task_id") or answered.get("id")
            token = admitted.token if isinstance(admitted, Caller) else None
            # The task's correlation and trace ids too, when the answer says them: every line of a task
            # carries them (README, "Logs").
            keys: dict[str, str | None] = {
                "task_id": _printable(str(task_id)) if task_id else None,
                **{key: _printable(answered[key]) for key in ("correlation_id", "trace_id") if key in answered},
            }
            self._log(scope, token, status, refused, keys)
        except Exception:
            log.exception("the API's audit failed for one request")

    def _log(self, scope: Scope, token: str | None, status: int, refused: str | None, keys: dict[str, Any]) -> None:
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "-"
        if client and ":" in client[0]:
            peer = f"[{client[0]}]:{client[1]}"
        method, path = _printable(scope["method"], 16), _printable(scope["path"])
        task_id = keys["task_id"]
        fields = {"event": "api_request", "token": token or "-", "peer": peer, "method": method, "path": path,
                  "status": status, **keys, "refused": refused}  # fmt: skip
        log.log(
            logging.INFO if status < 400 else logging.WARNING,
            "%s %s %d by token %s from %s%s%s", method, path, status, token or "-", peer,
            f" (task {task_id})" if task_id else "", f" (refused: {refused})" if refused else "",
            extra={"fields": fields},
        )  # fmt: skip

    def _route(self, scope: Scope) -> tuple[str, dict[str, Any]]:
        """The route template (a bounded label, unlike the path) and the path's params."""
        route = scope.get("route")
        if route is None:  # refused before routing
            for candidate in self.routes:
                match, child = candidate.matches(scope)
                if match is not Match.NONE:
                    route, scope = candidate, {**scope, **child}
                    break
        path = getattr(route, "path", None)
        return (path if isinstance(path, str) else "other"), dict(scope.get("path_params") or {})


def _printable(text: str, limit: int = 200) -> str:
    """A caller's text made safe for one log line: control and non-ASCII characters escaped, bounded."""
    return text[:limit].encode("unicode_escape").decode("ascii")
