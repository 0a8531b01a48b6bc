"""Operation groups by name: the built-in ones, and users' `module:attribute` references.

What `nexus-bus worker --app mypkg.pricing:ops`, `up --app` and `ops --app` load; below the
CLI, so the commands that live with their subsystems (`registry/commands.py`) can load
groups without importing the CLI back.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from nexus_bus.operations import Operations


def load_groups(ops: str | None, apps: Sequence[str]) -> list[Operations]:
    """Built-in groups named in `ops` plus user groups from `module:attribute` references.

    An attribute may be an `Operations` or a list of them.

    Raises:
        ValueError: an unknown built-in op, or a reference that is not operations.
    """
    from nexus_bus.handlers import builtin_groups

    names = [n.strip() for n in ops.split(",") if n.strip()] if ops else []
    groups = builtin_groups(names) if (names or not apps) else []
    if apps and os.getcwd() not in sys.path:
        # As uvicorn and FastStream do: `--app mypkg.pricing:ops` from the folder holding
        # `mypkg` (a console script's sys.path has only its own folder, not the current one).
        sys.path.insert(0, os.getcwd())
    for ref in apps:
        module_name, _, attr = ref.partition(":")
        found = getattr(importlib.import_module(module_name), attr or "ops")
        items = found if isinstance(found, list | tuple) else [found]
        if not all(isinstance(g, Operations) for g in items):
            raise ValueError(f"{ref} is not an Operations group (or a list of them)")
        groups.extend(items)
    return groups
