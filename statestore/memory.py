"""An in-memory store with the same contract as RocksDB: for tests and small jobs.

Its contents live in the dict it is given (or its own): a new MemoryStore on the dict of a
closed one "reopens" it with the same contents.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence

from statestore.base import Change, Store, StoreClosed

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """A dict plus a sorted key list for ordered scans. Writes take a lock so that one
    writer thread and readers on other threads see consistent state."""

    def __init__(self, data: dict[bytes, bytes] | None = None) -> None:
        self._data: dict[bytes, bytes] = data if data is not None else {}
        self._keys = sorted(self._data)
        self._lock = threading.Lock()
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise StoreClosed("store is closed")

    def get(self, key: bytes) -> bytes | None:
        self._check()
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self._check()
        with self._lock:
            self._put(key, value)

    def _put(self, key: bytes, value: bytes) -> None:
        if key not in self._data:
            bisect.insort(self._keys, key)
        self._data[key] = bytes(value)

    def delete(self, key: bytes) -> None:
        self._check()
        with self._lock:
            self._delete(key)

    def _delete(self, key: bytes) -> None:
        if self._data.pop(key, None) is not None:
            i = bisect.bisect_left(self._keys, key)
            del self._keys[i]

    def write(self, changes: Sequence[Change]) -> None:
        self._check()
        with self._lock:
            for k, v in changes:
                if v is None:
                    self._delete(k)
                else:
                    self._put(k, v)

    def range(self, start: bytes | None = None,
              end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        self._check()
        with self._lock:
            lo = 0 if start is None else bisect.bisect_left(self._keys, start)
            hi = len(self._keys) if end is None else bisect.bisect_left(self._keys, end)
            items = [(k, self._data[k]) for k in self._keys[lo:hi]]
        return iter(items)

    def approximate_count(self) -> int:
        return len(self._data)

    def flush(self) -> None:
        self._check()

    def close(self) -> None:
        self._closed = True

