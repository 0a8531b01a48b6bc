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
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from nexus_bus.bus.subjects import check_token
from nexus_bus.constants import BUILTIN_RESERVED_OPS, RESERVED_OPS

Handler = Callable[[Any, Any], Awaitable[Any]]


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
        check_token(op, "op")
        if op in RESERVED_OPS and not (_builtin and op in BUILTIN_RESERVED_OPS):
            raise ValueError(f"op {op!r} is reserved for nexus-bus")
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
            ValueError: a bad name, a duplicate, or a function that is not `async`.
        """
        check_token(name, "action")

        def register(fn: Handler) -> Handler:
            if not inspect.iscoroutinefunction(fn):
                raise ValueError(f"{self.op}.{name}: handler must be an async function")
            if name in self._actions:
                raise ValueError(f"{self.op}.{name} is registered twice")
            hints = typing.get_type_hints(fn)
            params = list(inspect.signature(fn).parameters)
            request_type = hints.get(params[0], Any) if params else Any
            self._actions[name] = Operation(
                op=self.op,
                action=name,
                handler=fn,
                request_type=with_unknown_fields(request_type, forbid=not allow_unknown_fields),
                reply_type=hints.get("return", Any),
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
