"""One task in one fresh container: create, attach, start, feed, read, kill, inspect, remove.

The runner supervises and reports what it saw (a ``ContainerEnd``); deciding
what that means is ``protocol.classify``'s job. It uses docker-py's low-level
``APIClient`` because the high-level one cannot attach before start, which is
the only way to see every byte a short-lived container writes.

The parts, by job: ``engine`` (the client, its errors as EngineError, the
probes), ``streams`` (the attach frames, the caps, the stdin/stdout
exchange), ``run`` (one task in one container), ``cleanup`` (removal,
cancellation, reaping) and ``runner`` (``DockerRunner``, which composes them).
"""

from __future__ import annotations

from runner.docker.cleanup import Orphan, Reaped
from runner.docker.engine import API_VERSION, connect
from runner.docker.labels import LABEL_ATTEMPT, LABEL_HOST, LABEL_OWNER, LABEL_TASK, LABEL_WORKER
from runner.docker.run import ContainerEvent, Observed, Observer, RunResult
from runner.docker.runner import DockerRunner
from runner.docker.streams import STDERR, STDERR_TAIL, STDOUT, Demuxer

__all__ = [
    "API_VERSION",
    "LABEL_ATTEMPT",
    "LABEL_HOST",
    "LABEL_OWNER",
    "LABEL_TASK",
    "LABEL_WORKER",
    "STDERR",
    "STDERR_TAIL",
    "STDOUT",
    "ContainerEvent",
    "Demuxer",
    "DockerRunner",
    "Observed",
    "Observer",
    "Orphan",
    "Reaped",
    "RunResult",
    "connect",
]
