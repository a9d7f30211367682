"""The state stores of one partition task: open, restore, flush with the changelog, close.

A stateful step's store for partition P lives under ``{state_dir}/{job}/{step}/{P}/`` with a
write-back cache in front (statestore/cache.py) and the changelog topic
``{job}-{step}-changelog``, partition P, behind. Its life follows the task's:

1. open, when the task is created: a store that cannot be opened is wiped (with a warning); a
   store without a valid checkpoint is wiped too, because its contents may be ahead of or
   behind the changelog in ways only a full replay repairs;
2. restore (task RESTORING): replay the changelog from the checkpoint to its true end;
3. flush, at every commit: dirty keys go to RocksDB (one write batch) and to the changelog;
   :class:`Flush` counts their acknowledgements. The input offsets the flush covers may be
   committed only once it is acknowledged (DESIGN.md section 4, invariant 1), and only then
   may the checkpoint move to the changelog's new end. It moves once the changelog has grown
   by CHECKPOINT_EVERY records since it last moved (Kafka Streams' rule), at the end of a
   restore, after each committed epoch and at close; each move syncs the store first. A
   checkpoint behind the store only makes a restore replay more: changelog records carry
   whole values, so replaying one the store already holds changes nothing;
4. close (revoke, shutdown): checkpoint, flush RocksDB, release it; the checkpoint stays for
   the next owner on this machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from connectors.base import Message, Outbox, PartitionReader, ProducerBackend
from connectors.reading import read_to_end
from statestore.base import Change, Store, StoreCorrupt
from statestore.cache import StateCache
from statestore.checkpoint import read_checkpoint, remove_checkpoint, write_checkpoint
from statestore.memory import MemoryStore
from statestore.rocksdb import RocksDBSettings, RocksDBStore
from streamcore.core.errors import DeliveryFailed
from streamcore.runtime.tracking import Batch

__all__ = ["Flush", "PartitionStores", "StoreSlot", "open_store", "reopen_empty",
           "write_records"]

log = logging.getLogger("streamcore.state")
# Changelog records between two checkpoints of a store while it runs: a checkpoint costs
# three fsyncs on the event loop, which at every commit (100 ms, per store) cost several
# percent of a stateful job's throughput on a fast disk and far more on a slow one.
CHECKPOINT_EVERY = 10_000


def open_store(path: Path, settings: RocksDBSettings) -> tuple[Store, bool]:
    """Open the RocksDB store at path; return it and whether its previous contents are
    usable (False: it did not exist, or could not be opened and was wiped)."""
    existed = path.exists()
    try:
        return RocksDBStore(path, settings), existed
    except StoreCorrupt as exc:
        log.warning("%s; wiping it and rebuilding from the changelog", exc)
        RocksDBStore.wipe(path)
        return RocksDBStore(path, settings), False


def reopen_empty(store: Store, path: Path, settings: RocksDBSettings) -> Store:
    """Close store, wipe its directory and open it again, empty."""
    store.close()
    RocksDBStore.wipe(path)
    return open_store(path, settings)[0]


def write_records(store: Store, msgs: list[Message]) -> int:
    """Apply changelog (or compacted topic) records to store; a null value deletes."""
    store.write([(m.key() or b"", m.value()) for m in msgs])
    return len(msgs)


@dataclass
class StoreSlot:
    step: str
    changelog: str
    path: Path
    store: Store
    cache: StateCache
    restore_from: int  # changelog offset to replay from
    rebuilt: str | None = None  # why the store is rebuilt from nothing (a WARNING at restore)
    restored: int = 0
    restore_seconds: float = 0.0
    end: int = -1  # next changelog offset known to be in the store
    checkpointed: int = -1  # the changelog offset the checkpoint file holds


class Flush:
    """The changelog records of one flush and their acknowledgements."""

    __slots__ = ("after", "covers", "ends", "failure", "outbox", "pending", "taken")

    def __init__(self, covers: int, producer: ProducerBackend) -> None:
        self.covers = covers  # every input offset <= covers has its state in this flush
        self.outbox = Outbox(producer)  # records the producer had no room for yet
        self.pending = 0
        self.failure: DeliveryFailed | None = None
        # A flush that waits: its changes, written once these batches are acknowledged.
        self.after: list[Batch] = []
        self.taken: list[tuple[StoreSlot, list[Change]]] = []
        self.ends: dict[str, int] = {}  # changelog topic -> highest acknowledged offset + 1

    def ack(self, err: Any, msg: Any) -> None:
        if err is not None:
            if self.failure is None:
                self.failure = DeliveryFailed(msg.topic() if msg is not None else "?", str(err))
            return
        self.pending -= 1
        topic, off = msg.topic(), msg.offset()
        if off is not None and off + 1 > self.ends.get(topic, -1):
            self.ends[topic] = off + 1


class PartitionStores:
    def __init__(self, job: str, partition: int, *, state_dir: Path, backend: str,
                 settings: RocksDBSettings, cache_entries: int) -> None:
        self.job = job
        self.partition = partition
        self._dir = state_dir
        self._backend = backend
        self._settings = settings
        self._cache_entries = cache_entries
        self.slots: list[StoreSlot] = []
        self.inflight: Flush | None = None
        self.durable = -1  # highest input offset whose state changes are acknowledged
        self._staged: list[tuple[StoreSlot, list[Change]]] = []  # epoch mode, uncommitted

    def open(self, step: str, changelog: str, dumps: Callable[[Any], bytes],
             loads: Callable[[bytes], Any]) -> StateCache:
        path = self._dir / self.job / step / str(self.partition)
        start: int | None = None
        rebuilt: str | None = None
        if self._backend == "memory":  # nothing survives the process: always replay
            store: Store = MemoryStore()
        else:
            saved = read_checkpoint(path, changelog, self.partition)
            store, usable = open_store(path, self._settings)
            start = saved if usable else None
            if not usable and saved is not None:
                rebuilt = "its directory was missing or unreadable"
            if start is None:
                remove_checkpoint(path)
                if usable and any(True for _ in store.range()):
                    # Contents without a checkpoint: replaying onto them could keep keys
                    # that the changelog has since deleted. Start clean.
                    rebuilt = "it had no valid checkpoint"
                    store = reopen_empty(store, path, self._settings)
        cache = StateCache(store, dumps, loads, max_entries=self._cache_entries)
        self.slots.append(StoreSlot(step, changelog, path, store, cache, start or 0, rebuilt))
        return cache

    # -- 2. restore (on a worker thread) -------------------------------------------------
    def restore(self, new_reader: Callable[[], PartitionReader],
                stop: Callable[[], bool]) -> None:
        """Replay each store's changelog from its checkpoint to the true end, all of them
        through one reader (one client per partition, however many stores it has)."""
        if not self.slots:
            return
        t0 = time.perf_counter()
        by_topic = {slot.changelog: slot for slot in self.slots}

        def apply(msgs: list[Message]) -> None:
            for topic, run in groupby(msgs, key=_topic):
                slot = by_topic[topic]
                slot.restored += write_records(slot.store, list(run))

        reader = new_reader()
        try:
            ends = read_to_end(reader, {(slot.changelog, self.partition): slot.restore_from
                                        for slot in self.slots}, apply, stop=stop)
        finally:
            reader.close()
        if stop():
            return
        seconds = time.perf_counter() - t0
        for slot in self.slots:
            slot.end = ends[(slot.changelog, self.partition)]
            slot.restore_seconds = seconds
            self._checkpoint(slot, now=True)
            if slot.rebuilt is not None:
                log.warning("store %s was rebuilt from %s[%d] because %s: %d records "
                            "restored in %.2fs", slot.path, slot.changelog, self.partition,
                            slot.rebuilt, slot.restored, slot.restore_seconds)
            else:
                log.info("restored %s[%d] from offset %d: %d records in %.2fs",
                         slot.changelog, self.partition, slot.restore_from, slot.restored,
                         slot.restore_seconds)

    # -- 3. flush (event loop thread) ----------------------------------------------------
    def flush(self, covers: int, producer: ProducerBackend,
              after: list[Batch] | None = None) -> None:
        """Start a flush of every dirty key, covering input offsets up to covers; a flush
        still waiting for acknowledgements is completed first (then this returns).

        after: the batches whose outputs are not acknowledged yet. State changes never
        become durable before the outputs made with them: were they, a crash would lose
        those outputs for good when the state holds what made them (a timeout's removal:
        nothing left to time out; a duplicate filter's entry: the record read again is
        dropped as a duplicate). So the flush takes the dirty keys now and writes them, to
        the stores and the changelogs, once those batches are acknowledged; later writes
        wait for the next flush."""
        if self.inflight is not None and not self.settle():
            return
        f = Flush(covers, producer)
        if after:
            f.after = after
            f.taken = [(slot, slot.cache.take()) for slot in self.slots]
        else:
            for slot in self.slots:
                slot.cache.flush(self._sender(f, slot.changelog))
        self.inflight = f
        self.settle()

    def _sender(self, f: Flush, topic: str) -> Callable[[bytes, bytes | None], None]:
        """Hands one changelog record of the flush f to the producer (counted by f)."""
        part = self.partition

        def send(key: bytes, value: bytes | None) -> None:
            f.pending += 1
            f.outbox.send(topic, value, key, part, f.ack, 0, None)
        return send

    # -- 3'. epoch mode: stage, then apply or discard ----------------------------------------
    def stage(self, producer: ProducerBackend) -> None:
        """End of an epoch: the dirty keys go to the changelogs, in the epoch's transaction;
        the stores are written only once it commits (:meth:`apply_staged`)."""
        f = Flush(-1, producer)
        for slot in self.slots:
            self._staged.append((slot, slot.cache.stage(self._sender(f, slot.changelog))))
        self.inflight = f

    def staged_sent(self) -> bool:
        """Every staged changelog record is with the producer (none held for room)."""
        return self.inflight is None or self.inflight.outbox.retry()

    def apply_staged(self) -> None:
        """The epoch's transaction committed: write its changes to the stores (one batch
        each) and checkpoint them at the changelog ends the commit acknowledged."""
        f, self.inflight = self.inflight, None
        for slot, changes in self._staged:
            slot.cache.apply(changes)
            end = f.ends.get(slot.changelog) if f is not None else None
            if end is not None and end > slot.end:
                slot.end = end
                # At every epoch: a restore from an older checkpoint would replay aborted
                # epochs' changelog records on a broker that shows them (DESIGN.md 9).
                self._checkpoint(slot, now=True)
        self._staged = []

    def discard(self) -> None:
        """The epoch's transaction aborted: forget its changes (cached, staged, dirty); the
        stores still hold the last committed epoch, and reads reload from them."""
        for slot in self.slots:
            slot.cache.clear()
        self._staged = []
        self.inflight = None

    def waiting(self) -> bool:
        """A flush waits for outputs' acknowledgements before it writes."""
        f = self.inflight
        return f is not None and bool(f.after)

    def settle(self) -> bool:
        """Complete the in-flight flush if it is acknowledged; True when none is pending.
        A failed changelog write is raised: its input offsets must never be committed."""
        f = self.inflight
        if f is None:
            return True
        if f.failure is not None:
            raise f.failure
        if f.after:
            if any(b.pending for b in f.after):  # a failed one never gets there
                return False
            f.after = []
            for slot, changes in f.taken:
                slot.cache.write_taken(changes, self._sender(f, slot.changelog))
            f.taken = []
        if not f.outbox.retry() or f.pending:
            return False
        self.inflight = None
        self.durable = max(self.durable, f.covers)
        for slot in self.slots:  # the store now reflects the changelog up to here
            end = f.ends.get(slot.changelog)
            if end is not None and end > slot.end:
                slot.end = end
                self._checkpoint(slot)
        return True

    def _checkpoint(self, slot: StoreSlot, *, now: bool = False) -> None:
        """Move slot's checkpoint to slot.end: if now, or once the changelog has grown by
        CHECKPOINT_EVERY records since the last move. The store is synced first, so that
        the checkpoint never claims writes a power loss could take back."""
        if self._backend == "memory" or slot.end <= slot.checkpointed:
            return
        if not now and slot.end - slot.checkpointed < CHECKPOINT_EVERY:
            return
        slot.store.flush()
        write_checkpoint(slot.path, slot.changelog, self.partition, slot.end)
        slot.checkpointed = slot.end

    @property
    def dirty(self) -> int:
        return sum(s.cache.dirty for s in self.slots)

    def abandon(self) -> None:
        """Forget unflushed changes (a fenced task must not write its changelog); the
        store keeps what was flushed, and its checkpoint says where to resume."""
        for slot in self.slots:
            slot.cache.clear()
        self.inflight = None

    # -- 4. close ------------------------------------------------------------------------
    def close(self) -> None:
        for slot in self.slots:
            try:
                self._checkpoint(slot, now=True)  # the next owner replays nothing
            except Exception as exc:
                log.warning("checkpointing store %s failed: %s", slot.path, exc)
            try:
                slot.store.close()
            except Exception as exc:
                log.warning("closing store %s failed: %s", slot.path, exc)
        self.slots.clear()


def _topic(m: Message) -> str:
    return m.topic() or ""
