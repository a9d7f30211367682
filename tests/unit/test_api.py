"""The public API: names, validation at build time, and the compiled operator semantics."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import pytest

import streamcore
from connectors.base import ProducerBackend
from streamcore import (
    BYTES,
    JSON,
    KEY,
    STR,
    Job,
    JobDefinitionError,
    KafkaSink,
    KafkaSource,
    Serde,
    SerializationError,
)
from streamcore.plan.physical import plan
from streamcore.runtime.context import PartitionContext, StepFailed
from streamcore.runtime.operators import compile_chain
from streamcore.runtime.progress import LatencyHistogram
from streamcore.runtime.tracking import OffsetTracker


def test_all_is_complete_and_importable() -> None:
    public = {n for n, v in vars(streamcore).items()
              if not n.startswith("_") and not inspect.ismodule(v)}
    assert set(streamcore.__all__) - {"__version__"} == public
    for name in streamcore.__all__:
        assert getattr(streamcore, name) is not None


def test_error_tree_docstring_names_every_error() -> None:
    from streamcore.core import errors

    doc = errors.__doc__ or ""
    for name in errors.__all__:
        assert name in doc, f"{name} missing from the tree in streamcore.core.errors"
        assert issubclass(getattr(errors, name), errors.StreamcoreError)
    assert not issubclass(errors.RetriableError, errors.FatalError)


def test_serdes_round_trip() -> None:
    assert JSON.deserialize(JSON.serialize({"a": [1, 2]})) == {"a": [1, 2]}
    assert STR.deserialize(STR.serialize("héllo")) == "héllo"
    assert BYTES.deserialize(BYTES.serialize(b"\x00\x01")) == b"\x00\x01"
    with pytest.raises(TypeError):
        BYTES.serialize("text")
    csv = Serde("csv", lambda r: ",".join(r).encode(), lambda b: b.decode().split(","))
    assert csv.deserialize(csv.serialize(["a", "b"])) == ["a", "b"]


@pytest.mark.parametrize(("build", "message"), [
    (lambda j: None, "no source"),
    (lambda j: j.stream(KafkaSource("t")).map(lambda v: v), "no output"),
    (lambda j: (j.stream(KafkaSource("t")).to(KafkaSink("o")),
                j.stream(KafkaSource("t")).to(KafkaSink("o"))), "read by two sources"),
])
def test_invalid_graphs_fail_at_build_time(build: Any, message: str) -> None:
    job = Job("j")
    build(job)
    with pytest.raises(JobDefinitionError, match=message):
        job.validate()


def test_bad_arguments_fail_where_they_are_given() -> None:
    with pytest.raises(JobDefinitionError):
        Job("has space")
    with pytest.raises(JobDefinitionError):
        KafkaSource("t", pattern="^t.*")
    with pytest.raises(JobDefinitionError):
        KafkaSource("t", starting_offsets="middle")
    s = Job("j").stream(KafkaSource("t"))
    with pytest.raises(JobDefinitionError):
        s.map("not a function")  # type: ignore[arg-type]
    with pytest.raises(JobDefinitionError):
        s.map_async(lambda v: v, concurrency=0)


class _RecordingProducer(ProducerBackend):
    """Unit-test fake: records what the sink would send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, Any, int]] = []

    def produce(self, topic: str, value: bytes | None, key: bytes | None, partition: int,
                on_delivery: Any, reserved: None, timestamp: int, headers: Any = None, /) -> None:
        self.sent.append((topic, key, value, timestamp))

    def delivery_error(self, topic: str, exc: Exception) -> Exception:
        return exc

    def poll(self, timeout: float) -> int:
        return 0

    def in_flight(self) -> int:
        return 0

    def close(self) -> None:
        pass


def _run_chain(job: Job, topic: str, records: list[tuple[Any, Any, int]]) -> list[Any]:
    producer = _RecordingProducer()
    ctx = PartitionContext(topic, 0, producer)
    p = plan(job.build())
    chain = compile_chain(p, p.source_for_topic(topic), ctx)
    ctx.batch = OffsetTracker().open()
    for k, v, ts in records:
        chain(k, v, ts)
    return producer.sent


