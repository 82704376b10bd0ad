"""workerhost: run queued tasks, each in its own ephemeral Docker container."""

from __future__ import annotations

__version__ = "0.1.0"
