"""Record-at-a-time execution (``WorkerConfig(batch_execution=False)``): a partition task's
fetched batch through its compiled chain, one record and one call of the chain at a time.

:class:`streamcore.runtime.batches.BatchRunner` is its peer, with the same contract for
``take``; both are owned by the partition task and run on the event loop only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from connectors.base import Message
from streamcore.runtime.context import Emit, PartitionContext, StepFailed
from streamcore.runtime.tracking import Batch

__all__ = ["RecordRunner"]


class RecordRunner:
    """Takes a partition task's fetched batches through its compiled chain, record by
    record: decode, the chain, the record's error policy if a step failed."""

    def __init__(self, chain: Emit, ctx: PartitionContext,
                 failed: Callable[[Message, StepFailed], None],
                 stopping: Callable[[], bool]) -> None:
        self.chain = chain
        self.ctx = ctx
        self._failed = failed  # the record's error policy (raises under "fail")
        self._stopping = stopping  # the task is stopping: the rest of a batch may be left

    async def take(self, msgs: list[Message], batch: Batch,
                   vde: Callable[[bytes], Any], kde: Callable[[bytes], Any] | None,
                   ts_of: Callable[[Any], int] | None) -> int:
        """Each record of msgs through the chain, in order. Returns how many were taken
        (fewer when the task stops while waiting for room in the producer). A fatal error
        seals the batch before the record that raised it (nothing from it on is done) and
        propagates."""
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
            if ctx.blocked:
                await ctx.wait_unblocked()
                ctx.batch = batch
                if self._stopping():
                    return n  # stopping: the rest of this batch is the next owner's
        return len(msgs)
