"""The confluent-kafka (librdkafka) backend: the default, and the fastest."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as CTP

from connectors import admin
from connectors.base import (
    ClientBackend,
    ConsumerBackend,
    DeliveryCallback,
    Message,
    PartitionReader,
    PartitionsCallback,
    ProducerBackend,
    TopicPartition,
)
from connectors.threaded import ThreadedMember
from streamcore.core.errors import (
    BrokerUnavailable,
    ConfigError,
    DeliveryFailed,
    FatalError,
    ProducerFenced,
    RebalanceError,
    TransactionAborted,
)
from streamcore.core.logs import BurstLogger, librdkafka_logger

__all__ = [
    "ConfluentClients",
    "ConfluentConsumer",
    "ConfluentProducer",
    "ConfluentReader",
    "consumer_settings",
    "producer_settings",
    "reader_settings",
]

log = logging.getLogger("streamcore.kafka")
_burst_log = BurstLogger(log)

# Settings measured on the local broker and sane on real Kafka (DESIGN.md section 9).
_CONSUMER_DEFAULTS: dict[str, Any] = {
    "partition.assignment.strategy": "cooperative-sticky",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "fetch.queue.backoff.ms": 1,  # the default (1 s) caps consumption at a quarter
    "fetch.wait.max.ms": 100,
    "max.poll.interval.ms": 300000,
    "allow.auto.create.topics": False,  # a misspelled topic is an error, never a new topic
    "queued.max.messages.kbytes": 16384,  # prefetch bound: memory set by config, not backlog
}
_PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "partitioner": "murmur2_random",  # the Java client's partitioner: co-partitioned with it
}


# How often a fetch refreshes the reader's high watermarks (the consumer-lag gauge).
_HIGHS_EVERY_S = 1.0

# A commit refused with these means the member is no longer in the group's generation.
_FENCED = frozenset({KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID})
# A transactional producer that another one with its transactional id replaced. (A group
# that moved on, ILLEGAL_GENERATION, only aborts the epoch: the member rejoins.)
_PRODUCER_FENCED = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                              KafkaError.INVALID_PRODUCER_EPOCH})


def consumer_settings(bootstrap: str, group: str, common: Mapping[str, Any],
                      own: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "logger": librdkafka_logger(),
        **_CONSUMER_DEFAULTS,
        **common,
        **own,
        # Without a commit a partition starts at its beginning; "latest" sources are
        # started at their end per partition (ConsumerBackend.subscribe), so that internal
        # topics never skip records.
        "auto.offset.reset": "earliest",
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
    }


def reader_settings(bootstrap: str, common: Mapping[str, Any]) -> dict[str, Any]:
    """A consumer that only assigns (no group membership, no commits)."""
    return {
        "logger": librdkafka_logger(),
        "fetch.queue.backoff.ms": 1,
        "fetch.wait.max.ms": 100,
        "queued.max.messages.kbytes": 65536,
        **common,
        "bootstrap.servers": bootstrap,
        "group.id": "streamcore-reader",  # required by the client; never joined or committed
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",  # a checkpoint past the end (topic re-created): all
    }


def producer_settings(bootstrap: str, common: Mapping[str, Any],
                      own: Mapping[str, Any]) -> dict[str, Any]:
    return {"logger": librdkafka_logger(), **_PRODUCER_DEFAULTS, **common, **own,
            "bootstrap.servers": bootstrap}


def _poll_then_drain(c: Consumer, max_records: int, timeout: float) -> list[Message]:
    """Up to max_records messages: wait for the first, then take what is already fetched.

    librdkafka's consume(n, timeout) waits until it has n messages or the timeout passes,
    which adds up to a whole timeout of latency at low rates. poll() returns at the first
    message; consume(k, 0) then takes what is already fetched, about one fetched batch per
    call, so it is repeated while it yields: a backlog comes in full batches, and nothing
    ever waits once a message is there.
    """
    first = c.poll(timeout)
    if first is None:
        return []
    msgs: list[Message] = [cast(Message, first)]
    while len(msgs) < max_records:
        more = c.consume(max_records - len(msgs), 0)
        if not more:
            break
        msgs.extend(cast(list[Message], more))
    return msgs


def _creation_error(exc: KafkaException, what: str) -> Exception:
    """A client that cannot be created: a bad setting is a configuration error naming it
    (exit 2), anything else a broker problem."""
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError) and err.code() == KafkaError._INVALID_ARG:
        m = re.search(r'"([^"]+)"', err.str())
        return ConfigError(f"kafka[{m.group(1)!r}]" if m else "kafka", err.str())
    return BrokerUnavailable(f"cannot create {what}: {exc}")


def _tps(parts: Sequence[CTP]) -> list[TopicPartition]:
    return [(p.topic, p.partition) for p in parts]


class ConfluentConsumer(ConsumerBackend):
    """Two librdkafka consumers of the same group id: a *member* that joins the group, runs
    the rebalance callbacks and commits, with every partition it owns paused so that it
    never fetches; and a *reader* that is assigned the same partitions (no group membership,
    so none of its calls runs a callback) and fetches the records. That split lets the event
    loop read straight from the reader while a backlog lasts (see connectors.base)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._settings = dict(settings)
        self._settings.setdefault("error_cb", self._on_error)
        self._settings.setdefault("on_commit", self._on_commit)
        self._on_fenced: PartitionsCallback | None = None
        # Send times of asynchronous commits not answered yet (answered in order).
        self._commits_sent: deque[float] = deque()
        self._commit_seconds: Callable[[float], None] | None = None
        self._connected: Callable[[bool], None] | None = None
        self._commit_failed: Callable[[dict[TopicPartition, int]], None] | None = None
        # The member reports its brokers' states every few seconds (the connectivity gauge);
        # its statistics are small: it fetches nothing.
        member = {"statistics.interval.ms": 5000, "stats_cb": self._on_stats, **self._settings}
        self.max_poll_interval_s = int(self._settings["max.poll.interval.ms"]) / 1000
        try:
            self._c = Consumer(member)
            self._d = Consumer(self._settings)
        except KafkaException as exc:
            raise _creation_error(exc, "the consumer") from exc
        # The reader's high watermarks, read by the fetch that just polled it. Asked from
        # another thread (a /metrics scrape) while the fetch thread polls the reader,
        # confluent-kafka 2.16's get_watermark_offsets waited for seconds under load.
        self._highs: dict[TopicPartition, int] = {}
        self._highs_at = 0.0

    @staticmethod
    def _on_error(err: KafkaError) -> None:
        # librdkafka retries transport errors itself and reports each retry: log the first of
        # a burst per error code (an outage gives a few lines, not thousands).
        if err.fatal():
            log.error("fatal consumer error: %s", err)
        else:
            _burst_log.warning(f"consumer:{err.code()}", "consumer: %s", err)

    def observe_commits(self, seconds: Callable[[float], None]) -> None:
        self._commit_seconds = seconds

    def observe_connectivity(self, connected: Callable[[bool], None]) -> None:
        self._connected = connected

    def observe_commit_failures(self,
                                failed: Callable[[dict[TopicPartition, int]], None]) -> None:
        self._commit_failed = failed

    def _on_stats(self, stats: str) -> None:
        if self._connected is not None:
            brokers = json.loads(stats).get("brokers", {}).values()
            self._connected(any(b.get("state") == "UP" for b in brokers))

    def _on_commit(self, err: KafkaError | None, parts: list[CTP]) -> None:
        if self._commits_sent:
            sent = self._commits_sent.popleft()
            if self._commit_seconds is not None:
                self._commit_seconds(time.perf_counter() - sent)
        if err is None or err.code() == KafkaError._NO_OFFSET:
            return
        log.warning("asynchronous commit failed: %s", err)
        if err.code() in _FENCED:
            if self._on_fenced is not None:
                self._on_fenced(_tps(parts))
        elif self._commit_failed is not None:
            self._commit_failed({(p.topic, p.partition): p.offset for p in parts})

    def subscribe(self, topics: Sequence[str], *, on_assign: PartitionsCallback,
                  on_revoke: PartitionsCallback, on_lost: PartitionsCallback,
                  start_at_end: Callable[[str], bool] = lambda topic: False,
                  on_fenced: PartitionsCallback | None = None) -> None:
        self._on_fenced = on_fenced
        def assigned(c: Consumer, parts: list[CTP]) -> None:
            on_assign(_tps(parts))  # 1. the tasks exist before any of their records arrive
            try:  # 2. the member takes them (as librdkafka requires) but never fetches them
                c.incremental_assign(parts)
                eager = False
            except KafkaException:  # a user-configured eager assignor: whole assignments
                c.assign(parts)
                eager = True
            if parts:
                c.pause(parts)
            # 3. the reader starts at the group's committed offsets (no offset given: the
            # committed one, else auto.offset.reset=earliest), exactly where the member
            # would have; a "latest" source's partition without a commit starts at its end.
            self._reader_add(self._starts(parts, start_at_end), eager=eager)

        def taken(callback: PartitionsCallback) -> Callable[[Consumer, list[CTP]], None]:
            def revoked(_c: Consumer, parts: list[CTP]) -> None:
                # The reader stops first, so the draining tasks get no new records; what it
                # had fetched and not handed over is read again by the next owner.
                self._reader_remove(parts)
                callback(_tps(parts))
            return revoked

        self._c.subscribe(list(topics), on_assign=assigned, on_revoke=taken(on_revoke),
                          on_lost=taken(on_lost))

    def _reader_add(self, parts: list[CTP], *, eager: bool = False) -> None:
        """Let the reader fetch these partitions from the given (or committed) offsets.

        librdkafka keeps an application pause across unassign and assign, so a partition
        paused by backpressure when it was revoked would never be fetched again after coming
        back: every assignment resumes."""
        if eager:
            self._d.assign(parts)
        elif parts:
            self._d.incremental_assign(parts)
        if parts:
            self._d.resume([CTP(p.topic, p.partition) for p in parts])

    def _reader_remove(self, parts: list[CTP]) -> None:
        with contextlib.suppress(KafkaException):
            self._d.incremental_unassign([CTP(p.topic, p.partition) for p in parts])

    def _starts(self, parts: list[CTP], start_at_end: Callable[[str], bool]) -> list[CTP]:
        fresh = [CTP(p.topic, p.partition) for p in parts]
        at_end = [p for p in fresh if start_at_end(p.topic)]
        if at_end:
            try:
                done = self._c.committed(at_end, timeout=30)
            except KafkaException as exc:
                raise RebalanceError(f"cannot read the committed offsets: {exc}") from exc
            uncommitted = {(c.topic, c.partition) for c in done if c.offset < 0}
            fresh = [CTP(p.topic, p.partition, OFFSET_END)
                     if (p.topic, p.partition) in uncommitted else p for p in fresh]
        return fresh

    def serve(self, timeout: float) -> list[Any]:
        try:
            m = self._c.poll(timeout)
        except KafkaException as exc:
            raise RebalanceError(f"consumer failed: {exc}") from exc
        # Only errors come back: every partition of the member is paused.
        return [m.error()] if m is not None and m.error() is not None else []

    def consume(self, max_records: int, timeout: float) -> list[Message]:
        try:
            msgs = _poll_then_drain(self._d, max_records, timeout)
        except KafkaException as exc:
            raise RebalanceError(f"consume failed: {exc}") from exc
        now = time.monotonic()
        if now - self._highs_at >= _HIGHS_EVERY_S:
            self._highs_at = now
            self._highs = self._read_highs()
        return msgs

    def _read_highs(self) -> dict[TopicPartition, int]:
        """The reader's cached high watermarks (no request), on the thread that fetches."""
        highs: dict[TopicPartition, int] = {}
        try:
            assigned = self._d.assignment()
        except KafkaException:
            return highs
        for ctp in assigned:
            try:
                _low, high = self._d.get_watermark_offsets(ctp, cached=True)
            except KafkaException:
                continue
            if high is not None and high >= 0:
                highs[(ctp.topic, ctp.partition)] = int(high)
        return highs

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        try:
            self._d.pause([CTP(t, p) for t, p in partitions])
        except KafkaException as exc:  # revoked meanwhile: nothing left to pause
            log.debug("pause %s: %s", partitions, exc)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        try:
            self._d.resume([CTP(t, p) for t, p in partitions])
        except KafkaException as exc:
            log.debug("resume %s: %s", partitions, exc)

    def commit(self, offsets: dict[TopicPartition, int], *, asynchronous: bool) -> None:
        if not offsets:
            return
        parts = [CTP(t, p, o) for (t, p), o in offsets.items()]
        try:
            if asynchronous:
                self._commits_sent.append(time.perf_counter())
                self._c.commit(offsets=parts, asynchronous=True)
                return
            result = self._c.commit(offsets=parts, asynchronous=False)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() in _FENCED and self._on_fenced is not None:
                self._on_fenced(list(offsets))
            raise BrokerUnavailable(f"commit failed: {exc}") from exc
        for tp in result:
            if tp.error is not None:
                raise BrokerUnavailable(
                    f"commit failed for {tp.topic}[{tp.partition}]: {tp.error}")

    def close(self) -> None:
        try:
            self._c.close()  # leaves the group: on_revoke runs for what is still assigned
        finally:
            self._d.close()

    def seek(self, offsets: dict[TopicPartition, int]) -> None:
        for (t, p), o in offsets.items():
            try:  # the reader fetches; a seek also drops what it had fetched past o
                self._d.seek(CTP(t, p, o))
            except KafkaException as exc:
                raise RebalanceError(f"cannot seek {t}[{p}] to {o}: {exc}") from exc

    def group_metadata(self) -> Any:
        return self._c.consumer_group_metadata()  # the member's: it holds the generation

    def high_watermark(self, tp: TopicPartition) -> int | None:
        return self._highs.get(tp)  # as of the last fetch (at most _HIGHS_EVERY_S old)


