"""Opening NATS connections with the project's security and reconnect settings.

One place builds the options, so the gateway, workers and shim connect alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client

from nexus_bus.config import NatsSettings, TLSSettings
from nexus_bus.errors import Unavailable
from nexus_bus.observability import METRICS, logger

if TYPE_CHECKING:
    from faststream.nats.security import NatsSecurity


def tls_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """An SSL context from configured files, or None when TLS is not configured."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def round_trip(nc: Client, timeout_s: float = 10.0) -> None:
    """Return once a message this connection published has come back to it through the
    server: every command written before it (a fresh SUB included) has been processed,
    since the server handles a connection's commands in order, and the connection's read
    loop runs.

    Not nats-py's `flush()`, for two reasons. Its PING goes straight onto the socket while
    earlier commands may still wait in the client's pending buffer, so its PONG can come back
    before the server has seen a SUB. And a flush that times out, or is cancelled, leaves its
    PONG's future cancelled in nats-py's queue: when that PONG arrives, the read loop stops
    for good (`InvalidStateError`), and the connection stays "connected", hears nothing, and
    passes every later flush. A round trip given up here leaves nothing behind: its own
    subscription is removed. (It needs the server's echo of a connection's own messages,
    which nats-py's `no_echo` would turn off; the gateway never sets it.)

    Raises:
        nats.errors.TimeoutError: nothing came back within `timeout_s`.
        nats.errors.Error: the connection is closed.
    """
    sub = await nc.subscribe(nc.new_inbox())
    try:
        await nc.publish(sub.subject, b"")
        await sub.next_msg(timeout=timeout_s)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


def nats_options(
    settings: NatsSettings,
    *,
    name: str | None = None,
    reconnected: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `nats.connect` (and FastStream's `NatsBroker`).

    `reconnected` is called after each reconnect (the shim's event streams replace their
    consumers, which a restarted server has lost)."""

    async def on_reconnect() -> None:
        METRICS.nats_reconnects.inc()
        logger.warning("nats reconnected")
        if reconnected is not None:
            reconnected()

    async def on_disconnect() -> None:
        logger.info("nats disconnected")

    async def on_error(exc: Exception) -> None:
        logger.warning("nats connection error: {}", exc)

    opts: dict[str, Any] = {
        "servers": settings.servers,
        "name": name or settings.name,
        "connect_timeout": settings.connect_timeout_s,
        "reconnect_time_wait": settings.reconnect_wait_s,
        "max_reconnect_attempts": settings.max_reconnect_attempts,
        "ping_interval": settings.ping_interval_s,
        "max_outstanding_pings": settings.max_outstanding_pings,
        "pending_size": settings.pending_size_bytes,
        "reconnected_cb": on_reconnect,
        "disconnected_cb": on_disconnect,
        "error_cb": on_error,
    }
    if settings.user:
        opts["user"] = settings.user
    if settings.password:
        opts["password"] = settings.password.get_secret_value()
    if settings.token:
        opts["token"] = settings.token.get_secret_value()
    if settings.creds_file:
        opts["user_credentials"] = str(settings.creds_file)
    if settings.nkey_seed_file:
        opts["nkeys_seed"] = str(settings.nkey_seed_file)
    ctx = tls_context(settings.tls)
    if ctx is not None:
        opts["tls"] = ctx
    return opts


_SECURITY_OPTIONS = ("user", "password", "token", "user_credentials", "nkeys_seed", "tls")


def broker_security(settings: NatsSettings) -> NatsSecurity | None:
    """The same credentials and TLS as one FastStream security object.

    FastStream's `NatsBroker` refuses nats-py's `user`/`password`/`tls` keywords and takes one
    security object, so one method wins: credentials file, then NKey seed, then user and
    password, then token (configure only one). TLS travels with any of them.
    """
    # Imported here: FastStream takes a third of a second to import, and only workers need
    # it; a one-shot `nexus-bus call` must not pay for it.
    from faststream.nats.security import (
        NatsCredentials,
        NatsNKey,
        NatsSecurity,
        NatsToken,
        NatsUserPassword,
    )

    ctx = tls_context(settings.tls)
    if settings.creds_file:
        return NatsCredentials(str(settings.creds_file), ssl_context=ctx)
    if settings.nkey_seed_file:
        return NatsNKey.from_file(settings.nkey_seed_file, ssl_context=ctx)
    if settings.user:
        password = settings.password.get_secret_value() if settings.password else ""
        return NatsUserPassword(settings.user, password, ssl_context=ctx)
    if settings.token:
        return NatsToken(settings.token.get_secret_value(), ssl_context=ctx)
    return NatsSecurity(ssl_context=ctx) if ctx is not None else None


def broker_options(
    settings: NatsSettings,
    *,
    name: str | None = None,
    reconnected: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for FastStream's `NatsBroker`: `nats_options` with `security=`."""
    opts = {k: v for k, v in nats_options(settings, name=name, reconnected=reconnected).items()
            if k not in _SECURITY_OPTIONS}
    opts["security"] = broker_security(settings)
    return opts


async def connect_nats(
    settings: NatsSettings,
    *,
    name: str | None = None,
    reconnected: Callable[[], None] | None = None,
) -> Client:
    """Connect to NATS (`reconnected`: see `nats_options`).

    The first connect is retried for `initial_connect_timeout_s`, or only for
    `initial_refused_timeout_s` while every attempt is refused (nothing listens there: a
    one-shot command's case). Its failed attempts are logged at INFO, not as the connection
    errors of a connection that was up (WARNING); the error raised names the last one's cause.

    Raises:
        Unavailable: no server answered in time; its cause is the last attempt's error.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    opts = nats_options(settings, name=name, reconnected=reconnected)
    connected_error_cb = opts["error_cb"]
    connected = False
    last: Exception | None = None  # the first connect's latest failed attempt
    refused_only = True  # and every one so far refused
    # With unlimited reconnects nats-py also retries the *first* connect forever: a
    # wrong URL or credential would hang the process instead of failing it.
    deadline = asyncio.timeout(settings.initial_connect_timeout_s)

    async def on_error(exc: Exception) -> None:
        nonlocal last, refused_only
        if connected:
            await connected_error_cb(exc)
            return
        last = exc
        refused_only = refused_only and isinstance(exc, ConnectionRefusedError)
        logger.info("nats connect attempt failed: {}", exc)
        give_up_s = settings.initial_refused_timeout_s
        if (give_up_s is not None and refused_only and not deadline.expired()
                and loop.time() - started >= give_up_s):
            deadline.reschedule(loop.time())

    opts["error_cb"] = on_error
    try:
        async with deadline:
            nc = await nats.connect(**opts)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        cause = last or exc
        raise Unavailable(f"cannot connect to NATS at {settings.url}: {describe(cause)}") \
            from cause
    connected = True
    install_speedups(nc, settings)
    return nc


def describe(error: Exception) -> str:
    """A failed connect in words: "connection refused", not `[Errno 111] ...`."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or repr(error)


def install_speedups(nc: Client, settings: NatsSettings) -> None:
    """The opt-in speedups on `nc` when `settings.speedups` is on (docs/runtime.md)."""
    if settings.speedups:
        # Imported only when asked for: off by default, nothing of it loads.
        from nexus_bus.bus import _speedups

        _speedups.install(nc)
