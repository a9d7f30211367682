"""Windows on event time, in the test driver with explicit event times and the manual clock
(never the wall clock): boundaries, out-of-order and late records, the four window kinds,
output modes and the build-time errors, state cleanup, restarts in the middle of open
windows. The watermark itself (across repartitions, idle partitions): test_watermarks.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcore import (
    JSON,
    STR,
    ConfigError,
    Hopping,
    Job,
    JobDefinitionError,
    KafkaSink,
    KafkaSource,
    Session,
    Sliding,
    Tumbling,
    WorkerConfig,
    processing_time,
)
from streamcore.runtime.timed import pack_time
from streamcore.testing import TestDriver

T0 = 1_700_000_040_000  # a multiple of one minute: windows start here
MIN = 60_000


def _count_job(window: Any, mode: str | None = "append", *, delay: str = "10s",
               late: bool = False, name: str = "w", repartition: bool = True,
               watermark: bool = True) -> Job:
    job = Job(name)
    s = job.stream(KafkaSource("in", key=STR, value=JSON))
    if watermark:
        s = s.with_watermark(delay)
    if repartition:
        s = s.key_by(lambda v: v["k"])
    table = s.window(window).count(
        name="counts", late=KafkaSink("late", key=STR, value=JSON) if late else None)
    table.to(KafkaSink("out", key=JSON, value=JSON), output_mode=mode)
    return job


def _rows(d: TestDriver, topic: str = "out") -> list[tuple[Any, int, int, Any]]:
    out = []
    for r in d.read(topic):
        k, start, end = r.key
        out.append((k, start - T0, end - T0, None if r.value is None else
                    r.value.get("count", r.value.get("value"))))
    return out


def _send(d: TestDriver, key: str, at_ms: int, **extra: Any) -> None:
    d.send("in", {"k": key, **extra}, key=key, timestamp=T0 + at_ms)


def test_a_record_exactly_at_a_window_end_belongs_to_the_next_window() -> None:
    with TestDriver(_count_job(Tumbling("1m")), start_ms=T0) as d:
        _send(d, "a", 0)
        _send(d, "a", MIN - 1)
        _send(d, "a", MIN)  # [1m, 2m), not [0, 1m)
        _send(d, "a", 3 * MIN)  # watermark 2m50s: both windows close
        d.advance_time("1s")
        assert sorted(_rows(d)) == [("a", 0, MIN, 2), ("a", MIN, 2 * MIN, 1)]


def test_append_emits_each_window_once_when_the_watermark_passes_its_end() -> None:
    with TestDriver(_count_job(Tumbling("1m")), start_ms=T0) as d:
        for t in (1_000, 2_000, 30_000):
            _send(d, "a", t)
        _send(d, "a", MIN + 9_999)  # watermark MIN - 1: the window is still open
        d.advance_time("1s")
        assert _rows(d) == []
        _send(d, "a", MIN + 10_000)  # watermark exactly at its end: closed (end <= wm)
        d.advance_time("1s")
        assert _rows(d) == [("a", 0, MIN, 3)]
        _send(d, "a", MIN + 20_000)
        d.advance_time("1s")
        assert _rows(d) == []  # never twice


def test_out_of_order_records_within_the_watermark_count_and_late_ones_are_dropped() -> None:
    with TestDriver(_count_job(Tumbling("1m"), late=True), start_ms=T0) as d:
        _send(d, "a", 50_000)
        _send(d, "a", 5_000)  # older, but the watermark (40 s) has not closed [0, 1m)
        _send(d, "a", 2 * MIN)  # watermark 1m50s closes [0, 1m)
        d.advance_time("1s")
        assert _rows(d) == [("a", 0, MIN, 2)]
        _send(d, "a", 59_000, late_one=True)  # its window has closed: late
        d.advance_time("1s")
        assert [r.value["late_one"] for r in d.read("late")] == [True]
        assert sum(t.ctx.late_records for t in d.worker.tasks.values()) == 1
        snap = d.worker.status.snapshot().samples
        assert snap["streamcore_late_records_dropped_total"][()] == 1
        _send(d, "a", 4 * MIN)
        d.advance_time("1s")
        assert _rows(d) == [("a", 2 * MIN, 3 * MIN, 1)]  # the late record counted nowhere


def test_hopping_windows_overlap() -> None:
    with TestDriver(_count_job(Hopping("1m", "20s"), mode="update"), start_ms=T0) as d:
        _send(d, "a", 45_000)  # in [0,1m), [20s,80s), [40s,100s)
        assert sorted(_rows(d)) == [("a", 0, MIN, 1), ("a", 20_000, 80_000, 1),
                                    ("a", 40_000, 100_000, 1)]


def test_hopping_append_counts_each_window_from_its_own_records() -> None:
    with TestDriver(_count_job(Hopping("1m", "30s"), delay="0s"), start_ms=T0) as d:
        for t in (10_000, 40_000, 70_000):
            _send(d, "a", t)
        _send(d, "a", 5 * MIN)
        d.advance_time("1s")
        assert sorted(_rows(d)) == [("a", -30_000, 30_000, 1), ("a", 0, MIN, 2),
                                    ("a", 30_000, 90_000, 2), ("a", MIN, 90_000 + 30_000, 1)]


def test_update_mode_emits_every_change_and_state_is_cleaned_up_after_the_watermark() -> None:
    with TestDriver(_count_job(Tumbling("1m"), mode="update"), start_ms=T0) as d:
        _send(d, "a", 1_000)
        _send(d, "b", 2_000)
        _send(d, "a", 3_000)
        assert _rows(d) == [("a", 0, MIN, 1), ("b", 0, MIN, 1), ("a", 0, MIN, 2)]
        _send(d, "a", 5 * MIN)  # closes [0, 1m) for both keys
        d.advance_time("1s")
        assert _rows(d) == [("a", 5 * MIN, 6 * MIN, 1)]
        assert list(d.store("counts")) == [("a", T0 + 5 * MIN, T0 + 6 * MIN)]
        _send(d, "b", 20 * MIN)
        d.advance_time("1s")
        d.read("out")
        _send(d, "b", 40 * MIN)
        d.advance_time("1s")
        # Only the newest window is left: everything the watermark passed is deleted.
        assert list(d.store("counts")) == [("b", T0 + 40 * MIN, T0 + 41 * MIN)]


def test_state_is_back_to_zero_once_the_watermark_passes_every_window() -> None:
    job = Job("zero")
    (job.stream(KafkaSource("in", key=STR, value=JSON)).with_watermark("0s")
        .filter(lambda v: v["k"] != "tick")  # ticks move event time and open no window
        .key_by(lambda v: v["k"])
        .window(Tumbling("1m")).count(name="counts")
        .to(KafkaSink("out", key=JSON, value=JSON), output_mode="append"))
    with TestDriver(job, start_ms=T0) as d:
        for i in range(20):
            _send(d, f"k{i}", i * 1_000)
        d.advance_time("1s")
        assert len(d.store("counts")) == 20
        _send(d, "tick", 10 * MIN)
        d.advance_time("1s")
        assert len(_rows(d)) == 20
        assert len(d.store("counts")) == 0
        # The changelog holds a tombstone for each closed window: a restore agrees.
        d.crash()
        d.advance_time("1s")
        _send(d, "tick", 11 * MIN)
        assert len(d.store("counts")) == 0 and _rows(d) == []


def test_session_windows_merge_when_a_record_bridges_them() -> None:
    with TestDriver(_count_job(Session("10s"), mode="update"), start_ms=T0) as d:
        _send(d, "a", 0)
        _send(d, "a", 5_000)  # [0, 15s)
        _send(d, "a", 30_000)  # a second session [30s, 40s)
        assert _rows(d) == [("a", 0, 10_000, 1), ("a", 0, 10_000, None),
                            ("a", 0, 15_000, 2), ("a", 30_000, 40_000, 1)]
        _send(d, "a", 20_000)  # [20s, 30s) touches neither; [20s,30s) vs [30s,40s): no
        assert _rows(d) == [("a", 20_000, 30_000, 1)]
        _send(d, "a", 14_000)  # overlaps [0,15s) and [20s,30s): all three merge
        assert _rows(d) == [("a", 0, 15_000, None), ("a", 20_000, 30_000, None),
                            ("a", 0, 30_000, 4)]


def test_a_record_inside_a_session_updates_it_without_a_tombstone() -> None:
    with TestDriver(_count_job(Session("10s"), mode="update"), start_ms=T0) as d:
        _send(d, "a", 0)
        _send(d, "a", 5_000)
        assert _rows(d)[-1] == ("a", 0, 15_000, 2)
        _send(d, "a", 3_000)  # [3s, 13s) lies inside [0, 15s): the bounds stay
        assert _rows(d) == [("a", 0, 15_000, 3)]


def _commit_a_then_fail_commits(d: TestDriver) -> None:
    """a@1s, committed; the commits after it fail, so that a crash reads again every record
    after a@1s and none before."""
    _send(d, "a", 1_000)
    d.advance_time("1s")
    d.commit()
    d.fail_commits()


def _crash_once_written(d: TestDriver, written: Callable[[Any], bool]) -> None:
    """Let the changelog's records go one at a time until one that ``written`` matches is
    in it, then crash; the queue and the commits are as before for what follows."""
    d.limit_queue(1)
    changelog: list[Any] = []
    for _ in range(20):
        d.advance_time("100ms")
        changelog += d.read("w-counts-changelog")
        if any(written(r) for r in changelog):
            break
    else:
        raise AssertionError(f"the flush never wrote it: {changelog}")
    d.crash()
    d.limit_queue(None)
    d.fail_commits(False)


def _close_before(d: TestDriver, key: str, at_ms: int) -> list[tuple[Any, int, int, Any]]:
    """After a restart: a record at at_ms, which closes the windows before it; the rows
    written since the last read."""
    d.advance_time("1s")
    _send(d, key, at_ms)
    d.advance_time("1s")
    return _rows(d)


@pytest.mark.parametrize("crash_after", ["merged", "tombstone"])
@pytest.mark.parametrize("later", [[5_000], [5_000, 12_000]], ids=["one", "two"])
def test_a_crash_in_the_middle_of_a_session_merge_loses_no_record(
        crash_after: str, later: list[int]) -> None:
    """A record that extends a session writes the merged session and a tombstone for the one
    it replaced, in one flush; a crash can leave any prefix of it. Before: the tombstones
    went first, so a crash could leave the old session deleted and the merged one unwritten;
    the old session's records (their offsets committed) were lost, and a session was emitted
    without them (found by random histories of event-time sessions). Two records in one
    flush: the second merge's session must also precede the first merge's tombstone. Now
    the merged session goes first, and a restart that finds it beside one it replaced drops
    that one."""
    with TestDriver(_count_job(Session("10s"), delay="0s", repartition=False),
                    start_ms=T0) as d:
        _commit_a_then_fail_commits(d)  # only the later records will be read again
        for t in later:  # [1s, 11s) becomes [1s, 15s), then [1s, 22s)
            _send(d, "a", t)
        end = later[-1] + 10_000
        merged = b"w" + pack_time(T0 + end) + pack_time(T0 + 1_000)
        _crash_once_written(d, lambda r: r.key.startswith(merged) if crash_after == "merged"
                            else r.key.startswith(b"w") and r.value is None)
        rows = _close_before(d, "b", MIN)  # closes a's session
        # The later records are read again (at least once: counted twice), a@1s is not.
        assert [r for r in rows if r[0] == "a"] == [("a", 1_000, end, 1 + 2 * len(later))]


@pytest.mark.parametrize("crash_after", ["watermark", "tombstone"])
def test_a_crash_in_the_middle_of_the_flush_that_merges_and_closes_a_session(
        crash_after: str) -> None:
    """A session merged and closed before one flush: that flush writes the tombstone of the
    session it replaced, the watermark that closed it and its own tombstone. Before: the
    replaced session's tombstone went first, so a crash could leave it without the
    watermark; the closed session's last record, read again, was emitted alone (found by
    random histories of event-time sessions). Now it goes after the closed session's."""
    with TestDriver(_count_job(Session("10s"), delay="0s", repartition=False),
                    start_ms=T0) as d:
        _commit_a_then_fail_commits(d)  # only a@5s will be read again
        _send(d, "a", 5_000)  # [1s, 11s) becomes [1s, 15s)
        _send(d, "b", 2 * MIN)  # closes it before the next flush
        assert _rows(d) == [("a", 1_000, 15_000, 2)]
        replaced = b"w" + pack_time(T0 + 11_000) + pack_time(T0 + 1_000) + b'"a"'
        _crash_once_written(d, lambda r: (r.key, r.value) == (b"m", b"t%d" % (T0 + 2 * MIN))
                            if crash_after == "watermark" else
                            r.key == replaced and r.value is None)
        rows = _close_before(d, "c", 4 * MIN)  # closes b's session
        assert [r for r in rows if r[0] == "a"] == [], rows  # a's session: not again


