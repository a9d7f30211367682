"""Epoch mode on a broker: exactly-once outputs and state through transactions.

The local broker honours transactions except that read_committed readers still see the
records of aborted transactions (DESIGN.md section 9). So the tests without an abort (end to
end, graceful restarts, rebalances, triggers that stop, a mode switch) assert exact results
here; the crash test asserts exact results only on a real Kafka (STREAMCORE_TEST_BOOTSTRAP)
and, on the local broker, the strongest property it allows: nothing lost, and the committed
offsets, the restored state and the changelog consistent with each other after every kill.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource
from tests.helpers import (
    PacedProducer,
    committed,
    committed_total,
    latest_per_key,
    make_topics,
    produce,
    read_topic,
    stop_gracefully,
    totals,
    unique,
    wait_committed,
    wait_until,
    worker_config,
    worker_process,
)

REAL_KAFKA = bool(os.environ.get("STREAMCORE_TEST_BOOTSTRAP"))


def _expected(total: int) -> dict[str, dict[str, int]]:
    return totals((f"k{seq % 20}", seq) for seq in range(total))


def _outputs(bootstrap: str, out: str, expect: int, *, timeout: float = 90,
             log: str = "") -> list[Any]:
    """The committed outputs. Fewer than expected: fail with what a read_uncommitted reader
    sees per partition (an open transaction hides the rest from read_committed readers) and
    the end of the worker's log, so that a rare failure explains itself."""
    msgs = read_topic(bootstrap, out, expect=expect, timeout=timeout, settle=2.0,
                      committed_only=True)
    if len(msgs) < expect:
        every = read_topic(bootstrap, out, expect=expect, timeout=10, settle=1.0)
        by_part = {p: (sum(m.partition() == p for m in msgs),
                       sum(m.partition() == p for m in every)) for p in range(4)}
        pytest.fail(f"{len(msgs)} of {expect} outputs are committed; per partition "
                    f"(committed, written): {by_part}\n{log[-4000:]}")
    return msgs


def _exactly_once(outputs: list[Any], total: int) -> None:
    """Per key, the aggregates 1, 2, ..., n in order, none twice, none missing."""
    per_key: dict[str, list[int]] = {}
    for m in outputs:
        per_key.setdefault(m.key().decode(), []).append(orjson.loads(m.value())["n"])
    expected = _expected(total)
    assert per_key.keys() == expected.keys()
    for key, ns in per_key.items():
        assert ns == list(range(1, expected[key]["n"] + 1)), f"{key}: {ns[:20]}..."


def test_a_stateful_job_in_epochs_writes_each_result_exactly_once(bootstrap: str,
                                                                  tmp_path: Path) -> None:
    src, out = unique("ep-in"), unique("ep-out")
    make_topics(bootstrap, src, out)
    n = 3000
    produce(bootstrap, src, ((None, {"seq": i}, None) for i in range(n)))
    job = Job(unique("ep"), config=worker_config(
        bootstrap, state_dir=str(tmp_path), trigger="100ms"))
    (job.stream(KafkaSource(src, value=JSON))
        .key_by(lambda v: f"k{v['seq'] % 20}")
        .aggregate(lambda: {"n": 0, "sum": 0},
                   lambda a, v: {"n": a["n"] + 1, "sum": a["sum"] + v["seq"]}, name="totals")
        .to(KafkaSink(out, key=STR, value=JSON)))
    q = job.start()
    try:
        outputs = _outputs(bootstrap, out, n)
        wait_until(lambda: committed_total(bootstrap, job.name, src) == n, 30,
                   "the input offsets to be committed")
        progress = q.last_progress
    finally:
        q.stop(30)
    assert q.exception() is None, q.exception()
    _exactly_once(outputs, n)
    assert latest_per_key(outputs) == _expected(n)
    assert progress is not None and progress["mode"] == "epoch"
    assert progress["batchId"] >= 1 and "commit" in progress["durationMs"]


def test_graceful_restarts_with_records_flowing_give_exact_outputs_and_state(
        bootstrap: str, tmp_path: Path) -> None:
    src, out, name = unique("epr-in"), unique("epr-out"), unique("epr")
    make_topics(bootstrap, src, out)
    env = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_STATE_DIR": str(tmp_path),
           "STREAMCORE_TRIGGER": "100ms"}
    with PacedProducer(bootstrap, src, rate=800) as producer:
        for _ in range(3):
            with worker_process("stateful.py", bootstrap, env) as w:
                w.wait_for("assigned")
                wait_committed(bootstrap, name, src, committed_total(bootstrap, name, src) + 400)
                stop_gracefully(w)
            assert "epoch" in w.log() and "aborted" not in w.log()
        with worker_process("stateful.py", bootstrap, env) as w:
            w.wait_for("assigned")
            total = producer.stop()
            wait_until(lambda: committed_total(bootstrap, name, src) >= total, 60,
                       "every record to be committed")
            outputs = _outputs(bootstrap, out, total)
            stop_gracefully(w)
    _exactly_once(outputs, total)
    assert latest_per_key(outputs) == _expected(total)


