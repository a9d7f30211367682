"""Random histories in the test driver: sends, the manual clock, commits, crashes, graceful
restarts, held acknowledgements, refused commits, a small producer queue, lost partitions
(max.poll.interval.ms passed) and (in epoch mode) aborted and failed transactions, in a
random order. Whatever happens, nothing is lost:
every record sent is in the final state and the outputs (continuous mode: at least once;
epoch mode: exactly once).

Each history comes from its seed, so a failure names a history that can be replayed. The
default runs a few seeds per job; ``STREAMCORE_HISTORIES=200`` runs more, and
``STREAMCORE_HISTORY_SEED=1000`` starts them elsewhere (this found the
defects fixed with tests in test_group_state, test_windows and test_epochs)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from streamcore import (
    JSON,
    STR,
    GroupState,
    Hopping,
    Job,
    KafkaSink,
    KafkaSource,
    Session,
    Sliding,
    Tumbling,
    WorkerConfig,
)
from streamcore.testing import TestDriver

T0 = 1_700_000_000_000
# A "lose" step outlasts max.poll.interval.ms: the next serve loses the partitions and joins
# again (the in-memory consumer models it as librdkafka does). An "expire" step has the
# coordinator drop the member (its session expired): the partitions are lost without a stall.
_CONFIG = WorkerConfig(commit_interval="300ms", consumer={"max.poll.interval.ms": 300})
# STREAMCORE_HISTORY_SEED moves the range: a long run can try histories no earlier run tried.
_FIRST_SEED = int(os.environ.get("STREAMCORE_HISTORY_SEED", "0"))
SEEDS = range(_FIRST_SEED, _FIRST_SEED + int(os.environ.get("STREAMCORE_HISTORIES", "2")))
STEPS = 40


def _union(ids: list[int], v: dict[str, Any]) -> list[int]:
    return sorted({*ids, v["id"]})  # applying a record twice changes nothing


def _append(ids: list[int], v: dict[str, Any]) -> list[int]:
    return [*ids, v["id"]]  # applying a record twice shows


def _keyed(epochs: bool) -> Job:
    job = Job("keyed", config=_CONFIG)
    (job.stream(KafkaSource("in", value=JSON))
        .key_by(lambda v: v["user"])
        .aggregate(list, _append if epochs else _union, name="ids")
        .to_stream()
        .to(KafkaSink("out", key=STR, value=JSON)))
    return job


def _windows_job(name: str, window: Any, step: str, **merge: Any) -> Job:
    """Per user, the ids of each event-time window, written once it closes."""
    job = Job(name, config=_CONFIG)
    (job.stream(KafkaSource("in", value=JSON, timestamp=lambda v: v["ts"]))
        .with_watermark("1s")
        .key_by(lambda v: v["user"])
        .window(window)
        .aggregate(list, _union, name=step, **merge)
        .to(KafkaSink("out", key=JSON, value=JSON), output_mode="append"))
    return job


def _windowed(epochs: bool) -> Job:
    return _windows_job("windowed", Tumbling("1s"), "windows")


def _session_windows(epochs: bool) -> Job:
    return _windows_job("sessionwindows", Session("300ms"), "sessions",
                        merge=lambda a, b: sorted({*a, *b}))


def _sliding_windows(epochs: bool) -> Job:
    return _windows_job("slidingwindows", Sliding("500ms"), "slides")


def _panes(epochs: bool) -> Job:
    """reduce_by_key_and_window: per user, the ids of each 1 s window every 250 ms."""
    job = Job("panes", config=_CONFIG)
    (job.stream(KafkaSource("in", value=JSON, timestamp=lambda v: v["ts"]))
        .with_watermark("1s")
        .key_by(lambda v: v["user"])
        .map(lambda v: [v["id"]])
        .reduce_by_key_and_window(lambda a, b: sorted({*a, *b}), Hopping("1s", "250ms"),
                                  name="panes")
        .to(KafkaSink("out", key=JSON, value=JSON), output_mode="append"))
    return job


def _dedup(epochs: bool) -> Job:
    job = Job("dedup", config=_CONFIG)
    (job.stream(KafkaSource("in", key=STR, value=JSON, timestamp=lambda v: v["ts"]))
        .with_watermark("1s")
        .drop_duplicates(lambda v: v["id"], within="5s", name="seen")
        .to(KafkaSink("out", key=STR, value=JSON)))
    return job


def _session(user: str, values: list[Any], state: GroupState) -> Any:
    """The ids of a user's session, emitted when it has seen nothing for a second."""
    if state.has_timed_out:
        ids = state.get()
        state.remove()
        return {"user": user, "ids": ids}
    state.update(sorted({*(state.get() or []), *(v["id"] for v in values)}))
    state.set_timeout_duration(1000)
    return None


