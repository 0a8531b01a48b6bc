"""A process's name in its logs and traces, and starting both: what every server process
(`nexus-bus worker`, `shim`, `faststream run nexus_bus.runtime.app:app`) does first."""

from __future__ import annotations

import os
import secrets
import socket

from nexus_bus.config import Settings
from nexus_bus.observability.logging import configure_logging


def process_name(settings: Settings, role: str, ops: str | None = None) -> str:
    """What a process calls itself in logs and traces: `nexus-shim`, `nexus-worker-data`."""
    suffix = "-" + ops.replace(",", "-") if ops else ""
    return f"{settings.service}-{role}{suffix}"


def start_observability(settings: Settings, name: str) -> None:
    """Name this process in its log lines, and trace it when an OTLP endpoint is set."""
    from importlib.metadata import version

    from nexus_bus.observability.tracing import configure_tracing

    # A random part too: containers sharing the host's name (host networking) each run
    # their process as pid 1, and host-pid alone named them all the same.
    instance = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    configure_logging(
        name, settings.log.level, json_lines=settings.log.json_lines, instance=instance
    )
    configure_tracing(settings.tracing, name, instance=instance, version=version("nexus-bus"))
