"""Operations against a live worker: HTTP endpoints, metrics that move, error policies."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from streamcore import JSON, Job, KafkaSink, KafkaSource, WorkerConfig
from tests.helpers import (
    committed,
    http_get,
    make_topics,
    metric_value,
    produce,
    read_topic,
    unique,
    wait_until,
    worker_config,
)


def test_endpoints_report_readiness_traffic_and_a_blocked_loop(
        bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    src, out, name = unique("ops-in"), unique("ops-out"), unique("ops")
    make_topics(bootstrap, src, out)
    block_once = {"armed": True}

    def maybe_block(v: dict[str, Any]) -> dict[str, Any]:
        if v.get("block") and block_once["armed"]:
            block_once["armed"] = False
            time.sleep(3)  # a blocking call in a job function stalls the event loop
        return v

    job = Job(name)
    job.stream(KafkaSource(src, value=JSON)).map(maybe_block).to(KafkaSink(out, value=JSON))
    caplog.set_level("INFO", logger="streamcore")
    q = job.start(worker_config(bootstrap, health_timeout="1s"))
    try:
        wait_until(lambda: q.worker is not None and q.worker.http_port, 10, "HTTP server")
        assert q.worker is not None
        port = q.worker.http_port
        assert port
        # Before the group has assigned partitions the worker is alive but not ready.
        status, body = http_get(port, "/readyz")
        assert status == 503, body
        assert http_get(port, "/healthz")[0] == 200
        wait_until(lambda: http_get(port, "/readyz")[0] == 200, 60, "readiness after assignment")
        assert b"RUNNING" in http_get(port, "/readyz")[1]

        produce(bootstrap, src, ((None, {"i": i}, None) for i in range(2000)))
        read_topic(bootstrap, out, expect=2000)
        text = http_get(port, "/metrics")[1].decode()
        assert metric_value(text, "streamcore_records_consumed_total", job=name) == 2000
        assert metric_value(text, "streamcore_records_produced_total", topic=out) == 2000
        assert metric_value(text, "streamcore_processing_latency_seconds_count") == 2000
        assert metric_value(text, "streamcore_processing_latency_seconds_bucket", le="+Inf") == 2000
        assert metric_value(text, "streamcore_assigned_partitions") == 4
        # Everything is consumed: no lag (the local broker under-reports its high watermark,
        # so a lag above 0 here could only be ours; clamped below at 0).
        assert metric_value(text, "streamcore_consumer_lag") == 0
        # The committed offsets reach the end of every partition (they sum to the records
        # of a fresh topic), nothing waits to become committable, and the periodic commits,
        # all asynchronous so far, are in the commit latency.
        def all_committed() -> bool:
            text = http_get(port, "/metrics")[1].decode()
            return "streamcore_committed_offset{" in text and \
                metric_value(text, "streamcore_committed_offset") == 2000
        wait_until(all_committed, 20, "commits up to the end of every partition")
        text = http_get(port, "/metrics")[1].decode()
        assert metric_value(text, "streamcore_oldest_uncommitted_age_seconds") == 0
        assert metric_value(text, "streamcore_commit_latency_seconds_count") > 0

        produce(bootstrap, src, ((None, {"i": i}, None) for i in range(2000, 2500)))
        read_topic(bootstrap, out, expect=2500)
        text = http_get(port, "/metrics")[1].decode()
        assert metric_value(text, "streamcore_records_consumed_total", job=name) == 2500

        wait_until(lambda: q.last_progress is not None, 10, "a progress report")
        progress = orjson.loads(http_get(port, "/progress")[1])
        assert progress["name"] == name and "inWorkerLatencyMs" in progress
        # The log gets one compact line per report; the full JSON stays on /progress.
        lines = [r.getMessage() for r in caplog.records if hasattr(r, "progress")]
        assert lines and all(ln.startswith("progress: ") and "\n" not in ln and len(ln) < 200
                             for ln in lines), lines[-1:]
        assert "4 partitions" in lines[-1], lines[-1]

        # A job function that blocks the loop: /healthz says so while it lasts.
        produce(bootstrap, src, [(None, {"i": -1, "block": True}, 0)])
        wait_until(lambda: http_get(port, "/healthz")[0] == 503, 20, "healthz failing")
        status, body = http_get(port, "/healthz")
        assert status == 503 and b"event loop stalled" in body, body
        wait_until(lambda: http_get(port, "/healthz")[0] == 200, 20, "healthz recovering")
    finally:
        q.stop(30)
    assert q.exception() is None


def _policy_job(bootstrap: str, policy: str) -> tuple[str, str, str, int, set[int]]:
    src, out, name = unique(f"{policy}-in"), unique(f"{policy}-out"), unique(policy)
    make_topics(bootstrap, src, out, partitions=2)
    records: list[tuple[Any, Any, int | None]] = []
    good: set[int] = set()
    for i in range(300):
        if i % 50 == 7:
            records.append((b"k", b"{broken json", i % 2))  # the serde cannot decode it
        else:
            records.append((b"k", {"i": i}, i % 2))
            if i % 50 != 13:
                good.add(i)
    produce(bootstrap, src, records)

    return src, out, name, len(records), good


@pytest.mark.parametrize("policy", ["dead_letter", "skip"])
def test_error_policies_keep_going_and_lose_nothing(bootstrap: str, policy: str) -> None:
    src, out, name, total, good = _policy_job(bootstrap, policy)
    q = _job_of(name, src, out, policy).start(worker_config(bootstrap))
    try:
        outs = read_topic(bootstrap, out, expect=len(good), partitions=2)
        assert sorted(orjson.loads(m.value())["i"] for m in outs) == sorted(good)
        # Offsets advance past the bad records: everything is committed.
        wait_until(lambda: sum(committed(bootstrap, name, src, 2).values()) == total, 30,
                   "offsets committed past the bad records")
        assert q.worker is not None
        port = q.worker.http_port
        assert port
        text = http_get(port, "/metrics")[1].decode()
        assert metric_value(text, "streamcore_errors_total", kind="deserialization",
                       policy=policy, step="deserialize") == 6
        assert metric_value(text, "streamcore_errors_total", kind="user_function",
                       policy=policy) == 6
        if policy == "dead_letter":
            dlq = read_topic(bootstrap, f"{name}-dlq", expect=12, partitions=2)
            assert len(dlq) == 12
            assert metric_value(text, "streamcore_dlq_records_total") == 12
            by_kind: dict[bytes, int] = {}
            for m in dlq:
                h = dict(m.headers() or [])
                kind = h["streamcore.error.kind"]
                by_kind[kind] = by_kind.get(kind, 0) + 1
                assert h["streamcore.source.topic"] == src.encode()
                part, off = int(h["streamcore.source.partition"]), \
                    int(h["streamcore.source.offset"])
                i = off * 2 + part  # records alternate between the two partitions
                assert m.key() == b"k"
                if kind == b"deserialization":
                    assert m.value() == b"{broken json" and i % 50 == 7
                    assert h["streamcore.error.exception"] == b"JSONDecodeError"
                else:
                    assert orjson.loads(m.value()) == {"i": i} and i % 50 == 13
                    assert h["streamcore.error.exception"] == b"ValueError"
                    assert b"thirteen" in h["streamcore.error.message"]
                    assert h["streamcore.error.step"].startswith(b"map(")
            assert by_kind == {b"deserialization": 6, b"user_function": 6}
    finally:
        q.stop(30)
    assert q.exception() is None


def _job_of(name: str, src: str, out: str, policy: str) -> Job:
    def picky(v: dict[str, int]) -> dict[str, int]:
        if v["i"] % 50 == 13:
            raise ValueError(f"thirteen: {v['i']}")
        return v

    job = Job(name, on_error=policy)
    job.stream(KafkaSource(src, value=JSON)).map(picky).to(KafkaSink(out, value=JSON))
    return job


def test_step_policy_overrides_the_job_policy(bootstrap: str) -> None:
    """on_error on a step wins over the job's: here the job fails, the step skips."""
    src, out, name = unique("ovr-in"), unique("ovr-out"), unique("ovr")
    make_topics(bootstrap, src, out, partitions=1)
    produce(bootstrap, src, [(None, {"i": i}, 0) for i in range(20)])
    job = Job(name, on_error="fail")
    (job.stream(KafkaSource(src, value=JSON))
        .map(lambda v: {"i": v["i"], "inv": 1 / (v["i"] % 5)}, on_error="skip")
        .to(KafkaSink(out, value=JSON)))
    q = job.start(worker_config(bootstrap))
    try:
        outs = read_topic(bootstrap, out, expect=16, partitions=1)
    finally:
        q.stop(30)
    assert q.exception() is None
    assert sorted(orjson.loads(m.value())["i"] for m in outs) == [
        i for i in range(20) if i % 5]


