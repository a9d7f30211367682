"""Which input offsets are *done* (DESIGN.md section 4, invariant 1).

Records are processed in batches, in offset order. A :class:`Batch` counts the outputs it
has handed to the producer and not yet seen acknowledged (``pending``), and is ``sealed``
once every record in it has passed through the whole chain (``map_async`` work included).
A batch is done when sealed with nothing pending; the done offset of a partition is the
last offset of the longest run of done batches from the front. A failed delivery marks the
tracker failed and its batch never becomes done, so nothing at or after it is committed.

Counting per batch instead of per record keeps the hot path to one integer increment per
output. All of this runs on the event loop thread (delivery callbacks run inside
``producer.poll`` there), so no locks.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from streamcore.core.errors import DeliveryFailed

__all__ = ["Batch", "OffsetTracker"]


class Batch:
    __slots__ = ("ack", "handed_at", "last_offset", "pending", "sealed", "tracker")

    def __init__(self, tracker: OffsetTracker, handed_at: float = 0.0) -> None:
        self.tracker = tracker
        self.handed_at = handed_at  # perf_counter() when its records reached the worker
        self.pending = 0
        self.sealed = False
        self.last_offset = -1
        self.ack = self._ack  # bound once: it is passed with every produced record

    def _ack(self, err: Any, msg: Any) -> None:
        if err is not None:
            if self.tracker.failure is None:
                topic = msg.topic() if msg is not None else "?"
                self.tracker.failure = DeliveryFailed(topic, str(err))
            return  # never decremented: this batch and all after it stay not done
        self.pending -= 1

    def seal(self, last_offset: int) -> None:
        self.last_offset = last_offset
        self.sealed = True


class OffsetTracker:
    """The batches of one partition, oldest first."""

    def __init__(self) -> None:
        self._batches: deque[Batch] = deque()
        self.failure: DeliveryFailed | None = None
        self.done_offset = -1  # highest offset known done

    def open(self, handed_at: float = 0.0) -> Batch:
        b = Batch(self, handed_at)
        self._batches.append(b)
        return b

    def oldest_pending(self) -> float | None:
        """When the oldest batch not yet done reached the worker (None: all done): how long
        its records have waited to be committable is the age of the oldest uncommitted one."""
        q = self._batches
        return q[0].handed_at if q else None

    def advance(self) -> int:
        """Pop done batches from the front; return the (possibly new) done offset."""
        q = self._batches
        while q and q[0].sealed and q[0].pending == 0:
            self.done_offset = q.popleft().last_offset
        return self.done_offset

    def unacknowledged(self) -> list[Batch]:
        """The batches with outputs not yet acknowledged."""
        return [b for b in self._batches if b.pending]

    def all_sealed(self) -> bool:
        """Every record handed over has passed through the whole chain (acknowledgements of
        its outputs may still be due)."""
        return all(b.sealed for b in self._batches)

    def all_done(self) -> bool:
        self.advance()
        return not self._batches

    def discard_open(self) -> None:
        """Forget batches that were not sealed (abandoned work is reprocessed elsewhere)."""
        self.advance()
        while self._batches and not self._batches[-1].sealed:
            self._batches.pop()
