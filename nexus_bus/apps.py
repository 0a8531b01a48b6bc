"""Operation groups by name: the built-in ones, and users' `module:attribute` references.

What `nexus-bus worker --app mypkg.pricing:ops`, `up --app` and `ops --app` load; below the
CLI, so the commands that live with their subsystems (`registry/commands.py`) can load
groups without importing the CLI back.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from nexus_bus.operations import DeclarationError, Operations, check_distinct


class AppNotFound(ValueError):
    """An `--ops` or `--app` argument that names nothing loadable, or operations declared so
    that they cannot be served; says which, in one line."""


def load_groups(ops: str | None, apps: Sequence[str]) -> list[Operations]:
    """Built-in groups named in `ops` plus user groups from `module:attribute` references.

    An attribute may be an `Operations` or a list of them. An error raised while your module
    runs (an import inside it that fails included) is raised as it is, with its traceback;
    but a `DeclarationError` (an op or action declared wrongly) is one line naming the file
    and line of the declaration.

    Raises:
        AppNotFound: an unknown built-in op, a module or attribute that does not exist, a
            reference that is not operations, an op or action declared wrongly, or two
            groups with the same op.
    """
    from nexus_bus.handlers import builtin_groups

    names = [n.strip() for n in ops.split(",") if n.strip()] if ops else []
    try:
        groups = builtin_groups(names) if (names or not apps) else []
    except ValueError as exc:
        raise AppNotFound(f"--ops {ops}: {exc}") from None
    if apps and os.getcwd() not in sys.path:
        # As uvicorn and FastStream do: `--app mypkg.pricing:ops` from the folder holding
        # `mypkg` (a console script's sys.path has only its own folder, not the current one).
        sys.path.insert(0, os.getcwd())
    for ref in apps:
        groups.extend(_load(ref))
    try:
        check_distinct(groups)
    except DeclarationError as exc:
        raise AppNotFound(f"{' '.join(f'--app {ref}' for ref in apps)}: {exc}") from None
    return groups


def _load(ref: str) -> list[Operations]:
    module_name, _, attr = ref.partition(":")
    attr = attr or "ops"
    if "" in module_name.split("."):  # none, or relative (`.pricing`)
        raise AppNotFound(f"--app {ref}: expected module:attribute, e.g. mypkg.pricing:ops")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The module named, or a package above it, does not exist. Not a module that yours
        # imports: that is your module's error, raised with its traceback.
        if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
            raise
        raise AppNotFound(f"--app {ref}: {exc}") from None
    except DeclarationError as exc:
        raise AppNotFound(f"--app {ref}: {_declared_at(exc)}{exc}") from None
    if not hasattr(module, attr):
        raise AppNotFound(f"--app {ref}: module {module_name!r} has no attribute {attr!r}")
    found = getattr(module, attr)
    items = found if isinstance(found, list | tuple) else [found]
    if not all(isinstance(g, Operations) for g in items):
        raise AppNotFound(f"--app {ref}: not an Operations group (or a list of them)")
    return list(items)


def _declared_at(exc: BaseException) -> str:
    """`file:line: ` of the innermost frame outside nexus-bus: the user's declaration."""
    ours = Path(__file__).resolve().parent
    outside = [
        frame for frame in traceback.extract_tb(exc.__traceback__)
        if ours not in Path(frame.filename).resolve().parents
        and not frame.filename.startswith("<frozen")
    ]
    return f"{outside[-1].filename}:{outside[-1].lineno}: " if outside else ""
