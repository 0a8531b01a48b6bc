"""What every contract document shares: operations in order, msgspec schemas, headers, codes."""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Iterable, Sequence
from typing import Any, Final

import msgspec

from nexus_bus.bus.subjects import operation_subject
from nexus_bus.constants import (
    CT_JSON,
    CT_MSGPACK,
    CT_PROBLEM,
    H_AUTHORIZATION,
    H_CONTENT_TYPE,
    H_DEADLINE,
    H_IDEMPOTENCY_KEY,
    H_JOB_ID,
    H_NATS_MSG_ID,
    H_REQUEST_ID,
    H_SERVICE_ERROR,
    H_SERVICE_ERROR_CODE,
    H_STATUS,
    H_TIMEOUT_MS,
    H_TRACEPARENT,
    H_TRACESTATE,
    PROBLEM_TYPE_BASE,
)
from nexus_bus.errors import ERRORS_BY_CODE
from nexus_bus.jobs.envelope import JOB_ID_PATTERN
from nexus_bus.operations import DeclarationError, Operation, Operations
from nexus_bus.resilience.idempotency import MAX_KEY_CHARS

TITLE: Final = "nexus-bus"
PROBLEM_NAME: Final = "problem"
DIGITS: Final = "^[0-9]{1,16}$"

# Header schemas (NATS header = HTTP header unless noted in docs/contract.md). Header values are
# strings on both transports, so numbers are described as digit strings.
REQUEST_HEADERS: Final[dict[str, dict[str, Any]]] = {
    H_AUTHORIZATION: {
        "type": "string",
        "pattern": "^Bearer .+$",
        "description": "`Bearer <token>`; required unless the operation is public.",
    },
    H_REQUEST_ID: {
        "type": "string",
        "pattern": "^[A-Za-z0-9._:-]{1,128}$",
        "description": "Echoed in the reply and logs; generated when absent or malformed.",
    },
    H_TRACEPARENT: {
        "type": "string",
        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        "description": "W3C Trace Context; an invalid value is replaced, never trusted.",
    },
    H_TRACESTATE: {"type": "string", "description": "W3C Trace Context vendor state."},
    H_TIMEOUT_MS: {
        "type": "string",
        "pattern": DIGITS,
        "description": "The caller's remaining budget in milliseconds when it sent the request.",
    },
    H_DEADLINE: {
        "type": "string",
        "pattern": DIGITS,
        "description": "The same deadline as Unix epoch milliseconds; workers drop a request "
        "whose deadline has passed before they start it.",
    },
    H_IDEMPOTENCY_KEY: {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_KEY_CHARS,
        "pattern": "^[ -~]+$",  # printable ASCII: workers refuse any other key with 400
        "description": "Makes a non-idempotent operation safe to retry; on JetStream it "
        f"becomes `{H_NATS_MSG_ID}`.",
    },
    H_CONTENT_TYPE: {
        "type": "string",
        "enum": [CT_JSON, CT_MSGPACK],
        "default": CT_JSON,
        "description": "The body's encoding; the reply uses the same one.",
    },
}
_REPLY_HEADERS: Final[dict[str, dict[str, Any]]] = {
    H_STATUS: {
        "type": "string",
        "pattern": "^[1-5][0-9]{2}$",
        "description": "An HTTP-style status, always present (200 on success).",
    },
    H_REQUEST_ID: {"type": "string", "description": "The request id, echoed."},
    H_CONTENT_TYPE: {"type": "string", "enum": [CT_JSON, CT_MSGPACK, CT_PROBLEM]},
}
_ERROR_HEADERS: Final[dict[str, dict[str, Any]]] = {
    H_SERVICE_ERROR_CODE: {
        "type": "string",
        "pattern": "^[1-5][0-9]{2}$",
        "description": "The status again (NATS micro convention).",
    },
    H_SERVICE_ERROR: {
        "type": "string",
        "maxLength": 256,
        "description": "`<code>: <detail>` (NATS micro convention).",
    },
}


def _header_object(headers: dict[str, dict[str, Any]], required: Iterable[str] = ()) -> Any:
    return {"type": "object", "properties": headers, "required": sorted(required)}


