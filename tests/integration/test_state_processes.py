"""Stateful workers as real processes: SIGKILL with records arriving, and migration.

The job (tests/jobs/stateful.py) keeps per key the count and sum of the sequence numbers it
has seen; the last output per key is the final aggregate. After a crash, at-least-once allows
updates to be applied twice (a final aggregate above the expected one) but never lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    PacedProducer,
    committed_total,
    latest_per_key,
    make_topics,
    produce,
    read_topic,
    stop_gracefully,
    totals,
    unique,
    wait_committed,
    worker_process,
)

pytestmark = pytest.mark.slow

# The engine's guarantees hold on both Kafka client backends (STREAMCORE_CLIENT).
CLIENTS = pytest.mark.parametrize("client", ["confluent-kafka", "aiokafka"])


def _final(bootstrap: str, out: str, expect: int) -> dict[str, dict[str, int]]:
    return latest_per_key(read_topic(bootstrap, out, expect=expect, timeout=90, settle=2.0))


def _expected(total: int) -> dict[str, dict[str, int]]:
    return totals((f"k{seq % 20}", seq) for seq in range(total))


def _kill_and_restart(bootstrap: str, state: Path, *, broken: bool,
                      client: str = "confluent-kafka") -> tuple[
        dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    src, out, name = unique("skill-in"), unique("skill-out"), unique("skill")
    make_topics(bootstrap, src, out)
    env = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_STATE_DIR": str(state),
           "STREAMCORE_CLIENT": client,
           "BREAK_STATE_ORDER": "1" if broken else "0"}
    with PacedProducer(bootstrap, src, rate=1500) as producer:
        with worker_process("stateful.py", bootstrap, env) as w:
            w.wait_for("assigned")
            # Several commits in, of the input and of the repartition topic that the stateful
            # step reads (none of them backed by a store flush in the broken job: it flushes
            # every 30 s), then the kill.
            wait_committed(bootstrap, name, src, 6000)
            wait_committed(bootstrap, name, f"{name}-totals-repartition", 3000)
            sent_at_kill = producer.sent
            w.kill()
        at_kill = committed_total(bootstrap, name, src)
        with worker_process("stateful.py", bootstrap, env) as w2:
            w2.wait_for("assigned")
            wait_committed(bootstrap, name, src, at_kill + 1000)
            total = producer.stop()
            final = _final(bootstrap, out, total)
            if not broken:  # the broken job flushes on its own schedule: no clean stop
                stop_gracefully(w2)
    assert sent_at_kill > 1000 and total > sent_at_kill, "records must still be arriving"
    return final, _expected(total)


@CLIENTS
def test_sigkill_stateful_worker_loses_no_update(bootstrap: str, tmp_path: Path,
                                                 client: str) -> None:
    final, expected = _kill_and_restart(bootstrap, tmp_path / "state", broken=False,
                                        client=client)
    assert final.keys() == expected.keys()
    lost = {k: (final[k], e) for k, e in expected.items()
            if final[k]["n"] < e["n"] or final[k]["sum"] < e["sum"]}
    assert not lost, f"updates lost: {lost}"


def test_state_crash_check_catches_commits_ahead_of_the_changelog(
        bootstrap: str, tmp_path: Path) -> None:
    """Offsets committed without waiting for the state flush: a kill must then lose
    updates (the write-back cache dies with the process), proving the test above can fail."""
    final, expected = _kill_and_restart(bootstrap, tmp_path / "state", broken=True)
    lost = [k for k, e in expected.items() if final.get(k, {"n": 0})["n"] < e["n"]]
    assert lost, "committing ahead of the state lost nothing: the crash check is blind"


@CLIENTS
def test_partitions_migrate_between_workers_with_their_state(bootstrap: str, tmp_path: Path,
                                                              client: str) -> None:
    src, out, name = unique("mig-in"), unique("mig-out"), unique("mig")
    make_topics(bootstrap, src, out)
    env: dict[str, Any] = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_CLIENT": client}
    with PacedProducer(bootstrap, src, rate=800) as producer, \
            worker_process("stateful.py", bootstrap,
                           {**env, "STREAMCORE_STATE_DIR": str(tmp_path / "a")}) as a:
        a.wait_for("assigned")
        wait_committed(bootstrap, name, src, 500)
        with worker_process("stateful.py", bootstrap,
                            {**env, "STREAMCORE_STATE_DIR": str(tmp_path / "b")}) as b:
            b.wait_for("restored", timeout=90)  # b took partitions and rebuilt their stores
            wait_committed(bootstrap, name, src, committed_total(bootstrap, name, src) + 800)
            stop_gracefully(a)  # a leaves: b restores the rest from the changelogs
            b.wait_for("assigned", times=2)  # b got a's partitions
            wait_committed(bootstrap, name, src, committed_total(bootstrap, name, src) + 800)
            total = producer.stop()
            final = _final(bootstrap, out, total)
            stop_gracefully(b)
    assert b.log().count("restored") >= 2
    # Graceful handovers commit state and offsets together: the aggregates are exact.
    assert final == _expected(total)


@CLIENTS
def test_records_a_fetch_passes_over_are_read_again(bootstrap: str, tmp_path: Path,
                                                    client: str) -> None:
    """The local broker now and then serves a fetch of a partition that several producers
    write at once (every worker's first step writes the repartition topic) without some of
    its records; they are in the log. The job here has that happen where it chooses
    (PASS_OVER, tests/jobs/stateful.py): in each repartition partition, three records within
    a fetch and the tail of a later fetch. The worker reads them again from the broker, through
    the client's seek, and the aggregates are exact. Without the re-read, 3 records and a
    fetch's tail per partition are lost."""
    src, out, name = unique("gap-in"), unique("gap-out"), unique("gap")
    make_topics(bootstrap, src, out)
    env = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_CLIENT": client,
           "STREAMCORE_STATE_DIR": str(tmp_path / "state"), "PASS_OVER": "150"}
    with worker_process("stateful.py", bootstrap, env) as w:
        w.wait_for("assigned")
        produce(bootstrap, src, ((None, {"seq": s}, s % 4) for s in range(4000)))
        # A gap at the end of what a partition holds shows when the next record comes
        # (until then nothing after it is committed): once every repartition partition has
        # its tail gap, more records in every partition.
        w.wait_for("passed over on purpose", times=4)
        produce(bootstrap, src, ((None, {"seq": s}, s % 4) for s in range(4000, 4400)))
        final = _final(bootstrap, out, 4400)
        # Each repartition partition holds 800 records or more (20 keys over 4 partitions):
        # all of them reach offset 300. Two gaps each, each read again once.
        assert w.metric("streamcore_fetch_gaps_total") == 8
        stop_gracefully(w)
    assert "the fetch passed over offsets 150 to 152" in w.log()
    assert final == _expected(4400)


