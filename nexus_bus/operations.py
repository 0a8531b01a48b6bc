"""Declaring operations: a group per op, one async function per action.

    ops = Operations("orders")

    @ops.action("create", idempotent=False)
    async def create(req: CreateOrder, ctx: RequestContext) -> OrderCreated:
        ...

The request and reply types are read from the function's annotations (msgspec Structs or
any type msgspec can decode).

A request body with a field its Struct does not declare is refused (400 `invalid_request`
naming the field): a misspelt optional field would otherwise be dropped without a word, and
a client could not tell `{"role": "admin"}` was ignored. An action that wants extras passes
`allow_unknown_fields=True`. The rule applies to the request Struct itself; Structs nested
in it follow their own `forbid_unknown_fields` setting.

A declaration the runtime could not serve (a name that is not a subject token, a function that
is not `async` or cannot take `(request, ctx)`, a type with no JSON form, a timeout that is
not a positive integer number of milliseconds) raises `DeclarationError` when your module runs, not
at the first request; `nexus-bus worker --app` prints it in one line.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from nexus_bus.bus.subjects import check_token
from nexus_bus.constants import BUILTIN_RESERVED_OPS, RESERVED_OPS

Handler = Callable[[Any, Any], Awaitable[Any]]


class DeclarationError(ValueError):
    """An op or action declared so that it could not be served; names it and what is wrong."""


def _check_name(value: str, what: str) -> None:
    try:
        check_token(value, what)
    except ValueError:
        raise DeclarationError(
            f"{what} name {value!r}: use lowercase letters, digits, '_' and '-', starting with"
            " a letter, at most 64 characters (it is a NATS subject token)"
        ) from None


def _check_type(name: str, which: str, type_: Any) -> None:
    """Refuse a type msgspec cannot describe: it could not be decoded, encoded or exported."""
    try:
        msgspec.json.schema_components([type_])
    except (TypeError, ValueError) as exc:
        last = str(exc).strip().splitlines()[-1]
        raise DeclarationError(f"{name}: {which} type {type_!r} has no JSON form: {last}") from None


def _check_timeout(name: str, timeout_ms: object) -> None:
    if timeout_ms is None:
        return
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
        raise DeclarationError(
            f"{name}: timeout_ms={timeout_ms!r}: expected a positive integer number of milliseconds"
        )


def _check_flags(name: str, **flags: object) -> None:
    # A truthy non-bool would be served as True, but the registry entry holding it would not
    # decode for its readers: the op would vanish from listings, and be a 404, not a 503.
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise DeclarationError(f"{name}: {flag}={value!r}: expected True or False")


def _signature_types(name: str, fn: Handler) -> tuple[Any, Any]:
    """The request and reply types of `fn`, which must take `(request, ctx)`."""
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise DeclarationError(
            f"{name}: the handler must take two arguments (request, ctx)"
        ) from None
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # NameError, or whatever evaluating an annotation raised
        raise DeclarationError(f"{name}: cannot resolve its type annotations: {exc}") from None
    params = list(inspect.signature(fn).parameters)
    return hints.get(params[0], Any), hints.get("return", Any)


def check_distinct(groups: Iterable[Operations]) -> None:
    """Refuse two groups with the same op: one process serves one group per op.

    Raises:
        DeclarationError: naming the op.
    """
    seen: set[str] = set()
    for group in groups:
        if group.op in seen:
            raise DeclarationError(
                f"op {group.op!r} is declared by two groups; one worker serves one group per op"
                " (built-in ops included): rename one, or merge their actions"
            )
        seen.add(group.op)


@functools.cache
def with_unknown_fields(request_type: Any, *, forbid: bool) -> Any:
    """`request_type`, refusing (or accepting) fields it does not declare.

    A msgspec Struct whose `forbid_unknown_fields` differs is replaced by a subclass that only
    changes that setting: same name, module and docstring (so the generated schemas read the
    same, with `additionalProperties: false` when forbidding), and every decoded request is
    still an instance of the declared class. Cached, so one class gives one type everywhere.
    Any other type is returned as it is.
    """
    if not (isinstance(request_type, type) and issubclass(request_type, msgspec.Struct)):
        return request_type
    if request_type.__struct_config__.forbid_unknown_fields == forbid:
        return request_type
    names = {
        "__module__": request_type.__module__,
        "__qualname__": request_type.__qualname__,
        "__doc__": request_type.__doc__,
    }
    return type(request_type.__name__, (request_type,), names, forbid_unknown_fields=forbid)


@dataclass(frozen=True, slots=True)
class Operation:
    """One registered action of an op, with everything the runtime needs to serve it."""

    op: str
    action: str
    handler: Handler
    request_type: Any
    reply_type: Any
    public: bool = False
    idempotent: bool = True
    timeout_ms: int | None = None
    description: str = ""

    @property
    def scope(self) -> str:
        """The scope a token needs for this operation (`op:action`)."""
        return f"{self.op}:{self.action}"


class Operations:
    """The actions of one op; workers serve each group in its own queue group."""

    def __init__(self, op: str, *, description: str = "", _builtin: bool = False) -> None:
        _check_name(op, "op")
        if op in RESERVED_OPS and not (_builtin and op in BUILTIN_RESERVED_OPS):
            raise DeclarationError(f"op {op!r} is reserved for nexus-bus")
        if not isinstance(description, str):
            raise DeclarationError(f"op {op!r}: description={description!r}: expected a str")
        self.op = op
        self.description = description
        self._actions: dict[str, Operation] = {}

    def action(
        self,
        name: str,
        *,
        public: bool = False,
        idempotent: bool = True,
        timeout_ms: int | None = None,
        allow_unknown_fields: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Register an async function `(request, ctx) -> reply` as action `name`.

        Args:
            name: the action token.
            public: serve it without a token. Nothing is public unless marked so.
            idempotent: whether a retry of the same request is safe without an idempotency key.
            timeout_ms: a cap on the handler's time, below the caller's own budget.
            allow_unknown_fields: accept request fields the request Struct does not declare
                (they are dropped); by default they are a 400 naming the field.

        Raises:
            DeclarationError: a bad name, flag or timeout, a duplicate, a function that is not
                `async` or cannot take `(request, ctx)`, or a type with no JSON form.
        """
        if callable(name):  # `@ops.action` on its own: the function came as the name
            fn_name = getattr(name, "__name__", "x")
            raise DeclarationError(
                f"{self.op}.{fn_name}: the action needs its name: @ops.action(\"{fn_name}\"),"
                " not @ops.action"
            )
        _check_name(name, f"{self.op}: action")
        full = f"{self.op}.{name}"
        _check_timeout(full, timeout_ms)
        _check_flags(
            full, public=public, idempotent=idempotent, allow_unknown_fields=allow_unknown_fields
        )

        def register(fn: Handler) -> Handler:
            if not inspect.iscoroutinefunction(fn):
                raise DeclarationError(f"{full}: the handler must be an async function")
            if name in self._actions:
                raise DeclarationError(f"{full} is registered twice")
            request_type, reply_type = _signature_types(full, fn)
            _check_type(full, "request", request_type)
            _check_type(full, "reply", reply_type)
            self._actions[name] = Operation(
                op=self.op,
                action=name,
                handler=fn,
                request_type=with_unknown_fields(request_type, forbid=not allow_unknown_fields),
                reply_type=reply_type,
                public=public,
                idempotent=idempotent,
                timeout_ms=timeout_ms,
                description=inspect.getdoc(fn) or "",
            )
            return fn

        return register

    def get(self, action: str) -> Operation | None:
        """The operation registered as `action`, if any."""
        return self._actions.get(action)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self._actions.values())

    def __len__(self) -> int:
        return len(self._actions)
