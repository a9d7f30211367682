"""A map_async job for the graceful-stop tests, configured through environment variables.

IN, OUT, JOB: topics and job name. WORKER_ID: stamped on each output. CALL_MS: how long each
asynchronous call takes (with CONCURRENCY calls at once per partition), so that a backlog
builds up in the inboxes and lasts. SESSION_TIMEOUT_MS: the consumer's session.timeout.ms
(tests/jobs/_settings.py).
"""

import asyncio
import os

from _settings import consumer  # tests/jobs: `streamcore run` puts a job's folder on the path

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, WorkerConfig

worker = os.environ.get("WORKER_ID", "w")
call_s = int(os.environ.get("CALL_MS", "5")) / 1000


async def lookup(v: dict[str, object]) -> dict[str, object]:
    await asyncio.sleep(call_s)
    return {**v, "w": worker}


job = Job(os.environ["JOB"], config=WorkerConfig(consumer=consumer({"fetch.wait.max.ms": 20})))
(job.stream(KafkaSource(os.environ["IN"], value=JSON))
    .map_async(lookup, concurrency=int(os.environ.get("CONCURRENCY", "4")))
    .key_by(lambda v: str(v["p"]))
    .to(KafkaSink(os.environ["OUT"], key=STR, value=JSON)))
