"""One JSON Schema document per operation (request and reply), plus the problem document."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from nexus_bus.operations import Operations
from nexus_bus.schemas.problem import Problem
from nexus_bus.specs.base import (
    PROBLEM_NAME,
    components,
    describe,
    merged,
    name_of,
    operations_of,
    problem_description,
)

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID_BASE: Final = "https://nexus-bus.dev/schemas/jsonschema/"
_REFS: Final = "#/$defs/{name}"


def json_schemas(groups: Iterable[Operations]) -> dict[str, dict[str, Any]]:
    """JSON Schema (2020-12) documents by name: one per `op.action`, and `problem`.

    An operation's document holds its request schema at `#/$defs/request` and its reply at
    `#/$defs/reply`, next to the definitions both share; the problem document validates a
    problem body itself.

    Raises:
        ValueError: duplicate ops, or a type named `request` or `reply`.
    """
    documents: dict[str, dict[str, Any]] = {}
    for operation in operations_of(groups):
        name = name_of(operation)
        (request, reply), defs = components([operation.request_type, operation.reply_type], _REFS)
        documents[name] = {
            "$schema": JSON_SCHEMA_DIALECT,
            "$id": f"{SCHEMA_ID_BASE}{name}.json",
            "title": name,
            "description": describe(operation),
            "$defs": merged(defs, {"request": request, "reply": reply}),
        }
    (problem,), defs = components([Problem], _REFS)
    documents[PROBLEM_NAME] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": f"{SCHEMA_ID_BASE}{PROBLEM_NAME}.json",
        "title": PROBLEM_NAME,
        "description": problem_description(),
        **problem,
        "$defs": defs,
    }
    return documents
