"""`make demo`: the example job end to end on the local broker, in about a minute.

1. start the local broker (or reuse a running one), create fresh topics;
2. start `streamcore run examples/clicks.py:job` as a worker process;
3. feed synthetic page views for 15 s while reading the job's output;
4. print a few outputs, a summary and the stateful step's counts per section (which must add
   up to the clicks), then the windowed counts (5 s tumbling windows on event time, each
   written once when the watermark passes it); stop the worker (SIGTERM);
5. the same job again in epoch mode (`--mode epoch`: exactly-once, one Kafka transaction per
   100 ms epoch) on fresh topics, read as read_committed, with its epoch latency; then stop
   the broker.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.admin import create_topics  # noqa: E402
from streamcore import broker  # noqa: E402
from streamcore.core.logs import librdkafka_logger  # noqa: E402
from streamcore.runtime.progress import LatencyHistogram  # noqa: E402

RATE = 250  # page views per second: the local broker slows under faster short-wait fetches
SECONDS = 15
PARTITIONS = 4
URLS = ["https://shop.example/cart", "https://shop.example/item/42", "https://shop.example/",
        "https://news.example/sport/today", "https://news.example/tech/ai"]


def main() -> int:
    run_dir = ROOT / ".streamcore" / "broker"
    was_running = broker.status(run_dir) is not None
    info = broker.start(run_dir)
    print(f"broker: {info.bootstrap} ({'reused' if was_running else 'started'})")
    try:
        rc = _run(info.bootstrap, [])
        if rc == 0:
            print("\n--- the same job in epoch mode (exactly-once, 100 ms epochs) ---")
            rc = _run(info.bootstrap, ["--mode", "epoch", "--trigger", "100ms"])
        return rc
    finally:
        if not was_running:
            broker.stop(run_dir)
            print("broker stopped")


def _run(bootstrap: str, mode_args: list[str]) -> int:
    """One worker run of the example job on fresh topics, fed and watched."""
    tag = uuid.uuid4().hex[:6]
    views, clicks, sections = f"pageviews-{tag}", f"clicks-{tag}", f"sections-{tag}"
    windows = f"windows-{tag}"
    create_topics(bootstrap, {views: PARTITIONS, clicks: PARTITIONS, sections: PARTITIONS,
                              windows: PARTITIONS})
    env = {**os.environ, "PAGEVIEWS_TOPIC": views, "CLICKS_TOPIC": clicks,
           "SECTIONS_TOPIC": sections, "WINDOWS_TOPIC": windows, "DEMO_JOB": f"demo-{tag}",
           "STREAMCORE_LOG_LEVEL": "WARNING",
           "STREAMCORE_STATE_DIR": str(ROOT / ".streamcore" / "demo-state")}
    with socket.socket() as s:  # a free port for the worker's HTTP endpoints
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamcore.cli", "run", "examples/clicks.py:job",
         "--bootstrap", bootstrap, "--preset", "low_latency",
         "--http-port", str(http_port), "--http-host", "127.0.0.1", *mode_args],
        cwd=ROOT, env=env)
    try:
        _wait_ready(http_port, worker)
        rc, expected = _feed_and_watch(bootstrap, views, clicks, worker)
        rc = rc or _show_section_counts(bootstrap, sections, expected)
        rc = rc or _show_windows(bootstrap, windows, expected)
        _show_metrics(http_port)
        return rc
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        print(f"worker stopped (exit code {worker.returncode})")


def _feed_and_watch(bootstrap: str, views: str, clicks: str,
                    worker: subprocess.Popen[bytes]) -> tuple[int, int]:
    """Feed page views, read clicks; return (exit code, clicks expected)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2,
                         "logger": librdkafka_logger()})
    # read_committed (librdkafka's default): epoch mode's outputs appear when epochs commit
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "demo-reader",
                         "fetch.wait.max.ms": 5, "fetch.queue.backoff.ms": 1,
                         "isolation.level": "read_committed", "logger": librdkafka_logger()})
    consumer.assign([TopicPartition(clicks, p, 0) for p in range(PARTITIONS)])
    latency = LatencyHistogram()
    sent = expected = received = 0
    samples: list[dict[str, object]] = []
    start = time.monotonic()
    print(f"feeding {RATE} page views/s for {SECONDS}s ...")
    while True:
        now = time.monotonic()
        if now - start < SECONDS:
            while sent < int((now - start) * RATE):
                user = f"bot-{sent % 7}" if sent % 10 == 0 else f"user-{random.randrange(200)}"
                v = {"user": user, "url": random.choice(URLS), "ts": int(time.time() * 1000),
                     "sent": time.time()}
                producer.produce(views, orjson.dumps(v), user.encode())
                sent += 1
                expected += not user.startswith("bot-")
            producer.poll(0)
        elif received >= expected or now - start > SECONDS + 20:
            break
        first = consumer.poll(0.002)  # poll returns at the first message; consume(n, t) waits
        for m in ([first, *consumer.consume(499, 0)] if first is not None else []):
            if m.error():
                continue
            out = orjson.loads(m.value() or b"{}")
            latency.record(time.time() - out["sent"])
            received += 1
            if len(samples) < 3:
                samples.append(out)
        if worker.poll() is not None:
            print(f"worker exited early with code {worker.returncode}")
            return 1, expected
    producer.flush(10)
    consumer.close()
    elapsed = time.monotonic() - start
    s = latency.summary_ms()
    print("\nsample outputs:")
    for out in samples:
        print("  ", orjson.dumps(out).decode())
    print("\nsummary:")
    print(f"  page views in      {sent}")
    print(f"  clicks out         {received} (expected {expected}; bots filtered)")
    print(f"  throughput         {received / elapsed:.0f} records/s over {elapsed:.1f}s")
    print(f"  end-to-end latency p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms")
    if received < expected:
        print("  MISSING OUTPUTS")
        return 1, expected
    return 0, expected


