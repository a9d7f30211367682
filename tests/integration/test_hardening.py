"""Defects found in review (correctness hardening), each with the test that caught it.

Workers run in-process (job.start) against the local broker; expected values are computed
from the records the test produced.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, WorkerConfig
from tests.helpers import latest_per_key, make_topics, produce, read_topic, unique


def _cfg(bootstrap: str, state_dir: Path, **kw: Any) -> WorkerConfig:
    return WorkerConfig(http_port=0, bootstrap_servers=bootstrap, state_dir=str(state_dir),
                        progress_interval="1s", **kw)


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
