"""Stateful steps that live in event time: windows (streamcore.runtime.windows),
drop_duplicates and map_groups_with_state.

What they share (:class:`TimedStep`):

* one store per partition, through the step's cache, with keys that start with a one-byte
  kind and, where expiry needs it, the time the entry expires, big-endian: a range scan
  of the store is then in expiry order. The in-memory index of what is open is built from
  that scan the first time it is needed (after the store has been restored);
* the watermark is the partition task's (streamcore.runtime.eventtime), never lower than
  the one the step last saved in its store: after a restart, records that were late before
  the crash are late again, and closed windows do not reopen;
* behind a repartition, the step also saves the upstream tasks' watermarks (after the rest
  of its state, :meth:`StateCache.put_last`) and a restarted task starts from them: a
  restart does not make the records of an upstream task that is behind late;
* state whose final result a step emits is deleted only once that output is acknowledged
  (the batch that carried it has nothing pending), at a commit: a crash in between
  restores the state and emits the result again, never loses it. The watermark that closed
  it is saved first (see ``_on_commit``).
"""

from __future__ import annotations

import heapq
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson

from streamcore.api.groupstate import GroupState
from streamcore.core.errors import (
    DeliveryFailed,
    ProducerFenced,
    TransactionAborted,
    UserFunctionError,
)
from streamcore.core.serde import INTERNAL_KEY, Serde
from streamcore.plan.analysis import has_watermark
from streamcore.plan.graph import Node
from streamcore.runtime.context import Emit, PartitionContext, StepFailed
from streamcore.runtime.eventtime import NO_WATERMARK

__all__ = ["Dedup", "GroupStates", "Records", "Ticks", "TimedStep", "decode_store_key",
           "pack_time", "unpack_time"]

log = logging.getLogger("streamcore.timed")
_OFFSET = 2**63  # times are signed; stored unsigned so that bytes order as numbers
_Q = struct.Struct(">Q")
META = b"m"  # the step's saved watermark
UPSTREAM = b"mu"  # behind a repartition: the upstream tasks' watermarks (EventTime.settled)


def pack_time(ms: int) -> bytes:
    return _Q.pack(ms + _OFFSET)


def unpack_time(b: bytes) -> int:
    return int(_Q.unpack(b)[0]) - _OFFSET


class _SaveWatermark:
    __slots__ = ("wm",)

    def __init__(self, wm: int) -> None:
        self.wm = wm


class Ticks(int):
    """An int kept in a step's store beside the user's values (a watermark, a deadline)."""


class Records(list):  # type: ignore[type-arg]
    """A key's raw records, [[ts, value], ...] (sliding windows)."""


class Watermarks(dict):  # type: ignore[type-arg]
    """Upstream task -> its watermark (the step's UPSTREAM entry)."""


def envelope(serde: Serde) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """The store's value encoding: a tag byte, then the user's serde for their values."""
    ser, de = serde.serialize, serde.deserialize

    def dumps(v: Any) -> bytes:
        t = type(v)
        if t is Ticks:
            return b"t" + str(int(v)).encode()
        if t is Records:
            return b"r" + orjson.dumps(v)
        if t is Watermarks:
            return b"u" + orjson.dumps(v)
        return b"v" + ser(v)

    def loads(b: bytes) -> Any:
        tag, body = b[:1], b[1:]
        if tag == b"t":
            return Ticks(int(body))
        if tag == b"r":
            return Records(orjson.loads(body))
        if tag == b"u":
            return Watermarks(orjson.loads(body))
        return de(body)
    return dumps, loads


def decode_store_key(kb: bytes) -> Any:
    """A timed step's store key as a test reads it: the user's key, with its window as
    (key, start, end); None for the step's own entries (the saved watermark)."""
    tag = kb[:1]
    if tag == b"w":  # end, start, key
        return (INTERNAL_KEY.deserialize(kb[17:]), unpack_time(kb[9:17]), unpack_time(kb[1:9]))
    if tag in (b"r", b"s", b"k", b"p"):
        return INTERNAL_KEY.deserialize(kb[1:] if tag != b"p" else kb[9:])
    return None


