"""Event time on the local broker: windows closed by a watermark that crosses a
repartition topic, through a SIGKILL and a graceful restart in the middle of open windows
(tests/jobs/windowed.py), and drop_duplicates and group-state timeouts in-process.

Event times come from the records (seq * 10 ms), never from the wall clock: the assertions
depend only on which records were sent."""

from __future__ import annotations

import contextlib
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
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
from tests.helpers import (
    PacedProducer,
    committed,
    make_topics,
    produce,
    read_topic,
    unique,
    wait_committed,
    wait_until,
    worker_config,
    worker_process,
)

pytestmark = pytest.mark.slow

BASE = 1_700_000_000_000  # as tests/jobs/windowed.py
REAL_KAFKA = bool(os.environ.get("STREAMCORE_TEST_BOOTSTRAP"))


def _expected(total: int) -> Counter[tuple[str, int]]:
    """Records per (key, window start) for seq 0..total-1."""
    return Counter((f"k{s % 10}", BASE + s * 10 // 1000 * 1000) for s in range(total))


def _windows(bootstrap: str, out: str, expect: int, *, committed_only: bool = False,
             ) -> list[tuple[str, int, int]]:
    msgs = read_topic(bootstrap, out, expect=expect, timeout=120, settle=3.0,
                      committed_only=committed_only)
    rows = []
    for m in msgs:
        key, start, end = orjson.loads(m.key())
        value = orjson.loads(m.value())
        assert value["window"] == {"start": start, "end": end} and end - start == 1000
        rows.append((key, start, value["count"]))
    return rows


def _close_all(bootstrap: str, src: str, total: int) -> None:
    """One record far ahead on every input partition: every upstream task's watermark
    passes every window (the policy is min over them)."""
    produce(bootstrap, src, ((str(p), {"seq": total + 1000 + p, "p": p}, p) for p in range(4)))


@pytest.mark.parametrize("mode", ["continuous", "epoch"])
def test_windows_survive_sigkill_and_graceful_restart(bootstrap: str, tmp_path: Path,
                                                      mode: str) -> None:
    src, out, late, name = (unique("win-in"), unique("win-out"), unique("win-late"),
                            unique("win"))
    make_topics(bootstrap, src, out, late)
    env = {"IN": src, "OUT": out, "LATE": late, "JOB": name,
           "STREAMCORE_STATE_DIR": str(tmp_path / "state")}
    args = ["--mode", "epoch", "--trigger", "300ms"] if mode == "epoch" else []
    # Every upstream task reports before the paced records come (a window task's watermark
    # follows the upstream tasks that have reported: README, event time), so that none of
    # them can be late whichever partition the first worker reads first.
    produce(bootstrap, src, [(str(p), {"seq": p, "p": p}, p) for p in range(4)])
    with contextlib.ExitStack() as stack:
        w = stack.enter_context(worker_process("windowed.py", bootstrap, env, args))
        w.wait_for("assigned")
        _caught_up(bootstrap, name, src, 3, [f"{name}-counts-repartition"])
        producer = stack.enter_context(PacedProducer(bootstrap, src, rate=1000, first=4))
        wait_committed(bootstrap, name, f"{name}-counts-repartition", 1000)
        w.kill()  # SIGKILL with windows open and records arriving
        with worker_process("windowed.py", bootstrap, env, args) as w:
            w.wait_for("assigned")
            wait_committed(bootstrap, name, src, producer.sent + 300)
            w.signal(signal.SIGTERM)  # a graceful stop, windows still open
            assert w.wait(60) == 0, w.tail()
        with worker_process("windowed.py", bootstrap, env, args) as w:
            w.wait_for("assigned")
            total = producer.stop()
            _close_all(bootstrap, src, total)
            expected = _expected(total)
            rows = _windows(bootstrap, out, expect=len(expected),
                            committed_only=mode == "epoch")
            w.signal(signal.SIGTERM)
            assert w.wait(60) == 0, w.tail()
    counts: dict[tuple[str, int], list[int]] = {}
    for key, start, n in rows:
        counts.setdefault((key, start), []).append(n)
    missing = set(expected) - set(counts)
    assert not missing, f"windows never emitted: {sorted(missing)[:5]}"
    short = {w: (c, expected[w]) for w, c in counts.items()
             if w in expected and min(c) < expected[w]}
    if short:  # say whether the missing records were dropped as late or lost outright
        late_seqs = sorted(orjson.loads(m.value())["seq"] for m in read_topic(
            bootstrap, late, expect=0, timeout=10, settle=2.0))
        raise AssertionError(
            f"windows emitted with records lost: {list(short.items())[:5]} "
            f"({len(short)} windows); {len(late_seqs)} records went to the late topic, "
            f"seq {late_seqs[:3]}..{late_seqs[-3:]}")
    if mode == "epoch" and REAL_KAFKA:  # exactly once: each window once, exactly its records
        assert {w: c for w, c in counts.items() if w in expected} == \
            {w: [n] for w, n in expected.items()}
    # On the local broker, read_committed readers see an aborted transaction's records
    # (DESIGN.md section 9): the window step reads again what the killed worker's open
    # epoch wrote to the repartition topic, so only "nothing lost" holds there. The test
    # driver checks epoch-mode windows across a crash exactly (tests/unit/test_windows.py).


def _caught_up(bootstrap: str, group: str, src: str, beyond: int, reps: list[str]) -> None:
    """Until the group has committed more than beyond records of src, then everything now
    in each repartition topic of reps: what the upstream tasks wrote, the window tasks have
    read (markers included)."""
    wait_committed(bootstrap, group, src, beyond)
    for topic in reps:
        _read_all(bootstrap, group, topic)


def _read_all(bootstrap: str, group: str, topic: str) -> None:
    """Until the group has committed everything now in topic (markers included)."""
    last: dict[int, int] = {}
    for m in read_topic(bootstrap, topic, expect=1, timeout=30, settle=2.0):
        last[m.partition()] = max(last.get(m.partition(), -1), m.offset())
    wait_until(lambda: all(committed(bootstrap, group, topic).get(p, -1) > off
                           for p, off in last.items()),
               60, f"{group} to read all of {topic}", interval=0.25)


@pytest.mark.parametrize(("mode", "chain"), [("continuous", False), ("epoch", False),
                                             ("continuous", True)])
def test_a_restart_does_not_make_the_records_of_a_lagging_upstream_partition_late(
        bootstrap: str, tmp_path: Path, mode: str, chain: bool) -> None:
    # Partition 3 lags behind the others across a graceful restart (on a fresh state
    # directory: the window tasks restore from their changelogs). Its records must still
    # count: the restarted window tasks go on holding the watermark at partition 3's, as the
    # first worker did, though partition 3 has written nothing since the restart. With
    # chain, a second repartition comes first: its tasks have no store.
    src, out, late, name = (unique("lag-in"), unique("lag-out"), unique("lag-late"),
                            unique("lag"))
    make_topics(bootstrap, src, out, late)
    reps = [f"{name}-mid-repartition"] * chain + [f"{name}-counts-repartition"]

    def seqs(lo: int, hi: int, parts: set[int]) -> list[tuple[None, dict[str, int], int]]:
        return [(None, {"seq": s}, s % 4) for s in range(lo, hi) if s % 4 in parts]

    env = {"IN": src, "OUT": out, "LATE": late, "JOB": name, "CHAIN": "1" if chain else "0"}
    args = ["--mode", "epoch", "--trigger", "300ms"] if mode == "epoch" else []
    # A window task's watermark follows the upstream tasks that have reported (README,
    # event time): every one reports first, so that none of the first records can be late
    # whichever partition the worker reads first.
    produce(bootstrap, src, seqs(0, 4, {0, 1, 2, 3}))
    with worker_process("windowed.py", bootstrap,
                        {**env, "STREAMCORE_STATE_DIR": str(tmp_path / "a")}, args) as w:
        w.wait_for("assigned")
        _caught_up(bootstrap, name, src, 3, reps)
        produce(bootstrap, src, seqs(4, 200, {0, 1, 2, 3}))  # event time to 2 s everywhere
        _caught_up(bootstrap, name, src, 199, reps)
        w.signal(signal.SIGTERM)
        assert w.wait(60) == 0, w.tail()
    produce(bootstrap, src, seqs(200, 600, {0, 1, 2}))  # 2 to 6 s, partition 3 still at 2 s
    with worker_process("windowed.py", bootstrap,
                        {**env, "STREAMCORE_STATE_DIR": str(tmp_path / "b")}, args) as w:
        w.wait_for("assigned")
        _caught_up(bootstrap, name, src, 499, reps)  # partitions 0 to 2's markers are read
        produce(bootstrap, src, seqs(200, 600, {3}))  # partition 3 catches up
        _close_all(bootstrap, src, 600)
        rows = _windows(bootstrap, out, expect=len(_expected(600)),
                        committed_only=mode == "epoch")
        w.signal(signal.SIGTERM)
        assert w.wait(60) == 0, w.tail()
    late_seqs = [orjson.loads(m.value())["seq"] for m in read_topic(
        bootstrap, late, expect=0, timeout=10, settle=1.0)]
    assert late_seqs == [], f"{len(late_seqs)} records late, seq {sorted(late_seqs)[:5]}.."
    assert sorted(rows) == sorted((k, start, n) for (k, start), n in _expected(600).items())


def _cfg(bootstrap: str, **kw: Any) -> WorkerConfig:
    return worker_config(bootstrap, **kw)


def test_drop_duplicates_and_a_group_state_timeout_on_the_broker(bootstrap: str) -> None:
    src, out, name = unique("gs-in"), unique("gs-out"), unique("gs")
    make_topics(bootstrap, src, out)

    def session(key: str, values: list[Any], state: GroupState) -> Any:
        if state.has_timed_out:
            n = state.get()
            state.remove()
            return {"user": key, "closed": n}
        state.update((state.get() or 0) + len(values))
        state.set_timeout_duration(1500)
        return None

    job = Job(name)
    (job.stream(KafkaSource(src, key=STR, value=JSON))
        .drop_duplicates(lambda v: v["id"], within="1h", name="dedup")
        .map_groups_with_state(session, name="sessions", timeout="processing_time")
        .to(KafkaSink(out, key=STR, value=JSON)))
    # Each of 20 users sends 5 distinct ids, each twice: the duplicates must not count.
    produce(bootstrap, src, ((f"u{u}", {"id": i}, None)
                             for u in range(20) for i in list(range(5)) * 2))
    q = job.start(_cfg(bootstrap, state_dir=str(Path(unique("/tmp/gs-state")))))
    try:
        msgs = read_topic(bootstrap, out, expect=20, timeout=60, settle=3.0)
    finally:
        q.stop(30)
    assert q.exception() is None, q.exception()
    closed = {m.key().decode(): orjson.loads(m.value())["closed"] for m in msgs}
    assert closed == {f"u{u}": 5 for u in range(20)}


def _every_kind(name: str, topics: dict[str, str]) -> Job:
    """Hopping, sliding and session counts, a reduce_by_key_and_window with an inverse and
    a group state with an event-time timeout, all in append mode, on one watermark; "tick"
    records move event time and reach no step."""

    def until_quiet(key: str, values: list[Any], state: GroupState) -> Any:
        if state.has_timed_out:
            n = state.get()
            state.remove()
            return [{"user": key, "records": n}]
        state.update((state.get() or 0) + len(values))
        state.set_timeout_timestamp(max(v["t"] for v in values) + 10_000)
        return []

    job = Job(name)
    s = (job.stream(KafkaSource(topics["in"], key=STR, value=JSON)).with_watermark("2s")
         .filter(lambda v: v["x"] is not None))
    for kind, window in (("hop", Hopping("10s", "5s")), ("slide", Sliding("4s")),
                         ("session", Session("3s"))):
        (s.window(window).count(name=kind)
            .to(KafkaSink(topics[kind], key=JSON, value=JSON), output_mode="append"))
    (s.map(lambda v: v["x"])
        .reduce_by_key_and_window(lambda a, b: a + b, Hopping("10s", "5s"),
                                  inverse=lambda a, b: a - b, name="rbkw")
        .to(KafkaSink(topics["rbkw"], key=JSON, value=JSON), output_mode="append"))
    (s.flat_map_groups_with_state(until_quiet, name="groups", timeout="event_time")
        .to(KafkaSink(topics["groups"], key=STR, value=JSON)))
    return job


def _events() -> list[tuple[str, int, int | None]]:
    """(key, event time, x): keys a-c over two minutes, slightly out of order (within the
    watermark's delay), with a quiet spell (sessions end); a stops a third of the way in and
    b two thirds (their group timeouts fire, whatever the batching); then ticks that close
    everything."""
    out: list[tuple[str, int, int | None]] = []
    for i in range(240):
        t = BASE + i * 500 + (700 if i % 7 == 3 else 0)
        if 100 <= i < 108:  # 4.5 s: every session ends, no group times out
            continue
        keys = "abc" if i < 80 else "bc" if i < 160 else "c"
        out.append((keys[i % len(keys)], t, i % 5))
    out += [("tick", BASE + 200_000 + i * 1000, None) for i in range(3)]
    return out


def test_every_window_kind_gives_on_the_broker_what_it_gives_in_the_driver(
        bootstrap: str, tmp_path: Path) -> None:
    from confluent_kafka import Producer

    from streamcore.core.logs import librdkafka_logger
    from streamcore.testing import TestDriver

    kinds = ("hop", "slide", "session", "rbkw", "groups")
    topics = {k: unique(f"kinds-{k}") for k in ("in", *kinds)}
    for topic in topics.values():
        make_topics(bootstrap, topic, partitions=1)
    events = _events()
    expected: dict[str, Counter[tuple[bytes, bytes]]] = {}
    with TestDriver(_every_kind("kinds", {k: k for k in topics}), start_ms=BASE) as d:
        for key, t, x in events:
            d.send("in", {"x": x, "t": t}, key=key, timestamp=t)
        d.advance_time("1s")
        for k in kinds:
            expected[k] = Counter((orjson.dumps(r.key) if k != "groups" else r.key.encode(),
                                   orjson.dumps(r.value)) for r in d.read(k))
    assert all(expected[k] for k in kinds), "the driver run must emit something per kind"

    p = Producer({"bootstrap.servers": bootstrap, "logger": librdkafka_logger()})
    for key, t, x in events:
        p.produce(topics["in"], orjson.dumps({"x": x, "t": t}), key.encode(), timestamp=t)
    assert p.flush(30) == 0
    q = _every_kind(unique("kinds"), topics).start(
        _cfg(bootstrap, state_dir=str(tmp_path / "state")))
    try:
        got = {k: Counter((m.key(), orjson.dumps(orjson.loads(m.value())))
                          for m in read_topic(bootstrap, topics[k],
                                              expect=sum(expected[k].values()),
                                              partitions=1, timeout=60, settle=2.0))
               for k in kinds}
    finally:
        q.stop(30)
    assert q.exception() is None, q.exception()
    for k in kinds:
        assert got[k] == expected[k], k


def test_an_event_time_of_zero_crosses_a_repartition_topic_on_the_broker(
        bootstrap: str, tmp_path: Path) -> None:
    """librdkafka produces a timestamp of 0 as the time of the write: the key_by's write
    carries event time 0 as -1 (Kafka's "no timestamp"), read back as 0 (the driver's test
    is tests/unit/test_windows.py)."""
    src, out = unique("zero-in"), unique("zero-out")
    make_topics(bootstrap, src, out, partitions=1)
    job = Job(unique("zero"))
    (job.stream(KafkaSource(src, key=STR, value=JSON, timestamp=lambda v: v["t"]))
        .with_watermark("1s")
        .key_by(lambda v: v["k"])
        .window(Tumbling("1s"))
        .count(name="counts")
        .to(KafkaSink(out, key=JSON, value=JSON), output_mode="append"))
    produce(bootstrap, src, (("a", {"k": "a", "t": t}, 0) for t in (0, 100, 5_000)))
    q = job.start(_cfg(bootstrap, state_dir=str(tmp_path / "state")))
    try:
        msgs = read_topic(bootstrap, out, expect=1, partitions=1, timeout=60, settle=2.0)
    finally:
        q.stop(30)
    assert q.exception() is None, q.exception()
    assert [(orjson.loads(m.key()), orjson.loads(m.value())["count"]) for m in msgs] == \
        [(["a", 0, 1_000], 2)]
