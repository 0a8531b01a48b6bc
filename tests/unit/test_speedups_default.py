"""Importing nexus_bus changes nothing in nats-py: a user's own client runs stock nats-py,
and nexus-bus's own connections run without speedups unless asked for."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from nexus_bus.config import NatsSettings


def test_speedups_are_off_by_default() -> None:
    assert NatsSettings().speedups is False


def test_importing_nexus_bus_leaves_a_users_nats_client_untouched() -> None:
    """In a fresh interpreter: nats-py's Client, and a client from `nats.connect()`, are the
    same objects after importing every nexus_bus module a process loads."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        import nats
        from nats.aio.client import Client
        before = dict(Client.__dict__)
        import nexus_bus, nexus_bus.runtime.worker, nexus_bus.client.gateway
        import nexus_bus.bus.connection
        import nexus_bus.http, nexus_bus.cli, nexus_bus.testing
        after = dict(Client.__dict__)
        changed = [k for k in before.keys() | after.keys() if before.get(k) is not after.get(k)]
        assert not changed, changed
        nc = Client()  # what nats.connect() builds before connecting
        assert "_parse_header_lines" not in nc.__dict__ and "_send_publish" not in nc.__dict__
        assert "nexus_bus.bus._speedups" not in sys.modules, "speedups loaded while off"
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
