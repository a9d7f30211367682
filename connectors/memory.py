"""An in-memory Kafka: topics, partitions, one consumer group's members and committed offsets
inside this process, behind the same interfaces as the Kafka backends (connectors.base).

It exists for :class:`streamcore.testing.TestDriver`: a job runs with the same operators and
the same commit protocol, in milliseconds and without a broker. What it models: partitions
with offsets, keys placed by the Java client's murmur2 partitioner, committed offsets per
group, positions that resume from them, pause/resume, and acknowledgements that the test
can hold back or fail, and transactions read as read_committed: a transaction's records are
in the log at once but readable only once it commits (never, if it aborts), and no reader
passes an open transaction (the last stable offset). What it does not: replication,
retention, several members of one group (the one member gets every partition).
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.base import (
    ClientBackend,
    ConsumerBackend,
    DeliveryCallback,
    Message,
    PartitionReader,
    PartitionsCallback,
    ProducerBackend,
    TopicPartition,
)
from connectors.threaded import ThreadedMember
from streamcore.core.errors import (
    BrokerUnavailable,
    DeliveryFailed,
    ProducerFenced,
    TransactionAborted,
)

__all__ = ["MemoryClients", "MemoryCluster", "MemoryMessage", "murmur2_partition"]


class MemoryMessage:
    """One record of an in-memory partition (the :class:`~connectors.base.Message` shape)."""

    __slots__ = ("_headers", "_key", "_offset", "_partition", "_timestamp", "_topic", "_value",
                 "txn")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None,
                 value: bytes | None, timestamp: int,
                 headers: list[tuple[str, bytes]] | None) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._timestamp = key, value, timestamp
        self._headers = headers
        self.txn = COMMITTED  # or OPEN / ABORTED: written in a transaction not committed

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, self._timestamp)  # TIMESTAMP_CREATE_TIME

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def error(self) -> None:
        return None

    def __repr__(self) -> str:
        return (f"MemoryMessage({self._topic}[{self._partition}]@{self._offset}, "
                f"key={self._key!r}, value={self._value!r})")


COMMITTED, OPEN, ABORTED = 0, 1, 2


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition the Java client (and librdkafka's murmur2 partitioners) gives key."""
    m, r = 0x5BD1E995, 24
    length = len(key)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(key[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length % 4
    tail = key[length - rest:]
    if rest == 3:
        h ^= tail[2] << 16
    if rest >= 2:
        h ^= tail[1] << 8
    if rest >= 1:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


@dataclass
class MemoryCluster:
    """The broker. Thread-safe: the engine reads on its fetch thread, commits on its
    membership thread and produces on the event loop."""

    clock_ms: Callable[[], int]
    default_partitions: int = 1
    topics: dict[str, list[list[MemoryMessage]]] = field(default_factory=dict)
    committed: dict[tuple[str, TopicPartition], int] = field(default_factory=dict)
    configs: dict[str, dict[str, str]] = field(default_factory=dict)
    # transactional id -> the producer that registered it last (earlier ones are fenced)
    txn_owners: dict[str, Any] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    # serve_gap: records still to pass over, and how many more appends to pass over
    _passed_over: dict[TopicPartition, set[int]] = field(default_factory=dict)
    _gaps_to_come: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict)

    def create_topic(self, name: str, partitions: int | None = None,
                     config: dict[str, str] | None = None) -> None:
        with self._cond:
            if name not in self.topics:
                self.topics[name] = [[] for _ in range(partitions or self.default_partitions)]
                self.configs[name] = dict(config or {})

    def append(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
               timestamp: int, headers: list[tuple[str, bytes]] | None,
               txn: int = COMMITTED) -> MemoryMessage:
        with self._cond:
            log = self.topics[topic][partition]
            msg = MemoryMessage(topic, partition, len(log), key, value, timestamp, headers)
            msg.txn = txn
            log.append(msg)
            tp = (topic, partition)
            after, count = self._gaps_to_come.get(tp, (0, 0))
            if count:
                if after:
                    self._gaps_to_come[tp] = (after - 1, count)
                else:
                    self._gaps_to_come[tp] = (0, count - 1)
                    self._passed_over.setdefault(tp, set()).add(msg.offset())
            self._cond.notify_all()
            return msg

    def serve_gap(self, topic: str, partition: int, records: int, *, after: int = 0) -> None:
        """A fault of the local broker (README, "The local broker"): `records` records
        appended to this partition, after the next `after` ones, are passed over by the first
        fetch that returns a record after them, as if they were not written yet; from then on
        they are read normally (a reader that seeks back to them gets them)."""
        with self._cond:
            self._gaps_to_come[(topic, partition)] = (after, records)

    def end_transaction(self, msgs: list[MemoryMessage], outcome: int,
                        offsets: dict[tuple[str, TopicPartition], int]) -> None:
        """Commit (with the group offsets) or abort a transaction's records at once."""
        with self._cond:
            for m in msgs:
                m.txn = outcome
            if outcome == COMMITTED:
                for key, off in offsets.items():
                    self.committed[key] = max(off, self.committed.get(key, 0))
            self._cond.notify_all()

    def atomically(self) -> threading.Condition:
        """``with cluster.atomically():`` appends inside become visible to readers together
        (one fetch can take them all)."""
        return self._cond

    def end(self, tp: TopicPartition) -> int:
        parts = self.topics.get(tp[0])
        return len(parts[tp[1]]) if parts is not None and tp[1] < len(parts) else 0

    def stable_end(self, tp: TopicPartition) -> int:
        """The last stable offset: where a read_committed reader stops (the first record of
        an open transaction, else the end)."""
        with self._cond:
            log = self.topics.get(tp[0], [[]] * (tp[1] + 1))[tp[1]]
            for m in log:
                if m.txn == OPEN:
                    return m.offset()
            return len(log)

    def read(self, positions: dict[TopicPartition, int], skip: set[TopicPartition],
             max_records: int, timeout: float) -> list[MemoryMessage]:
        """Up to max_records from the partitions at positions (advancing them), waiting at
        most timeout seconds for the first."""
        with self._cond:
            out = self._take(positions, skip, max_records)
            if not out and timeout > 0:
                self._cond.wait(timeout)
                out = self._take(positions, skip, max_records)
            return out

    def _take(self, positions: dict[TopicPartition, int], skip: set[TopicPartition],
              max_records: int) -> list[MemoryMessage]:
        out: list[MemoryMessage] = []
        for tp, pos in positions.items():
            if tp in skip:
                continue
            log = self.topics[tp[0]][tp[1]]
            batch = log[pos:pos + max_records - len(out)]
            if self._passed_over.get(tp):
                batch = self._pass_over(tp, batch)
            if any(m.txn != COMMITTED for m in batch):  # read_committed
                readable = []
                for m in batch:
                    if m.txn == OPEN:
                        break  # the last stable offset: nothing after it yet
                    if m.txn == COMMITTED:
                        readable.append(m)
                    pos = m.offset() + 1  # aborted records are skipped
                positions[tp] = pos
                out.extend(readable)
            elif batch:
                out.extend(batch)
                positions[tp] = batch[-1].offset() + 1
            if len(out) >= max_records:
                break
        return out

    def _pass_over(self, tp: TopicPartition, batch: list[MemoryMessage],
                   ) -> list[MemoryMessage]:
        """serve_gap: the batch without the records to pass over if a record follows them
        (they are then readable again), else the batch up to them."""
        gap = self._passed_over[tp]
        kept = [m for m in batch if m.offset() not in gap]
        if len(kept) == len(batch):
            return batch
        if kept[-1:] != batch[-1:]:  # nothing after them yet: not readable at all
            return batch[:next(i for i, m in enumerate(batch) if m.offset() in gap)]
        gap.difference_update(m.offset() for m in batch)
        return kept

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class MemoryConsumer(ConsumerBackend):
    """The group's only member: it is assigned every partition of what it subscribes to at
    its first serve, and revokes them at close. A serve that comes more than
    ``max_poll_interval_s`` after the last one finds the member out of the group, as
    librdkafka does: its partitions are lost, and the same serve joins again (assigned from
    the committed offsets). With ``expire_session`` set, the next serve finds them lost
    the same way (the coordinator dropped the member: its heartbeats stopped reaching it)."""

    def __init__(self, cluster: MemoryCluster, group: str,
                 max_poll_interval_s: float = 300.0) -> None:
        self._cluster = cluster
        self._group = group
        self.max_poll_interval_s = max_poll_interval_s
        self._last_serve: float | None = None
        self._topics: Sequence[str] = ()
        self._callbacks: dict[str, Any] = {}
        self._assigned: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._lock = threading.Lock()  # positions: fetch thread vs membership thread
        self.dead = False  # a crashed process: it commits nothing more
        self.fail_commits = False  # the coordinator refuses commits (not a fencing)
        self._commit_failed: Callable[[dict[TopicPartition, int]], None] | None = None
        self.returned = 0  # messages handed to the engine so far
        self.expire_session = False  # the next serve finds the partitions lost

    def subscribe(self, topics: Sequence[str], *, on_assign: PartitionsCallback,
                  on_revoke: PartitionsCallback, on_lost: PartitionsCallback,
                  start_at_end: Callable[[str], bool] = lambda topic: False,
                  on_fenced: PartitionsCallback | None = None) -> None:
        self._topics = list(topics)
        self._callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost,
                           "end": start_at_end}

    def _matching(self) -> list[TopicPartition]:
        names = sorted(t for t in self._cluster.topics
                       if any(re.fullmatch(s[1:], t) if s.startswith("^") else s == t
                              for s in self._topics))
        return [(t, p) for t in names for p in range(len(self._cluster.topics[t]))]

    def serve(self, timeout: float) -> list[Any]:
        time.sleep(min(timeout, 0.002))  # a real serve waits for the coordinator too
        last, self._last_serve = self._last_serve, time.monotonic()
        late = last is not None and self._last_serve - last > self.max_poll_interval_s
        if self._assigned and (late or self.expire_session):
            lost, self._assigned = self._assigned, []
            with self._lock:
                self._positions.clear()
            self._callbacks["lost"](lost)
        if self._callbacks and not self._assigned:
            parts = self._matching()
            if parts:
                self._callbacks["assign"](parts)
                with self._lock:
                    for tp in parts:
                        done = self._cluster.committed.get((self._group, tp))
                        start = (done if done is not None else
                                 self._cluster.end(tp) if self._callbacks["end"](tp[0]) else 0)
                        self._positions[tp] = start
                    self._assigned = parts
        self.expire_session = False  # lost, and joined again
        return []

    def consume(self, max_records: int, timeout: float) -> list[Message]:
        with self._lock:
            positions = dict(self._positions)
        msgs = self._cluster.read(positions, set(self._paused), max_records, timeout)
        with self._lock:
            for tp, pos in positions.items():
                if tp in self._positions:
                    self._positions[tp] = max(self._positions[tp], pos)
            self.returned += len(msgs)
        return list(msgs)

    def positions(self) -> dict[TopicPartition, int]:
        """The next offset to fetch per assigned partition."""
        with self._lock:
            return dict(self._positions)

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        self._paused.update(partitions)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        self._paused.difference_update(partitions)

    def observe_commit_failures(self,
                                failed: Callable[[dict[TopicPartition, int]], None]) -> None:
        self._commit_failed = failed

    def commit(self, offsets: dict[TopicPartition, int], *, asynchronous: bool) -> None:
        if self.dead:
            return
        if self.fail_commits:
            if not asynchronous:
                raise BrokerUnavailable("commit failed: the coordinator is not available")
            if self._commit_failed is not None:
                self._commit_failed(dict(offsets))
            return
        for tp, off in offsets.items():
            key = (self._group, tp)
            self._cluster.committed[key] = max(off, self._cluster.committed.get(key, 0))

    def close(self) -> None:
        parts, self._assigned = self._assigned, []
        if parts and not self.dead:
            self._callbacks["revoke"](parts)
        with self._lock:
            self._positions.clear()
        self._cluster.wake()  # a fetch waiting on the fetch thread returns now

    def high_watermark(self, tp: TopicPartition) -> int | None:
        return self._cluster.end(tp)

    def seek(self, offsets: dict[TopicPartition, int]) -> None:
        with self._lock:
            for tp, off in offsets.items():
                if tp in self._positions:
                    self._positions[tp] = off

    def group_metadata(self) -> Any:
        return self._group


