"""The contract every state backend implements.

A store holds the state of one stateful step for one partition. Its owner is one partition
task, so the engine calls it from one thread at a time; a global table is the exception (one
writer thread, readers on the event loop), so backends must allow concurrent readers.

Contract:

* Keys and values are ``bytes``. Keys order bytewise (unsigned lexicographic), so a scan of
  keys that share a prefix returns them in that order whatever the backend.
* ``get``/``put``/``delete`` take effect at once for later reads of the same store; they may
  block briefly on local disk and never on the network.
* ``write(changes)`` applies a list of ``(key, value)`` changes atomically and in order; a value
  of ``None`` deletes the key. Applying the same list twice leaves the same state (idempotent),
  which is what makes replaying a changelog from an older checkpoint safe.
* ``scan(prefix)`` and ``range(start, end)`` yield ``(key, value)`` in ascending key order;
  ``end`` is exclusive, ``None`` means unbounded. Writes made during a scan may or may not be
  seen by it.
* ``flush()`` makes every completed write survive a crash of the process (and, where the
  backend can, of the machine). ``close()`` flushes and releases the store; it is idempotent,
  and any other call after it raises :class:`StoreClosed`. A closed store reopens with the
  same contents.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

__all__ = ["Change", "Store", "StoreClosed", "StoreCorrupt", "StoreLocked"]

Change = tuple[bytes, bytes | None]  # (key, value); a value of None deletes the key


class StoreClosed(RuntimeError):
    """A store was used after close()."""


class StoreCorrupt(RuntimeError):
    """A store's files could not be opened; the engine wipes it and rebuilds from the
    changelog."""


class StoreLocked(RuntimeError):
    """Another process holds the store open (two workers sharing one state directory); it
    must never be wiped."""


class Store(ABC):
    @abstractmethod
    def get(self, key: bytes) -> bytes | None:
        """The value of key, or None."""

    @abstractmethod
    def put(self, key: bytes, value: bytes) -> None:
        """Set key to value."""

    @abstractmethod
    def delete(self, key: bytes) -> None:
        """Remove key; removing a missing key is not an error."""

    @abstractmethod
    def write(self, changes: Sequence[Change]) -> None:
        """Apply changes atomically, in order (value None: delete). Durable on return: a
        persistent backend has synced them to disk, so that a checkpoint or an input offset
        written after this call never runs ahead of the store, even across a power loss."""

    @abstractmethod
    def range(self, start: bytes | None = None,
              end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Items with start <= key < end, ascending."""

    def scan(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Items whose key starts with prefix, ascending."""
        return self.range(prefix or None, _prefix_end(prefix))

    @abstractmethod
    def approximate_count(self) -> int:
        """Number of keys, possibly estimated (for metrics)."""

    @abstractmethod
    def flush(self) -> None:
        """Make completed writes durable, across a power loss too (the engine calls it before
        a checkpoint claims them)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release; idempotent."""


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with prefix (None: no bound)."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return None
