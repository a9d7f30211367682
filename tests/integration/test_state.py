"""Keyed state on the local broker: aggregates with re-keying, changelogs, restore, joins.

Expected values are computed in the test from the records it produced. Workers run
in-process (job.start); crash and migration tests with processes are in
test_state_processes.py.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from connectors.confluent import ConfluentReader, reader_settings
from statestore.rocksdb import RocksDBSettings
from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, WorkerConfig
from streamcore.core.logs import librdkafka_logger
from streamcore.core.serde import INTERNAL_KEY
from streamcore.runtime.state import PartitionStores
from tests.helpers import (
    latest_per_key,
    make_topics,
    produce,
    read_topic,
    totals,
    unique,
    worker_config,
)


def _cfg(bootstrap: str, state_dir: Path, **kw: Any) -> WorkerConfig:
    return worker_config(bootstrap, state_dir=str(state_dir), **kw)


def _run(job: Job, cfg: WorkerConfig, out: str, expect: int, **kw: Any) -> list[Any]:
    q = job.start(cfg)
    try:
        return read_topic(cfg.bootstrap_servers, out, expect=expect, **kw)
    finally:
        q.stop(30)
        assert q.exception() is None, q.exception()


def test_aggregates_with_rekeying_on_four_partitions(bootstrap: str, tmp_path: Path) -> None:
    src, counts, sums, by_value = unique("agg-in"), unique("agg-cnt"), unique("agg-sum"), \
        unique("agg-cbv")
    make_topics(bootstrap, src, counts, sums, by_value)
    n, users = 3000, 17
    # Null keys: the input is spread over all partitions, so every user's records are too.
    records: list[dict[str, Any]] = [
        {"user": f"u{i % users}", "amount": i % 7, "kind": ("a", "b", "c")[i % 3]}
               for i in range(n)]
    produce(bootstrap, src, ((None, r, None) for r in records))

    job = Job(unique("agg"))
    s = job.stream(KafkaSource(src, value=JSON))
    by_user = s.key_by(lambda r: r["user"])
    by_user.count(name="count").to(KafkaSink(counts, key=STR, value=JSON))
    (by_user.map(lambda r: r["amount"]).reduce(lambda a, b: a + b, name="sum")
        .to(KafkaSink(sums, key=STR, value=JSON)))
    s.map(lambda r: r["kind"]).count_by_value(name="kinds").to(
        KafkaSink(by_value, key=STR, value=JSON))
    assert "repartition(name=count" in job.explain()

    q = job.start(_cfg(bootstrap, tmp_path))
    try:
        got_counts = latest_per_key(read_topic(bootstrap, counts, expect=n))
        got_sums = latest_per_key(read_topic(bootstrap, sums, expect=n))
        got_kinds = latest_per_key(read_topic(bootstrap, by_value, expect=n))
    finally:
        q.stop(30)
    assert q.exception() is None, q.exception()

    expected_counts = Counter(r["user"] for r in records)
    expected_sums: Counter[str] = Counter()
    for r in records:
        expected_sums[r["user"]] += r["amount"]
    assert got_counts == dict(expected_counts)
    assert got_sums == dict(expected_sums)
    assert got_kinds == \
        dict(Counter(r["kind"] for r in records))
    # The changelog holds the same final values, keyed by the internal key encoding.
    log = read_topic(bootstrap, f"{job.name}-count-changelog", expect=users)
    final = {INTERNAL_KEY.deserialize(m.key()): orjson.loads(m.value()) for m in log}
    assert final == dict(expected_counts)
    # Store files where the design says: {state_dir}/{job}/{step}/{partition}/
    assert sorted(p.name for p in (tmp_path / job.name / "count").iterdir()
                  if p.is_dir()) == ["0", "1", "2", "3"]


def test_update_state_by_key_deletes_and_emits_tombstones(bootstrap: str,
                                                           tmp_path: Path) -> None:
    src, out = unique("usk-in"), unique("usk-out")
    make_topics(bootstrap, src, out)
    # Per key: running sum, deleted once it reaches 10 (then it starts again).
    vals = [("a", 4), ("b", 1), ("a", 6), ("b", 2), ("a", 3)]
    produce(bootstrap, src, ((k, {"v": v}, 0) for k, v in vals))

    def running(new: list[Any], old: Any) -> Any:
        total = (old or 0) + sum(x["v"] for x in new)
        return None if total >= 10 else total

    job = Job(unique("usk"))
    (job.stream(KafkaSource(src, key=STR, value=JSON))
        .update_state_by_key(running, name="running")
        .to(KafkaSink(out, key=STR, value=JSON)))
    msgs = _run(job, _cfg(bootstrap, tmp_path), out, expect=len(vals))
    seq = [(m.key().decode(), None if m.value() is None else orjson.loads(m.value()))
           for m in msgs]
    assert seq == [("a", 4), ("b", 1), ("a", None), ("b", 3), ("a", 3)]


def test_stream_table_join_inner_and_left(bootstrap: str, tmp_path: Path) -> None:
    users, clicks, inner, left = (unique(x) for x in ("users", "clicks", "inner", "left"))
    make_topics(bootstrap, users, partitions=3)
    make_topics(bootstrap, clicks, inner, left)
    produce(bootstrap, users, [("u1", {"name": "Ann"}, None), ("u2", {"name": "Bob"}, None),
                               ("u3", {"name": "Cy"}, None), ("u3", None, None),  # deleted
                               ("u2", {"name": "Bobby"}, None)])  # updated
    produce(bootstrap, clicks, ((u, {"page": i}, None)
                                for i, u in enumerate(["u1", "u2", "u3", "u4", "u1"])))
    job = Job(unique("join"))
    table = job.table(users, key=STR, value=JSON)
    s = job.stream(KafkaSource(clicks, key=STR, value=JSON))
    s.join(table, lambda c, u: {**c, "name": u["name"]}).to(KafkaSink(inner, key=STR,
                                                                     value=JSON))
    s.join(table, how="left").to(KafkaSink(left, key=STR, value=JSON))
    q = job.start(_cfg(bootstrap, tmp_path))
    try:
        got_inner = read_topic(bootstrap, inner, expect=3)
        got_left = read_topic(bootstrap, left, expect=5)
    finally:
        q.stop(30)
    assert q.exception() is None, q.exception()
    assert sorted((m.key().decode(), orjson.loads(m.value())["name"]) for m in got_inner) == \
        [("u1", "Ann"), ("u1", "Ann"), ("u2", "Bobby")]
    left_pairs = sorted((m.key().decode(), orjson.dumps(orjson.loads(m.value())[1]))
                        for m in got_left)
    assert left_pairs == sorted([("u1", b'{"name":"Ann"}'), ("u1", b'{"name":"Ann"}'),
                                 ("u2", b'{"name":"Bobby"}'), ("u3", b"null"),
                                 ("u4", b"null")])


def _sum_job(name: str, src: str, out: str) -> Job:
    job = Job(name)
    (job.stream(KafkaSource(src, value=JSON))
        .key_by(lambda r: r["k"])
        .aggregate(lambda: {"n": 0, "sum": 0},
                   lambda a, r: {"n": a["n"] + 1, "sum": a["sum"] + r["x"]}, name="totals")
        .to(KafkaSink(out, key=STR, value=JSON)))
    return job


def _batch(start: int, n: int) -> list[dict[str, Any]]:
    return [{"k": f"k{i % 11}", "x": i} for i in range(start, start + n)]


def test_restart_keeps_state_and_a_lost_disk_is_rebuilt(
        bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, out, name = unique("rs-in"), unique("rs-out"), unique("rs")
    make_topics(bootstrap, src, out)
    state = tmp_path / "state"
    sent: list[dict[str, Any]] = []
    for round_ in range(4):
        batch = _batch(len(sent), 800)
        produce(bootstrap, src, ((None, r, None) for r in batch))
        sent += batch
        if round_ == 2:  # the disk is lost while the worker is stopped
            shutil.rmtree(state)
        if round_ == 3:  # one store's directory is deleted; its checkpoint file stays
            lost = state / name / "totals" / "0"
            assert lost.is_dir() and lost.with_name("0.checkpoint").is_file()
            shutil.rmtree(lost)
            caplog.clear()
        job = _sum_job(name, src, out)
        q = job.start(_cfg(bootstrap, state))
        try:
            msgs = read_topic(bootstrap, out, expect=len(sent))
            worker = q.worker
            assert worker is not None
            restored = worker.snapshot().samples["streamcore_state_restore_records_total"]
        finally:
            q.stop(30)
        assert q.exception() is None, q.exception()
        assert len(msgs) == len(sent), "a graceful stop and restart must not duplicate"
        assert latest_per_key(msgs) == totals((r["k"], r["x"]) for r in sent), f"round {round_}"
        replayed = restored.get(("totals",), 0)
        if round_ == 1:
            assert replayed == 0, "an intact store restores from its checkpoint: nothing"
        if round_ == 2:
            assert replayed >= 11, "a lost store must be rebuilt from its changelog"
        if round_ == 3:
            warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                      and "was rebuilt" in r.getMessage()]
            assert len(warned) == 1 and "directory was missing" in warned[0] and \
                " records restored" in warned[0], warned


def test_restore_reaches_the_true_end_of_a_batched_changelog(bootstrap: str,
                                                              tmp_path: Path) -> None:
    """The local broker reports a high watermark of (base offset of the last batch + 1);
    records produced in one large batch put the true end far beyond it (the test checks that
    they did: before, the tombstone went out in a batch of its own and the reported end was
    the true one, so the test proved nothing)."""
    topic = unique("changelog")
    make_topics(bootstrap, topic, partitions=1)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 500, "batch.num.messages": 10000,
                  "logger": librdkafka_logger()})
    n = 5000
    for i in range(n):
        p.produce(topic, b"%d" % i, b"k%d" % (i % 1500), partition=0)
    p.produce(topic, None, b"k7", partition=0)  # a tombstone last
    assert p.flush(30) == 0
    reader = ConfluentReader(reader_settings(bootstrap, {}))
    reported_end = reader.end_offset((topic, 0))
    reader.close()

    stores = PartitionStores("j", 0, state_dir=tmp_path, backend="rocksdb",
                             settings=RocksDBSettings(), cache_entries=100)
    cache = stores.open("step", topic, orjson.dumps, orjson.loads)
    stores.restore(lambda: ConfluentReader(reader_settings(bootstrap, {})), lambda: False)
    slot = stores.slots[0]
    assert slot.restored == n + 1 and slot.end == n + 1
    assert cache.get(b"k7") is None and cache.get(b"k8") == 4508 and cache.get(b"k0") == 4500
    assert sum(1 for _ in slot.store.range()) == 1499
    stores.close()
    # The case under test happened: the local broker reported an end short of the true one
    # (a real Kafka reports it exactly, and the restore must agree with it there too).
    if os.environ.get("STREAMCORE_TEST_BOOTSTRAP"):
        assert reported_end == n + 1
    else:
        assert reported_end < n + 1, f"the broker reported the true end {reported_end}"


def test_large_state_stays_on_disk(bootstrap: str, tmp_path: Path) -> None:
    """1M distinct keys with ~250-byte aggregates: held in memory the last 750k alone take
    ~400 MB (measured with an unbounded cache); with the bounded cache and RocksDB the
    worker's memory levels off once its fixed buffers (client prefetch, producer queue,
    memtables, block cache: ~230 MB here) are full. Measuring growth after that point keeps
    the check clear of how large those buffers happen to be on the machine."""
    import psutil

    src = unique("big-in")
    make_topics(bootstrap, src)
    n = 1_000_000
    produce(bootstrap, src, ((b"key-%07d" % i, b"1", None) for i in range(n)),
            **{"linger.ms": 50, "batch.num.messages": 10000})
    seen = [0]

    def tally(_value: Any) -> None:
        seen[0] += 1

    job = Job(unique("big"))
    (job.stream(KafkaSource(src))
        .aggregate(lambda: {"n": 0, "pad": os.urandom(100).hex()},  # a distinct object per key
                   lambda a, v: {**a, "n": a["n"] + 1},
                   name="wide")
        .to_stream().foreach(tally))
    proc = psutil.Process()
    before = proc.memory_info().rss
    q = job.start(_cfg(bootstrap, tmp_path, state_cache_entries=10_000,
                       rocksdb=RocksDBSettings(write_buffer_mb=4, block_cache_mb=16)))
    try:
        deadline = time.monotonic() + 240
        # The fixed buffers fill within the first ~100k records; measure growth after that.
        settled: int | None = None
        peak = before
        while seen[0] < n and time.monotonic() < deadline and q.is_active:
            time.sleep(0.25)
            rss = proc.memory_info().rss
            if settled is None and seen[0] >= n // 4:
                settled = rss
            peak = max(peak, rss)
        assert seen[0] == n, f"processed {seen[0]} of {n}"
        worker = q.worker
        assert worker is not None
        keys = worker.snapshot().samples["streamcore_store_keys"][("wide",)]
    finally:
        q.stop(60)
    assert q.exception() is None, q.exception()
    assert settled is not None
    print(f"RSS growth: {(settled - before) / 2**20:.0f} MB at {n // 4} keys, "
          f"peak {(peak - before) / 2**20:.0f} MB")
    late_mb = (peak - settled) / 2**20
    # Held in memory, the last 750k keys take ~400 MB; on disk the growth measured 40-180 MB
    # (allocator and timing noise: 181 MB once with the machine busy), hence the margin.
    assert late_mb < 250, f"resident memory grew {late_mb:.0f} MB over the last 750k keys"
    assert keys > 0.8 * n  # RocksDB's estimate of the keys on disk
