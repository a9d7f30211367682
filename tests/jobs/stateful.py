"""A stateful job for the process-level state tests, configured through environment variables.

IN, OUT, JOB: topics and job name (the state directory comes from STREAMCORE_STATE_DIR).
WORKER_ID, if set, is stamped on each aggregate (provenance checks of the fault tests).
FETCH_WAIT_MS: the consumer's fetch.wait.max.ms (default 20).
SESSION_TIMEOUT_MS: the consumer's session.timeout.ms (tests/jobs/_settings.py).
Per key (seq % 20) it keeps the count and the sum of seq, after a repartition by that key,
and writes each new aggregate to OUT. BREAK_STATE_ORDER=1 deliberately commits input offsets
without waiting for the state: the stores are flushed on their own schedule (every 30 s) and
offsets are committed as soon as the outputs are acknowledged, to prove that the crash test
catches it.
"""

import os
import time

from _settings import consumer  # tests/jobs: `streamcore run` puts a job's folder on the path

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, WorkerConfig

if os.environ.get("BREAK_STATE_ORDER") == "1":
    from streamcore.runtime import partition

    def _done_ignoring_state(self: partition.PartitionTask) -> int:
        return self.tracker.advance()  # state durability ignored: the bug under test

    _flush = partition.PartitionTask.flush_state
    _last = [time.monotonic()]

    def _flush_now_and_then(self: partition.PartitionTask) -> None:
        if time.monotonic() - _last[0] > 30:
            _last[0] = time.monotonic()
            _flush(self)

    partition.PartitionTask.done_offset = _done_ignoring_state  # type: ignore[method-assign]
    partition.PartitionTask.flush_state = _flush_now_and_then  # type: ignore[method-assign]

worker = os.environ.get("WORKER_ID")  # set: each aggregate also names who computed it


def add(a: dict[str, object], v: dict[str, int]) -> dict[str, object]:
    new: dict[str, object] = {"n": int(a["n"]) + 1,  # type: ignore[call-overload]
                              "sum": int(a["sum"]) + v["seq"]}  # type: ignore[call-overload]
    if worker:
        new["w"] = worker
    return new


job = Job(os.environ["JOB"], config=WorkerConfig(
    consumer=consumer({"fetch.wait.max.ms": int(os.environ.get("FETCH_WAIT_MS", "20"))}),
    commit_interval="300ms"))
(job.stream(KafkaSource(os.environ["IN"], value=JSON))
    .key_by(lambda v: f"k{v['seq'] % 20}")
    .aggregate(lambda: {"n": 0, "sum": 0}, add, name="totals")
    .to(KafkaSink(os.environ["OUT"], key=STR, value=JSON)))
