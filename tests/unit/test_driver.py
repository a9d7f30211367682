"""streamcore.testing.TestDriver: the real worker on the in-memory backend with a manual
clock. These tests pin the driver's own contract (settling, time, commits, crash, failure
injection); the engine's guarantees are tested on it elsewhere and on a broker."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from connectors.memory import murmur2_partition
from streamcore import JSON, STR, DeliveryFailed, Job, KafkaSink, KafkaSource, WorkerConfig
from streamcore.core.errors import UserFunctionError
from streamcore.testing import TestDriver

T0 = 1_700_000_000_000


def _totals_job(name: str = "totals", **config: Any) -> Job:
    job = Job(name, config=WorkerConfig(commit_interval="300ms", **config))
    (job.stream(KafkaSource("in", value=JSON))
        .key_by(lambda v: v["user"])
        .aggregate(lambda: 0, lambda total, v: total + v["amount"], name="per-user")
        .to_stream()
        .to(KafkaSink("out", key=STR, value=JSON)))
    return job


def test_records_sent_are_processed_before_send_returns() -> None:
    with TestDriver(_totals_job(), partitions=2) as d:
        d.send("in", {"user": "a", "amount": 3}, key="a")
        d.send("in", {"user": "b", "amount": 4}, key="b")
        d.send("in", {"user": "a", "amount": 5}, key="a")
        rows = d.read("out")
        assert [(r.key, r.value) for r in rows if r.key == "a"] == [("a", 3), ("a", 8)]
        assert [(r.key, r.value) for r in rows if r.key == "b"] == [("b", 4)]
        assert d.read("out") == []  # only what was written since the last read
        assert dict(d.store("per-user")) == {"a": 8, "b": 4}
        assert d.store("per-user")["a"] == 8
        # Keys land on the partitions the Java client's partitioner gives them.
        for r in rows:
            assert r.partition == murmur2_partition(r.key.encode(), 2)


def test_time_is_manual_and_commits_come_with_it() -> None:
    with TestDriver(_totals_job(), start_ms=T0) as d:
        d.send("in", {"user": "a", "amount": 1})
        d.send("in", {"user": "a", "amount": 2}, timestamp=T0 - 5000)
        assert d.committed("in") == {}  # the commit interval has not passed
        d.advance_time("299ms")
        assert d.committed("in") == {}
        d.advance_time("1s")  # three intervals: flush, then the offsets behind it
        assert d.committed("in") == {0: 2}
        out = d.read("out")
        # Record timestamps: the manual clock's now by default, else the one given.
        assert [r.timestamp for r in out] == [T0, T0 - 5000]


def test_crash_after_a_commit_restores_exact_state() -> None:
    with TestDriver(_totals_job(), partitions=2) as d:
        d.send_many("in", [("a", {"user": "a", "amount": i}) for i in range(1, 5)])
        d.commit()
        d.crash()
        assert dict(d.store("per-user")) == {"a": 10}  # restored from the changelog
        d.send("in", {"user": "a", "amount": 5}, key="a")
        assert [r.value for r in d.read("out")][-1] == 15


def test_crash_before_a_commit_reprocesses_at_least_once() -> None:
    """Continuous mode is at-least-once: a record processed but not committed before a
    crash is processed again, and an update it made is applied again (README)."""
    with TestDriver(_totals_job()) as d:
        d.send("in", {"user": "a", "amount": 1}, key="a")
        d.commit()
        d.send("in", {"user": "a", "amount": 10}, key="a")
        d.crash()
        assert d.store("per-user")["a"] == 21  # the second record was applied twice
        assert d.committed("in") == {0: 1}
        # 11 twice: the repartitioned record is read again after the crash, and then the
        # input record, processed again, is repartitioned a second time (+10 again: 21).
        assert [r.value for r in d.read("out")] == [1, 11, 11, 21]


@pytest.mark.parametrize("trigger", [None, "100ms"], ids=["continuous", "epochs"])
def test_held_acknowledgements_hold_outputs_and_commits(trigger: str | None) -> None:
    """In epoch mode too: before, an epoch waiting for held acknowledgements kept the driver
    from settling, so the first step after hold_acks() timed out."""
    job = Job("copy", config=WorkerConfig(commit_interval="100ms"))
    job.stream(KafkaSource("in", value=JSON)).map(lambda v: {**v, "seen": True}).to(
        KafkaSink("out", value=JSON))
    with TestDriver(job, trigger=trigger) as d:
        d.hold_acks()
        d.send_many("in", [{"i": i} for i in range(3)])
        d.advance_time("1s")
        assert d.read("out") == [] and d.committed("in") == {}
        d.send("in", {"i": 3})  # taken in while the epoch waits, committed with the next
        assert d.read("out") == [] and d.committed("in") == {}
        d.hold_acks(False)
        d.advance_time("1s")
        assert [r.value["i"] for r in d.read("out")] == [0, 1, 2, 3]
        assert d.committed("in") == {0: 4}


def test_holding_fewer_topics_lets_the_others_go_in_order() -> None:
    """Before: records held by hold_acks() stayed held after hold_acks(topics=[...]) named
    other topics, and later records of their partition overtook them (a reordering no
    Kafka partition makes; the random histories saw late records from it)."""
    job = Job("two-sinks", config=WorkerConfig(commit_interval="100ms"))
    s = job.stream(KafkaSource("in", value=JSON))
    s.to(KafkaSink("a", value=JSON))
    s.to(KafkaSink("b", value=JSON))
    with TestDriver(job) as d:
        d.hold_acks()
        d.send("in", {"i": 0})
        d.hold_acks(topics=["a"])  # now only a's leader is slow
        assert [r.value["i"] for r in d.read("b")] == [0]
        d.send("in", {"i": 1})
        assert [r.value["i"] for r in d.read("b")] == [1] and d.read("a") == []
        d.hold_acks(False)
        assert [r.value["i"] for r in d.read("a")] == [0, 1]


def test_failed_acknowledgements_stop_the_job_and_commit_nothing_past_them() -> None:
    job = Job("copy-fail", config=WorkerConfig(commit_interval="100ms"))
    job.stream(KafkaSource("in", value=JSON)).to(KafkaSink("out", value=JSON))
    with TestDriver(job) as d:
        d.send("in", {"i": 0})
        d.advance_time("1s")
        assert d.committed("in") == {0: 1}
        d.fail_acks("broker says no")
        d.send("in", {"i": 1})
        d.advance_time("1s")
        err = d.exception()
        assert isinstance(err, DeliveryFailed) and "broker says no" in str(err)
        assert d.committed("in") == {0: 1}
        d.fail_acks(None)
        d.crash()  # a restart reads the failed record again: nothing was lost
        assert [r.value["i"] for r in d.read("out")] == [0, 1]


def test_a_failed_commit_is_sent_again_when_nothing_more_arrives() -> None:
    """Before: offsets were marked committed when the commit was queued, so a failed
    asynchronous commit was sent again only if more records became done; at the end of a
    burst the group's offsets stayed behind (duplicates after a restart)."""
    job = Job("refused", config=WorkerConfig(commit_interval="100ms"))
    job.stream(KafkaSource("in", value=JSON)).to(KafkaSink("out", value=JSON))
    with TestDriver(job) as d:
        d.fail_commits()
        d.send_many("in", [{"i": i} for i in range(5)])
        d.advance_time("1s")
        assert d.committed("in") == {}
        d.fail_commits(False)
        d.advance_time("1s")  # no new record: the failed commit alone must be resent
        assert d.committed("in") == {0: 5}