def _sessions(epochs: bool) -> Job:
    job = Job("sessions", config=_CONFIG)
    (job.stream(KafkaSource("in", key=STR, value=JSON))
        .map_groups_with_state(_session, timeout="processing_time", name="sessions")
        .to(KafkaSink("out", key=STR, value=JSON)))
    return job


Windows = dict[tuple[str, int, int], set[int]]  # (user, start, end) -> the ids inside


@dataclass
class History:
    """What was sent: per user, the ids in order; per id, its event time."""
    sent: dict[str, list[int]] = field(default_factory=dict)
    ts: dict[int, int] = field(default_factory=dict)
    user: dict[int, str] = field(default_factory=dict)
    ops: list[str] = field(default_factory=list)


def _play(d: TestDriver, rnd: random.Random, h: History, *, epochs: bool,
          repeats: bool, steps: int = STEPS, losses: bool = True,
          expiries: bool = True) -> list[Any]:
    """STEPS random steps; returns every record read from "out". Event times run forward
    with less disorder than the watermark's delay, so that no record is ever late."""
    out: list[Any] = []
    clock = T0
    held = False
    ops = ["send", "burst", "time", "commit", "crash", "restart", "hold", "hold_out",
           "release", "refuse_commits", "queue", "lose", "abort", "fail_txn", "expire"]
    weights = [30, 10, 15, 5, 6, 4, 3, 2, 6, 3, 3, 2 if losses else 0, 3 if epochs else 0,
               2 if epochs else 0, 2 if expiries else 0]  # a weight 0 keeps the other
    # steps' draws as they were (the seeds of the regression tests below)
    for _ in range(steps):
        op = rnd.choices(ops, weights)[0]
        h.ops.append(op)
        if op in ("send", "burst"):
            records = []
            for _ in range(1 if op == "send" else rnd.randint(2, 6)):
                if repeats and h.user and rnd.random() < 0.3:  # an id sent before, again
                    i = rnd.choice(list(h.user)[-5:])
                    u = h.user[i]
                else:
                    i, u = len(h.user), rnd.choice("abcd")
                    clock += rnd.randint(0, 300)
                    h.user[i], h.ts[i] = u, clock - rnd.randint(0, 800)
                    h.sent.setdefault(u, []).append(i)
                records.append((u, {"user": u, "id": i, "ts": h.ts[i]}))
            d.send_many("in", records)
        elif op == "time":
            d.advance_time(rnd.choice(["50ms", "150ms", "300ms", "1s"]))
        elif op == "commit":
            d.commit()
        elif op == "crash":
            d.crash()
        elif op == "restart":
            d.restart(release_acks=held)  # held forever, a graceful stop could not end
            held = False
        elif op in ("hold", "hold_out", "release"):
            held = op != "release"  # hold_out: the output's leader alone is slow
            d.hold_acks(held, topics=["out"] if op == "hold_out" else None)
        elif op == "refuse_commits":
            d.fail_commits(rnd.random() < 0.5)
        elif op == "queue":
            d.limit_queue(rnd.choice([None, 1, 3]))
        elif op == "lose":
            time.sleep(0.35)  # no serve of the group for longer than max.poll.interval.ms
        elif op == "abort":
            d.abort_next_epoch(rnd.randint(1, 2))
        elif op == "fail_txn":
            d.fail_transaction()
        else:
            d.expire_session()  # the coordinator drops the member: its partitions are lost
        out += d.read("out")
        assert not d.stopped(), f"the job stopped: {d.exception()!r}"
    d.hold_acks(False)
    d.limit_queue(None)
    d.fail_commits(False)
    for p in (0, 1):  # a watermark past every window, on both input partitions
        d.send("in", {"user": "z", "id": -1, "ts": clock + 10_000}, key="z", partition=p)
    d.advance_time("2s")
    d.commit()
    return out + d.read("out")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("trigger", [None, "200ms"], ids=["continuous", "epochs"])
def test_a_keyed_aggregate_loses_nothing(trigger: str | None, seed: int) -> None:
    _keyed_history(trigger, seed, STEPS)


