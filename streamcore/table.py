"""Tables and the stateful steps that make them.

A :class:`Table` is a changelog stream with a store behind it: the latest value per key. It
comes from an aggregation of a stream (``count``, ``reduce``, ``aggregate``, ``count_by_value``,
``update_state_by_key``; one store per partition, restored from the step's changelog topic)
or from a compacted topic (``job.table(topic)``; every worker keeps the whole table, like
Kafka Streams' GlobalKTable, so a stream can be joined with it whatever its partitioning).

Each stateful step is one ``AGGREGATE`` node whose ``update(old_state, value)`` returns the
new state (None deletes the key). The helpers below turn the user's functions into that shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from connectors.kafka import KafkaSink, KafkaSource
from streamcore.errors import JobDefinitionError
from streamcore.graph import Node, OpKind

if TYPE_CHECKING:
    from streamcore.job import Job, Stream

__all__ = ["Table", "aggregate_update", "count_update", "reduce_update", "update_state_update"]

Update = Callable[[Any, Any], Any]


class Table:
    """The latest value per key. ``to_stream()`` is its stream of changes: one record
    (key, new value) per update, with value None when a key is deleted (a tombstone)."""

    def __init__(self, job: Job, node: Node) -> None:
        self._job = job
        self._node = node

    @property
    def name(self) -> str:
        return self._node.name or ""

    @property
    def from_topic(self) -> bool:
        """True for a table read from a topic (job.table), which streams can join."""
        return self._node.kind == OpKind.TABLE

    def to_stream(self) -> Stream:
        from streamcore.job import Stream

        if self.from_topic:
            p = self._node.params
            return self._job.stream(KafkaSource(p["topic"], key=p["key"], value=p["value"]))
        return Stream(self._job, self._node)

    def to(self, sink: KafkaSink) -> None:
        """Write every change to sink (deletes as tombstones): a compacted topic then holds
        the table."""
        self.to_stream().to(sink)

    def __repr__(self) -> str:
        return f"Table({self.name!r})"


def reduce_update(fn: Callable[[Any, Any], Any]) -> Update:
    def update(old: Any, value: Any) -> Any:
        return value if old is None else fn(old, value)
    update.__name__ = getattr(fn, "__name__", "reduce")
    return update


def aggregate_update(initializer: Callable[[], Any], adder: Callable[[Any, Any], Any]) -> Update:
    def update(old: Any, value: Any) -> Any:
        return adder(initializer() if old is None else old, value)
    update.__name__ = getattr(adder, "__name__", "aggregate")
    return update


def count_update(old: Any, value: Any) -> int:
    return 1 if old is None else int(old) + 1


def update_state_update(fn: Callable[[list[Any], Any], Any]) -> Update:
    # Spark's updateStateByKey(new_values, old_state). In continuous mode each record is its
    # own micro-batch, so new_values holds one value.
    def update(old: Any, value: Any) -> Any:
        return fn([value], old)
    update.__name__ = getattr(fn, "__name__", "update_state_by_key")
    return update


def check_join(table: Any, how: str) -> None:
    if not isinstance(table, Table):
        raise JobDefinitionError(f"join() takes a Table, got {table!r}")
    if how not in ("inner", "left"):
        raise JobDefinitionError(f"join how= must be 'inner' or 'left', got {how!r}")
    if not table.from_topic:
        raise JobDefinitionError(
            f"join() needs a table read from a topic (job.table); {table!r} is an aggregate: "
            "write it to a compacted topic with .to(...) and read that with job.table()")
