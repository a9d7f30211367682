"""The internal topics a job needs, and how many partitions each gets.

Names start with the application id (the consumer group, by default the job name).

* ``{app}-{name}-repartition``: as many partitions as asked (``repartition(n)``), else as
  many as the largest input topic feeding it.
* ``{app}-{name}-changelog``: compacted, as many partitions as the topic whose partition
  tasks own the store (an input topic or a repartition topic): store P logs to partition P.

Topics are created with explicit configs (DESIGN.md section 9: the local broker reports only
the configs given at creation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streamcore.core.errors import StateError
from streamcore.plan.graph import Node, OpKind, upstream

if TYPE_CHECKING:
    from streamcore.plan.physical import PhysicalPlan

__all__ = ["COMPACT", "DELETE", "InternalTopics", "internal_topics"]

COMPACT = (("cleanup.policy", "compact"),)
DELETE = (("cleanup.policy", "delete"),)


@dataclass
class InternalTopics:
    by_config: dict[tuple[tuple[str, str], ...], dict[str, int]] = field(default_factory=dict)
    tables: dict[str, int] = field(default_factory=dict)  # global table topic -> partitions


def _existing(count: Callable[[str], int], topic: str, why: str) -> int:
    n = count(topic)
    if n < 1:
        raise StateError(f"topic {topic!r} does not exist; create it before starting the "
                         f"job ({why})")
    return n


def _hosts(node: Node) -> list[Node]:
    """The sources and repartition steps whose records reach node."""
    hosts = (OpKind.SOURCE, OpKind.REPARTITION)
    return [n for n in upstream(node, through=lambda n: n.kind not in hosts)
            if n.kind in hosts]


def internal_topics(plan: PhysicalPlan, count: Callable[[str], int]) -> InternalTopics:
    """The plan's internal topics by config, each with its partition count; count(topic)
    gives an existing topic's."""
    topics = InternalTopics(by_config={COMPACT: {}, DELETE: {}})
    sizes: dict[int, int] = {}  # source / repartition node id -> partitions

    def size_of(host: Node, why: str) -> int:
        if host.id not in sizes:
            if host.kind == OpKind.REPARTITION:
                sizes[host.id] = host.params["partitions"] or max(
                    size_of(h, why) for h in _hosts(host))
            else:
                assert host.source is not None
                if host.source.pattern is not None:
                    raise StateError(
                        f"cannot size internal topics from pattern source "
                        f"{host.source.describe()}: give repartition(num_partitions=...)")
                sizes[host.id] = max(_existing(count, t, why) for t in host.source.topics)
        return sizes[host.id]

    for node in plan.repartitions:  # in creation order: upstream ones first
        topics.by_config[DELETE][plan.repartition_topic(node)] = size_of(
            node, f"it sizes the repartition topic of step {node.name!r}")
    for node in plan.stateful:
        hosts = _hosts(node)
        assert len(hosts) == 1, "a stateful step reads one partitioned topic"
        assert node.name is not None
        topics.by_config[COMPACT][plan.changelog_topic(node.name)] = size_of(
            hosts[0], f"it sizes the changelog of step {node.name!r}")
    for node in plan.tables:
        topic = node.params["topic"]
        topics.tables[topic] = _existing(count, topic, f"it holds table {node.name!r}")
    return topics