def test_a_join_sees_every_table_record_sent_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's follower thread is slowed down (as a busy machine would): the driver must
    still wait for it before the stream record is processed."""
    import time

    from connectors.memory import MemoryReader

    read = MemoryReader.read

    def slow_read(self: MemoryReader, max_records: int, timeout: float) -> Any:
        time.sleep(0.02)
        return read(self, max_records, timeout)

    monkeypatch.setattr(MemoryReader, "read", slow_read)
    job = Job("enrich")
    users = job.table("users", key=STR, value=JSON)
    (job.stream(KafkaSource("clicks", value=JSON))
        .key_by(lambda v: v["user"])
        .join(users, lambda c, u: {**c, "name": u["name"]})
        .to(KafkaSink("out", key=STR, value=JSON)))
    with TestDriver(job, partitions=2) as d:
        for i in range(5):
            d.send("users", {"name": f"Ann {i}"}, key="a")
            d.send("clicks", {"user": "a", "page": i}, key="a")
        assert [r.value["name"] for r in d.read("out")] == [f"Ann {i}" for i in range(5)]


def test_bad_records_go_to_the_dead_letter_topic() -> None:
    job = Job("dlq", config=WorkerConfig())
    (job.stream(KafkaSource("in", value=JSON))
        .map(lambda v: {"inverse": 1 / v["x"]}, name="invert", on_error="dead_letter")
        .to(KafkaSink("out", value=JSON)))
    with TestDriver(job) as d:
        d.send_many("in", [{"x": 2}, {"x": 0}, {"x": 4}])
        assert [r.value for r in d.read("out")] == [{"inverse": 0.5}, {"inverse": 0.25}]
        (dead,) = d.read(job.dlq_topic)
        headers = dict(dead.headers)
        assert headers["streamcore.error.exception"] == b"ZeroDivisionError"
        assert headers["streamcore.error.step"] == b"map(invert)"
        assert dead.value == b'{"x":0}'  # the input record's bytes, as they came


def test_a_topic_the_job_does_not_read_is_refused() -> None:
    with TestDriver(_totals_job()) as d, pytest.raises(KeyError, match="not a topic"):
        d.send("nope", {"user": "a", "amount": 1})


def test_a_failure_is_seen_however_long_the_worker_takes_to_stop() -> None:
    """The driver used to settle while a failing worker was still shutting down (its tasks
    closed, so it looked idle): d.exception() then said None for a job that had failed
    (the hypothesis test of batch execution; 3 runs in 200 under load). Here leaving the
    group at shutdown takes a few real milliseconds, longer than the driver's idle looks."""
    def refuse(v: dict[str, Any]) -> str:
        if v["n"] == 2:
            raise ValueError("no 2")
        return str(v["n"])

    job = Job("slow-stop", on_error="fail")
    job.stream(KafkaSource("in", key=STR, value=JSON)).key_by(refuse).to(
        KafkaSink("out", key=STR, value=JSON))
    with TestDriver(job) as d:
        member = d.worker.member
        real_close = member.close

        async def slow_close() -> None:  # the tasks are closed by then: nothing looks busy
            for _ in range(3):
                await asyncio.sleep(0.01)
            await real_close()

        member.close = slow_close  # type: ignore[method-assign]
        d.send_many("in", [{"n": 1}, {"n": 2}, {"n": 3}])
        assert isinstance(d.exception(), UserFunctionError), d.exception()


