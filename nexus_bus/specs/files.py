"""Writing the generated documents under `schemas/`, and telling when the committed ones are stale.

The only module of `nexus_bus.specs` that touches files. Output is byte-for-byte
deterministic (sorted keys, two-space indent, trailing newline), so a test can compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from nexus_bus.operations import Operations
from nexus_bus.specs.asyncapi import asyncapi_document
from nexus_bus.specs.json_schema import json_schemas
from nexus_bus.specs.openapi import openapi_document

JSONSCHEMA_DIR: Final = "jsonschema"
ASYNCAPI_FILE: Final = "asyncapi.json"
OPENAPI_FILE: Final = "openapi.json"


def default_directory() -> Path:
    """The `schemas/` folder of the source tree: the package folder of `nexus_bus.schemas`."""
    import nexus_bus.schemas

    return Path(nexus_bus.schemas.__file__).parent


def encode(document: Any) -> bytes:
    """A document as written: sorted keys, two-space indent, trailing newline."""
    return msgspec.json.format(msgspec.json.encode(document, order="sorted"), indent=2) + b"\n"


def render(groups: Sequence[Operations] | None = None) -> dict[str, bytes]:
    """Every generated file as relative path -> exact bytes (built-in groups when None)."""
    if groups is None:
        # Imported late: handlers import nexus_bus's public API, and the HTTP shim that
        # imports this package is part of it.
        from nexus_bus.handlers import BUILTIN

        groups = list(BUILTIN.values())
    files = {f"{JSONSCHEMA_DIR}/{name}.json": encode(d) for name, d in json_schemas(groups).items()}
    files[ASYNCAPI_FILE] = encode(asyncapi_document(groups))
    files[OPENAPI_FILE] = encode(openapi_document(groups))
    return dict(sorted(files.items()))


def _unknown_files(directory: Path, rendered: dict[str, bytes]) -> list[str]:
    """JSON files in `jsonschema/` that no operation produces (a removed or renamed action)."""
    folder = directory / JSONSCHEMA_DIR
    if not folder.is_dir():
        return []
    found = (f"{JSONSCHEMA_DIR}/{path.name}" for path in folder.glob("*.json"))
    return sorted(name for name in found if name not in rendered)


def export(directory: Path, groups: Sequence[Operations] | None = None) -> list[Path]:
    """Write every document under `directory` and delete generated files no longer produced.

    Files whose content is already right are left untouched.

    Args:
        directory: the `schemas/` folder (see `default_directory`).
        groups: the operations to describe; the built-in groups when None.

    Returns:
        The path of every document, sorted.

    Raises:
        OSError: a file cannot be written or removed.
        ValueError: duplicate ops, or colliding type names.
    """
    rendered = render(groups)
    for unknown in _unknown_files(directory, rendered):
        (directory / unknown).unlink()
    for relative, content in rendered.items():
        path = directory / relative
        if not path.is_file() or path.read_bytes() != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    return [directory / relative for relative in rendered]


def stale(directory: Path, groups: Sequence[Operations] | None = None) -> list[str]:
    """Relative paths under `directory` that differ from what `export` would write, sorted.

    Missing and changed documents are listed, and so are JSON files in `jsonschema/` that no
    operation produces any more.

    Raises:
        ValueError: duplicate ops, or colliding type names.
    """
    rendered = render(groups)
    changed = [
        relative
        for relative, content in rendered.items()
        if not (directory / relative).is_file() or (directory / relative).read_bytes() != content
    ]
    return sorted(changed + _unknown_files(directory, rendered))
