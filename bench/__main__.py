"""`make bench`: W1 (stateless throughput), W2 (keyed aggregate in RocksDB with changelog, and
restore), W3 (end-to-end latency); the raw loop against streamcore.

Each run gets a freshly started local broker (it slows down as it fills, DESIGN.md section 9)
and runs the system under test as its own process; this process produces the input and
measures the output with an independent consumer. Ratios compare runs of the same invocation.

    python -m bench [--w1-records 500000] [--repeat 2] [--only w1|w2|w2win|w3]
                    [--client aiokafka] [--epochs]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from bench import profile
from bench.workload import PRODUCER_W1, input_partition, record
from connectors.admin import create_topics
from streamcore import broker
from streamcore.core.logs import librdkafka_logger

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4


@dataclass
class Result:
    system: str
    workload: str
    outputs: int = 0
    rate: float = 0.0  # steady outputs/s, first output to last
    startup_s: float = 0.0  # process start to first output
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us: float = 0.0  # CPU time of the system's process per output, first output to last
    rss_mb: float = 0.0  # peak resident memory of the system's process, sampled per batch
    in_worker: dict[str, Any] = field(default_factory=dict)


class _Broker:
    def __enter__(self) -> str:
        self.dir = Path(tempfile.mkdtemp(prefix="sc-bench-"))
        return broker.start(self.dir).bootstrap

    def __exit__(self, *exc: object) -> None:
        broker.stop(self.dir)


def _start(system: str, mode: str, bootstrap: str, src: str, out: str,
           log: Path, extra_env: dict[str, str] | None = None,
           group: str | None = None) -> subprocess.Popen[bytes]:
    group = group or f"bench-{uuid.uuid4().hex[:8]}"
    aio = os.environ.get("STREAMCORE_CLIENT") == "aiokafka"
    if system == "raw":
        loop = "bench.raw_aio" if aio else "bench.raw_loop"
        cmd = [sys.executable, "-m", loop, src, out, group, mode, bootstrap]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, "-m", "streamcore.cli", "run", "bench/jobs.py:job",
               "--bootstrap", bootstrap, "--group", group]
        env = {**os.environ, "BENCH_IN": src, "BENCH_OUT": out, "BENCH_JOB": group,
               "BENCH_MODE": mode, **(extra_env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    profile.attach(proc.pid, f"{system}-{mode}")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


_ASSIGNED = re.compile(r"\bassigned (\d+|\S+\[\d+\])")


def _wait_assigned(log: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The raw loops print "assigned 4", streamcore "assigned w3-in[0], ..."; aiokafka's
        # own "Revoking previously assigned partitions set()" comes before the group is joined.
        if _ASSIGNED.search(log.read_text(errors="replace")):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"benchmark process exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError("benchmark process never got its partitions")


def _in_worker(log: Path) -> dict[str, Any]:
    """The in-worker latency of the worker's last progress line (JSON logs); in epoch mode
    also the median epoch and transaction commit times over every epoch."""
    last: dict[str, Any] = {}
    commits: list[float] = []
    epochs: list[float] = []
    for line in log.read_text(errors="replace").splitlines():
        if '"progress"' in line:
            try:
                fields = orjson.loads(line)["progress"]
            except orjson.JSONDecodeError:
                continue
            # The state figures of the report that saw the most (the last one comes after
            # the partitions closed, with none).
            state = {k: max(fields.get(k, 0), last.get(k, 0))
                     for k in ("stateRows", "expiredRows", "expiryMs")}
            last = {"p50": fields["p50Ms"], "p99": fields["p99Ms"],
                    **{k: v for k, v in state.items() if v}}
            if "commitMs" in fields:
                commits.append(float(fields["commitMs"]))
                epochs.append(float(fields["epochMs"]))
    if commits:
        last["commit_ms"] = statistics.median(commits)
        last["epoch_ms"] = statistics.median(epochs)
        last["epochs"] = len(commits)
    return last


def _rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (librdkafka's included)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _reader(bootstrap: str, topic: str, fetch_wait_ms: int) -> Consumer:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                  "logger": librdkafka_logger(),
                  "fetch.wait.max.ms": fetch_wait_ms, "fetch.queue.backoff.ms": 1,
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    return c


def _produce_all(bootstrap: str, topic: str,
                 records: Iterable[tuple[bytes, bytes, int]]) -> None:
    """Produce (key, value, partition) records with the W1 producer settings and wait for
    them all."""
    p = Producer({"bootstrap.servers": bootstrap, "logger": librdkafka_logger(), **PRODUCER_W1})
    for key, value, partition in records:
        while True:
            try:
                p.produce(topic, value, key, partition)
                break
            except BufferError:
                p.poll(0.05)
    p.flush(60)


def run_w1(system: str, records: int, mode: str = "w1", trigger: str | None = None) -> Result:
    """Throughput: W1 (stateless) or, with mode "w2", the keyed running aggregate (then the
    stores are also rebuilt from their changelogs by a second worker: restore rate)."""
    res = Result(system, mode.upper())
    with _Broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        src, out = "w1-in", "w1-out"
        create_topics(bootstrap, {src: PARTITIONS, out: PARTITIONS})
        keys = 1000 if mode == "w2win" else 5000
        _produce_all(bootstrap, src, ((f"u{i % keys}".encode(), record(i),
                                       input_partition(i % keys, PARTITIONS))
                                      for i in range(records)))
        expected = records - (records + 9) // 10 if mode == "w1" else records
        if mode == "w2win":  # one output per key and closed window: 10 records each
            expected = records // 10 - 2 * keys  # the last windows stay open
        reader = _reader(bootstrap, out, 100)
        log = Path(tmp) / "proc.log"
        t0 = time.monotonic()
        group = f"bench-{uuid.uuid4().hex[:8]}"
        state = {"STREAMCORE_STATE_DIR": str(Path(tmp) / "state"),
                 **({"STREAMCORE_TRIGGER": trigger} if trigger else {})}
        proc = _start(system, mode, bootstrap, src, out, log, state, group)
        first = last = 0.0
        cpu_first = cpu_last = 0.0
        seen = at_cpu_first = at_cpu_last = 0
        threads_first: dict[int, tuple[str, float]] = {}
        threads_last = threads_first
        deadline = time.monotonic() + 300
        while seen < expected and time.monotonic() < deadline:
            n = sum(1 for m in reader.consume(10000, 0.2) if m.error() is None)
            if n:
                last = time.monotonic()
                res.rss_mb = max(res.rss_mb, _rss_mb(proc.pid))
                cpu = _cpu_seconds(proc.pid)
                threads = profile.thread_cpu(proc.pid) if profile.enabled() else {}
                if not seen:
                    first, cpu_first, at_cpu_first = last, cpu, n
                    threads_first = threads
                seen += n
                cpu_last, at_cpu_last, threads_last = cpu, seen, threads
            elif seen and time.monotonic() - last > 15:
                break
            elif proc.poll() is not None:
                raise RuntimeError(f"{system} {mode} exited {proc.returncode}:\n"
                                   f"{log.read_text(errors='replace')[-2000:]}")
        if profile.enabled() and at_cpu_last > at_cpu_first:
            print(f"  {system} {mode} CPU per record by thread: " + profile.per_record(
                threads_first, threads_last, at_cpu_last - at_cpu_first), flush=True)
        _stop(proc)
        reader.close()
        res.outputs = seen
        res.startup_s = first - t0 if first else float("nan")
        res.rate = seen / (last - first) if last > first else 0.0
        if mode == "w2win":  # input records per second (each output is 10 of them)
            res.rate *= 10
        if at_cpu_last > at_cpu_first:
            res.cpu_us = 1e6 * (cpu_last - cpu_first) / (at_cpu_last - at_cpu_first)
            if mode == "w2win":  # per input record
                res.cpu_us /= 10
        res.in_worker = _in_worker(log) if system == "streamcore" else {}
        if seen < expected:
            print(f"  warning: {system} {mode} produced {seen} of {expected} outputs")
        if mode == "w2" and not trigger:
            res.in_worker = _restore_rate(bootstrap, src, out, Path(tmp), group)
    return res


_RESTORED = re.compile(r"restored \S+ from offset \d+: (\d+) records in ([\d.]+)s")


def _restore_rate(bootstrap: str, src: str, out: str, tmp: Path, group: str) -> dict[str, Any]:
    """Start the W2 job again on an empty state directory: every store is rebuilt from its
    changelog. Returns records and the rate per store (records / its restore time)."""
    log = tmp / "restore.log"
    proc = _start("streamcore", "w2", bootstrap, src, out, log,
                  {"STREAMCORE_STATE_DIR": str(tmp / "state-empty")}, group)
    deadline = time.monotonic() + 120
    found: list[tuple[int, float]] = []
    while time.monotonic() < deadline and len(found) < PARTITIONS and proc.poll() is None:
        time.sleep(0.5)
        found = [(int(n), float(s)) for n, s in _RESTORED.findall(log.read_text())]
    _stop(proc)
    n, secs = sum(x for x, _ in found), sum(y for _, y in found)
    return {"restored": n, "rate": n / secs if secs else 0.0}


def run_restore(records: int) -> dict[str, float]:
    """Restore of one store from a changelog of `records` records (100k distinct keys,
    ~60-byte values), timed from the start of the replay to the store being usable."""
    from connectors.confluent import ConfluentReader, reader_settings
    from statestore.rocksdb import RocksDBSettings
    from streamcore.runtime.state import PartitionStores

    with _Broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        topic = "bench-totals-changelog"
        create_topics(bootstrap, {topic: 1}, config={"cleanup.policy": "compact"})
        _produce_all(bootstrap, topic, ((b'"u%d"' % (i % 100_000),
                                         orjson.dumps({"count": i, "sum": i * 12.5}), 0)
                                        for i in range(records)))
        stores = PartitionStores("bench", 0, state_dir=Path(tmp), backend="rocksdb",
                                 settings=RocksDBSettings(), cache_entries=1000)
        stores.open("totals", topic, orjson.dumps, orjson.loads)
        t0 = time.perf_counter()
        stores.restore(lambda: ConfluentReader(reader_settings(bootstrap, {})), lambda: False)
        elapsed = time.perf_counter() - t0
        n = stores.slots[0].restored
        stores.close()
    return {"restored": n, "seconds": elapsed, "rate": n / elapsed}


def run_w3(system: str, rate: int, seconds: int, trigger: str | None = None) -> Result:
    res = Result(system, "W3")
    with _Broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        src, out = "w3-in", "w3-out"
        create_topics(bootstrap, {src: PARTITIONS, out: PARTITIONS})
        log = Path(tmp) / "proc.log"
        proc = _start(system, "w3", bootstrap, src, out, log,
                      {"STREAMCORE_STATE_DIR": str(Path(tmp) / "state"),
                       **({"STREAMCORE_TRIGGER": trigger} if trigger else {})})
        _wait_assigned(log, proc)
        reader = _reader(bootstrap, out, 5)
        latencies: list[float] = []
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                first = reader.poll(0.05)  # not consume(n, t): that waits for n or t
                if first is None:
                    continue
                for m in [first, *reader.consume(999, 0)]:
                    if m.error() is None:
                        latencies.append(time.time() - orjson.loads(m.value() or b"{}")["sent"])

        t = threading.Thread(target=read)
        t.start()
        time.sleep(1)  # let the reader's fetches settle
        p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0,
                      "logger": librdkafka_logger()})
        start = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - start < seconds:
            while sent < int((now - start) * rate):
                i = sent * 10 + 1  # never a bot: every record has an output
                p.produce(src, record(i), f"u{i % 5000}".encode(),
                          input_partition(i % 5000, PARTITIONS))
                sent += 1
            p.poll(0)
            time.sleep(0.001)
        p.flush(10)
        time.sleep(2)
        stop.set()
        t.join()
        reader.close()
        _stop(proc)
        res.outputs = len(latencies)
        if latencies:
            q = statistics.quantiles(latencies, n=100)
            res.p50_ms, res.p99_ms = 1000 * q[49], 1000 * q[98]
        res.in_worker = _in_worker(log) if system == "streamcore" else {}
        if res.outputs < sent:
            print(f"  warning: {system} W3 produced {res.outputs} of {sent} outputs")
    return res


def _paired_rows(title: str, pairs: list[tuple[Result, Result]], *,
                 target: float) -> list[str]:
    """Every paired run's rates and ratio, then the medians (the figure to report)."""
    ratios = [sc.rate / raw.rate for raw, sc in pairs if raw.rate]
    cpu = [raw.cpu_us / sc.cpu_us for raw, sc in pairs if sc.cpu_us]
    rss = [sc.rss_mb / raw.rss_mb for raw, sc in pairs if raw.rss_mb]
    runs = ", ".join(f"{raw.rate / 1000:.0f}k/{sc.rate / 1000:.0f}k" for raw, sc in pairs)
    return [f"{title}: raw/streamcore rec/s {runs}; ratio median "
            f"{statistics.median(ratios):.2f}x (runs {', '.join(f'{r:.2f}' for r in ratios)}; "
            f"target >= {target:.2f}x); CPU per record raw/streamcore median "
            f"{statistics.median(cpu):.2f}x; peak RSS streamcore/raw median "
            f"{statistics.median(rss):.2f}x"]


