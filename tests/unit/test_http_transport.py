"""`JoinedWrites`: the writes of one turn of the loop go out in one call, and nothing kept is
ever lost or reordered: closing sends it, a large body meets flow control at once, a closed
connection drops it. Against a recording transport (asyncio's transport interface), and over
a real socket with uvicorn's protocol as the shim runs it."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvicorn

from nexus_bus.http.transport import FLUSH_AT_BYTES, JoinedWrites, ShimProtocol


class Recorded(asyncio.Transport):
    """A transport that records each call it gets (a double of asyncio's interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.calls: list[str] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


async def a_turn() -> None:
    await asyncio.sleep(0)


async def test_the_writes_of_one_turn_go_out_in_one_call_in_order() -> None:
    real = Recorded()
    joined = JoinedWrites(real, asyncio.get_running_loop())
    joined.write(b"HTTP/1.1 200 OK\r\n\r\n")
    joined.write(bytearray(b"{}"))
    joined.writelines([b"", b"!"])
    assert real.writes == []
    assert joined.get_write_buffer_size() == 22
    await a_turn()
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}!"]
    joined.write(b"next")
    await a_turn()
    await a_turn()  # one call per turn, not one per scheduled flush
    assert real.writes[1:] == [b"next"]


async def test_a_large_body_goes_out_at_once_and_closing_sends_what_is_kept() -> None:
    real = Recorded()
    joined = JoinedWrites(real, asyncio.get_running_loop())
    joined.write(b"head")
    joined.write(b"x" * FLUSH_AT_BYTES)  # the real transport's flow control sees it now
    assert real.writes == [b"head" + b"x" * FLUSH_AT_BYTES]
    joined.write(b"last")
    joined.close()
    assert real.writes[1:] == [b"last"]
    assert real.calls == ["close"]
    await a_turn()
    assert len(real.writes) == 2  # the scheduled flush finds nothing more


async def test_abort_drops_what_is_kept_and_a_closed_connection_gets_nothing() -> None:
    real = Recorded()
    joined = JoinedWrites(real, asyncio.get_running_loop())
    joined.write(b"never")
    joined.abort()
    await a_turn()
    assert real.writes == [] and real.calls == ["abort"]

    real = Recorded()
    joined = JoinedWrites(real, asyncio.get_running_loop())
    joined.write(b"kept")
    real.closing = True  # the peer went away before the next turn
    await a_turn()
    assert real.writes == []


@pytest.fixture
async def shim_protocol_server() -> Any:
    """uvicorn with `ShimProtocol` answering a constant, on a free port."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        close = scope["path"] == "/close"
        headers = [(b"content-length", b"5")] + ([(b"connection", b"close")] if close else [])
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"hello"})

    config = uvicorn.Config(app, port=0, http=ShimProtocol, lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # connections wait in the backlog until uvicorn takes them
    task = asyncio.create_task(server.serve(sockets=[listener]))
    yield listener.getsockname()[1]
    server.should_exit = True
    await task


async def test_pipelined_answers_arrive_whole_and_in_order_over_a_real_socket(
    shim_protocol_server: int,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", shim_protocol_server)
    writer.write(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n"
                 b"GET /close HTTP/1.1\r\nhost: x\r\n\r\n")
    received = await asyncio.wait_for(reader.read(), 5)  # to EOF: the last one closes
    writer.close()
    answers = received.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(answers) == 3, received
    assert all(answer.endswith(b"\r\n\r\nhello") for answer in answers), received
    assert b"connection: close" in answers[2]


def test_the_shim_runs_it_unless_join_writes_is_off() -> None:
    from nexus_bus.config import Settings
    from nexus_bus.http.app import ShimApp
    from nexus_bus.http.server import create_config

    settings = Settings()
    assert create_config(ShimApp(settings), settings).http is ShimProtocol
    settings = Settings(http={"join_writes": False})
    assert create_config(ShimApp(settings), settings).http == "httptools"
