"""Event streams over HTTP: the stream ticket a browser's EventSource opens a stream with."""

from __future__ import annotations

import msgspec


class TicketIssued(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to `POST /v1/events/{topic}/ticket` (docs/http.md, "Browsers")."""

    ticket: str
    expires_in: int  # seconds
    url: str  # the stream URL with the ticket, relative to the shim
