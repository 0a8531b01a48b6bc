"""Instructions the shim's ASGI app executes per hot `data.get`, counted by callgrind.

    python -m benchmarks.shim_instructions [--requests 3000] [--tree DIR]

CPU time per request varies from run to run, and from machine to machine, by more than most
single changes to the shim's hot path save; and under valgrind a whole shim loaded over HTTP
counts the same commit 330,000 and 650,000 instructions a request in two runs (the event
loop's batching changes with the load). This counts the app alone, which repeats to 0.2%:
it starts the `bench_http --data` servers and a `data` worker, then runs itself under
`valgrind --tool=callgrind` as the shim's app in-process (`ShimApp`, auth on, cached reads on),
writes the hot key, warms up, and counts `--requests` calls of the app, one at a time, each
followed by one turn of the event loop, as an ASGI server would call it (uvicorn's own work,
parsing and writing, is not counted). `--tree DIR` counts another checkout's app. Needs
valgrind; about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import uvloop

# Nothing from `benchmarks` at the top: under valgrind this file runs as a script in the
# counted tree, which may be a checkout without these benchmarks.
WARM_UP = 500
Message = MutableMapping[str, Any]


def _scope(path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """What uvicorn hands the app for a POST of `body` (wrk's headers, as `bench_http`'s)."""
    sent = [(b"host", b"127.0.0.1:8000"), (b"content-length", str(len(body)).encode())]
    sent += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
        "scheme": "http", "method": "POST", "root_path": "", "path": path,
        "raw_path": path.encode(), "query_string": b"", "headers": sent, "state": {},
    }


async def _callgrind(command: str) -> None:
    """Zero or dump this process's counters (it runs under valgrind)."""
    control = await asyncio.create_subprocess_exec(
        "callgrind_control", command, str(os.getpid()),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    if await control.wait() != 0:
        raise RuntimeError(f"callgrind_control {command} failed")


async def _count(requests: int, headers: dict[str, str], put: bytes, get: bytes) -> None:
    """As the app's process (under valgrind): write the hot key, warm up, count."""
    from nexus_bus.config import load_settings
    from nexus_bus.http.app import ShimApp

    app = ShimApp(load_settings())
    await app.startup()
    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def call(path: str, body: bytes) -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        await app(_scope(path, body, headers), receive, send)
        await asyncio.sleep(0)  # the loop's turn between two requests, as under a server

    for _ in range(600):  # the worker under valgrind's neighbour may take a while to answer
        await call("/v1/data/put", put)
        if statuses.pop() == 200:
            break
        await asyncio.sleep(0.1)
    for _ in range(WARM_UP):
        await call("/v1/data/get", get)
    await _callgrind("--zero")
    statuses.clear()
    for _ in range(requests):
        await call("/v1/data/get", get)
    await _callgrind("--dump")
    if statuses.count(200) != requests:
        raise SystemExit(f"answers other than 200: {sorted(set(statuses))}")
    await app.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--tree", type=Path, help="count this checkout's app")
    parser.add_argument("--serve-count", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_count:  # requests, Authorization, the put's body, the get's body
        requests, authorization, put, get = args.serve_count
        headers = {"Content-Type": "application/json", "Authorization": authorization}
        uvloop.run(_count(int(requests), headers, put.encode(), get.encode()))
        return 0
    from benchmarks.bench_http import AS_INSTALLED, Bench
    from benchmarks.http_data import DATA_BODY, PUT_BODY
    from benchmarks.instructions import totals

    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("needs valgrind", file=sys.stderr)
        return 2
    tree = (args.tree or Path.cwd()).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), 1)
        env = {**bench.env, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        worker = subprocess.Popen(
            [sys.executable, "-c", AS_INSTALLED, "worker", "--ops", "data"], env=env, cwd=tree,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        out = Path(tmp) / "callgrind.out"
        try:
            counted = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p",
                 sys.executable, __file__, "--serve-count", str(args.requests),
                 bench.headers["Authorization"], PUT_BODY.decode(), DATA_BODY.decode()],
                env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                check=False,
            )
        finally:
            worker.terminate()
            worker.wait(60)
            bench.close()
        dumps = sorted(Path(tmp).glob("callgrind.out.*.1"))
        if counted.returncode != 0 or not dumps:
            print(counted.stderr.decode()[-2000:], file=sys.stderr)
            return 1
        per_request = totals(dumps[0]) / args.requests
        print(f"shim app instructions per hot data.get ({tree.name}, {args.requests} calls, "
              f"auth on, cached reads on): {per_request:,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