class TimedStep:
    """The shared machinery; a subclass implements ``record``, ``build_index`` and the
    handlers it needs (``expired``, ``on_watermark``, ``on_time``)."""

    def __init__(self, node: Node, outs: dict[str, Emit], ctx: PartitionContext,
                 step: str, policy: str | None) -> None:
        p = node.params
        self.name = p["name"]
        self.ctx = ctx
        self.step, self.policy = step, policy
        self.outs = outs
        self.update_out = outs.get("update")
        self.append_out = outs.get("append")
        self.complete_out = outs.get("complete")
        dumps, loads = envelope(p["value"])
        assert ctx.open_state is not None
        self.cache = ctx.open_state(self.name, dumps, loads)
        self.kser = INTERNAL_KEY.serialize
        self.kde = INTERNAL_KEY.deserialize
        self.has_watermark = has_watermark(node)
        self.saved_wm = NO_WATERMARK  # from the store (restored), then as last saved
        self.saved_upstream: dict[str, int] | None = None  # the UPSTREAM entry, as last saved
        self.ready = False  # the index has been built from the store
        self.closing: list[tuple[Any, Any]] = []  # (what to expire, batch of its output)
        self.late: Emit | None = None
        self.expired_rows = 0  # state entries deleted after the watermark passed them
        self.expiry_s = 0.0  # time spent closing and deleting them (progress reports)
        ctx.timed_steps.append(self)
        ctx.hooks.commit.append(self._on_commit)
        ctx.hooks.watermark.append(self._watermark_hook)
        ctx.hooks.abort.append(self._on_abort)

    # -- time ----------------------------------------------------------------------------
    @property
    def watermark(self) -> int:
        wm = self.ctx.event_time.watermark
        return wm if wm > self.saved_wm else self.saved_wm

    def ensure_ready(self) -> None:
        if not self.ready:
            saved = self.cache.get(META)
            if saved is not None:
                self.saved_wm = int(saved)
            self.build_index()
            self.ready = True

    def build_index(self) -> None:
        raise NotImplementedError

    def resume(self) -> None:
        """The store is restored, no record has been read yet: the task's watermark starts
        from the upstream watermarks saved with the state."""
        et = self.ctx.event_time
        if et.reads_markers:
            saved = self.cache.get(UPSTREAM)
            if saved:
                self.saved_upstream = dict(saved)
                et.resume(saved)

    def scan(self, prefix: bytes) -> list[bytes]:
        """Live keys with prefix, in order: the store's, with unflushed writes applied."""
        return self.cache.live_keys(prefix)

    # -- hooks ---------------------------------------------------------------------------
    def _watermark_hook(self, wm: int) -> None:
        self.ensure_ready()
        t0 = time.perf_counter()
        saved = self.ctx.msg
        self.ctx.msg = None  # outputs of a hook carry no input record's headers
        try:
            wm = self.watermark
            self.on_watermark(wm)
            # Saved once what it closed is acknowledged: a restart before that closes (and
            # emits) the same windows again rather than believing them emitted.
            self.close_later(_SaveWatermark(wm))
        finally:
            self.ctx.msg = saved
            self.expiry_s += time.perf_counter() - t0

    def on_watermark(self, wm: int) -> None:
        return None

    def _on_commit(self) -> None:
        if not self.ready:
            return  # nothing has run yet (the store may still be restoring)
        saved = self.ctx.msg
        self.ctx.msg = None
        try:
            self.before_commit()
        finally:
            self.ctx.msg = saved
        # State whose final result is acknowledged goes (a tombstone in the changelog), in
        # the order it closed, after the watermark that closed it: the changelog gets the
        # watermark (after every earlier change) before the tombstones, so a crash in the
        # middle of the flush can leave the watermark without a tombstone (the restart
        # drops that state: _Windows.drop_emitted) but never a tombstone without the
        # watermark (the records read again would open the window again, and it would be
        # emitted a second time, partial). One move of the watermark per flush: a flush
        # can hold several commits' writes (it waits while the last one is in flight), and
        # a second move would put the watermark after the first one's tombstones. Until the
        # watermark saved last is with a flush, what closed since waits for a later commit.
        if self.closing and not self.cache.writes(META):
            t0 = time.perf_counter()
            done = 0
            for _item, batch in self.closing:
                if not (batch is None or batch.pending == 0):
                    break
                done += 1
            acked = [item for item, _batch in self.closing[:done]]
            wm = max((i.wm for i in acked if type(i) is _SaveWatermark), default=NO_WATERMARK)
            if wm > self.saved_wm:
                self.saved_wm = wm
                self.cache.put_last(META, Ticks(wm))
            closed = [i for i in acked if type(i) is not _SaveWatermark]
            for item in closed:
                self.expired(item)
            self.expired_rows += len(closed)
            del self.closing[:done]
            self.expiry_s += time.perf_counter() - t0
        settled = self.ctx.event_time.settled  # a new dict whenever it changes
        if settled and settled is not self.saved_upstream and self.ctx.event_time.reads_markers:
            self.saved_upstream = settled
            self.cache.put_last(UPSTREAM, Watermarks(settled))

    def before_commit(self) -> None:
        return None

    def expired(self, item: Any) -> None:
        return None

    def _on_abort(self) -> None:
        # The stores went back to the last commit: so does the index.
        self.ready = False
        self.closing = []
        self.saved_wm = NO_WATERMARK
        self.saved_upstream = None
        self.aborted()

    def aborted(self) -> None:
        return None

    def close_later(self, item: Any) -> None:
        """Expire item once what this hook emitted for it is acknowledged. In epoch mode at
        the end of this epoch: the deletion commits in the same transaction as the output
        (and a crash before it undoes both)."""
        self.closing.append((item, None if self.ctx.epochs else self.ctx.batch))

    # -- late records --------------------------------------------------------------------
    def dropped_late(self, key: Any, value: Any, ts: int) -> None:
        self.ctx.late_records += 1
        if self.late is not None:
            self.late(key, value, ts)

    def fail(self, exc: Exception) -> StepFailed:
        return StepFailed(self.step, self.policy, exc)

    def hook_failed(self, exc: Exception, what: str) -> None:
        """A user function raised in a hook (no input record to blame or dead-letter):
        under skip and dead_letter it is logged, otherwise the worker stops. An output the
        producer refused is no user error: it is raised as it is (never skipped)."""
        if isinstance(exc, (DeliveryFailed, TransactionAborted, ProducerFenced)):
            raise exc
        if self.policy in ("skip", "dead_letter"):
            log.warning("step %r raised in %s: %s: %s (policy %s)", self.step, what,
                        type(exc).__name__, exc, self.policy)
            return
        topic, partition, _ = self.ctx.position()
        raise UserFunctionError(f"step {self.step!r} raised in {what}: "
                                f"{type(exc).__name__}: {exc}", topic=topic,
                                partition=partition, offset=-1) from exc


