"""Finding the stack `nexus-bus up` started, from its `<state_dir>/stack.json`.

`up` records the addresses it chose as `NEXUS_*` variables (`NEXUS_NATS__URL`,
`NEXUS_REDIS__URL`, `NEXUS_HTTP__PORT`, `NEXUS_STATE_DIR`) and the process ids of its
children. `load_settings()` reads them back, so the CLI, a worker of your own and a script
using the gateway client all find a running stack the same way: in `NEXUS_STATE_DIR` when it
is set, else in `.nexus` of the current folder or the nearest parent folder that has one
(as git finds `.git`). A file whose processes are gone is ignored.

Explicit settings always win: a variable set in the environment is never replaced, and a
configured NATS URL other than the stack's means "not this stack" (nothing is taken from it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

STACK_FILE: Final = "stack.json"
STATE_DIR_NAME: Final = ".nexus"
ENV_PREFIX: Final = "NEXUS_"
NATS_URL_VAR: Final = "NEXUS_NATS__URL"
DEV_TOKEN_FILE: Final = "admin.token"  # under the state dir; `nexus-bus call` falls back to it


def read_stack(state_dir: Path) -> dict[str, str]:
    """The variables a running `up` stack recorded in `state_dir`, or {} when none runs there."""
    try:
        doc = json.loads((state_dir / STACK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    pids = doc.get("pids", [])
    for pid in pids if isinstance(pids, list) else []:
        try:
            os.kill(int(pid), 0)
        except (OSError, ValueError, TypeError):
            return {}  # the stack that wrote this file has stopped (or crashed)
    return {k: v for k, v in doc.items() if k.startswith(ENV_PREFIX) and isinstance(v, str)}


def find_stack(state_dir: Path | None, cwd: Path) -> dict[str, str]:
    """The running stack of `state_dir`, or (None) of `cwd/.nexus` or a parent's `.nexus`."""
    if state_dir is not None:
        return read_stack(cwd / state_dir)
    for folder in (cwd, *cwd.parents):
        found = read_stack(folder / STATE_DIR_NAME)
        if found:
            return found
    return {}


def settings_values(variables: Mapping[str, str]) -> dict[str, Any]:
    """`NEXUS_*` variables as nested settings values: `NEXUS_HTTP__PORT` -> {"http": {"port"}}."""
    values: dict[str, Any] = {}
    for name, value in variables.items():
        path = name.removeprefix(ENV_PREFIX).lower().split("__")
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return values


def stack_overrides(
    found: Mapping[str, str], environ: Mapping[str, str], configured_nats_url: str | None
) -> dict[str, Any]:
    """The settings values a found stack contributes under explicit configuration.

    Args:
        found: the stack's variables (`find_stack`).
        environ: the process environment; a variable set there is kept.
        configured_nats_url: the NATS URL set explicitly (environment, file or argument),
            or None; when it is another server the stack contributes nothing.
    """
    if configured_nats_url is not None and configured_nats_url != found.get(NATS_URL_VAR):
        return {}
    return settings_values({k: v for k, v in found.items() if k not in environ})


def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `top`, nested dictionaries merged key by key (`top` wins)."""
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if isinstance(below, dict) and isinstance(value, Mapping):
            merged[key] = merge(below, value)
        else:
            merged[key] = value
    return merged


def read_dev_token(state_dir: Path) -> str | None:
    """The admin token `nexus-bus up` left in `state_dir`, if any."""
    try:
        return (state_dir / DEV_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None
