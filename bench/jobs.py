"""The streamcore side of the benchmarks (topics from the environment).

BENCH_PRODUCER and BENCH_CONSUMER (JSON objects of librdkafka settings) are laid over the
run's settings, for A/B rounds of one setting: for example
``BENCH_PRODUCER='{"compression.type": "none"}' python -m bench --only w1``.
"""

from __future__ import annotations

import json
import os

from bench.workload import add_order, enrich, keep, settings, streamcore_aio_settings
from streamcore import JSON, Job, KafkaSink, KafkaSource, Tumbling, WorkerConfig

_mode = os.environ.get("BENCH_MODE", "w1")
_w3 = _mode == "w3"
_aio = os.environ.get("STREAMCORE_CLIENT") == "aiokafka"
_producer, _consumer = streamcore_aio_settings(_mode) if _aio else settings(_mode)
_producer = {**_producer, **json.loads(os.environ.get("BENCH_PRODUCER", "{}"))}
_consumer = {**_consumer, **json.loads(os.environ.get("BENCH_CONSUMER", "{}"))}
job = Job(os.environ.get("BENCH_JOB", "bench"), config=WorkerConfig(
    producer=_producer,
    consumer=_consumer,
    poll_timeout="20ms" if _w3 else "100ms",
    progress_interval="1s" if _mode == "w2win" else "5s"))  # w2win: its state figures
_in = os.environ.get("BENCH_IN", "in")
if _mode == "w2win":
    # W2's input, windowed: per user (the record key, 1,000 of them), a count per 1-second
    # tumbling window of event time (record i happens at i/10 ms: 10 records per key and
    # window), each window written once, when the watermark passes its end (append mode).
    (job.stream(KafkaSource(_in, value=JSON,
                            timestamp=lambda v: 1_700_000_000_000 + v["id"] // 10))
        .with_watermark("1s")
        .window(Tumbling("1s"))
        .count(name="per-second")
        .to(KafkaSink(os.environ.get("BENCH_OUT", "out"), value=JSON), output_mode="append"))
elif _mode == "w2":
    # Per user (the record key): running count and sum of the order totals, in RocksDB with
    # a changelog; the updated aggregate goes out for every record.
    (job.stream(KafkaSource(_in, value=JSON))
        .aggregate(lambda: {"count": 0, "sum": 0.0}, add_order, name="totals")
        .to(KafkaSink(os.environ.get("BENCH_OUT", "out"), value=JSON)))
else:
    (job.stream(KafkaSource(_in, value=JSON))
        .filter(keep)
        .map(enrich)
        .to(KafkaSink(os.environ.get("BENCH_OUT", "out"), value=JSON)))