class Dedup(TimedStep):
    """drop_duplicates: entries b"k" + key → the time they expire; an in-memory heap by
    expiry. Expired entries are deleted at commit; no output depends on them."""

    def __init__(self, node: Node, outs: dict[str, Emit], ctx: PartitionContext,
                 step: str, policy: str | None) -> None:
        super().__init__(node, outs, ctx, step, policy)
        self.key_fn = node.params["dedup_key"]
        self.within = node.params["within_ms"]
        self.heap: list[tuple[int, bytes]] = []
        self.max_ts = NO_WATERMARK
        if not self.has_watermark and self.within is None:
            log.warning("drop_duplicates %r has neither a watermark nor within=: its state "
                        "grows without bound (every distinct record is kept)", self.name)
        self.down = outs.get("update")

    def build_index(self) -> None:
        self.heap = [(int(self.cache.get(k)), k) for k in self.scan(b"k")]
        heapq.heapify(self.heap)

    def record(self, key: Any, value: Any, ts: int) -> None:
        self.ensure_ready()
        if self.has_watermark and ts < self.watermark:
            self.dropped_late(key, value, ts)
            return
        try:
            ident = value if self.key_fn is None else self.key_fn(value)
            sk = b"k" + self.kser((key, ident))
        except Exception as exc:
            raise self.fail(exc) from exc
        if ts > self.max_ts:
            self.max_ts = ts
        if self.cache.get(sk) is not None:
            return  # a duplicate
        expires = ts + (self.within or 0)
        self.cache.put(sk, Ticks(expires))
        heapq.heappush(self.heap, (expires, sk))
        if self.down is not None:
            self.down(key, value, ts)

    def before_commit(self) -> None:
        cutoff = self.watermark if self.has_watermark else (
            self.max_ts if self.within is not None else None)
        if cutoff is None or cutoff == NO_WATERMARK:
            return
        heap = self.heap
        while heap and heap[0][0] < cutoff:
            expires, sk = heapq.heappop(heap)
            current = self.cache.get(sk)
            if current is not None and int(current) == expires:
                self.cache.delete(sk)


