"""How an imported worker's function is called: with the params, or as the program it is.

PrismQ WorkerHost configs name ``module`` and ``function``. Most functions take the
task's params; a worker written from its template has a ``main()`` that takes
nothing, reads the task from stdin, prints the result and exits with its own code.
The entry script (render.py) calls the first kind through the SDK and runs the
second as it is. Reading the source decides it here when it can; what the source
cannot tell (a decorator, a method, Python 2 syntax) the entry script decides by
the same rule from the signature of what imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# "params": called with the task's params through the SDK; "protocol": run as it is, it speaks
# protocol v1 itself; "auto": one of the two, by its signature once imported.
Mode = Literal["params", "protocol", "auto"]


@dataclass(frozen=True)
class Calling:
    """How the entry script calls the worker's function, and what decided it."""

    mode: Mode
    reason: str


# What a worker that says nothing else gets (as before the other kinds were known).
WITH_PARAMS = Calling("params", "the function takes the params")


def module_file(project: Path, module: str) -> Path | None:
    """The file ``module`` is in, in the project (or its ``src``), or None."""
    relative = Path(*module.split("."))
    for root in (project, project / "src"):
        for file in ((root / relative).with_suffix(".py"), root / relative / "__init__.py"):
            if file.is_file():
                return file
    return None


def detect_calling(project: Path, module: str, function: str) -> Calling:
    """How the entry script calls ``module.function``: decided from the source when it can tell.

    A function that takes no parameters is a program that speaks the protocol itself
    (PrismQ WorkerHost's worker template: ``main()`` reads the task from stdin, prints
    the result, exits with its code); one that can take an argument gets the params.
    A decorated or re-bound function, a method, or a module that is not Python 3
    syntax is decided at run time by the same rule, from the signature of what imports.
    """
    later = f"{function}'s signature decides when it is imported"
    file = module_file(project, module)
    if file is None:
        return Calling("auto", f"{module} is not in the project: {later}")
    if "." in function:
        return Calling("auto", f"{function} is not a function of the module itself: {later}")
    try:
        tree = ast.parse(file.read_bytes(), str(file))
    except (OSError, SyntaxError, ValueError):
        return Calling("auto", f"{file.name} is not Python 3 syntax: {later}")
    bound = [node for node in _statements(tree.body) if function in _binds(node)]
    found = bound[0] if len(bound) == 1 else None
    if not isinstance(found, ast.FunctionDef) or found.decorator_list:
        return Calling("auto", f"{function} is not one plain def in {file.name}: {later}")
    args = found.args
    if args.posonlyargs or args.args or args.vararg:
        return Calling("params", f"{function}() takes the params")
    return Calling("protocol", f"{function}() takes no parameters: it reads the task and writes its result itself")


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The module's statements, inside if/try/with/loops too, but not inside a def or a class."""
    for node in body:
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for name in ("body", "orelse", "finalbody"):
                yield from _statements(getattr(node, name, []))
            for handler in getattr(node, "handlers", []):
                yield from _statements(handler.body)


def _binds(node: ast.stmt) -> set[str]:
    """The module-level names a statement binds."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Import | ast.ImportFrom):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign | ast.AugAssign | ast.For | ast.AsyncFor):
        targets = [node.target]
    elif isinstance(node, ast.With | ast.AsyncWith):
        targets = [item.optional_vars for item in node.items if item.optional_vars is not None]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
