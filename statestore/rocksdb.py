"""The RocksDB backend, on rocksdict in raw (bytes) mode.

One database per store, under ``{state_dir}/{job}/{step}/{partition}/``. All stores of a process
share one block cache, so memory is bounded by configuration however many partitions a worker
owns. Writes go through the write-ahead log to the operating system, so they survive a crash
of the process; :meth:`RocksDBStore.flush` syncs that log, so that everything written before
it survives a power loss too (the engine calls it before a checkpoint claims those writes).
Syncing every write batch instead cost an fsync on the event loop at every commit.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import rocksdict

from statestore.base import Change, Store, StoreClosed, StoreCorrupt, StoreLocked

__all__ = ["RocksDBSettings", "RocksDBStore"]

_COMPRESSION = ("none", "snappy", "lz4", "zstd")


@dataclass(frozen=True, kw_only=True)
class RocksDBSettings:
    """RocksDB tuning; the defaults suit many small per-partition stores on one worker."""

    write_buffer_mb: int = 16  # per store: memtable size before a flush to disk
    max_write_buffers: int = 2
    block_cache_mb: int = 64  # shared by every store of the process
    max_open_files: int = 256  # per store
    compression: str = "lz4"
    bloom_bits_per_key: int = 10  # point lookups skip files that cannot hold the key

    def __post_init__(self) -> None:
        from streamcore.core.errors import ConfigError

        for name in ("write_buffer_mb", "max_write_buffers", "block_cache_mb",
                     "max_open_files", "bloom_bits_per_key"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"rocksdb.{name}", f"must be a positive integer, got {v!r}")
        if self.compression not in _COMPRESSION:
            raise ConfigError("rocksdb.compression",
                              f"must be one of {_COMPRESSION}, got {self.compression!r}")


_cache: Any = None
_cache_lock = threading.Lock()


def _shared_cache(mb: int) -> Any:
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = rocksdict.Cache(mb * 1024 * 1024)
        return _cache


def _options(s: RocksDBSettings) -> rocksdict.Options:
    opt = rocksdict.Options(raw_mode=True)
    opt.create_if_missing(True)
    opt.set_write_buffer_size(s.write_buffer_mb * 1024 * 1024)
    opt.set_max_write_buffer_number(s.max_write_buffers)
    opt.set_max_open_files(s.max_open_files)
    opt.set_compression_type(getattr(rocksdict.DBCompressionType, s.compression)())
    opt.set_keep_log_file_num(2)
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(_shared_cache(s.block_cache_mb))
    table.set_bloom_filter(s.bloom_bits_per_key, False)
    opt.set_block_based_table_factory(table)
    return opt


class RocksDBStore(Store):
    def __init__(self, path: str | Path, settings: RocksDBSettings | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._db: rocksdict.Rdict | None = rocksdict.Rdict(
                str(self.path), _options(settings or RocksDBSettings()))
        except Exception as exc:  # rocksdict raises a bare Exception ("Corruption: ...")
            if "lock" in str(exc).lower():
                raise StoreLocked(f"RocksDB store at {self.path} is in use by another "
                                  f"process: {exc}") from exc
            raise StoreCorrupt(f"cannot open RocksDB store at {self.path}: {exc}") from exc

    @staticmethod
    def wipe(path: str | Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    @property
    def db(self) -> rocksdict.Rdict:
        if self._db is None:
            raise StoreClosed(f"store {self.path} is closed")
        return self._db

    def get(self, key: bytes) -> bytes | None:
        v: bytes | None = self.db.get(key)
        return v

    def put(self, key: bytes, value: bytes) -> None:
        self.db.put(key, value)

    def delete(self, key: bytes) -> None:
        self.db.delete(key)

    def write(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        wb = rocksdict.WriteBatch(raw_mode=True)
        for k, v in changes:
            if v is None:
                wb.delete(k)
            else:
                wb.put(k, v)
        # Not synced: the WAL survives a killed process; flush() makes it survive a power
        # loss, before a checkpoint claims these changes.
        self.db.write(wb)

    def range(self, start: bytes | None = None,
              end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        # The end bound is checked here: rocksdict's ReadOptions upper bound does not work in
        # raw mode (it encodes the bound as a typed key).
        items = cast(Iterator[tuple[bytes, bytes]], (
            self.db.items(from_key=start) if start is not None else self.db.items()))
        for k, v in items:
            if end is not None and k >= end:
                return
            yield k, v

    def approximate_count(self) -> int:
        n = self.db.property_int_value("rocksdb.estimate-num-keys")
        return int(n or 0)

    def flush(self) -> None:
        self.db.flush_wal(True)  # the log synced: no need to write the memtables out

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.flush()
            db.close()
