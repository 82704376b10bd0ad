"""Telemetry: events that the host emits and the hooks that observe them (logs, metrics)."""
