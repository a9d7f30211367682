"""What a worker checks and creates before it joins its group. Each step fails fast with one
message naming what to fix: a bad configuration is a ConfigError (exit code 2), an
unreachable Kafka a BrokerUnavailable (exit code 3). Blocking: the worker runs them on an
executor thread."""

from __future__ import annotations

import os
from pathlib import Path

from connectors.base import ClientBackend
from streamcore.api.config import WorkerConfig
from streamcore.core.errors import BrokerUnavailable, ConfigError
from streamcore.plan.physical import PhysicalPlan
from streamcore.plan.topics import internal_topics

__all__ = ["check_kafka", "check_state_dir", "clients_for", "create_dlq",
           "create_internal_topics"]


def clients_for(config: WorkerConfig) -> ClientBackend:
    """The client backend config.client names (imported only when chosen)."""
    if config.client == "aiokafka":
        from connectors.aio import AioClients

        return AioClients(config.bootstrap_servers, kafka=config.kafka,
                          consumer=config.consumer, producer=config.producer)
    from connectors.confluent import ConfluentClients

    return ConfluentClients(config.bootstrap_servers, kafka=config.kafka,
                            consumer=config.consumer, producer=config.producer)


def check_state_dir(state_dir: Path) -> None:
    """A state directory this user cannot write is a configuration error found at start, not
    a partition that fails on its first assignment while the worker looks healthy."""
    probe = state_dir / f".write-check-{os.getpid()}"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError("state_dir", f"{str(state_dir)!r} is not writable by this process "
                          f"(uid {os.getuid()}): {exc.strerror}") from exc


def check_kafka(plan: PhysicalPlan, config: WorkerConfig, clients: ClientBackend) -> None:
    """Kafka answers within the start-up timeout and every input topic exists (looked up
    without creating it: a misspelled topic must not be created by the request that looks
    for it)."""
    c = config
    existing = clients.topic_names(c.startup_timeout_s)
    if existing is None:
        raise BrokerUnavailable(
            f"cannot reach Kafka at {c.bootstrap_servers} within {c.startup_timeout_s:g}s "
            "(startup_timeout): check --bootstrap / STREAMCORE_BOOTSTRAP_SERVERS and that "
            "the brokers are up")
    missing = [t for n in plan.sources if n.source is not None for t in n.source.topics
               if t not in existing]
    if missing:
        raise ConfigError("KafkaSource", f"input topic(s) {', '.join(sorted(missing))} "
                          f"do not exist on {c.bootstrap_servers}; create them first "
                          "(streamcore never creates an input topic)")


def create_internal_topics(plan: PhysicalPlan, clients: ClientBackend) -> dict[str, int]:
    """Create the plan's repartition and changelog topics (idempotent); return the
    partition count of each global table's topic."""
    topics_of = internal_topics(plan, clients.partition_count)
    for cfg, topics in topics_of.by_config.items():
        if topics:
            clients.create_topics(topics, dict(cfg))
    return topics_of.tables


def create_dlq(plan: PhysicalPlan, clients: ClientBackend) -> None:
    """The dead-letter topic, with as many partitions as the first input topic."""
    src = plan.sources[0].source
    n = clients.partition_count(src.topics[0]) if src is not None and src.topics else 0
    clients.create_topics({plan.dlq_topic: max(n, 1)}, {"cleanup.policy": "delete"})
