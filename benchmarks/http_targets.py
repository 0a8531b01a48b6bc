"""What one `bench_http` row runs: its processes, the request the load posts, and the row
it prints. Shared by `bench_http` and its `--data` and `--tracing` targets (`http_data`,
`http_tracing`)."""

from __future__ import annotations

from pathlib import Path
from typing import Final, NamedTuple

from benchmarks.harness import Result

HERE = Path(__file__).resolve().parent.parent
OP_PATH = "/v1/bench/echo"
BODY = b'{"key":"bench-key","n":42}'


class Target(NamedTuple):
    """What one row measures: its processes, and settings of its own.

    A target with `own_nats` gets a nats-server of its own, so its workers do not share a
    queue group with another target's (a variant of the nexus target must not serve the
    plain one's requests); `{otlp}` in `env` becomes the OTLP sink's address. `path` and
    `body` are what the load posts; `setup` is posted first (and must answer 200); `cwd`
    is where the processes start (a checkout of other code imports from there).
    """

    name: str
    roles: list[tuple[str, list[str]]]  # (role, python argv, or ["node", ...])
    env: dict[str, str] = {}  # noqa: RUF012 - read only
    own_nats: bool = False
    path: str = OP_PATH
    body: bytes = BODY
    setup: tuple[str, bytes] | None = None
    cwd: Path = HERE


NEXUS_ROLES: Final = [
    ("worker", ["-m", "nexus_bus", "worker", "--app", "benchmarks.bench_http:bench_ops"]),
    ("shim", ["-m", "nexus_bus", "shim", "--port", "{port}"]),
]


def row(r: Result) -> str:
    """One result as a table row (name, concurrency, req/s, p50, p99, errors)."""
    return (f"{r.name:<24}{r.concurrency:>5}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{r.errors:>8}")


# Not part of the system under test: the trace collector's cost is not the gateway's (its
# exporters' is), so the sink runs on the load generator's CPU and is left out of the totals.
BESIDE_LOAD: Final = frozenset({"otlp sink"})
TRACED_ENV: Final = {"NEXUS_TRACING__OTLP_ENDPOINT": "http://127.0.0.1:{otlp}/v1/traces"}


def sut_cpu(split: dict[str, float]) -> float:
    """CPU µs per request of the processes on the system's CPU (not the OTLP sink)."""
    return sum(us for role, us in split.items() if role not in BESIDE_LOAD)