def test_session_windows_close_gap_after_their_last_record() -> None:
    with TestDriver(_count_job(Session("10s"), delay="0s"), start_ms=T0) as d:
        _send(d, "a", 0)
        _send(d, "a", 8_000)
        _send(d, "b", 17_999)  # watermark 17.999 s: a's session ends at 18 s
        d.advance_time("1s")
        assert _rows(d) == []
        _send(d, "b", 18_000)
        d.advance_time("1s")
        assert _rows(d) == [("a", 0, 18_000, 2)]
        assert list(d.store("counts")) == [("b", T0 + 17_999, T0 + 28_000)]


def test_session_aggregate_needs_a_merger() -> None:
    job = Job("s")
    s = job.stream(KafkaSource("in", value=JSON)).key_by(lambda v: v["k"])
    with pytest.raises(JobDefinitionError, match="merge="):
        s.window(Session("5s")).aggregate(lambda: 0, lambda a, v: a + 1, name="agg")


def _sliding_expected(times: list[int], d: int) -> dict[tuple[int, int], int]:
    """Kafka Streams' sliding windows by their definition: every distinct [t - d, t] and
    [t + 1, t + 1 + d] that holds records, with the count of records inside."""
    wins = {(t - d, t) for t in times}
    wins |= {(t + 1, t + 1 + d) for t in times if any(t < u <= t + 1 + d for u in times)}
    return {w: sum(1 for u in times if w[0] <= u <= w[1]) for w in wins}


