import msgspec
import pytest

from nexus_bus import Operations, RequestContext


class Ping(msgspec.Struct):
    n: int


class Pong(msgspec.Struct):
    n: int


def test_types_are_read_from_annotations() -> None:
    ops = Operations("shop")

    @ops.action("ping", public=True)
    async def ping(req: Ping, ctx: RequestContext) -> Pong:
        """Answer."""
        return Pong(n=req.n)

    op = ops.get("ping")
    assert op is not None
    assert (op.request_type, op.reply_type, op.public, op.scope) == (Ping, Pong, True, "shop:ping")
    assert op.description == "Answer."


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
