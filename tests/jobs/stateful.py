"""A stateful job for the process-level state tests, configured through environment variables.

IN, OUT, JOB: topics and job name (the state directory comes from STREAMCORE_STATE_DIR).
Per key (seq % 20) it keeps the count and the sum of seq, after a repartition by that key,
and writes each new aggregate to OUT. BREAK_STATE_ORDER=1 deliberately commits input offsets
without waiting for the state: the stores are flushed on their own schedule (every 3 s) and
offsets are committed as soon as the outputs are acknowledged, to prove that the crash test
catches it.
"""

import os
import time

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, WorkerConfig

if os.environ.get("BREAK_STATE_ORDER") == "1":
    from streamcore.engine import partition

    def _done_ignoring_state(self: partition.PartitionTask) -> int:
        return self.tracker.advance()  # state durability ignored: the bug under test

    _flush = partition.PartitionTask.flush_state
    _last = [time.monotonic()]

    def _flush_now_and_then(self: partition.PartitionTask) -> None:
        if time.monotonic() - _last[0] > 3:
            _last[0] = time.monotonic()
            _flush(self)

    partition.PartitionTask.done_offset = _done_ignoring_state  # type: ignore[method-assign]
    partition.PartitionTask.flush_state = _flush_now_and_then  # type: ignore[method-assign]

job = Job(os.environ["JOB"], config=WorkerConfig(consumer={"fetch.wait.max.ms": 20},
                                                 commit_interval="300ms"))
(job.stream(KafkaSource(os.environ["IN"], value=JSON))
    .key_by(lambda v: f"k{v['seq'] % 20}")
    .aggregate(lambda: {"n": 0, "sum": 0},
               lambda a, v: {"n": a["n"] + 1, "sum": a["sum"] + v["seq"]}, name="totals")
    .to(KafkaSink(os.environ["OUT"], key=STR, value=JSON)))
