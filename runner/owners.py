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

import os
import secrets
import socket
from collections.abc import Iterable

from runner.sources import Owner


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
