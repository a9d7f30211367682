"""Global tables: the whole of a compacted topic in a local store on every worker.

``job.table(topic)`` is read completely by every worker, like Kafka Streams' GlobalKTable, so
a stream of any partitioning can look any key up. Before the worker joins its group, the
table is restored to the topic's true end (from per-partition checkpoints when the store
survived); then a thread owned by the table keeps reading new records while the job runs.
The store takes one writer (that thread) and concurrent readers (the partition tasks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connectors.base import Message, PartitionReader, TopicPartition
from connectors.reading import advance_positions, read_to_end
from statestore.base import Store
from statestore.checkpoint import read_checkpoint, write_checkpoint
from statestore.memory import MemoryStore
from statestore.rocksdb import RocksDBSettings
from streamcore.plan.graph import Node
from streamcore.runtime.state import open_store, reopen_empty, write_records

__all__ = ["GlobalTable"]

log = logging.getLogger("streamcore.table")


class GlobalTable:
    def __init__(self, job: str, node: Node, *, partitions: int, state_dir: Path,
                 backend: str, settings: RocksDBSettings,
                 new_reader: Callable[[], PartitionReader]) -> None:
        p = node.params
        self.name: str = p["name"]
        self.topic: str = p["topic"]
        self._kser: Callable[[Any], bytes] = p["key"].serialize
        self._vde: Callable[[bytes], Any] = p["value"].deserialize
        self._new_reader = new_reader
        self._dir: Path = state_dir / job / self.name
        self._path = self._dir / "global"
        self._parts = [(self.topic, i) for i in range(partitions)]
        self._backend = backend
        self._settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.restored = 0
        self.restore_seconds = 0.0
        self.positions: dict[TopicPartition, int] = {}
        self.store: Store = MemoryStore()

    def _checkpoint_path(self, part: int) -> Path:
        return self._dir / f"global-{part}"

    # -- restore (blocking: run it on a worker thread) ----------------------------------
    def restore(self) -> None:
        starts: dict[TopicPartition, int] = {tp: 0 for tp in self._parts}
        if self._backend == "rocksdb":
            store, usable = open_store(self._path, self._settings)
            saved = {tp: read_checkpoint(self._checkpoint_path(tp[1]), *tp)
                     for tp in self._parts} if usable else {}
            if usable and all(v is not None for v in saved.values()):
                starts = {tp: v for tp, v in saved.items() if v is not None}
            else:  # some partition has no valid checkpoint: replay everything onto nothing
                store = reopen_empty(store, self._path, self._settings)
            self.store = store
        t0 = time.perf_counter()
        reader = self._new_reader()
        try:
            self.positions = read_to_end(reader, starts, self._apply)
        finally:
            reader.close()
        self.restore_seconds = time.perf_counter() - t0
        self._checkpoint()
        log.info("table %r restored from %s: %d records in %.2fs", self.name, self.topic,
                 self.restored, self.restore_seconds)

    def _apply(self, msgs: list[Message]) -> None:
        self.restored += write_records(self.store, msgs)

    def _checkpoint(self) -> None:
        if self._backend != "rocksdb":
            return
        for tp, off in self.positions.items():
            write_checkpoint(self._checkpoint_path(tp[1]), tp[0], tp[1], off)

    # -- lookups (event loop thread) -----------------------------------------------------
    def get(self, key: Any) -> Any:
        """The table's current value for key, or None."""
        raw = self.store.get(key if type(key) is bytes else self._kser(key))
        return None if raw is None else self._vde(raw)

    # -- following the topic (its own thread) --------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name=f"sc-table-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        reader = self._new_reader()
        try:
            reader.assign(dict(self.positions))
            last_checkpoint = time.monotonic()
            while not self._stop.is_set():
                msgs = reader.read(5000, 0.2)
                if msgs:
                    self._apply(msgs)
                    advance_positions(self.positions, msgs)
                if time.monotonic() - last_checkpoint > 1.0:
                    self._checkpoint()
                    last_checkpoint = time.monotonic()
        except BaseException as exc:  # the table stays at its last position (see failure)
            self.failure = exc
            log.error("table %r stopped following %s: %s", self.name, self.topic, exc)
        finally:
            reader.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._checkpoint()
        self.store.close()