class ConfluentReader(PartitionReader):
    def __init__(self, settings: Mapping[str, Any]) -> None:
        try:
            self._c = Consumer(dict(settings))
        except KafkaException as exc:
            raise _creation_error(exc, "a reader") from exc

    def assign(self, starts: dict[TopicPartition, int]) -> None:
        self._c.assign([CTP(t, p, o) for (t, p), o in starts.items()])

    def read(self, max_records: int, timeout: float) -> list[Message]:
        try:
            msgs = _poll_then_drain(self._c, max_records, timeout)
        except KafkaException as exc:
            raise BrokerUnavailable(f"reading failed: {exc}") from exc
        for m in msgs:
            err = m.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                raise BrokerUnavailable(f"reading {m.topic()}[{m.partition()}] failed: {err}")
        return [m for m in msgs if m.error() is None]

    def position(self, tp: TopicPartition) -> int | None:
        try:
            (pos,) = self._c.position([CTP(*tp)])
        except KafkaException:
            return None
        return int(pos.offset) if pos.offset >= 0 else None

    def end_offset(self, tp: TopicPartition) -> int:
        try:
            _low, high = self._c.get_watermark_offsets(CTP(*tp), timeout=10, cached=False)
        except KafkaException as exc:
            raise BrokerUnavailable(f"cannot read the end offset of {tp}: {exc}") from exc
        return int(high)

    def close(self) -> None:
        self._c.close()