def _epoch_rows(args: argparse.Namespace) -> list[str]:
    """Epoch mode against continuous mode and the raw loop, each repeat in one invocation."""
    os.environ["BENCH_SETTINGS"] = "equal"
    rows: list[str] = []
    for mode in ("w1", "w2"):
        if args.only not in (None, mode):
            continue
        runs = []
        for i in range(args.repeat):
            raw = run_w1("raw", args.w1_records)
            cont = run_w1("streamcore", args.w1_records, mode=mode)
            ep = run_w1("streamcore", args.w1_records, mode=mode, trigger="100ms")
            runs.append((raw, cont, ep))
            print(f"{mode.upper()} run {i + 1}: raw W1 {raw.rate:9.0f}  continuous "
                  f"{cont.rate:9.0f}  epochs {ep.rate:9.0f} rec/s  (epoch {ep.in_worker})",
                  flush=True)
        ratios = [ep.rate / cont.rate for _, cont, ep in runs if cont.rate]
        raws = [ep.rate / raw.rate for raw, _, ep in runs if raw.rate]
        rows.append(
            f"{mode.upper()} epoch mode (100 ms): raw/continuous/epochs rec/s " + ", ".join(
                f"{r.rate / 1000:.0f}k/{c.rate / 1000:.0f}k/{e.rate / 1000:.0f}k"
                for r, c, e in runs) + f"; epochs/continuous median "
            f"{statistics.median(ratios):.2f}x (target >= 0.8x); epochs/raw W1 median "
            f"{statistics.median(raws):.2f}x; median epoch "
            f"{statistics.median(e.in_worker.get('epoch_ms', 0) for _, _, e in runs):.0f} ms, "
            f"transaction commit "
            f"{statistics.median(e.in_worker.get('commit_ms', 0) for _, _, e in runs):.1f} ms")
    if args.only in (None, "w3"):
        raw = run_w3("raw", args.w3_rate, args.w3_seconds)
        ep = run_w3("streamcore", args.w3_rate, args.w3_seconds, trigger="100ms")
        rows.append(f"W3 epoch mode (100 ms) end-to-end latency: raw p50 {raw.p50_ms:.1f} / "
                    f"p99 {raw.p99_ms:.1f} ms; epochs p50 {ep.p50_ms:.1f} / p99 "
                    f"{ep.p99_ms:.1f} ms (target p99 < 250 ms); transaction commit median "
                    f"{ep.in_worker.get('commit_ms', float('nan'))} ms over "
                    f"{ep.in_worker.get('epochs', 0)} epochs")
    return rows