def _changelog_state(bootstrap: str, topic: str, expect: int) -> dict[str, Any]:
    msgs = read_topic(bootstrap, topic, expect=expect, timeout=60, settle=2.0,
                      committed_only=True)
    return {orjson.loads(m.key()): orjson.loads(m.value()) for m in msgs}


def test_sigkill_mid_epoch_four_times_loses_nothing(bootstrap: str, tmp_path: Path) -> None:
    """SIGKILL at random points of epochs, four times, with records flowing (the test driver
    crashes ten more in tests/unit/test_epochs.py, in a second). On a real Kafka:
    exact outputs and state. On the local broker (aborted records visible): nothing lost, and
    the state the last worker restored equals the changelog's last values."""
    src, out, name = unique("epk-in"), unique("epk-out"), unique("epk")
    make_topics(bootstrap, src, out)
    env = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_STATE_DIR": str(tmp_path),
           "STREAMCORE_TRIGGER": "100ms"}
    rng = random.Random(11)
    with PacedProducer(bootstrap, src, rate=600) as producer:
        for _ in range(4):
            with worker_process("stateful.py", bootstrap, env) as w:
                w.wait_for("assigned")
                wait_committed(bootstrap, name, src, committed_total(bootstrap, name, src) + 50)
                time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside an epoch
                w.kill()
        with worker_process("stateful.py", bootstrap, env) as w:
            w.wait_for("assigned")
            total = producer.stop()
            wait_until(lambda: committed_total(bootstrap, name, src) >= total, 90,
                       "every record to be committed")
            outputs = _outputs(bootstrap, out, total)
            stop_gracefully(w)
    final = latest_per_key(outputs)
    expected = _expected(total)
    if REAL_KAFKA:
        _exactly_once(outputs, total)
        assert final == expected
        return
    lost = {k: (final.get(k), e) for k, e in expected.items()
            if final.get(k, {"n": 0})["n"] < e["n"]}
    assert not lost, f"updates lost: {lost}"
    changelog = _changelog_state(bootstrap, f"{name}-totals-changelog", len(expected))
    assert {k: v for k, v in changelog.items()} == final, \
        "the last outputs and the changelog disagree"


def test_a_second_worker_with_the_same_transactional_id_fences_the_first(
        bootstrap: str, tmp_path: Path) -> None:
    src, out = unique("epf-in"), unique("epf-out")
    make_topics(bootstrap, src, out)
    txn = unique("shared-txn")
    env = {"IN": src, "OUT": out, "STREAMCORE_TRIGGER": "100ms",
           "STREAMCORE_TRANSACTIONAL_ID": txn}
    job_b = unique("epf-b")
    with PacedProducer(bootstrap, src, rate=200), \
            worker_process("stateful.py", bootstrap, {
                **env, "JOB": unique("epf-a"), "STREAMCORE_STATE_DIR": str(tmp_path / "a")}) as a:
        a.wait_for("epoch 1 committed", timeout=60)
        # Another job (its own group, on another state directory) registers the same
        # transactional id.
        with worker_process("stateful.py", bootstrap, {
                **env, "JOB": job_b, "STREAMCORE_STATE_DIR": str(tmp_path / "b")}) as b:
            b.wait_for("assigned")
            rc = a.wait(60)
            log = a.log()
            stop_gracefully(b)
    assert rc == 1, log[-3000:]
    assert "ProducerFenced" in log or "fenced" in log
    assert repr(txn) in log, "the error must name the transactional id"
    # ... and the other worker: Kafka does not say who, the owners' topic does.
    assert f"The other worker: pid {b.proc.pid} on host" in log, log[-3000:]
    assert repr(job_b) in log, log[-3000:]


@pytest.mark.parametrize("trigger", ["once", "available_now"])
def test_once_and_available_now_process_what_is_there_and_exit_0(
        bootstrap: str, tmp_path: Path, trigger: str) -> None:
    src, out, name = unique("ept-in"), unique("ept-out"), unique("ept")
    make_topics(bootstrap, src, out)
    n = 2000
    produce(bootstrap, src, ((None, {"seq": i}, None) for i in range(n)))
    # Fetches of at most 100 records: an available_now epoch then takes 500 to 900 input
    # records (its bound, plus at most one fetched batch per partition).
    env = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_STATE_DIR": str(tmp_path),
           "STREAMCORE_MAX_EPOCH_RECORDS": "500", "STREAMCORE_POLL_BATCH": "100"}
    with worker_process("stateful.py", bootstrap, env,
                        ["--mode", "epoch", "--trigger", trigger]) as w:
        rc = w.wait(120)
        log = w.log()
    assert rc == 0, log[-3000:]
    assert "every available record is processed" in log
    assert committed_total(bootstrap, name, src) == n
    outputs = _outputs(bootstrap, out, n, timeout=20, log=log)  # the worker has exited
    _exactly_once(outputs, n)
    # once: the input in one epoch, then one for the repartition topic's records;
    # available_now: at least three epochs for 2,000 input records, plus the drain
    epochs = log.count("committed:")
    assert epochs == 2 if trigger == "once" else epochs >= 4, epochs


