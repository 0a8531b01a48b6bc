"""The OpenAPI 3.1 document of the HTTP shim (docs/http.md), served at `/openapi.json`.

Every registered operation is a concrete path, `POST /v1/<op>/<action>`, with its request
and reply schemas, the `202` job answer to `Prefer: respond-async`, and problem+json error
responses per status; jobs, events, health, metrics and this document follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from nexus_bus.bus.subjects import operation_subject
from nexus_bus.constants import (
    AUTH_REALM,
    AUTH_SCHEME,
    CT_EVENT_STREAM,
    CT_JSON,
    CT_MSGPACK,
    CT_PROBLEM,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    H_HTTP_REQUEST_ID,
    H_IDEMPOTENCY_KEY,
    H_LAST_EVENT_ID,
    H_LOCATION,
    H_PREFER,
    H_REQUEST_ID,
    H_RETRY_AFTER,
    H_TIMEOUT_MS,
    H_TRACEPARENT,
    H_TRACESTATE,
    H_WWW_AUTHENTICATE,
    HTTP_API_PREFIX,
    HTTP_ASYNCAPI,
    HTTP_DOCS,
    HTTP_HEALTHZ,
    HTTP_METRICS,
    HTTP_OPENAPI,
    HTTP_OPS,
    HTTP_READYZ,
    JOBS_PREFIX,
    PREFER_ASYNC,
    PROBLEM_TYPE_BASE,
    SSE_TICKET_PATH,
    SSE_TICKET_QUERY,
    TOKEN_PATTERN,
)
from nexus_bus.errors import ERRORS_BY_CODE
from nexus_bus.jobs.envelope import JOB_ID_PATTERN
from nexus_bus.operations import Operation, Operations
from nexus_bus.schemas.events import TicketIssued
from nexus_bus.schemas.jobs import Job, JobAccepted
from nexus_bus.schemas.problem import Problem
from nexus_bus.schemas.registry import OperationsListing
from nexus_bus.specs.base import (
    DIGITS,
    REQUEST_HEADERS,
    TITLE,
    codes_by_status,
    components,
    describe,
    name_of,
    operations_of,
    package_version,
    problem_description,
    ref,
    summary_of,
)

OPENAPI_VERSION: Final = "3.1.0"
# The HTTP routes of the reserved trees, named like their subjects (`/v1/jobs`, `/v1/events`).
_JOBS_ROUTE: Final = f"{HTTP_API_PREFIX}/{JOBS_PREFIX.rsplit('.', 1)[-1]}"
_EVENTS_ROUTE: Final = f"{HTTP_API_PREFIX}/{EVENTS_PREFIX.rsplit('.', 1)[-1]}"
_REFS: Final = "#/components/schemas/{name}"
_UNAUTHENTICATED: Final = (401, 403)


def _schema(name: str) -> dict[str, str]:
    return ref(_REFS.format(name=name))


def _header(name: str) -> dict[str, str]:
    return ref(f"#/components/headers/{name}")


def _header_parameter(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    plain = {k: v for k, v in schema.items() if k != "description"}
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": plain,
        "description": schema.get("description", ""),
    }


# Request headers as parameters (Authorization belongs to the security scheme).
_PARAMETERS: Final[dict[str, dict[str, Any]]] = {
    H_HTTP_REQUEST_ID: _header_parameter(H_HTTP_REQUEST_ID, REQUEST_HEADERS[H_REQUEST_ID]),
    **{
        name: _header_parameter(name, REQUEST_HEADERS[name])
        for name in (H_TRACEPARENT, H_TRACESTATE, H_TIMEOUT_MS, H_IDEMPOTENCY_KEY)
    },
    H_PREFER: _header_parameter(
        H_PREFER,
        {
            "type": "string",
            "examples": [PREFER_ASYNC],
            "description": f"`{PREFER_ASYNC}` runs the operation as a job: 202 with `Location`.",
        },
    ),
}
_HEADERS: Final[dict[str, Any]] = {
    H_HTTP_REQUEST_ID: {
        "description": "The request id (the client's, when well-formed).",
        "schema": {"type": "string"},
    },
    H_WWW_AUTHENTICATE: {
        "description": f'`{AUTH_SCHEME} realm="{AUTH_REALM}"`, plus `error="invalid_token"` '
        "when a token was sent and failed.",
        "schema": {"type": "string"},
    },
    H_RETRY_AFTER: {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    },
    H_LOCATION: {
        "description": f"The job's URL, `{_JOBS_ROUTE}/{{id}}`.",
        "schema": {"type": "string"},
    },
}


def _problem_responses(known: dict[int, list[str]]) -> dict[str, Any]:
    """One reusable response per error status, listing its codes, with an example of each."""
    responses: dict[str, Any] = {}
    for status, codes in known.items():
        headers = {H_HTTP_REQUEST_ID: _header(H_HTTP_REQUEST_ID)}
        if status == 401:
            headers[H_WWW_AUTHENTICATE] = _header(H_WWW_AUTHENTICATE)
        if status in (429, 503):
            headers[H_RETRY_AFTER] = _header(H_RETRY_AFTER)
        examples = {
            code: {
                "value": {
                    "type": PROBLEM_TYPE_BASE + code,
                    "title": ERRORS_BY_CODE[code].title,
                    "status": status,
                    "code": code,
                    "request_id": "4bf92f3577b34da6",
                }
            }
            for code in codes
        }
        responses[f"Problem{status}"] = {
            "description": "; ".join(f"`{c}`: {ERRORS_BY_CODE[c].title}" for c in codes),
            "headers": headers,
            "content": {CT_PROBLEM: {"schema": _schema("Problem"), "examples": examples}},
        }
    return responses


def _problems(statuses: Iterable[int], known: dict[int, list[str]]) -> dict[str, Any]:
    return {str(s): ref(f"#/components/responses/Problem{s}") for s in statuses if s in known}


def _operation(operation: Operation, request: Any, reply: Any, known: dict[int, list[str]]) -> Any:
    request_id = {H_HTTP_REQUEST_ID: _header(H_HTTP_REQUEST_ID)}
    errors = [s for s in known if not (operation.public and s in _UNAUTHENTICATED)]
    return {
        "operationId": name_of(operation),
        "tags": [operation.op],
        "summary": summary_of(operation),
        "description": describe(operation),
        "parameters": [ref(f"#/components/parameters/{name}") for name in _PARAMETERS],
        # A MessagePack request is answered in MessagePack (problem documents stay JSON).
        "requestBody": {
            "required": True,
            "content": {CT_JSON: {"schema": request}, CT_MSGPACK: {"schema": request}},
        },
        "responses": {
            "200": {
                "description": "The reply, in the request's media type.",
                "headers": request_id,
                "content": {CT_JSON: {"schema": reply}, CT_MSGPACK: {"schema": reply}},
            },
            "202": {
                "description": "Accepted as a job (`Prefer: respond-async`); poll `Location`.",
                "headers": {**request_id, H_LOCATION: _header(H_LOCATION)},
                "content": {CT_JSON: {"schema": _schema("JobAccepted")}},
            },
            **_problems(errors, known),
        },
        **({"security": []} if operation.public else {}),
        "x-nexus-subject": operation_subject(operation.op, operation.action),
        "x-nexus-scope": operation.scope,
        "x-nexus-idempotent": operation.idempotent,
    }


def _get(operation_id: str, tag: str, summary: str, responses: Any, **extra: Any) -> Any:
    return {
        "get": {
            "operationId": operation_id,
            "tags": [tag],
            "summary": summary,
            "responses": responses,
            **extra,
        }
    }


def _ok(text: str, media: str | None = None, schema: Any = None) -> Any:
    content = {"content": {media: {"schema": schema or {"type": "string"}}}} if media else {}
    return {"description": text, **content}


def _fixed_paths(known: dict[int, list[str]]) -> dict[str, Any]:
    """The routes that are not operations: jobs, events, health, metrics, this document."""
    public: dict[str, Any] = {"security": []}
    job_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
    }
    topic = {
        "name": "topic",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": TOKEN_PATTERN},
    }
    last_event = {
        "name": H_LAST_EVENT_ID,
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": DIGITS},
        "description": "Resume after this stream sequence.",
    }
    ticket = {
        "name": SSE_TICKET_QUERY,
        "in": "query",
        "required": False,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$"},
        "description": (
            "A stream ticket from `POST .../ticket`, for clients that cannot send "
            "`Authorization` (EventSource): single use, this topic only, short-lived."
        ),
    }
    return {
        f"{_JOBS_ROUTE}/{{id}}": _get(
            "jobs.get",
            "jobs",
            "A job's status and, once finished, its result or error.",
            {
                "200": _ok("The job.", CT_JSON, _schema("Job")),
                **_problems((400, 401, 404, 429, 500, 503), known),
            },
            parameters=[job_id],
            description=(
                "Needs a token whose scopes allow the job's `op:action`; without one the "
                "answer is 404, as for a job that does not exist."
            ),
        ),
        f"{_EVENTS_ROUTE}/{{topic}}": _get(
            "events.subscribe",
            "events",
            f"Server-Sent Events of a topic, from `{EVENTS_STREAM}`.",
            {
                "200": _ok(
                    "`id:` is the stream sequence, `data:` the event JSON.", CT_EVENT_STREAM
                ),
                **_problems((400, 401, 403, 429, 500, 503), known),
            },
            parameters=[topic, last_event, ticket],
            description=(
                "Needs scope `stream:read`: a bearer token, or a `ticket` standing for one. "
                "The stream ends with an `end` event (a problem document) when its token "
                "expires or is revoked."
            ),
            security=[{"bearer": []}, {}],
        ),
        f"{_EVENTS_ROUTE}/{{topic}}/{SSE_TICKET_PATH}": {
            "post": {
                "operationId": "events.ticket",
                "tags": ["events"],
                "summary": "A one-use, short-lived ticket to open this topic's stream.",
                "description": (
                    "For browsers: `EventSource` cannot send `Authorization`, and a token in "
                    "a URL lands in access logs. Needs scope `stream:read`; the stream opened "
                    "with the ticket holds (and re-checks) the token it was issued for."
                ),
                "parameters": [topic],
                "responses": {
                    "200": _ok("The ticket.", CT_JSON, _schema("TicketIssued")),
                    **_problems((400, 401, 403, 429, 500, 503), known),
                },
            }
        },
        HTTP_OPS: _get(
            "sys.ops",
            "sys",
            "Declared operations: scopes, schemas and whether a worker serves them now.",
            {
                "200": _ok("The listing.", CT_JSON, _schema("OperationsListing")),
                **_problems((401, 429, 500, 503), known),
            },
            description="Any valid token (docs/registry.md).",
        ),
        HTTP_HEALTHZ: _get("sys.healthz", "sys", "Alive.", {"200": _ok("Alive.")}, **public),
        HTTP_READYZ: _get(
            "sys.readyz",
            "sys",
            "Ready: NATS connected and Redis answering.",
            {"200": _ok("Ready."), "503": _ok("Not ready.")},
            **public,
        ),
        HTTP_METRICS: _get(
            "sys.metrics",
            "sys",
            "Prometheus metrics.",
            {"200": _ok("Prometheus text format.", "text/plain")},
            **public,
        ),
        HTTP_OPENAPI: _get(
            "sys.openapi",
            "sys",
            "This document.",
            {"200": _ok("OpenAPI 3.1.", CT_JSON, {"type": "object"})},
            **public,
        ),
        HTTP_ASYNCAPI: _get(
            "sys.asyncapi",
            "sys",
            "The AsyncAPI 3.0 document of the NATS side.",
            {"200": _ok("AsyncAPI 3.0.", CT_JSON, {"type": "object"})},
            **public,
        ),
        HTTP_DOCS: _get(
            "sys.docs",
            "sys",
            "Interactive API page (Swagger UI, served by the shim itself).",
            {"200": _ok("HTML.", "text/html")},
            **public,
        ),
    }


def openapi_document(groups: Iterable[Operations]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP shim, for the operations of `groups`.

    Raises:
        ValueError: duplicate ops.
    """
    groups = list(groups)
    operations = operations_of(groups)
    refs, defs = components(
        [t for o in operations for t in (o.request_type, o.reply_type)]
        + [Problem, Job, JobAccepted, TicketIssued, OperationsListing],
        _REFS,
    )
    known = codes_by_status()
    paths = {
        f"{HTTP_API_PREFIX}/{o.op}/{o.action}": {
            "post": _operation(o, refs[2 * i], refs[2 * i + 1], known)
        }
        for i, o in enumerate(operations)
    }
    tags = [{"name": g.op, "description": g.description} for g in groups] + [
        {"name": "jobs", "description": "Asynchronous operations."},
        {"name": "events", "description": "Event topics as Server-Sent Events."},
        {"name": "sys", "description": "Health, readiness, metrics, docs and listings."},
    ]
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": f"{TITLE} (HTTP)",
            "version": package_version(),
            "description": f"`POST {HTTP_API_PREFIX}/{{op}}/{{action}}` with a JSON body. "
            f"Errors are `{CT_PROBLEM}` with a stable `code`. " + problem_description(),
        },
        "tags": sorted(tags, key=lambda t: t["name"]),
        "security": [{"bearer": []}],
        "paths": {**paths, **_fixed_paths(known)},
        "components": {
            "schemas": defs,
            "parameters": _PARAMETERS,
            "headers": _HEADERS,
            "responses": _problem_responses(known),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