def _read_all(bootstrap: str, topic: str) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of topic, until nothing more comes for 2 s."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "demo-reader",
                         "fetch.wait.max.ms": 100, "logger": librdkafka_logger()})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    out = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 2.0:
        msgs = consumer.consume(1000, 0.2)
        out += [(m.key() or b"", m.value() or b"null") for m in msgs if not m.error()]
        if msgs:
            quiet_since = time.monotonic()
    consumer.close()
    return out


def _show_windows(bootstrap: str, topic: str, expected: int) -> int:
    """The windowed count's output: each closed window once; the windows still open (the
    last ones, which the watermark has not passed) hold the rest of the clicks."""
    rows = [(orjson.loads(k), orjson.loads(v)) for k, v in _read_all(bootstrap, topic)]
    seen = {(k[0], k[1]) for k, _ in rows}
    total = sum(v["count"] for _, v in rows)
    print(f"\nclicks per section per 5 s window (event time, watermark 2 s, append mode): "
          f"{len(rows)} windows closed, {total} clicks in them")
    for (section, start, end), v in sorted(rows, key=lambda r: (r[0][1], r[0][0]))[-6:]:
        hhmmss = time.strftime("%H:%M:%S", time.localtime(start / 1000))
        print(f"   {section:<10} [{hhmmss} +{(end - start) // 1000}s)  {v['count']}")
    if len(seen) != len(rows) or not 0 < total <= expected:
        print("   WINDOWS WRONG (a window twice, or more clicks than were sent)")
        return 1
    return 0


def _show_section_counts(bootstrap: str, topic: str, expected: int) -> int:
    """The stateful step's output: the latest count per section, which must add up to the
    number of clicks."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "demo-reader",
                         "fetch.wait.max.ms": 100, "logger": librdkafka_logger()})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    latest: dict[str, int] = {}
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 2.0:
        msgs = consumer.consume(1000, 0.2)
        for m in msgs:
            if not m.error():
                latest[(m.key() or b"").decode()] = orjson.loads(m.value() or b"0")
        if msgs:
            quiet_since = time.monotonic()
    consumer.close()
    total = sum(latest.values())
    print("\nviews per section (stateful count, RocksDB + changelog):")
    for section, n in sorted(latest.items(), key=lambda kv: -kv[1]):
        print(f"   {section:<10} {n}")
    print(f"   total      {total}")
    if total != expected:
        print(f"   COUNTS DO NOT ADD UP (expected {expected})")
        return 1
    return 0


def _wait_ready(port: int, worker: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until the worker's /readyz says its partitions are assigned and running."""
    from urllib.error import URLError
    from urllib.request import urlopen

    print("waiting for the worker to join its group (the local broker takes a few s) ...")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            with urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit("the worker did not become ready")


def _show_metrics(port: int) -> None:
    """A few lines of the worker's own /metrics, as Prometheus would scrape them."""
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = ("streamcore_records_consumed_total", "streamcore_records_produced_total",
              "streamcore_commits_total", 'streamcore_processing_latency_seconds_bucket{job="'
              , "streamcore_processing_latency_seconds_count")
    print(f"\nworker metrics (http://127.0.0.1:{port}/metrics, excerpt):")
    for line in text.splitlines():
        if line.startswith(wanted) and ('le="0.001"' in line or "bucket" not in line):
            print("  ", line)


if __name__ == "__main__":
    sys.exit(main())
