"""A TCP relay between the processes under test and nats-server, which a test can cut or
freeze: NATS going away, and NATS going silent (a partition), for connections that cannot
tell the difference from inside."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nexus_bus import Settings
from nexus_bus.embedded import ServerProcess, free_port
from tests.conftest import make_settings


class Relay:
    """A TCP relay to nats-server that can be cut (every connection closed, none accepted)
    and restored on the same port, or frozen (the connections it carries stay open and carry
    nothing more, as across a partition; new ones are carried)."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._open: set[asyncio.StreamWriter] = set()  # both ends of every carried connection
        self._frozen: set[asyncio.StreamWriter] = set()  # written to no more

    def settings(self, redis_url: str) -> Settings:
        """Settings of a process that reaches NATS through this relay (cache on), quick to
        reconnect once the relay is back."""
        relayed = make_settings(f"nats://127.0.0.1:{self.port}", redis_url, cache={"enabled": True})
        fast = relayed.nats.model_copy(update={"reconnect_wait_s": 0.2})
        return relayed.model_copy(update={"nats": fast})

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def freeze(self) -> None:
        """Carry nothing more, either way, on the connections open now; close none."""
        self._frozen.update(self._open)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._open.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if dst not in self._frozen:  # a frozen link drops what it is given
                        dst.write(data)
                        await dst.drain()
            finally:
                dst.close()
                self._open.discard(dst)
                self._frozen.discard(dst)

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


@contextlib.asynccontextmanager
async def relay_to(server: ServerProcess) -> AsyncIterator[Relay]:
    relay = Relay(server.port)
    await relay.open()
    try:
        yield relay
    finally:
        with contextlib.suppress(AssertionError):
            await relay.cut()
