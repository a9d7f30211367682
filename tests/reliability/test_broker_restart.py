"""Broker restart with durable storage: the broker is stopped and started again while a
stateful job runs; the worker must reconnect by itself and lose nothing.

What it breaks: every connection of the worker, its group membership and its in-flight
produce requests and commits, for a few seconds. What it counts: records lost (none may be)
and updates applied twice (reported: at-least-once allows them).

Three tests (DESIGN.md section 9):
- `test_kafka_restart_mid_flow_loses_nothing`: the guarantee itself, the broker restarted
  while records flow. Written for a real Kafka that the test can restart
  (STREAMCORE_TEST_BOOTSTRAP and STREAMCORE_TEST_BROKER_RESTART_CMD, e.g.
  `docker compose -f docker/compose.yaml restart kafka`); skipped otherwise, because the
  local broker breaks it: its s3 engine acknowledges records and does not keep them across a
  restart. With raw clients only (an idempotent confluent-kafka producer at 100 records/s,
  broker restarted for 3 s), the record with seq 898 was acknowledged and then missing from
  the topic in 2 of 3 attempts. Run against the local broker mid-flow
  (STREAMCORE_TEST_BROKER_RESTART=1), 13 runs gave: 9 exact; 2 with lost updates (25 and 6),
  where the input offsets were committed after the outputs were acknowledged while the
  repartition topic lacked those records (e.g. seqs 659-703 of one partition), so the
  engine's commit-after-acknowledgement invariant held; and 2 where the worker's reader
  stopped fetching a few seconds after the restart, not explained yet (possibly offsets the
  broker no longer has after losing records).
- `test_local_broker_restart_at_rest_loses_nothing`: the strongest property the local
  broker allows, run by `make test`: the broker restarted on its s3 engine while nothing is
  in flight (every record processed and its offset committed); the same worker process
  reconnects, rejoins, resumes from its committed offsets with its state, and the counts of
  the records produced before and after the restart are exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamcore import broker
from tests.helpers import (
    PacedProducer,
    committed,
    free_port,
    latest_per_key,
    make_topics,
    produce,
    read_topic,
    stop_gracefully,
    totals,
    unique,
    wait_until,
    worker_process,
)

pytestmark = pytest.mark.slow



@pytest.fixture
def s3_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server with the broker's bucket, and the environment the broker needs."""
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        pytest.skip("moto_server is not installed (the dev extra brings moto[server])")
    port = free_port()
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


