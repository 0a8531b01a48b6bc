"""The operation registry's pure core: what a worker declares, and a view of all declarations.

Every worker puts one entry per op it serves into the `nexus_ops` KV bucket, under the key
`<op>.<instance>`, at start (before it subscribes) and again every `registry.heartbeat_s`;
on a graceful stop it puts the same entry with `state: "stopped"`. The bucket's max age is
`registry.forget_after_s`, so an entry nobody refreshes disappears after that.

From those entries a `RegistryView` answers two questions:

- Is `op.action` declared? (Any entry of the op, serving or stopped, younger than
  `forget_after_s`, lists the action.) This decides `404 unknown_operation` against
  `503 no_responders` when a request finds no responders.
- Is the op served now? (Some entry says `serving` and was refreshed within three
  heartbeats.) `GET /v1/ops` and `nexus-bus ops` show it.

Each declared action also carries what its worker enforces (rate limit, idempotency keys);
the listing adds the answering process's gateway policy beside it (`policies.py`).

No I/O here: time comes in as epoch seconds (the entries' server timestamps and `clock`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import msgspec

from nexus_bus.operations import Operations
from nexus_bus.registry.policies import DeclaredPolicyOf, PolicyOf
from nexus_bus.schemas.registry import (
    ActionDeclaration,
    ActionPolicy,
    Declaration,
    OperationListing,
    OperationsListing,
    WorkerState,
)
from nexus_bus.specs import json_schemas

LIVE_BEATS: Final = 3  # heartbeats an instance may miss before it counts as gone
_INSTANCE: Final = re.compile(r"[A-Za-z0-9_-]{1,96}")

State = WorkerState
__all__ = [
    "ActionDeclaration",
    "Declaration",
    "OperationListing",
    "OperationsListing",
    "RegistryView",
    "State",
    "declare",
    "decode",
    "encode",
    "entry_key",
    "instance_id",
]


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Declaration)


def entry_key(op: str, instance: str) -> str:
    """The KV key of one worker's entry for `op`.

    Raises:
        ValueError: an instance id with characters KV keys or our parsing do not allow.
    """
    if not _INSTANCE.fullmatch(instance):
        raise ValueError(f"invalid instance id {instance[:100]!r}")
    return f"{op}.{instance}"


def instance_id(host: str, pid: int, suffix: str) -> str:
    """A worker instance id readable by operators: host, pid and a random suffix."""
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", host)[:48] or "host"
    return f"{clean}-{pid}-{suffix}"


def declare(
    group: Operations,
    instance: str,
    *,
    heartbeat_s: float,
    version: str = "",
    policies: DeclaredPolicyOf | None = None,
) -> Declaration:
    """The entry a worker serving `group` puts into the registry.

    Args:
        policies: what this worker enforces per op.action (`policies.worker_policies`).
    """
    documents = json_schemas([group])
    actions = [
        ActionDeclaration(
            action=o.action,
            scope=o.scope,
            public=o.public,
            idempotent=o.idempotent,
            description=o.description,
            schema=documents.get(f"{o.op}.{o.action}"),
            policy=ActionPolicy(worker=policies(o.op, o.action)) if policies else None,
        )
        for o in sorted(group, key=lambda o: o.action)
    ]
    return Declaration(
        op=group.op,
        instance=instance,
        heartbeat_s=heartbeat_s,
        description=group.description,
        version=version,
        actions=actions,
    )


def encode(declaration: Declaration) -> bytes:
    """The entry's value in the bucket (JSON)."""
    return _encoder.encode(declaration)


def decode(value: bytes) -> Declaration | None:
    """An entry's value, or None when it is not a declaration (never trusted blindly)."""
    try:
        return _decoder.decode(value)
    except msgspec.DecodeError:
        return None


@dataclass(frozen=True, slots=True)
class _Seen:
    declaration: Declaration
    at: float  # epoch seconds the server stored the entry


