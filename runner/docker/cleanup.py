"""After and around a run: removal off the critical path, cancellation, and reaping orphans.

A removal that fails (the engine was away) is remembered and retried by the
next ``reap``. A container is reaped only when its owner, the process that
created it, is known to be dead: several processes may share a host id, and a
live sibling's containers are its own business.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors

from runner.docker.engine import engine_errors
from runner.docker.labels import (
    LABEL_ATTEMPT,
    LABEL_HOST,
    LABEL_OWNER,
    LABEL_POOL,
    LABEL_TASK,
    LABEL_WORKER,
    label_filter,
)
from runner.docker.run import ContainerEvent, Observer, signal_kill
from runner.errors import EngineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Orphan:
    """A container that ``reap`` removed, as its labels named it."""

    task_id: str
    owner: str
    attempt: int | None
    pool: str = ""  # a warm container's kind ("prewarm", "reuse"): it had no task yet, or never said which
    worker: str = ""


@dataclass(frozen=True)
class Reaped:
    """What one ``reap`` did: the orphans it removed, and the tasks whose containers remain
    (their owner alive or unknown, or their removal failed)."""

    removed: list[Orphan]
    kept: frozenset[str]


class Janitor:
    """Removes, cancels and reaps the containers of one runner (``owner``) on one host id."""

    def __init__(self, client: docker.APIClient, host_id: str, owner: str) -> None:
        self.client = client
        self.host_id = host_id
        self.owner = owner
        self._unremoved: set[str] = set()  # ours, whose removal failed: reap tries them again
        self._unremoved_lock = threading.Lock()
        # Containers that ``cancel`` killed. The lock spans the kill and the mark, so that a
        # run that asks (``take_cancelled``) after its container died sees the mark if our kill did it.
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._remover = ThreadPoolExecutor(max_workers=2, thread_name_prefix="workerhost-remove")

    # -- removal --------------------------------------------------------------------------

    def remove_later(self, container: str, observe: Observer | None = None) -> None:
        """Remove the container off the critical path; ``close`` waits for it."""
        try:
            self._remover.submit(self._remove_ours, container, observe)
        except RuntimeError:  # closed while this run went on (a shutdown past its grace): remove it now
            self._remove_ours(container, observe)

    def remove_now(self, container: str) -> None:
        """Remove the container before returning (at shutdown); a failure is remembered for ``reap``."""
        self._remove_ours(container, None)

    def _remove_ours(self, container: str, observe: Observer | None) -> None:
        removed = self._remove(container)
        with self._unremoved_lock:
            if removed:
                self._unremoved.discard(container)
            else:
                self._unremoved.add(container)
        if removed and observe is not None:
            observe(ContainerEvent("removed", container))

    def _remove(self, container: str) -> bool:
        """Remove it (gone already counts); False, logged, when the engine failed."""
        try:
            with (
                engine_errors(f"could not remove container {container[:12]}"),
                contextlib.suppress(docker.errors.NotFound),  # gone already: what we wanted
            ):
                self.client.remove_container(container, force=True, v=True)
        except EngineError as exc:
            log.warning("%s (will try again)", exc)
            return False
        return True

    # -- cancellation ---------------------------------------------------------------------

    def cancel(self, task_id: str) -> bool:
        """Kill the running container of ``task_id`` that this runner owns; True if a kill was delivered."""
        found = self._containers({LABEL_TASK: task_id, LABEL_HOST: self.host_id, LABEL_OWNER: self.owner}, True)
        killed = False
        for container in found:
            with self._cancel_lock:
                if signal_kill(self.client, container["Id"]):
                    self._cancelled.add(container["Id"])
                    killed = True
        return killed

    def cancel_container(self, container: str) -> bool:
        """Kill a container that runs a task but carries no task label (a warm one); True if a kill was delivered."""
        with self._cancel_lock:
            if signal_kill(self.client, container):
                self._cancelled.add(container)
                return True
        return False

    def take_cancelled(self, container: str) -> bool:
        """Whether ``cancel`` killed this container (asked once, by its run, after it ended)."""
        with self._cancel_lock:
            if container in self._cancelled:
                self._cancelled.discard(container)
                return True
            return False

    # -- reaping --------------------------------------------------------------------------

    def reap(self, dead: Callable[[str], bool]) -> Reaped:
        """Retry our failed removals, then remove the containers on this host id whose owner is dead."""
        with self._unremoved_lock:
            leftovers = list(self._unremoved)
        for leftover in leftovers:
            self._remove_ours(leftover, None)
        removed: list[Orphan] = []
        kept: set[str] = set()
        for container in self._containers({LABEL_HOST: self.host_id}, False):
            labels = container.get("Labels") or {}
            orphan = Orphan(
                labels.get(LABEL_TASK, ""), labels.get(LABEL_OWNER, ""), _attempt(labels),
                labels.get(LABEL_POOL, ""), labels.get(LABEL_WORKER, ""),
            )  # fmt: skip
            # Ours are removed after their run, never here; an owner not known dead may still need its own.
            if orphan.owner == self.owner or not dead(orphan.owner) or not self._remove(container["Id"]):
                kept.add(orphan.task_id)
                continue
            removed.append(orphan)
        return Reaped(removed, frozenset(kept))

    def _containers(self, labels: dict[str, str], running: bool) -> list[dict[str, Any]]:
        with engine_errors("cannot list containers"):
            found: list[dict[str, Any]] = self.client.containers(all=not running, filters=label_filter(labels))
        return found

    def close(self) -> None:
        """Wait for the removals still under way."""
        self._remover.shutdown(wait=True)


def _attempt(labels: dict[str, str]) -> int | None:
    text = labels.get(LABEL_ATTEMPT, "")
    return int(text) if text.isdigit() else None
