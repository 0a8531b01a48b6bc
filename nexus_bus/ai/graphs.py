"""`ai.run`: LangGraph graphs registered by the user, whose nodes call operations over the bus.

    # mypkg/flows.py
    graphs = GraphRegistry()

    @graphs.graph("answer")
    def build_answer():            # called once per worker, on first use
        ...                        # a LangGraph StateGraph
        return builder.compile()

    NEXUS_AI__GRAPHS='["mypkg.flows:graphs"]'

A node reaches the bus through its config: `bus = bus_of(config)`, then
`await bus.call("data", "get", {"key": ...})`. Every call carries the caller's own token,
request id and remaining deadline, so the token service checks each tool call exactly as if
the caller had made it: a token without `data:get` gets 403 inside the run.

nexus-bus does not import LangGraph: a graph is anything with LangGraph's
`astream(input, config, stream_mode=[...])` (the `nexus-bus[ai-graph]` extra installs it).
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from nexus_bus.constants import H_AUTHORIZATION
from nexus_bus.context import RequestContext
from nexus_bus.errors import NexusError, NotFound

BUS_KEY: Final = "nexus_bus"
_BEARER: Final = "bearer "


class RunnableGraph(Protocol):
    """What `ai.run` needs of a compiled LangGraph graph."""

    def astream(
        self, input: Any, config: Any = None, *, stream_mode: Any = None
    ) -> AsyncIterator[Any]:
        """Run the graph, yielding `(mode, chunk)` pairs for a list of modes."""
        ...


GraphFactory = Callable[[], RunnableGraph]


class GraphRegistry:
    """Named graph factories, built once per worker on first use."""

    def __init__(self) -> None:
        self._factories: dict[str, GraphFactory] = {}
        self._built: dict[str, RunnableGraph] = {}

    def graph(self, name: str) -> Callable[[GraphFactory], GraphFactory]:
        """Register a function returning a compiled graph as `name`.

        Raises:
            ValueError: a duplicate name.
        """

        def register(factory: GraphFactory) -> GraphFactory:
            if name in self._factories:
                raise ValueError(f"graph {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return register

    def merge(self, other: GraphRegistry) -> None:
        """Add another registry's graphs.

        Raises:
            ValueError: a name both have.
        """
        for name, factory in other._factories.items():
            self.graph(name)(factory)

    def get(self, name: str) -> RunnableGraph:
        """The graph `name`, built on first use.

        Raises:
            NotFound: no such graph.
        """
        if name not in self._built:
            factory = self._factories.get(name)
            if factory is None:
                known = ", ".join(sorted(self._factories)) or "none (set NEXUS_AI__GRAPHS)"
                raise NotFound(f"no graph {name!r}; registered: {known}")
            self._built[name] = factory()
        return self._built[name]


def load_graphs(refs: list[str]) -> GraphRegistry:
    """One registry from `module:attribute` references (as `--app` for operations).

    Raises:
        ValueError: a reference that does not import or is not a `GraphRegistry`.
    """
    registry = GraphRegistry()
    for ref in refs:
        module_name, _, attr = ref.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), attr or "graphs")
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"ai.graphs: cannot load {ref}: {exc}") from exc
        if not isinstance(found, GraphRegistry):
            raise ValueError(f"ai.graphs: {ref} is not a GraphRegistry")
        registry.merge(found)
    return registry


class Caller(Protocol):
    """The gateway's request method, as the bus tools use it."""

    async def request(
        self, op: str, action: str, payload: Any = None, *, token: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the budget travels with the call
        request_id: str | None = None,
    ) -> Any:
        """Call an operation; raises its `NexusError`."""
        ...


@dataclass(slots=True)
class GraphBus:
    """Operations over the bus on behalf of the caller of one `ai.run`.

    Attributes:
        ctx: the `ai.run` request (its token, request id and deadline are reused).
        gateway: the worker's gateway client.
        last_call: the `op.action` of the latest call (names the one that failed).
    """

    ctx: RequestContext
    gateway: Caller
    last_call: str | None = None

    @property
    def token(self) -> str | None:
        """The caller's bearer token (never logged)."""
        value = self.ctx.headers.get(H_AUTHORIZATION, "")
        return value[len(_BEARER):] if value.lower().startswith(_BEARER) else None

    async def call(self, op: str, action: str, payload: Any = None) -> Any:
        """Call `op.action` as the caller, within the run's remaining time.

        Raises:
            NexusError: the operation's error (403 when the caller's token lacks its scope).
        """
        self.last_call = f"{op}.{action}"
        return await self.gateway.request(
            op, action, payload, token=self.token,
            timeout=max(0.001, self.ctx.remaining_s()), request_id=self.ctx.request_id,
        )


def bus_of(config: Mapping[str, Any]) -> GraphBus:
    """The `GraphBus` of the run a node belongs to (from LangGraph's `config`).

    Raises:
        LookupError: the graph is not running under `ai.run`.
    """
    bus = (config.get("configurable") or {}).get(BUS_KEY)
    if not isinstance(bus, GraphBus):
        raise LookupError("not running under ai.run: no nexus bus in the graph's config")
    return bus


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What a run did: its last state, the nodes in order, and the error that ended it
    (with the operation call that raised it, when a call did)."""

    output: dict[str, Any]
    steps: list[str]
    error: NexusError | None = None
    failed_call: str | None = None


async def run_graph(
    graph: RunnableGraph,
    bus: GraphBus,
    state: dict[str, Any],
    on_step: Callable[[str, Any], Any] | None = None,
) -> RunOutcome:
    """Run `graph` from `state`; a `NexusError` from a node ends the run and is reported.

    Args:
        on_step: awaited with (node, update) after each node (e.g. to publish an event).
    """
    config = {"configurable": {BUS_KEY: bus}}
    steps: list[str] = []
    try:
        async for mode, chunk in graph.astream(state, config, stream_mode=["updates", "values"]):
            if mode == "values" and isinstance(chunk, dict):
                state = chunk
            elif mode == "updates" and isinstance(chunk, dict):
                for node, update in chunk.items():
                    steps.append(node)
                    if on_step is not None:
                        await on_step(node, update)
    except NexusError as exc:
        return RunOutcome(output=state, steps=steps, error=exc, failed_call=bus.last_call)
    return RunOutcome(output=state, steps=steps)
