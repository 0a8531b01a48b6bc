"""Opt-in speedups over nats-py's private internals: off by default, per connection.

The only one left is the header parser and encoder (`headers.py`): on the HTTP benchmark at
concurrency 16 it saves about a tenth of the CPU per request across shim, worker and
nats-server (docs/benchmarks.md), above the 5% a private-API patch has to earn. Everything
else that used to patch nats-py (a protocol parser, a one-coroutine publish) or drive its
subscriptions by hand bought less than 5% end to end and was removed.

Rules (a dependency is used through its public API, except here):

- off unless `NEXUS_NATS__SPEEDUPS=true`;
- installed on one connection at a time (`install(nc)`), never on a class or at import, so
  a user's own `nats.connect()` client in the same process is untouched;
- pinned to the exact nats-py minor it was written for (`NATS_PY_MINOR`), and on top of
  that to a fingerprint of the replaced functions' code;
- when enabled but unable to install: a warning, and `nexus_speedups_unavailable_total`
  counts it, so a deployment sees that it runs without them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Final

from nats.aio.client import Client

from nexus_bus.bus._speedups import headers
from nexus_bus.observability import METRICS, logger

NATS_PY_MINOR: Final = "2.16"  # the nats-py release line `headers.py` was written against


def _nats_py_minor() -> str:
    try:
        return ".".join(version("nats-py").split(".")[:2])
    except PackageNotFoundError:
        return "unknown"


def install(nc: Client) -> bool:
    """Install every speedup on `nc` (call only when enabled in settings).

    Returns:
        Whether they were installed; when not, a warning is logged and
        `nexus_speedups_unavailable_total` incremented.
    """
    found = _nats_py_minor()
    if found != NATS_PY_MINOR:
        why = f"they were written for nats-py {NATS_PY_MINOR}, this is {found}"
    elif not headers.install(nc):
        why = "nats-py's header code is not the code they were written against"
    else:
        return True
    logger.warning("NATS speedups enabled but not installed: {}", why)
    METRICS.speedups_unavailable.inc()
    return False


def installed(nc: Client) -> bool:
    """Whether `nc` runs with the speedups."""
    return headers.installed(nc)


__all__ = ["NATS_PY_MINOR", "install", "installed"]
