"""Per-partition processing context and the ordered async lanes behind ``map_async``.

The compiled chain is a tree of closures called as ``emit(key, value, timestamp_ms)``. What
does not change per operator (the input message, for headers and error positions, and the
offset-tracking batch) lives on the :class:`PartitionContext` instead of travelling with
each record. Only the event loop thread touches it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, NamedTuple, Protocol

from connectors.base import Message, Outbox, ProducerBackend
from statestore.cache import StateCache
from streamcore.runtime.eventtime import EventTime
from streamcore.runtime.tracking import Batch

__all__ = ["ZERO_TIME_ON_KAFKA", "AsyncLane", "BatchRecord", "Emit", "GlobalTableView",
           "OpenState", "OperatorHooks", "PartitionContext", "SinkCounter", "StepFailed"]

Emit = Callable[[Any, Any, int], None]

# librdkafka produces a timestamp of 0 as the time of the write, so a record at event time 0
# crosses a repartition topic with -1 (Kafka's "no timestamp") and is read back as 0. A
# record of event time -1 (before 1970, which Kafka's Java producer refuses) reads back as 0.
ZERO_TIME_ON_KAFKA = -1


class BatchRecord(NamedTuple):
    """A record as foreach_batch gives it."""

    key: Any
    value: Any
    timestamp: int


class GlobalTableView(Protocol):
    def get(self, key: Any) -> Any: ...


class StepFailed(Exception):
    """A user function of one step raised; the partition task applies the step's policy.
    Internal: never escapes the engine."""

    def __init__(self, step: str, policy: str | None, exc: BaseException) -> None:
        super().__init__(f"step {step!r} raised {type(exc).__name__}: {exc}")
        self.step = step
        self.policy = policy
        self.exc = exc


class SinkCounter:
    """Outputs handed to the producer by one sink of one partition (one increment each)."""

    __slots__ = ("n", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.n = 0


OpenState = Callable[[str, Callable[[Any], bytes], Callable[[bytes], Any]], StateCache]


class OperatorHooks:
    """What an operator asks to be called at besides its records (it registers when it is
    compiled). Each hook runs on the event loop, inside the partition task's processing
    (``batch_end``) or between batches (the others), never concurrently with a record; it
    may emit downstream through the operator's own closure, with ``ctx.batch`` set to the
    batch whose offsets its outputs hold back.

    * ``batch_end()``: a fetched batch has been through the chain.
    * ``commit()``: a commit (continuous mode) or the end of an epoch (epoch mode) is about
      to take the done offsets: emit what must be in it. State stores flush after it.
    * ``timer(now_ms)``: processing time has passed; called at least every
      ``TIMER_INTERVAL_S`` by the worker's clock (the test driver's manual clock included).
    * ``watermark(ms)``: the partition's event-time watermark advanced.
    * ``abort()``: epoch mode, the epoch was aborted: forget what was gathered for it.
    """

    __slots__ = ("abort", "batch_end", "commit", "timer", "watermark")

    def __init__(self) -> None:
        self.abort: list[Callable[[], None]] = []
        self.batch_end: list[Callable[[], None]] = []
        self.commit: list[Callable[[], None]] = []
        self.timer: list[Callable[[int], None]] = []
        self.watermark: list[Callable[[int], None]] = []


class PartitionContext:
    __slots__ = ("batch", "blocked", "caches", "collected", "epochs", "event_time", "failed",
                 "hooks", "lanes", "late_records", "msg", "now_ms", "open_state", "outbox",
                 "partition", "producer", "sinks", "tables", "timed_steps", "topic")

    def __init__(self, topic: str, partition: int, producer: ProducerBackend, *,
                 open_state: OpenState | None = None,
                 tables: Mapping[int, GlobalTableView] | None = None,
                 epochs: bool = False) -> None:
        self.epochs = epochs  # epoch mode: operators may gather per epoch (hooks.commit)
        self.open_state = open_state  # (step name, dumps, loads) -> the step's store cache
        self.caches: dict[str, StateCache] = {}  # aggregate step name -> its cache (batches)
        self.tables = tables or {}  # TABLE node id -> its global table
        self.topic = topic
        self.partition = partition
        self.producer = producer
        self.msg: Message | None = None
        self.batch: Batch | None = None
        self.lanes: list[AsyncLane] = []
        self.sinks: list[SinkCounter] = []
        self.hooks = OperatorHooks()
        self.event_time = EventTime(f"{topic}:{partition}")  # the worker gives its own
        self.now_ms: Callable[[], int] = self.event_time.now_ms  # processing time (clock)
        self.late_records = 0  # dropped as late by the event-time steps
        self.timed_steps: list[Any] = []  # streamcore.runtime.timed steps, for their stats
        # foreach_batch node id -> the running epoch's records that reached it
        self.collected: dict[int, list[BatchRecord]] = {}
        # Outputs the producer had no room for (a broker outage), in order; see Outbox.
        self.outbox = Outbox(producer)
        # A lane is full or the outbox holds records: the intake waits before the next record.
        self.blocked = False
        # Applies the failing step's error policy to the current record (ctx.msg): returns
        # under skip/dead_letter, raises under fail. Set by the partition task. Fan-outs call
        # it per child, so a failure in one branch never takes the record from the others.
        self.failed: Callable[[StepFailed], None] = _reraise

    def position(self) -> tuple[str, int, int]:
        off = self.msg.offset() if self.msg is not None else -1
        return self.topic, self.partition, off if off is not None else -1

    async def wait_unblocked(self) -> None:
        """Until the outbox is empty and every lane has room (a lane emitting meanwhile may
        fill the outbox again)."""
        while True:
            await self.outbox.drained()
            for lane in self.lanes:
                await lane.wait_space()
            if not self.outbox.held:
                break
        self.blocked = False

    def unblock_now(self) -> bool:
        """What :meth:`wait_unblocked` waits for, tried once without waiting (a stop or an
        epoch's end, when no loop of the task waits): held outputs go to the producer while
        it takes them; True when none is left (blocked is cleared if the lanes have room)."""
        if not self.outbox.retry():
            return False
        if self.blocked and all(lane.has_space() for lane in self.lanes):
            self.blocked = False
        return True


def _reraise(failed: StepFailed) -> None:
    raise failed


async def _outcome(call: Awaitable[Any]) -> tuple[Any, Exception | None]:
    """The call's result or exception. A call is a task of the partition's TaskGroup, which
    would fail as a whole if the task raised; the lane applies the step's policy instead."""
    try:
        return await call, None
    except Exception as exc:
        return None, exc


class AsyncLane:
    """Runs up to ``concurrency`` calls of an async function at once and emits the results
    in submission order. The calls are tasks of the partition's TaskGroup (their owner); the
    lane holds each record's batch open until its result has gone downstream."""

    def __init__(self, fn: Callable[[Any], Coroutine[Any, Any, Any]], concurrency: int,
                 down: Emit, ctx: PartitionContext, step: str, policy: str | None) -> None:
        self.fn = fn
        self.concurrency = concurrency
        self.down = down
        self.ctx = ctx
        self.step = step
        self.policy = policy  # None: the job's policy
        self.tg: asyncio.TaskGroup | None = None
        # Lanes after this one in the chain: the drainer waits for them, never for itself or
        # for lanes before it (that would deadlock).
        self.downstream: list[AsyncLane] = []
        self._queue: deque[tuple[asyncio.Task[Any], Any, int, Message | None, Batch]] = deque()
        self._changed = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def first_offset(self) -> int | None:
        """Offset of the oldest record still in the lane (None: empty)."""
        if not self._queue:
            return None
        msg = self._queue[0][3]
        return msg.offset() if msg is not None else None

    def submit(self, key: Any, value: Any, ts: int) -> None:
        ctx = self.ctx
        batch = ctx.batch
        assert batch is not None and self.tg is not None
        try:
            call = self.fn(value)
            if not inspect.isawaitable(call):
                raise TypeError(f"the function returned {type(call).__name__}, not an "
                                "awaitable; use map() for a plain function")
        except Exception as exc:  # the step's failure, as if the call had raised
            raise StepFailed(self.step, self.policy, exc) from exc
        batch.pending += 1
        self._queue.append((self.tg.create_task(_outcome(call)), key, ts, ctx.msg, batch))
        self._changed.set()
        if len(self._queue) >= self.concurrency:
            ctx.blocked = True

    def has_space(self) -> bool:
        return len(self._queue) < self.concurrency

    async def wait_space(self) -> None:
        while not self.has_space():
            self._changed.clear()
            await self._changed.wait()

    async def wait_empty(self) -> None:
        while self._queue:
            self._changed.clear()
            await self._changed.wait()

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    async def drain(self) -> None:
        """Emit results in order until closed and empty. A raising call, or a step after this
        one raising, gets the failing step's error policy (ctx.failed) for its record, as a
        synchronous step would: fail stops the partition, skip and dead_letter go on."""
        ctx = self.ctx
        q = self._queue
        while True:
            if not q:
                if self._closed:
                    return
                self._changed.clear()
                await self._changed.wait()
                continue
            task, key, ts, msg, batch = q[0]
            value, exc = await task
            failed = None if exc is None else StepFailed(self.step, self.policy, exc)
            q.popleft()
            saved_msg, saved_batch = ctx.msg, ctx.batch
            ctx.msg, ctx.batch = msg, batch
            try:
                if failed is None:
                    try:
                        self.down(key, value, ts)
                    except StepFailed as down_failed:
                        failed = down_failed
                if failed is not None:
                    ctx.failed(failed)  # raises under the fail policy
            finally:
                ctx.msg, ctx.batch = saved_msg, saved_batch
            batch.pending -= 1
            self._changed.set()
            for lane in self.downstream:  # a lane further down is full: hold this one too
                await lane.wait_space()