def test_a_record_past_its_own_window_still_counts_in_an_open_sliding_window() -> None:
    """Late means every window that holds the record, or that it defines, is closed (Kafka
    Streams: ts + 1 + d). Before, a record was dropped once the watermark passed its own
    time, though an earlier record's right window still open held it: after a restart the
    saved watermark dropped replayed records that way, and such a window was never emitted
    (found by a random history of sliding windows)."""
    with TestDriver(_count_job(Sliding("5s"), delay="0s", repartition=False, late=True),
                    start_ms=T0) as d:
        _send(d, "a", 0)
        _send(d, "a", 3_000)  # a@0's right window [1ms, 5001ms] holds it
        _send(d, "x", 4_000)  # watermark 4 s: [1ms, 5001ms] is open, a@1s's own [-4s, 1s] not
        _send(d, "a", 1_000)
        _send(d, "x", 10_000)
        d.advance_time("1s")
        rows = [r for r in _rows(d) if r[0] == "a"]
        assert ("a", 1, 5_001, 2) in rows, rows
        assert ("a", 1_001, 6_001, 1) in rows, rows  # a@1s's right window: a@3s
        assert _rows(d, "late") == []
        _send(d, "a", 3_999)  # every window it holds or defines ends by 9 s + 1 ms: late
        d.advance_time("1s")
        assert len(d.read("late")) == 1


