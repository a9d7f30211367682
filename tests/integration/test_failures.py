"""Fatal errors stop the worker without committing the failing offset, and say where."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from streamcore import (
    JSON,
    DeliveryFailed,
    DeserializationError,
    Job,
    KafkaSink,
    KafkaSource,
    UserFunctionError,
    WorkerConfig,
)
from tests.helpers import (
    committed,
    make_topics,
    produce,
    read_topic,
    unique,
    wait_until,
    worker_config,
)


def _start(job: Job, bootstrap: str) -> Any:
    return job.start(worker_config(bootstrap))


def test_undecodable_record_fails_naming_its_position(bootstrap: str) -> None:
    src, out, name = unique("bad-in"), unique("bad-out"), unique("bad")
    make_topics(bootstrap, src, out, partitions=1)
    good_before = [(None, {"i": i}, 0) for i in range(50)]
    produce(bootstrap, src, [*good_before, (None, b"{not json", 0),
                             *[(None, {"i": i}, 0) for i in range(50, 60)]])
    job = Job(name)
    job.stream(KafkaSource(src, value=JSON)).to(KafkaSink(out, value=JSON))
    q = _start(job, bootstrap)
    with pytest.raises(DeserializationError) as info:
        q.await_termination(60)
    err = info.value
    assert (err.topic, err.partition, err.offset) == (src, 0, 50)
    assert f"{src}[0]@50" in str(err)
    # The good records before it were processed and committed; the bad one was not.
    outs = read_topic(bootstrap, out, expect=50, partitions=1, settle=0.5)
    assert sorted(orjson.loads(m.value())["i"] for m in outs) == list(range(50))
    assert committed(bootstrap, name, src, partitions=1)[0] == 50


def test_failing_user_function_stops_before_its_offset(bootstrap: str) -> None:
    src, out, name = unique("uf-in"), unique("uf-out"), unique("uf")
    make_topics(bootstrap, src, out, partitions=1)
    produce(bootstrap, src, [(None, {"i": i}, 0) for i in range(30)])

    def boom(v: dict[str, int]) -> dict[str, int]:
        if v["i"] == 17:
            raise ValueError("no seventeens")
        return v

    job = Job(name)
    job.stream(KafkaSource(src, value=JSON)).map(boom).to(KafkaSink(out, value=JSON))
    q = _start(job, bootstrap)
    with pytest.raises(UserFunctionError, match="no seventeens") as info:
        q.await_termination(60)
    assert info.value.offset == 17
    # Everything before the failing record is committed, the record itself is not (a bare
    # "<= 17" would also pass with nothing committed at all).
    assert committed(bootstrap, name, src, partitions=1)[0] == 17


def test_record_too_large_for_the_sink_is_never_committed(bootstrap: str) -> None:
    src, out, name = unique("big-in"), unique("big-out"), unique("big")
    make_topics(bootstrap, src, out, partitions=1)
    produce(bootstrap, src, [(None, {"i": i}, 0) for i in range(10)])
    job = Job(name)
    (job.stream(KafkaSource(src, value=JSON))
        # Record 10 becomes 2 MB: it compresses below the client's limit, and the broker
        # refuses it (an asynchronous delivery failure).
        .map(lambda v: {**v, "pad": "x" * 2_000_000} if v["i"] == 10 else v)
        .to(KafkaSink(out, value=JSON)))
    q = _start(job, bootstrap)
    # Records 0-9 are committed first; the record that fails arrives in a later fetch.
    # (Offsets are tracked per fetched batch: nothing of a batch holding a failed output
    # is committed, so with all records in one batch nothing at all would be.)
    wait_until(lambda: committed(bootstrap, name, src, partitions=1)[0] == 10, 60,
               "records 0-9 committed")
    produce(bootstrap, src, [(None, {"i": i}, 0) for i in range(10, 20)])
    with pytest.raises(DeliveryFailed) as info:
        q.await_termination(60)
    assert info.value.topic == out
    assert "size" in info.value.cause.lower() or "large" in info.value.cause.lower()
    assert out in str(info.value)
    assert committed(bootstrap, name, src, partitions=1)[0] == 10, \
        "everything before the undeliverable record 10 is committed, it is not"


def test_delivery_failure_reported_by_the_broker_stops_the_worker(bootstrap: str) -> None:
    """The asynchronous path: the broker never acknowledges (its process is paused past the
    producer's message timeout), so the delivery report carries the error."""
    import os
    import signal

    pid = _local_broker_pid(bootstrap)
    src, out, name = unique("to-in"), unique("to-out"), unique("to")
    make_topics(bootstrap, src, out, partitions=1)
    produce(bootstrap, src, [(None, {"i": i}, 0) for i in range(5)])
    job = Job(name)
    job.stream(KafkaSource(src, value=JSON)).to(KafkaSink(out, value=JSON))
    # streamcore's default session (6 s), longer than the message timeout: with a 2 s one the
    # paused broker expires the session first, and the lost partition's task is fenced (its
    # failed output then no longer matters) instead of failing the worker.
    q = job.start(WorkerConfig(http_port=0, bootstrap_servers=bootstrap, producer={
        "message.timeout.ms": 1500, "linger.ms": 200}))
    # Wait until the worker is processing, then make the broker unresponsive.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
            q.worker and any(s.value == "RUNNING" for s in q.worker.assigned.values())):
        time.sleep(0.05)
    assert q.worker is not None
    while time.monotonic() < deadline and q.worker.records_in < 5:
        time.sleep(0.01)
    produce(bootstrap, src, [(None, {"i": 99}, 0)])
    # Pause the broker as soon as the worker has taken the record: its output then sits in
    # the producer (200 ms linger) and can never be acknowledged.
    while time.monotonic() < deadline and q.worker.records_in < 6:
        time.sleep(0.001)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(DeliveryFailed) as info:
            q.await_termination(30)
    finally:
        os.kill(pid, signal.SIGCONT)
        q.stop(30)
    err = info.value
    assert err.topic == out
    assert "timed out" in err.cause.lower()


def _local_broker_pid(bootstrap: str) -> int:
    import os

    if os.environ.get("STREAMCORE_TEST_BOOTSTRAP"):
        pytest.skip("pausing the broker needs the local broker process")
    import subprocess

    port = bootstrap.rsplit(":", 1)[1]
    out = subprocess.run(["pgrep", "-f", f"tansu.*127.0.0.1:{port}"], capture_output=True,
                         text=True, check=False).stdout.split()
    assert out, "local broker process not found"
    return int(out[0])
