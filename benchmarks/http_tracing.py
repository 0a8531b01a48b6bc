"""`bench_http --tracing`: the shim and worker with tracing off beside the same traced at
sampling 1.0 and 0.1, exporting to an OTLP sink; issue 16's throughput target checked."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from benchmarks.harness import Result
from benchmarks.http_targets import NEXUS_ROLES, TRACED_ENV, Target, row, sut_cpu


def tracing_targets() -> list[Target]:
    """The shim and worker with tracing off, and traced at sampling 1.0 and 0.1 exporting to
    an OTLP sink (`--tracing`), each on a NATS of its own."""
    me = ["-m", "benchmarks.bench_http"]
    sink = ("otlp sink", [*me, "--serve-otlp", "{otlp}"])
    targets = [Target("nexus, tracing off", NEXUS_ROLES, {}, own_nats=True)]
    for ratio in ("1.0", "0.1"):
        env = {**TRACED_ENV, "NEXUS_TRACING__SAMPLE_RATIO": ratio}
        targets.append(Target(f"nexus traced ({ratio})", [sink, *NEXUS_ROLES], env, True))
    return targets


def report_tracing(
    results: Sequence[Result],
    cpu_us: dict[tuple[str, int], dict[str, float]],
    slice_rps: dict[tuple[str, int], list[float]],
) -> None:
    """Traced throughput and CPU as ratios to tracing off, and the issue's target checked.

    Besides the ratio of totals, each round's slice is set against tracing off's slice of
    the same round (taken seconds apart): the median and range of those ratios show how much
    of a difference the machine's own drift could make in this run.
    """
    by = {(r.name, r.concurrency): r for r in results}
    print(f"\n{'target':<24}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'cpu us/req':>11}{'rps/off':>9}")
    for r in results:
        off = by.get(("nexus, tracing off", r.concurrency))
        ratio = f"{r.rps / off.rps:.2f}x" if off and off.rps else "-"
        cpu = sut_cpu(cpu_us.get((r.name, r.concurrency), {}))
        print(f"{row(r)}{cpu:>11.0f}{ratio:>9}")
    for (name, conc), slices in slice_rps.items():
        off_slices = slice_rps.get(("nexus, tracing off", conc))
        if name == "nexus, tracing off" or not off_slices:
            continue
        paired = sorted(t / o for t, o in zip(slices, off_slices, strict=True) if o)
        if paired:
            print(f"{name:<24}{conc:>5}  round by round vs off: median "
                  f"{statistics.median(paired):.2f}x, range {paired[0]:.2f}-{paired[-1]:.2f}x")
    off, full = by.get(("nexus, tracing off", 16)), by.get(("nexus traced (1.0)", 16))
    if off and full and off.rps:
        ratio = full.rps / off.rps
        print(f"\ntarget: c=16 traced at 1.0 >= 0.85x tracing off: {ratio:.2f}x "
              f"{'MET' if ratio >= 0.85 else 'MISSED'}")
