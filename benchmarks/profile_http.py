"""Where one gateway process spends its CPU under load: an on-CPU profile, by function.

    python -m benchmarks.profile_http [--target trivial|hot|l1off|traced] [--process worker|shim]
                                      [--seconds 8] [--concurrency 16] [--top 25]

Starts one of `bench_http`'s targets with servers of its own (the trivial op, `data.get` of a
hot key with the L1 on or off, or the trivial op traced at sampling 1.0), moves the chosen
process alone onto CPU 0 and everything else (nats-server, Redis, the other gateway process,
wrk) onto CPU 1, and samples it with py-spy while wrk loads it at `--concurrency`.

Alone on its CPU, the process is never preempted by its peers, so a sample is its own time.
With every process on one CPU, as `bench_http` runs them, a process preempted inside a
socket write looks busy there and py-spy's shares overstate the writes (docs/benchmarks.md,
issue 15's run 7). Prints the CPU time per request of each process, and the functions with the
largest shares of the profiled process's samples, by their own time and inclusive.

Needs wrk and py-spy (`pip install py-spy`; not a dependency of the project), and 2 CPUs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.bench_http import Bench, run_wrk, usage
from benchmarks.http_data import data_targets
from benchmarks.http_targets import NEXUS_ROLES, TRACED_ENV, Target

_SITE = f"{os.sep}site-packages{os.sep}"


def _target(which: str, bench: Bench, tmp: Path) -> Target:
    if which == "trivial":
        return Target("nexus trivial op", NEXUS_ROLES, {}, own_nats=True)
    if which == "traced":
        sink = ("otlp sink", ["-m", "benchmarks.bench_http", "--serve-otlp", "{otlp}"])
        return Target("nexus traced (1.0)", [sink, *NEXUS_ROLES], TRACED_ENV, own_nats=True)
    name = {"hot": "nexus data.get hot", "l1off": "nexus data.get L1 off"}[which]
    return next(t for t in data_targets(bench.nats_url, tmp) if t.name == name)


def _move(pid: int, cpu: int) -> None:
    """Run every thread of process `pid` on `cpu` only (an affinity is a thread's own)."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(thread), {cpu})


def _frame(frame: str) -> str:
    """A py-spy frame (`function (file:line)`) as `function (file)`, paths shortened."""
    function, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    if _SITE in path:
        path = path.split(_SITE, 1)[1]
    elif path.startswith(os.getcwd()):
        path = path[len(os.getcwd()) + 1 :]
    return f"{function} ({path})"


def shares(raw: Path) -> tuple[Counter[str], Counter[str], int]:
    """Samples by function from py-spy's raw (collapsed stacks) output: own time, inclusive
    time, and the total."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    return own, inclusive, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=("trivial", "hot", "l1off", "traced"),
                        default="trivial")
    parser.add_argument("--process", choices=("worker", "shim"), default="worker")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    missing = [tool for tool in ("wrk", "py-spy", "taskset") if not shutil.which(tool)]
    if missing or (os.cpu_count() or 1) < 2:
        print(f"needs wrk, py-spy and taskset, and 2 CPUs (missing: {missing})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), args.seconds)
        try:
            target = _target(args.target, bench, Path(tmp))
            with bench.running([target]) as (ports, pids):
                port = ports[target.name]
                profiled = pids[f"{target.name}/{args.process}"]
                for pid in pids.values():
                    _move(pid, 0 if pid == profiled else 1)
                script = bench.script(target.body)
                run_wrk(target.name, port, args.concurrency, 2, script, target.path, cpu=1)
                before = {key: usage(pid)[0] for key, pid in pids.items()}
                raw = Path(tmp) / "profile.txt"
                spy = subprocess.Popen(
                    ["py-spy", "record", "--rate", "250", "--format", "raw", "--nonblocking",
                     "--duration", str(args.seconds), "--pid", str(profiled), "--output",
                     str(raw)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )  # fmt: skip
                result = run_wrk(
                    target.name, port, args.concurrency, args.seconds, script, target.path, cpu=1
                )
                _, problem = spy.communicate()
                after = {key: usage(pid)[0] for key, pid in pids.items()}
        finally:
            bench.close()
        if spy.returncode != 0 or not raw.exists():  # py-spy needs to be allowed to ptrace
            print(f"py-spy failed: {problem.decode(errors='replace').strip()}", file=sys.stderr)
            return 1
        own, inclusive, total = shares(raw)
    served = max(1, result.requests)
    print(f"{target.name}, c={args.concurrency}: {result.rps:.0f} req/s, "
          f"{args.process} alone on CPU 0; CPU µs a request:")
    for key in sorted(pids):
        if key in bench.keys[target.name]:
            print(f"  {key.split('/', 1)[-1]:<14}{(after[key] - before[key]) / served * 1e6:8.1f}")
    print(f"\n{args.process}: {total} samples; share of them by function, own time:")
    for frame, samples in own.most_common(args.top):
        print(f"{100 * samples / total:6.1f}%  {frame}")
    print("\ninclusive:")
    for frame, samples in inclusive.most_common(args.top):
        print(f"{100 * samples / total:6.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
