"""Defects found in review (correctness hardening), each with the test that caught it.

Workers run in-process (job.start) against the local broker; expected values are computed
from the records the test produced. The defects of operator semantics alone (a failing
branch, map_async's error policy) are tested on the test driver, in
tests/unit/test_operator_semantics.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, WorkerConfig
from streamcore.core.errors import BrokerUnavailable, UserFunctionError
from streamcore.core.serde import INTERNAL_KEY, INTERNAL_VALUE
from streamcore.runtime.worker import Worker
from tests.helpers import (
    committed,
    http_get,
    latest_per_key,
    make_topics,
    produce,
    read_topic,
    unique,
    wait_until,
    worker_config,
)


def _cfg(bootstrap: str, state_dir: Path, **kw: Any) -> WorkerConfig:
    return worker_config(bootstrap, state_dir=str(state_dir), **kw)


def test_two_groups_running_one_job_keep_their_own_internal_topics(
        bootstrap: str, tmp_path: Path) -> None:
    """Internal topics belong to the application id (the group), as in Kafka Streams.
    Before: both groups read and wrote ``{job}-count-repartition``, so each counted the
    other's records too (every count doubled)."""
    src, out = unique("grp-in"), unique("grp-out")
    make_topics(bootstrap, src, out)
    n, users = 800, 11
    records = [{"user": f"u{i % users}"} for i in range(n)]
    produce(bootstrap, src, ((None, r, None) for r in records))

    job = Job(unique("grp"))
    (job.stream(KafkaSource(src, value=JSON))
        .key_by(lambda r: r["user"])
        .count(name="count")
        .to(KafkaSink(out, key=STR, value=JSON)))
    g1, g2 = unique("g1"), unique("g2")
    q1 = job.start(_cfg(bootstrap, tmp_path / "a", group=g1))
    q2 = job.start(_cfg(bootstrap, tmp_path / "b", group=g2))
    try:
        # Each group emits one update per input record: 2n in all, no more.
        msgs = read_topic(bootstrap, out, expect=2 * n, settle=3.0)
        # Each query explains the plan it runs: its own group's internal topics.
        assert f"{g1}-count-repartition" in q1.explain()
        assert f"{g2}-count-changelog" in q2.explain()
    finally:
        q1.stop(30)
        q2.stop(30)
    assert q1.exception() is None and q2.exception() is None
    expected = dict(Counter(r["user"] for r in records))
    assert len(msgs) == 2 * n, f"{len(msgs)} updates for {n} records in each of two groups"
    assert latest_per_key(msgs) == expected
    per_key_max: dict[str, int] = {}
    for m in msgs:
        k = m.key().decode()
        per_key_max[k] = max(per_key_max.get(k, 0), orjson.loads(m.value()))
    assert per_key_max == expected, "a group counted records of the other group"
    for g in (g1, g2):  # each group's changelog holds its own final counts
        log = read_topic(bootstrap, f"{g}-count-changelog", expect=users)
        assert len({m.key() for m in log}) == users
    assert (tmp_path / "a" / g1 / "count").is_dir(), "stores are per application id too"


def test_stop_right_after_start_is_not_lost(bootstrap: str, tmp_path: Path) -> None:
    """Before: stop() before the worker's loop ran was ignored, and stop(None) hung."""
    src, out = unique("early-in"), unique("early-out")
    make_topics(bootstrap, src, out)
    job = Job(unique("early"))
    job.stream(KafkaSource(src)).to(KafkaSink(out))
    q = job.start(_cfg(bootstrap, tmp_path))
    stopper = threading.Thread(target=q.stop, args=(None,), daemon=True)
    stopper.start()
    stopper.join(60)
    assert not stopper.is_alive(), "stop(None) right after start() did not return"
    assert not q.is_active and q.exception() is None


