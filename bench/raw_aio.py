"""The aiokafka baseline: the plain aiokafka consume -> transform -> produce loop, as a user
would write it (send() per record, awaiting the futures once per batch).

    python -m bench.raw_aio IN OUT GROUP w1|w3 BOOTSTRAP
"""

from __future__ import annotations

import asyncio
import signal
import sys

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import ConsumerRebalanceListener

from bench.workload import aio_settings, enrich, keep


class _Announce(ConsumerRebalanceListener):  # type: ignore[misc]
    async def on_partitions_revoked(self, revoked: object) -> None:
        pass

    async def on_partitions_assigned(self, assigned: object) -> None:
        print("assigned", len(assigned), flush=True)  # type: ignore[arg-type]


async def main() -> None:
    src, out, group, mode, bootstrap = sys.argv[1:6]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    producer_cfg, consumer_cfg = aio_settings(mode)
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                         auto_offset_reset="earliest", session_timeout_ms=6000,
                         heartbeat_interval_ms=500, **consumer_cfg)
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, **producer_cfg)
    await c.start()
    await p.start()
    c.subscribe([src], listener=_Announce())
    loads, dumps = orjson.loads, orjson.dumps
    try:
        while not stop.is_set():
            batches = await c.getmany(timeout_ms=100, max_records=1000)
            sent = []
            for records in batches.values():
                for m in records:
                    v = loads(m.value or b"{}")
                    if not keep(v):
                        continue
                    sent.append(await p.send(out, dumps(enrich(v)), m.key))
            if sent:
                await asyncio.gather(*sent)
    finally:
        await p.stop()
        await c.stop()


if __name__ == "__main__":
    asyncio.run(main())
