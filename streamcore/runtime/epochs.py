"""Epoch mode: exactly-once micro-batches in Kafka transactions (DESIGN.md section 4).

The partition tasks process records as they arrive, as in continuous mode, but every output
and changelog record goes to a transactional producer. An epoch ends when its trigger fires
(every interval, or when what was available is read); ending it is a barrier:

  1. close the gate: no task takes a new batch; wait until every task is idle (no batch
     half-way, no map_async call out, no output held for room);
  2. stage: the operators' commit hooks, then each store's changes to its changelog (in the
     transaction; RocksDB is not written yet), until every record of the epoch is with the
     producer; take the input offsets (each task's last processed offset + 1);
  3. open the gate: the tasks go on with the next epoch's records, their outputs kept back
     (streamcore.runtime.deferred), while this epoch's records are acknowledged (delivery
     reports are served on the event loop: a failed delivery stops the worker, as in
     continuous mode);
  4. send the input offsets to the transaction with the group's metadata, and commit it:
     outputs, changelogs and offsets at once; a member that is no longer in the group's
     generation cannot commit;
  5. post-commit: apply the staged changes to RocksDB (one batch per store) and checkpoint;
     begin the next transaction and hand it the outputs kept back meanwhile.

If step 3 or 4 fails with an abortable error, the gate closes again and the tasks finish what they
had taken; the transaction is aborted, every store forgets its
uncommitted changes, and every partition is read again from its committed offset (the fetch
loop is parked meanwhile, so that no record fetched before the seek arrives after it): the
epoch runs again with the same id and, the job being deterministic, the same results. A
fenced producer (another worker registered the transactional id) stops the worker.

A revoke ends the epoch (the revoked partitions' offsets included) before the partitions
move; a loss aborts it. A graceful stop finishes and commits the running epoch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from connectors.base import TopicPartition, fmt_offsets
from statestore.checkpoint import replace_file
from streamcore.core.errors import (
    ConfigError,
    FatalError,
    ProducerFenced,
    StreamcoreError,
    TransactionAborted,
)
from streamcore.plan.graph import OpKind
from streamcore.runtime import owners
from streamcore.runtime.commits import CommitProtocol
from streamcore.runtime.deferred import DeferringProducer
from streamcore.runtime.partition import PartitionTask, TaskState

if TYPE_CHECKING:
    from streamcore.runtime.worker import Worker

__all__ = ["EpochCommits", "EpochLog", "transactional_id"]

log = logging.getLogger("streamcore.epochs")
_TXN_TIMEOUT_S = 30.0
# Epochs that may fail in a row before the worker stops. An abort is the cure for a passing
# failure (a group that moved on, a partition lost mid-epoch): the epoch run again commits.
# A failure that comes back every time (a record the broker refuses for good, which
# librdkafka turns into an abortable error of the whole transaction) would otherwise be
# retried forever, the worker alive and committing nothing. (Spark fails a query once a
# task has failed 4 times.)
MAX_FAILED_EPOCHS_IN_A_ROW = 5


def transactional_id(group: str, state_dir: Path, configured: str | None) -> str:
    """The worker's transactional id: configured, or "{group}-{worker id}" with the worker id
    kept in the state directory, so that a restarted worker has the same id (and fences its
    previous incarnation, aborting what it left open) while two workers never share one
    (they cannot share a state directory either)."""
    if configured is not None:
        return configured
    path = state_dir / group / ".worker-id"
    try:
        worker = path.read_text().strip()
    except FileNotFoundError:
        worker = ""
    if not worker:
        worker = uuid.uuid4().hex[:12]
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, worker.encode())
    return f"{group}-{worker}"


class EpochLog:
    """Epoch ids that survive a restart: a small file next to the worker id. Before a
    transaction commits, the epoch and its offsets are written as pending; after, as
    committed. A worker that restarts with an epoch pending asks the group for its committed
    offsets: equal to the pending ones, the epoch committed (the next is one more); else it
    did not, and the epoch runs again with the same id (what foreach_batch relies on)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(self.path, orjson.dumps(data))

    def pending(self, epoch: int, offsets: dict[TopicPartition, int]) -> None:
        self._write({"pending": epoch, "offsets": [[t, p, o] for (t, p), o in offsets.items()]})

    def committed(self, epoch: int) -> None:
        self._write({"committed": epoch})

    def next_epoch(self, committed_offsets: Callable[[list[TopicPartition]],
                                                     dict[TopicPartition, int]]) -> int:
        """The id of the first epoch of this run. Blocking (asks the group if needed)."""
        try:
            data = orjson.loads(self.path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return 0
        if "committed" in data:
            return int(data["committed"]) + 1
        epoch = int(data["pending"])
        offsets = {(t, int(p)): int(o) for t, p, o in data["offsets"]}
        if offsets and committed_offsets(list(offsets)) == offsets:
            return epoch + 1  # it committed before the worker stopped
        return epoch  # it did not: it runs again under the same id


class EpochCommits(CommitProtocol):
    """Exactly-once for Kafka-to-Kafka jobs: one transaction per epoch (see the module)."""

    def __init__(self, worker: Worker) -> None:
        self._w = worker
        self.commits = 0
        self.aborts = 0
        self.failed_in_a_row = 0  # epochs failed since the last commit (not losses)
        self.epoch_id = 0
        self._log = EpochLog(Path(worker.config.state_dir) / worker.group / ".epoch")
        self._batch_steps = [n for n in worker.plan.nodes if n.kind == OpKind.FOREACH_BATCH]
        self.trigger = worker.config.trigger_spec
        self.gate = asyncio.Event()  # closed while an epoch ends (PartitionTask waits)
        self.gate.set()
        self._lock = asyncio.Lock()  # one epoch end at a time: trigger, revoke, stop
        self._awaiting_acks = False  # in step 3, waiting for the epoch's acknowledgements
        self._txn_thread = concurrent.futures.ThreadPoolExecutor(1, "sc-txn")
        self._in_txn = False
        self._epoch_started = time.monotonic()
        self._rows_mark = 0  # records processed before the running epoch began
        # available_now: records taken in the running epoch, and its bound
        self._taken = 0
        self._limit = worker.config.max_epoch_records if self.trigger.kind == "available_now" \
            else None
        self._full = asyncio.Event()
        self._failed: BaseException | None = None  # the running transaction failed
        self._overlapping = False  # a commit is running and the next epoch has begun
        # Tasks fenced before the running epoch began: it holds nothing of theirs. The tasks,
        # not their partitions: a partition lost and assigned again has a new task.
        self._fenced_at_start: frozenset[PartitionTask] = frozenset()
        assert worker.transactional_id is not None
        self._tid = worker.transactional_id
        self._me = owners.identity(worker.group)  # as a worker we fence will name us

    @property
    def in_progress(self) -> bool:
        return self._lock.locked()

    @property
    def awaiting_acks(self) -> bool:
        return self._awaiting_acks

    @property
    def awaiting_abort(self) -> bool:
        return self._failed is not None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        producer = self._w.producer
        if not producer.transactional:
            raise ConfigError("trigger", "epoch mode needs a transactional producer; the "
                              f"{self._w.clients.name} client has none")
        side_effects = [n.describe() for n in self._w.plan.nodes
                        if n.kind in (OpKind.MAP_ASYNC, OpKind.FOREACH, OpKind.PEEK)]
        if side_effects:
            # Their calls are not in the transaction: a retried epoch calls them again.
            log.warning("epoch mode: the outputs, state and offsets of this job are "
                        "exactly-once; the calls of %s are at-least-once (an aborted or "
                        "crashed epoch runs them again)", ", ".join(side_effects))
        # Announced before the registration fences the previous holder: it can name us.
        await self._blocking(owners.announce, self._w.clients, self._tid, self._me)
        await self._blocking(producer.init_transactions, _TXN_TIMEOUT_S)
        w = self._w
        self.epoch_id = await self._blocking(self._log.next_epoch, lambda parts: (
            w.clients.committed_offsets(w.group, parts)))
        self._begin()

    async def explain_fence(self, exc: ProducerFenced) -> ProducerFenced:
        """exc naming the worker that now holds the transactional id (if it said so)."""
        return await asyncio.get_running_loop().run_in_executor(
            None, owners.name_the_fencer, exc, self._w.clients, self._tid, self._me)

    def close(self) -> None:
        self._txn_thread.shutdown(wait=False)

    def txn_failed(self, exc: BaseException) -> None:
        """A task's produce found the transaction failed (abortable): no task takes more;
        the next epoch end aborts instead of committing."""
        if self._failed is None:
            self._failed = exc
            log.warning("the transaction failed (%s); the epoch will be aborted", exc)
        self.gate.clear()

    def taken(self, n: int) -> None:
        """A task took n records into the running epoch (PartitionTask's on_batch). Past
        the epoch's bound the gate closes: no task takes more until the epoch ends."""
        self._taken += n
        if self._limit is not None and self._taken >= self._limit:
            self.gate.clear()
            self._full.set()

    def _begin(self, *, overlapped: bool = False) -> None:
        """Begin the next epoch's transaction (overlapped: the epoch began when the gate
        opened during the last commit, and its counts run from there)."""
        self._w.producer.begin_transaction()
        self._in_txn = True
        if not overlapped:
            self._start_counts()

    def _start_counts(self) -> None:
        self._failed = None
        self._fenced_at_start = frozenset(t for t in self._w.tasks.values() if t.fenced)
        self._taken = 0
        self._full.clear()
        self._epoch_started = time.monotonic()
        self._rows_mark = self._w.status.processed()

    def task_producer(self) -> DeferringProducer:
        """A new partition task's producer: the transactional one, behind a deferral."""
        return DeferringProducer(self._w.producer, deferring=self._overlapping)

    def _deferring(self, on: bool, *, drop: bool = False) -> None:
        self._overlapping = on
        for t in self._w.tasks.values():
            p = t.ctx.producer
            if isinstance(p, DeferringProducer):
                if drop or t.fenced:
                    p.kept.clear()
                p.deferring = on

    def _overlap(self) -> None:
        """The tasks go on with the next epoch while this one commits; what they write is
        kept back until the next transaction begins."""
        self._deferring(True)
        self._start_counts()
        self.gate.set()

    async def _quiesce_dropping(self) -> None:
        """The commit failed during an overlap: until every task is idle, dropping what
        they keep back (a task waiting for room must finish its batch, all of which is
        rewound), then stop keeping."""
        tasks = [t for t in self._w.tasks.values() if not t.fenced]
        while True:
            self._deferring(True, drop=True)
            if all(t.idle() for t in tasks if t.state is TaskState.RUNNING):
                break
            await asyncio.sleep(0.001)
        self._deferring(False, drop=True)

    async def _release(self) -> None:
        """The next transaction has begun: the outputs kept back go to it, in order."""
        self._deferring(False)
        while True:
            try:
                left = [p for t in self._w.tasks.values() if not t.fenced and isinstance(
                    p := t.ctx.producer, DeferringProducer) and not p.release()]
            except TransactionAborted as exc:
                # The new transaction failed at once: the next epoch end aborts it, and
                # every task reads again from its committed offset (what is kept included).
                self._deferring(False, drop=True)
                self.txn_failed(exc)
                return
            if not left:
                return
            await asyncio.sleep(0.001)  # the producer's queue is full: delivery reports

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._txn_thread, fn, *args)

    # -- the trigger -------------------------------------------------------------------------
    async def run(self) -> None:
        t = self.trigger
        while True:
            if t.kind == "processing_time":
                await self._w.clock.sleep(t.interval_s)
                await self.end_epoch()
                continue
            # once / available_now: an epoch ends when what is available has been read (or,
            # for available_now, when the epoch holds max_epoch_records records). What an
            # epoch wrote to a repartition topic is read by the next one: the query stops
            # once an epoch finds everything read and nothing to commit.
            caught_up = await self._until_caught_up_or_full()
            if not await self.end_epoch() and caught_up:
                log.info("trigger %s: every available record is processed; stopping",
                         t.describe())
                self._w.stop()
                return

    async def _until_caught_up_or_full(self) -> bool:
        """True when everything available is processed; False when the epoch is full."""
        w, t = self._w, self.trigger
        while True:
            await w.clock.sleep(0.05)
            if self._full.is_set():
                return False
            if w.caught_up(t.quiet):
                return True

    # -- the epoch barrier ---------------------------------------------------------------
    async def end_epoch(self) -> bool:
        """Steps 1 to 5 of the module docstring; True if the epoch committed something.
        Raises a fenced producer or a failed delivery (fatal); an aborted transaction is
        retried by the next epoch, up to MAX_FAILED_EPOCHS_IN_A_ROW failures in a row."""
        async with self._lock:
            w = self._w
            self.gate.clear()
            t0 = time.monotonic()
            started = self._epoch_started  # step 3 starts the next epoch's counts
            try:
                tasks = [t for t in w.tasks.values() if not t.fenced]
                await self._quiesce(tasks)  # 1.
                t1 = time.monotonic()
                live = [t for t in tasks if t.state in (TaskState.RUNNING, TaskState.SUSPENDED)]
                try:
                    self._raise_failed()  # a produce of the epoch failed it
                    self._raise_fenced()  # a loss fenced a task while it quiesced
                    for t in live:  # 2.
                        t.stage_epoch()
                    await self._staged_sent(live)  # (aborts if a task is fenced meanwhile)
                    self._raise_failed()  # or a produce of the hooks that staging ran
                    offsets = {t.tp: t.last_offset + 1 for t in live
                               if t.last_offset is not None and t.last_offset + 1 > t.committed}
                    rows = w.status.processed() - self._rows_mark
                    if not offsets and rows == 0 and not self._changelogged(live):
                        self._discard_staged(live)
                        return False  # nothing happened: keep the transaction open
                    await self._foreach_batch(live)  # before the gate opens: the epoch's rows
                    self._log.pending(self.epoch_id, offsets)
                    self._overlap()  # 3.
                    await self._acknowledged(live)  # (aborts if a task is fenced meanwhile)
                    if offsets:  # 4.
                        metadata = w.member.group_metadata()
                        await self._blocking(w.producer.send_offsets_to_transaction, offsets,
                                             metadata, _TXN_TIMEOUT_S)
                    await self._blocking(w.producer.commit_transaction, _TXN_TIMEOUT_S)
                except TransactionAborted as exc:
                    if self._overlapping:  # what the tasks took meanwhile is rewound too
                        self.gate.clear()
                        await self._quiesce_dropping()
                        live = [t for t in w.tasks.values()
                                if t.state in (TaskState.RUNNING, TaskState.SUSPENDED)]
                    live = [t for t in live if not t.fenced]
                    await self._abort(live, f"the epoch failed: {exc}")
                    self.failed_in_a_row += 1
                    if self.failed_in_a_row >= MAX_FAILED_EPOCHS_IN_A_ROW:
                        raise FatalError(
                            f"epoch {self.epoch_id} failed {self.failed_in_a_row} times in a "
                            f"row, the last time: {exc}. A failure that every retry meets "
                            "is no passing one (a record the broker refuses for good fails "
                            "the whole transaction: librdkafka's TXNERR log line names it); "
                            "nothing of the epoch was committed") from exc
                    return False
                t2 = time.monotonic()
                self._log.committed(self.epoch_id)
                self.failed_in_a_row = 0
                for t in live:  # 5.
                    t.epoch_committed(offsets.get(t.tp))
                self.commits += 1
                w.commit_latency.record(t2 - t1)
                self._report(offsets, rows, process_s=t0 - started,
                             barrier_s=t1 - t0, commit_s=t2 - t1)
                self.epoch_id += 1
                self._begin(overlapped=True)
                await self._release()
                return True
            finally:
                if not self._full.is_set() and self._failed is None:
                    self.gate.set()

    def _raise_failed(self) -> None:
        if self._failed is not None:
            raise TransactionAborted(str(self._failed))

    def _raise_fenced(self) -> None:
        """A task fenced since the epoch began (the member may have left the group) wrote
        to this transaction, and its stores staged nothing (abandoned): commit none of it.
        The abort rewinds the others; the loss that follows closes the fenced ones."""
        fenced = sorted(t.tp for t in self._w.tasks.values() if t.fenced)
        if fenced:
            raise TransactionAborted("partitions fenced: "
                                     + ", ".join(f"{t}[{p}]" for t, p in fenced))

    async def _foreach_batch(self, live: list[PartitionTask]) -> None:
        """Each foreach_batch step's fn(records, epoch_id), on the transaction thread, with
        the epoch's records in partition order. A raise stops the query uncommitted."""
        for node in self._batch_steps:
            records = [r for t in sorted(live, key=lambda t: t.tp)
                       for r in t.ctx.collected.get(node.id, ())]
            assert node.fn is not None
            try:
                await self._blocking(node.fn, records, self.epoch_id)
            except Exception as exc:
                raise FatalError(
                    f"step {node.describe()!r} raised {type(exc).__name__}: {exc} in epoch "
                    f"{self.epoch_id}; the epoch is not committed and runs again with the "
                    "same id when the query restarts") from exc
            for t in live:
                t.ctx.collected.get(node.id, []).clear()

    async def _quiesce(self, tasks: list[PartitionTask]) -> None:
        """Until no task has work half-way (a revoked task has finished and stopped)."""
        # Polling: idleness is several conditions of several tasks, with no event for all.
        def quiet(t: PartitionTask) -> bool:
            return self._handed_over(t) and t.idle(held_ok=self._failed is not None)

        while not all(quiet(t) for t in tasks if t.state is TaskState.RUNNING):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        suspended = [t for t in tasks if t.state is TaskState.SUSPENDED]
        if suspended:
            await self._w.finish_running(suspended,
                                         time.monotonic() + self._w.config.shutdown_timeout_s)

    def _handed_over(self, t: PartitionTask) -> bool:
        """Outputs a hook made for this epoch, held for room, go now: the transaction is
        open. Once it has failed they stay (the abort drops them with the rest of the
        epoch's work): True when none is left to hand over."""
        if self._failed is not None:
            return True
        try:
            return t.hand_over_held()
        except TransactionAborted as exc:
            self.txn_failed(exc)
            return True

    async def _staged_sent(self, live: list[PartitionTask]) -> None:
        """Until every staged changelog record, and every output of the hooks that staging
        ran, is with the producer (before the gate opens: one held for room then would be
        kept back for the next transaction, while the state change made with it commits in
        this one). A task fenced meanwhile aborts the epoch at once (see _raise_fenced)."""
        while True:
            self._raise_fenced()
            if all(t.hand_over_held() and (t.stores is None or t.stores.staged_sent())
                   for t in live):
                return
            self._w.producer.poll(0)
            await asyncio.sleep(0.001)

    async def _acknowledged(self, live: list[PartitionTask]) -> None:
        """Until every record of the epoch is acknowledged, delivery reports served here.
        The producer holds only this epoch's records: the next one's are kept back."""
        self._awaiting_acks = True
        try:
            await self._until_acknowledged(live)
        finally:
            self._awaiting_acks = False

    async def _until_acknowledged(self, live: list[PartitionTask]) -> None:
        producer = self._w.producer
        while True:
            self._raise_fenced()  # a loss meanwhile: no need to wait, the epoch is aborted
            producer.poll(0)
            for t in live:
                if t.tracker.failure is not None:
                    raise producer.explain_failure(t.tracker.failure)
                if t.stores is not None and t.stores.inflight is not None \
                        and t.stores.inflight.failure is not None:
                    raise producer.explain_failure(t.stores.inflight.failure)
            if producer.in_flight() == 0:
                return
            await asyncio.sleep(0.001)

    @staticmethod
    def _changelogged(live: list[PartitionTask]) -> bool:
        """Some store staged changelog records in this epoch (a hook may change state with no
        input record)."""
        return any(t.stores is not None and t.stores.inflight is not None
                   and (t.stores.inflight.pending or t.stores.inflight.ends) for t in live)

    @staticmethod
    def _discard_staged(live: list[PartitionTask]) -> None:
        for t in live:
            if t.stores is not None:
                t.stores.apply_staged()  # nothing was staged: a no-op that clears the flush

    async def _abort(self, live: list[PartitionTask], reason: str,
                     gone: Iterable[TopicPartition] = ()) -> None:
        """Abort the transaction; every task forgets its uncommitted work and reads again
        from its committed offset (the fetch loop parked meanwhile)."""
        w = self._w
        self._in_txn = False
        self.aborts += 1
        log.warning("epoch %d aborted (%s); it runs again from the committed offsets",
                    self.epoch_id, reason)
        try:
            await self._blocking(w.producer.abort_transaction, 10.0)
        except TransactionAborted as exc:
            # The producer cannot go on (fenced, most likely: a produce refused as fenced
            # fails the transaction, then the abort): stop as fenced, so that the worker
            # names the holder of the id if another one announced itself; the next worker
            # with this transactional id aborts what is left open.
            raise ProducerFenced(f"this worker may have been fenced: the epoch's "
                                 f"transaction could not be aborted: {exc}") from exc
        async with w.fetcher.parked():
            seek: dict[TopicPartition, int] = {}
            skip = set(gone)
            for t in live:
                target = t.rewind_to()
                if target is not None and t.state is TaskState.RUNNING and t.tp not in skip:
                    seek[t.tp] = target
            if seek:
                w.member.seek(seek)
                log.info("read again from %s", fmt_offsets(seek))
        self._begin()

    async def abort_epoch(self, reason: str, gone: Iterable[TopicPartition] = ()) -> None:
        """A loss: abort the running epoch; the partitions kept read again from their
        committed offsets (gone: partitions no longer assigned, not sought). Not if every
        task of a gone partition was fenced before the epoch began (an epoch's end aborted
        the one that held their work): this epoch holds nothing of theirs."""
        gone = set(gone)
        async with self._lock:
            self.gate.clear()
            try:
                tasks = [t for t in self._w.tasks.values()]
                await self._quiesce([t for t in tasks if not t.fenced])
                theirs = [t for t in tasks if t.tp in gone and t not in self._fenced_at_start]
                if self._in_txn and theirs:
                    await self._abort(tasks, reason, gone)
            finally:
                self.gate.set()

    def _report(self, offsets: dict[TopicPartition, int], rows: int, *, process_s: float,
                barrier_s: float, commit_s: float) -> None:
        epoch = {
            "batchId": self.epoch_id,
            "numInputRows": rows,
            "durationMs": {"process": round(process_s * 1000, 1),
                           "barrier": round(barrier_s * 1000, 1),
                           "commit": round(commit_s * 1000, 1),
                           "total": round((process_s + barrier_s + commit_s) * 1000, 1)},
            "committedOffsets": {f"{t}[{p}]": o for (t, p), o in sorted(offsets.items())},
        }
        self._w.status.report_epoch(epoch, process_s + barrier_s + commit_s)

    # -- CommitProtocol --------------------------------------------------------------------
    def commit_due(self) -> None:
        """Epochs end by their trigger (run), never by the commit interval."""

    def commit_failed(self, offsets: dict[TopicPartition, int]) -> None:
        """Offsets are committed in transactions, never by the member."""

    async def prepare(self, parts: list[TopicPartition]) -> None:
        await self._drain(parts, time.monotonic() + self._w.config.shutdown_timeout_s)

    def done_offsets(self, parts: Iterable[TopicPartition], *, raise_failure: bool = True,
                     only_moved: bool = True) -> dict[TopicPartition, int]:
        return {}  # the transaction carries them

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await self.end_epoch()

    async def hand_over(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        """A revoke: those partitions stop taking records; the epoch ends now with their
        offsets (and everyone else's) in its transaction; nothing is left for the member to
        commit."""
        await self.prepare(parts)
        await self.end_epoch()
        return {}

    async def on_lost(self, parts: list[TopicPartition]) -> None:
        await self.abort_epoch("partitions lost: " + ", ".join(f"{t}[{p}]" for t, p in parts),
                               gone=parts)

    async def finish(self, parts: list[TopicPartition]) -> None:
        """A graceful stop: finish and commit the running epoch (never abort it)."""
        await self.prepare(parts)
        try:
            await self.end_epoch()
        except StreamcoreError as exc:
            if not isinstance(exc, TransactionAborted):
                raise
            log.warning("final epoch aborted: %s", exc)

    async def commit_after_failure(self, parts: list[TopicPartition]) -> None:
        """After a fatal error nothing of the running epoch may be committed: abort it."""
        if self._in_txn:
            self._in_txn = False
            try:  # briefly: a fenced producer cannot abort (the next owner's init does)
                await self._blocking(self._w.producer.abort_transaction, 2.0)
            except StreamcoreError as exc:
                log.warning("abort after failure: %s", exc)
