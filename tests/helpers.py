"""Helpers shared by the integration tests: topics, producing, reading back, worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from connectors.admin import create_topics
from streamcore import WorkerConfig
from streamcore.core.logs import librdkafka_logger

ROOT = Path(__file__).resolve().parent.parent
_LOG = librdkafka_logger()  # the test clients' librdkafka lines go through logging too


# The local broker holds a new member's join for about half its session timeout, in
# whole seconds (measured: 1 s at 2000 ms and below, 2 s at 2500-4000 ms, 3 s at streamcore's
# default of 6000 ms), and the suite starts well over a hundred workers. So the workers of
# the tests take a 2 s session (heartbeats every 500 ms); a test that pauses the broker or
# blocks a worker's heartbeats past 2 s says so and keeps the default.
QUICK_SESSION_MS = 2000


def worker_config(bootstrap: str, **kw: Any) -> WorkerConfig:
    """An in-process worker's configuration for the tests: any port for HTTP, progress every
    second, a 2 s session (QUICK_SESSION_MS) unless kw's consumer settings name one."""
    consumer = {"session.timeout.ms": QUICK_SESSION_MS, **kw.pop("consumer", {})}
    kw.setdefault("http_port", 0)
    kw.setdefault("progress_interval", "1s")
    return WorkerConfig(bootstrap_servers=bootstrap, consumer=consumer, **kw)


def unique(prefix: str) -> str:
    """A fresh name: tests never share topics or groups (the local broker slows as topics grow)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    """A TCP port nothing listens on now (for a server the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_topics(bootstrap: str, *names: str, partitions: int = 4) -> None:
    create_topics(bootstrap, {n: partitions for n in names})


def produce(bootstrap: str, topic: str, records: Iterable[tuple[Any, Any, int | None]],
            **conf: Any) -> dict[int, int]:
    """Produce (key, value, partition) records; JSON-encodes dict values. Returns the number
    of records per partition."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "logger": _LOG, **conf})
    counts: dict[int, int] = {}
    errors: list[str] = []

    def ack(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            counts[msg.partition()] = counts.get(msg.partition(), 0) + 1

    for key, value, part in records:
        v = orjson.dumps(value) if isinstance(value, dict | list) else value
        k = key.encode() if isinstance(key, str) else key
        kw: dict[str, Any] = {"on_delivery": ack}
        if part is not None:
            kw["partition"] = part
        while True:
            try:
                p.produce(topic, v, k, **kw)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    assert p.flush(30) == 0, "test producer could not flush"
    assert not errors, errors
    return counts


def read_topic(bootstrap: str, topic: str, *, expect: int, partitions: int = 4,
               timeout: float = 60.0, settle: float = 1.0,
               committed_only: bool = False) -> list[Any]:
    """Every message of topic from the start, by manual assignment (no group join), until
    expect messages have arrived and nothing more comes for settle seconds. committed_only:
    as a read_committed consumer (epoch mode's outputs; the local broker still shows aborted
    transactions' records, DESIGN.md section 9)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("verify"), "logger": _LOG,
                  "enable.auto.commit": False, "fetch.wait.max.ms": 100,
                  "isolation.level": "read_committed" if committed_only
                  else "read_uncommitted"})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    quiet_since: float | None = None
    try:
        while time.monotonic() < deadline:
            msgs = c.consume(1000, 0.2)
            for m in msgs:
                assert m.error() is None, m.error()
                out.append(m)
            if len(out) >= expect:
                if msgs:
                    quiet_since = time.monotonic()
                elif quiet_since is not None and time.monotonic() - quiet_since > settle:
                    break
                elif quiet_since is None:
                    quiet_since = time.monotonic()
    finally:
        c.close()
    return out


def latest_per_key(msgs: list[Any]) -> dict[str, Any]:
    """The last value per key (JSON, None for a tombstone) in the order a topic holds them:
    for a table's stream of updates, its final contents."""
    out: dict[str, Any] = {}
    for m in msgs:
        v = m.value()
        out[m.key().decode()] = None if v is None else orjson.loads(v)
    return out


def totals(pairs: Iterable[tuple[str, int]]) -> dict[str, dict[str, int]]:
    """Per key, the count and sum of the numbers: what the count-and-sum test jobs keep."""
    exp: dict[str, dict[str, int]] = {}
    for key, x in pairs:
        e = exp.setdefault(key, {"n": 0, "sum": 0})
        e["n"] += 1
        e["sum"] += x
    return exp


def committed(bootstrap: str, group: str, topic: str, partitions: int = 4) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "logger": _LOG})
    try:
        res = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in res}


def committed_total(bootstrap: str, group: str, topic: str, partitions: int = 4) -> int:
    """The group's committed offsets on topic, summed (partitions without a commit: 0)."""
    return sum(max(0, o) for o in committed(bootstrap, group, topic, partitions).values())


