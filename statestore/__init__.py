"""State backends for keyed state (DESIGN.md section 5).

:class:`~statestore.base.Store` is the contract; :class:`~statestore.rocksdb.RocksDBStore` and
:class:`~statestore.memory.MemoryStore` implement it. :class:`~statestore.cache.StateCache` is
the write-back cache the engine puts in front of a store, and :mod:`statestore.checkpoint`
reads and writes the changelog offset a store reflects. This package imports neither the
engine nor a Kafka client: the changelog writer is handed in.
"""
