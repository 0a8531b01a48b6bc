"""The AsyncAPI 3.0 document of the NATS side, seen from the workers.

Per operation: the request channel `nexus.<op>.<action>` (the workers receive on it and
reply on the requester's inbox, with the reply or a problem), and the job channel
`nexus.jobs.<op>.<action>`; plus the event channel `nexus.events.{topic}`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from nexus_bus.bus.subjects import jobs_subject, operation_subject, queue_group
from nexus_bus.constants import (
    CT_JSON,
    CT_PROBLEM,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    H_AUTHORIZATION,
    H_STATUS,
    JOBS_BUCKET,
    JOBS_STREAM,
    TOKEN_PATTERN,
)
from nexus_bus.operations import Operation, Operations
from nexus_bus.schemas.problem import Problem
from nexus_bus.specs.base import (
    HEADER_SCHEMAS,
    PROBLEM_NAME,
    TITLE,
    components,
    describe,
    merged,
    name_of,
    operations_of,
    package_version,
    ref,
    summary_of,
)

ASYNCAPI_VERSION: Final = "3.0.0"
_REFS: Final = "#/components/schemas/{name}"


def _schema(name: str) -> dict[str, str]:
    return ref(_REFS.format(name=name))


def _message(name: str) -> dict[str, str]:
    return ref(f"#/components/messages/{name}")


def asyncapi_document(groups: Iterable[Operations]) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the NATS side, seen from the workers.

    Raises:
        ValueError: duplicate ops, or a user type named like one of our header schemas.
    """
    operations = operations_of(groups)
    refs, defs = components(
        [t for o in operations for t in (o.request_type, o.reply_type)] + [Problem], _REFS
    )
    messages: dict[str, Any] = {
        PROBLEM_NAME: {
            "name": PROBLEM_NAME,
            "title": "Problem",
            "summary": f"An error reply: `{H_STATUS}` is not 200.",
            "contentType": CT_PROBLEM,
            "headers": _schema("NexusErrorHeaders"),
            "payload": refs[-1],
        },
        **_EVENT_MESSAGE,
    }
    channels: dict[str, Any] = dict(_EVENT_CHANNEL)
    operations_out: dict[str, Any] = dict(_EVENT_OPERATION)
    for index, operation in enumerate(operations):
        messages.update(_operation_messages(operation, refs[2 * index], refs[2 * index + 1]))
        channels.update(_operation_channels(operation))
        operations_out.update(_operation_actions(operation))
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"{TITLE} (NATS)",
            "version": package_version(),
            "description": "Call any operation from any NATS client: a core request on "
            "`nexus.<op>.<action>` with the headers below and a JSON (or MessagePack) body. "
            f"The reply carries `{H_STATUS}`; when it is not 200 the body is a problem "
            "document and `Nats-Service-Error(-Code)` are set.",
        },
        "defaultContentType": CT_JSON,
        "servers": {
            "nats": {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": "Any server of the deployment's NATS cluster (JetStream on).",
            }
        },
        "channels": channels,
        "operations": operations_out,
        "components": {
            "schemas": merged(defs, HEADER_SCHEMAS),
            "messages": messages,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": f"A token in the `{H_AUTHORIZATION}: Bearer <token>` header.",
                }
            },
        },
    }


_EVENT_MESSAGE: Final[dict[str, Any]] = {
    "event": {
        "name": "event",
        "summary": "One event as stream.publish stored it: the event's JSON itself.",
        "contentType": CT_JSON,
        "headers": _schema("NexusEventHeaders"),
        "payload": {},
    }
}
_EVENT_CHANNEL: Final[dict[str, Any]] = {
    "events": {
        "address": f"{EVENTS_PREFIX}.{{topic}}",
        "title": "Event topics",
        "description": f"Subjects of the `{EVENTS_STREAM}` JetStream stream; read them with a "
        "JetStream consumer (the stream sequence is the event id), with `stream.read`, or "
        "over HTTP as Server-Sent Events (`GET /v1/events/{topic}`).",
        "parameters": {"topic": {"description": f"A topic token, `{TOKEN_PATTERN}`."}},
        "messages": {"event": _message("event")},
    }
}
_EVENT_OPERATION: Final[dict[str, Any]] = {
    "events": {
        "action": "send",
        "channel": ref("#/channels/events"),
        "summary": "stream.publish appends events here.",
        "messages": [ref("#/channels/events/messages/event")],
    }
}


def _operation_messages(operation: Operation, request: Any, reply: Any) -> dict[str, Any]:
    name = name_of(operation)
    summary = summary_of(operation)
    return {
        f"{name}.request": {
            "name": f"{name}.request",
            "title": f"{name} request",
            "summary": summary,
            "headers": _schema("NexusRequestHeaders"),
            "payload": request,
        },
        f"{name}.reply": {
            "name": f"{name}.reply",
            "title": f"{name} reply",
            "summary": f"The reply (`{H_STATUS}: 200`).",
            "headers": _schema("NexusReplyHeaders"),
            "payload": reply,
        },
        f"{name}.job": {
            "name": f"{name}.job",
            "title": f"{name} job",
            "summary": f"{summary} As a job: the result goes to the `{JOBS_BUCKET}` KV bucket.",
            "headers": _schema("NexusJobHeaders"),
            "payload": request,
        },
    }


def _operation_channels(operation: Operation) -> dict[str, Any]:
    name = name_of(operation)
    return {
        name: {
            "address": operation_subject(operation.op, operation.action),
            "title": name,
            "description": describe(operation)
            + f" Workers serve it in queue group `{queue_group(operation.op)}`.",
            "messages": {"request": _message(f"{name}.request")},
        },
        # AsyncAPI's null address: known only at run time (the request's NATS reply subject).
        f"{name}.reply": {
            "address": None,
            "title": f"{name} reply",
            "description": "The requester's inbox, the reply subject of the NATS request. "
            "Workers answer only on inbox-shaped subjects.",
            "messages": {
                "reply": _message(f"{name}.reply"),
                PROBLEM_NAME: _message(PROBLEM_NAME),
            },
        },
        f"jobs.{name}": {
            "address": jobs_subject(operation.op, operation.action),
            "title": f"{name} job",
            "description": f"Asynchronous submissions, captured by the `{JOBS_STREAM}` "
            "JetStream stream (work queue).",
            "messages": {"job": _message(f"{name}.job")},
        },
    }


def _operation_actions(operation: Operation) -> dict[str, Any]:
    name = name_of(operation)
    common = {
        "security": [] if operation.public else [ref("#/components/securitySchemes/bearer")],
        "x-nexus-scope": operation.scope,
        "x-nexus-public": operation.public,
        "x-nexus-idempotent": operation.idempotent,
    }
    return {
        name: {
            "action": "receive",
            "channel": ref(f"#/channels/{name}"),
            "summary": summary_of(operation),
            "messages": [ref(f"#/channels/{name}/messages/request")],
            "reply": {
                "channel": ref(f"#/channels/{name}.reply"),
                "messages": [
                    ref(f"#/channels/{name}.reply/messages/reply"),
                    ref(f"#/channels/{name}.reply/messages/{PROBLEM_NAME}"),
                ],
            },
            **common,
        },
        f"jobs.{name}": {
            "action": "receive",
            "channel": ref(f"#/channels/jobs.{name}"),
            "summary": f"Run {name} as a job.",
            "messages": [ref(f"#/channels/jobs.{name}/messages/job")],
            **common,
        },
    }
