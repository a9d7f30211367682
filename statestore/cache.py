"""A write-back cache in front of a store, as Kafka Streams' record cache.

RocksDB costs about 12 us per get+put through rocksdict; a stateful step that hit it for every
record could not keep up. So the step reads and writes decoded values here: a read hits the
cache first, a write only marks the key dirty. At each commit the engine calls :meth:`flush`,
which writes every dirty key once (latest value) to the store in one atomic write batch and
hands the same changes to the changelog writer. The engine then waits for the changelog's
acknowledgements before it commits the input offsets that produced them.

Memory is bounded: after a flush (when every entry is clean), the least recently used
entries beyond ``max_entries`` are dropped, so that the hot keys stay decoded in memory
instead of the whole cache being emptied at once. Only the event loop thread touches a
cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from statestore.base import Change, Store

__all__ = ["StateCache"]

_MISS = object()


class StateCache:
    def __init__(self, store: Store, dumps: Callable[[Any], bytes],
                 loads: Callable[[bytes], Any], *, max_entries: int = 100_000) -> None:
        self.store = store
        self._dumps = dumps
        self._loads = loads
        self._max = max_entries
        self._values: dict[bytes, Any] = {}  # decoded value, or None for "no such key"
        # Keys written since the last flush, in the order first written (deleted: last);
        # the changelog gets them in that order (see put_last and delete).
        self._dirty: dict[bytes, None] = {}
        # Keys handed out by take() and not yet written: kept cached (never evicted) and
        # seen by live_keys until write_taken().
        self._taken: dict[bytes, None] = {}

    # The dict's order is the recency order (least recently used first): every access moves
    # its key to the end, one pop and one insert.
    def get(self, key: bytes) -> Any:
        """The decoded value of key, or None."""
        values = self._values
        v = values.pop(key, _MISS)
        if v is _MISS:
            raw = self.store.get(key)
            v = None if raw is None else self._loads(raw)
        values[key] = v
        return v

    def update(self, key: bytes, fn: Callable[[Any, Any], Any], arg: Any) -> Any:
        """new = fn(value of key or None, arg), written as put (None: as delete); returns
        new. If fn raises, the cache is as before. One call per record instead of a get and a
        put: this is the hot path of a stateful step."""
        values = self._values
        old = values.pop(key, _MISS)
        if old is _MISS:
            raw = self.store.get(key)
            old = None if raw is None else self._loads(raw)
        values[key] = old  # the most recently used now, whatever fn does
        new = fn(old, arg)
        values[key] = new
        self._dirty[key] = None
        return new

    def put(self, key: bytes, value: Any) -> None:
        self._values.pop(key, None)
        self._values[key] = value
        self._dirty[key] = None

    def put_last(self, key: bytes, value: Any) -> None:
        """As put, but the next flush writes key after every other key written before this
        call. For a value that summarizes the state written so far (how far the step got):
        a crash in the middle of the changelog's writes leaves a prefix of them, so the
        summary is durable only if what it summarizes is."""
        self._dirty.pop(key, None)
        self.put(key, value)

    def delete(self, key: bytes) -> None:
        """A tombstone, written after every key written before this call (as put_last): a
        step that saves how far it got and then deletes what that closed relies on it."""
        self._values.pop(key, None)
        self._values[key] = None
        self._dirty.pop(key, None)
        self._dirty[key] = None

    def writes(self, key: bytes) -> bool:
        """key (a value or a tombstone) is among the writes of the next flush."""
        return key in self._dirty

    def deleting(self, key: bytes) -> bool:
        """key's tombstone is among the writes of the next flush."""
        return key in self._dirty and self._values[key] is None

    def live_keys(self, prefix: bytes = b"") -> list[bytes]:
        """Every key with prefix and a value: the store's (read from prefix on only), with
        the writes not flushed yet applied."""
        out = {k for k, _ in self.store.scan(prefix)}
        for k in itertools.chain(self._taken, self._dirty):
            if not k.startswith(prefix):
                continue
            if self._values[k] is None:
                out.discard(k)
            else:
                out.add(k)
        return sorted(out)

    @property
    def dirty(self) -> int:
        return len(self._dirty)

    def flush(self, changelog: Callable[[bytes, bytes | None], None]) -> int:
        """Write dirty keys to the store (one atomic batch) and to ``changelog(key, value)``
        (value None: a tombstone); return how many. The store is written first: a crash
        between the two leaves the store ahead of its changelog, which a restore from the
        checkpoint repairs (changelog records carry whole values, not deltas)."""
        if not self._dirty:
            return 0
        changes = self._dirty_changes()
        self.store.write(changes)
        self._dirty.clear()
        for k, vb in changes:
            changelog(k, vb)
        self._trim()
        return len(changes)

    def take(self) -> list[Change]:
        """The dirty keys serialized, as :meth:`flush` would write them, but written only by
        :meth:`write_taken`: a flush that must wait (for the acknowledgement of outputs
        made with these changes) keeps what it covers while later writes go on."""
        changes = self._dirty_changes()
        self._taken.update(self._dirty)
        self._dirty.clear()
        return changes

    def write_taken(self, changes: list[Change],
                    changelog: Callable[[bytes, bytes | None], None]) -> None:
        """Write what :meth:`take` returned, as :meth:`flush` does: the store, then the
        changelog."""
        if changes:
            self.store.write(changes)
        self._taken.clear()
        for k, vb in changes:
            changelog(k, vb)
        if not self._dirty:
            self._trim()

    def stage(self, changelog: Callable[[bytes, bytes | None], None]) -> list[Change]:
        """Epoch mode: hand the dirty keys to ``changelog`` (in the epoch's transaction) and
        return them, without writing the store: :meth:`apply` writes them once the
        transaction has committed; :meth:`clear` forgets them if it aborted."""
        changes = self._dirty_changes()
        self._dirty.clear()
        for k, vb in changes:
            changelog(k, vb)
        return changes

    def apply(self, changes: list[Change]) -> None:
        """Write staged changes to the store (one atomic batch), then trim the cache."""
        if changes:
            self.store.write(changes)
        if not self._dirty:
            self._trim()

    def _dirty_changes(self) -> list[Change]:
        """The dirty keys with their values serialized (None: a tombstone), in the order
        first written."""
        values, dumps = self._values, self._dumps
        return [(k, None if (v := values[k]) is None else dumps(v)) for k in self._dirty]

    def _trim(self) -> None:
        if self._taken:  # not written yet: the cache is their only copy
            return
        values = self._values
        excess = len(values) - self._max
        if excess > 0:  # everything is clean now: drop the least recently used
            for k in list(itertools.islice(values, excess)):
                del values[k]

    def clear(self) -> None:
        """Forget cached values and unflushed writes (the partition is being abandoned)."""
        self._values.clear()
        self._dirty.clear()
        self._taken.clear()
