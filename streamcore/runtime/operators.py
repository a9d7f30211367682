"""Compile a job's logical graph into one operator chain per partition task.

Each node becomes a closure that does its work and calls the closures of its children
directly: no per-record graph walking, no per-record allocation beyond what the user's
functions make. Compiling per partition keeps per-partition resources (async lanes, and
state stores) private to the partition task that owns them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streamcore.core.errors import JobDefinitionError, SerializationError
from streamcore.core.serde import BYTES, INTERNAL_KEY, KEY
from streamcore.plan.graph import Node, OpKind
from streamcore.plan.physical import PhysicalPlan
from streamcore.runtime.context import (
    ZERO_TIME_ON_KAFKA,
    AsyncLane,
    BatchRecord,
    Emit,
    PartitionContext,
    SinkCounter,
    StepFailed,
)
from streamcore.runtime.timed import Dedup, GroupStates, TimedStep
from streamcore.runtime.tracking import Batch
from streamcore.runtime.windows import make_window

__all__ = ["compile_chain"]


def _noop(key: Any, value: Any, ts: int) -> None:
    return None


def compile_chain(plan: PhysicalPlan, source: Node, ctx: PartitionContext,
                  start: Node | None = None, built: dict[int, Emit] | None = None) -> Emit:
    """The entry closure for records of source (a root of one of the plan's sub-topologies),
    for the partition described by ctx; with start, the closure of that node below source
    (what takes the records after a fused run, streamcore.runtime.batches).

    built maps node ids to their closures: pass the dict of an earlier compile of the same
    chain to get its closures back rather than new ones (a stateful step compiled twice
    would open its store twice)."""
    kids = plan.children
    built = {} if built is None else built
    lanes_by_node: dict[int, list[AsyncLane]] = {}  # lanes at or below each node

    def fanout(node: Node, mode: str | None = None) -> Emit:
        """The closure that feeds node's children (with mode: only the children that take
        its table's changes in that output mode; the others as "update")."""
        chosen = [c for c in kids[node.id] if mode is None or _mode_of(c) == mode]
        downs = [entry(c) for c in chosen]
        below: list[AsyncLane] = []
        for c in chosen:
            below.extend(lanes_by_node[c.id])
        lanes_by_node[node.id] = below  # by mode: the caller joins them
        if not downs:
            return _noop
        if len(downs) == 1:
            return downs[0]
        many = tuple(downs)

        def fan(key: Any, value: Any, ts: int) -> None:
            # A failure in one branch is that branch's: its policy is applied here and
            # the record still reaches the branches after it.
            for d in many:
                try:
                    d(key, value, ts)
                except StepFailed as failed:
                    ctx.failed(failed)
        return fan

    def entry(node: Node) -> Emit:
        if node.id not in built:
            built[node.id] = _make(node, fanout, kids, ctx, lanes_by_node, node is source,
                                   plan)
        return built[node.id]

    return entry(start or source)


def _mode_of(child: Node) -> str:
    return child.params["mode"] if child.kind == OpKind.EMIT else "update"


def _make(node: Node, fanout: Callable[..., Emit], kids: dict[int, list[Node]],
          ctx: PartitionContext, lanes_by_node: dict[int, list[AsyncLane]],
          is_root: bool, plan: PhysicalPlan) -> Emit:
    k = node.kind
    fn: Any = node.fn
    if k == OpKind.BRANCH and "preds" in node.params:
        # The hub: children are the branch outputs, in predicate order.
        outs = sorted(kids[node.id], key=lambda n: n.params["index"])
        pairs = tuple(zip(node.params["preds"], [fanout(o) for o in outs], strict=True))
        lanes_by_node[node.id] = [ln for o in outs for ln in lanes_by_node[o.id]]

        def branch(key: Any, value: Any, ts: int) -> None:
            for pred, d in pairs:
                if pred(value):
                    d(key, value, ts)
                    return
        return branch

    if k == OpKind.TO or (k == OpKind.REPARTITION and not is_root):
        # A repartition step ends this chain with a write to its internal topic; the chain
        # of the task reading that topic back starts at the same node (is_root).
        lanes_by_node[node.id] = []
        topic = (plan.repartition_topic(node)
                 if k == OpKind.REPARTITION else None)
        return _make_sink(node, ctx, topic)

    if k == OpKind.AGGREGATE and node.params.get("event_time"):
        # Windows, dedup and group state: emit by output mode, watermark and timers.
        modes = {_mode_of(c) for c in kids[node.id]}
        by_mode = {m: fanout(node, m) for m in modes}
        lanes_by_node[node.id] = [ln for c in kids[node.id] for ln in lanes_by_node[c.id]]
        return _make_event_time_step(node, by_mode, ctx, node.describe(),
                                     node.params.get("on_error"))
    if k == OpKind.AGGREGATE and any(_mode_of(c) == "complete" for c in kids[node.id]):
        # Complete mode (epoch mode only): the whole table at the end of every epoch.
        complete = fanout(node, "complete")
        update = fanout(node, "update")
        lanes_by_node[node.id] = [ln for c in kids[node.id] for ln in lanes_by_node[c.id]]
        return _make_aggregate(node, update, ctx, node.describe(),
                               node.params.get("on_error"), complete)
    down = fanout(node)
    if k in (OpKind.SOURCE, OpKind.UNION, OpKind.BRANCH, OpKind.REPARTITION, OpKind.EMIT):
        return down
    if k == OpKind.WITH_WATERMARK:
        return _make_with_watermark(node, down, ctx)
    # Each closure wraps only the user's call, so a failure names its own step and the
    # downstream steps' failures pass through untouched. try costs nothing until it raises.
    step, policy = node.describe(), node.params.get("on_error")
    if k == OpKind.MAP:
        def map_(key: Any, value: Any, ts: int) -> None:
            try:
                out = fn(value)
            except Exception as exc:
                raise StepFailed(step, policy, exc) from exc
            down(key, out, ts)
        return map_
    if k == OpKind.FILTER:
        def filter_(key: Any, value: Any, ts: int) -> None:
            try:
                keep = fn(value)
            except Exception as exc:
                raise StepFailed(step, policy, exc) from exc
            if keep:
                down(key, value, ts)
        return filter_
    if k == OpKind.FLAT_MAP:
        def flat_map(key: Any, value: Any, ts: int) -> None:
            try:
                outs = list(fn(value))  # a generator raising half-way is the step's failure
            except Exception as exc:
                raise StepFailed(step, policy, exc) from exc
            for v in outs:  # each output is a record of its own downstream
                try:
                    down(key, v, ts)
                except StepFailed as failed:
                    ctx.failed(failed)
        return flat_map
    if k == OpKind.PEEK:
        def peek(key: Any, value: Any, ts: int) -> None:
            try:
                fn(value)
            except Exception as exc:
                raise StepFailed(step, policy, exc) from exc
            down(key, value, ts)
        return peek
    if k == OpKind.KEY_BY:
        def key_by(key: Any, value: Any, ts: int) -> None:
            try:
                new_key = fn(value)
            except Exception as exc:
                raise StepFailed(step, policy, exc) from exc
            down(new_key, value, ts)
        return key_by
    if k == OpKind.WITH_TIMESTAMPS:
        def with_timestamps(key: Any, value: Any, ts: int) -> None:
            try:
                new_ts = int(fn(value))
            except Exception as exc:
                raise StepFailed(step, policy, exc) from exc
            down(key, value, new_ts)
        return with_timestamps
    if k == OpKind.FOREACH_BATCH:
        collected = ctx.collected.setdefault(node.id, [])
        add = collected.append

        def foreach_batch(key: Any, value: Any, ts: int) -> None:
            add(BatchRecord(key, value, ts))  # given to fn at the end of the epoch
        return foreach_batch
    if k == OpKind.FOREACH:
        def foreach(key: Any, value: Any, ts: int) -> None:
            try:
                fn(value)
            except Exception as exc:
                raise StepFailed(step, policy, exc) from exc
        return foreach
    if k == OpKind.AGGREGATE:
        return _make_aggregate(node, down, ctx, step, policy)
    if k == OpKind.JOIN:
        table = ctx.tables[node.params["table"].id]
        lookup = table.get
        inner = node.params["how"] == "inner"

        def join(key: Any, value: Any, ts: int) -> None:
            try:
                other = lookup(key)
                if other is None and inner:
                    return
                out = (value, other) if fn is None else fn(value, other)
            except Exception as exc:
                raise StepFailed(step, policy, exc) from exc
            down(key, out, ts)
        return join
    if k == OpKind.MAP_ASYNC:
        lane = AsyncLane(fn, node.params["concurrency"], down, ctx, step, policy)
        lane.downstream = list(lanes_by_node[node.id])
        lanes_by_node[node.id] = [lane, *lanes_by_node[node.id]]
        ctx.lanes.append(lane)
        return lane.submit
    raise JobDefinitionError(f"unknown operation {k!r}")


def _make_event_time_step(node: Node, outs: dict[str, Emit], ctx: PartitionContext,
                          step: str, policy: str | None) -> Emit:
    """Windows, drop_duplicates and group state (streamcore.runtime.timed, .windows), with
    their late records' side output (children in the mode "late")."""
    op = node.params["op"]
    impl: TimedStep
    if op == "drop_duplicates":
        impl = Dedup(node, outs, ctx, step, policy)
    elif op in ("map_groups_with_state", "flat_map_groups_with_state"):
        impl = GroupStates(node, outs, ctx, step, policy)
    else:
        impl = make_window(node, outs, ctx, step, policy)
    late = outs.get("late")  # the table's late_records() (a late= sink is one of them)
    if late is not None:
        impl.late = late
    return impl.record  # type: ignore[attr-defined, no-any-return]


def _make_with_watermark(node: Node, down: Emit, ctx: PartitionContext) -> Emit:
    """Track the maximum event time that passes here (streamcore.runtime.eventtime)."""
    box = ctx.event_time.step(node.params["delay_ms"])

    def with_watermark(key: Any, value: Any, ts: int) -> None:
        if ts > box[0]:
            box[0] = ts
        down(key, value, ts)
    return with_watermark


def _make_aggregate(node: Node, down: Emit, ctx: PartitionContext, step: str,
                    policy: str | None, complete: Emit | None = None) -> Emit:
    """A stateful step: state = update(state, value) per key in the partition's store;
    the new state goes downstream at once (None: the key was deleted). With complete, every
    key's state also goes there at the end of each epoch (Spark's complete output mode)."""
    name = node.name
    assert name is not None and ctx.open_state is not None
    serde = node.params["value"]
    cache = ctx.open_state(name, serde.serialize, serde.deserialize)
    ctx.caches[name] = cache
    kser = INTERNAL_KEY.serialize
    update: Any = node.fn
    batch_fn = node.params.get("batch_fn")
    if batch_fn is not None and ctx.epochs:
        emit = _make_epoch_update(batch_fn, down, ctx, cache, step, policy)
    else:
        apply = cache.update  # read, update and write back in one call (None deletes)

        def emit(key: Any, value: Any, ts: int) -> None:
            try:
                new = apply(kser(key), update, value)
            except Exception as exc:
                raise StepFailed(step, policy, exc) from exc
            down(key, new, ts)
    if complete is not None:  # after the epoch update's own hook: the table it leaves
        kde = INTERNAL_KEY.deserialize

        def whole_table() -> None:
            saved, ctx.msg = ctx.msg, None  # no input record's headers on these rows
            try:
                for kb in cache.live_keys():
                    complete(kde(kb), cache.get(kb), ctx.now_ms())
            finally:
                ctx.msg = saved
        ctx.hooks.commit.append(whole_table)
    return emit


def _make_epoch_update(fn: Any, down: Emit, ctx: PartitionContext, cache: Any, step: str,
                       policy: str | None) -> Emit:
    """update_state_by_key in epoch mode (Spark's updateStateByKey per micro-batch): each
    key's values of the epoch are collected; at its end (a commit hook, before the stores
    stage their changes) fn(values, old_state) runs once per key and the new state goes
    downstream once, with the timestamp of the key's last record. A failure is the key's
    last record's, under the step's policy."""
    pending: dict[bytes, tuple[Any, list[Any], int, Any]] = {}  # kb -> key, values, ts, msg
    kser = INTERNAL_KEY.serialize

    def collect(key: Any, value: Any, ts: int) -> None:
        try:
            kb = kser(key)
        except Exception as exc:
            raise StepFailed(step, policy, exc) from exc
        entry = pending.get(kb)
        if entry is None:
            pending[kb] = (key, [value], ts, ctx.msg)
        else:
            entry[1].append(value)
            pending[kb] = (key, entry[1], ts, ctx.msg)

    def at_epoch_end() -> None:
        batch, saved_msg = ctx.batch, ctx.msg
        items = list(pending.items())
        pending.clear()
        for kb, (key, values, ts, msg) in items:
            ctx.msg = msg
            try:
                try:
                    new = fn(values, cache.get(kb))
                except Exception as exc:
                    raise StepFailed(step, policy, exc) from exc
                if new is None:
                    cache.delete(kb)
                else:
                    cache.put(kb, new)
                down(key, new, ts)
            except StepFailed as failed:
                ctx.failed(failed)
            finally:
                ctx.batch = batch
        ctx.msg = saved_msg

    ctx.hooks.commit.append(at_epoch_end)
    ctx.hooks.abort.append(pending.clear)
    return collect


def _make_sink(node: Node, ctx: PartitionContext, topic: str | None) -> Emit:
    sink = node.sink
    assert sink is not None
    internal = topic is not None  # a repartition topic: event time 0 must survive it
    topic = topic or sink.topic
    vser = sink.value.serialize
    kser = sink.key.serialize
    raw_keys = sink.key in (BYTES, KEY)  # keys that are already bytes need no call
    with_headers = sink.headers
    producer = ctx.producer  # its produce is looked up per record: epoch mode re-points it
    outbox = ctx.outbox
    held = outbox.held  # non-empty: the producer's queue was full; keep the order
    counter = SinkCounter(topic)
    ctx.sinks.append(counter)

    def to(key: Any, value: Any, ts: int) -> None:
        batch: Batch = ctx.batch  # type: ignore[assignment]  # set while records flow
        if ts == 0 and internal:
            ts = ZERO_TIME_ON_KAFKA
        try:
            v = None if value is None else vser(value)
            k = key if key is None or (raw_keys and type(key) is bytes) else kser(key)
        except Exception as exc:
            raise _serialization_error(sink, ctx, key, value, exc) from exc
        counter.n += 1
        h = None
        if with_headers and ctx.msg is not None:
            h = ctx.msg.headers()
        batch.pending += 1
        if not held:  # Outbox.send, inlined: one call less per output record
            try:
                producer.produce(topic, v, k, -1, batch.ack, None, ts, h)  # positional
                return
            except BufferError:
                pass
            except Exception as exc:
                raise producer.delivery_error(topic, exc) from exc
        # The local queue is full (the broker is slow or away): hold the record and let the
        # partition task wait for room without blocking the event loop.
        held.append((topic, v, k, -1, batch.ack, ts, h))
        ctx.blocked = True
    return to


def _serialization_error(sink: Any, ctx: PartitionContext, key: Any, value: Any,
                         exc: Exception) -> SerializationError:
    """Name the sink, which of key and value, its serde and the type it refused."""
    try:
        sink.value.serialize(value)
        what, serde, obj = "key", sink.key, key
    except Exception:
        what, serde, obj = "value", sink.value, value
    topic, partition, offset = ctx.position()
    return SerializationError(
        f"{sink.describe()}: its {what} serde {serde.name!r} refused a "
        f"{type(obj).__name__} ({type(exc).__name__}: {exc}); give the sink a {what}= serde "
        "that fits what the job writes", topic=topic, partition=partition, offset=offset)
