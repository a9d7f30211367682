"""Who holds a transactional id, so that a fenced worker can name the worker that fenced it.

Kafka tells a fenced producer only that it was fenced. So before an epoch-mode worker
registers its transactional id (``init_transactions``, which fences the previous holder) it
announces itself in a small compacted topic, keyed by the transactional id: host, pid,
group, start time and a per-process instance id. A worker stopped by ``ProducerFenced``
reads the latest announcement of its id and names that worker in the error.

Best effort: a broker that refuses the topic or the record costs the name, never the
worker (a warning says so). Blocking: the worker calls these on an executor thread.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from connectors.base import ClientBackend, Message
from connectors.reading import read_to_end
from streamcore.core.errors import ProducerFenced

__all__ = ["OWNERS_TOPIC", "Identity", "announce", "holder", "identity", "name_the_fencer"]

log = logging.getLogger("streamcore.epochs")

OWNERS_TOPIC = "streamcore-transactional-owners"
_WAIT_S = 10.0

Identity = dict[str, Any]


def identity(group: str) -> Identity:
    """This process, as another worker will read it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "group": group,
            "instance": uuid.uuid4().hex,
            "started": datetime.now(UTC).isoformat(timespec="seconds")}


def announce(clients: ClientBackend, transactional_id: str, me: Identity) -> None:
    """Write me as the holder of transactional_id, and wait for the acknowledgement (so
    that it is there before the previous holder is fenced)."""
    if clients.in_process:
        return
    failed: list[Any] = []
    try:
        clients.create_topics({OWNERS_TOPIC: 1}, {"cleanup.policy": "compact"})
        producer = clients.producer()
        try:
            producer.produce(OWNERS_TOPIC, orjson.dumps(me), transactional_id.encode(), 0,
                             lambda err, _msg: failed.append(err) if err else None, None,
                             int(time.time() * 1000), None)
            deadline = time.monotonic() + _WAIT_S
            while producer.in_flight() and time.monotonic() < deadline:
                producer.poll(0.05)
            if producer.in_flight() or failed:
                raise RuntimeError(failed[0] if failed else "no acknowledgement")
        finally:
            producer.close()
    except Exception as exc:  # naming the fencer is a courtesy, never a reason to stop
        log.warning("could not announce this worker as the holder of transactional id %r "
                    "in %s (a worker it fences will not know who did): %s",
                    transactional_id, OWNERS_TOPIC, exc)


def holder(clients: ClientBackend, transactional_id: str) -> Identity | None:
    """The latest worker announced for transactional_id, if any."""
    key = transactional_id.encode()
    latest: list[Identity] = []

    def apply(msgs: list[Message]) -> None:
        for m in msgs:
            value = m.value()
            if m.key() == key and value:
                latest[:] = [orjson.loads(value)]

    reader = clients.reader()
    try:
        read_to_end(reader, {(OWNERS_TOPIC, 0): 0}, apply)
    finally:
        reader.close()
    return latest[0] if latest else None


def name_the_fencer(exc: ProducerFenced, clients: ClientBackend, transactional_id: str,
                    me: Identity) -> ProducerFenced:
    """exc, with the worker that holds transactional_id now named (when it announced
    itself)."""
    if clients.in_process:
        return exc
    try:
        other = holder(clients, transactional_id)
    except Exception as err:
        return ProducerFenced(f"{exc}. The other worker is unknown: {OWNERS_TOPIC} could "
                              f"not be read ({err})")
    if other is None or other.get("instance") == me["instance"]:
        return ProducerFenced(f"{exc}. The other worker did not announce itself in "
                              f"{OWNERS_TOPIC}")
    return ProducerFenced(
        f"{exc}. The other worker: pid {other.get('pid')} on host {other.get('host')!r}, "
        f"group {other.get('group')!r}, started {other.get('started')}")