# A retriable commit failure is tried again only with at least this much of its timeout left.
_MIN_RETRY_S = 0.5


def _fenced(what: str, transactional_id: str | None) -> ProducerFenced:
    return ProducerFenced(
        f"this worker was fenced: {what}; transactional id {transactional_id!r}. Another "
        "worker registered this transactional id (the same worker id or transactional_id): "
        "this one stops and writes nothing more")


def _txn_error(what: str, transactional_id: str | None, exc: KafkaException) -> Exception:
    """A transactional call's failure as the engine's error: fenced (fatal), or abort and
    retry the epoch."""
    err = exc.args[0] if exc.args else None
    code = err.code() if isinstance(err, KafkaError) else None
    text = err.str() if isinstance(err, KafkaError) else str(exc)
    if code in _PRODUCER_FENCED or (isinstance(err, KafkaError) and err.fatal()):
        return _fenced(f"{what} failed for transactional id {transactional_id!r}: {text}",
                       transactional_id)
    return TransactionAborted(f"{what} failed for transactional id {transactional_id!r}: "
                              f"{text}")


class ConfluentProducer(ProducerBackend):
    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.transactional_id: str | None = settings.get("transactional.id")
        self.transactional = self.transactional_id is not None
        self._fatal: KafkaError | None = None  # librdkafka's fatal error, once raised
        if self.transactional:
            settings = {**settings, "error_cb": self._on_error}
        try:
            self._p = Producer(dict(settings))
        except KafkaException as exc:
            raise _creation_error(exc, "the producer") from exc
        # The client's own methods have the interface's signatures: bind them directly, so
        # that the hot path has no Python frame of ours in between.
        self.produce = cast(Any, self._p.produce)  # type: ignore[method-assign]

    def produce(self, topic: str, value: bytes | None, key: bytes | None, partition: int,
                on_delivery: DeliveryCallback, reserved: None, timestamp: int,
                headers: list[tuple[str, bytes]] | None = None, /) -> None:
        # Replaced per instance in __init__; kept for the interface and for readers.
        self._p.produce(topic, value, key, partition, on_delivery, reserved, timestamp,
                        cast(Any, headers))

    @staticmethod
    def _on_error(err: KafkaError) -> None:
        # Only non-fatal errors come here: confluent-kafka raises a fatal one from the poll.
        log.warning("producer: %s", err)

    def poll(self, timeout: float) -> int:
        """Serve delivery reports. librdkafka's fatal error (a transactional producer's
        fence, an idempotence failure) is never handed to error_cb: confluent-kafka raises it
        from the poll that serves it, once. It is kept, and raised as the engine's error from
        this poll and every later one: the producer can send nothing more."""
        if self._fatal is not None:
            raise self._fatal_error()
        try:
            return int(self._p.poll(timeout))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.fatal()):
                raise
            self._fatal = err
            raise self._fatal_error() from exc

    def _fatal_error(self) -> Exception:
        assert self._fatal is not None
        if self.transactional:  # a transactional producer's fatal error is its fence
            return _txn_error("the producer", self.transactional_id,
                              KafkaException(self._fatal))
        return FatalError(f"the producer stopped on librdkafka's fatal error: "
                          f"{self._fatal.str()}; it can send nothing more")

    def _fatal_seen(self) -> bool:
        """Serve the poll (the fatal error arrives there) and say whether it came."""
        with contextlib.suppress(FatalError, TransactionAborted):
            self.poll(0)
        return self._fatal is not None

    def delivery_error(self, topic: str, exc: Exception) -> Exception:
        if self.transactional and self._p is not None:
            if self._fatal_seen():  # a fenced producer says so there
                return _txn_error(f"producing to {topic!r}", self.transactional_id,
                                  KafkaException(self._fatal))
            err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError._FATAL:
                # The fatal error is in flight to the error callback: a transactional
                # producer's fatal error is its fence.
                return _fenced(f"producing to {topic!r}: {err.str()}", self.transactional_id)
            if isinstance(err, KafkaError) and err.code() == KafkaError._STATE:
                # The transaction failed (an abortable error): the epoch is aborted and
                # retried; a fenced producer then fails at the commit, naming itself.
                return TransactionAborted(f"producing to {topic!r} failed for transactional "
                                          f"id {self.transactional_id!r}: {err.str()}")
        if isinstance(exc, KafkaException) and exc.args:
            return DeliveryFailed(topic, str(exc.args[0].str()))
        return DeliveryFailed(topic, f"{type(exc).__name__}: {exc}")

    def explain_failure(self, failure: Exception) -> Exception:
        """A fenced transactional producer's records fail their delivery with
        PRODUCER_FENCED (or after its fatal error): that is the fence, naming the id.
        Records purged from the queue (_PURGE_QUEUE) were dropped by librdkafka because
        the transaction failed with an abortable error (rdkafka_txnmgr.c purges then): the
        epoch is aborted and retried; a fenced producer then fails its abort, as fenced."""
        if not (self.transactional and self._p is not None):
            return failure
        text = str(failure)  # the tracker keeps a failed report's text, not its code
        if self._fatal_seen() or "PRODUCER_FENCED" in text:
            return _fenced(f"a delivery failed ({text})", self.transactional_id)
        if "_PURGE_QUEUE" in text:
            return TransactionAborted(f"the transaction of transactional id "
                                      f"{self.transactional_id!r} failed, and librdkafka "
                                      f"dropped its queued records: {text}")
        return failure

    # -- transactions (epoch mode) ---------------------------------------------------------
    def _txn(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except KafkaException as exc:
            raise _txn_error(what, self.transactional_id, exc) from exc

    def init_transactions(self, timeout: float) -> None:
        self._txn("init_transactions", lambda: self._p.init_transactions(timeout))

    def begin_transaction(self) -> None:
        self._txn("begin_transaction", self._p.begin_transaction)

    def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int],
                                    group_metadata: Any, timeout: float) -> None:
        parts = [CTP(t, p, o) for (t, p), o in offsets.items()]
        self._txn("send_offsets_to_transaction",
                  lambda: self._p.send_offsets_to_transaction(parts, group_metadata, timeout))

    def commit_transaction(self, timeout: float) -> None:
        """Commit, calling again after a retriable failure (as librdkafka documents), all
        within timeout: a commit that timed out used the whole of it. (A fenced producer's
        commit is never answered on the local broker, which closes the coordinator
        connection; three full attempts kept a fenced worker running for 90 s.)"""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._p.commit_transaction(max(deadline - time.monotonic(), 0.0))
                return
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if (isinstance(err, KafkaError) and err.retriable()
                        and not err.txn_requires_abort() and not err.fatal()
                        and deadline - time.monotonic() > _MIN_RETRY_S):
                    continue  # the same commit again, with the time left
                raise _txn_error("commit_transaction", self.transactional_id, exc) from exc

    def abort_transaction(self, timeout: float) -> None:
        self._txn("abort_transaction", lambda: self._p.abort_transaction(timeout))

    def in_flight(self) -> int:
        return len(self._p) if self._p is not None else 0

    def close(self) -> None:
        # confluent-kafka frees the client when the last reference goes; drop ours.
        self._p = self.produce = None  # type: ignore[assignment]


