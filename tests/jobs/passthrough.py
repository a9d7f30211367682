"""A job for the process-level tests, configured through environment variables.

IN, OUT, JOB: topics and job name. WORKER_ID: stamped on each output, to see who processed
what. LINGER_MS: producer linger (a long linger widens the window between "handed to the
producer" and "acknowledged"). BREAK_COMMIT_ORDER=1: deliberately commit offsets before the
outputs are acknowledged, to prove that the crash test catches a broken commit order.
SLOW_US: busy time per record, so that a backlog builds up and lasts.
SESSION_TIMEOUT_MS: the consumer's session.timeout.ms (tests/jobs/_settings.py).
"""

import os
import time

from _settings import consumer  # tests/jobs: `streamcore run` puts a job's folder on the path

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, WorkerConfig

if os.environ.get("BREAK_COMMIT_ORDER") == "1":
    from streamcore.runtime import tracking

    def _advance_ignoring_acks(self: tracking.OffsetTracker) -> int:
        q = self._batches
        while q and q[0].sealed:  # pending outputs ignored: the bug under test
            self.done_offset = q.popleft().last_offset
        return self.done_offset

    tracking.OffsetTracker.advance = _advance_ignoring_acks  # type: ignore[method-assign]

worker = os.environ.get("WORKER_ID", "w")
linger = int(os.environ.get("LINGER_MS", "5"))
slow_s = int(os.environ.get("SLOW_US", "0")) / 1e6


def stamp(v: dict[str, object]) -> dict[str, object]:
    if slow_s:
        until = time.perf_counter() + slow_s
        while time.perf_counter() < until:
            pass
    return {**v, "w": worker}


job = Job(os.environ["JOB"], config=WorkerConfig(
    producer={"linger.ms": linger}, consumer=consumer({"fetch.wait.max.ms": 20})))
(job.stream(KafkaSource(os.environ["IN"], value=JSON))
    .map(stamp)
    .key_by(lambda v: str(v["p"]))
    .to(KafkaSink(os.environ["OUT"], key=STR, value=JSON)))
