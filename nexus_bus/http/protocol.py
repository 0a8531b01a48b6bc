"""uvicorn's httptools protocol with the limits it lacks: head size (431) and read timeouts.

uvicorn accepts request heads of any size and waits forever for a client that sends its
request slowly (slowloris). Both are bounded here, where the bytes arrive:

- the request line and headers may not exceed `max_head_bytes` (431, before the ASGI task
  exists, so an oversized head is never handed to the app);
- a whole request (head and body) must arrive within `read_timeout_s` of its first byte, and
  a new connection must start one within that time (408).

Enforcing the body timeout here, with one timer per request, spares the app an
`asyncio.timeout` per request on the hot path. uvicorn's plain-text 400 for unparsable
requests becomes a problem document with a request id, like every other answer of the shim.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, Final

import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from nexus_bus.constants import H_HTTP_REQUEST_ID
from nexus_bus.errors import HeadersTooLarge, InvalidRequest, NexusError
from nexus_bus.http.problems import CT_PROBLEM_BYTES, RequestTimeout
from nexus_bus.metadata import new_request_id
from nexus_bus.observability.access import log_http_access
from nexus_bus.replies import problem_of

_encoder: Final = msgspec.json.Encoder()
_REQUEST_ID: Final = H_HTTP_REQUEST_ID.lower().encode()


def problem_bytes(error: NexusError, request_id: str) -> bytes:
    """A complete HTTP/1.1 answer for `error` that closes the connection."""
    body = _encoder.encode(problem_of(error, request_id))
    return b"".join(
        [
            STATUS_LINE[error.http_status],
            b"content-type: " + CT_PROBLEM_BYTES + b"\r\n",
            b"content-length: %d\r\n" % len(body),
            _REQUEST_ID + b": " + request_id.encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class HeadJoiningTransport:
    """A transport that writes a response head together with the body that follows it.

    uvicorn writes the status line and headers, then the body, as two writes. A replica
    killed between them leaves NGINX holding a head without a body: it has started answering,
    so it can neither retry elsewhere nor finish, and the client gets a truncated response.
    Joined, a small answer reaches the socket whole or not at all (and costs one syscall
    instead of two). A head whose body does not follow in the same loop iteration is sent
    alone.

    Closing in the middle of a request lingers (as NGINX's `lingering_close` does): the client
    may still be sending a body we refused (a 413 answered early), and closing a socket with
    unread input makes the kernel send a reset, which can destroy the answer before the
    client reads it. So while `receiving` is set, `close()` sends the answer and a FIN
    (`write_eof`), reads and discards until the client closes or `LINGER_S` pass, and only
    then closes. Idle keep-alive connections close at once.
    """

    __slots__ = ("_held", "_linger_timer", "_loop", "_transport", "lingering", "receiving")

    LINGER_S: ClassVar[float] = 5.0

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self.lingering = False
        self.receiving = False  # a request has begun and not fully arrived

    def write(self, data: bytes) -> None:
        """Write `data`, holding a bare response head until the next write or loop turn.

        Nothing is written after `close()` (as asyncio drops writes to a closing transport;
        while lingering, the FIN is already sent).
        """
        if self.lingering:
            return
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        if self.lingering:
            return
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        """Send anything held and a FIN; close once the client has, or after `LINGER_S`.

        A second call while lingering (the server shutting down) closes at once.
        """
        transport = self._transport
        if self.lingering:
            transport.close()
            return
        self._flush()
        if transport.is_closing():
            return
        if not self.receiving or not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
        transport.write_eof()
        transport.resume_reading()  # uvicorn may have paused it for flow control
        self._linger_timer = self._loop.call_later(self.LINGER_S, transport.close)

    def is_closing(self) -> bool:
        """Whether close() was called (lingering counts as closing)."""
        return self.lingering or self._transport.is_closing()

    def closed(self) -> None:
        """The connection is gone: stop the linger timer."""
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol bounding each request in head size and read time.

    Configure with `limited_protocol(...)`, which sets the two class attributes.
    """

    max_head_bytes: ClassVar[int] = 16 * 1024
    read_timeout_s: ClassVar[float] = 10.0
    log_refusals: ClassVar[bool] = False  # an access line for each answer written here

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a new connection's first bytes are a head
        self._head_bytes = 0
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = HeadJoiningTransport(transport, self.loop)  # type: ignore[assignment]
        # A connection that never sends a byte must not be held forever either.
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        if isinstance(self.transport, HeadJoiningTransport):
            self.transport.closed()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # type: ignore[attr-defined]
            return  # the answer is sent: what the client still sends is discarded
        super().data_received(data)
        # Counted per chunk while a head is incomplete, not per header: one addition instead
        # of a Python call for every header. A head that completes inside one chunk is
        # measured exactly by the app (`parse_head`); this bounds heads that keep coming.
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(HeadersTooLarge(f"request head exceeds {self.max_head_bytes} bytes"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.transport.receiving = True  # type: ignore[attr-defined]
        self._in_head = True
        self._head_bytes = 0
        if self._read_timer is None:
            self._arm_read_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_read_timer()
        self.transport.receiving = False  # type: ignore[attr-defined]
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(InvalidRequest("malformed HTTP request"))

    def _arm_read_timer(self) -> None:
        self._cancel_read_timer()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            # The app answered, or is streaming, before the request fully arrived (a 413, an
            # event stream): nothing to tell. Its further sends become no-ops, as after a
            # client disconnect.
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.close()
            return
        if cycle is not None and not cycle.response_complete:
            # The app waits in receive() for a body that is not coming: wake it as if the
            # client had left, so it answers nobody, and answer 408 from here.
            cycle.disconnected = True
            cycle.message_event.set()
        self._refuse(RequestTimeout(f"request not received within {self.read_timeout_s:g}s"))

    def _refuse(self, error: NexusError) -> None:
        self._cancel_read_timer()
        if not self.transport.is_closing():
            request_id = new_request_id()
            self.transport.write(problem_bytes(error, request_id))
            self.transport.close()
            if self.log_refusals:
                # The request never reached the app: no route, no duration, the peer address.
                log_http_access(
                    method=None,
                    route=None,
                    op=None,
                    action=None,
                    status=error.http_status,
                    duration_s=None,
                    request_id=request_id,
                    trace_id=None,
                    client=self.client[0] if self.client else "",
                )


def limited_protocol(
    max_head_bytes: int, read_timeout_s: float, *, access_log: bool = False
) -> type[LimitedHttpToolsProtocol]:
    """A protocol class with these limits, for `uvicorn.Config(http=...)`."""
    return type(
        "ShimHttpProtocol",
        (LimitedHttpToolsProtocol,),
        {
            "max_head_bytes": max_head_bytes,
            "read_timeout_s": read_timeout_s,
            "log_refusals": access_log,
        },
    )