def test_the_same_state_runs_continuous_then_epochs_then_continuous(
        bootstrap: str, tmp_path: Path) -> None:
    src, out, name = unique("eps-in"), unique("eps-out"), unique("eps")
    make_topics(bootstrap, src, out)
    base = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_STATE_DIR": str(tmp_path)}
    sent = 0
    for trigger in ("continuous", "100ms", "continuous"):
        produce(bootstrap, src, ((None, {"seq": i}, None) for i in range(sent, sent + 600)))
        sent += 600
        env = {**base, "STREAMCORE_TRIGGER": trigger}
        with worker_process("stateful.py", bootstrap, env) as w:
            w.wait_for("assigned")
            wait_until(lambda sent=sent: committed_total(bootstrap, name, src) >= sent, 60,
                       f"{trigger}: every record to be committed")
            # and through the repartition topic to the totals: its records are read only
            # after their epoch commits, so a stop right after the inputs' commit left them
            # for the next run (and the last run's for none)
            read_topic(bootstrap, out, expect=sent, timeout=60, settle=0.0)
            stop_gracefully(w)
    outputs = read_topic(bootstrap, out, expect=sent, timeout=60, settle=2.0)
    counts = Counter(orjson.loads(m.value())["n"] for m in outputs)
    assert latest_per_key(outputs) == _expected(sent)
    assert sum(counts.values()) == sent, "an update was written twice or lost"


def _what_the_query_did(q: Any, bootstrap: str, group: str, topic: str) -> str:
    """For a timeout's message: the group's commits, the query's status and its last epochs
    (this test timed out once on its commits, in a whole-suite run, without a warning)."""
    return (f"committed: {committed(bootstrap, group, topic)}\nstatus: {q.status}\n"
            f"exception: {q.exception()!r}\nlast epochs: {q.recent_progress[-5:]}")


def test_foreach_batch_on_kafka_and_epoch_ids_recovered_from_the_group(
        bootstrap: str, tmp_path: Path) -> None:
    """foreach_batch gets every record once, epoch by epoch; a restart with an epoch left
    pending asks the group's committed offsets whether it committed (confluent-kafka)."""
    src = unique("epb-in")
    make_topics(bootstrap, src)
    calls: list[tuple[int, list[int]]] = []
    name = unique("epb")

    def run_until(seen: int) -> Any:
        job = Job(name, config=worker_config(bootstrap, state_dir=str(tmp_path),
                                             trigger="100ms"))
        job.stream(KafkaSource(src, value=JSON)).foreach_batch(
            lambda records, epoch: calls.append((epoch, [r.value["i"] for r in records])))
        q = job.start()
        try:
            wait_until(lambda: sum(len(v) for _, v in calls) >= seen, 60, "foreach_batch calls")
            wait_until(lambda: committed_total(bootstrap, name, src) >= seen, 30, "commits",
                       detail=lambda: _what_the_query_did(q, bootstrap, name, src))
        finally:
            q.stop(30)
        assert q.exception() is None, q.exception()

    produce(bootstrap, src, ((None, {"i": i}, None) for i in range(200)))
    run_until(200)
    assert sorted(i for _, v in calls for i in v) == list(range(200))
    ids = [e for e, _ in calls]
    assert ids == sorted(set(ids)), "an epoch id was given twice without an abort"

    # A crash after the pending write and after the commit: the group has the epoch's
    # offsets, so the next epoch's id is one more.
    from connectors.confluent import ConfluentClients
    from streamcore.runtime.epochs import EpochLog

    parts = [(src, p) for p in range(4)]
    done = ConfluentClients(bootstrap).committed_offsets(name, parts)
    log = EpochLog(tmp_path / name / ".epoch")
    log.pending(41, {tp: o for tp, o in done.items() if o >= 0})
    calls.clear()
    produce(bootstrap, src, ((None, {"i": i}, None) for i in range(200, 210)))
    run_until(10)
    assert calls[0][0] == 42
    # Before the commit: the group still has older offsets, so the epoch runs again as 50.
    log.pending(50, {(src, 0): 10_000})
    calls.clear()
    produce(bootstrap, src, ((None, {"i": i}, None) for i in range(210, 220)))
    run_until(10)
    assert calls[0][0] == 50
