"""Workers as real processes: SIGKILL, SIGTERM and rebalances, with records still arriving.

Every input carries a sequence number; the test producer records each one's input partition
and offset, so the checks can tell exactly which records were lost or duplicated.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, defaultdict

import orjson
import pytest

from tests.helpers import (
    PacedProducer,
    committed,
    committed_total,
    make_topics,
    read_topic,
    stop_gracefully,
    unique,
    wait_committed,
    wait_until,
    worker_process,
)

pytestmark = pytest.mark.slow

# The engine's guarantees hold on both Kafka client backends (STREAMCORE_CLIENT).
CLIENTS = pytest.mark.parametrize("client", ["confluent-kafka", "aiokafka"])


def _outputs(bootstrap: str, out: str, expect: int,
             timeout: float = 90) -> list[dict[str, object]]:
    return [orjson.loads(m.value()) for m in read_topic(bootstrap, out, expect=expect,
                                                        timeout=timeout, settle=2.0)]


def _kill_and_restart(bootstrap: str, *, broken: bool, client: str = "confluent-kafka",
                      ) -> tuple[int, Counter[int], dict[int, int], PacedProducer]:
    src, out, name = unique("crash-in"), unique("crash-out"), unique("crash")
    make_topics(bootstrap, src, out)
    env = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_CLIENT": client,
           # A long linger keeps outputs unacknowledged for a while, so that a commit which
           # does not wait for acknowledgements is caught by the kill.
           "LINGER_MS": "2000", "BREAK_COMMIT_ORDER": "1" if broken else "0"}
    with PacedProducer(bootstrap, src, rate=1500) as producer:
        with worker_process("passthrough.py", bootstrap, {**env, "WORKER_ID": "a"}) as w:
            w.wait_for("assigned")
            # Let commits happen while records keep arriving, then kill mid-stream.
            wait_committed(bootstrap, name, src, 2000)
            w.kill()
        at_kill = committed(bootstrap, name, src)
        sent_at_kill = producer.sent
        wait_until(lambda: producer.sent > sent_at_kill + 1000, 10, "records while down")
        with worker_process("passthrough.py", bootstrap, {**env, "WORKER_ID": "b"}) as w2:
            w2.wait_for("assigned")
            wait_committed(bootstrap, name, src, sum(max(0, o) for o in at_kill.values()) + 1000)
            total = producer.stop()
            if broken:
                # The broken job loses records, so its outputs never reach the total: read
                # once b has committed every input and its linger has passed, not for 90 s.
                wait_committed(bootstrap, name, src, total - 1)  # "more than": all of them
                time.sleep(3)
            outputs = _outputs(bootstrap, out, total, timeout=3 if broken else 90)
            seen = Counter(int(v["seq"]) for v in outputs)  # type: ignore[call-overload]
            stop_gracefully(w2)
    assert sent_at_kill > 1000 and total > sent_at_kill, "records must still be arriving"
    return total, seen, at_kill, producer


@CLIENTS
def test_sigkill_mid_stream_loses_nothing(bootstrap: str, client: str) -> None:
    total, seen, at_kill, producer = _kill_and_restart(bootstrap, broken=False, client=client)
    missing = [s for s in range(total) if seen[s] == 0]
    assert not missing, f"{len(missing)} records lost, e.g. {missing[:10]}"
    assert any(off > 0 for off in at_kill.values()), "nothing was committed before the kill"
    # Duplicates only for records at or after the last commit before the kill.
    for seq, count in seen.items():
        if count > 1:
            part, off = producer.offsets[seq]
            assert off >= at_kill[part], (
                f"seq {seq} ({part}@{off}) duplicated although committed ({at_kill[part]})")


def test_crash_check_catches_a_broken_commit_order(bootstrap: str) -> None:
    """The same scenario with offsets committed before the outputs are acknowledged: the
    kill must then lose records, which proves the test above can fail."""
    total, seen, _, _ = _kill_and_restart(bootstrap, broken=True)
    missing = [s for s in range(total) if seen[s] == 0]
    assert missing, "a commit that ignores acknowledgements lost nothing: the check is blind"
    # Lost at the kill (committed, never acknowledged), not merely late at the end.
    assert min(missing) < total - 1000, f"only the last records are missing: {missing[:10]}"


@CLIENTS
def test_sigterm_mid_stream_then_restart_no_loss_no_duplicates(bootstrap: str,
                                                                client: str) -> None:
    src, out, name = unique("term-in"), unique("term-out"), unique("term")
    make_topics(bootstrap, src, out)
    env = {"IN": src, "OUT": out, "JOB": name, "LINGER_MS": "50", "STREAMCORE_CLIENT": client}
    with PacedProducer(bootstrap, src, rate=1500) as producer:
        with worker_process("passthrough.py", bootstrap, {**env, "WORKER_ID": "a"}) as w:
            w.wait_for("assigned")
            wait_committed(bootstrap, name, src, 2000)
            stop_gracefully(w)
        assert "stopping gracefully" in w.log()
        at_stop = committed_total(bootstrap, name, src)
        with worker_process("passthrough.py", bootstrap, {**env, "WORKER_ID": "b"}) as w2:
            w2.wait_for("assigned")
            wait_committed(bootstrap, name, src, at_stop + 1000)
            total = producer.stop()
            outputs = _outputs(bootstrap, out, total)
            stop_gracefully(w2)
    seen = Counter(int(v["seq"]) for v in outputs)  # type: ignore[call-overload]
    assert {v["w"] for v in outputs} == {"a", "b"}, "both runs must have processed records"
    assert sorted(seen) == list(range(total)), "records lost"
    dups = [s for s, c in seen.items() if c > 1]
    assert not dups, f"{len(dups)} duplicates after a graceful stop, e.g. {dups[:10]}"


@pytest.mark.parametrize(("client", "backlog"), [("confluent-kafka", False),
                                                 ("confluent-kafka", True),
                                                 ("aiokafka", False)],
                         ids=["caught-up", "backlog", "aiokafka-caught-up"])
def test_second_worker_joins_and_leaves_mid_stream(bootstrap: str, client: str,
                                                   backlog: bool) -> None:
    """With backlog, records arrive faster than the workers process them, so that the
    rebalances happen while each worker reads full batches on its event loop."""
    src, out, name = unique("reb-in"), unique("reb-out"), unique("reb")
    make_topics(bootstrap, src, out)
    env = {"IN": src, "OUT": out, "JOB": name, "LINGER_MS": "5",
           "SLOW_US": "100" if backlog else "0", "STREAMCORE_CLIENT": client}
    with PacedProducer(bootstrap, src, rate=12000 if backlog else 1000) as producer, \
            worker_process("passthrough.py", bootstrap, {**env, "WORKER_ID": "a"}) as a:
        a.wait_for("assigned")
        wait_committed(bootstrap, name, src, 500)
        with worker_process("passthrough.py", bootstrap, {**env, "WORKER_ID": "b"}) as b:
            try:
                b.wait_for("assigned", timeout=90)  # b takes over some partitions
                a.wait_for("revoking")
                done = committed(bootstrap, name, src).values()
                lag = producer.sent - sum(max(0, o) for o in done)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n--- worker a ({a.log_path}):\n{a.tail()}\n"
                                     f"--- worker b: {b.log_path}") from None
            wait_until(lambda: b.processed() > 500, 60, "b to process records")
            stop_gracefully(b)  # b leaves: a gets them back
        if backlog:
            assert lag > 5000, f"no backlog at the handover (lag {lag}): nothing tested"
        a.wait_for("assigned", times=2)  # a got b's partitions back
        wait_committed(bootstrap, name, src, committed_total(bootstrap, name, src) + 1000)
        total = producer.stop()
        outputs = _outputs(bootstrap, out, total)
        stop_gracefully(a)

    seen = Counter(int(v["seq"]) for v in outputs)  # type: ignore[call-overload]
    assert sorted(seen) == list(range(total)), "records lost across the rebalances"
    assert {v["w"] for v in outputs} == {"a", "b"}, "b never processed anything"
    # One worker at a time per partition: in processing order (the output partition keeps
    # it, since the output key is the input partition), the worker changes only at a
    # handover: a -> b when b joins, b -> a when it leaves.
    by_part: dict[int, list[str]] = defaultdict(list)
    for v in outputs:
        by_part[int(v["p"])].append(str(v["w"]))  # type: ignore[call-overload]
    for part, workers in by_part.items():
        switches = sum(1 for x, y in itertools.pairwise(workers) if x != y)
        assert switches <= 2, f"partition {part} interleaved between workers: {switches} switches"
    # The revoked partitions were committed at the handover: b started where a stopped, so
    # there are no duplicates with a graceful handover.
    dups = sorted(s for s, n in seen.items() if n > 1)
    assert not dups, (f"duplicates across a graceful handover: {dups[:20]}\n"
                      f"--- worker a:\n{a.tail()}\n--- worker b:\n{b.tail()}")
