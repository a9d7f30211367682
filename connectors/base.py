"""The interfaces between the engine and a Kafka client library.

The engine never imports a client library; it drives these. Messages are passed through as the
client's own objects when they already have the :class:`Message` shape (confluent-kafka's do),
because a wrapper per record would cost more than the rest of a stateless pipeline.

The engine talks to a group through :class:`GroupMember`, which is asyncio-native:
rebalances are delivered to a :class:`RebalanceListener` as awaited events (assigned,
revoked, lost), and the member waits for each to complete before the group moves on.

* The aiokafka backend implements it directly: no threads.
* A client whose calls block (librdkafka) implements the blocking :class:`ConsumerBackend`
  instead, and :class:`connectors.threaded.ThreadedMember` turns it into a member. Its
  threading contract: the *group* side (``subscribe``, ``serve``, ``commit``, ``close``)
  runs on one dedicated membership thread, never on the event loop (``serve`` and ``close``
  run the rebalance callbacks, which wait for the event loop, so a group call from the loop
  would deadlock); the *data* side (``consume``, ``pause``, ``resume``, ``high_watermark``)
  runs no callback, and ``consume`` is called by one caller at a time: from a fetch thread
  when it must wait, and straight from the event loop with ``timeout=0`` while a backlog
  lasts (handing every batch over from another thread costs a third of the throughput).

:class:`ProducerBackend` is used from the event loop thread only. Delivery callbacks run
inside :meth:`ProducerBackend.poll`, so they run on the loop thread and need no locks.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from streamcore.core.errors import FatalError
from streamcore.core.logs import BurstLogger

__all__ = [
    "ClientBackend",
    "ConsumerBackend",
    "DeliveryCallback",
    "GroupMember",
    "Message",
    "Outbox",
    "QueuedCommits",
    "PartitionReader",
    "PartitionsCallback",
    "ProducerBackend",
    "RebalanceListener",
    "TopicPartition",
    "fmt_offsets",
    "fmt_partitions",
    "report_consumer_error",
]

TopicPartition = tuple[str, int]
PartitionsCallback = Callable[[list[TopicPartition]], None]


class Message(Protocol):
    """One consumed record (confluent-kafka's ``Message`` already has this shape)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...
    def headers(self) -> list[tuple[str, bytes]] | None: ...
    def error(self) -> Any: ...


# on_delivery(error_or_None, message): error is a string-convertible client error.
DeliveryCallback = Callable[[Any, Any], None]


class RebalanceListener(ABC):
    """What a :class:`GroupMember` tells the engine about its partitions. Each coroutine runs
    on the event loop, and its return is the completion the member waits for before it lets
    the group go on."""

    @abstractmethod
    async def assigned(self, parts: list[TopicPartition]) -> None:
        """Newly added partitions (possibly none: every completed rebalance calls this).
        No record of them is fetched before this returns."""

    @abstractmethod
    async def revoked(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Partitions about to be taken away: finish their work and return the offsets to
        commit; the member commits them before the group moves the partitions on."""

    @abstractmethod
    async def lost(self, parts: list[TopicPartition]) -> None:
        """Partitions already someone else's: nothing may be committed for them."""

    @abstractmethod
    def fenced(self, parts: list[TopicPartition]) -> None:
        """A commit was refused because this member is no longer in the group's generation
        (ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID): the partitions may be another member's
        already; :meth:`lost` follows when the client rejoins. Event loop, not awaited."""


class GroupMember(ABC):
    """A member of a consumer group, driven from the event loop.

    Ordering: records of a partition are returned by :meth:`fetch` in offset order, only after
    :meth:`RebalanceListener.assigned` returned for it, and none after
    :meth:`RebalanceListener.revoked` or :meth:`RebalanceListener.lost` was called for it (a
    fetch in flight returns before the listener hears of the revoke, so that its records
    reach the tasks of the assignment they were fetched for).
    A partition is read from the group's committed offset; without one, from its start, or
    from its end where ``start_at_end(topic)`` (a source with ``starting_offsets="latest"``;
    never an internal topic, whose records written before the group's first commit must all
    be read). Commits of a partition never go backwards.
    """

    # Past this long without the group served (:attr:`last_served`), the member has left it
    # (the event loop was blocked): the engine fences its partitions.
    max_poll_interval_s: float = 300.0
    last_served: float = 0.0  # time.monotonic() of the last serve of the group

    def rejoin(self) -> None:  # noqa: B027
        """The engine fenced every partition: the group was not served past
        ``max_poll_interval_s``. Make sure the member leaves the group if it has not and joins
        again, so that the revoke (or lost) and assign callbacks follow. Non-blocking and
        idempotent. librdkafka does this by itself (the default does nothing)."""

    @abstractmethod
    async def join(self, topics: Sequence[str], listener: RebalanceListener, *,
                   start_at_end: Callable[[str], bool] = lambda topic: False) -> None:
        """Subscribe to topics (a name starting with ``^`` is a regex); the group is joined
        by :meth:`run`."""

    @abstractmethod
    async def run(self) -> None:
        """Serve the group (membership, rebalance events, queued commits) until cancelled.
        Raises :class:`~streamcore.core.errors.FatalError` when the client cannot go on."""

    @abstractmethod
    async def fetch(self, max_records: int, max_wait: float) -> list[Message]:
        """Up to max_records messages, waiting at most max_wait seconds. Error messages
        (``error()`` not None) may be mixed in; the engine decides what they mean. One
        caller at a time."""

    @abstractmethod
    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        """Stop fetching these partitions; consumption resumes where the engine left off.
        Partitions no longer assigned are ignored. Non-blocking: a fetch under way may
        still bring their records, and pauses and resumes take effect in call order,
        before the next fetch."""

    @abstractmethod
    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        """Undo :meth:`pause`."""

    @abstractmethod
    def high_watermark(self, tp: TopicPartition) -> int | None:
        """The partition's high watermark as last seen in a fetch (no request; None if not
        known yet). Non-blocking and callable from any thread."""

    @abstractmethod
    def commit_soon(self, offsets: dict[TopicPartition, int]) -> None:
        """Queue an asynchronous commit of these next-offsets-to-read; sent with the next
        serve of the group (a later call for the same partition replaces it). A failure is
        reported to the observer of :meth:`observe_commit_failures` (or to the listener's
        ``fenced``). Non-blocking."""

    @property
    @abstractmethod
    def commit_pending(self) -> bool:
        """True from :meth:`commit_soon` until the client has taken the commit (at the
        latest, until the serve that sends it returns): a process killed now may lose it.
        (The test driver waits for it before it calls the job settled.)"""

    @abstractmethod
    def forget(self, parts: Iterable[TopicPartition]) -> None:
        """Drop anything queued for these partitions: a commit must never land after the
        partition moved."""

    @abstractmethod
    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit now and wait for the answer. Raises
        :class:`~streamcore.core.errors.BrokerUnavailable` on failure.

        Supersedes what :meth:`commit_soon` queued for these partitions: that older commit
        is dropped, never sent after this one (it would move the group's offsets back)."""

    @abstractmethod
    async def close(self) -> None:
        """Leave the group: the listener's ``revoked`` runs for what is still assigned."""

    def seek(self, offsets: dict[TopicPartition, int]) -> None:
        """Read these assigned partitions again from these offsets (epoch mode, after an
        abort; a fetch that passed records over). Only while no fetch is in flight: records
        fetched before the seek are then never returned after it. Optional: epoch mode
        refuses a backend without it."""
        raise NotImplementedError(f"{type(self).__name__} cannot seek")

    def group_metadata(self) -> Any:
        """The group's metadata for ``send_offsets_to_transaction`` (its generation, so that
        a member fenced out of the group cannot commit). Optional, as :meth:`seek`."""
        raise NotImplementedError(f"{type(self).__name__} has no group metadata")

    def observe_commits(self, seconds: Callable[[float], None]) -> None:  # noqa: B027
        """Have every asynchronous commit's latency reported to seconds (any thread).
        Optional: a backend that cannot measure it ignores this."""

    def observe_commit_failures(  # noqa: B027
            self, failed: Callable[[dict[TopicPartition, int]], None]) -> None:
        """Have the offsets of every asynchronous commit that failed (for a reason other than
        fencing) reported to failed, on the event loop, so that they are sent again."""

    def observe_connectivity(self, connected: Callable[[bool], None]) -> None:  # noqa: B027
        """Have the client's view of the cluster reported to connected every few seconds
        (True while it holds a working connection to a broker; any thread). Optional."""


class QueuedCommits:
    """:meth:`GroupMember.commit_soon`, ``commit_pending`` and ``forget`` over one dict, for
    a member whose serve of the group takes the queued offsets whole: it swaps ``_queued``
    for an empty dict and keeps ``_sending`` true until the client has taken them."""

    def __init__(self) -> None:
        self._queued: dict[TopicPartition, int] = {}  # the next asynchronous commit
        self._sending = False  # a commit taken from _queued, not yet taken by the client

    def commit_soon(self, offsets: dict[TopicPartition, int]) -> None:
        self._queued.update(offsets)

    @property
    def commit_pending(self) -> bool:
        return bool(self._queued) or self._sending

    def forget(self, parts: Iterable[TopicPartition]) -> None:
        for tp in parts:
            self._queued.pop(tp, None)


class ConsumerBackend(ABC):
    """A group member of a client whose calls block: subscribe, fetch batches, commit
    explicit offsets. :class:`connectors.threaded.ThreadedMember` drives it on its threads.

    Records of a partition are fetched only after on_assign returned for it and no more once
    on_revoke or on_lost was called for it.
    """

    # Past this long without a serve of the group, the member has left it (the engine fences
    # its partitions then: they may be another member's already).
    max_poll_interval_s: float = 300.0

    @abstractmethod
    def subscribe(
        self,
        topics: Sequence[str],
        *,
        on_assign: PartitionsCallback,
        on_revoke: PartitionsCallback,
        on_lost: PartitionsCallback,
        start_at_end: Callable[[str], bool] = lambda topic: False,
        on_fenced: PartitionsCallback | None = None,
    ) -> None:
        """Join the group for topics (a name starting with ``^`` is a regex).

        on_assign receives newly added partitions; on_revoke the partitions about to be taken
        away (their offsets may still be committed inside the callback); on_lost partitions
        already owned by someone else (nothing may be committed for them).

        A partition is read from the group's committed offset; without one, from its start,
        or from its end where ``start_at_end(topic)`` (a source with
        ``starting_offsets="latest"``; never an internal topic, whose records written before
        the group's first commit must all be read).

        on_fenced (membership thread) receives partitions whose commit the group refused
        because this member is no longer in its generation (ILLEGAL_GENERATION,
        UNKNOWN_MEMBER_ID): they may be another member's already; on_lost follows when the
        client rejoins.
        """

    @abstractmethod
    def serve(self, timeout: float) -> list[Any]:
        """Keep the group membership alive and run due rebalance callbacks, waiting at most
        timeout seconds. Returns consumer errors to report (none usually). Blocking."""

    @abstractmethod
    def consume(self, max_records: int, timeout: float) -> list[Message]:
        """Up to max_records messages, waiting at most timeout seconds (0: only what is
        already fetched). Runs no callback.

        Messages of one partition come in offset order. Error messages (``error()`` not None)
        may be mixed in; the engine decides what they mean.
        """

    @abstractmethod
    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        """Stop fetching these partitions; consumption resumes where the engine left off.
        Partitions no longer assigned are ignored."""

    @abstractmethod
    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        """Undo :meth:`pause`."""

    @abstractmethod
    def commit(self, offsets: dict[TopicPartition, int], *, asynchronous: bool) -> None:
        """Commit the given next-offsets-to-read for the group. Synchronous commits raise on
        failure; asynchronous ones report failures in the log."""

    def observe_commits(self, seconds: Callable[[float], None]) -> None:  # noqa: B027
        """Have every asynchronous commit's latency (request to answer) reported to seconds,
        on the membership thread. Optional: a backend that cannot measure it ignores this."""

    def observe_commit_failures(  # noqa: B027
            self, failed: Callable[[dict[TopicPartition, int]], None]) -> None:
        """Have the offsets of every asynchronous commit that failed (for a reason other than
        fencing, which goes to on_fenced) reported to failed, on the membership thread, so
        that they are sent again. Optional: a backend whose commits cannot fail so ignores
        this."""

    def observe_connectivity(self, connected: Callable[[bool], None]) -> None:  # noqa: B027
        """Have the client's view of the cluster reported to connected every few seconds (True
        while it holds a working connection to a broker), on the membership thread. Optional:
        a backend that cannot tell ignores this."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group (runs on_revoke for what is still assigned). Blocking."""

    @abstractmethod
    def high_watermark(self, tp: TopicPartition) -> int | None:
        """The partition's high watermark as last seen in a fetch (no request; None if not
        known yet). Non-blocking and callable from any thread."""

    def seek(self, offsets: dict[TopicPartition, int]) -> None:
        """As :meth:`GroupMember.seek` (data side)."""
        raise NotImplementedError(f"{type(self).__name__} cannot seek")

    def group_metadata(self) -> Any:
        """As :meth:`GroupMember.group_metadata`."""
        raise NotImplementedError(f"{type(self).__name__} has no group metadata")


class ProducerBackend(ABC):
    """A producer whose delivery reports run on the caller's thread inside :meth:`poll`.

    Lifecycle: ``await start()`` before the first produce, ``await stop()`` at the end (which
    drops what is still queued, as :meth:`close`: flush first where it matters)."""

    async def start(self) -> None:  # noqa: B027
        """Connect (a backend whose client needs the event loop starts it here)."""

    # -- transactions (epoch mode). Blocking: the engine calls them on a worker thread. A
    # backend without transactions keeps these defaults and epoch mode refuses it.
    transactional: bool = False

    def init_transactions(self, timeout: float) -> None:
        """Register the transactional id, fencing any earlier producer with the same id and
        aborting its open transaction."""
        raise NotImplementedError(f"{type(self).__name__} has no transactions")

    def begin_transaction(self) -> None:
        raise NotImplementedError

    def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int],
                                    group_metadata: Any, timeout: float) -> None:
        """Commit these next-offsets-to-read for the group with the transaction."""
        raise NotImplementedError

    def commit_transaction(self, timeout: float) -> None:
        """Deliver everything produced in the transaction and commit it (with its offsets).
        Raises :class:`~streamcore.core.errors.TransactionAborted` when the transaction
        must be aborted and retried, :class:`~streamcore.core.errors.ProducerFenced` when
        another producer took over the transactional id or the group moved on. Blocks for
        at most timeout seconds, retries included."""
        raise NotImplementedError

    def abort_transaction(self, timeout: float) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Release the client from the event loop."""
        self.close()

    @abstractmethod
    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int,
        on_delivery: DeliveryCallback,
        reserved: None,
        timestamp: int,
        headers: list[tuple[str, bytes]] | None = None,
        /,
    ) -> None:
        """Queue one record (partition -1: the partitioner chooses; reserved: always None).

        Positional only, in confluent-kafka's own argument order, so that a backend can bind
        its client's method directly: this is the hottest call of a pipeline, and keyword
        arguments would cost a dict per record. Raises ``BufferError`` at once when the local
        queue is full (never blocks: hold the record in an :class:`Outbox`); any other
        exception means the record can never be sent (too large, unknown topic):
        :meth:`delivery_error` turns it into the error to raise."""

    @abstractmethod
    def delivery_error(self, topic: str, exc: Exception) -> Exception:
        """The :class:`~streamcore.core.errors.DeliveryFailed` for an exception from produce."""

    def explain_failure(self, failure: Exception) -> Exception:
        """A failed delivery report as the error to stop with: the failure itself, or what
        the producer knows caused it (a transactional producer that was fenced)."""
        return failure

    @abstractmethod
    def poll(self, timeout: float) -> int:
        """Serve delivery callbacks; returns how many ran."""

    @abstractmethod
    def in_flight(self) -> int:
        """Records queued or awaiting acknowledgement."""

    @abstractmethod
    def close(self) -> None:
        """Release the client. Records still queued are dropped: flush (poll until
        ``in_flight() == 0``) first where they matter."""


_Held = tuple[str, bytes | None, bytes | None, int, DeliveryCallback, int,
              list[tuple[str, bytes]] | None]


class Outbox:
    """Records the producer's local queue had no room for, held in order and handed over
    later, without ever blocking the caller.

    A full queue means the broker is slow or away. Waiting for room inside
    :meth:`ProducerBackend.poll` would stall the event loop for the whole outage (and with
    it /healthz, so every worker would be restarted); instead the caller holds records here
    and awaits :meth:`drained`, which is the backpressure. Once a record is held, every later
    one of the same owner is held behind it, so per-partition order is kept. Event loop
    thread only.
    """

    __slots__ = ("held", "producer")

    def __init__(self, producer: ProducerBackend) -> None:
        self.producer = producer
        self.held: deque[_Held] = deque()

    def send(self, topic: str, value: bytes | None, key: bytes | None, partition: int,
             on_delivery: DeliveryCallback, timestamp: int,
             headers: list[tuple[str, bytes]] | None) -> None:
        """Produce now, or hold behind what is already held. A record that can never be
        sent raises :meth:`ProducerBackend.delivery_error`."""
        if not self.held:
            try:
                self.producer.produce(topic, value, key, partition, on_delivery, None,
                                      timestamp, headers)
                return
            except BufferError:
                pass
            except Exception as exc:
                raise self.producer.delivery_error(topic, exc) from exc
        self.held.append((topic, value, key, partition, on_delivery, timestamp, headers))

    def retry(self) -> bool:
        """Hand held records over while the producer takes them; True when none is left."""
        held, producer = self.held, self.producer
        while held:
            topic, value, key, partition, on_delivery, timestamp, headers = held[0]
            try:
                producer.produce(topic, value, key, partition, on_delivery, None, timestamp,
                                 headers)
            except BufferError:
                producer.poll(0)  # serve delivery reports: they make room
                return False
            except Exception as exc:
                raise producer.delivery_error(topic, exc) from exc
            held.popleft()
        return True

    async def drained(self, interval: float = 0.005) -> None:
        """Until every held record is with the producer."""
        # Polling, not an event: room in librdkafka's queue is only learned by trying.
        while not self.retry():  # noqa: ASYNC110
            await asyncio.sleep(interval)


class PartitionReader(ABC):
    """Reads given partitions from given offsets, outside any consumer group: restoring a
    store from its changelog, and keeping a global table up to date. One thread at a time;
    every method blocks."""

    @abstractmethod
    def assign(self, starts: dict[TopicPartition, int]) -> None:
        """Read these partitions from these offsets (replacing any earlier assignment)."""

    @abstractmethod
    def read(self, max_records: int, timeout: float) -> list[Message]:
        """Up to max_records messages, waiting at most timeout seconds for the first one.
        Errors are raised, not returned."""

    def position(self, tp: TopicPartition) -> int | None:
        """The client's next offset to read of tp, or None if it cannot tell. It can be past
        the last record returned: transaction markers (epoch mode's changelogs) and aborted
        records take offsets that no read returns."""
        return None

    @abstractmethod
    def end_offset(self, tp: TopicPartition) -> int:
        """The partition's high watermark, asked of the broker now. The local broker
        under-reports it, so callers treat it as a lower bound of the true end."""

    @abstractmethod
    def close(self) -> None:
        """Release the client."""


class ClientBackend(ABC):
    """Makes the clients of one worker, all talking to one cluster, and administers its
    topics. Administration calls block; they run before the worker joins its group."""

    name: str = "?"
    # An in-process cluster (the test driver's): no other process can see it, so nothing is
    # announced to other workers (streamcore.runtime.owners).
    in_process: bool = False

    @abstractmethod
    def consumer(self, group: str) -> GroupMember:
        """A member of group (the application id)."""

    @abstractmethod
    def producer(self, transactional_id: str | None = None) -> ProducerBackend:
        """The worker's producer; with a transactional id, a transactional one (epoch
        mode; a backend without transactions raises NotImplementedError)."""

    @abstractmethod
    def reader(self) -> PartitionReader:
        """A new reader (one per restore or global table: each is used by one thread)."""

    @abstractmethod
    def topic_names(self, timeout: float) -> set[str] | None:
        """The cluster's topics, or None if it does not answer within timeout seconds. Never
        creates a topic."""

    @abstractmethod
    def partition_count(self, topic: str) -> int:
        """The number of partitions of topic (0 if it does not exist)."""

    def committed_offsets(self, group: str,
                          parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offsets of parts (-1: none), asked of the cluster now.
        Blocking. Optional: epoch mode's recovery of epoch ids needs it."""
        raise NotImplementedError(f"{type(self).__name__} cannot read committed offsets")

    @abstractmethod
    def create_topics(self, topics: dict[str, int], config: dict[str, str]) -> None:
        """Create each topic with its partition count and config; existing ones are left
        alone (idempotent)."""


def fmt_partitions(parts: Iterable[TopicPartition]) -> str:
    """"topic[partition], ..." for logs and errors, in partition order."""
    return ", ".join(f"{t}[{p}]" for t, p in sorted(parts))


def fmt_offsets(offsets: dict[TopicPartition, int]) -> str:
    """"topic[partition]=offset, ..." for logs and errors, in partition order."""
    return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items()))


def report_consumer_error(err: Any, burst: BurstLogger) -> None:
    """An error a consumer handed back (a served event, or a fetched message's): a fatal one
    stops the worker (FatalError); any other is logged, the first of a burst per code (the
    client retries it itself)."""
    if getattr(err, "fatal", lambda: False)():
        raise FatalError(f"consumer failed: {err}")
    code = err.code() if hasattr(err, "code") else err
    burst.warning(f"consumer:{code}", "consumer: %s", err)
