"""One task per assigned input partition: a bounded inbox, the compiled chain, offset tracking.

Lifecycle (as Kafka Streams' Task)::

    CREATED ──> RESTORING ──> RUNNING ──> SUSPENDED ──> CLOSED
       │            │            └───────────────────────^
       └────────────┴────────────────────────────────────^

RESTORING rebuilds the partition's state stores from their changelogs before the first record
(engine/state.py); a stateless partition passes straight through it. SUSPENDED means intake
has stopped (revoke or shutdown): what is already in the inbox is finished up to a deadline,
what is not is left for the next owner.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from connectors.base import Message, PartitionReader, ProducerBackend, TopicPartition
from connectors.spec import Source
from statestore.base import StoreLocked
from statestore.cache import StateCache
from streamcore.core.errors import (
    StateError,
    StreamcoreError,
    TransactionAborted,
)
from streamcore.core.logs import BurstLogger
from streamcore.core.serde import BYTES, KEY
from streamcore.plan.graph import Node, OpKind
from streamcore.plan.physical import PhysicalPlan
from streamcore.runtime.batches import BatchedChain, BatchRunner
from streamcore.runtime.context import Emit, GlobalTableView, PartitionContext, StepFailed
from streamcore.runtime.eventtime import EventTime
from streamcore.runtime.gaps import GapCheck
from streamcore.runtime.operators import compile_chain
from streamcore.runtime.policies import RecordErrors
from streamcore.runtime.progress import LatencyHistogram
from streamcore.runtime.records import ChainRunner, RecordRunner
from streamcore.runtime.state import PartitionStores
from streamcore.runtime.tracking import Batch, OffsetTracker

__all__ = ["PartitionTask", "TaskState"]

log = logging.getLogger("streamcore.partition")
_burst_log = BurstLogger(log)


class TaskState(enum.Enum):
    CREATED = "CREATED"
    RESTORING = "RESTORING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    CLOSED = "CLOSED"


_ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    TaskState.CREATED: frozenset({TaskState.RESTORING, TaskState.CLOSED}),
    TaskState.RESTORING: frozenset({TaskState.RUNNING, TaskState.SUSPENDED, TaskState.CLOSED}),
    TaskState.RUNNING: frozenset({TaskState.SUSPENDED, TaskState.CLOSED}),
    TaskState.SUSPENDED: frozenset({TaskState.CLOSED}),
    TaskState.CLOSED: frozenset(),
}


class PartitionTask:
    def __init__(
        self,
        tp: TopicPartition,
        plan: PhysicalPlan,
        source: Node,
        producer: ProducerBackend,
        *,
        inbox_high: int,
        inbox_low: int,
        pause: Callable[[TopicPartition], None],
        resume: Callable[[TopicPartition], None],
        latency: LatencyHistogram,
        e2e: LatencyHistogram,
        errors: dict[tuple[str, str, str], int],
        make_stores: Callable[[int], PartitionStores] | None = None,
        new_reader: Callable[[], PartitionReader] | None = None,
        tables: Mapping[int, GlobalTableView] | None = None,
        batch_execution: bool = True,
        gate: asyncio.Event | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_txn_failed: Callable[[BaseException], None] | None = None,
        event_time: EventTime | None = None,
        in_group: Callable[[], bool] | None = None,
        gaps: GapCheck | None = None,
    ) -> None:
        self.tp = tp
        # A repartition topic's records were counted once already, at their source.
        self.internal = source.kind == OpKind.REPARTITION
        self.state = TaskState.CREATED
        self.tracker = OffsetTracker()
        self.committed = -1  # next offset to read, as last committed by us (-1: none yet)
        self.stores: PartitionStores | None = None
        self._make_stores = make_stores
        self._new_reader = new_reader
        self._plan = plan
        self.ctx = PartitionContext(tp[0], tp[1], producer, open_state=self._open_state,
                                    tables=tables, epochs=gate is not None)
        self.ctx.failed = self._on_failed
        if event_time is not None:
            self.ctx.event_time = event_time
            self.ctx.now_ms = event_time.now_ms
        try:
            built: dict[int, Emit] = {}  # node id -> closure, shared by both compiles
            self._chain = compile_chain(plan, source, self.ctx, built=built)
            self._runner: ChainRunner[Any] = BatchRunner(
                BatchedChain(plan, source, self.ctx, built), self.ctx, self._record_failed,
                lambda: self._closing, internal=self.internal) if batch_execution else \
                RecordRunner(self._chain, self.ctx, self._record_failed, lambda: self._closing,
                             internal=self.internal)
        except BaseException:
            self.close_stores()
            raise
        self._event_time_at_commit = self.ctx.event_time.snapshot()
        spec = source.source
        assert isinstance(spec, Source)
        self._spec = spec
        self._inbox: deque[tuple[float, list[Message]]] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._high, self._low = inbox_high, inbox_low
        self._pause, self._resume = pause, resume
        # False once the member may have left the group (the event loop was blocked past
        # max.poll.interval.ms): batches queued before then are not taken (the worker
        # fences the task; another member may own the partition already).
        self._in_group = in_group
        self.paused = False
        self._latency = latency
        self._e2e = e2e
        self.policies = RecordErrors(self.ctx, job=plan.name, default_policy=plan.on_error,
                                     dlq_topic=plan.dlq_topic, errors=errors)
        self.records_in = 0
        self.first_offset: int | None = None
        self.last_offset: int | None = None
        self._offered = -1  # last offset taken into the inbox
        self.start_offset: int | None = None  # first offset offered (where reading began)
        # Epoch mode: closed while an epoch ends; the task takes no new batch meanwhile.
        self._gate = gate
        self._on_batch = on_batch  # epoch mode: records taken, for an epoch's size bound
        self._on_txn_failed = on_txn_failed  # epoch mode: the transaction must be aborted
        self.busy = False  # a batch is being processed (taken, not yet sealed)
        self.fenced = False  # the group may have given the partition to another member
        # A topic whose offsets have no gaps (a repartition topic in continuous mode): a
        # fetch that skips offsets passed records over (a local-broker defect, README), and
        # the task has them read again rather than lose them.
        self._gaps = gaps

    # -- lifecycle -----------------------------------------------------------------------
    def _open_state(self, step: str, dumps: Callable[[Any], bytes],
                    loads: Callable[[bytes], Any]) -> StateCache:
        if self.stores is None:
            assert self._make_stores is not None, "stateful step without a state setup"
            self.stores = self._make_stores(self.tp[1])
        try:
            return self.stores.open(step, self._plan.changelog_topic(step), dumps, loads)
        except StoreLocked as exc:
            raise StateError(f"{exc}; give each worker on a machine its own state_dir "
                             "(--state-dir)") from exc

    async def _restore(self) -> None:
        """Replay the changelogs on a worker thread; if cancelled (revoked meanwhile), stop
        the thread and wait for it, so that the stores can be closed safely."""
        stores = self.stores
        if stores is None or not stores.slots:
            return
        assert self._new_reader is not None
        stop = threading.Event()
        fut = asyncio.get_running_loop().run_in_executor(
            None, stores.restore, self._new_reader, stop.is_set)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait([fut])
            raise

    def processed_offset(self, last: int | None = None) -> int:
        """The highest offset whose records have all been through the whole chain (their
        state changes are in the stores' caches); last: the batch just taken, if
        last_offset does not include it yet."""
        off = last if last is not None else \
            self.last_offset if self.last_offset is not None else -1
        for lane in self.ctx.lanes:
            first = lane.first_offset()
            if first is not None:
                off = min(off, first - 1)
        return off

    def flush_state(self) -> None:
        """Commit time: the operators' commit hooks, then start flushing the stores' dirty
        keys to RocksDB and the changelog."""
        if self.fenced:
            return
        self._send_markers()
        self._run_hooks(self.ctx.hooks.commit)
        if self.stores is not None:
            # The state changes wait for the outputs made with them: were they durable first,
            # a crash would have the records read again against state that already holds
            # them (a duplicate filter would drop them, their outputs lost).
            self.stores.flush(self.processed_offset(), self.ctx.producer,
                              self.tracker.unacknowledged())

    def on_time(self, now_ms: int) -> None:
        """Processing time passed: the operators' timer hooks (worker's clock), and an idle
        input's watermark may stop holding the task's back."""
        if self.state is TaskState.RUNNING and not self.fenced:
            if self.waiting_for_epoch:
                # An epoch is ending (or its transaction failed): a timer's outputs would go
                # to that transaction and its state changes to the next epoch. It fires at
                # the next tick once the gate opens, both in the same epoch.
                return
            self._run_hooks(self.ctx.hooks.timer, now_ms)
            if self.ctx.epochs:
                return
            if self.ctx.event_time.held:
                self._release_watermarks(None)
            elif self.ctx.event_time.idle_timeout_ms is not None and not self.busy \
                    and not self._in_lanes():
                self.advance_watermark()

    def advance_watermark(self) -> None:
        """Recompute the watermark (between batches in continuous mode, at the end of an
        epoch in epoch mode); if it moved, the operators' watermark hooks."""
        et = self.ctx.event_time
        if et.advance():
            self._run_hooks(self.ctx.hooks.watermark, et.watermark)

    def _watermark_after(self, last: int) -> None:
        """Continuous mode, a batch up to offset last has been taken: advance the watermark,
        but only once every record of the batch has been through the chain. A record still
        in a map_async lane must not meet a watermark its own batch moved: a record is late
        against the watermark as it stood before its batch, whatever the steps before it."""
        et = self.ctx.event_time
        if not et.held and not self._in_lanes():
            self.advance_watermark()
            return
        et.hold(last)
        self._release_watermarks(last)

    def _release_watermarks(self, last: int | None) -> None:
        """The held watermarks of the batches whose records are all through the chain
        (last: the batch just taken)."""
        et = self.ctx.event_time
        if et.release(self.processed_offset(last)):
            self._run_hooks(self.ctx.hooks.watermark, et.watermark)

    def _in_lanes(self) -> bool:
        """Some record is in a map_async call, not yet through the chain."""
        return any(len(lane) for lane in self.ctx.lanes)

    def _send_markers(self) -> None:
        """Tell the tasks downstream of each repartition topic this task's watermark."""
        et = self.ctx.event_time
        if et.targets:
            news = et.news()
            if news:
                self._run_hooks([self._write_markers], news)

    def _write_markers(self, news: dict[str, int]) -> None:
        ctx = self.ctx
        assert ctx.batch is not None
        ctx.event_time.write_markers(ctx.outbox, ctx.batch, news)  # the hook batch's outputs
        if ctx.outbox.held:
            ctx.blocked = True

    def on_watermark(self, watermark_ms: int) -> None:
        """The partition's event-time watermark advanced: the operators' watermark hooks."""
        if self.state is TaskState.RUNNING and not self.fenced:
            self._run_hooks(self.ctx.hooks.watermark, watermark_ms)

    def _run_hooks(self, hooks: list[Any], *args: Any) -> None:
        """Run hooks. Between batches, their outputs are held by a batch of their own, sealed
        at the last offset taken, so that later offsets wait for their acknowledgement (what
        they emit derives from records already taken); while the task waits inside a batch,
        by that batch."""
        if not hooks:
            return
        current = self.ctx.batch
        try:
            if current is not None and not current.sealed:  # the task waits inside a batch
                for hook in hooks:
                    hook(*args)
                return
            batch = self.ctx.batch = self.tracker.open(time.perf_counter())
            try:
                for hook in hooks:
                    hook(*args)
            finally:
                batch.seal(self.last_offset if self.last_offset is not None else -1)
        except TransactionAborted as exc:
            if self._on_txn_failed is None:
                raise
            self._on_txn_failed(exc)  # epoch mode: the epoch is aborted and runs again
        finally:
            if self.ctx.blocked:  # outputs held for room: the task's loop hands them over
                self._wakeup.set()

    def state_settled(self) -> bool:
        """Every processed record's state change is acknowledged by the changelog."""
        s = self.stores
        return s is None or (s.settle() and not s.dirty
                             and s.durable >= self.processed_offset())

    def done_offset(self) -> int:
        """The highest done offset: outputs acknowledged and state changes durable."""
        done = self.tracker.advance()
        if self.stores is not None:
            done = min(done, self.stores.durable)
        return done

    def close_stores(self) -> None:
        if self.stores is not None:
            self.stores.close()
            self.stores = None

    def transition(self, new: TaskState) -> None:
        if new not in _ALLOWED[self.state]:
            raise StreamcoreError(f"partition {self.tp}: illegal transition "
                                  f"{self.state.value} -> {new.value}")
        log.debug("partition %s[%d]: %s -> %s", *self.tp, self.state.value, new.value)
        self.state = new

    # -- intake (event loop thread, called by the worker's poll loop) --------------------
    def offer(self, handed_at: float, msgs: list[Message]) -> None:
        if self.state not in (TaskState.RESTORING, TaskState.RUNNING):
            return  # revoked or closing: the next owner reads these again
        first = msgs[0].offset()
        if first is not None and first <= self._offered:
            # A stale fetch (from before a revoke) or a client fault: taking it would process
            # records twice or out of order, and move the done offset over a gap.
            _burst_log.warning(f"order:{self.tp}", "partition %s[%d]: dropped a batch at "
                               "offset %d, not after %d", *self.tp, first, self._offered)
            return
        if self._gaps is not None:
            msgs = self._gaps.take(self._offered, handed_at, msgs)
            if not msgs:
                return
        last = msgs[-1].offset()
        if self.start_offset is None:
            self.start_offset = first
        self._offered = last if last is not None else self._offered
        self._inbox.append((handed_at, msgs))
        self._queued += len(msgs)
        self._wakeup.set()
        if not self.paused and self._queued >= self._high:
            self.paused = True
            self._pause(self.tp)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def processed(self) -> int:
        """Records through the whole chain: taken, less those still in flight in a lane."""
        return self.records_in - sum(len(lane) for lane in self.ctx.lanes)

    def stop_intake(self) -> None:
        """Finish what is in flight, then stop (graceful shutdown and revoke).

        In flight means the record being processed and the ``map_async`` calls already
        started; records still queued in the inbox are dropped unprocessed, and the batch being
        processed is sealed at the last record that entered the chain. So the commit that
        follows covers exactly the records whose outputs were written: the next owner reads
        the rest, and a graceful stop leaves no duplicates, however long the inbox."""
        if self.state in (TaskState.RESTORING, TaskState.RUNNING):
            self.transition(TaskState.SUSPENDED)
        self._closing = True
        self._wakeup.set()

    # -- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Process the inbox until stop_intake() and the inbox is empty. Raises on a fatal
        error; the record that caused it is never marked done."""
        self.transition(TaskState.RESTORING)
        await self._restore()
        if self.state is TaskState.RESTORING:
            for step in self.ctx.timed_steps:
                step.resume()
            self.transition(TaskState.RUNNING)
        try:
            async with asyncio.TaskGroup() as tg:
                for lane in self.ctx.lanes:
                    lane.tg = tg
                    tg.create_task(lane.drain())
                try:
                    await self._process_inbox()
                    for lane in self.ctx.lanes:
                        await lane.wait_empty()
                    await self._hand_over_hook_outputs()  # held outputs go to the producer
                finally:
                    for lane in self.ctx.lanes:
                        lane.close()
        except* StreamcoreError as eg:
            raise eg.exceptions[0] from None
        finally:
            if self.paused:
                self.paused = False

    async def _process_inbox(self) -> None:
        inbox = self._inbox
        ctx = self.ctx
        vde = self._spec.value.deserialize
        # Keys that stay bytes need no call per record.
        kde = None if self._spec.key in (BYTES, KEY) else self._spec.key.deserialize
        ts_of = self._spec.timestamp
        reads_markers = ctx.event_time.reads_markers
        while True:
            if self._closing:
                self._drop_inbox()
                return
            if not inbox:
                if ctx.blocked:  # a hook's outputs wait for room: no batch will take them
                    gate = self._gate
                    if gate is not None and not gate.is_set():  # no transaction to take them
                        await self._gate_or_stop(gate)  # (the epoch's end hands them over)
                    else:
                        await self._hand_over_hook_outputs()
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            gate = self._gate
            if gate is not None and not gate.is_set():  # an epoch is ending
                await self._gate_or_stop(gate)
                continue
            if self._in_group is not None and not self._in_group():
                continue  # fenced: the loop ends at the top
            self.busy = True
            handed_at, msgs = inbox.popleft()
            batch = self.tracker.open(handed_at)
            ctx.batch = batch
            end = msgs[-1].offset()  # where the batch is sealed, markers included
            kept_all = True
            if reads_markers:
                data = ctx.event_time.take_markers(msgs)
                if len(data) < len(msgs):
                    self._queued -= len(msgs) - len(data)
                    if not data:
                        self._batch_done(batch, msgs, end, 0, handed_at)
                        await asyncio.sleep(0)
                        continue
                    msgs = data
            try:
                kept = await self._runner.take(msgs, batch, vde, kde, ts_of)
                if kept < len(msgs):  # stopping: the rest of the batch is the next owner's
                    self._queued -= len(msgs) - kept
                    msgs = msgs[:kept]
                    kept_all = False
            except TransactionAborted as exc:
                if self._on_txn_failed is None:
                    raise
                # Epoch mode: the transaction failed under this batch (an abortable
                # produce error). The epoch is aborted and this task read again from
                # its committed offset: stop here, the committer rewinds us.
                self.busy = False
                self._drop_inbox()
                self._on_txn_failed(exc)
                continue
            last = end if kept_all else msgs[-1].offset()
            self._batch_done(batch, msgs, last, len(msgs), handed_at)
            # Let the poll loop and other partitions run between batches (with an empty inbox
            # the wait at the top yields anyway: one trip round the event loop less).
            if inbox:
                await asyncio.sleep(0)

    def _batch_done(self, batch: Batch, msgs: list[Message], last: int | None, n: int,
                    handed_at: float) -> None:
        """A fetched batch has been through the chain (n of its records were data): the
        batch-end hooks and the watermark, then seal it."""
        ctx = self.ctx
        assert last is not None
        stores = self.stores
        if stores is not None and stores.waiting():  # its outputs may be acknowledged now
            stores.settle()
        if ctx.hooks.batch_end:
            for hook in ctx.hooks.batch_end:
                hook()
        if not ctx.epochs:  # epoch mode moves it at the end of each epoch
            self._watermark_after(last)
        batch.seal(last)
        if n:
            self._latency.record(time.perf_counter() - handed_at, n)
            self._e2e.record(max(0.0, time.time() - msgs[0].timestamp()[1] / 1000), n)
            if self.first_offset is None:
                self.first_offset = msgs[0].offset()
        self.records_in += n
        self.last_offset = last
        self._queued -= n
        self.busy = False
        if self._on_batch is not None:
            self._on_batch(n)
        if self.paused and self._queued <= self._low:
            self.paused = False
            self._resume(self.tp)

    # -- epoch mode (streamcore.runtime.epochs) ------------------------------------------
    @property
    def waiting_for_epoch(self) -> bool:
        """Epoch mode: the gate is closed (an epoch is ending, or is full): queued records
        wait for the next epoch."""
        return self._gate is not None and not self._gate.is_set()

    def idle(self, *, held_ok: bool = False) -> bool:
        """Nothing in progress: no batch half-way, no async call out, no output held
        (held_ok: outputs held for room count as done; an epoch's failed transaction,
        whose abort drops them)."""
        return not self.busy and not self._in_lanes() \
            and (held_ok or not self.ctx.blocked)

    async def _hand_over_hook_outputs(self) -> None:
        """Until the outputs held for room (a hook's, or at the loop's end any) are with the
        producer. Epoch mode: if the transaction has failed, they are dropped with the epoch
        (its abort rewinds the task); the task does not fail."""
        ctx = self.ctx
        try:
            await ctx.wait_unblocked()
        except TransactionAborted as exc:
            if self._on_txn_failed is None:
                raise
            # Epoch mode: they belong to the epoch that is now aborted and runs again.
            ctx.outbox.held.clear()
            ctx.blocked = False
            self._on_txn_failed(exc)

    async def _gate_or_stop(self, gate: asyncio.Event) -> None:
        """Until the gate opens or the task is asked to stop (a stop must not wait for the
        gate: a failed transaction keeps it closed until the next epoch end, and a graceful
        stop waits for this task before it ends the epoch itself)."""
        self._wakeup.clear()
        if self._closing:
            return
        waits = [asyncio.ensure_future(gate.wait()), asyncio.ensure_future(self._wakeup.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def hand_over_held(self) -> bool:
        """Hand outputs held for room to the producer (the hooks run at a stop or an epoch's
        end, after the task's loop has ended or while it waits); True when none is left."""
        return self.ctx.unblock_now()

    def stage_epoch(self) -> None:
        """The end of an epoch: the commit hooks, then the stores' changes to their
        changelogs (in the epoch's transaction)."""
        self.advance_watermark()
        self._send_markers()
        self._run_hooks(self.ctx.hooks.commit)
        if self.stores is not None:
            self.stores.stage(self.ctx.producer)

    def epoch_committed(self, offset: int | None) -> None:
        """The epoch's transaction committed (with offset as this partition's next offset)."""
        if self.stores is not None:
            self.stores.apply_staged()
        self._event_time_at_commit = self.ctx.event_time.snapshot()
        if offset is not None:
            self.committed = max(self.committed, offset)
        self.tracker.advance()  # every batch of the epoch is acknowledged: forget them

    def rewind_to(self) -> int | None:
        """The epoch aborted: forget what this task took since the last commit (its inbox,
        its held outputs, its uncommitted state) and return the offset to read again from
        (None: nothing was read yet)."""
        target = self.committed if self.committed >= 0 else self.start_offset
        self._drop_inbox()
        # Outputs held for room belong to the aborted epoch: the epoch run again makes them
        # again (before, they were handed to the next transaction as well: twice).
        self.ctx.outbox.held.clear()
        self.ctx.blocked = False
        for records in self.ctx.collected.values():
            records.clear()
        # The watermark goes back too: the epoch's records, read again, are judged against
        # the watermark they were judged against the first time.
        self.ctx.event_time.restore(self._event_time_at_commit)
        for forget in self.ctx.hooks.abort:
            forget()
        self.tracker = OffsetTracker()
        if self.stores is not None:
            self.stores.discard()
        if target is not None:
            self._offered = target - 1
            self.last_offset = target - 1 if target > 0 else None
        return target

    def fence(self) -> None:
        """This member may no longer own the partition (a lost membership or a fenced
        commit): stop at once, write nothing more (no output, no changelog), commit nothing.
        The caller cancels the running task; the next owner starts at the last commit."""
        self.fenced = True
        self.stop_intake()
        self._drop_inbox()
        if self.stores is not None:
            self.stores.abandon()

    def _drop_inbox(self) -> None:
        """Forget queued records: they are not done, so their offsets are not committed."""
        self._inbox.clear()
        self._queued = 0

    def _on_failed(self, failed: StepFailed) -> None:
        """ctx.failed: the policy for the record in ctx.msg (a fan-out or a lane)."""
        assert self.ctx.msg is not None
        self._record_failed(self.ctx.msg, failed)

    def _record_failed(self, m: Message, failed: StepFailed) -> None:
        self.policies.failed(m, failed)

    @property
    def dlq_records(self) -> int:
        return self.policies.dlq_records