class ConfluentClients(ClientBackend):
    """confluent-kafka (librdkafka): the default backend."""

    name = "confluent-kafka"

    def __init__(self, bootstrap: str, *, kafka: Mapping[str, Any] | None = None,
                 consumer: Mapping[str, Any] | None = None,
                 producer: Mapping[str, Any] | None = None) -> None:
        self._bootstrap = bootstrap
        self._kafka = dict(kafka or {})
        self._consumer = dict(consumer or {})
        self._producer = dict(producer or {})

    def consumer(self, group: str) -> ThreadedMember:
        return ThreadedMember(ConfluentConsumer(
            consumer_settings(self._bootstrap, group, self._kafka, self._consumer)))

    def producer(self, transactional_id: str | None = None) -> ConfluentProducer:
        settings = producer_settings(self._bootstrap, self._kafka, self._producer)
        if transactional_id is not None:
            settings["transactional.id"] = transactional_id
        return ConfluentProducer(settings)

    def reader(self) -> ConfluentReader:
        return ConfluentReader(reader_settings(self._bootstrap, self._kafka))

    def topic_names(self, timeout: float) -> set[str] | None:
        return admin.topic_names(self._bootstrap, timeout=timeout, kafka=self._kafka)

    def partition_count(self, topic: str) -> int:
        return admin.partition_count(self._bootstrap, topic, kafka=self._kafka)

    def create_topics(self, topics: dict[str, int], config: dict[str, str]) -> None:
        admin.create_topics(self._bootstrap, topics, config=config, kafka=self._kafka)

    def committed_offsets(self, group: str,
                          parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        c = Consumer({**reader_settings(self._bootstrap, self._kafka), "group.id": group,
                      "logger": librdkafka_logger()})
        try:
            done = c.committed([CTP(t, p) for t, p in parts], timeout=30)
        except KafkaException as exc:
            raise BrokerUnavailable(f"cannot read the committed offsets of {group}: "
                                    f"{exc}") from exc
        finally:
            c.close()
        return {(tp.topic, tp.partition): int(tp.offset) for tp in done}