def test_a_map_async_failure_ends_the_query_promptly(bootstrap: str, tmp_path: Path) -> None:
    """Before: the failing batch held the failure commit 10 s, then the revoke inside
    close() drained again up to shutdown_timeout (40 s in all)."""
    src, out = unique("afail-in"), unique("afail-out")
    make_topics(bootstrap, src, out)
    # Fewer records than the concurrency: the whole batch is sealed before the call fails,
    # so the failing batch has an output that will never be acknowledged.
    produce(bootstrap, src, ((None, {"i": i}, 0) for i in range(10)))

    async def boom(v: dict[str, int]) -> dict[str, int]:
        await asyncio.sleep(0.2)
        if v["i"] == 5:
            raise RuntimeError("boom")
        return v

    job = Job(unique("afail"))
    job.stream(KafkaSource(src, value=JSON)).map_async(boom).to(KafkaSink(out, value=JSON))
    q = job.start(_cfg(bootstrap, tmp_path, shutdown_timeout="30s"))
    wait_until(lambda: q.worker is not None and bool(q.worker.assigned), 30, "assignment")
    t0 = time.monotonic()
    with pytest.raises(UserFunctionError, match="boom"):
        q.await_termination(60)
    assert time.monotonic() - t0 < 15, "the failure took the whole drain deadline"
    status = q.status
    assert status["message"].startswith("Failed: UserFunctionError") and "boom" in \
        status["exception"], status
    # Records fetched but never through the chain are not counted as processed.
    assert sum(p["numInputRows"] for p in q.recent_progress) < 10
    assert committed(bootstrap, job.name, src, partitions=4)[0] <= 5, \
        "the failing record was committed"


async def test_worker_stopped_before_it_runs_stops_as_soon_as_it_starts(
        bootstrap: str, tmp_path: Path) -> None:
    """The deterministic form of the race above: stop() before run() set the loop."""
    src, out = unique("early-in"), unique("early-out")
    make_topics(bootstrap, src, out)
    job = Job(unique("early"))
    job.stream(KafkaSource(src)).to(KafkaSink(out))
    worker = Worker(job, _cfg(bootstrap, tmp_path))
    worker.stop()
    await asyncio.wait_for(worker.run(), 60)


async def test_cancelling_run_raises_cancelled_error(bootstrap: str, tmp_path: Path) -> None:
    """Before: a BaseExceptionGroup came out of ``await job.run()``."""
    src, out = unique("cancel-in"), unique("cancel-out")
    make_topics(bootstrap, src, out)
    job = Job(unique("cancel"))
    job.stream(KafkaSource(src)).to(KafkaSink(out))
    task = asyncio.create_task(job.run(_cfg(bootstrap, tmp_path)))
    await asyncio.sleep(2)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_latest_source_reads_every_record_of_its_internal_topics(
        bootstrap: str, tmp_path: Path) -> None:
    """starting_offsets="latest" applies to that source's partitions without a commit,
    never to internal topics. Before: the repartition topic started at its end too, so the
    records an earlier run had written to it and not yet committed were lost."""
    src, out = unique("late-in"), unique("late-out")
    make_topics(bootstrap, src, out)
    # Skipped by "latest". One record per batch: the local broker reports the end of a
    # partition as the base offset of its last batch + 1 (DESIGN.md section 9).
    for i in range(8):
        produce(bootstrap, src, [(None, {"user": "old"}, i % 4)])
    job = Job(unique("late"))
    (job.stream(KafkaSource(src, value=JSON, starting_offsets="latest"))
        .key_by(lambda r: r["user"])
        .count(name="count")
        .to(KafkaSink(out, key=STR, value=JSON)))
    # Written to the repartition topic by an earlier run that died before committing them.
    repart = job.internal_topic("count", "repartition")
    make_topics(bootstrap, repart)
    pending = [{"user": f"p{i % 3}"} for i in range(30)]
    produce(bootstrap, repart, ((INTERNAL_KEY.serialize(r["user"]),
                                 INTERNAL_VALUE.serialize(r), None) for r in pending),
            partitioner="murmur2_random")
    q = job.start(_cfg(bootstrap, tmp_path))
    try:
        # Markers until one comes out: from then on "latest" has been resolved to an offset
        # (a record produced before that is skipped, as with Spark's latest).
        def marker_out() -> bool:
            produce(bootstrap, src, [(None, {"user": "marker"}, 0)])
            return any(m.key() == b"marker" for m in read_topic(
                bootstrap, out, expect=1, timeout=2, settle=0.2))
        wait_until(marker_out, 60, "a marker through the job")
        new = [{"user": f"n{i % 4}"} for i in range(40)]
        produce(bootstrap, src, ((None, r, None) for r in new))
        got = latest_per_key(read_topic(bootstrap, out, expect=len(pending) + len(new) + 1))
    finally:
        q.stop(30)
    assert q.exception() is None, q.exception()
    got.pop("marker")
    assert got == dict(Counter(r["user"] for r in pending + new))