@CLIENTS
def test_records_the_first_fetch_after_a_restart_passes_over_are_read_again(
        bootstrap: str, tmp_path: Path, client: str) -> None:
    """A task's first batch has no batch before it to compare with: the worker reads the
    group's committed offsets at the assignment, and a first batch that begins after them
    passed records over (PASS_OVER_FIRST, tests/jobs/stateful.py, in the restarted worker:
    three records at the start of each repartition partition's first fetch). Without the
    check, 3 records per partition are lost."""
    src, out, name = unique("gap1-in"), unique("gap1-out"), unique("gap1")
    make_topics(bootstrap, src, out)
    env = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_CLIENT": client,
           "STREAMCORE_STATE_DIR": str(tmp_path / "state")}
    with worker_process("stateful.py", bootstrap, env) as w:
        w.wait_for("assigned")
        produce(bootstrap, src, ((None, {"seq": s}, s % 4) for s in range(2000)))
        assert _final(bootstrap, out, 2000) == _expected(2000)
        stop_gracefully(w)  # every repartition partition committed above 0
    with worker_process("stateful.py", bootstrap, {**env, "PASS_OVER_FIRST": "3",
                                                           "SLOW_LOOKUP": "3"}) as w:
        w.wait_for("held on purpose")
        produce(bootstrap, src, ((None, {"seq": s}, s % 4) for s in range(2000, 4000)))
        w.wait_for("passed over on purpose", times=4)
        assert _final(bootstrap, out, 4000) == _expected(4000)
        assert w.metric("streamcore_fetch_gaps_total") == 4  # each read again once
        stop_gracefully(w)
    assert "the fetch passed over offsets" in w.log()
