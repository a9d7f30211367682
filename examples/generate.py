"""Synthetic page views for the compose stack: `python examples/generate.py --rate 500`."""

from __future__ import annotations

import argparse
import random
import signal
import time

import orjson
from confluent_kafka import Producer

from streamcore.core.logs import librdkafka_logger

URLS = ["https://shop.example/cart", "https://shop.example/item/42", "https://shop.example/",
        "https://news.example/sport/today", "https://news.example/tech/ai"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--topic", default="pageviews")
    ap.add_argument("--rate", type=float, default=500.0, help="records per second")
    args = ap.parse_args()
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    p = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 5,
                  "logger": librdkafka_logger()})
    start, sent = time.monotonic(), 0
    while running[0]:
        due = int((time.monotonic() - start) * args.rate)
        while sent < due:
            n = sent
            user = f"bot-{n % 7}" if n % 10 == 0 else f"user-{random.randrange(500)}"
            p.produce(args.topic, orjson.dumps({"user": user, "url": random.choice(URLS),
                                                "ts": int(time.time() * 1000),
                                                "sent": time.time()}), user.encode())
            sent += 1
        p.poll(0.01)
    p.flush(10)


if __name__ == "__main__":
    main()
