"""Records a fetch passed over, in a topic whose offsets have no gaps.

A repartition topic in continuous mode has no gaps on Kafka: it is written without
transactions and never compacted. The local broker now and then passes records over in a
fetch when several producers write one partition at once (README, the local broker's
defects), and the consumer's position moves on past them. A partition task hands each batch
of such a topic to its :class:`GapCheck` before taking it: the records before the first
offset missing are taken, the rest of that fetch is dropped, and the partition is read again
from that offset. The same offsets missing through :data:`GAP_READS` reads are a real gap
(taken, so that a partition never stalls). A task's first batch has no batch before it: it
must begin where the reader started, at the group's committed offset (``start``; unknown
without a commit, and then unchecked).

:class:`GapChecks` is the worker's side: a check for each new partition of such a topic, and
the lookup of where its reading began (on a worker thread, once per assignment). The checks
run on the event loop thread, once per batch: one comparison on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from connectors.base import ClientBackend, Message, TopicPartition, fmt_partitions
from streamcore.core.errors import StreamcoreError
from streamcore.core.logs import BurstLogger

__all__ = ["GAP_READS", "GapCheck", "GapChecks"]

log = logging.getLogger("streamcore.partition")
_burst_log = BurstLogger(log)

# How often a task reads passed-over offsets again before it takes them as a real gap.
GAP_READS = 5


class GapCheck:
    """The gap check of one partition. ``read_again(tp, offset)`` seeks the partition back
    (the worker's fetch goes on from there)."""

    def __init__(self, tp: TopicPartition,
                 read_again: Callable[[TopicPartition, int], None]) -> None:
        self.tp = tp
        self._read_again = read_again
        # The offset reading began at (the group's commit), once the worker has read it.
        self.start: int | None = None
        self._gap_at = -1  # the first offset passed over, as last read again
        self._gap_reads = 0  # how often it was read again
        self._gap_fetch: float | None = None  # the fetch that passed over it (handed_at)

    def take(self, offered: int, handed_at: float, msgs: list[Message]) -> list[Message]:
        """The records of msgs to take after offset offered (-1: none taken yet): all of
        them unless offsets are skipped before or within the batch."""
        first, last = msgs[0].offset(), msgs[-1].offset()
        if offered < 0 and self.start is not None and first is not None and \
                first > self.start:
            offered = self.start - 1  # the first batch: offsets from start passed over
        if first is None or last is None or (
                last - first + 1 == len(msgs) and (offered < 0 or offered == first - 1)):
            return msgs
        offsets = [m.offset() or 0 for m in msgs]  # a fetched record has one
        at = offered + 1 if offered >= 0 else first
        n = 0
        if first == at:  # the gap is within the batch
            n = next(i for i, o in enumerate(offsets) if o != first + i)
            at = first + n
        return msgs[:n] if self._passed_over(handed_at, at, offsets[n]) else msgs

    def _passed_over(self, handed_at: float, at: int, found: int) -> bool:
        """Offsets at to found - 1 are missing: True if they are read again (from at), False
        if taken as a real gap."""
        if at == self._gap_at and handed_at == self._gap_fetch:
            return True  # more of the fetch that passed them over: it is read again too
        if at != self._gap_at:
            self._gap_at, self._gap_reads = at, 0
        if self._gap_reads >= GAP_READS:
            _burst_log.warning(f"gap:{self.tp}", "partition %s[%d]: offsets %d to %d still "
                               "missing after %d reads; taken as a real gap", *self.tp, at,
                               found - 1, GAP_READS)
            return False
        self._gap_reads += 1
        self._gap_fetch = handed_at
        _burst_log.warning(f"gap:{self.tp}", "partition %s[%d]: the fetch passed over "
                           "offsets %d to %d; reading again from %d", *self.tp, at,
                           found - 1, at)
        self._read_again(self.tp, at)
        return True


class GapChecks:
    """The gap checks of a worker's partitions, assignment after assignment. ``without_gaps``
    tells the topics whose offsets have no gaps; ``seek`` moves the group member's reading
    of a partition back (a read again)."""

    def __init__(self, without_gaps: Callable[[str], bool], clients: ClientBackend,
                 group: str, seek: Callable[[dict[TopicPartition, int]], None]) -> None:
        self._without_gaps = without_gaps
        self._clients = clients
        self._group = group
        self._seek = seek
        self.reads_again = 0  # a fetch passed records over; they were read again

    def check(self, tp: TopicPartition) -> GapCheck | None:
        """A new check for tp if its topic has no gaps (None: not checked)."""
        return GapCheck(tp, self._read_again) if self._without_gaps(tp[0]) else None

    async def set_starts(self, checks: list[GapCheck]) -> None:
        """Set where the reading of each checked partition began, at its assignment (the
        group's committed offset): one offset fetch, on a worker thread. No record of these
        partitions is fetched before the assignment's listener returns (the member's
        contract), so each start is known before the first batch. No commit, or a failed
        lookup: the first batch is not checked."""
        starts = await self.committed_starts([c.tp for c in checks])
        for check in checks:
            check.start = starts.get(check.tp)

    async def committed_starts(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offset of each of parts that has one."""
        if not parts:
            return {}
        try:
            done = await asyncio.get_running_loop().run_in_executor(
                None, self._clients.committed_offsets, self._group, parts)
        except (StreamcoreError, NotImplementedError) as exc:
            log.warning("the first fetch of %s is not checked for passed-over records: %s",
                        fmt_partitions(parts), exc)
            return {}
        return {tp: offset for tp, offset in done.items() if offset >= 0}

    def _read_again(self, tp: TopicPartition, offset: int) -> None:
        self.reads_again += 1
        self._seek({tp: offset})
