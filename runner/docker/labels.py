"""The labels on every task container: how a host finds its containers, and whose they are.

Several processes may share a host id (two ``serve`` on one machine), so a
container also names its owner, the token of the process that created it.
"""

from __future__ import annotations

LABEL_TASK = "workerhost.task_id"
LABEL_WORKER = "workerhost.worker"
LABEL_HOST = "workerhost.host_id"
LABEL_ATTEMPT = "workerhost.attempt"
LABEL_OWNER = "workerhost.owner"
LABEL_POOL = "workerhost.pool"  # a warm container, not yet a task's: "prewarm" or "reuse"


def label_filter(labels: dict[str, str]) -> dict[str, list[str]]:
    """The engine's filter for containers that carry all of ``labels``."""
    return {"label": [f"{key}={value}" for key, value in labels.items()]}