@settings(max_examples=6, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=12))
def test_sliding_windows_are_the_distinct_record_sets_within_max_difference(
        seconds: list[int]) -> None:
    times = [s * 1000 for s in seconds]
    with TestDriver(_count_job(Sliding("5s"), delay="0s", repartition=False),
                    start_ms=T0) as d:
        for t in sorted(times):
            _send(d, "a", t)
        _send(d, "a", 10 * MIN)  # closes them all
        d.advance_time("1s")
        got = {(s, e): n for k, s, e, n in _rows(d) if e < 10 * MIN - 10_000}
        assert got == _sliding_expected(sorted(times), 5_000)


def _rbkw_job(inverse: bool) -> Job:
    job = Job("rbkw")
    s = job.stream(KafkaSource("in", key=STR, value=JSON)).with_watermark("0s")
    plain = s.reduce_by_key_and_window(lambda a, b: a + b, Hopping("30s", "10s"),
                                       name="plain")
    plain.to(KafkaSink("plain", key=JSON, value=JSON), output_mode="append")
    if inverse:
        inv = s.reduce_by_key_and_window(lambda a, b: a + b, Hopping("30s", "10s"),
                                         inverse=lambda a, b: a - b, name="inv")
        inv.to(KafkaSink("inv", key=JSON, value=JSON), output_mode="append")
    return job


