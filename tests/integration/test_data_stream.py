"""Built-in data and stream operations over real NATS (JetStream KV and streams)."""

from __future__ import annotations

import asyncio

import pytest

from nexus_bus import Conflict, Gateway, NotFound, Worker
from nexus_bus.constants import EVENTS_STREAM
from nexus_bus.embedded import ServerProcess
from nexus_bus.handlers import builtin_groups
from tests.conftest import make_settings


async def test_put_get_list_delete(gateway: Gateway, uid: str) -> None:
    key = f"t.{uid}.a"
    put = await gateway.request("data", "put", {"key": key, "value": {"n": [1, "x", None]}})
    assert put["key"] == key and put["revision"] > 0
    got = await gateway.request("data", "get", {"key": key})
    assert got == {"key": key, "value": {"n": [1, "x", None]}, "revision": put["revision"]}
    await gateway.request("data", "put", {"key": f"t.{uid}.b", "value": 2})
    listed = await gateway.request("data", "list", {"prefix": f"t.{uid}."})
    assert listed["keys"] == [f"t.{uid}.a", f"t.{uid}.b"]
    partial = await gateway.request("data", "list", {"prefix": f"t.{uid}.a", "limit": 5})
    assert partial["keys"] == [f"t.{uid}.a"]
    assert await gateway.request("data", "delete", {"key": key}) == {"key": key, "deleted": True}
    assert await gateway.request("data", "delete", {"key": key}) == {"key": key, "deleted": False}
    with pytest.raises(NotFound):
        await gateway.request("data", "get", {"key": key})


async def test_any_json_value_round_trips(gateway: Gateway, uid: str) -> None:
    for i, value in enumerate([0, -1.5, "s", True, None, [], {}, {"deep": [[{"a": 1}]]}]):
        key = f"v.{uid}.{i}"
        await gateway.request("data", "put", {"key": key, "value": value})
        assert (await gateway.request("data", "get", {"key": key}))["value"] == value


async def test_compare_and_set(gateway: Gateway, uid: str) -> None:
    key = f"cas.{uid}"
    first = await gateway.request("data", "put", {"key": key, "value": 1, "expected_revision": 0})
    with pytest.raises(Conflict):
        await gateway.request("data", "put", {"key": key, "value": 2, "expected_revision": 0})
    second = await gateway.request(
        "data", "put", {"key": key, "value": 2, "expected_revision": first["revision"]}
    )
    with pytest.raises(Conflict) as info:
        await gateway.request(
            "data", "put", {"key": key, "value": 3, "expected_revision": first["revision"]}
        )
    assert info.value.http_status == 409
    got = await gateway.request("data", "get", {"key": key})
    assert got["value"] == 2 and got["revision"] == second["revision"]


async def test_concurrent_cas_has_exactly_one_winner(gateway: Gateway, uid: str) -> None:
    key = f"race.{uid}"
    base = await gateway.request("data", "put", {"key": key, "value": 0})

    async def attempt(i: int) -> bool:
        try:
            await gateway.request(
                "data", "put", {"key": key, "value": i, "expected_revision": base["revision"]}
            )
            return True
        except Conflict:
            return False

    results = await asyncio.gather(*(attempt(i) for i in range(20)))
    assert sum(results) == 1


async def test_msgpack_requests(gateway: Gateway, uid: str) -> None:
    key = f"mp.{uid}"
    await gateway.request("data", "put", {"key": key, "value": {"b": 1}}, media="msgpack")
    got = await gateway.request("data", "get", {"key": key}, media="msgpack")
    assert got["value"] == {"b": 1}


