"""Which process owns a container or a claimed task, and whether it is still alive.

Every ``serve`` process has an owner token, ``hostname:pid:random``, written on
each container it creates (label ``workerhost.owner``) and on each task it
claims (the lease). Several processes may share a host id (two ``serve`` on one
machine, or ``docker compose up --scale workerhost=2``), so the rule is: a
process never removes a container, nor hands back a task, whose owner is alive.

Whether an owner is alive is decided, in this order:

1. on this machine (its token names our hostname), by ``/proc``: a process with
   that pid that is a workerhost; decisive at once, so the next start after a
   ``kill -9`` hands everything back without waiting for a lease;
2. by the source's registry, when it keeps one (the embedded queue does): each
   process heartbeats and promises the next beat by a time; past it, it is dead;
3. otherwise it is unknown, and unknown counts as alive: nothing is removed on a
   guess (its tasks come back when their claims expire).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Protocol

from runner.docker import Reaped
from runner.errors import EngineError
from runner.sources import Owner, SourceUnavailable, TaskSource
from runner.task import SourceHealth

log = logging.getLogger(__name__)


def new_owner() -> str:
    """A token for this process: host name, pid and a random part (``host:pid:abcd1234``)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process behind a token runs, as far as this machine can tell (None: not ours to see)."""
    hostname, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if hostname != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # a token of ours that is not this instance's: an earlier process with our pid
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    # `workerhost serve`, or `python -m runner serve`
    return b"workerhost" in cmdline or b"runner\x00serve" in cmdline


class Liveness:
    """Decides, for this process (``me``), which owners are known to be dead."""

    def __init__(self, me: str) -> None:
        self.me = me
        self._registry: dict[str, Owner] = {}

    def update(self, owners: Iterable[Owner]) -> None:
        """What the source's registry says now."""
        self._registry = {owner.token: owner for owner in owners}

    def dead(self, owner: str) -> bool:
        """True only when ``owner`` is known to be dead; an unknown owner counts as alive."""
        if owner == self.me:
            return False
        if not owner:
            return True  # a container from before owner tokens: nobody can still hold it
        here = owner_alive(owner)
        if here is not None:
            return not here
        seen = self._registry.get(owner)
        return seen is not None and seen.expired

    def host_of(self, owner: str) -> str | None:
        """The host id the owner registered with, if the registry knows it."""
        seen = self._registry.get(owner)
        return seen.host_id if seen is not None else None


class Reaper(Protocol):
    def reap(self, dead: Callable[[str], bool]) -> Reaped: ...


class Undertaker:
    """Keeps this process in the source's registry, and cleans up after dead ones of its host id."""

    def __init__(
        self, owner: str, host_id: str, source: TaskSource, runner: Reaper, executor: Executor, health: SourceHealth
    ) -> None:
        self.owner = owner
        self.host_id = host_id
        self.source = source
        self.runner = runner
        self.executor = executor
        self.health = health
        self.liveness = Liveness(owner)

    async def heartbeat(self) -> None:
        """Tell the registry this process is alive (a source down is noted, not raised)."""
        try:
            await self.source.heartbeat(self.owner, self.host_id)
        except SourceUnavailable as exc:
            self.health.down(str(exc))

    async def forget(self) -> None:
        """Leave the registry (a clean stop)."""
        if not self.source.capabilities.registry:
            return
        try:
            await self.source.forget(self.owner)
        except SourceUnavailable as exc:
            log.warning("could not leave the registry of processes (%s); siblings will see the heartbeat expire", exc)

    async def tidy(self) -> None:
        """Remove what dead processes left: their containers, then hand their tasks back.

        Only owners known to be dead, and only tasks of this host id: another host's
        tasks may still have containers somewhere that this engine does not show.
        """
        registry = self.source.capabilities.registry
        try:
            if registry:
                self.liveness.update(await self.source.owners())
            loop = asyncio.get_running_loop()
            reaped = await loop.run_in_executor(self.executor, self.runner.reap, self.liveness.dead)
        except (EngineError, SourceUnavailable) as exc:
            log.warning("could not look for what dead processes left: %s", exc)
            return
        for orphan in reaped.removed:
            left_by = orphan.owner or "an unknown process"
            if orphan.pool:
                log.info("removed a warm container (%s) of worker %s left by %s (no longer running)",
                         orphan.pool, orphan.worker or "?", left_by)  # fmt: skip
            else:
                log.warning("removed a container of task %s left by %s (no longer running)",
                            orphan.task_id or "?", left_by)  # fmt: skip
        if not registry:
            return
        try:
            for held in await self.source.held():
                ours = self.liveness.host_of(held.owner) == self.host_id
                if held.task_id in reaped.kept or not ours or not self.liveness.dead(held.owner):
                    continue
                log.warning("task %s: its process %s died while it ran; handing it back", held.task_id, held.owner)
                await self.source.recover(held)
        except SourceUnavailable as exc:
            log.warning("could not hand back the tasks of dead processes: %s", exc)
