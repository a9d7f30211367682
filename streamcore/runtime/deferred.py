"""A partition task's producer in epoch mode: the transactional producer, except while the
previous epoch's transaction commits.

Committing a transaction takes 20-40 ms on the local broker, and a Kafka producer has one
transaction at a time: nothing can be produced between ``commit_transaction`` and the next
``begin_transaction``. Rather than stop for that long, the tasks go on processing the next
epoch's records and their outputs wait here, in order, to be handed to the producer as soon
as the next transaction has begun (streamcore.runtime.epochs). Their offsets are not in the
committing epoch (its offsets were taken before), so an abort of that epoch rewinds them
with everything else and the records waiting here are dropped.
"""

from __future__ import annotations

from connectors.base import DeliveryCallback, Outbox, ProducerBackend

__all__ = ["DeferringProducer"]

class DeferringProducer(ProducerBackend):
    """Produces through ``inner``, or keeps the records while ``deferring`` (and behind any
    kept record, so that order holds). Past ``limit`` kept records it refuses with
    ``BufferError``, as a full queue does: the task then waits for room (backpressure).
    Event loop thread only.

    ``produce`` is ``inner.produce`` itself while nothing is deferred or kept (no Python frame
    of ours per output), and :meth:`_keep` otherwise; it is re-pointed whenever
    ``deferring`` is set or :meth:`release` runs. Callers look ``produce`` up again after
    every await: the coordinator changes it only between two of theirs."""

    def __init__(self, inner: ProducerBackend, *, deferring: bool = False,
                 limit: int = 20_000) -> None:
        self.inner = inner
        self.transactional = inner.transactional
        self.limit = limit
        self._outbox = Outbox(inner)  # its held records are the kept ones; retry hands over
        self.kept = self._outbox.held
        self._deferring = False
        self.deferring = deferring  # points produce

    @property
    def deferring(self) -> bool:
        return self._deferring

    @deferring.setter
    def deferring(self, on: bool) -> None:
        self._deferring = on
        self._point()

    def _point(self) -> None:
        self.produce = (self._keep if self._deferring or self.kept  # type: ignore[method-assign]
                        else self.inner.produce)

    def produce(self, topic: str, value: bytes | None, key: bytes | None, partition: int,
                on_delivery: DeliveryCallback, reserved: None, timestamp: int,
                headers: list[tuple[str, bytes]] | None = None, /) -> None:
        # Replaced per instance (_point); kept for the interface.
        if self._deferring or self.kept:
            self._keep(topic, value, key, partition, on_delivery, reserved, timestamp, headers)
            return
        self.inner.produce(topic, value, key, partition, on_delivery, None, timestamp,
                           headers)

    def _keep(self, topic: str, value: bytes | None, key: bytes | None, partition: int,
              on_delivery: DeliveryCallback, reserved: None, timestamp: int,
              headers: list[tuple[str, bytes]] | None = None, /) -> None:
        if len(self.kept) >= self.limit:
            raise BufferError("waiting for the next transaction")
        self.kept.append((topic, value, key, partition, on_delivery, timestamp, headers))

    def release(self) -> bool:
        """Hand kept records to the producer while it takes them; True when none is left."""
        try:
            return self._outbox.retry()
        finally:
            self._point()

    def delivery_error(self, topic: str, exc: Exception) -> Exception:
        return self.inner.delivery_error(topic, exc)

    def explain_failure(self, failure: Exception) -> Exception:
        return self.inner.explain_failure(failure)

    def poll(self, timeout: float) -> int:
        return self.inner.poll(timeout)

    def in_flight(self) -> int:
        return self.inner.in_flight() + len(self.kept)

    def close(self) -> None:
        """The worker closes the producer it shares."""
