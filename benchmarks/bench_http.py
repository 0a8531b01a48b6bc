"""The HTTP path: our shim → NATS → worker, beside a minimal bridge and a no-NATS HTTP app.

    python -m benchmarks.bench_http [--seconds 2] [--rounds 3] [--concurrency 1,16,128] [--servers]
    python -m benchmarks.bench_http --policies [--seconds 2] ...   # policy layer on vs off
    python -m benchmarks.bench_http --baseline /tmp/base ...  # this code beside another checkout
    python -m benchmarks.bench_http --data [--seconds 2] ...       # data.get vs Moleculer

Targets, each measured at each concurrency in the same run:

- `nexus shim -> worker`: `nexus-bus shim` and `nexus-bus worker` as deployed, auth on
  (a scoped bearer token on every request) and the request validated against its schema.
- `aiohttp bridge -> raw`: a minimal aiohttp HTTP→NATS bridge to a raw nats-py responder that
  only does `msg.respond(msg.data)` (the issue's baseline).
- `uvicorn bridge -> raw`: the same minimal bridge as bare ASGI on the shim's own server
  (uvicorn + httptools + uvloop), isolating what the shim adds over the server.
- `aiohttp raw (no NATS)` / `uvicorn raw (no NATS)`: answering without NATS at all.
- with `--servers`: the minimal bridge on granian too (how the server was chosen).
- with `--policies`, instead: the shim and worker with the policy layer on (breaker closed,
  retry budget, a rate limit of 1,000,000/s that allows everything: checked on every request,
  from batches of tokens the worker leases from the shared GCRA) beside the same pair with
  `NEXUS_RESILIENCE__ENABLED=false`, and a pair with the layer on but no limit
  (docs/resilience.md).
- with `--data`, instead (issue 15, docs/benchmarks.md): `data.get` of a hot key through the
  shim and a `data` worker (auth on), with the L1 and with it off (the Redis path), the same
  at commit 9e0cb4b (the code before the L1, extracted with `git archive`), beside the
  uvicorn bridge, nexus's own trivial op, and Moleculer 0.14 + moleculer-web over the same
  nats-server with an in-memory `data.get` (installed with npm into `~/.cache/nexus-bus`);
  those targets and their report are in `http_data.py`.

The load generator (`wrk`, else a Python closed loop) runs on CPU 0; everything under test
(nats-server, Redis, bridges, shim, workers) on CPU 1, via `taskset`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import msgspec
import uvloop

from benchmarks.harness import Result, closed_loop, merge, stop_all
from benchmarks.http_baselines import (
    serve_aiohttp,
    serve_granian,
    serve_otlp_sink,
    serve_responder,
    serve_uvicorn,
)
from benchmarks.http_data import data_targets, report_data
from benchmarks.http_targets import (
    BESIDE_LOAD,
    BODY,
    HERE,
    NEXUS_ROLES,
    OP_PATH,
    TRACED_ENV,
    Target,
    row,
    sut_cpu,
)
from benchmarks.http_tracing import report_tracing, tracing_targets
from nexus_bus import Operations, RequestContext
from nexus_bus.embedded import ServerProcess, free_port, nats_server, redis_server


class EchoRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the benchmark sends: validated like any operation's request."""

    key: str
    n: int


bench_ops = Operations("bench", description="HTTP benchmark operation.")


@bench_ops.action("echo")
async def echo(req: EchoRequest, ctx: RequestContext) -> EchoRequest:
    """Return the (validated) request; needs scope `bench:echo`."""
    return req


def _place(text: str, places: dict[str, str]) -> str:
    for mark, value in places.items():
        text = text.replace(mark, value)
    return text


def _pin(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu)]
    return []


# The gateway's processes run as a production install runs them: without the packages that
# only the test extra brings and that a dependency imports when it finds them. nats-py imports
# aiohttp (for its WebSocket transport) whenever it is installed: 9 MB of every process that
# a deployment (`make up`, `pip install nexus-bus`) does not have. A module set to None in
# sys.modules is one Python's import system reports as absent.
AS_INSTALLED: Final = (
    "import runpy, sys; sys.modules['aiohttp'] = None; "
    "runpy.run_module('nexus_bus', run_name='__main__', alter_sys=True)"
)


