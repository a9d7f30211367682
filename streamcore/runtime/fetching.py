"""Fetching: the worker's poll loop, which reads the member's records and hands each
partition's run of them to its task.

The :class:`Fetcher` belongs to the worker (its TaskGroup runs :meth:`Fetcher.run`) and
shares the worker's map of partition tasks: the worker adds and removes tasks at
rebalances, the fetcher only looks them up. Everything runs on the event loop thread.

Two rules the rest of the engine relies on:

* No await between a fetch and the dispatch of its records: a member may rely on it (a
  revoke waits for the fetch in flight, knowing that its records are then with the tasks).
* :meth:`Fetcher.parked` stops the loop between two fetches (epoch mode seeks the
  partitions back after an abort meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from itertools import groupby
from typing import Any

from connectors.base import (
    GroupMember,
    Message,
    ProducerBackend,
    TopicPartition,
    report_consumer_error,
)
from streamcore.core.clock import Clock
from streamcore.core.logs import BurstLogger
from streamcore.runtime.partition import PartitionTask

__all__ = ["Fetcher"]

log = logging.getLogger("streamcore.worker")
_burst_log = BurstLogger(log)


class Fetcher:
    def __init__(self, member: GroupMember, producer: ProducerBackend,
                 tasks: dict[TopicPartition, PartitionTask], *, topics: list[str],
                 max_records: int, timeout: float, clock: Clock,
                 in_group: Callable[[], bool], stopping: asyncio.Event) -> None:
        self._member = member
        self._producer = producer
        self._tasks = tasks
        # The only topic subscribed (not a pattern): records are then split by partition alone.
        self._one_topic = topics[0] if len(topics) == 1 and not topics[0].startswith("^") \
            else None
        self._max_records = max_records
        self._timeout = timeout
        self._clock = clock
        self._in_group = in_group
        self._stopping = stopping
        self._gate = asyncio.Event()  # clear: parked between fetches
        self._gate.set()
        self._parked = asyncio.Event()
        self._running = False
        self.records_in = 0  # fetched: dispatched, or dropped by a fence
        self.last_poll = time.monotonic()  # when the last fetch returned (/healthz)
        self.last_records_at = 0.0  # clock time (s) of the last fetch that brought records

    def quiet_from_now(self) -> None:
        """Count a quiet spell from now (a rebalance: the partitions' records start again)."""
        self.last_records_at = self._clock.now_ms() / 1000

    async def run(self) -> None:
        """Fetch and dispatch until the worker stops (what was dispatched last is drained by
        the worker)."""
        self._running = True
        try:
            await self._poll()
        finally:
            self._running = False
            self._parked.set()  # nothing fetches any more: a seek may go on

    async def _poll(self) -> None:
        fetch = self._member.fetch
        n, timeout = self._max_records, self._timeout
        tasks = self._tasks
        perf = time.perf_counter
        gate, parked = self._gate, self._parked
        while True:
            if not gate.is_set():  # the committer seeks the partitions back meanwhile
                parked.set()
                await gate.wait()
                parked.clear()
            msgs = await fetch(n, timeout)  # then no await until they are dispatched
            self.last_poll = time.monotonic()
            if msgs and self._in_group():
                self.quiet_from_now()
                self._dispatch(msgs, tasks, perf())
            elif msgs:  # dropped: their partitions may be another member's already
                self.records_in += len(msgs)
            if self._stopping.is_set():
                return
            if msgs:
                # Let the partition tasks just woken take the batch first (in-worker
                # latency), then serve delivery reports once per fetch so that they never
                # pile up.
                await asyncio.sleep(0)
                self._producer.poll(0)

    @contextlib.asynccontextmanager
    async def parked(self) -> AsyncIterator[None]:
        """Inside, the loop is parked between fetches: everything fetched so far has been
        handed to the tasks, and nothing more is fetched until the end of the block."""
        self._gate.clear()
        try:
            if self._running:
                await self._parked.wait()
            yield
        finally:
            self._gate.set()

    def _dispatch(self, msgs: list[Message], tasks: dict[TopicPartition, PartitionTask],
                  handed_at: float) -> None:
        if any([m.error() is not None for m in msgs]):  # rare: report and drop them
            for m in msgs:
                if m.error() is not None:
                    report_consumer_error(m.error(), _burst_log)
            msgs = [m for m in msgs if m.error() is None]
        # A fetch holds runs of consecutive messages of one partition. This runs once per
        # input record, so the split stays in C where it can: with one topic, a list of the
        # partitions (a method call per record, no Python frame), groupby over those ints,
        # and one slice per run (none when the whole fetch is one partition's).
        topic = self._one_topic
        if topic is None:
            for key, run in groupby(msgs, _topic_partition):
                task = tasks.get(key)
                if task is not None:
                    task.offer(handed_at, list(run))
        else:
            n = len(msgs)
            start = 0
            parts: list[Any] = [m.partition() for m in msgs]  # an int once fetched
            for p, same in groupby(parts):
                end = start + len(list(same))
                task = tasks.get((topic, p))
                if task is not None:
                    task.offer(handed_at, msgs if end - start == n else msgs[start:end])
                start = end
        self.records_in += len(msgs)


def _topic_partition(m: Message) -> TopicPartition:
    return m.topic(), m.partition()  # type: ignore[return-value]  # both set once fetched
