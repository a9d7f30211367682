"""What both sides of a benchmark run: the same records, the same transform, the same clients."""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

# Producer and consumer settings shared by the raw loop and streamcore, so that the ratio
# measures the engine and nothing else (the partitioner is streamcore's default, the Java
# client's: librdkafka's own is consistent_random).
PRODUCER_W1: dict[str, Any] = {"linger.ms": 20, "compression.type": "lz4",
                               "enable.idempotence": True, "acks": "all",
                               "partitioner": "murmur2_random"}
PRODUCER_W3: dict[str, Any] = {**PRODUCER_W1, "linger.ms": 0}
CONSUMER_W1: dict[str, Any] = {"fetch.queue.backoff.ms": 1, "fetch.wait.max.ms": 100}
CONSUMER_W3: dict[str, Any] = {"fetch.queue.backoff.ms": 1, "fetch.wait.max.ms": 5}


def settings(mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(producer, consumer) settings for a run: BENCH_SETTINGS=equal (the default) gives both
    sides the same tuned settings, so that the ratio measures the engine alone;
    BENCH_SETTINGS=defaults measures what users meet: the raw loop as a user would write it
    (librdkafka's defaults: no compression, no idempotence) against streamcore with its own
    defaults (lz4, idempotence, acks=all)."""
    if os.environ.get("BENCH_SETTINGS", "equal") == "defaults":
        return {}, {}
    if mode == "w3":
        return PRODUCER_W3, CONSUMER_W3
    return PRODUCER_W1, CONSUMER_W1


# The aiokafka runs (--client aiokafka): the same on both sides, as close to the above as
# aiokafka goes on the local broker (no idempotence: DESIGN.md section 9; no lz4 package).
AIO_PRODUCER_W1: dict[str, Any] = {"linger_ms": 20, "acks": "all"}
AIO_CONSUMER_W1: dict[str, Any] = {"fetch_max_wait_ms": 100}


def aio_settings(mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """aiokafka keyword arguments of a run, for the raw aiokafka loop."""
    linger = 0 if mode == "w3" else 20
    return ({**AIO_PRODUCER_W1, "linger_ms": linger},
            {"fetch_max_wait_ms": 5 if mode == "w3" else 100})


def streamcore_aio_settings(mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same settings for streamcore's aiokafka backend, by their librdkafka names."""
    producer, consumer = aio_settings(mode)
    return ({"linger.ms": producer["linger_ms"], "acks": "all"},
            {"fetch.wait.max.ms": consumer["fetch_max_wait_ms"]})


def input_partition(user: int, partitions: int) -> int:
    """The input partition of user ``user``'s records: by key, but by a rule of the bench's
    own, which no producer's partitioner follows. Input written with one side's partitioner
    would send each input partition's outputs of that side to a single output partition
    (its keys hash there again) and the other side's to all of them; the first side's
    producer then sends batches several times larger (3.3x in W1: 5,800 against 1,740
    records per request, librdkafka's statistics) and spends half the CPU per record in its
    broker thread. With this rule both sides spread their outputs alike."""
    return user % partitions


def record(i: int) -> bytes:
    """About 100 bytes of JSON; one in ten is a bot that the filter drops."""
    return orjson.dumps({"id": i, "user": f"u{i % 5000}", "kind": "bot" if i % 10 == 0
                         else "click", "price": 12.5, "qty": i % 7, "ts": 1_700_000_000_000,
                         "sent": time.time()})


def keep(v: dict[str, Any]) -> bool:
    return bool(v["kind"] != "bot")


def enrich(v: dict[str, Any]) -> dict[str, Any]:
    v["total"] = v["price"] * v["qty"]
    v["tier"] = "big" if v["total"] > 40 else "small"
    return v


def add_order(agg: dict[str, Any], v: dict[str, Any]) -> dict[str, Any]:
    agg["count"] += 1
    agg["sum"] += v["price"] * v["qty"]
    return agg
