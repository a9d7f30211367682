"""What a worker shows the outside: liveness and readiness (the HTTP probes), the metrics
snapshot, and progress reports. Reads the worker's state and never changes it; health,
ready and snapshot are safe from the HTTP thread (they copy before they iterate)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from metrics.exporter import Snapshot
from streamcore.runtime.eventtime import NO_WATERMARK
from streamcore.runtime.partition import PartitionTask, TaskState

if TYPE_CHECKING:
    from streamcore.runtime.worker import Worker

__all__ = ["WorkerStatus", "progress_fields", "progress_line"]

log = logging.getLogger("streamcore.worker")


class WorkerStatus:
    def __init__(self, worker: Worker) -> None:
        self._w = worker
        # Totals of partition tasks already closed, so that counters stay monotonic.
        self._retired_consumed: dict[tuple[str, int], int] = {}
        self._retired_produced: dict[str, int] = {}
        self._retired_dlq = 0
        self._retired_late = 0
        self._retired_processed = 0
        self._retired_restored: dict[str, int] = {}  # step -> changelog records replayed
        self.last_progress: dict[str, Any] | None = None
        self._progress_id = 0
        self._progress_mark = (time.monotonic(), 0)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Alive: the event loop runs and the poll loop is not stuck (called from any thread)."""
        now = time.monotonic()
        loop_lag = now - self._w.heartbeat
        limit = self._w.config.health_timeout_s
        rebalancing = self._w.rebalancing_since
        # A rebalance callback may legitimately hold the poll loop while it drains.
        poll_limit = limit + (self._w.config.shutdown_timeout_s if rebalancing else 0.0)
        poll_lag = now - (rebalancing or self._w.last_poll)
        detail = {"event_loop_lag_s": round(loop_lag, 3), "poll_lag_s": round(poll_lag, 3)}
        if loop_lag > limit:
            return False, {**detail, "reason": f"event loop stalled for {loop_lag:.1f}s "
                           "(a blocking call in a job function?)"}
        if poll_lag > poll_limit:
            return False, {**detail, "reason": f"poll loop stalled for {poll_lag:.1f}s"}
        for table in list(self._w.tables.values()):
            if table.failure is not None:  # its lookups would answer from stale data
                return False, {**detail, "reason": f"global table {table.name!r} stopped "
                               f"following {table.topic}: {table.failure}"}
        return True, detail

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready: in the group, no rebalance in progress, every assigned partition RUNNING.
        A member with no partition (more replicas than partitions, or a surge pod in a
        rolling update) is ready: it is doing all it can, and an orchestrator waiting for it
        would block the update."""
        states = {f"{t}[{p}]": task.state.value for (t, p), task in list(self._w.tasks.items())}
        if self._w.rebalancing_since is not None:
            return False, {"reason": "rebalancing", "partitions": states}
        if not states:
            if self._w.joined:
                return True, {"reason": "in the group with no partition assigned (idle)",
                              "partitions": states}
            return False, {"reason": "not in the group yet", "partitions": states}
        if any(s != TaskState.RUNNING.value for s in states.values()):
            return False, {"reason": "partitions not running yet", "partitions": states}
        return True, {"partitions": states}

    def retire(self, task: PartitionTask) -> None:
        """Keep a closing task's totals, so that counters stay monotonic."""
        consumed, produced = self._retired_consumed, self._retired_produced
        consumed[task.tp] = consumed.get(task.tp, 0) + task.records_in
        for c in task.ctx.sinks:
            produced[c.topic] = produced.get(c.topic, 0) + c.n
        self._retired_dlq += task.dlq_records
        self._retired_late += task.ctx.late_records
        if not task.internal:
            self._retired_processed += task.processed
        for slot in task.stores.slots if task.stores is not None else ():
            self._retired_restored[slot.step] = (
                self._retired_restored.get(slot.step, 0) + slot.restored)

    def snapshot(self) -> Snapshot:
        """Everything the exporter shows; safe from the HTTP thread (copies are atomic)."""
        tasks = list(self._w.tasks.values())
        consumed = dict(self._retired_consumed)
        produced = dict(self._retired_produced)
        dlq = self._retired_dlq
        lag: dict[tuple[str, ...], float] = {}
        states: dict[str, int] = {s.value: 0 for s in TaskState}
        restored: dict[tuple[str, ...], float] = {
            (k,): v for k, v in self._retired_restored.items()}
        restore_s: dict[tuple[str, ...], float] = {}
        keys: dict[tuple[str, ...], float] = {}
        committed: dict[tuple[str, ...], float] = {}
        oldest: dict[tuple[str, ...], float] = {}
        watermarks: dict[tuple[str, ...], float] = {}
        late = self._retired_late
        now = time.perf_counter()
        for table in self._w.tables.values():
            restored[(table.name,)] = restored.get((table.name,), 0) + table.restored
            restore_s[(table.name,)] = table.restore_seconds
        for t in tasks:
            stores = t.stores  # read once: the loop thread may close it meanwhile
            for slot in list(stores.slots) if stores is not None else ():
                k = (slot.step,)
                restored[k] = restored.get(k, 0) + slot.restored
                restore_s[k] = max(restore_s.get(k, 0.0), slot.restore_seconds)
                keys[k] = keys.get(k, 0) + slot.store.approximate_count()
            consumed[t.tp] = consumed.get(t.tp, 0) + t.records_in
            for c in list(t.ctx.sinks):
                produced[c.topic] = produced.get(c.topic, 0) + c.n
            dlq += t.dlq_records
            late += t.ctx.late_records
            states[t.state.value] += 1
            label = (t.tp[0], str(t.tp[1]))
            wm = t.ctx.event_time.watermark
            if wm != NO_WATERMARK:
                watermarks[label] = wm / 1000
            if t.committed >= 0:
                committed[label] = t.committed
            since = t.tracker.oldest_pending()
            oldest[label] = 0.0 if since is None else max(0.0, now - since)
            high = self._w.high_watermark(t.tp)
            nxt = (t.last_offset + 1) if t.last_offset is not None else max(t.committed, 0)
            if high is not None:
                lag[(t.tp[0], str(t.tp[1]))] = max(0, high - nxt)
        samples: dict[str, dict[tuple[str, ...], float]] = {
            "streamcore_records_consumed_total": {
                (tp[0], str(tp[1])): v for tp, v in consumed.items()},
            "streamcore_records_produced_total": {(k,): v for k, v in produced.items()},
            "streamcore_consumer_lag": lag,
            "streamcore_commits_total": {(): self._w.commits},
            "streamcore_rebalances_total": {(): self._w.rebalances},
            "streamcore_fetch_gaps_total": {(): self._w.gaps.reads_again},
            "streamcore_assigned_partitions": {(): len(tasks)},
            "streamcore_paused_partitions": {(): sum(1 for t in tasks if t.paused)},
            "streamcore_partitions": {(s,): n for s, n in states.items()},
            "streamcore_errors_total": {k: float(n) for k, n in list(self._w.errors.items())},
            "streamcore_committed_offset": committed,
            "streamcore_oldest_uncommitted_age_seconds": oldest,
            "streamcore_dlq_records_total": {(): dlq},
            "streamcore_broker_connected": {(): float(self._w.broker_connected)},
            "streamcore_event_loop_lag_seconds": {(): time.monotonic() - self._w.heartbeat},
            "streamcore_state_restore_records_total": restored,
            "streamcore_state_restore_duration_seconds": restore_s,
            "streamcore_store_keys": keys,
            "streamcore_watermark_seconds": watermarks,
            "streamcore_late_records_dropped_total": {(): late},
            "streamcore_global_table_failures_total": {
                (t.name,): float(t.failure is not None) for t in list(self._w.tables.values())},
        }
        return Snapshot(samples=samples, histograms={
            "streamcore_processing_latency_seconds": self._w.latency.export(),
            "streamcore_end_to_end_latency_seconds": self._w.e2e_latency.export(),
            "streamcore_commit_latency_seconds": self._w.commit_latency.export(),
        })

    def processed(self) -> int:
        """Records of the job's sources that went through the whole chain (Spark's input
        rows: fetched ones still queued, or dropped at a failure or a stop, are not counted,
        nor are the records a repartition topic carries from one sub-topology to the next)."""
        return self._retired_processed + sum(
            t.processed for t in list(self._w.tasks.values()) if not t.internal)

    def report_epoch(self, epoch: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Epoch mode: one report per committed epoch, in the same shape, with its batchId,
        its rows and its durations by phase."""
        return self.report_progress(epoch=epoch, seconds=seconds)

    def report_progress(self, *, epoch: dict[str, Any] | None = None,
                        seconds: float | None = None) -> dict[str, Any]:
        now = time.monotonic()
        since, before = self._progress_mark
        processed = self.processed()
        self._progress_mark = (now, processed)
        elapsed = max(now - since if seconds is None else seconds, 1e-9)
        rows = processed - before if epoch is None else int(epoch["numInputRows"])
        report: dict[str, Any] = {
            "id": self._w.plan.name,
            "runId": self._w.run_id,
            "name": self._w.plan.name,
            "timestamp": _iso(int(time.time() * 1000)),  # Spark's: UTC, ms, with the Z
            "batchId": self._progress_id,
            "numInputRows": rows,
            "inputRowsPerSecond": round(rows / elapsed, 1),
            "processedRowsPerSecond": round(rows / elapsed, 1),
            "durationMs": {"commit": self._w.commit_latency.summary_ms()},
            "inWorkerLatencyMs": self._w.latency.summary_ms(),
            "sources": [
                {"description": f"{tp[0]}[{tp[1]}]", "state": t.state.value,
                 "startOffset": t.first_offset, "endOffset": t.last_offset,
                 "committedOffset": t.committed, "queued": t.queued, "paused": t.paused,
                 **_watermark(t)}
                for tp, t in sorted(self._w.tasks.items())
            ],
            "commits": self._w.commits,
            "rebalances": self._w.rebalances,
        }
        marks = [t.ctx.event_time.watermark for t in self._w.tasks.values()
                 if t.ctx.event_time.watermark != NO_WATERMARK]
        if marks:  # Spark's eventTime.watermark: here the lowest of the partition tasks'
            report["eventTime"] = {"watermark": _iso(min(marks)),
                                   "lateRowsDropped": sum(t.ctx.late_records
                                                          for t in self._w.tasks.values())}
        ops = _state_operators(list(self._w.tasks.values()))
        if ops:
            report["stateOperators"] = ops
        if epoch is not None:
            report.update(epoch)
            report["mode"] = "epoch"
            report["trigger"] = self._w.config.trigger_spec.describe()
        else:
            self._progress_id += 1
            report["mode"] = "continuous"
        self.last_progress = report
        if self._w.on_progress is not None:
            self._w.on_progress(report)
        fields = progress_fields(report)
        log.info("%s", progress_line(fields), extra={"progress": fields})
        return report


def _state_operators(tasks: list[PartitionTask]) -> list[dict[str, Any]]:
    """Spark's stateOperators, per event-time step over this worker's partitions: rows in
    its stores (RocksDB's estimate), rows expired by the watermark and the time that took."""
    by_step: dict[str, dict[str, Any]] = {}
    for t in tasks:
        stores = t.stores
        rows = {slot.step: slot.store.approximate_count()
                for slot in (list(stores.slots) if stores is not None else ())}
        for step in list(t.ctx.timed_steps):
            op = by_step.setdefault(step.name, {"name": step.name, "numRowsTotal": 0,
                                                "numRowsExpired": 0, "expiryMs": 0.0})
            op["numRowsTotal"] += rows.get(step.name, 0)
            op["numRowsExpired"] += step.expired_rows
            op["expiryMs"] = round(op["expiryMs"] + 1000 * step.expiry_s, 1)
    return list(by_step.values())


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _watermark(t: PartitionTask) -> dict[str, Any]:
    wm = t.ctx.event_time.watermark
    return {} if wm == NO_WATERMARK else {"watermark": _iso(wm)}


def progress_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a progress report worth a log line (the whole report is on
    /progress and the query handle)."""
    sources = report["sources"]
    return {
        "rows": report["numInputRows"],
        "rowsPerSecond": report["processedRowsPerSecond"],
        "partitions": len(sources),
        "running": sum(1 for s in sources if s["state"] == TaskState.RUNNING.value),
        "paused": sum(1 for s in sources if s["paused"]),
        "queued": sum(s["queued"] for s in sources),
        "commits": report["commits"],
        "p50Ms": report["inWorkerLatencyMs"]["p50"],
        "p99Ms": report["inWorkerLatencyMs"]["p99"],
        **({"stateRows": sum(o["numRowsTotal"] for o in report["stateOperators"]),
            "expiredRows": sum(o["numRowsExpired"] for o in report["stateOperators"]),
            "expiryMs": sum(o["expiryMs"] for o in report["stateOperators"])}
           if report.get("stateOperators") else {}),
        **({"epoch": report["batchId"], "epochMs": report["durationMs"]["total"],
            "commitMs": report["durationMs"]["commit"]}
           if report.get("mode") == "epoch" else {}),
    }


def progress_line(f: dict[str, Any]) -> str:
    """The log line of a report's progress_fields."""
    if "epoch" in f:
        return (f"epoch {f['epoch']} committed: {f['rows']} rows in {f['epochMs']} ms "
                f"(commit {f['commitMs']} ms), {f['partitions']} partitions, "
                f"{f['queued']} queued")
    return (f"progress: {f['rows']} rows ({f['rowsPerSecond']}/s), {f['partitions']} partitions "
            f"({f['running']} running, {f['paused']} paused), {f['queued']} queued, "
            f"{f['commits']} commits, in-worker p99 {f['p99Ms']} ms")