def _keyed_history(trigger: str | None, seed: int, steps: int, *,
                   expiries: bool = True) -> None:
    epochs = trigger is not None
    h = History()
    with TestDriver(_keyed(epochs), partitions=2, trigger=trigger) as d:
        out = _play(d, random.Random(seed), h, epochs=epochs, repeats=False, steps=steps,
                    expiries=expiries)
        state = dict(d.store("ids"))
    for u, ids in h.sent.items():
        want = ids if epochs else sorted(set(ids))  # epoch mode: each id once, in order
        assert state[u] == want, h.ops
        updates = [r.value for r in out if r.key == u]
        assert updates[-1] == want, h.ops
        if epochs:  # every update exactly once: the n-th one holds the first n ids
            assert updates == [ids[:n + 1] for n in range(len(ids))], h.ops


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("trigger", [None, "200ms"], ids=["continuous", "epochs"])
def test_windows_are_emitted_whole(trigger: str | None, seed: int) -> None:
    _windows_history(_windowed, _tumbling_windows_of, trigger, seed, STEPS)


def _tumbling_windows_of(h: History) -> Windows:
    want: Windows = {}  # 1 s tumbling windows
    for i, u in h.user.items():
        start = h.ts[i] - h.ts[i] % 1000
        want.setdefault((u, start, start + 1000), set()).add(i)
    return want


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("trigger", [None, "200ms"], ids=["continuous", "epochs"])
def test_session_windows_are_emitted_whole(trigger: str | None, seed: int) -> None:
    _windows_history(_session_windows, _session_windows_of, trigger, seed, STEPS)


def test_a_long_history_of_session_windows_emits_each_session_whole() -> None:
    """A 100-step history. Before 9f0bab9 and d68fa8b a partition lost in the middle of a
    flush could leave a replaced session's tombstone without the session merged from it: a
    session was emitted without its first records, which were lost."""
    _windows_history(_session_windows, _session_windows_of, None, 228, 100)


def _session_windows_of(h: History) -> Windows:
    want: Windows = {}  # sessions: gaps under 300 ms merge
    for u in h.sent:
        times = sorted((h.ts[i], i) for i in h.sent[u])
        runs = [[times[0]]]
        for t, i in times[1:]:
            if t < runs[-1][-1][0] + 300:
                runs[-1].append((t, i))
            else:
                runs.append([(t, i)])
        want.update({(u, r[0][0], r[-1][0] + 300): {i for _, i in r} for r in runs})
    return want


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("trigger", [None, "200ms"], ids=["continuous", "epochs"])
def test_sliding_windows_are_emitted_whole(trigger: str | None, seed: int) -> None:
    _windows_history(_sliding_windows, _sliding_windows_of, trigger, seed, STEPS)


def test_a_long_history_of_sliding_windows_emits_every_window() -> None:
    """A 100-step history. Before ff3eb8d a record read again after a restart was dropped
    as late once the saved watermark passed its time, though a window still open held it:
    that window was never emitted."""
    _windows_history(_sliding_windows, _sliding_windows_of, None, 527, 100)


def _sliding_windows_of(h: History) -> Windows:
    want: Windows = {}  # Kafka Streams' windows, d = 500 ms
    for u, ids in h.sent.items():
        times = [h.ts[i] for i in ids]
        wins = {(t - 500, t) for t in times}
        wins |= {(t + 1, t + 501) for t in times if any(t < x <= t + 501 for x in times)}
        want.update({(u, s, e): {i for i in ids if s <= h.ts[i] <= e} for s, e in wins})
    return want


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("trigger", [None, "200ms"], ids=["continuous", "epochs"])
def test_reduce_by_key_and_window_emits_windows_whole(trigger: str | None, seed: int) -> None:
    _windows_history(_panes, _panes_of, trigger, seed, STEPS)


def test_a_long_history_of_panes_emits_every_window_whole() -> None:
    """A 100-step history. Before the fix, the end of the last window emitted moved behind a
    later commit's watermark in a flush that held two commits' writes; a crash left the
    panes it let go deleted and it behind, and the restart emitted windows without them."""
    _windows_history(_panes, _panes_of, None, 720, 100)


def _panes_of(h: History) -> Windows:
    want: Windows = {}  # [s, s + 1 s) for s every 250 ms
    for i, u in h.user.items():
        first = h.ts[i] - h.ts[i] % 250
        for s in range(first - 750, first + 1, 250):
            want.setdefault((u, s, s + 1000), set()).add(i)
    return want


