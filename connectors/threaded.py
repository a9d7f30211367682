"""A :class:`~connectors.base.GroupMember` made of a blocking
:class:`~connectors.base.ConsumerBackend` and two threads: the threads a blocking client needs
stay here, and the engine sees an asyncio member.

* The **membership thread** makes every group call: serve, commits, close. librdkafka blocks
  even an asynchronous commit while a rebalance callback runs, and the callback waits for the
  event loop; so periodic commits are queued (:meth:`ThreadedMember.commit_soon`) and sent
  by this thread between serves of the group. A rebalance callback hands its event to the
  event loop and waits for the listener to complete it; a revoke's offsets are committed
  synchronously right there, before the group moves the partitions on (DESIGN.md section 4,
  invariant 3).
* The **fetch thread** waits for records when there are none. While a backlog lasts, records
  are read straight on the event loop with ``timeout=0``: no thread handoff and no GIL
  contention (connectors.base).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from connectors.base import (
    ConsumerBackend,
    GroupMember,
    Message,
    QueuedCommits,
    RebalanceListener,
    TopicPartition,
    fmt_offsets,
    report_consumer_error,
)
from streamcore.core.errors import StreamcoreError
from streamcore.core.logs import BurstLogger

__all__ = ["ThreadedMember"]

log = logging.getLogger("streamcore.kafka")
_burst_log = BurstLogger(log)
# How long one serve of the group may block the membership thread: a queued periodic commit
# waits at most this long.
_SERVE_TIMEOUT_S = 0.02
T = TypeVar("T")


class ThreadedMember(QueuedCommits, GroupMember):
    def __init__(self, consumer: ConsumerBackend) -> None:
        super().__init__()
        self.consumer = consumer
        self.max_poll_interval_s = consumer.max_poll_interval_s
        self.last_served = time.monotonic()
        self._membership = concurrent.futures.ThreadPoolExecutor(1, "sc-consumer")
        self._fetcher = concurrent.futures.ThreadPoolExecutor(1, "sc-fetch")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: RebalanceListener | None = None
        self._backlog = False  # the last fetch was full: read the next one on the loop
        self._fetching: asyncio.Future[list[Message]] | None = None  # on the fetch thread
        # Clear while a fetch is out: a revoke waits for it (see _taken).
        self._fetch_idle = asyncio.Event()
        self._fetch_idle.set()
        # Pauses and resumes made while a fetch is out, applied in order when it lands: a
        # call on the reader would wait for that poll, holding the event loop.
        self._kept: list[tuple[Callable[[Sequence[TopicPartition]], None],
                               Sequence[TopicPartition]]] = []
        self._commit_failed: Callable[[dict[TopicPartition, int]], None] | None = None
        # The group's metadata (epoch mode's transactions), read on the membership thread
        # after each serve once asked for: read from the loop, the call waits for the serve.
        self._metadata: Any = None
        self._metadata_wanted = False

    # -- the group -----------------------------------------------------------------------
    async def join(self, topics: Sequence[str], listener: RebalanceListener, *,
                   start_at_end: Callable[[str], bool] = lambda topic: False) -> None:
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self.consumer.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost, start_at_end=start_at_end, on_fenced=self._on_fenced)
        self.last_served = time.monotonic()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            commit, self._queued = self._queued, {}
            if time.monotonic() - self.last_served > self.max_poll_interval_s:
                commit = {}  # the member has left the group: nothing may land any more
            self._sending = bool(commit)
            try:
                errors, served_at = await loop.run_in_executor(
                    self._membership, self._commit_then_serve, commit)
            finally:
                self._sending = False
            # When the serve returned, not now: with the event loop blocked, the serve ended
            # long before this line runs, and the time in between counts toward
            # max.poll.interval.ms (so the engine still sees the stall: check_membership).
            self.last_served = served_at
            for err in errors:
                report_consumer_error(err, _burst_log)

    def _commit_then_serve(self, commit: dict[TopicPartition, int]) -> tuple[list[Any], float]:
        """Membership thread: the queued commit first, then serve the group; the errors
        served, and when the serve returned."""
        if commit:
            try:
                self.consumer.commit(commit, asynchronous=True)
            except StreamcoreError as exc:  # a failed async commit is retried by the next one
                log.warning("commit failed: %s", exc)
        errors = self.consumer.serve(_SERVE_TIMEOUT_S)
        served_at = time.monotonic()
        self._read_metadata()
        return errors, served_at

    def _read_metadata(self) -> None:
        """Membership thread: the generation changes only inside a serve, so the metadata
        read after each serve (and at the start of each rebalance callback) is current
        whenever the event loop runs. Had it moved on, the broker refuses the transaction's
        offsets and the epoch is retried: never a commit it would not have taken."""
        if self._metadata_wanted:
            with contextlib.suppress(RuntimeError):  # not in a group yet: read it directly
                self._metadata = self.consumer.group_metadata()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.forget(offsets)  # the service would send it after this one (GroupMember.commit)
        if offsets:
            await asyncio.get_running_loop().run_in_executor(
                self._membership, lambda: self.consumer.commit(offsets, asynchronous=False))

    async def close(self) -> None:
        try:
            if self._fetching is not None:  # a fetch of a cancelled caller: let it end first
                with contextlib.suppress(BaseException):
                    await self._fetching
            await asyncio.get_running_loop().run_in_executor(self._membership,
                                                             self.consumer.close)
        finally:
            self._membership.shutdown(wait=False)
            self._fetcher.shutdown(wait=False)

    # -- rebalance callbacks (membership thread) ----------------------------------------
    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run an event of the listener on the event loop and wait for its completion."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _on_assign(self, parts: list[TopicPartition]) -> None:
        assert self._listener is not None
        self._read_metadata()
        self._on_loop(self._listener.assigned(parts))

    async def _taken(self, parts: list[TopicPartition], event: Coroutine[Any, Any, T]) -> T:
        """A revoke or loss, after the fetch in flight (if any) has landed, and with the
        partitions' queued commit forgotten (here on the loop, the thread that queues).

        That fetch may hold records of these partitions from before the event: they must
        reach the engine's tasks now, which still belong to this assignment, and never a
        task made for a later assignment of the same partition. The engine dispatches a
        fetch's records without an await in between, so once the fetch returned they are
        there."""
        self.forget(parts)
        try:
            await self._fetch_idle.wait()
        except BaseException:
            event.close()
            raise
        return await event

    def _on_revoke(self, parts: list[TopicPartition]) -> None:
        assert self._listener is not None
        self._read_metadata()
        offsets = self._on_loop(self._taken(parts, self._listener.revoked(parts)))
        if not offsets:
            return
        try:  # synchronously, here, before the group moves the partitions on
            self.consumer.commit(offsets, asynchronous=False)
            log.info("committed revoked partitions at %s", fmt_offsets(offsets))
        except StreamcoreError as exc:
            # The next owner starts from the previous commit: duplicates, never loss.
            log.warning("commit on revoke failed: %s", exc)

    def _on_lost(self, parts: list[TopicPartition]) -> None:
        assert self._listener is not None
        self._read_metadata()
        self._on_loop(self._taken(parts, self._listener.lost(parts)))

    def _on_fenced(self, parts: list[TopicPartition]) -> None:
        if self._loop is not None and self._listener is not None:
            self._loop.call_soon_threadsafe(self._listener.fenced, parts)

    def observe_commits(self, seconds: Callable[[float], None]) -> None:
        self.consumer.observe_commits(seconds)

    def observe_connectivity(self, connected: Callable[[bool], None]) -> None:
        self.consumer.observe_connectivity(connected)

    def observe_commit_failures(self,
                                failed: Callable[[dict[TopicPartition, int]], None]) -> None:
        self._commit_failed = failed
        self.consumer.observe_commit_failures(self._on_commit_failed)

    def _on_commit_failed(self, offsets: dict[TopicPartition, int]) -> None:
        if self._loop is not None and self._commit_failed is not None:
            self._loop.call_soon_threadsafe(self._commit_failed, offsets)

    # -- the data side -------------------------------------------------------------------
    async def fetch(self, max_records: int, max_wait: float) -> list[Message]:
        msgs: list[Message] = []
        if self._backlog:
            # Read what the client has already fetched, here on the loop thread (it runs no
            # callbacks): no handoff to another thread while a backlog lasts.
            msgs = self.consumer.consume(max_records, 0)
        if not msgs:
            self._fetching = asyncio.get_running_loop().run_in_executor(
                self._fetcher, self.consumer.consume, max_records, max_wait)
            self._fetch_idle.clear()
            try:
                msgs = await self._fetching
            finally:
                self._fetching = None
                self._apply_kept()  # before a revoke waiting for the fetch goes on
                self._fetch_idle.set()
        self._backlog = len(msgs) >= max_records
        return msgs

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        """At once, or (a fetch on the fetch thread) as soon as it lands: its records may
        still hold some of these partitions', as any fetch under way when a pause comes."""
        self._call(self.consumer.pause, partitions)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        self._call(self.consumer.resume, partitions)

    def _call(self, fn: Callable[[Sequence[TopicPartition]], None],
              partitions: Sequence[TopicPartition]) -> None:
        if self._fetching is None:
            fn(partitions)
        else:
            self._kept.append((fn, partitions))

    def _apply_kept(self) -> None:
        kept, self._kept = self._kept, []
        for fn, partitions in kept:
            fn(partitions)

    def high_watermark(self, tp: TopicPartition) -> int | None:
        return self.consumer.high_watermark(tp)

    def seek(self, offsets: dict[TopicPartition, int]) -> None:
        self.consumer.seek(offsets)

    def group_metadata(self) -> Any:
        """As read by the membership thread (see _read_metadata); the first call, before
        that thread reads it, reads it here (it may wait for one serve)."""
        self._metadata_wanted = True
        if self._metadata is None:
            self._metadata = self.consumer.group_metadata()
        return self._metadata
