"""The worker: one consumer, one producer, one task per assigned partition.

Everything the worker starts belongs to one ``asyncio.TaskGroup``. The consumer's group calls
(serve, close, and so the rebalance callbacks) run on one dedicated membership thread; a
callback hands its work to the event loop and waits for it, so a revoked partition is drained
and its offsets committed before the group moves it (DESIGN.md section 4, invariant 3).

Commit protocol (continuous mode, at-least-once), every ``commit_interval``:
  0. flush each stateful partition's dirty keys to RocksDB and its changelog topics;
  1. serve delivery reports (``producer.poll``), so acknowledged outputs are counted;
  2. per partition, advance the done offset (sealed batches with nothing pending, and no
     later than the last state flush whose changelog records are all acknowledged);
  3. commit done + 1 for the partitions that moved. A failed delivery stops the worker
     before this step for its partition.
The consumer has a group side and a data side (connectors.base). Every group call runs on
the membership thread: librdkafka blocks even an asynchronous commit while a rebalance
callback runs, and the callback is waiting for the event loop. So the loop queues commits
(``_pending_commit``) and the membership loop applies them between serves of the group.
Records are read on the fetch thread when they must be waited for, and on the loop itself
while a backlog lasts. Periodic commits are asynchronous; commits that must be complete
before something else happens are synchronous: inside the revoke callback (the group waits
for it, as librdkafka allows) and at shutdown, after polling has stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import operator
import os
import time
import uuid
from collections.abc import Callable, Iterable
from itertools import groupby
from pathlib import Path
from typing import Any

from connectors.admin import create_topics, partition_count, topic_names
from connectors.base import ConsumerBackend, Message, ProducerBackend, TopicPartition
from connectors.confluent import (
    ConfluentConsumer,
    ConfluentProducer,
    ConfluentReader,
    consumer_settings,
    producer_settings,
    reader_settings,
)
from metrics.exporter import Snapshot, WorkerMetrics
from metrics.http import StatusServer
from streamcore.api.config import WorkerConfig
from streamcore.core.errors import BrokerUnavailable, ConfigError, FatalError, StreamcoreError
from streamcore.core.logs import BurstLogger
from streamcore.plan.graph import OpKind
from streamcore.plan.routing import source_for_topic
from streamcore.plan.topics import internal_topics
from streamcore.runtime.partition import PartitionTask, TaskState
from streamcore.runtime.progress import LatencyHistogram
from streamcore.runtime.state import PartitionStores
from streamcore.runtime.tables import GlobalTable

__all__ = ["Worker"]

log = logging.getLogger("streamcore.worker")
# How long one serve of the group may block the membership thread: a queued periodic
# commit waits at most this long.
_SERVE_TIMEOUT_S = 0.02
_burst_log = BurstLogger(log)


class Worker:
    def __init__(
        self,
        job: Any,
        config: WorkerConfig,
        *,
        consumer: ConsumerBackend | None = None,
        producer: ProducerBackend | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        run_id: str | None = None,
    ) -> None:
        job.validate()
        self.job = job
        self.config = config
        self.group = config.group or job.name
        self.run_id = run_id or str(uuid.uuid4())
        settings = consumer_settings(config.bootstrap_servers, self.group, config.kafka,
                                     config.consumer)
        self._consumer = consumer or ConfluentConsumer(settings)
        # Past this long without serving the group, librdkafka has left it (the event loop
        # was blocked): every partition may already be another member's.
        self._max_poll_s = int(settings["max.poll.interval.ms"]) / 1000
        self._last_serve = time.monotonic()
        self._producer = producer or ConfluentProducer(producer_settings(
            config.bootstrap_servers, config.kafka, config.producer))
        self._tasks: dict[TopicPartition, PartitionTask] = {}
        self._running: dict[TopicPartition, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._stop_requested = False  # stop() before run() set the loop: run() stops at once
        self._joined = False  # a rebalance completed: the member is in the group
        # The group side of the consumer runs on the membership thread; fetches that must
        # wait run on the fetch thread (see connectors.base for why the two are apart).
        self._consumer_thread = concurrent.futures.ThreadPoolExecutor(1, "sc-consumer")
        self._fetch_thread = concurrent.futures.ThreadPoolExecutor(1, "sc-fetch")
        self._state_dir = Path(config.state_dir)
        self._tables: dict[int, GlobalTable] = {}  # TABLE node id -> its global table
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._inflight_poll: asyncio.Future[list[Message]] | None = None
        # The latest periodic commit per partition, applied on the membership thread.
        self._pending_commit: dict[TopicPartition, int] = {}
        self.latency = LatencyHistogram()  # in-worker: handed over -> output handed on
        self.e2e_latency = LatencyHistogram()  # record timestamp -> output handed on
        self.commit_latency = LatencyHistogram()
        self.errors: dict[tuple[str, str, str], int] = {}  # (kind, policy, step) -> count
        # Totals of partition tasks already closed, so that counters stay monotonic.
        self._retired_consumed: dict[TopicPartition, int] = {}
        self._retired_produced: dict[str, int] = {}
        self._retired_dlq = 0
        self._retired_processed = 0
        self._retired_restored: dict[str, int] = {}  # step -> changelog records replayed
        self.metrics = WorkerMetrics(job.name)
        self._http: StatusServer | None = None
        self.heartbeat = time.monotonic()
        self._rebalancing_since: float | None = None
        self.on_progress = on_progress
        self.last_progress: dict[str, Any] | None = None
        self._progress_id = 0
        self._started = time.time()
        self._progress_mark = (time.monotonic(), 0)
        self.records_in = 0
        self.commits = 0
        self.broker_connected = True  # the start-up check reached it; then the client says
        self.rebalances = 0
        self.last_poll = time.monotonic()
        self._one_topic: str | None = None  # the only topic subscribed (not a pattern)

    # -- public --------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask for a graceful stop; safe from any thread and from signal handlers, and
        before run() has started (it then stops as soon as it starts)."""
        self._stop_requested = True  # first: run() reads it after setting the loop
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _running_on(loop):
            self._stopping.set()
        else:
            loop.call_soon_threadsafe(self._stopping.set)

    @property
    def assigned(self) -> dict[TopicPartition, TaskState]:
        return {tp: t.state for tp, t in self._tasks.items()}

    async def run(self) -> None:
        """Run until stop() or a fatal error; on return everything done has been committed."""
        self._loop = asyncio.get_running_loop()
        if self._stop_requested:
            self._stopping.set()
        log.info("worker config: %s", self.config.redacted())
        if self.job.stateful or self.job.tables:
            self._check_state_dir()
        await self._loop.run_in_executor(None, self._check_startup)
        if self.job.uses_dead_letter:
            await self._loop.run_in_executor(None, self._create_dlq)
        self._start_http()
        # Internal topics and global tables first: a partition must not start before its
        # repartition and changelog topics exist, nor a join before its table is complete.
        table_sizes = await self._loop.run_in_executor(None, self._create_internal_topics)
        await self._open_tables(table_sizes)
        topics = self.job.subscription(self.group)
        self._one_topic = topics[0] if len(topics) == 1 and not topics[0].startswith("^") else None
        self._consumer.observe_commits(self.commit_latency.record)
        self._consumer.observe_connectivity(self._set_connected)
        self._consumer.subscribe(topics, on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_lost,
                                 start_at_end=self._starts_at_end, on_fenced=self._on_fenced)
        self._last_serve = time.monotonic()
        log.info("worker started: job=%s group=%s topics=%s", self.job.name, self.group, topics)
        failure: BaseException | None = None
        cancelled = False
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                poll = tg.create_task(self._poll_loop(), name="poll")
                tg.create_task(self._membership_loop(), name="membership")
                tg.create_task(self._commit_loop(), name="commit")
                tg.create_task(self._progress_loop(), name="progress")
                tg.create_task(self._heartbeat_loop(), name="heartbeat")
                await self._stopping.wait()
                await poll  # 1. stop intake at the source
                live = self._live(self._tasks)
                await self._drain(live)  # 2. finish what is in flight; wait for the acks
                try:  # 3. commit everything done, queued or not
                    await self._commit_sync(self._done_offsets(live, only_moved=False))
                except StreamcoreError as exc:
                    # Refused (the group moved the partitions meanwhile: a rebalance raced
                    # the stop) or unreachable: the next owner reads these records again.
                    # Duplicates, never loss; the stop itself still succeeds.
                    log.warning("final commit failed: %s", exc)
                raise _Stopped
        except* _Stopped:
            pass
        except* asyncio.CancelledError:
            cancelled = True
        except* BaseException as eg:
            failure = _first_error(eg)
        finally:
            await self._shutdown(failure)
        if failure is not None:
            raise failure
        if cancelled:  # the caller cancelled run(): it gets a plain CancelledError
            raise asyncio.CancelledError

    # -- polling -------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        consume = self._consumer.consume
        n, timeout = self.config.poll_batch, self.config.poll_timeout_s
        tasks = self._tasks
        perf = time.perf_counter

        def fetch(here: bool) -> None:
            if not here:
                self._inflight_poll = loop.run_in_executor(self._fetch_thread, consume, n,
                                                           timeout)
                return
            # Read what librdkafka has already fetched, here on the loop thread: no thread
            # handoff, no GIL contention (connectors.base; the reader runs no callbacks).
            done: asyncio.Future[list[Message]] = loop.create_future()
            try:
                done.set_result(consume(n, 0))
            except Exception as exc:
                done.set_exception(exc)
            self._inflight_poll = done

        fetch(False)
        while True:
            assert self._inflight_poll is not None
            msgs = await self._inflight_poll
            self._inflight_poll = None
            self.last_poll = time.monotonic()
            if msgs and self._check_membership():
                self._dispatch(msgs, tasks, perf())
            if self._stopping.is_set():
                return  # what was just dispatched is drained by the caller
            if len(msgs) >= n:
                # A backlog: let the partition tasks take this batch (then serve delivery
                # reports), and read the next one here; nothing has to wait for it.
                await asyncio.sleep(0)
                self._producer.poll(0)
                fetch(True)
                continue
            # Caught up: the next fetch waits on the fetch thread while this one is
            # processed; the partition tasks just woken go first (in-worker latency), then
            # delivery reports are served once per fetch so that they never pile up.
            fetch(False)
            if msgs:
                await asyncio.sleep(0)
                self._producer.poll(0)

    async def _membership_loop(self) -> None:
        """Serve the group on the membership thread: rebalance callbacks, and the latest
        periodic commit the loop queued."""
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            commit, self._pending_commit = self._pending_commit, {}
            self._check_membership()  # before the serve that will report the loss
            errors = await loop.run_in_executor(self._consumer_thread, self._commit_then_serve,
                                                commit, _SERVE_TIMEOUT_S)
            self._last_serve = time.monotonic()
            for err in errors:
                self._consumer_error(err)

    def _check_membership(self) -> bool:
        """False (and every task fenced) if the group has not been served for longer than
        max.poll.interval.ms: the member has left the group, and the partitions may be
        another member's already. Checked before records are handed on and before a commit;
        the lost callback follows at the next serve, then the worker rejoins."""
        idle = time.monotonic() - self._last_serve
        if idle <= self._max_poll_s:
            return True
        self._fence(list(self._tasks), f"the group was not served for {idle:.1f}s "
                    f"(max.poll.interval.ms {self._max_poll_s * 1000:.0f}): was the event "
                    "loop blocked?")
        return False

    def _live(self, parts: Iterable[TopicPartition]) -> list[TopicPartition]:
        """The partitions of parts with a task that is not fenced: the ones whose work may
        still be drained and committed."""
        return [tp for tp in parts if tp in self._tasks and not self._tasks[tp].fenced]

    def _on_fenced(self, parts: list[TopicPartition]) -> None:
        """Membership thread: a commit showed that this member was fenced out of the group."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._fence, parts, "a commit was refused: this "
                                        "member is no longer in the group's generation")

    def _fence(self, parts: list[TopicPartition], reason: str) -> None:
        """Suspend these partitions at once: no more output, changelog or commit (a zombie
        must not write). They are closed when the lost callback comes."""
        hit = self._live(parts)
        if not hit:
            return
        log.warning("fenced %s: %s", _fmt(hit), reason)
        for tp in hit:
            self._pending_commit.pop(tp, None)
            self._tasks[tp].fence()
            running = self._running.get(tp)
            if running is not None:
                running.cancel()

    def _dispatch(self, msgs: list[Message], tasks: dict[TopicPartition, PartitionTask],
                  handed_at: float) -> None:
        if any([m.error() is not None for m in msgs]):  # rare: report and drop them
            for m in msgs:
                if m.error() is not None:
                    self._consumer_error(m.error())
            msgs = [m for m in msgs if m.error() is None]
        # A fetch holds runs of consecutive messages of one partition; groupby splits them
        # in C, which matters because this runs once per input record. With one topic the
        # key is the partition alone: a C method call, no Python frame per record.
        topic = self._one_topic
        for key, run in groupby(msgs, _topic_partition if topic is None else _PARTITION):
            task = tasks.get(key if topic is None else (topic, key))
            if task is not None:
                task.offer(handed_at, list(run))
        self.records_in += len(msgs)

    def _commit_then_serve(self, commit: dict[TopicPartition, int],
                           timeout: float) -> list[Any]:
        """On the membership thread: the queued commit first, then serve the group."""
        if commit:
            try:
                self._consumer.commit(commit, asynchronous=True)
            except StreamcoreError as exc:  # a failed async commit is retried by the next one
                log.warning("commit failed: %s", exc)
        return self._consumer.serve(timeout)

    def _consumer_error(self, err: Any) -> None:
        fatal = getattr(err, "fatal", lambda: False)()
        if fatal:
            raise FatalError(f"consumer failed: {err}")
        _burst_log.warning(f"consumer:{getattr(err, 'code', lambda: err)()}", "consumer: %s", err)

    # -- rebalance callbacks (membership thread) -----------------------------------------
    def _call_on_loop(self, coro: Any) -> Any:
        assert self._loop is not None
        self._rebalancing_since = time.monotonic()
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        finally:
            self._rebalancing_since = None

    def _starts_at_end(self, topic: str) -> bool:
        """A topic of a source with starting_offsets="latest" (never an internal topic)."""
        node = source_for_topic(self.job, topic, self.group)
        return node.source is not None and node.kind == OpKind.SOURCE and \
            node.source.starting_offsets == "latest"

    def _on_assign(self, parts: list[TopicPartition]) -> None:
        self._joined = True  # every completed rebalance calls this, with nothing new or not
        self._call_on_loop(self._assign(parts))

    def _on_revoke(self, parts: list[TopicPartition]) -> None:
        offsets = self._call_on_loop(self._revoke(parts, commit=True))
        if offsets:
            # Synchronously, here on the membership thread, before the group moves them on.
            try:
                t0 = time.perf_counter()
                self._consumer.commit(offsets, asynchronous=False)
                self.commit_latency.record(time.perf_counter() - t0)
                log.info("committed revoked partitions at %s", _fmt_offsets(offsets))
            except StreamcoreError as exc:
                # The next owner starts from the previous commit: duplicates, never loss.
                log.warning("commit on revoke failed: %s", exc)

    def _on_lost(self, parts: list[TopicPartition]) -> None:
        self._call_on_loop(self._revoke(parts, commit=False))

    async def _assign(self, parts: list[TopicPartition]) -> None:
        if not parts:
            return
        self.rebalances += 1
        log.info("assigned %s", _fmt(parts))
        for tp in parts:
            task = PartitionTask(
                tp, self.job, source_for_topic(self.job, tp[0], self.group), self._producer,
                inbox_high=self.config.inbox_high, inbox_low=self.config.inbox_low,
                pause=self._pause, resume=self._resume, latency=self.latency,
                e2e=self.e2e_latency, errors=self.errors, make_stores=self._make_stores,
                new_reader=self._new_reader, tables=self._tables, app_id=self.group)
            self._tasks[tp] = task
            if self._tg is not None and not self._stopping.is_set():
                self._running[tp] = self._tg.create_task(task.run(), name=f"partition-{tp}")

    async def _revoke(self, parts: list[TopicPartition], *,
                      commit: bool) -> dict[TopicPartition, int]:
        """Stop intake, finish queued work (up to the shutdown deadline), wait for the
        acknowledgements, close; return the done offsets to commit (none if lost)."""
        mine = [tp for tp in parts if tp in self._tasks]
        if not mine:
            return {}
        self.rebalances += 1
        log.info("%s %s", "revoking" if commit else "lost", _fmt(mine))
        offsets: dict[TopicPartition, int] = {}
        for tp in mine:  # a queued periodic commit must not land after the partition moved
            self._pending_commit.pop(tp, None)
        try:
            for tp in mine:
                self._tasks[tp].stop_intake()
            # A fetch in flight may hold records of these partitions from before the revoke:
            # let it land now, on the suspended tasks that drop them, so that it can never
            # reach a task created for a later assignment of the same partition.
            if self._inflight_poll is not None:
                await asyncio.wait([self._inflight_poll])
            live = self._live(mine)
            if commit and live:
                await self._drain(live)
                offsets = self._done_offsets(live, only_moved=False)
        finally:
            for tp in mine:
                await self._close_task(tp)
        return offsets

    # -- draining and committing ---------------------------------------------------------
    async def _drain(self, parts: list[TopicPartition]) -> None:
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        tasks = [self._tasks[tp] for tp in parts if tp in self._tasks]
        for t in tasks:
            t.stop_intake()
        running = [self._running[t.tp] for t in tasks if t.tp in self._running]
        if running:
            _, late = await asyncio.wait(running, timeout=max(0.0, deadline - time.monotonic()))
            if late:
                log.warning("drain deadline passed; %d partition(s) abandoned in flight", len(late))
        # Wait for the broker to acknowledge what was handed to the producer, and flush the
        # state stores (their changelog acknowledged too) so that everything is done.
        while time.monotonic() < deadline:
            self._producer.poll(0)
            if all(t.tracker.failure is not None
                   or (t.tracker.all_done() and t.state_settled()) for t in tasks):
                break
            for t in tasks:
                t.flush_state()
            await asyncio.sleep(0.002)
        for t in tasks:
            if t.tracker.failure is not None:
                raise t.tracker.failure

    def _done_offsets(self, parts: list[TopicPartition], *, raise_failure: bool = True,
                      only_moved: bool = True) -> dict[TopicPartition, int]:
        """Next-offset-to-read for each partition with a done offset; with only_moved, only
        where it moved past the last commit (periodic commits; final commits send all).
        A failed delivery is raised unless raise_failure is False; either way the batch that
        failed never becomes done, so nothing at or after it is returned."""
        self._producer.poll(0)  # step 1: serve delivery reports
        offsets: dict[TopicPartition, int] = {}
        for tp in parts:
            task = self._tasks.get(tp)
            if task is None:
                continue
            if raise_failure and task.tracker.failure is not None:
                raise task.tracker.failure
            nxt = task.done_offset() + 1  # step 2 (state changes acknowledged included)
            if nxt > 0 and (nxt > task.committed or not only_moved):
                offsets[tp] = nxt
        return offsets

    def _mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits += 1
        for tp, off in offsets.items():
            task = self._tasks.get(tp)
            if task is not None:
                task.committed = max(task.committed, off)
        log.debug("committed %s", _fmt_offsets(offsets))

    async def _commit_sync(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit and wait for the result, on the membership thread (after polling stopped)."""
        if not offsets:
            return
        assert self._loop is not None
        t0 = time.perf_counter()
        await self._loop.run_in_executor(
            self._consumer_thread, lambda: self._consumer.commit(offsets, asynchronous=False))
        self.commit_latency.record(time.perf_counter() - t0)
        self._mark_committed(offsets)

    async def _commit_loop(self) -> None:
        interval = self.config.commit_interval_s
        while True:
            await asyncio.sleep(interval)
            if not self._check_membership():
                continue
            running = [tp for tp, t in self._tasks.items() if t.state is TaskState.RUNNING]
            for tp in running:  # step 0: flush state stores to RocksDB and the changelog
                self._tasks[tp].flush_state()
            offsets = self._done_offsets(running)  # steps 1 and 2
            if offsets:
                # step 3, on the membership thread before its next serve of the group
                self._pending_commit.update(offsets)
                self._mark_committed(offsets)

    async def _close_task(self, tp: TopicPartition) -> None:
        task = self._tasks.pop(tp, None)
        running = self._running.pop(tp, None)
        if running is not None and not running.done():
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
        if task is not None:
            self._retire(task)
            task.close_stores()
            if task.state is not TaskState.CLOSED:
                task.transition(TaskState.CLOSED)

    def _check_state_dir(self) -> None:
        """A state directory this user cannot write is a configuration error found at start,
        not a partition that fails on its first assignment while the worker looks healthy."""
        probe = self._state_dir / f".write-check-{os.getpid()}"
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError("state_dir", f"{str(self._state_dir)!r} is not writable by this "
                              f"process (uid {os.getuid()}): {exc.strerror}") from exc

    def _check_startup(self) -> None:
        """Fail fast, in one message, when Kafka cannot be reached or an input topic does not
        exist (a misspelled topic must not be created by the request that looks for it)."""
        c = self.config
        existing = topic_names(c.bootstrap_servers, timeout=c.startup_timeout_s, kafka=c.kafka)
        if existing is None:
            raise BrokerUnavailable(
                f"cannot reach Kafka at {c.bootstrap_servers} within {c.startup_timeout_s:g}s "
                "(startup_timeout): check --bootstrap / STREAMCORE_BOOTSTRAP_SERVERS and that "
                "the brokers are up")
        missing = [t for n in self.job.sources for t in n.source.topics if t not in existing]
        if missing:
            raise ConfigError("KafkaSource", f"input topic(s) {', '.join(sorted(missing))} "
                              f"do not exist on {c.bootstrap_servers}; create them first "
                              "(streamcore never creates an input topic)")

    # -- state: internal topics, stores, global tables ------------------------------------
    def _create_internal_topics(self) -> dict[str, int]:
        """Create repartition and changelog topics; return the partition count of each
        global table's topic."""
        plan = internal_topics(self.job, self._partition_count, self.group)
        for cfg, topics in plan.by_config.items():
            if topics:
                create_topics(self.config.bootstrap_servers, topics, config=dict(cfg),
                              kafka=self.config.kafka)
        return plan.tables

    def _partition_count(self, topic: str) -> int:
        return partition_count(self.config.bootstrap_servers, topic, kafka=self.config.kafka)

    def _make_stores(self, partition: int) -> PartitionStores:
        c = self.config
        return PartitionStores(self.group, partition, state_dir=self._state_dir,
                               backend=c.state_backend, settings=c.rocksdb,
                               cache_entries=c.state_cache_entries)

    def _new_reader(self) -> ConfluentReader:
        return ConfluentReader(reader_settings(self.config.bootstrap_servers, self.config.kafka))

    async def _open_tables(self, sizes: dict[str, int]) -> None:
        assert self._loop is not None
        for node in self.job.tables:
            table = GlobalTable(self.group, node, partitions=sizes[node.params["topic"]],
                                state_dir=self._state_dir, backend=self.config.state_backend,
                                settings=self.config.rocksdb, new_reader=self._new_reader)
            self._tables[node.id] = table
            await self._loop.run_in_executor(None, table.restore)
            table.start()

    # -- backpressure --------------------------------------------------------------------
    # Pauses and resumes are on the consumer's data side: called here, at once.
    def _pause(self, tp: TopicPartition) -> None:
        self._consumer.pause([tp])

    def _resume(self, tp: TopicPartition) -> None:
        if tp in self._tasks:
            self._consumer.resume([tp])

    # -- operations: DLQ, HTTP endpoints, metrics ---------------------------------------
    def _create_dlq(self) -> None:
        src = self.job.sources[0].source
        n = partition_count(self.config.bootstrap_servers, src.topics[0],
                            kafka=self.config.kafka) if src.topics else 0
        create_topics(self.config.bootstrap_servers, {self.job.dlq_topic: max(n, 1)},
                      config={"cleanup.policy": "delete"}, kafka=self.config.kafka)

    def _start_http(self) -> None:
        if self.config.http_port is None:
            return
        try:
            self._http = StatusServer(
                self.config.http_host, self.config.http_port, metrics=self._exposition,
                health=self.health, ready=self.ready, progress=lambda: self.last_progress)
        except OSError as exc:
            raise ConfigError("http_port", f"cannot listen on {self.config.http_host}:"
                              f"{self.config.http_port}: {exc.strerror}") from exc
        self._http.start()
        log.info("HTTP endpoints on %s:%d", self.config.http_host, self._http.port)

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    async def _heartbeat_loop(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await asyncio.sleep(0.25)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Alive: the event loop runs and the poll loop is not stuck (called from any thread)."""
        now = time.monotonic()
        loop_lag = now - self.heartbeat
        limit = self.config.health_timeout_s
        rebalancing = self._rebalancing_since
        # A rebalance callback may legitimately hold the poll loop while it drains.
        poll_limit = limit + (self.config.shutdown_timeout_s if rebalancing else 0.0)
        poll_lag = now - (rebalancing or self.last_poll)
        detail = {"event_loop_lag_s": round(loop_lag, 3), "poll_lag_s": round(poll_lag, 3)}
        if loop_lag > limit:
            return False, {**detail, "reason": f"event loop stalled for {loop_lag:.1f}s "
                           "(a blocking call in a job function?)"}
        if poll_lag > poll_limit:
            return False, {**detail, "reason": f"poll loop stalled for {poll_lag:.1f}s"}
        for table in list(self._tables.values()):
            if table.failure is not None:  # its lookups would answer from stale data
                return False, {**detail, "reason": f"global table {table.name!r} stopped "
                               f"following {table.topic}: {table.failure}"}
        return True, detail

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready: in the group, no rebalance in progress, every assigned partition RUNNING.
        A member with no partition (more replicas than partitions, or a surge pod in a
        rolling update) is ready: it is doing all it can, and an orchestrator waiting for it
        would block the update."""
        states = {f"{t}[{p}]": task.state.value for (t, p), task in list(self._tasks.items())}
        if self._rebalancing_since is not None:
            return False, {"reason": "rebalancing", "partitions": states}
        if not states:
            if self._joined:
                return True, {"reason": "in the group with no partition assigned (idle)",
                              "partitions": states}
            return False, {"reason": "not in the group yet", "partitions": states}
        if any(s != TaskState.RUNNING.value for s in states.values()):
            return False, {"reason": "partitions not running yet", "partitions": states}
        return True, {"partitions": states}

    def _retire(self, task: PartitionTask) -> None:
        consumed, produced = self._retired_consumed, self._retired_produced
        consumed[task.tp] = consumed.get(task.tp, 0) + task.records_in
        for c in task.ctx.sinks:
            produced[c.topic] = produced.get(c.topic, 0) + c.n
        self._retired_dlq += task.dlq_records
        self._retired_processed += task.processed
        for slot in task.stores.slots if task.stores is not None else ():
            self._retired_restored[slot.step] = (
                self._retired_restored.get(slot.step, 0) + slot.restored)

    def _set_connected(self, connected: bool) -> None:
        self.broker_connected = connected

    def snapshot(self) -> Snapshot:
        """Everything the exporter shows; safe from the HTTP thread (copies are atomic)."""
        tasks = list(self._tasks.values())
        consumed = dict(self._retired_consumed)
        produced = dict(self._retired_produced)
        dlq = self._retired_dlq
        lag: dict[tuple[str, ...], float] = {}
        states: dict[str, int] = {s.value: 0 for s in TaskState}
        restored: dict[tuple[str, ...], float] = {
            (k,): v for k, v in self._retired_restored.items()}
        restore_s: dict[tuple[str, ...], float] = {}
        keys: dict[tuple[str, ...], float] = {}
        committed: dict[tuple[str, ...], float] = {}
        oldest: dict[tuple[str, ...], float] = {}
        now = time.perf_counter()
        for table in self._tables.values():
            restored[(table.name,)] = restored.get((table.name,), 0) + table.restored
            restore_s[(table.name,)] = table.restore_seconds
        for t in tasks:
            stores = t.stores  # read once: the loop thread may close it meanwhile
            for slot in list(stores.slots) if stores is not None else ():
                k = (slot.step,)
                restored[k] = restored.get(k, 0) + slot.restored
                restore_s[k] = max(restore_s.get(k, 0.0), slot.restore_seconds)
                keys[k] = keys.get(k, 0) + slot.store.approximate_count()
            consumed[t.tp] = consumed.get(t.tp, 0) + t.records_in
            for c in list(t.ctx.sinks):
                produced[c.topic] = produced.get(c.topic, 0) + c.n
            dlq += t.dlq_records
            states[t.state.value] += 1
            label = (t.tp[0], str(t.tp[1]))
            if t.committed >= 0:
                committed[label] = t.committed
            since = t.tracker.oldest_pending()
            oldest[label] = 0.0 if since is None else max(0.0, now - since)
            high = self._consumer.high_watermark(t.tp)
            nxt = (t.last_offset + 1) if t.last_offset is not None else max(t.committed, 0)
            if high is not None:
                lag[(t.tp[0], str(t.tp[1]))] = max(0, high - nxt)
        samples: dict[str, dict[tuple[str, ...], float]] = {
            "streamcore_records_consumed_total": {
                (tp[0], str(tp[1])): v for tp, v in consumed.items()},
            "streamcore_records_produced_total": {(k,): v for k, v in produced.items()},
            "streamcore_consumer_lag": lag,
            "streamcore_commits_total": {(): self.commits},
            "streamcore_rebalances_total": {(): self.rebalances},
            "streamcore_assigned_partitions": {(): len(tasks)},
            "streamcore_paused_partitions": {(): sum(1 for t in tasks if t.paused)},
            "streamcore_partitions": {(s,): n for s, n in states.items()},
            "streamcore_errors_total": {k: float(n) for k, n in list(self.errors.items())},
            "streamcore_committed_offset": committed,
            "streamcore_oldest_uncommitted_age_seconds": oldest,
            "streamcore_dlq_records_total": {(): dlq},
            "streamcore_broker_connected": {(): float(self.broker_connected)},
            "streamcore_event_loop_lag_seconds": {(): time.monotonic() - self.heartbeat},
            "streamcore_state_restore_records_total": restored,
            "streamcore_state_restore_duration_seconds": restore_s,
            "streamcore_store_keys": keys,
            "streamcore_global_table_failures_total": {
                (t.name,): float(t.failure is not None) for t in list(self._tables.values())},
        }
        return Snapshot(samples=samples, histograms={
            "streamcore_processing_latency_seconds": self.latency.export(),
            "streamcore_end_to_end_latency_seconds": self.e2e_latency.export(),
            "streamcore_commit_latency_seconds": self.commit_latency.export(),
        })

    def _exposition(self) -> bytes:
        self.metrics.publish(self.snapshot())
        return self.metrics.exposition()

    # -- progress ------------------------------------------------------------------------
    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.progress_interval_s)
            self._report_progress()

    def _processed(self) -> int:
        """Records that went through the whole chain (fetched ones still queued, or dropped
        at a failure or a stop, are not counted)."""
        return self._retired_processed + sum(t.processed for t in list(self._tasks.values()))

    def _report_progress(self) -> dict[str, Any]:
        now = time.monotonic()
        since, before = self._progress_mark
        processed = self._processed()
        self._progress_mark = (now, processed)
        elapsed = max(now - since, 1e-9)
        rows = processed - before
        report: dict[str, Any] = {
            "id": self.job.name,
            "runId": self.run_id,
            "name": self.job.name,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
            "batchId": self._progress_id,
            "numInputRows": rows,
            "inputRowsPerSecond": round(rows / elapsed, 1),
            "processedRowsPerSecond": round(rows / elapsed, 1),
            "durationMs": {"commit": self.commit_latency.summary_ms()},
            "inWorkerLatencyMs": self.latency.summary_ms(),
            "sources": [
                {"description": f"{tp[0]}[{tp[1]}]", "state": t.state.value,
                 "startOffset": t.first_offset, "endOffset": t.last_offset,
                 "committedOffset": t.committed, "queued": t.queued, "paused": t.paused}
                for tp, t in sorted(self._tasks.items())
            ],
            "commits": self.commits,
            "rebalances": self.rebalances,
        }
        self._progress_id += 1
        self.last_progress = report
        if self.on_progress is not None:
            self.on_progress(report)
        log.info("%s", _progress_line(report), extra={"progress": _progress_fields(report)})
        return report

    # -- shutdown ------------------------------------------------------------------------
    async def _commit_after_failure(self) -> None:
        """Commit what is done (never the failing record): wait (a little) until the producer
        has an answer for every output handed to it, forget unfinished batches, commit.
        Batches that can never be done (the failing one) do not hold the wait."""
        for t in self._tasks.values():
            t.tracker.discard_open()
        deadline = time.monotonic() + min(10.0, self.config.shutdown_timeout_s)
        while time.monotonic() < deadline:
            self._producer.poll(0)
            if self._producer.in_flight() == 0:
                break
            await asyncio.sleep(0.005)
        try:
            await self._commit_sync(self._done_offsets(self._live(self._tasks),
                                                       raise_failure=False,
                                                       only_moved=False))
        except StreamcoreError as exc:
            log.warning("commit after failure failed: %s", exc)

    async def _shutdown(self, failure: BaseException | None) -> None:
        """Runs on every exit. After a failure, commit only what is done (never the failing
        record), then leave the group so its partitions move on at once."""
        assert self._loop is not None
        try:
            if self._inflight_poll is not None:  # let a fetch in flight end before closing
                with contextlib.suppress(BaseException):
                    await self._inflight_poll
            if failure is not None and self._live(self._tasks):
                await self._commit_after_failure()
            # Everything done is committed (or, after a cancel, left to the next owner):
            # close the tasks now, so that the revoke inside close() has nothing left to
            # drain or commit, and a stop never waits twice.
            for tp in list(self._tasks):
                await self._close_task(tp)
            self._report_progress()
            self._stopping.set()
            await self._loop.run_in_executor(self._consumer_thread, self._consumer.close)
        except Exception as exc:  # closing must not hide the original failure
            log.warning("error while closing the consumer: %s", exc)
        finally:
            for tp in list(self._tasks):
                await self._close_task(tp)
            self._producer.close()
            for table in self._tables.values():
                table.close()
            if self._http is not None:
                self._http.stop()
            self._consumer_thread.shutdown(wait=False)
            self._fetch_thread.shutdown(wait=False)
            log.info("worker stopped: job=%s%s", self.job.name,
                     f" ({type(failure).__name__}: {failure})" if failure else "")


