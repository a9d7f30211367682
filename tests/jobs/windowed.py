"""A windowed count for the event-time process tests, configured through environment
variables: IN, OUT, LATE, JOB (the state directory and the mode come from STREAMCORE_*).

Event time is the record's ``seq`` times 10 ms after BASE (the source's timestamp
extractor); per key k{seq % 10} it counts records per 1-second tumbling window, after a
repartition by that key (the watermark crosses it), and writes each window once, when the
watermark (500 ms behind) passes its end. Late records go to LATE. SESSION_TIMEOUT_MS:
the consumer's session.timeout.ms (tests/jobs/_settings.py). CHAIN=1 puts a second
repartition ("mid") in front of the key_by: the watermark then crosses two.
"""

import os

from _settings import consumer  # tests/jobs: `streamcore run` puts a job's folder on the path

from streamcore import JSON, Job, KafkaSink, KafkaSource, Tumbling, WorkerConfig

BASE = 1_700_000_000_000

job = Job(os.environ["JOB"], config=WorkerConfig(commit_interval="200ms", consumer=consumer()))
stream = (job.stream(KafkaSource(os.environ["IN"], value=JSON,
                                 timestamp=lambda v: BASE + v["seq"] * 10))
          .with_watermark("500ms"))
if os.environ.get("CHAIN") == "1":
    stream = stream.repartition(name="mid")
(stream
    .key_by(lambda v: f"k{v['seq'] % 10}")
    .window(Tumbling("1s"))
    .count(name="counts", late=KafkaSink(os.environ["LATE"], value=JSON))
    .to(KafkaSink(os.environ["OUT"], key=JSON, value=JSON), output_mode="append"))
