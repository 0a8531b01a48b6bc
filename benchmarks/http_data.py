"""`bench_http --data` (issue 15, docs/benchmarks.md): `data.get` of a hot key through the shim
and a `data` worker, with the L1 and without, answered by the shim's cached reads and by the
worker, beside the same at commit 9e0cb4b, the uvicorn bridge, uvicorn alone, nexus's own trivial
op and Moleculer; and the report with issue 15's targets."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec

from benchmarks.harness import Result
from benchmarks.http_targets import HERE, NEXUS_ROLES, Target, row

DATA_PATH = "/v1/data/get"
HOT_KEY = "bench.hot"
DATA_BODY = b'{"key":"%s"}' % HOT_KEY.encode()
# The hot value (as bench_cache's): written through the target before it is measured.
PUT_BODY = msgspec.json.encode({"key": HOT_KEY, "value": {"n": 1, "s": "x" * 256}})
FLOOR: Final = "uvicorn alone (no NATS)"  # the HTTP server answering a constant: p99's floor
BEFORE_L1: Final = "9e0cb4b"  # issue 15's "today": the Redis path before this work
VIA_WORKER: Final = "nexus get via worker"  # http.cached_reads off
OFF_VIA_WORKER: Final = "nexus L1 off via worker"
TWO_WRITES: Final = "nexus hot, two writes"  # http.join_writes off: uvicorn's own protocol
MOLECULER_DIR = Path.home() / ".cache" / "nexus-bus" / "bench-moleculer"

DATA_ROLES: Final = [
    ("worker", ["-m", "nexus_bus", "worker", "--ops", "data"]),
    ("shim", ["-m", "nexus_bus", "shim", "--port", "{port}"]),
]


def install_moleculer() -> Path | None:
    """Moleculer and moleculer-web, installed with npm into a cache dir once; the peer script
    copied beside them. None (with the reason printed) when node or npm cannot do it."""
    source = HERE / "benchmarks" / "moleculer"
    MOLECULER_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "peer.js"):
        shutil.copyfile(source / name, MOLECULER_DIR / name)
    if not (MOLECULER_DIR / "node_modules" / "moleculer-web").is_dir():
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=MOLECULER_DIR, capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            print(f"moleculer: npm install failed: {done.stderr[-500:]}", file=sys.stderr)
            return None
    return MOLECULER_DIR / "peer.js"


def checkout(commit: str, into: Path) -> Path | None:
    """The tree of `commit`, extracted with `git archive` (no worktree), laid out as the
    installed package (handlers/ and schemas/ linked under nexus_bus/, as `make typecheck`)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(HERE), "archive", commit], capture_output=True, check=False
    )
    if archive.returncode != 0:
        print(f"{commit}: not in this clone's history, not measured", file=sys.stderr)
        return None
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    for name in ("handlers", "schemas"):
        (into / "nexus_bus" / name).symlink_to(into / name)
    return into


def data_targets(url: str, tmp: Path) -> list[Target]:
    """Issue 15's targets: the nexus data.get variants beside the bridges, in one run."""
    me = ["-m", "benchmarks.bench_http"]
    responder = ("responder", [*me, "--serve-responder", url])
    hot = {"path": DATA_PATH, "body": DATA_BODY, "setup": ("/v1/data/put", PUT_BODY)}
    targets = [
        Target("uvicorn bridge -> raw", [responder, ("bridge", [*me, "--serve-uvicorn", "{port}",
                                                                 url])]),
        # uvicorn answering a constant with no NATS and no app: the least any request served
        # by this HTTP server costs, and the p99 floor under the hot read's 3 ms target.
        Target(FLOOR, [("app", [*me, "--serve-uvicorn", "{port}"])]),
        Target("nexus trivial op", NEXUS_ROLES),
        Target("nexus data.get hot", DATA_ROLES, {}, True, **hot),  # type: ignore[arg-type]
        Target("nexus data.get L1 off", DATA_ROLES,
               {"NEXUS_CACHE__LOCAL_TTL_S": "0", "NEXUS_CACHE__KEY_PREFIX": "nexus:l1off"},
               True, **hot),  # type: ignore[arg-type]
        # The same two with every read answered by the worker, as before the shim's cached
        # reads (docs/cache.md): what they bought, in the same run.
        Target(VIA_WORKER, DATA_ROLES,
               {"NEXUS_HTTP__CACHED_READS": "false", "NEXUS_CACHE__KEY_PREFIX": "nexus:worker"},
               True, **hot),  # type: ignore[arg-type]
        Target(OFF_VIA_WORKER, DATA_ROLES,
               {"NEXUS_HTTP__CACHED_READS": "false", "NEXUS_CACHE__LOCAL_TTL_S": "0",
                "NEXUS_CACHE__KEY_PREFIX": "nexus:l1off-worker"},
               True, **hot),  # type: ignore[arg-type]
        # The hot read with each answer written in uvicorn's two calls (head, body), as before
        # `http.join_writes` (docs/http.md, "One write per answer").
        Target(TWO_WRITES, DATA_ROLES,
               {"NEXUS_HTTP__JOIN_WRITES": "false", "NEXUS_CACHE__KEY_PREFIX": "nexus:two"},
               True, **hot),  # type: ignore[arg-type]
    ]
    if (old := checkout(BEFORE_L1, tmp / "before-l1")) is not None:
        targets.append(Target(f"nexus data.get {BEFORE_L1}", DATA_ROLES,
                              {"NEXUS_CACHE__KEY_PREFIX": "nexus:old", "PYTHONPATH": str(old)},
                              True, cwd=old, **hot))  # type: ignore[arg-type]
    if shutil.which("node") and (peer := install_moleculer()) is not None:
        roles = [
            ("moleculer service", ["node", str(peer), "service", url]),
            ("moleculer-web", ["node", str(peer), "gateway", url, "{port}"]),
        ]
        targets.append(Target("moleculer data.get", roles, path=DATA_PATH, body=DATA_BODY))
    return targets


