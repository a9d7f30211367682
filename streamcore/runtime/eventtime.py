"""The event-time watermark of one partition task, and how it crosses repartition topics.

Inputs of a task's watermark:

* each ``with_watermark(delay)`` step the task runs: the maximum event time it has seen
  minus its delay (Spark's rule: "max event time seen by the engine minus the late
  threshold");
* for a task that reads a repartition topic, each upstream task that writes to it: its
  watermark, carried by *marker* records (no key, no value, the header
  ``streamcore.watermark`` = ``b"<upstream task>|<ms>"``) that the upstream task writes to
  every partition of the topic whenever its watermark has advanced, at each commit.

A task between two repartitions (it reads markers and writes them) does not forward its own
combined watermark but each of its inputs by name, ``<task>><upstream task>``, several
entries to a marker (``;`` between them): the last task of the chain saves them with its
state (below), and the task in the middle, which has no store, starts empty after a restart.
Had it forwarded its minimum over the inputs that have reported since, one upstream task
that is behind and silent would no longer hold the last task back.

The task's watermark combines the inputs that have reported by the policy ``min`` (Spark's
default: the slowest input holds it back) or ``max``; an upstream input whose watermark has
not moved for ``idle_timeout`` of processing time is left out, so that an idle partition
does not hold the others back for ever (off by default, as in Spark). The watermark never
moves back. Spark advances it between micro-batches; so does the engine: after each fetched
batch in continuous mode, at the end of each epoch in epoch mode. A record is late against
the watermark as it stood before its batch.

The upstream watermarks survive a restart or a move of the task: each event-time step saves
them in its store with its state (:attr:`EventTime.settled`, streamcore.runtime.timed), and
the restarted task starts from them. Without that, a task would start from the upstream
tasks whose markers it reads first, and the records of one that is behind would be late
(Spark checkpoints its watermark for the same reason).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from connectors.base import Message, Outbox, TopicPartition
from streamcore.core.errors import JobDefinitionError
from streamcore.plan.analysis import has_watermark
from streamcore.plan.graph import OpKind
from streamcore.plan.physical import PhysicalPlan
from streamcore.runtime.tracking import Batch

__all__ = ["MARKER_HEADER", "NO_WATERMARK", "EventTime", "MarkerRoutes", "marker",
           "still_feeds"]

MARKER_HEADER = "streamcore.watermark"
NO_WATERMARK = -(2**62)  # before any input reported: nothing is late, nothing closes


# What the end of a batch leaves for the watermark: the with_watermark steps' values, those
# and the inputs' that count (idle ones left out), and the settled inputs if they moved.
Captured = tuple[list[int], list[int], dict[str, int] | None]


def marker(entries: dict[str, int]) -> list[tuple[str, bytes]]:
    """The header of a marker record: input name -> watermark (Kafka topic names hold
    neither ``|`` nor ``;``)."""
    return [(MARKER_HEADER, ";".join(f"{name}|{wm}" for name, wm in entries.items()).encode())]


def still_feeds(task: str, reader: str, writes_to: Callable[[str, str], bool]) -> bool:
    """Whether the input named task still writes markers to the topic reader, through each
    hop of its path (``"mid:0>in:1"``: in writes to mid, mid to reader); writes_to(topic,
    reader) asks the plan. A saved watermark of an input that no longer does (the job
    changed) must not hold the watermark back for ever."""
    for hop in task.split(">"):
        topic = hop.rpartition(":")[0]
        if not writes_to(topic, reader):
            return False
        reader = topic
    return True


class EventTime:
    """One per partition task; only the event loop thread touches it."""

    def __init__(self, task: str, *, policy: str = "min", idle_timeout_ms: int | None = None,
                 now_ms: Callable[[], int] = lambda: 0,
                 targets: list[tuple[str, int]] | None = None,
                 reads_markers: bool = False,
                 feeds: Callable[[str], bool] | None = None) -> None:
        self.task = task  # "topic:partition", names this task in its markers
        self._combine = min if policy == "min" else max
        self.idle_timeout_ms = idle_timeout_ms
        self.now_ms = now_ms
        # (repartition topic, its partition count) that this task writes to: markers go there
        self.targets = targets or []
        self.reads_markers = reads_markers  # the task's root is a repartition topic
        self.watermark = NO_WATERMARK
        # with_watermark steps: [max event time seen, delay]; NO_WATERMARK until a record
        self._local: list[list[int]] = []
        # upstream task -> [its watermark, processing time (ms) it last advanced]
        self._upstream: dict[str, list[int]] = {}
        # What markers last carried: the entry of each input (see the module docstring)
        self.sent: dict[str, int] = {}
        self.local_wm = NO_WATERMARK  # the with_watermark steps' own, as last applied
        # The upstream watermarks as they stood after the last batch (every record before
        # their markers has been through the chain): what a restarted task may start from.
        self.settled: dict[str, int] = {}
        self._moved = False  # an upstream watermark moved since settled was taken
        # Whether an upstream task (by name) still writes to this task's topic: a saved
        # watermark of one that no longer does (the job changed) must not hold it back.
        self.feeds = feeds or (lambda task: True)
        # Continuous mode with map_async: (a batch's last offset, the inputs captured at its
        # end), applied once every record of the batch is through the chain (hold, release).
        self.held: deque[tuple[int, Captured]] = deque()

    def step(self, delay_ms: int) -> list[int]:
        """A with_watermark step's box: the step writes box[0] = max event time seen."""
        box = [NO_WATERMARK, delay_ms]
        self._local.append(box)
        return box

    def upstream(self, task: str, watermark: int) -> None:
        seen = self._upstream.get(task)
        if seen is None:
            self._upstream[task] = [watermark, self.now_ms()]
            self._moved = True
        elif watermark > seen[0]:
            seen[0], seen[1] = watermark, self.now_ms()
            self._moved = True

    def resume(self, saved: dict[str, int]) -> None:
        """A restarted task: start from the upstream watermarks saved with its state (before
        any marker is read), those of upstream tasks that still feed it."""
        for task, wm in saved.items():
            if self.feeds(task):
                self.upstream(task, wm)
        self.settled = {k: v[0] for k, v in self._upstream.items()}
        self._moved = False

    def take_markers(self, msgs: list[Message]) -> list[Message]:
        """The data records of msgs; the markers among them update the upstream inputs."""
        data: list[Message] = []
        for m in msgs:
            if m.value() is None and m.key() is None:
                for name, raw in m.headers() or ():
                    if name == MARKER_HEADER:
                        for entry in raw.decode().split(";"):
                            task, _, wm = entry.partition("|")
                            self.upstream(task, int(wm))
                        break
                else:
                    data.append(m)
            else:
                data.append(m)
        return data

    def news(self) -> dict[str, int]:
        """The entries that markers have not carried yet: this task's own watermark, or,
        for a task that reads markers, its with_watermark steps' and each settled input's
        under ``<task>><input>``."""
        if not self.reads_markers:
            entries = {self.task: self.watermark}
        else:
            entries = {f"{self.task}>{name}": wm for name, wm in self.settled.items()}
            if self.local_wm != NO_WATERMARK:
                entries[self.task] = self.local_wm
        sent = self.sent
        return {name: wm for name, wm in entries.items()
                if wm != NO_WATERMARK and sent.get(name, NO_WATERMARK) < wm}

    def write_markers(self, outbox: Outbox, batch: Batch, news: dict[str, int]) -> None:
        """news (from :meth:`news`) to every partition of each target, as outputs of batch."""
        self.sent = {**self.sent, **news}
        headers = marker(news)
        ts = max(0, min(news.values()))
        for topic, partitions in self.targets:
            for p in range(partitions):
                batch.pending += 1
                outbox.send(topic, None, None, p, batch.ack, ts, headers)

    def snapshot(self) -> tuple[int, int, list[int], dict[str, list[int]], dict[str, int],
                                dict[str, int]]:
        """What an aborted epoch must go back to (epoch mode: taken at each commit)."""
        return (self.watermark, self.local_wm, [box[0] for box in self._local],
                {k: list(v) for k, v in self._upstream.items()}, self.sent, self.settled)

    def restore(self, snap: tuple[int, int, list[int], dict[str, list[int]], dict[str, int],
                                  dict[str, int]]) -> None:
        self.watermark, self.local_wm, local, upstream, self.sent, self.settled = snap
        self._moved = False
        for box, mx in zip(self._local, local, strict=False):
            box[0] = mx
        for box in self._local[len(local):]:  # a step compiled after the snapshot
            box[0] = NO_WATERMARK
        self._upstream = {k: list(v) for k, v in upstream.items()}

    def capture(self) -> Captured:
        """The inputs as they stand at the end of a batch: what :meth:`apply` turns into the
        watermark once every record of the batch has been through the chain."""
        local = [mx - delay for mx, delay in self._local if mx != NO_WATERMARK]
        settled = None
        if self._moved:  # every marker taken so far is settled once the batch is through
            settled = {k: v[0] for k, v in self._upstream.items()}
            self._moved = False
        values = local
        if self._upstream:
            now = self.now_ms()
            values = local + [wm for wm, at in self._upstream.values()
                              if self.idle_timeout_ms is None or now - at < self.idle_timeout_ms]
        return local, values, settled

    def apply(self, captured: Captured) -> bool:
        """Move the watermark to what captured gives; True if it moved forward."""
        local, values, settled = captured
        if settled is not None:
            self.settled = settled
        if local:
            self.local_wm = max(self.local_wm, self._combine(local))
        if not values:
            return False
        new = self._combine(values)
        if new > self.watermark:
            self.watermark = new
            return True
        return False

    def advance(self) -> bool:
        """Recompute the watermark from the inputs (between batches); True if it moved."""
        return self.apply(self.capture())

    def hold(self, last: int) -> None:
        """The batch up to offset last ended with records still in flight: keep its inputs."""
        self.held.append((last, self.capture()))

    def release(self, done: int) -> bool:
        """Apply the held inputs of the batches up to offset done; True if it moved."""
        moved = False
        while self.held and self.held[0][0] <= done:
            moved = self.apply(self.held.popleft()[1]) or moved
        return moved