class GroupStates(TimedStep):
    """map_groups_with_state: b"s" + key → the state, b"t" + key → its timeout (processing
    or event time, ms); timeouts fire from a heap rebuilt from the b"t" entries."""

    def __init__(self, node: Node, outs: dict[str, Emit], ctx: PartitionContext,
                 step: str, policy: str | None) -> None:
        super().__init__(node, outs, ctx, step, policy)
        p = node.params
        self.fn = p["group_fn"]
        self.timeout = p["timeout"]
        self.flat = p["flat"]
        self.down = outs.get("update") or outs.get("append")
        self.heap: list[tuple[int, bytes]] = []
        self.pending: dict[bytes, tuple[Any, list[Any], int]] = {}  # epoch mode
        if self.timeout == "processing_time":
            ctx.hooks.timer.append(self._on_time)

    def build_index(self) -> None:
        self.heap = [(int(self.cache.get(k)), k[1:]) for k in self.scan(b"t")]
        heapq.heapify(self.heap)

    def record(self, key: Any, value: Any, ts: int) -> None:
        self.ensure_ready()
        try:
            kb = self.kser(key)
        except Exception as exc:
            raise self.fail(exc) from exc
        if self.ctx.epochs:  # the key's records of the epoch, given at its end
            entry = self.pending.get(kb)
            if entry is None:
                self.pending[kb] = (key, [value], ts)
            else:
                entry[1].append(value)
                self.pending[kb] = (key, entry[1], ts)
            return
        try:
            self.call(kb, key, [value], ts, timed_out=False)
        except Exception as exc:
            raise self.fail(exc) from exc

    def call(self, kb: bytes, key: Any, values: list[Any], ts: int, *,
             timed_out: bool) -> None:
        cache = self.cache
        wm = self.watermark
        state = GroupState(cache.get(b"s" + kb), timeout=self.timeout, timed_out=timed_out,
                           now_ms=self.ctx.now_ms(),
                           watermark_ms=None if wm == NO_WATERMARK else wm)
        out = self.fn(key, values, state)
        outs = list(out) if self.flat and out is not None else (
            [] if out is None else [out])
        if state._removed:
            cache.delete(b"s" + kb)
        elif state._updated:
            cache.put(b"s" + kb, state._value)
        at = state._timeout_at
        if at is not None:
            cache.put(b"t" + kb, Ticks(at))
            heapq.heappush(self.heap, (at, kb))
        elif cache.get(b"t" + kb) is not None:
            cache.delete(b"t" + kb)  # each call clears the timeout (Spark)
        down = self.down
        if down is not None:
            for o in outs:
                down(key, o, ts)

    def _fire(self, now: int, strict: bool) -> None:
        heap = self.heap
        while heap and (heap[0][0] < now if strict else heap[0][0] <= now):
            at, kb = heapq.heappop(heap)
            current = self.cache.get(b"t" + kb)
            if current is None or int(current) != at:
                continue  # cleared or moved by a later call
            self.cache.delete(b"t" + kb)
            try:
                self.call(kb, self.kde(kb), [], now, timed_out=True)
            except Exception as exc:
                self.hook_failed(exc, "a timeout call")

    def _on_time(self, now_ms: int) -> None:
        self.ensure_ready()
        self._fire(now_ms, strict=False)  # processing time: due at the deadline

    def on_watermark(self, wm: int) -> None:
        if self.timeout == "event_time":
            self._fire(wm, strict=True)  # event time: once the watermark is past it

    def before_commit(self) -> None:
        items = list(self.pending.items())
        self.pending.clear()
        for kb, (key, values, ts) in items:
            try:
                self.call(kb, key, values, ts, timed_out=False)
            except Exception as exc:
                self.hook_failed(exc, "the end of an epoch")

    def aborted(self) -> None:
        self.pending.clear()