# Header schemas, named: the AsyncAPI messages point at them.
HEADER_SCHEMAS: Final[dict[str, Any]] = {
    "NexusRequestHeaders": _header_object(REQUEST_HEADERS),
    "NexusJobHeaders": _header_object(
        {
            **{
                name: schema
                for name, schema in REQUEST_HEADERS.items()
                if name not in (H_TIMEOUT_MS, H_DEADLINE)  # a job has no caller waiting
            },
            H_JOB_ID: {
                "type": "string",
                "pattern": JOB_ID_PATTERN,
                "description": f"Set by nexus-bus clients; derived from {H_NATS_MSG_ID} "
                "(or the stream sequence) when absent.",
            },
            H_NATS_MSG_ID: {
                "type": "string",
                "description": "JetStream dedup id; nexus-bus clients set it to the job id, "
                f"derived from the {H_IDEMPOTENCY_KEY} when one is given.",
            },
        }
    ),
    "NexusReplyHeaders": _header_object(_REPLY_HEADERS, [H_STATUS]),
    "NexusErrorHeaders": _header_object(
        {**_REPLY_HEADERS, **_ERROR_HEADERS}, [H_STATUS, *_ERROR_HEADERS]
    ),
    "NexusEventHeaders": _header_object(
        {H_NATS_MSG_ID: {"type": "string", "description": "The `id` given to stream.publish."}}
    ),
}


def operations_of(groups: Iterable[Operations]) -> list[Operation]:
    """Every registered operation of `groups`, sorted by op then action.

    Raises:
        ValueError: two groups with the same op.
    """
    seen: set[str] = set()
    found: list[Operation] = []
    for group in groups:
        if group.op in seen:
            raise ValueError(f"op {group.op!r} is given twice")
        seen.add(group.op)
        found.extend(group)
    return sorted(found, key=lambda o: (o.op, o.action))


def name_of(operation: Operation) -> str:
    """`op.action`: the operation's name in every document."""
    return f"{operation.op}.{operation.action}"


def summary_of(operation: Operation) -> str:
    """The first line of the handler's docstring, or the operation's name."""
    text = inspect.cleandoc(operation.description)
    return text.split("\n", 1)[0] if text else name_of(operation)


def describe(operation: Operation) -> str:
    """The handler's docstring plus what a caller must know: subject, scope, idempotency."""
    text = inspect.cleandoc(operation.description) or name_of(operation)
    subject = operation_subject(operation.op, operation.action)
    access = "public (no token)" if operation.public else f"needs scope `{operation.scope}`"
    retry = "idempotent" if operation.idempotent else f"not idempotent: send {H_IDEMPOTENCY_KEY}"
    return f"{text}\n\nSubject `{subject}`; {access}; {retry}."


def components(types: Sequence[Any], ref_template: str) -> tuple[list[Any], dict[str, Any]]:
    """msgspec's schemas for `types` (refs) and the shared definitions they point into.

    Docstring indentation is removed from descriptions, so generated files read cleanly.
    """
    refs, defs = msgspec.json.schema_components(types, ref_template=ref_template)
    for schema in defs.values():
        if isinstance(schema.get("description"), str):
            schema["description"] = inspect.cleandoc(schema["description"])
    return list(refs), defs


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    """Union of name -> definition maps.

    Raises:
        DeclarationError: one name with two different definitions (a user type named like
            ours); a ValueError.
    """
    out: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if name in out and out[name] != value:
                raise DeclarationError(
                    f"two different schemas are named {name!r}; rename one type"
                )
            out[name] = value
    return out


def codes_by_status() -> dict[int, list[str]]:
    """The stable error codes grouped by the HTTP status they answer with."""
    grouped: dict[int, list[str]] = {}
    for code, cls in sorted(ERRORS_BY_CODE.items()):
        grouped.setdefault(cls.http_status, []).append(code)
    return dict(sorted(grouped.items()))


def problem_description() -> str:
    """What a problem document is, with every known code and its status."""
    codes = ", ".join(
        f"{status} `{code}`" for status, names in codes_by_status().items() for code in names
    )
    return (
        "An error reply body (RFC 9457 fields), over NATS and HTTP alike; `type` is "
        f"`{PROBLEM_TYPE_BASE}<code>`. Known codes: {codes}."
    )


def ref(pointer: str) -> dict[str, str]:
    """A `$ref` object."""
    return {"$ref": pointer}


def package_version() -> str:
    """The installed nexus-bus version, the documents' `info.version`."""
    try:
        return importlib.metadata.version(TITLE)
    except importlib.metadata.PackageNotFoundError:  # a bare source tree, never installed
        return "0.0.0"
