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

An aggregate whose one child is a sink, right after the run (W2's shape: ``aggregate(...)
.to(sink)``), is fused too (:class:`FusedAggregate`): the state updates of
the rows before the batch's first failure run in one loop, one cache call per record, and the
sink writes their new states from columns. Their state being updated, every one of those rows
is written, even by a task that is stopping. The rows from the first failure on go through the
closures record by record, so that a failure under ``"fail"`` finds nothing after it in the
state, as in record-at-a-time execution.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from itertools import compress
from typing import Any

from connectors.base import Message, ProducerBackend
from streamcore.core.serde import BYTES, INTERNAL_KEY, KEY
from streamcore.plan.graph import Node, OpKind
from streamcore.plan.physical import PhysicalPlan
from streamcore.runtime.context import ZERO_TIME_ON_KAFKA, Emit, PartitionContext, StepFailed
from streamcore.runtime.operators import compile_chain
from streamcore.runtime.records import ChainRunner
from streamcore.runtime.tracking import Batch

__all__ = ["BatchRunner", "BatchedChain", "Columns", "FusedAggregate", "FusedRun", "SinkColumns",
           "decode", "fusable_run", "produce_rows"]

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
    key, value and timestamp. ``failed`` maps an index to the failure taken out.
    ``raw_keys``: every key is still the fetched one, bytes or None (no key deserializer, no
    key_by since), so a sink that writes keys as bytes needs no look at them."""

    __slots__ = ("failed", "idx", "keys", "raw_keys", "tss", "values")

    def __init__(self, idx: list[int], keys: list[Any], values: list[Any],
                 tss: list[int], *, raw_keys: bool = False) -> None:
        self.idx, self.keys, self.values, self.tss = idx, keys, values, tss
        self.raw_keys = raw_keys
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
           ts_of: Callable[[Any], int] | None, internal: bool = False) -> Columns:
    """The fetched messages as columns: keys and values deserialized, timestamps taken (an
    internal topic's ZERO_TIME_ON_KAFKA read as 0)."""
    n = len(msgs)
    try:
        values = [None if (raw := m.value()) is None else vde(raw) for m in msgs]
        keys = [m.key() for m in msgs]
        if kde is not None:
            keys = [None if k is None else kde(k) for k in keys]
        cols = Columns(list(range(n)), keys, values, [], raw_keys=kde is None)
    except Exception:
        cols = _decode_one_by_one(msgs, vde, kde)
    if ts_of is None:
        cols.tss = [msgs[i].timestamp()[1] for i in cols.idx] if cols.failed else \
            [m.timestamp()[1] for m in msgs]
        if internal and ZERO_TIME_ON_KAFKA in cols.tss:
            cols.tss = [0 if t == ZERO_TIME_ON_KAFKA else t for t in cols.tss]
    else:
        try:
            cols.tss = [ts_of(v) for v in cols.values]
        except Exception:
            cols.tss = [0] * len(cols.idx)
            cols.tss = cols.one_by_one(ts_of, "timestamp", None)
    return cols


def _decode_one_by_one(msgs: list[Message], vde: Callable[[bytes], Any],
                       kde: Callable[[bytes], Any] | None) -> Columns:
    cols = Columns([], [], [], [], raw_keys=kde is None)
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
                    cols.raw_keys = False
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
            cols.raw_keys = False
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
        self.internal = node.kind == OpKind.REPARTITION  # event time 0 must survive it
        self.headers = sink.headers
        self._vser = sink.value.serialize
        self._kser = sink.key.serialize
        self._raw_keys = sink.key in (BYTES, KEY)

    def serialize(self, cols: Columns) -> tuple[list[Any], list[Any]] | None:
        vser, kser = self._vser, self._kser
        try:
            vs = [None if v is None else vser(v) for v in cols.values]
            if self._raw_keys and cols.raw_keys:
                ks = cols.keys
            elif self._raw_keys:
                ks = [k if k is None or type(k) is bytes else kser(k) for k in cols.keys]
            else:
                ks = [None if k is None else kser(k) for k in cols.keys]
        except Exception:
            return None
        if self.internal and 0 in cols.tss:
            cols.tss = [t or ZERO_TIME_ON_KAFKA for t in cols.tss]
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
    try:  # two loops, so that the common one passes no headers argument at all
        if headers:
            for i, k, v, t in rows:
                produce(topic, v, k, -1, ack, None, t, msgs[i].headers())
        else:
            for i, k, v, t in rows:  # noqa: B007 (the handlers below read i)
                produce(topic, v, k, -1, ack, None, t)
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


class FusedAggregate:
    """An aggregate step whose one child is a sink, after the fused run (see
    the module docstring). The step's closure still takes the rows that :meth:`update`
    leaves."""

    def __init__(self, node: Node, sink: Node, ctx: PartitionContext,
                 built: dict[int, Emit]) -> None:
        assert node.name is not None and sink.sink is not None and node.fn is not None
        self._apply = ctx.caches[node.name].update
        self._fn = node.fn
        self._step, self._policy = node.describe(), node.params.get("on_error")
        topic = sink.sink.topic
        self.sink = SinkColumns(sink, topic)
        self.counter = next(c for c in ctx.sinks if c.topic == topic)
        self.write = built[sink.id]  # the sink's closure: the exact error of what it refuses

    @staticmethod
    def fits(plan: PhysicalPlan, node: Node, ctx: PartitionContext) -> Node | None:
        """The sink node if node is an aggregate this class can take, else None."""
        # Epoch mode's update_state_by_key gathers a key's values until the epoch ends
        # (operators._make_epoch_update): nothing to update per record.
        if node.kind != OpKind.AGGREGATE or node.params.get("event_time") \
                or (ctx.epochs and node.params.get("batch_fn") is not None) \
                or node.name not in ctx.caches:
            return None
        kids = plan.children[node.id]
        return kids[0] if len(kids) == 1 and kids[0].kind == OpKind.TO else None

    def update(self, cols: Columns) -> Columns:
        """Apply the step to the rows of cols before its first failure, in order, and take
        them out of cols: returned as columns whose values are their new states. A row the
        step raises on ends them; it is taken out of cols too, its failure noted."""
        first = min(cols.failed) if cols.failed else None
        upto = len(cols.idx) if first is None else bisect_left(cols.idx, first)
        apply, fn, kser = self._apply, self._fn, INTERNAL_KEY.serialize
        keys, values = cols.keys, cols.values
        news: list[Any] = []
        try:
            for j in range(upto):
                news.append(apply(kser(keys[j]), fn, values[j]))
        except Exception as exc:
            failed = StepFailed(self._step, self._policy, exc)
            failed.__cause__ = exc
            cols.failed[cols.idx[len(news)]] = failed
            upto = len(news) + 1
        n = len(news)
        head = Columns(cols.idx[:n], keys[:n], news, cols.tss[:n], raw_keys=cols.raw_keys)
        cols.idx, cols.keys = cols.idx[upto:], keys[upto:]
        cols.values, cols.tss = values[upto:], cols.tss[upto:]
        return head


class BatchedChain:
    """What batch-at-a-time execution of one partition's chain needs: the fused run, and
    either a sink that ends it (written from columns) or the closure of what follows."""

    def __init__(self, plan: PhysicalPlan, source: Node, ctx: PartitionContext,
                 built: dict[int, Emit]) -> None:
        steps, after = fusable_run(plan, source)
        self.run = FusedRun(steps)
        self.sink: SinkColumns | None = None
        self.agg: FusedAggregate | None = None
        self.tail: Emit = _nowhere
        if after is None:
            return
        # The closures compiled for the whole chain: never a second copy of a step.
        self.tail = compile_chain(plan, source, ctx, start=after, built=built)
        agg_sink = FusedAggregate.fits(plan, after, ctx)
        if agg_sink is not None:
            self.agg = FusedAggregate(after, agg_sink, ctx, built)
            return
        if after.kind == OpKind.TO or (after.kind == OpKind.REPARTITION and after is not source):
            assert after.sink is not None
            topic = plan.repartition_topic(after) if after.kind == OpKind.REPARTITION \
                else after.sink.topic
            # The sink's closure counts its outputs there; the columns path counts on it too.
            self.counter = next(c for c in ctx.sinks if c.topic == topic)
            self.sink = SinkColumns(after, topic)


class BatchRunner(ChainRunner[BatchedChain]):
    """Takes one partition task's fetched batches through its :class:`BatchedChain`: decode,
    the fused steps, then the outputs (from columns where the chain allows, else through the
    closures), each failed record's policy applied at its place. Owned by the partition task;
    event loop only."""

    async def take(self, msgs: list[Message], batch: Batch,
                   vde: Callable[[bytes], Any], kde: Callable[[bytes], Any] | None,
                   ts_of: Callable[[Any], int] | None) -> int:
        """Decode, the fused steps over the whole batch, then each surviving record to what
        follows, in order, with the policy of each failed record applied at its place.
        Returns how many of msgs were taken (fewer when the task stops while waiting for room
        in the producer)."""
        b = self.chain
        ctx = self.ctx
        cols = decode(msgs, vde, kde, ts_of, self.internal)
        b.run.apply(cols)
        if b.agg is not None:  # the head of the batch through the fused aggregate; cols the rest
            head = b.agg.update(cols)
            if head.idx:
                await self._write_aggregated(msgs, batch, head)
        elif b.sink is not None:
            serialized = b.sink.serialize(cols)
            if serialized is not None:
                return await self._write_columns(msgs, batch, cols, serialized, b.sink,
                                                 b.counter, stop_early=True)
        failed = cols.failed
        order = sorted(failed)
        nf, fi = len(order), 0
        tail = b.tail
        for i, k, v, t in zip(cols.idx, cols.keys, cols.values, cols.tss, strict=True):
            while fi < nf and order[fi] < i:
                self._failed(msgs[order[fi]], failed[order[fi]])
                fi += 1
            m = ctx.msg = msgs[i]
            try:
                tail(k, v, t)
            except StepFailed as step_failed:
                self._failed(m, step_failed)
            except Exception:
                batch.seal((m.offset() or 0) - 1)  # as record-at-a-time execution does
                raise
            if ctx.blocked and await self._unblocked(batch):
                return i + 1
        return await self._failed_after(msgs, batch, order[fi:], failed)

    async def _write_columns(self, msgs: list[Message], batch: Batch, cols: Columns,
                             serialized: tuple[list[Any], list[Any]], sink: SinkColumns,
                             counter: Any, *, stop_early: bool) -> int:
        """A batch whose chain ends in a sink after the fused steps: its serialized outputs to
        the producer, each failed record's policy at its place. A full queue is waited out;
        with stop_early, a task stopping meanwhile leaves the rest of the batch to the next
        owner. Returns how many of msgs were taken."""
        ctx = self.ctx
        failed = cols.failed
        order = sorted(failed)
        nf, fi = len(order), 0
        vs, ks = serialized
        topic, with_headers = sink.topic, sink.headers
        producer = ctx.producer
        produce, held, ack = producer.produce, ctx.outbox.held, batch.ack
        rows: Iterable[tuple[int, Any, Any, int]]
        if not failed and not held:  # all at once; what it hands back goes on below
            rows = produce_rows(cols, ks, vs, msgs, with_headers, producer, topic, batch,
                                counter)
        else:
            rows = zip(cols.idx, ks, vs, cols.tss, strict=True)
        for i, k, v, t in rows:  # failures in between, or what a full queue refused
            while fi < nf and order[fi] < i:
                self._failed(msgs[order[fi]], failed[order[fi]])
                fi += 1
            m = msgs[i]
            h = m.headers() if with_headers else None
            batch.pending += 1
            counter.n += 1
            if not held:  # Outbox.send, inlined (as the sink's closure does)
                try:
                    produce(topic, v, k, -1, ack, None, t, h)
                    continue
                except BufferError:
                    pass
                except Exception as exc:
                    batch.seal((m.offset() or 0) - 1)
                    raise producer.delivery_error(topic, exc) from exc
            held.append((topic, v, k, -1, ack, t, h))
            ctx.blocked = True
            ctx.msg = m
            if await self._unblocked(batch) and stop_early:
                return i + 1
            produce = producer.produce  # epoch mode may have re-pointed it meanwhile
        return await self._failed_after(msgs, batch, order[fi:], failed)

    async def _write_aggregated(self, msgs: list[Message], batch: Batch,
                                head: Columns) -> None:
        """The new states of the rows a fused aggregate updated, to its sink, every one of
        them (their state is updated: a stopping task still writes them)."""
        agg = self.chain.agg
        assert agg is not None
        serialized = agg.sink.serialize(head)
        if serialized is not None:
            await self._write_columns(msgs, batch, head, serialized, agg.sink, agg.counter,
                                      stop_early=False)
            return
        ctx = self.ctx  # a state the sink's serde refuses: its closure raises the exact error
        for i, k, v, t in zip(head.idx, head.keys, head.values, head.tss, strict=True):
            m = ctx.msg = msgs[i]
            try:
                agg.write(k, v, t)
            except Exception:
                batch.seal((m.offset() or 0) - 1)
                raise
            if ctx.blocked:
                await self._unblocked(batch)

    async def _failed_after(self, msgs: list[Message], batch: Batch, rest: list[int],
                            failed: dict[int, StepFailed]) -> int:
        """The policies of the failed records after the last output, then all of msgs are
        taken."""
        ctx = self.ctx
        for i in rest:
            ctx.msg = msgs[i]
            self._failed(msgs[i], failed[i])
        if ctx.blocked:  # a dead-letter write waits for room like any output
            await ctx.wait_unblocked()
            ctx.batch = batch
        return len(msgs)


def _nowhere(key: Any, value: Any, ts: int) -> None:
    return None
