"""The client backend contract (connectors.base.ClientBackend and the clients it makes), run
against each backend: confluent-kafka on the local broker, and the in-memory backend of the
test driver. What the engine relies on is the same on both."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from connectors.base import (
    ClientBackend,
    ConsumerBackend,
    Message,
    TopicPartition,
    read_to_end,
)
from connectors.confluent import ConfluentClients
from connectors.memory import MemoryClients, MemoryCluster
from tests.helpers import unique


@pytest.fixture(params=["confluent-kafka", "memory"])
def clients(request: pytest.FixtureRequest, bootstrap: str) -> Iterator[ClientBackend]:
    if request.param == "memory":
        yield MemoryClients(MemoryCluster(clock_ms=lambda: int(time.time() * 1000)))
    else:
        yield ConfluentClients(bootstrap, consumer={"session.timeout.ms": 6000,
                                                    "heartbeat.interval.ms": 500})


def _produce(clients: ClientBackend, topic: str, records: list[tuple[bytes | None, bytes]],
             partition: int = -1) -> list[Any]:
    """Produce and wait for every acknowledgement; return the acknowledged messages."""
    p = clients.producer()
    acked: list[Any] = []

    def ack(err: Any, msg: Any) -> None:
        assert err is None, err
        acked.append(msg)

    for key, value in records:
        p.produce(topic, value, key, partition, ack, None, 0, None)
    deadline = time.monotonic() + 30
    while len(acked) < len(records) and time.monotonic() < deadline:
        p.poll(0.05)
    p.close()
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


def test_keys_land_where_the_java_partitioner_puts_them(clients: ClientBackend) -> None:
    """The in-memory backend and librdkafka (murmur2_random) place keys alike, so a job's
    partitioning in the test driver is the one it has on Kafka."""
    topic = unique("placement")
    clients.create_topics({topic: 4}, {})
    keys = [f"user-{i}".encode() for i in range(40)]
    acked = _produce(clients, topic, [(k, b"v") for k in keys])
    placed = {m.key(): m.partition() for m in acked}
    # Partitions of these keys under the Java client's murmur2, computed with Kafka's own
    # algorithm (Utils.toPositive(Utils.murmur2(key)) % 4).
    from connectors.memory import murmur2_partition

    assert placed == {k: murmur2_partition(k, 4) for k in keys}


def _member_reads(c: ConsumerBackend, assigned: list[TopicPartition],
                  want: int) -> list[Message]:
    """Serve the group and read until want messages came (or a minute passed)."""
    got: list[Message] = []
    deadline = time.monotonic() + 60
    while len(got) < want and time.monotonic() < deadline:
        c.serve(0.05)
        if assigned:
            got.extend(c.consume(100, 0.1))
    return got


def test_a_member_reads_from_committed_offsets_and_revokes_at_close(
        clients: ClientBackend) -> None:
    topic, group = unique("member"), unique("g")
    clients.create_topics({topic: 2}, {})
    _produce(clients, topic, [(None, b"%d" % i) for i in range(10)], partition=0)
    _produce(clients, topic, [(None, b"%d" % i) for i in range(5)], partition=1)
    assigned: list[TopicPartition] = []
    revoked: list[TopicPartition] = []
    c = clients.consumer(group)
    c.subscribe([topic], on_assign=assigned.extend, on_revoke=revoked.extend,
                on_lost=revoked.extend)
    got = _member_reads(c, assigned, 15)
    assert sorted(assigned) == [(topic, 0), (topic, 1)]
    by_partition = {p: [m.value() for m in got if m.partition() == p] for p in (0, 1)}
    assert by_partition[0] == [b"%d" % i for i in range(10)]  # offset order per partition
    c.commit({(topic, 0): 4, (topic, 1): 5}, asynchronous=False)
    c.close()
    assert sorted(revoked) == [(topic, 0), (topic, 1)]

    # A new member of the group starts at the committed offsets.
    again = clients.consumer(group)
    assigned.clear()
    again.subscribe([topic], on_assign=assigned.extend, on_revoke=revoked.extend,
                    on_lost=revoked.extend)
    rest = _member_reads(again, assigned, 6)
    again.close()
    assert sorted((m.partition(), m.offset()) for m in rest) == [(0, i) for i in range(4, 10)]


def test_a_reader_reads_a_partition_to_its_end(clients: ClientBackend) -> None:
    topic = unique("reader")
    clients.create_topics({topic: 1}, {})
    _produce(clients, topic, [(b"k%d" % (i % 7), b"%d" % i) for i in range(500)], partition=0)
    seen: list[bytes | None] = []
    reader = clients.reader()
    try:
        ends = read_to_end(reader, {(topic, 0): 100},
                           lambda msgs: seen.extend(m.value() for m in msgs))
    finally:
        reader.close()
    assert ends == {(topic, 0): 500}
    assert seen == [b"%d" % i for i in range(100, 500)]
