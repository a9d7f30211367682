"""The worker: one group member, one producer, one task per assigned partition.

Everything the worker starts belongs to one ``asyncio.TaskGroup``: the poll loop
(streamcore.runtime.fetching), the member's service of the group, the commit protocol's
periodic commits (streamcore.runtime.commits), progress reports and the heartbeat. Start-up
checks are in streamcore.runtime.startup, what the worker shows (health, readiness, metrics,
progress) in streamcore.runtime.status. The worker itself owns the group membership's side
of the engine: it makes, drains and closes the partition tasks as partitions come and go.

The member (connectors.base.GroupMember) is asyncio-native whatever the client: the threads a
blocking client needs live in connectors.threaded. The worker is the member's rebalance
listener: a revoked partition is drained and its done offsets returned to the member, which
commits them before the group moves the partition (DESIGN.md section 4, invariant 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from connectors.base import (
    ClientBackend,
    GroupMember,
    PartitionReader,
    ProducerBackend,
    RebalanceListener,
    TopicPartition,
    fmt_partitions,
)
from metrics.exporter import Snapshot, WorkerMetrics
from metrics.http import StatusServer
from streamcore.api.config import WorkerConfig
from streamcore.core.clock import Clock, SystemClock
from streamcore.core.errors import ConfigError, ProducerFenced, StreamcoreError
from streamcore.plan.graph import OpKind
from streamcore.plan.logical import LogicalPlan
from streamcore.plan.physical import plan
from streamcore.runtime import startup
from streamcore.runtime.commits import CommitProtocol, ContinuousCommits
from streamcore.runtime.epochs import EpochCommits, transactional_id
from streamcore.runtime.eventtime import EventTime, MarkerRoutes
from streamcore.runtime.fetching import Fetcher
from streamcore.runtime.gaps import GapCheck, GapChecks
from streamcore.runtime.partition import PartitionTask, TaskState
from streamcore.runtime.progress import LatencyHistogram
from streamcore.runtime.state import PartitionStores
from streamcore.runtime.status import WorkerStatus
from streamcore.runtime.tables import GlobalTable

__all__ = ["Worker"]

log = logging.getLogger("streamcore.worker")
TIMER_INTERVAL_S = 0.1  # operators' timer hooks run at least this often


class Worker:
    def __init__(
        self,
        job: Any,
        config: WorkerConfig,
        *,
        clients: ClientBackend | None = None,
        clock: Clock | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.config = config
        self.group = config.group or job.name
        # The runtime runs the physical plan and reads nothing else of the job.
        self.plan = plan(job if isinstance(job, LogicalPlan) else job.build(), self.group)
        self.run_id = run_id or str(uuid.uuid4())
        self.clock = clock or SystemClock()
        self.clients = clients or startup.clients_for(config)
        self._member = self.clients.consumer(self.group)
        self._epochs = config.trigger_spec.epochs
        if not self._epochs and any(n.kind == OpKind.FOREACH_BATCH for n in self.plan.nodes):
            raise ConfigError("trigger", "foreach_batch runs once per epoch: it needs epoch "
                              "mode (--mode epoch, or WorkerConfig(trigger='100ms'))")
        self.transactional_id = transactional_id(
            self.group, Path(config.state_dir), config.transactional_id) if self._epochs else None
        self._producer = self.clients.producer(self.transactional_id)
        self._tasks: dict[TopicPartition, PartitionTask] = {}
        self._running: dict[TopicPartition, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self.exiting = False  # run() is on its way out (a failure or a stop): shutting down
        self._stop_requested = False  # stop() before run() set the loop: run() stops at once
        self._joined = False  # a rebalance completed: the member is in the group
        self._state_dir = Path(config.state_dir)
        self._tables: dict[int, GlobalTable] = {}  # TABLE node id -> its global table
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: asyncio.TaskGroup | None = None
        self.latency = LatencyHistogram()  # in-worker: handed over -> output handed on
        self.e2e_latency = LatencyHistogram()  # record timestamp -> output handed on
        self.commit_latency = LatencyHistogram()
        self.errors: dict[tuple[str, str, str], int] = {}  # (kind, policy, step) -> count
        self.metrics = WorkerMetrics(job.name)
        self.status = WorkerStatus(self)
        self.committer: CommitProtocol = EpochCommits(self) if self._epochs \
            else ContinuousCommits(self)
        self._topics = self.plan.subscription()  # inputs and repartition topics
        self.fetcher = Fetcher(
            self._member, self._producer, self._tasks, topics=self._topics,
            max_records=config.poll_batch, timeout=config.poll_timeout_s, clock=self.clock,
            in_group=self.check_membership, stopping=self._stopping)
        self._http: StatusServer | None = None
        self.heartbeat = time.monotonic()
        self._rebalancing_since: float | None = None
        self.on_progress = on_progress
        self._started = time.time()
        self.broker_connected = True  # the start-up check reached it; then the client says
        self.rebalances = 0
        # Repartition topics in continuous mode: records a fetch passed over are read again.
        self.gaps = GapChecks(self._without_gaps, self.clients, self.group, self._member.seek)
        self._markers = MarkerRoutes()  # where watermarks go; set at start
        if not self._epochs and any(n.kind == OpKind.EMIT and n.params["mode"] == "complete"
                                    for n in self.plan.nodes):
            raise ConfigError("trigger", "complete output mode emits the whole result table "
                              "at every trigger: it needs epoch mode (--mode epoch, or "
                              "WorkerConfig(trigger='1s')), as in Spark")

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
        failure: BaseException | None = None
        cancelled = False
        try:
            # Inside the try: a start-up failure must close the clients too (their threads
            # would otherwise go on reconnecting for the life of the process).
            await self._start()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                poll = tg.create_task(self.fetcher.run(), name="poll")
                tg.create_task(self._member.run(), name="membership")
                tg.create_task(self.committer.run(), name="commit")
                tg.create_task(self._progress_loop(), name="progress")
                tg.create_task(self._heartbeat_loop(), name="heartbeat")
                tg.create_task(self._timer_loop(), name="timers")
                await self._stopping.wait()
                await poll  # 1. stop intake at the source
                # 2. finish what is in flight, wait for the acknowledgements, 3. commit all
                # of it (epoch mode: the running epoch). A refused commit (a rebalance raced
                # the stop) is logged: the next owner reads those records again.
                await self.committer.finish(self._live(self._tasks))
                raise _Stopped
        except* _Stopped:
            pass
        except* asyncio.CancelledError:
            cancelled = True
        except* BaseException as eg:
            self.exiting = True
            failure = _first_error(eg)
            if isinstance(failure, ProducerFenced):
                failure = await self.committer.explain_fence(failure)
        finally:
            await self._shutdown(failure)
        if failure is not None:
            raise failure
        if cancelled:  # the caller cancelled run(): it gets a plain CancelledError
            raise asyncio.CancelledError

    async def _start(self) -> None:
        """Check, create what the plan needs, join the group (run's first part)."""
        assert self._loop is not None
        if self.plan.stateful or self.plan.tables:
            startup.check_state_dir(self._state_dir)
        await self._loop.run_in_executor(None, startup.check_kafka, self.plan, self.config,
                                         self.clients)
        if self.plan.uses_dead_letter:
            await self._loop.run_in_executor(None, startup.create_dlq, self.plan, self.clients)
        self._start_http()
        # Internal topics and global tables first: a partition must not start before its
        # repartition and changelog topics exist, nor a join before its table is complete.
        table_sizes = await self._loop.run_in_executor(
            None, startup.create_internal_topics, self.plan, self.clients)
        await self._open_tables(table_sizes)
        self._markers = await self._loop.run_in_executor(
            None, MarkerRoutes.of, self.plan, self.clients.partition_count)
        topics = self._topics
        await self._producer.start()
        await self.committer.start()
        if self.transactional_id is not None:
            log.info("epoch mode, trigger %s, transactional id %s",
                     self.config.trigger_spec.describe(), self.transactional_id)
        self._member.observe_commits(self.commit_latency.record)
        self._member.observe_connectivity(self._set_connected)
        self._member.observe_commit_failures(self.committer.commit_failed)
        await self._member.join(topics, _Rebalances(self), start_at_end=self._starts_at_end)
        log.info("worker started: job=%s group=%s topics=%s", self.plan.name, self.group, topics)

    # -- fetching (streamcore.runtime.fetching) ------------------------------------------
    @property
    def records_in(self) -> int:
        """Records fetched: dispatched, or dropped by a fence."""
        return self.fetcher.records_in

    @property
    def last_poll(self) -> float:
        return self.fetcher.last_poll

    def check_membership(self) -> bool:
        """False (and every task fenced) if the group has not been served for longer than
        max.poll.interval.ms: the member has left the group, and the partitions may be
        another member's already. Checked before records are handed on, before a task takes
        a batch and before a commit; the lost callback follows at the next serve, then the
        worker rejoins."""
        member = self._member
        idle = time.monotonic() - member.last_served
        if idle <= member.max_poll_interval_s:
            return True
        self._fence(list(self._tasks), f"the group was not served for {idle:.1f}s "
                    f"(max.poll.interval.ms {member.max_poll_interval_s * 1000:.0f}): was "
                    "the event loop blocked?")
        if self._tasks:
            member.rejoin()  # the fenced partitions come back through a rebalance
        return False

    def _live(self, parts: Iterable[TopicPartition]) -> list[TopicPartition]:
        """The partitions of parts with a task that is not fenced: the ones whose work may
        still be drained and committed."""
        return [tp for tp in parts if tp in self._tasks and not self._tasks[tp].fenced]

    def _fence(self, parts: list[TopicPartition], reason: str) -> None:
        """Suspend these partitions at once: no more output, changelog or commit (a zombie
        must not write). They are closed when the lost callback comes."""
        hit = self._live(parts)
        if not hit:
            return
        log.warning("fenced %s: %s", fmt_partitions(hit), reason)
        for tp in hit:
            self.committer.forget([tp])
            self._tasks[tp].fence()
            running = self._running.get(tp)
            if running is not None:
                running.cancel()

    # -- rebalance events (connectors.base.RebalanceListener) ---------------------------
    def _starts_at_end(self, topic: str) -> bool:
        """A topic of a source with starting_offsets="latest" (never an internal topic)."""
        node = self.plan.source_for_topic(topic)
        return node.source is not None and node.kind == OpKind.SOURCE and \
            node.source.starting_offsets == "latest"

    async def _assign(self, parts: list[TopicPartition]) -> None:
        if not parts:
            return
        self.rebalances += 1
        self.fetcher.quiet_from_now()
        log.info("assigned %s", fmt_partitions(parts))
        checks: list[GapCheck] = []
        for tp in parts:
            check = self.gaps.check(tp)
            if check is not None:
                checks.append(check)
            task = PartitionTask(
                tp, self.plan, self.plan.source_for_topic(tp[0]),
                self.committer.task_producer() if isinstance(self.committer, EpochCommits)
                else self._producer,
                inbox_high=self.config.inbox_high, inbox_low=self.config.inbox_low,
                pause=self._pause, resume=self._resume, latency=self.latency,
                e2e=self.e2e_latency, errors=self.errors, make_stores=self._make_stores,
                new_reader=self._new_reader, tables=self._tables,
                batch_execution=self.config.batch_execution,
                gate=self.committer.gate if isinstance(self.committer, EpochCommits) else None,
                on_batch=self.committer.taken if isinstance(self.committer, EpochCommits)
                else None,
                on_txn_failed=self.committer.txn_failed
                if isinstance(self.committer, EpochCommits) else None,
                event_time=self._event_time(tp), in_group=self.check_membership,
                gaps=check)
            self._tasks[tp] = task
            if self._tg is not None and not self._stopping.is_set():
                self._running[tp] = self._tg.create_task(task.run(), name=f"partition-{tp}")
        await self.gaps.set_starts(checks)  # before any of their records is fetched

    def _without_gaps(self, topic: str) -> bool:
        """A topic whose offsets have no gaps on Kafka: a repartition topic in continuous
        mode (written without transactions, never compacted). Epoch mode writes it in
        transactions, whose markers take offsets."""
        return not self._epochs and self.plan.source_for_topic(topic).kind == OpKind.REPARTITION

    def _event_time(self, tp: TopicPartition) -> EventTime:
        idle = self.config.watermark_idle_timeout
        return self._markers.event_time(
            tp, policy=self.config.watermark_policy, now_ms=self.clock.now_ms,
            idle_timeout_ms=None if idle is None else int(float(idle) * 1000))

    async def _revoke(self, parts: list[TopicPartition], *,
                      commit: bool) -> dict[TopicPartition, int]:
        """Stop intake, finish queued work (up to the shutdown deadline), wait for the
        acknowledgements, close; return the done offsets to commit (none if lost)."""
        mine = [tp for tp in parts if tp in self._tasks]
        if not mine:
            return {}
        self.rebalances += 1
        log.info("%s %s", "revoking" if commit else "lost", fmt_partitions(mine))
        offsets: dict[TopicPartition, int] = {}
        self.committer.forget(mine)  # a queued commit must not land after the partition moved
        try:
            if commit:
                for tp in mine:
                    self._tasks[tp].stop_intake()
            else:
                # Lost: another member may own them already. Fenced at once (nothing more
                # written), so that an epoch's end under way does not wait for their work.
                self._fence(mine, "the partitions were lost (the member left the group)")
            live = self._live(mine)
            if commit and live:
                offsets = await self.committer.hand_over(live)
            elif not commit:
                await self.committer.on_lost(mine)
        finally:
            for tp in mine:
                await self._close_task(tp)
        return offsets

    # -- what the commit protocol uses ----------------------------------------------------
    @property
    def commits(self) -> int:
        return self.committer.commits

    @property
    def producer(self) -> ProducerBackend:
        return self._producer

    @property
    def member(self) -> GroupMember:
        return self._member

    def caught_up(self, quiet: float) -> bool:
        """Every assigned partition is running, has had a fetch answered (its high
        watermark is known: a quiet spell before the first answer means nothing) and has
        processed everything fetched, and no fetch has brought a record for quiet seconds
        (the trigger once/available_now). The local broker under-reports high watermarks,
        so the end itself is the quiet spell."""
        if not self._joined or not self._tasks:
            return False
        if self.clock.now_ms() / 1000 - self.fetcher.last_records_at < quiet:
            return False
        member = self._member
        return all(t.state is TaskState.RUNNING and not t.queued and t.idle()
                   and member.high_watermark(t.tp) is not None for t in self._tasks.values())

    async def finish_running(self, tasks: list[PartitionTask], deadline: float) -> None:
        """Wait (until deadline) for these tasks to process what they have taken in."""
        running = [self._running[t.tp] for t in tasks if t.tp in self._running]
        if running:
            _, late = await asyncio.wait(running, timeout=max(0.0, deadline - time.monotonic()))
            if late:
                log.warning("drain deadline passed; %d partition(s) abandoned in flight",
                            len(late))

    async def _close_task(self, tp: TopicPartition) -> None:
        task = self._tasks.pop(tp, None)
        running = self._running.pop(tp, None)
        if running is not None and not running.done():
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
        if task is not None:
            self.status.retire(task)
            task.close_stores()
            if task.state is not TaskState.CLOSED:
                task.transition(TaskState.CLOSED)

    def _make_stores(self, partition: int) -> PartitionStores:
        c = self.config
        return PartitionStores(self.group, partition, state_dir=self._state_dir,
                               backend=c.state_backend, settings=c.rocksdb,
                               cache_entries=c.state_cache_entries)

    def _new_reader(self) -> PartitionReader:
        return self.clients.reader()

    async def _open_tables(self, sizes: dict[str, int]) -> None:
        assert self._loop is not None
        for node in self.plan.tables:
            table = GlobalTable(self.group, node, partitions=sizes[node.params["topic"]],
                                state_dir=self._state_dir, backend=self.config.state_backend,
                                settings=self.config.rocksdb, new_reader=self._new_reader)
            self._tables[node.id] = table
            await self._loop.run_in_executor(None, table.restore)
            table.start()

    # -- backpressure --------------------------------------------------------------------
    def _pause(self, tp: TopicPartition) -> None:
        self._member.pause([tp])

    def _resume(self, tp: TopicPartition) -> None:
        if tp in self._tasks:
            self._member.resume([tp])

    # -- operations: DLQ, HTTP endpoints, metrics ---------------------------------------
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

    async def _timer_loop(self) -> None:
        """Processing time for the operators' timer hooks (runtime.context.OperatorHooks)."""
        while True:
            await self.clock.sleep(TIMER_INTERVAL_S)
            now = self.clock.now_ms()
            for task in list(self._tasks.values()):
                task.on_time(now)

    async def _heartbeat_loop(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await asyncio.sleep(0.25)

    def _set_connected(self, connected: bool) -> None:
        self.broker_connected = connected

    # -- status (streamcore.runtime.status) ----------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        return self.status.health()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return self.status.ready()

    def snapshot(self) -> Snapshot:
        return self.status.snapshot()

    @property
    def last_progress(self) -> dict[str, Any] | None:
        return self.status.last_progress

    # What the status reads (from any thread: callers copy before iterating).
    @property
    def tasks(self) -> dict[TopicPartition, PartitionTask]:
        return self._tasks

    @property
    def tables(self) -> dict[int, GlobalTable]:
        return self._tables

    @property
    def joined(self) -> bool:
        return self._joined

    @property
    def rebalancing_since(self) -> float | None:
        return self._rebalancing_since

    def high_watermark(self, tp: TopicPartition) -> int | None:
        return self._member.high_watermark(tp)

    def _exposition(self) -> bytes:
        self.metrics.publish(self.snapshot())
        return self.metrics.exposition()

    # -- progress ------------------------------------------------------------------------
    async def _progress_loop(self) -> None:
        if self._epochs:
            return  # one report per epoch (streamcore.runtime.epochs)
        while True:
            await self.clock.sleep(self.config.progress_interval_s)
            self.status.report_progress()

    # -- shutdown ------------------------------------------------------------------------
    async def _shutdown(self, failure: BaseException | None) -> None:
        """Runs on every exit. After a failure, commit only what is done (never the failing
        record), then leave the group so its partitions move on at once."""
        assert self._loop is not None
        self.exiting = True
        try:
            if failure is not None and self._live(self._tasks):
                await self.committer.commit_after_failure(self._live(self._tasks))
            # Everything done is committed (or, after a cancel, left to the next owner):
            # close the tasks now, so that the revoke inside close() has nothing left to
            # drain or commit, and a stop never waits twice.
            for tp in list(self._tasks):
                await self._close_task(tp)
            self.status.report_progress()
            self._stopping.set()
            await self._member.close()
        except Exception as exc:  # closing must not hide the original failure
            log.warning("error while closing the consumer: %s", exc)
        finally:
            for tp in list(self._tasks):
                await self._close_task(tp)
            await self._producer.stop()
            self.committer.close()
            for table in self._tables.values():
                table.close()
            if self._http is not None:
                self._http.stop()
            log.info("worker stopped: job=%s%s", self.plan.name,
                     f" ({type(failure).__name__}: {failure})" if failure else "")


class _Rebalances(RebalanceListener):
    """The worker's side of its member's rebalance events."""

    def __init__(self, worker: Worker) -> None:
        self._w = worker

    @contextlib.contextmanager
    def _rebalancing(self) -> Iterator[Worker]:
        """While an event is handled, /healthz and /readyz say a rebalance is under way."""
        w = self._w
        w._rebalancing_since = time.monotonic()
        try:
            yield w
        finally:
            w._rebalancing_since = None

    async def assigned(self, parts: list[TopicPartition]) -> None:
        self._w._joined = True  # every completed rebalance calls this, with nothing new or not
        with self._rebalancing() as w:
            await w._assign(parts)

    async def revoked(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        with self._rebalancing() as w:
            return await w._revoke(parts, commit=True)

    async def lost(self, parts: list[TopicPartition]) -> None:
        with self._rebalancing() as w:
            await w._revoke(parts, commit=False)

    def fenced(self, parts: list[TopicPartition]) -> None:
        self._w._fence(parts, "a commit was refused: this member is no longer in the group's "
                       "generation")


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


def _running_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
