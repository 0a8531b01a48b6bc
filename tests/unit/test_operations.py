import re

import msgspec
import pytest

from nexus_bus import Operations, RequestContext
from nexus_bus.config import load_settings
from nexus_bus.operations import DeclarationError, check_distinct
from nexus_bus.runtime.worker import Worker


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


class Plain:
    """Not a type msgspec can decode, encode or describe."""

    def __init__(self, n: int) -> None:
        self.n = n


async def _no_args() -> Pong:
    return Pong(n=0)


async def _one_arg(req: Ping) -> Pong:
    return Pong(n=req.n)


async def _plain_request(req: Plain, ctx: RequestContext) -> Pong:
    return Pong(n=req.n)


async def _plain_reply(req: Ping, ctx: RequestContext) -> Plain:
    return Plain(req.n)


async def _unresolvable(req: "Missing", ctx: RequestContext) -> Pong:  # type: ignore[name-defined]  # noqa: F821
    return Pong(n=0)


async def _fine(req: Ping, ctx: RequestContext) -> Pong:
    return Pong(n=req.n)


@pytest.mark.parametrize(
    ("declare", "said"),
    [
        (lambda ops: ops.action("go")(_no_args),
         "shop.go: the handler must take two arguments (request, ctx)"),
        (lambda ops: ops.action("go")(_one_arg),
         "shop.go: the handler must take two arguments (request, ctx)"),
        (lambda ops: ops.action("go")(_plain_request),
         f"shop.go: request type {Plain!r} has no JSON form"),
        (lambda ops: ops.action("go")(_plain_reply),
         f"shop.go: reply type {Plain!r} has no JSON form"),
        (lambda ops: ops.action("go")(_unresolvable),
         "shop.go: cannot resolve its type annotations: name 'Missing' is not defined"),
        (lambda ops: ops.action("go", timeout_ms=0)(_fine),
         "shop.go: timeout_ms=0: expected a positive integer number of milliseconds"),
        (lambda ops: ops.action("go", timeout_ms=-5)(_fine), "shop.go: timeout_ms=-5"),
        (lambda ops: ops.action("go", timeout_ms="1000")(_fine), "shop.go: timeout_ms='1000'"),
        (lambda ops: ops.action("go", timeout_ms=True)(_fine), "shop.go: timeout_ms=True"),
        (lambda ops: ops.action("Go")(_fine), "shop: action name 'Go': use lowercase"),
        (lambda ops: ops.action("a.b")(_fine), "shop: action name 'a.b'"),
        (lambda ops: ops.action("*")(_fine), "shop: action name '*'"),
        (lambda ops: ops.action(">")(_fine), "shop: action name '>'"),
        (lambda ops: ops.action("prix-ü")(_fine), "shop: action name 'prix-ü'"),
    ],
)
def test_a_declaration_that_cannot_be_served_fails_when_declared(
    declare: object, said: str
) -> None:
    """Before: each of these registered, and failed at every request (a 500 from a handler
    called with the wrong arguments or a type it cannot encode, a 504 at once for
    timeout_ms=0), at the registry's schema export (a traceback at start), or as a bare
    NameError or TypeError from inside nexus-bus."""
    ops = Operations("shop")
    with pytest.raises(DeclarationError) as caught:
        declare(ops)  # type: ignore[operator]
    assert str(caught.value).startswith(said), caught.value
    assert len(ops) == 0


@pytest.mark.parametrize("name", ["my.ops", "Pricing", "*", ">", "prix-ü", ""])
def test_an_op_name_that_is_not_a_subject_token_is_a_declaration_error(name: str) -> None:
    with pytest.raises(DeclarationError, match=re.escape(f"op name {name!r}: use lowercase")):
        Operations(name)



def test_two_groups_with_one_op_are_refused_by_a_worker() -> None:
    """Before: both subscribed in queue group nexus.twin, the dispatcher kept the last group,
    and every request for the first group's actions was 404 unknown_operation."""
    first, second = Operations("twin"), Operations("twin")
    first.action("one")(_fine)
    second.action("two")(_fine)
    with pytest.raises(DeclarationError, match="op 'twin' is declared by two groups"):
        check_distinct([first, second])
    with pytest.raises(DeclarationError, match="op 'twin' is declared by two groups"):
        Worker(load_settings(), [first, second])


def test_an_op_description_that_is_not_text_is_a_declaration_error() -> None:
    with pytest.raises(DeclarationError, match="op 'shop': description=None: expected a str"):
        Operations("shop", description=None)  # type: ignore[arg-type]