def wait_committed(bootstrap: str, group: str, topic: str, beyond: int,
                   timeout: float = 60.0) -> int:
    """Until the group has committed more than `beyond` records of topic (mid-stream decided
    by progress, not by a fixed sleep); returns the committed total."""
    seen = [0]

    def past() -> bool:
        seen[0] = committed_total(bootstrap, group, topic)
        return seen[0] > beyond

    wait_until(past, timeout, f"{group} to commit more than {beyond} records of {topic}",
               interval=0.25)
    return seen[0]


class PacedProducer:
    """Produces {"seq": n, "p": partition} records at a steady rate on a thread, round-robin
    over partitions, so that records are still arriving while a worker is killed. Records the
    input offset of every seq from the delivery reports."""

    def __init__(self, bootstrap: str, topic: str, *, rate: float, partitions: int = 4,
                 first: int = 0, **conf: Any) -> None:
        self.topic = topic
        self.rate = rate
        self.partitions = partitions
        self.sent = first  # the next seq: those before first were sent some other way
        self.offsets: dict[int, tuple[int, int]] = {}  # seq -> (partition, offset)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "logger": _LOG,
                            **conf})
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ack(self, err: Any, msg: Any) -> None:
        if err is not None:  # an assert here would be lost inside librdkafka's poll
            self.errors.append(str(err))
            return
        seq = orjson.loads(msg.value())["seq"]
        self.offsets[seq] = (msg.partition(), msg.offset())

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while self.sent < due:
                n = self.sent
                p = n % self.partitions
                self._p.produce(self.topic, orjson.dumps({"seq": n, "p": p}), str(p).encode(),
                                partition=p, on_delivery=self._ack)
                self.sent += 1
            self._p.poll(0.005)

    def __enter__(self) -> PacedProducer:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        left = self._p.flush(30)
        assert left == 0 and not self.errors, \
            f"test producer: {left} records not flushed, errors {self.errors[:5]}"
        return self.sent

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.stop()


class WorkerProcess:
    """A `streamcore run` subprocess on a job module in tests/jobs, configured through env."""

    def __init__(self, job_file: str, bootstrap: str, env: dict[str, str],
                 args: list[str] | None = None) -> None:
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{unique('worker')}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamcore.cli", "run", str(ROOT / "tests" / "jobs" /
             job_file), "--bootstrap", bootstrap, "--progress-interval", "1s", *(args or [])],
            env={**os.environ, "STREAMCORE_HTTP_PORT": "0",
                 "SESSION_TIMEOUT_MS": str(QUICK_SESSION_MS), **env}, stdout=self._log,
            stderr=subprocess.STDOUT, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        """The last lines of the log without progress reports, for assertion messages."""
        keep = [ln for ln in self.log().splitlines() if '"progress"' not in ln]
        return "\n".join(keep[-lines:])

    def processed(self) -> int:
        """Records this worker has processed so far, from its progress lines (JSON logs)."""
        total = 0
        for line in self.log().splitlines():
            if '"progress"' in line:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    total += int(orjson.loads(line)["progress"]["rows"])
        return total

    def metric(self, name: str, **labels: str) -> float:
        """metric_value of the worker's /metrics, on the port it logged."""
        port = int(self.log().split("HTTP endpoints on ", 1)[1].split(":", 1)[1].split('"')[0])
        return metric_value(http_get(port, "/metrics")[1].decode(), name, **labels)

    def wait_for(self, text: str, timeout: float = 60.0, *, times: int = 1) -> None:
        """Until text is in the worker's log `times` times (a second assignment, say)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= times:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not {times}x in worker log after {timeout}s:\n"
                             f"{self.tail()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        """The exit code; a worker still running after timeout fails with its log's tail."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout}s:\n"
                                 f"{self.tail(80)}") from None
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@contextmanager
def worker_process(job_file: str, bootstrap: str, env: dict[str, str],
                   args: list[str] | None = None) -> Iterator[WorkerProcess]:
    w = WorkerProcess(job_file, bootstrap, env, args)
    try:
        yield w
    finally:
        w.kill()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of name whose labels include the given ones, in a /metrics text."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} {labels} not exported"
    return total


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a worker's HTTP endpoint (a 503 is an answer, not an error)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(pred: Any, timeout: float, what: str, interval: float = 0.1,
               detail: Callable[[], str] | None = None) -> None:
    """Until pred() is true; on a timeout, detail() (if given) says what was seen instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    seen = f"\n{detail()}" if detail is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{seen}")


def stop_gracefully(w: WorkerProcess, timeout: float = 60.0) -> None:
    w.signal(signal.SIGTERM)
    rc = w.wait(timeout)
    assert rc == 0, f"worker exited {rc}:\n{w.tail()}"
