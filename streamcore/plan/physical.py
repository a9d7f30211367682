"""The physical plan: a logical plan laid out for one application id (the consumer group).

The planner splits the graph into sub-topologies at repartition topics, as Kafka Streams
does: each sub-topology reads its input topics (a source's, or a repartition topic read
back) and runs, per partition, the steps reachable from them without crossing another
repartition topic. It names every internal topic after the application id (two groups
running one job never share one) and says which store each stateful step keeps and which
changelog backs it. The runtime runs this plan and reads nothing else; ``explain()`` prints
it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from streamcore.core.errors import JobDefinitionError
from streamcore.plan.graph import Node, OpKind
from streamcore.plan.logical import LogicalPlan

__all__ = ["PhysicalPlan", "SubTopology", "internal_topic", "plan"]


def internal_topic(app_id: str, name: str, suffix: str) -> str:
    """``{app_id}-{name}-{suffix}``: the application id first, as in Kafka Streams."""
    return f"{app_id}-{name}-{suffix}"


@dataclass(frozen=True)
class SubTopology:
    index: int
    roots: tuple[Node, ...]  # sources, or repartition steps read back from their topic
    inputs: tuple[str, ...]  # the topics (or patterns) it reads
    steps: tuple[Node, ...]  # every step it runs, in declaration order
    stores: tuple[tuple[str, str], ...]  # (stateful step, its changelog topic)
    outputs: tuple[str, ...]  # topics it writes: sinks and repartition topics


@dataclass(frozen=True)
class PhysicalPlan:
    logical: LogicalPlan
    app_id: str
    subtopologies: tuple[SubTopology, ...] = field(default=())

    # -- what the logical plan says ------------------------------------------------------
    @property
    def name(self) -> str:
        return self.logical.name

    @property
    def nodes(self) -> tuple[Node, ...]:
        return self.logical.nodes

    @property
    def sources(self) -> tuple[Node, ...]:
        return self.logical.sources

    @property
    def on_error(self) -> str:
        return self.logical.on_error

    @property
    def repartitions(self) -> list[Node]:
        return self.logical.repartitions

    @property
    def tables(self) -> list[Node]:
        return self.logical.tables

    @property
    def stateful(self) -> list[Node]:
        return self.logical.stateful

    @property
    def dlq_topic(self) -> str:
        return self.logical.dlq_topic

    @property
    def uses_dead_letter(self) -> bool:
        return self.logical.uses_dead_letter

    @cached_property
    def children(self) -> dict[int, list[Node]]:
        return self.logical.children()

    # -- laid out for the application id -------------------------------------------------
    def internal_topic(self, name: str, suffix: str) -> str:
        return internal_topic(self.app_id, name, suffix)

    def repartition_topic(self, node: Node) -> str:
        return self.internal_topic(node.params["name"], "repartition")

    def changelog_topic(self, step: str) -> str:
        return self.internal_topic(step, "changelog")

    def subscription(self) -> list[str]:
        """Every topic the worker's consumer subscribes to: inputs and repartition topics."""
        topics = [t for n in self.sources for t in n.source.subscription]  # type: ignore[union-attr]
        return topics + [self.repartition_topic(n) for n in self.repartitions]

    def source_for_topic(self, topic: str) -> Node:
        """The root whose chain processes records of topic: a source (by name, else by
        pattern) or a repartition step reading its internal topic back."""
        for node in self.repartitions:
            if self.repartition_topic(node) == topic:
                return node
        for node in self.sources:
            assert node.source is not None
            if topic in node.source.topics:
                return node
        for node in self.sources:
            assert node.source is not None
            if node.source.pattern and re.search(node.source.subscription[0], topic):
                return node
        raise JobDefinitionError(f"no source of job {self.name!r} reads topic {topic!r}")

    def explain(self) -> str:
        lines = [f"Job {self.name!r} (application id {self.app_id!r})"]
        for sub in self.subtopologies:
            lines.append(f"  Sub-topology {sub.index}: reads {', '.join(sub.inputs)}")
            shown: set[int] = set()
            for r in sub.roots:
                self._walk(r, 0, True, shown, lines)
        for t in self.tables:
            lines.append(f"  Global table {t.name!r}: every worker keeps all of "
                         f"{t.params['topic']}")
        internal = [self.repartition_topic(n) for n in self.repartitions] + \
                   [f"{self.changelog_topic(n.name or '')} (compacted)" for n in self.stateful]
        if internal:
            lines.append(f"  Internal topics: {', '.join(internal)}")
        return "\n".join(lines)

    def _walk(self, node: Node, depth: int, root: bool, shown: set[int],
              lines: list[str]) -> None:
        again = node.id in shown
        lines.append("    " + "  " * depth + "└─ " + self._describe(node, root)
                     + (" (shared, see above)" if again else ""))
        if again or (node.kind == OpKind.REPARTITION and not root):
            return
        shown.add(node.id)
        for c in self.children[node.id]:
            self._walk(c, depth + 1, False, shown, lines)

    def _describe(self, node: Node, root: bool) -> str:
        text = node.describe()
        if node.kind == OpKind.REPARTITION:
            topic = self.repartition_topic(node)
            return f"{text} <- {topic}" if root else f"{text} -> {topic}"
        if node.kind == OpKind.AGGREGATE and node.name is not None:
            return f"{text} [store {node.name!r}, changelog {self.changelog_topic(node.name)}]"
        return text


