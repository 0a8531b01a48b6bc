"""What `nexus-bus services` shows, built without I/O from `$SRV` answers and Consul entries.

One row per running instance: workers by (op, instance id), which is both their `$SRV`
service id and their Consul `instance` meta, so an instance seen in both sources is one row;
the shim appears from Consul only (it speaks HTTP, not `$SRV`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nexus_bus.constants import (
    CONSUL_META_INSTANCE,
    CONSUL_META_VERSION,
    MICRO_META_ADDRESS,
    SHIM_SERVICE,
)
from nexus_bus.discovery.documents import op_of
from nexus_bus.discovery.registry import CheckStatus, Instance

SRV_ANSWERED = "answering"  # health of an instance seen on $SRV only (no Consul configured)
_HEALTHY = frozenset({CheckStatus.PASSING.value, SRV_ANSWERED})
_COLUMNS = ("service", "op", "instance", "address", "version", "health", "requests", "errors")


@dataclass(slots=True, kw_only=True)
class ServiceRow:
    """One running instance."""

    service: str
    op: str
    instance: str
    address: str = ""
    version: str = ""
    health: str = ""
    requests: int | None = None
    errors: int | None = None
    sources: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        """Passing in Consul, or answering `$SRV` where Consul does not know it."""
        return self.health in _HEALTHY

    def to_json(self) -> dict[str, Any]:
        """The row as `--json` prints it."""
        doc = asdict(self)
        doc["sources"] = list(self.sources)
        doc["healthy"] = self.healthy
        return doc


def rows_from_srv(stats: Iterable[dict[str, Any]]) -> list[ServiceRow]:
    """Rows from `io.nats.micro.v1.stats_response` documents of `nexus-*` services."""
    rows = []
    for doc in stats:
        op = op_of(str(doc.get("name", "")))
        if op is None:
            continue
        endpoints = doc.get("endpoints") or []
        metadata = doc.get("metadata") or {}
        rows.append(
            ServiceRow(
                service=str(doc["name"]),
                op=op,
                instance=str(doc.get("id", "")),
                address=str(metadata.get(MICRO_META_ADDRESS, "")),
                version=str(doc.get("version", "")),
                health=SRV_ANSWERED,
                requests=sum(int(e.get("num_requests", 0)) for e in endpoints),
                errors=sum(int(e.get("num_errors", 0)) for e in endpoints),
                sources=("$SRV",),
            )
        )
    return rows


def merge(srv: Sequence[ServiceRow], consul: Iterable[Instance]) -> list[ServiceRow]:
    """One row per instance: Consul's health wins, `$SRV` brings the counts."""
    rows = {(r.service, r.instance): r for r in srv}
    for entry in consul:
        instance = entry.meta.get(CONSUL_META_INSTANCE, entry.service_id)
        row = rows.get((entry.name, instance))
        if row is None:
            row = ServiceRow(
                service=entry.name,
                op=op_of(entry.name) or "-",
                instance=instance,
                version=entry.meta.get(CONSUL_META_VERSION, ""),
            )
            rows[(entry.name, instance)] = row
        row.health = entry.status.value
        if entry.address:
            row.address = f"{entry.address}:{entry.port}" if entry.port else entry.address
        row.sources = (*row.sources, "consul")
    return sorted(rows.values(), key=lambda r: (r.service != SHIM_SERVICE, r.op, r.instance))


def missing_ops(rows: Iterable[ServiceRow], expected: Iterable[str]) -> list[str]:
    """The expected ops that have no healthy instance."""
    healthy = {r.op for r in rows if r.healthy}
    return sorted(set(expected) - healthy)


def render_table(rows: Sequence[ServiceRow]) -> str:
    """A plain-text table, one line per instance."""
    cells = [list(_COLUMNS)] + [
        [
            r.service,
            r.op,
            r.instance,
            r.address or "-",
            r.version or "-",
            r.health,
            "-" if r.requests is None else str(r.requests),
            "-" if r.errors is None else str(r.errors),
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )
