"""`$SRV.PING|INFO|STATS` answered by a real worker, read with nats-py and `nats.micro` types.

The JSON is parsed with nats.micro's own `ServicePing/ServiceInfo/ServiceStats.from_dict`
(nats-py has no micro *client*; these are its parsers) and compared, key by key, with what a
service made by `nats.micro.add_service` answers on the same server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from nexus_bus import Settings, Worker
from nexus_bus.discovery.survey import gather_srv_stats
from nexus_bus.embedded import ServerProcess
from tests.conftest import make_settings
from tests.integration.discovery_ops import discovery_ops


@pytest.fixture
async def micro_worker(nats_url: str, redis_url: str, uid: str) -> AsyncIterator[Worker]:
    """A worker serving its own group `srv<uid>` (exact counts, nobody else calls it)."""
    worker = Worker(make_settings(nats_url, redis_url), [discovery_ops(f"srv{uid}")])
    await worker.start()
    yield worker
    await worker.drain(1)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    """A plain nats-py client."""
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def ask(nc: Client, subject: str) -> dict[str, Any]:
    reply = await nc.request(subject, b"", timeout=2)
    doc: dict[str, Any] = json.loads(reply.data)
    return doc


async def gather(nc: Client, subject: str, wait_s: float = 0.5) -> list[dict[str, Any]]:
    """Every answer to a `$SRV` request sent to all services (they answer independently)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    answers = []
    try:
        while True:
            msg = await sub.next_msg(timeout=wait_s)
            answers.append(json.loads(msg.data))
    except nats.errors.TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return answers


async def test_ping_info_and_stats_describe_the_op_group(
    micro_worker: Worker, nc: Client, uid: str
) -> None:
    op, name = f"srv{uid}", f"nexus-srv{uid}"
    assert micro_worker.discovery is not None
    instance = micro_worker.discovery.instance

    ping = ServicePing.from_dict(await ask(nc, f"$SRV.PING.{name}"))
    assert (ping.name, ping.id, ping.type) == (name, instance, "io.nats.micro.v1.ping_response")

    info_doc = await ask(nc, f"$SRV.INFO.{name}.{instance}")
    info = ServiceInfo.from_dict(info_doc)
    assert info_doc["type"] == "io.nats.micro.v1.info_response"
    assert info.description == "Discovery test group."
    assert [e.name for e in info.endpoints] == ["fail", "ok"]
    for endpoint in info.endpoints:
        assert endpoint.subject == f"nexus.{op}.{endpoint.name}"
        assert endpoint.queue_group == f"nexus.{op}"
        assert endpoint.metadata["schema_request"].endswith(
            f"/jsonschema/{op}.{endpoint.name}.json#/$defs/request"
        )
        assert endpoint.metadata["schema_reply"].endswith("#/$defs/reply")

    for _ in range(3):
        await nc.request(f"nexus.{op}.ok", b'{"note": "x"}', timeout=2)
    failed = await nc.request(f"nexus.{op}.fail", b"{}", timeout=2)
    assert failed.headers is not None and failed.headers["Nexus-Status"] == "409"
    stats_doc = await ask(nc, f"$SRV.STATS.{name}")
    stats = ServiceStats.from_dict(stats_doc)
    assert stats_doc["type"] == "io.nats.micro.v1.stats_response" and stats.id == instance
    by_name = {e.name: e for e in stats.endpoints}
    assert (by_name["ok"].num_requests, by_name["ok"].num_errors) == (3, 0)
    assert (by_name["fail"].num_requests, by_name["fail"].num_errors) == (1, 1)
    assert by_name["fail"].last_error.startswith("409:")
    assert by_name["ok"].processing_time > 0
    assert by_name["ok"].average_processing_time == by_name["ok"].processing_time // 3


