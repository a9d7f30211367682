"""The confluent-kafka backend's data side against the local broker."""

from __future__ import annotations

from confluent_kafka import TopicPartition as CTP

from connectors.confluent import ConfluentConsumer, consumer_settings
from tests.helpers import make_topics, produce, unique


def _read(c: ConfluentConsumer, want: int, attempts: int = 30) -> int:
    got = 0
    for _ in range(attempts):
        got += len(c.consume(1000, 0.1))
        if got >= want:
            break
    return got


def test_a_partition_paused_when_revoked_is_fetched_again_when_it_comes_back(
        bootstrap: str) -> None:
    """Backpressure pauses a partition on the reader; it is revoked while paused and later
    assigned back to the same worker. librdkafka keeps the pause across unassign/assign, so
    before the fix the partition was never fetched again (0 records, /readyz still 200)."""
    topic = unique("pause")
    make_topics(bootstrap, topic, partitions=1)
    produce(bootstrap, topic, ((None, b"x", 0) for _ in range(20)))
    c = ConfluentConsumer(consumer_settings(bootstrap, unique("g"), {}, {}))
    try:
        c._reader_add([CTP(topic, 0, 0)])
        assert _read(c, 20) == 20
        c.pause([(topic, 0)])  # the inbox is full
        c._reader_remove([CTP(topic, 0)])  # revoked while paused
        c._reader_add([CTP(topic, 0, 0)])  # ... and assigned back
        assert _read(c, 20) == 20, "the partition stayed paused after coming back"
    finally:
        c.close()
