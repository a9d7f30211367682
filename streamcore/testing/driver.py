"""TestDriver: a job's worker in this process, on the in-memory backend, with a manual clock.

The worker is the real one (same operators, same commit protocol, same state stores and
restore); only the clients (connectors.memory) and the clock (a ManualClock) differ. The
driver runs the worker's event loop on the caller's thread, during each call, until the
job has nothing left to do ("settled"): every record sent has been processed and every
acknowledged output is readable. Between calls nothing runs, so a test reads exact states.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from connectors.base import TopicPartition
from connectors.memory import (
    ABORTED,
    OPEN,
    MemoryClients,
    MemoryCluster,
    MemoryProducer,
    murmur2_partition,
)
from streamcore.api.config import WorkerConfig, parse_duration
from streamcore.api.job import Job
from streamcore.api.triggers import Trigger
from streamcore.core.clock import ManualClock
from streamcore.core.errors import ConfigError
from streamcore.core.serde import INTERNAL_KEY, Serde
from streamcore.plan.graph import OpKind
from streamcore.plan.physical import plan
from streamcore.runtime.partition import TaskState
from streamcore.runtime.timed import decode_store_key
from streamcore.runtime.worker import Worker

__all__ = ["Record", "StoreView", "TestDriver"]


@dataclass(frozen=True)
class Record:
    """One record read from a topic, decoded with the serdes of the sink that writes it."""

    key: Any
    value: Any
    timestamp: int
    headers: list[tuple[str, bytes]]
    partition: int
    offset: int


class StoreView(Mapping[Any, Any]):
    """The current contents of one stateful step's store, over every partition (read only)."""

    def __init__(self, worker: Worker, step: str) -> None:
        self._slots = [slot for t in worker.tasks.values() if t.stores is not None
                       for slot in t.stores.slots if slot.step == step]
        self._timed = any(n.name == step and n.params.get("event_time")
                          for n in worker.plan.nodes)
        if not self._slots:
            raise KeyError(f"no store named {step!r} is open (is the step's name right, and "
                           "has a record reached it?)")

    def __getitem__(self, key: Any) -> Any:
        for slot in self._slots:
            for kb in slot.cache.live_keys():
                if self._decode(kb) == key:
                    return slot.cache.get(kb)
        raise KeyError(key)

    def _decode(self, kb: bytes) -> Any:
        """A key as the step sees it: event-time steps keep their own layout (a window's
        entry reads as (key, start, end)); their bookkeeping (the saved watermark) is not
        shown."""
        if self._timed:
            return decode_store_key(kb)
        return INTERNAL_KEY.deserialize(kb)

    def _keys(self) -> list[Any]:
        keys = (self._decode(kb) for slot in self._slots for kb in slot.cache.live_keys())
        return [k for k in keys if k is not None]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


