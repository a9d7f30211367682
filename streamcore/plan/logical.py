"""The logical plan: a job as declared, validated and frozen (what ``Job.build()`` returns).

Everything after the API reads this, never the builder: a running worker is not affected
by steps added to its Job afterwards, and the runtime does not depend on the API's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamcore.core.errors import JobDefinitionError
from streamcore.plan.analysis import check_event_time
from streamcore.plan.graph import Node, OpKind

__all__ = ["LogicalPlan", "dlq_topic"]


def dlq_topic(job_name: str) -> str:
    """Where records that failed under on_error="dead_letter" go (one per job, not per
    group: nothing reads it back)."""
    return f"{job_name}-dlq"


@dataclass(frozen=True)
class LogicalPlan:
    name: str
    nodes: tuple[Node, ...]  # in the order they were added: parents before children
    sources: tuple[Node, ...]
    on_error: str = "fail"  # the job's default error policy
    config: Any = None  # the job's WorkerConfig, if it gave one

    def __post_init__(self) -> None:
        if not self.sources:
            raise JobDefinitionError(f"job {self.name!r} has no source: call job.stream(...)")
        if not any(n.terminal for n in self.nodes):
            raise JobDefinitionError(
                f"job {self.name!r} has no output: end a stream with .to(...) or .foreach(...)")
        seen: set[str] = set()
        for src in self.sources:
            assert src.source is not None
            for topic in src.source.subscription:
                if topic in seen:
                    raise JobDefinitionError(
                        f"topic {topic!r} is read by two sources; read it once and branch")
                seen.add(topic)
        check_event_time(self.nodes)

    @property
    def repartitions(self) -> list[Node]:
        """Internal topics that split the graph; each is also read back as a source."""
        return [n for n in self.nodes if n.kind == OpKind.REPARTITION]

    @property
    def tables(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == OpKind.TABLE]

    @property
    def stateful(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == OpKind.AGGREGATE]

    @property
    def dlq_topic(self) -> str:
        return dlq_topic(self.name)

    @property
    def uses_dead_letter(self) -> bool:
        return self.on_error == "dead_letter" or any(
            n.params.get("on_error") == "dead_letter" for n in self.nodes)

    def children(self) -> dict[int, list[Node]]:
        """Each node's children, by node id."""
        kids: dict[int, list[Node]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for p in n.parents:
                kids[p.id].append(n)
        return kids