def test_compiled_chain_applies_operators_in_order() -> None:
    job = Job("j")
    s = job.stream(KafkaSource("in", value=JSON))
    hi, lo = (s.flat_map(lambda v: [v, v + 100])
               .filter(lambda v: v % 2 == 0)
               .key_by(lambda v: f"k{v}")
               .with_timestamps(lambda v: v * 10)
               .branch(lambda v: v >= 100, lambda v: True))
    hi.map(lambda v: -v).to(KafkaSink("hi", key=STR, value=JSON))
    lo.union(hi).to(KafkaSink("all", key=STR, value=JSON))
    sent = _run_chain(job, "in", [(None, v, 0) for v in range(4)])
    assert sent == [
        ("all", b"k0", b"0", 0), ("hi", b"k100", b"-100", 1000), ("all", b"k100", b"100", 1000),
        ("all", b"k2", b"2", 20), ("hi", b"k102", b"-102", 1020), ("all", b"k102", b"102", 1020),
    ]


def test_explain_lists_every_step() -> None:
    job = Job("j")
    job.stream(KafkaSource("in")).filter(bool).map(str).to(KafkaSink("out"))
    text = job.explain()
    for part in ("KafkaSource[in]", "filter(bool)", "map(str)", "KafkaSink[out]"):
        assert part in text


def test_latency_histogram_quantiles_within_bucket_error() -> None:
    h = LatencyHistogram()
    for i in range(1, 1001):
        h.record(i / 1_000_000)  # 1..1000 microseconds
    assert h.total == 1000
    assert h.quantile(0.5) == pytest.approx(500e-6, rel=0.1)
    assert h.quantile(0.99) == pytest.approx(990e-6, rel=0.1)
    assert h.summary_ms()["p99"] == pytest.approx(0.99, rel=0.1)


def test_the_default_key_serde_writes_what_key_by_usually_returns() -> None:
    assert KEY.serialize(b"\x00raw") == b"\x00raw"
    assert KEY.serialize("user-1") == b"user-1"
    assert KEY.serialize(42) == b"42"
    assert KEY.serialize(("a", 1)) == b'["a",1]'
    assert KEY.deserialize(b"user-1") == b"user-1"  # keys come in as bytes
    assert KafkaSink("out").key is KEY and KafkaSource("in").key is KEY


def test_a_natural_job_with_str_keys_and_the_default_sink_key_serde() -> None:
    """Before: the BYTES key serde refused the str key on the first record."""
    job = Job("j")
    (job.stream(KafkaSource("in", value=JSON)).key_by(lambda v: v["user"])
        .to(KafkaSink("out", value=JSON)))
    assert _run_chain(job, "in", [(None, {"user": "ann"}, 5)]) == \
        [("out", b"ann", b'{"user":"ann"}', 5)]


async def _fetch(v: Any) -> Any:
    return v


def test_an_async_function_in_a_synchronous_step_is_refused_at_build_time() -> None:
    s = Job("j").stream(KafkaSource("in"))
    steps: list[Any] = [s.map, s.filter, s.flat_map, s.key_by, s.peek]
    for step in steps:
        with pytest.raises(JobDefinitionError, match="use map_async"):
            step(_fetch)
    with pytest.raises(JobDefinitionError, match="use map_async"):
        s.map(functools.partial(_fetch))
    s.map_async(_fetch)  # accepted
    s.map_async(lambda v: _fetch(v))  # a lambda may return an awaitable: checked per call


def test_a_plain_function_in_map_async_is_refused_at_build_time() -> None:
    def plain(v: Any) -> Any:
        return v

    with pytest.raises(JobDefinitionError, match=r"plain function .*plain; use map"):
        Job("j").stream(KafkaSource("in")).map_async(plain)


def test_a_named_step_is_named_in_failures_and_explain() -> None:
    job = Job("j")
    (job.stream(KafkaSource("in", value=JSON)).map(lambda v: 1 / v, name="invert")
        .to(KafkaSink("out", value=JSON)))
    assert "map(invert)" in job.explain()
    with pytest.raises(StepFailed) as info:
        _run_chain(job, "in", [(None, 0, 0)])
    assert info.value.step == "map(invert)"
    with pytest.raises(JobDefinitionError, match="step name"):
        job.stream(KafkaSource("other")).map(str, name="no spaces")


def test_a_sink_serde_that_refuses_an_output_fails_fast_under_every_policy() -> None:
    """A serde that does not fit is a configuration mistake: under skip it would drop every
    record while the job looks healthy."""
    for policy in ("fail", "skip", "dead_letter"):
        job = Job("j", on_error=policy)
        job.stream(KafkaSource("in", value=JSON)).to(KafkaSink("out", value=BYTES))
        with pytest.raises(SerializationError, match=r"KafkaSink\[out\]: its value serde "
                           r"'bytes' refused a dict"):
            _run_chain(job, "in", [(None, {"a": 1}, 0)])
