"""Schemathesis hooks for tests/hostile/test_callers.py (``SCHEMATHESIS_HOOKS``): the fuzzer's valid
requests kept short.

A valid ``?wait`` may hold a request for 300 s, and a valid batch may hold 1,000 tasks, each a
container to run. Both are bounded here, a valid value staying valid (a wait of at most half a
second, a valid batch of at most ten tasks), so that the fuzzing is about what the API answers, not
about how long the engine takes. What was generated as invalid reaches the API as it is.
"""

from __future__ import annotations

import math
from typing import Any

import schemathesis
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode

SHORT_WAIT = 0.5
SMALL_BATCH = 10


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    wait = _valid_wait((case.query or {}).get("wait"))
    if wait is not None:
        case.query["wait"] = min(wait, SHORT_WAIT)
    body = case.body
    if isinstance(body, list) and SMALL_BATCH < len(body) <= 1000 and _generated_valid(case, ParameterLocation.BODY):
        case.body = body[:SMALL_BATCH]


def _valid_wait(value: Any) -> float | None:
    """The wait in seconds when the API would take it, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and 0 < seconds <= 300 else None


def _generated_valid(case: Any, location: ParameterLocation) -> bool:
    meta = getattr(case, "meta", None)
    component = meta.components.get(location) if meta is not None else None
    return component is not None and component.mode == GenerationMode.POSITIVE
