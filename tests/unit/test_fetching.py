"""The fetcher's dispatch (streamcore.runtime.fetching): each partition's run of a fetch goes
to its task in fetch order, whole, and nothing goes to a partition without a task."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from connectors.memory import MemoryMessage
from streamcore.core.clock import ManualClock
from streamcore.runtime.fetching import Fetcher


def _msg(topic: str, partition: int, offset: int) -> MemoryMessage:
    return MemoryMessage(topic, partition, offset, None, b"{}", 0, None)


class _Task:
    def __init__(self) -> None:
        self.lists: list[list[Any]] = []  # the lists offered, as they came

    def offer(self, handed_at: float, msgs: list[Any]) -> None:
        self.lists.append(msgs)

    @property
    def offered(self) -> list[list[tuple[str, int, int]]]:
        return [[(m.topic(), m.partition(), m.offset()) for m in run] for run in self.lists]


def _dispatch(topics: list[str], msgs: list[MemoryMessage],
              tasks: dict[tuple[str, int], _Task]) -> Fetcher:
    f = Fetcher(cast(Any, None), cast(Any, None), cast(Any, tasks), topics=topics,
                max_records=100, timeout=0.1, clock=ManualClock(0),
                in_group=lambda: True, stopping=asyncio.Event())
    f._dispatch(cast(Any, msgs), cast(Any, tasks), 0.0)
    return f


@pytest.mark.parametrize("topics", [["in"], ["in", "other"]])
def test_each_run_of_a_fetch_goes_to_its_partitions_task_in_order(topics: list[str]) -> None:
    """Runs of one partition may come back (0, 0, 1, 0, 2): each run is offered on its own, in
    fetch order; records of a partition without a task (2: another member's) are dropped but
    counted as fetched. With one topic the split is by partition alone, else by both."""
    parts = [0, 0, 1, 1, 1, 0, 2, 2, 0]
    msgs = [_msg("in", p, i) for i, p in enumerate(parts)]
    tasks = {("in", 0): _Task(), ("in", 1): _Task(), ("other", 2): _Task()}
    f = _dispatch(topics, msgs, tasks)
    assert tasks[("in", 0)].offered == [[("in", 0, 0), ("in", 0, 1)], [("in", 0, 5)],
                                         [("in", 0, 8)]]
    assert tasks[("in", 1)].offered == [[("in", 1, 2), ("in", 1, 3), ("in", 1, 4)]]
    assert tasks[("other", 2)].offered == []
    assert f.records_in == len(msgs)


def test_a_fetch_of_one_partition_is_offered_whole() -> None:
    """One run that is the whole fetch: the fetched list itself is offered, not a copy."""
    msgs = [_msg("in", 3, i) for i in range(5)]
    tasks = {("in", 3): _Task()}
    _dispatch(["in"], msgs, tasks)
    assert tasks[("in", 3)].offered == [[("in", 3, i) for i in range(5)]]
    assert tasks[("in", 3)].lists[0] is msgs