def _windows_history(job: Callable[[bool], Job], windows_of: Callable[[History], Windows],
                     trigger: str | None, seed: int, steps: int) -> None:
    """Play a windowed job's history; every window of the data is emitted whole (at least
    once in continuous mode, exactly once in epoch mode)."""
    h = History()
    with TestDriver(job(trigger is not None), partitions=2, trigger=trigger) as d:
        out = _play(d, random.Random(seed), h, epochs=trigger is not None, repeats=False,
                    steps=steps)
    _check_emitted_whole(out, windows_of(h), h, exactly_once=trigger is not None)


def _check_emitted_whole(out: list[Any], want: Windows,
                         h: History, *, exactly_once: bool) -> None:
    emitted: dict[tuple[str, int, int], int] = {}
    for r in out:
        if r.key[0] != "z":
            key = tuple(r.key)
            assert set(r.value["value"]) == want.get(key), (key, h.ops)  # never partial
            emitted[key] = emitted.get(key, 0) + 1
    assert set(emitted) == set(want), h.ops  # every window closed, at least once
    if exactly_once:
        assert set(emitted.values()) == {1}, h.ops  # and exactly once in epoch mode


def test_a_long_epoch_history_with_failed_transactions_keeps_every_window_once() -> None:
    """A 100-step history. Before 77be1a2 an idle task handed a held window row to the
    producer between an aborted transaction and the next one, and the worker stopped
    ("produce outside a transaction"): windows were missing. Before the fix tested by
    test_windows' test_window_rows_held_for_room_when_the_epoch_aborts_are_not_sent_again,
    18 windows came twice."""
    h = History()
    with TestDriver(_windowed(True), partitions=2, trigger="200ms") as d:
        out = _play(d, random.Random(502), h, epochs=True, repeats=False, steps=100,
                    losses=False, expiries=False)  # the history that found it
    emitted = [(r.key[0], r.key[1]) for r in out if r.key[0] != "z"]
    assert sorted(emitted) == sorted({(h.user[i], h.ts[i] - h.ts[i] % 1000)
                                      for i in h.user}), h.ops


def test_a_long_epoch_history_with_lost_partitions_applies_every_record_once() -> None:
    """A 200-step history with lost partitions. Before: a task fenced while an epoch ended
    (the group not served past max.poll.interval.ms) had its outputs and offsets committed
    with the epoch but not its state (its stores were abandoned): three records were missing
    from the state and from every later update."""
    _keyed_history("200ms", 804, 200, expiries=False)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("trigger", [None, "200ms"], ids=["continuous", "epochs"])
def test_drop_duplicates_keeps_every_first_record(trigger: str | None, seed: int) -> None:
    h = History()
    with TestDriver(_dedup(trigger is not None), partitions=2, trigger=trigger) as d:
        out = _play(d, random.Random(seed), h, epochs=trigger is not None, repeats=True)
    ids = [r.value["id"] for r in out if r.value["id"] >= 0]
    assert set(ids) == set(h.user), h.ops
    if trigger is not None:
        assert len(ids) == len(set(ids)), h.ops


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("trigger", [None, "200ms"], ids=["continuous", "epochs"])
def test_every_record_reaches_a_timed_out_session(trigger: str | None, seed: int) -> None:
    _sessions_history(trigger, seed, STEPS)


def test_a_long_epoch_history_times_each_session_out_once() -> None:
    """A 200-step history. Before: a processing-time timeout fired while an epoch was
    ending, with the gate closed; its output went into that epoch's transaction and its
    state change (the session's removal) into the next epoch, which a crash lost: after the
    restart 44 records' sessions timed out, and were written, a second time."""
    _sessions_history("200ms", 801, 200, expiries=False)


def _sessions_history(trigger: str | None, seed: int, steps: int, *,
                      expiries: bool = True) -> None:
    h = History()
    with TestDriver(_sessions(trigger is not None), partitions=2, trigger=trigger) as d:
        out = _play(d, random.Random(seed), h, epochs=trigger is not None, repeats=False,
                    steps=steps, expiries=expiries)
    emitted = [i for r in out for i in r.value["ids"] if i >= 0]
    assert set(emitted) == set(h.user), h.ops
    if trigger is not None:
        assert len(emitted) == len(set(emitted)), h.ops  # each in one session, once
