"""A stateful job for the process-level state tests, configured through environment variables.

IN, OUT, JOB: topics and job name (the state directory comes from STREAMCORE_STATE_DIR).
WORKER_ID, if set, is stamped on each aggregate (provenance checks of the fault tests).
FETCH_WAIT_MS: the consumer's fetch.wait.max.ms (default 20).
SESSION_TIMEOUT_MS: the consumer's session.timeout.ms (tests/jobs/_settings.py).
Per key (seq % 20) it keeps the count and the sum of seq, after a repartition by that key,
and writes each new aggregate to OUT. BREAK_STATE_ORDER=1 deliberately commits input offsets
without waiting for the state: the stores are flushed on their own schedule (every 30 s) and
offsets are committed as soon as the outputs are acknowledged, to prove that the crash test
catches it.
PASS_OVER=N: the local broker's defect of a fetch that passes records over (README, "The local
broker"), made to happen: in each repartition partition, the first batch taken that holds offset N
is handed over without N, N+1 and N+2 (the records stay in the log), and the first taken that
holds offset 2N without 2N and the rest of that batch, so that the next batch starts after a gap.
PASS_OVER_FIRST=N: the same defect at a task's first fetch after a restart: in each repartition
partition, the first batch a task takes from a committed offset (above 0) is handed over
without its first N records, so that it begins after a gap.
SLOW_LOOKUP=S: the worker's lookup of the committed offsets at an assignment (where each
repartition partition's reading begins) takes S seconds more, as on a slow coordinator; with
aiokafka, records of the new partitions are fetched meanwhile.
"""

import os
import sys
import time

from _settings import consumer  # tests/jobs: `streamcore run` puts a job's folder on the path

from streamcore import JSON, STR, Job, KafkaSink, KafkaSource, WorkerConfig

if os.environ.get("BREAK_STATE_ORDER") == "1":
    from streamcore.runtime import partition

    def _done_ignoring_state(self: partition.PartitionTask) -> int:
        return self.tracker.advance()  # state durability ignored: the bug under test

    _flush = partition.PartitionTask.flush_state
    _last = [time.monotonic()]

    def _flush_now_and_then(self: partition.PartitionTask) -> None:
        if time.monotonic() - _last[0] > 30:
            _last[0] = time.monotonic()
            _flush(self)

    partition.PartitionTask.done_offset = _done_ignoring_state  # type: ignore[method-assign]
    partition.PartitionTask.flush_state = _flush_now_and_then  # type: ignore[method-assign]

if os.environ.get("PASS_OVER"):
    from connectors.base import Message
    from streamcore.runtime import partition

    _n = int(os.environ["PASS_OVER"])
    _done: set[tuple[str, int, int]] = set()  # (topic, partition, N or 2N) passed over
    _offer = partition.PartitionTask.offer

    def _offer_passing_over(self: partition.PartitionTask, handed_at: float,
                            msgs: list[Message]) -> None:
        if self.tp[0].endswith("-repartition"):
            for at, upto in ((_n, _n + 3), (2 * _n, 1 << 62)):
                held = [m.offset() or 0 for m in msgs]
                if (held and (*self.tp, at) not in _done and held[0] <= at <= held[-1]
                        and held[0] == self._offered + 1):  # a batch the task takes
                    _done.add((*self.tp, at))
                    msgs = [m for m, o in zip(msgs, held, strict=True) if not at <= o < upto]
                    if upto > at + 3:  # the test waits for these before it writes more
                        print(f"passed over on purpose: {self.tp} from {at}", file=sys.stderr,
                              flush=True)
                    break  # one gap a batch: the second is met when the first is read again
            if not msgs:
                return  # the whole fetch passed over
        _offer(self, handed_at, msgs)

    partition.PartitionTask.offer = _offer_passing_over  # type: ignore[method-assign]

if os.environ.get("PASS_OVER_FIRST"):
    from connectors.base import Message
    from streamcore.runtime import partition

    _first = int(os.environ["PASS_OVER_FIRST"])
    _started: set[tuple[str, int]] = set()  # partitions whose first batch passed records over
    _offer_first = partition.PartitionTask.offer

    def _offer_passing_over_first(self: partition.PartitionTask, handed_at: float,
                                  msgs: list[Message]) -> None:
        if (self.tp[0].endswith("-repartition") and self.tp not in _started
                and self._offered < 0 and (msgs[0].offset() or 0) > 0):
            _started.add(self.tp)
            print(f"passed over on purpose: {self.tp} from {msgs[0].offset()}",
                  file=sys.stderr, flush=True)
            msgs = msgs[_first:]
            if not msgs:
                return  # the whole fetch passed over
        _offer_first(self, handed_at, msgs)

    partition.PartitionTask.offer = _offer_passing_over_first  # type: ignore[method-assign]

if os.environ.get("SLOW_LOOKUP"):
    import asyncio

    from streamcore.runtime import gaps

    _lookup = gaps.GapChecks.committed_starts

    async def _slow_lookup(self: gaps.GapChecks,
                           parts: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        if parts:
            print(f"lookup of {len(parts)} partitions held on purpose", file=sys.stderr,
                  flush=True)
            await asyncio.sleep(float(os.environ["SLOW_LOOKUP"]))
        return await _lookup(self, parts)

    gaps.GapChecks.committed_starts = _slow_lookup  # type: ignore[method-assign]

worker = os.environ.get("WORKER_ID")  # set: each aggregate also names who computed it


def add(a: dict[str, object], v: dict[str, int]) -> dict[str, object]:
    new: dict[str, object] = {"n": int(a["n"]) + 1,  # type: ignore[call-overload]
                              "sum": int(a["sum"]) + v["seq"]}  # type: ignore[call-overload]
    if worker:
        new["w"] = worker
    return new


job = Job(os.environ["JOB"], config=WorkerConfig(
    consumer=consumer({"fetch.wait.max.ms": int(os.environ.get("FETCH_WAIT_MS", "20"))}),
    commit_interval="300ms"))
(job.stream(KafkaSource(os.environ["IN"], value=JSON))
    .key_by(lambda v: f"k{v['seq'] % 20}")
    .aggregate(lambda: {"n": 0, "sum": 0}, add, name="totals")
    .to(KafkaSink(os.environ["OUT"], key=STR, value=JSON)))
