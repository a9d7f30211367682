"""drop_duplicates and map_groups_with_state in the test driver: explicit event times and
the manual clock drive the watermark and both kinds of timeout; crashes restore state."""

from __future__ import annotations

from typing import Any

import pytest

from streamcore import (
    JSON,
    STR,
    GroupState,
    Job,
    JobDefinitionError,
    KafkaSink,
    KafkaSource,
    processing_time,
)
from streamcore.testing import TestDriver

T0 = 1_700_000_040_000


def _dedup_job(*, watermark: str | None = "10s", within: str | None = None) -> Job:
    job = Job("dd")
    s = job.stream(KafkaSource("in", key=STR, value=JSON))
    if watermark is not None:
        s = s.with_watermark(watermark)
    (s.drop_duplicates(lambda v: v["id"], within=within, name="seen")
        .to(KafkaSink("out", key=STR, value=JSON)))
    return job


def test_drop_duplicates_keeps_the_first_and_survives_a_restart() -> None:
    with TestDriver(_dedup_job(), start_ms=T0) as d:
        d.send("in", {"id": 1, "n": "first"}, key="a", timestamp=T0)
        d.send("in", {"id": 1, "n": "again"}, key="a", timestamp=T0 + 1)
        d.send("in", {"id": 2, "n": "other"}, key="a", timestamp=T0 + 2)
        d.send("in", {"id": 1, "n": "other key"}, key="b", timestamp=T0 + 3)
        assert [r.value["n"] for r in d.read("out")] == ["first", "other", "other key"]
        d.commit()
        d.crash()  # the seen ids come back from the changelog
        d.send("in", {"id": 1, "n": "after restart"}, key="a", timestamp=T0 + 4)
        assert d.read("out") == []


def test_a_record_whose_output_a_crash_lost_is_not_dropped_as_a_duplicate() -> None:
    """Before: the seen entry reached the changelog while the record's output was still in
    flight; after a crash the record was read again, found seen, and dropped: its output was
    lost. State changes now wait for the outputs made with them."""
    with TestDriver(_dedup_job(), start_ms=T0) as d:
        d.hold_acks(topics=["out"])  # the output's leader is slow; the changelog's is not
        d.send("in", {"id": 1}, key="a", timestamp=T0)
        d.advance_time("1s")  # commits come and go: the offset waits for the output
        d.crash()
        d.hold_acks(False)
        d.advance_time("1s")
        assert [r.value["id"] for r in d.read("out")] == [1]


def test_drop_duplicates_state_is_bounded_by_the_watermark() -> None:
    with TestDriver(_dedup_job(), start_ms=T0) as d:
        for i in range(10):
            d.send("in", {"id": i}, key="a", timestamp=T0 + i * 1000)
        d.advance_time("1s")
        assert len(d.store("seen")) == 10
        d.send("in", {"id": 99}, key="a", timestamp=T0 + 60_000)  # watermark 50 s
        d.advance_time("1s")
        assert len(d.store("seen")) == 1  # everything older than the watermark expired
        assert len(d.read("out")) == 11
        d.send("in", {"id": 3}, key="a", timestamp=T0 + 3_000)  # late: dropped, counted
        assert d.read("out") == []
        assert sum(t.ctx.late_records for t in d.worker.tasks.values()) == 1


def test_drop_duplicates_within_without_a_watermark_uses_the_steps_own_event_time() -> None:
    with TestDriver(_dedup_job(watermark=None, within="5s"), start_ms=T0) as d:
        d.send("in", {"id": 1}, key="a", timestamp=T0)
        d.send("in", {"id": 1}, key="a", timestamp=T0 + 4_000)  # within 5 s: a duplicate
        d.send("in", {"id": 2}, key="a", timestamp=T0 + 20_000)
        d.advance_time("1s")
        assert [r.value["id"] for r in d.read("out")] == [1, 2]
        assert len(d.store("seen")) == 1  # id 1 expired at 5 s