def plan(logical: LogicalPlan, app_id: str | None = None) -> PhysicalPlan:
    """Lay the logical plan out for app_id (default: the job's name)."""
    skeleton = PhysicalPlan(logical, app_id or logical.name)
    kids = logical.children()
    order = {n.id: i for i, n in enumerate(logical.nodes)}
    roots = [*logical.sources, *logical.repartitions]
    # The steps each root runs: everything reachable from it, stopping at repartition steps
    # (their records go on in the sub-topology that reads their topic).
    body: dict[int, set[int]] = {}
    for r in roots:
        seen: set[int] = set()
        stack = [r]
        while stack:
            n = stack.pop()
            if n.id in seen or (n.kind == OpKind.REPARTITION and n is not r):
                continue
            seen.add(n.id)
            stack.extend(kids[n.id])
        body[r.id] = seen
    # Roots whose steps meet (a union of two sources) run in one sub-topology.
    groups: list[tuple[list[Node], set[int]]] = []
    for r in roots:
        members, ids = [r], set(body[r.id])
        for g in [g for g in groups if g[1] & ids]:
            groups.remove(g)
            members += g[0]
            ids |= g[1]
        groups.append((members, ids))
    groups.sort(key=lambda g: min(order[x.id] for x in g[0]))
    subs: list[SubTopology] = []
    for i, (members, ids) in enumerate(groups):
        members.sort(key=lambda x: order[x.id])
        steps = tuple(n for n in logical.nodes if n.id in ids)
        inputs: list[str] = []
        for x in members:
            if x.kind == OpKind.REPARTITION:
                inputs.append(skeleton.repartition_topic(x))
            else:
                assert x.source is not None
                inputs.extend(x.source.subscription)
        outputs = [skeleton.repartition_topic(c) for n in steps for c in kids[n.id]
                   if c.kind == OpKind.REPARTITION]
        outputs += [n.sink.topic for n in steps if n.kind == OpKind.TO and n.sink is not None]
        stores = tuple((n.name, skeleton.changelog_topic(n.name)) for n in steps
                       if n.kind == OpKind.AGGREGATE and n.name is not None)
        subs.append(SubTopology(i, tuple(members), tuple(inputs), steps, stores,
                                tuple(outputs)))
    return PhysicalPlan(logical, skeleton.app_id, tuple(subs))
