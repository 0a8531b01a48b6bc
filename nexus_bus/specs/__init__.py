"""The language-neutral contract documents, generated from the registered operations.

`json_schemas`, `asyncapi_document` and `openapi_document` are pure builders returning
plain dicts; `export` writes them under `schemas/` and `stale` says which committed files
no longer match (`nexus-bus schemas export [--check]`, `make schemas`).
"""

from nexus_bus.specs.asyncapi import asyncapi_document
from nexus_bus.specs.files import default_directory, encode, export, render, stale
from nexus_bus.specs.json_schema import json_schemas
from nexus_bus.specs.openapi import openapi_document

__all__ = [
    "asyncapi_document",
    "default_directory",
    "encode",
    "export",
    "json_schemas",
    "openapi_document",
    "render",
    "stale",
]
