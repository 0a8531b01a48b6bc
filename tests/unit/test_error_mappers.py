"""One exception mapper per adapter (nats-py, redis-py, the HTTP server): every exception
class each library defines maps to a `NexusError`, and the ones with a meaning of their own
map to the status that meaning has. A new library release that adds an exception is caught
here: it maps (to the family's default) or this test names it."""

from __future__ import annotations

import inspect
from types import ModuleType

import msgspec
import nats.errors
import nats.js.errors
import pytest
import redis.exceptions
import uvicorn.protocols.utils

from nexus_bus.bus.nats_errors import map_nats_error
from nexus_bus.config import ConfigError as ConfigErrorFromConfig
from nexus_bus.errors import (
    ERRORS_BY_CODE,
    ConfigError,
    Conflict,
    InternalError,
    InvalidRequest,
    NexusError,
    NoResponders,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UpstreamTimeout,
)
from nexus_bus.http.errors import map_http_error
from nexus_bus.http.problems import ClientGone, RequestTimeout
from nexus_bus.redis_errors import map_redis_error


def exception_classes(*modules: ModuleType) -> list[type[BaseException]]:
    return [
        cls
        for module in modules
        for cls in vars(module).values()
        if inspect.isclass(cls) and issubclass(cls, BaseException)
        and cls.__module__.startswith(module.__name__.split(".")[0])
    ]


def instance(cls: type[BaseException]) -> BaseException:
    """An instance without calling a constructor that may want arguments: the mappers look
    only at the type."""
    return cls.__new__(cls)


NATS_CLASSES = exception_classes(nats.errors, nats.js.errors)
REDIS_CLASSES = exception_classes(redis.exceptions)


def test_the_libraries_define_what_the_mappers_were_written_for() -> None:
    assert len(NATS_CLASSES) >= 50 and len(REDIS_CLASSES) >= 35


@pytest.mark.parametrize("cls", NATS_CLASSES, ids=lambda c: c.__name__)
def test_every_nats_exception_maps_to_a_nexus_error(cls: type[BaseException]) -> None:
    error = map_nats_error(instance(cls), "data.get")
    assert isinstance(error, NexusError) and type(error) in ERRORS_BY_CODE.values()
    assert "data.get" in error.detail


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (nats.errors.NoRespondersError, NoResponders),
        (nats.errors.TimeoutError, UpstreamTimeout),
        (nats.js.errors.FetchTimeoutError, UpstreamTimeout),
        (nats.errors.MaxPayloadError, PayloadTooLarge),
        (nats.errors.BadSubjectError, InvalidRequest),
        (nats.errors.BadHeaderError, InvalidRequest),
        (nats.js.errors.KeyNotFoundError, NotFound),
        (nats.js.errors.KeyDeletedError, NotFound),
        (nats.js.errors.KeyWrongLastSequenceError, Conflict),
        (nats.errors.ConnectionClosedError, Unavailable),
        (nats.errors.ConnectionDrainingError, Unavailable),
        (nats.errors.ConnectionReconnectingError, Unavailable),
        (nats.errors.OutboundBufferLimitError, Unavailable),
        (nats.errors.NoServersError, Unavailable),
        (nats.js.errors.ServiceUnavailableError, Unavailable),
        (nats.js.errors.BadRequestError, Unavailable),
        (nats.js.errors.APIError, Unavailable),
        (nats.js.errors.BucketNotFoundError, NotFound),
        (nats.errors.MsgAlreadyAckdError, InternalError),
    ],
)
def test_nats_exceptions_with_a_meaning_of_their_own(
    cls: type[BaseException], expected: type[NexusError]
) -> None:
    assert type(map_nats_error(instance(cls))) is expected


def test_jetstream_answers_by_error_code() -> None:
    stale = nats.js.errors.APIError(code=400, err_code=10071, description="wrong last sequence")
    assert type(map_nats_error(stale, jetstream=True)) is Conflict
    assert type(map_nats_error(nats.errors.NoRespondersError(), jetstream=True)) is Unavailable
    # What nats-py raises when the server runs without JetStream: no code, no description.
    off = map_nats_error(nats.js.errors.ServiceUnavailableError(), "bucket b", jetstream=True)
    assert type(off) is Unavailable
    assert off.detail == "bucket b: JetStream unavailable (ServiceUnavailableError)"


