"""Hostile input: random bytes (hypothesis) for every built-in serde through a running job.

What it breaks: values and keys that are not valid JSON or UTF-8, mixed with good records,
under the dead_letter policy. What it counts: good records in the output (every one, in
order: none lost), bad records in the dead-letter topic (every one, with its original bytes
and the reason), and the job's health (it must still be running). A bad record under the
fail policy stops the job with a message naming its position
(test_failures.test_undecodable_record_fails_naming_its_position).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamcore import BYTES, JSON, STR, Job, KafkaSink, KafkaSource, Serde
from tests.helpers import make_topics, produce, read_topic, unique, worker_config

pytestmark = pytest.mark.slow

SERDES: dict[str, Serde] = {"bytes": BYTES, "str": STR, "json": JSON}


def _decodes(serde: Serde, raw: bytes) -> tuple[bool, Any]:
    try:
        return True, serde.deserialize(raw)
    except Exception:
        return False, None


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(noise=st.lists(st.binary(min_size=1, max_size=48), min_size=10, max_size=60),
       key_noise=st.lists(st.binary(min_size=1, max_size=12), min_size=10, max_size=10))
def test_random_bytes_never_crash_the_job_nor_lose_a_good_record(
        bootstrap: str, tmp_path_factory: pytest.TempPathFactory, noise: list[bytes],
        key_noise: list[bytes]) -> None:
    job = Job(unique("hostile"), on_error="dead_letter")
    topics: dict[str, tuple[str, str]] = {}
    for name, serde in SERDES.items():
        src, out = unique(f"hi-{name}"), unique(f"ho-{name}")
        topics[name] = (src, out)
        make_topics(bootstrap, src, out, partitions=1)
        # The JSON source also decodes its keys as text: random keys test the key path.
        key = STR if name == "json" else BYTES
        job.stream(KafkaSource(src, key=key, value=serde)).to(
            KafkaSink(out, key=key, value=serde))
    # Good records between the random ones, one partition so that order is checkable.
    values = [v for i, n in enumerate(noise) for v in (orjson.dumps({"good": i}), n)]
    keys = [key_noise[i % len(key_noise)] if i % 3 == 0 else b"k" for i in range(len(values))]
    expect: dict[str, tuple[list[Any], list[bytes]]] = {}
    for name, serde in SERDES.items():
        produce(bootstrap, topics[name][0], ((k, v, 0) for k, v in zip(keys, values,
                                                                    strict=True)))
        good: list[Any] = []
        bad: list[bytes] = []
        for k, v in zip(keys, values, strict=True):
            ok, decoded = _decodes(serde, v)
            if name == "json":
                ok = ok and _decodes(STR, k)[0]
            if ok:
                good.append(decoded)
            else:
                bad.append(v)
        expect[name] = (good, bad)
    cfg = worker_config(bootstrap, state_dir=str(tmp_path_factory.mktemp("state")))
    q = job.start(cfg)
    try:
        outputs = {name: read_topic(bootstrap, topics[name][1], expect=len(expect[name][0]),
                                    partitions=1) for name in SERDES}
        n_bad = sum(len(b) for _, b in expect.values())
        dlq = read_topic(bootstrap, job.dlq_topic, expect=n_bad, partitions=1)
        assert q.is_active, f"the job stopped: {q.exception()!r}"
    finally:
        q.stop(30)
    assert q.exception() is None, q.exception()
    for name, serde in SERDES.items():
        got = [None if m.value() is None else serde.deserialize(m.value())
               for m in outputs[name]]
        assert got == expect[name][0], f"{name}: good records lost or reordered"
        in_dlq = [m.value() for m in dlq
                  if dict(m.headers())["streamcore.source.topic"].decode() == topics[name][0]]
        assert in_dlq == expect[name][1], f"{name}: bad records missing from the DLQ"
    for m in dlq:
        h = dict(m.headers())
        assert h["streamcore.error.kind"] == b"deserialization" and h["streamcore.error.message"]
