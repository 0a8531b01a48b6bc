"""The shim's route templates, and which one the router matched for a request.

Access lines and spans name the matched template (the route's name), never the path. The
operation route is tried first, as the hot one: its path leaves out the first segments of
the job and event routes, which it would otherwise shadow (`_OperationName`).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Final

from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Route

from nexus_bus.constants import (
    EVENTS_PREFIX,
    HTTP_API_PREFIX,
    HTTP_DOCS,
    JOBS_PREFIX,
    SSE_TICKET_PATH,
)

_JOBS: Final = JOBS_PREFIX.rsplit(".", 1)[-1]
_EVENTS: Final = EVENTS_PREFIX.rsplit(".", 1)[-1]

OPERATION_ROUTE: Final = f"{HTTP_API_PREFIX}/{{op}}/{{action}}"
JOB_ROUTE: Final = f"{HTTP_API_PREFIX}/{_JOBS}/{{id}}"
EVENTS_ROUTE: Final = f"{HTTP_API_PREFIX}/{_EVENTS}/{{topic}}"
TICKET_ROUTE: Final = f"{EVENTS_ROUTE}/{SSE_TICKET_PATH}"
ASSET_ROUTE: Final = f"{HTTP_DOCS}/{{name}}"


class _OperationName(Convertor[str]):
    """The op segment of an operation path: anything but the first segment of the job and
    event routes. So the hot route can be tried first: each route tried before it cost a
    request 6,000 instructions (`python -m benchmarks.shim_instructions`)."""

    regex = rf"(?!(?:{_JOBS}|{_EVENTS})/)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("nexus_op", _OperationName())
# What the router matches for the operation route (named `OPERATION_ROUTE`).
OPERATION_PATH: Final = f"{HTTP_API_PREFIX}/{{op:nexus_op}}/{{action}}"


def matched_route(scope: MutableMapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """The route template the router matched, with op and action for an operation route.

    Returns:
        `(route, op, action)`; route is None before routing or when no route matched.
    """
    route = scope.get("route")
    if not isinstance(route, Route):
        return None, None, None
    if route.name != OPERATION_ROUTE:
        return route.name, None, None
    params = scope["path_params"]
    return route.name, params["op"], params["action"]
