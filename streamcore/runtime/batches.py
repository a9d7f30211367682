"""Batch-at-a-time execution: a fetched batch goes through each stateless step in one call.

The chain compiled by streamcore.runtime.operators calls one closure per step per record. For
the linear run of stateless steps at the head of a chain (map, filter, key_by, peek,
with_timestamps), that is a Python frame per step per record; here each step is one list
comprehension over the whole batch instead, and a sink that ends the run serializes the batch
in two more. What follows the run (a stateful step, a join, map_async, a fan-out) still takes
the surviving records one at a time, in order.

What stays exactly as in record-at-a-time execution: the records and outputs emitted, their
order, the order of dead-letter writes among them, each failure's step and record, and where
a failing record under ``on_error="fail"`` stops the batch (nothing at or after it is done).
What differs: a step runs over the whole batch before the next step starts, so user functions
with side effects (peek) see records step by step rather than record by record, and under
``"fail"`` steps may already have run on records after the failing one (none of their outputs
is written). ``WorkerConfig(batch_execution=False)`` keeps record-at-a-time execution.

A step that raises on some record is rerun record by record for that batch, to find every
failing record; each is taken out of the batch and its policy applied at its position when the
batch is emitted.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import compress
from typing import Any

from connectors.base import Message, ProducerBackend
from streamcore.core.serde import BYTES, KEY
from streamcore.plan.graph import Node, OpKind
from streamcore.plan.physical import PhysicalPlan
from streamcore.runtime.context import Emit, PartitionContext, StepFailed
from streamcore.runtime.operators import compile_chain
from streamcore.runtime.tracking import Batch

__all__ = ["BatchedChain", "Columns", "FusedRun", "SinkColumns", "decode", "fusable_run",
           "produce_rows"]

_FUSABLE = frozenset({OpKind.MAP, OpKind.FILTER, OpKind.KEY_BY, OpKind.PEEK,
                      OpKind.WITH_TIMESTAMPS})


def fusable_run(plan: PhysicalPlan, source: Node) -> tuple[list[Node], Node | None]:
    """The linear run of stateless steps right below source, and the node that takes the
    records after it (None: nothing does). A step with several children is not fused: it is
    the node after the run. When source itself fans out, the run is empty and the node
    after it is source (its whole chain takes the records)."""
    kids = plan.children[source.id]
    if len(kids) != 1:
        return [], source if kids else None
    run: list[Node] = []
    node = kids[0]
    while node.kind in _FUSABLE and len(plan.children[node.id]) <= 1:
        run.append(node)
        kids = plan.children[node.id]
        if not kids:
            return run, None
        node = kids[0]
    return run, node


class Columns:
    """A batch as parallel lists: the index of each record in the fetched batch, and its
    key, value and timestamp. ``failed`` maps an index to the failure taken out."""

    __slots__ = ("failed", "idx", "keys", "tss", "values")

    def __init__(self, idx: list[int], keys: list[Any], values: list[Any],
                 tss: list[int]) -> None:
        self.idx, self.keys, self.values, self.tss = idx, keys, values, tss
        self.failed: dict[int, StepFailed] = {}

    def keep(self, flags: list[Any]) -> None:
        """Keep the records whose flag is true."""
        self.idx = list(compress(self.idx, flags))
        self.keys = list(compress(self.keys, flags))
        self.values = list(compress(self.values, flags))
        self.tss = list(compress(self.tss, flags))

    def one_by_one(self, fn: Callable[[Any], Any], step: str,
                   policy: str | None) -> list[Any]:
        """fn over the values, record by record: a record it raises on is taken out, its
        failure noted. Returns the results of the others."""
        out: list[Any] = []
        ok: list[bool] = []
        for i, v in zip(self.idx, self.values, strict=True):
            try:
                out.append(fn(v))
                ok.append(True)
            except Exception as exc:
                failed = StepFailed(step, policy, exc)
                failed.__cause__ = exc
                self.failed[i] = failed
                ok.append(False)
        if not all(ok):
            self.keep(ok)
        return out


def decode(msgs: list[Message], vde: Callable[[bytes], Any],
           kde: Callable[[bytes], Any] | None,
           ts_of: Callable[[Any], int] | None) -> Columns:
    """The fetched messages as columns: keys and values deserialized, timestamps taken."""
    n = len(msgs)
    try:
        values = [None if (raw := m.value()) is None else vde(raw) for m in msgs]
        keys = [m.key() for m in msgs]
        if kde is not None:
            keys = [None if k is None else kde(k) for k in keys]
        cols = Columns(list(range(n)), keys, values, [])
    except Exception:
        cols = _decode_one_by_one(msgs, vde, kde)
    if ts_of is None:
        cols.tss = [msgs[i].timestamp()[1] for i in cols.idx] if cols.failed else \
            [m.timestamp()[1] for m in msgs]
    else:
        try:
            cols.tss = [ts_of(v) for v in cols.values]
        except Exception:
            cols.tss = [0] * len(cols.idx)
            cols.tss = cols.one_by_one(ts_of, "timestamp", None)
    return cols


def _decode_one_by_one(msgs: list[Message], vde: Callable[[bytes], Any],
                       kde: Callable[[bytes], Any] | None) -> Columns:
    cols = Columns([], [], [], [])
    for i, m in enumerate(msgs):
        try:
            raw = m.value()
            value = None if raw is None else vde(raw)
            key = m.key()
            if kde is not None and key is not None:
                key = kde(key)
        except Exception as exc:
            failed = StepFailed("deserialize", None, exc)
            failed.__cause__ = exc
            cols.failed[i] = failed
            continue
        cols.idx.append(i)
        cols.keys.append(key)
        cols.values.append(value)
    return cols


class FusedRun:
    """The fused stateless steps: apply(cols) runs each over the whole batch."""

    def __init__(self, steps: list[Node]) -> None:
        self._steps: list[tuple[str, Any, str, str | None]] = [
            (n.kind, n.fn, n.describe(), n.params.get("on_error")) for n in steps]

    def __len__(self) -> int:
        return len(self._steps)

    def apply(self, cols: Columns) -> None:
        for kind, fn, step, policy in self._steps:
            if not cols.idx:
                return
            values = cols.values
            try:
                if kind == OpKind.MAP:
                    cols.values = [fn(v) for v in values]
                elif kind == OpKind.FILTER:
                    flags = [fn(v) for v in values]
                    if not all(flags):
                        cols.keep(flags)
                elif kind == OpKind.KEY_BY:
                    cols.keys = [fn(v) for v in values]
                elif kind == OpKind.PEEK:
                    for v in values:
                        fn(v)
                else:  # WITH_TIMESTAMPS
                    cols.tss = [int(fn(v)) for v in values]
                continue
            except Exception:
                pass
            self._one_by_one(cols, kind, fn, step, policy)

    @staticmethod
    def _one_by_one(cols: Columns, kind: str, fn: Any, step: str,
                    policy: str | None) -> None:
        """The step again, record by record, after it raised on some record of the batch.
        (A peek's function may so run twice on the records before the failing one.)"""
        if kind == OpKind.MAP:
            cols.values = cols.one_by_one(fn, step, policy)
        elif kind == OpKind.FILTER:
            flags = cols.one_by_one(fn, step, policy)
            if not all(flags):
                cols.keep(flags)
        elif kind == OpKind.KEY_BY:
            cols.keys = cols.one_by_one(fn, step, policy)
        elif kind == OpKind.PEEK:
            cols.one_by_one(fn, step, policy)
        else:
            cols.tss = cols.one_by_one(lambda v: int(fn(v)), step, policy)


class SinkColumns:
    """A sink at the end of a fused run: keys and values serialized for the whole batch.
    ``serialize`` answers None when some record cannot be serialized; the caller then
    writes record by record through the sink's closure, which raises the exact error."""

    def __init__(self, node: Node, topic: str) -> None:
        sink = node.sink
        assert sink is not None
        self.topic = topic
        self.headers = sink.headers
        self._vser = sink.value.serialize
        self._kser = sink.key.serialize
        self._raw_keys = sink.key in (BYTES, KEY)

    def serialize(self, cols: Columns) -> tuple[list[Any], list[Any]] | None:
        vser, kser = self._vser, self._kser
        try:
            vs = [None if v is None else vser(v) for v in cols.values]
            if self._raw_keys:
                ks = [k if k is None or type(k) is bytes else kser(k) for k in cols.keys]
            else:
                ks = [None if k is None else kser(k) for k in cols.keys]
        except Exception:
            return None
        return vs, ks


def produce_rows(cols: Columns, ks: list[Any], vs: list[Any], msgs: list[Message],
                 headers: bool, producer: ProducerBackend, topic: str, batch: Batch,
                 counter: Any) -> list[tuple[int, Any, Any, int]]:
    """Hand a batch's serialized outputs to the producer, each with the batch's
    acknowledgement (and its input record's headers if the sink passes them on): the fast
    path for a batch with no failure among its records.

    The batch's pending count and the sink's counter are raised once for all rows, not per
    row: nothing acknowledges an output before the next ``producer.poll``, which cannot run
    here (no await). A full queue (BufferError) at some row returns the rows (index, key,
    value, timestamp) not handed over, that one first, with their counts taken back: the
    caller's record-by-record loop tries it again and holds it until there is room. Any
    other refusal seals the batch before that record and raises, as that loop does.
    """
    n = len(vs)
    batch.pending += n
    counter.n += n
    produce, ack = producer.produce, batch.ack
    rows = zip(cols.idx, ks, vs, cols.tss, strict=True)
    for i, k, v, t in rows:
        try:
            produce(topic, v, k, -1, ack, None, t, msgs[i].headers() if headers else None)
        except BufferError:
            left = [(i, k, v, t), *rows]
            batch.pending -= len(left)
            counter.n -= len(left)
            return left
        except Exception as exc:
            unsent = len(list(rows))  # the refused record stays counted, never acknowledged
            batch.pending -= unsent
            counter.n -= unsent
            batch.seal((msgs[i].offset() or 0) - 1)
            raise producer.delivery_error(topic, exc) from exc
    return []


class BatchedChain:
    """What batch-at-a-time execution of one partition's chain needs: the fused run, and
    either a sink that ends it (written from columns) or the closure of what follows."""

    def __init__(self, plan: PhysicalPlan, source: Node, ctx: PartitionContext,
                 built: dict[int, Emit]) -> None:
        steps, after = fusable_run(plan, source)
        self.run = FusedRun(steps)
        self.sink: SinkColumns | None = None
        self.tail: Emit = _nowhere
        if after is None:
            return
        # The closures compiled for the whole chain: never a second copy of a step.
        self.tail = compile_chain(plan, source, ctx, start=after, built=built)
        if after.kind == OpKind.TO or (after.kind == OpKind.REPARTITION and after is not source):
            assert after.sink is not None
            topic = plan.repartition_topic(after) if after.kind == OpKind.REPARTITION \
                else after.sink.topic
            # The sink's closure counts its outputs there; the columns path counts on it too.
            self.counter = next(c for c in ctx.sinks if c.topic == topic)
            self.sink = SinkColumns(after, topic)


def _nowhere(key: Any, value: Any, ts: int) -> None:
    return None
