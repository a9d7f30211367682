"""Kafka -> job -> Kafka on the local broker, with the worker in-process (job.start)."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

import orjson
import pytest

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, WorkerConfig
from streamcore.core.logs import librdkafka_logger
from tests.helpers import make_topics, produce, read_topic, unique, worker_config


def _cfg(bootstrap: str, **kw: Any) -> WorkerConfig:
    return worker_config(bootstrap, **kw)


def _run_until(job: Job, bootstrap: str, out: str, expect: int, **cfg: Any) -> list[Any]:
    q = job.start(_cfg(bootstrap, **cfg))
    try:
        msgs = read_topic(bootstrap, out, expect=expect)
    finally:
        q.stop(30)
    assert q.exception() is None, q.exception()
    return msgs


@pytest.mark.parametrize("client", ["confluent-kafka", "aiokafka"])
def test_every_input_produces_its_output_in_per_key_order(bootstrap: str, client: str) -> None:
    src, out = unique("e2e-in"), unique("e2e-out")
    make_topics(bootstrap, src, out)
    n, keys = 6000, 37
    # Keys spread over all input partitions by the producer's partitioner.
    produce(bootstrap, src, ((f"k{i % keys}", {"i": i, "k": f"k{i % keys}"}, None)
                             for i in range(n)))
    job = Job(unique("e2e"))
    (job.stream(KafkaSource(src, key=STR, value=JSON))
        .filter(lambda v: v["i"] % 3 != 0)
        .map(lambda v: {**v, "sq": v["i"] * v["i"]})
        .to(KafkaSink(out, key=STR, value=JSON)))
    msgs = _run_until(job, bootstrap, out, expect=n - n // 3, client=client)

    values = [orjson.loads(m.value()) for m in msgs]
    expected = {i for i in range(n) if i % 3 != 0}
    assert sorted(v["i"] for v in values) == sorted(expected)  # each exactly once
    assert all(v["sq"] == v["i"] ** 2 for v in values)
    per_key: dict[str, list[int]] = defaultdict(list)
    for m, v in zip(msgs, values, strict=True):
        assert m.key().decode() == v["k"]  # the source key is kept
        per_key[v["k"]].append(v["i"])
    for k, seq in per_key.items():
        assert seq == sorted(seq), f"key {k} out of order"


def test_map_async_keeps_input_order_with_concurrency(bootstrap: str) -> None:
    src, out = unique("async-in"), unique("async-out")
    make_topics(bootstrap, src, out, partitions=2)
    n = 1500
    produce(bootstrap, src, ((None, {"i": i}, i % 2) for i in range(n)))
    in_flight = {"now": 0, "max": 0}

    async def slow_enrich(v: dict[str, Any]) -> dict[str, Any]:
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        await asyncio.sleep(random.uniform(0, 0.004))  # later calls often finish first
        in_flight["now"] -= 1
        return {**v, "done": True}

    job = Job(unique("async"))
    (job.stream(KafkaSource(src, value=JSON))
        .map_async(slow_enrich, concurrency=8)
        .key_by(lambda v: str(v["i"] % 2))
        .to(KafkaSink(out, key=STR, value=JSON)))
    msgs = _run_until(job, bootstrap, out, expect=n)

    by_input_partition: dict[int, list[int]] = defaultdict(list)
    for m in msgs:
        v = orjson.loads(m.value())
        assert v["done"]
        by_input_partition[v["i"] % 2].append(v["i"])
    assert sorted(by_input_partition[0] + by_input_partition[1]) == list(range(n))
    for p, seq in by_input_partition.items():
        assert seq == sorted(seq), f"map_async reordered partition {p}"
    assert in_flight["max"] > 1, "map_async never ran calls concurrently"
    assert in_flight["max"] <= 8 * 2, "concurrency bound exceeded (8 per partition)"


def test_branch_union_flat_map_and_headers(bootstrap: str) -> None:
    src, evens, odds, merged = (unique(x) for x in ("br-in", "br-even", "br-odd", "br-all"))
    make_topics(bootstrap, src, evens, odds, merged)
    n = 400
    produce(bootstrap, src, ((None, {"i": i}, None) for i in range(n)))
    job = Job(unique("branch"))
    s = job.stream(KafkaSource(src, value=JSON))
    even, odd = s.branch(lambda v: v["i"] % 2 == 0, lambda v: True)
    even.to(KafkaSink(evens, value=JSON))
    odd.to(KafkaSink(odds, value=JSON))
    (even.map(lambda v: {"i": v["i"], "from": "even"})
        .union(odd.flat_map(lambda v: [{"i": v["i"], "from": "odd"}] * 2))
        .to(KafkaSink(merged, value=JSON)))
    q = job.start(_cfg(bootstrap))
    try:
        ev = read_topic(bootstrap, evens, expect=n // 2)
        od = read_topic(bootstrap, odds, expect=n // 2)
        al = read_topic(bootstrap, merged, expect=n // 2 + n)
    finally:
        q.stop(30)
    assert q.exception() is None
    assert sorted(orjson.loads(m.value())["i"] for m in ev) == list(range(0, n, 2))
    assert sorted(orjson.loads(m.value())["i"] for m in od) == list(range(1, n, 2))
    merged_vals = [orjson.loads(m.value()) for m in al]
    assert sum(1 for v in merged_vals if v["from"] == "odd") == n  # flat_map doubled them
    assert sorted(v["i"] for v in merged_vals if v["from"] == "even") == list(range(0, n, 2))


def test_headers_and_timestamps_pass_through(bootstrap: str) -> None:
    from confluent_kafka import Producer

    src, out = unique("hdr-in"), unique("hdr-out")
    make_topics(bootstrap, src, out, partitions=1)
    p = Producer({"bootstrap.servers": bootstrap, "logger": librdkafka_logger()})
    for i in range(10):
        p.produce(src, orjson.dumps({"i": i}), headers=[("trace", f"t{i}".encode())],
                  timestamp=1_700_000_000_000 + i)
    p.flush(10)
    job = Job(unique("hdr"))
    job.stream(KafkaSource(src, value=JSON)).map(lambda v: v).to(KafkaSink(out, value=JSON))
    msgs = _run_until(job, bootstrap, out, expect=10)
    for m in msgs:
        i = orjson.loads(m.value())["i"]
        assert m.headers() == [("trace", f"t{i}".encode())]
        assert m.timestamp()[1] == 1_700_000_000_000 + i


def test_a_partitioner_setting_places_keys_as_that_partitioner_does(bootstrap: str) -> None:
    """The README's advice for topics written by librdkafka's default partitioner: with
    producer={"partitioner": "consistent_random"} each key goes back to the partition where
    that partitioner put it in the input (the default, murmur2, puts most elsewhere)."""
    src = unique("part-in")
    make_topics(bootstrap, src)
    keys = [f"user-{i}" for i in range(40)]
    produce(bootstrap, src, ((k, {"k": k}, None) for k in keys))  # librdkafka's default
    placed_in = {m.key(): m.partition() for m in read_topic(bootstrap, src, expect=len(keys))}

    def placed_by_a_job(**cfg: Any) -> dict[bytes, int]:
        out = unique("part-out")
        make_topics(bootstrap, out)
        job = Job(unique("part"))
        job.stream(KafkaSource(src, key=STR, value=JSON)).to(
            KafkaSink(out, key=STR, value=JSON))
        return {m.key(): m.partition()
                for m in _run_until(job, bootstrap, out, expect=len(keys), **cfg)}

    moved = sum(placed_in[k] != p for k, p in placed_by_a_job().items())
    assert moved > 0, "murmur2 placed every key as librdkafka's default does: no test"
    consistent = placed_by_a_job(producer={"partitioner": "consistent_random"})
    assert consistent == placed_in


def test_pattern_source_and_timestamp_extractor(bootstrap: str) -> None:
    """A regex subscription reads every matching topic; the extracted event time becomes the
    output record's timestamp."""
    tag = unique("pat")
    a, b, other, out = f"{tag}-a", f"{tag}-b", f"{unique('else')}", unique("pat-out")
    make_topics(bootstrap, a, b, other, out, partitions=1)
    produce(bootstrap, a, [(None, {"src": "a", "ts": 1_600_000_000_000 + i}, 0)
                           for i in range(5)])
    produce(bootstrap, b, [(None, {"src": "b", "ts": 1_600_000_001_000 + i}, 0)
                           for i in range(5)])
    produce(bootstrap, other, [(None, {"src": "x", "ts": 1}, 0)])
    job = Job(unique("pat"))
    (job.stream(KafkaSource(pattern=f"^{tag}-.*", value=JSON, timestamp=lambda v: v["ts"]))
        .to(KafkaSink(out, value=JSON)))
    q = job.start(_cfg(bootstrap, consumer={"topic.metadata.refresh.interval.ms": 1000}))
    try:
        msgs = read_topic(bootstrap, out, expect=10, partitions=1)
    finally:
        q.stop(30)
    assert q.exception() is None
    values = [orjson.loads(m.value()) for m in msgs]
    assert sorted(v["src"] for v in values) == ["a"] * 5 + ["b"] * 5  # not the other topic
    for m, v in zip(msgs, values, strict=True):
        assert m.timestamp()[1] == v["ts"]
