"""`data.list` reads a KV watch snapshot: every live key under a prefix, none missing, even
when nats-py marks the snapshot's end before its entries arrive (it asks the consumer for its
pending count only after subscribing, and the server may have sent them all by then)."""

from __future__ import annotations

import asyncio
import json

import httpx
import nats

from nexus_bus import Settings, Worker
from nexus_bus.constants import DATA_BUCKET, KV_STREAM_PREFIX
from nexus_bus.embedded import ServerProcess
from nexus_bus.jetstream import ensure_data_bucket
from nexus_bus.store import KeyValueRecordStore
from tests.conftest import make_settings
from tests.integration.http_shim import bearer, running_shim


async def test_listing_a_large_bucket_never_comes_back_short(local_nats: ServerProcess) -> None:
    nc = await nats.connect(local_nats.url)
    try:
        js = nc.jetstream()
        kv = await ensure_data_bucket(js, make_settings(local_nats.url).jetstream)
        store = KeyValueRecordStore(kv, js)
        # Many keys, a third of them deleted (tombstones stay in the stream), then the ones
        # the listing looks for, last: they arrive at the very end of the snapshot.
        for batch in range(0, 2400, 200):
            puts = (kv.put(f"k{i % 37}.{i}", b"1") for i in range(batch, batch + 200))
            await asyncio.gather(*puts)
        await asyncio.gather(*(kv.delete(f"k{i % 37}.{i}") for i in range(0, 2400, 3)))
        await kv.put("t.x.a", b"1")
        await kv.put("t.x.b", b"2")
        await kv.put("t.x.gone", b"3")
        await kv.delete("t.x.gone")
        for _ in range(25):  # the race lost before the fix in about one listing in fifteen
            assert await store.keys("t.x.a", 5) == ["t.x.a"]  # `t.x.>`, then filtered here
            assert await store.keys("t.x.", 5) == ["t.x.a", "t.x.b"]  # filtered by the server
            assert await store.keys("t", 5) == ["t.x.a", "t.x.b"]  # the whole bucket
        assert await store.keys("nothing.", 5) == []  # an empty snapshot still ends
        assert await store.keys("t.x.gone", 5) == []  # only a tombstone under the prefix
        assert len(await store.keys("k1.", 1000)) == len(
            [i for i in range(2400) if i % 37 == 1 and i % 3]
        )
    finally:
        await nc.close()


