"""What happens to a record whose decoding or user function raised: the step's error policy
(``fail``, ``skip``, ``dead_letter``), applied at the record's place by its partition task.

``fail`` seals the batch before the record (its offset is never committed) and raises;
``skip`` counts and logs; ``dead_letter`` also writes the record's original bytes to the
job's dead-letter topic with the reason in headers, as an output of the record: its offset
is done only once that write is acknowledged, so nothing is lost.
"""

from __future__ import annotations

import logging
import traceback

from connectors.base import Message
from streamcore.core.errors import DeserializationError, UserFunctionError
from streamcore.core.logs import BurstLogger
from streamcore.runtime.context import PartitionContext, StepFailed

__all__ = ["RecordErrors"]

log = logging.getLogger("streamcore.partition")
_burst_log = BurstLogger(log)


class RecordErrors:
    """One partition task's error policies: counts go to the worker's shared table."""

    def __init__(self, ctx: PartitionContext, *, job: str, default_policy: str,
                 dlq_topic: str, errors: dict[tuple[str, str, str], int]) -> None:
        self.ctx = ctx
        self.job = job
        self.default_policy = default_policy
        self.dlq_topic = dlq_topic
        self.errors = errors  # (kind, policy, step) -> count, shared by the worker's tasks
        self.dlq_records = 0

    def failed(self, m: Message, failed: StepFailed) -> None:
        """Apply the step's error policy to a record whose processing raised."""
        ctx = self.ctx
        kind = "deserialization" if failed.step == "deserialize" else "user_function"
        policy = failed.policy or self.default_policy
        key = (kind, policy, failed.step)
        self.errors[key] = self.errors.get(key, 0) + 1
        topic, partition, offset = ctx.topic, ctx.partition, m.offset() or 0
        if policy == "fail":
            assert ctx.batch is not None
            ctx.batch.seal(offset - 1)  # the failing offset itself is never committed
            cls = DeserializationError if kind == "deserialization" else UserFunctionError
            raise cls(f"{failed} (policy fail)", topic=topic, partition=partition,
                      offset=offset) from failed.exc
        _burst_log.warning(
            f"{kind}:{failed.step}", "%s at %s[%d]@%d: %s (policy %s)", kind, topic,
            partition, offset, failed, policy)
        if policy == "dead_letter":
            self._dead_letter(m, kind, failed)

    def _dead_letter(self, m: Message, kind: str, failed: StepFailed) -> None:
        ctx = self.ctx
        batch = ctx.batch
        assert batch is not None
        headers = [*(m.headers() or []),
                   ("streamcore.error.kind", kind.encode()),
                   ("streamcore.error.step", failed.step.encode()),
                   ("streamcore.error.exception", type(failed.exc).__name__.encode()),
                   ("streamcore.error.message", str(failed.exc)[:2000].encode()),
                   ("streamcore.error.traceback", _last_frames(failed.exc).encode()),
                   ("streamcore.source.topic", ctx.topic.encode()),
                   ("streamcore.source.partition", str(ctx.partition).encode()),
                   ("streamcore.source.offset", str(m.offset()).encode()),
                   ("streamcore.job", self.job.encode())]
        batch.pending += 1
        ctx.outbox.send(self.dlq_topic, m.value(), m.key(), -1, batch.ack, m.timestamp()[1],
                        headers)
        if ctx.outbox.held:
            ctx.blocked = True
        self.dlq_records += 1


def _last_frames(exc: BaseException, n: int = 3) -> str:
    """The last n frames of exc's traceback (where in the user's code it raised)."""
    frames = traceback.extract_tb(exc.__traceback__)[-n:]
    return "".join(traceback.format_list(frames))[:4000]
