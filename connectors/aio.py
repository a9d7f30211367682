# mypy: disable-error-code="no-any-return"
# (aiokafka's records and results are untyped: their fields are Any.)
"""The aiokafka backend: the group member and the producer in pure asyncio, no threads.

Chosen with ``WorkerConfig(client="aiokafka")``, ``--client aiokafka`` or
``STREAMCORE_CLIENT=aiokafka``. What differs from the default (confluent-kafka) backend:

* **Eager rebalancing.** aiokafka has no cooperative assignor: at every rebalance each member
  gives up all its partitions (their work is drained and committed first, as always) and
  receives its new assignment whole. Partitions that come back are restored from their local
  checkpoint, so a rebalance costs more than with confluent-kafka, but loses nothing.
* **No idempotent producer by default.** aiokafka's idempotent producer asks for a producer
  id with InitProducerId v0, which the local broker does not answer (DESIGN.md section 9).
  Outputs are at-least-once either way; on a real Kafka cluster set
  ``producer={"enable.idempotence": True}`` to keep retries from writing duplicates.
* **Settings.** ``kafka``/``consumer``/``producer`` take the librdkafka names that have an
  aiokafka equivalent (see ``_SETTINGS``); any other is refused at start-up, naming it.
* Administration (topic lookup and creation, at start-up) and the readers that restore
  stores from changelogs are the blocking clients of confluent-kafka: they run outside the
  group, on start-up and restore threads, as with the default backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka import TopicPartition as ATP
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
)

from connectors.base import (
    ClientBackend,
    DeliveryCallback,
    GroupMember,
    Message,
    PartitionReader,
    ProducerBackend,
    QueuedCommits,
    RebalanceListener,
    TopicPartition,
    fmt_offsets,
)
from connectors.confluent import ConfluentClients
from connectors.memory import MemoryMessage
from streamcore.core.errors import (
    BrokerUnavailable,
    ConfigError,
    DeliveryFailed,
    FatalError,
    RebalanceError,
)

__all__ = ["AioClients", "AioMember", "AioMessage", "AioProducer", "aio_settings"]

log = logging.getLogger("streamcore.kafka")

# librdkafka setting -> (aiokafka argument, converter). What a user may pass through.
_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "client.id": ("client_id", str),
    "security.protocol": ("security_protocol", str),
    "sasl.mechanism": ("sasl_mechanism", str),
    "sasl.mechanisms": ("sasl_mechanism", str),
    "sasl.username": ("sasl_plain_username", str),
    "sasl.password": ("sasl_plain_password", str),
    "request.timeout.ms": ("request_timeout_ms", int),
    "metadata.max.age.ms": ("metadata_max_age_ms", int),
    "session.timeout.ms": ("session_timeout_ms", int),
    "heartbeat.interval.ms": ("heartbeat_interval_ms", int),
    "max.poll.interval.ms": ("max_poll_interval_ms", int),
    "fetch.wait.max.ms": ("fetch_max_wait_ms", int),
    "fetch.max.bytes": ("fetch_max_bytes", int),
    "max.partition.fetch.bytes": ("max_partition_fetch_bytes", int),
    "isolation.level": ("isolation_level", str),
    "linger.ms": ("linger_ms", int),
    "acks": ("acks", lambda v: v if v in ("all", -1) else int(v)),
    "compression.type": ("compression_type", lambda v: None if v == "none" else str(v)),
    "enable.idempotence": ("enable_idempotence",
                           lambda v: v if isinstance(v, bool) else str(v).lower() == "true"),
    "batch.size": ("max_batch_size", int),
    "message.max.bytes": ("max_request_size", int),
}
_CONSUMER_ONLY = {"session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms",
                  "fetch_max_wait_ms", "fetch_max_bytes", "max_partition_fetch_bytes",
                  "isolation_level"}
_PRODUCER_ONLY = {"linger_ms", "acks", "compression_type", "enable_idempotence",
                  "max_batch_size", "max_request_size"}
_CONSUMER_DEFAULTS: dict[str, Any] = {
    "session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "fetch_max_wait_ms": 100}
_PRODUCER_DEFAULTS: dict[str, Any] = {"acks": "all", "linger_ms": 5,
                                      "enable_idempotence": False}
# Records queued in the producer before produce() answers BufferError (the Outbox holds more,
# and the partition waits for room). Small: orjson hands out bytes with a 4 KB allocation,
# which a long queue keeps alive (100k queued records held 400 MB).
_PRODUCER_QUEUE = 5_000


def aio_settings(section: str, common: Mapping[str, Any],
                 own: Mapping[str, Any]) -> dict[str, Any]:
    """aiokafka keyword arguments from librdkafka-named settings; ConfigError names any
    setting this backend cannot honour."""
    out: dict[str, Any] = {}
    for where, settings in (("kafka", common), (section, own)):
        for key, value in settings.items():
            if key not in _SETTINGS:
                raise ConfigError(f"{where}[{key!r}]", "not supported by the aiokafka client "
                                  f"(supported: {', '.join(sorted(_SETTINGS))})")
            name, convert = _SETTINGS[key]
            try:
                out[name] = convert(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}[{key!r}]", f"invalid value {value!r}") from None
    drop = _PRODUCER_ONLY if section == "consumer" else _CONSUMER_ONLY
    return {k: v for k, v in out.items() if k not in drop}


class AioMessage:
    """An aiokafka record in the :class:`~connectors.base.Message` shape."""

    __slots__ = ("_r",)

    def __init__(self, record: ConsumerRecord[bytes, bytes]) -> None:
        self._r = record

    def topic(self) -> str:
        return self._r.topic

    def partition(self) -> int:
        return self._r.partition

    def offset(self) -> int:
        return self._r.offset

    def key(self) -> bytes | None:
        return self._r.key

    def value(self) -> bytes | None:
        return self._r.value

    def timestamp(self) -> tuple[int, int]:
        # aiokafka: 0 create time, 1 log append time; librdkafka's types are 1 and 2.
        return (self._r.timestamp_type + 1, self._r.timestamp)

    def headers(self) -> list[tuple[str, bytes]] | None:
        h = self._r.headers
        return list(h) if h else None

    def error(self) -> None:
        return None


def _leave_even_from_generation_0(c: AIOKafkaConsumer) -> None:
    """Make stop() send LeaveGroup in the group's first generation too. aiokafka leaves only
    from generation 1 on, Kafka's first; the local broker numbers the first one 0, so a member
    stopped in it stayed in the group until its session expired and the next owner of its
    partitions waited that long. The request carries no generation (LeaveGroup v0-v2); stop()
    follows at once, so at most a heartbeat sent meanwhile carries it, and its answer no
    longer matters."""
    coordinator = getattr(c, "_coordinator", None)
    if coordinator is not None and getattr(coordinator, "generation", None) == 0:
        coordinator.generation = 1


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka's (eager) rebalance callbacks, handed to the engine's listener."""

    def __init__(self, member: AioMember) -> None:
        self._m = member

    async def on_partitions_revoked(self, revoked: Iterable[ATP]) -> None:
        await self._m.revoke([(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[ATP]) -> None:
        await self._m.assign([(tp.topic, tp.partition) for tp in assigned])


class AioMember(QueuedCommits, GroupMember):
    """A group member on aiokafka. aiokafka keeps the group itself (heartbeats, rebalances)
    in its own coroutines; :meth:`run` sends the queued commits. aiokafka never returns a
    record across a rebalance (getmany waits for the new assignment), which is the ordering
    :class:`~connectors.base.GroupMember` promises; new partitions are paused while the
    engine's listener takes them (:meth:`assign`)."""

    def __init__(self, bootstrap: str, group: str, settings: Mapping[str, Any]) -> None:
        super().__init__()
        self._args = {**_CONSUMER_DEFAULTS, **settings, "bootstrap_servers": bootstrap,
                      "group_id": group, "enable_auto_commit": False,
                      "auto_offset_reset": "earliest"}
        self.max_poll_interval_s = int(self._args.get("max_poll_interval_ms", 300000)) / 1000
        self.last_served = time.monotonic()
        # Set when the event loop was blocked past max.poll.interval.ms: last_served stays
        # where it was (the engine fences) until the rejoin's assignment.
        self._stalled = False
        self._c: AIOKafkaConsumer | None = None
        self._listener: RebalanceListener | None = None
        self._start_at_end: Callable[[str], bool] = lambda topic: False
        self._assigned: set[TopicPartition] = set()
        self._wake = asyncio.Event()
        self._commit_seconds: Callable[[float], None] | None = None
        self._commit_failed: Callable[[dict[TopicPartition, int]], None] | None = None

    @property
    def _consumer(self) -> AIOKafkaConsumer:
        assert self._c is not None, "join() first"
        return self._c

    async def join(self, topics: Sequence[str], listener: RebalanceListener, *,
                   start_at_end: Callable[[str], bool] = lambda topic: False) -> None:
        self._listener, self._start_at_end = listener, start_at_end
        self._c = AIOKafkaConsumer(**self._args)
        try:
            await self._c.start()
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot start the aiokafka consumer: {exc}") from exc
        if any(t.startswith("^") for t in topics):
            pattern = "|".join(t[1:] if t.startswith("^") else re.escape(t) for t in topics)
            self._c.subscribe(pattern=f"^(?:{pattern})$", listener=_Listener(self))
        else:
            self._c.subscribe(topics=list(topics), listener=_Listener(self))
        self.last_served = time.monotonic()

    # -- rebalance events (aiokafka's coordinator coroutine) ----------------------------
    async def revoke(self, parts: list[TopicPartition]) -> None:
        assert self._listener is not None
        mine = [tp for tp in parts if tp in self._assigned]
        self._assigned.difference_update(mine)
        self.forget(mine)
        if not mine:
            return
        offsets = await self._listener.revoked(mine)
        if offsets:
            try:  # before the group moves them on
                await self._consumer.commit({ATP(t, p): o for (t, p), o in offsets.items()})
                log.info("committed revoked partitions at %s", fmt_offsets(offsets))
            except (KafkaError, IllegalStateError) as exc:
                # The next owner starts from the previous commit: duplicates, never loss.
                log.warning("commit on revoke failed: %s", exc)

    async def assign(self, parts: list[TopicPartition]) -> None:
        assert self._listener is not None
        new = [tp for tp in parts if tp not in self._assigned]
        c = self._consumer
        # aiokafka has the new assignment in effect before it calls its listener, and fetches
        # meanwhile; the engine has no task for these partitions until assigned() returns and
        # would drop their records. Paused, what aiokafka fetched of them is discarded
        # (its position stays) and fetched again after the resume.
        self.pause(new)
        try:
            for t, p in new:  # a "latest" source's partition without a commit starts at its end
                if self._start_at_end(t) and await c.committed(ATP(t, p)) is None:
                    await c.seek_to_end(ATP(t, p))
            await self._listener.assigned(new)
        finally:
            self.resume(new)
        self._assigned.update(new)
        self._stalled = False  # joined again: the group is served
        self.last_served = time.monotonic()

    # -- the group -----------------------------------------------------------------------
    def rejoin(self) -> None:
        """aiokafka leaves the group after a blocked loop only if its heartbeat runs before
        the next fetch; otherwise it stays in the group, and the fenced partitions would never
        come back. Either way: rejoin (the revoke and assign callbacks follow).

        `GroupCoordinator.request_rejoin()` is private, but the same in every aiokafka that
        pyproject allows (0.11.0 to 0.14.0, read in their sources): it wakes the
        coordinator's loop, which revokes, joins and assigns."""
        if self._stalled:
            return
        self._stalled = True
        coordinator = getattr(self._c, "_coordinator", None)
        if coordinator is None or not hasattr(coordinator, "request_rejoin"):
            log.error("the event loop was blocked past max.poll.interval.ms and this aiokafka "
                      "cannot be asked to rejoin: the fenced partitions come back only at "
                      "the next rebalance")
            return
        log.warning("rejoining the group: the event loop was blocked past "
                    "max.poll.interval.ms")
        coordinator.request_rejoin()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.02)
            self._wake.clear()
            now = time.monotonic()
            if self._assigned and now - self.last_served > self.max_poll_interval_s:
                self.rejoin()  # the loop was blocked: the engine fences (check_membership)
            if not self._stalled:
                self.last_served = now
            commit, self._queued = self._queued, {}
            commit = {tp: o for tp, o in commit.items() if tp in self._assigned}
            if commit:
                self._sending = True
                try:
                    await self._send(commit)
                finally:
                    self._sending = False

    async def _send(self, offsets: dict[TopicPartition, int]) -> None:
        t0 = time.perf_counter()
        try:
            await self._consumer.commit({ATP(t, p): o for (t, p), o in offsets.items()})
        except CommitFailedError as exc:  # the member is no longer in the generation
            log.warning("asynchronous commit failed: %s", exc)
            if self._listener is not None:
                self._listener.fenced(list(offsets))
            return
        except (KafkaError, IllegalStateError) as exc:
            log.warning("asynchronous commit failed: %s", exc)
            if self._commit_failed is not None:
                self._commit_failed(offsets)
            return
        if self._commit_seconds is not None:
            self._commit_seconds(time.perf_counter() - t0)

    def commit_soon(self, offsets: dict[TopicPartition, int]) -> None:
        super().commit_soon(offsets)
        self._wake.set()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.forget(offsets)  # the service would send it after this one (GroupMember.commit)
        if not offsets:
            return
        try:
            await self._consumer.commit({ATP(t, p): o for (t, p), o in offsets.items()})
        except CommitFailedError as exc:
            if self._listener is not None:
                self._listener.fenced(list(offsets))
            raise BrokerUnavailable(f"commit failed: {exc}") from exc
        except (KafkaError, IllegalStateError) as exc:
            raise BrokerUnavailable(f"commit failed: {exc}") from exc

    async def close(self) -> None:
        if self._c is not None:
            try:  # aiokafka's stop() leaves the group without a revoke: give one first
                await self.revoke(sorted(self._assigned))
            finally:
                _leave_even_from_generation_0(self._c)
                await self._c.stop()

    def observe_commits(self, seconds: Callable[[float], None]) -> None:
        self._commit_seconds = seconds

    def observe_commit_failures(self,
                                failed: Callable[[dict[TopicPartition, int]], None]) -> None:
        self._commit_failed = failed

    # -- the data side -------------------------------------------------------------------
    async def fetch(self, max_records: int, max_wait: float) -> list[Message]:
        try:
            batches = await self._consumer.getmany(timeout_ms=int(max_wait * 1000),
                                                   max_records=max_records)
        except KafkaError as exc:
            raise FatalError(f"consumer failed: {exc}") from exc
        return [AioMessage(r) for records in batches.values() for r in records]

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        live = self._still_assigned(partitions)
        if live:
            self._consumer.pause(*live)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        live = self._still_assigned(partitions)
        if live:
            self._consumer.resume(*live)

    def seek(self, offsets: dict[TopicPartition, int]) -> None:
        # aiokafka drops what it fetched (or fetches) at the old position: its fetch results
        # are checked against the position when they are returned.
        for (t, p), o in offsets.items():
            try:
                self._consumer.seek(ATP(t, p), o)
            except (IllegalStateError, KafkaError) as exc:
                raise RebalanceError(f"cannot seek {t}[{p}] to {o}: {exc}") from exc

    def _still_assigned(self, partitions: Sequence[TopicPartition]) -> list[ATP]:
        """Those of partitions still assigned (a revoked one is ignored, as the contract
        says); the assignment is read once, not once per partition."""
        assignment = self._consumer.assignment()
        return [tp for tp in (ATP(t, p) for t, p in partitions) if tp in assignment]

    def high_watermark(self, tp: TopicPartition) -> int | None:
        try:
            high = self._consumer.highwater(ATP(*tp))
        except (IllegalStateError, AssertionError):
            return None
        return int(high) if high is not None else None


class AioProducer(ProducerBackend):
    """aiokafka's producer behind the engine's non-blocking produce.

    aiokafka's send is a coroutine; the engine's produce is a plain call on the hot path. So
    produce() queues the record and a sender coroutine (started by :meth:`start`, ended by
    :meth:`stop`, owned by this producer) hands each to aiokafka in order; delivery reports
    are collected as aiokafka's futures complete and served by :meth:`poll`, as with
    librdkafka."""

    def __init__(self, bootstrap: str, settings: Mapping[str, Any]) -> None:
        self._p = AIOKafkaProducer(**{**_PRODUCER_DEFAULTS, **settings,
                                      "bootstrap_servers": bootstrap})
        self._queue: deque[tuple[str, bytes | None, bytes | None, int, DeliveryCallback,
                                 int, list[tuple[str, bytes]] | None]] = deque()
        self._reports: deque[tuple[DeliveryCallback, Any, Any]] = deque()
        self._sending = 0  # handed to aiokafka, not answered yet
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self._p.start()
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot start the aiokafka producer: {exc}") from exc
        self._sender = asyncio.get_running_loop().create_task(self._send_loop(),
                                                             name="aiokafka-sender")

    def produce(self, topic: str, value: bytes | None, key: bytes | None, partition: int,
                on_delivery: DeliveryCallback, reserved: None, timestamp: int,
                headers: list[tuple[str, bytes]] | None = None, /) -> None:
        if len(self._queue) >= _PRODUCER_QUEUE:
            raise BufferError("the producer's queue is full")
        self._queue.append((topic, value, key, partition, on_delivery, timestamp, headers))
        self._wake.set()

    async def _send_loop(self) -> None:
        queue, send = self._queue, self._p.send
        while True:
            await self._wake.wait()
            self._wake.clear()
            while queue:
                topic, value, key, partition, on_delivery, timestamp, headers = queue[0]
                try:
                    fut = await send(topic, value, key, partition if partition >= 0 else None,
                                     timestamp or None, headers)
                except KafkaError as exc:
                    queue.popleft()
                    self._reports.append((on_delivery, exc, _sent(topic, partition, -1, key,
                                                                  value)))
                    continue
                queue.popleft()
                self._sending += 1
                fut.add_done_callback(self._reporter(on_delivery, key, value))

    def _reporter(self, on_delivery: DeliveryCallback, key: bytes | None,
                  value: bytes | None) -> Callable[[asyncio.Future[Any]], None]:
        def done(fut: asyncio.Future[Any]) -> None:
            self._sending -= 1
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:
                self._reports.append((on_delivery, exc, None))
                return
            md = fut.result()
            self._reports.append((on_delivery, None,
                                  _sent(md.topic, md.partition, md.offset, key, value)))
        return done

    def delivery_error(self, topic: str, exc: Exception) -> Exception:
        return DeliveryFailed(topic, f"{type(exc).__name__}: {exc}")

    def poll(self, timeout: float) -> int:
        reports, n = self._reports, 0
        while reports:
            on_delivery, err, msg = reports.popleft()
            on_delivery(err, msg)
            n += 1
        return n

    def in_flight(self) -> int:
        return len(self._queue) + self._sending + len(self._reports)

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        await self._p.stop()

    def close(self) -> None:
        """Only :meth:`stop` can release an aiokafka client (it needs the event loop)."""
        self._queue.clear()


class AioClients(ClientBackend):
    """aiokafka: the group member and the producer; administration and readers as in
    :class:`~connectors.confluent.ConfluentClients` (blocking calls outside the group)."""

    name = "aiokafka"

    def __init__(self, bootstrap: str, *, kafka: Mapping[str, Any] | None = None,
                 consumer: Mapping[str, Any] | None = None,
                 producer: Mapping[str, Any] | None = None) -> None:
        self._bootstrap = bootstrap
        self._kafka = dict(kafka or {})
        # Refused settings stop start-up here, naming the field.
        self._consumer = aio_settings("consumer", self._kafka, consumer or {})
        self._producer = aio_settings("producer", self._kafka, producer or {})
        self._admin = ConfluentClients(bootstrap, kafka={
            k: v for k, v in self._kafka.items()
            if k.startswith(("security.", "sasl.", "ssl.", "client.id"))})

    def consumer(self, group: str) -> AioMember:
        return AioMember(self._bootstrap, group, self._consumer)

    def producer(self, transactional_id: str | None = None) -> AioProducer:
        if transactional_id is not None:
            raise NotImplementedError("epoch mode needs the confluent-kafka client")
        return AioProducer(self._bootstrap, self._producer)

    # Administration and readers (outside the group): confluent-kafka's.
    def reader(self) -> PartitionReader:
        return self._admin.reader()

    def topic_names(self, timeout: float) -> set[str] | None:
        return self._admin.topic_names(timeout)

    def partition_count(self, topic: str) -> int:
        return self._admin.partition_count(topic)

    def create_topics(self, topics: dict[str, int], config: dict[str, str]) -> None:
        self._admin.create_topics(topics, config)

    def committed_offsets(self, group: str,
                          parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        return self._admin.committed_offsets(group, parts)


def _sent(topic: str, partition: int, offset: int, key: bytes | None,
          value: bytes | None) -> MemoryMessage:
    """What a delivery report hands over: where the record landed (Message-shaped)."""
    return MemoryMessage(topic, partition, offset, key, value, 0, None)
