"""The Store contract (statestore/base.py), run against every backend, and the cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statestore.base import Store, StoreClosed, StoreCorrupt
from statestore.cache import StateCache
from statestore.checkpoint import read_checkpoint, write_checkpoint
from statestore.memory import MemoryStore
from statestore.rocksdb import RocksDBSettings, RocksDBStore

Opener = Callable[[], Store]


@pytest.fixture(params=["memory", "rocksdb"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    path = tmp_path / "store"
    if request.param == "memory":
        data: dict[bytes, bytes] = {}  # outlives each store: reopening sees the contents
        return lambda: MemoryStore(data)
    return lambda: RocksDBStore(path)


def test_get_put_delete(opener: Opener) -> None:
    s = opener()
    assert s.get(b"k") is None
    s.put(b"k", b"v1")
    s.put(b"k", b"v2")
    assert s.get(b"k") == b"v2"
    s.delete(b"k")
    s.delete(b"never-there")
    assert s.get(b"k") is None
    s.close()


def test_scans_are_in_bytewise_key_order(opener: Opener) -> None:
    s = opener()
    keys = [b"b", b"a\xff", b"a", b"\x00", b"ab", b"a\x00", b"c"]
    for k in keys:
        s.put(k, k + b"!")
    assert [k for k, _ in s.range()] == sorted(keys)
    assert [k for k, _ in s.scan(b"a")] == [b"a", b"a\x00", b"ab", b"a\xff"]
    assert [k for k, _ in s.range(b"a\x00", b"a\xff")] == [b"a\x00", b"ab"]
    assert dict(s.scan(b"a"))[b"ab"] == b"ab!"
    assert list(s.scan(b"zz")) == []
    s.close()


def test_prefix_scan_with_0xff_prefix(opener: Opener) -> None:
    s = opener()
    for k in (b"\xff", b"\xff\x01", b"\xfe"):
        s.put(k, b"1")
    assert [k for k, _ in s.scan(b"\xff")] == [b"\xff", b"\xff\x01"]
    s.close()


def test_write_batch_applies_in_order_and_is_idempotent(opener: Opener) -> None:
    s = opener()
    s.put(b"gone", b"x")
    changes = [(b"a", b"1"), (b"a", b"2"), (b"gone", None), (b"b", b"3"), (b"b", None)]
    s.write(changes)
    s.write(changes)
    assert dict(s.range()) == {b"a": b"2"}
    s.close()


def test_reopen_after_close_keeps_contents(opener: Opener) -> None:
    s = opener()
    s.write([(b"k%d" % i, b"v%d" % i) for i in range(100)])
    s.delete(b"k5")
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreClosed):
        s.get(b"k1")
    s2 = opener()
    assert s2.get(b"k1") == b"v1" and s2.get(b"k5") is None
    assert len(list(s2.range())) == 99
    s2.close()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=4), st.one_of(st.none(), st.binary(max_size=3))),
                max_size=40))
def test_backends_agree_with_a_dict(tmp_path_factory: pytest.TempPathFactory,
                                   ops: list[tuple[bytes, bytes | None]]) -> None:
    path = tmp_path_factory.mktemp("p")
    model: dict[bytes, bytes] = {}
    stores = [MemoryStore(), RocksDBStore(path / "r")]
    for s in stores:
        s.write(ops)
    for k, v in ops:
        if v is None:
            model.pop(k, None)
        else:
            model[k] = v
    for s in stores:
        assert list(s.range()) == sorted(model.items())
        s.close()


def test_corrupt_rocksdb_store_is_reported(tmp_path: Path) -> None:
    s = RocksDBStore(tmp_path / "db")
    s.put(b"k", b"v")
    s.close()
    (tmp_path / "db" / "CURRENT").write_text("garbage\n")
    with pytest.raises(StoreCorrupt, match="cannot open RocksDB store"):
        RocksDBStore(tmp_path / "db")
    RocksDBStore.wipe(tmp_path / "db")
    assert RocksDBStore(tmp_path / "db").get(b"k") is None


def test_checkpoint_roundtrip_and_invalid_files(tmp_path: Path) -> None:
    d = tmp_path / "0"
    assert read_checkpoint(d, "t", 0) is None
    write_checkpoint(d, "t", 0, 42)
    assert read_checkpoint(d, "t", 0) == 42
    assert read_checkpoint(d, "t", 1) is None  # another changelog partition
    (tmp_path / "0.checkpoint").write_text("{not json")
    assert read_checkpoint(d, "t", 0) is None


def test_cache_writes_each_dirty_key_once_per_flush(tmp_path: Path) -> None:
    import orjson

    store = RocksDBStore(tmp_path / "db")
    cache = StateCache(store, orjson.dumps, orjson.loads, max_entries=2)
    for i in range(5):
        cache.put(b"a", i)
    cache.put(b"b", {"x": 1})
    cache.delete(b"c")
    assert store.get(b"a") is None  # nothing reaches the store before a flush
    logged: list[tuple[bytes, bytes | None]] = []
    assert cache.flush(lambda k, v: logged.append((k, v))) == 3
    assert sorted(logged, key=lambda kv: kv[0]) == [(b"a", b"4"), (b"b", b'{"x":1}'),
                                                    (b"c", None)]
    assert store.get(b"a") == b"4" and cache.get(b"b") == {"x": 1}
    assert cache.flush(lambda k, v: logged.append((k, v))) == 0  # nothing dirty
    store.put(b"z", b"7")
    assert cache.get(b"z") == 7
    store.close()


def test_cache_put_last_reaches_the_changelog_after_everything_written_before_it() -> None:
    import orjson

    cache = StateCache(MemoryStore(), orjson.dumps, orjson.loads)
    cache.put(b"summary", 0)
    for k in (b"z", b"a", b"m"):
        cache.put(k, 1)
    cache.put_last(b"summary", 1)  # written first, but summarizes z, a and m
    cache.put(b"a", 2)  # already dirty: keeps its place, before the summary
    cache.put(b"later", 1)
    logged: list[bytes] = []
    cache.flush(lambda k, v: logged.append(k))
    assert logged == [b"z", b"a", b"m", b"summary", b"later"]


def test_cache_update_reads_writes_and_deletes_in_one_call(tmp_path: Path) -> None:
    import orjson

    store = RocksDBStore(tmp_path / "db")
    store.put(b"a", b"5")
    cache = StateCache(store, orjson.dumps, orjson.loads)
    assert cache.update(b"a", lambda old, v: old + v, 2) == 7  # read from the store
    assert cache.update(b"n", lambda old, v: (old or 0) + v, 1) == 1  # no such key: None
    assert cache.update(b"a", lambda old, v: None, 0) is None  # None deletes

    def boom(old: Any, v: Any) -> Any:
        raise ValueError("bad record")

    with pytest.raises(ValueError):
        cache.update(b"n", boom, 1)
    assert cache.get(b"n") == 1 and cache.dirty == 2  # a raising update changes nothing
    logged: list[tuple[bytes, bytes | None]] = []
    cache.flush(lambda k, v: logged.append((k, v)))
    assert logged == [(b"a", None), (b"n", b"1")]
    assert store.get(b"a") is None and store.get(b"n") == b"1"
    store.close()


def test_cache_live_keys_of_a_prefix_include_unflushed_writes(tmp_path: Path) -> None:
    import orjson

    store = RocksDBStore(tmp_path / "db")
    cache = StateCache(store, orjson.dumps, orjson.loads)
    for k in (b"a1", b"t1", b"t2", b"t3", b"w1"):
        store.put(k, b"1")
    cache.put(b"t4", 1)  # unflushed: live
    cache.delete(b"t2")  # unflushed delete: gone
    cache.put(b"w2", 1)  # another prefix
    assert cache.live_keys(b"t") == [b"t1", b"t3", b"t4"]
    assert cache.live_keys() == [b"a1", b"t1", b"t3", b"t4", b"w1", b"w2"]
    store.close()


def test_cache_taken_changes_stay_readable_until_written(tmp_path: Path) -> None:
    import orjson

    store = RocksDBStore(tmp_path / "db")
    cache = StateCache(store, orjson.dumps, orjson.loads, max_entries=1)
    store.put(b"t1", b"1")
    cache.put(b"t2", 2)
    cache.delete(b"t1")
    changes = cache.take()
    assert changes == [(b"t2", b"2"), (b"t1", None)] and cache.dirty == 0
    cache.put(b"t3", 3)  # a write after the take: dirty, for the next flush
    assert cache.live_keys(b"t") == [b"t2", b"t3"] and cache.get(b"t2") == 2
    assert store.get(b"t2") is None  # not written yet
    sent: list[tuple[bytes, bytes | None]] = []
    cache.write_taken(changes, lambda k, v: sent.append((k, v)))
    assert sent == changes and store.get(b"t2") == b"2" and store.get(b"t1") is None
    assert cache.dirty == 1  # t3
    store.close()


def test_cache_keeps_the_most_recently_used_entries_after_a_flush(tmp_path: Path) -> None:
    """Before: past max_entries every entry was dropped at once, hot keys included, so each
    was read from RocksDB and decoded again after every commit."""
    import orjson

    store = RocksDBStore(tmp_path / "db")
    reads: list[bytes] = []
    get = store.get

    def counting_get(key: bytes) -> bytes | None:
        reads.append(key)
        return get(key)

    store.get = counting_get  # type: ignore[method-assign]
    cache = StateCache(store, orjson.dumps, orjson.loads, max_entries=3)
    for k in (b"a", b"b", b"c", b"d", b"e"):
        cache.put(k, 1)
    cache.get(b"a")  # a is hot again: b is now the least recently used
    cache.flush(lambda k, v: None)
    reads.clear()
    assert [cache.get(k) for k in (b"a", b"d", b"e")] == [1, 1, 1]
    assert reads == [], "recently used entries were evicted"
    assert cache.get(b"b") == 1 and reads == [b"b"]  # evicted: read back from the store
    store.close()


def test_rocksdb_flush_syncs_what_was_written_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a checkpoint claims must be on the disk first (power loss): flush() syncs the
    write-ahead log; a write batch alone does not (an fsync per commit on the event loop).
    RocksDB's own statistics count the syncs."""
    import statestore.rocksdb as rdb

    def with_statistics(s: RocksDBSettings) -> Any:
        opt = options(s)
        opt.enable_statistics()
        return opt
    options = rdb._options
    monkeypatch.setattr(rdb, "_options", with_statistics)

    def syncs() -> int:
        stats = store.db.property_value("rocksdb.options-statistics") or ""
        line = next(ln for ln in stats.splitlines() if ln.startswith("rocksdb.wal.synced "))
        return int(line.rsplit(":", 1)[1])
    store = RocksDBStore(tmp_path / "s")
    try:
        store.write([(b"k", b"v"), (b"gone", None)])
        assert syncs() == 0
        store.flush()
        assert syncs() == 1
        assert store.get(b"k") == b"v"
    finally:
        store.close()


