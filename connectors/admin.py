"""Topic administration through confluent-kafka's AdminClient.

Internal topics are created with explicit configs: the local broker's DescribeConfigs returns
only what was given at creation, so nothing may depend on broker defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from streamcore.core.errors import BrokerUnavailable
from streamcore.core.logs import librdkafka_logger

__all__ = ["broker_answers", "create_topics", "partition_count", "topic_names"]


def _admin(bootstrap: str, extra: Mapping[str, str] | None = None) -> AdminClient:
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": librdkafka_logger(),
                            **(extra or {})}
    return AdminClient(conf)


def broker_answers(bootstrap: str, timeout: float) -> bool:
    """True if a metadata request to bootstrap succeeds within timeout seconds."""
    return topic_names(bootstrap, timeout=timeout,
                       kafka={"socket.connection.setup.timeout.ms": "1000"}) is not None


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    config: Mapping[str, str] | None = None,
    timeout: float = 15.0,
    kafka: Mapping[str, str] | None = None,
) -> None:
    """Create each topic with the given partition count; existing topics are left alone."""
    admin = _admin(bootstrap, kafka)
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=n, replication_factor=1, config=dict(config or {}))
         for t, n in topics.items()],
        request_timeout=timeout,
    )
    for topic, fut in futures.items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise BrokerUnavailable(f"could not create topic {topic!r}: {exc}") from exc


def partition_count(bootstrap: str, topic: str, *, timeout: float = 10.0,
                    kafka: Mapping[str, str] | None = None) -> int:
    """Number of partitions of topic (0 if it does not exist). Asks for every topic's
    metadata: a request naming the topic would create it on a broker that auto-creates."""
    md = _admin(bootstrap, kafka).list_topics(timeout=timeout)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return 0
    return len(t.partitions)


def topic_names(bootstrap: str, *, timeout: float,
                kafka: Mapping[str, str] | None = None) -> set[str] | None:
    """The cluster's topics, or None if it does not answer within timeout seconds."""
    try:
        md = _admin(bootstrap, kafka).list_topics(timeout=timeout)
    except KafkaException:
        return None
    return {name for name, t in md.topics.items() if t.error is None}
