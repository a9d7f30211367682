"""What a job's graph means before anything runs: which chain processes records of a topic,
and the graph as text (explain)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from streamcore.core.errors import JobDefinitionError
from streamcore.plan.graph import Node

if TYPE_CHECKING:
    from streamcore.api.job import Job

__all__ = ["children", "explain", "source_for_topic"]


def children(job: Job) -> dict[int, list[Node]]:
    kids: dict[int, list[Node]] = {n.id: [] for n in job.nodes}
    for n in job.nodes:
        for p in n.parents:
            kids[p.id].append(n)
    return kids


def source_for_topic(job: Job, topic: str, app_id: str | None = None) -> Node:
    """The node whose chain processes records of topic: a source (by name, else by
    pattern) or a repartition step reading its internal topic back."""
    for node in job.repartitions:
        if job.internal_topic(node.params["name"], "repartition", app_id) == topic:
            return node
    for node in job.sources:
        assert node.source is not None
        if topic in node.source.topics:
            return node
    for node in job.sources:
        assert node.source is not None
        if node.source.pattern and re.search(node.source.subscription[0], topic):
            return node
    raise JobDefinitionError(f"no source of job {job.name!r} reads topic {topic!r}")


def explain(job: Job) -> str:
    """The job graph as indented text, one line per step, sources first."""
    kids = children(job)
    lines: list[str] = [f"Job {job.name!r}"]
    seen: set[int] = set()

    def walk(node: Node, depth: int) -> None:
        mark = " (shared, see above)" if node.id in seen else ""
        lines.append("  " * depth + "└─ " + node.describe() + mark)
        if node.id in seen:
            return
        seen.add(node.id)
        for c in kids[node.id]:
            walk(c, depth + 1)

    for src in job.sources:
        walk(src, 1)
    return "\n".join(lines)
