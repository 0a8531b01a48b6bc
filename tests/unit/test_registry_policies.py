"""Policies in the operation listing: the gateway half from the answering process, the worker
half from the workers' declarations, and how `nexus-bus ops` prints them."""

from __future__ import annotations

from typing import Any

import msgspec

from nexus_bus import Operations, RequestContext
from nexus_bus.registry import RegistryView, declare
from nexus_bus.registry.commands import duration, format_policies
from nexus_bus.registry.core import encode, entry_key
from nexus_bus.registry.policies import gateway_policies, gateway_policy, worker_policies
from nexus_bus.resilience.policy import PolicySettings, PolicyTable, ResilienceSettings
from nexus_bus.schemas.registry import ActionPolicy, WorkerPolicy

orders = Operations("orders", description="Orders.")


@orders.action("create", idempotent=False)
async def create(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    """Create an order."""
    return {}


@orders.action("show")
async def show(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    """Show an order."""
    return {}


def configured(**ops: PolicySettings) -> ResilienceSettings:
    return ResilienceSettings(ops=dict(ops))


def test_the_gateway_half_is_resolved_per_action_with_the_op_s_breaker() -> None:
    settings = configured(
        orders=PolicySettings(breaker_failures=9, timeout_ms=5000),
        **{
            "orders.show": PolicySettings(
                attempts=5, idempotent=True, cacheable=True, stale_if_error_s=60,
                breaker_failures=99,  # an action's breaker fields are ignored: the op owns it
            )
        },
    )
    table = PolicyTable(settings)
    show_ = gateway_policy(table, "orders", "show")
    assert (show_.timeout_ms, show_.attempts, show_.idempotent) == (5000, 5, True)
    assert (show_.cacheable, show_.stale_if_error_s) == (True, 60.0)
    assert show_.breaker_failures == 9
    create_ = gateway_policy(table, "orders", "create")
    assert (create_.attempts, create_.idempotent, create_.cacheable) == (3, False, False)
    assert (create_.backoff_base_ms, create_.backoff_max_ms, create_.breaker_reset_ms) == (
        50, 1000, 1000
    )
    assert gateway_policies(ResilienceSettings(enabled=False))("orders", "show") is None


def test_the_worker_half_says_what_the_worker_enforces() -> None:
    settings = configured(**{"orders.create": PolicySettings(rate_limit_per_s=2.5)})
    settings = settings.model_copy(update={"idempotency_lease_ms": 1234})
    of = worker_policies(settings)
    assert of("orders", "create") == WorkerPolicy(
        enabled=True,
        rate_limit_per_s=2.5,
        rate_limit_burst=3,  # a configured burst of 0 is one second's worth, rounded up
        idempotency_retention_s=86400.0,
        idempotency_lease_ms=1234,
    )
    assert of("orders", "show").rate_limit_per_s == 0 and of("orders", "show").enabled
    off = worker_policies(ResilienceSettings(enabled=False))("orders", "create")
    assert not off.enabled and off.idempotency_retention_s == 0


def test_the_listing_pairs_its_own_gateway_policy_with_what_the_worker_declared() -> None:
    worker_side = configured(orders=PolicySettings(rate_limit_per_s=7, attempts=1))
    entry = declare(orders, "w-1", heartbeat_s=10.0, policies=worker_policies(worker_side))
    view = RegistryView(forget_after_s=3600, clock=lambda: 1000.0)
    assert view.apply(entry_key("orders", "w-1"), encode(entry), 1000.0)
    unknown = Operations("later", description="Known here, never registered.")

    @unknown.action("run")
    async def run(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        """Run."""
        return {}

    gateway_side = configured(orders=PolicySettings(attempts=4))
    listing = view.listing([unknown], gateway=gateway_policies(gateway_side))
    by_op = {o.op: o for o in listing.operations}
    create_ = by_op["orders"].actions[0].policy
    assert create_ is not None and create_.gateway is not None and create_.worker is not None
    assert create_.gateway.attempts == 4  # the answering gateway's retries, not the worker's
    assert create_.worker.rate_limit_per_s == 7  # the worker's limit, not the gateway's
    later = by_op["later"].actions[0].policy
    assert later is not None and later.worker is None and later.gateway is not None
    # The registry entry itself carries only the worker half.
    assert entry.actions[0].policy == ActionPolicy(worker=create_.worker)
    assert view.listing().operations[0].actions[0].policy == entry.actions[0].policy


def test_the_policy_table_reads_at_a_glance() -> None:
    worker_side = configured(**{"orders.create": PolicySettings(rate_limit_per_s=7)})
    entry = declare(orders, "w-1", heartbeat_s=10.0, policies=worker_policies(worker_side))
    view = RegistryView(forget_after_s=3600, clock=lambda: 1000.0)
    view.apply(entry_key("orders", "w-1"), encode(entry), 1000.0)
    gateway_side = configured(
        **{"orders.show": PolicySettings(idempotent=True, cacheable=True, attempt_timeout_ms=1500)}
    )
    text = format_policies(view.listing(gateway=gateway_policies(gateway_side)))
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:3]}
    assert rows["orders.create"][1:] == [
        "30s", "3", "50ms-1s,x2", "20%,min1/s", "5fails,1s-30s", "-", "7/s,burst7", "24h,lease30s"
    ]
    assert rows["orders.show"][1:3] == ["30s(1.5s/try)", "3,timeouts"]
    assert rows["orders.show"][6:] == ["5m", "-", "24h,lease30s"]
    off = format_policies(view.listing(gateway=gateway_policies(ResilienceSettings(enabled=False))))
    assert off.splitlines()[1].split()[1:7] == ["off"] * 6
    undeclared = declare(orders, "w-2", heartbeat_s=10.0)  # a worker from before policies
    view.apply(entry_key("orders", "w-2"), encode(undeclared), 1001.0)
    newest = format_policies(view.listing(gateway=gateway_policies(gateway_side)))
    assert newest.splitlines()[1].split()[-2:] == ["?", "?"]
    assert [duration(ms) for ms in (0, 20, 1500, 30_000, 300_000, 86_400_000)] == [
        "0", "20ms", "1.5s", "30s", "5m", "24h"
    ]
    assert msgspec.json.decode(msgspec.json.encode(entry)).get("actions")[0]["policy"]["worker"]
