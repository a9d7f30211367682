"""`python -m bench --profile DIR`: where the time of the system under test goes.

Two views, both of the steady state:
- CPU time per output record of each of the process's threads, grouped by thread name
  (the event loop's "python" against librdkafka's "rdk:broker*"), printed after each run;
- a py-spy sampling profile of its Python threads, attached 6 s after the process started
  (after start-up) for 6 s, written as raw stacks to DIR/<system>-<n>.txt (fold or render
  them with any flamegraph tool). py-spy is not a dependency: it is taken from $PY_SPY or
  the PATH; without it only the thread times are printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["attach", "enabled", "per_record", "thread_cpu"]


def enabled() -> Path | None:
    d = os.environ.get("BENCH_PROFILE")
    return Path(d) if d else None


def attach(pid: int, system: str) -> None:
    """Start py-spy on pid in the background (it ends by itself after its 6 s)."""
    out = enabled()
    spy = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if out is None or spy is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    n = len(list(out.glob(f"{system}-*.txt"))) + 1
    subprocess.Popen(["sh", "-c", 'sleep 6; exec "$0" "$@"', spy, "record", "--nonblocking",
                      "--format", "raw", "--rate", "200", "--duration", "6",
                      "--output", str(out / f"{system}-{n}.txt"), "--pid", str(pid)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of pid, by thread id, with its name."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    for t in psutil.Process(pid).threads():
        try:
            name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        out[t.id] = (name, t.user_time + t.system_time)
    return out


def per_record(first: dict[int, tuple[str, float]], last: dict[int, tuple[str, float]],
               records: int) -> str:
    """'python 2.05 us, rdk:broker 0.50 us (0.32 + 0.18), ...': CPU per record by thread
    name between two thread_cpu samples. librdkafka names every client's broker threads
    alike, so their sum comes with each busy one's share (the busiest is the producer's:
    it compresses; the reader's decompresses)."""
    by_name: dict[str, float] = {}
    brokers: list[float] = []
    for tid, (name, cpu) in last.items():
        used = cpu - first.get(tid, (name, 0.0))[1]
        key = "rdk:broker" if name.startswith("rdk:broker") else name
        by_name[key] = by_name.get(key, 0.0) + used
        if key == "rdk:broker" and 1e6 * used / records >= 0.01:
            brokers.append(used)
    busy = sorted(((v, k) for k, v in by_name.items() if v > 0), reverse=True)
    parts = " + ".join(f"{1e6 * v / records:.2f}" for v in sorted(brokers, reverse=True))
    return ", ".join(f"{k} {1e6 * v / records:.2f} us"
                     + (f" ({parts})" if k == "rdk:broker" and len(brokers) > 1 else "")
                     for v, k in busy)