def test_broker_connected_gauge_follows_the_broker(local_broker: object, tmp_path: Any) -> None:
    """streamcore_broker_connected drops to 0 while the broker is gone and comes back to 1
    when it is reachable again (a broker of its own, stopped and started on the same port)."""
    if local_broker is None:
        pytest.skip("stops a local broker; STREAMCORE_TEST_BOOTSTRAP is set")
    from streamcore import broker

    run_dir = tmp_path / "broker"
    info = broker.start(run_dir)
    try:
        src, out = unique("conn-in"), unique("conn-out")
        make_topics(info.bootstrap, src, out)
        job = Job(unique("conn"))
        job.stream(KafkaSource(src, value=JSON)).to(KafkaSink(out, value=JSON))
        # streamcore's default session (6 s): the broker is gone for a while.
        q = job.start(WorkerConfig(bootstrap_servers=info.bootstrap, http_port=0,
                                   state_dir=str(tmp_path / "s")))
        try:
            w = q.worker
            assert w is not None
            wait_until(lambda: w.http_port is not None and w.rebalances > 0, 60, "assigned")

            def connected() -> float:
                assert w.http_port is not None
                return metric_value(http_get(w.http_port, "/metrics")[1].decode(),
                               "streamcore_broker_connected")

            assert connected() == 1
            broker.stop(run_dir)
            wait_until(lambda: connected() == 0, 30, "the gauge to show the broker gone")
            broker.start(run_dir, port=info.port)
            wait_until(lambda: connected() == 1, 60, "the gauge to show the broker back")
        finally:
            q.stop(30)
    finally:
        broker.stop(run_dir)
