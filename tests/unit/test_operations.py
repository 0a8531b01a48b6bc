import msgspec
import pytest

from nexus_bus import Operations, RequestContext


class Ping(msgspec.Struct):
    n: int


class Pong(msgspec.Struct):
    n: int


class StrictPing(msgspec.Struct, forbid_unknown_fields=True):
    """Strict as declared; an action may still accept unknown fields."""

    n: int


def test_types_are_read_from_annotations() -> None:
    ops = Operations("shop")

    @ops.action("ping", public=True)
    async def ping(req: Ping, ctx: RequestContext) -> Pong:
        """Answer."""
        return Pong(n=req.n)

    op = ops.get("ping")
    assert op is not None
    assert (op.reply_type, op.public, op.scope) == (Pong, True, "shop:ping")
    assert issubclass(op.request_type, Ping)  # Ping refusing unknown fields (below)
    assert op.description == "Answer."


def _decode(ops: Operations, action: str, body: bytes) -> object:
    op = ops.get(action)
    assert op is not None
    return msgspec.json.decode(body, type=op.request_type)


def test_unknown_request_fields_are_refused_naming_the_field() -> None:
    ops = Operations("shop")

    @ops.action("ping")
    async def ping(req: Ping, ctx: RequestContext) -> Pong:
        return Pong(n=req.n)

    @ops.action("again")
    async def again(req: Ping, ctx: RequestContext) -> Pong:
        return Pong(n=req.n)

    decoded = _decode(ops, "ping", b'{"n": 1}')
    assert isinstance(decoded, Ping) and decoded.n == 1 and repr(decoded) == "Ping(n=1)"
    strict = Operations("shop2")

    @strict.action("ping")
    async def ping2(req: StrictPing, ctx: RequestContext) -> Pong:
        return Pong(n=req.n)

    assert strict.get("ping").request_type is StrictPing  # type: ignore[union-attr]  # as declared
    with pytest.raises(msgspec.ValidationError, match="unknown field `role`"):
        _decode(ops, "ping", b'{"n": 1, "role": "admin"}')
    # One class, one type: the generated schemas see a single `Ping`.
    assert ops.get("ping").request_type is ops.get("again").request_type  # type: ignore[union-attr]
    schema = msgspec.json.schema(ops.get("ping").request_type)  # type: ignore[union-attr]
    assert schema["$defs"]["Ping"]["additionalProperties"] is False


def test_an_action_may_accept_unknown_fields() -> None:
    ops = Operations("shop")

    @ops.action("ping", allow_unknown_fields=True)
    async def ping(req: Ping, ctx: RequestContext) -> Pong:
        return Pong(n=req.n)

    @ops.action("strictish", allow_unknown_fields=True)
    async def strictish(req: StrictPing, ctx: RequestContext) -> Pong:
        return Pong(n=req.n)

    @ops.action("raw")
    async def raw(req: dict[str, int], ctx: RequestContext) -> Pong:
        return Pong(n=req["n"])

    assert ops.get("ping").request_type is Ping  # type: ignore[union-attr]
    assert _decode(ops, "ping", b'{"n": 1, "role": "admin"}') == Ping(n=1)
    loosened = _decode(ops, "strictish", b'{"n": 2, "extra": 0}')
    assert isinstance(loosened, StrictPing) and loosened.n == 2
    assert _decode(ops, "raw", b'{"n": 3, "extra": 0}') == {"n": 3, "extra": 0}


def test_registration_errors() -> None:
    ops = Operations("shop")
    with pytest.raises(ValueError):

        @ops.action("sync")
        def not_async(req: Ping, ctx: RequestContext) -> Pong:  # type: ignore[misc]
            return Pong(n=1)

    @ops.action("a")
    async def a(req: Ping, ctx: RequestContext) -> Pong:
        return Pong(n=1)

    with pytest.raises(ValueError):
        ops.action("a")(a)
    for reserved in ("jobs", "sys", "auth", "Bad.Name"):
        with pytest.raises(ValueError):
            Operations(reserved)
