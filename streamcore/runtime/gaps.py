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

All of it runs on the event loop thread, once per batch: one comparison on the hot path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from connectors.base import Message, TopicPartition
from streamcore.core.logs import BurstLogger

__all__ = ["GAP_READS", "GapCheck"]

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