async def test_a_global_table_whose_follower_failed_fails_healthz(
        bootstrap: str, tmp_path: Path) -> None:
    """Before: the follower thread logged one error and the table stayed stale for ever,
    with /healthz 200. The follower's reader is made to fail (the restore's is real)."""
    users, clicks, out = unique("gt-users"), unique("gt-clicks"), unique("gt-out")
    make_topics(bootstrap, users, clicks, out)
    produce(bootstrap, users, [("u1", {"name": "Ann"}, None)])
    job = Job(unique("gt"))
    table = job.table(users, key=STR, value=JSON)
    job.stream(KafkaSource(clicks, key=STR, value=JSON)).join(table).to(
        KafkaSink(out, key=STR, value=JSON))
    worker = Worker(job, _cfg(bootstrap, tmp_path))
    real = worker._new_reader
    made: list[object] = []

    def new_reader() -> Any:
        reader = real()
        made.append(reader)
        if len(made) == 2:  # the follower's: it fails on its first read
            def broken(max_records: int, timeout: float) -> list[Any]:
                raise BrokerUnavailable("injected: the table topic cannot be read")
            reader.read = broken  # type: ignore[method-assign]
        return reader

    worker._new_reader = new_reader  # type: ignore[method-assign]
    task = asyncio.create_task(worker.run())
    try:
        for _ in range(300):
            if worker.http_port is not None and made and len(made) >= 2:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        ok, detail = worker.health()
        assert not ok and "global table" in detail["reason"], detail
        port = worker.http_port
        assert port is not None
        status, body = await asyncio.to_thread(http_get, port, "/healthz")
        assert status == 503 and b"stopped following" in body
        metrics = (await asyncio.to_thread(http_get, port, "/metrics"))[1].decode()
        assert f'streamcore_global_table_failures_total{{job="{job.name}",table="{users}"}} 1.0' \
            in metrics
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)



