"""Epoch mode's per-task producer (streamcore.runtime.deferred): its ``produce`` is the
transactional producer's own while nothing is deferred or kept, and keeps records, in order,
otherwise. Pure logic, on the in-memory producer (no transaction needed for the routing)."""

from __future__ import annotations

from typing import Any

from connectors.memory import MemoryCluster, MemoryProducer
from streamcore.runtime.deferred import DeferringProducer


def _send(p: DeferringProducer, value: bytes) -> None:
    p.produce("out", value, None, 0, lambda err, msg: None, None, 0, None)


def _written(cluster: MemoryCluster) -> list[Any]:
    return [m.value() for m in cluster.topics["out"][0]]


def test_records_go_straight_through_kept_while_deferring_and_in_order_after() -> None:
    cluster = MemoryCluster(lambda: 0)
    cluster.create_topic("out", 1)
    inner = MemoryProducer(cluster)
    p = DeferringProducer(inner)
    assert p.produce == inner.produce  # no frame of ours per output
    _send(p, b"1")
    p.deferring = True  # the previous epoch's transaction commits
    _send(p, b"2")
    p.deferring = False  # the next transaction begins ...
    _send(p, b"3")  # ... but "2" is still kept: "3" goes behind it
    assert _written(cluster) == [b"1"] and len(p.kept) == 2
    assert p.in_flight() == 1 + 2  # the one not yet acknowledged, and the kept ones
    assert p.release()
    assert _written(cluster) == [b"1", b"2", b"3"]
    assert p.produce == inner.produce  # straight through again
    _send(p, b"4")
    assert _written(cluster) == [b"1", b"2", b"3", b"4"]


def test_kept_records_beyond_the_limit_are_refused_as_a_full_queue_would() -> None:
    cluster = MemoryCluster(lambda: 0)
    cluster.create_topic("out", 1)
    p = DeferringProducer(MemoryProducer(cluster), deferring=True, limit=2)
    _send(p, b"1")
    _send(p, b"2")
    try:
        _send(p, b"3")
    except BufferError:
        pass
    else:
        raise AssertionError("the third kept record must be refused")
    p.kept.clear()  # an aborted epoch drops what was kept ...
    p.deferring = False  # ... and stops deferring
    _send(p, b"4")
    assert _written(cluster) == [b"4"]
