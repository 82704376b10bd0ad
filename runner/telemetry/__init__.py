"""Telemetry: events that the host emits and the hooks that observe them (logs, metrics)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.config import TelemetryConfig


def otlp_endpoint(config: TelemetryConfig) -> str:
    """Where spans are exported: ``[telemetry] otlp_endpoint``, else ``OTEL_EXPORTER_OTLP_ENDPOINT``; "" for nowhere.

    Here rather than in ``tracing``, so that a command with nowhere to export
    (``workerhost run``, most often) can tell without importing OpenTelemetry.
    """
    return config.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
