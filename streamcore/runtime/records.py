"""How a partition task takes a fetched batch through its chain: the contract
(:class:`ChainRunner`) and record-at-a-time execution (:class:`RecordRunner`,
``WorkerConfig(batch_execution=False)``: one record and one call of the chain at a time).

:class:`streamcore.runtime.batches.BatchRunner`, the default, fuses the stateless steps over
the whole batch. Both are owned by the partition task and run on the event loop only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from connectors.base import Message
from streamcore.runtime.context import ZERO_TIME_ON_KAFKA, Emit, PartitionContext, StepFailed
from streamcore.runtime.tracking import Batch

__all__ = ["ChainRunner", "RecordRunner"]

C = TypeVar("C")  # the chain a runner takes batches through


class ChainRunner(ABC, Generic[C]):
    """Takes a partition task's fetched batches through its chain.

    Contract of :meth:`take`: the records are processed in offset order; a record whose step
    failed gets its error policy (``failed``) at its place, and the records after it go on; a
    fatal error seals the batch before the record that raised it (nothing from it on is done)
    and propagates. It awaits only for room in the producer; when the task is stopping
    (``stopping()``) meanwhile, the rest of the batch may be left to the next owner."""

    def __init__(self, chain: C, ctx: PartitionContext,
                 failed: Callable[[Message, StepFailed], None],
                 stopping: Callable[[], bool], *, internal: bool = False) -> None:
        self.chain = chain
        self.ctx = ctx
        self.internal = internal  # reads a repartition topic (see ZERO_TIME_ON_KAFKA)
        self._failed = failed  # the record's error policy (raises under "fail")
        self._stopping = stopping  # the task is stopping: the rest of a batch may be left

    @abstractmethod
    async def take(self, msgs: list[Message], batch: Batch,
                   vde: Callable[[bytes], Any], kde: Callable[[bytes], Any] | None,
                   ts_of: Callable[[Any], int] | None) -> int:
        """msgs through the chain; returns how many of them were taken (fewer only when
        the task stops while waiting for room in the producer)."""

    async def _unblocked(self, batch: Batch) -> bool:
        """Wait for room in the producer; True if the task is stopping meanwhile."""
        await self.ctx.wait_unblocked()
        self.ctx.batch = batch
        return self._stopping()


class RecordRunner(ChainRunner[Emit]):
    """Record by record: decode, the compiled chain, the record's error policy if a step
    failed."""

    async def take(self, msgs: list[Message], batch: Batch,
                   vde: Callable[[bytes], Any], kde: Callable[[bytes], Any] | None,
                   ts_of: Callable[[Any], int] | None) -> int:
        ctx = self.ctx
        chain = self.chain
        for n, m in enumerate(msgs, 1):
            ctx.msg = m
            # try costs nothing until something raises (Python 3.11).
            try:
                raw = m.value()
                try:
                    value = None if raw is None else vde(raw)
                    key = m.key()
                    if kde is not None and key is not None:
                        key = kde(key)
                except Exception as exc:
                    raise StepFailed("deserialize", None, exc) from exc
                if ts_of is None:
                    ts = m.timestamp()[1]
                    if ts == ZERO_TIME_ON_KAFKA and self.internal:
                        ts = 0
                else:
                    try:
                        ts = ts_of(value)
                    except Exception as exc:
                        raise StepFailed("timestamp", None, exc) from exc
                chain(key, value, ts)
            except StepFailed as failed:
                self._failed(m, failed)
            except Exception:
                # Fatal (a delivery the client refused): nothing from this record on is
                # done; everything before it is, once its outputs are acknowledged.
                batch.seal((m.offset() or 0) - 1)
                raise
            if ctx.blocked and await self._unblocked(batch):
                return n  # stopping: the rest of this batch is the next owner's
        return len(msgs)