class _S3Broker:
    """A local broker of its own on the s3 storage engine, restartable on its port."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir, self.env = run_dir, env
        self.info = broker.start(run_dir, storage="s3://tansu/", env=env)
        self.bootstrap = self.info.bootstrap

    def restart(self) -> None:
        broker.stop(self.run_dir)  # SIGTERM: the broker goes away
        time.sleep(3)
        again = broker.start(self.run_dir, port=self.info.port, storage="s3://tansu/",
                             env=self.env)
        assert again.port == self.info.port


@pytest.fixture
def s3_broker(s3_env: dict[str, str], tmp_path: Path,
              local_broker: object) -> Iterator[_S3Broker]:
    if os.environ.get("STREAMCORE_TEST_BOOTSTRAP"):
        pytest.skip("restarts the local broker")
    b = _S3Broker(tmp_path / "broker", s3_env)
    try:
        yield b
    finally:
        broker.stop(b.run_dir)


def _check_counts(final: dict[str, Any], total: int) -> int:
    """Asserts that no update of seqs 0..total-1 is missing; returns how many were applied
    twice."""
    expected = totals((f"k{seq % 20}", seq) for seq in range(total))
    assert final.keys() == expected.keys()
    lost = {k: (final[k], e) for k, e in expected.items()
            if final[k]["n"] < e["n"] or final[k]["sum"] < e["sum"]}
    assert not lost, f"updates lost: {lost}"
    return sum(final[k]["n"] - e["n"] for k, e in expected.items())


def _restart_mid_flow(bootstrap: str, restart: Callable[[], None], env: dict[str, str]) -> None:
    src, out, name = unique("br-in"), unique("br-out"), unique("br")
    make_topics(bootstrap, src, out)
    env = {"IN": src, "OUT": out, "JOB": name, **env}
    # Requests in flight when the broker stops are answered by no one: retry them soon.
    with PacedProducer(bootstrap, src, rate=100, **{"request.timeout.ms": 5000}) as producer, \
            worker_process("stateful.py", bootstrap, env) as w:
        w.wait_for("assigned")
        wait_until(lambda: producer.sent > 400, 30, "records flowing")
        restart()
        at_restart = producer.sent
        wait_until(lambda: producer.sent > at_restart + 400, 60, "records after restart")
        total = producer.stop()
        final = latest_per_key(read_topic(bootstrap, out, expect=total, timeout=120,
                                          settle=3.0))
        assert w.proc.poll() is None, f"the worker exited:\n{w.tail()}"
        stop_gracefully(w)
    twice = _check_counts(final, total)
    print(f"broker restart mid-flow: {total} records, 0 lost, {twice} updates applied twice")


@pytest.mark.skipif(not (os.environ.get("STREAMCORE_TEST_BOOTSTRAP")
                         and os.environ.get("STREAMCORE_TEST_BROKER_RESTART_CMD")),
                    reason="needs a real Kafka the test can restart (STREAMCORE_TEST_BOOTSTRAP, "
                    "STREAMCORE_TEST_BROKER_RESTART_CMD): the local broker's s3 engine loses "
                    "acknowledged records across a restart (module docstring)")
def test_kafka_restart_mid_flow_loses_nothing(tmp_path: Path) -> None:
    bootstrap = os.environ["STREAMCORE_TEST_BOOTSTRAP"]
    command = os.environ["STREAMCORE_TEST_BROKER_RESTART_CMD"]

    def restart() -> None:
        subprocess.run(command, shell=True, check=True)

    _restart_mid_flow(bootstrap, restart, {"STREAMCORE_STATE_DIR": str(tmp_path / "s")})


@pytest.mark.skipif(os.environ.get("STREAMCORE_TEST_BROKER_RESTART") != "1",
                    reason="opt-in on the local broker: its s3 engine loses acknowledged "
                    "records across a restart (module docstring)")
def test_local_broker_restart_mid_flow(s3_broker: _S3Broker, tmp_path: Path) -> None:
    # Every fetch of the s3 engine reads moto: frequent short fetches of four partitions
    # starve it (DESIGN.md section 9), so the worker waits longer per fetch.
    _restart_mid_flow(s3_broker.bootstrap, s3_broker.restart,
                      {"STREAMCORE_STATE_DIR": str(tmp_path / "s"), "FETCH_WAIT_MS": "250"})


def _produce_seqs(bootstrap: str, topic: str, seqs: range) -> None:
    produce(bootstrap, topic, ((str(n % 4), {"seq": n}, n % 4) for n in seqs))


def test_local_broker_restart_at_rest_loses_nothing(s3_broker: _S3Broker,
                                                    tmp_path: Path) -> None:
    bootstrap = s3_broker.bootstrap
    src, out, name = unique("br-in"), unique("br-out"), unique("br")
    make_topics(bootstrap, src, out)
    env = {"IN": src, "OUT": out, "JOB": name, "STREAMCORE_STATE_DIR": str(tmp_path / "s"),
           "FETCH_WAIT_MS": "250"}
    with worker_process("stateful.py", bootstrap, env) as w:
        w.wait_for("assigned")
        _produce_seqs(bootstrap, src, range(400))
        read_topic(bootstrap, out, expect=400, timeout=60)
        # At rest: every input offset committed, so nothing is in flight at the stop.
        wait_until(lambda: sum(committed(bootstrap, name, src).values()) == 400, 30,
                   "offsets committed before the restart")
        s3_broker.restart()
        _produce_seqs(bootstrap, src, range(400, 800))
        final = latest_per_key(read_topic(bootstrap, out, expect=800, timeout=120,
                                          settle=3.0))
        assert w.proc.poll() is None, f"the worker exited:\n{w.tail()}"
        stop_gracefully(w)
    twice = _check_counts(final, 800)
    # Nothing was in flight at the stop, so nothing may be applied twice either.
    assert twice == 0, f"{twice} updates applied twice"
    assert committed(bootstrap, name, src) == {p: 200 for p in range(4)}
