"""Hooks for the tests, loaded by `serve` from `[telemetry] hooks`."""

from __future__ import annotations

from runner.telemetry.events import Event


def explode(event: Event) -> None:
    """A hook that fails on every event: it must change no outcome."""
    raise RuntimeError(f"this hook always fails ({event.name})")