async def test_the_server_filters_a_listing_by_the_prefix_s_whole_tokens(nats_url: str) -> None:
    """A prefix that ends inside a token (`users.4`) read the whole bucket, every key's last
    entry, and filtered here: on a bucket of 120,000 keys such a listing took 5.5 s and ran
    into the 5 s default timeout (504). Its whole tokens (`users.`) are a subject filter the
    server applies; this watches the JetStream API for the listings' consumers."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = await ensure_data_bucket(js, make_settings(nats_url).jetstream)
        await kv.put("lf.users.41", b"1")
        await kv.put("lf.users.5", b"1")
        creates = await nc.subscribe("$JS.API.CONSUMER.>")
        store = KeyValueRecordStore(kv, js)
        assert await store.keys("lf.users.4", 5) == ["lf.users.41"]
        assert await store.keys("lf.us", 5) == ["lf.users.41", "lf.users.5"]
        filters = []
        while len(filters) < 2:
            msg = await creates.next_msg(timeout=5)
            if msg.subject.startswith(f"$JS.API.CONSUMER.CREATE.{KV_STREAM_PREFIX}{DATA_BUCKET}"):
                filters.append(json.loads(msg.data)["config"]["filter_subject"])
        assert filters == [f"$KV.{DATA_BUCKET}.lf.users.>", f"$KV.{DATA_BUCKET}.lf.>"]
    finally:
        await nc.close()


async def test_a_short_listing_of_a_large_bucket_reads_its_keys_by_subject(
    local_nats: ServerProcess,
) -> None:
    """A listing of `limit` keys among many reads the first candidates by subject, not every
    key's last entry: on a bucket of 60,000 keys a listing of 100 under a prefix without a
    dot took 2.6 s, now 0.13 s. Tombstones among the first candidates take their place in a
    batch, so the listing reads on until it has `limit` live keys."""
    nc = await nats.connect(local_nats.url)
    try:
        js = nc.jetstream()
        kv = await ensure_data_bucket(js, make_settings(local_nats.url).jetstream)
        keys = [f"sl{i:03d}" for i in range(300)]
        for batch in range(0, 300, 100):
            await asyncio.gather(*(kv.put(key, b"1") for key in keys[batch : batch + 100]))
        gone = {key for i, key in enumerate(keys) if i < 60 and i % 3}  # 40 of the first 60
        await asyncio.gather(*(kv.delete(key) for key in gone))
        live = [key for key in keys if key not in gone]
        creates = await nc.subscribe("$JS.API.CONSUMER.>")
        store = KeyValueRecordStore(kv, js)
        assert await store.keys("sl", 10) == live[:10]  # past two batches of tombstones
        assert await store.keys("sl", 1000) == live  # as many as there are: every entry
        assert await store.keys("sl0", 25) == live[:25]
        assert await store.keys("sl2", 3) == ["sl200", "sl201", "sl202"]
        assert await store.keys("sl00", 5) == ["sl000", "sl003", "sl006", "sl009"]
        filters: list[list[str]] = []
        while True:
            try:
                msg = await creates.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                break
            if msg.subject.startswith(f"$JS.API.CONSUMER.CREATE.{KV_STREAM_PREFIX}{DATA_BUCKET}"):
                config = json.loads(msg.data)["config"]
                filters.append(config.get("filter_subjects") or [config["filter_subject"]])
        everything = [f"$KV.{DATA_BUCKET}.>"]
        assert everything in filters  # the listing of 1,000: one consumer for every entry
        by_name = [f for f in filters if f != everything]
        assert by_name and all(len(f) <= 256 for f in by_name)
        assert max(len(f) for f in by_name) < 300, "a short listing read the whole prefix"
    finally:
        await nc.close()


async def test_a_prefix_no_key_starts_with_lists_nothing(nats_url: str) -> None:
    """The store is also reached with prefixes no schema checked (`ai.similar`, handlers of
    your own): one with an empty token, or a character keys cannot hold, made a watch filter
    that is not a subject (`a..>`, refused by JetStream: 503) or a wildcard (`*.>`)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = await ensure_data_bucket(js, make_settings(nats_url).jetstream)
        await kv.put("odd.prefix.key", b"1")
        store = KeyValueRecordStore(kv, js)
        for prefix in ["..", "a..", ".a.", "odd..", "*.", "odd.*.", "a b.", "."]:
            assert await store.keys(prefix, 5) == [], prefix
        assert await store.keys("odd.", 5) == ["odd.prefix.key"]
    finally:
        await nc.close()


async def test_listing_leaves_no_consumer_behind(
    settings: Settings, worker: Worker, admin_token: str | None, uid: str
) -> None:
    """Each listing's consumer is deleted when it ends. nats-py's watcher only unsubscribes,
    and the server kept the consumer for its 5 minutes of inactivity: a client calling
    `data.list` a few times a second filled the stream's consumer limit, and then every
    listing was 503 `unavailable`, which opened the `data` breaker for get, put and delete."""
    nc = await nats.connect(settings.nats.url)
    stream = f"{KV_STREAM_PREFIX}{DATA_BUCKET}"
    try:
        async with running_shim(settings) as shim, httpx.AsyncClient(
            base_url=shim.url, headers=bearer(admin_token), timeout=10
        ) as client:
            put = await client.post("/v1/data/put", json={"key": f"lst.{uid}.a", "value": 1})
            assert put.status_code == 200, put.text
            before = (await nc.jetstream().stream_info(stream)).state.consumer_count
            for prefix in [f"lst.{uid}.", f"lst.{uid}.a", f"none.{uid}."] * 10:
                listed = await client.post("/v1/data/list", json={"prefix": prefix, "limit": 5})
                assert listed.status_code == 200, listed.text
            assert listed.json() == {"keys": []}
            after = (await nc.jetstream().stream_info(stream)).state.consumer_count
            assert after <= before, f"{after - before} consumers left by 30 listings"
    finally:
        await nc.close()
