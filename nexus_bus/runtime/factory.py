"""Building a worker from settings: what `nexus-bus worker` and the module-level FastStream
app (`nexus_bus.runtime.app`) both do."""

from __future__ import annotations

from collections.abc import Sequence

from nexus_bus.apps import load_groups
from nexus_bus.config import Settings, load_settings
from nexus_bus.observability.process import process_name, start_observability
from nexus_bus.runtime.worker import Worker


def create_worker(
    settings: Settings | None = None, ops: str | None = None, apps: Sequence[str] = ()
) -> Worker:
    """A worker for `ops` (default: `worker.ops`, else every built-in) and the user groups
    in `apps`, its process named in logs and traces; `create_worker().app` is its FastStream
    application (`nexus_bus.runtime.app`).

    Raises:
        ConfigError: the settings are invalid.
    """
    settings = settings or load_settings()
    ops = ops or ",".join(settings.worker.ops) or None
    start_observability(settings, process_name(settings, "worker", ops))
    return Worker(settings, load_groups(ops, apps))
