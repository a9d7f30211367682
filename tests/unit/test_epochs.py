"""Epoch mode's semantics on the test driver (the in-memory backend reads as read_committed):
an epoch's outputs, state and offsets become visible together at its end; an aborted epoch
leaves everything as before it and runs again to the same results; a crash at any point of
an epoch loses nothing and duplicates nothing; once and available_now stop by themselves."""

from __future__ import annotations

import random
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest

from streamcore import (
    JSON,
    STR,
    ConfigError,
    FatalError,
    Job,
    KafkaSink,
    KafkaSource,
    RetriableError,
    WorkerConfig,
    available_now,
    once,
    processing_time,
)
from streamcore.testing import TestDriver

T0 = 1_700_000_000_000


def _totals(name: str = "ep") -> Job:
    """A running total per user: a repartition, a store and a sink."""
    job = Job(name)
    (job.stream(KafkaSource("in", value=JSON))
        .key_by(lambda v: v["user"])
        .aggregate(lambda: 0, lambda t, v: t + v["amount"], name="per-user")
        .to_stream()
        .to(KafkaSink("out", key=STR, value=JSON)))
    return job


def _passthrough(name: str = "pt") -> Job:
    job = Job(name)
    job.stream(KafkaSource("in", value=JSON)).to(KafkaSink("out", value=JSON))
    return job


def _outputs_held_for_room(d: TestDriver, interval: str) -> None:
    """An epoch commits {"i": 0}; then, acknowledgements held and room for one output in the
    producer's queue, records 1 to 3 come: one output is in flight, the next held in the
    task (and the rest wait for it)."""
    d.send("in", {"i": 0})
    d.advance_time(interval)
    d.hold_acks()
    d.limit_queue(1)
    d.send_many("in", [{"i": 1}, {"i": 2}, {"i": 3}])


def test_outputs_and_offsets_become_visible_together_at_the_end_of_an_epoch() -> None:
    with TestDriver(_passthrough(), trigger=processing_time("100ms"), start_ms=T0) as d:
        d.send_many("in", [{"i": i} for i in range(5)])
        assert d.read("out") == [] and d.committed("in") == {}  # the epoch is open
        d.advance_time("99ms")
        assert d.read("out") == [] and d.committed("in") == {}
        d.advance_time("1ms")
        assert [r.value["i"] for r in d.read("out")] == list(range(5))
        assert d.committed("in") == {0: 5}
        report = d.worker.last_progress
        assert report is not None and report["batchId"] == 0 and report["numInputRows"] == 5
        for task in d.worker.tasks.values():  # committed batches are forgotten (no leak)
            assert task.tracker.oldest_pending() is None
        assert report["mode"] == "epoch" and set(report["durationMs"]) >= {"process", "commit"}
        d.advance_time("100ms")  # an epoch with nothing in it commits nothing
        assert d.worker.last_progress["batchId"] == 0  # type: ignore[index]
        d.send("in", {"i": 5})
        d.advance_time("100ms")
        assert [r.value["i"] for r in d.read("out")] == [5]
        assert d.worker.last_progress["batchId"] == 1  # type: ignore[index]


def test_an_epochs_progress_times_it_from_its_own_start() -> None:
    """durationMs and the rates of each epoch's report run from when that epoch began. The
    next epoch begins while this one commits (the overlap); the report used to take that
    moment as this epoch's start, so its process time came out negative and its rate too
    high. A step that sleeps 20 ms (real time) per record gives a lower bound."""
    def slow(v: Any) -> Any:
        time.sleep(0.02)
        return v

    job = Job("slow")
    job.stream(KafkaSource("in", value=JSON)).map(slow).to(KafkaSink("out", value=JSON))
    with TestDriver(job, trigger=processing_time("100ms"), start_ms=T0) as d:
        for batch in range(2):  # the first epoch, then one that began in an overlap
            d.send_many("in", [{"i": i} for i in range(2)])
            d.advance_time("100ms")
            report = d.worker.last_progress
            assert report is not None and report["batchId"] == batch
            took = report["durationMs"]
            assert took["process"] >= 40, took
            assert took["total"] >= took["process"] + took["commit"] - 0.2, took  # rounding
            assert report["processedRowsPerSecond"] <= 2 / 0.04, report


