"""Metrics recorded by the worker runtime and the gateway client, over real NATS."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from nexus_bus import Gateway, NotFound


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_requests_and_errors_are_counted_on_both_sides(gateway: Gateway, uid: str) -> None:
    worker_side = {"op": "data", "action": "get", "status": "404", "transport": "nats"}
    client_side = {**worker_side, "transport": "client"}
    before = (
        sample("nexus_request_duration_seconds_count", **worker_side),
        sample("nexus_request_duration_seconds_count", **client_side),
        sample("nexus_error_rate_total", op="data", code="not_found"),
    )
    with pytest.raises(NotFound):
        await gateway.request("data", "get", {"key": f"missing.{uid}"})
    after = (
        sample("nexus_request_duration_seconds_count", **worker_side),
        sample("nexus_request_duration_seconds_count", **client_side),
        sample("nexus_error_rate_total", op="data", code="not_found"),
    )
    # Worker and client share this test process, so the error is counted on both sides.
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1 and after[2] == before[2] + 2


async def test_invented_actions_do_not_become_metric_labels(gateway: Gateway, uid: str) -> None:
    from nexus_bus import UnknownOperation

    with pytest.raises(UnknownOperation):
        await gateway.request("data", f"made{uid}", {})
    labels = {
        s.labels.get("action")
        for metric in REGISTRY.collect()
        if metric.name == "nexus_request_duration_seconds"
        for s in metric.samples
        if s.labels.get("transport") == "nats"  # the worker side: any client reaches it
    }
    assert f"made{uid}" not in labels and "_other" in labels