def test_drop_duplicates_without_bound_warns(caplog: pytest.LogCaptureFixture) -> None:
    with TestDriver(_dedup_job(watermark=None), start_ms=T0) as d:
        d.send("in", {"id": 1}, key="a", timestamp=T0)
    assert "grows without bound" in caplog.text


def _sessions(fn: Any, timeout: str, *, watermark: bool = False, flat: bool = False) -> Job:
    job = Job("gs")
    s = job.stream(KafkaSource("in", key=STR, value=JSON))
    if watermark:
        s = s.with_watermark("0s")
    step = s.flat_map_groups_with_state if flat else s.map_groups_with_state
    step(fn, name="g", timeout=timeout).to(KafkaSink("out", key=STR, value=JSON))
    return job


def _running_total(key: str, values: list[Any], state: GroupState) -> Any:
    if state.has_timed_out:
        total = state.get()
        state.remove()
        return {"user": key, "final": total}
    total = (state.get() or 0) + sum(v["n"] for v in values)
    state.update(total)
    state.set_timeout_duration(10_000)
    return {"user": key, "total": total}


def test_map_groups_with_state_processing_time_timeout() -> None:
    with TestDriver(_sessions(_running_total, "processing_time"), start_ms=T0) as d:
        d.send("in", {"n": 2}, key="a")
        d.send("in", {"n": 3}, key="a")
        assert [r.value for r in d.read("out")] == [{"user": "a", "total": 2},
                                                     {"user": "a", "total": 5}]
        d.advance_time("9s")
        assert d.read("out") == []
        d.send("in", {"n": 1}, key="a")  # new data: the timeout moves 10 s on
        d.advance_time("9.9s")
        assert [r.value for r in d.read("out")] == [{"user": "a", "total": 6}]
        d.advance_time("0.2s")
        assert [r.value for r in d.read("out")] == [{"user": "a", "final": 6}]
        assert len(d.store("g")) == 0  # removed: no state, no timer left


def test_a_pending_timeout_survives_a_crash() -> None:
    with TestDriver(_sessions(_running_total, "processing_time"), start_ms=T0) as d:
        d.send("in", {"n": 4}, key="a")
        d.read("out")
        d.commit()
        d.crash()
        d.advance_time("11s")
        assert [r.value for r in d.read("out")] == [{"user": "a", "final": 4}]


def test_a_timeout_output_lost_in_a_crash_is_made_again() -> None:
    """Before: the timeout's removal reached the changelog while its output was still in
    flight; a crash then lost the output for good (nothing left to time out). The removal
    now waits for the output's acknowledgement."""
    with TestDriver(_sessions(_running_total, "processing_time"), start_ms=T0) as d:
        d.send("in", {"n": 4}, key="a")
        d.read("out")
        d.commit()
        d.hold_acks(topics=["out"])  # the output's leader is slow; the changelog's is not
        d.advance_time("11s")  # the timeout fires; commits come and go meanwhile
        assert d.read("out") == []
        d.crash()
        d.hold_acks(False)
        d.advance_time("11s")
        assert [r.value for r in d.read("out")] == [{"user": "a", "final": 4}]


def test_an_event_time_timeout_output_lost_in_a_crash_is_made_again() -> None:
    with TestDriver(_sessions(_until, "event_time", watermark=True, flat=True),
                    start_ms=T0) as d:
        d.send("in", {"t": T0}, key="a", timestamp=T0)
        d.commit()
        d.hold_acks(topics=["out"])
        d.send("in", {"t": T0 + 6_000}, key="b", timestamp=T0 + 6_000)  # a's timeout fires
        d.advance_time("1s")
        assert d.read("out") == []
        d.crash()
        d.hold_acks(False)
        d.advance_time("1s")
        assert {r.value["user"] for r in d.read("out")} == {"a"}


