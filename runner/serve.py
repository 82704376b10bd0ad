"""``workerhost serve``: the host loop and its HTTP API in one process, with signal handling.

The first SIGTERM or SIGINT drains (no new claims; tasks in flight get
``[host] grace`` to finish, then their containers are killed and their tasks
handed back); a second one exits at once, leaving the rest to the next
start's reaping and the leases' expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
from collections.abc import Iterator

import uvicorn

from runner.api import create_app
from runner.auth import check_listener
from runner.config import Config
from runner.docker import DockerRunner, connect
from runner.doctor import require_runtimes, warn_opt_ins
from runner.errors import EngineError, WorkerhostError
from runner.host import Host
from runner.owners import new_owner
from runner.sources import TaskSource, TaskStore
from runner.sources.embedded import EmbeddedQueue
from runner.telemetry.events import Hook, Hooks, log_hook
from runner.telemetry.metrics import Metrics
from runner.telemetry.tracing import Tracing

log = logging.getLogger(__name__)


def open_source(config: Config, owner: str) -> tuple[TaskSource, TaskStore | None]:
    """The configured task source, and what the API submits to and reads from (None: the tasks live
    in another system, PrismQ's TaskManager)."""
    manager = config.task_manager
    if manager.type == "embedded":
        queue = EmbeddedQueue(manager.path, owner=owner, lease=manager.lease, retention=manager.retention)
        return queue, queue
    if manager.type == "amqp":  # the broker carries tasks: the API publishes, and answers 501 for the rest
        from runner.sources.amqp import AmqpTaskSource

        broker = AmqpTaskSource(manager, config.workers)
        return broker, broker
    if manager.type == "redis":  # a whole queue shared by many hosts: the API answers all of it
        from runner.sources.redis import RedisQueue

        shared = RedisQueue(manager.url.get_secret_value(), owner=owner, prefix=manager.prefix,
                            lease=manager.lease, retention=manager.retention)  # fmt: skip
        return shared, shared
    from runner.sources.http import HttpTaskSource, check_timeouts, param_schemas

    for warning in check_timeouts(manager, config.workers):
        log.warning("%s", warning)
    schemas = param_schemas(config.workers)
    return HttpTaskSource(manager, config.host.id, config.task_types(), schemas=schemas), None


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the host owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:
        pass


async def serve(config: Config, burst: bool = False) -> int:
    """Run the host and its API until a signal (or, with ``burst``, until the queue is empty).

    Everything opened here is closed on every way out, a failed start-up check
    included: each resource joins the exit stack the moment it exists.
    """
    warn_opt_ins(config, log)  # what each worker's allow = [...] gives away, at every start
    async with contextlib.AsyncExitStack() as opened:
        check_listener(config.host)  # no token beyond loopback: refuse before anything opens
        listener = _listen(config.host.http)  # first, so that a taken port stops us before any claim
        opened.callback(listener.close)
        owner = new_owner()
        source, queue = open_source(config, owner)
        opened.push_async_callback(source.close)
        client = connect(check=False)
        opened.callback(client.close)
        runner = DockerRunner(client, config.host.id, owner)
        opened.callback(runner.close)
        tracing = Tracing(config.telemetry)
        opened.callback(tracing.shutdown)
        require_runtimes(config, runner)  # a strict worker the engine cannot run: say so now, not task by task
        metrics = Metrics()
        # User hooks last: logs and metrics are in place whatever a user's hook does.
        user_hooks = load_hooks(config.telemetry.hooks)
        hooks = Hooks([tracing, log_hook, metrics, *user_hooks], contexts=tracing.span_context)
        host = Host(config, source, runner, hooks, owner=owner)
        host.engine_ok(_warn_about_images(config, runner))
        runner.warm(config.workers)  # prewarm and reuse: containers started ahead, removed by runner.close
        # log_config=None: uvicorn's loggers keep no handlers of their own and go through ours (runner.telemetry.logs).
        server = _Server(uvicorn.Config(create_app(host, metrics, queue), log_level="warning", access_log=False,
                                        lifespan="off", log_config=None))  # fmt: skip
        api = asyncio.create_task(server.serve(sockets=[listener]), name="api")
        opened.push_async_callback(_stop_api, server, api)
        signals = _SignalHandler(host)
        signals.install()
        opened.callback(signals.uninstall)
        log.info("workerhost serve: host %s, %d workers, %s source, API on http://%s",
                 config.host.id, len(config.workers), config.task_manager.type, config.host.http)  # fmt: skip
        loop_task = asyncio.create_task(host.run(burst=burst), name="host")
        done, _ = await asyncio.wait({loop_task, api}, return_when=asyncio.FIRST_COMPLETED)
        if api in done and not loop_task.done():
            log.error(
                "the API stopped (%r); stopping the host", api.exception() if not api.cancelled() else "cancelled"
            )
            host.stop()  # a host nobody can reach stops too (the API's error is raised below)
        await loop_task
        if api.done() and not api.cancelled() and api.exception() is not None:
            raise api.exception()  # type: ignore[misc]
    return 0


async def _stop_api(server: uvicorn.Server, api: asyncio.Task[None]) -> None:
    if api.done():  # it stopped by itself: serve() has logged and raises its error
        return
    server.should_exit = True
    try:
        await asyncio.wait_for(asyncio.shield(api), 5)
    except TimeoutError:
        log.warning("the API did not stop within 5s; cancelling it")
        api.cancel()
    except Exception:
        log.exception("the API failed while stopping")


def _listen(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it; without it, Nagle and delayed ACKs add 40 ms
        # to every request (uvicorn sets it only on sockets it binds itself).
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind((host, int(port)))
        listener.listen(128)
    except (OSError, ValueError) as exc:
        raise WorkerhostError(f"cannot serve the API on {address} ([host] http): {exc}") from None
    listener.setblocking(False)
    return listener


class _SignalHandler:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.count = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.count += 1
        if self.count == 1:
            log.warning("%s: draining (send it again to exit at once)", sig.name)
            self.host.stop()
            return
        log.warning("%s again: exiting now; the next start reaps what is left", sig.name)
        logging.shutdown()
        os._exit(128 + sig.value)


def load_hooks(paths: list[str]) -> list[Hook]:
    """User hooks from ``[telemetry] hooks``: "package.module:function" (or "package.module.function")."""
    hooks = []
    for path in paths:
        module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
        try:
            hook = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise WorkerhostError(f"[telemetry] hooks: cannot load {path!r}: {exc}") from None
        if not callable(hook):
            raise WorkerhostError(f"[telemetry] hooks: {path!r} is not callable")
        hooks.append(hook)
    return hooks


def _warn_about_images(config: Config, runner: DockerRunner) -> str | None:
    """Warn about missing images; returns why the engine does not answer, or None."""
    error = runner.ping()
    if error:
        log.warning("%s; tasks will fail (retriably) until it answers", error)
        return error
    for worker in config.workers:
        try:
            if not runner.image_present(worker.image):
                log.warning("worker %s: image %s is missing; build it with `make build-images`",
                            worker.name, worker.image)  # fmt: skip
        except EngineError as exc:
            log.warning("worker %s: cannot check image %s: %s", worker.name, worker.image, exc)
    return None
