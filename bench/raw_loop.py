"""The baseline: the plain confluent-kafka consume -> transform -> produce loop.

    python -m bench.raw_loop IN OUT GROUP w1|w3
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer

from bench.workload import enrich, keep, settings
from streamcore.core.logs import librdkafka_logger

# librdkafka's lines go through a rate-limited logger, not raw to stderr, as in streamcore.
LOG = librdkafka_logger()


def main() -> None:
    src, out, group, mode = sys.argv[1:5]
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    producer, consumer = settings(mode)
    c = Consumer({"bootstrap.servers": sys.argv[5], "group.id": group, "logger": LOG,
                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                  "heartbeat.interval.ms": 500, **consumer})
    p = Producer({"bootstrap.servers": sys.argv[5], "logger": LOG, **producer})

    def on_assign(_c: Any, parts: Any) -> None:
        print("assigned", len(parts), flush=True)

    c.subscribe([src], on_assign=on_assign)
    loads, dumps, produce = orjson.loads, orjson.dumps, p.produce
    while running[0]:
        # The low-latency way to read a batch: poll() returns at the first message, then
        # consume(n, 0) takes what is already fetched (consume(n, t) waits for n or t).
        first = c.poll(0.1)
        if first is None:
            continue
        for m in [first, *c.consume(999, 0)]:
            if m.error():
                continue
            v = loads(m.value() or b"{}")
            if not keep(v):
                continue
            v = enrich(v)
            while True:
                try:
                    produce(out, dumps(v), m.key())
                    break
                except BufferError:
                    p.poll(0.05)
        p.poll(0)
    p.flush(30)
    c.close()


if __name__ == "__main__":
    main()
