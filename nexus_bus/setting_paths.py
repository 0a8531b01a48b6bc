"""Which names a settings model has: for misspelt `NEXUS_*` variables and TOML keys.

pydantic-settings ignores an environment variable that matches no field, and a section
model ignores a key it does not have, so a misspelt name silently left its setting at the
default. These walk the model's fields (a table's entries, such as `ai.backends.<name>`, take
any name) and say which names match none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, get_args, get_origin

from pydantic import BaseModel

# What is below a field: the model of its parts (None: it has none), and whether a table's
# entries, each of that model, come first.
_Below = tuple[type[BaseModel] | None, bool]


def unknown_env_names(root: type[BaseModel], names: Iterable[str]) -> list[str]:
    """The nested-setting names (`NEXUS_<SECTION>__...`) among `names` that name no setting.

    Names without `__` are left alone: `NEXUS_TOKEN`, `NEXUS_URL`, `NEXUS_CONFIG` and
    compose's own are not settings.
    """
    found = []
    for name in names:
        upper = name.upper()
        if upper.startswith("NEXUS_") and "__" in upper:
            parts = upper.removeprefix("NEXUS_").lower().split("__")
            if _resolve(root, parts) is None:
                found.append(name)
    return sorted(found)


def unknown_keys(root: type[BaseModel], data: Mapping[str, Any]) -> list[str]:
    """The dotted keys of a settings document (the TOML file) that name no setting."""
    found: list[str] = []
    _collect(root, data, (), found)
    return found


def _collect(
    root: type[BaseModel], data: Mapping[str, Any], prefix: tuple[str, ...], found: list[str]
) -> None:
    for key, value in data.items():
        path = (*prefix, str(key))
        below = _resolve(root, path)
        if below is None:
            found.append(".".join(path))
        elif isinstance(value, Mapping) and (below[0] is not None or below[1]):
            _collect(root, value, path, found)


def _resolve(root: type[BaseModel], parts: Sequence[str]) -> _Below | None:
    """What is below the setting `parts` names (None: it names none)."""
    below: _Below = (root, False)
    for part in parts:
        model, table = below
        if table:  # an entry of a table: any name
            below = (model, False)
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None  # no such field, or below a setting that has no parts
        below = _below(field.annotation)
    return below


def _below(annotation: Any) -> _Below:
    if get_origin(annotation) is dict:
        return _below(get_args(annotation)[1])[0], True
    for candidate in (annotation, *get_args(annotation)):  # `Model | None` too
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate, False
    return None, False
