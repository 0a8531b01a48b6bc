"""Built-in operations, written against nexus_bus's public API like any user's own."""

from __future__ import annotations

from nexus_bus.handlers import ai, auth, data, stream
from nexus_bus.operations import Operations

BUILTIN: dict[str, Operations] = {g.op: g for g in (data.ops, stream.ops, ai.ops, auth.ops)}


def builtin_groups(names: list[str] | None = None) -> list[Operations]:
    """The built-in op groups, all or only those named.

    Raises:
        ValueError: a name that is not built in.
    """
    if not names:
        return list(BUILTIN.values())
    unknown = sorted(set(names) - set(BUILTIN))
    if unknown:
        raise ValueError(f"unknown built-in ops: {', '.join(unknown)}; have {', '.join(BUILTIN)}")
    return [BUILTIN[n] for n in names]
