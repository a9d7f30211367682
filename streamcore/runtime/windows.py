"""Windowed aggregations over event time (the API is streamcore.api.windows).

Rules, as Spark Structured Streaming states them (and Kafka Streams for sliding windows and
grace):

* A window is *closed* when ``end + grace <= watermark`` (Spark: a window's state is dropped
  once the watermark passes its end; "append" emits it then). Sliding windows include their
  end, so theirs closes when ``end + grace < watermark``.
* A record none of whose windows is open is *late*: dropped, counted in
  ``streamcore_late_records_dropped_total`` and given to ``late=`` if set. A record with
  some windows closed and some open (hopping) counts in the open ones only.
* ``update`` emits a window's row each time it changes (in epoch mode once per epoch, at
  its end, as Spark's update mode does per trigger); ``append`` emits it once, when it
  closes; ``complete`` emits every window at the end of every epoch and keeps them all
  (Spark: complete mode cannot drop state), so late data is never dropped there.

Store layout (one store per partition, keys ordered by window end so that expiry is a
range scan): ``b"w" + end + start + key`` → the aggregate (tumbling, hopping, session),
``b"r" + key`` → the key's raw records (sliding), ``b"p" + pane start + key`` → a pane's
reduction, ``b"e" + key`` → the end of the last window emitted (reduce_by_key_and_window).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterator
from typing import Any

from streamcore.plan.graph import Node
from streamcore.runtime.context import Emit, PartitionContext
from streamcore.runtime.timed import Records, Ticks, TimedStep, log, pack_time, unpack_time

__all__ = ["FixedWindows", "PaneReduce", "SessionWindows", "SlidingWindows", "make_window"]

_GONE = object()  # epoch mode: a session merged away (its row becomes a tombstone)


class _Windows(TimedStep):
    """What the window kinds share: the aggregate function, row shape and emission."""

    def __init__(self, node: Node, outs: dict[str, Emit], ctx: PartitionContext,
                 step: str, policy: str | None) -> None:
        super().__init__(node, outs, ctx, step, policy)
        p = node.params
        self.window = p["window"]
        self.grace = self.window.grace_ms
        self.update: Callable[[Any, Any], Any] = node.fn  # type: ignore[assignment]
        self.field = "count" if p["op"] == "window_count" else "value"
        self.keep_all = self.complete_out is not None  # complete mode: nothing expires
        if not self.has_watermark and not self.keep_all:
            log.warning("windowed step %r has no watermark: its windows never close and its "
                        "state grows without bound (add .with_watermark(delay) before it)",
                        self.name)
        # epoch mode, update: (key, start, end) per changed store key, emitted at the end
        self.changed: dict[bytes, tuple[Any, int, int]] = {}

    def row(self, start: int, end: int, agg: Any) -> dict[str, Any]:
        return {"window": {"start": start, "end": end}, self.field: agg}

    def emit(self, out: Emit | None, key: Any, start: int, end: int, agg: Any,
             ts: int) -> None:
        if out is not None:
            out((key, start, end), None if agg is None else self.row(start, end, agg), ts)

    def changed_row(self, sk: bytes, key: Any, start: int, end: int, agg: Any,
                    ts: int) -> None:
        """A window's row changed (agg None: it is gone): update mode hears of it now, or,
        in epoch mode, at the end of the epoch."""
        if self.update_out is None:
            return
        if self.ctx.epochs:
            self.changed[sk] = (key, start, end)
        else:
            self.emit(self.update_out, key, start, end, agg, ts)

    def before_commit(self) -> None:
        if self.changed:
            items, self.changed = self.changed, {}
            for sk, (key, start, end) in items.items():
                agg = self.cache.get(sk)
                self.emit(self.update_out, key, start, end, agg, end - 1)
        if self.complete_out is not None:
            for key, start, end, agg in self.all_rows():
                self.emit(self.complete_out, key, start, end, agg, end - 1)

    def all_rows(self) -> list[tuple[Any, int, int, Any]]:
        return [(self.kde(sk[17:]), unpack_time(sk[9:17]), unpack_time(sk[1:9]),
                 self.cache.get(sk)) for sk in sorted(self.open_keys())]

    def open_keys(self) -> set[bytes]:
        return set()

    def expired(self, item: Any) -> None:
        self.cache.delete(item)

    def aborted(self) -> None:
        self.changed = {}

    def pop_closed(self, heap: list[bytes], wm: int) -> Iterator[bytes]:
        """The store keys of the open windows that the watermark has closed, by end; each
        leaves the index (its final row is the caller's, its deletion comes later)."""
        if self.keep_all:
            return
        open_, grace = self.open_keys(), self.grace
        while heap and unpack_time(heap[0][1:9]) + grace <= wm:
            sk = heapq.heappop(heap)
            if sk not in open_:
                continue  # merged into a later session
            open_.discard(sk)
            change = self.changed.pop(sk, None)
            if change is not None:  # epoch mode, update: changed in the epoch that closes it
                key, start, end = change
                self.emit(self.update_out, key, start, end, self.cache.get(sk), end - 1)
            yield sk

    def drop_emitted(self, heap: list[bytes]) -> list[bytes]:
        """After a restart: the windows that the saved watermark closed. Their final rows
        were acknowledged before it was saved, and it reaches the changelog before their
        tombstones (TimedStep._on_commit): a crash between the two left them. They go now,
        without a second row."""
        gone = list(self.pop_closed(heap, self.saved_wm))
        for sk in gone:
            self.cache.delete(sk)
        return gone

    def final_row(self, sk: bytes) -> None:
        """Append mode's row of the closed window sk; its state goes once that is acked."""
        if self.append_out is not None:
            end, start = unpack_time(sk[1:9]), unpack_time(sk[9:17])
            self.emit(self.append_out, self.kde(sk[17:]), start, end, self.cache.get(sk),
                      end - 1)
        self.close_later(sk)


class FixedWindows(_Windows):
    """Tumbling and hopping windows: each record adds to the windows its time falls in."""

    def __init__(self, node: Node, outs: dict[str, Emit], ctx: PartitionContext,
                 step: str, policy: str | None) -> None:
        super().__init__(node, outs, ctx, step, policy)
        self.assign = self.window.assign
        self.open: set[bytes] = set()
        self.heap: list[bytes] = []  # store keys: ordered by window end

    def build_index(self) -> None:
        keys = self.scan(b"w")
        self.open, self.heap = set(keys), keys  # sorted: already a heap
        self.drop_emitted(self.heap)

    def open_keys(self) -> set[bytes]:
        return self.open

    def record(self, key: Any, value: Any, ts: int) -> None:
        self.ensure_ready()
        wm, grace, cache = self.watermark, self.grace, self.cache
        try:
            kb = self.kser(key)
            windows = self.assign(ts)
        except Exception as exc:
            raise self.fail(exc) from exc
        counted = False
        for start, end in windows:
            if end + grace <= wm and not self.keep_all:
                continue  # closed
            sk = b"w" + pack_time(end) + pack_time(start) + kb
            try:
                agg = self.update(cache.get(sk), value)
            except Exception as exc:
                raise self.fail(exc) from exc
            cache.put(sk, agg)
            if sk not in self.open:
                self.open.add(sk)
                heapq.heappush(self.heap, sk)
            counted = True
            self.changed_row(sk, key, start, end, agg, ts)
        if not counted:
            self.dropped_late(key, value, ts)

    def on_watermark(self, wm: int) -> None:
        for sk in self.pop_closed(self.heap, wm):
            self.final_row(sk)


class SessionWindows(_Windows):
    """A record at t opens [t, t + gap) and merges every session of its key that overlaps
    it; the merged aggregates combine with ``merge`` (count: +, reduce: its function)."""

    def __init__(self, node: Node, outs: dict[str, Emit], ctx: PartitionContext,
                 step: str, policy: str | None) -> None:
        super().__init__(node, outs, ctx, step, policy)
        self.gap = self.window.gap_ms
        self.merge: Callable[[Any, Any], Any] = node.params["merge"]
        self.sessions: dict[bytes, list[bytes]] = {}  # key -> its sessions' store keys
        self.heap: list[bytes] = []
        self.open: set[bytes] = set()
        # session -> the sessions merged into it whose tombstones are not written yet
        self.replaced: dict[bytes, list[bytes]] = {}

    def build_index(self) -> None:
        keys = self.scan(b"w")
        self.open, self.heap, self.sessions, self.replaced = set(keys), keys, {}, {}
        for sk in keys:
            self.sessions.setdefault(sk[17:], []).append(sk)
        for sk in self.drop_emitted(self.heap):
            mine = self.sessions[sk[17:]]
            mine.remove(sk)
            if not mine:
                del self.sessions[sk[17:]]
        for mine in self.sessions.values():
            if len(mine) > 1:
                self._drop_replaced(mine)

    def _drop_replaced(self, mine: list[bytes]) -> None:
        """A key's sessions never overlap. After a crash in the middle of a merge's writes
        the store can hold the merged session and some of the sessions it replaced (their
        tombstones come after it, see record): those lie inside it, and go."""
        by_start = sorted(mine, key=lambda s: (s[9:17], -unpack_time(s[1:9])))
        outer = by_start[0]
        for sk in by_start[1:]:
            if unpack_time(sk[1:9]) <= unpack_time(outer[1:9]):  # inside outer
                mine.remove(sk)
                self.open.discard(sk)
                self.cache.delete(sk)
            else:
                outer = sk

    def open_keys(self) -> set[bytes]:
        return self.open

    def record(self, key: Any, value: Any, ts: int) -> None:
        self.ensure_ready()
        lo, hi = ts, ts + self.gap
        if hi + self.grace <= self.watermark and not self.keep_all:
            self.dropped_late(key, value, ts)
            return
        cache = self.cache
        try:
            kb = self.kser(key)
            mine = self.sessions.setdefault(kb, [])
            agg = None
            replaced = sorted((s for s in mine if unpack_time(s[9:17]) < hi
                               and lo < unpack_time(s[1:9])), key=lambda s: s[9:17])
            for old_sk in replaced:
                old = cache.get(old_sk)
                agg = old if agg is None else self.merge(agg, old)
                lo, hi = min(lo, unpack_time(old_sk[9:17])), max(hi, unpack_time(old_sk[1:9]))
            agg = self.update(agg, value)
        except Exception as exc:
            raise self.fail(exc) from exc
        sk = b"w" + pack_time(hi) + pack_time(lo) + kb
        # The merged session is written before the tombstones of the sessions it replaces,
        # and of those they had replaced since the last flush: a flush reaches the changelog
        # in order, and a crash in the middle of it must not leave a tombstone without the
        # session that holds its records (their offsets may be committed). What it can
        # leave, the merged session beside some it replaced, the restart undoes
        # (_drop_replaced).
        cache.put(sk, agg)
        tombstones = self.replaced.pop(sk, [])
        for old_sk in replaced:
            mine.remove(old_sk)
            if old_sk != sk:  # a record inside a session leaves its bounds as they were
                self.open.discard(old_sk)
                tombstones += [old_sk, *self.replaced.pop(old_sk, ())]
                self.changed_row(old_sk, key, unpack_time(old_sk[9:17]),
                                 unpack_time(old_sk[1:9]), None, ts)  # merged away
        tombstones = [t for t in tombstones if t != sk and (t in replaced or cache.deleting(t))]
        for t in tombstones:
            cache.delete(t)  # now after the merged session
        if tombstones:
            self.replaced[sk] = tombstones
        mine.append(sk)
        if sk not in self.open:
            self.open.add(sk)
            heapq.heappush(self.heap, sk)
        self.changed_row(sk, key, lo, hi, agg, ts)

    def aborted(self) -> None:
        super().aborted()
        self.replaced = {}

    def expired(self, item: Any) -> None:
        super().expired(item)
        # The tombstones of the sessions merged into it, if not written yet, go after its
        # own, that is after the watermark that closed it (TimedStep._on_commit): a crash
        # in the middle of the flush cannot leave them without that watermark.
        for t in self.replaced.pop(item, ()):
            if self.cache.deleting(t):
                self.cache.delete(t)

    def on_watermark(self, wm: int) -> None:
        for sk in self.pop_closed(self.heap, wm):
            mine = self.sessions.get(sk[17:])
            if mine is not None:
                mine.remove(sk)
                if not mine:
                    del self.sessions[sk[17:]]
            self.final_row(sk)


class SlidingWindows(_Windows):
    """Kafka Streams' sliding windows, computed from each key's raw records (kept while an
    open window can hold them; values must be JSON-serializable). The windows are
    [t - d, t] for each record time t and [t + 1, t + 1 + d] for each t that has records
    after it within d; both ends are included."""

    def __init__(self, node: Node, outs: dict[str, Emit], ctx: PartitionContext,
                 step: str, policy: str | None) -> None:
        super().__init__(node, outs, ctx, step, policy)
        self.d = self.window.max_difference_ms
        self.keys: set[bytes] = set()
        self.final_upto = self.saved_wm  # windows closed below this were emitted

    def build_index(self) -> None:
        self.keys = {k[1:] for k in self.scan(b"r")}
        self.final_upto = self.saved_wm

    def windows_of(self, times: list[int]) -> list[tuple[int, int]]:
        d, out = self.d, set()
        for i, t in enumerate(times):
            out.add((t - d, t))
            j = bisect.bisect_right(times, t, i)
            if j < len(times) and times[j] <= t + 1 + d:
                out.add((t + 1, t + 1 + d))
        return sorted(out, key=lambda w: (w[1], w[0]))

    def fold(self, recs: list[list[Any]], start: int, end: int) -> Any:
        agg = None
        for t, v in recs:
            if start <= t <= end:
                agg = self.update(agg, v)
        return agg

    def record(self, key: Any, value: Any, ts: int) -> None:
        self.ensure_ready()
        wm, grace, d = self.watermark, self.grace, self.d
        # Late only when every window that holds it or that it defines is closed: the
        # latest ends at ts + 1 + d (its right window; Kafka Streams' rule). Before its own
        # window's end, a record can still belong to an earlier record's right window.
        if ts + 1 + d + grace < wm and not self.keep_all:
            self.dropped_late(key, value, ts)
            return
        try:
            kb = self.kser(key)
            recs = self.cache.get(b"r" + kb) or Records()
            times = [r[0] for r in recs]
            recs.insert(bisect.bisect_right(times, ts), [ts, value])
            self.cache.put(b"r" + kb, Records(recs))
            self.keys.add(kb)
            if self.update_out is None:
                return
            times = [r[0] for r in recs]
            affected = [w for w in self.windows_of(times)
                        if (w[0] <= ts <= w[1] or w == (ts + 1, ts + 1 + d))
                        and (self.keep_all or w[1] + grace >= wm)]  # open ones
            for start, end in affected:
                sk = b"w" + pack_time(end) + pack_time(start) + kb
                self.changed_row(sk, key, start, end, self.fold(recs, start, end), ts)
        except Exception as exc:
            raise self.fail(exc) from exc

    def before_commit(self) -> None:
        if self.changed:  # epoch mode: recompute the changed windows from the records
            items, self.changed = self.changed, {}
            for _sk, (key, start, end) in items.items():
                recs = self.cache.get(b"r" + self.kser(key)) or []
                self.emit(self.update_out, key, start, end, self.fold(recs, start, end), end)
        if self.complete_out is not None:
            for kb in sorted(self.keys):
                recs = self.cache.get(b"r" + kb) or []
                for start, end in self.windows_of([r[0] for r in recs]):
                    self.emit(self.complete_out, self.kde(kb), start, end,
                              self.fold(recs, start, end), end)

    def on_watermark(self, wm: int) -> None:
        if self.keep_all:
            return
        lo, grace = self.final_upto, self.grace
        self.final_upto = wm
        for kb in sorted(self.keys):
            recs = self.cache.get(b"r" + kb) or []
            if self.append_out is not None:
                for start, end in self.windows_of([r[0] for r in recs]):
                    if lo <= end + grace < wm:  # closed by this advance
                        self.emit(self.append_out, self.kde(kb), start, end,
                                  self.fold(recs, start, end), end)
        # Records no open window can hold (nor define: t + 1 + d) go once that is acked.
        self.close_later(wm - grace - self.d - 1)

    def expired(self, item: Any) -> None:
        cutoff = int(item)
        for kb in list(self.keys):
            recs = self.cache.get(b"r" + kb) or []
            keep = [r for r in recs if r[0] >= cutoff]
            if not keep:
                self.cache.delete(b"r" + kb)
                self.keys.discard(kb)
            elif len(keep) < len(recs):  # after the watermark (TimedStep._on_commit)
                self.cache.put_last(b"r" + kb, Records(keep))


class PaneReduce(_Windows):
    """reduce_by_key_and_window (DStream semantics over event time): values are reduced
    into slide-long panes; each window [end - size, end) is emitted once, when closed, as
    the reduction of its panes, or, with ``inverse``, as the previous window's value plus
    the entering pane minus the leaving one."""

    def __init__(self, node: Node, outs: dict[str, Emit], ctx: PartitionContext,
                 step: str, policy: str | None) -> None:
        super().__init__(node, outs, ctx, step, policy)
        w = self.window
        self.size = w.size_ms
        self.slide = getattr(w, "slide_ms", w.size_ms)
        self.fn: Callable[[Any, Any], Any] = node.params["combine"]
        self.inverse: Callable[[Any, Any], Any] | None = node.params["inverse"]
        self.panes: dict[bytes, list[int]] = {}  # key -> its panes' starts, sorted
        self.emitted: dict[bytes, int] = {}  # key -> end of its last window emitted
        self.running: dict[bytes, Any] = {}  # key -> that window's value (with inverse)
        self.field = "value"

    def build_index(self) -> None:
        self.panes, self.emitted, self.running = {}, {}, {}
        for sk in self.scan(b"p"):
            self.panes.setdefault(sk[9:], []).append(unpack_time(sk[1:9]))
        for sk in self.scan(b"e"):
            self.emitted[sk[1:]] = int(self.cache.get(sk))

    def record(self, key: Any, value: Any, ts: int) -> None:
        self.ensure_ready()
        pane = ts - ts % self.slide
        if pane + self.size + self.grace <= self.watermark:
            self.dropped_late(key, value, ts)
            return
        try:
            kb = self.kser(key)
            sk = b"p" + pack_time(pane) + kb
            old = self.cache.get(sk)
            self.cache.put(sk, value if old is None else self.fn(old, value))
        except Exception as exc:
            raise self.fail(exc) from exc
        panes = self.panes.setdefault(kb, [])
        i = bisect.bisect_left(panes, pane)
        if i == len(panes) or panes[i] != pane:
            panes.insert(i, pane)

    def pane(self, kb: bytes, start: int) -> Any:
        return self.cache.get(b"p" + pack_time(start) + kb)

    def on_watermark(self, wm: int) -> None:
        out = self.append_out or self.update_out
        size, slide, grace = self.size, self.slide, self.grace
        for kb in sorted(self.panes):
            panes = self.panes[kb]
            last = self.emitted.get(kb)
            end = panes[0] + slide if last is None else max(last + slide, panes[0] + slide)
            key = self.kde(kb)
            while end + grace <= wm and panes and end - size <= panes[-1]:
                inside = [p for p in panes if end - size <= p < end]
                if not inside:  # a gap in the data: jump to the next window with a pane
                    nxt = next(p for p in panes if p >= end)
                    end = nxt + slide
                    self.running.pop(kb, None)
                    continue
                prev = self.running.get(kb)
                if self.inverse is not None and prev is not None and last == end - slide:
                    value = prev
                    entering = self.pane(kb, end - slide)
                    if entering is not None:
                        value = self.fn(value, entering)
                    leaving = self.pane(kb, end - slide - size)
                    if leaving is not None:
                        value = self.inverse(value, leaving)
                else:
                    value = None
                    for p in inside:
                        v = self.pane(kb, p)
                        value = v if value is None else self.fn(value, v)
                if self.inverse is not None:
                    self.running[kb] = value
                self.emit(out, key, end - size, end, value, end - 1)
                last = self.emitted[kb] = end
                self.close_later((b"e" + kb, Ticks(end)))
                end += slide
            # Panes no later window holds (the leaving one of the next window stays).
            cut = (last if last is not None else end - slide) - size
            while panes and panes[0] < cut:
                self.close_later(b"p" + pack_time(panes.pop(0)) + kb)
            if not panes:  # the key has nothing open: its entries go
                del self.panes[kb]
                self.running.pop(kb, None)
                if self.emitted.pop(kb, None) is not None:
                    self.close_later(b"e" + kb)

    def expired(self, item: Any) -> None:
        if isinstance(item, tuple):  # the end of the last window emitted, acknowledged
            # Where it was first written since the last flush, before the tombstones of the
            # panes it lets go: a flush can hold several commits' writes (one waits while
            # the last is in flight), and moved behind a later commit's watermark, a crash
            # could leave those panes deleted and it behind, so that the restart emitted
            # their windows again without them. The windows it names were acknowledged.
            self.cache.put(item[0], item[1])
        else:
            self.cache.delete(item)


def make_window(node: Node, outs: dict[str, Emit], ctx: PartitionContext, step: str,
                policy: str | None) -> TimedStep:
    if node.params["op"] == "reduce_by_key_and_window":
        return PaneReduce(node, outs, ctx, step, policy)
    kind = node.params["window"].kind
    cls = {"session": SessionWindows, "sliding": SlidingWindows}.get(kind, FixedWindows)
    return cls(node, outs, ctx, step, policy)