async def test_every_form_of_the_control_subjects_is_answered(
    micro_worker: Worker, nc: Client, uid: str
) -> None:
    name = f"nexus-srv{uid}"
    assert micro_worker.discovery is not None
    instance = micro_worker.discovery.instance
    for verb in ("PING", "INFO", "STATS"):
        everyone = await gather(nc, f"$SRV.{verb}")
        assert [a["id"] for a in everyone if a["name"] == name] == [instance]
        assert (await ask(nc, f"$SRV.{verb}.{name}"))["id"] == instance
        assert (await ask(nc, f"$SRV.{verb}.{name}.{instance}"))["name"] == name
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(f"$SRV.PING.{name}.someone-else", b"", timeout=1)


async def test_documents_have_the_shape_nats_micro_services_send(
    micro_worker: Worker, nc: Client, uid: str
) -> None:
    async def handler(request: Request) -> None:
        await request.respond(b"")

    reference = await add_service(nc, name=f"ref{uid}", version="1.0.0", description="ref")
    try:
        await reference.add_endpoint(name="one", handler=handler, subject=f"ref{uid}.one")
        for verb in ("PING", "INFO", "STATS"):
            ours = await ask(nc, f"$SRV.{verb}.nexus-srv{uid}")
            theirs = await ask(nc, f"$SRV.{verb}.ref{uid}")
            assert set(ours) == set(theirs), verb
            if verb != "PING":  # one endpoint of each, field by field
                assert set(ours["endpoints"][0]) == set(theirs["endpoints"][0]), verb
    finally:
        await reference.stop()


async def test_with_micro_off_nothing_answers(
    nats_url: str, redis_url: str, nc: Client, uid: str
) -> None:
    settings: Settings = make_settings(nats_url, redis_url, worker={"micro": False})
    worker = Worker(settings, [discovery_ops(f"srv{uid}")])
    await worker.start()
    try:
        assert worker.discovery is None
        await nc.request(f"nexus.srv{uid}.ok", b"{}", timeout=2)  # serving all the same
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(f"$SRV.PING.nexus-srv{uid}", b"", timeout=1)
    finally:
        await worker.drain(1)


async def test_draining_stops_answering_srv(micro_worker: Worker, nc: Client, uid: str) -> None:
    await ask(nc, f"$SRV.PING.nexus-srv{uid}")
    await micro_worker.drain(1)
    await asyncio.sleep(0.05)
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(f"$SRV.PING.nexus-srv{uid}", b"", timeout=1)


async def test_services_waits_for_a_first_answer_that_takes_a_while(
    local_nats: ServerProcess, uid: str
) -> None:
    # A worker whose event loop is busy answers $SRV late; `nexus-bus services --wait 2` gave
    # up after 0.25 s of silence before any answer ("no nexus-bus services found", exit 1).
    client = await nats.connect(local_nats.url)
    stats = {"type": "io.nats.micro.v1.stats_response", "name": f"nexus-late{uid}", "id": uid}
    try:

        async def late(msg: Msg) -> None:
            await asyncio.sleep(0.6)
            await msg.respond(json.dumps(stats).encode())

        await client.subscribe("$SRV.STATS", cb=late)
        answers = await gather_srv_stats(client, wait_s=3)
    finally:
        await client.close()
    assert answers == [stats]


async def test_srv_answers_only_on_an_inbox(micro_worker: Worker, nc: Client, uid: str) -> None:
    """A $SRV request's reply subject is anyone's choice: answered as given, it made every
    worker publish onto any subject, with the worker's permissions (docs/runtime.md: a worker
    answers only on inbox-shaped subjects). Here onto a subject a stream captures, as the
    job and event streams do: each worker's document was stored there."""
    js = nc.jetstream()
    stream = f"KEEP{uid}"
    await js.add_stream(name=stream, subjects=[f"keep.{uid}"])
    name = f"nexus-srv{uid}"
    try:
        for verb in ("PING", "INFO", "STATS"):
            await nc.publish(f"$SRV.{verb}", b"", reply=f"keep.{uid}")
            await nc.publish(f"$SRV.{verb}.{name}", b"", reply=f"keep.{uid}")
        await nc.flush()
        await asyncio.sleep(0.3)
        assert (await js.stream_info(stream)).state.messages == 0
        assert (await ask(nc, f"$SRV.PING.{name}"))["name"] == name  # an inbox is answered
    finally:
        await js.delete_stream(stream)