@pytest.mark.parametrize(
    "refusal",
    [
        nats.js.errors.APIError(code=400, err_code=10052, description="invalid subject"),
        nats.js.errors.BadRequestError(code=400, err_code=10025, description="invalid JSON"),
    ],
)
def test_a_jetstream_refusal_is_the_callers_fault_only_where_the_call_says_so(
    refusal: nats.js.errors.APIError,
) -> None:
    """A malformed `data.list` prefix or `stream.read` cursor: 400, which is neither retried
    nor counted against the op's breaker. Elsewhere the same codes can be our own doing (a
    stream's configuration): 503 as before."""
    codes = (10052, 10025)
    error = map_nats_error(refusal, "list keys", jetstream=True, input_errors=codes)
    assert type(error) is InvalidRequest and "list keys" in error.detail
    assert type(map_nats_error(refusal, "list keys", jetstream=True)) is Unavailable


def test_socket_failures_and_strangers_on_the_nats_path() -> None:
    assert type(map_nats_error(ConnectionResetError())) is Unavailable
    assert type(map_nats_error(TimeoutError())) is UpstreamTimeout
    assert type(map_nats_error(RuntimeError())) is InternalError
    mine = NotFound("x")
    assert map_nats_error(mine) is mine


@pytest.mark.parametrize("cls", REDIS_CLASSES, ids=lambda c: c.__name__)
def test_every_redis_exception_maps_to_a_nexus_error(cls: type[BaseException]) -> None:
    error = map_redis_error(instance(cls), "the ticket store")
    assert type(error) in (Unavailable, InternalError)
    assert "the ticket store" in error.detail


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (redis.exceptions.ConnectionError, Unavailable),
        (redis.exceptions.TimeoutError, Unavailable),
        (redis.exceptions.AuthenticationError, Unavailable),
        (redis.exceptions.BusyLoadingError, Unavailable),
        (redis.exceptions.ReadOnlyError, Unavailable),
        (redis.exceptions.ClusterDownError, Unavailable),
        (redis.exceptions.MovedError, Unavailable),
        (redis.exceptions.RedisClusterException, Unavailable),
        (redis.exceptions.ResponseError, InternalError),
        (redis.exceptions.NoScriptError, InternalError),
        (redis.exceptions.DataError, InternalError),
        (redis.exceptions.LockNotOwnedError, InternalError),
    ],
)
def test_redis_exceptions_with_a_meaning_of_their_own(
    cls: type[BaseException], expected: type[NexusError]
) -> None:
    assert type(map_redis_error(instance(cls))) is expected


def test_socket_failures_on_the_redis_path_are_unavailable() -> None:
    assert type(map_redis_error(ConnectionRefusedError())) is Unavailable
    assert type(map_redis_error(TimeoutError())) is Unavailable


@pytest.mark.parametrize(
    "cls", exception_classes(uvicorn.protocols.utils), ids=lambda c: c.__name__
)
def test_every_uvicorn_exception_maps_to_a_nexus_error(cls: type[BaseException]) -> None:
    assert isinstance(map_http_error(instance(cls)), NexusError)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (uvicorn.protocols.utils.ClientDisconnected(), ClientGone),
        (ConnectionResetError(), ClientGone),
        (BrokenPipeError(), ClientGone),
        (TimeoutError(), RequestTimeout),
        (msgspec.DecodeError("bad"), InvalidRequest),
        (msgspec.ValidationError("bad"), InvalidRequest),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), InvalidRequest),
        (RecursionError(), InvalidRequest),
        (ConnectionRefusedError(), Unavailable),
        (ValueError("a bug of ours"), InternalError),
        (KeyError("a bug of ours"), InternalError),
    ],
)
def test_http_server_path(exc: BaseException, expected: type[NexusError]) -> None:
    assert type(map_http_error(exc)) is expected


def test_config_error_has_its_own_place_in_the_tree() -> None:
    assert ConfigErrorFromConfig is ConfigError
    assert not issubclass(ConfigError, InvalidRequest)  # a deployment fault, not a 400
    assert (ConfigError.code, ConfigError.http_status, ConfigError.retryable) == (
        "invalid_config", 500, False,
    )
    assert ERRORS_BY_CODE["invalid_config"] is ConfigError