@pytest.mark.parametrize("trigger", [None, processing_time("100ms")])
def test_progress_counts_input_rows_and_stamps_reports_as_spark_does(
        trigger: Any) -> None:
    """numInputRows is Spark's: the records read from the job's sources. A key_by reads its
    records back from a repartition topic, an internal shuffle that counted them again. The
    timestamp is Spark's too: UTC, and it says so."""
    kw = {} if trigger is None else {"trigger": trigger}
    with TestDriver(_totals(), partitions=2, start_ms=T0, **kw) as d:
        reports: dict[int, dict[str, Any]] = {}
        d.send_many("in", [{"user": u, "amount": 1} for u in "abcab"])
        for _ in range(4):  # epoch mode: the input's epoch, then the repartition's
            d.advance_time("10s" if trigger is None else "100ms")  # one report each
            if (report := d.worker.last_progress) is not None:
                reports[report["batchId"]] = report
        assert len(d.read("out")) == 5  # every record went through both sub-topologies
        assert sum(r["numInputRows"] for r in reports.values()) == 5, reports
        # Spark's timestamp: ISO 8601 in UTC with milliseconds and the Z that says so.
        for r in reports.values():
            assert datetime.fromisoformat(r["timestamp"]).utcoffset() == timedelta(0), r


def test_an_aborted_epoch_leaves_state_and_offsets_as_before_and_runs_again() -> None:
    with TestDriver(_totals(), partitions=2, trigger=processing_time("100ms")) as d:
        d.send_many("in", [{"user": u, "amount": 1} for u in "abab"])
        d.advance_time("200ms")  # two epochs: the repartition's records, then the totals
        assert sorted((r.key, r.value) for r in d.read("out")) == \
            [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
        committed, epoch = d.committed("in"), d.worker.last_progress["batchId"]  # type: ignore[index]
        d.send_many("in", [{"user": "a", "amount": 10}])
        d.abort_next_epoch()
        d.advance_time("100ms")
        assert d.committed("in") == committed, "an aborted epoch moved the offsets"
        assert d.read("out") == []
        assert d.store("per-user")["a"] == 2, "an aborted epoch left its state behind"
        assert d.worker.committer.aborts == 1  # type: ignore[attr-defined]
        d.advance_time("300ms")  # the epoch again, then the one after the repartition
        assert [(r.key, r.value) for r in d.read("out")] == [("a", 12)]
        assert d.store("per-user")["a"] == 12
        assert d.worker.last_progress["batchId"] > epoch  # type: ignore[index]
        assert d.exception() is None


def test_an_epoch_that_fails_every_time_stops_the_worker_instead_of_looping() -> None:
    """A transaction that fails the same way at every try (librdkafka makes a record the
    broker refuses for good an abortable error of the transaction, and purges the rest) used
    to be aborted and run again forever: the worker looked alive and committed nothing.
    After a few failures in a row it now stops with a fatal error that names the last one."""
    with TestDriver(_passthrough(), trigger=processing_time("100ms")) as d:
        d.send("in", {"i": 0})
        d.advance_time("100ms")
        assert d.committed("in") == {0: 1}
        d.send("in", {"i": 1})
        d.abort_next_epoch(times=1_000)
        for _ in range(50):
            if d.stopped():
                break
            d.advance_time("100ms")
        err = d.exception()
        assert isinstance(err, FatalError) and not isinstance(err, RetriableError), err
        assert "in a row" in str(err) and "injected" in str(err), err
        assert d.committed("in") == {0: 1}, "a failed epoch committed"
        assert [r.value for r in d.read("out")] == [{"i": 0}]


def test_failures_apart_do_not_add_up_to_a_stop() -> None:
    """Only failures in a row count: an epoch that commits in between starts the count
    again, so a worker that recovers each time runs on."""
    with TestDriver(_passthrough(), trigger=processing_time("100ms")) as d:
        for i in range(12):
            d.send("in", {"i": i})
            d.abort_next_epoch(times=2)
            d.advance_time("300ms")
        assert d.exception() is None and not d.stopped()
        assert sorted(r.value["i"] for r in d.read("out")) == list(range(12))
        assert d.worker.committer.aborts == 24  # type: ignore[attr-defined]


def test_crashes_at_random_points_of_epochs_give_exact_outputs_and_state() -> None:
    rng = random.Random(7)
    sent: Counter[str] = Counter()
    with TestDriver(_totals(), partitions=2, trigger=processing_time("100ms")) as d:
        seq = 0
        for _ in range(10):
            for _ in range(rng.randint(1, 6)):
                user = rng.choice("abcd")
                d.send("in", {"user": user, "amount": 1, "seq": seq})
                sent[user] += 1
                seq += 1
                if rng.random() < 0.5:
                    d.advance_time(f"{rng.randint(1, 150)}ms")
            d.crash()
        d.advance_time("1s")
        outputs = d.read("out")
        assert dict(d.store("per-user")) == dict(sent)
        last = {r.key: r.value for r in outputs}
        assert last == dict(sent)
        # Exactly once: per user, the outputs are 1, 2, ..., n with none twice.
        for user, n in sent.items():
            assert [r.value for r in outputs if r.key == user] == list(range(1, n + 1))


@pytest.mark.parametrize("trigger", [once(), available_now()], ids=["once", "available_now"])
def test_once_and_available_now_stop_by_themselves_with_everything_processed(
        trigger: Any) -> None:
    # Batches of 5 records; an available_now epoch takes batches until it holds 7 or more.
    job = Job("pt", config=WorkerConfig(max_epoch_records=7, poll_batch=5))
    job.stream(KafkaSource("in", value=JSON)).to(KafkaSink("out", value=JSON))
    with TestDriver(job, partitions=2, trigger=trigger) as d:
        d.send_many("in", [{"i": i} for i in range(20)])
        for _ in range(100):
            if d.stopped():
                break
            d.advance_time("100ms")
        assert d.stopped(), "the trigger did not stop the query"
        assert d.exception() is None
        assert sorted(r.value["i"] for r in d.read("out")) == list(range(20))
        assert sum(d.committed("in").values()) == 20
        epochs = d.worker.committer.commits
        if trigger.kind == "once":
            assert epochs == 1
        else:
            assert epochs == 2  # 10 records (two batches of 5), then the other 10


def test_epoch_mode_is_refused_with_a_client_that_has_no_transactions() -> None:
    with pytest.raises(ConfigError, match="client"):
        WorkerConfig(trigger="100ms", client="aiokafka")


def test_steps_with_side_effects_are_named_at_start_as_at_least_once(
        caplog: pytest.LogCaptureFixture) -> None:
    job = Job("fx")
    job.stream(KafkaSource("in", value=JSON)).peek(print, name="audit").to(
        KafkaSink("out", value=JSON))
    with TestDriver(job, trigger=processing_time("100ms")):
        pass
    assert any("at-least-once" in r.message and "audit" in r.message for r in caplog.records)


def _batches_job(calls: list[tuple[int, list[int]]], fail_on: int | None = None) -> Job:
    def write(records: list[Any], epoch_id: int) -> None:
        values = [r.value["i"] for r in records]
        if fail_on is not None and fail_on in values:
            raise RuntimeError("the warehouse is down")
        calls.append((epoch_id, values))

    job = Job("fb")
    job.stream(KafkaSource("in", value=JSON)).foreach_batch(write, name="warehouse")
    return job


def test_foreach_batch_gets_each_epoch_once_and_a_retried_epoch_with_its_id() -> None:
    calls: list[tuple[int, list[int]]] = []
    with TestDriver(_batches_job(calls), trigger=processing_time("100ms")) as d:
        d.send_many("in", [{"i": i} for i in range(3)])
        d.advance_time("100ms")
        d.send_many("in", [{"i": i} for i in range(3, 5)])
        d.abort_next_epoch()
        d.advance_time("100ms")  # fn runs, then the commit fails: the epoch runs again
        d.advance_time("100ms")
        assert d.exception() is None
    assert calls == [(0, [0, 1, 2]), (1, [3, 4]), (1, [3, 4])]


def test_foreach_batch_ids_continue_after_a_restart_and_a_failing_fn_commits_nothing(
        ) -> None:
    calls: list[tuple[int, list[int]]] = []
    with TestDriver(_batches_job(calls, fail_on=7), trigger=processing_time("100ms")) as d:
        d.send_many("in", [{"i": i} for i in range(3)])
        d.advance_time("100ms")
        d.crash()  # a restart: the next epoch id comes from the state directory
        d.send_many("in", [{"i": i} for i in range(3, 5)])
        d.advance_time("100ms")
        assert calls == [(0, [0, 1, 2]), (1, [3, 4])]
        d.send("in", {"i": 7})
        d.advance_time("100ms")
        assert "the warehouse is down" in str(d.exception())
        assert d.committed("in") == {0: 5}, "an epoch whose foreach_batch raised committed"


def test_foreach_batch_is_refused_in_continuous_mode() -> None:
    job = _batches_job([])
    with pytest.raises(ConfigError, match="epoch mode"), TestDriver(job):
        pass


def test_an_epoch_pending_at_a_crash_is_known_committed_or_not_by_the_group_offsets(
        tmp_path: Any) -> None:
    from streamcore.runtime.epochs import EpochLog

    log = EpochLog(tmp_path / ".epoch")
    assert log.next_epoch(lambda parts: {}) == 0  # a first run
    log.pending(4, {("in", 0): 10, ("in", 1): 7})
    # The crash came before the commit: the group still has the older offsets.
    assert log.next_epoch(lambda parts: {("in", 0): 8, ("in", 1): 7}) == 4
    # It came after: the group has the epoch's offsets.
    assert log.next_epoch(lambda parts: {("in", 0): 10, ("in", 1): 7}) == 5
    log.committed(4)
    assert log.next_epoch(lambda parts: {}) == 5


def test_update_state_by_key_gets_all_of_a_keys_values_of_the_epoch_in_one_call() -> None:
    calls: list[tuple[list[int], Any]] = []

    def update(values: list[int], state: Any) -> int:
        calls.append((values, state))
        return (state or 0) + sum(values)

    job = Job("usk")
    (job.stream(KafkaSource("in", key=STR, value=JSON))
        .update_state_by_key(update, name="sums")
        .to_stream()
        .to(KafkaSink("out", key=STR, value=JSON)))
    with TestDriver(job, trigger=processing_time("100ms")) as d:
        d.send_many("in", [("a", 1), ("b", 10), ("a", 2), ("a", 3)])
        d.advance_time("100ms")
        assert sorted(calls) == [([1, 2, 3], None), ([10], None)]
        assert sorted((r.key, r.value) for r in d.read("out")) == [("a", 6), ("b", 10)]
        calls.clear()
        d.send_many("in", [("a", 4)])
        d.abort_next_epoch()
        d.advance_time("100ms")  # aborted: the state and the gathered values are dropped
        d.advance_time("100ms")
        assert calls == [([4], 6), ([4], 6)]  # the same call again in the retried epoch
        assert [(r.key, r.value) for r in d.read("out")] == [("a", 10)]
        assert d.store("sums")["a"] == 10


def test_a_transaction_that_fails_as_the_kept_outputs_reach_it_aborts_the_epoch() -> None:
    """Outputs made while an epoch commits are kept and handed to the next transaction once
    it begins. Before: if that transaction refused them (an abortable error), the worker
    stopped with TransactionAborted. Now that epoch is aborted and runs again, exactly."""
    with TestDriver(_passthrough("kept"), trigger=processing_time("100ms"),
                    start_ms=T0) as d:
        d.hold_acks()
        d.send("in", {"i": 0})
        d.advance_time("100ms")  # the epoch ends and waits for its acknowledgements...
        d.send_many("in", [{"i": 1}, {"i": 2}])  # ...while these are kept for the next
        assert d.read("out") == []
        d.fail_transaction()  # the next transaction refuses the first record it gets
        d.hold_acks(False)
        d.advance_time("300ms")
        assert d.exception() is None, d.exception()
        assert d.worker.committer.aborts == 1  # type: ignore[attr-defined]
        assert [r.value["i"] for r in d.read("out")] == [0, 1, 2]
        assert d.committed("in") == {0: 3}


def test_a_stop_does_not_wait_for_the_epoch_end_that_aborts_a_failed_transaction() -> None:
    """After a produce found the transaction failed, the tasks wait at the closed gate for
    the next epoch end to abort it. Before: a graceful stop waited for those tasks, so it
    waited for that epoch end (here, with the clock still, for ever: the restart timed out).
    """
    with TestDriver(_passthrough("stop-failed"), trigger=processing_time("10s"),
                    start_ms=T0, timeout=5) as d:
        d.send("in", {"i": 0})
        d.fail_transaction()
        d.send("in", {"i": 1})  # the transaction fails under it: the gate closes
        d.send("in", {"i": 2})  # waits at the gate
        d.restart()  # the final epoch end aborts; the restart reads everything again
        d.advance_time("10s")
        assert [r.value["i"] for r in d.read("out")] == [0, 1, 2]


@pytest.mark.parametrize("acks", ["held", "released"])
def test_a_transaction_that_fails_under_outputs_held_for_room_aborts_the_epoch(
        acks: str) -> None:
    """Outputs wait in the task for room in the producer's queue when the transaction
    fails. Before: if the epoch's end handed them over and the produce found the
    transaction failed, the worker stopped with TransactionAborted ("held"); and once a
    task had found it failed, the held outputs kept the test driver from settling until
    the next epoch's end ("released": a timeout). Now the epoch is aborted, the held
    outputs dropped with it, and it runs again, exactly."""
    with TestDriver(_passthrough("held-failed"), trigger=processing_time("100ms"),
                    start_ms=T0, timeout=5) as d:
        _outputs_held_for_room(d, "100ms")
        d.fail_transaction()  # the next output handed over finds the transaction failed
        if acks == "released":
            d.hold_acks(False)  # room: the task hands its held output over, it fails
        d.advance_time("100ms")  # the epoch's end
        d.hold_acks(False)
        d.limit_queue(None)
        d.advance_time("300ms")
        assert d.exception() is None, d.exception()
        assert d.worker.committer.aborts == 1  # type: ignore[attr-defined]
        assert [r.value["i"] for r in d.read("out")] == [0, 1, 2, 3]
        assert d.committed("in") == {0: 4}


def test_a_transaction_that_fails_under_a_produce_aborts_the_epoch_and_it_runs_again() -> None:
    """A broker can fail a transaction on a produce (an abortable error; librdkafka then
    refuses every produce until it is aborted). Before: the worker stopped with
    DeliveryFailed. Now the epoch is aborted and runs again, exactly."""
    with TestDriver(_totals(), partitions=2, trigger=processing_time("100ms")) as d:
        d.send_many("in", [{"user": u, "amount": 1} for u in "ab"])
        d.advance_time("200ms")
        assert sorted((r.key, r.value) for r in d.read("out")) == [("a", 1), ("b", 1)]
        d.fail_transaction()
        d.send_many("in", [{"user": u, "amount": 1} for u in "aab"])
        d.advance_time("400ms")
        assert d.exception() is None, d.exception()
        assert d.worker.committer.aborts == 1  # type: ignore[attr-defined]
        assert sorted((r.key, r.value) for r in d.read("out")) == \
            [("a", 2), ("a", 3), ("b", 2)]
        assert dict(d.store("per-user")) == {"a": 3, "b": 2}


def test_a_loss_while_an_epoch_ends_does_not_wait_for_the_lost_tasks() -> None:
    """The coordinator drops the member (its session expired) while an epoch's end waits
    for a task that waits for room in the producer's queue. Before: the loss waited for that
    epoch's end, which waited (up to shutdown_timeout) for the lost task, i.e. for the
    acknowledgements, and then tried to commit the lost partition's offsets (a broker
    refuses them). Now the loss fences the lost task at once: the epoch is aborted and the
    member joins again without waiting; everything is then written exactly once."""
    with TestDriver(_passthrough("lost-ending"), trigger=processing_time("100ms"),
                    start_ms=T0, timeout=5) as d:
        _outputs_held_for_room(d, "100ms")
        d.advance_time("100ms")  # the epoch's end waits for the task
        assert d.worker.committer.aborts == 0  # type: ignore[attr-defined]
        d.expire_session()
        assert d.worker.committer.aborts == 1  # type: ignore[attr-defined]
        assert d.worker.rebalancing_since is None  # joined again, not waiting
        d.hold_acks(False)
        d.limit_queue(None)
        d.advance_time("300ms")
        assert d.exception() is None, d.exception()
        assert [r.value["i"] for r in d.read("out")] == [0, 1, 2, 3]
        assert d.committed("in") == {0: 4}


def test_a_graceful_stop_after_a_transaction_failed_under_outputs_held_for_room() -> None:
    """A task's outputs wait for room when the transaction fails; the task then waits at
    the closed gate for the abort, its outputs still held. Before: a graceful stop ended
    the task's loop, whose last step handed the held outputs to the producer; the failed
    transaction refused them and the worker stopped with TransactionAborted instead of
    stopping cleanly. Now they go with the aborted epoch, and the next run writes them."""
    with TestDriver(_passthrough("stop-held"), trigger=processing_time("10s"),
                    start_ms=T0, timeout=5) as d:
        _outputs_held_for_room(d, "10s")
        d.fail_transaction()
        d.hold_acks(False)  # room: the held output finds the transaction failed
        d.limit_queue(None)
        d.restart()
        d.advance_time("10s")
        assert [r.value["i"] for r in d.read("out")] == [0, 1, 2, 3]
        assert d.committed("in") == {0: 4}


def test_a_partition_lost_a_second_time_has_the_epoch_of_its_new_task_aborted() -> None:
    """The loop blocks past max.poll.interval.ms: the task is fenced, the epoch aborted, and
    the partition, lost, is assigned again to a new task, which processes a record. Then the
    session expires: the partition is lost again. Before: the second loss found the
    partition among those fenced when the running epoch began (its first task) and did not
    abort the epoch, which held the new task's output: after the rejoin the record was read
    and written again, and the epoch committed it twice."""
    job = Job("lost-twice", config=WorkerConfig(consumer={"max.poll.interval.ms": 300}))
    job.stream(KafkaSource("in", value=JSON)).to(KafkaSink("out", value=JSON))
    with TestDriver(job, trigger=processing_time("10s"), start_ms=T0, timeout=5) as d:
        d.send("in", {"i": 0})
        d.advance_time("10s")
        time.sleep(0.35)  # no serve of the group past max.poll.interval.ms: lost, rejoined
        d.send("in", {"i": 1})
        d.send("in", {"i": 2})  # processed by the new task, in the running epoch
        d.expire_session()  # lost again: the running epoch holds the new task's work
        d.advance_time("10s")
        assert d.exception() is None, d.exception()
        assert [r.value["i"] for r in d.read("out")] == [0, 1, 2]
        assert d.committed("in") == {0: 3}