class TestDriver:
    """Run a job without a broker::

        with TestDriver(job, partitions=2) as d:
            d.send("in", {"user": "a", "amount": 3}, key="a", timestamp=1_700_000_000_000)
            d.advance_time("5s")          # commits, progress (timers and triggers later)
            rows = d.read("out")          # records written since the last read
            d.crash()                     # as SIGKILL, then a restart that restores state
            d.restart()                   # as SIGTERM, then a restart
            d.store("per-user")["a"]

    Topics read or written by the job exist from the start with ``partitions`` partitions.
    ``hold_acks()`` holds every acknowledgement back (a slow broker), ``fail_acks(reason)``
    fails them (the job then stops with DeliveryFailed: see ``exception()``).
    """

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, job: Job, *, partitions: int = 1, config: WorkerConfig | None = None,
                 trigger: Trigger | str | None = None, start_ms: int = 1_700_000_000_000,
                 timeout: float = 10.0) -> None:
        if partitions < 1:
            raise ConfigError("partitions", f"must be at least 1, got {partitions}")
        self.job = job
        base = config or job.config or WorkerConfig()
        self.plan = plan(job.build(), base.group or job.name)
        self.clock = ManualClock(start_ms)
        self.cluster = MemoryCluster(clock_ms=self.clock.now_ms, default_partitions=partitions)
        self._tmp = tempfile.mkdtemp(prefix="streamcore-testdriver-")
        # Nothing of a real deployment: no HTTP server, state only in memory (a crash loses
        # it, as a lost disk would: the restart restores it from the changelogs).
        self.config = replace(base, http_port=None, state_dir=self._tmp,
                              state_backend="memory")
        if trigger is not None:  # epoch mode: epochs end as the manual clock passes
            self.config = replace(self.config, trigger=trigger)
        self._timeout = timeout
        self._read_from: dict[tuple[str, int], int] = {}
        self._loop = asyncio.new_event_loop()
        self._worker: Worker | None = None
        self._clients: MemoryClients | None = None
        self._run: asyncio.Task[None] | None = None
        self._hold = False
        self._hold_topics: frozenset[str] | None = None
        self._queue_limit: int | None = None
        self._fail: str | None = None
        for node in self.plan.sources:
            assert node.source is not None
            for topic in node.source.topics:
                self.cluster.create_topic(topic)
        for node in self.plan.nodes:
            if node.kind == OpKind.TO and node.sink is not None:
                self.cluster.create_topic(node.sink.topic)
            if node.kind == OpKind.TABLE:
                self.cluster.create_topic(node.params["topic"])

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> TestDriver:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._clients = MemoryClients(self.cluster, max_poll_interval_s=int(
            self.config.consumer.get("max.poll.interval.ms", 300_000)) / 1000)
        self._worker = Worker(self.job, self.config, clients=self._clients, clock=self.clock)
        self._run = self._loop.create_task(self._worker.run())
        self._apply_ack_mode()
        self._settle()

    def close(self) -> None:
        """Stop the job gracefully (finish, commit, leave), then release everything."""
        try:
            if self._worker is not None and self._run is not None and not self._run.done():
                self._stop()
        finally:
            self._loop.close()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def crash(self) -> None:
        """As SIGKILL, then a restart: uncommitted work and unflushed state are lost,
        acknowledged outputs stay; the new worker resumes from the committed offsets and
        restores its stores from their changelogs."""
        assert self._clients is not None and self._run is not None
        consumer, producer = self._clients.last_consumer, self._clients.last_producer
        if consumer is not None:
            consumer.dead = True
        if producer is not None:
            producer.dead = True
        if not self._run.done():
            self._run.cancel()
            with contextlib.suppress(BaseException):
                self._loop.run_until_complete(self._run)
        self._start()

    def restart(self, *, release_acks: bool = False) -> None:
        """As SIGTERM, then a restart: the worker finishes what it took, commits and leaves;
        the new one resumes from the committed offsets and restores its stores. With
        release_acks, acknowledgements held by :meth:`hold_acks` come once the worker has
        been asked to stop (a slow broker that answers during the shutdown)."""
        self._stop(release_acks=release_acks)
        if self._run is not None and not self._run.done():
            raise AssertionError(f"the worker did not stop within {self._timeout}s")
        self._start()

    def _stop(self, *, release_acks: bool = False) -> None:
        """Ask the worker to stop gracefully and wait for it (up to the timeout). A worker
        that fails while it stops is an error of the test (a graceful stop must succeed)."""
        assert self._run is not None
        was_running = not self._run.done()
        self._running().stop()
        if release_acks:
            self._hold = False
            self._apply_ack_mode()
        self._loop.run_until_complete(asyncio.wait([self._run], timeout=self._timeout))
        if was_running and self._run.done() and not self._run.cancelled() \
                and self._run.exception() is not None:
            raise AssertionError("the worker failed while it stopped gracefully: "
                                 f"{self._run.exception()!r}") from self._run.exception()

    # -- input -----------------------------------------------------------------------------
    def send(self, topic: str, value: Any, *, key: Any = None, timestamp: int | None = None,
             partition: int | None = None,
             headers: Iterable[tuple[str, bytes]] | None = None) -> None:
        """Write one record to an input topic (encoded with its source's serdes), then let
        the job process it."""
        self._append(topic, value, key, timestamp, partition, headers)
        self._settle()

    def send_many(self, topic: str, records: Iterable[Any], *,
                  key: Any = None, timestamp: int | None = None) -> None:
        """Write records (values, or (key, value) pairs when key is None and a record is a
        tuple), then let the job process them all. They are written together: the job
        fetches them in as few batches as its poll_batch allows."""
        with self.cluster.atomically():
            for rec in records:
                k, v = rec if key is None and isinstance(rec, tuple) else (key, rec)
                self._append(topic, v, k, timestamp, None, None)
        self._settle()

    def _append(self, topic: str, value: Any, key: Any, timestamp: int | None,
                partition: int | None, headers: Iterable[tuple[str, bytes]] | None) -> None:
        parts = self.cluster.topics.get(topic)
        if parts is None:
            raise KeyError(f"{topic!r} is not a topic of job {self.job.name!r}")
        key_serde, value_serde = self._source_serdes(topic)
        kb = None if key is None else key_serde.serialize(key)
        vb = None if value is None else value_serde.serialize(value)
        if partition is None:
            partition = murmur2_partition(kb, len(parts)) if kb is not None else 0
        self.cluster.append(topic, partition, kb, vb,
                            self.clock.now_ms() if timestamp is None else timestamp,
                            list(headers or []))

    # -- time and commits ------------------------------------------------------------------
    def advance_time(self, duration: float | str) -> None:
        """Move processing time forward. Everything scheduled in between runs at its time, in
        order, as often as it comes due (a 300 ms commit interval commits three times in a
        second), each run followed by what it causes."""
        left = parse_duration(duration, "duration")
        while True:
            due = self.clock.next_wakeup()
            if due is None or due > left:
                break
            self.clock.advance(due)
            left -= due
            self._settle()
        self.clock.advance(left)
        self._settle()

    def commit(self) -> None:
        """Commit everything processed so far, as the commit interval would: state flushed
        to the changelogs, then the offsets (two cycles when a flush must be acknowledged
        before its offsets may be committed)."""
        w = self._running()
        for _ in range(3):
            w.committer.commit_due()
            self._settle()
            if all(t.done_offset() + 1 <= t.committed or t.last_offset is None
                   for t in w.tasks.values()):
                return

    def committed(self, topic: str) -> dict[int, int]:
        """The group's committed offsets (next offset to read) per partition of topic."""
        group = self._running().group
        return {tp[1]: off for (g, tp), off in self.cluster.committed.items()
                if g == group and tp[0] == topic}

    # -- output ----------------------------------------------------------------------------
    def read(self, topic: str) -> list[Record]:
        """Records written to topic since the last read of it (acknowledged ones only, and
        as a read_committed consumer sees them: in epoch mode, committed epochs only), in
        partition then offset order, decoded with the serdes of the sink that writes it."""
        parts = self.cluster.topics.get(topic)
        if parts is None:
            raise KeyError(f"no topic {topic!r}")
        key_serde, value_serde = self._sink_serdes(topic)
        out: list[Record] = []
        for p, log in enumerate(parts):
            start = end = self._read_from.get((topic, p), 0)
            for m in log[start:]:
                if m.txn == OPEN:
                    break  # read_committed: nothing past an open transaction
                end += 1
                if m.txn == ABORTED:
                    continue
                k, v = m.key(), m.value()
                out.append(Record(
                    key=None if k is None else key_serde.deserialize(k),
                    value=None if v is None else value_serde.deserialize(v),
                    timestamp=m.timestamp()[1], headers=list(m.headers() or []),
                    partition=p, offset=m.offset()))
            self._read_from[(topic, p)] = end
        return out

    def store(self, step: str) -> StoreView:
        """The contents of the stateful step named step, over all partitions."""
        return StoreView(self._running(), step)

    # -- failure injection -------------------------------------------------------------------
    def hold_acks(self, hold: bool = True, *, topics: Iterable[str] | None = None) -> None:
        """Hold every acknowledgement back (outputs stay in flight, nothing is committed past
        them; in epoch mode the ending epoch waits for them with its transaction open) until
        hold_acks(False); with topics, only those topics' (one slow partition leader while
        the others answer)."""
        self._hold = hold
        self._hold_topics = None if topics is None else frozenset(topics)
        self._apply_ack_mode()
        self._settle()

    def limit_queue(self, records: int | None) -> None:
        """Give the producer a local queue of that many records in flight (None: no limit):
        an output beyond it waits for room, as when librdkafka's
        ``queue.buffering.max.messages`` is reached. With :meth:`hold_acks`, room comes
        only when the acknowledgements do; the job counts as settled while it waits."""
        self._queue_limit = records
        self._apply_ack_mode()
        self._settle()

    def fail_acks(self, reason: str | None = "the broker rejected the record") -> None:
        """Fail every acknowledgement from now on (None: stop failing them)."""
        self._fail = reason
        self._apply_ack_mode()
        self._settle()

    def fail_commits(self, fail: bool = True) -> None:
        """Have the group coordinator refuse offset commits (not a fencing) until
        fail_commits(False)."""
        assert self._clients is not None
        consumer = self._clients.last_consumer
        if consumer is not None:
            consumer.fail_commits = fail
        self._settle()

    def expire_session(self) -> None:
        """The group coordinator drops this member (its session expired: the heartbeats
        stopped reaching it, the event loop itself not blocked): the next serve of the group
        finds every partition lost, and the member joins again at once."""
        assert self._clients is not None and self._clients.last_consumer is not None
        consumer = self._clients.last_consumer
        consumer.expire_session = True
        deadline = time.monotonic() + self._timeout
        while consumer.expire_session:  # until the serve has handled the loss and joined
            if time.monotonic() > deadline:
                raise TimeoutError(f"the loss was not handled within {self._timeout}s: "
                                   f"{self._describe()}")
            self._loop.run_until_complete(asyncio.sleep(0.001))
        self._settle()

    def abort_next_epoch(self, times: int = 1) -> None:
        """Epoch mode: the next ``times`` transaction commits fail as the broker can make
        them fail (abortable): each epoch is aborted and runs again."""
        assert self._clients is not None and self._clients.last_producer is not None
        self._clients.last_producer.abort_commits = times

    def fail_transaction(self) -> None:
        """Epoch mode: the next output finds the running transaction failed (an abortable
        error, as a broker can report on a produce): the epoch is aborted and runs again."""
        assert self._clients is not None and self._clients.last_producer is not None
        self._clients.last_producer.fail_transaction = True

    def stopped(self) -> bool:
        """The job has stopped (an error, or a trigger that stops by itself)."""
        return self._run is not None and self._run.done()

    def exception(self) -> BaseException | None:
        """The error the job stopped with, if it did."""
        if self._run is None or not self._run.done() or self._run.cancelled():
            return None
        return self._run.exception()

    @property
    def worker(self) -> Worker:
        return self._running()

    # -- internals ---------------------------------------------------------------------------
    def _running(self) -> Worker:
        if self._worker is None:
            raise RuntimeError("the driver is not started: use `with TestDriver(job) as d:`")
        return self._worker

    def _apply_ack_mode(self) -> None:
        producer = self._last_producer()
        if producer is not None:
            producer.hold, producer.fail = self._hold, self._fail
            producer.hold_topics = self._hold_topics
            producer.queue_limit = self._queue_limit
            producer.release()  # what is no longer held goes, in order

    def _source_serdes(self, topic: str) -> tuple[Serde, Serde]:
        for node in self.plan.sources:
            if node.source is not None and topic in node.source.topics:
                return node.source.key, node.source.value
        for node in self.plan.nodes:
            if node.kind == OpKind.TABLE and node.params["topic"] == topic:
                return node.params["key"], node.params["value"]
        raise KeyError(f"{topic!r} is not an input topic of job {self.job.name!r}")

    def _sink_serdes(self, topic: str) -> tuple[Serde, Serde]:
        for node in self.plan.nodes:
            if node.kind == OpKind.TO and node.sink is not None and node.sink.topic == topic:
                return node.sink.key, node.sink.value
        return _RAW, _RAW

    def _settle(self) -> None:
        self._loop.run_until_complete(self._until_idle())

    async def _until_idle(self) -> None:
        deadline = time.monotonic() + self._timeout
        quiet = 0
        while quiet < 3:  # idle three looks in a row: nothing is on its way anywhere
            run = self._run
            if run is None or run.done():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the job did not settle within {self._timeout}s: "
                                   f"{self._describe()}")
            # The first looks only let the woken tasks run; the last one also gives what
            # waits in real time (a thread, a short real sleep) a millisecond to show. A
            # settle costs about 1 ms, not 3-4: advance_time("5m") settles 3,000 times.
            await asyncio.sleep(0.001 if quiet == 2 else 0)
            quiet = quiet + 1 if self._idle() else 0

    def _idle(self) -> bool:
        """Nothing more happens until time passes or records are sent: every record fetched
        was handed over and went through its chain, nothing is left to fetch. (Delivery
        reports still due are served by the engine's next commit, as in production.)"""
        w, clients = self._worker, self._clients
        assert w is not None and clients is not None
        consumer = clients.last_consumer
        if consumer is None or not w.joined:
            return False
        # A failing worker is not idle while it shuts down (its tasks closed first, so they
        # look idle): its TaskGroup cancels run() at the failure, then run() exits.
        run = self._run
        if w.exiting or (run is not None and run.cancelling()):
            return False
        # A revoke or a loss waits for the epoch's end, which waits for acknowledgements the
        # test holds back (or for tasks that wait for room only those can make): nothing
        # happens, not even a fetch, until the test releases them.
        stuck = self._full_until_acks_come()
        held_up = w.committer.in_progress and (
            (w.committer.awaiting_acks and self._acks_held()) or stuck)
        if held_up and w.rebalancing_since is not None:
            return all(t.idle() or (t.ctx.blocked and stuck) for t in list(w.tasks.values()))
        positions = consumer.positions()
        # The client's thread sets a partition's position after the engine's assignment
        # callback (so that no fetch finds no task): until then it is not caught up.
        if any(tp not in positions for tp in list(w.tasks)):
            return False
        if not _caught_up(positions, self.cluster) or consumer.returned != w.records_in:
            return False
        # Global tables follow their topics on their own threads: caught up too, so that a
        # join sees every table record sent before the stream record.
        for table in list(w.tables.values()):
            if any(pos < self.cluster.end(tp) for tp, pos in dict(table.positions).items()):
                return False
        # An epoch is ending (or being aborted and read again); one that waits only for
        # acknowledgements the test holds back (or for tasks that wait for room that only
        # those can make) waits for the test.
        if w.committer.in_progress and not held_up:
            return False
        if w.member.commit_pending:  # a commit not sent yet would be lost by crash()
            return False
        aborting = w.committer.awaiting_abort  # until time brings the epoch's end
        return all(t.state is TaskState.RUNNING and (
            (t.ctx.blocked and stuck)
            or (aborting and t.idle(held_ok=True))
            or ((not t.queued or t.waiting_for_epoch) and t.tracker.all_sealed()))
            for t in list(w.tasks.values()))

    def _last_producer(self) -> MemoryProducer | None:
        return self._clients.last_producer if self._clients is not None else None

    def _acks_held(self) -> bool:
        producer = self._last_producer()
        return producer is not None and producer.held() > 0

    def _full_until_acks_come(self) -> bool:
        """The producer's queue is full and only held acknowledgements can make room: a
        task waiting for room waits for the test (limit_queue with hold_acks)."""
        producer = self._last_producer()
        return (producer is not None and producer.queue_limit is not None
                and producer.held() >= producer.queue_limit)

    def _describe(self) -> str:
        w = self._worker
        if w is None:
            return "no worker"
        return ", ".join(f"{t}[{p}] {task.state.value} queued={task.queued}"
                         for (t, p), task in w.tasks.items()) or "no partition assigned"


def _caught_up(positions: dict[TopicPartition, int], cluster: MemoryCluster) -> bool:
    # Up to the last stable offset: in epoch mode, what an open transaction wrote (to a
    # repartition topic, say) is read once the epoch commits.
    return all(pos >= cluster.stable_end(tp) for tp, pos in positions.items())


_RAW = Serde("raw", lambda b: b, lambda b: b)
