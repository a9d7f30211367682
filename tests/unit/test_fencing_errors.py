"""How a fenced transactional producer's failures read: every way the fence can reach the
engine (a commit, a produce, a delivery report) stops the worker with ProducerFenced naming
the transactional id, never with an anonymous "delivery failed". Pure logic: the producer
is created but never connects."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaError, KafkaException

from connectors.confluent import ConfluentProducer, producer_settings
from streamcore.core.errors import (
    DeliveryFailed,
    FatalError,
    ProducerFenced,
    TransactionAborted,
)


@pytest.fixture
def producer() -> Iterator[ConfluentProducer]:
    # Its own logger: its connection failures must not count in the burst state of
    # streamcore.librdkafka that test_logs.py asserts on.
    p = ConfluentProducer(producer_settings("127.0.0.1:1", {}, {
        "transactional.id": "t-1", "logger": logging.getLogger("tests.fencing")}))
    yield p
    p.close()


def test_a_delivery_report_failed_by_the_fence_is_the_fence(producer: ConfluentProducer) -> None:
    failure = DeliveryFailed("out", 'KafkaError{code=PRODUCER_FENCED,val=90,str="fenced"}')
    err = producer.explain_failure(failure)
    assert isinstance(err, ProducerFenced) and "'t-1'" in str(err)
    other = DeliveryFailed("out", "Broker: Message size too large")
    assert producer.explain_failure(other) is other


def test_a_produce_refused_with_a_fatal_error_is_the_fence(producer: ConfluentProducer) -> None:
    err = producer.delivery_error("out", KafkaException(KafkaError(KafkaError._FATAL)))
    assert isinstance(err, ProducerFenced) and "'t-1'" in str(err)


def test_an_idempotent_producers_fatal_error_stops_every_later_poll() -> None:
    """Without a transactional id the fatal error (an idempotence failure) is no fence: it
    stops the worker as a FatalError that quotes librdkafka, at every later poll."""
    p = ConfluentProducer(producer_settings("127.0.0.1:1", {}, {
        "logger": logging.getLogger("tests.fencing")}))
    try:
        p.poll(0)  # no error before the fatal one
        p._fatal = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "sequence gap", fatal=True)
        for _ in range(2):
            with pytest.raises(FatalError, match="sequence gap") as info:
                p.poll(0)
            assert not isinstance(info.value, ProducerFenced)
    finally:
        p.close()


def test_a_delivery_purged_by_a_failed_transaction_aborts_the_epoch(
        producer: ConfluentProducer) -> None:
    """librdkafka purges a transactional producer's queue when the transaction fails with an
    abortable error (a fence the broker reports as one, among others): the purged records'
    reports say _PURGE_QUEUE. That is the transaction's failure, not the record's: the epoch
    is aborted and retried (a fenced worker then fails its abort, naming itself), where a
    DeliveryFailed would stop the worker with no word of the cause."""
    purged = DeliveryFailed("job-totals-changelog",
                            'KafkaError{code=_PURGE_QUEUE,val=-152,str="Local: Purged in queue"}')
    err = producer.explain_failure(purged)
    assert isinstance(err, TransactionAborted) and "'t-1'" in str(err)
    assert "Purged in queue" in str(err)
    # Without a transaction nothing purges the queue but close(): no reason to read it so.
    plain = ConfluentProducer(producer_settings("127.0.0.1:1", {}, {
        "logger": logging.getLogger("tests.fencing")}))
    try:
        assert plain.explain_failure(purged) is purged
    finally:
        plain.close()
