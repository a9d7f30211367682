"""Reading partitions to their end, outside any consumer group: restoring a store from its
changelog, loading a global table, reading the transactional-id owners. Blocking; one
:class:`~connectors.base.PartitionReader` per caller.

The local broker under-reports a partition's high watermark (README, the local broker's
defects), so its end is found by a quiet fetch there, and only there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from connectors.base import Message, PartitionReader, TopicPartition

__all__ = ["advance_positions", "read_to_end"]

log = logging.getLogger("streamcore.kafka")


def advance_positions(position: dict[TopicPartition, int], msgs: list[Message]) -> None:
    """Set each partition's position past the last of msgs read from it."""
    for m in msgs:
        position[(m.topic(), m.partition())] = m.offset() + 1  # type: ignore[index,operator]


def read_to_end(reader: PartitionReader, starts: dict[TopicPartition, int],
                apply: Callable[[list[Message]], None], *, batch: int = 10_000,
                quiet: float = 0.3, stop: Callable[[], bool] = lambda: False,
                ) -> dict[TopicPartition, int]:
    """Read every partition in starts to its true end, handing each fetched batch to apply;
    return the next offset per partition.

    A broker that reports its high watermark right (Kafka) is trusted: a partition whose
    position is exactly at it is at its end, with no further wait. The local broker
    under-reports it when the last batch held several records, which shows as a position
    *past* the watermark (batches are fetched whole): only then is a partition at its end
    when a further fetch of ``quiet`` seconds returns nothing for it.
    """
    position = dict(starts)
    reader.assign(starts)
    if not starts:
        return position
    ends = {tp: reader.end_offset(tp) for tp in position}
    warned = False
    while not stop():
        if all(position[tp] == ends[tp] for tp in position):
            return position  # exactly at a watermark the broker reported right
        msgs = reader.read(batch, quiet)
        if msgs:
            apply(msgs)
            advance_positions(position, msgs)
            if any(position[tp] < ends[tp] for tp in position):
                continue  # short of the (lower-bound) end: read on
            ends = {tp: reader.end_offset(tp) for tp in position}
            continue
        # A quiet fetch: done if every partition is at or past its (lower-bound) end. The
        # client's position counts the transaction markers after the last record.
        _to_client_positions(reader, position)
        ends = {tp: reader.end_offset(tp) for tp in position}
        if all(position[tp] >= ends[tp] for tp in position):
            return position
        if not warned:
            warned = True
            log.info("reading %s to its end waits for an open transaction (its producer "
                     "must commit, abort or be replaced)", ", ".join(
                         f"{t}[{p}]" for (t, p) in position if position[(t, p)] < ends[(t, p)]))
    return position


def _to_client_positions(reader: PartitionReader, position: dict[TopicPartition, int]) -> None:
    for tp in position:
        pos = reader.position(tp)
        if pos is not None and pos > position[tp]:
            position[tp] = pos