def _spawn(
    argv: list[str], env: dict[str, str], cwd: Path = HERE, cpu: int = 1
) -> subprocess.Popen[bytes]:
    # `node ...` runs node; anything else Python: this environment's, or a baseline checkout's
    # own (`--baseline DIR`), started in that checkout.
    program = [] if argv[0] == "node" else [env.get(BASELINE_PYTHON, sys.executable)]
    if argv[:2] == ["-m", "nexus_bus"]:
        argv = ["-c", AS_INSTALLED, *argv[2:]]
    return subprocess.Popen(
        [*_pin(cpu), *program, *argv], env=env, cwd=env.get(BASELINE_CWD, str(cwd)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _post(port: int, path: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _wait_http(
    port: int, headers: dict[str, str], procs: list[subprocess.Popen[bytes]], target: Target
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                err = p.stderr.read().decode()[-2000:] if p.stderr else ""
                raise RuntimeError(f"a benchmark process exited: {p.args}\n{err}")
        if target.setup and _post(port, target.setup[0], target.setup[1], headers) != 200:
            time.sleep(0.2)
            continue
        if _post(port, target.path, target.body, headers) == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} did not answer 200 in time")


_LAT = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(
    name: str, port: int, conc: int, seconds: float, script: Path, path: str = OP_PATH,
    cpu: int = 0,
) -> Result:
    """One wrk run on CPU `cpu` (one thread: the other CPU belongs to the system under test)."""
    out = subprocess.run(
        [*_pin(cpu), "wrk", "-t1", f"-c{conc}", f"-d{seconds:g}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True,
    ).stdout
    lat = {m.group(1): float(m.group(2)) * _UNIT_MS[m.group(3)] for m in _LAT.finditer(out)}
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return Result(name, conc, total - errors, errors, seconds, lat.get("50", 0), lat.get("99", 0))


async def run_python(
    name: str, port: int, conc: int, seconds: float, headers: dict[str, str],
    path: str = OP_PATH, body: bytes = BODY,
) -> Result:
    """The fallback load generator when wrk is absent (slower: it shares CPU 0 only)."""
    import aiohttp

    url = f"http://127.0.0.1:{port}{path}"
    limits = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=limits) as session:

        async def call() -> None:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(resp.status)

        return await closed_loop(name, call, concurrency=conc, seconds=seconds)


BASELINE_PYTHON: Final = "BENCH_BASELINE_PYTHON"
BASELINE_CWD: Final = "BENCH_BASELINE_CWD"


def _baseline_targets(baseline: Path) -> list[Target]:
    """This checkout's shim and worker beside another checkout's (`--baseline DIR`, with its
    own `.venv`), each pair on a NATS of its own: a change measured side by side in one run."""
    env = {BASELINE_PYTHON: str(baseline / ".venv" / "bin" / "python"), BASELINE_CWD: str(baseline)}
    return [
        Target("nexus shim -> worker (this)", NEXUS_ROLES, {}, own_nats=True),
        Target(
            "nexus shim -> worker (this, speedups on)",
            NEXUS_ROLES,
            {"NEXUS_NATS__SPEEDUPS": "true"},
            own_nats=True,
        ),
        Target(f"nexus shim -> worker ({baseline.name})", NEXUS_ROLES, env, own_nats=True),
    ]


def _policy_targets() -> list[Target]:
    """The shim and worker with the policy layer on, and with it off (`--policies`), each
    on a NATS of its own. With a rate limit nobody reaches: its check runs on every request
    (in the worker, from leased tokens; a script call in Redis per batch). A third pair has
    the layer on without the limit, which tells the gateway's share from the limit's."""
    limit = {"NEXUS_RESILIENCE__OPS": '{"bench.echo": {"rate_limit_per_s": 1000000}}'}
    off = {"NEXUS_RESILIENCE__ENABLED": "false"}
    return [
        Target("nexus shim, policies on", NEXUS_ROLES, limit, own_nats=True),
        Target("nexus shim, policies off", NEXUS_ROLES, off, own_nats=True),
        Target("policies on, no limit", NEXUS_ROLES, {}, own_nats=True),
    ]


def _targets(url: str, servers: bool, tracing: bool) -> list[Target]:
    me = ["-m", "benchmarks.bench_http"]
    responder = ("responder", [*me, "--serve-responder", url])
    aiohttp_bridge = ("bridge", [*me, "--serve-aiohttp", "{port}", url])
    uvicorn_bridge = ("bridge", [*me, "--serve-uvicorn", "{port}", url])
    targets = [
        Target("nexus shim -> worker", NEXUS_ROLES),
        Target("aiohttp bridge -> raw", [responder, aiohttp_bridge]),
        Target("uvicorn bridge -> raw", [responder, uvicorn_bridge]),
        Target("aiohttp raw (no NATS)", [("app", [*me, "--serve-aiohttp", "{port}"])]),
        Target("uvicorn raw (no NATS)", [("app", [*me, "--serve-uvicorn", "{port}"])]),
    ]
    if tracing:
        # Requests traced at a sampling ratio, exported to an OTLP sink (on CPU 0).
        sink = ("otlp sink", [*me, "--serve-otlp", "{otlp}"])
        for ratio in ("1.0", "0.1"):
            env = {**TRACED_ENV, "NEXUS_TRACING__SAMPLE_RATIO": ratio}
            targets.append(Target(f"nexus traced ({ratio})", [sink, *NEXUS_ROLES], env, True))
    if servers:
        granian = ("bridge", [*me, "--serve-granian", "{port}", url])
        targets.append(Target("granian bridge -> raw", [responder, granian]))
    return targets


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """`pid` and every process under it (granian serves from worker subprocesses)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def _status_kb(pid: int, field: str) -> int:
    """A `/proc/<pid>/status` memory field (VmRSS now, VmHWM the peak so far), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process and its children have used so far, from /proc."""
    return usage(pid)[0]


# Per process key: CPU seconds, of them system, and `write` calls, over one slice.
Used = dict[str, tuple[float, float, int]]


def usage(pid: int) -> tuple[float, float, int]:
    """CPU seconds (user + system), of them system, and `write`-family system calls, of a
    process and its children so far, from /proc.

    A sampling profiler counts wall time: with every process under test on one core, one
    preempted inside `write` looks busy there. These counters say what really ran.
    """
    cpu = system = 0.0
    writes = 0
    for each in _descendants(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            io = Path(f"/proc/{each}/io").read_text()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) * _TICK_S
        system += int(fields[12]) * _TICK_S
        writes += int(io.split("syscw:", 1)[1].split()[0])
    return cpu, system, writes


class Bench:
    """The servers, the credentials and the load script shared by every target."""

    def __init__(self, tmp: Path, seconds: float) -> None:
        from nexus_bus.auth import Keyring, TokenCodec, generate_key

        self.seconds = seconds
        self.tmp = tmp
        self.extra_servers: dict[str, ServerProcess] = {}  # a target's own, by key
        self.servers = [nats_server(tmp / "nats"), redis_server(tmp / "redis")]
        for server in self.servers:
            server.argv = [*_pin(1), *server.argv]
            server.start()
        self.nats_url = self.servers[0].url
        keys = tmp / "keys"
        generate_key(keys, kid="bench-k1")
        self.env = {
            **os.environ, "NEXUS_NATS__URL": self.nats_url,
            "NEXUS_REDIS__URL": self.servers[1].url + "/0", "NEXUS_AUTH__KEYS_DIR": str(keys),
            "NEXUS_LOG__LEVEL": "WARNING", "NEXUS_STATE_DIR": str(tmp / "state"),
            "PYTHONPATH": str(HERE),
        }
        # Auth on: a token scoped to exactly this operation, verified by the worker.
        scopes = frozenset({"bench:echo", "data:get", "data:put"})  # data.put: the hot key's setup
        token = TokenCodec(Keyring.from_dir(keys)).issue(
            "bench", scopes, 3600, now=int(time.time()),
            jti=uuid.uuid4().hex,
        ).token
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self.scripts: dict[bytes, Path] = {}
        self.targets: dict[str, Target] = {}
        self.rss_kb: dict[str, tuple[int, int]] = {}  # shim: (idle VmRSS, peak VmHWM)
        self.use_wrk = shutil.which("wrk") is not None
        self.cpu_us: dict[tuple[str, int], dict[str, float]] = {}
        self.slice_rps: dict[tuple[str, int], list[float]] = {}  # each slice's, in turn
        self.keys: dict[str, set[str]] = {}  # target -> its processes and the servers

    def script(self, body: bytes) -> Path:
        """wrk's Lua script posting `body` with the bench's headers (one per body)."""
        if body not in self.scripts:
            path = self.tmp / f"post-{len(self.scripts)}.lua"
            path.write_text(
                'wrk.method = "POST"\n'
                f"wrk.body = '{body.decode()}'\n"
                + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in self.headers.items())
            )
            self.scripts[body] = path
        return self.scripts[body]

    def close(self) -> None:
        """Stop the servers."""
        for server in [*self.extra_servers.values(), *reversed(self.servers)]:
            server.stop()

    @contextlib.contextmanager
    def running(self, targets: list[Target]) -> Iterator[tuple[dict[str, int], dict[str, int]]]:
        """Start every target for the block, and stop them all when it leaves: the ports of
        the targets that answered (by name), and the pid of every process, the servers
        included (by key: `<target>/<role>`, `responder`, `nats-server`, `redis-server`)."""
        started: dict[str, subprocess.Popen[bytes]] = {}
        try:
            ports, live = self._start(targets, started)
            pids = {key: p.pid for key, p in started.items()}
            pids.update({s.name: s.proc.pid for s in self.servers if s.proc})
            pids.update({k: s.proc.pid for k, s in self.extra_servers.items() if s.proc})
            yield {name: ports[name] for name in live}, pids
        finally:
            stop_all(reversed(started.values()))

    def run_all(self, targets: list[Target], levels: list[int], rounds: int) -> list[Result]:
        """Start every target, then measure them in alternating slices at each concurrency.

        All processes stay up for the whole run; only the target being loaded uses the CPU.
        Each point is `rounds` slices of `seconds`, taken in turn with the other targets, so
        a machine that drifts (other tenants, thermal limits) weighs on every target alike
        instead of on whichever ran during a slow minute. The raw responder is one process
        shared by the bridges; CPU is read per slice, so it counts for the target in load.
        """
        with self.running(targets) as (ports, pids):
            results = []
            for conc in levels:
                slices: dict[str, list[tuple[Result, Used]]] = {n: [] for n in ports}
                for name, port in ports.items():  # warm-up at this concurrency
                    self._slice(name, port, conc, 1.0, pids)
                for _ in range(rounds):
                    for name, port in ports.items():
                        slices[name].append(self._slice(name, port, conc, self.seconds, pids))
                for name in ports:
                    results.append(self._merge(name, conc, slices[name]))
            return results

    def _start(
        self, targets: list[Target], started: dict[str, subprocess.Popen[bytes]]
    ) -> tuple[dict[str, int], list[str]]:
        """Start every target's processes (into `started`); their ports, and which answer."""
        ports: dict[str, int] = {}
        live: list[str] = []
        for target in targets:
            name, roles, extra_env, own_nats = target[:4]
            self.targets[name] = target
            port = ports[name] = free_port()
            places = {"{port}": str(port), "{otlp}": str(free_port())}
            env = {**self.env, **{k: _place(v, places) for k, v in extra_env.items()}}
            servers = self.servers
            if own_nats:
                nats = nats_server(self.tmp / f"nats-{port}")
                nats.argv = [*_pin(1), *nats.argv]
                nats.start()
                self.extra_servers[f"{name}/nats-server"] = nats
                env["NEXUS_NATS__URL"] = nats.url
                servers = [s for s in servers if s.name != "nats-server"]
            procs = []
            self.keys[name] = {s.name for s in servers}
            if own_nats:
                self.keys[name].add(f"{name}/nats-server")
            for role, argv in roles:
                key = role if role == "responder" else f"{name}/{role}"
                self.keys[name].add(key)
                if key not in started:
                    cpu = 0 if role in BESIDE_LOAD else 1
                    started[key] = _spawn([_place(a, places) for a in argv], env, target.cwd, cpu)
                procs.append(started[key])
            try:
                _wait_http(port, self.headers, procs, target)
                live.append(name)
            except RuntimeError as exc:  # one broken baseline must not hide the others
                print(f"{name}: not measured: {exc}", file=sys.stderr)
        return ports, live

    def _slice(
        self, name: str, port: int, conc: int, seconds: float, pids: dict[str, int]
    ) -> tuple[Result, Used]:
        before = {key: usage(pid) for key, pid in pids.items()}
        target = self.targets[name]
        shim = pids.get(f"{name}/shim")
        if shim and name not in self.rss_kb:
            self.rss_kb[name] = (_status_kb(shim, "VmRSS"), 0)
        if self.use_wrk:
            result = run_wrk(name, port, conc, seconds, self.script(target.body), target.path)
        else:
            result = uvloop.run(
                run_python(name, port, conc, seconds, self.headers, target.path, target.body)
            )
        if shim:
            self.rss_kb[name] = (self.rss_kb[name][0], _status_kb(shim, "VmHWM"))
        used: Used = {}
        for key, pid in pids.items():
            cpu, system, writes = usage(pid)
            was = before[key]
            used[key] = (cpu - was[0], system - was[1], writes - was[2])
        return result, used

    def _merge(
        self, name: str, conc: int, parts: list[tuple[Result, Used]]
    ) -> Result:
        """One point from its slices: totals for throughput and CPU, medians for latency."""
        result = merge(name, [r for r, _ in parts])
        served = max(1, result.requests)
        split: dict[str, float] = {}
        system: dict[str, float] = {}
        writes: dict[str, float] = {}
        for _, used in parts:
            for key, (seconds, sys_s, calls) in used.items():
                if key in self.keys[name]:  # other targets' processes sit idle meanwhile
                    role = key.split("/", 1)[-1]
                    split[role] = split.get(role, 0.0) + seconds / served * 1e6
                    system[role] = system.get(role, 0.0) + sys_s / served * 1e6
                    writes[role] = writes.get(role, 0.0) + calls / served
        self.cpu_us[(name, conc)] = split
        self.slice_rps[(name, conc)] = [r.rps for r, _ in parts]
        parts_text = "  ".join(
            f"{role} {us:.0f} (sys {system[role]:.0f}, {writes[role]:.2f} writes)"
            for role, us in split.items()
        )
        slices = ", ".join(f"{r.rps:.0f}" for r, _ in parts)
        print(f"{row(result)}   cpu us/req: {parts_text}   (slices req/s: {slices})", flush=True)
        return result


def report(results: Sequence[Result], cpu_us: dict[tuple[str, int], dict[str, float]]) -> None:
    """The table with ratios to the aiohttp bridge, and the issue's targets checked.

    `cpu us/req` is the CPU time all processes under test (servers, bridge or shim, worker or
    responder) spent per answered request: what the one CPU they share had to pay.
    """
    by = {(r.name, r.concurrency): r for r in results}
    print(f"\n{'target':<24}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'cpu us/req':>11}{'rps/bridge':>11}{'p99/bridge':>11}")
    for r in results:
        base = by.get(("aiohttp bridge -> raw", r.concurrency))
        rps = f"{r.rps / base.rps:.2f}x" if base and base.rps else "-"
        p99 = f"{r.p99_ms / base.p99_ms:.2f}x" if base and base.p99_ms else "-"
        cpu = sut_cpu(cpu_us.get((r.name, r.concurrency), {}))
        print(f"{row(r)}{cpu:>11.0f}{rps:>11}{p99:>11}")
    ours16, base16 = by.get(("nexus shim -> worker", 16)), by.get(("aiohttp bridge -> raw", 16))
    ours128 = by.get(("nexus shim -> worker", 128))
    if ours16 and base16 and base16.rps and base16.p99_ms:
        ratio, p99_ratio = ours16.rps / base16.rps, ours16.p99_ms / base16.p99_ms
        print(f"\ntarget: c=16 throughput >= 0.85x bridge: {ratio:.2f}x "
              f"{'MET' if ratio >= 0.85 else 'MISSED'}")
        print(f"target: c=16 p99 <= 1.5x bridge: {p99_ratio:.2f}x "
              f"{'MET' if p99_ratio <= 1.5 else 'MISSED'}")
    if ours128:
        print(f"target: c=128 p99 < 100 ms: {ours128.p99_ms:.1f} ms "
              f"{'MET' if ours128.p99_ms < 100 else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per slice")
    parser.add_argument("--rounds", type=int, default=3, help="slices per point")
    parser.add_argument("--concurrency", default="1,16,128")
    parser.add_argument("--servers", action="store_true", help="also granian (server choice)")
    parser.add_argument(
        "--baseline", type=Path, metavar="DIR",
        help="only this checkout's shim+worker beside DIR's (a checkout with its own .venv)",
    )
    parser.add_argument("--no-tracing", action="store_true", help="skip the traced nexus row")
    parser.add_argument("--serve-otlp", metavar="PORT", type=int)
    parser.add_argument(
        "--policies", action="store_true", help="only: the policy layer on vs off, side by side"
    )
    parser.add_argument(
        "--tracing", action="store_true", help="only: tracing off vs sampled at 1.0 and 0.1"
    )
    parser.add_argument(
        "--data", action="store_true",
        help="only: data.get (L1, L1 off, 9e0cb4b) vs Moleculer and the uvicorn bridge",
    )
    parser.add_argument("--serve-responder", metavar="NATS_URL")
    parser.add_argument("--serve-aiohttp", nargs="+", metavar=("PORT", "NATS_URL"))
    parser.add_argument("--serve-uvicorn", nargs="+", metavar=("PORT", "NATS_URL"))
    parser.add_argument("--serve-granian", nargs="+", metavar=("PORT", "NATS_URL"))
    args = parser.parse_args()
    if args.serve_responder:
        uvloop.run(serve_responder(args.serve_responder))
        return 0
    if args.serve_otlp:
        serve_otlp_sink(args.serve_otlp)
        return 0
    roles = (("aiohttp", serve_aiohttp), ("uvicorn", serve_uvicorn), ("granian", serve_granian))
    for role, serve in roles:
        given = getattr(args, f"serve_{role}")
        if given:
            serve(given[1] if len(given) > 1 else None, int(given[0]))
            return 0
    loadgen = "wrk (CPU 0)" if shutil.which("wrk") else "python closed loop (CPU 0)"
    print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}  load: {loadgen}  "
          f"system under test: CPU 1  per point: {args.rounds} slices of {args.seconds:g} s, "
          "alternating between targets")
    levels = [int(c) for c in args.concurrency.split(",")]
    if not shutil.which("wrk") and _pin(0):
        # The Python load generator runs in this process: keep it off the system's core too
        # (children are started under `taskset -c 1`, which overrides this for them).
        os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), args.seconds)
        try:
            if args.data:
                targets = data_targets(bench.nats_url, Path(tmp))
            elif args.baseline:
                targets = _baseline_targets(args.baseline.resolve())
            elif args.policies:
                targets = _policy_targets()
            elif args.tracing:
                targets = tracing_targets()
            else:
                targets = _targets(bench.nats_url, args.servers, not args.no_tracing)
            results = bench.run_all(targets, levels, args.rounds)
        finally:
            bench.close()
    if args.data:
        report_data(results, bench.cpu_us, bench.rss_kb)
    elif args.tracing:
        report_tracing(results, bench.cpu_us, bench.slice_rps)
    else:
        report(results, bench.cpu_us)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
