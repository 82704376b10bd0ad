"""What JSON workerhost accepts, stores and serves: only what reads back as JSON, everywhere.

Python's ``json`` is looser than JSON: it reads and writes ``NaN`` and
``Infinity``, keeps lone surrogates (``"\\ud800"``) that no UTF-8 encoder
takes, and nests as deep as the stack allows. Each of those, once stored,
broke every later read of the record. So params at submit and a worker's
result are checked here, with the path of the first problem, and what is
refused is never stored.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # objects and arrays nested deeper than this are refused
_QUOTE = 40


def problem(value: Any, where: str = "params", max_depth: int = MAX_DEPTH) -> str | None:
    """The first reason ``value`` would not read back as the same JSON, naming its path; None if it would."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= max_depth:
                return f"{path}: nested deeper than {max_depth} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return f"{path}: a key that is not a string ({key!r})"
                    if (bad := _text_problem(key)) is not None:
                        return f"{path}: a key {bad}"
                    stack.append((child, f"{path}.{key}" if _plain(key) else f"{path}[{json.dumps(key)}]", depth + 1))
            else:
                stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            if (bad := _text_problem(item)) is not None:
                return f"{path}: {bad}"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{path}: {item!r} is not a JSON number (NaN and Infinity are not JSON)"
        elif not (item is None or isinstance(item, bool | int)):
            return f"{path}: a {type(item).__name__} is not JSON"
    return None


def loads(data: str | bytes, where: str = "the value") -> tuple[Any, str | None]:
    """Parse JSON text and check it: (value, None), or (None, what is wrong) — never raises."""
    try:
        value = json.loads(data)
    except RecursionError:
        return None, f"{where}: nested too deep to read"
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"{where}: not valid JSON ({exc})"
    found = problem(value, where)
    return (None, found) if found is not None else (value, None)


def dumps(value: Any) -> str:
    """Compact JSON text for a value that ``problem`` passed (raises ValueError for one it would not)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def clean_text(text: str, limit: int | None = None) -> str:
    """``text`` with lone surrogates replaced (so that it encodes as UTF-8), cut to ``limit`` characters."""
    cleaned = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if _has_surrogate(text) else text
    if limit is not None and len(cleaned) > limit:
        return cleaned[:limit] + f"... ({len(cleaned)} characters)"
    return cleaned


def _text_problem(text: str) -> str | None:
    if _has_surrogate(text):
        index = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
        return f"a lone surrogate (\\u{ord(text[index]):04x}) at character {index}: not encodable as UTF-8"
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _plain(key: str) -> bool:
    return key.isidentifier() and len(key) <= _QUOTE