def _variants(choice: str) -> Iterator[str]:
    """The client-settings variants of a W1 or W2 run ("both": equal, then defaults), each
    set in BENCH_SETTINGS while it runs; "equal" again afterwards."""
    try:
        for variant in ("equal", "defaults") if choice == "both" else (choice,):
            os.environ["BENCH_SETTINGS"] = variant
            yield variant
    finally:
        os.environ["BENCH_SETTINGS"] = "equal"


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--w1-records", type=int, default=500_000)
    ap.add_argument("--w3-rate", type=int, default=200)
    ap.add_argument("--w3-seconds", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3,
                    help="paired runs (raw, then streamcore) per workload; medians are reported")
    ap.add_argument("--settings", choices=("equal", "defaults", "both"), default="both",
                    help="W1 and W2 client settings: equal on both sides, each side's defaults, "
                         "or both")
    ap.add_argument("--only", choices=("w1", "w2", "w2win", "w3"))
    ap.add_argument("--restore-records", type=int, default=1_000_000)
    ap.add_argument("--epochs", action="store_true",
                    help="epoch mode (100 ms trigger): W1 and W2 against continuous mode and "
                         "the raw loop, W3 latency, and the transaction commit time")
    ap.add_argument("--profile", metavar="DIR",
                    help="print each run's CPU per record by thread, and write py-spy "
                         "profiles of the steady state to DIR (bench/profile.py)")
    ap.add_argument("--client", choices=("confluent-kafka", "aiokafka"),
                    default="confluent-kafka",
                    help="aiokafka: streamcore on its aiokafka backend against the raw "
                         "aiokafka loop (W1 and W3, equal settings)")
    args = ap.parse_args()
    if args.profile:
        os.environ["BENCH_PROFILE"] = args.profile
    if args.client == "aiokafka":
        os.environ["STREAMCORE_CLIENT"] = "aiokafka"
        args.settings = "equal"
    rows: list[str] = []
    if args.epochs:
        print("\n".join(_epoch_rows(args)))
        return 0
    if args.only in (None, "w1"):
        for variant in _variants(args.settings):
            pairs = []
            for i in range(args.repeat):
                pair = (run_w1("raw", args.w1_records), run_w1("streamcore", args.w1_records))
                pairs.append(pair)
                for r in pair:
                    print(f"W1 ({variant} settings) run {i + 1} {r.system:10s} {r.rate:9.0f} "
                          f"rec/s {r.cpu_us:5.2f} us CPU/record {r.rss_mb:4.0f} MB peak RSS "
                          f"(startup {r.startup_s:.1f}s, {r.outputs} outputs)", flush=True)
            rows += _paired_rows(f"W1 stateless, {variant} settings", pairs, target=0.85)
    if args.only in (None, "w2"):
        # As W1: "defaults" is streamcore's aggregate with its own client defaults against
        # the raw W1 loop with librdkafka's; "equal" gives both W1's tuned settings.
        for variant in _variants(args.settings):
            pairs = []
            for i in range(args.repeat):
                pairs.append((run_w1("raw", args.w1_records),
                              run_w1("streamcore", args.w1_records, mode="w2")))
                print(f"W2 ({variant} settings) run {i + 1} raw W1 {pairs[-1][0].rate:9.0f} "
                      f"rec/s   streamcore W2 {pairs[-1][1].rate:9.0f} rec/s   restore "
                      f"{pairs[-1][1].in_worker}", flush=True)
            rows += _paired_rows(f"W2 keyed aggregate vs raw W1, {variant} settings", pairs,
                                 target=0.7)
            w2 = max((p[1] for p in pairs), key=lambda r: r.rate)
            rows.append(f"W2 restore after the run {w2.in_worker.get('restored', 0)} "
                        f"changelog records, {w2.in_worker.get('rate', 0.0):,.0f} records/s "
                        "per store (small stores: dominated by the fixed end-of-log check)")
    if args.only in (None, "w2", "w2win"):
        pairs = []
        for i in range(args.repeat):
            pairs.append((run_w1("raw", args.w1_records),
                          run_w1("streamcore", args.w1_records, mode="w2win")))
            print(f"W2 windowed run {i + 1} raw W1 {pairs[-1][0].rate:9.0f} rec/s   "
                  f"streamcore {pairs[-1][1].rate:9.0f} input rec/s   "
                  f"{pairs[-1][1].in_worker}", flush=True)
        rows += _paired_rows("W2 windowed count (1 s tumbling, append) vs raw W1", pairs,
                             target=0.5)
        iw = max((p[1] for p in pairs), key=lambda r: r.rate).in_worker
        expired = iw.get("expiredRows", 0)
        rows.append(f"W2 windowed state        {iw.get('stateRows', 0)} rows in the stores at "
                    f"the last report (open windows); {expired} windows expired in "
                    f"{iw.get('expiryMs', 0.0):.0f} ms, "
                    f"{1000 * iw.get('expiryMs', 0.0) / max(expired, 1):.1f} us each "
                    "(emit the final row, delete with a tombstone)")
    if args.only in (None, "w2"):
        rs = run_restore(args.restore_records)
        rows.append(f"Restore one store        {rs['restored']:.0f} changelog records in "
                    f"{rs['seconds']:.2f}s: {rs['rate']:,.0f} records/s  (target >= 100,000)")
    if args.only in (None, "w3"):
        raw = run_w3("raw", args.w3_rate, args.w3_seconds)
        print(f"W3 raw        p50 {raw.p50_ms:6.1f} ms  p99 {raw.p99_ms:6.1f} ms", flush=True)
        sc = run_w3("streamcore", args.w3_rate, args.w3_seconds)
        print(f"W3 streamcore p50 {sc.p50_ms:6.1f} ms  p99 {sc.p99_ms:6.1f} ms", flush=True)
        rows.append(f"W3 end-to-end latency    raw p50 {raw.p50_ms:.1f} / p99 {raw.p99_ms:.1f} ms"
                    f"   streamcore p50 {sc.p50_ms:.1f} / p99 {sc.p99_ms:.1f} ms   p99 ratio "
                    f"{sc.p99_ms / raw.p99_ms:.2f}x  (target <= 1.5x)")
        iw = sc.in_worker
        rows.append(f"W3 in-worker latency     streamcore p50 {iw.get('p50', float('nan'))} ms"
                    f" / p99 {iw.get('p99', float('nan'))} ms  (target p99 < 1 ms)")
    print("\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
