"""The partition task's intake rules and the backend's fencing signal (pure logic)."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError
from confluent_kafka import TopicPartition as CTP

from connectors.confluent import ConfluentConsumer, consumer_settings
from streamcore import Job, KafkaSink, KafkaSource
from streamcore.plan.physical import plan
from streamcore.runtime.partition import PartitionTask
from streamcore.runtime.progress import LatencyHistogram
from tests.unit.test_api import _RecordingProducer


class _Msg:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def offset(self) -> int:
        return self._offset


def _task() -> PartitionTask:
    job = Job("j")
    job.stream(KafkaSource("in")).to(KafkaSink("out"))
    p = plan(job.build())
    return PartitionTask(("in", 0), p, p.source_for_topic("in"), _RecordingProducer(),
                         inbox_high=100, inbox_low=10, pause=lambda tp: None,
                         resume=lambda tp: None, latency=LatencyHistogram(),
                         e2e=LatencyHistogram(), errors={})


def test_a_batch_not_after_the_last_one_taken_is_dropped() -> None:
    """A stale fetch (from before a revoke) must never be processed out of order."""
    t = _task()
    t.state = t.state.RUNNING
    batches: list[Any] = [[_Msg(0), _Msg(1)], [_Msg(2)], [_Msg(1), _Msg(2)], [_Msg(3)]]
    for b in batches:
        t.offer(0.0, b)
    assert [[m.offset() for m in b] for _, b in t._inbox] == [[0, 1], [2], [3]]
    assert t.queued == 4


def test_a_fenced_task_drops_its_inbox_and_flushes_nothing() -> None:
    t = _task()
    t.state = t.state.RUNNING
    t.offer(0.0, [_Msg(0), _Msg(1)])  # type: ignore[list-item]
    t.fence()
    assert t.fenced and t.queued == 0 and not t._inbox
    assert t.state.value == "SUSPENDED"


def test_a_commit_refused_for_the_generation_reports_the_partitions_fenced() -> None:
    c = ConfluentConsumer(consumer_settings("127.0.0.1:1", "g", {}, {}))
    try:
        got: list[tuple[str, int]] = []
        c._on_fenced = got.extend
        c._on_commit(KafkaError(KafkaError.REBALANCE_IN_PROGRESS), [CTP("t", 0, 5)])
        assert got == []  # a rebalance in progress is not a loss: the callbacks handle it
        c._on_commit(KafkaError(KafkaError.UNKNOWN_MEMBER_ID), [CTP("t", 0, 5)])
        c._on_commit(KafkaError(KafkaError.ILLEGAL_GENERATION), [CTP("t", 1, 7)])
        assert got == [("t", 0), ("t", 1)]
    finally:
        c.close()
