"""The commit protocol: how a worker turns processed records into committed progress.

:class:`CommitProtocol` is the interface one processing mode implements; the worker calls it
and never commits by itself. :class:`ContinuousCommits` is continuous mode (at-least-once);
epoch mode implements the same interface with Kafka transactions.

Continuous mode, every ``commit_interval``:
  0. flush each running stateful partition's dirty keys to RocksDB and its changelog topics;
  1. serve delivery reports (``producer.poll``), so that acknowledged outputs are counted;
  2. per partition, advance the done offset (sealed batches with nothing pending, and no
     later than the last state flush whose changelog records are all acknowledged);
  3. queue done + 1 for the partitions that moved (``GroupMember.commit_soon``); the member
     sends it (asynchronously) with its next serve of the group. A failed delivery stops the
     worker before this step for its partition.
Commits that must be complete before something else happens are synchronous: a revoke's (the
member commits the offsets the revoke returns before the group moves on) and a stop's, after
polling has stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING

from connectors.base import TopicPartition, fmt_offsets
from streamcore.core.errors import ProducerFenced, StreamcoreError
from streamcore.runtime.partition import PartitionTask, TaskState

if TYPE_CHECKING:
    from streamcore.runtime.worker import Worker

__all__ = ["CommitProtocol", "ContinuousCommits"]

log = logging.getLogger("streamcore.worker")


class CommitProtocol(ABC):
    """The commit side of one processing mode.

    Everything runs on the event loop. Ordering: a partition's commits never go backwards,
    and nothing is committed for a partition after :meth:`forget` until it is assigned
    again.
    """

    commits: int  # commits made so far (metrics)
    _w: Worker  # the worker whose partitions it commits

    @property
    def in_progress(self) -> bool:
        """A commit (an epoch's end) is under way: the test driver is not settled."""
        return False

    @property
    def awaiting_abort(self) -> bool:
        """A task found the running transaction failed: the tasks wait for the next epoch
        end, which aborts it and rewinds them (the test driver is settled meanwhile)."""
        return False

    @property
    def awaiting_acks(self) -> bool:
        """The commit under way waits only for its outputs' acknowledgements (the test
        driver is settled if it holds them back)."""
        return False

    async def start(self) -> None:  # noqa: B027
        """Before the worker joins its group (epoch mode registers its transactional id)."""

    def close(self) -> None:  # noqa: B027
        """After the worker left its group."""

    async def explain_fence(self, exc: ProducerFenced) -> ProducerFenced:
        """The fenced error to stop with (epoch mode names the worker that fenced this
        one)."""
        return exc

    @abstractmethod
    async def run(self) -> None:
        """The periodic commits (or epochs), until cancelled."""

    async def _drain(self, parts: list[TopicPartition], deadline: float) -> list[PartitionTask]:
        """Stop these partitions' intake and wait (until deadline) for their tasks to finish
        what they took in; return the tasks."""
        w = self._w
        tasks = [w.tasks[tp] for tp in parts if tp in w.tasks]
        for t in tasks:
            t.stop_intake()
        await w.finish_running(tasks, deadline)
        return tasks

    async def hand_over(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        """A revoke: finish these partitions' work; return the offsets the member must
        commit before the group moves them on."""
        await self.prepare(parts)
        return self.done_offsets(parts, only_moved=False)

    async def on_lost(self, parts: list[TopicPartition]) -> None:  # noqa: B027
        """These partitions are someone else's already (nothing of theirs is committed)."""

    async def finish(self, parts: list[TopicPartition]) -> None:
        """A graceful stop, polling stopped: finish what is in flight and commit all of it.
        A refused or failed commit is logged (the next owner repeats work), never raised:
        the stop itself succeeds."""
        await self.prepare(parts)
        try:
            offsets = self.done_offsets(parts, only_moved=False)
            await self.commit(offsets)
            if offsets:  # where the next owner starts: one line, as a revoke logs it
                log.info("committed at stop: %s", fmt_offsets(offsets))
        except StreamcoreError as exc:
            log.warning("final commit failed: %s", exc)

    @abstractmethod
    def commit_due(self) -> None:
        """One periodic commit now (what run() does every commit_interval)."""

    @abstractmethod
    def commit_failed(self, offsets: dict[TopicPartition, int]) -> None:
        """Event loop: an asynchronous commit of these offsets failed; send them again with
        the next periodic commit even if no more records are done by then."""

    def forget(self, parts: Iterable[TopicPartition]) -> None:
        """Drop anything queued for these partitions (revoked, lost or fenced): a commit must
        never land after the partition moved."""
        self._w.member.forget(parts)

    @abstractmethod
    async def prepare(self, parts: list[TopicPartition]) -> None:
        """Finish what is in flight for these partitions and wait until every output and state
        change derived from it is acknowledged (bounded by shutdown_timeout). Raises the
        partition's delivery failure if there was one."""

    @abstractmethod
    def done_offsets(self, parts: Iterable[TopicPartition], *, raise_failure: bool = True,
                     only_moved: bool = True) -> dict[TopicPartition, int]:
        """The next offset to read of each partition whose records are all done."""

    @abstractmethod
    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit and wait for the answer (after polling stopped). Raises on failure."""

    @abstractmethod
    async def commit_after_failure(self, parts: list[TopicPartition]) -> None:
        """After a fatal error: commit what is done (never the failing record)."""


class ContinuousCommits(CommitProtocol):
    """At-least-once: an input offset is committed only after every output and state change
    derived from it has been acknowledged (DESIGN.md section 4, invariant 3)."""

    def __init__(self, worker: Worker) -> None:
        self._w = worker
        self.commits = 0

    def commit_failed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            task = self._w.tasks.get(tp)
            if task is not None and task.committed >= off:
                # Marked committed when queued: step back below it, so that the next
                # periodic commit sends this partition's done offset again.
                task.committed = off - 1

    async def run(self) -> None:
        interval = self._w.config.commit_interval_s
        while True:
            await self._w.clock.sleep(interval)
            self.commit_due()

    def commit_due(self) -> None:
        """One periodic commit (steps 0 to 3 above)."""
        w = self._w
        if not w.check_membership():
            return
        running = [tp for tp, t in w.tasks.items() if t.state is TaskState.RUNNING]
        for tp in running:  # step 0: flush state stores to RocksDB and the changelog
            w.tasks[tp].flush_state()
        offsets = self.done_offsets(running)  # steps 1 and 2
        if offsets:
            self._w.member.commit_soon(offsets)  # step 3, sent with the next serve
            self._mark_committed(offsets)

    async def prepare(self, parts: list[TopicPartition]) -> None:
        w = self._w
        deadline = time.monotonic() + w.config.shutdown_timeout_s
        tasks = await self._drain(parts, deadline)
        # Wait for the broker to acknowledge what was handed to the producer, and flush the
        # state stores (their changelog acknowledged too) so that everything is done.
        while time.monotonic() < deadline:
            w.producer.poll(0)
            # A task fenced meanwhile (its partition lost) has nothing more to finish: its
            # batch in flight never will be, and the next owner reads it again.
            tasks = [t for t in tasks if not t.fenced]
            # Outputs of the hooks that flush_state runs wait here if the producer had no
            # room: the task's loop, which would hand them over, has ended.
            held = [t for t in tasks if not t.hand_over_held()]
            if not held and all(t.tracker.failure is not None
                                or (t.tracker.all_done() and t.state_settled())
                                for t in tasks):
                break
            for t in tasks:
                t.flush_state()
            await asyncio.sleep(0.002)
        for t in tasks:
            if t.tracker.failure is not None:
                raise t.tracker.failure

    def done_offsets(self, parts: Iterable[TopicPartition], *, raise_failure: bool = True,
                     only_moved: bool = True) -> dict[TopicPartition, int]:
        """With only_moved, only where it moved past the last commit (periodic commits; final
        commits send all). A failed delivery is raised unless raise_failure is False; either
        way the batch that failed never becomes done, so nothing at or after it is returned."""
        w = self._w
        w.producer.poll(0)  # step 1: serve delivery reports
        offsets: dict[TopicPartition, int] = {}
        for tp in parts:
            task = w.tasks.get(tp)
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
            task = self._w.tasks.get(tp)
            if task is not None:
                task.committed = max(task.committed, off)
        log.debug("committed %s", fmt_offsets(offsets))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        t0 = time.perf_counter()
        await self._w.member.commit(offsets)
        self._w.commit_latency.record(time.perf_counter() - t0)
        self._mark_committed(offsets)

    async def commit_after_failure(self, parts: list[TopicPartition]) -> None:
        """Wait (a little) until the producer has an answer for every output handed to it,
        forget unfinished batches, commit. Batches that can never be done (the failing one)
        do not hold the wait."""
        w = self._w
        for t in w.tasks.values():
            t.tracker.discard_open()
        deadline = time.monotonic() + min(10.0, w.config.shutdown_timeout_s)
        while time.monotonic() < deadline:
            w.producer.poll(0)
            if w.producer.in_flight() == 0:
                break
            await asyncio.sleep(0.005)
        try:
            await self.commit(self.done_offsets(parts, raise_failure=False, only_moved=False))
        except StreamcoreError as exc:
            log.warning("commit after failure failed: %s", exc)