@pytest.mark.parametrize("client", ["confluent-kafka", "aiokafka"])
def test_a_worker_whose_loop_blocked_past_max_poll_writes_no_more_as_a_zombie(
        bootstrap: str, tmp_path: Path, client: str) -> None:
    """A job function blocks the event loop past max.poll.interval.ms once, with thousands
    of records fetched. librdkafka leaves the group meanwhile, so the partition may already be
    another member's: the worker must stop writing at once (at most the rest of the batch it
    was in), commit nothing, rejoin and resume from the last commit. Before: it went on
    through its whole inbox as a zombie, then did all of that again after rejoining. On
    aiokafka, which may stay in the group (a fetch ran before its heartbeat's check), the
    fenced partition was never processed again (4600 records missing): it now rejoins."""
    src, out = unique("zombie-in"), unique("zombie-out")
    make_topics(bootstrap, src, partitions=1)
    make_topics(bootstrap, out)
    n, stall_at, batch = 5000, 300, 100
    produce(bootstrap, src, ((None, {"seq": i}, 0) for i in range(n)))
    stalled = threading.Event()

    def step(v: dict[str, int]) -> dict[str, int]:
        if v["seq"] == stall_at and not stalled.is_set():
            stalled.set()
            time.sleep(6)  # blocks the event loop: no serve of the group for 6 s
        return v

    job = Job(unique("zombie"))
    job.stream(KafkaSource(src, value=JSON)).map(step).to(KafkaSink(out, value=JSON))
    cfg = _cfg(bootstrap, tmp_path, client=client, poll_batch=batch, consumer={
        "max.poll.interval.ms": 3000, "session.timeout.ms": 2000,
        "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 20})
    q = job.start(cfg)
    try:
        msgs = read_topic(bootstrap, out, expect=n, timeout=90, settle=2.0)
    finally:
        q.stop(30)
    assert q.exception() is None, q.exception()
    assert stalled.is_set()
    seen = Counter(orjson.loads(m.value())["seq"] for m in msgs)
    missing = [s for s in range(n) if seen[s] == 0]
    dups = sorted(s for s, c in seen.items() if c > 1)
    assert not missing, f"{len(missing)} lost, e.g. {missing[:10]}"
    # Repeated: what was processed and not yet committed when the loop stopped (at most the
    # records before the stall) and the rest of the stalled batch; never beyond it.
    assert not dups or dups[-1] < stall_at + batch, \
        f"{len(dups)} records written twice, up to seq {dups[-1]}: the zombie kept writing"


async def test_a_graceful_stop_whose_final_commit_is_refused_still_stops_cleanly(
        bootstrap: str, tmp_path: Path) -> None:
    """Seen in the rebalance storm: SIGTERM while the group rebalanced, the final commit was
    refused with ILLEGAL_GENERATION, and the stop failed (exit 3) instead of stopping. The
    refusal means the partitions moved: the next owner reads them again (duplicates, never
    loss), so the stop succeeds with a warning. The refusal is injected here."""
    src, out = unique("fin-in"), unique("fin-out")
    make_topics(bootstrap, src, out)
    produce(bootstrap, src, ((None, {"i": i}, None) for i in range(100)))
    job = Job(unique("fin"))
    job.stream(KafkaSource(src, value=JSON)).to(KafkaSink(out, value=JSON))
    worker = Worker(job, _cfg(bootstrap, tmp_path))
    inner = worker.member.consumer  # type: ignore[attr-defined]
    real_commit = inner.commit

    def refused(offsets: dict[Any, int], *, asynchronous: bool) -> None:
        if not asynchronous:
            raise BrokerUnavailable("commit failed: ILLEGAL_GENERATION (injected)")
        real_commit(offsets, asynchronous=asynchronous)

    inner.commit = refused
    task = asyncio.create_task(worker.run())
    for _ in range(300):
        if worker.records_in >= 100:
            break
        await asyncio.sleep(0.1)
    assert worker.records_in >= 100
    worker.stop()
    await asyncio.wait_for(task, 60)  # before: BrokerUnavailable escaped the stop


def _librdkafka_threads() -> int:
    """Threads of this process that librdkafka started (named rdk:main, rdk:broker...)."""
    tasks = Path("/proc/self/task")
    names = []
    for t in tasks.iterdir():
        try:
            names.append((t / "comm").read_text())
        except OSError:  # the thread ended meanwhile
            continue
    return sum(name.startswith("rdk:") for name in names)


def test_a_worker_that_cannot_start_closes_its_clients(tmp_path: Path) -> None:
    """A start-up failure (Kafka unreachable, a missing input topic) used to leave the
    member's two consumers and the producer open: in an application that embeds the worker
    their threads went on reconnecting for the life of the process, and `streamcore run`
    destroyed them only at interpreter exit (a clean-checkout run once died of SIGSEGV
    right after its "cannot reach Kafka" message)."""
    before = _librdkafka_threads()
    job = Job(unique("nostart"))
    job.stream(KafkaSource("in", value=JSON)).to(KafkaSink("out", value=JSON))
    worker = Worker(job.build(), _cfg("127.0.0.1:1", tmp_path, startup_timeout="1s"))
    assert _librdkafka_threads() > before  # the clients exist from construction on
    with pytest.raises(BrokerUnavailable, match="cannot reach Kafka"):
        asyncio.run(worker.run())
    wait_until(lambda: _librdkafka_threads() <= before, 10,
               "the worker's librdkafka threads to end after its failed start")
