"""The DSL of a job: a :class:`Stream` is a chain of steps, a :class:`Table` the latest value
per key. A table comes from a stateful step of a stream (one store per partition, restored
from the step's changelog topic) or from a compacted topic (``job.table(topic)``: every worker
keeps the whole table, like Kafka Streams' GlobalKTable, so a stream can be joined with it
whatever its partitioning). Both only add nodes to their job's graph; nothing runs here."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from connectors.kafka import KafkaSink, KafkaSource
from streamcore.api.groupstate import GROUP_TIMEOUTS
from streamcore.api.updates import (
    aggregate_update,
    count_update,
    reduce_update,
    update_state_update,
)
from streamcore.api.windows import (
    OUTPUT_MODES,
    Hopping,
    Session,
    Tumbling,
    Window,
    WindowedStream,
    duration_ms,
)
from streamcore.core.errors import JobDefinitionError
from streamcore.core.serde import INTERNAL_KEY, INTERNAL_VALUE, JSON, Serde
from streamcore.plan.analysis import is_windowed
from streamcore.plan.graph import Node, OpKind

if TYPE_CHECKING:
    from streamcore.api.job import Job

__all__ = ["ON_ERROR", "STEP_NAME", "Stream", "Table", "check_join", "check_policy"]

STEP_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
ON_ERROR = ("fail", "skip", "dead_letter")


def check_policy(policy: str | None) -> None:
    if policy is not None and policy not in ON_ERROR:
        raise JobDefinitionError(f"on_error must be one of {ON_ERROR}, got {policy!r}")


def _check_fn(fn: Any, op: str) -> None:
    if not callable(fn):
        raise JobDefinitionError(f"{op}() needs a function, got {fn!r}")


class Stream:
    """An unbounded sequence of (key, value, timestamp) records. Every method returns a new
    stream; the original stays usable, so one stream can feed several outputs."""

    def __init__(self, job: Job, node: Node) -> None:
        self._job = job
        self._node = node

    def _then(self, kind: str, fn: Callable[..., Any] | None = None, *,
              label: str | None = None, **params: Any) -> Stream:
        if fn is not None:
            _check_fn(fn, kind)
            if kind != OpKind.MAP_ASYNC and _is_async(fn):
                raise JobDefinitionError(
                    f"{kind}() got the async function {_fn_name(fn)}: its result would be an "
                    "un-awaited coroutine; use map_async(fn) to await it")
        check_policy(params.get("on_error"))
        if label is not None:
            if not isinstance(label, str) or not STEP_NAME.match(label):
                raise JobDefinitionError(
                    f"step name {label!r} must be 1-100 letters, digits, '.', '_' or '-'")
            params["label"] = label  # names the step in errors, explain() and DLQ headers
        return Stream(self._job, self._job._add(Node(kind, (self._node,), fn, params)))

    # Every step that calls a user function takes on_error= (None: the job's policy).
    def map(self, fn: Callable[[Any], Any], *, on_error: str | None = None,
            name: str | None = None) -> Stream:
        """Replace each value by fn(value)."""
        return self._then(OpKind.MAP, fn, on_error=on_error, label=name)

    def map_async(self, fn: Callable[[Any], Awaitable[Any]], *, concurrency: int = 16,
                  on_error: str | None = None, name: str | None = None) -> Stream:
        """Replace each value by ``await fn(value)``, running up to concurrency calls at once
        per partition; results are emitted in input order. A raising call gets ``on_error``
        (default: the job's policy) when its turn comes, as a synchronous step would."""
        _check_fn(fn, "map_async")
        if inspect.isfunction(fn) and fn.__name__ != "<lambda>" and not _is_async(fn):
            # A lambda may return an awaitable (lambda v: client.get(v)); a plain def cannot
            # be awaited unless it does, which map_async checks per call.
            raise JobDefinitionError(
                f"map_async() needs an async function (async def), got the plain function "
                f"{_fn_name(fn)}; use map(fn) for it")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise JobDefinitionError(f"map_async concurrency must be >= 1, got {concurrency!r}")
        return self._then(OpKind.MAP_ASYNC, fn, concurrency=concurrency, on_error=on_error,
                          label=name)

    def flat_map(self, fn: Callable[[Any], Iterable[Any]], *,
                 on_error: str | None = None, name: str | None = None) -> Stream:
        """Replace each value by zero or more values."""
        return self._then(OpKind.FLAT_MAP, fn, on_error=on_error, label=name)

    def filter(self, fn: Callable[[Any], bool], *, on_error: str | None = None,
               name: str | None = None) -> Stream:
        """Keep the records whose value satisfies fn."""
        return self._then(OpKind.FILTER, fn, on_error=on_error, label=name)

    def peek(self, fn: Callable[[Any], None], *, on_error: str | None = None,
             name: str | None = None) -> Stream:
        """Call fn(value) for its side effect and pass the record on unchanged."""
        return self._then(OpKind.PEEK, fn, on_error=on_error, label=name)

    def key_by(self, fn: Callable[[Any], Any], *, on_error: str | None = None,
               name: str | None = None) -> Stream:
        """Set each record's key to fn(value)."""
        return self._then(OpKind.KEY_BY, fn, on_error=on_error, label=name)

    def with_timestamps(self, fn: Callable[[Any], int], *,
                        on_error: str | None = None, name: str | None = None) -> Stream:
        """Set each record's event time (epoch milliseconds) to fn(value)."""
        return self._then(OpKind.WITH_TIMESTAMPS, fn, on_error=on_error, label=name)

    def with_watermark(self, delay: Any) -> Stream:
        """Track event time here: the watermark is the maximum event time seen (per partition
        task) minus delay (``"10s"``, or milliseconds). Windows close, append mode emits and
        state expires when the watermark passes them; records older than it are late
        (Spark's withWatermark)."""
        return self._then(OpKind.WITH_WATERMARK, delay_ms=duration_ms(
            delay, "with_watermark delay", positive=False))

    def union(self, *others: Stream) -> Stream:
        """The records of this stream and of others, interleaved as they arrive."""
        for o in others:
            if not isinstance(o, Stream) or o._job is not self._job:
                raise JobDefinitionError("union() takes streams of the same job")
        parents = (self._node, *(o._node for o in others))
        return Stream(self._job, self._job._add(Node(OpKind.UNION, parents)))

    def branch(self, *predicates: Callable[[Any], bool]) -> tuple[Stream, ...]:
        """One stream per predicate; each record goes to the first whose predicate holds and
        is dropped if none does (Kafka Streams' semantics). Use ``lambda v: True`` last for a
        default branch."""
        if not predicates:
            raise JobDefinitionError("branch() needs at least one predicate")
        for p in predicates:
            _check_fn(p, "branch")
        hub = self._job._add(Node(OpKind.BRANCH, (self._node,), None,
                                  {"preds": tuple(predicates)}))
        return tuple(
            Stream(self._job, self._job._add(Node(OpKind.BRANCH, (hub,), None, {"index": i})))
            for i in range(len(predicates)))

    # -- stateful steps (each needs a stable name=) --------------------------------------
    def repartition(self, num_partitions: int | None = None, *, name: str | None = None,
                    ) -> Stream:
        """Redistribute records by key through the internal topic ``{job}-{name}-repartition``
        (``num_partitions`` partitions; default: as many as the input). Records with the same
        key then reach the same partition task, wherever they came from."""
        if num_partitions is not None and (not isinstance(num_partitions, int)
                                           or num_partitions < 1):
            raise JobDefinitionError(f"repartition num_partitions must be >= 1, got "
                                     f"{num_partitions!r}")
        self._job._check_name("repartition", name)
        node = self._repartition_node(name, num_partitions)
        self._job._register(node)
        return Stream(self._job, self._job._add(node))

    def _repartition_node(self, name: str | None, partitions: int | None) -> Node:
        if name is None:
            raise JobDefinitionError("repartition needs a stable name=")
        # The node's source and sink carry the serdes; the topic's name depends on the
        # application id, known only when a worker runs (Job.internal_topic).
        topic = self._job.internal_topic(name, "repartition")
        return Node(OpKind.REPARTITION, (self._node,), params={
            "name": name, "partitions": partitions},
            source=KafkaSource(topic, key=INTERNAL_KEY, value=INTERNAL_VALUE),
            sink=KafkaSink(topic, key=INTERNAL_KEY, value=INTERNAL_VALUE))

    def _needs_repartition(self) -> bool:
        """True unless every record reaching here is still partitioned by its key as in one
        input topic (no key_by since the source, one source topic)."""
        sources: set[int] = set()
        stack, seen = [self._node], set()
        while stack:
            n = stack.pop()
            if n.id in seen:
                continue
            seen.add(n.id)
            if n.kind == OpKind.KEY_BY:
                return True
            if n.kind == OpKind.REPARTITION:
                sources.add(n.id)
                continue
            if n.kind == OpKind.SOURCE:
                assert n.source is not None
                if n.source.pattern is not None or len(n.source.topics) != 1:
                    return True
                sources.add(n.id)
            stack.extend(n.parents)
        return len(sources) != 1

    def _stateful(self, op: str, update: Callable[[Any, Any], Any], name: str | None,
                  value: Serde, on_error: str | None,
                  key_fn: Callable[[Any], Any] | None = None,
                  batch_fn: Callable[[list[Any], Any], Any] | None = None,
                  **extra: Any) -> Table:
        check_policy(on_error)
        if not isinstance(value, Serde):
            raise JobDefinitionError(f"{op} value= must be a Serde, got {value!r}")
        self._job._check_name(op, name)
        assert name is not None
        up: Stream = self
        if key_fn is not None:
            up = up._then(OpKind.KEY_BY, key_fn)
        if up._needs_repartition():  # all records of a key must reach one partition task
            up = Stream(self._job, self._job._add(up._repartition_node(name, None)))
        node = Node(OpKind.AGGREGATE, (up._node,), update, {
            "name": name, "op": op, "value": value, "on_error": on_error,
            **({"batch_fn": batch_fn} if batch_fn is not None else {}), **extra})
        self._job._register(node)
        return Table(self._job, self._job._add(node))

    def reduce(self, fn: Callable[[Any, Any], Any], *, name: str | None = None,
               value: Serde = JSON, on_error: str | None = None) -> Table:
        """Per key, combine values with fn(accumulated, value); the first value starts it."""
        _check_fn(fn, "reduce")
        return self._stateful("reduce", reduce_update(fn), name, value, on_error)

    def aggregate(self, initializer: Callable[[], Any], adder: Callable[[Any, Any], Any], *,
                  name: str | None = None, value: Serde = JSON,
                  on_error: str | None = None) -> Table:
        """Per key, adder(aggregate, value), starting from initializer()."""
        _check_fn(initializer, "aggregate")
        _check_fn(adder, "aggregate")
        return self._stateful("aggregate", aggregate_update(initializer, adder), name, value,
                              on_error)

    def count(self, *, name: str | None = None) -> Table:
        """Records per key."""
        return self._stateful("count", count_update, name, JSON, None)

    def count_by_value(self, *, name: str | None = None) -> Table:
        """Records per distinct value (the value becomes the key), as Spark's countByValue."""
        return self._stateful("count_by_value", count_update, name, JSON, None,
                              key_fn=_identity)

    def update_state_by_key(self, fn: Callable[[list[Any], Any], Any], *,
                            name: str | None = None, value: Serde = JSON,
                            on_error: str | None = None) -> Table:
        """Spark's updateStateByKey: state = fn(new_values, old_state) per key, old_state None
        for a new key; returning None deletes the key. In epoch mode new_values holds all of
        the key's values of the epoch, in order, and the new state goes downstream once per
        key per epoch, at its end; in continuous mode each record is its own update
        (new_values has one value)."""
        _check_fn(fn, "update_state_by_key")
        return self._stateful("update_state_by_key", update_state_update(fn), name, value,
                              on_error, batch_fn=fn)

    # -- event time (streamcore.api.windows; semantics in the runtime's windows module) --
    def window(self, window: Window) -> WindowedStream:
        """Group each key's records into event-time windows; then count, reduce or
        aggregate per key and window."""
        return WindowedStream(self, window)

    def _windowed(self, op: str, window: Window, name: str | None, value: Serde,
                  on_error: str | None, late: Any, fn: Callable[..., Any] | None,
                  init: Callable[[], Any] | None, inverse: Callable[..., Any] | None = None,
                  merger: Callable[[Any, Any], Any] | None = None) -> Table:
        for f in (fn, init, inverse):
            if f is not None:
                _check_fn(f, op)
        if late is not None and not isinstance(late, KafkaSink):
            raise JobDefinitionError(f"late= takes a KafkaSink, got {late!r}")
        update = {"reduce": reduce_update(fn) if fn else None,
                  "aggregate": aggregate_update(init, fn) if init and fn else None}.get(op)
        opname = "reduce_by_key_and_window" if op == "rbkw" else f"window_{op}"
        merge: Callable[[Any, Any], Any] | None
        if op == "count":
            merge = _add
        elif op == "aggregate":
            merge = merger
            if merge is None and isinstance(window, Session):
                raise JobDefinitionError(
                    "aggregate over Session windows needs merge=(agg1, agg2) -> agg: two "
                    "sessions that a record bridges merge into one (as Kafka Streams' "
                    "session merger)")
        else:
            merge = fn
        table = self._stateful(opname, update or count_update, name, value, on_error,
                               window=window, combine=fn, inverse=inverse, merge=merge,
                               event_time=True)
        if late is not None:  # the sink is one consumer of the late records' stream
            table.late_records().to(late)
        return table

    def reduce_by_key_and_window(self, fn: Callable[[Any, Any], Any], window: Hopping, *,
                                 inverse: Callable[[Any, Any], Any] | None = None,
                                 name: str | None = None, value: Serde = JSON,
                                 late: Any = None, on_error: str | None = None) -> Table:
        """DStream's reduceByKeyAndWindow over event time: each key's values are reduced per
        slide-long pane, and each window (``Hopping(size, slide)``) emits once, when the
        watermark passes its end + grace, the reduction of its panes. With ``inverse``
        (``inverse(acc, leaving) == acc`` without ``leaving``), the window's value is carried
        from the previous window: the entering pane is added, the leaving one subtracted,
        instead of reducing size/slide panes again."""
        if not isinstance(window, Hopping | Tumbling):
            raise JobDefinitionError("reduce_by_key_and_window takes Hopping(size, slide) "
                                     f"(or Tumbling), got {window!r}")
        _check_fn(fn, "reduce_by_key_and_window")
        return self._windowed("rbkw", window, name, value, on_error, late, fn, None, inverse)

    def drop_duplicates(self, key_fn: Callable[[Any], Any] | None = None, *,
                        within: Any = None, name: str | None = None) -> Stream:
        """Drop records whose (key, key_fn(value)) was seen before (key_fn default: the
        whole value), keeping the first. State is bounded by the watermark: an entry is
        forgotten once the watermark passes its event time (+ ``within``, Spark's
        dropDuplicatesWithinWatermark), and records older than the watermark are late and
        dropped. With ``within`` and no watermark, the step's own maximum event time is the
        clock. With neither, state grows without bound: the worker warns at start."""
        if key_fn is not None:
            _check_fn(key_fn, "drop_duplicates")
        within_ms = None if within is None else duration_ms(within, "drop_duplicates within")
        table = self._stateful("drop_duplicates", count_update, name, JSON, None,
                               dedup_key=key_fn, within_ms=within_ms, event_time=True)
        return Stream(self._job, table._node)

    def map_groups_with_state(self, fn: Callable[[Any, list[Any], Any], Any], *,
                              name: str | None = None, timeout: str = "none",
                              output_mode: str = "update", value: Serde = JSON,
                              on_error: str | None = None) -> Stream:
        """Spark's mapGroupsWithState: ``fn(key, values, state)`` returns one output per
        call; ``state`` is a :class:`~streamcore.GroupState` kept per key. ``timeout`` is
        ``"none"``, ``"processing_time"`` (``state.set_timeout_duration``) or
        ``"event_time"`` (``state.set_timeout_timestamp``, needs a watermark); a key whose
        timeout passes is called with ``values == []`` and ``state.has_timed_out``. values
        is one record in continuous mode, the key's records of the epoch in epoch mode."""
        if output_mode != "update":
            raise JobDefinitionError("map_groups_with_state supports output_mode 'update' "
                                     f"only (as Spark), got {output_mode!r}")
        return self._groups("map_groups_with_state", fn, name, timeout, output_mode, value,
                            on_error)

    def flat_map_groups_with_state(self, fn: Callable[[Any, list[Any], Any], Iterable[Any]],
                                   *, name: str | None = None, timeout: str = "none",
                                   output_mode: str = "append", value: Serde = JSON,
                                   on_error: str | None = None) -> Stream:
        """As map_groups_with_state, but fn returns zero or more outputs (an iterable)."""
        return self._groups("flat_map_groups_with_state", fn, name, timeout, output_mode,
                            value, on_error)

    def _groups(self, op: str, fn: Callable[..., Any], name: str | None, timeout: str,
                output_mode: str, value: Serde, on_error: str | None) -> Stream:
        _check_fn(fn, op)
        if timeout not in GROUP_TIMEOUTS:
            raise JobDefinitionError(f"{op} timeout must be one of {GROUP_TIMEOUTS}, got "
                                     f"{timeout!r}")
        if output_mode not in ("append", "update"):
            raise JobDefinitionError(f"{op} output_mode must be 'append' or 'update', got "
                                     f"{output_mode!r}")
        table = self._stateful(op, count_update, name, value, on_error, group_fn=fn,
                               timeout=timeout, output_mode=output_mode, event_time=True,
                               flat=op.startswith("flat"))
        return Stream(self._job, table._node)

    def join(self, table: Table, fn: Callable[[Any, Any], Any] | None = None, *,
             how: str = "inner", on_error: str | None = None) -> Stream:
        """Look up each record's key in table (a table read with job.table). ``inner`` drops
        records whose key is not in the table; ``left`` keeps them with None. The output value
        is fn(value, table_value), or the pair (value, table_value) without fn."""
        check_join(table, how)
        if fn is not None:
            _check_fn(fn, "join")
        return self._then(OpKind.JOIN, fn, table=table._node, how=how, on_error=on_error)

    def to(self, sink: KafkaSink) -> None:
        """Write every record to sink."""
        if not isinstance(sink, KafkaSink):
            raise JobDefinitionError(f"to() takes a KafkaSink, got {sink!r}")
        self._job._add(Node(OpKind.TO, (self._node,), sink=sink))

    def foreach_batch(self, fn: Callable[[list[Any], int], None], *,
                      name: str | None = None) -> None:
        """Epoch mode: call fn(records, epoch_id) once per epoch, before the epoch commits,
        with the epoch's records that reach this step (``.key``, ``.value``,
        ``.timestamp``), as Spark's foreachBatch. A crashed or aborted epoch is given again
        with the same epoch_id, so fn can be idempotent (write keyed by epoch_id). fn
        raising stops the query (the epoch is not committed). Continuous mode refuses it
        at start-up."""
        _check_fn(fn, "foreach_batch")
        if _is_async(fn):
            raise JobDefinitionError("foreach_batch() takes a plain function; it runs on a "
                                     "worker thread at the end of each epoch")
        self._then(OpKind.FOREACH_BATCH, fn, label=name)

    def foreach(self, fn: Callable[[Any], None], *, on_error: str | None = None,
                name: str | None = None) -> None:
        """Call fn(value) for every record (at least once). An async fn is awaited in order."""
        _check_fn(fn, "foreach")
        if _is_async(fn):
            self.map_async(fn, concurrency=1, on_error=on_error, name=name)._then(  # type: ignore[arg-type]
                OpKind.FOREACH, _discard)
        else:
            self._then(OpKind.FOREACH, fn, on_error=on_error, label=name)


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

    def to_stream(self, output_mode: str | None = None) -> Stream:
        """The table's changes. ``output_mode`` (Spark's): ``"update"`` (the default) emits a
        row each time one changes; ``"append"`` each row once, when it can no longer change
        (a window whose end + grace the watermark has passed; needs with_watermark);
        ``"complete"`` the whole table at the end of every epoch (epoch mode only)."""
        if self.from_topic:
            if output_mode is not None:
                raise JobDefinitionError("output_mode applies to aggregations, not to a table "
                                         "read from a topic")
            p = self._node.params
            return self._job.stream(KafkaSource(p["topic"], key=p["key"], value=p["value"]))
        if output_mode is None:
            return Stream(self._job, self._node)
        if output_mode not in OUTPUT_MODES:
            raise JobDefinitionError(f"output_mode must be one of {OUTPUT_MODES}, got "
                                     f"{output_mode!r}")
        return Stream(self._job, self._job._add(
            Node(OpKind.EMIT, (self._node,), params={"mode": output_mode})))

    def late_records(self) -> Stream:
        """A windowed table's late records (those dropped because every window they fall
        in had closed), as a stream of their own: the side output, as ``late=`` a sink."""
        if not is_windowed(self._node):
            raise JobDefinitionError(f"late_records() is for windowed aggregations; {self!r} "
                                     "has no windows, so nothing it gets is late")
        return Stream(self._job, self._job._add(
            Node(OpKind.EMIT, (self._node,), params={"mode": "late"})))

    def to(self, sink: KafkaSink, *, output_mode: str | None = None) -> None:
        """Write every change to sink (deletes as tombstones): a compacted topic then holds
        the table. See to_stream for ``output_mode``."""
        self.to_stream(output_mode).to(sink)

    def __repr__(self) -> str:
        return f"Table({self.name!r})"



def _is_async(fn: Any) -> bool:
    """An ``async def`` function (also behind functools.partial, or as ``__call__``)."""
    call = type(fn).__call__ if not inspect.isroutine(fn) else None
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _discard(_value: Any) -> None:
    return None


def _identity(value: Any) -> Any:
    return value


def _add(a: Any, b: Any) -> Any:
    return a + b


def check_join(table: Any, how: str) -> None:
    if not isinstance(table, Table):
        raise JobDefinitionError(f"join() takes a Table, got {table!r}")
    if how not in ("inner", "left"):
        raise JobDefinitionError(f"join how= must be 'inner' or 'left', got {how!r}")
    if not table.from_topic:
        raise JobDefinitionError(
            f"join() needs a table read from a topic (job.table); {table!r} is an aggregate: "
            "write it to a compacted topic with .to(...) and read that with job.table()")