@settings(max_examples=6, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 90), st.integers(-5, 5)),
                min_size=1, max_size=25))
def test_reduce_by_key_and_window_with_an_inverse_equals_recomputation(
        events: list[tuple[str, int, int]]) -> None:
    job = Job("rbkw")
    s = job.stream(KafkaSource("in", key=STR, value=JSON)).with_watermark("5s")
    for name, inverse in (("plain", None), ("inv", lambda a, b: a - b)):
        (s.map(lambda v: v["x"])
            .reduce_by_key_and_window(lambda a, b: a + b, Hopping("30s", "10s"),
                                      inverse=inverse, name=name)
            .to(KafkaSink(name, key=JSON, value=JSON), output_mode="append"))
    with TestDriver(job, start_ms=T0) as d:
        for key, sec, x in sorted(events, key=lambda e: e[1]):
            d.send("in", {"x": x}, key=key, timestamp=T0 + sec * 1000)
        d.send("in", {"x": 0}, key="z", timestamp=T0 + 10 * MIN)
        d.advance_time("1s")
        plain = [(r.key, r.value["value"]) for r in d.read("plain")]
        inv = [(r.key, r.value["value"]) for r in d.read("inv")]
        assert plain == inv
        # And recomputation is the plain sum of each window's values.
        expected: Counter[tuple[str, int]] = Counter()
        present = set()
        for key, sec, x in events:
            pane = sec // 10 * 10
            for end in (pane + 10, pane + 20, pane + 30):
                expected[(key, end)] += x
                present.add((key, end))
        got = {(k[0], (k[2] - T0) // 1000): v for k, v in plain}
        assert got == {kv: expected[kv] for kv in present}


def test_output_modes_that_cannot_work_fail_at_build_time_with_the_reason() -> None:
    job = Job("bad1")
    t = job.stream(KafkaSource("in", value=JSON)).key_by(lambda v: v["k"]).count(name="c")
    t.to(KafkaSink("out", value=JSON), output_mode="append")
    with pytest.raises(JobDefinitionError, match="never become final"):
        job.build()
    with pytest.raises(JobDefinitionError, match="without watermark"):
        _count_job(Tumbling("1m"), watermark=False).build()
    job = Job("bad3")
    (job.stream(KafkaSource("in", value=JSON)).key_by(lambda v: v["k"])
        .map_groups_with_state(lambda k, vs, s: None, name="g", timeout="event_time")
        .to(KafkaSink("out", value=JSON)))
    with pytest.raises(JobDefinitionError, match="event-time timeout needs a watermark"):
        job.build()
    with pytest.raises(JobDefinitionError, match="output_mode must be one of"):
        _count_job(Tumbling("1m"), mode="everything")
    with pytest.raises(JobDefinitionError, match="must not exceed the size"):
        Hopping("10s", "1m")


def test_complete_mode_needs_epoch_mode() -> None:
    job = _count_job(Tumbling("1m"), mode="complete")
    with pytest.raises(ConfigError, match="complete output mode"), TestDriver(job):
        pass


def test_complete_mode_emits_the_whole_table_every_epoch() -> None:
    # No repartition: with one, the rows would reach the window an epoch later.
    with TestDriver(_count_job(Tumbling("1m"), mode="complete", repartition=False),
                    start_ms=T0, trigger=processing_time("1s")) as d:
        _send(d, "a", 1_000)
        _send(d, "b", 2_000)
        d.advance_time("1s")
        assert sorted(_rows(d)) == [("a", 0, MIN, 1), ("b", 0, MIN, 1)]
        _send(d, "a", 5 * MIN)  # complete mode keeps every window (no expiry)
        d.advance_time("1s")
        assert sorted(_rows(d)) == [("a", 0, MIN, 1), ("a", 5 * MIN, 6 * MIN, 1),
                                    ("b", 0, MIN, 1)]


def test_epoch_mode_update_emits_each_changed_window_once_per_epoch() -> None:
    with TestDriver(_count_job(Tumbling("1m"), mode="update", repartition=False),
                    start_ms=T0, trigger=processing_time("1s")) as d:
        for t in (1_000, 2_000, 3_000):
            _send(d, "a", t)
        d.advance_time("1s")
        assert _rows(d) == [("a", 0, MIN, 3)]


def test_epoch_mode_update_emits_a_window_changed_in_the_epoch_that_closes_it() -> None:
    """As Spark: a batch outputs the rows it updated, then evicts what the watermark closed.
    Before: the epoch's end closed the window first and dropped its pending update, so its
    last count (here its only one) was never emitted."""
    with TestDriver(_count_job(Tumbling("1m"), mode="update", delay="0s", repartition=False),
                    start_ms=T0, trigger=processing_time("1s")) as d:
        for t in (1_000, 2_000):
            _send(d, "a", t)
        _send(d, "b", 2 * MIN)  # the epoch's watermark closes a's window
        d.advance_time("1s")
        assert sorted(_rows(d)) == [("a", 0, MIN, 2), ("b", 2 * MIN, 3 * MIN, 1)]
        assert len(d.store("counts")) == 1  # a's window is gone


def test_a_window_row_whose_produce_fails_the_transaction_is_not_lost() -> None:
    """The epoch's end emits a closed window's row, and that produce finds the transaction
    failed. Before: the barrier had checked for a failed transaction before staging only, so
    it committed the epoch without the row but with the window's deletion (the in-memory
    producer, unlike librdkafka, lets such a commit through): the row was lost for good
    (found by a 200-step random history). Now the epoch is aborted and runs again."""
    with TestDriver(_count_job(Tumbling("1m"), delay="0s", repartition=False),
                    start_ms=T0, trigger=processing_time("100ms")) as d:
        _send(d, "a", 1_000)
        d.advance_time("100ms")
        _send(d, "b", 2 * MIN)  # closes a's window at the epoch's end
        d.fail_transaction()  # its row, the epoch's first produce, finds it failed
        d.advance_time("100ms")
        d.advance_time("100ms")
        assert d.exception() is None, d.exception()
        assert d.worker.committer.aborts == 1  # type: ignore[attr-defined]
        assert _rows(d) == [("a", 0, MIN, 1)]


def test_epoch_mode_append_emits_closed_windows_in_the_epoch_that_closes_them() -> None:
    with TestDriver(_count_job(Tumbling("1m"), delay="0s", repartition=False),
                    start_ms=T0, trigger=processing_time("1s")) as d:
        for t in (1_000, 2_000, MIN + 1):
            _send(d, "a", t)
        d.advance_time("1s")  # the epoch ends: watermark MIN + 1 closes [0, 1m)
        assert _rows(d) == [("a", 0, MIN, 2)]
        d.crash()  # the deletion committed with the output: nothing comes twice
        _send(d, "a", 3 * MIN)
        d.advance_time("2s")
        assert _rows(d) == [("a", MIN, 2 * MIN, 1)]



def test_window_rows_held_for_room_when_the_epoch_aborts_are_not_sent_again() -> None:
    """An epoch's end emits closed windows; those the producer's queue had no room for are
    held by the task. Before: when the transaction then failed, the abort rewound the task
    but kept what it held, so the epoch that ran again sent those rows a second time, in
    one committed transaction (found by a 100-step random history)."""
    with TestDriver(_count_job(Tumbling("1m"), delay="0s", repartition=False),
                    start_ms=T0, trigger=processing_time("100ms")) as d:
        for i, key in enumerate("wxyz"):
            _send(d, key, i * 1_000)
        d.advance_time("100ms")
        d.hold_acks()
        d.limit_queue(1)  # the epoch's end has room for one row: three are held
        _send(d, "a", 2 * MIN)  # closes the four windows
        d.advance_time("100ms")
        d.fail_transaction()  # the next row handed over finds the transaction failed
        d.hold_acks(False)
        d.limit_queue(None)
        d.advance_time("300ms")
        assert d.exception() is None, d.exception()
        assert d.worker.committer.aborts == 1  # type: ignore[attr-defined]
        assert sorted(_rows(d)) == [(k, 0, MIN, 1) for k in "wxyz"]

def test_a_crash_in_the_middle_of_open_windows_loses_nothing() -> None:
    with TestDriver(_count_job(Tumbling("1m"), delay="0s"), start_ms=T0) as d:
        for t in range(0, 50_000, 5_000):
            _send(d, "a", t)
        d.commit()
        _send(d, "a", 51_000)  # processed, not committed: replayed after the crash
        d.crash()
        _send(d, "a", 52_000)
        _send(d, "a", MIN)
        d.advance_time("1s")
        rows = _rows(d)
        # At least once: the window holds every record (the replayed one at most twice).
        assert len(rows) == 1 and rows[0][:3] == ("a", 0, MIN) and rows[0][3] in (12, 13)


def test_a_final_result_lost_in_a_crash_is_emitted_again() -> None:
    with TestDriver(_count_job(Tumbling("1m"), delay="0s"), start_ms=T0) as d:
        _send(d, "a", 1_000)
        d.commit()
        d.hold_acks(topics=["out"])  # the final row is never acknowledged...
        _send(d, "a", MIN)
        d.advance_time("1s")
        assert _rows(d) == [] and len(d.store("counts")) == 2
        d.crash()  # ...so its window's state was not deleted: the restart emits it
        d.hold_acks(False)
        d.advance_time("1s")
        assert ("a", 0, MIN, 1) in _rows(d)


def test_complete_mode_on_an_aggregation_without_windows() -> None:
    job = Job("totals")
    (job.stream(KafkaSource("in", key=STR, value=JSON))
        .count(name="per-key")
        .to(KafkaSink("out", key=STR, value=JSON), output_mode="complete"))
    with TestDriver(job, start_ms=T0, trigger=processing_time("1s")) as d:
        d.send("in", {}, key="a")
        d.send("in", {}, key="b")
        d.advance_time("1s")
        assert sorted((r.key, r.value) for r in d.read("out")) == [("a", 1), ("b", 1)]
        d.send("in", {}, key="a")
        d.advance_time("1s")  # every row again, changed or not
        assert sorted((r.key, r.value) for r in d.read("out")) == [("a", 2), ("b", 1)]


def test_a_windowed_row_keyed_by_raw_bytes_is_written_with_the_default_key_serde() -> None:
    # The default source key serde gives bytes; the row's key (key, start, end) must still
    # serialize with the default sink key serde (bytes inside it as UTF-8 text).
    job = Job("raw")
    (job.stream(KafkaSource("in", value=JSON)).with_watermark("0s")
        .window(Tumbling("1m")).count(name="c")
        .to(KafkaSink("out", value=JSON), output_mode="append"))
    with TestDriver(job, start_ms=T0) as d:
        d.send("in", {}, key=b"user-1", timestamp=T0)
        d.send("in", {}, key=b"user-1", timestamp=T0 + MIN)
        d.advance_time("1s")
        assert d.exception() is None
        assert [r.key for r in d.read("out")] == [b'["user-1",%d,%d]' % (T0, T0 + MIN)]


def test_late_records_as_a_stream_of_their_own() -> None:
    job = Job("late-stream")
    counts = (job.stream(KafkaSource("in", key=STR, value=JSON)).with_watermark("0s")
              .window(Tumbling("1m")).count(name="c"))
    counts.to(KafkaSink("out", key=JSON, value=JSON), output_mode="append")
    (counts.late_records().map(lambda v: {**v, "was_late": True})
        .to(KafkaSink("late", key=STR, value=JSON)))
    with TestDriver(job, start_ms=T0) as d:
        _send(d, "a", 2 * MIN)
        _send(d, "a", 1_000, n=1)  # its window [0, 1m) closed at watermark 2m: late
        assert [(r.key, r.value) for r in d.read("late")] == [
            ("a", {"k": "a", "n": 1, "was_late": True})]
    with pytest.raises(JobDefinitionError, match="late_records"):
        Job("x").stream(KafkaSource("in")).count(name="c").late_records()


def test_one_windowed_table_in_two_output_modes() -> None:
    job = Job("two-modes")
    counts = (job.stream(KafkaSource("in", key=STR, value=JSON)).with_watermark("0s")
              .window(Tumbling("1m")).count(name="c"))
    counts.to(KafkaSink("final", key=JSON, value=JSON), output_mode="append")
    counts.to(KafkaSink("changes", key=JSON, value=JSON), output_mode="update")
    with TestDriver(job, start_ms=T0) as d:
        _send(d, "a", 1_000)
        _send(d, "a", 2_000)
        _send(d, "a", MIN)
        d.advance_time("1s")
        assert _rows(d, "changes") == [("a", 0, MIN, 1), ("a", 0, MIN, 2),
                                       ("a", MIN, 2 * MIN, 1)]
        assert _rows(d, "final") == [("a", 0, MIN, 2)]


@pytest.mark.parametrize("batches", [True, False], ids=["batches", "record-at-a-time"])
@pytest.mark.parametrize("extractor", [False, True], ids=["record-timestamp", "extractor"])
def test_an_event_time_of_zero_crosses_a_repartition_topic(extractor: bool,
                                                           batches: bool) -> None:
    """librdkafka produces a timestamp of 0 as the time of the write (the in-memory backend
    does the same), so a record at event time 0, a natural first timestamp in a test, went
    through a key_by into a window of the wall clock's time: lost from its own."""
    job = Job("zero")
    source = KafkaSource("in", key=STR, value=JSON,
                         timestamp=(lambda v: v["t"]) if extractor else None)
    (job.stream(source).with_watermark("1s").key_by(lambda v: v["k"])
        .window(Tumbling("1s")).count(name="counts")
        .to(KafkaSink("out", key=JSON, value=JSON), output_mode="append"))
    with TestDriver(job, start_ms=T0, config=WorkerConfig(batch_execution=batches)) as d:
        for t in (0, 100, 5_000):
            d.send("in", {"k": "a", "t": t}, key="a", timestamp=t)
            d.advance_time("1s")
        assert [(r.key, r.value["count"]) for r in d.read("out")] == [(["a", 0, 1_000], 2)]