class MemoryProducer(ProducerBackend):
    """A record reaches the cluster when produced (readable at once, as on a broker that
    answers fast) and its acknowledgement is served by the next :meth:`poll`, as librdkafka
    serves delivery reports. With ``hold`` set, records wait in flight (a slow broker) until
    :meth:`release`; with ``fail`` set, they never reach the cluster and their
    acknowledgements report that error. With ``queue_limit``, a produce that finds that
    many records in flight (held, or with a report not served yet) raises BufferError, as
    librdkafka does when ``queue.buffering.max.messages`` is reached. With
    ``fail_transaction``, the next produce finds the transaction failed (an abortable
    error), and, as librdkafka, every produce, offset send and commit is then refused until
    the transaction is aborted."""

    def __init__(self, cluster: MemoryCluster, transactional_id: str | None = None) -> None:
        self._cluster = cluster
        self.transactional_id = transactional_id
        self.transactional = transactional_id is not None
        self._txn: list[MemoryMessage] | None = None  # the open transaction's records
        self._txn_offsets: dict[tuple[str, TopicPartition], int] = {}
        self._held: list[tuple[str, int, bytes | None, bytes | None, int,
                               list[tuple[str, bytes]] | None, DeliveryCallback]] = []
        self._reports: list[tuple[DeliveryCallback, Any, MemoryMessage]] = []
        self._round_robin = itertools.count()
        self.hold = False
        self.hold_topics: frozenset[str] | None = None  # hold only these (None: all)
        self.queue_limit: int | None = None
        self.fail: str | None = None
        self.dead = False  # a crashed process: nothing more reaches the cluster
        self.abort_commits = 0  # transaction commits still to fail (abortable)
        self.fail_transaction = False  # the next produce finds the transaction failed
        self._txn_failed = False  # as librdkafka: refused until the abort

    def produce(self, topic: str, value: bytes | None, key: bytes | None, partition: int,
                on_delivery: DeliveryCallback, reserved: None, timestamp: int,
                headers: list[tuple[str, bytes]] | None = None, /) -> None:
        if self.dead:
            return
        parts = self._cluster.topics.get(topic)
        if parts is None:
            raise KeyError(f"unknown topic {topic!r}")
        if self.queue_limit is not None and self.in_flight() >= self.queue_limit:
            raise BufferError("Local: Queue full")
        if partition < 0:
            partition = (murmur2_partition(key, len(parts)) if key is not None
                         else next(self._round_robin) % len(parts))
        if timestamp == 0:  # as librdkafka: the time of the write
            timestamp = self._cluster.clock_ms()
        if self.fail_transaction and self.fail is None:
            # Raised by produce calls only, never by release() of held records: the
            # driver's thread, not the engine, would get it.
            self.fail_transaction = False
            self._txn_failed = True
        if self._txn_failed:
            # librdkafka refuses every produce of a transaction in its abortable error
            # state, until abort_transaction.
            raise TransactionAborted("the transaction failed (injected): an abortable error")
        record = (topic, partition, key, value, timestamp, headers, on_delivery)
        if self.hold and (self.hold_topics is None or topic in self.hold_topics):
            self._held.append(record)
        else:
            self._send(record)

    def _send(self, record: tuple[str, int, bytes | None, bytes | None, int,
                                  list[tuple[str, bytes]] | None, DeliveryCallback]) -> None:
        topic, partition, key, value, timestamp, headers, on_delivery = record
        if self.fail is not None:
            failed = MemoryMessage(topic, partition, -1, key, value, timestamp, headers)
            self._reports.append((on_delivery, self.fail, failed))
            return
        if self._txn is None:
            if self.transactional:
                raise RuntimeError("produce outside a transaction")  # as librdkafka refuses
            msg = self._cluster.append(topic, partition, key, value, timestamp, headers)
        else:
            msg = self._cluster.append(topic, partition, key, value, timestamp, headers, OPEN)
            self._txn.append(msg)
        self._reports.append((on_delivery, None, msg))

    def release(self) -> None:
        """Send what was held (in order) and is not held any more: everything once hold is
        off, else the topics no longer held (so that no record of theirs overtakes an
        earlier one, which a partition never allows). Acknowledgements come with the next
        poll."""
        held, self._held = self._held, []
        for record in held:
            if self.hold and (self.hold_topics is None or record[0] in self.hold_topics):
                self._held.append(record)
            else:
                self._send(record)

    def delivery_error(self, topic: str, exc: Exception) -> Exception:
        if isinstance(exc, TransactionAborted):
            return exc
        return DeliveryFailed(topic, f"{type(exc).__name__}: {exc}")

    # -- transactions ----------------------------------------------------------------------
    def _check_owner(self, what: str) -> None:
        if self.dead:
            raise TransactionAborted(f"{what}: the process is gone")
        if self._cluster.txn_owners.get(self.transactional_id or "") is not self:
            raise ProducerFenced(f"{what} failed for transactional id "
                                 f"{self.transactional_id!r}: another producer registered it")

    def init_transactions(self, timeout: float) -> None:
        tid = self.transactional_id or ""
        previous = self._cluster.txn_owners.get(tid)
        if previous is not None and previous is not self and previous._txn is not None:
            previous._abort()  # the new owner aborts what the old one left open
        self._cluster.txn_owners[tid] = self

    def begin_transaction(self) -> None:
        self._check_owner("begin_transaction")
        self._txn, self._txn_offsets = [], {}

    def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int],
                                    group_metadata: Any, timeout: float) -> None:
        self._check_owner("send_offsets_to_transaction")
        if self._txn_failed:
            raise TransactionAborted("send_offsets_to_transaction: the transaction failed")
        for tp, off in offsets.items():
            self._txn_offsets[(str(group_metadata), tp)] = off

    def commit_transaction(self, timeout: float) -> None:
        self._check_owner("commit_transaction")
        if self.fail is not None:
            raise TransactionAborted(f"commit_transaction: {self.fail}")
        if self._txn_failed:
            raise TransactionAborted("commit_transaction: the transaction failed; abort it")
        if self.abort_commits > 0:
            self.abort_commits -= 1
            raise TransactionAborted("commit_transaction: the coordinator aborted it "
                                     "(injected)")
        self.release()
        self._cluster.end_transaction(self._txn or [], COMMITTED, self._txn_offsets)
        self._txn = None

    def abort_transaction(self, timeout: float) -> None:
        self._abort()

    def _abort(self) -> None:
        self._txn_failed = False
        self._held.clear()
        self._cluster.end_transaction(self._txn or [], ABORTED, {})
        self._txn = None

    def poll(self, timeout: float) -> int:
        if self.dead or not self._reports:
            return 0
        reports, self._reports = self._reports, []
        for on_delivery, err, msg in reports:
            on_delivery(err, msg)
        return len(reports)

    def in_flight(self) -> int:
        return len(self._held) + len(self._reports)

    def held(self) -> int:
        """Records in flight that only :meth:`release` lets go."""
        return len(self._held)

    def close(self) -> None:
        self._held.clear()
        self._reports.clear()


