"""The engine's error-policy semantics, on the test driver (no broker; milliseconds). The
Kafka path of the same policies is proven against the broker in tests/integration."""

from __future__ import annotations

from streamcore import JSON, Job, KafkaSink, KafkaSource
from streamcore.testing import TestDriver


def test_a_failure_in_one_branch_leaves_the_sibling_branches_their_records() -> None:
    """One input feeding three sinks, the middle branch raising on odd records under skip:
    the first and last branches still get every record. Before: the raise ended the
    fan-out, so the last branch lost every odd record (issue 9, defect 3)."""
    def odd_fails(v: dict[str, int]) -> dict[str, int]:
        if v["i"] % 2:
            raise ValueError("odd")
        return v

    job = Job("fan", on_error="skip")
    s = job.stream(KafkaSource("in", value=JSON))
    s.to(KafkaSink("a", value=JSON))
    s.map(odd_fails).to(KafkaSink("b", value=JSON))
    s.to(KafkaSink("c", value=JSON))
    with TestDriver(job, partitions=2) as d:
        d.send_many("in", [{"i": i} for i in range(40)])
        seqs = {t: sorted(r.value["i"] for r in d.read(t)) for t in ("a", "b", "c")}
        assert d.exception() is None
    assert seqs["a"] == list(range(40))
    assert seqs["b"] == list(range(0, 40, 2))
    assert seqs["c"] == list(range(40)), "the branch after the failing one lost records"


def test_map_async_and_the_steps_after_it_follow_the_error_policy() -> None:
    """map_async with on_error=dead_letter, and a synchronous step after it under the job's
    skip: bad records go to the DLQ or are skipped, good ones flow, the job keeps running.
    Before: map_async refused on_error, and a failure after it escaped as a raw traceback
    (issue 9, defect 6)."""
    async def lookup(v: dict[str, int]) -> dict[str, int]:
        if v["i"] % 10 == 3:
            raise LookupError(f"no such {v['i']}")
        return v

    def later(v: dict[str, int]) -> dict[str, int]:
        if v["i"] % 10 == 7:
            raise ValueError("later step")
        return v

    job = Job("async", on_error="skip")
    (job.stream(KafkaSource("in", value=JSON))
        .map_async(lookup, concurrency=8, on_error="dead_letter")
        .map(later)
        .to(KafkaSink("out", value=JSON)))
    with TestDriver(job) as d:
        d.send_many("in", [{"i": i} for i in range(100)])
        good = [r.value["i"] for r in d.read("out")]
        dlq = d.read(job.dlq_topic)
        assert d.exception() is None
    assert good == [i for i in range(100) if i % 10 not in (3, 7)]  # in input order
    assert [int(r.value.decode().split(":")[1].rstrip("}")) for r in dlq] == \
        list(range(3, 100, 10))
    headers = dict(dlq[0].headers)
    assert headers["streamcore.error.exception"] == b"LookupError"
    assert headers["streamcore.error.step"].startswith(b"map_async(")
    # The last frames of the traceback: where in the user's code it raised.
    assert b'raise LookupError(f"no such' in headers["streamcore.error.traceback"]