async def test_stream_publish_dedup_and_read(gateway: Gateway, uid: str) -> None:
    topic = f"t{uid}"
    first = await gateway.request(
        "stream", "publish", {"topic": topic, "event": {"n": 1}, "id": "e1"}
    )
    again = await gateway.request(
        "stream", "publish", {"topic": topic, "event": {"n": 1}, "id": "e1"}
    )
    assert not first["duplicate"] and again["duplicate"] and again["seq"] == first["seq"]
    second = await gateway.request("stream", "publish", {"topic": topic, "event": {"n": 2}})
    read = await gateway.request("stream", "read", {"topic": topic})
    assert [e["event"] for e in read["events"]] == [{"n": 1}, {"n": 2}]
    after = await gateway.request("stream", "read", {"topic": topic, "after_seq": first["seq"]})
    assert [e["seq"] for e in after["events"]] == [second["seq"]]
    limited = await gateway.request("stream", "read", {"topic": topic, "limit": 1})
    assert len(limited["events"]) == 1
    assert (await gateway.request("stream", "read", {"topic": f"none{uid}"}))["events"] == []


async def test_stream_publish_ids_are_per_topic(gateway: Gateway, uid: str) -> None:
    """The same `id` on two topics is two events. JetStream deduplicates across the whole
    stream, so the second publish was answered `duplicate` with the first topic's seq, and
    its event was never stored."""
    orders, invoices = f"orders{uid}", f"invoices{uid}"
    first = await gateway.request("stream", "publish", {"topic": orders, "event": 1, "id": "7"})
    other = await gateway.request("stream", "publish", {"topic": invoices, "event": 2, "id": "7"})
    assert not other["duplicate"] and other["seq"] > first["seq"]
    read = await gateway.request("stream", "read", {"topic": invoices})
    assert [(e["seq"], e["event"]) for e in read["events"]] == [(other["seq"], 2)]
    again = await gateway.request("stream", "publish", {"topic": invoices, "event": 3, "id": "7"})
    assert again["duplicate"] and again["seq"] == other["seq"]


async def test_events_kept_less_than_the_dedup_window_still_start(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    """`jetstream.events_max_age_s` under `dedup_window_s` (120 s): JetStream refuses a
    duplicate window longer than the max age (10052), so the worker could not start at all
    (`Unavailable: stream NEXUS_EVENTS`). The events' window is now at most their max age."""
    settings = make_settings(local_nats.url, redis_url, jetstream={"events_max_age_s": 60})
    worker = Worker(settings, builtin_groups(["stream"]))
    await worker.start()
    gateway = await Gateway.connect(settings, token=admin_token)
    try:
        publish = {"topic": f"t{uid}", "event": 1, "id": "e1"}
        first = await gateway.request("stream", "publish", publish)
        assert (await gateway.request("stream", "publish", publish))["seq"] == first["seq"]
        info = await gateway.nc.jetstream().stream_info(EVENTS_STREAM)
        assert info.config.max_age == 60 and info.config.duplicate_window == 60
    finally:
        await gateway.close()
        await worker.drain(1)


@pytest.mark.parametrize("after_seq", [2**64 - 1, 2**64 - 2])
async def test_stream_read_after_the_last_sequence_finds_nothing(
    gateway: Gateway, uid: str, after_seq: int
) -> None:
    """Sequences are uint64: the one after 2^64 - 1 was asked of JetStream, which could not
    read the request (10025), and the read answered 503 `unavailable`."""
    await gateway.request("stream", "publish", {"topic": f"t{uid}", "event": 1})
    read = await gateway.request("stream", "read", {"topic": f"t{uid}", "after_seq": after_seq})
    assert read == {"events": []}


async def test_ai_embed_is_deterministic(gateway: Gateway) -> None:
    one = await gateway.request(
        "ai", "embed", {"input": "the quick brown fox", "model": "hash-256"}
    )
    two = await gateway.request(
        "ai", "embed", {"input": ["the quick brown fox", "lazy dog"], "model": "hash-256"}
    )
    assert one["vectors"][0] == two["vectors"][0] and len(two["vectors"]) == 2
    assert abs(sum(v * v for v in one["vectors"][0]) - 1) < 1e-9
