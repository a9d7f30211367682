"""Broker pause: SIGSTOP the broker for 20 s while a worker has records to write, SIGCONT.

What it breaks: every broker request hangs, and the producer's local queue (kept small here)
fills within a moment. What it counts: /healthz answers during the pause (all must be 200:
the event loop keeps running, so no orchestrator restarts the worker), records lost after the
broker is back (must be 0), and duplicates (reported). Same worker process throughout.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamcore import JSON, Job, KafkaSink, KafkaSource, WorkerConfig
from tests.helpers import http_get, make_topics, produce, read_topic, unique, wait_until

pytestmark = pytest.mark.slow

RECORDS = 60_000
PAUSE_S = 20


def _busy(v: dict[str, Any]) -> dict[str, Any]:
    until = time.perf_counter() + 30e-6  # ~30k records/s: the backlog outlasts the pause's start
    while time.perf_counter() < until:
        pass
    return v


def test_broker_paused_with_the_producer_queue_full(bootstrap: str, broker_pid: int,
                                                   tmp_path: Path) -> None:
    src, out = unique("pause-in"), unique("pause-out")
    make_topics(bootstrap, src, out)
    produce(bootstrap, src, ((None, {"seq": i}, i % 4) for i in range(RECORDS)))
    job = Job(unique("pause"))
    job.stream(KafkaSource(src, value=JSON)).map(_busy).to(KafkaSink(out, value=JSON))
    # streamcore's default session (6 s), as users meet a paused broker; not the tests' 2 s.
    cfg = WorkerConfig(bootstrap_servers=bootstrap, http_port=0, state_dir=str(tmp_path),
                       health_timeout="2s", progress_interval="1s",
                       producer={"queue.buffering.max.messages": 1000})
    q = job.start(cfg)
    held_seen = False
    answers: list[tuple[int, bytes]] = []
    try:
        w = q.worker
        assert w is not None
        wait_until(lambda: w.commits > 0 and w.http_port is not None, 60, "first commits")
        port = w.http_port
        assert port is not None
        os.kill(broker_pid, signal.SIGSTOP)
        try:
            end = time.monotonic() + PAUSE_S
            while time.monotonic() < end:
                answers.append(http_get(port, "/healthz", timeout=2))
                held_seen = held_seen or any(
                    t.ctx.outbox.held for t in list(w._tasks.values()))
                time.sleep(0.25)
        finally:
            os.kill(broker_pid, signal.SIGCONT)
        outputs = read_topic(bootstrap, out, expect=RECORDS, timeout=120)
    finally:
        q.stop(60)
    assert q.exception() is None, q.exception()
    seen = Counter(orjson.loads(m.value())["seq"] for m in outputs)
    missing = [s for s in range(RECORDS) if seen[s] == 0]
    dups = sum(c - 1 for c in seen.values())
    bad = [(code, json.loads(body).get("reason")) for code, body in answers if code != 200]
    print(f"broker pause: {len(answers)} /healthz answers, {len(bad)} not 200; "
          f"{len(missing)} lost, {dups} duplicates of {RECORDS}")
    assert held_seen, "the producer queue never filled: the pause tested nothing"
    assert not bad, f"/healthz failed during the pause: {bad[:3]}"
    assert not missing, f"{len(missing)} records lost, e.g. {missing[:10]}"