class _Stopped(Exception):
    """Ends the worker's TaskGroup after a graceful stop."""


def _first_error(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report: a streamcore error if any, unwrapped from nested groups."""
    flat: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        elif not isinstance(e, _Stopped | asyncio.CancelledError):
            flat.append(e)

    walk(eg)
    for e in flat:
        if isinstance(e, StreamcoreError):
            return e
    return flat[0] if flat else eg


_PARTITION = operator.methodcaller("partition")


def _topic_partition(m: Message) -> tuple[str | None, int | None]:
    return m.topic(), m.partition()


def _fmt_offsets(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items()))


def _fmt(parts: list[TopicPartition]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(parts))


def _running_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _progress_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a progress report worth a log line (the whole report is on
    /progress and the query handle)."""
    sources = report["sources"]
    return {
        "rows": report["numInputRows"],
        "rowsPerSecond": report["processedRowsPerSecond"],
        "partitions": len(sources),
        "running": sum(1 for s in sources if s["state"] == TaskState.RUNNING.value),
        "paused": sum(1 for s in sources if s["paused"]),
        "queued": sum(s["queued"] for s in sources),
        "commits": report["commits"],
        "p50Ms": report["inWorkerLatencyMs"]["p50"],
        "p99Ms": report["inWorkerLatencyMs"]["p99"],
    }


def _progress_line(report: dict[str, Any]) -> str:
    f = _progress_fields(report)
    return (f"progress: {f['rows']} rows ({f['rowsPerSecond']}/s), {f['partitions']} partitions "
            f"({f['running']} running, {f['paused']} paused), {f['queued']} queued, "
            f"{f['commits']} commits, in-worker p99 {f['p99Ms']} ms")