def _ratio(a: Result | None, b: Result | None, attr: str = "rps") -> float | None:
    if a is None or b is None or not getattr(b, attr):
        return None
    return float(getattr(a, attr)) / float(getattr(b, attr))


def _verdict(what: str, value: float | None, ok: bool | None, unit: str = "x") -> None:
    shown = "-" if value is None else f"{value:.2f}{unit}"
    state = "not measured" if ok is None else ("MET" if ok else "MISSED")
    print(f"target: {what}: {shown} {state}")


def report_data(
    results: Sequence[Result],
    cpu_us: dict[tuple[str, int], dict[str, float]],
    rss_kb: dict[str, tuple[int, int]],
) -> None:
    """Issue 15's table: ratios to the fastest bridge at each concurrency, and its targets."""
    by = {(r.name, r.concurrency): r for r in results}
    print(f"\n{'target':<24}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'cpu us/req':>11}{'rps/fastest':>12}{'p99/fastest':>12}")
    for r in results:
        bridges = [b for (n, c), b in by.items() if c == r.concurrency and "bridge" in n]
        fastest = max(bridges, key=lambda b: b.rps, default=None)
        rps, p99 = _ratio(r, fastest), _ratio(r, fastest, "p99_ms")
        cpu = sum(cpu_us.get((r.name, r.concurrency), {}).values())
        print(f"{row(r)}{cpu:>11.0f}{'-' if rps is None else f'{rps:.2f}x':>12}"
              f"{'-' if p99 is None else f'{p99:.2f}x':>12}")
    hot16, mol16 = by.get(("nexus data.get hot", 16)), by.get(("moleculer data.get", 16))
    trivial16 = by.get(("nexus trivial op", 16))
    hot128, mol128 = by.get(("nexus data.get hot", 128)), by.get(("moleculer data.get", 128))
    off16 = by.get(("nexus data.get L1 off", 16))
    old16 = by.get((f"nexus data.get {BEFORE_L1}", 16))
    print()
    r = _ratio(hot16, mol16)
    _verdict("c=16 data.get hot >= 1.3x Moleculer", r, None if r is None else r >= 1.3)
    r = _ratio(hot16, trivial16)
    _verdict("c=16 data.get hot >= 0.95x trivial op", r, None if r is None else r >= 0.95)
    p = hot16.p99_ms if hot16 else None
    _verdict("c=16 data.get hot p99 <= 3 ms", p, None if p is None else p <= 3, " ms")
    r = _ratio(hot128, mol128, "p99_ms")
    _verdict("c=128 data.get hot p99 <= 0.5x Moleculer's", r, None if r is None else r <= 0.5)
    r = _ratio(off16, old16)
    _verdict(f"c=16 L1 off >= 1.5x {BEFORE_L1}", r, None if r is None else r >= 1.5)
    if (floor16 := by.get((FLOOR, 16))) is not None:
        print(f"info: c=16 p99 of uvicorn alone answering a constant: {floor16.p99_ms:.2f} ms "
              f"at {floor16.rps:,.0f} req/s: the HTTP server's own floor in this run")
    for name, base in (("nexus data.get hot", VIA_WORKER), ("nexus data.get L1 off",
                                                             OFF_VIA_WORKER)):
        r = _ratio(by.get((name, 16)), by.get((base, 16)))
        if r is not None:
            print(f"info: c=16 {name} answered by the shim: {r:.2f}x the same via the worker")
    two16 = by.get((TWO_WRITES, 16))
    if hot16 is not None and two16 is not None:
        print(f"info: c=16 nexus data.get hot, one write per answer: "
              f"{_ratio(hot16, two16):.2f}x the req/s of uvicorn's two writes, p99 "
              f"{hot16.p99_ms:.2f} against {two16.p99_ms:.2f} ms")
    for name, (idle, peak) in rss_kb.items():
        print(f"shim RSS, {name}: idle {idle / 1024:.0f} MB, peak (VmHWM, after c=128) "
              f"{peak / 1024:.0f} MB")
    if (idle_peak := rss_kb.get("nexus data.get hot")) is not None:
        idle, peak = idle_peak[0] / 1024, idle_peak[1] / 1024
        _verdict("shim RSS idle <= 80 MB", idle, idle <= 80, " MB")
        _verdict("shim RSS at c=128 <= 150 MB", peak, peak <= 150, " MB")
