"""The confluent-kafka backend's data side against the local broker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka import TopicPartition as CTP

from connectors import threaded
from connectors.base import RebalanceListener, TopicPartition
from connectors.confluent import (
    ConfluentConsumer,
    ConfluentProducer,
    consumer_settings,
    producer_settings,
)
from connectors.threaded import ThreadedMember
from streamcore.core.errors import ProducerFenced, TransactionAborted
from tests.helpers import make_topics, produce, unique


def _read(c: ConfluentConsumer, want: int, attempts: int = 30) -> int:
    got = 0
    for _ in range(attempts):
        got += len(c.consume(1000, 0.1))
        if got >= want:
            break
    return got


def test_a_partition_paused_when_revoked_is_fetched_again_when_it_comes_back(
        bootstrap: str) -> None:
    """Backpressure pauses a partition on the reader; it is revoked while paused and later
    assigned back to the same worker. librdkafka keeps the pause across unassign/assign, so
    before the fix the partition was never fetched again (0 records, /readyz still 200)."""
    topic = unique("pause")
    make_topics(bootstrap, topic, partitions=1)
    produce(bootstrap, topic, ((None, b"x", 0) for _ in range(20)))
    c = ConfluentConsumer(consumer_settings(bootstrap, unique("g"), {}, {}))
    try:
        c._reader_add([CTP(topic, 0, 0)])
        assert _read(c, 20) == 20
        c.pause([(topic, 0)])  # the inbox is full
        c._reader_remove([CTP(topic, 0)])  # revoked while paused
        c._reader_add([CTP(topic, 0, 0)])  # ... and assigned back
        assert _read(c, 20) == 20, "the partition stayed paused after coming back"
    finally:
        c.close()


def test_a_fenced_transactional_producer_says_so_wherever_the_fence_surfaces(
        bootstrap: str) -> None:
    """librdkafka reports a fatal error (the fence, when a fenced producer adds a partition
    to its transaction) by raising it from the next poll, never through error_cb. Before the
    fix that poll, inside delivery_error or the worker's poll loop, let the raw
    KafkaException(_FENCED) out: the worker stopped without ProducerFenced, so the fencing
    worker was not named (CI, test_epoch_mode, 1 run in several)."""
    topic, txn = unique("fence"), unique("txn")
    make_topics(bootstrap, topic, partitions=2)
    with _fenced_in_a_transaction(bootstrap, topic, txn) as a:
        a.produce(topic, b"v", None, 1, lambda err, msg: None, None, 0, None)  # new partition
        with pytest.raises(ProducerFenced, match=repr(txn)):
            for _ in range(50):
                a.poll(0.1)
        # Once fatal, every later way in says the same: the poll, and a refused produce.
        with pytest.raises(ProducerFenced):
            a.poll(0)
        err = a.delivery_error(topic, KafkaException(KafkaError(KafkaError._STATE)))
        assert isinstance(err, ProducerFenced) and repr(txn) in str(err)


def test_a_commit_that_times_out_gives_up_within_its_timeout(bootstrap: str) -> None:
    """commit_transaction(timeout) retries a retriable failure only within that timeout.
    On the local broker a fenced producer's commit is never answered (the broker closes the
    coordinator connection): librdkafka times out with a retriable error. Before the fix each
    of three attempts took the whole timeout, so an epoch-mode worker fenced at its commit
    stopped only after 3 x 30 s plus the abort (CI: the fenced worker still ran 60 s later)."""
    topic, txn = unique("fence-commit"), unique("txn")
    make_topics(bootstrap, topic)
    with _fenced_in_a_transaction(bootstrap, topic, txn) as a:  # its commit comes next
        t0 = time.monotonic()
        with pytest.raises((TransactionAborted, ProducerFenced), match=repr(txn)):
            a.commit_transaction(3.0)
        took = time.monotonic() - t0
        assert took < 5.0, f"commit_transaction(3.0) gave up after {took:.1f}s"


@contextmanager
def _fenced_in_a_transaction(bootstrap: str, topic: str,
                             txn: str) -> Iterator[ConfluentProducer]:
    """A transactional producer with one acknowledged record (partition 0) in its open
    transaction, fenced since by a second producer with the same transactional id."""
    settings = producer_settings(bootstrap, {}, {})
    a = ConfluentProducer({**settings, "transactional.id": txn})
    b = ConfluentProducer({**settings, "transactional.id": txn})
    try:
        a.init_transactions(30)
        a.begin_transaction()
        a.produce(topic, b"v", None, 0, lambda err, msg: None, None, 0, None)
        while a.in_flight():
            a.poll(0.1)
        b.init_transactions(30)  # fences a
        yield a
    finally:
        a.close()
        b.close()


def test_the_lag_gauge_reads_the_high_watermark_while_another_thread_fetches(
        bootstrap: str) -> None:
    """A /metrics scrape asks for the high watermark on the HTTP thread while the fetch
    thread polls the reader back to back (an idle worker). Before the fix the call went to
    the reader and, on confluent-kafka 2.16, waited for the polls: here it did not return
    within 10 s; in the suite a scrape took over 5 s under load. It now reads what the last
    fetch recorded."""
    topic = unique("highs")
    make_topics(bootstrap, topic, partitions=1)
    produce(bootstrap, topic, ((None, b"x", 0) for _ in range(3)))
    c = ConfluentConsumer(consumer_settings(bootstrap, unique("g"), {}, {}))
    stop = threading.Event()

    def fetch() -> None:  # the fetch thread of an idle worker
        while not stop.is_set():
            c.consume(100, 0.5)

    fetcher = threading.Thread(target=fetch)
    try:
        c._reader_add([CTP(topic, 0, 0)])
        fetcher.start()
        deadline = time.monotonic() + 30
        high = None
        while high != 3 and time.monotonic() < deadline:
            got: list[int | None] = []
            asker = threading.Thread(target=lambda out=got: out.append(
                c.high_watermark((topic, 0))), daemon=True)
            asker.start()
            asker.join(10)
            assert got, "high_watermark did not return within 10 s while the reader polls"
            high = got[0]
            time.sleep(0.2)
        assert high == 3
    finally:
        stop.set()
        fetcher.join(10)
        c.close()


def test_pause_and_resume_do_not_wait_for_the_fetch_in_flight(bootstrap: str) -> None:
    """A partition task resumes its partition on the event loop while the fetch thread polls
    the reader. On confluent-kafka 2.16 a call on the reader waits for that poll, so each
    resume held the event loop for up to a poll (in the map_async backpressure test, 55
    resumes held it 4.1 s, 98 ms at worst, while the I/O calls waited). The member now keeps
    such calls until the fetch lands, and applies them, in order, before the next one."""
    topic = unique("defer")
    make_topics(bootstrap, topic, partitions=2)
    c = ConfluentConsumer(consumer_settings(bootstrap, unique("g"), {}, {}))
    member = ThreadedMember(c)
    p0, p1 = (topic, 0), (topic, 1)
    polled = threading.Event()  # set when a poll of the reader has returned
    consume = c.consume

    def consume_and_tell(max_records: int, timeout: float) -> list[Any]:
        try:
            return consume(max_records, timeout)
        finally:
            polled.set()

    c.consume = consume_and_tell  # type: ignore[method-assign]

    async def scenario() -> None:
        c._reader_add([CTP(topic, 0, 0), CTP(topic, 1, 0)])
        assert await member.fetch(100, 0.5) == []  # the reader has joined its partitions
        polled.clear()
        fetch = asyncio.ensure_future(member.fetch(100, 3.0))  # nothing comes: a long poll
        await asyncio.sleep(0.5)
        member.pause([p0])
        member.resume([p1])
        member.pause([p1])  # kept in order: p1 ends paused too
        assert not polled.is_set(), "pause/resume waited for the fetch in flight"
        assert await fetch == []
        produce(bootstrap, topic, ((None, b"x", p) for p in (0, 1) for _ in range(5)))
        assert await member.fetch(100, 1.0) == [], "a pause kept back was never applied"
        member.resume([p0])  # no fetch in flight: at once
        got = await member.fetch(100, 5.0)
        assert {m.partition() for m in got} == {0} and len(got) == 5

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(member.close())


class _Joined(RebalanceListener):
    def __init__(self) -> None:
        self.assigned_parts: list[TopicPartition] = []
        self.joined = asyncio.Event()

    async def assigned(self, parts: list[TopicPartition]) -> None:
        self.assigned_parts.extend(parts)
        self.joined.set()

    async def revoked(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {}

    async def lost(self, parts: list[TopicPartition]) -> None:
        pass

    def fenced(self, parts: list[TopicPartition]) -> None:
        pass


def test_the_group_metadata_does_not_wait_for_the_serve_in_flight(
        bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch mode reads the group's metadata at every transaction's commit, on the event
    loop. On confluent-kafka 2.16 a call on the member waits while the membership thread
    serves the group (20 ms at most, 8.7 ms on average over a W1 epoch run), holding the loop
    while the overlapped next epoch waits. The membership thread now reads it after each
    serve, and the loop takes that copy."""
    topic = unique("meta")
    make_topics(bootstrap, topic, partitions=1)
    c = ConfluentConsumer(consumer_settings(bootstrap, unique("g"), {}, {}))
    member = ThreadedMember(c)
    long_serve, served = threading.Event(), threading.Event()
    serve = c.serve

    def serve_and_tell(timeout: float) -> list[Any]:
        if timeout >= 1:
            long_serve.set()
        try:
            return serve(timeout)
        finally:
            served.set()

    c.serve = serve_and_tell  # type: ignore[method-assign]
    listener = _Joined()

    async def scenario() -> None:
        await member.join([topic], listener)
        try:
            async with asyncio.TaskGroup() as tg:
                running = tg.create_task(member.run())
                await asyncio.wait_for(listener.joined.wait(), 30)
                assert listener.assigned_parts == [(topic, 0)]
                assert member.group_metadata() is not None  # the first may wait for a serve
                monkeypatch.setattr(threaded, "_SERVE_TIMEOUT_S", 3.0)
                await asyncio.to_thread(long_serve.wait, 5)
                served.clear()
                assert member.group_metadata() is not None
                assert not served.is_set(), "the group metadata waited for the serve in flight"
                running.cancel()
        finally:
            await member.close()  # on this loop: the revoke goes to its listener

    asyncio.run(scenario())