class MemoryReader(PartitionReader):
    def __init__(self, cluster: MemoryCluster) -> None:
        self._cluster = cluster
        self._positions: dict[TopicPartition, int] = {}

    def assign(self, starts: dict[TopicPartition, int]) -> None:
        self._positions = {tp: max(0, off) for tp, off in starts.items()}

    def read(self, max_records: int, timeout: float) -> list[Message]:
        # Waits briefly: a global table's follower reads in a loop on its own thread.
        return list(self._cluster.read(self._positions, set(), max_records,
                                       min(timeout, 0.01)))

    def position(self, tp: TopicPartition) -> int | None:
        return self._positions.get(tp)

    def end_offset(self, tp: TopicPartition) -> int:
        return self._cluster.end(tp)

    def close(self) -> None:
        self._positions = {}


class MemoryClients(ClientBackend):
    """Every client of one worker on one :class:`MemoryCluster`; the last consumer and
    producer made are kept, so that a test can crash them or hold their acknowledgements."""

    name = "memory"
    in_process = True

    def __init__(self, cluster: MemoryCluster, *, max_poll_interval_s: float = 300.0) -> None:
        self.cluster = cluster
        self.max_poll_interval_s = max_poll_interval_s  # the consumers'
        self.last_consumer: MemoryConsumer | None = None
        self.last_producer: MemoryProducer | None = None

    def consumer(self, group: str) -> ThreadedMember:
        self.last_consumer = MemoryConsumer(self.cluster, group, self.max_poll_interval_s)
        return ThreadedMember(self.last_consumer)

    def producer(self, transactional_id: str | None = None) -> MemoryProducer:
        self.last_producer = MemoryProducer(self.cluster, transactional_id)
        return self.last_producer

    def reader(self) -> MemoryReader:
        return MemoryReader(self.cluster)

    def topic_names(self, timeout: float) -> set[str] | None:
        return set(self.cluster.topics)

    def partition_count(self, topic: str) -> int:
        parts = self.cluster.topics.get(topic)
        return len(parts) if parts is not None else 0

    def create_topics(self, topics: dict[str, int], config: dict[str, str]) -> None:
        for name, n in topics.items():
            self.cluster.create_topic(name, n, config)

    def committed_offsets(self, group: str,
                          parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.cluster.committed.get((group, tp), -1) for tp in parts}
