"""Broker restart with durable storage: the local broker on its s3 storage engine against a
local moto_server (DESIGN.md section 9), stopped and started again while records flow into a
stateful job.

What it breaks: every connection of the worker, its group membership and its in-flight
produce requests and commits, for a few seconds. What it counts: records lost (none may be)
and updates applied twice (reported). Over three runs here the counts were exact twice and
one update was applied twice once: a produce in flight when the broker stops is retried, and
this broker does not keep the idempotent producer's sequence state across a restart (likely
the cause; Kafka does keep it), so exactness is reported, not asserted.

Opt-in (STREAMCORE_TEST_BROKER_RESTART=1), not part of `make test`, because this broker
breaks the guarantee under test:
- Lost updates (2 runs of 13: 25 and 6 updates): the broker acknowledges records
  and does not keep them across a restart of its s3 engine. With raw clients only (an
  idempotent confluent-kafka producer at 100 records/s, broker restarted for 3 s), the
  record with seq 898 was acknowledged and then missing from the topic in 2 of 3 attempts.
  In the engine's runs the input offsets were committed (the outputs were acknowledged)
  while the repartition topic lacked those records (e.g. seqs 659-703 of one partition),
  so the engine's commit-after-acknowledgement invariant held.
- A stall (2 runs of 13): the worker's reader stopped fetching a few seconds after the
  restart. Not explained yet; possibly the same storage defect (offsets the broker no
  longer has), possibly the reader's recovery.
Still to do (DESIGN.md section 9): the same test for a real Kafka that can be restarted, and
a test here of the strongest property this broker allows.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamcore import broker
from tests.helpers import (
    PacedProducer,
    latest_per_key,
    make_topics,
    read_topic,
    stop_gracefully,
    totals,
    unique,
    wait_until,
    worker_process,
)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server with the broker's bucket, and the environment the broker needs."""
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        pytest.skip("moto_server is not installed (the dev extra brings moto[server])")
    port = _free_port()
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(moto), "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def bucket_created() -> bool:
        try:
            req = urllib.request.Request(f"{url}/tansu", method="PUT")
            with urllib.request.urlopen(req, timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False
    try:
        wait_until(bucket_created, 30, "moto_server")
        yield {"AWS_ENDPOINT": url, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.mark.skipif(os.environ.get("STREAMCORE_TEST_BROKER_RESTART") != "1",
                    reason="opt-in: the local broker's s3 engine loses acknowledged records "
                    "across a restart, and a reader stall is unexplained (module docstring)")
def test_broker_restart_mid_flow_loses_nothing(s3_env: dict[str, str], tmp_path: Path,
                                               local_broker: object) -> None:
    if os.environ.get("STREAMCORE_TEST_BOOTSTRAP"):
        pytest.skip("restarts the local broker")
    run_dir = tmp_path / "broker"
    info = broker.start(run_dir, storage="s3://tansu/", env=s3_env)
    bootstrap = info.bootstrap
    try:
        src, out, name = unique("br-in"), unique("br-out"), unique("br")
        make_topics(bootstrap, src, out)
        # Every fetch of the s3 engine reads moto: frequent short fetches of eight partitions
        # starve it (DESIGN.md section 9), so the worker waits longer per fetch.
        env = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_STATE_DIR": str(tmp_path / "s"),
               "FETCH_WAIT_MS": "250"}
        # Requests in flight when the broker stops are answered by no one: retry them soon.
        # The s3 engine writes every batch to moto: keep the load modest.
        with PacedProducer(bootstrap, src, rate=100, **{"request.timeout.ms": 5000}) \
                as producer, \
                worker_process("stateful.py", bootstrap, env) as w:
            w.wait_for("assigned")
            wait_until(lambda: producer.sent > 400, 30, "records flowing")
            broker.stop(run_dir)  # SIGTERM: the broker goes away mid-flow
            time.sleep(3)
            restarted = broker.start(run_dir, port=info.port, storage="s3://tansu/",
                                     env=s3_env)
            assert restarted.port == info.port
            at_restart = producer.sent
            wait_until(lambda: producer.sent > at_restart + 400, 60, "records after restart")
            total = producer.stop()
            final = latest_per_key(read_topic(bootstrap, out, expect=total, timeout=120,
                                              settle=3.0))
            assert w.proc.poll() is None, f"the worker exited:\n{w.tail()}"
            stop_gracefully(w)
        expected = totals((f"k{seq % 20}", seq) for seq in range(total))
        assert final.keys() == expected.keys()
        lost = {k: (final[k], e) for k, e in expected.items()
                if final[k]["n"] < e["n"] or final[k]["sum"] < e["sum"]}
        twice = sum(final[k]["n"] - e["n"] for k, e in expected.items())
        print(f"broker restart: {total} records, 0 lost, {twice} updates applied twice")
        assert not lost, f"updates lost: {lost}"
    finally:
        broker.stop(run_dir)
