"""The shim's answers written at the end of the event loop's turn, each in one call.

uvicorn writes an answer's head and its body in two calls to the connection's transport, and
uvloop sends each at once, in the middle of the turn of the event loop that made the answer.
`JoinedWrites`, an asyncio transport in front of the connection's own, keeps what is written
to it in one turn and sends it joined, in one call, at the start of the next turn (`call_soon`:
before the loop polls for I/O again, so nothing kept waits on the network). Measured in one
run (docs/benchmarks.md, run 13), at c = 16 the hot `data.get` went from 11,900 to 16,400
req/s and from 84 to 62 µs of shim CPU a request. Sending head and body at once in one call,
without waiting for the turn to end, gave 12,600 req/s: the gain is in sending a turn's
answers together, after the turn's work, as Netty's flush consolidation does, rather than in
the one system call saved.

Once what is kept reaches `FLUSH_AT_BYTES` it goes out at once, so a large or streamed body
meets the real transport's flow control (`pause_writing`) as it did without this. Closing
sends what is kept first; aborting drops it, as aborting drops the transport's own buffer; a
connection lost meanwhile drops it (no peer to read it).

`ShimProtocol` is uvicorn's httptools protocol given that transport. uvicorn takes a protocol
class as its `http` setting (`uvicorn.Config(http=...)`, typed `type[asyncio.Protocol]`), and
the subclass overrides only asyncio's `connection_made`: no uvicorn attribute is read or
replaced, and uvicorn reaches the connection through asyncio's public transport methods only,
as it must for any transport (TLS ones included). `http.join_writes=false` runs uvicorn's own
protocol instead.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# What is kept goes out at once from this size: the transport's own default high-water mark.
FLUSH_AT_BYTES: Final = 64 * 1024


class JoinedWrites(asyncio.Transport):
    """`transport`, with the writes of one turn of `loop` joined into one (module docstring)."""

    __slots__ = ("_flush_scheduled", "_kept", "_kept_bytes", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self._flush_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._transport.is_closing():
            self._transport.write(data)  # whatever the transport does then, unchanged
            return
        self._kept.append(bytes(data))  # a copy: the caller may reuse a bytearray
        self._kept_bytes += len(data)
        if self._kept_bytes >= FLUSH_AT_BYTES:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._next_turn)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _next_turn(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        """Send what is kept, in one call (dropped if the connection closed meanwhile)."""
        if not self._kept:
            return
        kept = self._kept
        self._kept = []
        self._kept_bytes = 0
        if not self._transport.is_closing():
            self._transport.write(kept[0] if len(kept) == 1 else b"".join(kept))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._kept = []
        self._kept_bytes = 0
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._kept_bytes + self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class ShimProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through `JoinedWrites` (module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(JoinedWrites(transport, asyncio.get_running_loop()))
