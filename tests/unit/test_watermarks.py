"""The watermark on event time, in the test driver with explicit event times and the manual
clock: across a repartition (the minimum of the upstream tasks, kept across restarts and
between two repartitions), saved before the tombstones it causes, records in a map_async
lane, the max policy, idle partitions, progress reports and metrics, an aborted epoch."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.memory import MemoryMessage as Message
from streamcore import (
    JSON,
    STR,
    Job,
    KafkaSink,
    KafkaSource,
    Tumbling,
    WorkerConfig,
    processing_time,
)
from streamcore.runtime.eventtime import EventTime, marker, still_feeds
from streamcore.testing import TestDriver
from tests.unit.test_windows import (
    MIN,
    T0,
    _close_before,
    _commit_a_then_fail_commits,
    _count_job,
    _crash_once_written,
    _rows,
    _send,
)


def test_the_watermark_across_a_repartition_is_the_minimum_of_the_upstream_tasks() -> None:
    with TestDriver(_count_job(Tumbling("1m"), delay="0s"), partitions=2,
                    start_ms=T0) as d:
        d.send("in", {"k": "a"}, key="x", timestamp=T0 + 1_000, partition=0)
        d.send("in", {"k": "a"}, key="y", timestamp=T0 + 2_000, partition=1)
        d.send("in", {"k": "a"}, key="x", timestamp=T0 + 5 * MIN, partition=0)
        d.advance_time("1s")
        assert _rows(d) == []  # partition 1's task is still at 2 s: it holds [0,1m) open
        d.send("in", {"k": "a"}, key="y", timestamp=T0 + 3 * MIN, partition=1)
        d.advance_time("1s")
        assert _rows(d) == [("a", 0, MIN, 2)]
        tasks = d.worker.tasks
        repart = [t for tp, t in tasks.items() if tp[0].endswith("-repartition")]
        assert {t.ctx.event_time.watermark for t in repart} == {T0 + 3 * MIN}


def test_a_stop_hands_over_watermark_markers_the_full_producer_queue_held_back() -> None:
    """Before: the markers that the stop's last flush writes to the repartition topic, held
    for room in the producer's queue, were never handed over, and the stop waited for them
    until shutdown_timeout (30 s by default; a revoke as long)."""
    with TestDriver(_count_job(Tumbling("1m"), delay="0s"), partitions=2, start_ms=T0,
                    timeout=5) as d:
        d.limit_queue(1)  # room for one record at a time: the second marker waits
        for i, key in enumerate("wxyz"):
            d.send("in", {"k": key}, key=key, timestamp=T0 + i * 1_000)
        d.advance_time("1s")
        d.send("in", {"k": "a"}, key="a", timestamp=T0 + 2 * MIN)  # news for the markers
        d.restart()  # raises if the worker does not stop within 5 s
        d.limit_queue(None)
        d.send("in", {"k": "a"}, key="a", timestamp=T0 + 3 * MIN)
        d.advance_time("1s")
        assert sorted(r[0] for r in _rows(d) if r[1] == 0) == ["w", "x", "y", "z"]


def _restart_while_partition_1_is_behind(d: TestDriver, restart: str) -> None:
    """Partition 1's task is at 2 s when the job restarts, and sends nothing more until
    partition 0 is at 5 min: [0, 1m) stays open until partition 1 moves, and partition 1's
    record at 30 s after the restart is not late."""
    d.send("in", {"k": "a"}, key="x", timestamp=T0 + 1_000, partition=0)
    d.send("in", {"k": "a"}, key="y", timestamp=T0 + 2_000, partition=1)
    d.advance_time("1s")
    d.commit()
    d.crash() if restart == "crash" else d.restart()
    d.send("in", {"k": "a"}, key="x", timestamp=T0 + 5 * MIN, partition=0)
    d.advance_time("1s")
    assert _rows(d) == []
    d.send("in", {"k": "a"}, key="y", timestamp=T0 + 30_000, partition=1)
    d.send("in", {"k": "a"}, key="y", timestamp=T0 + 3 * MIN, partition=1)
    d.advance_time("1s")
    assert _rows(d) == [("a", 0, MIN, 3)] and d.read("late") == []


@pytest.mark.parametrize("restart", ["crash", "graceful"])
@pytest.mark.parametrize("trigger", [None, "300ms"], ids=["continuous", "epoch"])
def test_a_restarted_window_task_still_waits_for_an_upstream_task_that_is_behind(
        restart: str, trigger: str | None) -> None:
    # Before the restart, partition 1's task is at 2 s. After it, the window task must go on
    # counting it in the minimum though partition 1 has sent nothing since: the restart must
    # not make its records late (the records of partition 0 alone do not close [0, 1m)).
    with TestDriver(_count_job(Tumbling("1m"), delay="0s", late=True), partitions=2,
                    start_ms=T0, trigger=trigger) as d:
        _restart_while_partition_1_is_behind(d, restart)


@pytest.mark.parametrize("restart", ["crash", "graceful"])
@pytest.mark.parametrize("trigger", [None, "300ms"], ids=["continuous", "epoch"])
def test_a_task_between_two_repartitions_does_not_forget_an_upstream_task_that_is_behind(
        restart: str, trigger: str | None) -> None:
    # in -> "mid" repartition -> key_by -> window: the middle tasks have no store of their
    # own. After the restart they must not tell the window task that partition 1 of "in"
    # has caught up just because only partition 0 has reported since.
    job = Job("w")
    (job.stream(KafkaSource("in", key=STR, value=JSON)).with_watermark("0s")
        .repartition(name="mid").key_by(lambda v: v["k"]).window(Tumbling("1m"))
        .count(name="counts", late=KafkaSink("late", key=STR, value=JSON))
        .to(KafkaSink("out", key=JSON, value=JSON), output_mode="append"))
    with TestDriver(job, partitions=2, start_ms=T0, trigger=trigger) as d:
        _restart_while_partition_1_is_behind(d, restart)


def test_a_restarted_task_ignores_saved_watermarks_of_tasks_that_no_longer_feed_it() -> None:
    # The job changed its input from "old" to "in": the saved watermark of old:0 would hold
    # the minimum back for ever (no marker of old:0 will come again).
    et = EventTime("w-repartition:0", reads_markers=True,
                   feeds=lambda task: task.startswith("in:"))
    et.resume({"old:0": 1_000, "in:0": 5_000, "in:1": 7_000})
    assert et.advance() and et.watermark == 5_000


def test_the_saved_watermark_reaches_the_changelog_before_the_tombstones_it_caused() -> None:
    # Two watermark moves between commits, each closing a window. The saved watermark goes
    # after the windows' last values and before their tombstones: a crash in the middle of
    # the flush may leave it without them (the restart drops those windows), never a
    # tombstone without it (test_a_crash_in_the_middle_of_a_flush_...).
    with TestDriver(_count_job(Tumbling("1m"), delay="100s", repartition=False),
                    start_ms=T0) as d:
        _send(d, "a", 10_000)
        _send(d, "b", 70_000)
        d.advance_time("1s")
        d.commit()
        d.read("w-counts-changelog")
        _send(d, "c", 165_000)  # closes [0, 1m)
        d.advance_time("1ms")
        _send(d, "c", 225_000)  # closes [1m, 2m)
        d.advance_time("1ms")
        d.commit()
        assert sorted(_rows(d)) == [("a", 0, MIN, 1), ("b", MIN, 2 * MIN, 1)]
        log = [(r.key, r.value) for r in d.read("w-counts-changelog")]
        saved = log.index((b"m", b"t%d" % (T0 + 125_000)))
        tombstones = [i for i, (k, v) in enumerate(log) if k.startswith(b"w") and v is None]
        assert len(tombstones) == 2 and saved < min(tombstones), log


@pytest.mark.parametrize("crash_after", ["watermark", "tombstone"])
def test_a_crash_in_the_middle_of_a_flush_emits_a_closed_window_neither_again_nor_partial(
        crash_after: str) -> None:
    """A closed window's tombstone and the saved watermark that closed it go to the
    changelog in one flush; a crash can leave any prefix of it. Before: the tombstone went
    first, so a crash could leave the window deleted and the watermark unsaved; the window's
    records read again (their offsets not committed) opened it again, and it was emitted a
    second time with only those records (found by a 100-step random history). Now the
    watermark goes first, and a restart that finds a window it closed drops it: emitted."""
    with TestDriver(_count_job(Tumbling("1m"), delay="0s", repartition=False),
                    start_ms=T0) as d:
        _commit_a_then_fail_commits(d)  # only a@2s will be read again
        _send(d, "a", 2_000)
        d.advance_time("1s")
        d.limit_queue(1)  # the changelog's records go one at a time
        _send(d, "b", 2 * MIN)  # closes [0, 1m) of a
        assert _rows(d) == [("a", 0, MIN, 2)]
        _crash_once_written(d, lambda r: (r.key, r.value) == (b"m", b"t%d" % (T0 + 2 * MIN))
                            if crash_after == "watermark" else
                            r.key.startswith(b"w") and r.value is None)
        rows = _close_before(d, "c", 4 * MIN)  # closes b's window
        assert [r for r in rows if r[0] == "a"] == [], rows  # a's window: not again
        # b@2m is read again: at least once, b's count may hold it twice
        assert [r[:3] for r in rows if r[0] == "b"] == [("b", 2 * MIN, 3 * MIN)]


def test_a_flush_that_holds_two_commits_writes_the_watermark_before_both_tombstones() -> None:
    """A commit's flush waits while the last one is in flight, so one flush can hold the
    writes of several commits. Before: each commit moved the saved watermark behind its own
    writes, so the second commit's move put it after the first commit's tombstones; a crash
    between them left a's window deleted and its watermark unsaved, and a's record read
    again opened the window again: emitted a second time, partial. Now the second commit
    leaves what closed since for a later flush."""
    changelog = "w-counts-changelog"
    with TestDriver(_count_job(Tumbling("1m"), delay="0s", repartition=False),
                    start_ms=T0) as d:
        _commit_a_then_fail_commits(d)  # only what follows is read again
        d.read(changelog)
        d.hold_acks(topics=[changelog])  # the flush of a@2s stays in flight...
        _send(d, "a", 2_000)
        d.advance_time("1s")
        d.commit()
        _send(d, "b", 2 * MIN)  # ...while a's window closes (its output is acknowledged)...
        d.advance_time("1s")
        d.commit()
        _send(d, "c", 4 * MIN)  # ...and b's
        d.advance_time("1s")
        d.commit()
        assert sorted(_rows(d)) == [("a", 0, MIN, 2), ("b", 2 * MIN, 3 * MIN, 1)]
        d.limit_queue(1)  # the next flush's records go one at a time
        d.hold_acks(False, topics=[changelog])
        _crash_once_written(d, lambda r: r.key.startswith(b"w") and r.value is None)
        rows = _close_before(d, "d", 6 * MIN)  # closes c's window
        assert [r for r in rows if r[0] == "a"] == [], rows  # not again, not partial
        # b@2m and c@4m are read again: at least once, their counts may hold them twice
        assert sorted(r[:3] for r in rows if r[0] != "a") == [
            ("b", 2 * MIN, 3 * MIN), ("c", 4 * MIN, 5 * MIN)], rows


def test_a_saved_watermark_counts_only_while_every_hop_of_its_path_still_writes() -> None:
    # in -> mid -> w-repartition; "old" used to write to mid.
    routes = {("in", "mid"), ("mid", "w-repartition")}

    def writes_to(topic: str, reader: str) -> bool:
        return (topic, reader) in routes

    assert still_feeds("mid:0", "w-repartition", writes_to)
    assert still_feeds("mid:0>in:1", "w-repartition", writes_to)
    assert not still_feeds("mid:0>old:1", "w-repartition", writes_to)
    assert not still_feeds("in:1", "w-repartition", writes_to)  # not directly


def test_a_task_between_repartitions_forwards_each_settled_input_by_name() -> None:
    mid = EventTime("mid:0", reads_markers=True, targets=[("w-repartition", 2)])
    mid.take_markers([Message("mid", 0, 5, None, None, 0, marker({"in:0": 4_000})),
                      Message("mid", 0, 6, None, None, 0, marker({"in:1": 1_000}))])
    assert mid.news() == {}  # nothing is settled before the batch is through the chain
    assert mid.advance() and mid.watermark == 1_000
    assert mid.news() == {"mid:0>in:0": 4_000, "mid:0>in:1": 1_000}
    mid.sent = mid.news()
    mid.take_markers([Message("mid", 0, 7, None, None, 0, marker({"in:1": 3_000}))])
    mid.advance()
    assert mid.news() == {"mid:0>in:1": 3_000}  # only what moved
    # The task downstream reads both entries of one marker.
    last = EventTime("w-repartition:0", reads_markers=True)
    last.take_markers([Message("w-repartition", 0, 1, None, None, 0,
                               marker({"mid:0>in:0": 4_000, "mid:0>in:1": 3_000}))])
    assert last.advance() and last.watermark == 3_000


@pytest.mark.parametrize("use_async", [False, True], ids=["map", "map_async"])
def test_a_map_async_before_a_window_does_not_change_which_records_are_late(
        use_async: bool) -> None:
    # One batch, out of order: 1m05s, then 30 s. The watermark before the batch holds
    # nothing back, so 30 s counts in [0, 1m) (a record is late against the watermark as it
    # stood before its batch). Records still in a map_async lane when the batch ends must
    # not meet the watermark their own batch moved.
    async def enrich(v: dict[str, Any]) -> dict[str, Any]:
        return v

    def plain(v: dict[str, Any]) -> dict[str, Any]:
        return v

    job = Job("w")
    s = (job.stream(KafkaSource("in", key=STR, value=JSON))
         .with_timestamps(lambda v: T0 + v["t"]).with_watermark("0s"))
    s = s.map_async(enrich) if use_async else s.map(plain)
    (s.window(Tumbling("1m"))
        .count(name="counts", late=KafkaSink("late", key=STR, value=JSON))
        .to(KafkaSink("out", key=JSON, value=JSON), output_mode="append"))
    with TestDriver(job, start_ms=T0) as d:
        d.send_many("in", [("a", {"t": MIN + 5_000}), ("a", {"t": 30_000})])
        d.send("in", {"t": 5 * MIN}, key="a")
        d.advance_time("1s")
        assert sorted(_rows(d)) == [("a", 0, MIN, 1), ("a", MIN, 2 * MIN, 1)]
        assert d.read("late") == []


def test_max_policy_follows_the_fastest_input() -> None:
    job = _count_job(Tumbling("1m"), delay="0s")
    with TestDriver(job, partitions=2, start_ms=T0,
                    config=WorkerConfig(watermark_policy="max")) as d:
        d.send("in", {"k": "a"}, key="x", timestamp=T0 + 1_000, partition=0)
        d.send("in", {"k": "a"}, key="y", timestamp=T0 + 2_000, partition=1)
        d.send("in", {"k": "a"}, key="x", timestamp=T0 + 5 * MIN, partition=0)
        d.advance_time("1s")
        assert _rows(d) == [("a", 0, MIN, 2)]


def test_an_idle_partition_stops_holding_the_watermark_back_after_the_idle_timeout() -> None:
    job = _count_job(Tumbling("1m"), delay="0s")
    cfg = WorkerConfig(watermark_idle_timeout="30s")
    with TestDriver(job, partitions=2, start_ms=T0, config=cfg) as d:
        d.send("in", {"k": "a"}, key="y", timestamp=T0 + 2_000, partition=1)
        d.send("in", {"k": "a"}, key="x", timestamp=T0 + 1_000, partition=0)
        d.advance_time("1s")
        d.send("in", {"k": "a"}, key="x", timestamp=T0 + 5 * MIN, partition=0)
        d.advance_time("10s")
        assert _rows(d) == []  # partition 1 is quiet, but not idle yet
        d.advance_time("30s")
        assert _rows(d) == [("a", 0, MIN, 2)]
    with TestDriver(job, partitions=2, start_ms=T0) as d:  # off by default: held for ever
        d.send("in", {"k": "a"}, key="y", timestamp=T0 + 2_000, partition=1)
        d.send("in", {"k": "a"}, key="x", timestamp=T0 + 5 * MIN, partition=0)
        d.advance_time("5m")
        assert _rows(d) == []


def test_the_watermark_is_in_progress_reports_and_metrics() -> None:
    with TestDriver(_count_job(Tumbling("1m"), delay="10s"), start_ms=T0) as d:
        _send(d, "a", 30_000)
        d.advance_time("1s")
        w = d.worker
        report = w.status.report_progress()
        assert report["eventTime"]["watermark"] == "2023-11-14T22:14:20.000Z"
        marks = w.status.snapshot().samples["streamcore_watermark_seconds"]
        assert (("in", "0") in marks) and marks[("in", "0")] == (T0 + 20_000) / 1000


def test_an_aborted_epoch_runs_again_against_the_watermark_it_started_with() -> None:
    # The epoch's records moved the watermark past 30 s; aborted and run again, they must
    # be judged against the watermark from before the epoch, not the one they produced.
    with TestDriver(_count_job(Tumbling("10s"), delay="0s", repartition=False,
                               late=True), start_ms=T0, trigger=processing_time("1s")) as d:
        _send(d, "a", 1_000)
        d.advance_time("1s")
        d.abort_next_epoch()
        for t in (35_000, 2_000, 3_000):  # out of order within the epoch: not late
            _send(d, "a", t)
        d.advance_time("1s")  # aborted
        d.advance_time("1s")  # run again, committed
        assert _rows(d) == [("a", 0, 10_000, 3)]
        assert d.read("late") == []
