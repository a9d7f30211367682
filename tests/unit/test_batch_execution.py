"""Batch-at-a-time execution (streamcore.runtime.batches) emits exactly what record-at-a-time
execution emits: the same outputs in the same order, the same dead-letter records among them,
the same failure under on_error="fail" and the same committed offsets, on random chains of
stateless steps with random failures (hypothesis), on the test driver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, WorkerConfig
from streamcore.runtime.batches import FusedAggregate
from streamcore.testing import TestDriver

T0 = 1_700_000_000_000
POLICIES = ("skip", "dead_letter", "fail")


@dataclass(frozen=True)
class Step:
    kind: str  # map, filter, key_by, peek, with_timestamps
    a: int  # the step's parameter
    fails_on: int  # raises on values divisible by this (0: never)
    policy: str | None  # None: the job's policy


steps = st.builds(
    Step, st.sampled_from(["map", "filter", "key_by", "peek", "with_timestamps"]),
    st.integers(2, 7), st.sampled_from([0, 0, 5, 7, 11]),
    st.sampled_from([None, *POLICIES]))


def _fn(step: Step) -> Any:
    def check(v: int) -> None:
        if step.fails_on and v % step.fails_on == 0:
            raise ValueError(f"{step.kind} refuses {v}")

    if step.kind == "map":
        def map_(v: int) -> int:
            check(v)
            return v * step.a + 1
        return map_
    if step.kind == "filter":
        def filter_(v: int) -> bool:
            check(v)
            return v % step.a != 0
        return filter_
    if step.kind == "key_by":
        def key_by(v: int) -> str:
            check(v)
            return f"k{v % step.a}"
        return key_by
    if step.kind == "peek":
        def peek(v: int) -> None:
            check(v)
        return peek

    def with_ts(v: int) -> int:
        check(v)
        return T0 + v * step.a
    return with_ts


def _job(chain: list[Step], policy: str, tail: str, batch: bool) -> Job:
    job = Job("prop", on_error=policy, config=WorkerConfig(batch_execution=batch,
                                                         commit_interval="100ms"))
    s = job.stream(KafkaSource("in", key=STR, value=JSON))
    for step in chain:
        kw = {} if step.policy is None else {"on_error": step.policy}
        s = getattr(s, step.kind)(_fn(step), **kw)
    if tail == "aggregate":  # a stateful step behind a repartition, then a sink
        s = s.key_by(lambda v: f"k{v % 3}").aggregate(
            lambda: 0, lambda total, v: total + v, name="sum").to_stream()
    elif tail.startswith("aggregate-"):  # fused with the run (batches.FusedAggregate)
        agg_policy = tail.removeprefix("aggregate-")
        on_error: dict[str, Any] = {} if agg_policy == "job" else {"on_error": agg_policy}

        def add(total: int, v: int) -> int:
            if v % 13 == 0:
                raise ValueError(f"aggregate refuses {v}")
            return total + v
        s = s.aggregate(lambda: 0, add, name="sum", **on_error).to_stream()
    elif tail == "fan-out":  # two sinks after the run
        s.to(KafkaSink("side", key=STR, value=JSON))
    s.to(KafkaSink("out", key=STR, value=JSON))
    return job


def _run(chain: list[Step], policy: str, tail: str, inputs: list[Any], batch: bool,
         ) -> dict[str, Any]:
    with TestDriver(_job(chain, policy, tail, batch), partitions=2, start_ms=T0) as d:
        d.send_many("in", [(f"u{i % 4}", v) for i, v in enumerate(inputs)])
        d.advance_time("1s")
        failure = d.exception()
        if tail.startswith("aggregate-") and failure is None:
            d.crash()  # the state as restored from the changelog: what was committed
        return {
            "state": dict(d.store("sum"))
            if tail.startswith("aggregate-") and failure is None else {},
            "out": [(r.partition, r.key, r.value, r.timestamp) for r in d.read("out")],
            "side": [(r.partition, r.key, r.value) for r in d.read("side")]
            if tail == "fan-out" else [],
            "dlq": [(r.partition, r.value, dict(r.headers or [])
                     .get("streamcore.error.step")) for r in d.read("prop-dlq")]
            if "prop-dlq" in d.cluster.topics else [],
            "failure": None if failure is None else (type(failure).__name__, str(failure)),
            "committed": d.committed("in"),
        }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=st.lists(steps, min_size=1, max_size=5),
       policy=st.sampled_from(POLICIES),
       tail=st.sampled_from(["sink", "sink", "aggregate", "fan-out", "aggregate-job",
                             *(f"aggregate-{p}" for p in POLICIES)]),
       inputs=st.lists(st.integers(1, 200), min_size=1, max_size=60))
def test_batch_execution_equals_record_execution(chain: list[Step], policy: str, tail: str,
                                                 inputs: list[int]) -> None:
    assert _run(chain, policy, tail, inputs, batch=True) == \
        _run(chain, policy, tail, inputs, batch=False)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_failure_in_the_middle_of_a_batch_is_handled_at_its_place(policy: str) -> None:
    """One fetched batch of 10, the map failing on the 5th: outputs before it, its policy at
    its place (the DLQ write, the skip, or the stop with nothing from it on written)."""
    chain = [Step("map", 1, 0, None), Step("filter", 1000, 0, None)]
    results = {}
    for batch in (True, False):
        job = Job("mid", on_error=policy, config=WorkerConfig(batch_execution=batch))

        def fn(v: int) -> int:
            if v == 5:
                raise ValueError("five")
            return v * 10

        (job.stream(KafkaSource("in", value=JSON)).map(fn).filter(_fn(chain[1]))
            .to(KafkaSink("out", value=JSON)))
        with TestDriver(job) as d:
            d.send_many("in", list(range(1, 11)))
            d.advance_time("1s")
            out = [r.value for r in d.read("out")]
            dlq = [r.value for r in d.read("mid-dlq")] if "mid-dlq" in d.cluster.topics \
                else []
            results[batch] = (out, dlq, type(d.exception()).__name__, d.committed("in"))
    assert results[True] == results[False]
    out, dlq, failure, committed = results[True]
    if policy == "fail":
        assert out == [10, 20, 30, 40] and failure == "UserFunctionError"
        assert committed in ({}, {0: 4})  # never past the failing record (offset 4)
    else:
        assert out == [10, 20, 30, 40, 60, 70, 80, 90, 100]
        assert dlq == ([b"5"] if policy == "dead_letter" else [])


@pytest.mark.parametrize("trigger", ["continuous", "100ms"], ids=["continuous", "epochs"])
@pytest.mark.parametrize("policy", POLICIES)
def test_an_aggregate_failing_in_the_middle_of_a_batch_leaves_the_same_state(
        policy: str, trigger: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """aggregate(...).to(sink) is fused (batches.FusedAggregate), in both modes: one fetched
    batch of 10, the aggregate failing on the 5th. The outputs, the DLQ, the committed offsets
    and the state (as restored from the changelog after a crash) are those of record-at-a-time
    execution: under "fail" nothing after the failing record reaches the state."""
    fused = []
    update = FusedAggregate.update

    def spy(self: FusedAggregate, cols: Any) -> Any:
        fused.append(len(cols.idx))
        return update(self, cols)
    monkeypatch.setattr(FusedAggregate, "update", spy)
    results = {}
    for batch in (True, False):
        job = Job("agg", on_error=policy, config=WorkerConfig(batch_execution=batch,
                                                              trigger=trigger))

        def add(total: int, v: int) -> int:
            if v == 5:
                raise ValueError("five")
            return total + v

        (job.stream(KafkaSource("in", key=STR, value=JSON)).map(lambda v: v * 1)
            .aggregate(lambda: 0, add, name="sum").to(KafkaSink("out", key=STR, value=JSON)))
        with TestDriver(job) as d:
            d.send_many("in", [(f"k{v % 2}", v) for v in range(1, 11)])
            d.advance_time("1s")
            out = [(r.key, r.value) for r in d.read("out")]
            dlq = [r.value for r in d.read("agg-dlq")] if "agg-dlq" in d.cluster.topics \
                else []
            failure, committed = type(d.exception()).__name__, d.committed("in")
            state = {}
            if policy != "fail":
                d.crash()
                state = dict(d.store("sum"))
            results[batch] = (out, dlq, failure, committed, state)
    assert results[True] == results[False]
    assert fused and fused[0] == 10  # the batch went through the fused path
    out, dlq, failure, committed, state = results[True]
    if policy == "fail":
        # Epoch mode: the failed epoch's outputs are never committed (read_committed).
        assert out == ([] if trigger != "continuous" else
                       [("k1", 1), ("k0", 2), ("k1", 4), ("k0", 6)])
        assert failure == "UserFunctionError" and committed in ({}, {0: 4})
    else:
        assert out == [("k1", 1), ("k0", 2), ("k1", 4), ("k0", 6), ("k0", 12), ("k1", 11),
                       ("k0", 20), ("k1", 20), ("k0", 30)]
        assert state == {"k0": 30, "k1": 20}
        assert dlq == ([b"5"] if policy == "dead_letter" else [])


class _Counter:
    n = 0


@dataclass(frozen=True)
class _Msg:
    off: int

    def headers(self) -> list[tuple[str, bytes]]:
        return [("h", b"%d" % self.off)]

    def offset(self) -> int:
        return self.off


class _Producer:
    """Takes produce() calls until the refused_at-th, which raises refusal."""

    def __init__(self, refused_at: int | None, refusal: Exception) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.refused_at, self.refusal = refused_at, refusal

    def produce(self, *args: Any) -> None:
        if len(self.sent) == self.refused_at:
            raise self.refusal
        self.sent.append(args)

    def delivery_error(self, topic: str, exc: Exception) -> Exception:
        return RuntimeError(f"{topic}: {exc}")


def _fast_path(refused_at: int | None, refusal: Exception, headers: bool) -> Any:
    from connectors.base import Message, ProducerBackend
    from streamcore.runtime.batches import Columns, produce_rows
    from streamcore.runtime.tracking import OffsetTracker

    cols = Columns([0, 2, 3, 5], [b"a", b"b", b"c", b"d"], ["A", "B", "C", "D"],
                   [10, 20, 30, 40])
    ks, vs = list(cols.keys), [b"1", b"2", b"3", b"4"]
    msgs = cast(list[Message], [_Msg(100 + i) for i in range(6)])
    producer, batch, counter = _Producer(refused_at, refusal), OffsetTracker().open(), _Counter()
    try:
        left: Any = produce_rows(cols, ks, vs, msgs, headers,
                                 cast(ProducerBackend, producer), "out", batch, counter)
    except RuntimeError as exc:
        left = exc
    n = 4 if refused_at is None else refused_at
    # (headers passed only when the sink passes them on; else left to their default, None)
    assert [(a[0], a[1], a[2], a[4], a[6], a[7] if len(a) > 7 else None)
            for a in producer.sent] == \
        [("out", vs[j], ks[j], batch.ack, cols.tss[j],
          [("h", b"%d" % (100 + cols.idx[j]))] if headers else None) for j in range(n)]
    return cols, ks, vs, batch, counter, left


@pytest.mark.parametrize("headers", [False, True])
@pytest.mark.parametrize("refused_at", [0, 2, None])
def test_the_fast_produce_path_hands_back_what_the_producer_had_no_room_for(
        refused_at: int | None, headers: bool) -> None:
    """produce_rows raises the batch's pending count once for all rows; at the first row the
    producer has no room for, it returns that row and the rest, and takes their counts back,
    so that the record-by-record loop retries exactly those (nothing skipped, nothing
    counted twice)."""
    cols, ks, vs, batch, counter, left = _fast_path(refused_at, BufferError("full"), headers)
    n = 4 if refused_at is None else refused_at
    assert batch.pending == n and counter.n == n and not batch.sealed
    assert left == [(cols.idx[j], ks[j], vs[j], cols.tss[j]) for j in range(n, 4)]


def test_the_fast_produce_path_stops_the_batch_at_a_refused_record() -> None:
    """Any other refusal (an aborted transaction, a fenced producer) is raised, the batch
    sealed before the refused record so that neither it nor anything after it is done, and
    nothing after it is tried (as in the record-by-record loop)."""
    _, _, _, batch, counter, left = _fast_path(1, KeyError("fenced"), False)
    assert isinstance(left, RuntimeError) and "fenced" in str(left)
    assert batch.sealed and batch.last_offset == 101  # the refused record is at offset 102
    assert batch.pending == 2 and counter.n == 2  # one sent, one refused: never acknowledged


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("tail", ["aggregate", "map"])
def test_a_task_stopping_while_the_producer_queue_is_full_loses_and_repeats_nothing(
        tail: str, batch: bool) -> None:
    """SIGTERM while a batch waits for room in the producer's queue (a slow broker). A
    stateless batch may leave its rest to the next owner; a fused aggregate has already
    updated the state of its whole head, so it writes all of it before it stops. Either way
    each output comes once, and the state after the restart is that of each record once.
    Record-at-a-time execution leaves the rest of the batch after the record it waited at."""
    job = Job("stop", config=WorkerConfig(batch_execution=batch))
    s = job.stream(KafkaSource("in", key=STR, value=JSON))
    out = KafkaSink("out", key=STR, value=JSON)
    if tail == "aggregate":
        s.aggregate(lambda: 0, lambda total, v: total + v, name="sum").to(out)
    else:
        s.map(lambda v: v * 10).to(out)
    with TestDriver(job) as d:
        d.hold_acks()
        d.limit_queue(3)
        d.send_many("in", [(f"k{v % 2}", v) for v in range(1, 11)])  # waits at the 4th
        assert d.read("out") == []  # three in flight, none acknowledged
        d.restart(release_acks=True)
        d.limit_queue(None)
        d.advance_time("1s")
        rows = [(r.key, r.value) for r in d.read("out")]
        assert d.committed("in") == {0: 10}
        if tail == "aggregate":
            assert rows == [("k1", 1), ("k0", 2), ("k1", 4), ("k0", 6), ("k1", 9),
                            ("k0", 12), ("k1", 16), ("k0", 20), ("k1", 25), ("k0", 30)]
            d.crash()
            assert dict(d.store("sum")) == {"k0": 30, "k1": 25}
        else:
            assert rows == [(f"k{v % 2}", v * 10) for v in range(1, 11)]


@pytest.mark.parametrize("key_by", [False, True])
def test_a_bytes_key_sink_writes_the_fetched_keys_as_they_are_and_key_by_keys_serialized(
        key_by: bool) -> None:
    """With the default key serdes on both ends, a batch's keys go to the sink untouched
    while they are the fetched ones (bytes, or None), and are serialized again once a key_by
    has replaced them (str to UTF-8, an int as JSON): as record-at-a-time execution does."""
    outs = []
    for batch in (True, False):
        job = Job("keys", config=WorkerConfig(batch_execution=batch))
        s = job.stream(KafkaSource("in", value=JSON)).map(lambda v: v + 1)
        if key_by:
            s = s.key_by(lambda v: f"k{v}" if v % 2 else v)
        s.to(KafkaSink("out", value=JSON))
        with TestDriver(job) as d:
            d.send_many("in", [(b"\xff1", 1), (None, 2), ("u3", 3), (b"\x00", 4)])
            outs.append(sorted((r.key or b"", r.value) for r in d.read("out")))
    assert outs[0] == outs[1]
    if key_by:
        assert outs[0] == [(b"2", 2), (b"4", 4), (b"k3", 3), (b"k5", 5)]
    else:
        assert outs[0] == [(b"", 3), (b"\x00", 5), (b"u3", 4), (b"\xff1", 2)]
