"""The client backend contract (connectors.base.ClientBackend and the clients it makes), run
against each backend: confluent-kafka and aiokafka on the local broker, and the in-memory
backend of the test driver. What the engine relies on is the same on all three."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from connectors.aio import AioClients
from connectors.base import (
    ClientBackend,
    GroupMember,
    Message,
    RebalanceListener,
    TopicPartition,
)
from connectors.confluent import ConfluentClients
from connectors.memory import MemoryClients, MemoryCluster
from connectors.reading import read_to_end
from tests.helpers import QUICK_SESSION_MS, unique


@pytest.fixture(params=["confluent-kafka", "aiokafka", "memory"])
def clients(request: pytest.FixtureRequest, bootstrap: str) -> Iterator[ClientBackend]:
    if request.param == "memory":
        yield MemoryClients(MemoryCluster(clock_ms=lambda: int(time.time() * 1000)))
    elif request.param == "aiokafka":
        yield AioClients(bootstrap, consumer={"session.timeout.ms": QUICK_SESSION_MS,
                                              "heartbeat.interval.ms": 500})
    else:
        yield ConfluentClients(bootstrap, consumer={"session.timeout.ms": QUICK_SESSION_MS,
                                                    "heartbeat.interval.ms": 500})


async def _produce(clients: ClientBackend, topic: str,
                   records: list[tuple[bytes | None, bytes]], partition: int = -1) -> list[Any]:
    """Produce and wait for every acknowledgement; return the acknowledged messages."""
    p = clients.producer()
    await p.start()
    acked: list[Any] = []

    def ack(err: Any, msg: Any) -> None:
        assert err is None, err
        acked.append(msg)

    for key, value in records:
        p.produce(topic, value, key, partition, ack, None, 0, None)
    deadline = time.monotonic() + 30
    while len(acked) < len(records) and time.monotonic() < deadline:
        p.poll(0)
        await asyncio.sleep(0.01)
    await p.stop()
    assert len(acked) == len(records)
    return acked


def test_topics_are_created_once_and_never_by_a_lookup(clients: ClientBackend) -> None:
    topic, missing = unique("contract"), unique("missing")
    clients.create_topics({topic: 3}, {"cleanup.policy": "compact"})
    clients.create_topics({topic: 3}, {"cleanup.policy": "compact"})  # idempotent
    names = clients.topic_names(10)
    assert names is not None and topic in names
    assert clients.partition_count(topic) == 3
    assert clients.partition_count(missing) == 0
    names = clients.topic_names(10)
    assert names is not None and missing not in names, "a lookup created the topic"


async def test_keys_land_where_the_java_partitioner_puts_them(clients: ClientBackend) -> None:
    """The in-memory backend and librdkafka (murmur2_random) place keys alike, so a job's
    partitioning in the test driver is the one it has on Kafka."""
    topic = unique("placement")
    clients.create_topics({topic: 4}, {})
    keys = [f"user-{i}".encode() for i in range(40)]
    acked = await _produce(clients, topic, [(k, b"v") for k in keys])
    placed = {m.key(): m.partition() for m in acked}
    # Partitions of these keys under the Java client's murmur2, computed with Kafka's own
    # algorithm (Utils.toPositive(Utils.murmur2(key)) % 4).
    from connectors.memory import murmur2_partition

    assert placed == {k: murmur2_partition(k, 4) for k in keys}


class _Recorder(RebalanceListener):
    """Records the member's rebalance events; a revoke commits what the test set."""

    def __init__(self) -> None:
        self.assigned_parts: list[TopicPartition] = []
        self.revoked_parts: list[TopicPartition] = []
        self.on_revoke: dict[TopicPartition, int] = {}

    async def assigned(self, parts: list[TopicPartition]) -> None:
        self.assigned_parts.extend(parts)

    async def revoked(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.revoked_parts.extend(parts)
        return {tp: o for tp, o in self.on_revoke.items() if tp in parts}

    async def lost(self, parts: list[TopicPartition]) -> None:
        self.revoked_parts.extend(parts)

    def fenced(self, parts: list[TopicPartition]) -> None:
        raise AssertionError(f"fenced {parts}")


async def _member_reads(c: GroupMember, listener: _Recorder, want: int) -> list[Message]:
    """Serve the group and read until want messages came (or a minute passed)."""
    got: list[Message] = []
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(c.run())
        deadline = time.monotonic() + 60
        while len(got) < want and time.monotonic() < deadline:
            if listener.assigned_parts:
                got.extend(m for m in await c.fetch(100, 0.1) if m.error() is None)
            else:
                await asyncio.sleep(0.05)
        serving.cancel()
    return got


async def _new_member_reads(clients: ClientBackend, topic: str, group: str,
                            want: int) -> list[Message]:
    """What a new member of group reads (from the group's committed offsets)."""
    again, rec = clients.consumer(group), _Recorder()
    await again.join([topic], rec)
    try:
        return await _member_reads(again, rec, want)
    finally:
        await again.close()


async def test_a_member_reads_from_committed_offsets_and_commits_on_revoke(
        clients: ClientBackend) -> None:
    topic, group = unique("member"), unique("g")
    clients.create_topics({topic: 2}, {})
    await _produce(clients, topic, [(None, b"%d" % i) for i in range(10)], partition=0)
    await _produce(clients, topic, [(None, b"%d" % i) for i in range(5)], partition=1)
    first = _Recorder()
    c = clients.consumer(group)
    await c.join([topic], first)
    got = await _member_reads(c, first, 15)
    assert sorted(first.assigned_parts) == [(topic, 0), (topic, 1)]
    by_partition = {p: [m.value() for m in got if m.partition() == p] for p in (0, 1)}
    assert by_partition[0] == [b"%d" % i for i in range(10)]  # offset order per partition
    await c.commit({(topic, 0): 2, (topic, 1): 5})
    first.on_revoke = {(topic, 0): 4}  # committed by the member when it leaves
    await c.close()
    assert sorted(first.revoked_parts) == [(topic, 0), (topic, 1)]

    # A new member of the group starts at the committed offsets.
    second = _Recorder()
    again = clients.consumer(group)
    await again.join([topic], second)
    rest = await _member_reads(again, second, 6)
    await again.close()
    assert sorted((m.partition(), m.offset()) for m in rest) == [(0, i) for i in range(4, 10)]


class _SlowToAssign(_Recorder):
    """A listener that takes a second to take new partitions (the engine creates their tasks
    and looks up where their reading begins)."""

    def __init__(self) -> None:
        super().__init__()
        self.returned = False

    async def assigned(self, parts: list[TopicPartition]) -> None:
        await super().assigned(parts)
        if parts:
            await asyncio.sleep(1.0)
            self.returned = True


async def test_no_record_of_a_new_partition_is_fetched_before_assigned_returns(
        clients: ClientBackend) -> None:
    """connectors.base.RebalanceListener.assigned: the engine drops records of a partition
    it has no task for, so a record fetched before the task exists would be lost. aiokafka
    fetches the new partitions while its listener runs; its member pauses them until then."""
    topic, group = unique("slow-assign"), unique("g")
    clients.create_topics({topic: 2}, {})
    for partition in (0, 1):
        await _produce(clients, topic, [(None, b"%d" % i) for i in range(10)], partition)
    listener = _SlowToAssign()
    c = clients.consumer(group)
    await c.join([topic], listener)
    got: list[Message] = []
    early: list[Message] = []
    try:
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(c.run())
            deadline = time.monotonic() + 60
            while len(got) < 20 and time.monotonic() < deadline:
                msgs = [m for m in await c.fetch(100, 0.1) if m.error() is None]
                if not listener.returned:
                    early.extend(msgs)
                got.extend(msgs)
            serving.cancel()
    finally:
        await c.close()
    assert [(m.partition(), m.offset()) for m in early] == []
    assert sorted((m.partition(), m.offset()) for m in got) == \
        [(p, o) for p in (0, 1) for o in range(10)]


async def test_queued_commits_are_sent_by_the_service_and_forgotten_on_request(
        clients: ClientBackend) -> None:
    topic, group = unique("queued"), unique("g")
    clients.create_topics({topic: 2}, {})
    await _produce(clients, topic, [(None, b"%d" % i) for i in range(6)], partition=0)
    await _produce(clients, topic, [(None, b"%d" % i) for i in range(6)], partition=1)
    rec = _Recorder()
    c = clients.consumer(group)
    await c.join([topic], rec)
    await _member_reads(c, rec, 12)
    c.commit_soon({(topic, 0): 3, (topic, 1): 3})
    c.commit_soon({(topic, 0): 5})  # a later one replaces the earlier for its partition
    c.forget([(topic, 1)])  # e.g. fenced: must never be sent
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(c.run())
        await asyncio.sleep(1.0)
        serving.cancel()
    await c.close()
    rest = await _new_member_reads(clients, topic, group, 7)
    assert sorted((m.partition(), m.offset()) for m in rest) == \
        [(0, 5)] + [(1, i) for i in range(6)]


async def test_a_synchronous_commit_supersedes_a_queued_one(clients: ClientBackend) -> None:
    """A graceful stop queues periodic commits until its drain begins, then commits the final
    offsets synchronously while the service goes on. A queued, older commit sent after the
    final one moved the group's offset back: the next owner repeated records (CI saw five
    duplicates across a graceful handover)."""
    topic, group = unique("supersede"), unique("g")
    clients.create_topics({topic: 1}, {})
    await _produce(clients, topic, [(None, b"%d" % i) for i in range(8)], partition=0)
    rec = _Recorder()
    c = clients.consumer(group)
    await c.join([topic], rec)
    await _member_reads(c, rec, 8)
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(c.run())
        await asyncio.sleep(0.5)  # the service is in its loop, between two serves
        c.commit_soon({(topic, 0): 2})  # a periodic commit, not sent yet
        await c.commit({(topic, 0): 6})  # the final one
        await asyncio.sleep(1.0)  # the service serves the group a few times more
        serving.cancel()
    await c.close()
    rest = await _new_member_reads(clients, topic, group, 2)
    assert [m.offset() for m in rest] == [6, 7]


async def test_a_reader_reads_a_partition_to_its_end(clients: ClientBackend) -> None:
    topic = unique("reader")
    clients.create_topics({topic: 1}, {})
    await _produce(clients, topic, [(b"k%d" % (i % 7), b"%d" % i) for i in range(500)], partition=0)
    seen: list[bytes | None] = []
    reader = clients.reader()
    try:
        ends = read_to_end(reader, {(topic, 0): 100},
                           lambda msgs: seen.extend(m.value() for m in msgs))
    finally:
        reader.close()
    assert ends == {(topic, 0): 500}
    assert seen == [b"%d" % i for i in range(100, 500)]


async def test_an_aiokafka_member_leaves_the_group_when_it_closes(
        bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    """aiokafka sends LeaveGroup only from generation 1 on (Kafka numbers a group's first
    generation 1); the local broker numbers it 0. Before the fix a member that closed in its
    group's first generation stayed a member until its session expired, so the next owner
    of its partitions waited that long (11 s instead of 3 s with a 6 s session)."""
    topic, group = unique("leave"), unique("g")
    clients = AioClients(bootstrap, consumer={"session.timeout.ms": 6000,
                                              "heartbeat.interval.ms": 500})
    clients.create_topics({topic: 1}, {})
    await _produce(clients, topic, [(None, b"x")], partition=0)
    rec = _Recorder()
    c = clients.consumer(group)
    await c.join([topic], rec)
    assert len(await _member_reads(c, rec, 1)) == 1
    with caplog.at_level(logging.INFO, logger="aiokafka.consumer.group_coordinator"):
        await c.close()
    assert "LeaveGroup request succeeded" in caplog.messages
