"""The operation registry's pure core: declarations, the view, liveness and forgetting."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from nexus_bus import Operations, RequestContext
from nexus_bus.registry import RegistryView, declare
from nexus_bus.registry.core import decode, encode, entry_key, instance_id

orders = Operations("orders", description="Orders.")


class Create(msgspec.Struct, frozen=True, kw_only=True):
    """A new order."""

    sku: str


@orders.action("create", idempotent=False)
async def create(req: Create, ctx: RequestContext) -> dict[str, Any]:
    """Create an order."""
    return {}


@orders.action("ping", public=True)
async def ping(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    """Public ping."""
    return {}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def put(view: RegistryView, instance: str, at: float, state: str = "serving") -> None:
    entry = declare(orders, instance, heartbeat_s=10.0)
    entry = msgspec.structs.replace(entry, state=state)  # type: ignore[arg-type]
    assert view.apply(entry_key("orders", instance), encode(entry), at)


def test_a_declaration_carries_scopes_flags_and_schemas() -> None:
    entry = decode(encode(declare(orders, "w-1", heartbeat_s=5.0, version="1.2")))
    assert entry is not None and entry.op == "orders" and entry.version == "1.2"
    create_, ping_ = entry.actions
    assert (create_.action, create_.scope, create_.idempotent) == ("create", "orders:create", False)
    assert ping_.public and ping_.scope == "orders:ping"
    assert create_.schema is not None
    assert create_.schema["$defs"]["request"]["$ref"].endswith("Create")


def test_declared_served_stopped_and_forgotten() -> None:
    clock = Clock()
    view = RegistryView(forget_after_s=3600, clock=clock)
    assert not view.declares("orders", "create")
    put(view, "w-1", clock.now)
    assert view.declares("orders", "create") and view.declares("orders", "ping")
    assert not view.declares("orders", "nosuch") and not view.declares("other", "create")
    assert view.serving("orders") == 1
    clock.now += 31  # three heartbeats of 10 s missed: gone, but still declared
    assert view.serving("orders") == 0 and view.declares("orders", "create")
    put(view, "w-2", clock.now, state="stopped")
    assert view.serving("orders") == 0 and view.declares("orders", "create")
    clock.now += 3601  # nobody refreshed anything for forget_after_s: unknown
    assert not view.declares("orders", "create")
    assert view.listing().operations == []


def test_deletes_and_malformed_entries() -> None:
    view = RegistryView(forget_after_s=3600, clock=Clock())
    put(view, "w-1", Clock().now)
    assert not view.apply("orders.w-9", b"{not json", 0)
    assert not view.apply("noinstance", b"{}", 0)
    other = encode(declare(orders, "w-2", heartbeat_s=1))
    assert not view.apply("orders.w-3", other, 0)  # the key must match its entry
    assert view.apply("orders.w-1", None, 0)
    assert not view.declares("orders", "create")


def test_listing_merges_instances_and_adds_known_groups() -> None:
    clock = Clock()
    view = RegistryView(forget_after_s=3600, clock=clock)
    put(view, "w-1", clock.now - 100)  # stale
    put(view, "w-2", clock.now)
    billing = Operations("billing")

    @billing.action("charge")
    async def charge(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        return {}

    listed = view.listing([orders, billing]).operations
    assert [(o.op, o.served, o.instances, o.declared_by) for o in listed] == [
        ("billing", False, 0, "code"),
        ("orders", True, 1, "registry"),
    ]
    assert [a.action for a in listed[1].actions] == ["create", "ping"]


def test_keys_and_instance_ids_are_safe() -> None:
    instance = instance_id("my host.example/x", 42, "ab12")
    assert instance == "my_host_example_x-42-ab12"
    assert entry_key("orders", instance) == "orders.my_host_example_x-42-ab12"
    with pytest.raises(ValueError):
        entry_key("orders", "a.b")


def test_forgotten_entries_leave_memory() -> None:
    clock = Clock()
    view = RegistryView(forget_after_s=60, clock=clock)
    for n in range(50):  # fifty worker restarts
        put(view, f"w-{n}", clock.now)
    clock.now += 61
    put(view, "w-new", clock.now)
    view.listing()
    assert view.serving("orders") == 1
    assert list(view._ops["orders"]) == ["w-new"]
