"""The logical job graph: what the user declared, before anything runs.

Nodes are immutable once built. Each node knows its parents; a plan derives the children.
The runtime compiles them into per-partition operator chains (streamcore.runtime.operators).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from connectors.spec import Sink, Source

__all__ = ["Node", "OpKind", "upstream"]

_ids = itertools.count()
_SHOWN = ("name", "index", "concurrency", "on_error", "op", "how", "partitions", "topic")


class OpKind:
    SOURCE = "source"
    MAP = "map"
    MAP_ASYNC = "map_async"
    FLAT_MAP = "flat_map"
    FILTER = "filter"
    PEEK = "peek"
    KEY_BY = "key_by"
    WITH_TIMESTAMPS = "with_timestamps"
    UNION = "union"
    BRANCH = "branch"  # one node per branch output; params["index"] says which
    TO = "to"
    FOREACH = "foreach"
    FOREACH_BATCH = "foreach_batch"  # fn(records, epoch_id) once per epoch (epoch mode)
    # Stateful and internal steps (params["name"] is the stable step name).
    REPARTITION = "repartition"  # a sink to an internal topic and the source reading it back
    AGGREGATE = "aggregate"  # reduce, aggregate, count, update_state_by_key: params["update"]
    TABLE = "table"  # a table read from a compacted topic (job.table); not part of a chain
    JOIN = "join"  # stream-table join: params["table"] is the TABLE node
    WITH_WATERMARK = "with_watermark"  # params["delay_ms"]: the task tracks event time here
    EMIT = "emit"  # a table's changes in an output mode: params["mode"]


@dataclass(frozen=True, eq=False)
class Node:
    kind: str
    parents: tuple[Node, ...] = ()
    fn: Callable[..., Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    source: Source | None = None
    sink: Sink | None = None
    id: int = field(default_factory=lambda: next(_ids))

    def describe(self) -> str:
        if self.kind == OpKind.SOURCE and self.source is not None:
            return self.source.describe()
        if self.kind == OpKind.TO and self.sink is not None:
            return self.sink.describe()
        if self.kind == OpKind.AGGREGATE:
            return f"{self.params['op']}(name={self.params['name']})"
        label = self.params.get("label")
        if label is not None:  # the user's name for the step: errors, explain, DLQ headers
            return f"{self.kind}({label})"
        name = getattr(self.fn, "__name__", "") if self.fn is not None else ""
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items()
                          if k in _SHOWN and v is not None)
        inner = ", ".join(x for x in (name, extra) if x)
        return f"{self.kind}({inner})"

    @property
    def terminal(self) -> bool:
        return self.kind in (OpKind.TO, OpKind.FOREACH, OpKind.FOREACH_BATCH)

    @property
    def name(self) -> str | None:
        """The stable step name of a stateful or internal step."""
        name = self.params.get("name")
        return name if isinstance(name, str) else None


def upstream(node: Node, *, through: Callable[[Node], bool] | None = None) -> Iterator[Node]:
    """Every node whose records reach node, once each, nearest first along each path; with
    through, the walk goes past only the nodes for which it is true."""
    stack, seen = list(node.parents), set()
    while stack:
        n = stack.pop()
        if n.id in seen:
            continue
        seen.add(n.id)
        yield n
        if through is None or through(n):
            stack.extend(n.parents)
