"""DockerRunner: the runner port, composed of the engine's client, one run, warm containers, and the cleanup."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import docker

from runner.config import WorkerConfig
from runner.docker import engine
from runner.docker.cleanup import Janitor, Reaped
from runner.docker.pool import Warm, Warmer, run_reused
from runner.docker.run import (
    REUSE,
    ContainerEvent,
    DiedIdle,
    Observer,
    Phases,
    RunResult,
    create,
    engine_end,
    single_use,
    supervise,
)
from runner.errors import EngineError
from runner.protocol import Envelope

log = logging.getLogger(__name__)

_WARM_TRIES = 3  # warm containers a task may find dead (between the warmer's looks) before it runs cold


class DockerRunner:
    """Runs tasks, each in its own container (fresh, prewarmed, or a reused one for trusted workers)."""

    def __init__(self, client: docker.APIClient, host_id: str, owner: str = "") -> None:
        self.client = client
        self.host_id = host_id
        self.owner = owner  # this process, so that a later one can tell its orphans from a live sibling's
        self._janitor = Janitor(client, host_id, owner)
        self._warmer = Warmer(client, host_id, owner, self._janitor)
        self._warm_runs: dict[str, str] = {}  # task id -> its warm container (they carry no task label)
        self._warm_lock = threading.Lock()

    def warm(self, workers: Iterable[WorkerConfig]) -> None:
        """Keep warm containers for the workers with ``prewarm`` or ``reuse`` (serve does; ``run`` does not)."""
        self._warmer.start(workers)

    def warm_counts(self) -> dict[str, dict[str, Any]]:
        """Per worker with warm containers: mode, target, idle, busy, starting, and why it is broken if it is."""
        return self._warmer.counts()

    def run(self, worker: WorkerConfig, task: Envelope, observe: Observer | None = None) -> RunResult:
        """Run ``task`` in a container of ``worker`` and report how it ended.

        The container is a warm one when the worker keeps them and one is ready,
        else a new one. ``observe``, when given, is called from this thread with
        each log line of the worker, each span and progress report it sends, and
        container events; it must be quick. Never raises for the task's or the
        engine's sake: an engine failure is reported in the result's
        ``end.engine_error`` and ``end.engine_fault``. A run that ``cancel``
        killed says so in ``cancelled``.
        """
        if worker.warm_containers():
            for _ in range(_WARM_TRIES):
                phases = Phases()
                warm = self._warmer.take(worker)
                if warm is None:
                    break
                try:
                    return self._run_warm(warm, worker, task, phases, observe)
                except DiedIdle as exc:  # between the warmer's last look and the write: no task saw it
                    log.warning("worker %s: %s; the task goes to another container", worker.name, exc)
        return self._run_cold(worker, task, observe)

    def _run_warm(self, warm: Warm, worker: WorkerConfig, task: Envelope, phases: Phases,
                  observe: Observer | None) -> RunResult:  # fmt: skip
        began = time.monotonic()
        phases.mark("take")
        if observe is not None:
            observe(ContainerEvent("created", warm.container))
        with self._warm_lock:
            self._warm_runs[task.id] = warm.container
        keep = False
        try:
            if warm.mode == REUSE:
                result, keep = run_reused(self.client, warm, worker, task, began, phases, observe)
            else:
                result = single_use(self.client, warm.container, warm.sock, warm.attach, worker, task, began,
                                    phases, observe, demux=warm.demux, early=warm.early, mode=warm.mode,
                                    image_id=warm.image_id)  # fmt: skip
        except EngineError as exc:
            result = RunResult(
                engine_end(exc), container_id=warm.container, duration=time.monotonic() - began,
                phases=phases.done("teardown"), mode=warm.mode,
            )  # fmt: skip
        finally:
            with self._warm_lock:
                self._warm_runs.pop(task.id, None)
            if warm.mode == REUSE:
                self._warmer.give_back(warm, keep, observe)
            else:
                self._warmer.discard(warm, observe)
        if self._janitor.take_cancelled(warm.container):
            result = replace(result, cancelled=True)
        return result

    def _run_cold(self, worker: WorkerConfig, task: Envelope, observe: Observer | None) -> RunResult:
        began = time.monotonic()
        phases = Phases()
        try:
            container = create(self.client, worker, task, self.host_id, self.owner)
        except EngineError as exc:
            return RunResult(engine_end(exc), duration=time.monotonic() - began, phases=phases.done("create"))
        phases.mark("create")
        if observe is not None:
            observe(ContainerEvent("created", container))
        try:
            result = supervise(self.client, container, worker, task, began, phases, observe)
        except EngineError as exc:
            result = RunResult(
                engine_end(exc), container_id=container, duration=time.monotonic() - began,
                phases=phases.done("teardown"),
            )  # fmt: skip
        finally:
            self._janitor.remove_later(container, observe)
        # Asked only now that the container has ended: a kill that came too late (409) left no mark.
        if self._janitor.take_cancelled(container):
            result = replace(result, cancelled=True)
        return result

    def cancel(self, task_id: str) -> bool:
        """Kill the running container of ``task_id`` that this runner owns (label ``workerhost.owner``).

        True only when it was still running and the kill was delivered; its
        ``run`` then returns ``cancelled=True``. False when there was none, or it
        had already exited (its run reports how it ended). EngineError when the
        engine does not answer.
        """
        with self._warm_lock:
            warm = self._warm_runs.get(task_id)
        if warm is not None:
            return self._janitor.cancel_container(warm)
        return self._janitor.cancel(task_id)

    def reap(self, dead: Callable[[str], bool]) -> Reaped:
        """Retry our failed removals, then remove this host id's containers whose owner is dead.

        ``dead(owner)`` is True only when the process behind that owner token
        is known to be dead; it gets "" for a container without an owner label.
        A container of this runner's own owner is never removed here, nor one
        whose owner is alive or unknown: their tasks are in ``kept``.
        """
        return self._janitor.reap(dead)

    def image_present(self, image: str) -> bool:
        """Whether the engine has ``image`` (raises EngineError when it does not answer)."""
        return engine.image_present(self.client, image)

    def ping(self) -> str | None:
        """None when the engine answers, else why not."""
        return engine.ping(self.client)

    def engine_info(self) -> dict[str, Any]:
        """What the engine says of itself: version, runtimes, cgroup version, kernel (EngineError if silent)."""
        return engine.engine_info(self.client)

    def close(self) -> None:
        """Remove the idle warm containers, and wait for the removals still under way."""
        self._warmer.close()
        self._janitor.close()

    def __enter__(self) -> DockerRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