class MarkerRoutes:
    """Which repartition topics carry event time and which sub-topologies write to them:
    where each task writes its markers, whether it reads any, and which inputs still feed
    it. Built once per worker at start (it asks the broker for partition counts)."""

    def __init__(self, plan: PhysicalPlan | None = None,
                 routes: dict[tuple[int, str], int] | None = None) -> None:
        self.plan = plan
        # (root node id of a writing sub-topology, repartition topic) -> partition count
        self.routes = routes or {}

    @classmethod
    def of(cls, plan: PhysicalPlan, partition_count: Callable[[str], int]) -> MarkerRoutes:
        routes: dict[tuple[int, str], int] = {}
        for rep in plan.repartitions:
            if not has_watermark(rep):
                continue
            topic = plan.repartition_topic(rep)
            count = partition_count(topic)
            parents = {p.id for p in rep.parents}
            for sub in plan.subtopologies:  # the ones that write to it
                if any(n.id in parents for n in sub.steps):
                    for r in sub.roots:
                        routes[(r.id, topic)] = count
        return cls(plan, routes)

    def writes_to(self, topic: str, reader: str) -> bool:
        """Whether the sub-topology that reads topic writes markers to reader."""
        assert self.plan is not None
        try:
            return (self.plan.source_for_topic(topic).id, reader) in self.routes
        except JobDefinitionError:  # no longer a topic of the job
            return False

    def event_time(self, tp: TopicPartition, *, policy: str, idle_timeout_ms: int | None,
                   now_ms: Callable[[], int]) -> EventTime:
        """The watermark of the task for tp."""
        assert self.plan is not None
        root = self.plan.source_for_topic(tp[0])
        return EventTime(
            f"{tp[0]}:{tp[1]}", policy=policy, idle_timeout_ms=idle_timeout_ms, now_ms=now_ms,
            targets=[(t, n) for (r, t), n in self.routes.items() if r == root.id],
            reads_markers=root.kind == OpKind.REPARTITION and has_watermark(root),
            feeds=lambda task: still_feeds(task, tp[0], self.writes_to))
