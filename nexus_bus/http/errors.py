"""What the HTTP server path can raise, as `NexusError`s: the one mapping for the shim.

The app's single exception handler (`ShimApp._respond`) answers with the problem document of
what this returns. uvicorn's own failures on `receive()`/`send()` (the client went away)
become `ClientGone` (logged as 499, answered to nobody); a body the codec cannot read,
`InvalidRequest`; a read that outlived the read timeout, `RequestTimeout`; anything else is
ours and `InternalError` (500). `tests/unit/test_error_mappers.py` checks every exception
uvicorn defines and each family here.
"""

from __future__ import annotations

import msgspec
from uvicorn.protocols.utils import ClientDisconnected

from nexus_bus.errors import InternalError, InvalidRequest, NexusError, Unavailable
from nexus_bus.http.problems import ClientGone, RequestTimeout

# A body that cannot be read as the request it claims to be: the client's fault.
_UNREADABLE = (msgspec.DecodeError, msgspec.ValidationError, UnicodeError, RecursionError)


def map_http_error(exc: BaseException) -> NexusError:
    """The `NexusError` an exception on the HTTP server path means to the client."""
    if isinstance(exc, NexusError):
        return exc
    name = type(exc).__name__
    if isinstance(exc, ClientDisconnected | ConnectionResetError | BrokenPipeError):
        return ClientGone(f"the client went away ({name})")
    if isinstance(exc, TimeoutError):
        return RequestTimeout("the request was not received in time")
    if isinstance(exc, _UNREADABLE):
        return InvalidRequest(f"the request body cannot be read ({name})")
    if isinstance(exc, OSError):
        return Unavailable(f"a dependency of the shim failed ({name})")
    return InternalError(f"internal error ({name})")
