"""DockerRunner: the runner port, composed of the engine's client, one run, and the cleanup."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import docker

from runner.config import WorkerConfig
from runner.docker import engine
from runner.docker.cleanup import Janitor, Reaped
from runner.docker.run import ContainerEvent, Observer, Phases, RunResult, create, engine_end, supervise
from runner.errors import EngineError
from runner.protocol import Envelope


class DockerRunner:
    """Runs tasks, each in a fresh container, with the worker's limits."""

    def __init__(self, client: docker.APIClient, host_id: str, owner: str = "") -> None:
        self.client = client
        self.host_id = host_id
        self.owner = owner  # this process, so that a later one can tell its orphans from a live sibling's
        self._janitor = Janitor(client, host_id, owner)

    def run(self, worker: WorkerConfig, task: Envelope, observe: Observer | None = None) -> RunResult:
        """Run ``task`` in a new container of ``worker`` and report how it ended.

        ``observe``, when given, is called from this thread with each log line
        of the worker, each span and progress report it sends, and container
        events; it must be quick. Never raises for the task's or the engine's
        sake: an engine failure is reported in the result's ``end.engine_error``
        and ``end.engine_fault``. A run that ``cancel`` killed says so in ``cancelled``.
        """
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
        """Wait for the removals still under way."""
        self._janitor.close()

    def __enter__(self) -> DockerRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