class RegistryView:
    """All declarations of a deployment, as last seen; answers from memory."""

    def __init__(self, *, forget_after_s: float, clock: Callable[[], float] = time.time) -> None:
        """Args: forget_after_s: entries older than this are ignored (the bucket's max age)."""
        self._forget_after_s = forget_after_s
        self._clock = clock
        self._ops: dict[str, dict[str, _Seen]] = {}

    def apply(self, key: str, value: bytes | None, at: float) -> bool:
        """Record a put (`value`) or a delete/purge (None) of `key`; False: not an entry."""
        op, dot, instance = key.partition(".")
        if not dot or not op or not instance:
            return False
        if value is None:
            instances = self._ops.get(op)
            if instances is not None:
                instances.pop(instance, None)
                if not instances:
                    del self._ops[op]
            return True
        declaration = decode(value)
        if declaration is None or declaration.op != op or declaration.instance != instance:
            return False
        self._ops.setdefault(op, {})[instance] = _Seen(declaration, at)
        return True

    def clear(self) -> None:
        """Forget everything (before reading the bucket again from the start)."""
        self._ops.clear()

    def _current(self, op: str) -> list[_Seen]:
        """The op's entries younger than `forget_after_s`; older ones are dropped for good
        (every worker restart adds an instance, so a long-lived view must shed them)."""
        instances = self._ops.get(op)
        if not instances:
            return []
        oldest = self._clock() - self._forget_after_s
        for instance in [i for i, seen in instances.items() if seen.at < oldest]:
            del instances[instance]
        if not instances:
            del self._ops[op]
        return list(instances.values())

    def declares(self, op: str, action: str) -> bool:
        """Whether some worker declared `op.action` (serving now or not)."""
        return any(
            a.action == action for seen in self._current(op) for a in seen.declaration.actions
        )

    def serving(self, op: str) -> int:
        """How many instances serve `op` now (refreshed within `LIVE_BEATS` heartbeats)."""
        now = self._clock()
        return sum(
            1
            for seen in self._current(op)
            if seen.declaration.state == "serving"
            and now - seen.at <= LIVE_BEATS * seen.declaration.heartbeat_s
        )

    def listing(
        self, known: Iterable[Operations] = (), *, gateway: PolicyOf | None = None
    ) -> OperationsListing:
        """Every declared op, sorted, plus `known` groups no worker has registered.

        Args:
            known: groups the answering process knows itself.
            gateway: the answering process's gateway policy per op.action; each action's
                `policy` then shows it beside what the workers declared (None: actions as
                declared).
        """
        listed: dict[str, OperationListing] = {}
        for op in sorted(self._ops):  # a copy: `_current` drops forgotten ops
            current = sorted(self._current(op), key=lambda s: s.at)
            if not current:
                continue
            actions: dict[str, ActionDeclaration] = {}
            for seen in current:  # the newest entry's word on an action wins
                actions.update((a.action, a) for a in seen.declaration.actions)
            instances = self.serving(op)
            listed[op] = OperationListing(
                op=op,
                description=current[-1].declaration.description,
                served=instances > 0,
                instances=instances,
                declared_by="registry",
                actions=[_with_gateway(actions[name], op, gateway) for name in sorted(actions)],
            )
        for group in known:
            if group.op not in listed and len(group):
                code = declare(group, "code", heartbeat_s=1.0)
                listed[group.op] = OperationListing(
                    op=group.op,
                    description=group.description,
                    served=False,
                    instances=0,
                    declared_by="code",
                    actions=[_with_gateway(a, group.op, gateway) for a in code.actions],
                )
        return OperationsListing(operations=[listed[op] for op in sorted(listed)])


def _with_gateway(
    action: ActionDeclaration, op: str, gateway: PolicyOf | None
) -> ActionDeclaration:
    """`action` with the gateway half of its policy filled in (the worker half kept)."""
    if gateway is None:
        return action
    worker = action.policy.worker if action.policy is not None else None
    policy = ActionPolicy(gateway=gateway(op, action.action), worker=worker)
    return msgspec.structs.replace(action, policy=policy)