def test_records_sent_right_after_the_start_are_processed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's thread is slow (a busy machine) between the engine's assignment
    callback and setting its fetch positions: the driver must not take the partitions it
    has no position for yet as caught up. Before: the start and the send settled at once,
    and read() found nothing (seen as rare flakes of driver tests on a loaded CI host)."""
    import time

    from connectors.memory import MemoryConsumer

    subscribe = MemoryConsumer.subscribe

    def slow_subscribe(self: MemoryConsumer, topics: Any, *, on_assign: Any,
                       **kw: Any) -> None:
        def assigned(parts: Any) -> None:
            on_assign(parts)
            time.sleep(0.05)  # descheduled before the positions are set

        subscribe(self, topics, on_assign=assigned, **kw)

    monkeypatch.setattr(MemoryConsumer, "subscribe", slow_subscribe)
    job = Job("plain")
    job.stream(KafkaSource("in", value=JSON)).map(lambda v: v).to(
        KafkaSink("out", value=JSON))
    with TestDriver(job, partitions=2) as d:
        d.send_many("in", [{"i": i} for i in range(4)])
        assert sorted(r.value["i"] for r in d.read("out")) == [0, 1, 2, 3]


def test_a_worker_whose_loop_blocked_past_max_poll_takes_no_more_queued_batches() -> None:
    """A step blocks the event loop past max.poll.interval.ms with batches queued in the
    task. The member has left the group meanwhile (the in-memory consumer models it: the
    next serve loses the partitions and joins again), so the partition may be another
    member's: the task must not take the batches queued before. Before: the membership
    loop, resuming first, recorded the serve as if it had just happened, so the engine saw
    no stall, and the task wrote its queued batches as a zombie before the loss came (the
    broker test test_hardening's zombie test failed that way now and then, under load)."""
    stalled: list[int] = []

    def step(v: dict[str, int]) -> dict[str, int]:
        if v["seq"] == 55 and not stalled:
            stalled.append(v["seq"])
            time.sleep(0.5)  # blocks the event loop
        return v

    job = Job("zombie")
    job.stream(KafkaSource("in", value=JSON)).map(step).to(KafkaSink("out", value=JSON))
    config = WorkerConfig(poll_batch=10, consumer={"max.poll.interval.ms": 200})
    with TestDriver(job, config=config) as d:
        d.hold_acks()
        d.limit_queue(1)  # the task waits for room after its first output...
        d.send_many("in", [{"seq": i} for i in range(100)])  # ...the rest is queued in it
        d.limit_queue(None)
        d.hold_acks(False)  # the task goes on through its queue, and stalls at 55
        seen = Counter(r.value["seq"] for r in d.read("out"))
    assert stalled
    assert all(seen[i] >= 1 for i in range(100))  # nothing lost: read again after the join
    twice = sorted(i for i, n in seen.items() if n > 1)
    # Written twice: what the task did before the stall and the rest of its batch (50-59),
    # never a batch it took after.
    assert twice and twice[-1] < 60, twice


def test_a_failed_transaction_refuses_everything_until_it_is_aborted() -> None:
    """The in-memory producer models librdkafka's abortable error state: once a produce
    has found the transaction failed, every produce, offset send and commit is refused
    until the abort, and nothing of that transaction is ever read."""
    from connectors.memory import MemoryCluster, MemoryProducer
    from streamcore.core.errors import TransactionAborted

    cluster = MemoryCluster(lambda: T0)
    cluster.create_topic("out", 1)
    p = MemoryProducer(cluster, "txn-1")
    p.init_transactions(1)

    def send(value: bytes) -> None:
        p.produce("out", value, None, 0, lambda err, msg: None, None, 0, None)

    p.begin_transaction()
    send(b"before")
    p.fail_transaction = True
    refused: list[Callable[[], None]] = [
        lambda: send(b"1"), lambda: send(b"2"),
        lambda: p.send_offsets_to_transaction({("in", 0): 5}, "g", 1),
        lambda: p.commit_transaction(1)]
    for call in refused:
        with pytest.raises(TransactionAborted):
            call()
    p.abort_transaction(1)
    p.begin_transaction()
    send(b"after")
    p.commit_transaction(1)
    assert cluster.read({("out", 0): 0}, set(), 10, 0) == cluster.topics["out"][0][1:]
    assert [m.value() for m in cluster.topics["out"][0][1:]] == [b"after"]


def test_a_graceful_stop_does_not_wait_for_partitions_lost_meanwhile() -> None:
    """The loop blocks past max.poll.interval.ms with a task waiting for room in the
    producer's queue; a graceful stop is asked for. The stop waits for its tasks to finish,
    and meanwhile the partitions are lost (the task is fenced, its batch never finished).
    Before: the stop waited for that task until shutdown_timeout (30 s). Now a task fenced
    meanwhile has nothing more to finish: the stop goes on, and the next worker reads the
    lost records again."""
    job = Job("stop-lost", config=WorkerConfig(commit_interval="300ms",
                                               consumer={"max.poll.interval.ms": 300}))
    job.stream(KafkaSource("in", value=JSON)).to(KafkaSink("out", value=JSON))
    with TestDriver(job, start_ms=T0, timeout=5) as d:
        d.hold_acks()
        d.limit_queue(1)  # one output in flight, the task waits for room for the next
        d.send_many("in", [{"i": i} for i in range(3)])
        time.sleep(0.35)  # no serve of the group past max.poll.interval.ms
        d.restart(release_acks=True)  # before: "the worker did not stop within 5s"
        d.advance_time("1s")
        assert sorted({r.value["i"] for r in d.read("out")}) == [0, 1, 2]
        assert d.committed("in") == {0: 3}