def test_a_running_store_is_checkpointed_every_so_many_changelog_records(
        tmp_path: Path) -> None:
    import orjson

    from connectors.memory import MemoryCluster, MemoryProducer, MemoryReader
    from statestore.checkpoint import read_checkpoint
    from streamcore.runtime.state import CHECKPOINT_EVERY, PartitionStores

    cluster = MemoryCluster(clock_ms=lambda: 0, default_partitions=1)
    cluster.create_topic("cl")
    producer = MemoryProducer(cluster)
    stores = PartitionStores("j", 0, state_dir=tmp_path, backend="rocksdb",
                             settings=RocksDBSettings(), cache_entries=100)
    cache = stores.open("step", "cl", orjson.dumps, orjson.loads)
    stores.restore(lambda: MemoryReader(cluster), lambda: False)
    path = stores.slots[0].path
    assert read_checkpoint(path, "cl", 0) == 0  # at the end of the restore

    def commit(keys: range) -> int:
        for i in keys:
            cache.put(b"k%d" % i, i)
        stores.flush(keys[-1], producer)
        producer.poll(0)
        assert stores.settle()
        return read_checkpoint(path, "cl", 0) or 0

    assert commit(range(100)) == 0  # 100 changelog records: not yet
    assert commit(range(100, CHECKPOINT_EVERY)) == CHECKPOINT_EVERY  # now
    assert commit(range(CHECKPOINT_EVERY, CHECKPOINT_EVERY + 5)) == CHECKPOINT_EVERY
    stores.close()  # a closing store is checkpointed at its end
    assert read_checkpoint(path, "cl", 0) == CHECKPOINT_EVERY + 5