def test_timeout_outputs_held_for_room_go_without_more_input() -> None:
    """Before: outputs of timeouts that fired while the task waited for records, held for
    room in a full producer queue, stayed held until the next record arrived."""
    with TestDriver(_sessions(_running_total, "processing_time"), start_ms=T0) as d:
        d.send("in", {"n": 1}, key="a")
        d.send("in", {"n": 2}, key="b")
        d.read("out")
        d.limit_queue(1)  # the second timeout's output waits for room
        d.advance_time("11s")
        assert sorted(r.value["final"] for r in d.read("out")) == [1, 2]


def test_a_failed_transaction_under_a_timeout_output_aborts_the_epoch() -> None:
    """Before: the refused produce was taken for the user's function raising, and the job
    stopped with UserFunctionError (under skip, the output was dropped)."""
    with TestDriver(_sessions(_running_total, "processing_time"), start_ms=T0,
                    trigger="100ms") as d:
        d.send("in", {"n": 4}, key="a")
        d.advance_time("200ms")
        assert [r.value for r in d.read("out")] == [{"user": "a", "total": 4}]
        d.fail_transaction()  # the timeout's output finds the transaction failed
        d.advance_time("11s")
        assert d.exception() is None, d.exception()
        assert d.worker.committer.aborts == 1  # type: ignore[attr-defined]
        assert [r.value for r in d.read("out")] == [{"user": "a", "final": 4}]


def _until(key: str, values: list[Any], state: GroupState) -> Any:
    if state.has_timed_out:
        state.remove()
        return [{"user": key, "expired_at_watermark": state.current_watermark_ms()}]
    seen = (state.get() or 0) + len(values)
    state.update(seen)
    state.set_timeout_timestamp(max(v["t"] for v in values) + 5_000)
    return []


def test_flat_map_groups_with_state_event_time_timeout() -> None:
    with TestDriver(_sessions(_until, "event_time", watermark=True, flat=True),
                    start_ms=T0) as d:
        d.send("in", {"t": T0}, key="a", timestamp=T0)
        d.send("in", {"t": T0 + 5_000}, key="b", timestamp=T0 + 5_000)  # wm 5 s: not past
        d.advance_time("1s")
        assert d.read("out") == []
        d.send("in", {"t": T0 + 5_001}, key="b", timestamp=T0 + 5_001)
        d.advance_time("1s")
        assert [r.value for r in d.read("out")] == [
            {"user": "a", "expired_at_watermark": T0 + 5_001}]


def test_groups_in_epoch_mode_get_the_keys_records_of_the_epoch() -> None:
    calls: list[tuple[str, list[int]]] = []

    def fn(key: str, values: list[Any], state: GroupState) -> Any:
        calls.append((key, [v["n"] for v in values]))
        state.update(len(values))
        return {"user": key, "n": len(values)}

    with TestDriver(_sessions(fn, "none"), start_ms=T0,
                    trigger=processing_time("1s")) as d:
        for n in range(3):
            d.send("in", {"n": n}, key="a")
        d.send("in", {"n": 9}, key="b")
        d.advance_time("1s")
        assert sorted(calls) == [("a", [0, 1, 2]), ("b", [9])]
        assert sorted(r.value["n"] for r in d.read("out")) == [1, 3]


def test_group_state_refuses_what_spark_refuses() -> None:
    s = GroupState(None, timeout="none", timed_out=False, now_ms=0, watermark_ms=None)
    assert not s.exists and s.get() is None
    with pytest.raises(JobDefinitionError, match="processing_time"):
        s.set_timeout_duration(10)
    with pytest.raises(JobDefinitionError, match="remove"):
        s.update(None)
    e = GroupState(1, timeout="event_time", timed_out=False, now_ms=5, watermark_ms=100)
    with pytest.raises(JobDefinitionError, match="not after the current watermark"):
        e.set_timeout_timestamp(100)
    assert e.current_watermark_ms() == 100 and e.current_processing_time_ms() == 5
    with pytest.raises(JobDefinitionError, match="'update' only"):
        Job("x").stream(KafkaSource("in")).map_groups_with_state(
            lambda k, v, s: None, name="g", output_mode="append")
